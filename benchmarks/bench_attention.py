"""Attention benchmark of the vlmfo1 core (csrc/attention.c) at the request's shapes: fp32 operands against the bf16
operands compute="bf16" uses on AVX512-BF16 CPUs (q·scale, k, v and the exponentials rounded to bf16, products by
vdpbf16ps, fp32 softmax).

Shapes: one full-attention layer of the Qwen2.5-VL ViT on a 1000x750 image (3888 patches, 16 heads of 80), its
windowed layers (64-patch windows), and the Qwen2.5-3B prefill of a 1300-token prompt (16 query heads of 128 over 2
KV heads, causal). Prints GFLOP/s on the products each op counts (4·D per query-key pair) with the fp32 path's as % of
the fp32 FMA peak and the bf16 path's as % of the vdpbf16ps peak, both probed in the same run, and the ratio. Median
of --reps calls on the same inputs, --threads threads.

    python benchmarks/bench_attention.py [--threads 2] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # in-tree vlmfo1 as fallback
from vlmfo1 import _core  # noqa: E402


def median_time(fn, reps: int) -> float:
    fn()   # warm-up: scratch pages, caches
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    nt, f32 = a.threads, np.float32
    peaks = {f: _core.peak(f, nt) for f in ("fma32", "bf16dp")}
    info = _core.gemm_info()
    print(f"kernel family: {info['kernel']}; peaks on {nt} threads: fp32 FMA {peaks['fma32']:.0f} GFLOP/s, "
          f"vdpbf16ps {peaks['bf16dp']:.0f} GFLOP/s"
          + ("" if info["kernel"] == "avx512bf16" else " (no AVX512-BF16 here: bf16=1 runs the fp32 path)"))
    rng = np.random.default_rng(0)
    rows = []

    def seg(label, N, H, D, win):
        qkv = rng.standard_normal((N, 3, H, D)).astype(f32)
        cu = np.arange(0, N + 1, win, dtype=np.int32) if win else np.array([0, N], np.int32)
        cu[-1] = N
        out = np.empty((N, H * D), f32)
        pairs = float(np.sum(np.diff(cu).astype(np.float64) ** 2))
        ms = int(np.diff(cu).max())
        for bf in (0, 1):
            t = median_time(lambda: _core.op("segment_attention", [out, qkv, cu], [N, len(cu) - 1, H, D, ms, bf],
                                             [D ** -0.5], n_threads=nt), a.reps)
            rows.append((label, bf, 4 * H * D * pairs / t / 1e9, t))

    def causal(label, T, H, KV, D):
        q = rng.standard_normal((T, H * D)).astype(f32)
        kc = rng.standard_normal((KV, T, D)).astype(f32)
        vc = rng.standard_normal((KV, T, D)).astype(f32)
        out = np.empty((T, H * D), f32)
        pairs = T * (T + 1) / 2
        for bf in (0, 1):
            t = median_time(lambda: _core.op("attention", [out, q, kc, vc], [H * D, H * D, T, 0, T, H, KV, D, bf],
                                             [D ** -0.5], n_threads=nt), a.reps)
            rows.append((label, bf, 4 * H * D * pairs / t / 1e9, t))

    seg("ViT full layer (3888 x 16 x 80)", 3888, 16, 80, 0)
    seg("ViT window layer (64-patch windows)", 3888, 16, 80, 64)
    causal("prefill, 1300 tokens (16/2 heads x 128)", 1300, 16, 2, 128)
    print(f"\n| shape | fp32 GFLOP/s | % fp32 FMA | bf16 GFLOP/s | % vdpbf16ps | bf16 / fp32 |")
    print("|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        (label, _, g32, t32), (_, _, g16, t16) = rows[i], rows[i + 1]
        pb = f"{100 * g16 / peaks['bf16dp']:.0f}%" if peaks["bf16dp"] > 0 else "-"
        print(f"| {label} | {g32:.0f} | {100 * g32 / peaks['fma32']:.0f}% | {g16:.0f} | {pb} | {t32 / t16:.2f}x |")


if __name__ == "__main__":
    main()
