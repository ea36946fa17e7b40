"""Shared fixtures: tiny random Qwen2 checkpoints (written once per session by transformers) with their
reference runs, `assert_close` and `DictCheckpoint`; the weight cache of int8 / int4 loads in a session folder.

torch / transformers are imported only inside the fixtures that need them, so test modules that do
not use these fixtures run without them.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import reference` from any cwd

class DictCheckpoint:
    """The part of vlmfo1.safetensors.Checkpoint that the loaders use, over in-memory arrays."""

    class _Info:
        def __init__(self, a):
            self.shape, self.dtype = tuple(a.shape), "BF16" if a.dtype == np.uint16 else "F32"

    def __init__(self, arrays):
        self.arrays = arrays

    def __contains__(self, name):
        return name in self.arrays

    def keys(self):
        return iter(self.arrays)

    def info(self, name):
        return self._Info(self.arrays[name])

    def get(self, name):
        if name not in self.arrays:
            raise KeyError(name)
        return self.arrays[name]


PROMPT_LEN = 37   # odd on purpose (kernel tails)
N_STEPS = 32      # decode steps checked against the reference
PROMPT_SEED = 1234


def max_errors(a, b):
    """(max|a - b|, max|a - b| / max|b|) with b the reference, in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: got {a.shape}, reference {b.shape}")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return diff, diff / max(scale, 1e-30)


def assert_close(a, b, rtol, atol=0.0, name="value"):
    """Assert max|a - b| <= atol + rtol * max|b| (b is the reference).  Prints the max abs/rel error
    either way (visible with -s or -rA) and puts them in the failure message.  Returns (abs, rel)."""
    a_arr = np.asarray(a, dtype=np.float64)
    b_arr = np.asarray(b, dtype=np.float64)
    abs_err, rel_err = max_errors(a_arr, b_arr)
    scale = float(np.max(np.abs(b_arr))) if b_arr.size else 0.0
    ok = bool(np.all(np.isfinite(a_arr))) and abs_err <= atol + rtol * scale
    print(f"[assert_close] {name}: max abs err {abs_err:.3e}, max rel err {rel_err:.3e} "
          f"(max|ref| {scale:.3g}; rtol {rtol:g}, atol {atol:g}) {'ok' if ok else 'FAIL'}")
    if not ok:
        where = ""
        if a_arr.size and np.all(np.isfinite(a_arr)):
            idx = np.unravel_index(int(np.argmax(np.abs(a_arr - b_arr))), a_arr.shape)
            where = f" at index {tuple(int(i) for i in idx)}: got {a_arr[idx]!r}, ref {b_arr[idx]!r}"
        elif a_arr.size:
            where = f"; {int(np.sum(~np.isfinite(a_arr)))} non-finite values"
        raise AssertionError(f"{name}: max abs err {abs_err:.3e}, max rel err {rel_err:.3e} "
                             f"> rtol {rtol:g} (atol {atol:g}, max|ref| {scale:.3g}){where}")
    return abs_err, rel_err


@pytest.fixture(scope="session", autouse=True)
def _weight_cache_dir(tmp_path_factory):
    """int8 / int4 loads cache their weights (vlmfo1.weight_cache) in a folder of this session, never in the real
    home; subprocesses inherit it. Tests of the cache itself pass their own cache_dir."""
    old = os.environ.get("VLMFO1_CACHE_DIR")
    os.environ["VLMFO1_CACHE_DIR"] = str(tmp_path_factory.mktemp("weight_cache"))
    yield
    if old is None:
        os.environ.pop("VLMFO1_CACHE_DIR", None)
    else:
        os.environ["VLMFO1_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def close():
    """`assert_close` as a fixture, for test modules that prefer not to import conftest."""
    return assert_close


@dataclass
class TinyCkpt:
    name: str            # fixture name
    path: str            # checkpoint folder
    model: object        # transformers Qwen2ForCausalLM, fp32, eager, loaded back from `path`
    ids: list            # the prompt (PROMPT_LEN token ids)
    ref: object          # reference.RefRun for `ids` and N_STEPS greedy steps
    dtype: str           # dtype on disk
    tied: bool

    @property
    def vocab_size(self):
        return int(self.model.config.vocab_size)


def _prompt(vocab):
    return np.random.default_rng(PROMPT_SEED).integers(0, vocab, size=PROMPT_LEN).tolist()


def _build(tmp_path_factory, name, **kw):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    import torch

    import reference

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    d = str(tmp_path_factory.mktemp(name))
    model = reference.make_tiny_qwen2(d, **kw)
    ids = _prompt(model.config.vocab_size)
    ref = reference.ref_prefill_and_steps(model, ids, N_STEPS)
    return TinyCkpt(name=name, path=d, model=model, ids=ids, ref=ref, dtype=kw.get("dtype", "float32"),
                    tied=bool(model.config.tie_word_embeddings))


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory):
    """fp32 single-file checkpoint, tied embeddings, Qwen2.5-style config.json."""
    return _build(tmp_path_factory, "tiny_fp32", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory):
    """Same weights as tiny_fp32, written as >= 2 shards + model.safetensors.index.json."""
    return _build(tmp_path_factory, "tiny_sharded", dtype="float32", sharded=True)


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    """fp32, separate lm_head.weight, transformers-5-style config.json (dtype, rope_parameters)."""
    return _build(tmp_path_factory, "tiny_untied", dtype="float32", tie_word_embeddings=False,
                  config_style="v5")


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory):
    """bf16 checkpoint (the tiny_fp32 weights rounded); model/ref = transformers fp32 on those
    bf16-rounded weights."""
    return _build(tmp_path_factory, "tiny_bf16", dtype="bfloat16")


@pytest.fixture(scope="session")
def tiny_bf16_soft(tmp_path_factory):
    """bf16 checkpoint with gentler attention (qk_gain=1), for the compute="bf16" tolerance test: with
    the default sharp attention the ideal bf16 engine is already ~6% off fp32 (see the test)."""
    return _build(tmp_path_factory, "tiny_bf16_soft", dtype="bfloat16", qk_gain=1.0)


@pytest.fixture(scope="session")
def fo1_tiny_ckpt(tmp_path_factory):
    """A tiny random VLM-FO1 checkpoint (bf16, official layout, shared tokenizer), written once per session by
    vlmfo1 itself; tests must not modify it (copy it first)."""
    from vlmfo1.testing.fo1 import write_random_fo1
    tiktoken = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                            "data", "tokenizer", "qwen.tiktoken")
    if not os.path.exists(tiktoken):
        pytest.skip("shared tokenizer not found")
    p = tmp_path_factory.mktemp("fo1") / "VLM-FO1_Qwen2.5-VL-3B-tiny"
    write_random_fo1(str(p), size="tiny", tiktoken_path=tiktoken)
    return str(p)


@pytest.fixture(scope="session")
def LanguageModel():
    """The engine class (imported here so a broken build errors the engine tests, not collection)."""
    from vlmfo1 import LanguageModel as LM

    return LM
