"""Random-weight VLM-FO1 checkpoints in the layout of the released `omlab/VLM-FO1_Qwen2.5-VL-3B-v01`.

No trained weights are reachable here, so FO1 tests run on random weights written in exactly the layout the official
loader reads (`vlm_fo1/model/builder.py` of om-ai-lab/VLM-FO1 at e6bef8d): config.json, generation_config.json,
preprocessor_config.json, the slow-Qwen2 tokenizer files with FO1's added tokens, and sharded safetensors with a
`model.safetensors.index.json`:

  model.embed_tokens / model.layers.* / model.norm       Qwen2.5 decoder (lm_head tied: no lm_head.weight)
  model.vision_tower.image_tower.*                       Qwen2.5-VL ViT (patch_embed, blocks, merger)
  model.vision_tower_aux.image_tower.*                   DaViT-large (convs.{0..3}, blocks.{s}.{j}.{spatial,channel}_block)
  model.object_vp_extractor.simple_fpn.simfp_{1..4}.*    HFRE SimpleFP (only with mm_use_simpleFPN_for_vt)
  model.mm_projector.*                                   image projector (none for "identity", the default here)
  model.mm_projector_aux.{0,2}.*                         region projector (mlp2x_gelu)

Every tensor is drawn from its own NumPy generator seeded by (seed, crc32(name)), so a tensor's bytes depend only on
the seed and its name: checkpoints that differ only in some modules (e.g. SimpleFP on/off) share all other tensors,
and a single tensor can be regenerated without writing the checkpoint (`random_tensor`). Weights are scaled so that
activations stay O(1) and attention is far from uniform (see `_init_std`).

size="full" gives the real 3B shapes (~4.1B parameters, ~8.3 GB in bf16), written tensor by tensor.
size="tiny" is as small as the official code allows:
  * DaViT: the channel dims 256/512/1024/2048 and heads/groups 8/16/32/64 are hard-coded (davit/configs.py,
    hybrid_finegrained_region_encoder.py:146, omchat_arch.py:30); depths default to [1, 1, 1, 1] here, which the
    official code can only build if `model_configs['davit-large']['depths']` is patched (the depth per stage is
    visible from the tensor names; config.json carries it as the non-official key `vlmfo1_davit_depths`).
  * Qwen ViT: hidden 1280 is forced by SimpleFP (`SimpleFP(dim=1280)`, hybrid_finegrained_region_encoder.py:175),
    and without SimpleFP exactly 4 full-attention blocks are needed (mm_region_hidden_size = 3840 + 4 * hidden).
    depth/intermediate/out_hidden come from `vision_config` and are small.
  * LLM: small hidden (256, head_dim 128 so mrope_section [16, 24, 24] stays valid), 2 layers; the vocabulary stays
    151936 because the real Qwen tokenizer plus FO1's tokens is used.

Only the standard library, NumPy and vlmfo1 modules are imported. Test and demo code only: the runtime never imports
vlmfo1.testing (the model's constants are vlmfo1.constants').
"""
from __future__ import annotations

import copy
import json
import os
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from .. import constants
from ..constants import (DAVIT_LARGE, ENDOFTEXT_ID, IMAGE_PAD_ID, IM_END_ID, MAX_BOXES, QWEN25_VOCAB_END,
                         QWEN25_VOCAB_SIZE, QWEN_PATCH_SIZE, VIDEO_PAD_ID, VISION_END_ID, VISION_PAD_ID,
                         VISION_START_ID)
from ..image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..safetensors import f32_to_bf16_bits, write_sharded
from .qwen2 import qwen2_shapes

# ------------------------------------------------------------------------------------------------------------------
# tokens

def fo1_added_tokens(think: bool = True) -> List[str]:
    """FO1's added tokens in the order of `vlm_fo1/constants.py`: <region0>..<region99>, <ground>, </ground>,
    <objects>, </objects> (and <think>, </think>). They get ids 151665, 151666, ... (ids are not recoverable from
    the official code; this order is our decision, documented in tests/golden/README.md)."""
    toks = [f"<region{i}>" for i in range(MAX_BOXES)] + ["<ground>", "</ground>", "<objects>", "</objects>"]
    if think:
        toks += ["<think>", "</think>"]
    return toks


