"""Results do not depend on the thread count: bitwise equality at n_threads 1, 2 and 3 (5 for raw matmuls).

The guarantee (csrc/gemm.c): on a given machine and kernel choice (OpenBLAS core type, VLM_GEMM_ISA), every output
element is computed by one thread in an order fixed by the shapes alone. fp32-weight GEMMs run as single-threaded
OpenBLAS sgemm calls on tiles whose shape depends only on (m, n, k), shared out over the engine's pool; the own
bf16 / small-m kernels split the n range. Results may differ between CPUs or kernel choices, never between thread
counts.

Checked here, fp32 and bf16 weights, on tiny random models built in memory (no torch): vlm_matmul at tiled and
untiled shapes (bias, accumulate), DaViT stage maps, the Qwen2.5-VL ViT tokens and full-attention maps, decoder
prefill logits (all positions). The same checks run again in subprocesses under other OpenBLAS kernels
(OPENBLAS_CORETYPE, the ones this CPU can run: Haswell is what a Zen 5 gets) and other own-kernel families
(VLM_GEMM_ISA=avx2, generic). Last, a tiny full FO1 request (prepare: ViT, DaViT, HFRE, projectors, splice; then
prefill logits and a few greedy tokens) in process.

Run as a script (`python tests/test_thread_invariance.py`) it prints the checks' result as one JSON line.
In the FO1 request test one loaded model serves every thread count (the thread count is read per call; loading
sets no thread state in the engine, OpenBLAS stays single-threaded).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script by its own subprocess step
from conftest import DictCheckpoint  # noqa: E402

THREADS = (1, 2, 3)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ----------------------------------------------------------------------------- tiny models (numpy only)

DAVIT = dict(embed_dim=[32, 64, 96, 128], depths=[1, 1, 2, 1], num_heads=[2, 4, 3, 4], num_groups=[2, 2, 3, 4],
             window_size=12)
VISION = dict(depth=3, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48, in_chans=3,
              patch_size=14, spatial_patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
              fullatt_block_indexes=[1, 2], hidden_act="silu")
DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=160, vocab_size=1000, rms_norm_eps=1e-6, rope_theta=1000000.0,
               tie_word_embeddings=True, max_position_embeddings=4096, model_type="qwen2")


def _arrays(shapes, seed):
    from vlmfo1.testing.fo1 import random_tensor
    return {k: random_tensor(k, v, seed) for k, v in shapes.items()}


def davit_outputs(dtype, threads):
    from vlmfo1.davit import DavitEncoder
    from vlmfo1.testing.fo1 import davit_shapes
    arrays = _arrays(davit_shapes(DAVIT["depths"], dims=DAVIT["embed_dim"]), 3)
    px = np.random.default_rng(5).standard_normal((3, 77, 130)).astype(np.float32)
    raw = {"vision_config": DAVIT}
    out = {}
    for nt in threads:   # a model per thread count, as a user would load it
        enc = DavitEncoder.from_checkpoint(DictCheckpoint(arrays), raw, dtype=dtype, n_threads=nt)
        out[nt] = {f"stage{s}": m for s, m in enumerate(enc(px))}
    return out


def vision_outputs(dtype, threads):
    from vlmfo1.testing.fo1 import vision_shapes
    from vlmfo1.vision import VisionTower
    arrays = _arrays(vision_shapes(VISION, prefix="visual."), 4)
    gh, gw = 10, 12
    px = np.random.default_rng(6).standard_normal((gh * gw, 3 * 2 * 14 * 14)).astype(np.float32)
    out = {}
    for nt in threads:
        vt = VisionTower.from_checkpoint(DictCheckpoint(arrays), {"vision_config": VISION}, dtype=dtype,
                                         n_threads=nt, prefix="visual.")
        tokens, feats = vt(px, (1, gh, gw), features=True)
        out[nt] = {"tokens": tokens, **{f"fullatt{i}": f for i, f in enumerate(feats)}}
    return out


def decoder_outputs(dtype, threads):
    from vlmfo1.decoder import LanguageModel
    from vlmfo1.testing.qwen2 import qwen2_shapes, _random_tensor
    rng = np.random.default_rng(7)
    arrays = {k: _random_tensor(k, v, rng, 1.0) for k, v in qwen2_shapes(DECODER).items()}
    ids = np.random.default_rng(8).integers(0, DECODER["vocab_size"], 45).tolist()
    out = {}
    for nt in threads:
        lm = LanguageModel.from_checkpoint(DictCheckpoint(arrays), DECODER, dtype=dtype, n_threads=nt)
        s = lm.session(max_context=64, chunk=32)   # two prefill chunks: 32 + 13 rows
        logits = s.prefill(ids, all_logits=True)
        step = s.step(int(np.argmax(logits[-1])))
        out[nt] = {"prefill_logits": logits, "step_logits": step}
    return out


def matmul_outputs(dtype, threads):
    from vlmfo1._native import core
    from vlmfo1.safetensors import f32_to_bf16_bits
    rng = np.random.default_rng(9)
    out = {nt: {} for nt in threads}
    # (m, k, n): below / above the small-m limit, one tile, several tiles with ragged edges
    for m, k, n in [(5, 64, 96), (17, 48, 80), (100, 128, 384), (300, 256, 512), (1100, 96, 1300), (37, 64, 4000)]:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.1)
        b = rng.standard_normal(n, dtype=np.float32)
        acc0 = rng.standard_normal((m, n), dtype=np.float32)
        if dtype == "bfloat16":
            w = f32_to_bf16_bits(w)
        for nt in threads:
            getattr(core, "set_blas_threads", lambda n: None)(nt)   # (engines before the fix)
            for compute in (("f32", "bf16") if dtype == "bfloat16" else ("f32",)):
                tag = f"{m}x{k}x{n}/{compute}"
                out[nt][tag] = core.matmul(x, w, compute=compute, n_threads=nt)
                out[nt][tag + "/bias"] = core.matmul(x, w, bias=b, compute=compute, n_threads=nt)
                acc = acc0.copy()
                core.matmul(x, w, bias=b, compute=compute, n_threads=nt, out=acc, accumulate=True)
                out[nt][tag + "/bias+acc"] = acc
    return out


CHECKS = {"matmul": matmul_outputs, "davit": davit_outputs, "vit": vision_outputs, "decoder": decoder_outputs}


def mismatches(outs):
    """Names of the outputs that are not bitwise equal to the first thread count's, with the max abs difference."""
    first, bad = next(iter(outs)), []
    for nt, res in outs.items():
        for name, a in res.items():
            r = outs[first][name]
            if a.shape != r.shape or not np.array_equal(a, r):
                d = float(np.max(np.abs(a.astype(np.float64) - r))) if a.shape == r.shape else float("nan")
                bad.append(f"{name}: n_threads {nt} vs {first}: max abs diff {d:.3g}")
    return bad


