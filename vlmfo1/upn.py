"""UPN, the proposal network of the official VLM-FO1 pipeline (ChatRex's Universal Proposal Network), on the CPU.

    upn = UPN.from_pretrained("upn_large.pth")                 # or a .safetensors conversion, or a folder holding one
    props = upn("photo.jpg")                                    # Proposals: int boxes, scores, <= 100, the UPN filter
    raw = upn.predict(image)                                    # every query: xyxy pixel boxes, scores, sorted
    model.detect(image, ["cat"], proposals=upn)                 # a ProposalSource: the whole pipeline in one call

The official UPN runs only on CUDA (its wrapper calls `.to("cuda")`, its deformable-attention op raises "Not
implement on cpu"); this is the same network in the C core: a Swin backbone (csrc/swin.c), the 4+1 level neck, the
deformable-DETR encoder, two-stage selection of the top 900 queries and the decoder (csrc/upn.c), in float32.

Checkpoints: the published `upn_large.pth` (a `torch.save` zip; read by `vlmfo1.torch_checkpoint` without torch and
without running any code from the file; the state dict is under "model") or a safetensors file with the same tensor
names (`vlmfo1.testing.write_random_upn` writes one). The architecture is read from the tensor shapes (Swin embed width,
depths, heads and window; encoder / decoder depth, FFN width, query count); attention heads, sampling points,
GroupNorm groups and the position-embedding temperature are UPN-large's (8, 4, 32, 20) unless the safetensors
metadata "upn_config" says otherwise.

Pre/post-processing as the reference (`detect_tools/upn/inference_wrapper.py`, spec fo1_architecture.md §7):
  * resize: short side 800, long side <= 1333 (`upn_input_size`, the reference's rounding), Pillow bilinear;
    ToTensor (/255) and ImageNet normalization in float32. Images are converted to RGB first (the reference
    would fail on a grey or RGBA image: its network takes 3 channels);
  * scores = sigmoid(logits); boxes cxcywh -> xyxy (x0 = cx - w/2, y0 = cy - h/2, x1 = x0 + w, y1 = y0 + h, in that
    order, float32) times the original (W, H); sorted by score, descending;
  * the filter (`vlmfo1.proposals.filter_proposals`): score >= min_score (0.3), NMS at IoU 0.8, int32 boxes, top 100,
    scores rounded to 2 decimals. When nothing passes the threshold the result is empty (the reference crashes).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import numpy as np

from ._native import core
from .proposals import Proposals, filter_proposals
from .threads import check_threads, default_threads

__all__ = ["UPN", "UPNConfig", "upn_input_size", "load_upn_state_dict", "convert_upn", "to_proposals", "PROMPTS",
           "DTYPES"]

PROMPTS = ("fine_grained_prompt", "coarse_grained_prompt")
DTYPES = ("float32", "bfloat16", "int8")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHORT_SIDE, MAX_SIDE = 800, 1333

_SWIN = "backbone.model.backbone."
_DEFAULT = object()   # "the constructor's setting" (None has a meaning of its own: skip the step)


@dataclass
class UPNConfig:
    """The UPN architecture (defaults: UPN-large, `detect_tools/upn/configs/upn_large.py`)."""
    embed: int = 192
    depths: Tuple[int, ...] = (2, 2, 18, 2)
    heads: Tuple[int, ...] = (6, 12, 24, 48)
    window: int = 12
    mlp_ratio: int = 4
    d_model: int = 256
    attn_heads: int = 8
    points: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    ffn: int = 2048
    queries: int = 900
    groups: int = 32
    temperature: float = 20.0

    def __post_init__(self):
        self.depths, self.heads = tuple(int(x) for x in self.depths), tuple(int(x) for x in self.heads)
        if len(self.depths) != 4 or len(self.heads) != 4:
            raise ValueError("UPN config: depths and heads need 4 entries (Swin stages)")
        if self.d_model != 256:
            raise ValueError(f"UPN config: d_model must be 256 (the decoder's sine embedding), got {self.d_model}")

    def to_meta(self) -> Dict[str, Any]:
        """The "upn_config" safetensors metadata (the reference config's names, as vlmfo1.testing.upn writes it)."""
        return {"model_type": "upn",
                "swin": {"embed_dim": self.embed, "depths": list(self.depths), "num_heads": list(self.heads),
                         "window_size": self.window, "patch_size": 4, "in_chans": 3, "mlp_ratio": float(self.mlp_ratio)},
                "d_model": self.d_model, "n_heads": self.attn_heads, "n_levels": 5, "n_points": self.points,
                "enc_layers": self.enc_layers, "dec_layers": self.dec_layers, "d_ffn": self.ffn,
                "num_queries": self.queries, "groupnorm_groups": self.groups,
                "position_embedding": {"num_pos_feats": self.d_model // 2, "temperatureH": self.temperature,
                                       "temperatureW": self.temperature, "normalize": True}}

    def swin_core(self, compute: int = 0) -> Dict[str, Any]:
        return dict(in_chans=3, patch=4, embed=self.embed, window=self.window, eps=1e-5, compute=compute,
                    depths=list(self.depths), heads=list(self.heads),
                    mlp_hidden=[self.mlp_ratio * (self.embed << s) for s in range(4)])

    def upn_core(self, compute: int = 0) -> Dict[str, Any]:
        return dict(d_model=self.d_model, heads=self.attn_heads, points=self.points, enc_layers=self.enc_layers,
                    dec_layers=self.dec_layers, ffn=self.ffn, queries=self.queries, groups=self.groups,
                    temperature=float(self.temperature), eps=1e-5, compute=compute)


def upn_input_size(width: int, height: int, size: int = SHORT_SIDE, max_size: Optional[int] = MAX_SIDE
                   ) -> Tuple[int, int]:
    """(width, height) the reference resizes a width x height image to (transforms/transform.py: resize with
    RandomResize([800], max_size=1333)): the short side becomes `size` unless the long side would exceed
    `max_size`, then the short side is int(round(max_size * short / long)); the long side is int(size * long / short)."""
    w, h = int(width), int(height)
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    if max_size is not None:
        mn, mx = float(min(w, h)), float(max(w, h))
        if mx / mn * size > max_size:
            size = int(round(max_size * mn / mx))
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------

def load_upn_state_dict(path: str) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]]]:
    """The tensors of a UPN checkpoint (name -> array; bf16 as uint16 bits) and the "upn_config" metadata if any.
    path: a .pth (torch.save zip, state dict under "model"), a .safetensors file, or a folder holding one of them."""
    sd, meta, _ = _load_state(path)
    return sd, meta