def fo1_token_ids(think: bool = True) -> Dict[str, int]:
    return {t: QWEN25_VOCAB_END + i for i, t in enumerate(fo1_added_tokens(think))}


# ------------------------------------------------------------------------------------------------------------------
# configuration

DAVIT_MLP_RATIO = 4                                   # DavitConfig.mlp_ratio (an int here: it sizes tensors)
AUX_REGION_DIM = sum(DAVIT_LARGE["dims"])            # 3840, hard-coded in omchat_arch.py:30
SIMPLE_FPN_OUT = 512                                  # SimpleFP(out_channels=512, dim=1280): 4 levels -> 2048
SIMPLE_FPN_DIM = 1280

_VISION_FULL = dict(depth=32, hidden_size=1280, hidden_act="silu", intermediate_size=3420, num_heads=16, in_chans=3,
                    out_hidden_size=2048, patch_size=QWEN_PATCH_SIZE, spatial_merge_size=2,
                    spatial_patch_size=QWEN_PATCH_SIZE,
                    window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                    temporal_patch_size=2)
_VISION_TINY = dict(_VISION_FULL, depth=6, intermediate_size=512, out_hidden_size=256,
                    fullatt_block_indexes=[1, 3, 4, 5])

_TEXT_FULL = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, max_position_embeddings=128000, max_window_layers=70)
_TEXT_TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128000, max_window_layers=70)


