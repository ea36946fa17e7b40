#!/usr/bin/env python
"""UPN benchmark: vlmfo1's CPU UPN (fp32 / bf16 / int8 weights) against the official UPN code on the CPU (eager
torch fp32 with its pure-PyTorch deformable-attention fallback), random UPN-large weights, one 1000 x 750 image
(a COCO image resized; the network sees it at 1066 x 800), per stage, in the same run; optionally the whole
image -> UPN -> VLM-FO1 -> boxes request with a full-size random VLM-FO1 checkpoint.

    python benchmarks/bench_upn.py --official /path/to/VLM-FO1              # vlmfo1 engines + the official code
    python benchmarks/bench_upn.py --engines vlmfo1-fp32,vlmfo1-bf16        # without the official code
    python benchmarks/bench_upn.py --engines vlmfo1-bf16,e2e --fo1 DIR      # + the whole request (FO1 detect)

The official engine runs under --official-python (a venv with torch 2.13.0, mmengine, timm and torchvision 0.28.0
installed without deps, as tests/golden/README.md "UPN" describes) and imports the checkout given by --official
through tests/golden/make_upn_golden.py's shims (nothing of it is copied here). Every engine runs in its own process,
one after another, with the same image and thread count: one untimed warm-up, then --reps timed runs; medians are
reported with the peak RSS (VmHWM) of each process, the achieved matmul GFLOP/s of each stage and its fraction of the
CPU's fp32-FMA / bf16-dot peak measured in the same run (`vlmfo1._core.peak`). Outputs are compared with the official
engine's (same queries only when the top-900 order agrees; random weights leave near-ties, see the README).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.append(ROOT)
import _common as C  # noqa: E402

ENGINES = ("official-fp32", "vlmfo1-fp32", "vlmfo1-bf16", "vlmfo1-int8", "e2e")
DEFAULT_IMAGE = "/work/shared/data/coco_tiny/val2017/000000261888.jpg"
STAGES = ("backbone", "neck", "encoder", "two_stage", "decoder")


# ---------------------------------------------------------------------------------------------------------- flops

def matmul_flops(cfg: dict, H: int, W: int) -> dict:
    """Matmul (and attention product) FLOPs per stage of UPN on an H x W network input (2 per multiply-add)."""
    sw = cfg["swin"]
    E, ws = sw["embed_dim"], sw["window_size"]
    d, F, Q = cfg["d_model"], cfg["d_ffn"], cfg["num_queries"]
    hlp = cfg["n_heads"] * cfg["n_levels"] * cfg["n_points"]
    h, w = -(-H // 4), -(-W // 4)
    hs, wsz = [], []
    for _ in range(4):
        hs.append(h)
        wsz.append(w)
        h, w = (h + 1) // 2, (w + 1) // 2
    bb = 2 * hs[0] * wsz[0] * 48 * E
    for s in range(4):
        Cs, N = E << s, hs[s] * wsz[s]
        Np = -(-hs[s] // ws) * ws * (-(-wsz[s] // ws) * ws)
        per = 2 * Np * Cs * 3 * Cs + 2 * 2 * Np * ws * ws * Cs + 2 * Np * Cs * Cs + 2 * 2 * N * Cs * 4 * Cs
        bb += sw["depths"][s] * per
        if s < 3:
            bb += 2 * hs[s + 1] * wsz[s + 1] * 4 * Cs * 2 * Cs
    h4, w4 = (hs[3] - 1) // 2 + 1, (wsz[3] - 1) // 2 + 1
    levels = [(hs[l], wsz[l]) for l in range(4)] + [(h4, w4)]
    S = sum(a * b for a, b in levels)
    neck = sum(2 * hs[l] * wsz[l] * (E << l) * d for l in range(4)) + 2 * h4 * w4 * 9 * (E << 3) * d
    enc = cfg["enc_layers"] * 2 * S * d * (d + 3 * hlp + d + 2 * F)
    two = 2 * S * d * d + 2 * Q * (2 * d * d + 4 * d)
    dec = cfg["dec_layers"] * (2 * S * d * d + 2 * Q * d * (3 * d + 3 * hlp + d + d + 2 * F) + 4 * Q * Q * d +
                               2 * Q * (2 * d * d + d * d))
    return {"backbone": bb, "neck": neck, "encoder": enc, "two_stage": two, "decoder": dec, "tokens": S}


# ---------------------------------------------------------------------------------------------------------- workers

def prepare(a) -> dict:
    from PIL import Image

    from vlmfo1.testing.upn import write_random_upn
    os.makedirs(a.workdir, exist_ok=True)
    ck = os.path.join(a.workdir, "upn_large_random_fp32.safetensors")
    if not os.path.exists(ck):
        write_random_upn(ck + ".partial.safetensors", size="full", seed=0, dtype="float32")
        os.replace(ck + ".partial.safetensors", ck)
    img = os.path.join(a.workdir, "image_1000x750.png")
    if not os.path.exists(img):
        Image.open(a.image).convert("RGB").resize((1000, 750), Image.BICUBIC).save(img)
    return {"checkpoint": ck, "image": img}


def worker_vlmfo1(a, dtype: str) -> dict:

    from vlmfo1 import _core
    from vlmfo1.upn import UPN, preprocess, to_proposals
    t0 = time.perf_counter()
    upn = UPN.from_pretrained(a.checkpoint, n_threads=a.threads, dtype=dtype)
    load = time.perf_counter() - t0
    pixels, size = preprocess(a.image_path)
    upn.forward(pixels)                                   # warm-up
    runs = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        pixels, size = preprocess(a.image_path)
        t1 = time.perf_counter()
        logits, boxes = upn.forward(pixels)
        t2 = time.perf_counter()
        to_proposals(logits, boxes, size)
        t3 = time.perf_counter()
        runs.append(dict(upn.seconds, preprocess=t1 - t0, forward=t2 - t1, postprocess=t3 - t2, total=t3 - t0))
    _, _, taps = upn.forward(pixels, taps=True)
    return {"load_s": load, "runs": runs, "input_hw": list(pixels.shape[1:]), "logits": logits.tolist(),
            "boxes": boxes.tolist(), "topk": taps["topk"].tolist(), "peak_rss_bytes": C.peak_rss_bytes(),
            "image_wh": list(size), "peak_fma32": _core.peak("fma32", a.threads),
            "peak_bf16dp": _core.peak("bf16dp", a.threads), "peak_vnni": _core.peak("vnni", a.threads)}


def worker_e2e(a) -> dict:
    from vlmfo1.results import COCO_CATEGORIES
    from vlmfo1.fo1 import VLMFO1
    from vlmfo1.upn import UPN
    upn = UPN.from_pretrained(a.checkpoint, n_threads=a.threads, dtype="bfloat16")
    model = VLMFO1.from_pretrained(a.fo1, threads=a.threads)
    model.detect(a.image_path, ["person"], proposals=upn, max_new_tokens=2)     # warm-up
    runs = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        props = upn(a.image_path)
        t1 = time.perf_counter()
        model.detect(a.image_path, list(COCO_CATEGORIES), boxes=props, max_new_tokens=a.max_new_tokens)
        t2 = time.perf_counter()
        runs.append({"upn": t1 - t0, "fo1": t2 - t1, "total": t2 - t0, "n_boxes": len(props)})
    return {"runs": runs, "peak_rss_bytes": C.peak_rss_bytes()}


OFFICIAL_SCRIPT = r'''
import json, sys, time
sys.path.insert(0, {golden!r})
import numpy as np, torch
torch.set_num_threads({threads})
from make_upn_golden import Official
from vlmfo1.testing.upn import upn_config
from vlmfo1.safetensors import Checkpoint
off = Official({official!r})
model = off.build(upn_config("full")).eval()
ck = Checkpoint({checkpoint!r})
sd = {{k: torch.from_numpy(np.array(ck.get(k))) for k in ck.keys()}}
model.load_state_dict(sd, strict=True)
del sd
wrapper = object.__new__(off.UPNWrapper)
wrapper.model = model
marks = {{}}
def pre(name):
    return lambda m, i: marks.__setitem__(name + "0", time.perf_counter())
def post(name):
    return lambda m, i, o: marks.__setitem__(name + "1", time.perf_counter())
for name, mod in (("backbone", model.backbone), ("encoder", model.transformer.encoder),
                  ("decoder", model.transformer.decoder)):
    mod.register_forward_pre_hook(pre(name))
    mod.register_forward_hook(post(name))
def once():
    t0 = time.perf_counter()
    imgs, sizes = wrapper.construct_input([{image!r}])
    t1 = time.perf_counter()
    with torch.no_grad():   # UPNWrapper._inference without its .to("cuda")
        out = model(off.U.nested_tensor_from_tensor_list(imgs), "fine_grained_prompt")
    t2 = time.perf_counter()
    res = wrapper.postprocess({{"pred_logits": out["pred_logits"].clone(), "pred_boxes": out["pred_boxes"].clone()}}, sizes)
    wrapper.filter(res, 0.3, 0.8)
    t3 = time.perf_counter()
    r = dict(preprocess=t1 - t0, forward=t2 - t1, postprocess=t3 - t2, total=t3 - t0,
             backbone=marks["backbone1"] - marks["backbone0"], encoder=marks["encoder1"] - marks["encoder0"],
             decoder=marks["decoder1"] - marks["decoder0"])
    r["neck"] = marks["encoder0"] - marks["backbone1"]
    r["two_stage"] = marks["decoder0"] - marks["encoder1"]
    return r, out, imgs
once()
runs = []
for _ in range({reps}):
    r, out, imgs = once()
    runs.append(r)
peak = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        peak = int(line.split()[1]) * 1024
json.dump({{"runs": runs, "input_hw": list(imgs[0].shape[1:]), "logits": out["pred_logits"][0, :, 0].tolist(),
           "boxes": out["pred_boxes"][0].tolist(), "peak_rss_bytes": peak}}, open({out!r}, "w"))
'''


def run_official(a, setup) -> dict:
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    code = OFFICIAL_SCRIPT.format(golden=os.path.join(ROOT, "tests", "golden"), threads=a.threads,
                                  official=a.official, checkpoint=setup["checkpoint"], image=setup["image"],
                                  reps=a.reps, out=out)
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        p = subprocess.run([a.official_python, "-c", code], env=env, timeout=a.timeout)
        if p.returncode:
            return {"error": f"official worker exited with status {p.returncode}"}
        with open(out) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.timeout:.0f} s"}
    finally:
        os.unlink(out)


def run_self(a, worker: str, setup) -> dict:
    argv = [os.path.abspath(__file__), "--worker", worker, "--checkpoint", setup["checkpoint"], "--image-path",
            setup["image"], "--threads", str(a.threads), "--reps", str(a.reps), "--workdir", a.workdir,
            "--max-new-tokens", str(a.max_new_tokens)] + (["--fo1", a.fo1] if a.fo1 else [])
    return C.run_worker(argv, a.timeout)


# ---------------------------------------------------------------------------------------------------------- report

def _proposals(r, size):
    """the filtered proposals (score >= 0.3, NMS 0.8, top 100) of an engine's raw outputs"""
    import numpy as np

    from vlmfo1.upn import to_proposals
    return to_proposals(np.asarray(r["logits"], np.float32), np.asarray(r["boxes"], np.float32), size)


