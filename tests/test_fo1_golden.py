"""VLM-FO1 parity with the official implementation, through golden tensors it produced.

tests/golden/*.npz were made by tests/golden/make_fo1_golden.py from the official code (commit e6bef8d)
at random weights, on CPU in fp32 (see tests/golden/README.md). The checkpoint they used is
regenerated here bit-identically by vlmfo1.testing.fo1.write_random_fo1(seed=0), then run through
vlmfo1 with compute="f32" in the file's numeric mode ("reference": bf16-rounded rotary frequencies and
greedy argmax on bf16-rounded logits; "exact": neither). Checked: prompt ids, spliced ids and M-RoPE
positions (equal), preprocessing and boxes (1e-6), DaViT stages, ViT full-attention maps, region
features, region tokens, image tokens and prefill logits (relative to the largest reference value:
1e-4 for the ViT maps and image tokens, looser where the badly conditioned random DaViT feeds in, see
below), and the 32 greedy tokens (identical)."""
import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
TIKTOKEN = SHARED / "tokenizer" / "qwen.tiktoken"
GOLDEN = sorted(glob.glob(str(HERE / "golden" / "fo1_*_*_*_*.npz")))
TOL = 1e-4

pytestmark = pytest.mark.skipif(not TIKTOKEN.exists() or not GOLDEN, reason="shared data or golden files missing")

_models = {}


def model_for(tmp_root, sfpn, aspect, mode):
    from vlmfo1.fo1 import FO1
    from vlmfo1.testing.fo1 import write_random_fo1

    key = (sfpn, aspect, mode)
    if key not in _models:
        _models.clear()  # keep one model (and its ~0.6 GB checkpoint) at a time
        path = os.path.join(tmp_root, f"VLM-FO1_Qwen2.5-VL-3B-{'sfpn' if sfpn else 'nofpn'}-{aspect}")
        if not os.path.exists(os.path.join(path, "config.json")):
            write_random_fo1(path, size="tiny", seed=0, simple_fpn=sfpn, aux_image_aspect_ratio=aspect,
                             tiktoken_path=str(TIKTOKEN))
        _models[key] = FO1.load(path, mode=mode, compute="f32", n_threads=2)
    return _models[key]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(name, ours, g, errs, tol=TOL):
    """Compare a full or subsampled golden tensor."""
    ours = np.asarray(ours, np.float32)
    if name in g.files:
        ref = g[name]
        assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs {ref.shape}"
    else:
        assert tuple(ours.shape) == tuple(g[name + "__shape"]), f"{name}: shape {ours.shape} vs {g[name + '__shape']}"
        ref = g[name + "__val"]
        ours = ours.reshape(-1)[g[name + "__idx"]]
    e = rel(ours, ref)
    errs[name] = e
    if e > tol:
        errs.setdefault("_fail", []).append(f"{name}: max rel error {e:.3g} > {tol}")


@pytest.mark.parametrize("path", GOLDEN, ids=[os.path.basename(p)[4:-4] for p in GOLDEN])
def test_fo1_matches_official(path, tmp_path_factory):
    g = np.load(path, allow_pickle=False)
    meta = json.loads(str(g["meta_json"]))
    cfg = json.loads(str(g["config_json"]))
    sfpn, aspect = bool(cfg["mm_use_simpleFPN_for_vt"]), cfg["aux_image_aspect_ratio"]
    mode = "reference" if "_reference_" in os.path.basename(path) else "exact"
    root = str(tmp_path_factory.getbasetemp() / "fo1_golden_ckpts")
    os.makedirs(root, exist_ok=True)
    fo1 = model_for(root, sfpn, aspect, mode)
    image = str(SHARED / "coco_tiny" / "val2017" / meta["image"]) if "image" in meta else None
    assert image and os.path.exists(image), f"golden meta lacks a usable image: {meta}"
    boxes = g["boxes_xyxy"]
    text = str(g["prompt_text"])

    trace = {}
    ids, emb, pos, delta, _, _ = fo1.prepare(image, boxes, text, trace=trace)
    errs = {}
    assert trace["input_ids"] == g["input_ids"].tolist()
    assert ids == g["spliced_ids"].tolist()
    assert np.array_equal(pos, g["position_ids"]) and delta == int(g["rope_delta"][0])
    assert tuple(trace["image_grid_thw"]) == tuple(g["image_grid_thw"].tolist())
    check("pixel_values", trace["pixel_values"], g, errs, 1e-6)
    check("aux_pixel_values", trace["aux_pixel_values"], g, errs, 1e-6)
    np.testing.assert_array_equal(trace["boxes_aux"], g["boxes_aux"])
    np.testing.assert_array_equal(trace["boxes_vt"], g["boxes_vt"])
    # The random DaViT-large is badly conditioned (rounding its weights to bf16 alone moves its output by
    # ~20%), so fp32 summation-order differences grow stage by stage: 2e-5 .. 4e-3 measured at stage 3
    # depending on the image, while the same code is within 2.3e-6 of transformers' DaViT on small
    # inputs (tests/test_davit.py). What follows inherits it; the greedy tokens must still be identical.
    for i, m in enumerate(trace["davit_maps"]):
        check(f"davit_stage{i}", m, g, errs, 1e-2)
    blocks = g["vt_map_blocks"].tolist()
    for j, b in enumerate(blocks):
        check(f"vt_map_block{b}", trace["vt_maps"][j], g, errs)
    check("region_features", trace["region_features"], g, errs, 5e-3)
    check("region_tokens", trace["region_tokens"], g, errs, 5e-3)
    check("image_tokens", trace["image_tokens"], g, errs)

    dec = fo1.decoder
    s = dec.session(max_context=len(ids) + 40)
    logits = s.prefill_embeds(emb, pos)
    s.rope_delta = delta
    check("prefill_logits", logits, g, errs, 1e-3)
    top = g["prefill_logits_top64_ids"]
    errs["top64"] = rel(logits[top], g["prefill_logits_top64_val"])
    if errs["top64"] > 1e-3:
        errs.setdefault("_fail", []).append(f"top64 logits: {errs['top64']:.3g}")
    from vlmfo1.generation import decode_stream
    want = g["greedy_ids"].tolist()
    got = list(decode_stream(dec, s, logits, len(want), stop_ids=[]))
    fails = errs.pop("_fail", [])
    print(f"\n{os.path.basename(path)}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + f"; greedy {sum(a == b for a, b in zip(got, want))}/{len(want)}")
    assert not fails, "; ".join(fails)
    assert got == want
