"""Hostile config.json values are refused at once with a ValueError naming the file, the key path and the expectation.

A deterministic table of bad values for every key the loaders read (sizes: zero, negative, fractional, string, bool,
huge, NaN, Infinity, null, list; each relation broken; unknown enumeration values), checked through the loader that
reads the key (DecoderConfig / VisionConfig / DavitConfig / HFREConfig.from_dict, AuxImageProcessor.from_config) and
through the whole-FO1 check; each must fail in well under a second. Claimed sizes of 10^12 layers are also loaded from
a checkpoint folder in a subprocess with a 1.5 GiB address-space limit, and deep nesting is refused before json.loads
recurses. Valid configs still load: the tiny and full FO1 configs of vlmfo1.testing.fo1, stock Qwen2.5 /
Qwen2.5-VL configs in the transformers 4 and 5 layouts, and the tiny Qwen2 checkpoints of tests/conftest.py.
No weights are needed except for the conftest checkpoints.
"""
import copy
import json
import os
import subprocess
import sys
import time

import pytest

from vlmfo1.aux_image import AuxImageProcessor
from vlmfo1.config_check import ConfigError, check_fo1, parse_config_json
from vlmfo1.davit import DavitConfig
from vlmfo1.decoder import DecoderConfig
from vlmfo1.hfre import HFREConfig
from vlmfo1.options import read_config
from vlmfo1.testing.fo1 import fo1_config, write_random_fo1
from vlmfo1.vision import VisionConfig

NAN, INF = float("nan"), float("inf")
DELETE = object()

QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=64, rms_norm_eps=1e-6,
             rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=128, eos_token_id=63,
             hidden_act="silu", use_sliding_window=False, rope_scaling=None)
FLORENCE = dict(model_type="davit", embed_dim=[32, 64, 96, 128], depths=[1, 1, 2, 1], num_heads=[2, 4, 3, 4],
                num_groups=[2, 2, 3, 4], window_size=12, patch_size=[7, 3, 3, 3], patch_stride=[4, 2, 2, 2],
                patch_padding=[3, 1, 1, 1], patch_prenorm=[False, True, True, True], mlp_ratio=4.0)

LOADERS = {
    "decoder": DecoderConfig.from_dict,
    "vision": VisionConfig.from_dict,
    "davit": DavitConfig.from_dict,
    "hfre": HFREConfig.from_dict,
    "aux": AuxImageProcessor.from_config,
}


def base(kind):
    """A valid config for a table row: 'qwen2' (text model), 'fo1' (tiny FO1), 'florence' (DaViT vision_config)."""
    if kind == "qwen2":
        return copy.deepcopy(QWEN2)
    if kind == "fo1":
        return fo1_config("tiny")
    if kind == "florence":
        return {"vision_config": copy.deepcopy(FLORENCE)}
    raise AssertionError(kind)


def put(cfg, path, value):
    """cfg with the value at a dotted key path (DELETE removes it); intermediate objects are created."""
    cfg = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    d = cfg
    for p in parents:
        d = d.setdefault(p, {})
    if value is DELETE:
        d.pop(last, None)
    else:
        d[last] = value
    return cfg


# -------------------------------------------------------------------------------------------------------------------
# the table: (loader, base config, key path to set, value, key path the message must name)

SIZE_BAD = [0, -1, 64.5, "64", True, 10 ** 12, 2 ** 31, 2 ** 63, 1e308, NAN, INF, -INF, [64], {"n": 64}]


def _sizes(loader, kind, path, bad=SIZE_BAD, null_ok=False):
    rows = []
    for v in bad + ([] if null_ok else [None]):
        rows.append((loader, kind, path, v, path))
    return rows


ROWS = []
# decoder sizes (plain text model and the FO1 top level), and through text_config nesting
for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
    ROWS += _sizes("decoder", "qwen2", k)
    ROWS += _sizes("decoder", "fo1", k)
    ROWS += [("decoder", "qwen2", "text_config." + k, v, "text_config." + k) for v in (0, 2 ** 63, 1e308, NAN, "x")]
