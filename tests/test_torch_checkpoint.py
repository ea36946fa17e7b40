"""vlmfo1.torch_checkpoint: torch.save files (zip and legacy formats) read without torch and without running code.

Round trips compare against real torch.save files (torch is a test dependency only). Hostile files are hand-built
pickles in a torch-like zip (the small assembler below) or torch.save of objects whose pickle would run
`touch MARKER`: each must be refused with a TorchCheckpointError naming the file — or, with allow_placeholders=True,
read as inert Placeholders — and the marker must not exist afterwards.
"""
from __future__ import annotations

import argparse
import collections
import copyreg
import os
import pickle
import struct
import warnings
import zipfile

import numpy as np
import pytest
import torch

from vlmfo1.torch_checkpoint import Placeholder, TorchCheckpointError, load, load_state_dict


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _save(tmp_path, obj, name="ck.pth", **kw) -> str:
    p = str(tmp_path / name)
    torch.save(obj, p, **kw)
    return p


def _same(arr, t: torch.Tensor) -> None:
    """arr is t: dtype (bf16 as uint16 bits, fp8 as uint8 bits), shape, strides, values."""
    assert isinstance(arr, np.ndarray) and not arr.flags.writeable
    assert arr.shape == tuple(t.shape)
    if t.dtype == torch.bfloat16:
        assert arr.dtype == np.uint16
        expect = t.contiguous().view(torch.int16).numpy().view(np.uint16)
    elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert arr.dtype == np.uint8
        expect = t.contiguous().view(torch.uint8).numpy()
    else:
        expect = t.resolve_conj().resolve_neg().numpy()
        assert arr.dtype == expect.dtype
        assert torch.equal(torch.from_numpy(np.array(arr)), t.resolve_conj().resolve_neg())
    np.testing.assert_array_equal(arr, expect)
    if t.numel() > 1 and not (t.is_conj() or t.is_neg()):
        assert arr.strides == tuple(s * t.element_size() for s in t.stride())


# -- round trips -----------------------------------------------------------------------------------------------------

def _dtype_tensors():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, generator=g)
    return {
        "f32": f, "f16": f.half(), "bf16": f.bfloat16(), "f64": f.double(), "c64": torch.complex(f, -f),
        "i64": torch.arange(-7, 8, dtype=torch.int64).reshape(3, 5) * 10**12, "i32": torch.arange(6, dtype=torch.int32),
        "i16": torch.tensor([-3, 300], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "u16": torch.tensor([1, 65535], dtype=torch.int32).to(torch.uint16),          # _rebuild_tensor_v3
        "fp8": f.to(torch.float8_e4m3fn), "fp8b": f.to(torch.float8_e5m2),
    }


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_dtypes_round_trip(tmp_path, fmt):
    ts = _dtype_tensors()
    p = _save(tmp_path, ts, _use_new_zipfile_serialization=(fmt == "zip"))
    got = load(p)
    assert list(got) == list(ts)
    for k, t in ts.items():
        _same(got[k], t)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_views_offsets_shared_storages(tmp_path, fmt):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    ts = {"base": base, "t": base.t(), "rows": base[2:5], "cols": base[:, 3:7], "step": base[1::2, ::3],
          "elem": base[4, 7], "expand": base[0, :3].expand(4, 3), "empty": base[3:3], "zero": torch.zeros(0, 7),
          "scalar": torch.tensor(2.5), "perm": torch.arange(24.).reshape(2, 3, 4).permute(2, 0, 1),
          "bf16_t": torch.arange(12.).reshape(3, 4).bfloat16().t()}
    p = _save(tmp_path, ts, _use_new_zipfile_serialization=(fmt == "zip"))
    got = load(p)
    for k, t in ts.items():
        _same(got[k], t)
    assert got["scalar"].shape == () and got["empty"].shape == (0, 10) and got["zero"].shape == (0, 7)
    for k in ("t", "rows", "cols", "step", "elem", "expand"):        # one storage: views of one buffer
        assert np.shares_memory(got[k], got["base"]), k
    assert got["expand"].strides == (0, 4)


def test_storages_are_memory_mapped(tmp_path):
    t = torch.arange(1 << 16, dtype=torch.float32)
    got = load(_save(tmp_path, {"a": t, "b": t[5:]}))
    assert got["a"].ctypes.data % 64 == 0             # torch aligns stored entries to 64 bytes: mapped, not copied
    assert got["b"].ctypes.data == got["a"].ctypes.data + 20
    with pytest.raises(ValueError, match="read-only"):
        got["a"][0] = 1


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_nested_containers(tmp_path, protocol):
    t = torch.arange(4, dtype=torch.int64)
    obj = {"list": [t, 1, 2.5, "s", None, True], "tuple": (t[1:], (t,)), "od": collections.OrderedDict(b=1, a=t),
           "nested": {"x": {"y": [{"z": t * 2}]}}, "bytes": b"\x00\xffab", "empty": b"", "set": {1, 2},
           "frozen": frozenset(["a"]), "big": 2**70, "neg": -5, "dtype": torch.float32, "size": torch.Size([2, 3]),
           "epoch": 3}
    got = load(_save(tmp_path, obj, pickle_protocol=protocol))
    assert type(got["od"]) is collections.OrderedDict and list(got["od"]) == ["b", "a"]
    _same(got["list"][0], t)
    _same(got["tuple"][1][0], t)
    _same(got["tuple"][0], t[1:])
    _same(got["nested"]["x"]["y"][0]["z"], t * 2)
    assert got["list"][1:] == [1, 2.5, "s", None, True]
    assert (got["bytes"], got["empty"], got["set"], got["frozen"]) == (b"\x00\xffab", b"", {1, 2}, frozenset(["a"]))
    assert (got["big"], got["neg"], got["dtype"], got["size"], got["epoch"]) == (2**70, -5, "torch.float32", (2, 3), 3)


def _module():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Unflatten(1, (4, 2, 2)),
                               torch.nn.Conv2d(4, 3, 2), torch.nn.BatchNorm2d(3))


