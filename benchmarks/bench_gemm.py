"""Matrix-multiply benchmark of the vlmfo1 core (csrc/gemm.c) at Qwen2.5-3B shapes, side by side with
torch.nn.functional.linear.

Prints: the measured peak of every instruction family (_core.peak: fp32 FMA, AVX512-BF16 vdpbf16ps,
AVX512-VNNI vpdpbusd, DRAM read bandwidth; 1 and --threads threads); OpenBLAS sgemm GFLOP/s on the
prefill shapes; the own bf16-weight kernels (compute bf16 = vdpbf16ps, compute f32 = widened weights +
FMA) on the same shapes, each as % of the --threads peak of the family that path runs on (sgemm and
compute f32: fma32; compute bf16: bf16dp with AVX512-BF16, else fma32); int8 weights (W8A8, csrc/gemm_i8.c,
quantized here from the same fp32 weights, packed where a load packs them: vlmfo1.quant) and int4 weights (4-bit blocks of 32, W4A8, same file) as % of the
vnni peak; decode (m=1) GB/s of weight
bytes streamed from DRAM (the weights rotate over > 1 GB of copies so no call finds them in cache), as
% of the measured read bandwidth; and torch fp32 / bf16 on the same shapes with the ratio torch time /
our time (> 1: we are faster). Medians of several repetitions. torch runs in a process of its own (its OpenMP
workers spin on after each call and would take a core from ours), on the same inputs (made from the same seeds).
The fused rows time the decoder's q/k/v (n = 2048 + 256 + 256) and gate/up (n = 2 x 11008) as one
_core.matmul_multi call against torch's bf16 F.linear on the concatenated weight (the same work as one GEMM).

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
from vlmfo1.quant import packs  # noqa: E402

PACK_I8 = packs()   # int8 weights in the VNNI kernel's panels where it runs, as loads store them

PREFILL = [(1024, 2048, 2048), (1024, 2048, 11008), (1024, 11008, 2048), (1024, 2048, 256)]  # m, k, n
DECODE = [(1, 2048, 11008), (1, 11008, 2048), (1, 2048, 151936)]
ROTATE_BYTES = 1.2e9
PEAKS = [("fma32", "GFLOP/s", "fp32 FMA"), ("bf16dp", "GFLOP/s", "AVX512-BF16 vdpbf16ps"),
         ("vnni", "GOP/s", "AVX512-VNNI vpdpbusd"), ("bandwidth", "GB/s", "streaming read of 1 GiB")]


FUSED = [("q/k/v", 1024, 2048, (2048, 256, 256)), ("gate/up", 1024, 2048, (11008, 11008))]


def inputs(m, k, n):
    """x [m][k] and w [n][k] (fp32) of one shape, the same in every process."""
    rng = np.random.default_rng([m, k, n])
    return rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32) * 0.05


def torch_worker(nt, reps, prefill, decode, dreps):
    """Times torch's F.linear on the prefill and fused shapes (fp32 and bf16) and the decode shapes (GB/s, the
    weight rotating over copies as for ours); prints one JSON line."""
    import json

    import torch
    import torch.nn.functional as F
    torch.set_num_threads(nt)
    res = {"version": torch.__version__, "threads": torch.get_num_threads(), "prefill": {}, "fused": {}, "decode": {}}
    with torch.inference_mode():
        for m, k, n in prefill:
            x, w = inputs(m, k, n)
            tx, tw = torch.from_numpy(x), torch.from_numpy(w)
            txb, twb = tx.to(torch.bfloat16), torch.from_numpy(to_bf16(w).view(np.int16)).view(torch.bfloat16)
            res["prefill"][f"{m}x{k}x{n}"] = [median_time(lambda r: F.linear(tx, tw), reps),
                                              median_time(lambda r: F.linear(txb, twb), reps)]
        for name, m, k, ns in FUSED:
            x, w = inputs(m, k, sum(ns))
            txb, twb = (torch.from_numpy(x).to(torch.bfloat16),
                        torch.from_numpy(to_bf16(w).view(np.int16)).view(torch.bfloat16))
            res["fused"][name] = median_time(lambda r: F.linear(txb, twb), reps)
        for m, k, n in decode:
            x, w = inputs(m, k, n)
            for dt in ("f32", "bf16"):
                per = n * k * (4 if dt == "f32" else 2)
                ncop = max(2, int(np.ceil(ROTATE_BYTES / per)))
                if dt == "f32":
                    buf = np.empty((ncop, n, k), np.float32)
                    buf[:] = w
                    tb, tx = torch.from_numpy(buf), torch.from_numpy(x)
                else:
                    buf = np.empty((ncop, n, k), np.uint16)
                    buf[:] = to_bf16(w)
                    tb, tx = torch.from_numpy(buf.view(np.int16)).view(torch.bfloat16), torch.from_numpy(x).to(torch.bfloat16)
                t = median_time(lambda r: F.linear(tx, tb[r % ncop]), dreps, warmup=ncop)
                res["decode"][f"{m}x{k}x{n}/{dt}"] = per / t / 1e9
                del buf, tb
    print(json.dumps(res))


def run_torch(nt, reps, quick):
    """torch's numbers from a process of its own (None when torch is missing)."""
    import json
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--threads", str(nt), "--reps", str(reps)]
    if quick:
        cmd.append("--quick")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"(torch worker failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


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


