#!/usr/bin/env python
"""vlmfo1 against llama.cpp on the Qwen2.5-3B decoder: llama-bench's pp512 and tg64 on the same random weights.

    python benchmarks/bench_llamacpp.py --llama-dir /path/to/llama.cpp            # full: 36 layers, 5 repetitions
    python benchmarks/bench_llamacpp.py --llama-dir /path/to/llama.cpp --quick    # smoke: 4 layers, 2 repetitions
    python benchmarks/bench_llamacpp.py --llama-dir ... --engines vlmfo1-bf16,llama-bf16 --json out.json
    python benchmarks/bench_llamacpp.py --llama-dir ... --prepare-only   # checkpoint + GGUFs only (CPU-heavy)

llama.cpp is not part of this project and nothing of it is kept here (no code, no build script): bring a llama.cpp
source folder built for the CPU (Release, native CPU flags, no GPU backend) and pass it. The benchmark uses
<llama-dir>/convert_hf_to_gguf.py (with its own gguf-py; it imports sentencepiece, torch, transformers, pyyaml:
`pip install sentencepiece`) and, from --llama-build (default <llama-dir>/build), bin/llama-bench,
bin/llama-quantize and bin/libllama.so (for its system_info: the CPU features it was built with).

Steps:
  1. the random bf16 checkpoint of bench_decoder.py (_common.make_random_checkpoint: Qwen2.5-3B shapes, seed 0,
     ~6.2 GB for 36 layers) is written once into --workdir; a Qwen2.5 tokenizer (vocab.json, merges.txt,
     tokenizer.json, tokenizer_config.json, built from qwen.tiktoken) is added to it, because the converter
     needs one. vlmfo1 loads this folder; the converter converts this very folder.
  2. convert_hf_to_gguf.py --outtype bf16 -> BF16 GGUF; llama-quantize BF16 -> Q8_0 and Q4_0 (the standard
     recipes: with tied embeddings llama-quantize stores token_embd, the output layer too, as Q6_K in the Q4_0
     file and as Q8_0 in the Q8_0 file; the tensor types are listed in the output). Made once, reused.
  3. every engine runs in its own process, one after another, at --threads threads:
       llama-*   llama-bench -m <gguf> -p 512 -n 64 -t T -r R -o json (its own warm-up: one pp512 and one
                 single-token decode). pp512 = 512 random ids from an empty cache in one batch; tg64 = 64
                 single-token decodes from an empty cache (positions 0..63). tok/s = median of its samples_ts.
                 Peak RSS = ru_maxrss of the llama-bench process (the weights are mmapped: their resident pages
                 count, as for vlmfo1).
       vlmfo1-*  the same work through the Python API: LanguageModel.load(ckpt, dtype=..., n_threads=T); warm-up
                 = one prefill of 512 ids + one step; pp512 = R x (session.reset(); prefill(512 random ids));
                 tg64 = R x (session.reset(); prefill([1 random id]) + 63 x step(random id)), i.e. 64
                 single-token forwards at positions 0..63 (step() is a one-token prefill), all 64 timed.
                 tok/s = median over the R repetitions; peak RSS = the worker's VmHWM.
  4. a table of tok/s and peak RSS, and vlmfo1/llama.cpp ratios (> 1: vlmfo1 faster).
Differences that stay: llama.cpp keeps its KV cache in f16, vlmfo1 in f32; vlmfo1's prefill/step return the
last position's logits as a NumPy array (llama-bench leaves them in its buffer); prompt ids are random in both
(different draws).

Engines:
  vlmfo1-bf16  vlmfo1, bf16 weights as stored (compute "bf16")
  vlmfo1-int8  vlmfo1, LanguageModel.load(..., dtype="int8"); reported as an error where this vlmfo1 has no int8
  vlmfo1-int4  vlmfo1, dtype="int4": 4-bit blocks of 32 (4.125 bits per weight; output layer int8, embedding bf16)
  llama-bf16   llama.cpp, BF16 GGUF
  llama-q8_0   llama.cpp, Q8_0 GGUF
  llama-q4_0   llama.cpp, Q4_0 GGUF
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
sys.path.append(REPO)  # in-tree vlmfo1 as fallback
import _common as C  # noqa: E402

ENGINES = {
    # name: (family, what: vlmfo1 load dtype / GGUF file type)
    "vlmfo1-bf16": ("vlmfo1", None),
    "vlmfo1-int8": ("vlmfo1", "int8"),
    "vlmfo1-int4": ("vlmfo1", "int4"),
    "llama-bf16": ("llama", "BF16"),
    "llama-q8_0": ("llama", "Q8_0"),
    "llama-q4_0": ("llama", "Q4_0"),
}
DEFAULT_ENGINES = ",".join(ENGINES)
# the like-for-like pairs, printed first among the ratios
PAIRS = {"vlmfo1-bf16": "llama-bf16", "vlmfo1-int8": "llama-q8_0", "vlmfo1-int4": "llama-q4_0"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def _log(msg):
    print(f"[bench_llamacpp] {msg}", file=sys.stderr, flush=True)


def _load():
    """The 1/5/15-minute load averages (other jobs share the machine: every number goes with its load)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def llama_paths(a) -> dict:
    build = a.llama_build or os.path.join(a.llama_dir, "build")
    return {"bench": os.path.join(build, "bin", "llama-bench"),
            "quantize": os.path.join(build, "bin", "llama-quantize"),
            "lib": os.path.join(build, "bin", "libllama.so"),
            "convert": os.path.join(a.llama_dir, "convert_hf_to_gguf.py"),
            "gguf_py": os.path.join(a.llama_dir, "gguf-py")}


