"""VLM-FO1's Hybrid Fine-grained Region Encoder (HFRE) and its projectors, over the C core.

    hfre = HFRE.from_checkpoint(ckpt, raw_config)
    boxes_a, boxes_q = map_boxes(boxes, image_size, aux_size, qwen_size)      # ERRATA E5
    F = hfre.region_features(vt_maps, aux_maps, boxes_a, boxes_q)              # [N, R] float32
    region_tokens = hfre.project_regions(F)                                    # mm_projector_aux
    image_tokens = hfre.project_image(merger_tokens)                           # mm_projector

Maps are channels-last float32: aux = the 4 DaViT stage maps [H_l, W_l, C_l] (C = 256, 512, 1024,
2048; level 0 the largest); vt = the ViT hidden states after the full-attention blocks, as the
core's [n_full, gh, gw, D] array or a list of [gh, gw, D] maps (with `qwen_hw=(H_q, W_q)`, the
Qwen-resized image size in pixels, also [gh*gw, D] rows or channel-first (D, gh, gw) views, as
VisionTower returns them; the maps are then checked against gh = H_q / patch, gw = W_q / patch). Only the last map
is read with SimpleFP. Boxes are x1, y1, x2, y2 float32 in aux pixels (A) and Qwen pixels (Q).

Configuration (config.json, the official names and defaults of omchat_arch.py / builder.py):
mm_roi_output_size (7), mm_region_hidden_size (required), mm_apply_position_embedding (True),
mm_pos_embedding_strategy ('bbox_based'), mm_use_vt_region_feature_only (False),
mm_use_vision_tower_region_feature (False), mm_region_feature_combination ('concat'),
mm_apply_region_layer_norm (False), mm_use_simpleFPN_for_vt (False), mm_projector_type ('linear'),
mm_projector_aux_type ('linear'), mm_hidden_size, hidden_size, vision_config.patch_size/hidden_size.
The flags choose the branches; the tensors under model.object_vp_extractor.*, model.mm_projector.*
and model.mm_projector_aux.* must match them exactly (missing -> KeyError, unexpected or mis-shaped
-> ValueError). Supported: combination 'concat' / 'concat_aux_pos' (and anything when the vt branch
is off), bbox PE; 'mean*', '*_sep_*' combinations, feature-map PE ('feature_map_based', 'hybrid')
and the cabstract / tokenpacker projectors raise NotImplementedError (dead code for FO1).

Numerics: fp32 throughout (`mode` does not change the HFRE: the official run's bf16 roundings of
maps, SimpleFP and the region vector are ERRATA E3 items an fp32 engine does not reproduce). bf16
weights are used as stored (compute='bf16' rounds GEMM inputs to bf16 like the official bf16 run).
Loader copies: ConvTranspose2d weights [in][out][2][2] are re-laid out once to [(a, b, out)][in]
(bias repeated 4x), 3x3 conv weights [out][in][3][3] to [(ky, kx, out)][in]; 1x1 convs are views.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ._native import core
from .aux_image import boxes_to_aux
from .config_check import check_hfre
from .constants import DAVIT_LARGE, QWEN_PATCH_SIZE
from .options import check_options
from .quant import quantize_checkpoint_matrices
from .safetensors import Checkpoint, weight
from .threads import default_threads
from .weight_cache import check_cache_dir, derive, lazy_weight

P_VP = "model.object_vp_extractor."
P_PROJ = "model.mm_projector."
P_PROJ_AUX = "model.mm_projector_aux."
AUX_DIMS = DAVIT_LARGE["dims"]             # hard-coded in omchat_arch.py
_SEP = ("concat_sep_pos", "mean_sep_pos", "concat_sep_no_vt_pos", "mean_sep_no_vt_pos")
_MEAN = ("mean", "mean_aux_pos")


@dataclass
class HFREConfig:
    roi_output_size: int = 7
    region_hidden_size: int = 5888
    apply_position_embedding: bool = True
    pos_embedding_strategy: str = "bbox_based"
    use_vt_region_feature_only: bool = False
    use_vision_tower_region_feature: bool = False
    region_feature_combination: str = "concat"
    apply_region_layer_norm: bool = False
    use_simple_fpn: bool = False
    projector_type: str = "linear"
    projector_aux_type: str = "linear"
    mm_hidden_size: Optional[int] = None
    hidden_size: Optional[int] = None
    patch_size: int = QWEN_PATCH_SIZE
    vt_hidden: int = 1280
    n_full: int = 4

    @classmethod
    def from_dict(cls, raw: Dict) -> "HFREConfig":
        """FO1's region-encoder keys of config.json, checked by vlmfo1.config_check (ConfigError, a ValueError,
        names the key; a missing mm_region_hidden_size is also a KeyError)."""
        return cls(**check_hfre(raw))


def _projector_layers(ptype: str, which: str) -> int:
    """Linear layer count of a projector type (0 = identity, -1 = a bare nn.Linear)."""
    if ptype == "linear":
        return -1
    if ptype == "identity":
        return 0
    if ptype in ("cabstract", "tokenpacker"):
        raise NotImplementedError(f"{which} type {ptype!r} (Honeybee C-Abstractor / TokenPacker) needs a fixed square "
                                  "token grid and is dead code for VLM-FO1; not supported")
    m = re.match(r"^mlp(\d+)x_gelu$", ptype)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ValueError(f"Unknown projector type: {ptype!r} ({which})")


def _plan(c: HFREConfig) -> Dict[str, int]:
    """Branch decisions of HFREModule.__call__ (the official code) -> the core's flags."""
    use_aux = not c.use_vt_region_feature_only
    use_vt = c.use_vision_tower_region_feature or c.use_vt_region_feature_only
    if c.use_vt_region_feature_only and not c.use_vision_tower_region_feature:
        raise ValueError("mm_use_vt_region_feature_only needs mm_use_vision_tower_region_feature (the official code "
                         "would call the vt branch without ViT features and crash)")
    if c.use_vt_region_feature_only:
        pe = 1 if c.apply_position_embedding else 0          # ERRATA E5: strategy not consulted
    else:
        comb = c.region_feature_combination
        if c.apply_position_embedding and c.pos_embedding_strategy in ("feature_map_based", "hybrid"):
            raise NotImplementedError(f"mm_pos_embedding_strategy {c.pos_embedding_strategy!r} (feature-map position "
                                      "embedding) is not supported; VLM-FO1 uses 'bbox_based'")
        if use_vt:
            if comb in _MEAN or comb in _SEP:
                raise NotImplementedError(f"mm_region_feature_combination {comb!r} is not supported (its hard-coded "
                                          "widths do not fit FO1); use 'concat' or 'concat_aux_pos'")
            if comb not in ("concat", "concat_aux_pos"):
                raise ValueError(f"unknown mm_region_feature_combination {comb!r}")
        pe = 0
        if (c.apply_position_embedding and comb not in _SEP
                and c.pos_embedding_strategy in ("bbox_based", "hybrid")):
            pe = 1 if (use_vt and comb not in ("concat_aux_pos", "mean_aux_pos")) else 2
    return dict(use_aux=int(use_aux), use_vt=int(use_vt), simple_fpn=int(use_vt and c.use_simple_fpn), pe=pe)


