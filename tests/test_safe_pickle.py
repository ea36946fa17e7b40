"""vlmfo1.eval.safe_pickle: plain-data pickles (the refer toolkit's Python 2 refs files) read; code never run.

Every hostile pickle below would run `touch MARKER` (or build an object) under pickle.load; each must be refused with
a ValueError naming the file, and the marker must not exist afterwards. Both readers are checked: the C unpickler
with every global refused (the default) and the plain-opcode reader (strict=True, also chosen automatically when
copyreg's extension cache is in use).
"""
from __future__ import annotations

import copyreg
import os
import pickle
import pickletools
import struct
import time

import numpy as np
import pytest

import refcoco_fixture
from vlmfo1.eval.safe_pickle import load_plain, loads_plain

READERS = [False, True]          # strict=False: C unpickler, find_class refuses; strict=True: plain opcodes only


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _write(tmp_path, name, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _refused(path, strict, marker=None, match="refused"):
    with pytest.raises(ValueError, match=match) as e:
        load_plain(path, strict=strict)
    assert os.fspath(path) in str(e.value)
    if marker is not None:
        assert not os.path.exists(marker), "the pickle ran code"
    return str(e.value)


@pytest.mark.parametrize("strict", READERS)
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_reduce_os_system_refused_without_running(tmp_path, protocol, strict):
    marker = tmp_path / "PWNED"
    data = pickle.dumps({"refs": [_System(f"touch {marker}")]}, protocol=protocol)
    assert b"system" in data
    path = _write(tmp_path, "refs(unc).p", data)
    msg = _refused(path, strict, marker)
    assert "system" in msg or "GLOBAL" in msg
    assert "never code" in msg


def _op(name: str) -> bytes:
    return next(op.code for op in pickletools.opcodes if op.name == name).encode("latin-1")


HOSTILE = {
    # name: raw pickle; each needs a global, a persistent id, a buffer, or applies a call/BUILD to plain data
    "GLOBAL+REDUCE": b"cos\nsystem\n(S'touch MARKER'\ntR.",
    "STACK_GLOBAL+REDUCE": (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x0ctouch MARKER\x85R."),
    "INST": b"(S'touch MARKER'\nios\nsystem\n.",
    "OBJ": b"\x80\x02(cos\nsystem\nS'touch MARKER'\no.",
    "NEWOBJ": b"\x80\x02cbuiltins\nobject\n)\x81.",
    "NEWOBJ_EX": b"\x80\x04cbuiltins\nobject\n)}\x92.",
    "BUILD on a dict": b"\x80\x02}}b.",
    "REDUCE on a list": b"\x80\x02])R.",
    "PERSID": b"Pfoo\n.",
    "BINPERSID": b"\x80\x02X\x03\x00\x00\x00fooQ.",
    "NEXT_BUFFER": b"\x80\x05\x97.",
    "set (protocol 4)": pickle.dumps({1, 2}, protocol=4),
    "set (protocol 2)": pickle.dumps({1, 2}, protocol=2),
    "frozenset": pickle.dumps(frozenset([1]), protocol=4),
    "bytearray": pickle.dumps(bytearray(b"ab"), protocol=5),
    "bytes at protocol 2 (_codecs.encode)": pickle.dumps(b"ab", protocol=2),
    "complex": pickle.dumps(1j, protocol=2),
    "self-containing list": b"\x80\x02]q\x00h\x00a.",
    "self-containing dict": b"\x80\x02}q\x00X\x01\x00\x00\x00kh\x00s.",
    "list inside its own tuple": b"\x80\x02]q\x00h\x00\x85q\x01a.",
}


@pytest.mark.parametrize("strict", READERS)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_opcodes_refused(tmp_path, name, strict):
    marker = tmp_path / "MARKER"
    data = HOSTILE[name].replace(b"MARKER", str(marker).encode()) if b"MARKER" in HOSTILE[name] else HOSTILE[name]
    if b"MARKER" in HOSTILE[name]:                 # the length-prefixed form needs its length fixed
        data = data.replace(b"\x8c\x0ctouch", b"\x8c" + bytes([len(b"touch " + str(marker).encode())]) + b"touch")
    path = _write(tmp_path, "hostile.p", data)
    with pytest.raises(ValueError) as e:
        load_plain(path, strict=strict)
    assert path in str(e.value)
    assert not marker.exists()


def test_extension_codes_cannot_bypass_find_class(tmp_path):
    """EXT opcodes skip find_class once copyreg's extension cache knows the code: the reader then switches to the
    plain-opcode reader by itself."""
    code = 0x7FFFFFF0
    marker = tmp_path / "MARKER"
    cmd = f"touch {marker}".encode()
    ext = b"\x80\x02\x84" + struct.pack("<i", code)
    hostile = ext + b"X" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."
    copyreg.add_extension("os", "system", code)
    try:
        assert pickle.loads(ext + b".") is os.system        # the cache now holds os.system (nothing called)
        assert copyreg._extension_cache
        path = _write(tmp_path, "ext.p", hostile)
        msg = _refused(path, None, marker)
        assert "EXT4" in msg
        _refused(path, True, marker)
    finally:
        copyreg.remove_extension("os", "system", code)
    assert not copyreg._extension_cache.get(code)
    _refused(path, None, marker, match="unregistered extension code")    # no registry entry: not readable
    assert not marker.exists()


@pytest.mark.parametrize("strict", READERS)
def test_nesting_depth_bound(tmp_path, strict):
    def nested(n):
        x = []
        for _ in range(n - 1):
            x = [x]
        return x
    ok = _write(tmp_path, "deep100.p", pickle.dumps(nested(100), protocol=2))
    assert load_plain(ok, strict=strict) == nested(100)
    deep = _write(tmp_path, "deep101.p", pickle.dumps(nested(101), protocol=2))
    _refused(deep, strict, match="nested deeper than 100")
    assert loads_plain(pickle.dumps(nested(101), protocol=2), max_depth=101, strict=strict) == nested(101)
    # a tuple dict key counts as a level too
    assert loads_plain(pickle.dumps({(1, (2,)): [0]}, protocol=2), strict=strict) == {(1, (2,)): [0]}
    with pytest.raises(ValueError, match="nested deeper than 2"):
        loads_plain(pickle.dumps({(1, (2,)): 0}, protocol=2), max_depth=2, strict=strict)


@pytest.mark.parametrize("strict", READERS)
def test_shared_containers_checked_once(tmp_path, strict):
    """2^60 paths through 61 shared lists: accepted (depth 61) in well under a second; sharing met again deeper than
    the bound is refused."""
    a: list = [1]
    for _ in range(60):
        a = [a, a]
    data = pickle.dumps(a, protocol=2)
    t = time.perf_counter()
    out = loads_plain(data, strict=strict)
    assert time.perf_counter() - t < 1.0
    assert out[0] is out[1]
    with pytest.raises(ValueError, match="nested deeper than 60"):
        loads_plain(data, max_depth=60, strict=strict)
    # a shallow shared list first met at depth 2, later at depth 40
    s = [0]
    deep = [s]
    for _ in range(39):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper than 40"):
        loads_plain(pickle.dumps([s, deep], protocol=2), max_depth=40, strict=strict)


def _plain_values(rng, depth=0):
    kind = rng.integers(0, 10 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return int(rng.integers(-2**40, 2**40)) * (10**20 if rng.integers(0, 4) == 0 else 1)
    if kind == 3:
        return float(rng.normal()) if rng.integers(0, 5) else float("inf")
    if kind == 4:
        return "".join(chr(c) for c in rng.integers(32, 0x2FFF, size=rng.integers(0, 12)))
    if kind == 5:
        return bytes(rng.integers(0, 256, size=rng.integers(0, 12)).astype(np.uint8))
    if kind == 6:
        return [_plain_values(rng, depth + 1) for _ in range(rng.integers(0, 5))]
    if kind == 7:
        return tuple(_plain_values(rng, depth + 1) for _ in range(rng.integers(0, 5)))
    return {str(rng.integers(0, 1000)): _plain_values(rng, depth + 1) for _ in range(rng.integers(0, 5))}


def _has_bytes(x):
    if isinstance(x, bytes):
        return True
    if isinstance(x, dict):
        return any(_has_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_bytes(v) for v in x)
    return False


@pytest.mark.parametrize("strict", READERS)
def test_plain_data_round_trips(strict):
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        value = {"v": _plain_values(rng)}
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            if protocol < 3 and _has_bytes(value):
                continue         # Python 3 writes bytes at protocol < 3 through a _codecs.encode call: refused
            assert loads_plain(pickle.dumps(value, protocol=protocol), strict=strict) == value
            checked += 1
    assert checked > 200


@pytest.mark.parametrize("strict", READERS)
def test_python2_strings(strict):
    """Python 2 str (SHORT_BINSTRING / BINSTRING): UTF-8 text decodes as such, other bytes as Latin-1."""
    p = refcoco_fixture.py2_dumps
    B = refcoco_fixture.Py2Bytes
    U = refcoco_fixture.Py2Unicode
    assert loads_plain(p({"sent": "the man", "n": 70000, "big": 2**40, "x": 1.5}), strict=strict) == \
        {"sent": "the man", "n": 70000, "big": 2**40, "x": 1.5}
    assert loads_plain(p([B("café".encode("utf-8")), U("naïve"), B(b"x" * 300)]), strict=strict) == \
        ["café", "naïve", "x" * 300]
    assert loads_plain(p([B(b"\xe9t\xe9"), "ok"]), strict=strict) == ["été", "ok"]     # not UTF-8: Latin-1


@pytest.mark.parametrize("strict", READERS)
def test_malformed_files(tmp_path, strict):
    good = refcoco_fixture.py2_dumps([{"a": 1}])
    cases = {"empty.p": b"", "truncated.p": good[:-5], "garbage.p": b"\x00\xff garbage", "text.p": b"hello world\n",
             "json.p": b'{"a": 1}', "huge length.p": b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"."}
    for name, data in cases.items():
        path = _write(tmp_path, name, data)
        with pytest.raises(ValueError) as e:
            load_plain(path, strict=strict)
        assert path in str(e.value), name
    with pytest.raises(FileNotFoundError, match="missing.p"):
        load_plain(tmp_path / "missing.p")
    path = _write(tmp_path, "ok.p", good)
    assert load_plain(path, strict=strict) == [{"a": 1}]
    with pytest.raises(ValueError, match="18 bytes, more than the 10"):
        load_plain(path, max_bytes=10)


@pytest.fixture(scope="module")
def refer_fixture(tmp_path_factory):
    return refcoco_fixture.build(str(tmp_path_factory.mktemp("refer")))


def test_refer_fixture_is_a_python2_protocol2_pickle(refer_fixture):
    data = open(refer_fixture["refs"], "rb").read()
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert data[:2] == b"\x80\x02"
    assert {"SHORT_BINSTRING", "BINUNICODE", "BINGET", "LONG_BINPUT", "SETITEMS", "APPENDS", "BININT"} <= ops
    assert not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "BINUNICODE8",
                      "SHORT_BINUNICODE", "FRAME", "MEMOIZE"}       # nothing Python 3 or code-bearing
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)              # the stdlib default (ASCII) fails on the UTF-8 byte string, as in real files


@pytest.mark.parametrize("strict", READERS)
def test_refer_fixture_reads_as_the_stdlib_does(refer_fixture, strict):
    data = open(refer_fixture["refs"], "rb").read()
    ours = load_plain(refer_fixture["refs"], strict=strict)
    assert ours == pickle.loads(data, encoding="utf-8")           # the stdlib, told the encoding, agrees
    assert ours[0]["sentences"][-1]["sent"] == "the one near the café"
    assert ours[1]["sentences"][0]["sent"].endswith("(naïve)")
    assert [s["sent_id"] for r in ours for s in r["sentences"]] == list(range(len(refer_fixture["expected"])))