def run_checks(threads=THREADS, matmul_threads=(1, 2, 3, 5)):
    """{"blas": ..., "kernel": ..., "bad": [...]} over every check, fp32 and bf16 weights."""
    from vlmfo1._native import core
    bad = []
    for dtype in ("float32", "bfloat16"):
        for name, fn in CHECKS.items():
            outs = fn(dtype, matmul_threads if name == "matmul" else threads)
            bad += [f"{name} {dtype} {b}" for b in mismatches(outs)]
    info = core.gemm_info()
    return {"blas": info["blas"], "kernel": info["kernel"], "bad": bad}


# ----------------------------------------------------------------------------- tests


def test_thread_invariance_here():
    res = run_checks()
    assert not res["bad"], f"{res['blas']}, kernel {res['kernel']}:\n" + "\n".join(res["bad"])


def _core_name(blas_info):
    return blas_info.split("core=")[1].split()[0] if "core=" in blas_info else "?"


@pytest.fixture(scope="module")
def native_core():
    from vlmfo1._native import core
    return _core_name(core.gemm_info()["blas"]), core.gemm_info()["kernel"]


@pytest.mark.parametrize("env", [{"OPENBLAS_CORETYPE": "Haswell"}, {"OPENBLAS_CORETYPE": "Sandybridge"},
                                 {"OPENBLAS_CORETYPE": "SkylakeX"}, {"OPENBLAS_CORETYPE": "Cooperlake"},
                                 {"OPENBLAS_CORETYPE": "SapphireRapids"},
                                 {"VLM_GEMM_ISA": "avx2"}, {"VLM_GEMM_ISA": "generic"}],
                         ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
def test_thread_invariance_other_kernels(env, native_core):
    """The same checks with another OpenBLAS kernel or own-kernel family, in a fresh process (both are chosen when
    the libraries load). A core type this CPU cannot run falls back to another one: skipped when that one is the
    native core (already checked in process)."""
    levels = ["generic", "avx2", "avx512", "avx512bf16"]
    if "VLM_GEMM_ISA" in env and levels.index(native_core[1]) <= levels.index(env["VLM_GEMM_ISA"]):
        pytest.skip(f"this CPU's own kernels are already {native_core[1]} (checked in process)")
    e = dict(os.environ, **env)
    e.pop("OPENBLAS_NUM_THREADS", None)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--unless-core", native_core[0]], env=e, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if "skipped" in res:
        pytest.skip(f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} runs as {res['skipped']}, the native core here "
                    "(checked in process)")
    if "VLM_GEMM_ISA" in env:
        assert res["kernel"] == env["VLM_GEMM_ISA"] or native_core[1] == res["kernel"]
    print(f"[thread invariance] {env}: {res['blas'].split(' config')[0]}, kernel {res['kernel']}: "
          f"{len(res['bad'])} mismatches")
    assert not res["bad"], f"{res['blas']}, kernel {res['kernel']}:\n" + "\n".join(res["bad"])