ROWS += _sizes("decoder", "qwen2", "num_key_value_heads", null_ok=True)
ROWS += _sizes("decoder", "qwen2", "head_dim", null_ok=True)
ROWS += _sizes("decoder", "qwen2", "max_position_embeddings", null_ok=True)
ROWS += [("decoder", "qwen2", "rms_norm_eps", v, "rms_norm_eps") for v in (0, 0.0, -1e-6, NAN, INF, "1e-6", True,
                                                                            2.0, [1e-6], None)]
ROWS += [("decoder", "qwen2", "rope_theta", v, "rope_theta") for v in (0, -1.0, NAN, INF, -INF, 1e308, "1e6", True,
                                                                        [1e6], 1e-300)]
ROWS += [("decoder", "fo1", "rope_scaling.rope_theta", v, "rope_theta") for v in (0, NAN)]
ROWS += [("decoder", "qwen2", "rope_parameters", {"rope_type": "default", "rope_theta": v},
          "rope_parameters.rope_theta") for v in (0, -5, NAN, INF, "x")]
ROWS += [("decoder", "qwen2", "hidden_act", v, "hidden_act") for v in ("gelu", "relu", "", 1, None, ["silu"])]
ROWS += [("decoder", "qwen2", "tie_word_embeddings", v, "tie_word_embeddings") for v in ("false", 0, 1, "true")]
ROWS += [("decoder", "qwen2", "eos_token_id", v, "eos_token_id") for v in (64, -1, 10 ** 12, 1.5, "63", True, NAN,
                                                                            [1, "x"], [1, 64], [[1]])]
for k in ("bos_token_id", "pad_token_id"):
    ROWS += [("decoder", "qwen2", k, v, k) for v in (64, -1, 1.5, "1")]
for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id",
          "eos_token_id", "bos_token_id"):
    ROWS += [("decoder", "fo1", k, v, k) for v in (151936, 10 ** 6, -200, 151655.5, INF)]
ROWS += [("decoder", "qwen2", "use_sliding_window", v, "use_sliding_window") for v in (True, "no", 1)]
ROWS += [("decoder", "qwen2", "layer_types", v, "layer_types") for v in (
    ["full_attention", "sliding_attention"], ["full_attention"], "full_attention", [1, 2])]
ROWS += [("decoder", "qwen2", "text_config", v, "text_config") for v in ("x", [1], 5)]
ROWS += [("decoder", "qwen2", "rope_scaling", v, "rope_scaling") for v in ("mrope", [16, 24, 24], 5)]
ROWS += [("decoder", "qwen2", "rope_scaling", {"type": t, "factor": 4.0}, "rope_scaling.type")
         for t in ("yarn", "linear", "dynamic", "longrope", 1)]
ROWS += [("decoder", "qwen2", "rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
          "rope_parameters.rope_type")]
# relations of the decoder
ROWS += [("decoder", "qwen2", "num_attention_heads", v, "num_attention_heads") for v in (3, 5, 64)]   # 32 % v or odd
ROWS += [("decoder", "qwen2", "num_key_value_heads", v, "num_key_value_heads") for v in (3, 8)]     # heads 4
ROWS += [("decoder", "qwen2", "head_dim", v, "head_dim") for v in (7, 33, 4096)]
ROWS += [("decoder", "fo1", "rope_scaling.mrope_section", v, "rope_scaling.mrope_section") for v in (
    [16, 24], [16, 24, 24, 0], [16, 24, 25], [-1, 40, 25], [16.5, 23.5, 24], ["16", 24, 24], "16,24,24", 64,
    [True, 24, 39], [NAN, 24, 24])]
# M-RoPE is required for Qwen2.5-VL / FO1 configs (1-D RoPE would silently change the model)
ROWS += [("decoder", "fo1", "rope_scaling", v, "mrope_section") for v in (
    {"type": "mrope"}, {"type": "default"}, None, DELETE, {"mrope_section": None})]
ROWS += [("decoder", "qwen2", "vision_config", {"depth": 2}, "mrope_section")]
ROWS += [("decoder", "qwen2", "model_type", "qwen2_5_vl", "mrope_section")]