def fo1_config(size: str = "tiny", simple_fpn: bool = True, aux_image_aspect_ratio: str = "dynamic",
               dtype: str = "bfloat16", **overrides) -> Dict:
    """config.json of a VLM-FO1 (Qwen2.5-VL-3B) checkpoint.

    Values follow the released model as far as the spec can tell (fo1_architecture.md §4.2): stock Qwen2.5-VL-3B
    backbone keys, mm_projector_type "identity", mm_projector_aux_type "mlp2x_gelu", mm_region_hidden_size
    3840 + 2048 (SimpleFP) or 3840 + 4 * vision hidden (no SimpleFP), mm_roi_output_size 14, no region LayerNorms,
    aux_image_aspect_ratio "dynamic", aux_image_size 1024 (no effect), mm_num_region_tokens 100 (not read).
    overrides: any key; `vision_config` may be given as a partial dict (merged); `davit_depths` sets the DaViT depths.
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    text = dict(_TEXT_TINY if size == "tiny" else _TEXT_FULL)
    vision = copy.deepcopy(_VISION_TINY if size == "tiny" else _VISION_FULL)
    overrides = dict(overrides)
    vision.update(overrides.pop("vision_config", None) or {})
    davit_depths = list(overrides.pop("davit_depths", [1, 1, 1, 1] if size == "tiny" else DAVIT_LARGE["depths"]))
    if len(davit_depths) != 4 or any(int(d) < 0 for d in davit_depths):
        raise ValueError(f"davit_depths must be 4 non-negative ints, got {davit_depths}")
    if simple_fpn and vision["hidden_size"] != SIMPLE_FPN_DIM:
        raise ValueError("SimpleFP is built with dim=1280 in the official code: vision hidden_size must be 1280")
    vt_dim = SIMPLE_FPN_OUT * 4 if simple_fpn else vision["hidden_size"] * len(vision["fullatt_block_indexes"])
    cfg = {
        "architectures": ["OmChatQwen25VLForCausalLM"],
        "model_type": "omchat_qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "vision_token_id": VISION_PAD_ID,
        "image_token_id": IMAGE_PAD_ID,
        "video_token_id": VIDEO_PAD_ID,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        **text,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": QWEN25_VOCAB_SIZE,
        "vision_config": vision,
        # --- FO1 keys (read by vlm_fo1/model/omchat_arch.py, builder.py, mm_utils.py, omchat_qwen2_5_vl.py)
        "delay_load": True,
        "mm_vision_tower": "resources/Qwen2.5-VL-3B-Instruct-Vision_Tower",
        "mm_vision_tower_aux": "resources/davit-large.pth",
        "mm_hidden_size": vision["out_hidden_size"],
        "mm_projector_type": "identity",
        "mm_projector_aux_type": "mlp2x_gelu",
        "mm_region_hidden_size": AUX_REGION_DIM + vt_dim,
        "mm_use_vision_tower_region_feature": True,
        "mm_use_simpleFPN_for_vt": bool(simple_fpn),
        "mm_region_feature_combination": "concat",
        "mm_apply_position_embedding": True,
        "mm_pos_embedding_strategy": "bbox_based",
        "mm_apply_region_layer_norm": False,
        "mm_use_vt_region_feature_only": False,
        "mm_roi_output_size": 14,
        "mm_use_region_index_token": True,
        "mm_num_region_tokens": MAX_BOXES,
        "aux_image_aspect_ratio": aux_image_aspect_ratio,
        "aux_image_size": 1024,
        "tokenizer_padding_side": "right",
    }
    if davit_depths != list(DAVIT_LARGE["depths"]):
        cfg["vlmfo1_davit_depths"] = davit_depths   # not an official key: the official code hard-codes [1, 1, 9, 1]
    cfg.update(overrides)
    if cfg["hidden_size"] // cfg["num_attention_heads"] != 2 * sum(cfg["rope_scaling"]["mrope_section"]):
        raise ValueError("head_dim must equal 2 * sum(mrope_section)")
    if cfg["mm_projector_type"] == "identity" and cfg["mm_hidden_size"] != cfg["hidden_size"]:
        raise ValueError("identity mm_projector needs vision out_hidden_size == hidden_size")
    return cfg


def davit_depths(cfg: Dict) -> List[int]:
    return list(cfg.get("vlmfo1_davit_depths", DAVIT_LARGE["depths"]))


# ------------------------------------------------------------------------------------------------------------------
# tensor names and shapes

def _projector_shapes(prefix: str, kind: str, d_in: int, d_out: int) -> Dict[str, Tuple[int, ...]]:
    import re
    if kind == "identity":
        return {}
    if kind == "linear":
        return {prefix + "weight": (d_out, d_in), prefix + "bias": (d_out,)}
    m = re.match(r"^mlp(\d+)x_gelu$", kind)
    if not m:
        raise ValueError(f"unsupported projector type {kind!r} (identity, linear, mlpNx_gelu)")
    out, d = {}, d_in
    for i in range(int(m.group(1))):
        out[f"{prefix}{2 * i}.weight"] = (d_out, d)
        out[f"{prefix}{2 * i}.bias"] = (d_out,)
        d = d_out
    return out


def vision_shapes(v: Dict, prefix: str = "model.vision_tower.image_tower.") -> Dict[str, Tuple[int, ...]]:
    H, I, O = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    p, t = v["patch_size"], v["temporal_patch_size"]
    C = H * v["spatial_merge_size"] ** 2
    s = {prefix + "patch_embed.proj.weight": (H, v.get("in_chans", 3), t, p, p)}
    for j in range(v["depth"]):
        b = f"{prefix}blocks.{j}."
        s.update({b + "norm1.weight": (H,), b + "norm2.weight": (H,),
                  b + "attn.qkv.weight": (3 * H, H), b + "attn.qkv.bias": (3 * H,),
                  b + "attn.proj.weight": (H, H), b + "attn.proj.bias": (H,),
                  b + "mlp.gate_proj.weight": (I, H), b + "mlp.gate_proj.bias": (I,),
                  b + "mlp.up_proj.weight": (I, H), b + "mlp.up_proj.bias": (I,),
                  b + "mlp.down_proj.weight": (H, I), b + "mlp.down_proj.bias": (H,)})
    s.update({prefix + "merger.ln_q.weight": (H,), prefix + "merger.mlp.0.weight": (C, C),
              prefix + "merger.mlp.0.bias": (C,), prefix + "merger.mlp.2.weight": (O, C),
              prefix + "merger.mlp.2.bias": (O,)})
    return s


def davit_shapes(depths: List[int], prefix: str = "model.vision_tower_aux.image_tower.",
                 dims: Optional[List[int]] = None) -> Dict[str, Tuple[int, ...]]:
    """Tensor shapes of a DaViT in FO1's official layout (davit-large widths unless `dims` is given)."""
    ks, r = DAVIT_LARGE["patch_size"], DAVIT_MLP_RATIO
    dims = list(DAVIT_LARGE["dims"] if dims is None else dims)
    s: Dict[str, Tuple[int, ...]] = {}
    for i, C in enumerate(dims):
        cin = 3 if i == 0 else dims[i - 1]
        s[f"{prefix}convs.{i}.proj.weight"] = (C, cin, ks[i], ks[i])
        s[f"{prefix}convs.{i}.proj.bias"] = (C,)
        s[f"{prefix}convs.{i}.norm.weight"] = (C if i == 0 else cin,)   # stage 0 post-norm, others pre-norm
        s[f"{prefix}convs.{i}.norm.bias"] = (C if i == 0 else cin,)
    for i, C in enumerate(dims):
        for j in range(depths[i]):
            for blk, attn in (("spatial_block", "window_attn"), ("channel_block", "channel_attn")):
                b = f"{prefix}blocks.{i}.{j}.{blk}."
                s.update({b + "conv1.fn.dw.weight": (C, 1, 3, 3), b + "conv1.fn.dw.bias": (C,),
                          b + f"{attn}.norm.weight": (C,), b + f"{attn}.norm.bias": (C,),
                          b + f"{attn}.fn.qkv.weight": (3 * C, C), b + f"{attn}.fn.qkv.bias": (3 * C,),
                          b + f"{attn}.fn.proj.weight": (C, C), b + f"{attn}.fn.proj.bias": (C,),
                          b + "conv2.fn.dw.weight": (C, 1, 3, 3), b + "conv2.fn.dw.bias": (C,),
                          b + "ffn.norm.weight": (C,), b + "ffn.norm.bias": (C,),
                          b + "ffn.fn.net.fc1.weight": (r * C, C), b + "ffn.fn.net.fc1.bias": (r * C,),
                          b + "ffn.fn.net.fc2.weight": (C, r * C), b + "ffn.fn.net.fc2.bias": (C,)})
    return s


