"""Hostile and malformed checkpoints: vlmfo1.safetensors must refuse every file the `safetensors` library refuses,
with a clean ValueError / KeyError / OSError naming the file, the tensor and what was expected (never
RecursionError, AttributeError, OverflowError...), still load valid-but-unusual files, and release every memory map
and file descriptor by reference counting alone (no gc.collect()) after `del model` and after failed loads.

Files are written byte by byte here, so each layout is exactly the one under test; a seeded corpus of random
mutations of a valid file is cross-checked against `safetensors.safe_open` (skipped without the library).
"""
import gc
import json
import os
import shutil
import struct

import numpy as np
import pytest

import vlmfo1
from vlmfo1.safetensors import Checkpoint, SafetensorsError, read_header

DEEP = 100_000  # nesting depth of the hostile JSON cases


# ---------------------------------------------------------------------------------------------------------- helpers
def entry(begin, end, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def blob(header, data=b"", length_delta=0, pad=True):
    """A safetensors file: header is a dict (dumped to JSON) or raw bytes; pad to 8 bytes with spaces as the library
    does; length_delta lies in the length field."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h) + length_delta) + h + data


def good_file():
    """Four tensors of different dtypes and odd sizes, in JSON order unlike offset order, plus metadata."""
    rng = np.random.default_rng(7)
    arrays = {"w": rng.standard_normal((3, 5)).astype(np.float32), "ids": np.arange(7, dtype=np.int64) - 3,
              "mask": (rng.random(5) > 0.5), "h": rng.standard_normal(3).astype(np.float16)}
    header, data, off = {"__metadata__": {"format": "pt"}}, b"", 0
    for name in ("w", "mask", "h", "ids"):  # offset order
        b = arrays[name].tobytes()
        dt = {"float32": "F32", "int64": "I64", "bool": "BOOL", "float16": "F16"}[str(arrays[name].dtype)]
        header[name] = entry(off, off + len(b), arrays[name].shape, dt)
        data, off = data + b, off + len(b)
    header = {k: header[k] for k in ("ids", "__metadata__", "h", "w", "mask")}  # JSON order != offset order
    return blob(header, data), arrays


try:
    import safetensors as st
except ImportError:  # the cross-checks are skipped, vlmfo1's own checks still run
    st = None


def library_refuses(path):
    """True when the `safetensors` library refuses the file (opening it or reading any tensor), None without it."""
    if st is None:
        return None
    try:
        with st.safe_open(path, "np") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:  # SafetensorError, or whatever else the library raises on a bad file
        return True
    return False


def library_arrays(path):
    with st.safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def our_load(path):
    """All tensors through vlmfo1 (the error propagates)."""
    with Checkpoint(path) as ck:
        return {k: np.array(ck.get(k)) for k in ck.keys()}


def expect_refused(path, *needles, kind=ValueError):
    """Load `path` with vlmfo1: it must raise `kind` whose message names the file and contains every needle."""
    with pytest.raises(kind) as ei:
        our_load(path)
    msg = str(ei.value)
    assert os.path.basename(str(path)) in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------------------------- malformed files, one by one
def _cases():
    """(id, file bytes, substrings the message must contain, whether the safetensors library refuses it too)."""
    good, _ = good_file()
    n = struct.unpack("<Q", good[:8])[0]
    g2 = {"a": entry(0, 8), "b": entry(8, 16)}
    d16 = bytes(range(16))
    unpadded = json.dumps({"a": entry(0, 8)}).encode()
    assert len(unpadded) % 8, "the one-short case needs a header that is not a multiple of 8"
    cases = [
        # truncations and length-field lies
        ("empty file", b"", ["only 0 bytes"], True),
        ("7 bytes", good[:7], ["only 7 bytes"], True),
        ("header cut", good[:8 + n // 2], ["runs past the end of the file"], True),
        ("data cut", good[:-3], ["run past the end of the data section", "truncated"], True),
        ("data cut to header", good[:8 + n], ["run past the end of the data section"], True),
        ("length 2**62", struct.pack("<Q", 2**62) + good[8:], ["header length", "at most 100000000"], True),
        ("length 2**64-1", b"\xff" * 8 + good[8:], ["header length"], True),
        ("length 100000001", struct.pack("<Q", 100_000_001) + good[8:], ["at most 100000000"], True),
        ("length 0", struct.pack("<Q", 0) + good[8:], ["not valid JSON"], True),
        ("length +1", struct.pack("<Q", n + 1) + good[8:], ["not valid JSON"], True),
        ("length one short, padded", struct.pack("<Q", n - 1) + good[8:], ["the tensors cover", "wrong header length"],
         True),
        ("length one short, unpadded", blob(unpadded, d16[:8], length_delta=-1, pad=False), ["not valid JSON"], True),
        ("trailing bytes", good + b"\0", ["the tensors cover", "trailing bytes"], True),
        # not JSON, not an object
        ("garbage header", blob(b"\xff\xfe{not json"), ["not UTF-8"], True),
        ("garbage JSON", blob(b'{"a": {"dtype": "F32", '), ["not valid JSON"], True),
        ("NUL padding", blob(json.dumps(g2).encode() + b"\0\0", d16, pad=False), ["not valid JSON"], True),
        ("NaN", blob(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": NaN}', d16[:8]),
         ["not valid JSON", "NaN"], True),
        ("header is a list", blob(b"[]"), ["is a list", "expected a JSON object"], True),
        ("header is a string", blob(b'"abc"'), ["is a string", "expected a JSON object"], True),
        ("header is a number", blob(b"12"), ["is a number", "expected a JSON object"], True),
        ("entry is a list", blob({"a": ["F32", [2], [0, 8]]}, d16[:8]), ["tensor 'a'", "expected an object"], False),
        ("entry is null", blob({"a": None}, d16[:8]), ["tensor 'a'", "null"], True),
        ("missing shape", blob({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, d16[:8]), ["tensor 'a'", "no shape"],
         True),
        ("missing everything", blob({"a": {}}, b""), ["tensor 'a'", "no dtype / shape / data_offsets"], True),
        # hostile nesting (RecursionError before)
        ("nested lists 1e5", blob(b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}"), ["nests JSON", "deep"], True),
        ("nested objects 1e5", blob(b'{"a": ' + b'{"b": ' * DEEP + b"1" + b"}" * DEEP + b"}"), ["nests JSON"], True),
        ("nested, unterminated", blob(b"[" * DEEP), ["nests JSON"], True),
        ("nested in metadata", blob(b'{"__metadata__": ' + b"[" * DEEP + b"]" * DEEP + b"}"), ["nests JSON"], True),
        # dtypes
        ("unknown dtype", blob({"a": entry(0, 8, dtype="Q4K")}, d16[:8]), ["tensor 'a'", "unsupported dtype Q4K"],
         True),
        ("lower-case dtype", blob({"a": entry(0, 8, dtype="f32")}, d16[:8]), ["unsupported dtype f32"], True),
        ("dtype is a number", blob({"a": entry(0, 8, dtype=4)}, d16[:8]), ["tensor 'a'", "unsupported dtype"], True),
        ("dtype lie F64", blob({"a": entry(0, 8, dtype="F64")}, d16[:8]), ["tensor 'a'", "end - begin == 16"], True),
        ("dtype lie BF16", blob({"a": entry(0, 8, dtype="BF16")}, d16[:8]), ["end - begin == 4"], True),
        ("sub-byte remainder", blob({"a": entry(0, 1, shape=(1,), dtype="F4")}, d16[:1]), ["whole bytes"], True),
        # shapes
        ("negative dim", blob({"a": entry(0, 8, shape=(-2,))}, d16[:8]), ["tensor 'a'", "non-negative integers"],
         True),
        ("float dim", blob(b'{"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', d16[:8]),
         ["shape is [2.0]"], True),
        ("bool dim", blob(b'{"a": {"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 8]}}', d16[:8]),
         ["shape is [true, 2]"], True),
        ("shape not a list", blob({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, d16[:8]),
         ["shape is 2"], True),
        ("shape [2**70]", blob({"a": entry(0, 8, shape=(2**70,))}, d16[:8]), ["tensor 'a'", "elements"], True),
        ("unused overflowing tensor", blob({"a": entry(0, 8), "z": entry(8, 8, shape=(2**32, 2**32, 0))}, d16[:8]),
         ["tensor 'z'", "multiply to 18446744073709551616"], True),
        ("unused [2**70, 0]", blob({"a": entry(0, 8), "z": entry(8, 8, shape=(2**70, 0))}, d16[:8]),
         ["tensor 'z'", "beyond what a NumPy array can hold"], True),
        ("product 2**64 wraps to 0", blob({"a": entry(0, 8), "z": entry(8, 8, shape=(2**32, 2**32))}, d16[:8]),
         ["tensor 'z'", "elements"], True),
        ("huge int digits", blob(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}',
                                 d16[:8]), ["not valid JSON"], True),
        # offsets
        ("float offsets", blob(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}', d16[:8]),
         ["tensor 'a'", "data_offsets is [0.0, 8.0]", "integers"], True),
        ("string offsets", blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, d16[:8]),
         ["data_offsets is"], True),
        ("three offsets", blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, d16[:8]),
         ["[begin, end]"], True),
        ("negative offset", blob({"a": entry(-8, 0)}, d16[:8]), ["data_offsets is [-8, 0]"], True),
        ("end before begin", blob({"a": entry(8, 0)}, d16[:8]), ["tensor 'a'", "[8, 0]"], True),
        ("past the end", blob({"a": entry(0, 8), "b": entry(8, 16)}, d16[:12]), ["tensor 'b'", "run past the end"],
         True),
        ("gap", blob({"a": entry(0, 8), "b": entry(12, 20)}, bytes(20)), ["tensor 'b'", "belong to no tensor"], True),
        ("not starting at 0", blob({"a": entry(4, 12)}, bytes(12)), ["tensor 'a'", "expected 0"], True),
        ("alias (same bytes)", blob({"a": entry(0, 8), "b": entry(0, 8)}, d16[:8]), ["overlap tensor"], True),
        ("overlap", blob({"a": entry(0, 16, shape=(4,)), "b": entry(8, 16)}, d16), ["overlap tensor 'a'"], True),
        ("overlap shifted by 2", blob({"a": entry(0, 8), "b": entry(6, 14)}, d16[:14]), ["overlap tensor 'a'"], True),
        ("zero-size inside another", blob({"a": entry(0, 8), "z": entry(4, 4, shape=(0,))}, d16[:8]),
         ["overlap"], True),
        ("big-int offset", blob({"a": entry(0, 2**64 + 8)}, d16[:8]), ["tensor 'a'"], True),
        # duplicates and metadata
        ("duplicate tensor", blob(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                  b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', d16[:8]),
         ["the key 'a' twice"], False),
        ("duplicate field", blob(b'{"a": {"dtype": "F32", "shape": [2], "shape": [2], "data_offsets": [0, 8]}}',
                                 d16[:8]), ["the key 'shape' twice"], True),
        ("metadata is a list", blob({"__metadata__": [], "a": entry(0, 8)}, d16[:8]), ["__metadata__ is a list"],
         True),
        ("metadata value not str", blob({"__metadata__": {"x": 1}, "a": entry(0, 8)}, d16[:8]),
         ["__metadata__", "non-string"], True),
        ("metadata is a string", blob({"__metadata__": "pt", "a": entry(0, 8)}, d16[:8]), ["__metadata__ is a string"],
         True),
    ]
    ids = [c[0] for c in cases]
    assert len(ids) == len(set(ids))
    return cases


CASES = _cases()


@pytest.mark.parametrize("name,data,needles,lib_refuses", CASES, ids=[c[0] for c in CASES])
def test_malformed_file_refused(tmp_path, name, data, needles, lib_refuses):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    msg = expect_refused(path, *needles)
    assert str(path) in msg
    with pytest.raises(SafetensorsError):
        read_header(path)
    if lib_refuses and st is not None:  # the corpus really is invalid: the reference implementation agrees
        assert library_refuses(str(path)), f"{name}: the safetensors library accepts this file"


def test_refused_through_the_model_loaders(tmp_path):
    """The clean errors reach LanguageModel.load / VLMFO1.from_pretrained unchanged."""
    d = tmp_path / "VLM-FO1_Qwen2.5-VL-3B-bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "intermediate_size": 16,
                                               "vocab_size": 32}))   # valid: the config is checked first
    (d / "model.safetensors").write_bytes(blob({"a": entry(0, 8), "b": entry(6, 14)}, bytes(14)))
    with pytest.raises(ValueError, match="overlap"):
        vlmfo1.LanguageModel.load(str(d))
    (d / "model.safetensors").write_bytes(blob(b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}"))
    with pytest.raises(ValueError, match="nests JSON"):
        vlmfo1.LanguageModel.load(str(d))


# ------------------------------------------------------------------------------------------ seeded random corpus
def _mutants(seed=20240607, count=240):
    """Deterministic mutations of good_file(): truncations, length-field lies, byte and digit edits in the header,
    trailing bytes, spliced JSON tokens."""
    good, _ = good_file()
    n = struct.unpack("<Q", good[:8])[0]
    rng = np.random.default_rng(seed)
    tokens = [b"[", b"]", b"{", b"}", b",", b'"', b"-1", b"1.5", b"1e400", b"null", b"true", b'"F64"', b"\\", b"\0"]
    out = []
    for i in range(count):
        kind = i % 7
        b = bytearray(good)
        if kind == 0:
            b = b[:int(rng.integers(0, len(good)))]
        elif kind == 1:
            b[:8] = struct.pack("<Q", max(0, n + int(rng.integers(-12, 13))))
        elif kind == 2:
            b[8 + int(rng.integers(0, n))] = int(rng.integers(0, 256))
        elif kind == 3:
            digits = [j for j in range(8, 8 + n) if chr(b[j]).isdigit()]
            j = digits[int(rng.integers(0, len(digits)))]
            b[j] = ord(str(int(rng.integers(0, 10))))
        elif kind == 4:
            b += bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        elif kind == 5:
            j = 8 + int(rng.integers(0, n))
            b[j:j] = tokens[int(rng.integers(0, len(tokens)))]
        else:  # swap two offsets-looking numbers: aliasing / overlapping tensors
            h = json.loads(bytes(b[8:8 + n]))
            names = [k for k in h if k != "__metadata__"]
            x, y = rng.choice(len(names), 2, replace=False)
            h[names[x]]["data_offsets"], h[names[y]]["data_offsets"] = h[names[y]]["data_offsets"], \
                h[names[x]]["data_offsets"]
            b = bytearray(blob(h, bytes(good[8 + n:])))
        out.append(bytes(b))
    return out


def test_seeded_mutation_corpus(tmp_path):
    """Every mutant the library refuses, vlmfo1 refuses with ValueError/OSError naming the file; a mutant both accept
    reads back the same tensors. Nothing else (RecursionError, OverflowError, ...) escapes."""
    pytest.importorskip("safetensors")
    refused = both_ok = 0
    for i, data in enumerate(_mutants()):
        path = tmp_path / f"m{i:03d}.safetensors"
        path.write_bytes(data)
        lib = library_refuses(str(path))
        try:
            ours = our_load(str(path))
        except (ValueError, OSError) as e:
            assert path.name in str(e), str(e)
            refused += 1
            continue
        assert not lib, f"mutant {i}: the safetensors library refuses it, vlmfo1 accepted it"
        theirs = library_arrays(str(path))
        assert sorted(ours) == sorted(theirs)
        for k in ours:
            assert ours[k].tobytes() == theirs[k].tobytes() and ours[k].shape == theirs[k].shape, (i, k)
        both_ok += 1
        path.unlink()
    assert refused > 150 and both_ok > 0, (refused, both_ok)


# ----------------------------------------------------------------------------------- valid-but-unusual files load
def _valid_cases():
    x = np.arange(6, dtype=np.float32)
    return [
        ("zero-size tensors", blob({"z0": entry(0, 0, (0, 3)), "a": entry(0, 24, (6,)), "z1": entry(24, 24, (4, 0)),
                                    "z2": entry(24, 24, (0,)), "b": entry(24, 28, (1,))},
                                   x.tobytes() + x[:1].tobytes()),
         {"z0": np.zeros((0, 3), np.float32), "a": x, "z1": np.zeros((4, 0), np.float32),
          "z2": np.zeros((0,), np.float32), "b": x[:1]}),
        ("only zero-size", blob({"z": entry(0, 0, (0,))}), {"z": np.zeros(0, np.float32)}),
        ("empty header", blob({}), {}),
        ("metadata only", blob({"__metadata__": {"format": "pt"}}), {}),
        ("empty metadata", blob({"__metadata__": {}, "a": entry(0, 24, (2, 3))}, x.tobytes()), {"a": x.reshape(2, 3)}),
        ("null metadata", blob({"__metadata__": None, "a": entry(0, 24, (6,))}, x.tobytes()), {"a": x}),
        ("unsorted JSON order", blob({"c": entry(16, 24), "a": entry(0, 8), "b": entry(8, 16)}, x.tobytes()),
         {"a": x[:2], "b": x[2:4], "c": x[4:]}),
        ("scalar", blob({"s": entry(0, 4, ())}, x[:1].tobytes()), {"s": np.float32(0)}),
        ("misaligned after one byte", blob({"u": entry(0, 1, (1,), "U8"), "f": entry(1, 25, (6,))},
                                           b"\7" + x.tobytes()), {"u": np.array([7], np.uint8), "f": x}),
        ("unpadded, leading and trailing whitespace", blob(b' \n{"a": ' + json.dumps(entry(0, 24, (6,))).encode()
                                                           + b"}\t \n", x.tobytes(), pad=False), {"a": x}),
        ("unknown extra field", blob({"a": dict(entry(0, 24, (6,)), note={"k": [1, [2]]})}, x.tobytes()), {"a": x}),
        ("other dtypes", blob({"u16": entry(0, 4, (2,), "U16"), "u32": entry(4, 8, (1,), "U32"),
                               "u64": entry(8, 16, (1,), "U64"), "i8": entry(16, 18, (2,), "I8")}, bytes(range(18))),
         {"u16": np.frombuffer(bytes(range(4)), np.uint16), "u32": np.frombuffer(bytes(range(4, 8)), np.uint32),
          "u64": np.frombuffer(bytes(range(8, 16)), np.uint64), "i8": np.array([16, 17], np.int8)}),
    ]


VALID = _valid_cases()


@pytest.mark.parametrize("name,data,want", VALID, ids=[c[0] for c in VALID])
def test_valid_unusual_file_loads(tmp_path, name, data, want):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    got = our_load(str(path))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == np.asarray(v).dtype and got[k].shape == np.shape(v), k
        assert np.array_equal(got[k], v), k
    if st is not None:  # the safetensors library reads the same tensors
        assert library_refuses(str(path)) is False, name
        theirs = library_arrays(str(path))
        assert all(np.array_equal(theirs[k], got[k]) and theirs[k].shape == got[k].shape for k in got)


def test_good_file_agrees_with_library(tmp_path):
    data, arrays = good_file()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with Checkpoint(str(path)) as ck:
        assert ck.files[str(path)].metadata == {"format": "pt"}
        assert ck.dtypes() == {"F32": 1, "I64": 1, "BOOL": 1, "F16": 1}
        for k, a in arrays.items():
            assert np.array_equal(ck.get(k), a) and ck.info(k).shape == a.shape
        with pytest.raises(KeyError, match="'nope' is not in the checkpoint"):
            ck.get("nope")
    if st is not None:
        assert library_refuses(str(path)) is False
        assert all(np.array_equal(v, arrays[k]) for k, v in library_arrays(str(path)).items())


# ----------------------------------------------------------------------------------------------- index files
@pytest.fixture
def shard_folder(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "model-00001-of-00001.safetensors").write_bytes(blob({"a": entry(0, 8)}, bytes(8)))
    (tmp_path / "outside.safetensors").write_bytes(blob({"a": entry(0, 8)}, bytes(8)))  # a valid file to escape to
    return d


def _index_cases():
    ok = "model-00001-of-00001.safetensors"
    return [
        ("not JSON", b'{"weight_map": {', ["checkpoint index is not valid JSON"]),
        ("not UTF-8", b'{"weight_map": {"a": "\xff"}}', ["not UTF-8"]),
        ("a list", b"[]", ["checkpoint index is a list", "expected a JSON object"]),
        ("no weight_map", json.dumps({"metadata": {}}).encode(), ["has no weight_map"]),
        ("weight_map list", json.dumps({"weight_map": [ok]}).encode(), ["weight_map is a list", "expected an object"]),
        ("weight_map str", json.dumps({"weight_map": ok}).encode(), ["weight_map is a string"]),
        ("weight_map null", json.dumps({"weight_map": None}).encode(), ["weight_map is null"]),
        ("weight_map number", json.dumps({"weight_map": 3}).encode(), ["weight_map is a number"]),
        ("weight_map empty", json.dumps({"weight_map": {}}).encode(), ["weight_map is empty"]),
        ("shard a number", json.dumps({"weight_map": {"a": 1}}).encode(), ["tensor 'a'", "a number"]),
        ("shard null", json.dumps({"weight_map": {"a": None}}).encode(), ["tensor 'a'", "null"]),
        ("traversal ..", json.dumps({"weight_map": {"a": "../outside.safetensors"}}).encode(),
         ["tensor 'a'", "'../outside.safetensors'", "not a plain file name"]),
        ("absolute path", json.dumps({"weight_map": {"a": "/etc/passwd"}}).encode(), ["'/etc/passwd'"]),
        ("sub folder", json.dumps({"weight_map": {"a": "sub/" + ok}}).encode(), ["not a plain file name"]),
        ("backslash", json.dumps({"weight_map": {"a": "..\\outside.safetensors"}}).encode(), ["not a plain file"]),
        ("dot dot", json.dumps({"weight_map": {"a": ".."}}).encode(), ["'..'"]),
        ("empty name", json.dumps({"weight_map": {"a": ""}}).encode(), ["''"]),
        ("NUL in name", json.dumps({"weight_map": {"a": ok + "\0"}}).encode(), ["not a plain file name"]),
        ("duplicate key", b'{"weight_map": {"a": "%s", "a": "%s"}}' % (ok.encode(), ok.encode()), ["'a' twice"]),
        ("nested 1e5 in metadata", b'{"metadata": ' + b"[" * DEEP + b"]" * DEEP + b', "weight_map": {}}',
         ["nests JSON"]),
        ("nested 1e5 objects", b'{"weight_map": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}", ["nests JSON"]),
    ]


INDEX = _index_cases()


@pytest.mark.parametrize("name,data,needles", INDEX, ids=[c[0] for c in INDEX])
def test_bad_index_refused(shard_folder, name, data, needles):
    idx = shard_folder / "model.safetensors.index.json"
    idx.write_bytes(data)
    with pytest.raises(ValueError) as ei:
        Checkpoint(str(shard_folder))
    msg = str(ei.value)
    assert str(idx) in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_index_missing_shards_named(shard_folder):
    idx = shard_folder / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors",
                                              "b": "model-00002-of-00003.safetensors",
                                              "c": "model-00003-of-00003.safetensors"}}))
    with pytest.raises(FileNotFoundError) as ei:
        Checkpoint(str(shard_folder))
    msg = str(ei.value)
    assert "model-00002-of-00003.safetensors, model-00003-of-00003.safetensors" in msg and str(idx) in msg, msg


def test_index_good_and_shared_tensor_refused(shard_folder):
    ok = "model-00001-of-00001.safetensors"
    (shard_folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 8},
                                                                           "weight_map": {"a": ok}}))
    with Checkpoint(str(shard_folder)) as ck:
        assert list(ck.keys()) == ["a"] and ck.get("a").shape == (2,)
    (shard_folder / "model-00002-of-00002.safetensors").write_bytes(blob({"a": entry(0, 8)}, bytes(8)))
    (shard_folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": ok, "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="tensor 'a' appears in both .*00001-of-00001.* and .*00002-of-00002"):
        Checkpoint(str(shard_folder))


# ------------------------------------------------------------------------------------ mappings and descriptors
def _open_counts(*roots):
    """(open file descriptors, /proc/self/maps lines mapping a file under one of roots)."""
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        maps = sum(1 for line in f if any(str(r) in line for r in roots))
    return fds, maps


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


@needs_proc
def test_close_and_refcount_release(tmp_path):
    x = np.arange(64, dtype=np.float32)
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob({"a": entry(0, 128, (32,)), "b": entry(128, 256, (32,))}, x.tobytes()))
    base = _open_counts(tmp_path)
    assert base[1] == 0
    gc.disable()
    try:
        ck = Checkpoint(str(path))
        assert _open_counts(tmp_path) == (base[0] + 1, 1)
        del ck                                  # refcount alone: no cycle keeps the file alive
        assert _open_counts(tmp_path) == base
        ck = Checkpoint(str(path))
        a = ck.get("a")
        ck.close()                              # an array still views the mapping: it stays valid
        assert _open_counts(tmp_path)[1] == 1 and float(a.sum()) == float(x[:32].sum())
        with pytest.raises(ValueError, match="closed"):
            ck.get("b")
        del a                                   # the last view unmaps it
        assert _open_counts(tmp_path) == base
        with Checkpoint(str(path)) as ck2:
            ck2.get("b").copy()
        assert _open_counts(tmp_path) == base   # closed at once, no views left
        del ck, ck2
    finally:
        gc.enable()


@needs_proc
def test_failed_checkpoint_releases_what_it_opened(tmp_path, monkeypatch):
    """A failure while mapping the second of three shards closes the first."""
    from vlmfo1 import safetensors as st
    d = tmp_path / "ck"
    d.mkdir()
    wmap = {}
    for i in range(3):
        name = f"model-0000{i + 1}-of-00003.safetensors"
        (d / name).write_bytes(blob({f"t{i}": entry(0, 8)}, bytes(8)))
        wmap[f"t{i}"] = name
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    base = _open_counts(d)
    real, opened = st.SafetensorsFile.__init__, []

    def failing_init(self, path, header=None):
        if opened:
            raise OSError(f"{path}: simulated mapping failure")
        real(self, path, header)
        opened.append(path)

    monkeypatch.setattr(st.SafetensorsFile, "__init__", failing_init)
    gc.disable()
    try:
        with pytest.raises(OSError, match="simulated"):
            Checkpoint(str(d))
        assert opened and _open_counts(d) == base
    finally:
        gc.enable()


def _break_fo1(src, dst):
    """A copy of the FO1 checkpoint `src` (shards symlinked) whose config asks for one ViT block more than stored:
    the load fails in the vision tower, after the decoder's weights were mapped."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
        else:
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    cfg = json.loads(open(os.path.join(src, "config.json")).read())
    cfg["vision_config"]["depth"] += 1
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


def _leak_loop(load, good, bad, roots, expect_error, n=30):
    """n successful load + del cycles and n failed loads with the cyclic GC off; returns (before, after) counts."""
    m = load(good)                              # warm up caches (tokenizer, imports) before counting
    del m
    try:
        load(bad)
    except expect_error:
        pass
    before = _open_counts(*roots)
    gc.disable()
    try:
        for i in range(n):
            m = load(good)
            assert _open_counts(*roots)[1] > before[1], "the loaded model maps its checkpoint"
            del m
            assert _open_counts(*roots) == before, f"cycle {i}: del model left mappings or descriptors open"
            try:
                load(bad)
            except expect_error:
                pass
            else:
                raise AssertionError("the broken checkpoint loaded")
            assert _open_counts(*roots) == before, f"cycle {i}: the failed load left mappings or descriptors open"
        after = _open_counts(*roots)
    finally:
        gc.enable()
    return before, after


@needs_proc
def test_no_leak_fo1(fo1_tiny_ckpt, tmp_path):
    from vlmfo1.fo1 import VLMFO1
    bad = str(tmp_path / "VLM-FO1_Qwen2.5-VL-3B-bad")
    _break_fo1(fo1_tiny_ckpt, bad)
    before, after = _leak_loop(lambda p: VLMFO1.from_pretrained(p, threads=2), fo1_tiny_ckpt, bad,
                               (fo1_tiny_ckpt,), KeyError)
    assert before == after
    m = VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2)
    assert _open_counts(fo1_tiny_ckpt)[1] > 0
    m.close()                                   # close() releases at once
    assert _open_counts(fo1_tiny_ckpt) == before


@needs_proc
def test_no_leak_qwen2(tmp_path):
    from vlmfo1.testing.qwen2 import TINY, write_random_qwen2
    good = str(tmp_path / "good")
    write_random_qwen2(good, config=dict(TINY, vocab_size=512, bos_token_id=510, eos_token_id=511), dtype="bfloat16",
                       shard_bytes=60_000)
    assert os.path.exists(os.path.join(good, "model.safetensors.index.json"))
    bad = str(tmp_path / "bad")
    shutil.copytree(good, bad)
    cfg = json.loads(open(os.path.join(bad, "config.json")).read())
    cfg["num_hidden_layers"] += 1              # a layer more than stored: KeyError after the first layers mapped
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    before, after = _leak_loop(lambda p: vlmfo1.LanguageModel.load(p, n_threads=2, max_context=64), good, bad,
                               (good, bad), KeyError)
    assert before == after
