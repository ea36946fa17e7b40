"""The seeded fuzz corpus: hostile and valid inputs for every target of `targets.py`, with what must happen.

`build(bases, seed)` returns the full list of cases (deterministic for a seed and the base checkpoints);
`sample(cases, n, seed)` the CI subset (every target represented; saved findings always included).
Each generator writes what it mutates from (the base file) and why each expectation holds.
"""
from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FINDINGS = os.path.join(HERE, "corpus")         # saved inputs: corpus/<target>/<name>, run with expectation "any"
                                                # ("oracle" for safetensors files: a saved disagreement stays caught)
TARGETS = ("safetensors", "qwen2_config", "fo1_config", "index", "image", "boxes")


@dataclass
class Case:
    target: str
    name: str
    data: bytes
    expect: str      # refuse | accept | not_changed | oracle | any


# values that are never a valid size, id, eps, theta or flag: a config holding one must be refused (or the key must
# be one vlmfo1 ignores, in which case the outputs stay bit-identical)
NAN, INF = float("nan"), float("inf")
HOSTILE = [None, True, False, "7", "", 0, -1, -7, 1.5, 64.5, 2**31, 2**63, 10**12, 10**30, 1e308, NAN, INF, -INF,
           [], [1, 2], {}, {"a": 1}]
DEEP = 100_000


