"""Tests of the matrix-multiply kernels (csrc/gemm.c) through vlmfo1._core.matmul.

References are float64 NumPy products: fp32 weights as given, bf16 weights widened exactly, and for
compute="bf16" the activations rounded to bf16 (round-to-nearest-even) as well. Errors are measured
relative to sum_k |x||w| (the natural scale of a dot product's rounding error).
"""
import numpy as np
import pytest

core = pytest.importorskip("vlmfo1._core")

TOL = 1e-5  # max |out - ref| / sum|x||w|


def to_bf16(a):
    """fp32 -> bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16(h):
    return (h.astype(np.uint32) << 16).view(np.float32)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def check(name, out, ref, scale):
    err = float(np.max(np.abs(out.astype(np.float64) - ref) / scale))
    print(f"{name}: max scaled err {err:.3g}")
    assert np.all(np.isfinite(out)), name
    assert err < TOL, f"{name}: max scaled error {err:.3g}"


SHAPES = [(m, k, n) for m in (1, 3, 17, 64) for k, n in ((37, 5), (100, 67), (2048, 129))]
SHAPES += [(5, 2085, 301), (8, 1030, 200), (2, 4096, 33)]
# m > 16 with bf16 weights and compute runs the packed-panel path on AVX512-BF16 (csrc/gemm.c): row panels of 14
# with tails, k blocks of <= 2048 with a padded tail (3420: the ViT MLP; 4097: three blocks), column panels of 32
SHAPES += [(29, 3420, 33), (213, 4097, 1), (43, 31, 256), (17, 2048, 65)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fp32_weights(m, k, n):
    rng = np.random.default_rng(1000 * m + k + n)
    x, w, b = rand(rng, m, k), rand(rng, n, k), rand(rng, n)
    w.setflags(write=False)
    w0 = w.copy()
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    scale = np.abs(x64) @ np.abs(w64).T + 1e-30
    check(f"f32 {m}x{k}x{n}", core.matmul(x, w), x64 @ w64.T, scale)
    check(f"f32+bias {m}x{k}x{n}", core.matmul(x, w, bias=b), x64 @ w64.T + b, scale + np.abs(b))
    assert np.array_equal(w, w0)


@pytest.mark.parametrize("compute", ["f32", "bf16"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bf16_weights(m, k, n, compute):
    rng = np.random.default_rng(7 + 1000 * m + k + n)
    x, b = rand(rng, m, k), rand(rng, n)
    wh = to_bf16(rand(rng, n, k))
    wh.setflags(write=False)
    w0 = wh.copy()
    w64 = from_bf16(wh).astype(np.float64)
    x64 = (from_bf16(to_bf16(x)) if compute == "bf16" else x).astype(np.float64)
    scale = np.abs(x64) @ np.abs(w64).T + 1e-30
    out = core.matmul(x, wh, bias=b, compute=compute)
    check(f"bf16/{compute} {m}x{k}x{n}", out, x64 @ w64.T + b, scale + np.abs(b))
    assert np.array_equal(wh, w0)
    # each output element is computed by one thread in a fixed order: bitwise equal for any pool size
    for nt in (2, 3):
        o2 = core.matmul(x, wh, bias=b, compute=compute, n_threads=nt)
        assert np.array_equal(out, o2), f"n_threads={nt} differs from n_threads=1"


@pytest.mark.parametrize("wtype,compute", [("f32", "f32"), ("bf16", "f32"), ("bf16", "bf16")])
@pytest.mark.parametrize("m", [1, 17, 64])
def test_accumulate_and_out(wtype, compute, m):
    rng = np.random.default_rng(m)
    k, n = 300, 77
    x, b = rand(rng, m, k), rand(rng, n)
    w = rand(rng, n, k)
    if wtype == "bf16":
        w = to_bf16(w)
        w64 = from_bf16(w).astype(np.float64)
    else:
        w64 = w.astype(np.float64)
    x64 = (from_bf16(to_bf16(x)) if compute == "bf16" else x).astype(np.float64)
    scale = np.abs(x64) @ np.abs(w64).T + np.abs(b) + 1.0
    res = rand(rng, m, n)
    out = res.copy()
    r = core.matmul(x, w, bias=b, compute=compute, out=out, accumulate=True, n_threads=2)
    assert r is out or np.shares_memory(r, out)
    check(f"accumulate {wtype}/{compute} m={m}", out, res + x64 @ w64.T + b, scale)
    out2 = res.copy()
    core.matmul(x, w, compute=compute, out=out2, accumulate=False)
    check(f"out= {wtype}/{compute} m={m}", out2, x64 @ w64.T, scale)


def test_bad_arguments():
    rng = np.random.default_rng(3)
    x, w = rand(rng, 4, 32), rand(rng, 8, 32)
    wh = to_bf16(w)
    with pytest.raises(ValueError):
        core.matmul(x, rand(rng, 8, 31))  # k mismatch
    with pytest.raises(ValueError):
        core.matmul(x, wh[:, :31].copy())
    with pytest.raises(ValueError):
        core.matmul(x, w, bias=rand(rng, 7))  # bias length
    with pytest.raises(ValueError):
        core.matmul(x, wh, compute="int8")  # compute mode
    with pytest.raises(ValueError):
        core.matmul(x, w, out=np.zeros((4, 7), np.float32))  # out shape
    with pytest.raises((ValueError, TypeError)):
        core.matmul(x, w.astype(np.float64))  # weight dtype
    with pytest.raises((ValueError, TypeError)):
        core.matmul(x[0], w)  # x not 2-D


def test_special_values_propagate():
    for m in (2, 20):   # 20: the packed-panel path of bf16 compute
        x = np.ones((m, 40), np.float32)
        x[m - 1, 3] = np.nan   # the last row only
        w = np.ones((3, 40), np.float32)
        w[1, 39] = np.inf
        w[2, 0] = np.nan
        for ww, c in ((w, "f32"), (to_bf16(w), "f32"), (to_bf16(w), "bf16")):
            o = core.matmul(x, ww, compute=c)
            assert np.all(o[:-1, 0] == 40) and np.all(np.isposinf(o[:-1, 1])) and np.all(np.isnan(o[:, 2])), (m, c)
            assert np.all(np.isnan(o[-1])), (m, c)


def test_info_and_peak():
    info = core.gemm_info()
    print(info)
    assert info["kernel"] in ("avx512bf16", "avx512", "avx2", "generic")
    assert isinstance(info["blas"], str)
    p = core.fma_peak(1)
    print(f"fma peak 1 thread: {p:.1f} GFLOP/s")
    assert p > 1.0


def test_blas_core_warning():
    """An OpenBLAS running kernels below the CPU's class is named at import (vlmfo1._native), not silent."""
    from vlmfo1._native import blas_core_warning

    blas = "OpenBLAS core={} threads=1 config=x"
    avx512 = {"avx2", "fma", "avx512f"}
    assert blas_core_warning(blas.format("SkylakeX"), avx512, {}) == ""
    msg = blas_core_warning(blas.format("Haswell"), avx512, {"OPENBLAS_CORETYPE": "Haswell"})
    assert "Haswell kernels on this AVX-512 CPU" in msg and "unset OPENBLAS_CORETYPE" in msg
    msg = blas_core_warning(blas.format("Haswell"), avx512, {})
    assert "what it detected" in msg and "OPENBLAS_CORETYPE=SkylakeX" in msg
    assert blas_core_warning(blas.format("Haswell"), {"avx2", "fma"}, {}) == ""
    assert "AVX2 CPU" in blas_core_warning(blas.format("Prescott"), {"avx2", "fma"}, {})
    assert blas_core_warning(blas.format("Prescott"), {"sse2"}, {}) == ""
    assert blas_core_warning("no core here", avx512, {}) == ""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-W", "always", "-c", "import vlmfo1"], capture_output=True, text=True,
                       env=dict(__import__("os").environ, OPENBLAS_CORETYPE="Prescott"), timeout=120)
    assert p.returncode == 0
    flags = __import__("vlmfo1._native", fromlist=["_cpu_flags"])._cpu_flags()
    if "avx2" in flags and "fma" in flags:
        assert "OPENBLAS_CORETYPE=Prescott is set" in p.stderr, p.stderr


