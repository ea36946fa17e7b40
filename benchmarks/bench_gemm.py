"""Matrix-multiply benchmark of the vlmfo1 core (csrc/gemm.c) at Qwen2.5-3B shapes, side by side with
torch.nn.functional.linear.

Prints: the measured fp32 FMA peak (1 and 2 threads); OpenBLAS sgemm GFLOP/s on the prefill shapes as
% of the 2-thread peak; the own bf16-weight kernels (compute bf16 = vdpbf16ps, compute f32 = widened
weights + FMA) on the same shapes; decode (m=1) GB/s of weight bytes streamed from DRAM (the weights
rotate over > 1 GB of copies so no call finds them in cache); and torch fp32 / bf16 on the same
shapes with the ratio torch time / our time (> 1: we are faster). Medians of several repetitions.

    python benchmarks/bench_gemm.py [--threads 2] [--reps 5] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # in-tree vlmfo1 as fallback
from vlmfo1 import _core  # noqa: E402

PREFILL = [(1024, 2048, 2048), (1024, 2048, 11008), (1024, 11008, 2048), (1024, 2048, 256)]  # m, k, n
DECODE = [(1, 2048, 11008), (1, 11008, 2048), (1, 2048, 151936)]
ROTATE_BYTES = 1.2e9


def median_time(fn, reps, warmup=1):
    for _ in range(warmup):
        fn(0)
    ts = []
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r + 1)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def to_bf16(a):
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def fmt_row(cols, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cols, widths))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and reps (smoke run)")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    nt, reps = args.threads, (2 if args.quick else args.reps)
    prefill = PREFILL[:1] + PREFILL[3:] if args.quick else PREFILL
    decode = DECODE[:1] if args.quick else DECODE

    torch = None
    if not args.no_torch:
        try:
            import torch  # benchmark-only dependency
            import torch.nn.functional as F
            torch.set_num_threads(nt)
        except ImportError:
            torch = None

    info = _core.gemm_info()
    print(f"kernel: {info['kernel']}")
    print(f"blas:   {info['blas']}")
    p1 = _core.fma_peak(1)
    pn = _core.fma_peak(nt)
    print(f"fp32 FMA peak: {p1:.1f} GFLOP/s (1 thread), {pn:.1f} GFLOP/s ({nt} threads)")
    if torch is not None:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()

    rng = np.random.default_rng(0)
    print(f"== prefill GEMM, {nt} threads, GFLOP/s (median of {reps}); % = of the {nt}-thread fp32 FMA peak")
    hdr = ["m x k x n", "sgemm", "%peak", "bf16/bf16", "%peak", "bf16/f32", "%peak"]
    if torch is not None:
        hdr += ["torch f32", "ratio", "torch bf16", "ratio"]
    widths = [18] + [10] * (len(hdr) - 1)
    print(fmt_row(hdr, widths))
    for m, k, n in prefill:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = (rng.standard_normal((n, k), dtype=np.float32) * 0.05).astype(np.float32)
        wh = to_bf16(w)
        out = np.empty((m, n), np.float32)
        flop = 2.0 * m * n * k
        t_f32 = median_time(lambda r: _core.matmul(x, w, n_threads=nt, out=out), reps)
        t_bb = median_time(lambda r: _core.matmul(x, wh, compute="bf16", n_threads=nt, out=out), reps)
        t_bf = median_time(lambda r: _core.matmul(x, wh, compute="f32", n_threads=nt, out=out), reps)
        g = [flop / t / 1e9 for t in (t_f32, t_bb, t_bf)]
        row = [f"{m}x{k}x{n}", f"{g[0]:.1f}", f"{100 * g[0] / pn:.0f}%", f"{g[1]:.1f}", f"{100 * g[1] / pn:.0f}%",
               f"{g[2]:.1f}", f"{100 * g[2] / pn:.0f}%"]
        if torch is not None:
            tx, tw = torch.from_numpy(x), torch.from_numpy(w)
            txb, twb = tx.to(torch.bfloat16), torch.from_numpy(wh.view(np.int16)).view(torch.bfloat16)
            with torch.inference_mode():
                tt32 = median_time(lambda r: F.linear(tx, tw), reps)
                tt16 = median_time(lambda r: F.linear(txb, twb), reps)
            row += [f"{flop / tt32 / 1e9:.1f}", f"{tt32 / t_f32:.2f}x", f"{flop / tt16 / 1e9:.1f}",
                    f"{tt16 / t_bb:.2f}x"]
        print(fmt_row(row, widths), flush=True)
    print("  ratio = torch time / vlmfo1 time (fp32: vs sgemm; bf16: vs our bf16/bf16 kernel)")
    print()

    dreps = 3 if args.quick else max(reps, 9)
    print(f"== decode GEMV (m=1), {nt} threads, GB/s of weight bytes from DRAM (median of {dreps}, "
          f"rotating over >= {ROTATE_BYTES / 1e9:.1f} GB of weight copies)")
    hdr = ["m x k x n", "f32", "bf16/bf16", "bf16/f32"]
    if torch is not None:
        hdr += ["torch f32", "ratio", "torch bf16", "ratio"]
    widths = [18] + [10] * (len(hdr) - 1)
    print(fmt_row(hdr, widths))
    for m, k, n in decode:
        x = rng.standard_normal((m, k), dtype=np.float32)
        out = np.empty((m, n), np.float32)
        res = {}
        for dt, isz in (("f32", 4), ("bf16", 2)):
            per = n * k * isz
            ncop = max(2, int(np.ceil(ROTATE_BYTES / per)))
            if dt == "f32":
                buf = np.empty((ncop, n, k), np.float32)
                buf[:] = rng.standard_normal((n, k), dtype=np.float32) * 0.05
            else:
                buf = np.empty((ncop, n, k), np.uint16)
                buf[:] = to_bf16(rng.standard_normal((n, k), dtype=np.float32) * 0.05)
            modes = ("f32",) if dt == "f32" else ("bf16", "f32")
            for cm in modes:
                t = median_time(lambda r: _core.matmul(x, buf[r % ncop], compute=cm, n_threads=nt, out=out), dreps,
                                warmup=ncop)
                res[(dt, cm)] = per / t / 1e9
            if torch is not None:
                tx = torch.from_numpy(x)
                if dt == "f32":
                    tb = torch.from_numpy(buf)
                else:
                    tb = torch.from_numpy(buf.view(np.int16)).view(torch.bfloat16)
                    tx = tx.to(torch.bfloat16)
                with torch.inference_mode():
                    t = median_time(lambda r: F.linear(tx, tb[r % ncop]), dreps, warmup=ncop)
                res[("torch", dt)] = per / t / 1e9
            del buf
        row = [f"{m}x{k}x{n}", f"{res[('f32', 'f32')]:.1f}", f"{res[('bf16', 'bf16')]:.1f}",
               f"{res[('bf16', 'f32')]:.1f}"]
        if torch is not None:
            row += [f"{res[('torch', 'f32')]:.1f}", f"{res[('f32', 'f32')] / res[('torch', 'f32')]:.2f}x",
                    f"{res[('torch', 'bf16')]:.1f}", f"{res[('bf16', 'bf16')] / res[('torch', 'bf16')]:.2f}x"]
        print(fmt_row(row, widths), flush=True)
    print("  ratio = our GB/s / torch GB/s (same weight bytes; > 1: we are faster)")
    print("  note: _core.matmul starts its thread pool on every call; the engine keeps one per request")


if __name__ == "__main__":
    main()