def llama_source_version(llama_dir: str) -> str:
    """git commit of the llama.cpp folder when it is a checkout, else ggml's version from its CMakeLists."""
    try:
        r = subprocess.run(["git", "-C", llama_dir, "describe", "--always", "--tags", "--dirty"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and r.stdout.strip():
            return "git " + r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    ver = {}
    try:
        import re

        with open(os.path.join(llama_dir, "ggml", "CMakeLists.txt")) as f:
            for m in re.finditer(r"set\(GGML_VERSION_(MAJOR|MINOR|PATCH)\s+(\d+)\)", f.read()):
                ver[m.group(1)] = m.group(2)
    except OSError:
        pass
    if len(ver) == 3:
        return f"not a git checkout; ggml {ver['MAJOR']}.{ver['MINOR']}.{ver['PATCH']}"
    return "unknown"


def vlmfo1_version() -> str:
    try:
        r = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                           timeout=30)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=30).stdout.strip()
            return r.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# ----------------------------------------------------------------------------- preparation (driver)


def ensure_tokenizer(ckpt: str, tiktoken_path: str = None) -> str:
    """Add a Qwen2.5 tokenizer (the real Qwen2 BPE from qwen.tiktoken + Qwen2.5's added tokens) to the checkpoint
    folder when it has none: convert_hf_to_gguf.py reads the vocabulary from it. The weights are not touched."""
    if all(os.path.isfile(os.path.join(ckpt, f)) for f in TOKENIZER_FILES):
        return "present"
    from vlmfo1 import constants
    from vlmfo1.tokenizer import Tokenizer

    tk = tiktoken_path or os.environ.get("VLMFO1_QWEN_TIKTOKEN") or constants.DEFAULT_TIKTOKEN
    if not os.path.isfile(tk):
        raise SystemExit(f"no qwen.tiktoken at {tk}: pass --tiktoken or set VLMFO1_QWEN_TIKTOKEN")
    Tokenizer.from_tiktoken(tk, model_max_length=32768).save(ckpt)
    return f"written from {os.path.abspath(tk)}"


def _run(cmd, what, env=None):
    _log(f"{what}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{what} failed with status {r.returncode}")
    return time.perf_counter() - t0


