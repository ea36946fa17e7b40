"""The Qwen2.5-VL vision transformer: checkpoint loading and the call into the C core.

    vt = VisionTower.from_checkpoint(ckpt, raw_config, mode="exact")
    tokens = vt(pixel_values, grid_thw)                     # [gh*gw/4, out_hidden], raster merged order
    tokens, maps = vt(pixel_values, grid_thw, features=True) # + the hidden states after the full-attention
                                                            #   blocks as (C, gh, gw) maps (FO1's region features)
Checkpoint layouts: stock Qwen2.5-VL (`visual.*`), transformers 5 (`model.visual.*`) and VLM-FO1
(`model.vision_tower.image_tower.*`); the prefix is found from the tensor names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from ._native import core
from .config_check import check_vision
from .constants import QWEN_PATCH_SIZE
from .decoder import rope_inv_freq
from .options import check_options
from .quant import quantize_checkpoint_matrices
from .safetensors import Checkpoint, check_tensors, stored_kind, weight
from .threads import check_threads
from .weight_cache import check_cache_dir, derive, lazy_weight

_PREFIXES = ("model.vision_tower.image_tower.", "model.visual.", "visual.", "vision_tower.")


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 2048
    in_channels: int = 3
    patch_size: int = QWEN_PATCH_SIZE
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: Sequence[int] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, raw: Dict) -> "VisionConfig":
        """`vision_config` of config.json (or the top level without one), checked by vlmfo1.config_check before
        anything is allocated (ConfigError, a ValueError, names the key)."""
        return cls(**check_vision(raw))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def in_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def vision_inv_freq(head_dim: int, theta: float, mode: str) -> np.ndarray:
    """The axial 2-D rotary frequencies, tiled for the (row, column) halves: [head_dim/2] float32."""
    inv = rope_inv_freq(head_dim // 2, theta, mode)
    return np.concatenate([inv, inv])


class VisionTower:
    def __init__(self, config: VisionConfig, tensors: Dict[str, np.ndarray], mode: str, compute: str, n_threads: int,
                 checkpoint: Optional[Checkpoint] = None):
        self.config, self.mode, self.compute, self.n_threads = config, mode, compute, n_threads
        self._ckpt, self._tensors = checkpoint, tensors
        c = config
        core_cfg = dict(depth=c.depth, hidden=c.hidden_size, n_heads=c.num_heads, inter=c.intermediate_size,
                        out_hidden=c.out_hidden_size, in_dim=c.in_dim, patch=c.patch_size,
                        merge=c.spatial_merge_size, window=c.window_size, fullatt=list(c.fullatt_block_indexes),
                        eps=1e-6, compute=1 if compute == "bf16" else 0)
        self._core = core.VisionModel(core_cfg, tensors)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, raw_config: Dict, mode: str = "exact", compute: Optional[str] = None,
                        dtype: Optional[str] = None, n_threads: Optional[int] = None,
                        prefix: Optional[str] = None, cache_dir=None) -> "VisionTower":
        """cache_dir: where int8 weights are cached between loads (vlmfo1.weight_cache; None = the default folder,
        False = no cache)."""
        check_options(mode, dtype, compute)
        check_cache_dir(cache_dir)
        n_threads = check_threads(n_threads)
        config = VisionConfig.from_dict(raw_config)
        if prefix is None:
            prefix = next((p for p in _PREFIXES if p + "patch_embed.proj.weight" in ckpt), None)
            if prefix is None:
                raise KeyError("no Qwen2.5-VL vision tower in this checkpoint: no '*patch_embed.proj.weight' under "
                               + ", ".join(_PREFIXES))
        tensors, stored, names = _collect(ckpt, config, prefix, dtype)
        if dtype == "int8":
            quantize_checkpoint_matrices(tensors, ckpt, names, n_threads, cache_dir)
        if compute is None:
            compute = "bf16" if stored == "bf16" else "f32"
        tensors["inv_freq"] = vision_inv_freq(config.head_dim, config.rope_theta, mode)
        return cls(config, tensors, mode, compute, n_threads, ckpt)

    @property
    def n_full(self) -> int:
        return self._core.n_full

    def check_input(self, pixel_values: np.ndarray, grid_thw):
        """-> (pixel rows as float32 C-contiguous [gh*gw, in_dim], gh, gw), refused as __call__ refuses them."""
        t, gh, gw = (int(v) for v in np.asarray(grid_thw).reshape(-1)[:3])
        if t != 1:
            raise ValueError(f"one image (grid_t = 1) at a time, got grid_thw {tuple(np.asarray(grid_thw).ravel())}")
        px = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if px.ndim != 2 or px.shape != (gh * gw, self.config.in_dim):
            raise ValueError(f"pixel_values must have shape ({gh * gw}, {self.config.in_dim}), got {px.shape}")
        if not np.isfinite(px).all():
            raise ValueError("pixel_values contain NaN or inf")
        return px, gh, gw

    def __call__(self, pixel_values: np.ndarray, grid_thw, features: bool = False, workspace=None):
        """workspace: a vlmfo1._core.Workspace whose thread pool and scratch the call reuses (one thread at a time)."""
        px, gh, gw = self.check_input(pixel_values, grid_thw)
        out = self._core.forward(px, gh, gw, n_threads=self.n_threads, features=features, workspace=workspace)
        if not features:
            return out
        tokens, feats = out
        # [n_full, gh, gw, C] -> channel-first (C, gh, gw) views
        return tokens, [f.transpose(2, 0, 1) for f in feats]


def _collect(ckpt: Checkpoint, c: VisionConfig, p: str, dtype: Optional[str]):
    D, I, D4 = c.hidden_size, c.intermediate_size, 4 * c.hidden_size
    want = {"patch_embed": (p + "patch_embed.proj.weight",
                            (D, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)),
            "merger_ln": (p + "merger.ln_q.weight", (D,)),
            "merger1": (p + "merger.mlp.0.weight", (D4, D4)), "merger1_bias": (p + "merger.mlp.0.bias", (D4,)),
            "merger2": (p + "merger.mlp.2.weight", (c.out_hidden_size, D4)),
            "merger2_bias": (p + "merger.mlp.2.bias", (c.out_hidden_size,))}
    per = {"ln1": ("norm1.weight", (D,)), "ln2": ("norm2.weight", (D,)),
           "qkv": ("attn.qkv.weight", (3 * D, D)), "qkv_bias": ("attn.qkv.bias", (3 * D,)),
           "proj": ("attn.proj.weight", (D, D)), "proj_bias": ("attn.proj.bias", (D,)),
           "gate": ("mlp.gate_proj.weight", (I, D)), "gate_bias": ("mlp.gate_proj.bias", (I,)),
           "up": ("mlp.up_proj.weight", (I, D)), "up_bias": ("mlp.up_proj.bias", (I,)),
           "down": ("mlp.down_proj.weight", (D, I)), "down_bias": ("mlp.down_proj.bias", (D,))}
    for l in range(c.depth):
        for k, (n, shp) in per.items():
            want[f"blocks.{l}.{k}"] = (f"{p}blocks.{l}.{n}", shp)
    check_tensors(ckpt, want, "vision", lambda k: k.startswith(p + "blocks."))
    q = dtype == "int8"      # the matrices as mapped views or Deferred: nothing is read before the weight cache
    out = {key: lazy_weight(ckpt, name) if q and len(shp) > 1 else weight(ckpt, name, dtype, vector=len(shp) == 1)
           for key, (name, shp) in want.items()}
    pe = int(np.prod(want["patch_embed"][1][1:]))   # Conv3d weight -> [D, C*T*P*P], pixel_values order
    out["patch_embed"] = derive(out["patch_embed"], lambda a: a.reshape(D, pe), (D, pe), q)
    return out, stored_kind(out), {key: name for key, (name, _) in want.items()}
