#!/usr/bin/env python
"""Decoder benchmark: vlmfo1 vs transformers on a random-weight model with real Qwen2.5-3B shapes.

    python benchmarks/bench_decoder.py                      # full: 36 layers, prompt 1024, 64 steps
    python benchmarks/bench_decoder.py --quick              # smoke: 4 layers, prompt 128, 16 steps
    python benchmarks/bench_decoder.py --engines hf-fp32,vlmfo1-bf16 --json out.json

The bf16 checkpoint (~6.2 GB for 36 layers) is written once into --workdir and reused; the fp32
copy (~12.4 GB) only when an engine needs it (vlmfo1-fp32).  Each engine runs in its own
subprocess, one after another (transformers fp32 alone peaks at ~12.4 GB), so the reported peak
RSS (VmHWM) is that engine's own.  Every engine gets the same prompt of random token ids, the same
thread count, one untimed warm-up (a short prefill + 2 steps on a separate cache), then a timed
prefill and `--steps` greedy decode steps; decode speed is 1 / median step time.

Engines:
  hf-fp32           transformers, bf16 checkpoint loaded with dtype=torch.float32 (sdpa attention)
  hf-bf16           transformers, dtype=torch.bfloat16
  vlmfo1-bf16       vlmfo1, bf16 weights, compute="bf16" (the default for a bf16 checkpoint)
  vlmfo1-bf16w-f32  vlmfo1, bf16 weights, compute="f32"
  vlmfo1-fp32       vlmfo1 on the fp32 copy of the checkpoint
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # in-tree vlmfo1 as fallback
import _common as C  # noqa: E402

ENGINES = {
    # name: (family, checkpoint dtype on disk, engine dtype/compute label)
    "hf-fp32": ("hf", "bfloat16", "fp32"),
    "hf-bf16": ("hf", "bfloat16", "bf16"),
    "vlmfo1-bf16": ("vlmfo1", "bfloat16", "bf16"),
    "vlmfo1-bf16w-f32": ("vlmfo1", "bfloat16", "f32"),
    "vlmfo1-fp32": ("vlmfo1", "float32", "f32"),
}
DEFAULT_ENGINES = "hf-fp32,hf-bf16,vlmfo1-bf16"
BASELINE = "hf-fp32"


def _prompt(vocab, n, seed):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- workers


def worker_hf(a, cfg, ids):
    import inspect

    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[ENGINES[a.worker][2]]
    t0 = time.perf_counter()
    model = Qwen2ForCausalLM.from_pretrained(a.ckpt, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    rss_loaded = C.proc_status_kib("VmRSS") * 1024
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    fwd_params = inspect.signature(type(model).forward).parameters
    cache_kw = "cache" if "cache" in fwd_params else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in fwd_params else {}

    def fwd(tok_ids, cache=None, last_only=False):
        x = torch.tensor([tok_ids], dtype=torch.long)
        kw = dict(keep) if last_only else {}
        if cache is not None:
            kw[cache_kw] = cache
        out = model(input_ids=x, use_cache=True, **kw)
        c = getattr(out, "cache", None)
        return out.logits[0, -1], (c if c is not None else out.past_key_values)

    with torch.inference_mode():
        if a.warmup:
            l, c = fwd(ids[: min(16, len(ids))], last_only=True)
            for _ in range(2):
                l, c = fwd([int(l.argmax())], c)
            del c
        t0 = time.perf_counter()
        logits, cache = fwd(ids, last_only=True)
        prefill_s = time.perf_counter() - t0
        tokens = [int(logits.float().argmax())]
        step_s = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            logits, cache = fwd([tokens[-1]], cache)
            tokens.append(int(logits.float().argmax()))
            step_s.append(time.perf_counter() - t0)
    return dict(load_s=load_s, prefill_s=prefill_s, step_s=step_s, tokens=tokens,
                weight_bytes=weight_bytes, rss_after_load=rss_loaded,
                notes=f"attn={model.config._attn_implementation}, prefill logits "
                      + ("last position only (logits_to_keep=1)" if keep else "all positions"))


def worker_vlmfo1(a, cfg, ids):
    import numpy as np

    from vlmfo1 import LanguageModel

    compute = ENGINES[a.worker][2]
    t0 = time.perf_counter()
    lm = LanguageModel.load(a.ckpt, mode="exact", compute=compute, n_threads=a.threads)
    load_s = time.perf_counter() - t0
    rss_loaded = C.proc_status_kib("VmRSS") * 1024
    max_ctx = len(ids) + a.steps + 8
    if a.warmup:
        s = lm.session(max_context=32)
        l = s.prefill(ids[: min(16, len(ids))])
        for _ in range(2):
            l = s.step(int(np.argmax(l)))
        del s
    s = lm.session(max_context=max_ctx)
    t0 = time.perf_counter()
    logits = s.prefill(ids)
    prefill_s = time.perf_counter() - t0
    tokens = [int(np.argmax(logits))]
    step_s = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        logits = s.step(tokens[-1])
        tokens.append(int(np.argmax(logits)))
        step_s.append(time.perf_counter() - t0)
    kv = None
    for attr in ("kv_bytes", "cache_bytes", "kv_cache_bytes"):
        if hasattr(s, attr):
            kv = int(getattr(s, attr))
            kv_note = f"session.{attr}"
            break
    if kv is None:
        kv = C.kv_cache_bytes(cfg, max_ctx, 4)
        kv_note = f"estimated: fp32 K+V for {max_ctx} positions"
    return dict(load_s=load_s, prefill_s=prefill_s, step_s=step_s, tokens=tokens,
                weight_bytes=int(lm.weight_bytes), kv_bytes=kv, rss_after_load=rss_loaded,
                notes=f"max_context={max_ctx}, kv {kv_note}")


def run_worker_main(a):
    with open(os.path.join(a.ckpt, "config.json")) as f:
        cfg = json.load(f)
    ids = _prompt(cfg["vocab_size"], a.prompt_len, a.seed)
    family = ENGINES[a.worker][0]
    res = (worker_hf if family == "hf" else worker_vlmfo1)(a, cfg, ids)
    res.update(engine=a.worker, peak_rss=C.peak_rss_bytes(), threads=a.threads,
               prompt_len=a.prompt_len, steps=a.steps, layers=cfg["num_hidden_layers"])
    res["prefill_tok_s"] = a.prompt_len / res["prefill_s"]
    res["decode_tok_s"] = 1.0 / C.median(res["step_s"]) if res["step_s"] else float("nan")
    with open(a.out, "w") as f:
        json.dump(res, f)
    _log(f"[{a.worker}] load {res['load_s']:.1f} s, prefill {res['prefill_s']:.2f} s "
         f"({res['prefill_tok_s']:.1f} tok/s), decode {res['decode_tok_s']:.2f} tok/s, "
         f"peak RSS {res['peak_rss'] / 1e9:.2f} GB, weights {res['weight_bytes'] / 1e9:.2f} GB")


# ----------------------------------------------------------------------------- driver


def _fmt(x, nd=2):
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def report(results, args) -> str:
    base = results.get(BASELINE)
    base = base if base and "error" not in base else None
    rows = []
    for name, r in results.items():
        fam, wdtype, comp = ENGINES[name]
        if "error" in r:
            rows.append([name, wdtype, comp, "error: " + r["error"]] + ["-"] * 7)
            continue
        agree = "-"
        if base and name != BASELINE:
            n = 0
            for x, y in zip(r["tokens"], base["tokens"]):
                if x != y:
                    break
                n += 1
            agree = f"{n}/{len(base['tokens'])}"
        ratio = lambda k: (r[k] / base[k]) if base else None  # noqa: E731
        rows.append([name, wdtype, comp, _fmt(r["prefill_tok_s"], 1), _fmt(r["decode_tok_s"]),
                     _fmt(r["peak_rss"] / 1e9), _fmt(r["weight_bytes"] / 1e9),
                     _fmt(ratio("prefill_tok_s")) + "x" if base else "-",
                     _fmt(ratio("decode_tok_s")) + "x" if base else "-",
                     _fmt(r["peak_rss"] / base["peak_rss"]) + "x" if base else "-", agree])
    headers = ["engine", "weights", "compute", "prefill tok/s", "decode tok/s", "peak RSS GB",
               "weights GB", f"prefill vs {BASELINE}", f"decode vs {BASELINE}", f"RSS vs {BASELINE}",
               "greedy = hf-fp32"]
    lines = [f"Qwen2.5-3B shapes, {args.layers} layers, random bf16 weights; prompt {args.prompt_len} "
             f"random ids, {args.steps} greedy decode steps (decode = 1 / median step), "
             f"{args.threads} threads.", "", C.markdown_table(headers, rows), ""]
    for name, r in results.items():
        if "error" not in r:
            lines.append(f"- {name}: load {r['load_s']:.1f} s, RSS after load "
                         f"{r['rss_after_load'] / 1e9:.2f} GB; {r.get('notes', '')}")
    r = results.get("vlmfo1-bf16")
    if r and "error" not in r:
        bound = 1.15 * r["weight_bytes"] + r["kv_bytes"]
        ok = r["peak_rss"] <= bound
        lines.append(f"- RSS check vlmfo1-bf16: peak RSS {r['peak_rss'] / 1e9:.3f} GB "
                     f"{'<=' if ok else '>'} 1.15 x weights {r['weight_bytes'] / 1e9:.3f} GB + KV "
                     f"{r['kv_bytes'] / 1e9:.3f} GB = {bound / 1e9:.3f} GB: {'PASS' if ok else 'FAIL'}")
        r["rss_check"] = {"bound": bound, "pass": ok}
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/vlmfo1_bench", help="checkpoint cache folder")
    p.add_argument("--engines", default=DEFAULT_ENGINES,
                   help=f"comma list from {','.join(ENGINES)} (default {DEFAULT_ENGINES})")
    p.add_argument("--bf16w-f32", action="store_true", help="also run vlmfo1-bf16w-f32")
    p.add_argument("--fp32-weights", action="store_true",
                   help="also run vlmfo1-fp32 (writes a 12.4 GB fp32 copy)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=None, help="default 1024 (128 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="default 64 (16 with --quick)")
    p.add_argument("--layers", type=int, default=None, help="default 36 (4 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 layers, prompt 128, 16 steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--timeout", type=float, default=3600, help="per engine, seconds")
    p.add_argument("--json", help="write all results here")
    # internal: one engine in this process
    p.add_argument("--worker", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.prompt_len = a.prompt_len or (128 if a.quick else 1024)
    a.steps = a.steps if a.steps is not None else (16 if a.quick else 64)
    a.layers = a.layers or (4 if a.quick else 36)

    if a.worker:
        return run_worker_main(a)

    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if a.bf16w_f32 and "vlmfo1-bf16w-f32" not in engines:
        engines.append("vlmfo1-bf16w-f32")
    if a.fp32_weights and "vlmfo1-fp32" not in engines:
        engines.append("vlmfo1-fp32")
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        p.error(f"unknown engine(s) {bad}; choose from {list(ENGINES)}")

    ck16 = C.checkpoint_dir(a.workdir, a.layers, "bf16")
    if not C.is_complete(ck16):
        _log(f"writing random bf16 checkpoint ({a.layers} layers) to {ck16} ...")
        C.make_random_checkpoint(ck16, a.layers, seed=a.seed, log=_log)
    ckpts = {"bfloat16": ck16}
    if any(ENGINES[e][1] == "float32" for e in engines):
        ck32 = C.checkpoint_dir(a.workdir, a.layers, "fp32")
        if not C.is_complete(ck32):
            _log(f"writing fp32 copy to {ck32} ...")
            C.make_fp32_copy(ck16, ck32, log=_log)
        ckpts["float32"] = ck32

    results = {}
    for e in engines:
        _log(f"== {e}")
        argv_w = [os.path.abspath(__file__), "--worker", e, "--ckpt", ckpts[ENGINES[e][1]],
                  "--threads", str(a.threads), "--prompt-len", str(a.prompt_len),
                  "--steps", str(a.steps), "--layers", str(a.layers), "--seed", str(a.seed)]
        if not a.warmup:
            argv_w.append("--no-warmup")
        results[e] = C.run_worker(argv_w, timeout=a.timeout, log=_log)
        if "error" in results[e]:
            _log(f"[{e}] {results[e]['error']}")

    text = report(results, a)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k not in ("worker", "ckpt", "out")},
                       "results": results, "report": text}, f, indent=2)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