def test_module_state_dict(tmp_path):
    sd = _module().state_dict()
    assert hasattr(sd, "_metadata")
    p = _save(tmp_path, {"model": sd, "epoch": 3})
    got = load_state_dict(p)
    assert list(got) == list(sd)
    for k, t in sd.items():
        _same(got[k], t)
    whole = load(p)
    assert whole["epoch"] == 3 and whole["model"]._metadata == sd._metadata     # the state dict's _metadata kept
    assert load_state_dict(_save(tmp_path, sd, "bare.pth"), key=None).keys() == sd.keys()


def test_parameters_and_tensor_attributes(tmp_path):
    m = _module()
    t = torch.ones(3)
    t.note = "attr"                                     # pickled through _rebuild_from_type_v2
    p = torch.nn.Parameter(torch.arange(4.))
    p.tag = 1                                           # _rebuild_parameter_with_state
    got = load(_save(tmp_path, {"params": list(m.parameters()), "t": t, "p": p}))
    for a, b in zip(got["params"], m.parameters()):
        _same(a, b.detach())
    _same(got["t"], t)
    _same(got["p"], p.detach())


def test_untyped_storage_and_conj_neg(tmp_path):
    c = torch.complex(torch.arange(3.), torch.ones(3))
    d = torch.complex(torch.ones(2), torch.arange(2.))
    s = torch.arange(6, dtype=torch.uint8).untyped_storage()
    got = load(_save(tmp_path, {"conj": c.conj(), "neg": d.conj().imag, "storage": s}))   # (conj / neg bits)
    _same(got["conj"], c.conj())
    _same(got["neg"], d.conj().imag)
    np.testing.assert_array_equal(got["storage"], np.arange(6, dtype=np.uint8))


