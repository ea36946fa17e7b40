#!/usr/bin/env python
"""Weight-reconstruction error of 4-bit formats: why vlmfo1's int4 layout (csrc/gemm.h) is what it is.

    python benchmarks/quant_formats.py [--n 256] [--k 2048] [--seed 0]

For random matrices of a few kinds (Gaussian; Student-t with 3 degrees of freedom; Gaussian with 1% of the input
columns 8x larger; Gaussian with log-normal column scales), prints the relative RMS error ||W - deq(q(W))|| / ||W||
of:
  int8      per-output-channel int8 (vlmfo1 dtype="int8", _core.quantize_i8)
  int4      vlmfo1's int4 (_core.quantize_i4): per row one float scale d, per block of 32 a 4-bit scale m,
            weights (code - 8) * m * d; 4.125 bits per weight
  Q4_0      llama.cpp's Q4_0 format as its documentation describes it (blocks of 32, an fp16 scale = the signed
            value of largest magnitude / -8, codes clamp(round(w / scale) + 8, 0, 15)); 4.5 bits per weight;
            a NumPy model of the format, not llama.cpp's code
  int4/64, int4/128  vlmfo1's scheme with one 4-bit block scale per 64 or 128 weights (NumPy models of the same
            rule as the C quantizer: m among ceil(amax / 7d) and the two below, least squared error)
What it shows: with 4-bit block scales on blocks of 32 the error stays within a few percent of Q4_0's fp16 block
scales, while coarser block scales lose more on heavy-tailed and outlier-column matrices. It does not measure the
effect on a trained model (no trained weights are reachable here; benchmarks/bench_quant.py measures the pipeline).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # in-tree vlmfo1 as fallback
from vlmfo1._native import core  # noqa: E402


def rel_err(w, r):
    return float(np.sqrt(((r.astype(np.float64) - w) ** 2).mean() / (w.astype(np.float64) ** 2).mean()))


def deq_int8(w):
    q, s, _ = core.quantize_i8(w)
    return q.astype(np.float32) * s[:, None]


def deq_int4(w):
    codes, sub, d, _ = core.quantize_i4(w)
    n, k = w.shape
    c = codes.reshape(n, k // 32, 16)
    q = np.concatenate([(c & 15).astype(np.int32) - 8, (c >> 4).astype(np.int32) - 8], axis=2)
    s = sub.astype(np.int32)
    m = np.stack([s & 15, s >> 4], axis=2).reshape(n, -1)[:, :k // 32]
    return (q * m[:, :, None]).reshape(n, k).astype(np.float32) * d[:, None]


def deq_q4_0(w):
    n, k = w.shape
    b = w.reshape(n, k // 32, 32)
    idx = np.abs(b).argmax(axis=2)
    mx = np.take_along_axis(b, idx[..., None], axis=2)
    d = (mx / -8).astype(np.float16).astype(np.float32)
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0)
    q = np.clip(np.round(b * inv) + 8, 0, 15) - 8
    return (q * d).reshape(n, k)


def deq_int4_blocks(w, bs):
    n, k = w.shape
    b = w.reshape(n, k // bs, bs).astype(np.float32)
    a = np.abs(b).max(axis=2)
    d = (np.abs(w).max(axis=1) / np.float32(105)).astype(np.float32)[:, None]
    d = np.where(d > 0, d, 1)
    m0 = np.clip(np.ceil(a / (7 * d)), 1, 15)
    best, out = None, None
    for dm in (0, -1, -2):
        m = np.clip(m0 + dm, 1, 15)
        s = (d * m).astype(np.float32)[..., None]
        r = np.clip(np.rint(b / s), -8, 7) * s
        e = ((r - b) ** 2).sum(axis=2)
        if best is None:
            best, out = e, r
        else:
            better = e < best
            best, out = np.where(better, e, best), np.where(better[..., None], r, out)
    return out.reshape(n, k)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.k % 128:
        p.error("--k must be a multiple of 128")
    rng = np.random.default_rng(a.seed)
    n, k = a.n, a.k
    kinds = {
        "gaussian": rng.standard_normal((n, k)),
        "student-t (3 dof)": rng.standard_t(3, (n, k)),
        "gaussian, 1% columns x8": rng.standard_normal((n, k)) * np.where(rng.random(k) < 0.01, 8, 1)[None],
        "gaussian, log-normal columns": rng.standard_normal((n, k)) * np.exp(0.7 * rng.standard_normal((1, k))),
    }
    fmts = [("int8", deq_int8), ("int4", deq_int4), ("Q4_0", deq_q4_0),
            ("int4/64", lambda w: deq_int4_blocks(w, 64)), ("int4/128", lambda w: deq_int4_blocks(w, 128))]
    print(f"relative RMS reconstruction error, {n} x {k} matrices, seed {a.seed}")
    print("| matrix | " + " | ".join(f for f, _ in fmts) + " | int4 / Q4_0 |")
    print("|---|" + "---|" * (len(fmts) + 1))
    for name, w in kinds.items():
        w = w.astype(np.float32)
        errs = {f: rel_err(w, fn(w)) for f, fn in fmts}
        print(f"| {name} | " + " | ".join(f"{errs[f]:.4f}" for f, _ in fmts) + f" | {errs['int4'] / errs['Q4_0']:.3f} |")


if __name__ == "__main__":
    main()
