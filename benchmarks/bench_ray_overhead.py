#!/usr/bin/env python
"""The Ray backend's overhead against worker processes, with the scripted stand-in model of the tests (no model
compute: what is left is the backends' own cost).

    python benchmarks/bench_ray_overhead.py                    # a local 2-CPU Ray cluster on 127.0.0.1, 2 x 1 thread
    python benchmarks/bench_ray_overhead.py --ray HOST:PORT    # an existing cluster instead

The workload: `vlmfo1.eval.run` of the COCO evaluator over the first N images of ../shared/data/coco_tiny with the
test double tests/eval_doubles.OracleStandIn (it decodes the image and answers from the ground truth: ~10 ms per
image), W workers x 1 thread, each run in a fresh run folder, --reps times for N = --small and N = --large. Per
backend the median wall times give a line wall = start + per_image * N: `start` is the fixed cost (worker processes
spawned / actors created, each loading the stand-in), `per_image` the cost of one more image (the item itself divided
among the workers, plus the backend's scheduling and transport). The Ray overhead per image is per_image(Ray) -
per_image(processes); the start-up overhead start(Ray) - start(processes) (the driver's `import ray`, ~2.6 s, is done
before timing; connecting is counted).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(1, os.path.join(REPO, "tests"))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "coco_tiny")
ANN = os.path.join(DATA, "annotations", "instances_val2017.json")
IMAGES = os.path.join(DATA, "val2017")

HEAD = """
import sys, ray
ctx = ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False, _temp_dir=sys.argv[2], logging_level="WARNING")
print(ctx.address_info["gcs_address"], flush=True)
sys.stdin.read()
ray.shutdown()
"""


def start_cluster(cpus: int, tmp: str):
    """A throwaway Ray head on 127.0.0.1 (token auth with a fresh token in the environment): (process, address)."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update(env)                            # this process is a driver of it
    head = subprocess.Popen([sys.executable, "-c", HEAD, str(cpus), tmp], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ), text=True,
                            start_new_session=True)
    out = []
    t = threading.Thread(target=lambda: out.append(head.stdout.readline()), daemon=True)
    t.start()
    t.join(120)
    if not out or not out[0].strip():
        head.kill()
        raise RuntimeError("the Ray head did not start in 120 s")
    return head, out[0].strip()


def one_run(ev, n: int, workers: int, out: str, ray) -> dict:
    from eval_doubles import OracleStandIn
    from vlmfo1.eval import run

    t0 = time.perf_counter()
    rep = run(ev, functools.partial(OracleStandIn, ANN), out, limit=n, workers=workers, threads=1, ray=ray,
              progress=False, summary=False)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "predictions.jsonl"), "rb") as f:
        preds = f.read()
    return {"wall": wall, "item_s": rep["run"]["mean_item_seconds"], "preds": preds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ray", metavar="ADDRESS", help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster (default 2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--small", type=int, default=16)
    p.add_argument("--large", type=int, default=80)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()

    from eval_doubles import write_proposals_jsonl
    from vlmfo1.eval import CocoEvaluator

    tmp = tempfile.mkdtemp(prefix="vrb", dir="/tmp")
    head = None
    try:
        address = a.ray
        if address is None:
            head, address = start_cluster(a.cpus, tmp)
        import ray  # noqa: F401  (its import time is not the backend's overhead)

        props = write_proposals_jsonl(ANN, os.path.join(tmp, "props.jsonl"))
        ev = CocoEvaluator(IMAGES, ANN, props, scorer="pycocotools")
        res = {}
        k = 0
        for rep in range(a.reps):                      # interleaved, so that drifts hit both alike
            for backend in ("processes", "ray"):
                for n in (a.small, a.large):
                    k += 1
                    r = one_run(ev, n, a.workers, os.path.join(tmp, f"run{k}"), address if backend == "ray" else None)
                    res.setdefault((backend, n), []).append(r)
                    print(f"[bench_ray_overhead] rep {rep + 1} {backend:9s} {n:3d} images: {r['wall']:.2f} s",
                          file=sys.stderr, flush=True)
        for n in (a.small, a.large):
            assert res[("ray", n)][0]["preds"] == res[("processes", n)][0]["preds"], "predictions differ"
        fit = {}
        for backend in ("processes", "ray"):
            w1 = statistics.median(r["wall"] for r in res[(backend, a.small)])
            w2 = statistics.median(r["wall"] for r in res[(backend, a.large)])
            per = (w2 - w1) / (a.large - a.small)
            item = statistics.median(r["item_s"] for r in res[(backend, a.large)])
            fit[backend] = {"wall_small_s": round(w1, 3), "wall_large_s": round(w2, 3), "per_image_s": round(per, 4),
                            "start_s": round(w1 - per * a.small, 3), "mean_item_s": round(item, 4)}
        cmd = "python benchmarks/bench_ray_overhead.py " + " ".join(sys.argv[1:])
        print(f"# {cmd.strip()}")
        print(f"# stand-in model, {a.workers} workers x 1 thread, {a.small} and {a.large} images, median of "
              f"{a.reps}; Ray: {'local 127.0.0.1 cluster, ' + str(a.cpus) + ' CPUs' if a.ray is None else a.ray}")
        print(f"{'backend':10s} {'wall ' + str(a.small):>9s} {'wall ' + str(a.large):>9s} {'s/image':>8s} "
              f"{'start s':>8s} {'item s':>7s}")
        for backend, f in fit.items():
            print(f"{backend:10s} {f['wall_small_s']:9.2f} {f['wall_large_s']:9.2f} {f['per_image_s']:8.4f} "
                  f"{f['start_s']:8.2f} {f['mean_item_s']:7.4f}")
        d_img = fit["ray"]["per_image_s"] - fit["processes"]["per_image_s"]
        d_start = fit["ray"]["start_s"] - fit["processes"]["start_s"]
        print(f"Ray overhead: {d_img * 1000:+.1f} ms per image, {d_start:+.2f} s start-up (vs worker processes); "
              "predictions identical")
        print(json.dumps({"fit": fit, "ray_overhead_per_image_s": round(d_img, 4),
                          "ray_overhead_start_s": round(d_start, 3)}))
    finally:
        if head is not None:
            head.stdin.close()
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                head.kill()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