class _Tensors:
    """Checked access to a checkpoint prefix: shapes, dtype policy, bookkeeping of names used."""

    def __init__(self, ckpt: Checkpoint, dtype: Optional[str]):
        self.ckpt, self.dtype, self.used = ckpt, dtype, set()
        self.stored_bf16 = False
        self.quantized = dtype == "int8"
        self.names: Dict[str, str] = {}    # core key of each matrix -> its checkpoint tensor (the weight cache's key)

    def has(self, name):
        return name in self.ckpt

    def shape(self, name):
        if name not in self.ckpt:
            raise KeyError(f"checkpoint {getattr(self.ckpt, 'path', '')} is missing tensor '{name}'")
        return tuple(self.ckpt.info(name).shape)

    def get(self, name, shape=None, vector=False, lazy=False):
        shp = self.shape(name)
        if shape is not None and shp != tuple(shape):
            raise ValueError(f"tensor '{name}' has shape {shp}, expected {tuple(shape)}")
        a = lazy_weight(self.ckpt, name) if lazy else weight(self.ckpt, name, self.dtype, vector)
        self.used.add(name)
        self.stored_bf16 = self.stored_bf16 or a.dtype == np.uint16
        return a

    def matrix(self, key, name, shape, fn, out_shape):
        """The matrix fn(tensor `name` of `shape`) of out_shape (a re-laid-out copy) for t[key]; with int8 a Deferred
        made only if the weight cache misses (nothing is read here)."""
        self.names[key] = name
        return derive(self.get(name, shape, lazy=self.quantized), fn, out_shape, self.quantized)