def _json(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def _deep_list(n: int) -> str:
    return "[" * n + "]" * n


def _deep_dict(n: int) -> str:
    return '{"a":' * n + "1" + "}" * n


# ---------------------------------------------------------------- safetensors files (expect: the library's verdict)
def _st_base() -> tuple[dict, bytes]:
    rng = np.random.default_rng(11)
    arrays = [("a", "F32", rng.standard_normal((2, 3)).astype(np.float32)),
              ("b", "BF16", rng.integers(0, 2**16, 4, dtype=np.uint16)),
              ("c", "F16", rng.standard_normal((3, 1)).astype(np.float16)),
              ("d", "I64", rng.integers(-5, 5, 2).astype(np.int64)),
              ("e", "U8", np.zeros((0,), np.uint8)),
              ("f", "BOOL", np.array([True, False, True])),
              ("g", "F32", rng.standard_normal((1, 2, 2)).astype(np.float32))]
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data, off = b"", 0
    for name, dt, a in arrays:
        raw = a.tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        data, off = data + raw, off + len(raw)
    return header, data


def _st_pack(header_bytes: bytes, data: bytes, pad: bool = True) -> bytes:
    if pad:
        header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def _st(header: Any, data: bytes) -> bytes:
    return _st_pack(_json(header), data)


def gen_safetensors(rng: np.random.Generator) -> Iterator[Case]:
    header, data = _st_base()
    good = _st(header, data)
    hb = _json(header)
    yield Case("safetensors", "base", good, "accept")
    yield Case("safetensors", "unpadded header", _st_pack(hb, data, pad=False), "oracle")
    # truncations: inside the length field, the header, each tensor and the last byte
    cuts = list(range(0, 9)) + [8 + len(hb) // 2, 8 + len(hb) - 1, len(good) - 1, len(good) - 8]
    for name, e in header.items():
        if name != "__metadata__":
            cuts += [len(good) - len(data) + e["data_offsets"][0] + 1]
    for k in sorted(set(cuts)):
        yield Case("safetensors", f"truncated at {k}", good[:k], "oracle")
    yield Case("safetensors", "1 trailing byte", good + b"\0", "oracle")
    yield Case("safetensors", "8 trailing bytes", good + b"\0" * 8, "oracle")
    # length-field lies
    n = len(good) - 8 - len(data)
    for v in (0, 1, 2, n - 1, n + 1, n - 8, n + 8, len(good), len(good) - 8, 100_000_001, 2**31, 2**63, 2**64 - 1):
        yield Case("safetensors", f"header length {v}", struct.pack("<Q", v) + good[8:], "oracle")
    # header JSON that is not an object, or nests deeply
    for label, text in (("list", "[]"), ("string", '"x"'), ("number", "1"), ("null", "null"), ("empty", ""),
                        ("garbage", "{not json"), ("deep list 1000", _deep_list(1000)),
                        ("deep dict 1000", _deep_dict(1000)), ("deep list 100000", _deep_list(DEEP)),
                        ("deep metadata", '{"__metadata__":' + _deep_dict(2000) + "}"),
                        ("NaN offsets", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,NaN]}}'),
                        ("Infinity shape", '{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}'),
                        ("bom", "\ufeff" + hb.decode()), ("leading space", " " + hb.decode()),
                        ("nul padding", hb.decode() + "\0\0\0"), ("comment", "//x\n" + hb.decode())):
        yield Case("safetensors", f"header {label}", _st_pack(text.encode(), data), "oracle")
    yield Case("safetensors", "header not utf-8", _st_pack(b'{"\xff\xfe":1}', data), "oracle")
    # one field of one tensor replaced by a hostile value
    for t in ("a", "b", "e", "g"):
        for field in ("dtype", "shape", "data_offsets"):
            for v in HOSTILE + ["F33", "f32", "F4", "BF16", "I64", "U8", [2**32, 2**32], [-1, 2], [0, -4],
                                [0.0, 24.0], [2**70], [2, 3, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 6]]:
                h = json.loads(hb)
                h[t][field] = v
                yield Case("safetensors", f"{t}.{field}={v!r}"[:120], _st(h, data), "oracle")
        h = json.loads(hb)
        del h[t]
        yield Case("safetensors", f"{t} deleted", _st(h, data), "oracle")
        for k in ("dtype", "shape", "data_offsets"):
            h = json.loads(hb)
            del h[t][k]
            yield Case("safetensors", f"{t}.{k} deleted", _st(h, data), "oracle")
        h = json.loads(hb)
        h[t]["extra"] = 1
        yield Case("safetensors", f"{t} extra field", _st(h, data), "oracle")
    # layout lies: overlap, alias, gaps, order, out of bounds, overflowing shapes of extra tensors
    off = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    layouts = {
        "b overlaps a by 2": {"b": [off["a"][1] - 2, off["b"][1] - 2]},
        "g aliases a": {"g": off["a"]},
        "b shifted 2": {"b": [off["b"][0] + 2, off["b"][1] + 2]},
        "gap before c": {"c": [off["c"][0] + 2, off["c"][1] + 2]},
        "a and g swapped": {"a": off["g"], "g": off["a"]},
        "g past end": {"g": [off["g"][0], off["g"][1] + 4]},
        "g begin > end": {"g": [off["g"][1], off["g"][0]]},
        "e inside a": {"e": [4, 4]},
        "a starts at 4": {"a": [4, off["a"][1]]},
    }
    for label, ch in layouts.items():
        h = json.loads(hb)
        for k, v in ch.items():
            h[k]["data_offsets"] = v
        yield Case("safetensors", label, _st(h, data), "oracle")
    for label, shape in (("2^32 x 2^32", [2**32, 2**32]), ("2^62 x 4", [2**62, 4]), ("2^70", [2**70]),
                         ("zero dim, huge others", [0, 2**64 - 1]), ("2^63-1", [2**63 - 1])):
        h = json.loads(hb)
        h["z"] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data)]}
        # a deviation: the library accepts [0, 2**64 - 1] (no elements), NumPy cannot make that shape, vlmfo1 refuses
        yield Case("safetensors", f"extra tensor {label}", _st(h, data), "refuse" if label.startswith("zero") else "oracle")
    # names and metadata
    for label, text in (("duplicate key", hb.decode().replace('"b":', '"a":', 1)),
                        ("duplicate metadata", '{"__metadata__":{},' + hb.decode()[1:]),):
        yield Case("safetensors", label, _st_pack(text.encode(), data), "oracle")
    for label, md in (("metadata int", {"x": 1}), ("metadata list", ["x"]), ("metadata null", None),
                      ("metadata nested", {"x": {"y": "z"}}), ("metadata huge", {"x": "y" * 200_000})):
        h = json.loads(hb)
        h["__metadata__"] = md
        yield Case("safetensors", label, _st(h, data), "oracle")
    for label, nm in (("empty name", ""), ("long name", "n" * 100_000), ("nul name", "a\0b"),
                      ("unicode name", "\u00e9\u4e2d"), ("surrogate name", "\ud800")):
        h = json.loads(hb)
        h[nm] = h.pop("g")
        try:
            yield Case("safetensors", label, _st(h, data), "oracle")
        except UnicodeEncodeError:
            yield Case("safetensors", label, _st_pack(json.dumps(h, ensure_ascii=True).encode(), data), "oracle")
    # random byte flips in the header and in the data
    for i in range(300):
        b = bytearray(good)
        k = int(rng.integers(1, 5))
        lo, hi = (0, 8 + len(hb)) if i < 250 else (8, len(b))
        for _ in range(k):
            b[int(rng.integers(lo, hi))] = int(rng.integers(0, 256))
        yield Case("safetensors", f"flip {i}", bytes(b), "oracle")