def _agreement(p, q) -> str:
    """share of q's boxes that p has at IoU >= 0.9, and the max coordinate difference of those pairs"""
    import numpy as np
    if not len(q):
        return "n/a"
    a, b = p.boxes[:, None, :], q.boxes[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    iou = iw * ih / np.maximum(area(a) + area(b) - iw * ih, 1e-9)
    hit = iou.max(0) >= 0.9
    return f"{hit.sum()}/{len(q)}"


def report(a, setup, results) -> str:
    import numpy as np
    from vlmfo1.testing.upn import upn_config
    lines = []
    any_v = next((r for r in results.values() if "peak_fma32" in r), None)
    hw = next((r["input_hw"] for r in results.values() if "input_hw" in r), None)
    fl = matmul_flops(upn_config("full"), *hw) if hw else None
    if any_v:
        lines.append(f"CPU peaks on {a.threads} threads (measured in the vlmfo1 workers): fp32 FMA "
                     f"{any_v['peak_fma32']:.0f} GFLOP/s, bf16 dot {any_v['peak_bf16dp']:.0f} GFLOP/s, int8 VNNI "
                     f"{any_v.get('peak_vnni', 0):.0f} GOP/s (each stage's % is of the family its matmuls use)")
    if fl:
        lines.append(f"network input {hw[1]}x{hw[0]} (W x H), {fl['tokens']} encoder tokens; matmul GFLOP per stage: " +
                     ", ".join(f"{k} {fl[k] / 1e9:.0f}" for k in STAGES))
    base = results.get("official-fp32", {})
    base_total = C.median([r["total"] for r in base["runs"]]) if "runs" in base else None
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "error: " + r["error"]] + [""] * 11)
            continue
        if name == "e2e":
            continue
        med = {k: C.median([x[k] for x in r["runs"]]) for k in r["runs"][0]}
        family = "peak_bf16dp" if name.endswith("bf16") else "peak_vnni" if name.endswith("int8") else "peak_fma32"
        peak = any_v.get(family, 0) if any_v else 0
        frac = lambda k: (f" ({fl[k] / med[k] / 1e9:.0f} GF/s, {100 * fl[k] / med[k] / 1e9 / peak:.0f}%)"  # noqa
                          if fl and peak and med.get(k) else "")
        err = agree = ""
        if "logits" in r and "logits" in base and name != "official-fp32":
            err = f"{np.abs(np.asarray(r['boxes']) - np.asarray(base['boxes'])).max():.1e}"
            size = tuple(any_v.get("image_wh", (1000, 750))) if any_v else (1000, 750)
            agree = _agreement(_proposals(r, size), _proposals(base, size))
        rows.append([name] + [f"{med.get(k, float('nan')):.2f}{frac(k) if k in STAGES else ''}"
                              for k in ("preprocess",) + STAGES + ("postprocess", "total")] +
                    [f"{base_total / med['total']:.2f}x" if base_total else "", f"{r['peak_rss_bytes'] / 1e9:.2f}",
                     err, agree])
    lines.append(C.markdown_table(["engine", "preprocess s", "backbone s", "neck s", "encoder s", "two-stage s",
                                   "decoder s", "postprocess s", "total s", "speed vs official", "peak RSS GB",
                                   "max box err vs official", "official proposals found (IoU >= 0.9)"], rows))
    lines.append("(box error: the raw 900 boxes slot by slot, meaningful only where the top-900 order agrees, which "
                 "random weights leave to near-ties; the last column compares the filtered proposals)")
    if "e2e" in results and "runs" in results["e2e"]:
        r = results["e2e"]
        med = {k: C.median([x[k] for x in r["runs"]]) for k in ("upn", "fo1", "total")}
        lines.append(f"\nimage -> UPN (bf16) -> VLM-FO1 detect (COCO-80 prompt, {r['runs'][0]['n_boxes']} boxes, "
                     f"{a.max_new_tokens} new tokens): UPN {med['upn']:.2f} s + FO1 {med['fo1']:.2f} s = "
                     f"{med['total']:.2f} s (median of {len(r['runs'])}), peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="official-fp32,vlmfo1-fp32,vlmfo1-bf16,vlmfo1-int8")
    ap.add_argument("--official", help="an om-ai-lab/VLM-FO1 checkout (for official-fp32)")
    ap.add_argument("--official-python", default="/tmp/upnref/bin/python")
    ap.add_argument("--fo1", help="a full-size VLM-FO1 checkpoint folder (for e2e; `vlmfo1 random-checkpoint --fo1 "
                                  "--size full`)")
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vlmfo1_bench_upn"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="also write the raw results there")
    ap.add_argument("--report-from", metavar="JSON", help="print the report of an earlier --json run and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--image-path", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        res = worker_e2e(a) if a.worker == "e2e" else worker_vlmfo1(a, a.worker.split("-")[1].replace(
            "fp32", "float32").replace("bf16", "bfloat16"))
        with open(a.out, "w") as f:
            json.dump(res, f)
        return 0
    if a.report_from:
        with open(a.report_from) as f:
            saved = json.load(f)
        print(report(a, saved["setup"], saved["results"]))
        return 0
    names = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in names if e not in ENGINES]
    if bad:
        ap.error(f"unknown engine(s) {bad}; choose from {ENGINES}")
    if "official-fp32" in names and not a.official:
        ap.error("official-fp32 needs --official CHECKOUT")
    if "e2e" in names and not a.fo1:
        ap.error("e2e needs --fo1 CHECKPOINT")
    print("preparing the checkpoint and the image ...", flush=True)
    setup = prepare(a)
    results = {}
    for e in names:
        print(f"running {e} ...", flush=True)
        results[e] = run_official(a, setup) if e == "official-fp32" else run_self(a, e, setup)
        print(f"  {e}: " + (results[e].get("error") or f"{C.median([r['total'] for r in results[e]['runs']]):.2f} s"),
              flush=True)
    text = report(a, setup, results)
    print("\n" + text)
    print(f"\ncommand: python benchmarks/bench_upn.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"setup": setup, "results": results, "report": text}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
