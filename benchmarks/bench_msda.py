"""Benchmark of UPN's deformable-DETR ops (csrc/detr.c) at UPN's sizes: multi-scale deformable attention sampling
for the encoder (every token of a 5-level pyramid a query: ~80k queries x 8 heads x 5 levels x 4 points, 32
channels per head) and the decoder (900 queries), GroupNorm of a 256-channel map, and the sine embeddings.

The encoder's sampling locations are the tokens' own centres plus offsets of ~2 pixels of each level (N(0, 2)),
which is roughly what a trained encoder samples; the decoder's are random boxes' centres plus offsets. Prints
ms/call (median and best of --reps) at 1 and --threads threads, on a _core.Workspace per thread count (the pool is
started once); the outputs of MSDA and GroupNorm are reused (no page faults timed; the sine embeddings return new
arrays).
Timing on a shared 2-core machine is noisy: compare medians of runs made side by side.

    python benchmarks/bench_msda.py [--threads 2] [--reps 5] [--torch]

--torch also times Deformable-DETR's ms_deform_attn_core_pytorch (grid_sample per level; what UPN runs on CPU) on
the same inputs with torch.set_num_threads(--threads) (the encoder call needs ~2 GB for its intermediates).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # in-tree vlmfo1 as fallback
from vlmfo1 import _core  # noqa: E402

LEVELS = [(200, 300), (100, 150), (50, 75), (25, 38), (13, 19)]   # 79,947 tokens (strides 8..128 of 1600 x 2400)
M, D, P = 8, 32, 4


def times(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts)), 1e3 * min(ts)


def msda_inputs(r, Lq, centres):
    L = len(LEVELS)
    wh = np.array([[w, h] for h, w in LEVELS], np.float32)
    off = r.standard_normal((Lq, M, L, P, 2)).astype(np.float32) * 2
    loc = (centres[:, None, None, None, :] + off / wh[None, None, :, None, :]).astype(np.float32)
    logits = r.standard_normal((Lq, M, L * P))
    aw = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(Lq, M, L, P).astype(np.float32)
    return loc, aw


def ms_deform_attn_core_pytorch(torch, value, shapes, loc, aw):
    """Deformable-DETR's reference at batch 1 (see tests/test_msda.py for the verbatim copy)."""
    F = torch.nn.functional
    S, M_, D_ = value.shape
    Lq, _, L, P, _ = loc.shape
    vl = value.split([h * w for h, w in shapes], dim=0)
    grids = 2 * loc - 1
    samples = [F.grid_sample(vl[i].permute(1, 2, 0).reshape(M_, D_, h, w), grids[:, :, i].transpose(0, 1),
                             mode="bilinear", padding_mode="zeros", align_corners=False) for i, (h, w) in enumerate(shapes)]
    a = aw.transpose(0, 1).reshape(M_, 1, Lq, L * P)
    return (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1).view(M_ * D_, Lq).t().contiguous()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch", action="store_true", help="also time the PyTorch reference")
    args = ap.parse_args()
    r = np.random.default_rng(0)
    S = sum(h * w for h, w in LEVELS)
    shapes = np.array(LEVELS)
    value = r.standard_normal((S, M, D)).astype(np.float32)
    tok = np.concatenate([np.stack(np.meshgrid((np.arange(w) + .5) / w, (np.arange(h) + .5) / h), -1).reshape(-1, 2)
                          for h, w in LEVELS]).astype(np.float32)
    enc = msda_inputs(r, S, tok)
    dec = msda_inputs(r, 900, r.random((900, 2)).astype(np.float32))
    x = r.standard_normal((S, 256)).astype(np.float32)
    gw, gb = r.standard_normal(256).astype(np.float32), r.standard_normal(256).astype(np.float32)
    boxes = r.random((900, 4)).astype(np.float32)
    print(f"kernel {_core.gemm_info()['kernel']}; {S} tokens in levels {LEVELS}; M={M} D={D} P={P}")
    out_e, out_d, out_g = (np.empty((S, M * D), np.float32), np.empty((900, M * D), np.float32),
                           np.empty((S, 256), np.float32))
    rows = [
        (f"msda encoder ({S} queries)",
         lambda nt, ws: _core.msda(value, *enc, shapes, n_threads=nt, out=out_e, workspace=ws)),
        ("msda decoder (900 queries)",
         lambda nt, ws: _core.msda(value, *dec, shapes, n_threads=nt, out=out_d, workspace=ws)),
        (f"group_norm {S} x 256, 32 groups",
         lambda nt, ws: _core.group_norm(x, gw, gb, 32, n_threads=nt, out=out_g, workspace=ws)),
        ("sine_pos_embed_hw, all 5 levels",
         lambda nt, ws: [_core.sine_pos_embed_hw(h, w, n_threads=nt, workspace=ws) for h, w in LEVELS]),
        ("sine_embed_boxes 900 boxes", lambda nt, ws: _core.sine_embed_boxes(boxes, n_threads=nt, workspace=ws)),
    ]
    wss = {nt: _core.Workspace(nt) for nt in sorted({1, args.threads})}   # pools kept between calls
    for name, fn in rows:
        cols = []
        for nt, ws in wss.items():
            med, best = times(lambda: fn(nt, ws), args.reps)
            cols.append(f"{nt} thread{'s' if nt > 1 else ''}: {med:8.1f} ms (best {best:.1f})")
        print(f"{name:36s} " + "   ".join(cols))
    if args.torch:
        import torch
        torch.set_num_threads(args.threads)
        tv = torch.from_numpy(value)
        for name, (loc, aw), out in (("encoder", enc, out_e), ("decoder", dec, out_d)):
            tl, ta = torch.from_numpy(loc), torch.from_numpy(aw)
            with torch.no_grad():
                med, best = times(lambda: ms_deform_attn_core_pytorch(torch, tv, LEVELS, tl, ta), max(1, args.reps // 2))
                ref = ms_deform_attn_core_pytorch(torch, tv, LEVELS, tl, ta).numpy()
            _core.msda(value, loc, aw, shapes, out=out)
            err = float(np.abs(out - ref).max())
            print(f"torch reference, msda {name:8s}       {args.threads} threads: {med:8.1f} ms (best {best:.1f}); "
                  f"max |ours - torch| = {err:.2g}")


if __name__ == "__main__":
    main()
