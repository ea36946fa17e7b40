"""Random VLM-FO1 checkpoints (vlmfo1.testing.fo1): layout equal to the official model's, deterministic bytes,
loadable with vlmfo1.safetensors, tokenizer with FO1's added tokens as single ids, config with every FO1 key.

The manifests tests/golden/fo1_{tiny,full}_keys.json (name -> shape) were generated from the official VLM-FO1
modules by tests/golden/make_fo1_golden.py (see tests/golden/README.md). NumPy + tokenizers only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlmfo1.testing.fo1 import (count_params, fo1_config, fo1_shapes, fo1_token_ids, random_tensor,
                                   write_random_fo1)
from vlmfo1.safetensors import Checkpoint, bf16_bits_to_f32, f32_to_bf16_bits

GOLDEN = Path(__file__).resolve().parent / "golden"
TIKTOKEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizer" / "qwen.tiktoken"

FO1_KEYS = ["mm_vision_tower", "mm_vision_tower_aux", "mm_hidden_size", "mm_projector_type", "mm_projector_aux_type",
            "mm_region_hidden_size", "mm_use_vision_tower_region_feature", "mm_use_simpleFPN_for_vt",
            "mm_region_feature_combination", "mm_apply_position_embedding", "mm_pos_embedding_strategy",
            "mm_apply_region_layer_norm", "mm_use_vt_region_feature_only", "mm_roi_output_size",
            "mm_use_region_index_token", "aux_image_aspect_ratio", "aux_image_size", "vision_config",
            "image_token_id", "rope_scaling", "tie_word_embeddings", "model_type", "delay_load"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not TIKTOKEN.is_file():
        pytest.skip(f"{TIKTOKEN} missing")
    path = tmp_path_factory.mktemp("fo1") / "VLM-FO1_Qwen2.5-VL-3B-tiny"
    write_random_fo1(str(path), size="tiny", seed=0, tiktoken_path=str(TIKTOKEN))
    return path


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("variant", ["simple_fpn", "no_simple_fpn"])
def test_layout_matches_official_manifest(size, variant):
    man = json.loads((GOLDEN / f"fo1_{size}_keys.json").read_text())[variant]
    cfg = fo1_config(size, simple_fpn=(variant == "simple_fpn"))
    ours = {k: list(v) for k, v in fo1_shapes(cfg).items()}
    want = man["tensors"]
    assert sorted(set(want) - set(ours)) == [], "missing tensors"
    assert sorted(set(ours) - set(want)) == [], "extra tensors"
    assert {k: v for k, v in ours.items() if want[k] != v} == {}, "shape mismatch"
    assert cfg["mm_region_hidden_size"] == man["config"]["mm_region_hidden_size"]


def test_full_size():
    n = count_params(fo1_config("full"))
    assert 4.0e9 < n < 4.3e9, n
    shapes = fo1_shapes(fo1_config("full"))
    assert "lm_head.weight" not in shapes                                  # tied
    assert shapes["model.embed_tokens.weight"] == (151936, 2048)
    assert shapes["model.mm_projector_aux.0.weight"] == (2048, 5888)
    assert not any(k.startswith("model.mm_projector.") for k in shapes)    # identity image projector
    assert shapes["model.vision_tower_aux.image_tower.blocks.2.8.channel_block.channel_attn.fn.qkv.weight"] == (
        3072, 1024)


def test_random_tensor_deterministic():
    a = random_tensor("model.layers.0.self_attn.q_proj.weight", (64, 32), seed=3)
    b = random_tensor("model.layers.0.self_attn.q_proj.weight", (64, 32), seed=3)
    c = random_tensor("model.layers.0.self_attn.q_proj.weight", (64, 32), seed=4)
    d = random_tensor("model.layers.0.self_attn.k_proj.weight", (64, 32), seed=3)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    n = random_tensor("model.norm.weight", (1000,))
    assert abs(float(n.mean()) - 1.0) < 0.02                               # norm weights 1 +- 0.1


def test_tiny_checkpoint_loads_and_is_deterministic(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    ck = Checkpoint(str(tiny))
    shapes = fo1_shapes(cfg)
    assert set(ck.keys()) == set(shapes)
    idx = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(shapes) and len(set(idx["weight_map"].values())) > 1   # sharded
    for name in ["model.embed_tokens.weight", "model.vision_tower.image_tower.blocks.1.attn.qkv.weight",
                 "model.vision_tower_aux.image_tower.convs.3.proj.weight",
                 "model.object_vp_extractor.simple_fpn.simfp_1.0.weight", "model.mm_projector_aux.2.bias"]:
        info = ck.info(name)
        assert info.dtype == "BF16" and tuple(info.shape) == tuple(shapes[name])
        want = f32_to_bf16_bits(random_tensor(name, shapes[name], seed=0))
        assert ck.get(name).tobytes() == want.tobytes(), name
    # weights are non-trivial: O(1) scales, not the near-zero default init
    w = bf16_bits_to_f32(ck.get("model.vision_tower.image_tower.blocks.0.mlp.up_proj.weight"))
    assert 0.5 < float(w.std()) * np.sqrt(w.shape[1]) < 2.0
    # a SimpleFP-less checkpoint shares every other tensor (per-name seeding)
    cfg2 = fo1_config("tiny", simple_fpn=False)
    assert fo1_shapes(cfg2)["model.mm_projector_aux.0.weight"] == (256, 3840 + 4 * 1280)


def test_config_keys(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    for k in FO1_KEYS:
        assert k in cfg, k
    assert cfg["mm_region_hidden_size"] == 3840 + 2048
    assert "davit" in cfg["mm_vision_tower_aux"] and "qwen2.5-vl" in cfg["mm_vision_tower"].lower()
    assert cfg["vision_config"]["hidden_size"] == 1280 and len(cfg["vision_config"]["fullatt_block_indexes"]) == 4
    pre = json.loads((tiny / "preprocessor_config.json").read_text())
    assert pre["min_pixels"] == 3136 and pre["patch_size"] == 14
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert gen.get("repetition_penalty", 1.0) == 1.0


def test_tokenizer_has_fo1_tokens(tiny):
    from vlmfo1.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(str(tiny))
    ids = fo1_token_ids()
    assert ids["<region0>"] == 151665 and ids["<region99>"] == 151764 and ids["<ground>"] == 151765
    for t, i in ids.items():
        assert tok.encode(t) == [i], t
        assert tok.decode([i]) == t
    assert max(ids.values()) < 151936
    s = "<ground>person</ground><objects><region0><region12></objects><|im_end|>"
    enc = tok.encode(s)
    assert enc[0] == ids["<ground>"] and enc[-1] == 151645 and ids["<region12>"] in enc
    assert tok.decode(enc) == s
    assert tok.encode("<|im_start|>user\n<|vision_start|>") == [151644, 872, 198, 151652]
    assert tok.encode("<region100>") != [ids["<region10>"]]          # only 0..99 are tokens
