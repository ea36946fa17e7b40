#!/usr/bin/env python
"""Region-encoder benchmark: vlmfo1's HFRE + mm_projector_aux vs the torch reference modules of
tests/test_hfre.py (F.interpolate + concatenated 3840-channel map + sample-by-sample RoIAlign,
SimpleFP as nn.Sequential), random weights at the real FO1 shapes:

  100 boxes; aux maps of a 768 x 768 image (192^2 x 256, 96^2 x 512, 48^2 x 1024, 24^2 x 2048);
  Qwen maps of a 1000 x 750 image (grid 54 x 72, 4 x 1280 channels); SimpleFP on (1280 -> 512);
  S = 7; R = 5888; mm_projector_aux = mlp2x_gelu 5888 -> 2048 -> 2048.

    python benchmarks/bench_hfre.py                    # all engines, 2 threads
    python benchmarks/bench_hfre.py --engines vlmfo1-fp32 --reps 5

The torch reference's RoIAlign is a Python loop over boxes (torchvision is not installed), so its
total is dominated by that loop; its SimpleFP forward alone (mkldnn convs) is timed separately.
Every engine runs in its own subprocess (its own peak RSS = VmHWM, which includes the inputs,
~0.15 GB of maps). torch uses torch.set_num_threads(--threads). Errors are max|out - ref| / max|ref|
against the torch fp32 output (when that engine ran).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.append(os.path.dirname(HERE))
import _common as C  # noqa: E402

CFG = dict(mm_region_hidden_size=5888, mm_use_vision_tower_region_feature=True, mm_use_simpleFPN_for_vt=True,
           mm_projector_aux_type="mlp2x_gelu", mm_projector_type="identity", mm_roi_output_size=7,
           hidden_size=2048, mm_hidden_size=2048,
           vision_config=dict(hidden_size=1280, patch_size=14, fullatt_block_indexes=[7, 15, 23, 31]))
AUX = (256, 512, 1024, 2048)
ENGINES = {"torch-fp32": None, "vlmfo1-fp32": ("float32", "f32"), "vlmfo1-bf16": ("bfloat16", "bf16"),
           "vlmfo1-bf16w-f32": ("bfloat16", "f32")}


def _log(m):
    print(m, file=sys.stderr, flush=True)


def inputs(n_boxes=100, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    aux = [rng.standard_normal((s, s, c)).astype(np.float32) for s, c in zip((192, 96, 48, 24), AUX)]
    vt = rng.standard_normal((4, 54, 72, 1280)).astype(np.float32)
    x1, y1 = rng.uniform(0, 700, n_boxes), rng.uniform(0, 700, n_boxes)
    w, h = rng.uniform(8, 400, n_boxes), rng.uniform(8, 400, n_boxes)
    ba = np.stack([x1, y1, np.minimum(x1 + w, 768), np.minimum(y1 + h, 768)], 1).astype(np.float32)
    ratio = np.array([1008 / 768, 756 / 768] * 2, np.float64).astype(np.float32)
    return aux, vt, ba, (ba * ratio).astype(np.float32)


def model_and_ckpt(workdir):
    import torch

    import test_hfre as T
    from vlmfo1.safetensors import f32_to_bf16_bits, save_file

    torch.manual_seed(0)
    m = T.RefFO1(CFG, AUX, 1280, 512, 4, 2048, 2048)
    T.randomize(m, 0)
    os.makedirs(workdir, exist_ok=True)
    for dt in ("float32", "bfloat16"):
        p = os.path.join(workdir, f"hfre_{dt}.safetensors")
        if not os.path.exists(p):
            t = {}
            for k, v in m.state_dict().items():
                a = v.float().numpy()
                t["model." + k] = ("F32", a) if dt == "float32" else ("BF16", f32_to_bf16_bits(a))
            save_file(t, p + ".tmp")
            os.replace(p + ".tmp", p)
    return m


def worker(args):
    import numpy as np

    aux, vt, ba, bq = inputs(args.boxes)
    res = {"engine": args.engine}
    if args.engine == "torch-fp32":
        import torch

        torch.set_num_threads(args.threads)
        m = model_and_ckpt(args.workdir)
        ta = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in aux]
        tv = [torch.from_numpy(v).permute(2, 0, 1).contiguous() for v in vt]
        tba, tbq = torch.from_numpy(ba), torch.from_numpy(bq)
        times = []
        for _ in range(args.torch_reps):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = m.mm_projector_aux(m.regions(ta, tv, tba, tbq)).numpy()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            m.object_vp_extractor.simple_fpn(tv[-1][None])
        res["simplefp_s"] = time.perf_counter() - t0     # the convolutions alone (mkldnn), for scale
    else:
        from vlmfo1.hfre import HFRE
        from vlmfo1.safetensors import Checkpoint

        dt, comp = ENGINES[args.engine]
        ck = Checkpoint(os.path.join(args.workdir, f"hfre_{dt}.safetensors"))
        enc = HFRE.from_checkpoint(ck, CFG, compute=comp, n_threads=args.threads)
        enc.region_features(vt[:, :8, :8], [a[:16, :16] for a in aux], ba[:2] / 48, bq[:2] / 48)  # warm-up
        times, tr, tp = [], [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            f = enc.region_features(vt, aux, ba, bq)
            t1 = time.perf_counter()
            out = enc.project_regions(f)
            t2 = time.perf_counter()
            times.append(t2 - t0); tr.append(t1 - t0); tp.append(t2 - t1)
        res.update(regions_s=C.median(tr), projector_s=C.median(tp))
    res.update(time_s=C.median(times), best_s=min(times), peak_rss_gb=C.peak_rss_bytes() / 1e9)
    np.save(args.out + ".npy", out)
    with open(args.out, "w") as f:
        json.dump(res, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--torch-reps", type=int, default=1)
    ap.add_argument("--boxes", type=int, default=100)
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "vlmfo1_bench_hfre"))
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return worker(args)
    import numpy as np

    model_and_ckpt(args.workdir)
    rows, outs = [], {}
    for e in args.engines.split(","):
        _log(f"== {e}")
        argv = [os.path.abspath(__file__), "--engine", e, "--threads", str(args.threads), "--reps", str(args.reps),
                "--torch-reps", str(args.torch_reps), "--boxes", str(args.boxes), "--workdir", args.workdir]
        import tempfile
        fd, out = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        t0 = time.perf_counter()
        import subprocess
        rc = subprocess.run([sys.executable] + argv + ["--out", out]).returncode
        if rc:
            rows.append([e, "error", "", "", "", "", ""])
            continue
        with open(out) as f:
            r = json.load(f)
        outs[e] = np.load(out + ".npy")
        os.unlink(out); os.unlink(out + ".npy")
        r["wall_s"] = time.perf_counter() - t0
        rows.append(r)
    ref = outs.get("torch-fp32")
    table = []
    for r in rows:
        if isinstance(r, list):
            table.append(r)
            continue
        err = ""
        if ref is not None and r["engine"] in outs:
            err = f"{np.abs(outs[r['engine']] - ref).max() / np.abs(ref).max():.2e}"
        table.append([r["engine"], f"{r['time_s']:.3f}", f"{r.get('regions_s', float('nan')):.3f}",
                      f"{r.get('projector_s', float('nan')):.3f}", f"{r.get('simplefp_s', float('nan')):.3f}",
                      f"{r['peak_rss_gb']:.2f}", err])
    print(f"HFRE + mm_projector_aux, {args.boxes} boxes, {args.threads} threads (median seconds)")
    print(C.markdown_table(["engine", "total s", "regions s", "projector s", "torch SimpleFP s", "peak RSS GB",
                            "rel err vs torch"],
                           table))


if __name__ == "__main__":
    main()
