"""The workloads of tests/test_soak.py, each run in a fresh process (`python soak_child.py MODE JSON-ARGS`) so that a
hang is bounded by the parent's timeout and RSS, descriptors and mappings are measured on a clean process.

Every mode prints one line `SOAK-RESULT <json>` at the end; the parent asserts on it. Modes:

  concurrency  one loaded VLM-FO1 model; the same mixed requests run serially, then by 8 Python threads at once
               (25 each), then a few serially again; reports every result that differs.
  requests     200 mixed requests on one model, counts after each (RSS, anonymous RSS, fds, /proc/self/maps lines).
  load         load/release cycles of VLMFO1 or LanguageModel, released by close() or by a plain `del` (the cyclic
               GC off), counts after each.
  failed       loads of broken checkpoints (each must raise), counts after each.
"""
from __future__ import annotations

import faulthandler
import gc
import hashlib
import json
import os
import random
import resource
import sys
import threading
import time
import traceback

import numpy as np

START = time.perf_counter()

TASKS = ("detect", "count", "refer", "describe_region", "read_region", "ground", "chat", "detect_like", "prepare")
SIZES = [(56, 42), (42, 56), (56, 56), (70, 42), (28, 56), (84, 56), (28, 28)]
CATEGORIES = ["orange", "apple", "person", "dog", "the fruit", "car"]


# ---------------------------------------------------------------------------------------------- measurements

def counts(roots=()) -> dict:
    """RSS and anonymous RSS (bytes), open file descriptors, /proc/self/maps lines; with roots (folders), also the
    mappings and descriptors of files under them."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                status[k] = int(v.split()[0]) * 1024
    fd_dir = "/proc/self/fd"
    fds = os.listdir(fd_dir)
    targets = []
    for fd in fds:
        try:
            targets.append(os.readlink(os.path.join(fd_dir, fd)))
        except OSError:            # the descriptor of the listing itself, gone by now
            pass
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    out = dict(rss=status["VmRSS"], anon=status["RssAnon"], file=status["RssFile"], fds=len(targets), maps=len(maps))
    if roots:
        under = lambda p: any(p.startswith(r + os.sep) for r in roots)  # noqa: E731
        out["ckpt_maps"] = sum(1 for ln in maps if under(ln.split(maxsplit=5)[-1]) and len(ln.split(maxsplit=5)) == 6)
        out["ckpt_fds"] = sum(1 for t in targets if under(t))
    return out


def _roots(*paths):
    """The real folders of every file of the given checkpoint folders (shards may be symlinks)."""
    out = set()
    for p in paths:
        out.add(os.path.realpath(p))
        for f in os.listdir(p):
            out.add(os.path.dirname(os.path.realpath(os.path.join(p, f))))
    return tuple(sorted(out))


def emit(result: dict) -> None:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result.update(elapsed=time.perf_counter() - START, cpu=ru.ru_utime + ru.ru_stime)   # the whole process
    sys.stdout.write("SOAK-RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- requests

def make_images(shared: str, folder: str):
    """Small real images (the demo and COCO pictures, downscaled): (key, path, array) each. Small on purpose: the
    vision towers dominate a request's cost and scale with the pixels."""
    from PIL import Image
    srcs = [os.path.join(shared, "demo", "demo_image.jpg")]
    coco = os.path.join(shared, "coco_tiny", "val2017")
    srcs += [os.path.join(coco, f) for f in sorted(os.listdir(coco))[:5]]
    out = []
    for i, (src, size) in enumerate(zip(srcs * 2, SIZES)):
        im = Image.open(src).convert("RGB").resize(size, Image.Resampling.BILINEAR)
        path = os.path.join(folder, f"img{i}.{'png' if i % 2 else 'jpg'}")
        im.save(path)
        out.append((f"img{i}", path, np.asarray(Image.open(path).convert("RGB"))))
    return out