# vision tower (vision_config of FO1)
for k in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "patch_size",
          "spatial_patch_size", "temporal_patch_size", "spatial_merge_size", "window_size", "in_chans"):
    ROWS += _sizes("vision", "fo1", "vision_config." + k)
ROWS += [("vision", "fo1", "vision_config.num_heads", v, "vision_config.num_heads") for v in (7, 3, 640, 1, 64.5)]
ROWS += [("vision", "fo1", "vision_config.spatial_merge_size", v, "vision_config.spatial_merge_size")
         for v in (1, 3, 4)]
ROWS += [("vision", "fo1", "vision_config.window_size", v, "vision_config.window_size") for v in (100, 14, 27, 113)]
ROWS += [("vision", "fo1", "vision_config.spatial_patch_size", 16, "vision_config.spatial_patch_size")]  # disagrees
ROWS += [("vision", "fo1", "vision_config.fullatt_block_indexes", v, "vision_config.fullatt_block_indexes")
         for v in ([6], [1, 1], [-1], [1.5], ["1"], "1,3", 3, [True], [NAN], list(range(10)), None)]
# the tiny tower's full-attention blocks are [1, 3, 4, 5]: a shallower depth leaves them dangling
ROWS += [("vision", "fo1", "vision_config.depth", v, "vision_config.fullatt_block_indexes") for v in (4, 5)]
ROWS += [("vision", "fo1", "vision_config.rope_parameters", v, "vision_config.rope_parameters") for v in (
    {"rope_theta": 0}, {"rope_theta": NAN}, {"rope_theta": -1}, {"rope_type": "yarn"}, "x")]
ROWS += [("vision", "fo1", "vision_config.hidden_act", v, "vision_config.hidden_act") for v in ("quick_gelu", 3)]
ROWS += [("vision", "fo1", "vision_config", v, "vision_config") for v in ("x", [1], 3)]

# DaViT: FO1's variant name and test depths; a Florence-2 vision_config
ROWS += [("davit", "fo1", "mm_vision_tower_aux", v, "mm_vision_tower_aux") for v in ("davit-huge", "resources/x.pth",
                                                                                   5, ["davit-large"], True)]
ROWS += [("davit", "fo1", "vlmfo1_davit_depths", v, "vlmfo1_davit_depths") for v in (
    [1, 1, 1], [1, 1, 65, 1], [1, 1, 10 ** 12, 1], [1, -1, 1, 1], [1, 1, 1.5, 1], "1111", [1, 1, NAN, 1], 4)]
for k in ("embed_dim", "depths", "num_heads", "num_groups", "patch_size", "patch_stride", "patch_padding"):
    lo_ok = k in ("depths", "patch_padding")
    for v in ([-1, 1, 1, 1], [1.5, 1, 1, 1], ["1", 1, 1, 1], [10 ** 12, 1, 1, 1], [NAN, 1, 1, 1],
              [INF, 1, 1, 1], [1, 1, 1], 4, None) + (() if lo_ok else ([0, 1, 1, 1],)):
        ROWS.append(("davit", "florence", "vision_config." + k, v, "vision_config." + k))
ROWS += [("davit", "florence", "vision_config.num_heads", [3, 4, 3, 4], "vision_config.num_heads")]
ROWS += [("davit", "florence", "vision_config.num_groups", [2, 2, 5, 4], "vision_config.num_groups")]
ROWS += [("davit", "florence", "vision_config.window_size", v, "vision_config.window_size") for v in (
    0, -1, 257, 12.5, "12", NAN, INF, None, True)]
ROWS += [("davit", "florence", "vision_config.mlp_ratio", v, "vision_config.mlp_ratio") for v in (
    0, -4.0, NAN, INF, "4", 1e9, None)]
ROWS += [("davit", "florence", "vision_config.patch_prenorm", v, "vision_config.patch_prenorm") for v in (
    [True, True, True, True], [0, 1, 1, 1], [False, True], "no")]
ROWS += [("davit", "florence", "vision_config.in_chans", v, "vision_config.in_chans") for v in (0, 1.5, 10 ** 12, NAN)]

