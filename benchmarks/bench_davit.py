#!/usr/bin/env python
"""DaViT benchmark: vlmfo1 vs transformers' Florence-2 vision backbone (the same network as VLM-FO1's aux encoder),
random weights at the real davit-large shapes (dims 256/512/1024/2048, depths 1/1/9/1, heads = groups 8/16/32/64,
window 12), on a COCO image preprocessed as FO1's "squash" mode does: 768 x 768 -> stage maps 192^2, 96^2, 48^2, 24^2.

    python benchmarks/bench_davit.py                    # full run, 2 threads
    python benchmarks/bench_davit.py --quick            # smoke: one block pair per stage, 384 x 384
    python benchmarks/bench_davit.py --threads 4 --engines hf-fp32,vlmfo1-fp32 --json out.json

The weights are written once into --workdir (fp32 and bf16 safetensors in VLM-FO1's layout,
`model.vision_tower_aux.image_tower.*`, with a config.json naming `mm_vision_tower_aux: davit-large`) and reused;
the transformers workers rename them to Florence-2's names on load. Every engine runs in its own subprocess, one after
another, so the peak RSS (VmHWM) reported is that engine's own (weights + activations + runtime). Each gets the same
pixel_values (vlmfo1.aux_image, squash), the same thread count, one untimed warm-up on a 96 x 96 image, then --reps
(vlmfo1) / --torch-reps (transformers) timed calls; the median is reported. Errors are max over the 4 stages of
max|out - ref| / max|ref| with ref = transformers fp32.

Engines:
  hf-fp32            transformers fp32 (sdpa) [baseline]
  hf-bf16            transformers, module.to(torch.bfloat16) (the official FO1 run is bf16 end to end)
  vlmfo1-fp32        vlmfo1 on the fp32 weights (compute f32)
  vlmfo1-bf16        vlmfo1 on the bf16 weights, compute "bf16" (the default for bf16 weights)
  vlmfo1-bf16w-f32   vlmfo1 on the bf16 weights, compute "f32"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))  # in-tree vlmfo1 as fallback
import _common as C  # noqa: E402

FULL = dict(embed_dim=[256, 512, 1024, 2048], depths=[1, 1, 9, 1], num_heads=[8, 16, 32, 64],
            num_groups=[8, 16, 32, 64], patch_size=[7, 3, 3, 3], patch_stride=[4, 2, 2, 2], patch_padding=[3, 1, 1, 1],
            patch_prenorm=[False, True, True, True], window_size=12)
QUICK = dict(FULL, depths=[1, 1, 1, 1])
PREFIX = "model.vision_tower_aux.image_tower."

ENGINES = {
    # name: (family, weights on disk, compute / torch dtype)
    "hf-fp32": ("hf", "float32", "fp32"),
    "hf-bf16": ("hf", "bfloat16", "bf16"),
    "vlmfo1-fp32": ("vlmfo1", "float32", "f32"),
    "vlmfo1-bf16": ("vlmfo1", "bfloat16", "bf16"),
    "vlmfo1-bf16w-f32": ("vlmfo1", "bfloat16", "f32"),
}
DEFAULT_ENGINES = ",".join(ENGINES)
BASELINE = "hf-fp32"
DEFAULT_IMAGE = "/work/shared/data/coco_tiny/val2017/000000005001.jpg"

# official DaViT names (FO1 checkpoint) <-> transformers' Florence-2 names
_TO_HF = [(r"^convs\.(\d+)\.proj\.", r"convs.\1.conv."), (r"\.conv([12])\.fn\.dw\.", r".conv\1."),
          (r"\.(window_attn|channel_attn)\.norm\.", ".norm1."), (r"\.(window_attn|channel_attn)\.fn\.", r".\1."),
          (r"\.ffn\.norm\.", ".norm2."), (r"\.ffn\.fn\.net\.", ".ffn.")]
_TO_FO1 = [(r"^convs\.(\d+)\.conv\.", r"convs.\1.proj."), (r"(_block)\.conv([12])\.", r"\1.conv\2.fn.dw."),
           (r"spatial_block\.norm1\.", "spatial_block.window_attn.norm."),
           (r"channel_block\.norm1\.", "channel_block.channel_attn.norm."),
           (r"(window_attn|channel_attn)\.(qkv|proj)\.", r"\1.fn.\2."), (r"_block\.norm2\.", "_block.ffn.norm."),
           (r"_block\.ffn\.(fc[12])\.", r"_block.ffn.fn.net.\1.")]


def _rename(k, rules):
    for pat, rep in rules:
        k = re.sub(pat, rep, k)
    return k


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _dirs(a):
    return C.bench_dirs(a, "davit")


# ----------------------------------------------------------------------------- setup (own subprocess)


def prepare(a):
    """Random weights (conv/linear std 1/sqrt(fan_in), biases 0.02, norms 1 +- 0.2) written as fp32 and bf16
    checkpoints, plus the pixel_values of the benchmark image."""
    import numpy as np
    import torch
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig
    from transformers.models.florence2.modeling_florence2 import Florence2VisionBackbone

    from vlmfo1.aux_image import AuxImageProcessor
    from vlmfo1.image import load_image

    dirs = _dirs(a)
    vcfg = QUICK if a.quick else FULL
    if not C.have_fp32_and_bf16(dirs):
        torch.manual_seed(a.seed)
        model = Florence2VisionBackbone(Florence2VisionConfig(**vcfg)).float().eval()
        C.randomize_(model, a.seed, lambda n: "norm" in n and n.endswith("weight"))
        sd = {PREFIX + _rename(k, _TO_FO1): v.contiguous() for k, v in model.state_dict().items()}
        del model
        raw = {"model_type": "omchat_qwen2_5_vl", "mm_vision_tower_aux": "davit-large.pth",
               "aux_image_aspect_ratio": "squash", "aux_image_size": 768, "davit_config": vcfg}
        C.save_fp32_and_bf16(dirs, sd, raw, log=_log)
    from PIL import Image

    img = load_image(Image.open(a.image).convert("RGB").resize((a.width, a.height), Image.Resampling.BICUBIC))
    pv, info = AuxImageProcessor(aspect_ratio="squash", size=(a.size, a.size))(img)
    np.save(os.path.join(a.workdir, "davit_pixel_values.npy"), pv)
    return {"pixels": list(pv.shape), "image": list(info["image_size"])}


# ----------------------------------------------------------------------------- workers


def _inputs(a):
    import numpy as np

    pv = np.load(os.path.join(a.workdir, "davit_pixel_values.npy"))
    warm = np.random.default_rng(0).standard_normal((3, 96, 96)).astype(np.float32)
    return pv, warm


def worker_hf(a, name):
    import torch
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig
    from transformers.models.florence2.modeling_florence2 import Florence2VisionBackbone

    _, disk, dt = ENGINES[name]
    torch.set_num_threads(a.threads)
    d = _dirs(a)[disk]
    tdt = torch.bfloat16 if dt == "bf16" else torch.float32
    t0 = time.perf_counter()
    with open(os.path.join(d, "config.json")) as f:
        vcfg = json.load(f)["davit_config"]
    model = Florence2VisionBackbone(Florence2VisionConfig(**vcfg)).to(tdt).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in C.read_safetensors_torch(os.path.join(d, "model.safetensors")):
            params[_rename(k[len(PREFIX):], _TO_HF)].copy_(t)
    load_s = time.perf_counter() - t0
    pv, warm = _inputs(a)

    def run(x):
        h = torch.from_numpy(x)[None].to(tdt)
        outs = []
        for conv, block in zip(model.convs, model.blocks):
            h = conv(h)
            for layer in block:
                h = layer(h)
            outs.append(h[0])
        return outs

    times = []
    with torch.inference_mode():
        run(warm)
        for _ in range(a.torch_reps):
            t0 = time.perf_counter()
            out = run(pv)
            times.append(time.perf_counter() - t0)
    return times, [o.float().numpy() for o in out], load_s


def worker_vlmfo1(a, name):
    import numpy as np

    from vlmfo1.davit import DavitEncoder
    from vlmfo1.safetensors import Checkpoint

    _, disk, compute = ENGINES[name]
    d = _dirs(a)[disk]
    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    if a.quick:  # the quick checkpoint does not have the named variant's depths
        raw = {"vision_config": raw["davit_config"]}
    t0 = time.perf_counter()
    enc = DavitEncoder.from_checkpoint(Checkpoint(d), raw, compute=compute, n_threads=a.threads)
    load_s = time.perf_counter() - t0
    pv, warm = _inputs(a)
    enc(warm)
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        out = enc(pv)
        times.append(time.perf_counter() - t0)
    return times, [np.ascontiguousarray(o) for o in out], load_s


def run_worker_main(a):
    import numpy as np

    if a.worker == "prepare":
        res = prepare(a)
    else:
        fam = ENGINES[a.worker][0]
        times, maps, load_s = (worker_hf if fam == "hf" else worker_vlmfo1)(a, a.worker)
        path = os.path.join(a.workdir, f"davit-maps-{a.worker}.npz")
        np.savez(path, *[np.asarray(m, dtype=np.float32) for m in maps])
        res = {"times": times, "median_s": C.median(times), "load_s": load_s, "maps": path,
               "shapes": [list(np.shape(m)) for m in maps]}
    res["peak_rss_bytes"] = C.peak_rss_bytes()
    with open(a.out, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------- driver


def _load_maps(path):
    import numpy as np

    with np.load(path) as z:
        return [z[f"arr_{i}"].astype(np.float64) for i in range(4)]


def report(results, a, setup) -> str:
    import numpy as np

    ref = _load_maps(results[BASELINE]["maps"]) if "maps" in results.get(BASELINE, {}) else None
    base = results.get(BASELINE, {}).get("median_s")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "ERROR: " + r["error"], "", "", "", "", ""])
            continue
        err = ""
        if ref is not None:
            got = _load_maps(r["maps"])
            if [g.shape for g in got] == [x.shape for x in ref]:
                errs = [np.abs(g - x).max() / np.abs(x).max() for g, x in zip(got, ref)]
                r["stage_rel_err"] = errs
                err = f"{max(errs):.2e}"
            else:
                err = "shape!"
        reps = ", ".join(f"{t:.2f}" for t in r["times"])
        rows.append([name, f"{r['median_s']:.2f}", reps, f"{base / r['median_s']:.2f}x" if base else "",
                     f"{r['peak_rss_bytes'] / 1e9:.2f}", f"{r['load_s']:.1f}", err])
    head = (f"DaViT {'QUICK depths 1/1/1/1' if a.quick else 'large (depths 1/1/9/1)'}, pixel_values {setup['pixels']} "
            f"(squash of a {setup['image'][0]}x{setup['image'][1]} image); threads {a.threads}; "
            f"load avg {os.getloadavg()[0]:.2f}")
    table = C.markdown_table(["engine", "median s", "reps s", f"speed vs {BASELINE}", "peak RSS GB", "load s",
                              f"max rel err vs {BASELINE}"], rows)
    return head + "\n\n" + table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: one block pair per stage at 384 x 384")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="timed calls for vlmfo1 engines (median)")
    p.add_argument("--torch-reps", type=int, default=2, help="timed calls for transformers engines (median)")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help="comma list of: " + ", ".join(ENGINES))
    p.add_argument("--image", default=DEFAULT_IMAGE)
    p.add_argument("--width", type=int, default=1000, help="the image is first resized to width x height (image I)")
    p.add_argument("--height", type=int, default=750)
    p.add_argument("--size", type=int, default=None, help="aux square size (default 768, quick 384)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "vlmfo1_bench_davit"))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.size is None:
        a.size = 384 if a.quick else 768
    if a.worker:
        return run_worker_main(a)
    common = [os.path.abspath(__file__), "--threads", str(a.threads), "--reps", str(a.reps), "--torch-reps",
              str(a.torch_reps), "--image", a.image, "--width", str(a.width), "--height", str(a.height),
              "--size", str(a.size), "--seed", str(a.seed), "--workdir", a.workdir] + (["--quick"] if a.quick else [])
    setup, results = C.run_engines(p, a, a.engines, ENGINES, BASELINE, common, log=_log)
    text = report(results, a, setup)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"setup": setup, "results": results, "args": vars(a)}, f, indent=2)


if __name__ == "__main__":
    main()