def _load_state(path: str):
    """load_upn_state_dict's (tensors, metadata) and name -> the tensor's identity on disk (vlmfo1.weight_cache:
    the file, and for a safetensors file the tensor's offset in it)."""
    from .weight_cache import checkpoint_identity, file_identity

    p = os.fspath(path)
    if os.path.isdir(p):
        found = sorted(f for f in os.listdir(p) if f.endswith((".safetensors", ".pth", ".pt")))
        if len(found) != 1:
            raise ValueError(f"{p}: expected exactly one .safetensors / .pth file in the folder, found {found}")
        p = os.path.join(p, found[0])
    if not os.path.exists(p):
        raise FileNotFoundError(f"UPN checkpoint not found: {p}")
    if p.endswith(".safetensors"):
        from .safetensors import Checkpoint, read_header
        meta = read_header(p).metadata or {}
        ck = Checkpoint(p)
        tensors = {name: ck.get(name) for name in ck.keys()}
        try:
            cfg = json.loads(meta["upn_config"]) if "upn_config" in meta else None
        except ValueError as e:
            raise ValueError(f"{p}: the 'upn_config' metadata is not JSON: {e}") from None
        if cfg is not None and not isinstance(cfg, dict):
            raise ValueError(f"{p}: the 'upn_config' metadata must be a JSON object")
        return tensors, cfg, checkpoint_identity(ck)
    from .torch_checkpoint import load_state_dict
    # Placeholders stand in for any non-tensor object the file holds beside the weights (e.g. training arguments):
    # nothing the file names is imported or called; the "model" entry must be a plain mapping of tensors.
    sd = load_state_dict(p, key="model", allow_placeholders=True)
    whole = file_identity(p)      # a torch.save zip: the file and the entry's name (no offset) identify a tensor

    def identify(name: str) -> Optional[Dict[str, Any]]:
        a = sd.get(name)
        if not isinstance(a, np.ndarray):
            return None
        return dict(whole, name=name, dtype=str(a.dtype), shape=[int(d) for d in a.shape], offset=None)
    return sd, None, identify


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
              np.dtype(np.uint16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def convert_upn(src: str, dst: str) -> UPNConfig:
    """Write a UPN checkpoint (e.g. upn_large.pth) as one safetensors file with the same tensor names (bf16 stays
    bf16) and its architecture in the "upn_config" metadata; the result memory-maps at load. Returns the config."""
    sd, meta = load_upn_state_dict(src)
    cfg = infer_config(sd, meta)
    core_tensors(sd, cfg)   # the whole checkpoint is checked before anything is written
    from .safetensors import save_file
    out = {}
    for name, a in sd.items():
        a = np.asarray(a)
        if a.dtype not in _ST_DTYPES:
            raise ValueError(f"UPN checkpoint: tensor {name} has dtype {a.dtype}, which the conversion does not keep")
        out[name] = (_ST_DTYPES[a.dtype], np.ascontiguousarray(a))
    tmp = os.fspath(dst) + ".partial"
    save_file(out, tmp, {"format": "pt", "upn_config": json.dumps(cfg.to_meta(), sort_keys=True)})
    os.replace(tmp, dst)
    return cfg


def _f32(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype == np.uint16:   # bf16 bits
        return (a.astype(np.uint32) << 16).view(np.float32)
    if a.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"UPN checkpoint: tensor {name} has dtype {a.dtype}, expected a float")
    return np.ascontiguousarray(a, dtype=np.float32)


def _count(names, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for n in names for m in [rx.match(n)] if m}
    if idx and idx != set(range(max(idx) + 1)):
        raise ValueError(f"UPN checkpoint: layers {sorted(idx)} are not numbered 0..{max(idx)} ({pattern})")
    return len(idx)


def infer_config(sd: Dict[str, np.ndarray], meta: Optional[Dict[str, Any]] = None) -> UPNConfig:
    """The architecture from the tensor shapes (UPN-large's fixed choices for what shapes cannot tell)."""
    def shape(name):
        if name not in sd:
            raise ValueError(f"not a UPN checkpoint: tensor {name!r} is missing")
        return tuple(sd[name].shape)

    base = _config_from_meta(meta) if meta else UPNConfig()
    names = list(sd)
    embed = shape(_SWIN + "patch_embed.proj.weight")[0]
    depths = tuple(_count(names, re.escape(_SWIN) + rf"layers\.{s}\.blocks\.(\d+)\.") for s in range(4))
    heads = tuple(shape(_SWIN + f"layers.{s}.blocks.0.attn.relative_position_bias_table")[1] if depths[s] else
                  base.heads[s] for s in range(4))
    L = shape(_SWIN + "layers.0.blocks.0.attn.relative_position_bias_table")[0]
    window = (int(round(L ** 0.5)) + 1) // 2
    if (2 * window - 1) ** 2 != L:
        raise ValueError(f"UPN checkpoint: relative position table of {L} rows is not (2w-1)^2")
    hidden = shape(_SWIN + "layers.0.blocks.0.mlp.fc1.weight")[0]
    if hidden % embed:
        raise ValueError("UPN checkpoint: the Swin MLP width is not a multiple of the embedding width")
    q, d = shape("transformer.tgt_embed.weight")
    return UPNConfig(embed=embed, depths=depths, heads=heads, window=window, mlp_ratio=hidden // embed, d_model=d,
                     attn_heads=base.attn_heads, points=base.points,
                     enc_layers=_count(names, r"transformer\.encoder\.layers\.(\d+)\."),
                     dec_layers=_count(names, r"transformer\.decoder\.layers\.(\d+)\."),
                     ffn=shape("transformer.decoder.layers.0.linear1.weight")[0],
                     queries=q, groups=base.groups, temperature=base.temperature)


def _config_from_meta(m: Dict[str, Any]) -> UPNConfig:
    """UPNConfig from the "upn_config" metadata (vlmfo1.testing.upn's layout: the reference config's names)."""
    try:
        sw, pe = m["swin"], m.get("position_embedding", {})
        if m.get("n_levels", 5) != 5 or pe.get("normalize", True) is not True or \
                pe.get("temperatureH", 20) != pe.get("temperatureW", 20) or sw.get("patch_size", 4) != 4 or \
                sw.get("in_chans", 3) != 3:
            raise ValueError("only 5 levels, 4x4 patches, 3 channels and a normalized sine embedding with one "
                             "temperature are supported")
        ratio = float(sw.get("mlp_ratio", 4))
        if ratio != int(ratio):
            raise ValueError(f"mlp_ratio {ratio} is not an integer")
        return UPNConfig(embed=int(sw["embed_dim"]), depths=tuple(sw["depths"]), heads=tuple(sw["num_heads"]),
                         window=int(sw["window_size"]), mlp_ratio=int(ratio), d_model=int(m["d_model"]),
                         attn_heads=int(m["n_heads"]), points=int(m["n_points"]), enc_layers=int(m["enc_layers"]),
                         dec_layers=int(m["dec_layers"]), ffn=int(m["d_ffn"]), queries=int(m["num_queries"]),
                         groups=int(m.get("groupnorm_groups", 32)), temperature=float(pe.get("temperatureH", 20)))
    except (KeyError, TypeError) as e:
        raise ValueError(f"UPN checkpoint: the 'upn_config' metadata is malformed ({type(e).__name__}: {e})") from None


def _expected_rel_index(ws: int) -> np.ndarray:
    y, x = np.divmod(np.arange(ws * ws), ws)
    return (y[:, None] - y[None, :] + ws - 1) * (2 * ws - 1) + (x[:, None] - x[None, :] + ws - 1)


def core_tensors(sd: Dict[str, np.ndarray], c: UPNConfig, lazy: bool = False,
                 origins: Optional[Tuple[Dict[str, str], Dict[str, str]]] = None
                 ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(swin, upn) name -> float32 array tables in the C core's names (csrc/swin.h, csrc/upn.h), shapes checked.
    lazy: a matrix that needs converting to float32 is a weight_cache.Deferred (made only when quantized and not
    cached); origins: two dicts that receive the core key -> state tensor name of every matrix (swin, upn)."""
    from .weight_cache import Deferred

    def raw(name, shape):
        if name not in sd:
            raise ValueError(f"not a UPN checkpoint: tensor {name!r} is missing")
        a = sd[name]
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"UPN checkpoint: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        return a

    def get(name, shape):
        return _f32(raw(name, shape), name)

    def mat(dst, key, name, shape):   # a matrix [n, prod(rest)]
        a = raw(name, shape)
        n, k = shape[0], int(np.prod(shape[1:]))
        if origins is not None:
            origins[0 if dst is sw else 1][key] = name
        if lazy and not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous):
            dst[key] = Deferred(lambda: _f32(a, name).reshape(n, k), (n, k), np.float32, (a,))
        else:
            dst[key] = _f32(a, name).reshape(n, k)

    def lin(dst, key, name, n, k, bias=True):
        mat(dst, key, name + ".weight", (n, k))
        if bias:
            dst[key + "_bias"] = get(name + ".bias", (n,))

    def norm(dst, key, name, n):
        dst[key] = get(name + ".weight", (n,))
        dst[key + "_bias"] = get(name + ".bias", (n,))

    sw: Dict[str, np.ndarray] = {}
    E, ws = c.embed, c.window
    mat(sw, "patch", _SWIN + "patch_embed.proj.weight", (E, 3, 4, 4))
    sw["patch_bias"] = get(_SWIN + "patch_embed.proj.bias", (E,))
    norm(sw, "patch_norm", _SWIN + "patch_embed.norm", E)
    rel_index = _expected_rel_index(ws)
    for s in range(4):
        C, I = E << s, c.mlp_ratio * (E << s)
        for j in range(c.depths[s]):
            p, q = _SWIN + f"layers.{s}.blocks.{j}.", f"layers.{s}.blocks.{j}."
            norm(sw, q + "norm1", p + "norm1", C)
            norm(sw, q + "norm2", p + "norm2", C)
            lin(sw, q + "qkv", p + "attn.qkv", 3 * C, C)
            lin(sw, q + "proj", p + "attn.proj", C, C)
            lin(sw, q + "fc1", p + "mlp.fc1", I, C)
            lin(sw, q + "fc2", p + "mlp.fc2", C, I)
            sw[q + "rel"] = get(p + "attn.relative_position_bias_table", ((2 * ws - 1) ** 2, c.heads[s])).reshape(-1)
            idx_name = p + "attn.relative_position_index"
            if idx_name in sd:   # a buffer: the C core computes it; a checkpoint with another one is refused
                if not np.array_equal(np.asarray(sd[idx_name]).astype(np.int64), rel_index):
                    raise ValueError(f"UPN checkpoint: {idx_name} is not Swin's relative position index")
        if s < 3:
            norm(sw, f"layers.{s}.merge_norm", _SWIN + f"layers.{s}.downsample.norm", 4 * C)
            lin(sw, f"layers.{s}.merge", _SWIN + f"layers.{s}.downsample.reduction", 2 * C, 4 * C, bias=False)
        norm(sw, f"norm{s}", _SWIN + f"norm{s}", C)

    up: Dict[str, np.ndarray] = {}
    d, F, Q = c.d_model, c.ffn, c.queries
    hlp = c.attn_heads * 5 * c.points
    for l in range(5):
        k = (E << l) if l < 4 else (E << 3) * 9
        shp = (d, E << l, 1, 1) if l < 4 else (d, E << 3, 3, 3)
        mat(up, f"neck.{l}", f"input_proj.{l}.0.weight", shp)
        up[f"neck.{l}_bias"] = get(f"input_proj.{l}.0.bias", (d,))
        norm(up, f"neck.{l}.gn", f"input_proj.{l}.1", d)
    up["level_embed"] = get("transformer.level_embed", (5, d)).reshape(-1)

    def msda(dst, key, name):
        lin(dst, key + ".offsets", name + ".sampling_offsets", 2 * hlp, d)
        lin(dst, key + ".weights", name + ".attention_weights", hlp, d)
        lin(dst, key + ".value", name + ".value_proj", d, d)
        lin(dst, key + ".out", name + ".output_proj", d, d)

    for i in range(c.enc_layers):
        p = f"transformer.encoder.layers.{i}."
        msda(up, f"enc.{i}", p + "self_attn")
        norm(up, f"enc.{i}.ln1", p + "norm1", d)
        norm(up, f"enc.{i}.ln2", p + "norm2", d)
        lin(up, f"enc.{i}.lin1", p + "linear1", F, d)
        lin(up, f"enc.{i}.lin2", p + "linear2", d, F)
    lin(up, "enc_output", "transformer.enc_output", d, d)
    norm(up, "enc_norm", "transformer.enc_output_norm", d)
    for k in range(3):
        lin(up, f"enc_box.{k}", f"transformer.enc_out_bbox_embed.layers.{k}", 4 if k == 2 else d, d)
        lin(up, f"box.{k}", f"bbox_embed.0.layers.{k}", 4 if k == 2 else d, d)
    up["prompt.fine"] = get("transformer.fine_grained_prompt.weight", (1, d)).reshape(d)
    up["prompt.coarse"] = get("transformer.coarse_grained_prompt.weight", (1, d)).reshape(d)
    up["tgt"] = get("transformer.tgt_embed.weight", (Q, d)).reshape(-1)
    for i in range(c.dec_layers):
        p = f"transformer.decoder.layers.{i}."
        msda(up, f"dec.{i}", p + "cross_attn")
        mat(up, f"dec.{i}.in_proj", p + "self_attn.in_proj_weight", (3 * d, d))
        up[f"dec.{i}.in_proj_bias"] = get(p + "self_attn.in_proj_bias", (3 * d,))
        lin(up, f"dec.{i}.out_proj", p + "self_attn.out_proj", d, d)
        for k in (1, 2, 3):
            norm(up, f"dec.{i}.ln{k}", p + f"norm{k}", d)
        lin(up, f"dec.{i}.lin1", p + "linear1", F, d)
        lin(up, f"dec.{i}.lin2", p + "linear2", d, F)
    lin(up, "ref_head.0", "transformer.decoder.ref_point_head.layers.0", d, 2 * d)
    lin(up, "ref_head.1", "transformer.decoder.ref_point_head.layers.1", d, d)
    norm(up, "dec_norm", "transformer.decoder.norm", d)
    # the shared box MLP is stored under every alias; they must agree
    for alias in [n for n in sd if re.match(r"(transformer\.decoder\.)?bbox_embed\.\d+\.layers\.\d\.", n)]:
        canon = re.sub(r"^(transformer\.decoder\.)?bbox_embed\.\d+\.", "bbox_embed.0.", alias)
        if canon in sd and not np.array_equal(np.asarray(sd[alias]), np.asarray(sd[canon])):
            raise ValueError(f"UPN checkpoint: {alias} differs from {canon} (the box head is shared)")
    return tuple({k: v if isinstance(v, Deferred) else np.ascontiguousarray(v) for k, v in t.items()}
                 for t in (sw, up))


# ---------------------------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------------------------

def _matrices_bf16(t: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """every 2-D (matmul) weight as bf16 bits (round to nearest even); vectors stay float32"""
    from .safetensors import f32_to_bf16_bits
    return {k: (f32_to_bf16_bits(v) if v.ndim == 2 else v) for k, v in t.items()}


def _rgb(image: Any):
    from PIL import Image
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 HxWx3 (or HxWx4 / HxW), got {a.dtype} {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB")


def preprocess(image: Any) -> Tuple[np.ndarray, Tuple[int, int]]:
    """(pixels float32 [3, h, w], (W, H) of the original image): the reference's resize, ToTensor and Normalize."""
    from PIL import Image
    im = _rgb(image)
    W, H = im.size
    w, h = upn_input_size(W, H)
    if (w, h) != (W, H):
        im = im.resize((w, h), Image.BILINEAR)
    x = np.asarray(im, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32), (W, H)


def postprocess(logits: np.ndarray, boxes: np.ndarray, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """(xyxy boxes float32 [Q, 4] in original pixels, scores float32 [Q]), sorted by score descending (stable)."""
    W, H = size
    scores = (np.float32(1) / (np.float32(1) + np.exp(-logits.astype(np.float32)))).astype(np.float32)
    b = boxes.astype(np.float32).copy()
    b[:, 0] = b[:, 0] - b[:, 2] / np.float32(2)
    b[:, 1] = b[:, 1] - b[:, 3] / np.float32(2)
    b[:, 2] = b[:, 0] + b[:, 2]
    b[:, 3] = b[:, 1] + b[:, 3]
    b *= np.asarray([W, H, W, H], dtype=np.float32)
    order = np.argsort(-scores, kind="stable")
    return b[order], scores[order]


def to_proposals(logits: np.ndarray, boxes: np.ndarray, size: Tuple[int, int], min_score: Optional[float] = 0.3,
                 nms_iou: Optional[float] = 0.8, max_boxes: Optional[int] = 100) -> Proposals:
    """The network's raw outputs -> the filtered proposals of an image of `size` (W, H): postprocess, then the
    reference's filter (None skips a step)."""
    b, s = postprocess(logits, boxes, size)
    return filter_proposals(Proposals(b.astype(np.float64), s.astype(np.float64)), min_score, nms_iou, max_boxes)


class UPN:
    """The UPN proposal network; calling it on an image gives the filtered proposals (a ProposalSource)."""

    def __init__(self, config: UPNConfig, state: Dict[str, np.ndarray], *, n_threads: Optional[int] = None,
                 dtype: str = "float32", prompt: str = "fine_grained_prompt", min_score: Optional[float] = 0.3,
                 nms_iou: Optional[float] = 0.8, max_boxes: Optional[int] = 100, path: Optional[str] = None,
                 cache_dir=None, source_identity: Optional[Callable[[str], Optional[Dict[str, Any]]]] = None):
        """dtype: the matmul weights in "float32" (the reference's numerics), "bfloat16" (bf16 weights and
        activations into the matmuls, fp32 accumulation: ~2x faster) or "int8" (per-channel int8 weights).
        cache_dir: where int8 weights are cached between loads (vlmfo1.weight_cache; None = the default folder,
        False = no cache); source_identity: state tensor name -> its identity on disk (from_pretrained gives it;
        without it, e.g. for arrays in memory, nothing is cached)."""
        from .weight_cache import check_cache_dir, origin

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        check_cache_dir(cache_dir)
        self.config, self.dtype = config, dtype
        self.n_threads = default_threads() if n_threads is None else check_threads(n_threads)
        self.prompt = self._check_prompt(prompt)
        self.min_score, self.nms_iou, self.max_boxes = min_score, nms_iou, max_boxes
        self.path = path
        names: Tuple[Dict[str, str], Dict[str, str]] = ({}, {})
        sw, up = core_tensors(state, config, lazy=dtype == "int8", origins=names)
        if dtype == "bfloat16":
            sw, up = _matrices_bf16(sw), _matrices_bf16(up)
        elif dtype == "int8":
            from .quant import quantize_matrices
            caches = [None if source_identity is None else origin(cache_dir, source_identity, n) for n in names]
            sw = quantize_matrices(sw, self.n_threads, cache=caches[0])
            up = quantize_matrices(up, self.n_threads, cache=caches[1])
        compute = int(dtype == "bfloat16")
        self._swin = core.SwinModel(config.swin_core(compute), sw)
        self._net = core.UPNModel(self._swin, config.upn_core(compute), up)
        # request state reused across calls: a thread pool and a scratch arena that only grows, one per thread in use
        self._idle: list = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _workspace(self):
        with self._lock:
            ws = self._idle.pop() if self._idle else None
        if ws is None:
            ws = core.Workspace(self.n_threads)
        try:
            yield ws
        finally:
            with self._lock:
                if len(self._idle) < 2:
                    self._idle.append(ws)

    @classmethod
    def from_pretrained(cls, path, **kw) -> "UPN":
        """kw: the constructor's options (n_threads, dtype, prompt, min_score, nms_iou, max_boxes, cache_dir)."""
        sd, meta, identify = _load_state(path)
        return cls(infer_config(sd, meta), sd, path=os.fspath(path), source_identity=identify, **kw)

    @staticmethod
    def _check_prompt(prompt: str) -> str:
        if prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
        return prompt

    def forward(self, pixels: np.ndarray, prompt: Optional[str] = None, taps: bool = False, select=None):
        """The raw network on preprocessed pixels [3, h, w]: (logits [Q], boxes [Q, 4] cxcywh normalized), plus a dict
        of intermediate tensors with taps=True (parity tests; `select` then replaces the top-Q token selection)."""
        p = PROMPTS.index(self._check_prompt(prompt or self.prompt))
        kw = {} if select is None else {"select": select}
        with self._workspace() as ws:
            return self._net.forward(pixels, prompt=p, n_threads=self.n_threads, taps=taps, workspace=ws, **kw)

    @property
    def seconds(self) -> Optional[Dict[str, float]]:
        """Wall time per stage of the last forward: backbone, neck, encoder, two_stage, decoder."""
        return self._net.seconds

    def predict(self, image: Any, prompt: Optional[str] = None) -> Dict[str, np.ndarray]:
        """Every query of one image: {"boxes": xyxy float32 [Q, 4] original pixels, "scores": float32 [Q]}, sorted by
        score descending (the reference's postprocess)."""
        pixels, size = preprocess(image)
        logits, boxes = self.forward(pixels, prompt)
        b, s = postprocess(logits, boxes, size)
        return {"boxes": b, "scores": s}

    def proposals(self, image: Any, *, prompt: Optional[str] = None, min_score: Any = _DEFAULT,
                  nms_iou: Any = _DEFAULT, max_boxes: Any = _DEFAULT) -> Proposals:
        """The filtered proposals (the reference's `filter` then `[:100]`). Omitted settings come from the
        constructor; None skips that step (no threshold, no NMS, no limit)."""
        pixels, size = preprocess(image)
        logits, boxes = self.forward(pixels, prompt)
        pick = lambda v, d: d if v is _DEFAULT else v   # noqa: E731
        return to_proposals(logits, boxes, size, pick(min_score, self.min_score), pick(nms_iou, self.nms_iou),
                            pick(max_boxes, self.max_boxes))

    def __call__(self, image: Any, image_id: Optional[Hashable] = None) -> Proposals:
        return self.proposals(image)

    def __repr__(self) -> str:
        c = self.config
        return (f"UPN(swin embed={c.embed} depths={list(c.depths)}, encoder x{c.enc_layers}, decoder x{c.dec_layers}, "
                f"{c.queries} queries, prompt={self.prompt!r}, min_score={self.min_score}, nms_iou={self.nms_iou}, "
                f"max_boxes={self.max_boxes}, n_threads={self.n_threads})")
