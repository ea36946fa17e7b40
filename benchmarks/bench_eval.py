#!/usr/bin/env python
"""Evaluation throughput: images/s of `vlmfo1 eval coco` (vlmfo1.eval.run) on coco_tiny with random VLM-FO1 weights,
1 and 2 worker processes, and the Ray backend's overhead per image.

    python benchmarks/bench_eval.py                               # tiny random checkpoint, 1 and 2 workers
    python benchmarks/bench_eval.py --size full --images 2 --reps 1   # the full-size random checkpoint (8.3 GB)
    python benchmarks/bench_eval.py --ray local                   # also the Ray backend (needs `pip install ray`)

The workload: the first --images images of ../shared/data/coco_tiny (val2017 pictures, 640 x 480 or so, as they
are), the official COCO question (80 categories), per image its ground-truth boxes followed by seeded random boxes up
to --boxes (default 100, the official proposal count) as proposals in the official jsonl layout, greedy decoding with
--max-new-tokens (default 20: random weights never stop by themselves, so the answer length is fixed, as in
bench_fo1.py). Checkpoints: --size tiny (`write_random_fo1(size="tiny")`, a few MB) or full (the real shapes,
~4.15 B parameters, ~8.3 GB bf16; written once into --fo1-workdir, the same folder bench_fo1.py uses, and reused).

Each configuration (workers W, threads per worker = the CPUs / W) runs --reps times, each in its own fresh process
and run folder: one `vlmfo1.eval.run(...)` over the images, model loading and worker start included (what a user
waits for). Reported: the median wall time and images/s over the reps; the median seconds one worker spends on one
image (records.jsonl "seconds"); the start-up and scheduling overhead = wall - (sum of item seconds) / W; peak RSS of
the process that calls run() and of the largest worker process (the model is memory-mapped: its pages count in each
process that touches them, once in the page cache). With --ray ADDRESS the same run goes through the Ray backend
(`run(..., ray=ADDRESS)`, W actors; "local" starts a local cluster) and the overhead per image is
(Ray wall - worker-process wall) / images, medians; without Ray installed, or before vlmfo1 has the Ray backend, it
says so and measures the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, REPO)
import _common as C  # noqa: E402

DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "coco_tiny")
ANN = os.path.join(DATA, "annotations", "instances_val2017.json")
IMAGES = os.path.join(DATA, "val2017")
GIB = 1024 ** 3


def _log(msg):
    print(f"[bench_eval] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# setup

def write_proposals(path: str, n_boxes: int, seed: int) -> str:
    """Proposals for every coco_tiny image in the official cocoVal2017_with_upn_score_0.3_0.8.jsonl layout: the
    image's ground-truth boxes, then seeded random boxes, n_boxes in all (integer xyxy, scores descending)."""
    import numpy as np

    from vlmfo1.fo1 import coco_detection_prompt

    with open(ANN) as f:
        ds = json.load(f)
    rng = np.random.default_rng(seed)
    prompt = coco_detection_prompt()
    with open(path, "w") as f:
        for im in ds["images"]:
            W, H = im["width"], im["height"]
            boxes = [[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h in
                     (a["bbox"] for a in ds["annotations"] if a["image_id"] == im["id"])][:n_boxes]
            while len(boxes) < n_boxes:
                w, h = rng.uniform(16, 0.5 * W), rng.uniform(16, 0.5 * H)
                x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
                boxes.append([int(x), int(y), int(x + w), int(y + h)])
            scores = sorted((round(float(s), 2) for s in rng.uniform(0.3, 0.99, len(boxes))), reverse=True)
            f.write(json.dumps({"id": im["id"], "image": im["file_name"],
                                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}],
                                "bbox_list": boxes, "score_list": scores}) + "\n")
    return path


def prepare(a) -> dict:
    workdir = a.fo1_workdir if a.size == "full" else a.workdir
    ckpt = C.fo1_random_checkpoint(workdir, a.size, a.seed, log=_log)
    os.makedirs(a.workdir, exist_ok=True)
    props = write_proposals(os.path.join(a.workdir, f"coco_tiny_proposals_{a.boxes}_seed{a.seed}.jsonl"), a.boxes,
                            a.seed)
    n_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    return {"checkpoint": ckpt, "checkpoint_bytes": n_bytes, "proposals": props}