# HFRE and projectors
ROWS += _sizes("hfre", "fo1", "mm_region_hidden_size")
ROWS += _sizes("hfre", "fo1", "mm_roi_output_size")
ROWS += _sizes("hfre", "fo1", "mm_hidden_size", null_ok=True)
for k in ("mm_apply_position_embedding", "mm_use_vt_region_feature_only", "mm_use_vision_tower_region_feature",
          "mm_apply_region_layer_norm", "mm_use_simpleFPN_for_vt"):
    ROWS += [("hfre", "fo1", k, v, k) for v in ("true", 1, 0, None, [True])]
ROWS += [("hfre", "fo1", "mm_pos_embedding_strategy", v, "mm_pos_embedding_strategy") for v in (
    "bbox", "BBOX_BASED", "", None, 1)]
ROWS += [("hfre", "fo1", "mm_region_feature_combination", v, "mm_region_feature_combination") for v in (
    "sum", "", None, ["concat"])]
for k in ("mm_projector_type", "mm_projector_aux_type"):
    ROWS += [("hfre", "fo1", k, v, k) for v in ("mlp0x_gelu", "mlp17x_gelu", "mlp2x_relu", "relu", "", None, 2)]
ROWS += [("hfre", "fo1", "vision_config.fullatt_block_indexes", v, "vision_config.fullatt_block_indexes")
         for v in (list(range(9)), [], [-1], [1.5], "1")]
ROWS += [("hfre", "fo1", "vision_config.hidden_size", v, "vision_config.hidden_size") for v in (0, 1e308, NAN, "1280")]
ROWS += [("hfre", "fo1", "vision_config.patch_size", v, "vision_config.patch_size") for v in (0, 14.5, INF)]

# the aux image processor
ROWS += [("aux", "fo1", "aux_image_aspect_ratio", v, "aux_image_aspect_ratio") for v in (
    "stretch", "Dynamic", "", None, 5, ["dynamic"])]
ROWS += [("aux", "fo1", "delay_load", v, "delay_load") for v in ("false", 0, None)]


# FO1 keys read per request, checked by the whole-FO1 check (VLMFO1.from_pretrained)
FO1_ONLY = [("tokenizer_model_max_length", v) for v in (0, -1, 1.5, "4096", True, NAN, INF, 1e308, [4096])]


@pytest.mark.parametrize("key,value", FO1_ONLY, ids=[f"{k}={v!r}" for k, v in FO1_ONLY])
def test_fo1_request_keys_refused(key, value):
    _assert_refused(check_fo1, put(base("fo1"), key, value), key)


def _ids(row):
    loader, kind, path, value, _ = row
    v = "DELETE" if value is DELETE else repr(value)
    return f"{loader}-{kind}-{path}={v[:30]}"


def _assert_refused(fn, cfg, key):
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as ei:
        fn(cfg)
    dt = time.perf_counter() - t0
    msg = str(ei.value)
    assert isinstance(ei.value, ConfigError), f"{type(ei.value).__name__}: {msg}"
    assert "config.json" in msg and key in msg, msg
    assert "expected" in msg or "required" in msg, msg
    assert dt < 1.0, f"{dt:.2f} s to refuse {key}"
    return msg


def test_table_is_large():
    assert len(ROWS) > 600
    assert len({(r[2]) for r in ROWS}) > 60    # distinct key paths


@pytest.mark.parametrize("row", ROWS, ids=_ids)
def test_hostile_value_refused(row):
    loader, kind, path, value, key = row
    cfg = put(base(kind), path, value)
    msg = _assert_refused(LOADERS[loader], cfg, key)
    if kind == "fo1":   # the whole-FO1 check (VLMFO1.from_pretrained runs it first) reports the key too
        _assert_refused(check_fo1, cfg, key)
    assert msg


def test_table_bases_are_valid():
    for loader, kind in {(r[0], r[1]) for r in ROWS}:
        LOADERS[loader](base(kind))
    check_fo1(base("fo1"))