def ensure_ggufs(a, ckpt: str, types, paths) -> dict:
    """{type: path} of the GGUF files of `ckpt` (BF16 by the converter, the others quantized from it), made once.
    A GGUF is remade when the checkpoint's stamp is newer than it."""
    gdir = os.path.join(a.workdir, "gguf")
    os.makedirs(gdir, exist_ok=True)
    base = os.path.basename(os.path.normpath(ckpt))
    stamp = os.path.join(ckpt, C._STAMP)
    out = {t: os.path.join(gdir, f"{base}-{t}.gguf") for t in ("BF16",) + tuple(t for t in types if t != "BF16")}

    def fresh(p):
        return os.path.isfile(p) and os.path.getmtime(p) >= os.path.getmtime(stamp)

    made = {}
    if not fresh(out["BF16"]):
        for k in ("convert", "gguf_py"):
            if not os.path.exists(paths[k]):
                raise SystemExit(f"{paths[k]} not found: is --llama-dir a llama.cpp source folder?")
        tmp = out["BF16"] + ".part"
        made["BF16_s"] = _run([sys.executable, paths["convert"], ckpt, "--outtype", "bf16", "--outfile", tmp],
                              "convert to BF16 GGUF")
        os.replace(tmp, out["BF16"])
    for t in types:
        if t == "BF16" or fresh(out[t]):
            continue
        if not os.path.isfile(paths["quantize"]):
            raise SystemExit(f"{paths['quantize']} not found: build llama-quantize (see this file's docstring)")
        tmp = out[t] + ".part"
        made[f"{t}_s"] = _run([paths["quantize"], out["BF16"], tmp, t, str(a.threads)], f"quantize to {t}")
        os.replace(tmp, out[t])
    return {t: out[t] for t in types}, made


def gguf_summary(path: str, gguf_py: str) -> dict:
    """File size and {tensor type: [count, bytes]} of a GGUF, read with llama.cpp's gguf-py."""
    info = {"file_bytes": os.path.getsize(path)}
    try:
        if gguf_py not in sys.path:
            sys.path.insert(0, gguf_py)
        from gguf import GGUFReader

        r = GGUFReader(path)
        types = {}
        for t in r.tensors:
            k = t.tensor_type.name
            n, b = types.get(k, (0, 0))
            types[k] = (n + 1, b + int(t.n_bytes))
        info["tensor_types"] = {k: list(v) for k, v in sorted(types.items())}
        tok = [t for t in r.tensors if t.name == "token_embd.weight"]
        if tok:
            info["token_embd_type"] = tok[0].tensor_type.name
        info["has_output_weight"] = any(t.name == "output.weight" for t in r.tensors)
        meta = {}
        for k in ("general.file_type", "qwen2.block_count", "qwen2.embedding_length", "qwen2.feed_forward_length",
                  "qwen2.attention.head_count", "qwen2.attention.head_count_kv", "qwen2.rope.freq_base",
                  "qwen2.attention.layer_norm_rms_epsilon", "qwen2.context_length", "tokenizer.ggml.pre"):
            f = r.fields.get(k)
            if f is not None:
                v = f.contents()
                meta[k] = v if isinstance(v, (int, float, str)) else str(v)
        info["metadata"] = meta
        del r
    except Exception as e:  # noqa: BLE001 - a summary only
        info["tensor_types_error"] = f"{type(e).__name__}: {e}"
    return info