# ----------------------------------------------------------------------------- a full FO1 request

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
TIKTOKEN = os.path.join(SHARED, "tokenizer", "qwen.tiktoken")


def _set_threads(fo1, nt):
    fo1.decoder.n_threads = fo1.vision.n_threads = fo1.davit.n_threads = fo1.hfre.n_threads = nt


@pytest.mark.skipif(not os.path.exists(TIKTOKEN), reason="shared tokenizer not found")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fo1_request_thread_invariance(fo1_tiny_ckpt, dtype):
    from vlmfo1.fo1 import FO1
    fo1 = FO1.load(fo1_tiny_ckpt, dtype=dtype, n_threads=1)
    img = (np.random.default_rng(11).random((120, 150, 3)) * 255).astype(np.uint8)
    boxes = [[10, 10, 60, 80], [30, 5, 140, 110], [0, 60, 150, 120]]
    outs = {}
    for nt in THREADS:
        _set_threads(fo1, nt)
        t = {}
        ids, emb, pos, delta, _, _ = fo1.prepare(img, boxes, "Please detect dog in this image.", trace=t)
        s = fo1.decoder.session(max_context=len(ids) + 8)
        logits = s.prefill_embeds(emb, pos, all_logits=True)
        res = {"embeddings": emb, "prefill_logits": logits, "image_tokens": t["image_tokens"],
               "region_features": t["region_features"], "region_tokens": t["region_tokens"],
               **{f"davit{i}": m for i, m in enumerate(t["davit_maps"])},
               **{f"vt{i}": m for i, m in enumerate(t["vt_maps"])}}
        s.rope_delta = delta
        for i in range(3):   # greedy steps
            logits = s.step(int(np.argmax(logits[-1])))[None]
            res[f"step{i}_logits"] = logits
        outs[nt] = res
    bad = mismatches(outs)
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    if len(sys.argv) == 3 and sys.argv[1] == "--unless-core" and "VLM_GEMM_ISA" not in os.environ:
        from vlmfo1._native import core as _c
        if _core_name(_c.gemm_info()["blas"]) == sys.argv[2]:
            print(json.dumps({"skipped": sys.argv[2]}))
            sys.exit(0)
    print(json.dumps(run_checks()))
