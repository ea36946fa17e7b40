#!/usr/bin/env python
"""Vision-tower benchmark: vlmfo1 vs transformers' Qwen2_5_VisionTransformerPretrainedModel, random weights at the
real Qwen2.5-VL-3B vision shapes (depth 32, hidden 1280, 16 heads, MLP 3420, out 2048, full blocks 7/15/23/31,
window 112), on a COCO image resized to 1000 x 750 -> grid 54 x 72 = 3888 patches (972 merged tokens).

    python benchmarks/bench_vision.py                   # full run, 2 threads
    python benchmarks/bench_vision.py --quick           # smoke: depth 4 (full blocks 1, 3)
    python benchmarks/bench_vision.py --threads 4 --engines hf-fp32,vlmfo1-fp32 --json out.json

The weights are written once into --workdir (fp32 and bf16 safetensors in the stock `visual.*` layout with a
config.json holding the vision_config) and reused.  Every engine runs in its own subprocess, one after another, so
the peak RSS (VmHWM) reported is that engine's own (weights + activations + runtime).  Each gets the same
pixel_values (vlmfo1's processor, identical to transformers' to 1e-6), the same thread count, one untimed warm-up
on a small 16 x 16 grid, then --reps (vlmfo1) / --torch-reps (transformers) timed calls; the median is reported.
Errors are max|tokens - ref| / max|ref| with ref = transformers fp32 (sdpa).

Engines:
  hf-fp32            transformers fp32, attn_implementation="sdpa" (per-window calls, no dense mask) [baseline]
  hf-fp32-eager      transformers fp32, eager attention (also per window)
  hf-bf16            transformers, module.to(torch.bfloat16), sdpa
  vlmfo1-fp32        vlmfo1 on the fp32 weights (compute f32)
  vlmfo1-bf16        vlmfo1 on the bf16 weights, compute "bf16" (the default for bf16 weights)
  vlmfo1-bf16w-f32   vlmfo1 on the bf16 weights, compute "f32"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))  # in-tree vlmfo1 as fallback
import _common as C  # noqa: E402

FULL = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
            in_channels=3, hidden_act="silu")
QUICK = dict(FULL, depth=4, fullatt_block_indexes=[1, 3])

ENGINES = {
    # name: (family, weights on disk, compute / torch dtype, attention)
    "hf-fp32": ("hf", "float32", "fp32", "sdpa"),
    "hf-fp32-eager": ("hf", "float32", "fp32", "eager"),
    "hf-bf16": ("hf", "bfloat16", "bf16", "sdpa"),
    "vlmfo1-fp32": ("vlmfo1", "float32", "f32", None),
    "vlmfo1-bf16": ("vlmfo1", "bfloat16", "bf16", None),
    "vlmfo1-bf16w-f32": ("vlmfo1", "bfloat16", "f32", None),
}
DEFAULT_ENGINES = "hf-fp32,hf-fp32-eager,hf-bf16,vlmfo1-fp32,vlmfo1-bf16,vlmfo1-bf16w-f32"
BASELINE = "hf-fp32"
DEFAULT_IMAGE = "/work/shared/data/coco_tiny/val2017/000000005001.jpg"  # 640 x 480 (4:3)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _dirs(a):
    return C.bench_dirs(a, "vision")


# ----------------------------------------------------------------------------- setup (own subprocess)


def prepare(a):
    """Random weights (linear std 1/sqrt(fan_in), biases 0.02, norms 1 +- 0.2) written as fp32 and bf16
    checkpoints, plus the pixel_values of the benchmark image."""
    import numpy as np
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from vlmfo1.image import QwenImageProcessor, load_image

    dirs = _dirs(a)
    vcfg = QUICK if a.quick else FULL
    if not C.have_fp32_and_bf16(dirs):
        cfg = Qwen2_5_VLConfig(vision_config=dict(vcfg))
        torch.manual_seed(a.seed)
        vis = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg.vision_config).float().eval()
        C.randomize_(vis, a.seed, lambda n: "norm" in n or "ln_q" in n)
        sd = {"visual." + k: v.contiguous() for k, v in vis.state_dict().items()}
        del vis
        raw = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
               "vision_config": cfg.vision_config.to_dict()}
        C.save_fp32_and_bf16(dirs, sd, raw, log=_log)
    from PIL import Image

    img = Image.open(a.image).convert("RGB").resize((a.width, a.height), Image.Resampling.BICUBIC)
    pv, grid, _ = QwenImageProcessor()(load_image(img))
    np.save(os.path.join(a.workdir, "pixel_values.npy"), pv)
    grid = [int(v) for v in np.asarray(grid).ravel()]
    with open(os.path.join(a.workdir, "grid.json"), "w") as f:
        json.dump(grid, f)
    return {"grid": grid, "patches": int(pv.shape[0])}


# ----------------------------------------------------------------------------- workers


def _inputs(a):
    import numpy as np

    pv = np.load(os.path.join(a.workdir, "pixel_values.npy"))
    with open(os.path.join(a.workdir, "grid.json")) as f:
        grid = tuple(json.load(f))
    warm = np.random.default_rng(0).standard_normal((256, pv.shape[1])).astype(np.float32)
    return pv, grid, warm, (1, 16, 16)


def worker_hf(a, name):
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    _, disk, dt, attn = ENGINES[name]
    torch.set_num_threads(a.threads)
    d = _dirs(a)[disk]
    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    cfg = Qwen2_5_VLConfig(vision_config=raw["vision_config"])
    tdt = torch.bfloat16 if dt == "bf16" else torch.float32
    t0 = time.perf_counter()
    vis = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg.vision_config, attn_implementation=attn,
                                                                dtype=tdt)
    params = dict(vis.named_parameters())
    with torch.no_grad():
        for k, t in C.read_safetensors_torch(os.path.join(d, "model.safetensors")):
            params[k[len("visual."):]].copy_(t)
    vis = vis.to(tdt).eval()  # as a bf16 transformers run: everything bf16 (incl. the rotary inv_freq buffer)
    load_s = time.perf_counter() - t0
    pv, grid, warm, wgrid = _inputs(a)
    times = []
    with torch.inference_mode():
        vis(torch.from_numpy(warm), grid_thw=torch.tensor([wgrid]))
        for _ in range(a.torch_reps):
            t0 = time.perf_counter()
            out = vis(torch.from_numpy(pv), grid_thw=torch.tensor([grid])).pooler_output
            times.append(time.perf_counter() - t0)
    return times, out.float().numpy(), load_s


def worker_vlmfo1(a, name):
    from vlmfo1.safetensors import Checkpoint
    from vlmfo1.vision import VisionTower

    _, disk, compute, _ = ENGINES[name]
    d = _dirs(a)[disk]
    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    t0 = time.perf_counter()
    vt = VisionTower.from_checkpoint(Checkpoint(d), raw, mode="exact", compute=compute, n_threads=a.threads)
    load_s = time.perf_counter() - t0
    pv, grid, warm, wgrid = _inputs(a)
    vt(warm, wgrid)
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        out = vt(pv, grid)
        times.append(time.perf_counter() - t0)
    return times, out, load_s


def run_worker_main(a):
    import numpy as np

    if a.worker == "prepare":
        res = prepare(a)
    else:
        fam = ENGINES[a.worker][0]
        times, tokens, load_s = (worker_hf if fam == "hf" else worker_vlmfo1)(a, a.worker)
        path = os.path.join(a.workdir, f"tokens-{a.worker}.npy")
        np.save(path, np.asarray(tokens, dtype=np.float32))
        res = {"times": times, "median_s": C.median(times), "load_s": load_s, "tokens": path,
               "shape": list(np.shape(tokens))}
    res["peak_rss_bytes"] = C.peak_rss_bytes()
    with open(a.out, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------- driver


def report(results, a, setup) -> str:
    import numpy as np

    ref = None
    if "tokens" in results.get(BASELINE, {}):
        ref = np.load(results[BASELINE]["tokens"]).astype(np.float64)
    base = results.get(BASELINE, {}).get("median_s")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "ERROR: " + r["error"], "", "", "", "", ""])
            continue
        err = ""
        if ref is not None:
            tok = np.load(r["tokens"]).astype(np.float64)
            err = f"{np.abs(tok - ref).max() / np.abs(ref).max():.2e}" if tok.shape == ref.shape else "shape!"
        reps = ", ".join(f"{t:.2f}" for t in r["times"])
        rows.append([name, f"{r['median_s']:.2f}", reps,
                     f"{base / r['median_s']:.2f}x" if base else "", f"{r['peak_rss_bytes'] / 1e9:.2f}",
                     f"{r['load_s']:.1f}", err])
    head = (f"Qwen2.5-VL vision tower, {'QUICK depth 4' if a.quick else 'depth 32'}, image {a.width}x{a.height} -> "
            f"grid {setup['grid']} = {setup['patches']} patches; threads {a.threads}; "
            f"load avg {os.getloadavg()[0]:.2f}")
    table = C.markdown_table(["engine", "median s", "reps s", f"speed vs {BASELINE}", "peak RSS GB", "load s",
                              f"max rel err vs {BASELINE}"], rows)
    return head + "\n\n" + table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: depth 4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="timed calls for vlmfo1 engines (median)")
    p.add_argument("--torch-reps", type=int, default=1, help="timed calls for transformers engines (median)")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help="comma list of: " + ", ".join(ENGINES))
    p.add_argument("--image", default=DEFAULT_IMAGE)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--height", type=int, default=750)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "vlmfo1_bench_vision"))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return run_worker_main(a)
    common = [os.path.abspath(__file__), "--threads", str(a.threads), "--reps", str(a.reps), "--torch-reps",
              str(a.torch_reps), "--image", a.image, "--width", str(a.width), "--height", str(a.height),
              "--seed", str(a.seed), "--workdir", a.workdir] + (["--quick"] if a.quick else [])
    setup, results = C.run_engines(p, a, a.engines, ENGINES, BASELINE, common, log=_log)
    _log(f"grid {setup['grid']}, {setup['patches']} patches")
    text = report(results, a, setup)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"setup": setup, "results": results, "args": vars(a)}, f, indent=2)


if __name__ == "__main__":
    main()