def test_messages_are_clear():
    cfg = put(base("fo1"), "vision_config.depth", 10 ** 12)
    with pytest.raises(ValueError, match=r"^config\.json: vision_config\.depth: expected an integer in \[1, 256\], "
                                         r"got 1000000000000$"):
        VisionConfig.from_dict(cfg)
    with pytest.raises(ValueError, match=r"num_heads: expected a divisor of hidden_size \(1280\), got 7"):
        VisionConfig.from_dict(put(base("fo1"), "vision_config.num_heads", 7))
    with pytest.raises(ValueError, match=r"mm_pos_embedding_strategy: expected one of 'bbox_based', "
                                         r"'feature_map_based', 'hybrid', got 'bbox'"):
        HFREConfig.from_dict(put(base("fo1"), "mm_pos_embedding_strategy", "bbox"))
    with pytest.raises(ValueError, match=r"aux_image_aspect_ratio: expected one of 'squash', 'pad', 'dynamic', "
                                         r"'dynamic_square'"):
        AuxImageProcessor.from_config(put(base("fo1"), "aux_image_aspect_ratio", "stretch"))
    with pytest.raises(ValueError, match=r"rope_theta: expected a finite number .*got NaN"):
        DecoderConfig.from_dict(put(base("qwen2"), "rope_theta", NAN))
    with pytest.raises(ValueError, match=r"rope_scaling\.mrope_section: .*needs M-RoPE"):
        DecoderConfig.from_dict(put(base("fo1"), "rope_scaling", {"type": "mrope"}))
    # a missing required key is also a KeyError (as before), still naming the key
    with pytest.raises(KeyError, match="mm_region_hidden_size"):
        HFREConfig.from_dict(put(base("fo1"), "mm_region_hidden_size", DELETE))
    with pytest.raises(ValueError, match="config.json: num_hidden_layers: required key is missing"):
        DecoderConfig.from_dict(put(base("qwen2"), "num_hidden_layers", DELETE))
    with pytest.raises(KeyError, match="aux_image_aspect_ratio"):
        AuxImageProcessor.from_config(put(base("fo1"), "aux_image_aspect_ratio", DELETE))


@pytest.mark.parametrize("kind,path", [("qwen2", k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                                 "intermediate_size", "vocab_size")]
                         + [("fo1", "vision_config." + k) for k in ("depth", "hidden_size", "num_heads")])
def test_required_or_defaulted_sizes_missing(kind, path):
    cfg = put(base(kind), path, DELETE)
    if kind == "qwen2":
        with pytest.raises(KeyError, match=path):
            DecoderConfig.from_dict(cfg)
    else:   # vision keys fall back to the stock Qwen2.5-VL-3B values, which fit the tiny tower's other keys
        key = path.split(".")[-1]
        assert getattr(VisionConfig.from_dict(cfg), key) == {"depth": 32, "hidden_size": 1280, "num_heads": 16}[key]


# -------------------------------------------------------------------------------------------------------------------
# accepted forms

def test_integral_floats_accepted_fractional_refused():
    c = DecoderConfig.from_dict(put(put(base("qwen2"), "hidden_size", 32.0), "num_hidden_layers", 2.0))
    assert c.hidden_size == 32 and isinstance(c.hidden_size, int) and c.num_hidden_layers == 2
    v = VisionConfig.from_dict(put(base("fo1"), "vision_config.num_heads", 16.0))
    assert v.num_heads == 16 and isinstance(v.num_heads, int)
    with pytest.raises(ValueError, match="vision_config.num_heads"):
        VisionConfig.from_dict(put(base("fo1"), "vision_config.num_heads", 64.5))


def test_nullable_keys_take_defaults():
    cfg = put(put(base("qwen2"), "num_key_value_heads", None), "head_dim", None)
    cfg = put(put(cfg, "eos_token_id", None), "rope_scaling", None)
    c = DecoderConfig.from_dict(cfg)
    assert c.num_key_value_heads == 4 and c.head_dim == 8 and c.eos_token_id == [] and c.mrope_section == ()


def test_plain_qwen2_has_no_mrope_and_qwen25_vl_has_it():
    assert DecoderConfig.from_dict(base("qwen2")).mrope_section == ()
    assert DecoderConfig.from_dict(base("fo1")).mrope_section == (16, 24, 24)