def make_requests(n: int, images, seed: int = 0):
    """n mixed requests (every task, 0-7 boxes, with and without scores, paths and arrays, greedy with a few seeded
    samples, 1-4 new tokens), as plain dicts."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        key, path, arr = images[rng.randrange(len(images))]
        H, W = arr.shape[:2]
        k = rng.choice([0, 1, 2, 3, 5, 7])
        if task in ("describe_region", "read_region", "detect_like"):
            k = max(k, 1)
        boxes = []
        for _ in range(k):
            x1, y1 = rng.uniform(0, W * 0.7), rng.uniform(0, H * 0.7)
            x2, y2 = rng.uniform(x1 + 2, W), rng.uniform(y1 + 2, H)
            boxes.append([round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)])
        scores = None
        if rng.random() < 0.5:
            scores = sorted((round(rng.uniform(0.3, 1.0), 3) for _ in range(k)), reverse=True)
        if task == "detect":
            args = [rng.sample(CATEGORIES, rng.choice([1, 2]))]
        elif task == "count":
            args = [rng.choice(CATEGORIES)]
        elif task == "refer":
            args = [f"the {rng.choice(['left', 'right', 'big', 'small'])} {rng.choice(CATEGORIES)}"]
        elif task in ("describe_region", "read_region", "detect_like"):
            idx = sorted(rng.sample(range(k), rng.choice([1, min(2, k)])))
            args = [idx[0] if len(idx) == 1 and rng.random() < 0.5 else idx]
        elif task == "chat":
            args = [f"What is in <region{rng.randrange(k)}>?" if k else "What is in the picture?"]
        elif task == "prepare":
            args = [f"Please detect {rng.choice(CATEGORIES)} in this image."]
        else:
            args = []
        kw = dict(max_new_tokens=rng.randint(1, 4))
        if task != "prepare" and i % 11 == 5:     # a seeded sample now and then: per-request RNG state
            kw.update(temperature=0.8, top_p=0.9, top_k=50, seed=rng.randrange(1000))
        reqs.append(dict(i=i, task=task, image=key, as_path=rng.random() < 0.3, boxes=boxes, scores=scores,
                         args=args, kw=kw))
    return reqs


def run_request(model, req, images) -> dict:
    """One request -> the comparable part of its result (everything but timings)."""
    _, path, arr = next(im for im in images if im[0] == req["image"])
    image = path if req["as_path"] else arr
    if req["task"] == "prepare":
        # low level: the spliced embeddings, positions and the prefill logits, compared bit for bit
        ids, emb, pos, delta, b, _ = model.prepare(image, np.asarray(req["boxes"], dtype=np.float64).reshape(-1, 4),
                                                    req["args"][0])
        s = model.decoder.session(max_context=len(ids) + 1)
        logits = s.prefill_embeds(emb, pos)
        h = hashlib.sha256()
        for a in (np.asarray(ids, np.int64), emb, pos, logits):
            h.update(np.ascontiguousarray(a).tobytes())
        return dict(sha256=h.hexdigest(), delta=int(delta), n=len(ids))
    kw = dict(req["kw"])
    if req["boxes"] or req["task"] != "chat":
        kw.update(boxes=req["boxes"], scores=req["scores"])
    res = getattr(model, req["task"])(image, *req["args"], **kw)
    return dict(text=res.text, token_ids=list(res.token_ids), finish_reason=res.finish_reason,
                detections=[[d.label, d.index, list(d.box), d.score] for d in res.detections],
                invalid=list(res.invalid_indices), prompt=res.prompt)


# ---------------------------------------------------------------------------------------------- modes

def mode_concurrency(a):
    from vlmfo1 import VLMFO1
    n_threads, per_thread = a["threads"], a["per_thread"]
    images = make_images(a["shared"], a["tmp"])
    reqs = make_requests(n_threads * per_thread, images)
    model = VLMFO1.from_pretrained(a["ckpt"], threads=a["model_threads"])
    t0 = time.perf_counter()
    serial = [run_request(model, r, images) for r in reqs]
    t_serial = time.perf_counter() - t0

    got = [None] * len(reqs)
    errors = []
    barrier = threading.Barrier(n_threads)

    def worker(t):
        try:
            barrier.wait(timeout=60)
            for j in range(t * per_thread, (t + 1) * per_thread):
                got[j] = run_request(model, reqs[j], images)
        except BaseException:  # noqa: BLE001
            errors.append(f"thread {t}: {traceback.format_exc()}")

    threads = [threading.Thread(target=worker, args=(t,), name=f"soak-{t}", daemon=True) for t in range(n_threads)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    thread_timeout = max(a["min_thread_timeout"], a["timeout_factor"] * t_serial)   # a deadlock fails, never hangs
    deadline = t0 + thread_timeout
    for th in threads:
        th.join(max(0.0, deadline - time.perf_counter()))
    t_conc = time.perf_counter() - t0
    alive = [th.name for th in threads if th.is_alive()]
    if alive:   # a deadlock or a livelock: show where every thread is, and fail
        sys.stderr.write(f"threads still running after {thread_timeout:.0f} s: {alive}\n")
        faulthandler.dump_traceback(all_threads=True)
        emit(dict(hung=alive, t_serial=t_serial))
        sys.stdout.flush()
        os._exit(3)
    t0 = time.perf_counter()
    again = [run_request(model, r, images) for r in reqs[:a["recheck"]]]   # the model is unchanged afterwards
    t_again = time.perf_counter() - t0
    mism = [dict(i=j, task=reqs[j]["task"], serial=serial[j], concurrent=got[j])
            for j in range(len(reqs)) if got[j] != serial[j]]
    mism += [dict(i=j, task=reqs[j]["task"], serial=serial[j], after=again[j])
             for j in range(len(again)) if again[j] != serial[j]]
    tasks = {}
    for r in reqs:
        tasks[r["task"]] = tasks.get(r["task"], 0) + 1
    emit(dict(n=len(reqs), errors=errors, mismatches=mism[:5], n_mismatches=len(mism), t_serial=t_serial,
              t_concurrent=t_conc, t_recheck=t_again, tasks=tasks, thread_timeout=thread_timeout,
              boxes=sorted({len(r["boxes"]) for r in reqs}), with_scores=sum(r["scores"] is not None for r in reqs),
              sampled=sum("seed" in r["kw"] for r in reqs),
              tokens=sum(len(s.get("token_ids", ())) for s in serial)))


def mode_requests(a):
    from vlmfo1 import VLMFO1
    images = make_images(a["shared"], a["tmp"])
    # the same mixed requests over and over: after the first pass (the warm-up) every allocation pattern has been
    # seen once, so growth is per-request retention, not the allocator reaching the working set's high-water mark
    distinct = make_requests(a["distinct"], images, seed=1)
    reqs = [distinct[i % len(distinct)] for i in range(a["n"])]
    model = VLMFO1.from_pretrained(a["ckpt"], threads=a["model_threads"])
    series = [counts()]
    t0 = time.perf_counter()
    first = []
    for i, r in enumerate(reqs):
        out = run_request(model, r, images)
        if i < len(distinct):
            first.append(out)
        elif out != first[i % len(distinct)]:
            raise AssertionError(f"request {i} ({r['task']}) gave {out}, its first run {first[i % len(distinct)]}")
        series.append(counts())
    emit(dict(series=series, seconds=time.perf_counter() - t0, n=len(reqs), distinct=len(distinct),
              tasks=sorted({r["task"] for r in distinct}), boxes=sorted({len(r["boxes"]) for r in distinct})))


def _loader(kind, path, threads):
    if kind == "fo1":
        from vlmfo1 import VLMFO1
        return lambda: VLMFO1.from_pretrained(path, threads=threads)
    from vlmfo1 import LanguageModel
    return lambda: LanguageModel.load(path, n_threads=threads, max_context=64)


def mode_load(a):
    load = _loader(a["kind"], a["ckpt"], a["model_threads"])
    roots = _roots(a["ckpt"])
    n = a["n"]
    hows = ["close"] * n + ["del"] * n if a.get("both") else ["close" if i % 2 == 0 else "del" for i in range(n)]
    series, loaded, closed = [counts(roots)], [], []
    gc.disable()             # what is released must be released by close() or by reference counting alone
    t0 = time.perf_counter()
    try:
        for how in hows:
            m = load()
            loaded.append(counts(roots))
            if how == "close":
                m.close()    # close() alone releases the checkpoint (the object, tokenizer included, is still alive)
                assert getattr(m, "decoder", None) is None and getattr(m, "_core", None) is None
                c = counts(roots)
                closed.append(dict(ckpt_maps=c["ckpt_maps"], ckpt_fds=c["ckpt_fds"]))
            del m
            series.append(counts(roots))
    finally:
        gc.enable()
    emit(dict(series=series, loaded=loaded, closed=closed, how=hows, seconds=time.perf_counter() - t0,
              malloc=os.environ.get("PYTHONMALLOC", "")))


def mode_failed(a):
    from vlmfo1 import LanguageModel, VLMFO1
    cases = a["cases"]              # [kind, path, expected exception name, message part]
    roots = _roots(*[c[1] for c in cases])

    def attempt(kind, path):
        try:
            if kind == "fo1":
                VLMFO1.from_pretrained(path, threads=1)
            else:
                LanguageModel.load(path, n_threads=1, max_context=64)
        except Exception as e:  # noqa: BLE001
            return [c.__name__ for c in type(e).__mro__], str(e)
        raise AssertionError(f"{path}: the broken checkpoint loaded")

    first = [attempt(kind, path) for kind, path, _, _ in cases]     # one of each first: imports, caches
    gc.disable()
    t0 = time.perf_counter()
    series = [counts(roots)]
    try:
        for i in range(a["n"]):
            kind, path, _, _ = cases[i % len(cases)]
            attempt(kind, path)
            series.append(counts(roots))
    finally:
        gc.enable()
    emit(dict(series=series, seconds=time.perf_counter() - t0, n=a["n"], cases=cases, first=first,
              errors=[f"{c[1].rsplit('/', 1)[-1]}: {t[0]}: {m[:150]}" for c, (t, m) in zip(cases, first)]))


def main():
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    faulthandler.enable()
    if args.get("watchdog"):      # the last resort: dump every thread's stack and exit before the parent kills us
        faulthandler.dump_traceback_later(args["watchdog"], exit=True)
    {"concurrency": mode_concurrency, "requests": mode_requests, "load": mode_load, "failed": mode_failed}[mode](args)


if __name__ == "__main__":
    main()