def test_load_state_dict_rules(tmp_path):
    t = torch.ones(2)
    p = _save(tmp_path, {"model": {"module.a": t, "module.b.c": t, "d": t}, "other": 1})
    assert list(load_state_dict(p)) == ["a", "b.c", "d"]
    with pytest.raises(TorchCheckpointError, match="no 'state_dict' entry.*'model', 'other'"):
        load_state_dict(p, key="state_dict")
    with pytest.raises(TorchCheckpointError, match="'other' is a int, not a mapping"):
        load_state_dict(p, key="other")
    with pytest.raises(TorchCheckpointError, match="not a dict with a 'model' entry"):
        load_state_dict(_save(tmp_path, [t], "list.pth"))
    with pytest.raises(TorchCheckpointError, match="'a' twice"):
        load_state_dict(_save(tmp_path, {"model": {"a": t, "module.a": t}}, "dup.pth"))
    with pytest.raises(TorchCheckpointError, match="maps 'x' to a int"):
        load_state_dict(_save(tmp_path, {"model": {"w": t, "x": 3}}, "mixed.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load(tmp_path / "missing.pth")


def test_args_namespace_strict_and_placeholders(tmp_path):
    sd = _module().state_dict()
    p = _save(tmp_path, {"model": sd, "args": argparse.Namespace(lr=0.1, name="upn"), "epoch": 7})
    for call in (load, load_state_dict):
        with pytest.raises(TorchCheckpointError, match="argparse.Namespace") as e:
            call(p)
        assert p in str(e.value) and "allow_placeholders=True" in str(e.value)
    got = load_state_dict(p, allow_placeholders=True)
    for k, t in sd.items():
        _same(got[k], t)
    args = load(p, allow_placeholders=True)["args"]
    assert isinstance(args, Placeholder) and args.name == "argparse.Namespace"
    assert args.args == () and args.state == {"lr": 0.1, "name": "upn"}


# -- hostile files ---------------------------------------------------------------------------------------------------

def test_torch_saved_payload_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    for fmt in ("zip", "legacy"):
        p = _save(tmp_path, {"model": {"w": torch.ones(1)}, "x": _System(f"touch {marker}")}, f"{fmt}.pth",
                  _use_new_zipfile_serialization=(fmt == "zip"))
        with pytest.raises(TorchCheckpointError, match=r"refused: the pickle asks for the global posix\.system") as e:
            load(p)
        assert p in str(e.value)
        ph = load(p, allow_placeholders=True)["x"]
        assert isinstance(ph, Placeholder) and ph.name == "posix.system" and ph.args == (f"touch {marker}",)
        assert load_state_dict(p, allow_placeholders=True)["w"].tolist() == [1.0]
        assert not marker.exists()


# a tiny assembler for torch-like pickles (protocol 2 opcodes)
def S(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def I(n: int) -> bytes:  # noqa: E743
    return pickle.dumps(n, 2)[2:-1]


def T(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def G(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def D(**items: bytes) -> bytes:
    return b"}(" + b"".join(S(k) + v for k, v in items.items()) + b"u"


OD = G("collections", "OrderedDict") + b")R"


def storage(key="0", cls="FloatStorage", numel=4) -> bytes:
    return T(S("storage"), G("torch", cls), S(key), S("cpu"), I(numel)) + b"Q"


def tensor(st=None, offset=0, size=(4,), stride=(1,)) -> bytes:
    return G("torch._utils", "_rebuild_tensor_v2") + \
        T(st or storage(), I(offset), T(*map(I, size)), T(*map(I, stride)), b"\x89", OD) + b"R"


def pkl(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _zip(tmp_path, data_pkl: bytes, storages=None, name="crafted.pth", top="archive", byteorder=b"little",
         extra=(), compression=zipfile.ZIP_STORED) -> str:
    p = str(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # duplicate names on purpose
        with zipfile.ZipFile(p, "w", compression=compression) as z:
            z.writestr(f"{top}/data.pkl", data_pkl)
            if byteorder is not None:
                z.writestr(f"{top}/byteorder", byteorder)
            for key, data in (storages if storages is not None else {"0": np.arange(4, dtype=np.float32)}).items():
                z.writestr(f"{top}/data/{key}", bytes(data))
            for n, data in extra:
                z.writestr(n, data)
            z.writestr(f"{top}/version", b"3\n")
    return p


def test_assembler_builds_what_torch_would(tmp_path):
    p = _zip(tmp_path, pkl(D(w=tensor(), v=tensor(offset=1, size=(2, 1), stride=(2, 5)))), top="any_name")
    got = load(p)
    np.testing.assert_array_equal(got["w"], [0, 1, 2, 3])
    np.testing.assert_array_equal(got["v"], [[1], [3]])
    assert torch.load(p, weights_only=True)["v"].tolist() == [[1], [3]]


def _refused(path, match, marker=None, **kw) -> str:
    with pytest.raises(TorchCheckpointError, match=match) as e:
        load(path, **kw)
    assert str(path) in str(e.value)
    if marker is not None:
        assert not os.path.exists(marker), "the checkpoint ran code"
    return str(e.value)


def test_os_system_reduce_strict_and_placeholder(tmp_path):
    marker = str(tmp_path / "MARKER")
    payload = G("os", "system") + T(S(f"touch {marker}")) + b"R"
    p = _zip(tmp_path, pkl(D(w=tensor(), x=payload)))
    _refused(p, r"global os\.system", marker)
    # placeholders: the call, a BUILD, items, and calling the result again are all recorded, nothing runs
    body = payload + D(a=I(1)) + b"b" + b"(" + I(1) + I(2) + b"u" + b"(" + I(3) + b"e" + T(S(f"touch {marker}")) + b"R"
    got = load(_zip(tmp_path, pkl(D(w=tensor(), x=body)), name="ph.pth"), allow_placeholders=True)
    x = got["x"]
    assert isinstance(x, Placeholder) and x.name == "os.system" and x.args == (f"touch {marker}",)
    inner = load(_zip(tmp_path, pkl(payload + D(a=I(1)) + b"b"), name="ph2.pth"), allow_placeholders=True)
    assert inner.state == {"a": 1} and inner.args == (f"touch {marker}",)
    assert not os.path.exists(marker)


def test_newobj_placeholder_is_inert(tmp_path):
    marker = str(tmp_path / "MARKER")
    # NEWOBJ of subprocess.Popen, a BUILD that would set __class__ / __reduce__, then REDUCE on the result
    body = (G("subprocess", "Popen") + T(S("touch"), S(marker)) + b"\x81" + D(__class__=G("os", "system")) + b"b"
            + T(S(f"touch {marker}")) + b"R")
    _refused(_zip(tmp_path, pkl(body)), r"global subprocess\.Popen", marker)
    got = load(_zip(tmp_path, pkl(body), name="ph.pth"), allow_placeholders=True)
    assert isinstance(got, Placeholder) and got.name == "subprocess.Popen" and got.args == (f"touch {marker}",)
    assert not os.path.exists(marker)


HOSTILE = {
    # name: (data.pkl body for the command `cmd`, message)
    "builtins.eval": (lambda cmd: G("builtins", "eval") + T(S(f"__import__('os').system({cmd!r})")) + b"R",
                      r"global builtins\.eval"),
    "STACK_GLOBAL": (lambda cmd: S("os") + S("system") + b"\x93" + T(S(cmd)) + b"R", r"global os\.system"),
    "INST": (lambda cmd: b"(" + S(cmd) + b"ios\nsystem\n", "INST opcode"),
    "OBJ": (lambda cmd: b"(" + G("collections", "OrderedDict") + b"o", "OBJ opcode"),
    "dotted name": (lambda cmd: G("torch._utils", "_rebuild_tensor_v2.__globals__"), "global torch._utils._rebuild"),
    "REDUCE on data": (lambda cmd: D(a=I(1)) + T() + b"R", "calls a dict"),
    "REDUCE on a storage class": (lambda cmd: G("torch", "FloatStorage") + T() + b"R", "calls torch.FloatStorage"),
    "NEWOBJ on an admitted function": (lambda cmd: OD[:-2] + b")\x81", "NEWOBJ on ordered_dict"),
    "BUILD on a tensor": (lambda cmd: tensor() + D(shape=I(1)) + b"b", "BUILD.*ndarray"),
    "BUILD on a list": (lambda cmd: b"]" + D(a=I(1)) + b"b", "BUILD.*list"),
    "BUILD shadowing a method": (lambda cmd: OD + D(items=I(1)) + b"b", "BUILD.*OrderedDict"),
    "APPENDS to a tensor": (lambda cmd: tensor() + b"(" + I(1) + b"e", "appends to a ndarray"),
    "SETITEMS on a tensor": (lambda cmd: tensor() + b"(" + I(1) + I(2) + b"u", "sets items of a ndarray"),
    "NEXT_BUFFER": (lambda cmd: b"\x97", "NEXT_BUFFER opcode"),
    "PERSID": (lambda cmd: b"Pfoo\n", "persistent id 'foo'"),
    "numpy reconstruct": (lambda cmd: G("numpy.core.multiarray", "_reconstruct") + T() + b"R",
                          r"numpy\.core\.multiarray\._reconstruct"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_pickles_refused(tmp_path, name):
    marker = str(tmp_path / "MARKER")
    body, match = HOSTILE[name]
    _refused(_zip(tmp_path, pkl(body(f"touch {marker}"))), match, marker)


def test_numpy_array_in_checkpoint_refused(tmp_path):
    p = _save(tmp_path, {"model": {"w": torch.ones(1)}, "mean": np.zeros(3)})
    _refused(p, r"global numpy\.(_core|core)\.multiarray\._reconstruct")
    assert isinstance(load(p, allow_placeholders=True)["mean"], Placeholder)


def test_extension_codes_refused_with_copyreg_cache_populated(tmp_path):
    code = 0x7FFFFFF0
    marker = tmp_path / "MARKER"
    cmd = f"touch {marker}"
    copyreg.add_extension("os", "system", code)
    try:
        assert pickle.loads(b"\x80\x02\x84" + struct.pack("<i", code) + b".") is os.system   # cached, not called
        p = _zip(tmp_path, pkl(b"\x84" + struct.pack("<i", code) + T(S(cmd)) + b"R"))
        _refused(p, "EXT4 opcode", marker)
        _refused(p, "EXT4 opcode", marker, allow_placeholders=True)
    finally:
        copyreg.remove_extension("os", "system", code)
    assert not marker.exists()


def _shared_tuple(levels: int) -> bytes:
    a: tuple = ()
    for _ in range(levels):
        a = (a, a)
    return pickle.dumps(a, 2)[2:-1]         # (memoized: small in the file, 2**levels paths when walked)


MALFORMED = {
    # name: (data.pkl, storages (None: one float32 storage '0' of 4), message)
    "key outside the archive": (pkl(tensor(storage(key="../../etc/passwd"))), None, "not a plain name"),
    "key with a slash": (pkl(tensor(storage(key="0/../0"))), None, "not a plain name"),
    "key without an entry": (pkl(tensor(storage(key="7"))), None, "storage '7' has no entry archive/data/7"),
    "view beyond the storage": (pkl(tensor(size=(5,))), None, "reaches element 4 of a storage of 4"),
    "offset beyond the storage": (pkl(tensor(offset=3, size=(2,))), None, "reaches element 4"),
    "stride beyond the storage": (pkl(tensor(size=(2, 2), stride=(3, 1))), None, "reaches element 4"),
    "negative stride": (pkl(tensor(size=(2,), stride=(-1,))), None, "stride is"),
    "negative size": (pkl(tensor(size=(-1,))), None, "size is"),
    "negative offset": (pkl(tensor(offset=-1)), None, "storage offset is -1"),
    "size and stride lengths": (pkl(tensor(size=(2, 2), stride=(1,))), None, "differ in length"),
    "absurd size": (pkl(tensor(size=(2**40, 2**40), stride=(0, 0))), None, "larger than max_bytes"),
    "truncated storage": (pkl(tensor()), {"0": b"\x00" * 12}, "holds 12 bytes.*16 bytes"),
    "storage longer than declared": (pkl(tensor()), {"0": b"\x00" * 20}, "holds 20 bytes"),
    "one key, two dtypes": (pkl(T(tensor(), tensor(storage(cls="IntStorage")))), None, "declared as 4 float32"),
    "one key, two sizes": (pkl(T(tensor(), tensor(storage(numel=2), size=(2,)))), None, "declared as 4 float32"),
    "not a storage class": (pkl(tensor(T(S("storage"), G("torch", "float32"), S("0"), S("cpu"), I(4)) + b"Q")),
                            None, "'torch.float32' is not a torch storage class"),
    "short persistent id": (pkl(tensor(T(S("storage"), G("torch", "FloatStorage"), S("0")) + b"Q")), None,
                            "is not \\('storage'"),
    "negative numel": (pkl(tensor(storage(numel=-4))), None, "non-negative numel"),
    "2**60-path persistent id": (pkl(_shared_tuple(60) + b"Q"), None,
                                 r"persistent id \(\(a tuple, a tuple\), \(a tuple"),
    "tensor on a list": (pkl(G("torch._utils", "_rebuild_tensor_v2") + T(b"]", I(0), T(I(1)), T(I(1)), b"\x89", OD)
                             + b"R"), None, "storage is a list"),
    "unknown metadata": (pkl(G("torch._utils", "_rebuild_tensor_v2") + T(storage(), I(0), T(I(4)), T(I(1)), b"\x89",
                                                                         OD, D(evil=b"\x88")) + b"R"),
                         None, "metadata .* not supported"),
    "wrong arity": (pkl(G("torch._utils", "_rebuild_tensor_v2") + T(storage()) + b"R"), None, "TypeError"),
    "truncated pickle": (pkl(D(w=tensor()))[:-1], None, "not a readable torch.save pickle"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_checkpoints_refused(tmp_path, name):
    data, storages, match = MALFORMED[name]
    _refused(_zip(tmp_path, data, storages), match)


def test_archive_rules(tmp_path):
    good = pkl(D(w=tensor()))
    _refused(_zip(tmp_path, good, byteorder=b"big", name="big.pth"), "only little-endian")
    _refused(_zip(tmp_path, good, byteorder=b"middle", name="mid.pth"), "byteorder is b'middle'")
    assert load(_zip(tmp_path, good, byteorder=None, name="noorder.pth"))["w"].tolist() == [0, 1, 2, 3]
    _refused(_zip(tmp_path, good, extra=[("archive/data/0", b"\x00" * 16)], name="dup.pth"), "archive/data/0 twice")
    _refused(_zip(tmp_path, good, extra=[("other/data.pkl", good)], name="two.pth"), "several data.pkl")
    assert load(_zip(tmp_path, good, compression=zipfile.ZIP_DEFLATED, name="deflated.pth"))["w"].tolist() == \
        [0, 1, 2, 3]                                    # compressed storages are read, not mapped
    _refused(_zip(tmp_path, good, compression=zipfile.ZIP_BZIP2, name="bz2.pth"), "compression method 12")
    _refused(_zip(tmp_path, good, name="cap.pth"), r"data.pkl is \d+ bytes, more than max_bytes=8", max_bytes=8)
    p = tmp_path / "nopkl.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data/0", b"\x00" * 16)
    _refused(p, "without a <folder>/data.pkl")


def _patch_central(path, name: bytes, field: int, value: int) -> None:
    """Overwrite a 4-byte field of `name`'s central directory record (20: compressed size, 24: size)."""
    data = bytearray(open(path, "rb").read())
    i = data.rfind(b"PK\x01\x02", 0, data.rfind(name))
    struct.pack_into("<I", data, i + field, value)
    open(path, "wb").write(bytes(data))


def test_zip_bomb_and_lying_sizes(tmp_path):
    p = _zip(tmp_path, pkl(D(w=tensor())), compression=zipfile.ZIP_DEFLATED, name="bomb.pth")
    _patch_central(p, b"archive/data.pkl", 24, 0xFFFFFFF0)
    _refused(p, "zip bomb")
    p = _zip(tmp_path, pkl(D(w=tensor())), name="lie.pth")
    _patch_central(p, b"archive/data/0", 20, 1 << 30)
    _patch_central(p, b"archive/data/0", 24, 1 << 30)
    _refused(p, "do not fit in the file")
    p = _zip(tmp_path, pkl(D(w=tensor())), name="offset.pth")       # an entry whose local header is not its own
    _patch_central(p, b"archive/data/0", 42, 0)
    _refused(p, "local header does not name it|not a readable")


def test_not_checkpoints(tmp_path):
    cases = {"empty.pth": (b"", "empty file"), "random.pth": (os.urandom(4096), "not a torch.save checkpoint"),
             "text.pth": (b"hello\n", "not a torch.save checkpoint"),
             "pickle.pth": (pickle.dumps({"a": 1}, 2), "not a torch.save checkpoint"),
             "tar.pth": (b"x" * 257 + b"ustar" + b"\x00" * 250, "tar format.*torch.save\\(torch.load")}
    for name, (data, match) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        _refused(p, match)
    real = open(_save(tmp_path, {"w": torch.ones(100)}), "rb").read()
    for cut in (len(real) // 2, len(real) - 30):
        p = tmp_path / f"cut{cut}.pth"
        p.write_bytes(real[:cut])
        with pytest.raises(TorchCheckpointError):
            load(p)


def _legacy_bytes(tmp_path, obj) -> bytes:
    return open(_save(tmp_path, obj, "legacy.pth", _use_new_zipfile_serialization=False), "rb").read()


def test_legacy_format_validation(tmp_path):
    t = torch.arange(6, dtype=torch.float32)
    real = _legacy_bytes(tmp_path, {"a": t, "b": t[2:]})
    got = load(tmp_path / "legacy.pth")
    assert got["b"].tolist() == [2, 3, 4, 5] and np.shares_memory(got["a"], got["b"])
    bad = {"truncated": (real[:-4], "runs past the end"), "no data": (real[:-32], "runs past the end|past the end"),
           "wrong count": (real.replace(struct.pack("<q", 6), struct.pack("<q", 5)), "holds 5 elements"),
           "big-endian": (real.replace(b"little_endian\x94\x88", b"little_endian\x94\x89").replace(
               b"little_endianq\x02\x88", b"little_endianq\x02\x89"), "only little-endian"),
           "protocol": (real.replace(b"M\xe9\x03", b"M\xea\x03", 1), "protocol version 1002"),
           "bad magic": (real[:5] + b"\x00" + real[6:], "unknown magic number")}
    for name, (data, match) in bad.items():
        assert data != real, name
        p = tmp_path / f"{name}.pth"
        p.write_bytes(data)
        _refused(p, match)


def test_max_bytes_bounds_storages(tmp_path):
    p = _save(tmp_path, {"a": torch.zeros(100), "b": torch.zeros(100)})
    assert load(p, max_bytes=1000)["a"].shape == (100,)
    _refused(p, "storages add up to more than max_bytes=500", max_bytes=500)


def _legacy(tmp_path, main: bytes, keys, records: bytes, name="crafted_legacy.pth") -> str:
    """A legacy torch.save file: magic, protocol, sys_info, the main pickle, the key list, the storage records."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
    data = b"".join(pickle.dumps(x, 2) for x in (0x1950A86A20F9469CFC6C, 1001, sys_info))
    p = tmp_path / name
    p.write_bytes(data + pkl(main) + pickle.dumps(list(keys), 2) + records)
    return str(p)


def _record(values) -> bytes:
    a = np.asarray(values, np.float32)
    return struct.pack("<q", a.size) + a.tobytes()


def lstorage(key="1", numel=6, view=b"N") -> bytes:
    return T(S("storage"), G("torch", "FloatStorage"), S(key), S("cpu"), I(numel), view) + b"Q"


def test_legacy_views_and_old_rebuild(tmp_path):
    """Storage views (torch < 1.0 wrote them as a sixth persistent-id item) and the old _rebuild_tensor."""
    view = T(S("9"), I(2), I(3))
    old = G("torch._utils", "_rebuild_tensor") + T(lstorage(view=view), I(1), T(I(2)), T(I(1))) + b"R"
    p = _legacy(tmp_path, D(whole=tensor(lstorage(), size=(6,)), old=old), ["1"], _record(range(6)))
    got = load(p)
    assert got["whole"].tolist() == [0, 1, 2, 3, 4, 5] and got["old"].tolist() == [3, 4]
    bad = {"view beyond": (D(v=tensor(lstorage(view=T(S("9"), I(4), I(3))), size=(1,))), ["1"], "runs past"),
           "listed, unused": (D(w=tensor(lstorage(), size=(6,))), ["1", "2"], r"\['2'\] are listed or used"),
           "used, unlisted": (D(w=tensor(lstorage(), size=(6,))), [], r"\['1'\] are listed or used"),
           "listed twice": (D(w=tensor(lstorage(), size=(6,))), ["1", "1"], "distinct strings"),
           "zip-style id": (D(w=tensor(storage(key="1", numel=6), size=(6,))), ["1"], "is not \\('storage'"),
           "payload": (D(x=G("os", "system") + T(S(f"touch {tmp_path / 'MARKER'}")) + b"R"), [], r"os\.system")}
    for name, (main, keys, match) in bad.items():
        _refused(_legacy(tmp_path, main, keys, _record(range(6)) * len(keys), f"{name}.pth"), match,
                 tmp_path / "MARKER")