# ---------------------------------------------------------------- config.json (expect: refused or unchanged)
def _leaf_paths(cfg: dict, prefix=()) -> Iterator[tuple]:
    for k, v in cfg.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _leaf_paths(v, prefix + (k,))


def _set(cfg: dict, path: tuple, value: Any, delete: bool = False) -> dict:
    c = json.loads(json.dumps(cfg))
    d = c
    for k in path[:-1]:
        d = d[k]
    if delete:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    return c


def _gen_config(target: str, cfg: dict, rng: np.random.Generator) -> Iterator[Case]:
    base = json.dumps(cfg).encode()
    yield Case(target, "base", base, "accept")
    for label, text in (("empty", b""), ("list", b"[]"), ("null", b"null"), ("garbage", b"{\"a\": "),
                        ("not utf-8", b'{"a": "\xff"}'), ("deep list", _deep_list(DEEP).encode()),
                        ("deep dict", _deep_dict(DEEP).encode()),
                        ("deep value", base[:-1] + b', "x": ' + _deep_list(5000).encode() + b"}"),
                        ("duplicate key", base[:-1] + b', "hidden_size": 7}'),
                        ("bom", b"\xef\xbb\xbf" + base), ("huge string", base[:-1] + b', "x": "' + b"y" * 20_000_000 + b'"}')):
        # a BOM'd or padded but otherwise identical file may be read (same outputs) or refused
        yield Case(target, f"file {label}", text, "not_changed")
    for path in _leaf_paths(cfg):
        label = ".".join(path)
        # a deleted key takes the official default, which may change the outputs
        yield Case(target, f"{label} deleted", _json(_set(cfg, path, None, delete=True)), "any")
        cur = _get(cfg, path)
        int_list = isinstance(cur, list) and cur and all(type(x) is int for x in cur)
        for v in HOSTILE:
            # legal values that may change the outputs: a positive finite number for a float key (rope_theta,
            # rms_norm_eps), the other boolean for a flag, token id 0, a list of small ints for a list-of-ints key;
            # everything else must be refused or ignored
            legal = ((isinstance(cur, float) and isinstance(v, (int, float)) and not isinstance(v, bool)
                      and 0 < v < INF)
                     or (isinstance(cur, bool) and isinstance(v, bool))
                     or (path[-1].endswith("token_id") and type(v) is int and v == 0)
                     or (int_list and v == [1, 2]))
            yield Case(target, f"{label}={v!r}", _json(_set(cfg, path, v)), "any" if legal else "not_changed")
        yield Case(target, f"{label}=deep", _json(_set(cfg, path, json.loads(_deep_list(500)))), "not_changed")
        if isinstance(cur, list) and cur and all(isinstance(x, int) and not isinstance(x, bool) for x in cur):
            for label2, v, exp in (("+1 item", cur + [cur[-1]], "any"), ("-1 item", cur[:-1], "any"),
                                   ("negated", [-x for x in cur], "not_changed"),
                                   ("floats", [x + 0.5 for x in cur], "not_changed")):
                yield Case(target, f"{label} {label2}", _json(_set(cfg, path, v)), exp)
    # whole-model relations a schema must check
    for path, v in (((("num_attention_heads",), 3)), (("num_key_value_heads",), 3), (("hidden_size",), 250),
                    (("vocab_size",), 1000), (("num_hidden_layers",), 3), (("intermediate_size",), 1000)):
        if _has(cfg, path):
            yield Case(target, f"{'.'.join(path)}={v} (a lie about the weights)", _json(_set(cfg, path, v)),
                       "refuse")


def _get(cfg, path):
    d = cfg
    for k in path:
        d = d[k]
    return d


def _has(cfg, path) -> bool:
    d = cfg
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return False
        d = d[k]
    return True


def gen_qwen2_config(bases: Dict[str, str], rng) -> Iterator[Case]:
    with open(os.path.join(bases["qwen2"], "config.json")) as f:
        yield from _gen_config("qwen2_config", json.load(f), rng)


