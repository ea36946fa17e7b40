"""Random-weight Qwen2 / Qwen2.5 decoder checkpoints in the Hugging Face layout, written with NumPy only.

No trained weights are reachable in our test and CI machines, so tests, demos and benchmarks run on
random weights in exactly the layout of real checkpoints (config.json + safetensors, sharded with an
index when large, bf16 or fp32). Tensors are generated and written one at a time, so a full-size
(3B) checkpoint needs little memory. Test and demo code only: the runtime never imports vlmfo1.testing.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

from ..constants import ENDOFTEXT_ID, IM_END_ID, QWEN25_VOCAB_SIZE
from ..safetensors import f32_to_bf16_bits, write_sharded

QWEN25_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                 intermediate_size=11008, vocab_size=QWEN25_VOCAB_SIZE, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 tie_word_embeddings=True, max_position_embeddings=32768)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=QWEN25_VOCAB_SIZE, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
            max_position_embeddings=4096)


def qwen2_shapes(cfg: Dict, prefix: str = "model.") -> Dict[str, Tuple[int, ...]]:
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    Q, KV = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    shapes = {prefix + "embed_tokens.weight": (V, H)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"{prefix}layers.{l}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "self_attn.q_proj.weight": (Q, H),
                       p + "self_attn.q_proj.bias": (Q,), p + "self_attn.k_proj.weight": (KV, H),
                       p + "self_attn.k_proj.bias": (KV,), p + "self_attn.v_proj.weight": (KV, H),
                       p + "self_attn.v_proj.bias": (KV,), p + "self_attn.o_proj.weight": (H, Q),
                       p + "post_attention_layernorm.weight": (H,), p + "mlp.gate_proj.weight": (I, H),
                       p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)})
    shapes[prefix + "norm.weight"] = (H,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, H)
    return shapes


def _random_tensor(name: str, shape: Tuple[int, ...], rng: np.random.Generator, scale: float) -> np.ndarray:
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    std = scale / np.sqrt(shape[-1]) if "embed" not in name else scale
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def write_random_qwen2(path: str, config: Optional[Dict] = None, dtype: str = "bfloat16", seed: int = 0,
                       shard_bytes: int = 2 * 1024**3, scale: float = 1.0, **overrides) -> str:
    """Write a random Qwen2 decoder checkpoint (config.json, generation_config.json, safetensors).

    config: a dict of Qwen2 config keys (default TINY; QWEN25_3B gives the real 3B shapes)."""
    cfg = dict(TINY if config is None else config)
    cfg.update(overrides)
    cfg.setdefault("architectures", ["Qwen2ForCausalLM"])
    cfg.setdefault("model_type", "qwen2")
    cfg.setdefault("hidden_act", "silu")
    cfg.setdefault("bos_token_id", ENDOFTEXT_ID)
    cfg.setdefault("eos_token_id", IM_END_ID)
    cfg["torch_dtype"] = dtype
    dt = {"bfloat16": "BF16", "float32": "F32"}[dtype]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID], "do_sample": False}, f,
                  indent=2)

    shapes = qwen2_shapes(cfg)
    rng = np.random.default_rng(seed)

    def maker(name, shape, tdt):
        def make():
            a = _random_tensor(name, shape, rng, scale)
            return f32_to_bf16_bits(a) if tdt == "BF16" else a
        return make

    write_sharded(path, [(name, dt, shape, maker(name, shape, dt)) for name, shape in shapes.items()], shard_bytes,
                  {"format": "pt"})
    return path