def test_fo1_configs_valid():
    for size in ("tiny", "full"):
        for sfpn in (True, False):
            for ar in ("dynamic", "dynamic_square", "squash", "pad"):
                cfg = fo1_config(size, simple_fpn=sfpn, aux_image_aspect_ratio=ar)
                check_fo1(cfg)
                assert json.loads(json.dumps(cfg)) == cfg
    full = fo1_config("full")
    c = DecoderConfig.from_dict(full)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.vocab_size, c.mrope_section, c.tie_word_embeddings, c.eos_token_id) == \
        (2048, 36, 16, 2, 128, 151936, (16, 24, 24), True, [151645])
    v = VisionConfig.from_dict(full)
    assert (v.depth, v.hidden_size, v.num_heads, v.window_size, v.fullatt_block_indexes) == \
        (32, 1280, 16, 112, (7, 15, 23, 31))
    assert DavitConfig.from_dict(full).dims == (256, 512, 1024, 2048)
    assert HFREConfig.from_dict(full).region_hidden_size == 5888


def test_random_fo1_folder_reads_back(tmp_path):
    p = write_random_fo1(str(tmp_path / "fo1"), size="tiny", tokenizer=False, weights=False)
    raw = read_config(p)
    check_fo1(raw)


# stock configs as published (Qwen2.5-VL-3B-Instruct, transformers 4.x) and as transformers 5 writes them
QWEN25_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000, "max_window_layers": 70,
    "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": None}


def test_stock_configs_valid():
    c = DecoderConfig.from_dict(QWEN25_VL_3B)
    assert c.mrope_section == (16, 24, 24) and c.head_dim == 128 and c.rope_theta == 1e6
    assert VisionConfig.from_dict(QWEN25_VL_3B).depth == 32
    c = DecoderConfig.from_dict(QWEN25_7B)
    assert c.mrope_section == () and c.head_dim == 128 and c.num_key_value_heads == 4
    # transformers 5 nesting: text_config with rope_parameters; vision rope_parameters (axial)
    v5 = {k: v for k, v in QWEN25_VL_3B.items() if k not in ("rope_scaling", "rope_theta", "hidden_size",
                                                              "num_hidden_layers", "vocab_size")}
    v5["text_config"] = {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                         "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
                         "model_type": "qwen2_5_vl_text", "layer_types": ["full_attention"] * 36,
                         "rope_parameters": {"type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1e6,
                                             "rope_type": "default"}, "sliding_window": None,
                         "use_sliding_window": False, "eos_token_id": 151645, "pad_token_id": None}
    v5["vision_config"] = dict(v5["vision_config"], rope_parameters={"rope_theta": 10000.0, "rope_type": "axial"})
    c = DecoderConfig.from_dict(v5)
    assert c.mrope_section == (16, 24, 24) and c.num_hidden_layers == 36 and c.rope_theta == 1e6
    assert VisionConfig.from_dict(v5).rope_theta == 10000.0
    with pytest.raises(ValueError, match="text_config.num_hidden_layers"):
        DecoderConfig.from_dict(put(v5, "text_config.num_hidden_layers", 2 ** 63))


def test_transformers_written_configs_valid():
    transformers = pytest.importorskip("transformers")
    vl = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=151936, rope_scaling={"type": "mrope",
                                                                                 "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3]))
    d = json.loads(vl.to_json_string())
    assert DecoderConfig.from_dict(d).mrope_section == (2, 3, 3)
    assert VisionConfig.from_dict(d).fullatt_block_indexes == (1, 3)
    q = json.loads(transformers.Qwen2Config(vocab_size=300, hidden_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=344).to_json_string())
    assert DecoderConfig.from_dict(q).mrope_section == ()


@pytest.mark.parametrize("fixture", ["tiny_fp32", "tiny_untied"])
def test_conftest_checkpoints_load(fixture, request, LanguageModel):
    ck = request.getfixturevalue(fixture)
    lm = LanguageModel.load(ck.path, n_threads=1, max_context=32)
    assert lm.config.num_hidden_layers == 2 and lm.vocab_size == ck.vocab_size


# -------------------------------------------------------------------------------------------------------------------
# config.json text: NaN / Infinity / huge literals, nesting, size; claimed sizes from a folder

def _write(tmp_path, text):
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(text)
    return str(d)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e308", "1e999", "64.5", "true", "null",
                                     "9" * 30, "9223372036854775808", "1000000000000", "2147483648"])
