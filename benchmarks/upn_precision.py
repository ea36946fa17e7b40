#!/usr/bin/env python
"""How far UPN's bf16 and int8 weights move its outputs from fp32, on random UPN-large weights (the checkpoint and the
1000 x 750 image bench_upn.py prepares in --workdir): per stage relative to fp32's largest value (Swin level 3,
encoder memory, two-stage logits, the last decoder state), how many of the 900 selected queries stay selected, and,
run on fp32's query order (the `select` hook), the largest box and logit differences.

    python benchmarks/bench_upn.py --engines vlmfo1-fp32 --reps 1     # once: writes the checkpoint and the image
    python benchmarks/upn_precision.py [--workdir DIR] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vlmfo1_bench_upn"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from vlmfo1.upn import UPN, preprocess
    ck = os.path.join(a.workdir, "upn_large_random_fp32.safetensors")
    img = os.path.join(a.workdir, "image_1000x750.png")
    if not (os.path.exists(ck) and os.path.exists(img)):
        raise SystemExit(f"run benchmarks/bench_upn.py once first (no {ck} / {img})")
    px, _ = preprocess(img)
    ref = UPN.from_pretrained(ck, n_threads=a.threads)
    l32, b32, t32 = ref.forward(px, taps=True)
    del ref

    def rel(x, y):
        return float(np.abs(x - y).max() / np.abs(y).max())
    print("| weights | Swin level 3 | encoder memory | two-stage logits | last decoder state | top-900 kept | "
          "box diff, same queries | logit diff, same queries (fp32 logits in [%.2f, %.2f]) |" % (l32.min(), l32.max()))
    print("|---|---|---|---|---|---|---|---|")
    for dt in ("bfloat16", "int8"):
        net = UPN.from_pretrained(ck, n_threads=a.threads, dtype=dt)
        l, b, t = net.forward(px, taps=True, select=t32["topk"])
        kept = len(set(t["topk"].tolist()) & set(t32["topk"].tolist()))
        print(f"| {dt} | {rel(t['backbone3'], t32['backbone3']):.2%} | {rel(t['memory'], t32['memory']):.2%} | "
              f"{rel(t['enc_logits'], t32['enc_logits']):.2%} | {rel(t['hs'][-1], t32['hs'][-1]):.2%} | "
              f"{kept}/{len(t32['topk'])} | {np.abs(b - b32).max():.3f} | {np.abs(l - l32).max():.3f} |")
        del net
    return 0


if __name__ == "__main__":
    sys.exit(main())
