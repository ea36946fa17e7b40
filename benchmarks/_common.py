"""Shared pieces of the benchmarks: a random-weight checkpoint at real Qwen2.5-3B shapes, peak-RSS
reading, subprocess plumbing and table formatting.

Benchmark-only: uses torch / safetensors (never imported by the vlmfo1 package).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

# Qwen2.5-3B (Instruct) decoder shapes, config.json as the real checkpoint ships it.
QWEN25_3B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 32768,
    "max_window_layers": 70,
    "model_type": "qwen2",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

SHARD_BYTES = 4 * 1024**3   # -> 2 shards for the full bf16 model, like the real checkpoint
_STAMP = ".vlmfo1_bench_complete"


def qwen25_3b_config(layers: int = 36, dtype: str = "bfloat16") -> dict:
    cfg = dict(QWEN25_3B)
    cfg["num_hidden_layers"] = int(layers)
    cfg["max_window_layers"] = int(layers)
    cfg["torch_dtype"] = dtype
    return cfg


def tensor_shapes(cfg: dict):
    """[(name, shape)] of the checkpoint tensors, in the order of transformers' state_dict (no
    lm_head.weight when the embeddings are tied)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (nh * hd, h)), (p + "self_attn.q_proj.bias", (nh * hd,)),
            (p + "self_attn.k_proj.weight", (nkv * hd, h)), (p + "self_attn.k_proj.bias", (nkv * hd,)),
            (p + "self_attn.v_proj.weight", (nkv * hd, h)), (p + "self_attn.v_proj.bias", (nkv * hd,)),
            (p + "self_attn.o_proj.weight", (h, nh * hd)),
            (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", True):
        out.append(("lm_head.weight", (v, h)))
    return out


def _check_shapes_against_transformers(cfg: dict, shapes):
    """The hand-written layout must be what transformers builds (checked on the meta device)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tcfg = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**tcfg))
    want = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    if cfg.get("tie_word_embeddings", True):
        want.pop("lm_head.weight", None)
    got = dict(shapes)
    if want != got:
        raise AssertionError(f"tensor layout mismatch: {sorted(set(want.items()) ^ set(got.items()))[:6]}")


def _random_tensor(name, shape, gen, dtype):
    """Weights with O(1) activations: linear std 1/sqrt(fan_in), q/k/v biases 0.5/0.5/0.1, norm
    weights 1 +- 0.2, embeddings std 0.25 (bf16 randn directly: ~125 M values/s on 2 cores)."""
    import torch

    if name.endswith("norm.weight"):
        return (1.0 + 0.2 * torch.randn(shape, generator=gen, dtype=torch.float32)).to(dtype)
    if name.endswith(".bias"):
        std = 0.1 if "v_proj" in name else 0.5
    elif "embed_tokens" in name:
        std = 0.25
    else:
        std = 1.0 / math.sqrt(shape[1])
    t = torch.randn(shape, generator=gen, dtype=dtype)
    return t.mul_(std)


def checkpoint_dir(workdir: str, layers: int, dtype: str) -> str:
    return os.path.join(workdir, f"qwen2.5-3b-random-L{layers}-{dtype}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _STAMP))


def make_random_checkpoint(path: str, layers: int = 36, seed: int = 0, log=print) -> str:
    """Write a random bf16 checkpoint with Qwen2.5-3B shapes (sharded safetensors + index +
    config.json), tensor by tensor so peak memory is about one shard.  Reused if already complete."""
    import torch
    from safetensors.torch import save_file

    if is_complete(path):
        return path
    os.makedirs(path, exist_ok=True)
    cfg = qwen25_3b_config(layers, "bfloat16")
    shapes = tensor_shapes(cfg)
    _check_shapes_against_transformers(cfg, shapes)
    total = sum(2 * math.prod(s) for _, s in shapes)
    gen = torch.Generator().manual_seed(seed)
    groups, cur, cur_bytes = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if cur and cur_bytes + nbytes > SHARD_BYTES:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    groups.append(cur)
    n = len(groups)
    weight_map = {}
    t0 = time.perf_counter()
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        tensors = {name: _random_tensor(name, shape, gen, torch.bfloat16) for name, shape in group}
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: fname for name, _ in group})
        log(f"  wrote {fname} ({time.perf_counter() - t0:.0f} s)")
    if n > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    _write_config(path, cfg)
    _write_stamp(path, {"layers": layers, "seed": seed, "dtype": "bfloat16", "bytes": total})
    return path


def make_fp32_copy(src: str, dst: str, log=print) -> str:
    """fp32 copy of a bf16 checkpoint, re-sharded at SHARD_BYTES of fp32 (peak memory ~ one shard)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if is_complete(dst):
        return dst
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["torch_dtype"] = "float32"
    where = {}
    for f in sorted(x for x in os.listdir(src) if x.endswith(".safetensors")):
        with safe_open(os.path.join(src, f), framework="pt") as h:
            for k in h.keys():
                where[k] = f
    names = [n for n, _ in tensor_shapes(cfg) if n in where]
    names += sorted(set(where) - set(names))
    sizes = {n: 4 * math.prod(s) for n, s in tensor_shapes(cfg)}
    groups, cur, cur_bytes = [], [], 0
    for n in names:
        if cur and cur_bytes + sizes.get(n, 0) > SHARD_BYTES:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(n)
        cur_bytes += sizes.get(n, 0)
    groups.append(cur)
    total, weight_map = 0, {}
    for i, group in enumerate(groups):
        fname = (f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1
                 else "model.safetensors")
        tensors = {}
        for n in group:
            with safe_open(os.path.join(src, where[n]), framework="pt") as h:
                tensors[n] = h.get_tensor(n).to(torch.float32)
        total += sum(t.numel() * 4 for t in tensors.values())
        save_file(tensors, os.path.join(dst, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
        del tensors
        log(f"  wrote fp32 {fname}")
    if len(groups) > 1:
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    _write_config(dst, cfg)
    _write_stamp(dst, {"from": src, "dtype": "float32", "bytes": total})
    return dst


def _write_config(path, cfg):
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_stamp(path, info):
    with open(os.path.join(path, _STAMP), "w") as f:
        json.dump(info, f)


def fo1_checkpoint_path(workdir: str, size: str, seed: int = 0) -> str:
    """Where the benchmarks keep a random VLM-FO1 checkpoint (the official loader needs "vlm-fo1" and "qwen2.5-vl"
    in the folder name)."""
    return os.path.join(workdir, f"VLM-FO1_Qwen2.5-VL-3B-random-{size}-seed{seed}")


def fo1_random_checkpoint(workdir: str, size: str, seed: int = 0, log=print) -> str:
    """A random VLM-FO1 checkpoint (vlmfo1.testing.fo1.write_random_fo1; "full" = the real shapes, ~4.15 B
    parameters, ~8.3 GB bf16), written once into `workdir` and reused (a stamp marks a complete one)."""
    import shutil

    from vlmfo1.testing.fo1 import write_random_fo1

    os.makedirs(workdir, exist_ok=True)
    ckpt = fo1_checkpoint_path(workdir, size, seed)
    if not os.path.isfile(os.path.join(ckpt, _STAMP)):
        shutil.rmtree(ckpt, ignore_errors=True)
        log(f"writing random {size} checkpoint to {ckpt} (once)")
        t0 = time.perf_counter()
        write_random_fo1(ckpt, size=size, seed=seed)
        _write_stamp(ckpt, {"size": size, "seed": seed})
        log(f"  done in {time.perf_counter() - t0:.0f} s")
    return ckpt


def kv_cache_bytes(cfg: dict, n_positions: int, bytes_per_elem: int = 4) -> int:
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * n_positions * bytes_per_elem


# ----------------------------------------------------------------------------- process / memory


def proc_status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM = peak RSS, VmRSS = current RSS); -1 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def peak_rss_bytes() -> int:
    kib = proc_status_kib("VmHWM")
    if kib < 0:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024
    return kib * 1024


def add_worker_args(parser, *extra: str) -> None:
    """The hidden options of a benchmark's worker processes: --worker (what to run), `extra` ones, and --out (the
    JSON result file run_worker passes)."""
    import argparse

    for name in ("--worker",) + extra + ("--out",):
        parser.add_argument(name, help=argparse.SUPPRESS)


def run_worker(argv, timeout: float, log=print):
    """Run `python argv...` in a fresh process (one engine per process, so its peak RSS is its own),
    passing a JSON result file; stderr/stdout go straight to ours.  Returns the result dict or
    {"error": ...}."""
    import tempfile

    fd, out = tempfile.mkstemp(suffix=".json", prefix="vlmfo1_bench_")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable] + list(argv) + ["--out", out], timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"error": f"worker exited with status {proc.returncode}"}
        with open(out) as f:
            res = json.load(f)
        res["wall_s"] = wall
        return res
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass


