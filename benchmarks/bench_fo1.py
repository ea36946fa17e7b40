#!/usr/bin/env python
"""End-to-end VLM-FO1 benchmark: one full COCO detection request, vlmfo1 vs the OFFICIAL pipeline.

    bash benchmarks/make_official_venv.sh /tmp/fo1tv          # once: the official engines' interpreter
    python benchmarks/bench_fo1.py --official /tmp/fo1co --official-python /tmp/fo1tv/bin/python
    python benchmarks/bench_fo1.py --official /tmp/fo1co --official-python /tmp/fo1tv/bin/python --quick
    python benchmarks/bench_fo1.py ... --engines vlmfo1-bf16,vlmfo1-f32 --threads 4 --json out.json

The request (issue text): a random full-size checkpoint (`vlmfo1.testing.fo1.write_random_fo1(size="full",
seed=0)`, ~4.15B parameters, bf16, ~8.3 GB, written once into --workdir and reused), a COCO image resized to
1000 x 750 with Pillow and saved as PNG, 100 boxes (the image's ground-truth boxes scaled to the new size, then
random boxes from a fixed seed), the 80-category COCO prompt (`vlmfo1.fo1.coco_detection_prompt()`), 20 new tokens,
greedy. --quick: size="tiny" checkpoint, 10 boxes, 640 x 480 (smoke run only).

Engines, one subprocess each, one after another (so the peak RSS = VmHWM is that engine's own):
  official-fp32   official code, bf16 checkpoint loaded by its loader, then model.float(); greedy over
                  bf16-rounded logits (= the "reference" mode of tests/golden, ERRATA E1/E2) -- the reference
                  the generated tokens of every engine are compared with
  official-bf16   official code as shipped (bf16 modules)
  vlmfo1-bf16     vlmfo1.fo1.FO1, mode="reference", compute="bf16" (the default for bf16 weights)
  vlmfo1-f32      vlmfo1.fo1.FO1, mode="reference", compute="f32"
  vlmfo1-int8     dtype="int8": every linear layer of the four networks int8 (per-output-channel scales, activations
                  quantized per token; vlmfo1.quant), the convolutions as int8 matmuls
  vlmfo1-mixed    dtype="mixed": the language model int8, the vision side bf16 as stored
  vlmfo1-int4     dtype="int4": the language model's layers in 4-bit blocks of 32 (its output layer int8), the
                  vision side bf16
  (quantized weights are cached on disk by default, vlmfo1.weight_cache: "load s" is a cold or a warm load)

The official engines run under --official-python (torch + transformers) from the checkout given by --official; they
reuse the CPU shims of tests/golden/make_fo1_golden.py (imported, not copied: eager attention instead of
flash-attn, DaViT config restore, device cpu, and -- only where torchvision does not work -- a torchvision stub and
a pure-torch RoIAlign). Nothing of the official code is copied here.

"Best mode" of the official pipeline on a CPU = what it does as shipped, with only what a CPU cannot run replaced:
eager attention (flash-attn needs CUDA), and torchvision's own compiled RoIAlign (torchvision::roi_align, the op the
official HFRE imports) running on CPU tensors. The interpreter for that is a venv made by
benchmarks/make_official_venv.sh VENV_DIR: torch 2.14.1 + torchvision 0.29.1 from PyPI (on x86_64 CUDA builds,
which run on the CPU), every other package pinned to the versions of the golden-file venv (transformers 4.50.1,
the version the official code pins; see the script). --official-roi-align auto (default) uses the compiled op
when the real torchvision imports under --official-python and its roi_align runs on a CPU tensor, else falls back
to make_fo1_golden's pure-torch RoIAlign (e.g. /tmp/fo1ref: torch 2.13.0+cpu, whose torchvision ops do not load),
which computes the same op (tests/golden/check_roi_align.py --python VENV/bin/python: max difference a few
float32 ulps) but 150-300x slower in --quick runs, inflating the official "hfre" column. Each official engine's
JSON says which RoIAlign it ran ("roi_align", "roi_align_shim", "versions"); the table marks the RoIAlign column
(tv)/(shim) and names it under the table.

Stages (seconds; best total of --reps timed requests after --warmup untimed ones):
  prep    vlmfo1: FO1Result.timings["preprocess"] (image load, resize, both image processors, box mapping,
          tokenization, checks); official: mm_utils.prepare_inputs
  vit     Qwen2.5-VL ViT (official: forward of the vision tower module)
  davit   DaViT (official: forward of the aux vision tower module)
  hfre    HFRE region features + mm_projector + mm_projector_aux (official: HFREModule.__call__ + projectors)
  RoIAlign (official only) the part of hfre spent in roi_align; "(tv)" = torchvision's compiled op (best mode);
          "(shim)" = make_fo1_golden's pure-torch RoIAlign, used when torchvision's compiled ops do not load --
          much slower than torchvision, so subtract it from the official total for a fair comparison
  prefill LLM prefill (official: start of generate -> first logits, minus vit/davit/hfre; vlmfo1:
          FO1Result.timings["prefill"], which includes splicing the image/region tokens and the M-RoPE positions)
  decode  the rest (official: first logits -> end of generate; vlmfo1: sampling, decode steps, answer parsing)
Speed ratio = (best total among the official engines run) / (engine total); a second ratio subtracts the RoIAlign
shim time from the official totals (the same as the first when they ran torchvision's op). Peak RSS includes the load.

Work and rates: every vlmfo1 engine reports FO1Result.flops (the matmuls and attention products its C core counted
per stage, tests/test_flops.py checks them against torch's FlopCounterMode) and probes the peak of every instruction
family at its start (_core.peak, csrc/peak.c). The second table gives each engine's TFLOP/s per stage on that work
(the same request is the same work for the official engines) and its % of the peak of the family the stage's
matmuls run on (official bf16: oneDNN's AVX512-BF16; fp32: FMA; int8/int4 weights: VNNI); decode also as GB/s of
weights read per step against the probed read bandwidth.
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
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, REPO)
import _common as C  # noqa: E402

DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "coco_tiny")
DEFAULT_IMAGE = "000000404484.jpg"     # 320 x 240, 4:3 like 1000 x 750
ENGINES = ["official-fp32", "official-bf16", "vlmfo1-bf16", "vlmfo1-f32", "vlmfo1-int8", "vlmfo1-mixed", "vlmfo1-int4"]
VLMFO1_DTYPE = {"vlmfo1-bf16": (None, "bf16"), "vlmfo1-f32": (None, "f32"), "vlmfo1-int8": ("int8", "bf16"),
                "vlmfo1-mixed": ("mixed", "bf16"), "vlmfo1-int4": ("int4", "bf16")}   # (dtype=, compute=)
DEFAULT_ENGINES = "official-fp32,official-bf16,vlmfo1-bf16"
STAGES = ["prep", "vit", "davit", "hfre", "prefill", "decode"]


def _log(msg):
    print(f"[bench_fo1] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# setup (main process: numpy, Pillow, vlmfo1)

def checkpoint_path(a) -> str:
    # the official loader needs "vlm-fo1" and "qwen2.5-vl" in the folder name (builder.py)
    return C.fo1_checkpoint_path(a.workdir, a.size, a.seed)


def prepare(a) -> dict:
    import numpy as np
    from PIL import Image
    from vlmfo1.fo1 import coco_detection_prompt

    ckpt = C.fo1_random_checkpoint(a.workdir, a.size, a.seed, log=_log)
    n_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))

    ann = json.load(open(os.path.join(DATA, "annotations", "instances_val2017.json")))
    info = next(i for i in ann["images"] if i["file_name"] == a.image)
    sx, sy = a.width / info["width"], a.height / info["height"]
    boxes = [[x * sx, y * sy, (x + w) * sx, (y + h) * sy] for x, y, w, h in
             (an["bbox"] for an in ann["annotations"] if an["image_id"] == info["id"])][:a.boxes]
    rng = np.random.default_rng(a.seed)
    while len(boxes) < a.boxes:
        w = rng.uniform(16, 0.5 * a.width)
        h = rng.uniform(16, 0.5 * a.height)
        x = rng.uniform(0, a.width - w)
        y = rng.uniform(0, a.height - h)
        boxes.append([x, y, x + w, y + h])
    boxes = [[round(float(v), 2) for v in b] for b in boxes]
    img_path = os.path.join(a.workdir, f"{os.path.splitext(a.image)[0]}_{a.width}x{a.height}.png")
    Image.open(os.path.join(DATA, "val2017", a.image)).convert("RGB").resize(
        (a.width, a.height), Image.BICUBIC).save(img_path)
    req = {"checkpoint": ckpt, "checkpoint_bytes": n_bytes, "size": a.size, "image": img_path,
           "image_size": [a.width, a.height], "source_image": a.image, "boxes": boxes, "n_gt_boxes":
           sum(1 for an in ann["annotations"] if an["image_id"] == info["id"]),
           "prompt": coco_detection_prompt(), "max_new_tokens": a.max_new_tokens, "threads": a.threads,
           "reps": a.reps, "warmup": a.warmup}
    with open(os.path.join(a.workdir, f"request_{a.size}.json"), "w") as f:
        json.dump(req, f, indent=1)
    return req


# ----------------------------------------------------------------------------------------------------------------
# workers

def worker_vlmfo1(req, engine, a) -> dict:
    from vlmfo1.fo1 import FO1

    dtype, compute = VLMFO1_DTYPE[engine]
    peaks = C.probe_peaks(a.threads)   # before the load: nothing else runs in this process
    t0 = time.perf_counter()
    fo1 = FO1.load(req["checkpoint"], mode="reference", compute=compute, dtype=dtype, n_threads=a.threads)
    load_s = time.perf_counter() - t0
    rss_load = C.proc_status_kib("VmRSS") * 1024
    runs = []
    for i in range(a.warmup + a.reps):
        t = time.perf_counter()
        res = fo1.generate(req["image"], req["boxes"], req["prompt"], max_new_tokens=req["max_new_tokens"])
        total = time.perf_counter() - t
        tm = res.timings          # the engine's own per-stage seconds (vlmfo1.results.STAGES); no image cache
        st = {"prep": tm["preprocess"], **{k: tm[k] for k in ("vit", "davit", "hfre", "prefill")}}
        st["decode"] = total - sum(st.values())      # decode steps + sampling + answer parsing
        _log(f"{engine} run {i}{' (warm-up)' if i < a.warmup else ''}: {total:.2f} s")
        if i >= a.warmup:
            runs.append({"total_s": total, "stages_s": st, "tokens": [int(x) for x in res.token_ids],
                         "text": res.text, "flops": res.flops, "decode_loop_s": tm["decode"]})
    best = min(runs, key=lambda r: r["total_s"])
    return {"engine": engine, "load_s": load_s, "rss_after_load": rss_load, **best,
            "all_totals_s": [r["total_s"] for r in runs], "peaks": peaks,
            "families": C.stage_families(dtype, compute, peaks), "decode_bytes": C.decode_stream_bytes(fo1.decoder)}


def worker_official(req, engine, a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.join(REPO, "tests", "golden"))
    import make_fo1_golden as G          # CPU shims for the official code (installed by G.Official)
    from transformers import LogitsProcessor, LogitsProcessorList

    off = G.Official(a.official, roi_align_impl=a.official_roi_align)     # "auto": compiled if it runs, else shim
    t0 = time.perf_counter()
    tokenizer, model, procs = off.load(req["checkpoint"])
    if engine == "official-fp32":
        model.float()
    model.eval()
    load_s = time.perf_counter() - t0
    rss_load = C.proc_status_kib("VmRSS") * 1024
    m = model.get_model()
    acc: dict = {}
    marks: list = []

    def timed(mod, key):
        def pre(*_):
            acc["_t0_" + key] = time.perf_counter()

        def post(*_):
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - acc.pop("_t0_" + key)
        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)

    timed(m.get_vision_tower(), "vit")
    timed(m.get_vision_tower_aux(), "davit")
    for mod in (m.mm_projector, m.mm_projector_aux):
        timed(mod, "hfre")
    # HFREModule overrides __call__ (module hooks do not fire): wrap it on the class, as make_fo1_golden does;
    # also time the RoIAlign shim separately (it is bound at import time in the HFRE module's namespace)
    hfre_call = off.HFRE.__call__

    def hfre(self, *x, **kw):
        t = time.perf_counter()
        try:
            return hfre_call(self, *x, **kw)
        finally:
            acc["hfre"] = acc.get("hfre", 0.0) + time.perf_counter() - t
    off.HFRE.__call__ = hfre
    hmod = sys.modules[off.HFRE.__module__]
    ra = hmod.roi_align

    def roi_align(*x, **kw):
        t = time.perf_counter()
        try:
            return ra(*x, **kw)
        finally:
            acc["roi_align"] = acc.get("roi_align", 0.0) + time.perf_counter() - t
    hmod.roi_align = roi_align
    shim = ra is G.roi_align
    assert shim == (off.roi_align_impl == "shim"), (off.roi_align_impl, ra)
    import torchvision
    tv_version = getattr(torchvision, "__version__", None) if not isinstance(torchvision, G._StubModule) else None
    fp32_ref = engine == "official-fp32"

    class Mark(LogitsProcessor):
        """Timestamps every decoding step; for the fp32 reference, greedy over bf16-rounded logits (E2)."""
        def __call__(self, input_ids, scores):
            marks.append(time.perf_counter())
            return scores.to(torch.bfloat16).float() if fp32_ref else scores

    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": req["image"]}},
                                             {"type": "text", "text": req["prompt"]}], "bbox_list": req["boxes"]}]
    runs = []
    for i in range(a.warmup + a.reps):
        acc.clear()
        marks.clear()
        t = time.perf_counter()
        kw = off.mm_utils.prepare_inputs(req["checkpoint"], model, procs, tokenizer, messages, device="cpu",
                                         max_tokens=req["max_new_tokens"], top_p=0.05, temperature=0.0,
                                         do_sample=False)
        kw.pop("streamer", None)
        kw["logits_processor"] = LogitsProcessorList([Mark()])
        t_gen = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**kw)
        t_end = time.perf_counter()
        seq = out.sequences if hasattr(out, "sequences") else out
        gen = seq[0, kw["inputs"].shape[1]:]      # sequences hold the prompt ids, then the new tokens
        st = {k: acc.get(k, 0.0) for k in ("vit", "davit", "hfre", "roi_align")}
        st["prep"] = t_gen - t
        st["prefill"] = marks[0] - t_gen - st["vit"] - st["davit"] - st["hfre"]
        st["decode"] = t_end - marks[0]
        total = t_end - t
        _log(f"{engine} run {i}{' (warm-up)' if i < a.warmup else ''}: {total:.2f} s")
        if i >= a.warmup:
            toks = [int(x) for x in gen]
            runs.append({"total_s": total, "stages_s": st, "tokens": toks,
                         "text": tokenizer.decode(toks).strip(), "n_steps": len(marks)})
    best = min(runs, key=lambda r: r["total_s"])
    import transformers
    return {"engine": engine, "load_s": load_s, "rss_after_load": rss_load, **best,
            "all_totals_s": [r["total_s"] for r in runs], "official_commit": off.commit, "roi_align_shim": shim,
            "roi_align": ("shim (make_fo1_golden.roi_align, pure torch)" if shim else
                          f"torchvision {tv_version} (compiled torchvision::roi_align)"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "torchvision": tv_version or "stub (does not import)"}}


def run_worker_main(a):
    with open(a.request) as f:
        req = json.load(f)
    if a.worker.startswith("official"):
        res = worker_official(req, a.worker, a)
    else:
        res = worker_vlmfo1(req, a.worker, a)
    res["peak_rss"] = C.peak_rss_bytes()
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


def spawn(python, argv, threads, timeout) -> dict:
    fd, out = tempfile.mkstemp(suffix=".json", prefix="vlmfo1_bench_fo1_")
    os.close(fd)
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    try:
        t0 = time.perf_counter()
        try:
            p = subprocess.run([python, os.path.abspath(__file__)] + argv + ["--out", out], env=env,
                               timeout=timeout, stdout=sys.stderr)     # keep our stdout for the table
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if p.returncode != 0:
            return {"error": f"worker exited with status {p.returncode}"}
        with open(out) as f:
            res = json.load(f)
        res["wall_s"] = time.perf_counter() - t0
        return res
    finally:
        os.unlink(out)


# ----------------------------------------------------------------------------------------------------------------
# report

def _agree(tokens, ref):
    if ref is None:
        return "n/a"
    if tokens == ref:
        return f"yes ({len(ref)})"
    n = next((i for i, (x, y) in enumerate(zip(tokens, ref)) if x != y), min(len(tokens), len(ref)))
    return f"no: first {n} of {len(ref)}"


def report(results, req) -> str:
    ok = {e: r for e, r in results.items() if "error" not in r}
    off = [r["total_s"] for e, r in ok.items() if e.startswith("official")]
    best = min(off) if off else None
    off_ex = [r["total_s"] - (r["stages_s"].get("roi_align", 0.0) if r.get("roi_align_shim") else 0.0)
              for e, r in ok.items() if e.startswith("official")]
    best_ex = min(off_ex) if off_ex else None
    ref = ok.get("official-fp32", {}).get("tokens")
    gib = 1024 ** 3
    rows = []
    for e, r in results.items():
        if "error" in r:
            rows.append([e] + ["-"] * (len(STAGES) + 7) + [r["error"]])
            continue
        st = r["stages_s"]
        ra = (f"{st['roi_align']:.2f}" + (" (shim)" if r.get("roi_align_shim") else " (tv)")
              if "roi_align" in st else "-")
        rows.append([e] + [f"{st[s]:.2f}" for s in STAGES] +
                    [ra, f"{r['total_s']:.2f}", f"{best / r['total_s']:.2f}x" if best else "n/a",
                     f"{best_ex / r['total_s']:.2f}x" if best_ex else "n/a",
                     f"{r['peak_rss'] / gib:.2f}", f"{r['load_s']:.1f}", _agree(r["tokens"], ref)])
    head = ["engine"] + [f"{s} s" for s in STAGES] + ["RoIAlign s (in hfre)", "total s", "vs official best", "vs official best w/o shim", "peak RSS GiB", "load s",
                                                      "tokens = official-fp32"]
    w, h = req["image_size"]
    lines = [f"VLM-FO1 detection request: random {req['size']} checkpoint "
             f"({req['checkpoint_bytes'] / 1e9:.2f} GB bf16), {w}x{h} PNG, {len(req['boxes'])} boxes "
             f"({min(req['n_gt_boxes'], len(req['boxes']))} GT), COCO 80-category prompt, "
             f"{req['max_new_tokens']} new tokens greedy, {req['threads']} threads, best of {req['reps']}"
             f" (warm-up {req['warmup']})", "", C.markdown_table(head, rows)]
    for e, r in ok.items():
        if "roi_align" in r:
            v = r.get("versions", {})
            lines.append(f"- {e}: RoIAlign = {r['roi_align']}; torch {v.get('torch')}, transformers "
                         f"{v.get('transformers')}")
    for e, r in ok.items():
        lines.append(f"- {e}: {r['text'][:100]!r}")
    lines += work_report(ok, req)
    return "\n".join(lines)


def work_report(ok: dict, req: dict) -> list:
    """Per engine and stage: TFLOP/s on the work the vlmfo1 C core counted for this request (FO1Result.flops) and
    its % of the peak of the family the stage's matmuls run on (probed by a vlmfo1 worker in this run)."""
    ours = [r for e, r in ok.items() if e.startswith("vlmfo1") and r.get("flops")]
    if not ours:
        return []
    flops, peaks = ours[0]["flops"], ours[0]["peaks"]
    fam_off = {"official-bf16": C.gemm_family("bf16", "bf16", peaks), "official-fp32": "fma32"}
    rows = []
    for e, r in ok.items():
        fams = r.get("families") or {s: fam_off[e] for s in C.STAGES_WORK}
        tm = dict(r["stages_s"])
        if "decode_loop_s" in r:
            tm["decode"] = r["decode_loop_s"]
        # the decode work depends on how many tokens the engine decoded: its own count, or that of a vlmfo1 engine
        # that decoded as many tokens (else not shown)
        same = [o["flops"] for o in ours if len(o["tokens"]) == len(r["tokens"])]
        fl = dict(flops, decode=r["flops"]["decode"] if r.get("flops") else same[0]["decode"] if same else None)
        cells = []
        for s in C.STAGES_WORK:
            if fl[s] is None or not tm.get(s):
                cells.append("-")
                continue
            rate = (fl[s]["gemm"] + fl[s]["attention"]) / tm[s] / 1e9
            pk = peaks.get(fams[s])
            cells.append(f"{rate / 1e3:.3f} ({100 * rate / pk:.0f}% {fams[s]})" if pk else f"{rate / 1e3:.3f}")
        bw = ""
        if r.get("decode_bytes") and tm.get("decode") and len(r["tokens"]) > 1:
            g = r["decode_bytes"] * (len(r["tokens"]) - 1) / tm["decode"] / 1e9   # the first token: from the prefill
            bw = f"{g:.1f} ({100 * g / peaks['bandwidth']:.0f}%)"
        rows.append([e] + cells + [bw])
    work = ", ".join(f"{s} {(flops[s]['gemm'] + flops[s]['attention']) / 1e12:.3f}" for s in C.STAGES_WORK)
    return ["", f"Work of the request (TFLOP, matmuls + attention products, FO1Result.flops of {ours[0]['engine']}): "
            f"{work}. TFLOP/s per stage on that work (% of the probed peak of the family the stage's matmuls run on); "
            "decode: GB/s of weights read per decode step (% of the probed read bandwidth; vlmfo1 engines):", "",
            C.markdown_table(["engine"] + [f"{s} TFLOP/s" for s in C.STAGES_WORK] + ["decode GB/s"], rows), "",
            C.peaks_line(peaks, req["threads"])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", default="/tmp/fo1co", help="om-ai-lab/VLM-FO1 checkout (holds vlm_fo1/)")
    p.add_argument("--official-python", default="/tmp/fo1ref/bin/python",
                   help="interpreter with torch + transformers for the official engines (best mode: a venv made by "
                        "benchmarks/make_official_venv.sh, e.g. /tmp/fo1tv/bin/python)")
    p.add_argument("--official-roi-align", choices=["auto", "torchvision", "shim"], default="auto",
                   help="RoIAlign of the official engines: torchvision's compiled op when it runs on CPU tensors "
                        "under --official-python, else the pure-torch shim (auto); or force one (torchvision: fail "
                        "if it does not run)")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help="comma list of: " + ", ".join(ENGINES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny checkpoint, 10 boxes, 640 x 480")
    p.add_argument("--boxes", type=int, default=None, help="default 100 (quick 10)")
    p.add_argument("--width", type=int, default=None, help="default 1000 (quick 640)")
    p.add_argument("--height", type=int, default=None, help="default 750 (quick 480)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="coco_tiny val2017 file name")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--reps", type=int, default=1, help="timed requests per engine (the best is reported)")
    p.add_argument("--warmup", type=int, default=0, help="untimed requests per engine before the timed ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/vlmfo1_bench_fo1")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="per engine, seconds")
    p.add_argument("--json", help="write all results here")
    C.add_worker_args(p, "--request")
    a = p.parse_args(argv)
    if a.worker:
        return run_worker_main(a)
    a.size = "tiny" if a.quick else "full"
    a.boxes = a.boxes or (10 if a.quick else 100)
    a.width = a.width or (640 if a.quick else 1000)
    a.height = a.height or (480 if a.quick else 750)
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        p.error(f"unknown engines {bad}; choose from {ENGINES}")
    if not 1 <= a.boxes <= 100:
        p.error("--boxes must be in 1..100")
    # official fp32 first: it is the token reference
    engines.sort(key=ENGINES.index)
    req = prepare(a)
    req_path = os.path.join(a.workdir, f"request_{a.size}.json")
    results = {}
    for e in engines:
        _log(f"engine {e}")
        py = a.official_python if e.startswith("official") else sys.executable
        results[e] = spawn(py, ["--worker", e, "--request", req_path, "--threads", str(a.threads),
                                "--reps", str(a.reps), "--warmup", str(a.warmup), "--official", a.official,
                                "--official-roi-align", a.official_roi_align],
                           a.threads, a.timeout)
    text = report(results, req)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"request": {k: v for k, v in req.items() if k != "boxes"}, "boxes": req["boxes"],
                       "engines": engines, "results": results}, f, indent=1)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