def pct(rate, peak):
    return f"{100 * rate / peak:.0f}%" if peak > 0 else "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and reps (smoke run)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    nt, reps = args.threads, (2 if args.quick else args.reps)
    prefill = PREFILL[:1] + PREFILL[3:] if args.quick else PREFILL
    decode = DECODE[:1] if args.quick else DECODE
    dreps = 3 if args.quick else max(reps, 9)
    if args.torch_worker:
        torch_worker(nt, reps, prefill, decode, dreps)
        return

    tr = None if args.no_torch else run_torch(nt, reps, args.quick)
    torch = tr   # truthy when torch's numbers exist

    info = _core.gemm_info()
    print(f"kernel: {info['kernel']}")
    print(f"blas:   {info['blas']}")
    peak = {}
    print(f"peaks (1 thread / {nt} threads):")
    for fam, unit, what in PEAKS:
        p1, pn = _core.peak(fam, 1), _core.peak(fam, nt)
        peak[fam] = pn
        if p1 > 0:
            print(f"  {fam:<10}{p1:8.1f} / {pn:.1f} {unit}  ({what})")
        else:
            print(f"  {fam:<10}  not available on this CPU  ({what})")
    # the family each prefill path runs on (csrc/gemm.c): compute bf16 uses vdpbf16ps only with AVX512-BF16
    fam_bb = "bf16dp" if info["kernel"] == "avx512bf16" else "fma32"
    pf, pbb = peak["fma32"], peak[fam_bb]
    pi8 = peak["vnni"] if info.get("int8_kernel") == "avx512vnni" else 0.0   # int8 W8A8 (csrc/gemm_i8.c)
    print(f"int8 kernel: {info.get('int8_kernel')} (its % is of the vnni peak; none is probed for the others)")
    if torch is not None:
        print(f"torch {tr['version']}, {tr['threads']} threads (in its own process)")
    print()

    ws = _core.Workspace()   # one pool and scratch kept across calls, as the engine keeps them per request
    print(f"== prefill GEMM, {nt} threads, GFLOP/s (median of {reps}); % = of the {nt}-thread peak of the path's "
          f"family (sgemm, bf16/f32: fma32; bf16/bf16: {fam_bb})")
    hdr = ["m x k x n", "sgemm", "%peak", "bf16/bf16", "%peak", "bf16/f32", "%peak", "int8", "%peak", "int4", "%peak"]
    if torch is not None:
        hdr += ["torch f32", "ratio", "torch bf16", "ratio"]
    widths = [18] + [10] * (len(hdr) - 1)
    print(fmt_row(hdr, widths))
    for m, k, n in prefill:
        x, w = inputs(m, k, n)
        wh = to_bf16(w)
        out = np.empty((m, n), np.float32)
        flop = 2.0 * m * n * k
        t_f32 = median_time(lambda r: _core.matmul(x, w, n_threads=nt, out=out, workspace=ws), reps)
        t_bb = median_time(lambda r: _core.matmul(x, wh, compute="bf16", n_threads=nt, out=out, workspace=ws), reps)
        t_bf = median_time(lambda r: _core.matmul(x, wh, compute="f32", n_threads=nt, out=out, workspace=ws), reps)
        q, qs, qw = _core.quantize_i8(w, n_threads=nt)
        q = _core.pack_i8(q, n_threads=nt) if PACK_I8 else q   # the form a load gives (vlmfo1.quant)
        t_i8 = median_time(lambda r: _core.matmul(x, q, scale=qs, wsum=qw, n_threads=nt, out=out, workspace=ws), reps)
        c4, s4, q4s, q4w = _core.quantize_i4(w, n_threads=nt)
        t_i4 = median_time(lambda r: _core.matmul(x, c4, scale=q4s, wsum=q4w, sub=s4, n_threads=nt, out=out, workspace=ws), reps)
        g = [flop / t / 1e9 for t in (t_f32, t_bb, t_bf, t_i8, t_i4)]
        row = [f"{m}x{k}x{n}", f"{g[0]:.1f}", pct(g[0], pf), f"{g[1]:.1f}", pct(g[1], pbb), f"{g[2]:.1f}",
               pct(g[2], pf), f"{g[3]:.1f}", pct(g[3], pi8) if pi8 else "-", f"{g[4]:.1f}",
               pct(g[4], pi8) if pi8 else "-"]
        if torch is not None:
            tt32, tt16 = tr["prefill"][f"{m}x{k}x{n}"]
            row += [f"{flop / tt32 / 1e9:.1f}", f"{tt32 / t_f32:.2f}x", f"{flop / tt16 / 1e9:.1f}",
                    f"{tt16 / t_bb:.2f}x"]
        print(fmt_row(row, widths), flush=True)
    print("  ratio = torch time / vlmfo1 time (fp32: vs sgemm; bf16: vs our bf16/bf16 kernel)")
    print()
    print(f"== fused projections, bf16/bf16, {nt} threads, GFLOP/s (median of {reps}): ours = one _core.matmul_multi "
          f"over the separate weights; torch = F.linear on the concatenated weight")
    widths_f = [10, 22, 10, 8, 10, 8]
    print(fmt_row(["", "m x k x n", "ours", "%peak", "torch", "ratio"], widths_f))
    for name, m, k, ns in FUSED:
        x, w = inputs(m, k, sum(ns))
        wh = to_bf16(w)
        parts = [np.ascontiguousarray(wh[sum(ns[:i]):sum(ns[:i + 1])]) for i in range(len(ns))]
        flop = 2.0 * m * k * sum(ns)
        t = median_time(lambda r: _core.matmul_multi(x, parts, compute="bf16", n_threads=nt), reps)
        row = [name, f"{m}x{k}x{'+'.join(map(str, ns))}", f"{flop / t / 1e9:.1f}", pct(flop / t / 1e9, pbb)]
        if torch is not None:
            tt = tr["fused"][name]
            row += [f"{flop / tt / 1e9:.1f}", f"{tt / t:.2f}x"]
        print(fmt_row(row, widths_f), flush=True)
    print("  ratio = torch time / vlmfo1 time; matmul_multi starts a pool and allocates its outputs on every call")
    print()

    print(f"== decode GEMV (m=1), {nt} threads, GB/s of weight bytes from DRAM (median of {dreps}, "
          f"rotating over >= {ROTATE_BYTES / 1e9:.1f} GB of weight copies); % = of the {nt}-thread read bandwidth")
    hdr = ["m x k x n", "f32", "%bw", "bf16/bf16", "%bw", "bf16/f32", "%bw", "int8", "%bw", "int4", "%bw"]
    if torch is not None:
        hdr += ["torch f32", "ratio", "torch bf16", "ratio"]
    widths = [18] + [10] * (len(hdr) - 1)
    print(fmt_row(hdr, widths))
    for m, k, n in decode:
        x, w = inputs(m, k, n)
        out = np.empty((m, n), np.float32)
        res = {}
        for dt, isz in (("f32", 4), ("bf16", 2), ("int8", 1), ("int4", 0.5)):
            per = int(n * k * isz)
            if dt == "int4":   # copies of one weight's codes and block scales (bytes streamed: both)
                c4, s4, q4s, q4w = _core.quantize_i4(w,
                                                      n_threads=nt)
                per = c4.nbytes + s4.nbytes
                ncop = max(2, int(np.ceil(ROTATE_BYTES / per)))
                cb, sb = np.empty((ncop,) + c4.shape, np.uint8), np.empty((ncop,) + s4.shape, np.uint8)
                cb[:], sb[:] = c4, s4
                t = median_time(lambda r: _core.matmul(x, cb[r % ncop], scale=q4s, wsum=q4w, sub=sb[r % ncop],
                                                       n_threads=nt, out=out, workspace=ws), dreps, warmup=ncop)
                res[("int4", "int4")] = per / t / 1e9
                del cb, sb
                continue
            ncop = max(2, int(np.ceil(ROTATE_BYTES / per)))
            if dt == "int8":   # copies of one quantized weight (the scales are n floats, in cache)
                q, qs, qw = _core.quantize_i8(w, n_threads=nt)
                q = _core.pack_i8(q, n_threads=nt) if PACK_I8 else q   # the form a load gives (vlmfo1.quant)
                buf = np.empty((ncop,) + q.shape, np.int8)
                buf[:] = q
                t = median_time(lambda r: _core.matmul(x, buf[r % ncop], scale=qs, wsum=qw, n_threads=nt, out=out, workspace=ws),
                                dreps, warmup=ncop)
                res[("int8", "int8")] = per / t / 1e9
                del buf
                continue
            if dt == "f32":
                buf = np.empty((ncop, n, k), np.float32)
                buf[:] = w
            else:
                buf = np.empty((ncop, n, k), np.uint16)
                buf[:] = to_bf16(w)
            modes = ("f32",) if dt == "f32" else ("bf16", "f32")
            for cm in modes:
                t = median_time(lambda r: _core.matmul(x, buf[r % ncop], compute=cm, n_threads=nt, out=out, workspace=ws), dreps,
                                warmup=ncop)
                res[(dt, cm)] = per / t / 1e9
            if torch is not None:
                res[("torch", dt)] = tr["decode"][f"{m}x{k}x{n}/{dt}"]
            del buf
        bw = peak["bandwidth"]
        row = [f"{m}x{k}x{n}", f"{res[('f32', 'f32')]:.1f}", pct(res[("f32", "f32")], bw),
               f"{res[('bf16', 'bf16')]:.1f}", pct(res[("bf16", "bf16")], bw), f"{res[('bf16', 'f32')]:.1f}",
               pct(res[("bf16", "f32")], bw), f"{res[('int8', 'int8')]:.1f}", pct(res[("int8", "int8")], bw),
               f"{res[('int4', 'int4')]:.1f}", pct(res[("int4", "int4")], bw)]
        if torch is not None:
            row += [f"{res[('torch', 'f32')]:.1f}", f"{res[('f32', 'f32')] / res[('torch', 'f32')]:.2f}x",
                    f"{res[('torch', 'bf16')]:.1f}", f"{res[('bf16', 'bf16')] / res[('torch', 'bf16')]:.2f}x"]
        print(fmt_row(row, widths), flush=True)
    print("  ratio = our GB/s / torch GB/s (same weight bytes; > 1: we are faster); int4 bytes = codes + block scales "
          "(4.125 bits per weight)")
    print("  note: our matmul calls share one Workspace (thread pool + scratch), as a request does; matmul_multi starts "
          "a pool and allocates its outputs on every call")


if __name__ == "__main__":
    main()