def check_same_weights(ckpt: str, bf16_gguf: str, gguf_py: str, layers: int) -> dict:
    """Spot check that the BF16 GGUF holds the checkpoint's weights bit for bit (embedding, first/last layer
    projections, a bias, a norm): {gguf name: "identical" | "DIFFERENT" | error}."""
    import numpy as np
    import torch
    from safetensors import safe_open

    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    from gguf import GGUFReader

    last = layers - 1
    pairs = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
             f"blk.{last}.ffn_down.weight": f"model.layers.{last}.mlp.down_proj.weight",
             f"blk.{last}.attn_v.weight": f"model.layers.{last}.self_attn.v_proj.weight",
             "blk.0.attn_k.bias": "model.layers.0.self_attn.k_proj.bias",
             f"blk.{last}.ffn_norm.weight": f"model.layers.{last}.post_attention_layernorm.weight"}
    where = {}
    idx = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            where = json.load(f)["weight_map"]
    r = GGUFReader(bf16_gguf)
    tensors = {t.name: t for t in r.tensors}
    out = {}
    for g, h in pairs.items():
        try:
            with safe_open(os.path.join(ckpt, where.get(h, "model.safetensors")), framework="pt") as f:
                ref = f.get_tensor(h)
            t = tensors[g]
            d = np.asarray(t.data)
            if ref.dtype == torch.bfloat16 and t.tensor_type.name == "BF16":
                same = np.array_equal(d.view(np.uint16).reshape(-1), ref.view(torch.int16).numpy().view(np.uint16)
                                      .reshape(-1))
            else:
                same = np.array_equal(d.astype(np.float32).reshape(-1), ref.float().numpy().reshape(-1))
            out[g] = "identical" if same else "DIFFERENT"
        except Exception as e:  # noqa: BLE001 - reported
            out[g] = f"{type(e).__name__}: {e}"
    del r, tensors
    return out


# ----------------------------------------------------------------------------- workers


def worker_vlmfo1(a) -> dict:
    import numpy as np

    from vlmfo1 import LanguageModel

    dtype = ENGINES[a.worker][1]
    t0 = time.perf_counter()
    try:
        lm = LanguageModel.load(a.ckpt, dtype=dtype, n_threads=a.threads)
    except Exception as e:  # noqa: BLE001 - reported, e.g. dtype="int8" on a vlmfo1 that has no int8 yet
        if dtype is None:
            raise
        return {"error": f"LanguageModel.load(dtype={dtype!r}) is not supported by this vlmfo1 "
                         f"({type(e).__name__}: {e})"}
    load_s = time.perf_counter() - t0
    rss_loaded = C.proc_status_kib("VmRSS") * 1024
    vocab = lm.config.vocab_size
    rng = np.random.default_rng(a.seed)
    draw = lambda n: rng.integers(0, vocab, size=n, dtype=np.int64)  # noqa: E731

    s = lm.session(max_context=max(a.pp, a.tg) + 8)
    if a.warmup:  # as llama-bench: one full prompt run and one single-token decode
        s.prefill(draw(a.pp))
        s.step(int(draw(1)[0]))
    pp_s = []
    for _ in range(a.reps):
        s.reset()
        ids = draw(a.pp)
        t0 = time.perf_counter()
        s.prefill(ids)
        pp_s.append(time.perf_counter() - t0)
    tg_s = []
    for _ in range(a.reps):
        s.reset()
        ids = draw(a.tg)
        t0 = time.perf_counter()
        s.prefill(ids[:1])          # position 0: a one-token forward, as step() is
        for i in range(1, a.tg):
            s.step(int(ids[i]))
        tg_s.append(time.perf_counter() - t0)
    assert s.n_past == a.tg
    pp_ts = [a.pp / t for t in pp_s]
    tg_ts = [a.tg / t for t in tg_s]
    return dict(load_s=load_s, rss_after_load=rss_loaded, weight_bytes=int(lm.weight_bytes),
                kv_state_bytes=int(s.nbytes), pp_samples_ts=pp_ts, tg_samples_ts=tg_ts,
                pp_tok_s=C.median(pp_ts), tg_tok_s=C.median(tg_ts),
                notes=f"dtype={dtype}, compute={lm.compute}, session max_context={s.max_context} "
                      f"(f32 KV + scratch {s.nbytes / 1e6:.0f} MB)")


def llama_system_info(lib: str) -> str:
    """llama_print_system_info() of the built libllama (the CPU backend's features: AVX2, AVX512_BF16, ...)."""
    import ctypes

    try:
        h = ctypes.CDLL(lib)
        h.llama_print_system_info.restype = ctypes.c_char_p
        return h.llama_print_system_info().decode().strip()
    except (OSError, AttributeError) as e:
        return f"unavailable ({e})"