# ----------------------------------------------------------------------------------------------------------------
# one measurement (its own process, so that its peak RSS is its own)

def worker_main(a) -> int:
    import resource

    from vlmfo1.eval import CocoEvaluator, run

    cfg = json.loads(a.config)
    out_dir = cfg["out_dir"]
    shutil.rmtree(out_dir, ignore_errors=True)
    ev = CocoEvaluator(IMAGES, ANN, cfg["proposals"], max_new_tokens=cfg["max_new_tokens"],
                       max_proposals=cfg["boxes"], scorer="pycocotools")
    kw = {"ray": cfg["ray"]} if cfg.get("ray") else {}
    t0 = time.perf_counter()
    report = run(ev, cfg["checkpoint"], out_dir, workers=cfg["workers"], threads=cfg["threads"],
                 limit=cfg["images"], progress=False, summary=False, **kw)
    wall = time.perf_counter() - t0
    with open(os.path.join(out_dir, "records.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    res = {"wall_s": wall, "item_s": [r["seconds"] for r in recs if "seconds" in r],
           "errors": [r["error"] for r in recs if "error" in r], "run": report["run"],
           "peak_rss_parent": C.peak_rss_bytes(),
           "peak_rss_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    shutil.rmtree(out_dir, ignore_errors=True)
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


def measure(a, setup: dict, workers: int, ray=None) -> dict:
    threads = max(1, (os.cpu_count() or 1) // workers)
    cfg = {"checkpoint": setup["checkpoint"], "proposals": setup["proposals"], "images": a.images,
           "boxes": a.boxes, "max_new_tokens": a.max_new_tokens, "workers": workers, "threads": threads,
           "ray": ray, "out_dir": os.path.join(a.workdir, f"run-{a.size}-w{workers}{'-ray' if ray else ''}")}
    runs = []
    for rep in range(a.reps):
        r = C.run_worker([os.path.abspath(__file__), "--worker", "--config", json.dumps(cfg)], a.timeout)
        if "error" in r:
            return {"error": r["error"], "workers": workers, "threads": threads}
        if r["errors"]:
            return {"error": f"{len(r['errors'])} items failed, e.g. {r['errors'][0][:200]}", "workers": workers,
                    "threads": threads}
        _log(f"{a.size} checkpoint, {workers} worker(s){' via Ray' if ray else ''}, rep {rep + 1}/{a.reps}: "
             f"{r['wall_s']:.1f} s for {a.images} images")
        runs.append(r)
    walls = [r["wall_s"] for r in runs]
    wall = C.median(walls)
    item = C.median([s for r in runs for s in r["item_s"]])
    overhead = C.median([r["wall_s"] - sum(r["item_s"]) / workers for r in runs])
    return {"workers": workers, "threads": threads, "ray": ray, "walls_s": walls, "wall_s": wall,
            "images_per_s": a.images / wall, "item_s": item, "overhead_s": overhead,
            "peak_rss_parent": max(r["peak_rss_parent"] for r in runs),
            "peak_rss_worker": max(r["peak_rss_worker"] for r in runs)}


def ray_available(address) -> str:
    """'' when the Ray backend can be tried, else why not."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install ray)"
    try:
        from vlmfo1.eval import ray_backend  # noqa: F401
    except ImportError:
        return "this vlmfo1 has no Ray backend yet (vlmfo1/eval/ray_backend.py)"
    return ""


# ----------------------------------------------------------------------------------------------------------------

def table(a, setup, results) -> str:
    rows = []
    for r in results:
        name = f"{r['workers']} x {r['threads']} thr" + (f", Ray ({r['ray']})" if r.get("ray") else "")
        if "error" in r:
            rows.append([name, "error: " + r["error"][:120]] + [""] * 6)
            continue
        worker_rss = "-" if r["workers"] == 1 and not r.get("ray") else f"{r['peak_rss_worker'] / GIB:.2f}"
        if r.get("ray"):
            worker_rss = "- (actors)"
        rows.append([name, f"{r['wall_s']:.1f}", f"**{r['images_per_s']:.3f}**", f"{r['item_s']:.2f}",
                     f"{r['overhead_s']:.1f}", f"{r['peak_rss_parent'] / GIB:.2f}", worker_rss,
                     " ".join(f"{w:.1f}" for w in r["walls_s"])])
    head = ["workers x threads", "wall s (median)", "images/s", "s per image per worker", "overhead s",
            "peak RSS run() GiB", "peak RSS worker GiB", "wall s of each rep"]
    return C.markdown_table(head, rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny", help="random checkpoint size (default tiny)")
    p.add_argument("--workers", default="1,2", help="worker counts to measure, comma-separated (default 1,2)")
    p.add_argument("--images", type=int, default=8, help="the first N coco_tiny images (default 8)")
    p.add_argument("--reps", type=int, default=3, help="runs per configuration; the median is reported (default 3)")
    p.add_argument("--boxes", type=int, default=100, help="proposals per image (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray", metavar="ADDRESS", help="also measure the Ray backend (run(..., ray=ADDRESS)), e.g. local "
                                                     "or auto")
    p.add_argument("--workdir", default="/tmp/vlmfo1_bench_eval")
    p.add_argument("--fo1-workdir", default="/tmp/vlmfo1_bench_fo1",
                   help="where the full-size random checkpoint is kept (shared with bench_fo1.py)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="per run, seconds")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker_main(a)
    if not 1 <= a.boxes <= 100:
        p.error("--boxes must be in 1..100")
    if not 1 <= a.images <= 80:
        p.error("--images must be in 1..80 (coco_tiny has 80)")
    try:
        workers = [int(w) for w in a.workers.split(",") if w.strip()]
    except ValueError:
        p.error(f"--workers: a comma-separated list of counts, got {a.workers!r}")
    if not workers or min(workers) < 1:
        p.error("--workers: counts >= 1")

    command = "python benchmarks/bench_eval.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    load = os.getloadavg()
    setup = prepare(a)
    results = [measure(a, setup, w) for w in workers]
    ray_note = ""
    if a.ray:
        ray_note = ray_available(a.ray)
        if not ray_note:
            for w in workers:
                r = measure(a, setup, w, ray=a.ray)
                base = next(x for x in results if x["workers"] == w)
                if "error" not in r and "error" not in base:
                    r["overhead_vs_processes_s_per_image"] = (r["wall_s"] - base["wall_s"]) / a.images
                results.append(r)

    load_end = os.getloadavg()
    lines = [f"command: {command.strip()}",
             f"vlmfo1 eval coco on the first {a.images} coco_tiny images (as they are, ~640 x 480), {a.boxes} "
             f"proposals per image, the 80-category question, {a.max_new_tokens} new tokens (greedy); random {a.size} "
             f"checkpoint ({setup['checkpoint_bytes'] / GIB:.2f} GiB of weights); {os.cpu_count()} CPUs, load average "
             f"{load[0]:.1f} at the start, {load_end[0]:.1f} at the end (1-minute; other jobs on the machine count in "
             f"it); median of {a.reps} run(s), each in a fresh process, model load and worker start included", "",
             table(a, setup, results), ""]
    for r in results:
        if "overhead_vs_processes_s_per_image" in r:
            lines.append(f"Ray overhead, {r['workers']} worker(s): {r['overhead_vs_processes_s_per_image']:+.3f} s "
                         "per image (Ray wall - worker-process wall, medians, / images)")
    if a.ray and ray_note:
        lines.append(f"Ray: not measured: {ray_note}")
    elif not a.ray:
        lines.append("Ray: not measured (add --ray local, or --ray ADDRESS of a running cluster)")
    text = "\n".join(lines)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": command, "setup": setup, "results": results, "args": vars(a)}, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
