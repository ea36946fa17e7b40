"""The C core's work counters (csrc/pool.h: Workspace.flops, Session.flops, FO1Result.flops) against torch's
FlopCounterMode on the same computation in transformers (tiny random models), and their bookkeeping in requests.

What is compared, exactly (FLOPs, a multiply-add = 2):
  - Qwen2 decoder, prefill of the test prompt: our matmul count vs FlopCounterMode's mm/addmm (transformers run with
    logits_to_keep=1, as we compute the logits of the last position only). Attention: transformers' eager run computes
    the full T x T scores and masks half; we count the causal pairs, T (T + 1) / 2 of them.
  - one decode step after it: matmuls and attention products (bmm) both equal.
  - Qwen2.5-VL vision tower (window and full attention, an odd grid so windows are padded): matmuls (the patch
    embedding's conv3d included) and attention (transformers' eager attention runs per window) both equal.
  - FO1 requests: counts independent of the thread count, the cached prefix + the question's prefill = the uncached
    prefill, decode the same, FO1Result.to_dict / from_dict keep them.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import reference  # noqa: E402

GEMM_OPS = {"mm", "addmm", "convolution", "_convolution"}
ATTN_OPS = {"bmm", "baddbmm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward"}


def torch_counts(fn):
    """{"gemm": FLOPs, "attention": FLOPs} FlopCounterMode records while fn() runs (no other op may count)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    out = {"gemm": 0, "attention": 0}
    for op, n in fc.get_flop_counts()["Global"].items():
        name = str(op).split(".")[-1]
        kind = "gemm" if name in GEMM_OPS else "attention" if name in ATTN_OPS else None
        assert kind is not None, f"FlopCounterMode counted an op this test does not classify: {op}"
        out[kind] += int(n)
    return out


def _diff(a, b):
    return {k: b[k] - a[k] for k in b}


def _hf_forward(model, ids, cache=None):
    kw = {"use_cache": True, "logits_to_keep": 1}
    if cache is not None:
        kw["cache" if "cache" in reference._forward_params(model) else "past_key_values"] = cache
    out = model(input_ids=torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1), **kw)
    return getattr(out, "cache", None) or out.past_key_values


def test_decoder_counts_match_torch(tiny_fp32, LanguageModel):
    ck = tiny_fp32
    lm = LanguageModel.load(ck.path, mode="exact")
    s = lm.session(max_context=128)
    T = len(ck.ids)
    assert s.flops == {"gemm": 0, "attention": 0}
    s.prefill(ck.ids)
    ours_prefill = s.flops
    before = s.flops
    s.step(int(ck.ref.tokens[0]))
    ours_step = _diff(before, s.flops)

    cache = {}
    ref_prefill = torch_counts(lambda: cache.setdefault("c", _hf_forward(ck.model, ck.ids)))
    ref_step = torch_counts(lambda: _hf_forward(ck.model, [int(ck.ref.tokens[0])], cache["c"]))
    print(f"\nprefill of {T}: ours {ours_prefill}, FlopCounterMode {ref_prefill}; one step: ours {ours_step}, "
          f"FlopCounterMode {ref_step}")
    assert ours_prefill["gemm"] == ref_prefill["gemm"] > 0
    assert ours_prefill["attention"] * 2 * T == ref_prefill["attention"] * (T + 1) > 0   # causal half of T x T
    assert ours_step == ref_step


def test_vision_counts_match_torch(tmp_path):
    from test_vl_parity import VISION_D8, build_vision_only

    import json

    from vlmfo1 import _core
    from vlmfo1.safetensors import Checkpoint
    from vlmfo1.vision import VisionTower

    d, vis, raw = build_vision_only(tmp_path, "vision_flops", vision=dict(VISION_D8))
    vt = VisionTower.from_checkpoint(Checkpoint(str(d)), json.loads((d / "config.json").read_text()), mode="exact",
                                     n_threads=2)
    grid = (1, 18, 22)   # windows of 8 x 8 patches: the last row and column of windows are partial
    pv = np.random.default_rng(0).standard_normal((grid[1] * grid[2], 1176), dtype=np.float32)
    ws = _core.Workspace()
    vt(pv, grid, workspace=ws)
    ours = ws.flops
    ref = torch_counts(lambda: vis(torch.from_numpy(pv), grid_thw=torch.tensor([grid])))
    print(f"\nViT depth {VISION_D8['depth']}, grid {grid}: ours {ours}, FlopCounterMode {ref}")
    assert ours == ref and ours["attention"] > 0