def gen_fo1_config(bases: Dict[str, str], rng) -> Iterator[Case]:
    with open(os.path.join(bases["fo1"], "config.json")) as f:
        cfg = json.load(f)
    yield from _gen_config("fo1_config", cfg, rng)
    for v in ("mask", "none", "BBOX_BASED"):
        yield Case("fo1_config", f"mm_pos_embedding_strategy={v!r}", _json(_set(cfg, ("mm_pos_embedding_strategy",), v)),
                   "not_changed")
    yield Case("fo1_config", "rope_scaling without mrope_section",
               _json(_set(cfg, ("rope_scaling",), {"type": "mrope"})), "not_changed")
    yield Case("fo1_config", "vision_config.num_heads=0 (a division by zero once)", _json(_set(cfg, ("vision_config", "num_heads"), 0)), "refuse")


# ---------------------------------------------------------------- index files (expect: refused or unchanged)
def gen_index(bases: Dict[str, str], rng) -> Iterator[Case]:
    with open(os.path.join(bases["qwen2"], "model.safetensors.index.json")) as f:
        idx = json.load(f)
    wm = idx["weight_map"]
    names, shards = sorted(wm), sorted(set(wm.values()))
    yield Case("index", "base", _json(idx), "accept")
    for label, text in (("empty", b""), ("list", b"[]"), ("garbage", b"{"), ("deep", _deep_dict(DEEP).encode()),
                        ("not utf-8", b'{"weight_map": {"\xff": 1}}')):
        yield Case("index", f"file {label}", text, "not_changed")
    for v in HOSTILE + ["model.safetensors", [["a", "b"]]]:
        yield Case("index", f"weight_map={v!r}", _json(dict(idx, weight_map=v)), "not_changed")
        yield Case("index", f"metadata={v!r}", _json(dict(idx, metadata=v)), "not_changed")
    yield Case("index", "weight_map deleted", _json({"metadata": idx.get("metadata", {})}), "not_changed")
    for t in names[:3] + names[-2:]:
        for v in HOSTILE + ["../qwen2/" + wm[t], "/etc/passwd", "missing.safetensors", ".", "..",
                            "config.json", shards[0] if wm[t] != shards[0] else shards[-1], "a\0b"]:
            yield Case("index", f"{t}->{v!r}"[:120], _json(dict(idx, weight_map=dict(wm, **{t: v}))), "not_changed")
        yield Case("index", f"{t} dropped", _json(dict(idx, weight_map={k: s for k, s in wm.items() if k != t})),
                   "not_changed")
    yield Case("index", "extra unknown tensor", _json(dict(idx, weight_map=dict(wm, **{"model.x": shards[0]}))),
               "not_changed")
    yield Case("index", "metadata total_size lie", _json(dict(idx, metadata={"total_size": 1})), "not_changed")