@pytest.mark.parametrize("key", ["num_hidden_layers", "num_attention_heads", "vocab_size", "hidden_size"])
def test_json_literals_in_integer_keys(tmp_path, LanguageModel, literal, key):
    text = json.dumps(QWEN2).replace(f'"{key}": {QWEN2[key]}', f'"{key}": {literal}')
    assert literal in text
    path = _write(tmp_path, text)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"config.json: {key}: expected"):
        LanguageModel.load(path)      # no weights in the folder: the config is refused first
    assert time.perf_counter() - t0 < 1.0


def test_huge_integer_literal(tmp_path):
    path = _write(tmp_path, json.dumps(QWEN2).replace('"num_hidden_layers": 2', '"num_hidden_layers": ' + "9" * 5000))
    with pytest.raises(ValueError, match="config.json"):
        DecoderConfig.from_dict(read_config(path))


@pytest.mark.parametrize("depth", [65, 1000, 100_000, 1_000_000])
def test_deep_nesting_refused_before_parsing(tmp_path, depth):
    for inner in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        path = _write(tmp_path, '{"hidden_size": 32, "x": ' + inner + "}")
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=r"config\.json: JSON nested \d+ levels deep"):
            read_config(path)
        assert time.perf_counter() - t0 < 1.0


def test_nesting_counts_only_structure():
    # brackets inside strings (and escaped quotes) are not nesting
    s = json.dumps({"a": "[" * 1000, "b": "\\\"{{{{" * 100, "c": [[[1]]]})
    assert parse_config_json(s)["c"] == [[[1]]]
    assert parse_config_json(json.dumps({"x": [[0]] * 3, "y": {"z": {"w": 1}}}))["y"]["z"]["w"] == 1


def test_other_malformed_files(tmp_path):
    for text, pat in (("[1, 2]", "JSON object"), ("{broken", "invalid JSON"), ("", "invalid JSON"),
                      ("\"x\"", "JSON object")):
        with pytest.raises(ValueError, match=pat):
            read_config(_write(tmp_path, text))
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(ValueError, match="config.json"):
        read_config(str(d))


_SUBPROCESS = r"""
import resource, sys, time
limit = 3 << 29                                                      # 1.5 GiB of address space
if "libasan" in open("/proc/self/maps").read():  # .ci/sanitize: ASan has reserved terabytes for its shadow memory,
    limit += next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) << 10  # 1.5 GiB more
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from vlmfo1 import LanguageModel
from vlmfo1.fo1 import VLMFO1
from vlmfo1.config_check import ConfigError
t0 = time.perf_counter()
for kind, path in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        (LanguageModel.load if kind == "lm" else VLMFO1.from_pretrained)(path)
    except ConfigError as e:
        print("REFUSED", e)
    else:
        print("LOADED", path)
print("SECONDS", time.perf_counter() - t0)
"""


def test_claimed_sizes_do_not_allocate(tmp_path):
    """10^12 / 2^31 / 2^63 / 1e308 layers (decoder and ViT): refused fast under an address-space limit."""
    args = []
    for i, v in enumerate(["1000000000000", "2147483648", "9223372036854775808", "1e308"]):
        d = tmp_path / f"lm{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(QWEN2).replace('"num_hidden_layers": 2',
                                                                  f'"num_hidden_layers": {v}'))
        args += ["lm", str(d)]
        cfg = fo1_config("tiny")
        d = tmp_path / f"fo1_{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg).replace('"depth": 6', f'"depth": {v}'))
        args += ["fo1", str(d)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", VLMFO1_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _SUBPROCESS, *args], capture_output=True, text=True, timeout=120,
                       env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    refused = [l for l in lines if l.startswith("REFUSED")]
    assert len(refused) == 8, r.stdout
    assert sum("num_hidden_layers" in l for l in refused) == 4 and sum("vision_config.depth" in l for l in refused) == 4
    secs = float(lines[-1].split()[1])
    assert secs < 2.0, secs