def simple_fpn_shapes(prefix: str = "model.object_vp_extractor.simple_fpn.") -> Dict[str, Tuple[int, ...]]:
    D, O = SIMPLE_FPN_DIM, SIMPLE_FPN_OUT
    s: Dict[str, Tuple[int, ...]] = {}

    def conv_ln(name, cin, k):
        s[name + ".weight"] = (O, cin, k, k)               # Conv2d without bias (norm != "")
        s[name + ".norm.weight"] = (O,)
        s[name + ".norm.bias"] = (O,)

    p = prefix + "simfp_1."                                 # x4: ConvT, LN, GELU, ConvT, conv1+LN, conv3+LN
    s.update({p + "0.weight": (D, D // 2, 2, 2), p + "0.bias": (D // 2,), p + "1.weight": (D // 2,),
              p + "1.bias": (D // 2,), p + "3.weight": (D // 2, D // 4, 2, 2), p + "3.bias": (D // 4,)})
    conv_ln(p + "4", D // 4, 1)
    conv_ln(p + "5", O, 3)
    p = prefix + "simfp_2."                                 # x2: ConvT, conv1+LN, conv3+LN
    s.update({p + "0.weight": (D, D // 2, 2, 2), p + "0.bias": (D // 2,)})
    conv_ln(p + "1", D // 2, 1)
    conv_ln(p + "2", O, 3)
    p = prefix + "simfp_3."                                 # x1
    conv_ln(p + "0", D, 1)
    conv_ln(p + "1", O, 3)
    p = prefix + "simfp_4."                                 # x0.5: MaxPool (no params), conv1+LN, conv3+LN
    conv_ln(p + "1", D, 1)
    conv_ln(p + "2", O, 3)
    return s


def fo1_shapes(cfg: Dict) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the checkpoint, name -> shape, in state_dict order."""
    v = cfg["vision_config"]
    shapes = {k: v_ for k, v_ in qwen2_shapes(cfg).items() if k != "lm_head.weight"}
    shapes.update(vision_shapes(v))
    shapes.update(_projector_shapes("model.mm_projector.", cfg.get("mm_projector_type", "linear"),
                                    cfg["mm_hidden_size"], cfg["hidden_size"]))
    shapes.update(davit_shapes(davit_depths(cfg)))
    use_vt = cfg.get("mm_use_vision_tower_region_feature", False)
    vt_only = cfg.get("mm_use_vt_region_feature_only", False)
    if cfg.get("mm_use_simpleFPN_for_vt", False):
        shapes.update(simple_fpn_shapes())
    if cfg.get("mm_apply_region_layer_norm", False):
        p = "model.object_vp_extractor."
        dv = 2048 if cfg.get("mm_use_simpleFPN_for_vt", False) else v["hidden_size"] * 4
        if use_vt:
            shapes.update({p + "vt_region_norm.weight": (dv,), p + "vt_region_norm.bias": (dv,)})
        if not vt_only:
            shapes.update({p + "aux_region_norm.weight": (AUX_REGION_DIM,), p + "aux_region_norm.bias": (AUX_REGION_DIM,)})
    shapes.update(_projector_shapes("model.mm_projector_aux.", cfg.get("mm_projector_aux_type", "linear"),
                                    cfg["mm_region_hidden_size"], cfg["hidden_size"]))
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (cfg["vocab_size"], cfg["hidden_size"])
    return shapes


# ------------------------------------------------------------------------------------------------------------------
# random values

_QK_GAIN = 2.0          # q/k rows of fused or separate projections: attention logits with std ~4 (sharp, not one-hot)
_DW_GAIN = 0.3          # DaViT depthwise convs are residual (x + dw(x)), 4 per block pair: keep them small
# tied embeddings: with embeddings as large as the layer outputs, the final state stays aligned with the last input
# token's embedding and a random model just repeats it; smaller embeddings and stronger layer outputs avoid that
_EMBED_STD = 0.5
_LLM_OUT_GAIN = 2.0


def _init_std(name: str, shape: Tuple[int, ...]) -> Tuple[str, float]:
    """(kind, std) of a tensor: 'norm' -> 1 + std*N, 'bias' -> std*N, 'weight' -> std*N (qkv handled by caller)."""
    if len(shape) == 1:
        return ("norm", 0.1) if name.endswith(".weight") else ("bias", 0.1)
    if name.endswith("embed_tokens.weight"):
        return "weight", _EMBED_STD
    if name.startswith("model.layers.") and name.endswith(("o_proj.weight", "down_proj.weight")):
        return "weight", _LLM_OUT_GAIN / np.sqrt(float(shape[1]))
    if ".dw." in name:                                    # depthwise [C, 1, 3, 3]
        return "weight", _DW_GAIN / np.sqrt(9.0)
    if "simple_fpn" in name and len(shape) == 4 and shape[2:] == (2, 2):
        return "weight", 1.0 / np.sqrt(shape[0])         # ConvTranspose2d [in, out, 2, 2] (k = s: fan-in = in)
    return "weight", 1.0 / np.sqrt(float(np.prod(shape[1:])))


def random_tensor(name: str, shape: Tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The float32 values of one tensor (before the bf16 rounding of a bf16 checkpoint)."""
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    kind, std = _init_std(name, shape)
    a = rng.standard_normal(shape, dtype=np.float32)
    if kind == "norm":
        a *= np.float32(std)
        a += np.float32(1.0)
        return a
    a *= np.float32(std)
    # sharper attention: scale the q and k parts
    if name.endswith("qkv.weight") or name.endswith("qkv.bias"):
        a[: 2 * shape[0] // 3] *= np.float32(_QK_GAIN)
    elif name.endswith(("q_proj.weight", "k_proj.weight")):
        a *= np.float32(_QK_GAIN)
    return a


# ------------------------------------------------------------------------------------------------------------------
# side files

GENERATION_CONFIG = {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
                     "pad_token_id": ENDOFTEXT_ID, "do_sample": False}
# stock Qwen2.5-VL preprocessor_config.json (effective min/max pixels come from here, ERRATA E4)
PREPROCESSOR_CONFIG = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": QWEN_PATCH_SIZE,
                       "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(OPENAI_CLIP_MEAN),
                       "image_std": list(OPENAI_CLIP_STD),
                       "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


def write_fo1_tokenizer(path: str, tiktoken_path: Optional[str] = None, think: bool = True) -> None:
    """vocab.json, merges.txt, tokenizer.json, tokenizer_config.json (+ added_tokens.json, special_tokens_map.json):
    the real Qwen2 vocabulary, Qwen2.5's added tokens 151643..151664, then FO1's tokens from 151665."""
    from ..tokenizer import Tokenizer
    tk = tiktoken_path or os.environ.get("VLMFO1_QWEN_TIKTOKEN") or constants.DEFAULT_TIKTOKEN
    tok = Tokenizer.from_tiktoken(tk, extra_tokens=fo1_token_ids(think), model_max_length=32768)
    tok.save(path)
    added = tok.added_tokens
    with open(os.path.join(path, "added_tokens.json"), "w", encoding="utf-8") as f:
        json.dump(added, f, ensure_ascii=False, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"additional_special_tokens": tok.tokenizer_config()["additional_special_tokens"],
                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f, ensure_ascii=False, indent=2)


# ------------------------------------------------------------------------------------------------------------------
# writer

def write_random_fo1(path: str, size: str = "tiny", dtype: str = "bfloat16", seed: int = 0, simple_fpn: bool = True,
                     aux_image_aspect_ratio: str = "dynamic", shard_bytes: Optional[int] = None,
                     tiktoken_path: Optional[str] = None, tokenizer: bool = True, weights: bool = True,
                     **overrides) -> str:
    """Write a random VLM-FO1 checkpoint folder (see module docstring) and return its path.

    The official loader only accepts folders whose name contains "vlm-fo1" and "qwen2.5-vl" (builder.py:35,39),
    e.g. ".../VLM-FO1_Qwen2.5-VL-3B-tiny".
    shard_bytes: shard size (default 200 MB for tiny, 5 GB for full); the index json is always written.
    weights=False writes only the side files (config, tokenizer, processor) — enough to build the model skeleton.
    overrides: config keys (see fo1_config)."""
    cfg = fo1_config(size, simple_fpn=simple_fpn, aux_image_aspect_ratio=aux_image_aspect_ratio, dtype=dtype,
                     **overrides)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR_CONFIG, f, indent=2)
    if tokenizer:
        write_fo1_tokenizer(path, tiktoken_path)
    if not weights:
        return path

    shapes = fo1_shapes(cfg)
    st = {"bfloat16": "BF16", "float32": "F32"}[dtype]
    limit = shard_bytes or (200 * 1024**2 if size == "tiny" else 5 * 1000**3)

    def maker(name, shape):
        def make():
            a = random_tensor(name, shape, seed)
            return f32_to_bf16_bits(a) if st == "BF16" else a
        return make

    write_sharded(path, [(name, st, shape, maker(name, shape)) for name, shape in shapes.items()], limit,
                  {"format": "pt"}, always_index=True)
    return path


def count_params(cfg: Dict) -> int:
    return int(sum(int(np.prod(s, dtype=np.int64)) for s in fo1_shapes(cfg).values()))
