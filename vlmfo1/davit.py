"""DaViT, the auxiliary vision encoder of VLM-FO1: checkpoint loading and the call into the C core.

    enc = DavitEncoder.from_checkpoint(ckpt, raw_config)       # FO1 config.json (mm_vision_tower_aux) or Florence-2
    maps = enc(pixel_values)                                   # pixel_values float32 [3, H, W] (vlmfo1.aux_image)
    # -> 4 float32 arrays (C_s, H_s, W_s): the stage outputs after the blocks, no final norm
    #    (davit-large: C = 256, 512, 1024, 2048 at strides 4, 8, 16, 32, sizes floor((n + 2p - k)/s) + 1)

Checkpoint layouts (found from the tensor names unless `prefix` is given):
  * VLM-FO1: `model.vision_tower_aux.image_tower.` + the official DaViT names (`convs.{s}.proj`, `convs.{s}.norm`,
    `blocks.{s}.{j}.spatial_block.conv1.fn.dw`, `...window_attn.norm`, `...window_attn.fn.qkv`,
    `...ffn.fn.net.fc1`, ...).
  * transformers' Florence-2 vision tower (`model.vision_tower.` / `vision_tower.` / no prefix + `convs.{s}.conv`,
    `blocks.{s}.{j}.spatial_block.conv1`, `...norm1`, `...window_attn.qkv`, `...ffn.fc1`, ...).
Configuration: FO1's `mm_vision_tower_aux` names a DaViT variant (path and `.pth` stripped, as the official
`configs.py` lookup); a Florence-2 config (`vision_config`) or a DaViT config dict (`dim_embed`/`embed_dim`, ...) works
too. Channel widths, kernel sizes and MLP widths are read from the tensor shapes and the depths from the tensor names;
both must agree with the config.

Numerics: fp32 maths (or bf16 activations into the matmuls with compute="bf16"). `mode` is accepted for symmetry with
the other towers; DaViT has no rounding step that the "reference" mode reproduces (the official run is bf16 end to
end, ERRATA E3; an fp32 engine differs from it by bf16-sized deltas).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._native import core
from .config_check import check_davit, check_davit_fields, check_davit_name
from .constants import DAVIT_CONFIGS, DAVIT_LARGE
from .options import check_options
from .quant import quantize_checkpoint_matrices
from .safetensors import Checkpoint, check_tensors, stored_kind, weight
from .threads import default_threads
from .weight_cache import check_cache_dir, derive, lazy_weight

__all__ = ["DavitConfig", "DavitEncoder", "DAVIT_CONFIGS"]

_FO1_PREFIXES = ("model.vision_tower_aux.image_tower.", "vision_tower_aux.image_tower.", "image_tower.", "")
_HF_PREFIXES = ("model.vision_tower.", "vision_tower.", "")

# core name of a block tensor -> checkpoint suffix, per layout ("{a}" = window_attn / channel_attn)
_HALF_NAMES = {
    "fo1": {"dw1": "conv1.fn.dw", "ln1": "{a}.norm", "qkv": "{a}.fn.qkv", "proj": "{a}.fn.proj",
            "dw2": "conv2.fn.dw", "ln2": "ffn.norm", "fc1": "ffn.fn.net.fc1", "fc2": "ffn.fn.net.fc2"},
    "hf": {"dw1": "conv1", "ln1": "norm1", "qkv": "{a}.qkv", "proj": "{a}.proj",
           "dw2": "conv2", "ln2": "norm2", "fc1": "ffn.fc1", "fc2": "ffn.fc2"},
}
_CONV_NAME = {"fo1": "proj", "hf": "conv"}


@dataclass
class DavitConfig:
    depths: Tuple[int, ...] = DAVIT_LARGE["depths"]          # defaults: davit-large (vlmfo1.constants)
    dims: Tuple[int, ...] = DAVIT_LARGE["dims"]
    num_heads: Tuple[int, ...] = DAVIT_LARGE["num_heads"]
    num_groups: Tuple[int, ...] = DAVIT_LARGE["num_groups"]
    patch_size: Tuple[int, ...] = DAVIT_LARGE["patch_size"]
    patch_stride: Tuple[int, ...] = DAVIT_LARGE["patch_stride"]
    patch_padding: Tuple[int, ...] = DAVIT_LARGE["patch_padding"]
    patch_prenorm: Tuple[bool, ...] = DAVIT_LARGE["patch_prenorm"]
    window_size: int = DAVIT_LARGE["window_size"]
    mlp_ratio: float = 4.0
    in_chans: int = 3
    eps: float = 1e-5      # nn.LayerNorm default, every norm of the model
    name: str = "davit-large"

    def __post_init__(self):
        # the same checks as config.json gets (vlmfo1.config_check), for configs built in code too
        vals = check_davit_fields({f: getattr(self, f) for f in self.__dataclass_fields__ if f != "name"
                                   and f != "eps"})
        for f, v in vals.items():
            setattr(self, f, v)
        if not (isinstance(self.eps, (int, float)) and 0 < float(self.eps) < 1):
            raise ValueError(f"DaViT config: eps must be in (0, 1), got {self.eps!r}")

    @classmethod
    def named(cls, name: str) -> "DavitConfig":
        key = check_davit_name(name, "mm_vision_tower_aux", tuple(DAVIT_CONFIGS))
        return cls(name=key, **DAVIT_CONFIGS[key])

    @classmethod
    def from_dict(cls, raw: Dict) -> "DavitConfig":
        """FO1 config.json (`mm_vision_tower_aux`), a Florence-2 config (`vision_config`), or a DaViT config dict
        (official `dim_embed` or Florence-2 `embed_dim` naming), checked by vlmfo1.config_check before anything is
        allocated (ConfigError, a ValueError, names the key)."""
        if isinstance(raw, DavitConfig):
            return raw
        if not isinstance(raw, dict):
            raise ValueError("DaViT config must be a dict")
        d = cls()
        defaults = {f: getattr(d, f) for f in d.__dataclass_fields__}
        return cls(**check_davit(raw, defaults, tuple(DAVIT_CONFIGS), DAVIT_CONFIGS))

    def stage_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """(H_s, W_s) of the four stage maps: floor((n + 2p - k) / stride) + 1 per stage."""
        out, h, w = [], int(height), int(width)
        for k, st, p in zip(self.patch_size, self.patch_stride, self.patch_padding):
            h = (h + 2 * p - k) // st + 1 if h + 2 * p >= k else 0
            w = (w + 2 * p - k) // st + 1 if w + 2 * p >= k else 0
            out.append((h, w))
        return out


class DavitEncoder:
    def __init__(self, config: DavitConfig, tensors: Dict[str, np.ndarray], mode: str, compute: str, n_threads: int,
                 mlp_hidden: Sequence[int], checkpoint: Optional[Checkpoint] = None):
        self.config, self.mode, self.compute, self.n_threads = config, mode, compute, int(n_threads)
        self._ckpt, self._tensors = checkpoint, tensors
        c = config
        core_cfg = dict(in_chans=c.in_chans, window=c.window_size, eps=float(c.eps),
                        compute=1 if compute == "bf16" else 0,
                        dims=list(c.dims), depths=list(c.depths), heads=list(c.num_heads), groups=list(c.num_groups),
                        mlp_hidden=list(mlp_hidden), kernel=list(c.patch_size), stride=list(c.patch_stride),
                        pad=list(c.patch_padding), prenorm=[int(b) for b in c.patch_prenorm])
        self._core = core.DavitModel(core_cfg, tensors)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, raw_config, prefix: Optional[str] = None, mode: str = "exact",
                        compute: Optional[str] = None, dtype: Optional[str] = None,
                        n_threads: Optional[int] = None, cache_dir=None) -> "DavitEncoder":
        """ckpt: a vlmfo1.safetensors.Checkpoint; raw_config: config.json as a dict (or a DavitConfig).
        dtype: None keeps the stored weight dtype (bf16 as uint16 bits), "float32" / "bfloat16" convert, "int8"
        quantizes the matrices (cached between loads in cache_dir, vlmfo1.weight_cache: None = the default folder,
        False = no cache). compute: "f32" / "bf16" (default: bf16 for bf16 weights, else f32)."""
        check_options(mode, dtype, compute)
        check_cache_dir(cache_dir)
        config = DavitConfig.from_dict(raw_config)
        layout, prefix = _find_layout(ckpt, prefix)
        tensors, stored, mlp_hidden, names = _collect(ckpt, config, layout, prefix, dtype)
        n_threads = int(n_threads or default_threads())
        if dtype == "int8":
            quantize_checkpoint_matrices(tensors, ckpt, names, n_threads, cache_dir)
        if compute is None:
            compute = "bf16" if stored == "bf16" else "f32"
        return cls(config, tensors, mode, compute, n_threads, mlp_hidden, ckpt)

    @property
    def out_channels(self) -> List[int]:
        return list(self.config.dims)

    def stage_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        return self.config.stage_sizes(height, width)

    def __call__(self, pixel_values: np.ndarray, workspace=None) -> List[np.ndarray]:
        """pixel_values float32 [3, H, W] (one image, channel-first; a leading batch axis of 1 is accepted) ->
        the 4 stage maps as float32 (C_s, H_s, W_s) views of channels-last buffers. workspace: a
        vlmfo1._core.Workspace whose thread pool and scratch the call reuses (one thread at a time)."""
        px = self.check_input(pixel_values)
        maps = self._core.forward(px, n_threads=self.n_threads, workspace=workspace)
        return [m.transpose(2, 0, 1) for m in maps]

    def check_input(self, pixel_values: np.ndarray) -> np.ndarray:
        """-> the image as float32 C-contiguous [3, H, W], refused as __call__ refuses it."""
        px = np.asarray(pixel_values)
        if px.ndim == 4 and px.shape[0] == 1:
            px = px[0]
        c = self.config
        if px.ndim != 3 or px.shape[0] != c.in_chans or px.shape[1] < 1 or px.shape[2] < 1:
            raise ValueError(f"pixel_values must have shape ({c.in_chans}, H, W), got {tuple(np.shape(pixel_values))}")
        if not np.issubdtype(px.dtype, np.floating):
            raise TypeError(f"pixel_values must be floating point, got {px.dtype}")
        px = np.ascontiguousarray(px, dtype=np.float32)
        if not np.isfinite(px).all():
            raise ValueError("pixel_values contain NaN or inf")
        if any(h < 1 or w < 1 for h, w in c.stage_sizes(px.shape[1], px.shape[2])):
            raise ValueError(f"image {px.shape[1]}x{px.shape[2]} (HxW) is too small for the DaViT patch embeddings")
        return px


# --------------------------------------------------------------------------------------------------------------------
# checkpoint collection
# --------------------------------------------------------------------------------------------------------------------

def _find_layout(ckpt: Checkpoint, prefix: Optional[str]) -> Tuple[str, str]:
    if prefix is not None:
        for layout in ("fo1", "hf"):
            if f"{prefix}convs.0.{_CONV_NAME[layout]}.weight" in ckpt:
                return layout, prefix
        raise KeyError(f"no DaViT under prefix {prefix!r}: neither '{prefix}convs.0.proj.weight' (VLM-FO1) nor "
                       f"'{prefix}convs.0.conv.weight' (Florence-2) is in the checkpoint")
    for p in _FO1_PREFIXES:
        if p + "convs.0.proj.weight" in ckpt:
            return "fo1", p
    for p in _HF_PREFIXES:
        if p + "convs.0.conv.weight" in ckpt:
            return "hf", p
    raise KeyError("no DaViT in this checkpoint: looked for '*convs.0.proj.weight' under "
                   + ", ".join(repr(p) for p in _FO1_PREFIXES) + " and '*convs.0.conv.weight' under "
                   + ", ".join(repr(p) for p in _HF_PREFIXES))


def _collect(ckpt: Checkpoint, c: DavitConfig, layout: str, p: str, dtype: Optional[str]):
    names = _HALF_NAMES[layout]
    # depths from the tensor names, checked against the config
    pat = re.compile(re.escape(p) + r"blocks\.(\d+)\.(\d+)\.")
    found = [0, 0, 0, 0]
    for k in ckpt.keys():
        mt = pat.match(k)
        if mt and int(mt.group(1)) < 4:
            found[int(mt.group(1))] = max(found[int(mt.group(1))], int(mt.group(2)) + 1)
    if tuple(found) != tuple(c.depths):
        raise ValueError(f"DaViT depths in the checkpoint {found} do not match config.json's {list(c.depths)}")

    want: Dict[str, Tuple[str, Optional[tuple]]] = {}   # core name -> (checkpoint name, expected shape or None)
    mlp_hidden = []
    for s in range(4):
        C, Cin, k = c.dims[s], (c.dims[s - 1] if s else c.in_chans), c.patch_size[s]
        cv = f"{p}convs.{s}.{_CONV_NAME[layout]}"
        want[f"conv{s}"] = (cv + ".weight", (C, Cin, k, k))
        want[f"conv{s}_bias"] = (cv + ".bias", (C,))
        nd = Cin if c.patch_prenorm[s] else C
        want[f"norm{s}"] = (f"{p}convs.{s}.norm.weight", (nd,))
        want[f"norm{s}_bias"] = (f"{p}convs.{s}.norm.bias", (nd,))
        fc1 = f"{p}blocks.{s}.0.spatial_block.{names['fc1']}.weight"
        I = int(round(C * c.mlp_ratio))
        if c.depths[s] and fc1 in ckpt and len(ckpt.info(fc1).shape) == 2:
            I = int(ckpt.info(fc1).shape[0])
        mlp_hidden.append(I)
        for j in range(c.depths[s]):
            for kind, attn in (("spatial", "window_attn"), ("channel", "channel_attn")):
                base = f"{p}blocks.{s}.{j}.{kind}_block."
                shapes = {"dw1": (C, 1, 3, 3), "ln1": (C,), "qkv": (3 * C, C), "proj": (C, C), "dw2": (C, 1, 3, 3),
                          "ln2": (C,), "fc1": (I, C), "fc2": (C, I)}
                for key, suffix in names.items():
                    n = base + suffix.format(a=attn)
                    want[f"blocks.{s}.{j}.{kind}.{key}"] = (n + ".weight", shapes[key])
                    want[f"blocks.{s}.{j}.{kind}.{key}_bias"] = (n + ".bias", (shapes[key][0],))
    check_tensors(ckpt, want, "DaViT", lambda k: k.startswith(p + "blocks.") or k.startswith(p + "convs."))
    out: Dict[str, np.ndarray] = {}
    q = dtype == "int8"      # the matrices as mapped views or Deferred: nothing is read before the weight cache
    for key, (name, shp) in want.items():
        if shp[1:] == (1, 3, 3):     # depthwise conv [C, 1, 3, 3] -> tap-major [9 * C] float32
            a = weight(ckpt, name, dtype, vector=True)
            out[key] = np.ascontiguousarray(a.reshape(shp[0], 9).T).reshape(-1)
        elif len(shp) == 1:          # vectors
            out[key] = weight(ckpt, name, dtype, vector=True)
        else:                        # linear [n, k]; patch conv [C, Cin, k, k] -> [C, Cin * k * k]
            a = lazy_weight(ckpt, name) if q else weight(ckpt, name, dtype)
            k = int(np.prod(shp[1:]))
            out[key] = derive(a, lambda a, n=shp[0], k=k: a.reshape(n, k), (shp[0], k), q)
    return out, stored_kind(out), mlp_hidden, {key: name for key, (name, _) in want.items()}