@pytest.fixture(scope="module")
def fo1_small(fo1_tiny_ckpt):
    from vlmfo1 import VLMFO1

    return VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2)


IMAGE = np.random.default_rng(5).integers(0, 255, size=(150, 210, 3), dtype=np.uint8)
BOXES = [[10, 12, 90, 100], [40, 30, 200, 140], [0, 0, 209, 149]]


def test_request_flops_per_stage(fo1_small):
    from vlmfo1 import VLMFO1
    from vlmfo1.results import FO1Result

    m = fo1_small
    r = m.detect(IMAGE, "cat", boxes=BOXES, max_new_tokens=4, stop_ids=[])
    assert set(r.flops) == {"vit", "davit", "hfre", "prefill", "decode"}
    for stage in ("vit", "davit", "hfre", "prefill", "decode"):
        assert r.flops[stage]["gemm"] > 0, stage
    assert r.flops["vit"]["attention"] > 0 and r.flops["davit"]["attention"] > 0
    assert FO1Result.from_dict(r.to_dict()).flops == r.flops

    # the same request on 1 and 3 threads counts the same work
    for threads in (1, 3):
        other = VLMFO1.from_pretrained(m.path, threads=threads)
        try:
            r2 = other.detect(IMAGE, "cat", boxes=BOXES, max_new_tokens=4, stop_ids=[])
        finally:
            other.close()
        assert r2.flops == r.flops, threads
        assert r2.token_ids == r.token_ids

    # encoded image: the prefix prefilled once + the question's own prefill = the whole prefill; decode the same
    ctx = m.encode(IMAGE, boxes=BOXES)
    assert {k: ctx.encode_flops[k] for k in ("vit", "davit", "hfre")} == {k: r.flops[k] for k in ("vit", "davit", "hfre")}
    r3 = ctx.detect("cat", max_new_tokens=4, stop_ids=[])
    assert r3.token_ids == r.token_ids
    assert all(r3.flops[k] == {"gemm": 0, "attention": 0} for k in ("vit", "davit", "hfre"))
    for kind in ("gemm", "attention"):
        assert ctx.encode_flops["prefix"][kind] + r3.flops["prefill"][kind] == r.flops["prefill"][kind], kind
    assert r3.flops["decode"] == r.flops["decode"]

    # the traced (one network at a time) encode counts what the fused one does
    t, f = {}, {}
    m.encode_features(IMAGE, np.asarray(BOXES, np.float64), trace={}, timings=t, flops=f)
    assert f == {k: r.flops[k] for k in ("vit", "davit", "hfre")}


def test_chat_turns_count_their_own_work(fo1_small):
    ctx = fo1_small.encode(IMAGE, boxes=BOXES)
    conv = ctx.conversation()
    a = conv.ask("What is in <region0>?", max_new_tokens=3, stop_ids=[])
    b = conv.ask("And <region1>?", max_new_tokens=3, stop_ids=[])
    for res in (a, b):
        assert res.flops["prefill"]["gemm"] > 0 and res.flops["decode"]["gemm"] > 0
        assert res.flops["vit"] == {"gemm": 0, "attention": 0}
    # the same number of decode steps, against a longer context in the second turn: the same matmuls, more
    # attention pairs
    assert b.flops["decode"]["gemm"] == a.flops["decode"]["gemm"]
    assert b.flops["decode"]["attention"] > a.flops["decode"]["attention"]


@pytest.mark.parametrize("bad", [[1], {"vit": 3}, {"vit": {"gemm": -1}}, {"vit": {"gemm": 1.5}}, {"vit": {"gemm": True}}])
def test_from_dict_refuses_malformed_flops(bad):
    from vlmfo1.results import FO1Result

    with pytest.raises(ValueError, match="flops must map stage names"):
        FO1Result.from_dict({"text": "x", "flops": bad})
    assert FO1Result.from_dict({"text": "x"}).flops == {}
