"""Op-level tests in the spirit of ggml's test-backend-ops: every op of csrc/ops.h, run alone through
_core.op (csrc/py_ops.h), against a float64 NumPy reference on odd shapes (T = 1, C not a multiple of 16,
ragged windows and segments), printing the max error of each case against its stated tolerance.

Every case also runs with 1, 2 and 3 threads and must give the same bits. The whole file runs again in
subprocesses under VLM_GEMM_ISA=avx2 and =generic (the cap is read once per process), so every dispatch
level of the kernels that have one (attention tiles, GELU, GEMM) is checked.
Tolerances: max |got - ref| <= atol + rtol·|ref| elementwise (rtol 1e-5 unless stated); atol grows with the
length of the reductions an op makes (about 1e-6·sqrt(K) for sums of K unit-size terms).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import erf

from vlmfo1._native import core

THREADS = (1, 2, 3)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
f32 = np.float32


def rng(seed):
    return np.random.default_rng(seed)


def randn(r, *shape, scale=1.0):
    return (r.standard_normal(shape) * scale).astype(f32)


def run(name, arrays, ints=(), floats=(), outs=(0,)):
    """Runs the op with 1, 2 and 3 threads on fresh copies of `arrays`; checks the outputs (array indexes
    `outs`) are bitwise equal across thread counts and returns them (of the 1-thread run)."""
    results = []
    for nt in THREADS:
        a = [x.copy() for x in arrays]
        core.op(name, a, [int(i) for i in ints], [float(f) for f in floats], n_threads=nt)
        results.append([a[i] for i in outs])
    for nt, res in zip(THREADS[1:], results[1:]):
        for i, (x, y) in enumerate(zip(results[0], res)):
            assert np.array_equal(x, y, equal_nan=True), f"{name}: output {i} differs between 1 and {nt} threads"
    return results[0] if len(outs) > 1 else results[0][0]


def check(label, got, ref, atol, rtol=1e-5):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (label, got.shape, ref.shape)
    err = np.abs(got - ref)
    worst = float(err.max()) if err.size else 0.0
    bound = atol + rtol * np.abs(ref)
    idx = np.unravel_index(int(np.argmax(err - bound)), err.shape) if err.size else ()
    print(f"[ops] {label}: max abs err {worst:.3g} (atol {atol:g}, rtol {rtol:g})")
    assert np.all(err <= bound), f"{label}: max abs err {worst:.3g} at {idx}: got {got[idx]}, ref {ref[idx]}"


# ----------------------------------------------------------------------------- activations

def gelu_ref(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


@pytest.mark.parametrize("n", [1, 15, 17, 64 * 3 + 5, 1000])
def test_gelu_erf(n):
    x = randn(rng(n), n, scale=3)
    check(f"gelu_erf n={n}", run("gelu_erf", [x], [n]), gelu_ref(x), 1e-6)


@pytest.mark.parametrize("n", [1, 15, 17, 64 * 3 + 5, 1000])
def test_gelu_erf_poly(n):
    x = randn(rng(n + 1), n, scale=3)
    check(f"gelu_erf_poly n={n}", run("gelu_erf_poly", [x], [n]), gelu_ref(x), 1e-6)


@pytest.mark.parametrize("T,C", [(1, 7), (3, 33), (5, 130)])
def test_silu_mul(T, C):
    r = rng(T * C)
    g, u = randn(r, T, C, scale=3), randn(r, T, C)
    gd = g.astype(np.float64)
    check(f"silu_mul {T}x{C}", run("silu_mul", [g, u], [T, C]), gd / (1 + np.exp(-gd)) * u, 1e-6)


# ----------------------------------------------------------------------------- normalization

@pytest.mark.parametrize("T,C", [(1, 7), (1, 64), (4, 33), (7, 100)])
def test_rmsnorm(T, C):
    r = rng(T + C)
    x, w = randn(r, T, C, scale=2), randn(r, C)
    xd = x.astype(np.float64)
    ref = xd / np.sqrt((xd ** 2).mean(1, keepdims=True) + 1e-6) * w
    check(f"rmsnorm {T}x{C}", run("rmsnorm", [np.empty_like(x), x, w], [T, C], [1e-6]), ref, 1e-5)


def ln_ref(x, w, b, eps):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("T,C", [(1, 7), (1, 64), (4, 33), (7, 100)])
def test_layernorm(T, C):
    r = rng(T * 7 + C)
    x, w, b = randn(r, T, C, scale=2) + f32(1.5), randn(r, C), randn(r, C)
    got = run("layernorm", [np.empty_like(x), x, w, b], [T, C], [1e-5])
    check(f"layernorm {T}x{C}", got, ln_ref(x, w, b, 1e-5), 1e-5)
    check(f"layernorm_row_f64 C={C}", run("layernorm_row_f64", [np.empty(C, f32), x[0].copy(), w, b], [C], [1e-5]),
          ln_ref(x[0], w, b, 1e-5), 1e-5)


@pytest.mark.parametrize("H,W,pitch,C", [(1, 1, 3, 5), (3, 4, 6, 17), (5, 2, 2, 33)])
def test_layernorm_grid(H, W, pitch, C):
    r = rng(H * W * C)
    x, w, b = randn(r, H, pitch, C), randn(r, C), randn(r, C)
    ref = x.astype(np.float64)
    ref[:, :W] = ln_ref(x[:, :W], w, b, 1e-6)
    check(f"layernorm_grid {H}x{W} pitch {pitch} C={C}", run("layernorm_grid", [x, w, b], [pitch, H, W, C], [1e-6]),
          ref, 1e-5)


# ----------------------------------------------------------------------------- rotary embedding

@pytest.mark.parametrize("T,nh,D,sec", [(1, 1, 8, (2, 1, 1)), (5, 3, 12, (2, 2, 2)), (9, 2, 20, (4, 3, 3))])
def test_rope(T, nh, D, sec):
    r = rng(T * D)
    pos = r.integers(0, 50, (3, T)).astype(np.int32)
    inv = (1.0 / 100.0 ** (np.arange(D // 2) / (D // 2))).astype(f32)
    cs, sn = run("rope_table", [np.empty((T, D // 2), f32), np.empty((T, D // 2), f32), pos, inv], [T, D, *sec],
                 outs=(0, 1))
    axis = np.array([0] * sec[0] + [1] * sec[1] + [2] * (D // 2 - sec[0] - sec[1]))
    ang = pos[axis].T.astype(np.float64) * inv
    check(f"rope_table T={T} D={D}", cs, np.cos(ang), 2e-6)
    check(f"rope_table T={T} D={D} sin", sn, np.sin(ang), 2e-6)
    ld = nh * D + 3   # a row stride wider than the heads
    x = randn(r, T, ld)
    got = run("rope_apply", [x, cs, sn], [ld, T, nh, D])
    ref = x.astype(np.float64)
    h = ref[:, :nh * D].reshape(T, nh, D).copy()
    c, s = cs.astype(np.float64)[:, None], sn.astype(np.float64)[:, None]
    a, b = h[..., :D // 2], h[..., D // 2:]
    ref[:, :nh * D] = np.concatenate([a * c - b * s, b * c + a * s], -1).reshape(T, nh * D)
    check(f"rope_apply T={T} nh={nh} D={D}", got, ref, 1e-6)


# ----------------------------------------------------------------------------- convolution helpers

@pytest.mark.parametrize("H,W,C", [(1, 1, 3), (3, 5, 17), (6, 4, 33)])
def test_dwconv3x3_residual(H, W, C):
    r = rng(H * W * C)
    x, wt, b = randn(r, H, W, C), randn(r, 9, C), randn(r, C)
    xp = np.pad(x.astype(np.float64), ((1, 1), (1, 1), (0, 0)))
    ref = x + b + sum(xp[ky:ky + H, kx:kx + W] * wt[ky * 3 + kx] for ky in range(3) for kx in range(3))
    check(f"dwconv3x3 {H}x{W}x{C}", run("dwconv3x3_residual", [np.empty_like(x), x, wt, b], [H, W, C]), ref, 1e-5)


def conv_ref(inp_chw, w, bias, k, st, pd):
    Ci, Hi, Wi = inp_chw.shape
    Ho, Wo = (Hi + 2 * pd - k) // st + 1, (Wi + 2 * pd - k) // st + 1
    xp = np.pad(inp_chw.astype(np.float64), ((0, 0), (pd, pd), (pd, pd)))
    cols = np.stack([xp[:, ky:ky + st * Ho:st, kx:kx + st * Wo:st] for ky in range(k) for kx in range(k)], 1)
    cols = cols.reshape(Ci * k * k, Ho * Wo).T      # [(oy, ox)][(ci, ky, kx)]
    return cols, (cols @ w.T.astype(np.float64) + (0 if bias is None else bias)), Ho, Wo


@pytest.mark.parametrize("chan_last", [0, 1])
@pytest.mark.parametrize("Ci,Hi,Wi,k,st,pd", [(3, 9, 7, 3, 2, 1), (5, 6, 11, 7, 4, 3), (2, 1, 1, 1, 1, 0)])
def test_im2col_and_conv2d(chan_last, Ci, Hi, Wi, k, st, pd):
    r = rng(Ci * Hi * Wi * k)
    x = randn(r, Ci, Hi, Wi)
    Co = 19
    w, bias = randn(r, Co, Ci * k * k, scale=0.3), randn(r, Co)
    cols, ref, Ho, Wo = conv_ref(x, w, bias, k, st, pd)
    inp = np.ascontiguousarray(x.transpose(1, 2, 0)) if chan_last else x
    r0, nr = Ho * Wo // 3, Ho * Wo - Ho * Wo // 3
    got = run("im2col", [np.empty((nr, Ci * k * k), f32), inp], [chan_last, Hi, Wi, Ci, k, st, pd, Wo, r0, nr])
    check(f"im2col Ci={Ci} {Hi}x{Wi} k={k} s={st} p={pd} chan_last={chan_last}", got, cols[r0:], 0)
    for chunk in (1, 5, Ho * Wo):
        got = run("conv2d", [np.empty((Ho * Wo, Co), f32), inp, w, bias],
                  [chan_last, Hi, Wi, Ci, k, st, pd, Ho, Wo, chunk, Co])
        check(f"conv2d Ci={Ci} {Hi}x{Wi} k={k} chunk={chunk}", got, ref, 1e-6 * math.sqrt(Ci * k * k) * 4)


@pytest.mark.parametrize("H,W,Ci,Co", [(1, 1, 3, 5), (4, 3, 17, 9), (6, 7, 8, 20)])
def test_conv3x3_padded(H, W, Ci, Co):
    r = rng(H * W * Ci)
    x = randn(r, H, W, Ci)
    P = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    w = randn(r, 9 * Co, Ci, scale=0.3)            # tap-major [9][Co][Ci]
    pitch = W + 2
    got = run("conv3x3_padded", [np.full((H * pitch - 2, Co), np.nan, f32), P, w], [H, pitch, Ci, Co])
    got = np.concatenate([got, np.zeros((2, Co), f32)]).reshape(H, pitch, Co)[:, :W]
    Pd, wd = P.astype(np.float64), w.astype(np.float64).reshape(3, 3, Co, Ci)
    ref = sum(Pd[ky:ky + H, kx:kx + W] @ wd[ky, kx].T for ky in range(3) for kx in range(3))
    check(f"conv3x3_padded {H}x{W} {Ci}->{Co}", got, ref, 1e-6 * math.sqrt(9 * Ci) * 4)


@pytest.mark.parametrize("Hs,Ws,Co,sub", [(1, 1, 3, 0), (3, 5, 7, 0), (2, 4, 5, 1), (4, 6, 17, 1)])
def test_convt2x2_scatter_and_zero_border(Hs, Ws, Co, sub):
    r = rng(Hs * Ws * Co + sub)
    T = randn(r, Hs * Ws, 4 * Co)
    P = run("convt2x2_scatter", [np.full((2 * Hs + 2, 2 * Ws + 2, Co), np.nan, f32), T], [Hs, Ws, Co, sub])
    ref = np.full_like(P, np.nan)
    for row in range(Hs * Ws):
        if sub:
            pix, a, b = row // 4, (row // 2) % 2, row % 2
            yy, xx = 2 * (pix // (Ws // 2)) + a, 2 * (pix % (Ws // 2)) + b
        else:
            yy, xx = divmod(row, Ws)
        for a in range(2):
            for b in range(2):
                ref[2 * yy + a + 1, 2 * xx + b + 1] = T[row, (2 * a + b) * Co:(2 * a + b + 1) * Co]
    check(f"convt2x2_scatter {Hs}x{Ws} Co={Co} sub={sub}", np.nan_to_num(P, nan=-1e9), np.nan_to_num(ref, nan=-1e9), 0)
    Z = run("zero_border", [P], [2 * Hs, 2 * Ws, Co])
    ref[0], ref[-1], ref[:, 0], ref[:, -1] = 0, 0, 0, 0
    check(f"zero_border {2 * Hs}x{2 * Ws}", Z, ref, 0)


@pytest.mark.parametrize("H,W,C", [(2, 2, 3), (5, 7, 17), (6, 4, 33)])
def test_maxpool2x2(H, W, C):
    x = randn(rng(H * W * C), H, W, C)
    got = run("maxpool2x2", [np.full((H // 2 + 2, W // 2 + 2, C), 7, f32), x], [H, W, C])
    ref = np.full_like(got, 7)
    ref[1:-1, 1:-1] = x[:H // 2 * 2, :W // 2 * 2].reshape(H // 2, 2, W // 2, 2, C).max((1, 3))
    check(f"maxpool2x2 {H}x{W}x{C}", got, ref, 0)


# ----------------------------------------------------------------------------- attention

def softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


BF16_ATTENTION = core.gemm_info()["kernel"] == "avx512bf16"   # the bf16 operand path runs (attention.c)


def bf16_round(x):
    """float32 -> the nearest bfloat16 (ties to even), as float64: what vcvtne2ps2bf16 makes of finite values."""
    b = np.ascontiguousarray(x, f32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(f32).astype(np.float64)


def attention_ref(q, k, v, scale, bf16, causal_from=None):
    """softmax(q kᵀ · scale) v in float64 for one head (query t sees keys < causal_from + t + 1 when given). With
    bf16 the operands are first rounded as the bf16 path rounds them: q·scale (in fp32), k and v."""
    if bf16:
        q, k, v = bf16_round(q.astype(f32) * f32(scale)), bf16_round(k), bf16_round(v)
        scale = 1.0
    s = q.astype(np.float64) @ k.astype(np.float64).T * scale
    if causal_from is not None:
        s = np.where(np.arange(k.shape[0])[None, :] <= causal_from + np.arange(q.shape[0])[:, None], s, -np.inf)
    return softmax(s) @ v.astype(np.float64)


def check_attention(label, got, ref, v, bf16):
    """fp32: 2e-6. bf16 (where the path runs): the operands are rounded in ref as the kernel rounds them; what ref
    cannot follow is the rounding of each probability to bf16 (relative 2^-9, before normalization), which moves an
    output by at most 2^-9 · max |v|; plus fp32 summation."""
    if bf16:
        check(label + " bf16", got, ref, 2.0 ** -9 * float(np.abs(v).max()) + 1e-5)
    else:
        check(label, got, ref, 2e-6)


@pytest.mark.parametrize("bf16", [0, 1])
@pytest.mark.parametrize("T,n_past,H,KV,D", [(1, 0, 2, 1, 16), (1, 70, 4, 2, 24), (5, 3, 3, 3, 8), (70, 9, 4, 2, 32),
                                             (67, 64, 2, 1, 80), (130, 0, 2, 2, 128)])
def test_attention(T, n_past, H, KV, D, bf16):
    r = rng(T * 100 + n_past)
    mc = n_past + T + 3
    q, kc, vc = randn(r, T, H * D + 5), randn(r, KV, mc, D), randn(r, KV, mc, D)
    scale = 1 / math.sqrt(D)
    got = run("attention", [np.empty((T, H * D + 2), f32), q, kc, vc],
              [H * D + 2, H * D + 5, mc, n_past, T, H, KV, D, bf16], [scale])[:, :H * D]
    ref = np.empty((T, H, D))
    G = H // KV
    on = bf16 and BF16_ATTENTION and T > 1 and D % 16 == 0   # decode (one query), other head sizes, CPUs (or caps)
                                                              # without AVX512-BF16: fp32
    for h in range(H):
        n = n_past + T
        ref[:, h] = attention_ref(q[:, h * D:(h + 1) * D], kc[h // G][:n], vc[h // G][:n], scale, on, n_past)
    check_attention(f"attention T={T} past={n_past} H={H} KV={KV} D={D}", got, ref.reshape(T, H * D),
                    vc[:, :n_past + T], on)


@pytest.mark.parametrize("bf16", [0, 1])
@pytest.mark.parametrize("segs,H,D", [([1], 1, 16), ([5, 1, 70], 2, 12), ([64, 65, 3], 3, 32), ([129, 7], 2, 80)])
def test_segment_attention(segs, H, D, bf16):
    r = rng(sum(segs) + D)
    N = sum(segs)
    cu = np.concatenate([[0], np.cumsum(segs)]).astype(np.int32)
    qkv = randn(r, N, 3, H, D)
    scale = 1 / math.sqrt(D)
    got = run("segment_attention", [np.empty((N, H * D), f32), qkv, cu], [N, len(segs), H, D, max(segs), bf16],
              [scale])
    ref = np.empty((N, H, D))
    on = bf16 and BF16_ATTENTION and D % 16 == 0
    for s in range(len(segs)):
        a, b = cu[s], cu[s + 1]
        for h in range(H):
            ref[a:b, h] = attention_ref(qkv[a:b, 0, h], qkv[a:b, 1, h], qkv[a:b, 2, h], scale, on)
    check_attention(f"segment_attention segs={segs} H={H} D={D}", got, ref.reshape(N, H * D), qkv[:, 2], on)


@pytest.mark.parametrize("rows,W,C,heads,win", [(1, 1, 16, 1, 2), (3, 7, 24, 2, 3), (5, 12, 48, 3, 5), (4, 9, 32, 2, 4)])
def test_window_attention(rows, W, C, heads, win):
    r = rng(rows * W * C)
    qkv, bias = randn(r, rows * W, 3 * C), randn(r, 3 * C)
    D, scale = C // heads, (C // heads) ** -0.5
    got = run("window_attention", [np.empty((rows * W, C), f32), qkv, bias], [rows, W, C, heads, win], [scale])
    # reference: the band padded to win rows and a multiple of win columns, padded tokens' q/k/v = the bias
    Wp = -(-W // win) * win
    full = np.tile(bias.astype(np.float64), (win, Wp, 1))
    full[:rows, :W] = qkv.reshape(rows, W, 3 * C)
    ref = np.empty((rows, W, heads, D))
    for x0 in range(0, Wp, win):
        blk = full[:, x0:x0 + win].reshape(win * win, 3 * C)
        for h in range(heads):
            q, k, v = (blk[:, i * C + h * D:i * C + (h + 1) * D] for i in range(3))
            o = (softmax(q @ k.T * scale) @ v).reshape(win, win, D)
            ref[:, x0:min(x0 + win, W), h] = o[:rows, :min(win, W - x0)]
    check(f"window_attention rows={rows} W={W} C={C} heads={heads} win={win}", got, ref.reshape(rows * W, C), 2e-6)


@pytest.mark.parametrize("nr,C,G", [(1, 8, 2), (7, 33, 3), (300, 48, 4), (600, 20, 1)])
def test_channel_attention(nr, C, G):
    r = rng(nr * C)
    d = C // G
    qk, v = randn(r, nr, 2 * C), randn(r, nr, C)
    scale = nr ** -0.5
    A0 = randn(r, G, d, d)   # the op accumulates into A
    A = run("channel_attention_scores", [A0, qk], [nr, C, G], [scale])
    q, k = qk[:, :C].astype(np.float64).reshape(nr, G, d), qk[:, C:].astype(np.float64).reshape(nr, G, d)
    refA = A0 + np.einsum("ngi,ngj->gij", q * np.float64(f32(scale)), k)
    check(f"channel_attention_scores nr={nr} C={C} G={G}", A, refA, 1e-6 * math.sqrt(nr) * 4)
    At = run("channel_attention_softmax", [np.empty_like(A), A], [G, d])
    P = softmax(A.astype(np.float64))
    check(f"channel_attention_softmax G={G} d={d}", At, P.transpose(0, 2, 1), 1e-6)
    got = run("channel_attention_apply", [np.empty((nr, C), f32), v, At], [nr, C, G])
    ref = np.einsum("gji,ngj->ngi", At.astype(np.float64), v.astype(np.float64).reshape(nr, G, d)).reshape(nr, C)
    check(f"channel_attention_apply nr={nr} C={C} G={G}", got, ref, 1e-6 * math.sqrt(d) * 2)


# ----------------------------------------------------------------------------- RoIAlign

def roi_axis_ref(length, a1, a2, scale, S):
    """torchvision roi_align (aligned=False) along one axis, in float32 steps like the reference."""
    w = np.zeros(length)
    st, en = f32(a1) * f32(scale), f32(a2) * f32(scale)
    ext = max(en - st, f32(1))
    bin_, gf = ext / f32(S), np.ceil(ext / f32(S))
    for p in range(S):
        for i in range(int(gf)):
            y = st + f32(p) * bin_ + f32(f32(i) + f32(.5)) * bin_ / gf
            if y < -1 or y > length:
                continue
            y = max(y, f32(0))
            lo = int(y)
            if lo >= length - 1:
                lo = hi = length - 1
                y = f32(lo)
            else:
                hi = lo + 1
            ly = y - f32(lo)
            w[lo] += 1 - ly
            w[hi] += ly
    return w, int(gf)


@pytest.mark.parametrize("length,a1,a2,scale,S", [(1, 0, 0, 1, 1), (13, 2.5, 40.2, 0.25, 7), (20, -30, 100, 1 / 14, 3),
                                                  (9, 33, 34, 0.25, 14)])
def test_roi_axis_weights(length, a1, a2, scale, S):
    w, grid = run("roi_axis_weights", [np.zeros(length), np.zeros(1, np.int32)], [length, S], [a1, a2, scale], outs=(0, 1))
    ref, rgrid = roi_axis_ref(length, a1, a2, scale, S)
    assert int(grid[0]) == rgrid
    check(f"roi_axis_weights len={length} [{a1}, {a2}]*{scale:.3g} S={S}", w, ref, 1e-6)


@pytest.mark.parametrize("n_in,n_out", [(1, 1), (3, 7), (7, 13), (5, 5)])
def test_upsample_weights_t(n_in, n_out):
    w_in = rng(n_in * n_out).random(n_out)
    U = np.zeros((n_out, n_in))   # PyTorch bilinear, align_corners=False
    for d in range(n_out):
        src = max(f32(n_in) / f32(n_out) * (f32(d) + f32(.5)) - f32(.5), 0)
        i0 = int(src)
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        lam = min(max(src - i0, 0), 1)
        U[d, i0] += 1 - lam
        U[d, i1] += lam
    got = run("upsample_weights_t", [np.zeros(n_in), w_in], [n_in, n_out])
    check(f"upsample_weights_t {n_in}<-{n_out}", got, U.T @ w_in, 1e-6)


@pytest.mark.parametrize("N,H,W,C", [(1, 1, 1, 3), (4, 6, 9, 17), (3, 5, 4, 300)])
def test_roi_pool(N, H, W, C):
    r = rng(N * H * W * C)
    fmap = randn(r, H, W, C)
    wts = r.random((N, H + W)).astype(f32)
    span = np.zeros((N, 4), np.int32)
    for b in range(N):
        y0, x0 = r.integers(0, H), r.integers(0, W)
        span[b] = [y0, r.integers(y0, H), x0, r.integers(x0, W)]
    if N > 1:
        span[1] = [1, 0, 0, 0]   # an empty box
    ld, off = C + 6, 4
    got = run("roi_pool", [np.full((N, ld), 5, f32), fmap, wts, span], [N, H, W, C, ld, off])
    ref = np.full((N, ld), 5.0)
    for b in range(N):
        y0, y1, x0, x1 = span[b]
        wy, wx = np.zeros(H), np.zeros(W)
        wy[y0:y1 + 1], wx[x0:x1 + 1] = wts[b, y0:y1 + 1], wts[b, H + x0:H + x1 + 1]
        ref[b, off:off + C] = np.einsum("y,x,yxc->c", wy, wx, fmap.astype(np.float64))
    check(f"roi_pool N={N} {H}x{W}x{C}", got, ref, 1e-6 * math.sqrt(H * W) * 2)


# ----------------------------------------------------------------------------- ReLU and Swin (UPN's backbone)

@pytest.mark.parametrize("n", [1, 17, 1000])
def test_relu(n):
    x = randn(rng(40), n)
    x[0] = np.nan
    got = run("relu", [x], [n])
    ref = np.where(x < 0, 0, x)
    assert np.isnan(got[0])
    check("relu", got[1:], ref[1:], 0.0, 0.0)


def _rel_index(ws):
    y, x = np.divmod(np.arange(ws * ws), ws)
    return (y[:, None] - y[None, :] + ws - 1) * (2 * ws - 1) + (x[:, None] - x[None, :] + ws - 1)


@pytest.mark.parametrize("ws,heads", [(1, 1), (3, 2), (12, 3)])
def test_swin_rel_bias(ws, heads):
    table = randn(rng(41), (2 * ws - 1) ** 2, heads)
    got = run("swin_rel_bias", [np.zeros(heads * ws ** 4, f32), table], [ws, heads]).reshape(heads, ws * ws, ws * ws)
    check(f"swin_rel_bias ws={ws}", got, table[_rel_index(ws)].transpose(2, 0, 1), 0.0, 0.0)


@pytest.mark.parametrize("nwin,N,C,heads,masked", [(1, 1, 4, 1, 0), (3, 9, 12, 3, 1), (2, 144, 96, 3, 1),
                                                   (2, 25, 40, 5, 0)])
def test_swin_attention(nwin, N, C, heads, masked):
    r = rng(42)
    D = C // heads
    qkv = randn(r, nwin, N, 3 * C)
    bias = randn(r, heads, N, N, scale=0.5)
    lab = r.integers(0, 3, (nwin, N)).astype(np.int32)
    scale = D ** -0.5
    got = run("swin_attention", [np.zeros(nwin * N * C, f32), qkv, bias, lab], [nwin, N, C, heads, masked],
              [scale, -100.0]).reshape(nwin, N, C)
    q = qkv[..., :C].reshape(nwin, N, heads, D).astype(np.float64) * scale
    k = qkv[..., C:2 * C].reshape(nwin, N, heads, D).astype(np.float64)
    v = qkv[..., 2 * C:].reshape(nwin, N, heads, D).astype(np.float64)
    a = np.einsum("wihd,wjhd->whij", q, k) + bias[None]
    if masked:
        a = a + np.where(lab[:, None, :, None] != lab[:, None, None, :], -100.0, 0.0)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ref = np.einsum("whij,wjhd->wihd", a, v).reshape(nwin, N, C)
    check(f"swin_attention N={N} masked={masked}", got, ref, 1e-6 * math.sqrt(N * D))


def _rolled_padded(x, ws, shift):
    H, W, C = x.shape
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    p = np.zeros((Hp, Wp, C), x.dtype)
    p[:H, :W] = x
    return np.roll(p, (-shift, -shift), (0, 1)), Hp, Wp


@pytest.mark.parametrize("H,W,C,ws,shift", [(5, 7, 3, 4, 2), (12, 12, 8, 12, 6), (1, 1, 2, 3, 1), (13, 25, 5, 12, 0)])
def test_window_gather_and_scatter(H, W, C, ws, shift):
    r = rng(43)
    x = randn(r, H, W, C)
    w, b = randn(r, C, scale=0.5) + 1, randn(r, C, scale=0.1)
    mu, var = x.mean(-1, keepdims=True, dtype=np.float64), x.astype(np.float64).var(-1, keepdims=True)
    ln = ((x - mu) / np.sqrt(var + 1e-5) * w + b)
    for use_ln, src in ((1, ln), (0, x.astype(np.float64))):
        rolled, Hp, Wp = _rolled_padded(src, ws, shift)
        # the real tokens: zero after the padding (before the roll), as the reference pads after the LayerNorm
        real = np.roll(np.pad(np.ones((H, W)), ((0, Hp - H), (0, Wp - W))), (-shift, -shift), (0, 1)) > 0
        for wy in range(Hp // ws):
            got = run("window_gather", [np.zeros(ws * Wp * C, f32), x, w, b], [H, W, C, ws, shift, wy, use_ln],
                      [1e-5]).reshape(Wp // ws, ws, ws, C)
            band = rolled[wy * ws:(wy + 1) * ws] * real[wy * ws:(wy + 1) * ws, :, None]
            ref = band.reshape(ws, Wp // ws, ws, C).transpose(1, 0, 2, 3)
            check(f"window_gather {H}x{W} ws={ws} shift={shift} ln={use_ln}", got, ref, 2e-6 if use_ln else 0.0,
                  1e-5 if use_ln else 0.0)
    # scatter-add is the inverse on the real tokens: adding every band's windows of y adds y's real tokens once
    y = randn(r, Hp, Wp, C)     # values in rolled padded coordinates
    acc = x.copy()
    for wy in range(Hp // ws):
        yb = y[wy * ws:(wy + 1) * ws].reshape(ws, Wp // ws, ws, C).transpose(1, 0, 2, 3).copy()
        acc = run("window_scatter_add", [acc, yb], [H, W, C, ws, shift, wy])
    back = np.roll(y, (shift, shift), (0, 1))[:H, :W]
    check(f"window_scatter_add {H}x{W} ws={ws} shift={shift}", acc, x + back, 1e-6)


@pytest.mark.parametrize("H,W,C,r0,nr", [(4, 6, 3, 0, 6), (5, 7, 2, 3, 9), (1, 1, 4, 0, 1), (9, 3, 5, 0, 10)])
def test_patch_merge_gather(H, W, C, r0, nr):
    x = randn(rng(44), H, W, C)
    got = run("patch_merge_gather", [np.zeros(nr * 4 * C, f32), x], [H, W, C, r0, nr]).reshape(nr, 4 * C)
    p = np.pad(x, ((0, H % 2), (0, W % 2), (0, 0)))
    ref = np.concatenate([p[0::2, 0::2], p[1::2, 0::2], p[0::2, 1::2], p[1::2, 1::2]], -1).reshape(-1, 4 * C)
    check(f"patch_merge_gather {H}x{W}", got, ref[r0:r0 + nr], 0.0, 0.0)


# ----------------------------------------------------------------------------- coverage and dispatch levels

def test_every_op_is_tested():
    src = open(__file__).read()
    missing = [n for n in core.ops() if f'"{n}"' not in src]
    assert not missing, f"ops without a test: {missing}"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown op"):
        core.op("nope", [])
    with pytest.raises(ValueError, match="needs"):
        core.op("gelu_erf", [np.zeros(3, f32)], [4])
    with pytest.raises(TypeError, match="float32"):
        core.op("gelu_erf", [np.zeros(3)], [3])
    with pytest.raises(ValueError, match="takes"):
        core.op("rmsnorm", [np.zeros(3, f32)], [1, 3], [1e-6])
    with pytest.raises(ValueError, match="bad segment"):
        core.op("segment_attention", [np.zeros(16, f32), np.zeros(48, f32), np.array([0, 2], np.int32)],
                [1, 1, 1, 16, 2, 0], [1.0])


@pytest.mark.skipif(bool(os.environ.get("VLM_GEMM_ISA")), reason="already under an ISA cap")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_ops_under_isa_cap(isa):
    env = dict(os.environ, VLM_GEMM_ISA=isa)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", __file__], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [ln[ln.index("[ops]"):] for ln in p.stdout.splitlines() if "[ops]" in ln]
    errs = [ln for ln in lines if "max abs err" in ln]
    print(f"[ops] under VLM_GEMM_ISA={isa}: {len(errs)} checks; largest errors:")
    for ln in sorted(errs, key=lambda s: -float(s.split("max abs err ")[1].split()[0]))[:5]:
        print("   ", ln)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert f"[ops] kernel {isa}" in lines, lines[:3]


def test_kernel_level():
    """The dispatch level the ops run at (the cap's, in the subprocesses above)."""
    kernel = core.gemm_info()["kernel"]
    print(f"[ops] kernel {kernel}")
    if os.environ.get("VLM_GEMM_ISA"):
        assert kernel == os.environ["VLM_GEMM_ISA"]
