#!/usr/bin/env python
"""Request-level benchmark: a loaded VLM-FO1 model serving request after request, and prefix caching.

    python benchmarks/bench_requests.py                 # full size (random bf16 checkpoint, ~8.3 GB, made once)
    python benchmarks/bench_requests.py --quick         # smoke run: tiny checkpoint, 10 boxes, 640 x 480
    python benchmarks/bench_requests.py --json out.json --requests 10 --threads 2

The request is bench_fo1.py's: a random full-size checkpoint (`write_random_fo1(size="full", seed=0)`), a COCO image
resized to 1000 x 750, 100 boxes (its ground-truth boxes, then random ones from a fixed seed), the 80-category COCO
prompt, 20 new tokens, greedy (stop tokens off, so every answer is 20 tokens). Everything runs in one worker
process (peak RSS = VmHWM of that process; the main process only writes the inputs):

  1. `--requests` consecutive full requests on one loaded model (`model.detect_coco(image, boxes=...)`, no image
     cache): seconds and RSS after each. Targets (issue 11): requests 2..N each within 3% of the best, and RSS after
     the last within 1% of RSS after request 2.
  2. prefix caching: `ctx = model.encode(image, boxes)` (ViT, DaViT, HFRE, prefix prefill), then the same question
     on ctx (`ctx.detect_coco()`), then a second task (`ctx.count("person")`). Targets: the same question after
     encode <= 10% of a full request; a second task on the same image and boxes <= 15% of the first (the first =
     the full request).
  3. memory: peak RSS against weight bytes + the KV cache used + the decoder state's scratch + the encoders'
     arena (the Workspace a request's ViT, DaViT and HFRE share, reserved once and kept between requests), each
     printed (target: peak <= 1.10 x weights + KV + state + arena; the arena is its reserved size, of which a
     request touches what its image and boxes need).
`--dtype int8|mixed|int4` loads the model with int8 or int4 weights (vlmfo1.quant) instead of the stored bf16.
Answers of (1) and (2) are compared token by token: the cached path must give the same tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, REPO)
import _common as C  # noqa: E402
import bench_fo1 as F  # noqa: E402  (the request: checkpoint, image, boxes)


def _log(msg):
    print(f"[bench_requests] {msg}", file=sys.stderr, flush=True)


def _rss_mb() -> float:
    return C.proc_status_kib("VmRSS") / 1024


def worker(req: dict, n_requests: int, threads: int, dtype=None) -> dict:
    from vlmfo1 import VLMFO1

    peaks = C.probe_peaks(threads)   # before the model is loaded: nothing else runs
    t0 = time.perf_counter()
    model = VLMFO1.from_pretrained(req["checkpoint"], threads=threads, dtype=dtype)
    out = {"load_s": time.perf_counter() - t0, "rss_after_load_mb": _rss_mb(), "repr": repr(model),
           "weight_bytes": model.weight_bytes, "threads": threads, "peaks": peaks,
           "families": C.stage_families(dtype, model.decoder.compute, peaks),
           "decode_bytes": C.decode_stream_bytes(model.decoder)}
    img, boxes, n = req["image"], req["boxes"], req["max_new_tokens"]
    opts = dict(max_new_tokens=n, stop_ids=[])

    # 1. consecutive full requests
    runs = []
    for i in range(n_requests):
        t = time.perf_counter()
        r = model.detect_coco(img, boxes=boxes, **opts)
        runs.append({"seconds": time.perf_counter() - t, "rss_mb": _rss_mb(), "timings": r.timings,
                     "tokens": r.token_ids, "flops": r.flops})
        _log(f"request {i + 1}/{n_requests}: {runs[-1]['seconds']:.2f} s, RSS {runs[-1]['rss_mb']:.0f} MB, "
             + ", ".join(f"{k} {v:.2f}" for k, v in r.timings.items()))
    out["requests"] = runs
    first = runs[0]["tokens"]

    # 2. prefix caching
    t = time.perf_counter()
    ctx = model.encode(img, boxes=boxes)
    out["encode_s"] = time.perf_counter() - t
    out["encode_timings"] = ctx.encode_timings
    out["prefix_positions"] = ctx.prefix_tokens
    out["snapshot_bytes"] = int(ctx._kv.nbytes)
    t = time.perf_counter()
    same = ctx.detect_coco(**opts)
    out["same_question_s"] = time.perf_counter() - t
    out["same_question_timings"] = same.timings
    out["same_question_flops"] = same.flops
    out["same_question_tokens"] = len(same.token_ids)
    t = time.perf_counter()
    second = ctx.count("person", **opts)
    out["second_task_s"] = time.perf_counter() - t
    out["second_task_timings"] = second.timings
    out["cached_tokens_equal"] = same.token_ids == first
    _log(f"encode {out['encode_s']:.2f} s (prefix {ctx.prefix_tokens} positions), same question "
         f"{out['same_question_s']:.2f} s, second task {out['second_task_s']:.2f} s, tokens equal "
         f"{out['cached_tokens_equal']}")

    # 3. memory
    with model._session(1) as s:
        out["state_bytes"] = int(s.nbytes)              # KV capacity (max_context) + chunk scratch
        out["state_max_context"] = int(s.max_context)
        out["arena_bytes"] = int(s.workspace.nbytes)   # the encoders' scratch (grown to the largest request)
    c = model.decoder.config
    per_pos = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    out["kv_bytes_per_position"] = per_pos
    out["kv_capacity_bytes"] = per_pos * out["state_max_context"]
    ids, _ = model._prompt(same.prompt, len(boxes))
    out["kv_used_bytes"] = per_pos * (len(ids) - 1 + len(ctx.image_tokens) + n)   # prompt (image expanded) + answer
    out["scratch_bytes"] = out["state_bytes"] - out["kv_capacity_bytes"]
    out["peak_rss_mb"] = C.peak_rss_bytes() / 2**20
    return out


def report(res: dict, req: dict, argv) -> str:
    runs = res["requests"]
    secs = [r["seconds"] for r in runs]
    best = min(secs[1:]) if len(secs) > 1 else secs[0]
    worst_dev = max(s / best - 1 for s in secs[1:]) if len(secs) > 1 else 0.0
    rss2, rssN = (runs[1]["rss_mb"], runs[-1]["rss_mb"]) if len(runs) > 1 else (runs[0]["rss_mb"],) * 2
    full = float(sorted(secs[1:] or secs)[len(secs[1:] or secs) // 2])   # median full request (2..N)
    same, second = res["same_question_s"], res["second_task_s"]
    GB = 1e9
    arena = res.get("arena_bytes", 0)
    bound = 1.10 * res["weight_bytes"] + res["kv_used_bytes"] + res["state_bytes"] + arena
    peak = res["peak_rss_mb"] * 2**20
    lines = [f"command: python benchmarks/bench_requests.py {' '.join(argv)}",
             f"model: {res['repr']}",
             f"request: {req['image_size'][0]}x{req['image_size'][1]} image, {len(req['boxes'])} boxes, COCO-80 "
             f"prompt, {req['max_new_tokens']} new tokens, greedy; {res['threads']} threads; load {res['load_s']:.1f} s",
             "",
             "| request | seconds | RSS MB | preprocess | vit | davit | hfre | prefill | decode |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs):
        t = r["timings"]
        lines.append(f"| {i + 1} | {r['seconds']:.2f} | {r['rss_mb']:.0f} | " +
                     " | ".join(f"{t.get(k, 0):.2f}" for k in ("preprocess", "vit", "davit", "hfre", "prefill",
                                                                "decode")) + " |")
    ok = lambda c: "yes" if c else "NO"   # noqa: E731
    lines += ["",
              "| measure | value | target | met |", "|---|---|---|---|",
              f"| requests 2..{len(runs)}: slowest vs best | +{100 * worst_dev:.2f}% | <= 3% | {ok(worst_dev <= 0.03)} |",
              f"| RSS after request {len(runs)} vs after request 2 | {rssN:.0f} vs {rss2:.0f} MB "
              f"({100 * (rssN / rss2 - 1):+.2f}%) | <= 1% | {ok(rssN <= 1.01 * rss2)} |",
              f"| full request (median of 2..{len(runs)}) | {full:.2f} s | | |",
              f"| encode (ViT + DaViT + HFRE + prefix prefill of {res['prefix_positions']} positions) | "
              f"{res['encode_s']:.2f} s | | |",
              f"| same question after encode | {same:.2f} s = {100 * same / full:.1f}% of a full request | <= 10% | "
              f"{ok(same <= 0.10 * full)} |",
              f"| second task (count) on the same image and boxes | {second:.2f} s = {100 * second / full:.1f}% "
              f"of the first | <= 15% | {ok(second <= 0.15 * full)} |",
              f"| cached answer = uncached answer (tokens) | {res['cached_tokens_equal']} | True | "
              f"{ok(res['cached_tokens_equal'])} |",
              f"| peak RSS | {peak / GB:.2f} GB | <= 1.10 x weights {res['weight_bytes'] / GB:.2f} GB + KV used "
              f"{res['kv_used_bytes'] / GB:.3f} GB + decoder state {res['state_bytes'] / GB:.3f} GB "
              f"(KV capacity {res['kv_capacity_bytes'] / GB:.3f} GB for {res['state_max_context']} positions, "
              f"scratch {res['scratch_bytes'] / GB:.3f} GB) + encoders' arena {arena / GB:.3f} GB = {bound / GB:.2f} "
              f"GB | | {ok(peak <= bound)} |",
              f"| prefix snapshot held by the encoded image | {res['snapshot_bytes'] / 2**20:.1f} MiB | | |"]
    if "peaks" in res:   # per stage of the median request: the work counted by the C core, rates, % of peak
        med = sorted(runs[1:] or runs, key=lambda r: r["seconds"])[len(runs[1:] or runs) // 2]
        steps = len(med["tokens"]) - 1   # decode steps: the first token comes from the prefill's logits
        lines += ["", f"work per stage of the median request ({med['seconds']:.2f} s; FO1Result.flops: the matmuls "
                  "and attention products the C core counts, csrc/pool.h; rate = that work / the stage's time, "
                  "against the peak of the family its matmuls run on; decode: weight bytes read per step x "
                  f"{steps} steps / time)", "",
                  C.markdown_table(C.WORK_HEAD, C.work_rows(med["timings"], med["flops"], res["families"],
                                                            res["peaks"], res["decode_bytes"], steps)),
                  "", C.peaks_line(res["peaks"], res["threads"])]
        sf, fam = res["same_question_flops"], res["families"]["prefill"]
        t_pf = (sf["prefill"]["gemm"] + sf["prefill"]["attention"]) / (res["peaks"][fam] * 1e9)
        t_dec = res["decode_bytes"] * (res["same_question_tokens"] - 1) / (res["peaks"]["bandwidth"] * 1e9)
        lines += ["", f"same question after encode at the machine's limits: its prefill "
                  f"({(sf['prefill']['gemm'] + sf['prefill']['attention']) / 1e12:.3f} TFLOP) at the {fam} peak "
                  f"{t_pf:.2f} s + {res['same_question_tokens'] - 1} decode steps reading "
                  f"{res['decode_bytes'] / 1e9:.2f} GB of weights each at the probed read bandwidth {t_dec:.2f} s = "
                  f"{t_pf + t_dec:.2f} s = {100 * (t_pf + t_dec) / full:.1f}% of the measured full request "
                  f"(measured: {same:.2f} s)"]
    st, ss = res["same_question_timings"], res["second_task_timings"]
    lines += ["", "same question: " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()),
              "second task: " + ", ".join(f"{k} {v:.2f}" for k, v in ss.items()),
              "encode: " + ", ".join(f"{k} {v:.2f}" for k, v in res["encode_timings"].items())]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny checkpoint, 10 boxes, 640 x 480")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--boxes", type=int, default=None, help="default 100 (quick 10)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--image", default=F.DEFAULT_IMAGE)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/vlmfo1_bench_fo1")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--dtype", choices=["int8", "mixed", "int4"], help="int8 or int4 weights (default: as stored, bf16)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        req = json.load(open(a.worker))
        res = worker(req, a.requests, a.threads, a.dtype)
        json.dump(res, sys.stdout)
        return 0
    if a.requests < 2:
        p.error("--requests must be at least 2")
    a.size = "tiny" if a.quick else "full"
    a.boxes = a.boxes or (10 if a.quick else 100)
    a.width = a.width or (640 if a.quick else 1000)
    a.height = a.height or (480 if a.quick else 750)
    a.reps, a.warmup = 1, 0
    os.makedirs(a.workdir, exist_ok=True)
    req = F.prepare(a)
    path = os.path.join(a.workdir, f"bench_requests_{a.size}.json")
    with open(path, "w") as f:
        json.dump(req, f)
    env = dict(os.environ, VLMFO1_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--requests", str(a.requests),
           "--threads", str(a.threads)] + (["--dtype", a.dtype] if a.dtype else [])
    _log("worker: " + " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, env=env, cwd=REPO)
    if proc.returncode:
        _log(f"worker failed with status {proc.returncode}")
        return 1
    res = json.loads(proc.stdout)
    text = report(res, req, argv)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"request": {k: v for k, v in req.items() if k != "boxes"}, "results": res, "table": text}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