def worker_llama(a) -> dict:
    import resource

    paths = llama_paths(a)
    if not os.path.isfile(paths["bench"]):
        return {"error": f"{paths['bench']} not found: build llama-bench (see this file's docstring)"}
    cmd = [paths["bench"], "-m", a.gguf, "-p", str(a.pp), "-n", str(a.tg), "-t", str(a.threads),
           "-r", str(a.reps), "-o", "json"]
    if not a.warmup:
        cmd.append("--no-warmup")
    _log(f"[{a.worker}] {' '.join(cmd)}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)   # stderr (its log) goes straight to ours
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"error": f"llama-bench exited with status {r.returncode}"}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024   # KiB on Linux; the only child
    rows = json.loads(r.stdout)
    pp = next(x for x in rows if x["n_prompt"] == a.pp and x["n_gen"] == 0)
    tg = next(x for x in rows if x["n_gen"] == a.tg and x["n_prompt"] == 0)
    fa = {-1: "auto", 0: "off", 1: "on"}.get(pp.get("flash_attn"), pp.get("flash_attn"))
    return dict(peak_rss=peak, pp_samples_ts=pp["samples_ts"], tg_samples_ts=tg["samples_ts"],
                pp_tok_s=C.median(pp["samples_ts"]), tg_tok_s=C.median(tg["samples_ts"]),
                pp_avg_ts=pp["avg_ts"], pp_stddev_ts=pp["stddev_ts"], tg_avg_ts=tg["avg_ts"],
                tg_stddev_ts=tg["stddev_ts"],
                llama_bench={k: v for k, v in pp.items() if not k.startswith(("samples_", "avg_", "stddev_"))},
                llama_bench_wall_s=wall, command=" ".join(cmd), weight_bytes=os.path.getsize(a.gguf),
                system_info=llama_system_info(paths["lib"]),
                notes=f"{pp.get('model_type')}, type_k/v {pp.get('type_k')}/{pp.get('type_v')}, "
                      f"flash_attn {fa}, n_batch {pp.get('n_batch')}, n_ubatch {pp.get('n_ubatch')}, "
                      f"load_mode {pp.get('load_mode')}, repack {pp.get('repack')}")


def run_worker_main(a):
    family = ENGINES[a.worker][0]
    res = worker_vlmfo1(a) if family == "vlmfo1" else worker_llama(a)
    if family == "vlmfo1":
        res["peak_rss"] = C.peak_rss_bytes()
    res.update(engine=a.worker, threads=a.threads, reps=a.reps, pp=a.pp, tg=a.tg)
    with open(a.out, "w") as f:
        json.dump(res, f)
    if "error" not in res:
        _log(f"[{a.worker}] pp{a.pp} {res['pp_tok_s']:.2f} tok/s, tg{a.tg} {res['tg_tok_s']:.2f} tok/s, "
             f"peak RSS {res['peak_rss'] / 1e9:.2f} GB")
    return 0


# ----------------------------------------------------------------------------- driver


