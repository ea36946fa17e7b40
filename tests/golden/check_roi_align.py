#!/usr/bin/env python3
"""torchvision's compiled RoIAlign vs make_fo1_golden.py's pure-torch RoIAlign shim, on the calls VLM-FO1's HFRE makes.

benchmarks/bench_fo1.py runs the official engines with torchvision's compiled roi_align where it loads (a venv made by
benchmarks/make_official_venv.sh) and with the shim elsewhere; this checks that both are the same op, so that the
choice changes only the time. Needs an interpreter whose torchvision runs its compiled ops on CPU tensors, hence a
script (not a CI test):

    python tests/golden/check_roi_align.py --python /tmp/fo1tv/bin/python

The calls (official HFREModule, hybrid_finegrained_region_encoder.py, as the FO1 checkpoints configure it):
float32 [1, C, H, W] map, boxes as a list with one float32 [N, 4] xyxy tensor, output_size=14
(mm_roi_output_size), sampling_ratio=-1 and aligned=False (the defaults), spatial_scale 0.25 on the DaViT map
(1024 x 768 aux image -> 256 x 192) and 1/3.5, 1/7, 1/14, 1/28 on the SimpleFP levels of the ViT (1008 x 756
image), plus 1/14 (the no-SimpleFP path). Fewer channels than the model's (3840 / 512): channels are independent
in both implementations, and the shim's float64 copy of a 3840-channel map would take 1.5 GB per box. Boxes:
random ones inside the image, ones crossing or beyond its border, sub-pixel and degenerate (x1 == x2) ones.

Prints the max absolute error and the max error relative to the largest |output|; exits 1 if the latter exceeds
--tol. The shim accumulates in float64 and torchvision in float32, so a few float32 ulps of difference is expected.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, channels, map H, map W, spatial_scale, image W, image H)
CASES = [
    ("davit (aux) map", 64, 192, 256, 0.25, 1024, 768),
    ("vit simple_fpn level 0", 32, 216, 288, 1 / 3.5, 1008, 756),
    ("vit simple_fpn level 1", 32, 108, 144, 1 / 7, 1008, 756),
    ("vit simple_fpn level 2", 32, 54, 72, 1 / 14, 1008, 756),
    ("vit simple_fpn level 3", 32, 27, 36, 1 / 28, 1008, 756),
    ("vit concat (no simple_fpn)", 48, 54, 72, 1 / 14, 1008, 756),
]
OUTPUT_SIZE = 14


def boxes_for(gen, n, img_w, img_h):
    import torch
    b = []
    for _ in range(n):                                   # inside the image
        w = float(torch.empty(()).uniform_(4, 0.6 * img_w, generator=gen))
        h = float(torch.empty(()).uniform_(4, 0.6 * img_h, generator=gen))
        x = float(torch.empty(()).uniform_(0, img_w - w, generator=gen))
        y = float(torch.empty(()).uniform_(0, img_h - h, generator=gen))
        b.append([x, y, x + w, y + h])
    b += [[-20.0, -10.0, 0.3 * img_w, 0.4 * img_h],     # crossing the top-left border
          [0.7 * img_w, 0.8 * img_h, img_w + 30.0, img_h + 25.0],   # crossing the bottom-right border
          [img_w + 10.0, img_h + 10.0, img_w + 90.0, img_h + 60.0],  # entirely outside
          [0.0, 0.0, float(img_w), float(img_h)],       # the whole image
          [100.2, 50.7, 100.9, 51.1],                    # sub-pixel
          [200.0, 100.0, 200.0, 180.0],                  # degenerate: x1 == x2
          [img_w - 1.0, img_h - 1.0, float(img_w), float(img_h)]]
    return torch.tensor(b, dtype=torch.float32)


def worker(a) -> int:
    import torch
    sys.path.insert(0, HERE)
    import make_fo1_golden as G          # the shim (G.roi_align); installs nothing on import
    import torchvision
    from torchvision.ops import roi_align as tv_roi_align

    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}; output_size={OUTPUT_SIZE}, "
          f"sampling_ratio=-1, aligned=False; {a.seeds} seeds x {len(CASES)} calls x {a.boxes + 7} boxes")
    worst_abs = worst_rel = 0.0
    for name, c, h, w, scale, img_w, img_h in CASES:
        case_abs = case_rel = 0.0
        for seed in range(a.seeds):
            gen = torch.Generator().manual_seed(1000 * seed + len(name))
            x = torch.randn(1, c, h, w, generator=gen, dtype=torch.float32)
            boxes = [boxes_for(gen, a.boxes, img_w, img_h)]
            kw = dict(output_size=OUTPUT_SIZE, spatial_scale=scale)      # HFRE passes these two only
            ref = G.roi_align(x, boxes, **kw)
            got = tv_roi_align(x, boxes, **kw)
            assert got.shape == ref.shape == (boxes[0].shape[0], c, OUTPUT_SIZE, OUTPUT_SIZE), (got.shape, ref.shape)
            assert got.dtype == ref.dtype == torch.float32
            err = (got - ref).abs().max().item()
            case_abs = max(case_abs, err)
            case_rel = max(case_rel, err / max(ref.abs().max().item(), 1e-30))
        print(f"  {name:28s} C={c:3d} {h}x{w} scale={scale:.6g}: max |tv - shim| = {case_abs:.3e}, "
              f"relative to max |out| = {case_rel:.3e}")
        worst_abs, worst_rel = max(worst_abs, case_abs), max(worst_rel, case_rel)
    ok = worst_rel <= a.tol
    print(f"max abs error {worst_abs:.3e}, max relative error {worst_rel:.3e} (tol {a.tol:g}): "
          f"{'same op' if ok else 'DIFFERENT'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=sys.executable,
                   help="interpreter with a working torchvision (default: this one), e.g. /tmp/fo1tv/bin/python")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--boxes", type=int, default=10, help="random boxes inside the image per call (+7 edge cases)")
    p.add_argument("--tol", type=float, default=1e-5, help="max error relative to the largest |output|")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    # a subprocess even for this interpreter: a venv's bin/python is a symlink to the base one (realpath equal)
    return subprocess.run([a.python, os.path.abspath(__file__), "--worker", "--seeds", str(a.seeds), "--boxes",
                           str(a.boxes), "--tol", str(a.tol), "--threads", str(a.threads)]).returncode


if __name__ == "__main__":
    sys.exit(main())