# ---------------------------------------------------------------- images (expect: decoded, or refused cleanly)
def _img_bytes(im, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gen_image(rng: np.random.Generator) -> Iterator[Case]:
    from PIL import Image
    pix = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgb = Image.fromarray(pix)
    seeds: List[tuple] = []
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {}),
                    ("PPM", {}), ("TIFF", {"compression": "tiff_lzw"}), ("JPEG", {"progressive": True})):
        seeds.append((f"{fmt} {kw}", _img_bytes(rgb, fmt, **kw)))
    for mode in ("1", "L", "P", "LA", "RGBA", "I", "F", "I;16", "CMYK", "YCbCr", "HSV", "LAB"):
        try:
            im = rgb.convert(mode) if mode not in ("I;16",) else Image.fromarray(
                rng.integers(0, 65535, (37, 53), dtype=np.uint16))
            fmt = "TIFF" if mode in ("I", "F", "I;16", "CMYK", "YCbCr", "LAB", "HSV") else "PNG"
            if mode == "YCbCr":
                fmt = "JPEG"
            seeds.append((f"mode {mode} {fmt}", _img_bytes(im, fmt)))
        except (OSError, ValueError, KeyError):
            continue
    for w, h in ((1, 1), (1, 300), (300, 1), (2, 5000), (5000, 2), (28, 28), (27, 29), (3000, 2000)):
        seeds.append((f"size {w}x{h}", _img_bytes(Image.new("RGB", (w, h), (1, 2, 3)), "PNG")))
    seeds.append(("animated gif", _img_bytes(rgb, "GIF", save_all=True, append_images=[rgb.rotate(90)])))
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds.append(("jpeg exif rotate", _img_bytes(rgb, "JPEG", exif=exif.tobytes())))
    for label, data in seeds:
        yield Case("image", f"seed {label}", data, "any" if "x" in label.split()[-1] else "accept")
    # lies about the size, decompression bombs, empty and non-image files
    png = _img_bytes(rgb, "PNG")
    for w, h in ((2**31 - 1, 1), (1, 2**31 - 1), (100_000, 100_000), (0, 10), (20_000, 10_000)):
        b = bytearray(png)
        b[16:24] = struct.pack(">II", w, h)
        yield Case("image", f"png IHDR {w}x{h}", bytes(b), "any")
    big = Image.new("L", (20_000, 10_000))
    yield Case("image", "png bomb 200 Mpx", _img_bytes(big, "PNG", optimize=False), "refuse")
    for label, data in (("empty", b""), ("text", b"hello"), ("json", b"{}"), ("html", b"<html></html>"),
                        ("pdf", b"%PDF-1.4\n"), ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
                        ("zeros", b"\0" * 4096)):
        yield Case("image", f"not an image: {label}", data, "refuse")
    # truncations and byte flips of every seed
    for label, data in seeds[:20]:
        for frac in (0.1, 0.5, 0.9, 0.99):
            yield Case("image", f"{label} truncated {frac}", data[:max(1, int(len(data) * frac))], "any")
        for i in range(12):
            b = bytearray(data)
            for _ in range(int(rng.integers(1, 6))):
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
            yield Case("image", f"{label} flip {i}", bytes(b), "any")


# ---------------------------------------------------------------- boxes files
def gen_boxes(rng: np.random.Generator) -> Iterator[Case]:
    ok = [[10, 20, 100, 200], [0, 0, 640, 480], [5.5, 6.5, 7.5, 8.5]]
    for label, obj in (("list", ok), ("dict", {"boxes": ok}), ("dict xywh", {"boxes": ok, "box_format": "xywh"}),
                       ("scores", {"boxes": ok, "scores": [0.9, 0.5, 0.1]}), ("empty list", []),
                       ("coco dicts", [{"bbox": [1, 2, 3, 4], "score": 0.5}, {"bbox": [5, 6, 7, 8], "score": 0.4}]),
                       ("100 boxes", [[i, i, i + 10, i + 10] for i in range(100)]),
                       ("cxcywh", {"boxes": ok, "box_format": "cxcywh"})):
        yield Case("boxes", f"valid {label}", _json(obj), "accept")
    bad_values = [None, True, "1", NAN, INF, -INF, 10**400, [], [1], {}]
    for v in bad_values:
        yield Case("boxes", f"coordinate {v!r}"[:80], _json([[v, 2, 3, 4]]), "refuse")
        yield Case("boxes", f"score {v!r}"[:80], _json({"boxes": ok, "scores": [v, 0.5, 0.1]}), "refuse")
        # null means "not given" (xyxy) for box_format and "no scores" for scores
        yield Case("boxes", f"box_format {v!r}"[:80], _json({"boxes": ok, "box_format": v}),
                   "any" if v is None else "refuse")
        yield Case("boxes", f"boxes {v!r}"[:80], _json({"boxes": v}), "any" if v == [] else "refuse")
    yield Case("boxes", "scores null", _json({"boxes": ok, "scores": None}), "accept")
    yield Case("boxes", "coordinate 1e308 (finite: clamped to the image)", _json([[0, 0, 1e308, 1e308]]), "any")
    for label, obj in (("3 numbers", [[1, 2, 3]]), ("5 numbers", [[1, 2, 3, 4, 5]]), ("flat", [1, 2, 3, 4]),
                       ("nested 3", [[[1, 2, 3, 4]]]), ("ragged", [[1, 2, 3, 4], [1, 2]]),
                       ("scores too few", {"boxes": ok, "scores": [0.5]}), ("scores dict", {"boxes": ok, "scores": {}}),
                       ("unknown format", {"boxes": ok, "box_format": "yxyx"}), ("no boxes key", {"box": ok}),
                       ("101 boxes", [[i, i, i + 10, i + 10] for i in range(101)]),
                       ("coco dict without bbox", [{"box": [1, 2, 3, 4]}]), ("mixed dict and list", [{"bbox": [1, 2, 3, 4]}, [1, 2, 3, 4]]),
                       ("string", "boxes"), ("number", 3), ("null", None)):
        yield Case("boxes", label, _json(obj), "refuse")
    for label, data in (("empty file", b""), ("garbage", b"[[1,2"), ("not utf-8", b"[[1,2,3,\xff]]"),
                        ("deep", _deep_list(DEEP).encode()), ("deep 9", _deep_list(9).encode()),
                        ("huge", b"[" + b"[1,2,3,4]," * 2_000_000 + b"[1,2,3,4]]")):
        yield Case("boxes", f"file {label}", data, "refuse")
    for label, obj in (("negative", [[-10, -10, 5, 5]]), ("inverted", [[100, 100, 10, 10]]),
                       ("outside", [[1000, 1000, 2000, 2000]]), ("degenerate", [[5, 5, 5, 5]]),
                       ("huge finite", [[0, 0, 1e30, 1e30]]), ("bool-ish ints", [[0, 1, 1, 0]])):
        yield Case("boxes", f"odd but finite: {label}", _json(obj), "any")
    for i in range(60):
        n = int(rng.integers(0, 6))
        boxes = rng.choice([-1e9, -1, 0, 0.5, 1, 639, 640, 1e9, 3.3], size=(n, 4)).tolist()
        yield Case("boxes", f"random {i}", _json(boxes), "any")