def _fmt(x, nd=2):
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def report(results, a, meta) -> str:
    ok = {k: r for k, r in results.items() if "error" not in r}
    rows = []
    for name, r in results.items():
        fam, what = ENGINES[name]
        label = ("bf16 (as stored)" if what is None else what) if fam == "vlmfo1" else what + " GGUF"
        if "error" in r:
            rows.append([name, label, "error (below)", "-", "-", "-", "-"])
            continue
        rows.append([name, label, _fmt(r["pp_tok_s"]), _fmt(r["tg_tok_s"]), _fmt(r["peak_rss"] / 1e9),
                     _fmt(r["weight_bytes"] / 1e9), f"{r['load_before'][0]:.2f} / {r['load_after'][0]:.2f}"])
    lines = [f"Qwen2.5-3B decoder, {meta['layers']} layers, random weights (one bf16 checkpoint; the GGUFs are "
             f"converted from it), {a.threads} threads, median of {a.reps} repetitions. pp{a.pp}: {a.pp} random ids "
             f"from an empty cache; tg{a.tg}: {a.tg} single-token forwards from an empty cache.", "",
             C.markdown_table(["engine", "weights", f"pp{a.pp} tok/s", f"tg{a.tg} tok/s", "peak RSS GB",
                               "weights GB", "load 1-min before / after"], rows), ""]
    vl = [n for n in ok if ENGINES[n][0] == "vlmfo1"]
    ll = [n for n in ok if ENGINES[n][0] == "llama"]
    if vl and ll:
        rrows = []
        for v in vl:
            order = ([PAIRS[v]] if PAIRS.get(v) in ll else []) + [x for x in ll if x != PAIRS.get(v)]
            for l in order:
                rv, rl = ok[v], ok[l]
                rrows.append([f"{v} / {l}", f"{rv['pp_tok_s'] / rl['pp_tok_s']:.2f}x",
                              f"{rv['tg_tok_s'] / rl['tg_tok_s']:.2f}x",
                              f"{rv['peak_rss'] / rl['peak_rss']:.2f}x"])
        lines += ["vlmfo1 / llama.cpp (tok/s ratio > 1: vlmfo1 faster; RSS ratio < 1: vlmfo1 smaller):", "",
                  C.markdown_table(["pair", f"pp{a.pp}", f"tg{a.tg}", "peak RSS"], rrows), ""]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"- {name}: error: {r['error']}")
            continue
        spread = (f"pp samples {min(r['pp_samples_ts']):.2f}..{max(r['pp_samples_ts']):.2f}, "
                  f"tg samples {min(r['tg_samples_ts']):.2f}..{max(r['tg_samples_ts']):.2f} tok/s")
        extra = f"load {r['load_s']:.1f} s, " if "load_s" in r else ""
        lines.append(f"- {name}: {extra}{spread}; {r.get('notes', '')}")
    lb = next((r for r in ok.values() if "llama_bench" in r), None)
    if lb:
        b = lb["llama_bench"]
        lines += [f"- llama.cpp: {meta['llama_version']}; llama-bench build {b.get('build_commit')} "
                  f"({b.get('build_number')}), backends {b.get('backends')}, cpu_info {b.get('cpu_info')!r}",
                  f"- llama.cpp system_info: {lb.get('system_info')}"]
    for t, g in meta.get("gguf", {}).items():
        types = ", ".join(f"{k} x{n}" for k, (n, _) in g.get("tensor_types", {}).items())
        tied = "" if g.get("has_output_weight") else " (tied: also the output layer)"
        m = g.get("metadata", {})
        lines.append(f"- {t} GGUF: {g['file_bytes'] / 1e9:.2f} GB; tensors {types}; token_embd "
                     f"{g.get('token_embd_type')}{tied}; {m.get('qwen2.block_count')} blocks, rope base "
                     f"{m.get('qwen2.rope.freq_base')}, rms eps {m.get('qwen2.attention.layer_norm_rms_epsilon')}")
    if meta.get("same_weights_check"):
        chk = meta["same_weights_check"]
        n_ok = sum(v == "identical" for v in chk.values())
        lines.append(f"- checkpoint vs BF16 GGUF, bit-for-bit spot check: {n_ok}/{len(chk)} tensors identical"
                     + ("" if n_ok == len(chk) else f" {chk}"))
    lines.append(f"- vlmfo1 {meta['vlmfo1_version']}; load average at the start {meta['load_start']}, "
                 f"at the end {meta.get('load_end')}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-dir", help="llama.cpp source folder (convert_hf_to_gguf.py, gguf-py)")
    p.add_argument("--llama-build", help="llama.cpp build folder with bin/llama-bench (default <llama-dir>/build)")
    p.add_argument("--workdir", default="/tmp/vlmfo1_bench", help="checkpoint and GGUF cache folder")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma list from {DEFAULT_ENGINES}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5, 2 with --quick)")
    p.add_argument("--pp", type=int, default=512, help="prompt tokens (llama-bench -p)")
    p.add_argument("--tg", type=int, default=64, help="generated tokens (llama-bench -n)")
    p.add_argument("--layers", type=int, default=None, help="default 36 (4 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 layers for both engines, 2 repetitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiktoken", help="qwen.tiktoken for the tokenizer files (default: the project's)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the checkpoint, tokenizer and GGUFs, then stop (time the engines later, when the "
                        "machine is quiet)")
    p.add_argument("--timeout", type=float, default=3600, help="per engine, seconds")
    p.add_argument("--json", help="write all results here")
    # internal: one engine in this process
    p.add_argument("--worker", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.reps = a.reps or (2 if a.quick else 5)
    a.layers = a.layers or (4 if a.quick else 36)
    if a.tg < 1 or a.pp < 1:
        p.error("--pp and --tg must be >= 1")

    if a.worker:
        return run_worker_main(a)

    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        p.error(f"unknown engine(s) {bad}; choose from {list(ENGINES)}")
    gtypes = tuple(dict.fromkeys(ENGINES[e][1] for e in engines if ENGINES[e][0] == "llama"))
    if gtypes and not a.llama_dir:
        p.error("the llama.cpp engines need --llama-dir")
    paths = llama_paths(a) if a.llama_dir else {}
    meta = {"load_start": _load(), "layers": a.layers, "vlmfo1_version": vlmfo1_version(),
            "llama_version": llama_source_version(a.llama_dir) if a.llama_dir else None,
            "python": sys.version.split()[0]}
    _log(f"load average {meta['load_start']}")

    ckpt = C.checkpoint_dir(a.workdir, a.layers, "bf16")
    if not C.is_complete(ckpt):
        _log(f"writing random bf16 checkpoint ({a.layers} layers) to {ckpt} ...")
        C.make_random_checkpoint(ckpt, a.layers, seed=a.seed, log=_log)
    meta["checkpoint"] = ckpt
    meta["tokenizer"] = ensure_tokenizer(ckpt, a.tiktoken)
    ggufs = {}
    if gtypes:
        ggufs, made = ensure_ggufs(a, ckpt, gtypes, paths)
        meta["gguf_made_s"] = made
        meta["gguf"] = {t: dict(gguf_summary(g, paths["gguf_py"]), path=g) for t, g in ggufs.items()}
        bf16 = os.path.join(os.path.dirname(ggufs[gtypes[0]]),
                            os.path.basename(os.path.normpath(ckpt)) + "-BF16.gguf")
        meta["same_weights_check"] = check_same_weights(ckpt, bf16, paths["gguf_py"], a.layers)
        _log(f"checkpoint vs BF16 GGUF: {meta['same_weights_check']}")
    if a.prepare_only:
        _log(f"prepared {ckpt}" + "".join(f", {g}" for g in ggufs.values()))
        return 0

    results = {}
    for e in engines:
        fam, what = ENGINES[e]
        _log(f"== {e} (load average {_load()})")
        argv_w = [os.path.abspath(__file__), "--worker", e, "--threads", str(a.threads), "--reps", str(a.reps),
                  "--pp", str(a.pp), "--tg", str(a.tg), "--layers", str(a.layers), "--seed", str(a.seed)]
        argv_w += ["--ckpt", ckpt] if fam == "vlmfo1" else ["--gguf", ggufs[what], "--llama-dir", a.llama_dir]
        if a.llama_build:
            argv_w += ["--llama-build", a.llama_build]
        if not a.warmup:
            argv_w.append("--no-warmup")
        before = _load()
        r = C.run_worker(argv_w, timeout=a.timeout, log=_log)
        r["load_before"], r["load_after"] = before, _load()
        results[e] = r
        if "error" in r:
            _log(f"[{e}] {r['error']}")
    meta["load_end"] = _load()

    text = report(results, a, meta)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k not in ("worker", "ckpt", "gguf", "out")},
                       "meta": meta, "results": results, "report": text}, f, indent=2)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