def _load_projector(T: _Tensors, prefix: str, n_layers: int, k_in: Optional[int], n_out: Optional[int],
                    name: str, out: Dict[str, np.ndarray]) -> Tuple[int, int]:
    """Loads Linear / Sequential(Linear, GELU, Linear, ...) weights as <name>.<i>; returns (k_in, n_out)."""
    if n_layers == 0:
        extra = [k for k in T.ckpt.keys() if k.startswith(prefix)]
        if extra:
            raise ValueError(f"config.json's projector type is identity but the checkpoint has {', '.join(sorted(extra)[:4])}")
        return (k_in or 0), (k_in or 0)
    # 'linear' is a bare nn.Linear (weight, bias); mlp{k}x_gelu an nn.Sequential (0.*, 2.*, ...)
    if n_layers == -1 and not T.has(prefix + "weight") and T.has(prefix + "0.weight"):
        raise ValueError(f"{prefix}*: config.json's projector type is 'linear' but the checkpoint holds an MLP "
                         f"({prefix}0.weight)")
    if n_layers > 0 and not T.has(prefix + "0.weight") and T.has(prefix + "weight"):
        raise ValueError(f"{prefix}*: config.json's projector type is an MLP but the checkpoint holds a single "
                         f"Linear ({prefix}weight)")
    keys = ["weight"] if n_layers == -1 else [f"{2 * i}.weight" for i in range(n_layers)]
    n_layers = abs(n_layers)
    prev = k_in
    first_k = None
    for i, kw in enumerate(keys):
        wn, bn = prefix + kw, prefix + kw[:-len("weight")] + "bias"
        shp = T.shape(wn)
        if len(shp) != 2:
            raise ValueError(f"tensor '{wn}' has shape {shp}, expected a 2-D Linear weight")
        if prev is not None and shp[1] != prev:
            raise ValueError(f"tensor '{wn}' has shape {shp}: expected {prev} input features")
        if i == 0 and n_out is not None and shp[0] != n_out:
            raise ValueError(f"tensor '{wn}' has shape {shp}: expected {n_out} output features (hidden_size)")
        out[f"{name}.{i}"] = T.matrix(f"{name}.{i}", wn, shp, np.ascontiguousarray, shp)
        out[f"{name}.{i}_bias"] = T.get(bn, (shp[0],), vector=True)
        first_k = shp[1] if first_k is None else first_k
        prev = shp[0]
    names = {prefix + k for k in keys} | {prefix + k[:-len("weight")] + "bias" for k in keys}
    extra = [k for k in T.ckpt.keys() if k.startswith(prefix) and k not in names]
    if extra:
        raise ValueError(f"unexpected projector tensors (type has {n_layers} Linear layers): "
                         + ", ".join(sorted(extra)[:6]))
    return first_k, prev