# ---------------------------------------------------------------- the corpus
def findings() -> Iterator[Case]:
    """Saved inputs (coverage-guided fuzzing finds, regressions): corpus/<target>/<file>, expectation "any" (a
    safetensors file: "oracle", so a saved disagreement with the safetensors library stays a failure)."""
    if not os.path.isdir(FINDINGS):
        return
    for target in sorted(os.listdir(FINDINGS)):
        d = os.path.join(FINDINGS, target)
        if target in TARGETS and os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                with open(os.path.join(d, name), "rb") as f:
                    yield Case(target, f"saved {name}", f.read(), "oracle" if target == "safetensors" else "any")


def build(bases: Dict[str, str], seed: int = 0, targets=TARGETS) -> List[Case]:
    gens: Dict[str, Callable[[], Iterator[Case]]] = {
        "safetensors": lambda: gen_safetensors(np.random.default_rng([seed, 1])),
        "qwen2_config": lambda: gen_qwen2_config(bases, np.random.default_rng([seed, 2])),
        "fo1_config": lambda: gen_fo1_config(bases, np.random.default_rng([seed, 3])),
        "index": lambda: gen_index(bases, np.random.default_rng([seed, 4])),
        "image": lambda: gen_image(np.random.default_rng([seed, 5])),
        "boxes": lambda: gen_boxes(np.random.default_rng([seed, 6])),
    }
    cases = [c for t in targets for c in gens[t]()]
    cases += [c for c in findings() if c.target in targets]
    names = set()
    for c in cases:
        key = (c.target, c.name)
        if key in names:
            raise AssertionError(f"duplicate case name {key}")
        names.add(key)
    return cases


def sample(cases: List[Case], n: int, seed: int = 0) -> List[Case]:
    """A deterministic subset of about n cases: every 'base' and saved case, the rest drawn evenly per target."""
    keep = [c for c in cases if c.name == "base" or c.name.startswith("saved ")]
    rest = [c for c in cases if c not in keep]
    if n <= len(keep) or not rest:
        return keep
    by_target: Dict[str, List[Case]] = {}
    for c in rest:
        by_target.setdefault(c.target, []).append(c)
    per = max(1, (n - len(keep)) // len(by_target))
    rng = np.random.default_rng(seed)
    for t, cs in by_target.items():
        idx = sorted(rng.choice(len(cs), size=min(per, len(cs)), replace=False).tolist())
        keep += [cs[i] for i in idx]
    return keep


if __name__ == "__main__":   # print the corpus size per target (bases are needed for the config/index targets)
    import sys
    print({t: sum(1 for _ in {"safetensors": gen_safetensors, "image": gen_image, "boxes": gen_boxes}[t](
        np.random.default_rng(0))) for t in ("safetensors", "image", "boxes")}, file=sys.stderr)