@pytest.mark.parametrize("compute", ["f32", "bf16"])
@pytest.mark.parametrize("m", [1, 7, 17, 43])
def test_matmul_multi_equals_separate_calls(m, compute):
    """vlm_matmul_multi (the decoder's fused q/k/v and gate/up): each output is bitwise what a matmul of its weight
    alone gives, for any thread count (where the packed bf16 path runs, all weights share one packing of x)."""
    rng = np.random.default_rng(m)
    for k in (31, 3420):
        ws = [to_bf16(rand(rng, n, k)) for n in (33, 256, 1)]
        bs = [rand(rng, w.shape[0]) for w in ws]
        x = rand(rng, m, k)
        for nt in (1, 2, 3):
            outs = core.matmul_multi(x, ws, biases=bs, compute=compute, n_threads=nt)
            for o, w, b in zip(outs, ws, bs):
                assert np.array_equal(o, core.matmul(x, w, bias=b, compute=compute)), (k, nt, w.shape)
    w32 = rand(rng, 5, 64)
    outs = core.matmul_multi(rand(rng, m, 64), [w32, to_bf16(w32)])   # mixed dtypes: one call each
    assert [o.shape for o in outs] == [(m, 5), (m, 5)]


def test_matmul_multi_bad_arguments():
    x, w = np.ones((20, 64), np.float32), to_bf16(np.ones((8, 64), np.float32))
    with pytest.raises(ValueError, match="same k"):
        core.matmul_multi(x, [w, to_bf16(np.ones((8, 32), np.float32))])
    with pytest.raises(ValueError, match="1 to 4"):
        core.matmul_multi(x, [w] * 5)
    with pytest.raises(ValueError, match="1 to 4"):
        core.matmul_multi(x, [])
    with pytest.raises(TypeError, match="float32 or bf16"):
        core.matmul_multi(x, [np.ones((8, 64), np.int8)])
    with pytest.raises(ValueError, match="biases"):
        core.matmul_multi(x, [w, w], biases=[None])
    with pytest.raises(ValueError, match="shape"):
        core.matmul_multi(np.ones((20, 63), np.float32), [w])