class HFRE:
    def __init__(self, config: HFREConfig, core_cfg: Dict, tensors: Dict[str, np.ndarray], compute: str,
                 n_threads: int, proj_dims: Dict[str, Tuple[int, int]]):
        self.config, self.compute, self.n_threads = config, compute, n_threads
        self._cfg, self._tensors, self.proj_dims = core_cfg, tensors, proj_dims
        self.region_dim = core_cfg["R"]
        self._core = core.HFREModel(core_cfg, tensors)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, raw_config: Dict, mode: str = "exact", compute: Optional[str] = None,
                        dtype: Optional[str] = None, n_threads: Optional[int] = None,
                        aux_dims: Sequence[int] = AUX_DIMS, cache_dir=None) -> "HFRE":
        """aux_dims: DaViT stage widths, hard-coded to DaViT-large's (256, 512, 1024, 2048) by the
        official code; other values are for tests and other aux towers. cache_dir: where int8 weights are cached
        between loads (vlmfo1.weight_cache; None = the default folder, False = no cache)."""
        check_options(mode, dtype, compute)
        check_cache_dir(cache_dir)
        aux_dims = tuple(int(a) for a in aux_dims)
        if len(aux_dims) != 4 or min(aux_dims) <= 0:
            raise ValueError(f"aux_dims must be 4 positive widths, got {aux_dims}")
        c = HFREConfig.from_dict(raw_config)
        flags = _plan(c)
        n_img = _projector_layers(c.projector_type, "mm_projector_type")
        n_aux = _projector_layers(c.projector_aux_type, "mm_projector_aux_type")
        T = _Tensors(ckpt, dtype)
        t: Dict[str, np.ndarray] = {}
        R, S = c.region_hidden_size, c.roi_output_size
        if S < 1:
            raise ValueError(f"mm_roi_output_size must be >= 1, got {S}")
        D = c.vt_hidden
        F = 512
        fp = P_VP + "simple_fpn."
        has_fpn = any(k.startswith(fp) for k in ckpt.keys())
        if flags["simple_fpn"]:
            if not has_fpn:
                raise KeyError(f"mm_use_simpleFPN_for_vt is set but the checkpoint has no {fp}* tensors")
            F = T.shape(fp + "simfp_3.0.weight")[0]
            D2, D4 = D // 2, D // 4

            def ct(key, name, cin, cout):   # ConvTranspose2d [in][out][2][2] -> [(a, b, out)][in], bias x4
                t[key] = T.matrix(key, name + ".weight", (cin, cout, 2, 2), lambda w: np.ascontiguousarray(
                    w.transpose(2, 3, 1, 0).reshape(4 * cout, cin)), (4 * cout, cin))
                t[key + "_bias"] = np.tile(T.get(name + ".bias", (cout,), vector=True), 4)

            def conv(prefix, key, cin):
                t[key + ".c1"] = T.matrix(key + ".c1", prefix[0] + ".weight", (F, cin, 1, 1),
                                          lambda w: np.ascontiguousarray(w.reshape(F, cin)), (F, cin))
                t[key + ".ln1_w"] = T.get(prefix[0] + ".norm.weight", (F,), vector=True)
                t[key + ".ln1_b"] = T.get(prefix[0] + ".norm.bias", (F,), vector=True)
                t[key + ".c3"] = T.matrix(key + ".c3", prefix[1] + ".weight", (F, F, 3, 3), lambda w: (
                    np.ascontiguousarray(w.transpose(2, 3, 0, 1).reshape(9 * F, F))), (9 * F, F))
                t[key + ".ln3_w"] = T.get(prefix[1] + ".norm.weight", (F,), vector=True)
                t[key + ".ln3_b"] = T.get(prefix[1] + ".norm.bias", (F,), vector=True)

            ct("fpn0.ct1", fp + "simfp_1.0", D, D2)
            t["fpn0.ln0_w"] = T.get(fp + "simfp_1.1.weight", (D2,), vector=True)
            t["fpn0.ln0_b"] = T.get(fp + "simfp_1.1.bias", (D2,), vector=True)
            ct("fpn0.ct2", fp + "simfp_1.3", D2, D4)
            conv((fp + "simfp_1.4", fp + "simfp_1.5"), "fpn0", D4)
            ct("fpn1.ct1", fp + "simfp_2.0", D, D2)
            conv((fp + "simfp_2.1", fp + "simfp_2.2"), "fpn1", D2)
            conv((fp + "simfp_3.0", fp + "simfp_3.1"), "fpn2", D)
            conv((fp + "simfp_4.1", fp + "simfp_4.2"), "fpn3", D)
        elif has_fpn:
            raise ValueError(f"checkpoint has {fp}* tensors but config.json does not set mm_use_simpleFPN_for_vt"
                             + ("" if flags["use_vt"] else " (or the vt branch is off)"))
        Da = sum(aux_dims) if flags["use_aux"] else 0
        Dv = (4 * F if flags["simple_fpn"] else c.n_full * D) if flags["use_vt"] else 0
        if c.apply_region_layer_norm:
            if flags["use_aux"]:
                t["aux_ln_w"] = T.get(P_VP + "aux_region_norm.weight", (Da,), vector=True)
                t["aux_ln_b"] = T.get(P_VP + "aux_region_norm.bias", (Da,), vector=True)
            if c.use_vision_tower_region_feature:
                # exists whenever the vt branch is on; the vt-only path never applies it (ERRATA E5)
                w = T.get(P_VP + "vt_region_norm.weight", (Dv,), vector=True)
                b = T.get(P_VP + "vt_region_norm.bias", (Dv,), vector=True)
                if flags["use_aux"]:
                    t["vt_ln_w"], t["vt_ln_b"] = w, b
        extra = [k for k in ckpt.keys() if k.startswith(P_VP) and k not in T.used]
        if extra:
            raise ValueError("unexpected region-encoder tensors for this config.json: " + ", ".join(sorted(extra)[:6]))
        if Da + Dv != R:
            raise ValueError(f"config.json: mm_region_hidden_size is {R} but the configured branches give {Da + Dv} "
                             f"(aux {Da} + vt {Dv})")
        if flags["pe"] and R % 8:
            raise ValueError(f"the bbox position embedding needs mm_region_hidden_size % 8 == 0, got {R}")
        dims = {}
        dims["image"] = _load_projector(T, P_PROJ, n_img, c.mm_hidden_size, c.hidden_size, "proj_image", t)
        dims["aux"] = _load_projector(T, P_PROJ_AUX, n_aux, R, c.hidden_size, "proj_aux", t)
        if compute is None:
            compute = "bf16" if T.stored_bf16 else "f32"
        core_cfg = dict(S=S, R=R, vt_c=D, n_vt=c.n_full, fpn_c=F, patch=c.patch_size,
                        compute=1 if compute == "bf16" else 0, n_proj_image=abs(n_img), n_proj_aux=abs(n_aux),
                        **flags)
        for l, a in enumerate(aux_dims):
            core_cfg[f"aux_c{l}"] = a
        n_threads = int(n_threads or default_threads())
        if dtype == "int8":   # the re-laid-out convolutions are Deferred copies: their sources are evicted after
            quantize_checkpoint_matrices(t, ckpt, T.names, n_threads, cache_dir)
        return cls(c, core_cfg, t, compute, n_threads, dims)

    # ------------------------------------------------------------------ inference

    def _vt_list(self, vt_maps, qwen_hw):
        D, n = self._cfg["vt_c"], self._cfg["n_vt"]
        if isinstance(vt_maps, np.ndarray) and vt_maps.ndim == 4:
            maps = list(vt_maps)
        else:
            maps = list(vt_maps)
        if len(maps) != n:
            raise ValueError(f"expected {n} ViT maps (one per full-attention block), got {len(maps)}")
        out = []
        for i, m in enumerate(maps):
            m = np.asarray(m)
            if qwen_hw is not None:   # Qwen-resized image (H_q, W_q) in pixels -> patch grid
                hq, wq = (int(v) for v in qwen_hw)
                p = self._cfg["patch"]
                if hq <= 0 or wq <= 0 or hq % p or wq % p:
                    raise ValueError(f"qwen_hw {(hq, wq)} must be the Qwen-resized image size (H, W) in pixels, "
                                     f"multiples of the patch size {p}")
                gh, gw = hq // p, wq // p
                if m.ndim == 2 and m.shape == (gh * gw, D):
                    m = m.reshape(gh, gw, D)
                elif m.ndim == 3 and m.shape == (D, gh, gw) and m.shape != (gh, gw, D):
                    m = m.transpose(1, 2, 0)
                if m.shape != (gh, gw, D):
                    raise ValueError(f"ViT map {i} has shape {m.shape}, expected ({gh}, {gw}, {D}) for qwen_hw "
                                     f"{(hq, wq)}")
            if m.ndim != 3 or m.shape[2] != D:
                raise ValueError(f"ViT map {i} must be [gh, gw, {D}] channels-last, got shape {m.shape}")
            out.append(np.ascontiguousarray(m, dtype=np.float32))
        return out

    def check_boxes(self, boxes_aux, boxes_q):
        """-> (aux boxes or None, Qwen boxes or None, N): float32 [N, 4] each for the branches that are on."""
        ba = _check_boxes(boxes_aux, "boxes_aux") if self._cfg["use_aux"] else None
        bq = _check_boxes(boxes_q, "boxes_q") if self._cfg["use_vt"] else None
        if ba is not None and bq is not None and len(ba) != len(bq):
            raise ValueError(f"boxes_aux has {len(ba)} boxes but boxes_q has {len(bq)}")
        return ba, bq, len(ba) if ba is not None else len(bq)

    def region_features(self, vt_maps, aux_maps, boxes_aux, boxes_q, qwen_hw: Optional[Sequence[int]] = None,
                        check_finite: bool = True, workspace=None) -> np.ndarray:
        """Region vectors [N, R] float32 (before mm_projector_aux). N = 0 gives an empty [0, R] array
        (the official code would substitute a dummy box, but it never gets there: see spec §8.3).
        workspace: a vlmfo1._core.Workspace whose thread pool and scratch the call reuses (also for the
        projectors below)."""
        use_aux, use_vt = self._cfg["use_aux"], self._cfg["use_vt"]
        ba, bq, n = self.check_boxes(boxes_aux, boxes_q)
        aux = None
        if use_aux:
            aux = list(aux_maps)
            if len(aux) != 4:
                raise ValueError(f"expected the 4 DaViT stage maps, got {len(aux)}")
            for i, cdim in enumerate(self._cfg[f"aux_c{l}"] for l in range(4)):
                m = aux[i]
                if np.ndim(m) != 3 or np.shape(m)[2] != cdim:
                    raise ValueError(f"aux map {i} must be [H, W, {cdim}] channels-last, got shape {np.shape(m)}")
            if check_finite and not all(np.isfinite(m).all() for m in aux):
                raise ValueError("aux maps contain NaN or inf")
        vt = self._vt_list(vt_maps, qwen_hw) if use_vt else None
        if vt is not None and check_finite:
            used = vt[-1:] if self._cfg["simple_fpn"] else vt
            if not all(np.isfinite(m).all() for m in used):
                raise ValueError("ViT maps contain NaN or inf")
        if n == 0:
            return np.zeros((0, self.region_dim), np.float32)
        return self._core.regions(aux, vt, ba, bq, n_threads=self.n_threads, workspace=workspace)

    def _project(self, which: int, x: np.ndarray, name: str, workspace=None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        k = self.proj_dims[name][0]
        if x.ndim != 2 or (k and x.shape[1] != k):
            raise ValueError(f"{name} projector input must be [m, {k}], got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} projector input contains NaN or inf")
        if self._cfg["n_proj_image" if which == 0 else "n_proj_aux"] == 0:
            return x.copy()
        if x.shape[0] == 0:
            return np.zeros((0, self.proj_dims[name][1]), np.float32)
        return self._core.project(which, x, n_threads=self.n_threads, workspace=workspace)

    def project_regions(self, F: np.ndarray, workspace=None) -> np.ndarray:
        """mm_projector_aux: [N, R] -> [N, hidden]."""
        return self._project(1, F, "aux", workspace)

    def project_image(self, tokens: np.ndarray, workspace=None) -> np.ndarray:
        """mm_projector on the Qwen merger output: [M, mm_hidden_size] -> [M, hidden]."""
        return self._project(0, tokens, "image", workspace)


def _check_boxes(b, name: str) -> np.ndarray:
    a = np.asarray(b, dtype=np.float64) if not isinstance(b, np.ndarray) else b
    if a.ndim != 2 or a.shape[1] != 4:
        if a.size == 0:
            return np.zeros((0, 4), np.float32)
        raise ValueError(f"{name} must have shape [N, 4] (x1, y1, x2, y2), got {a.shape}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    if a.size and np.abs(a).max() > 1e7:
        raise ValueError(f"{name} has coordinates beyond +-1e7 px (RoIAlign's sample count grows with box size)")
    return a


def map_boxes(boxes_image_px, image_size: Tuple[int, int], aux_size: Tuple[int, int],
              qwen_size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """ERRATA E5 / mm_utils.adjust_bbox + encode_regions: boxes in pixels of the (capped) image I ->
    (aux-space boxes A, Qwen-space boxes Q), both float32 [N, 4]. Sizes are (width, height).

    x is clamped to [0, W_I] and y to [0, H_I], then x_A = (x * W_A) / W_I in double, rounded to
    float32; x_Q = x_A * float32(W_Q / W_A) in float32 (the ratio is a double quotient rounded to
    float32, as torch.tensor([...]) does)."""
    (wa, ha), (wq, hq) = ((int(v[0]), int(v[1])) for v in (aux_size, qwen_size))
    if min(wq, hq) <= 0:
        raise ValueError("image, aux and Qwen sizes must be positive (width, height)")
    a = boxes_to_aux(boxes_image_px, image_size, aux_size)     # clamp to I, then to aux pixels (checks the rest)
    ratio = np.array([wq / wa, hq / ha, wq / wa, hq / ha], np.float64).astype(np.float32)
    return a, (a * ratio).astype(np.float32)
