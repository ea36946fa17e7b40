"""generation_config.json logits processors (vlmfo1.generation, ERRATA E8).

(a) transformers parity: a tiny random Qwen2 checkpoint whose generation_config.json sets repetition_penalty (1.5 and
1.05; also no_repeat_ngram_size / suppress_tokens / min_new_tokens); our greedy tokens == transformers'
`generate` tokens (transformers merges generation_config.json itself when it loads with from_pretrained).
The reference-mode order (bf16 logits -> float32 -> processors -> argmax) is checked against transformers with the
lm_head output rounded to bf16 and the rotary frequencies rounded to bf16 (ERRATA E1/E2), as the official run has them.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest

from vlmfo1.generation import GenerationSettings, read_generation_config

N_NEW = 40


def _variant(src: str, dst, gen: dict) -> str:
    """A copy of checkpoint folder `src` (weights symlinked) with generation_config.json = gen."""
    dst = str(dst)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name == "generation_config.json":
            continue
        s = os.path.join(src, name)
        if name.endswith(".safetensors"):
            os.symlink(s, os.path.join(dst, name))
        else:
            shutil.copy(s, os.path.join(dst, name))
    base = read_generation_config(src)
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        json.dump({**base, **gen}, f)
    return dst


def _hf_generate(path, ids, n, bf16_logits=False, bf16_rope=False):
    import torch

    import reference
    model = reference.load_hf(path, "float32")
    hook = None
    if bf16_rope:
        re_ = model.model.rotary_emb
        re_.inv_freq = re_.inv_freq.to(torch.bfloat16).float()
        re_.original_inv_freq = re_.inv_freq
    if bf16_logits:   # the official run's lm_head is bf16: logits are bf16 values, widened by .float()
        hook = model.lm_head.register_forward_hook(lambda m, i, o: o.to(torch.bfloat16).float())
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    finally:
        if hook is not None:
            hook.remove()
    toks = out[0, len(ids):].tolist()
    return toks


def _ours(LanguageModel, path, ids, n, **kw):
    mode = kw.pop("mode", "exact")
    lm = LanguageModel.load(path, mode=mode)
    return lm.generate(ids, max_new_tokens=n, stop_ids=[], **kw), lm


def _no_eos(gen):
    # random weights: keep generating so the comparisons are long (transformers stops on eos otherwise)
    return {**gen, "eos_token_id": None}


@pytest.mark.parametrize("gen", [
    {"repetition_penalty": 1.5},
    {"repetition_penalty": 1.05},
    {"repetition_penalty": 1.05, "do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1},  # stock Qwen
    {"no_repeat_ngram_size": 2},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "suppress_tokens": [5, 17]},
], ids=["rp1.5", "rp1.05", "stock-qwen", "ngram2", "combo"])
def test_greedy_matches_transformers(LanguageModel, tiny_fp32, tmp_path, gen):
    pytest.importorskip("torch")
    path = _variant(tiny_fp32.path, tmp_path / "ck", _no_eos(gen))
    ref = _hf_generate(path, tiny_fp32.ids, N_NEW)
    got, lm = _ours(LanguageModel, path, tiny_fp32.ids, N_NEW)
    plain, _ = _ours(LanguageModel, path, tiny_fp32.ids, N_NEW, repetition_penalty=1.0)
    assert lm.generation.repetition_penalty == gen.get("repetition_penalty", 1.0)
    lm.generation = GenerationSettings()          # no processors at all
    bare = lm.generate(tiny_fp32.ids, max_new_tokens=N_NEW, stop_ids=[])
    print(f"[generation] {gen}: {sum(a == b for a, b in zip(got, ref))}/{len(ref)} tokens equal; "
          f"without processors {sum(a == b for a, b in zip(bare, ref))}/{len(ref)}")
    assert bare != ref                            # the processors change this run (the test fails without them)
    assert len(ref) == N_NEW
    assert got == ref
    if gen.get("repetition_penalty", 1.0) != 1.0 and "no_repeat_ngram_size" not in gen:
        # the penalty changes this greedy run (the test would fail without it)
        assert plain != ref


def test_stock_qwen_penalty_changes_tokens(LanguageModel, tiny_fp32, tmp_path):
    """The shipped 1.05 is small; on this model it must still move at least one greedy token, or the
    rp1.05 parity above proves nothing."""
    path = _variant(tiny_fp32.path, tmp_path / "ck", _no_eos({"repetition_penalty": 1.05}))
    got, _ = _ours(LanguageModel, path, tiny_fp32.ids, N_NEW)
    plain, _ = _ours(LanguageModel, path, tiny_fp32.ids, N_NEW, repetition_penalty=1.0)
    assert got != plain


def test_override_and_min_new_tokens(LanguageModel, tiny_fp32, tmp_path):
    import torch

    import reference
    path = _variant(tiny_fp32.path, tmp_path / "ck", {"repetition_penalty": 1.5})
    got, lm = _ours(LanguageModel, path, tiny_fp32.ids, 12, repetition_penalty=2.0)
    model = reference.load_hf(path, "float32")
    with torch.no_grad():
        out = model.generate(torch.tensor([tiny_fp32.ids]), do_sample=False, max_new_tokens=12, repetition_penalty=2.0,
                             eos_token_id=None, attention_mask=torch.ones(1, len(tiny_fp32.ids), dtype=torch.long))
    assert got == out[0, len(tiny_fp32.ids):].tolist()
    # min_new_tokens: eos banned for the first steps. Make the first greedy token an "eos" of the config.
    first = lm.generate(tiny_fp32.ids, max_new_tokens=1, repetition_penalty=1.0, stop_ids=[])[0]
    path2 = _variant(tiny_fp32.path, tmp_path / "ck2", {"eos_token_id": [first], "min_new_tokens": 3})
    ref = _hf_generate(path2, tiny_fp32.ids, 8)
    lm2 = LanguageModel.load(path2)
    got2 = lm2.generate(tiny_fp32.ids, max_new_tokens=8)
    assert got2 == ref and got2[0] != first


@pytest.mark.parametrize("penalty", [1.5, 1.05])
def test_reference_mode_order(LanguageModel, tiny_bf16, tmp_path, penalty):
    """reference mode: bf16 logits -> float32 -> penalty -> argmax (the official processors run on
    `logits.float()` of a bf16 lm_head), vs transformers with the same roundings (E1 rope, E2 logits)."""
    path = _variant(tiny_bf16.path, tmp_path / "ck", _no_eos({"repetition_penalty": penalty}))
    ref = _hf_generate(path, tiny_bf16.ids, N_NEW, bf16_logits=True, bf16_rope=True)
    lm = LanguageModel.load(path, mode="reference", compute="f32")
    got = lm.generate(tiny_bf16.ids, max_new_tokens=N_NEW, stop_ids=[])
    print(f"[generation] reference mode rp {penalty}: {sum(a == b for a, b in zip(got, ref))}/{len(ref)} equal")
    assert got == ref


class _FakeSession:
    def __init__(self, rows):
        self.rows = list(rows)

    def step(self, tok):
        return self.rows.pop(0)


class _FakeLM:
    def __init__(self, mode, gen):
        self.mode, self.generation, self.stop_ids = mode, gen, []


def test_penalty_after_bf16_rounding():
    """reference mode rounds the logits to bf16 BEFORE the penalty; rounding after it changes the argmax here."""
    from vlmfo1.generation import decode_stream
    gen = GenerationSettings(repetition_penalty=1.05)
    logits = np.full(8, -5.0, np.float32)
    logits[3] = 20.0           # seen: 20 / 1.05 = 19.0476 (bf16 would be 19.0, spacing 0.125 in [16, 32))
    logits[1] = 19.0           # unseen, lower id (wins ties)
    tok = next(decode_stream(_FakeLM("reference", gen), _FakeSession([]), logits, 1, context_ids=[3]))
    assert tok == 3            # 19.0 < 19.0476; rounding after the penalty would tie at 19.0 and pick id 1
    logits[1] = 19.05          # fp32: 19.05 > 19.0476 -> 1 in exact mode; bf16(19.05) = 19.0 -> 3 in reference mode
    assert next(decode_stream(_FakeLM("exact", gen), _FakeSession([]), logits, 1, context_ids=[3])) == 1
    assert next(decode_stream(_FakeLM("reference", gen), _FakeSession([]), logits, 1, context_ids=[3])) == 3
    # no context ids: only generated ids count (nothing seen at the first step)
    assert next(decode_stream(_FakeLM("exact", gen), _FakeSession([]), logits, 1)) == 3


def test_settings_from_dict():
    g = {"repetition_penalty": 1.05, "top_k": 1, "top_p": 0.001, "temperature": 0.1, "do_sample": True,
         "eos_token_id": [151645, 151643], "bos_token_id": 151643, "pad_token_id": 151643,
         "transformers_version": "4.49.0"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = GenerationSettings.from_dict(g, kind="qwen")
    assert s.repetition_penalty == 1.05 and s.active
    with pytest.warns(RuntimeWarning, match="not applied to VLM-FO1"):
        f = GenerationSettings.from_dict(g, kind="fo1")
    assert f.repetition_penalty == 1.0 and f.config_repetition_penalty == 1.05 and not f.active
    assert f.with_overrides(1.2).repetition_penalty == 1.2 and f.with_overrides(None) is f
    with pytest.warns(RuntimeWarning, match="bad_words_ids"):
        GenerationSettings.from_dict({"bad_words_ids": [[5]]})
    with pytest.raises(ValueError, match="repetition_penalty"):
        GenerationSettings.from_dict({"repetition_penalty": 0})
    with pytest.raises(ValueError, match="kind"):
        GenerationSettings.from_dict({}, kind="llava")
    assert not GenerationSettings().active


def test_apply_semantics():
    s = GenerationSettings(repetition_penalty=2.0)
    x = np.array([4.0, -4.0, 1.0, 3.0], np.float32)
    s.apply(x, [0, 1, 0], 3)          # each id once; negative logits multiplied, positive divided
    assert x.tolist() == [2.0, -8.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.apply(np.zeros(4, np.float32), [-200, 1], 2)   # what the official FO1 run hits (it raises too)
    n = GenerationSettings(no_repeat_ngram_size=2)
    x = np.zeros(6, np.float32)
    n.apply(x, [1, 2, 3, 1], 4)       # the bigram (1, 2) was seen: after 1, 2 is banned
    assert np.isneginf(x[2]) and np.isfinite(x[[0, 1, 3, 4, 5]]).all()
    m = GenerationSettings(min_new_tokens=2, begin_suppress_tokens=[4])
    x = np.zeros(6, np.float32)
    m.apply(x, [1, 2, 3], 3, eos_ids=[5])
    assert np.isneginf(x[5]) and np.isneginf(x[4])
    x = np.zeros(6, np.float32)
    m.apply(x, [1, 2, 3, 0, 0], 3, eos_ids=[5])
    assert np.isfinite(x).all()
