"""Peak probes (csrc/peak.c, `_core.peak`): every instruction family the CPU has measures a positive finite rate,
families it lacks (or that VLM_GEMM_ISA caps away) measure 0.0 without running anything, bad arguments raise,
the GIL is released while a probe runs, and the families rank as the hardware says where that is known.
The measured values are printed (pytest -s)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time

import pytest

from vlmfo1 import _core as core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("fma32", "bf16dp", "vnni", "bandwidth")


def _cpuinfo():
    flags, vendor = set(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(val.split())
                elif key.strip() == "vendor_id" and not vendor:
                    vendor = val.strip()
    except OSError:
        pass
    return flags, vendor


FLAGS, VENDOR = _cpuinfo()
KERNEL = core.gemm_info()["kernel"]   # the level vlm_cpu_isa() settled on (VLM_GEMM_ISA may cap it)
HAS = {
    "fma32": True,
    "bandwidth": True,
    "bf16dp": KERNEL == "avx512bf16",
    "vnni": KERNEL in ("avx512", "avx512bf16") and "avx512_vnni" in FLAGS,
}
UNIT = {"fma32": "GFLOP/s", "bf16dp": "GFLOP/s", "vnni": "GOP/s", "bandwidth": "GB/s"}


_measured = {}   # (family, n_threads) -> the first measurement (the ranking test reuses the 1-thread ones)


def _check(family, n):
    t0 = time.perf_counter()
    v = core.peak(family, n)
    dt = time.perf_counter() - t0
    print(f"peak({family!r}, {n}) = {v:.1f} {UNIT[family]} ({dt:.2f} s)")
    assert isinstance(v, float) and math.isfinite(v) and v > 0, (family, n, v)
    _measured.setdefault((family, n), v)
    return v


def _measure(family, n):
    return _measured[(family, n)] if (family, n) in _measured else _check(family, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_present_measures_positive(family):
    if not HAS[family]:
        pytest.skip(f"this CPU (kernel level {KERNEL}) has no {family} instructions")
    v = _measure(family, 1)
    if family == "bandwidth":
        assert 0.5 < v < 10000, v
    else:
        assert v > 1.0, v


def test_two_threads():
    for family in FAMILIES:
        if HAS[family]:
            _check(family, 2)


@pytest.mark.parametrize("family", [f for f in FAMILIES if not HAS[f]] or ["none"])
def test_family_absent_measures_zero(family):
    if family == "none":
        pytest.skip("this CPU has every probed family (the VLM_GEMM_ISA=avx2 subprocess test covers absence)")
    t0 = time.perf_counter()
    assert core.peak(family, 1) == 0.0
    assert time.perf_counter() - t0 < 0.1   # nothing ran


def test_capped_isa_reports_absent_families_as_zero():
    """With VLM_GEMM_ISA=avx2 the AVX-512 families are unavailable: 0.0 at once; fma32 runs its AVX2 loop."""
    if "avx2" not in FLAGS or "fma" not in FLAGS:
        pytest.skip("no AVX2/FMA on this CPU")
    code = ("from vlmfo1 import _core\n"
            "print(_core.gemm_info()['kernel'], _core.peak('bf16dp', 2), _core.peak('vnni', 2), "
            "_core.peak('fma32', 1))\n")
    env = dict(os.environ, VLM_GEMM_ISA="avx2", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    kernel, bf, vn, fma = r.stdout.split()
    print(f"VLM_GEMM_ISA=avx2: kernel {kernel}, bf16dp {bf}, vnni {vn}, fma32 (AVX2) {float(fma):.1f} GFLOP/s")
    assert kernel == "avx2"
    assert float(bf) == 0.0 and float(vn) == 0.0
    assert float(fma) > 1.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown peak family"):
        core.peak("amx", 1)
    with pytest.raises(ValueError, match="unknown peak family"):
        core.peak("", 1)
    for n in (0, -1, 257):
        with pytest.raises(ValueError, match="n_threads"):
            core.peak("fma32", n)
        with pytest.raises(ValueError, match="n_threads"):
            core.fma_peak(n)
    with pytest.raises(OverflowError):
        core.peak("fma32", 1 << 70)
    with pytest.raises(TypeError):
        core.peak("fma32", "2")
    with pytest.raises(TypeError):
        core.peak("fma32", 1.0)
    with pytest.raises(TypeError):
        core.peak(1, 1)
    with pytest.raises(TypeError):
        core.peak("fma32")
    with pytest.raises(ValueError, match="unknown peak family"):
        core.peak(family="fp64", n_threads=1)


def test_gil_released_while_probing():
    """Another Python thread keeps running during a probe (~0.4 s): the probe does not hold the GIL."""
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("v", core.peak("fma32", 1)))
    ticks = 0
    th.start()
    while th.is_alive():
        time.sleep(0.005)
        ticks += 1
    th.join()
    print(f"fma32 1 thread {out['v']:.1f} GFLOP/s; main thread ticked {ticks} times meanwhile")
    assert out["v"] > 1.0
    assert ticks >= 10


def test_family_ranking():
    """vpdpbusd (128 int ops per zmm instruction) outruns vdpbf16ps (64 FLOP) on every CPU measured so far (AMD Zen 4:
    ~2x; Intel Emerald Rapids: 5-8x). vdpbf16ps >= 1.5x fp32 FMA holds on Zen 4 (2.0x measured: it issues at the
    zmm FMA rate with twice the FLOP per instruction) but not on Emerald Rapids (~0.5x measured), so that bound is
    checked on AMD CPUs only. 1 thread (the measurements above); on a miss the faster families are measured once
    more (best of two: other jobs share the machine, and they only ever make a probe read low)."""
    if not HAS["bf16dp"]:
        pytest.skip(f"no AVX512-BF16 (kernel level {KERNEL})")
    fma, bf = _measure("fma32", 1), _measure("bf16dp", 1)
    vn = _measure("vnni", 1) if HAS["vnni"] else 0.0
    amd = VENDOR == "AuthenticAMD"
    if (amd and bf < 1.5 * fma) or (HAS["vnni"] and vn < bf):   # a probe slowed by another job reads low
        bf = max(bf, core.peak("bf16dp", 1))
        vn = max(vn, core.peak("vnni", 1)) if HAS["vnni"] else 0.0
    print(f"{VENDOR}: fma32 {fma:.1f}, bf16dp {bf:.1f} ({bf / fma:.2f}x fma32), vnni {vn:.1f} ({vn / bf:.2f}x bf16dp)")
    if amd:
        assert bf >= 1.5 * fma, (bf, fma)
    if HAS["vnni"]:
        assert vn >= bf, (vn, bf)