def read_safetensors_torch(path):
    """Yield (name, torch tensor) reading one tensor at a time with plain file reads: no mmap, so the file's pages
    do not count in the worker's RSS (safe_open's mmap would add the whole file to VmHWM)."""
    import struct

    import torch

    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            b, e = info["data_offsets"]
            f.seek(8 + n + b)
            buf = bytearray(f.read(e - b))
            yield name, torch.frombuffer(buf, dtype=dtypes[info["dtype"]]).reshape(info["shape"])


def randomize_(model, seed: int, is_norm) -> None:
    """Random weights in place: norm weights (is_norm(name)) 1 +- 0.2, biases 0.02 N(0, 1), other weights
    N(0, 1) / sqrt(fan_in) -- activations stay O(1) at any depth."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if is_norm(n):
                p.copy_(1 + 0.2 * r)
            elif n.endswith(".bias"):
                p.copy_(0.02 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))


def bench_dirs(a, name: str) -> dict:
    """The fp32 and bf16 checkpoint folders of a benchmark under --workdir (quick runs have their own)."""
    tag = "quick" if a.quick else "full"
    return {d: os.path.join(a.workdir, f"{name}-{tag}-{d}") for d in ("float32", "bfloat16")}


def save_fp32_and_bf16(dirs: dict, state_dict, raw_config: dict, log=print) -> None:
    """Write a torch state dict as an fp32 and a bf16 checkpoint (model.safetensors + config.json) into
    dirs["float32"] and dirs["bfloat16"], then a stamp so later runs reuse them."""
    import torch
    from safetensors.torch import save_file

    for dt, d in dirs.items():
        os.makedirs(d, exist_ok=True)
        t = state_dict if dt == "float32" else {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
        save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(dict(raw_config, torch_dtype=dt), f, indent=1)
        log(f"  wrote {d}")
    open(os.path.join(dirs["bfloat16"], ".complete"), "w").close()


def have_fp32_and_bf16(dirs: dict) -> bool:
    return os.path.exists(os.path.join(dirs["bfloat16"], ".complete"))


def run_engines(parser, a, engines_arg: str, engines: dict, baseline: str, argv, log=print):
    """The driver of a one-process-per-engine benchmark: check the engine names (baseline first, so the others'
    errors can be measured against it), run the "prepare" worker, then every engine's worker with `argv`.
    Returns (setup, results)."""
    names = [e.strip() for e in engines_arg.split(",") if e.strip()]
    unknown = [e for e in names if e not in engines]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; choose from {list(engines)}")
    if baseline in names:
        names = [baseline] + [e for e in names if e != baseline]
    os.makedirs(a.workdir, exist_ok=True)
    log("preparing weights and inputs ...")
    setup = run_worker(argv + ["--worker", "prepare"], a.timeout)
    if "error" in setup:
        raise SystemExit(f"setup failed: {setup['error']}")
    results = {}
    for e in names:
        log(f"running {e} ...")
        results[e] = run_worker(argv + ["--worker", e], a.timeout)
        log(f"  {e}: " + (results[e].get("error") or f"{results[e]['median_s']:.2f} s"))
    return setup, results


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return float("nan")
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def markdown_table(headers, rows) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


# ----------------------------------------------------------------------------------------------------------------
# achieved rates: FO1Result.flops (the C core's work counters) per stage against the peaks probed in the same run

PEAK_FAMILIES = ("fma32", "bf16dp", "vnni", "bandwidth")
FAMILY_NAMES = {"fma32": "fp32 FMA", "bf16dp": "AVX512-BF16 vdpbf16ps", "vnni": "AVX512-VNNI vpdpbusd"}
STAGES_WORK = ("vit", "davit", "hfre", "prefill", "decode")


def probe_peaks(threads: int) -> dict:
    """_core.peak of every family on `threads` threads (GFLOP/s, GOP/s; bandwidth GB/s), measured now."""
    from vlmfo1 import _core
    return {f: _core.peak(f, threads) for f in PEAK_FAMILIES}


def gemm_family(weights: str, compute: str, peaks: dict) -> str:
    """The instruction family a stage's matmuls run on: int8 / int4 weights -> vnni; bf16 weights with bf16 compute
    -> bf16dp (fma32 on a CPU without it); everything else fp32 FMA."""
    if weights in ("int8", "int4") and peaks.get("vnni", 0) > 0:
        return "vnni"
    if weights == "bf16" and compute == "bf16" and peaks.get("bf16dp", 0) > 0:
        return "bf16dp"
    return "fma32"


def stage_families(dtype, compute: str, peaks: dict) -> dict:
    """{stage: family} for a VLMFO1 loaded with dtype (None = the stored bf16, "float32", "int8", "mixed", "int4")."""
    vision = {"int8": "int8", "float32": "f32"}.get(dtype, "bf16")
    text = {"int8": "int8", "mixed": "int8", "int4": "int4", "float32": "f32"}.get(dtype, "bf16")
    fam_v, fam_t = gemm_family(vision, compute, peaks), gemm_family(text, compute, peaks)
    return {"vit": fam_v, "davit": fam_v, "hfre": fam_v, "prefill": fam_t, "decode": fam_t}


def decode_stream_bytes(decoder) -> int:
    """Bytes of weights one decode step reads: every array of the language model but the embedding table (one row
    is read), which is read in full when it is also the output layer (tied, no separate lm_head array)."""
    import numpy as np
    t = decoder._tensors
    skip = {"embed"} if "lm_head" in t else set()
    return int(sum(v.nbytes for k, v in t.items() if isinstance(v, np.ndarray) and k not in skip))


def work_rows(timings: dict, flops: dict, families: dict, peaks: dict, decode_bytes=None, decode_steps=None):
    """Rows [stage, seconds, GFLOP, of which attention, TFLOP/s, family, % of the family's peak, decode GB/s, % of
    bandwidth] for the stages of one request; flops: FO1Result.flops (or the same work for another engine)."""
    rows = []
    for s in STAGES_WORK:
        sec, f = timings.get(s, 0.0), flops.get(s)
        if f is None or sec <= 0:
            continue
        total = f["gemm"] + f["attention"]
        rate = total / sec / 1e9
        fam = families[s]
        row = [s, f"{sec:.2f}", f"{total / 1e9:.1f}", f"{100 * f['attention'] / total:.1f}%" if total else "-",
               f"{rate / 1e3:.3f}", FAMILY_NAMES[fam], f"{100 * rate / peaks[fam]:.0f}%" if peaks.get(fam) else "-"]
        if s == "decode" and decode_bytes and decode_steps:
            bw = decode_bytes * decode_steps / sec / 1e9
            row += [f"{bw:.1f}", f"{100 * bw / peaks['bandwidth']:.0f}%" if peaks.get("bandwidth") else "-"]
        else:
            row += ["", ""]
        rows.append(row)
    return rows


WORK_HEAD = ["stage", "s", "GFLOP (matmul + attention)", "attention", "TFLOP/s", "matmul family",
             "% of its peak", "decode GB/s of weights", "% of read bandwidth"]


def peaks_line(peaks: dict, threads: int) -> str:
    return (f"peaks probed in this run ({threads} threads, csrc/peak.c): fp32 FMA {peaks['fma32']:.0f} GFLOP/s, "
            f"vdpbf16ps {peaks['bf16dp']:.0f} GFLOP/s, vpdpbusd {peaks['vnni']:.0f} GOP/s, streaming read "
            f"{peaks['bandwidth']:.1f} GB/s")
