#!/usr/bin/env python
"""Load time and peak memory of an int8 / int4 load with and without the weight cache (vlmfo1.weight_cache).

    python benchmarks/bench_load.py /path/to/VLM-FO1_checkpoint --dtype int4          # VLM-FO1 (found from config)
    python benchmarks/bench_load.py /path/to/Qwen2.5-3B --dtype int8 --threads 2      # a plain Qwen2.5 decoder
    python benchmarks/bench_load.py --quick                                           # a tiny random checkpoint

Every load runs in its own process, one after another, in this order:
  off   cache_dir=False: quantize at load, write nothing (what every int8 / int4 load cost before the cache);
  cold  an empty cache folder: quantize, then write the cache files (fsync'd);
  warm  the same folder again: map the cache files, no quantization (--reps of them).
Per load: the seconds from_pretrained / load took, the process's peak RSS (VmHWM) and its RSS after the load (VmRSS;
file pages mapped and touched count, shared pages included), and the sha256 of the decoder's logits on a fixed
12-token prompt: equal in every row, because a cached load gives the same arrays bit for bit. "Cold" is about the
weight cache only: the operating system's page cache is not dropped, so the checkpoint files (and, for "warm", the
cache files) may be read from memory rather than disk.
The cache folder is a fresh temporary one (--cache-dir to use another: it is emptied first), removed afterwards
unless --keep.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)
import _common as C  # noqa: E402

PROMPT = [9707, 11, 1879, 0, 358, 1079, 264, 1273, 315, 279, 4680, 13]   # 12 token ids (< any Qwen vocab size)


def _log(msg):
    print(f"[bench_load] {msg}", file=sys.stderr, flush=True)


def kind_of(path: str) -> str:
    """"fo1" (VLM-FO1 config keys), "qwen-vl" (a vision_config) or "qwen" (a plain decoder)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if any(k.startswith("mm_") for k in cfg):
        return "fo1"
    return "qwen-vl" if "vision_config" in cfg else "qwen"


def worker(a) -> dict:
    cache_dir = False if a.cache_dir == "off" else a.cache_dir
    t0 = time.perf_counter()
    if a.kind == "fo1":
        from vlmfo1 import VLMFO1
        model = VLMFO1.from_pretrained(a.checkpoint, dtype=a.dtype, threads=a.threads, cache_dir=cache_dir)
        decoder = model.decoder
    elif a.kind == "qwen-vl":
        from vlmfo1 import QwenVL
        model = QwenVL.load(a.checkpoint, dtype=a.dtype, n_threads=a.threads, cache_dir=cache_dir)
        decoder = model.decoder
    else:
        from vlmfo1 import LanguageModel
        model = decoder = LanguageModel.load(a.checkpoint, dtype=a.dtype, n_threads=a.threads, cache_dir=cache_dir)
    load_s = time.perf_counter() - t0
    out = {"load_s": load_s, "peak_rss": C.peak_rss_bytes(), "rss": C.proc_status_kib("VmRSS") * 1024}
    ids = [t % decoder.vocab_size for t in PROMPT]
    logits = decoder.session(max_context=64).prefill(ids, all_logits=True)
    out["logits_sha256"] = hashlib.sha256(logits.tobytes()).hexdigest()
    return out


def cache_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) if os.path.isdir(d) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (VLM-FO1, Qwen2.5-VL or Qwen2.5)")
    p.add_argument("--dtype", default="int4", choices=["int8", "int4", "mixed"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=1, help="warm loads (default 1)")
    p.add_argument("--cache-dir", help="the cache folder to use (emptied first; default: a fresh temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary cache folder")
    p.add_argument("--quick", action="store_true", help="a tiny random VLM-FO1 checkpoint (smoke run)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vlmfo1_bench_fo1"),
                   help="where --quick writes its checkpoint (once)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", help="also write the results there")
    C.add_worker_args(p, "--kind")
    a = p.parse_args(argv)
    if a.worker:
        res = worker(a)
        with open(a.out, "w") as f:
            json.dump(res, f)
        return 0
    if a.quick:
        a.checkpoint = C.fo1_random_checkpoint(a.workdir, "tiny", log=_log)
    if not a.checkpoint:
        p.error("give a checkpoint folder (or --quick)")
    kind = kind_of(a.checkpoint)
    cache = a.cache_dir or tempfile.mkdtemp(prefix="vlmfo1_bench_load_cache_")
    shutil.rmtree(cache, ignore_errors=True)
    base = [os.path.abspath(__file__), "--worker", "1", "--kind", kind, a.checkpoint, "--dtype", a.dtype,
            "--threads", str(a.threads)]
    rows, results = [], []
    try:
        for label, cdir in [("off", "off"), ("cold", cache)] + [(f"warm{i + 1 if a.reps > 1 else ''}", cache)
                                                                 for i in range(a.reps)]:
            _log(f"{label}: loading {a.checkpoint} ({kind}, dtype {a.dtype}) ...")
            r = C.run_worker(base + ["--cache-dir", cdir], a.timeout)
            if "error" in r:
                raise SystemExit(f"{label}: {r['error']}")
            r.update(label=label, cache_bytes=cache_bytes(cache))
            results.append(r)
            rows.append([label, f"{r['load_s']:.2f}", f"{r['peak_rss'] / 2**30:.2f}", f"{r['rss'] / 2**30:.2f}",
                         f"{r['cache_bytes'] / 2**30:.2f}", r["logits_sha256"][:12]])
    finally:
        if not a.cache_dir and not a.keep:
            shutil.rmtree(cache, ignore_errors=True)
    cmd = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT)] + list(
        argv if argv is not None else sys.argv[1:]))
    print(f"{cmd}\n{a.checkpoint} ({kind}), dtype {a.dtype}, {a.threads} threads; each load in its own process\n")
    print(C.markdown_table(["load", "seconds", "peak RSS GiB", "RSS after GiB", "cache GiB", "logits sha256"], rows))
    same = len({r["logits_sha256"] for r in results}) == 1
    print(f"\nlogits bit-identical in every row: {'yes' if same else 'NO'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": cmd, "checkpoint": a.checkpoint, "kind": kind, "dtype": a.dtype,
                       "threads": a.threads, "results": results}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
