"""Preprocessing of the auxiliary (DaViT) image of VLM-FO1, and box mapping into its pixel space (NumPy + Pillow).

    proc = AuxImageProcessor.from_config(raw_config)        # reads aux_image_aspect_ratio from FO1's config.json
    pixel_values, info = proc(I)                             # I = the FO1-capped image (vlmfo1.image.fo1_global_resize)
    aux_boxes = boxes_to_aux(boxes_I, info["image_size"], info["aux_size"])

It reproduces the official vendored `CLIPImageProcessor` with FO1's `img_cfg` (spec fo1_architecture.md §1.4,
ERRATA E3/E4/E5):
  * `aux_image_aspect_ratio` = "dynamic": no resize (the image is used at its own size).
  * "dynamic_square": one Pillow resize to s x s, s from 384, 448, ..., 1024, 1280, 1536, 1792, 2048 minimising
    |s*s - W*H| (the first, i.e. smaller, candidate wins ties).
  * "squash" / "pad" (the official code treats every other string alike): one Pillow resize to exactly 768 x 768,
    aspect ratio ignored. Other strings are refused (vlmfo1.config_check.AUX_ASPECT_RATIOS names the allowed ones)
    instead of being squashed silently.
    `aux_image_size` has no effect in the reference (it only reaches an unused config field).
  Resizes are Pillow BICUBIC on the uint8 image (transformers' `resize` of a uint8 array). Then rescale
  `float32(float64(u8) * (1/255))` and normalize `(x - float32(mean)) / float32(std)` in float32 with the ImageNet
  mean/std, channel-first output [3, H_A, W_A].
Boxes (`adjust_bbox`): clamp to [0, W_I] x [0, H_I], then `(x * W_A) / W_I` and `(y * H_A) / H_I` in double, stored as
float32.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import numpy as np
from PIL import Image

from .config_check import AUX_ASPECT_RATIOS, check_aux_aspect_ratio
from .image import _as_rgb, _pil_resize, _resample_filter, normalize_lut

__all__ = ["AuxImageProcessor", "aux_aspect_ratio_from_config", "aux_target_size", "boxes_to_aux",
           "IMAGENET_MEAN", "IMAGENET_STD", "DYNAMIC_SQUARE_SIZES", "AUX_SQUASH_SIZE"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUX_SQUASH_SIZE = 768
DYNAMIC_SQUARE_SIZES = (384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024, 1280, 1536, 1792, 2048)


def aux_aspect_ratio_from_config(raw_config: Dict) -> str:
    """The aux resize mode the official loader ends up using for this config.json.

    The builder passes `config.aux_image_aspect_ratio` (no default: a config without it fails there, KeyError here)
    to `load_model`, but only when the aux tower was built with delay_load (the default). A config with
    `"delay_load": false` builds the tower eagerly with the class default "squash" and never reloads it.
    An unknown mode is a ConfigError (ValueError) naming the allowed ones (AUX_ASPECT_RATIOS)."""
    if not isinstance(raw_config, dict):
        raise TypeError("raw_config must be a dict (config.json)")
    return check_aux_aspect_ratio(raw_config)


def aux_target_size(width: int, height: int, aspect_ratio: str, size: Tuple[int, int] = (AUX_SQUASH_SIZE,
                    AUX_SQUASH_SIZE), candidate_sizes: Sequence[int] = DYNAMIC_SQUARE_SIZES) -> Tuple[int, int]:
    """(W_A, H_A) of the aux image for an input of width x height. size = (height, width) of the fixed resize."""
    width, height = int(width), int(height)
    if aspect_ratio == "dynamic":
        return width, height
    if aspect_ratio == "dynamic_square":
        area = width * height
        best, best_diff = candidate_sizes[0], float("inf")
        for s in candidate_sizes:
            diff = abs(s * s - area)
            if diff < best_diff:  # strict: ties keep the earlier (smaller) size
                best, best_diff = s, diff
        return int(best), int(best)
    return int(size[1]), int(size[0])


class AuxImageProcessor:
    """The DaViT image processor of VLM-FO1 for one image (see the module docstring)."""

    def __init__(self, aspect_ratio: str = "squash", size: Tuple[int, int] = (AUX_SQUASH_SIZE, AUX_SQUASH_SIZE),
                 resample: Any = Image.Resampling.BICUBIC, rescale_factor: float = 1 / 255,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 candidate_sizes: Sequence[int] = DYNAMIC_SQUARE_SIZES):
        if not isinstance(aspect_ratio, str) or aspect_ratio not in AUX_ASPECT_RATIOS:
            raise ValueError(f"aspect_ratio must be one of {', '.join(map(repr, AUX_ASPECT_RATIOS))}, got "
                             f"{aspect_ratio!r}")
        self.aspect_ratio = aspect_ratio
        self.size = (int(size[0]), int(size[1]))
        if min(self.size) <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.candidate_sizes = tuple(int(s) for s in candidate_sizes)
        if not self.candidate_sizes or min(self.candidate_sizes) <= 0:
            raise ValueError("candidate_sizes must be positive integers")
        self.resample = int(_resample_filter(resample))
        self.rescale_factor = float(rescale_factor)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 values")
        self._lut = np.ascontiguousarray(normalize_lut(self.rescale_factor, (self.image_mean, self.image_std)).T)

    @classmethod
    def from_config(cls, raw_config: Dict, **kw) -> "AuxImageProcessor":
        return cls(aspect_ratio=aux_aspect_ratio_from_config(raw_config), **kw)

    def target_size(self, width: int, height: int) -> Tuple[int, int]:
        return aux_target_size(width, height, self.aspect_ratio, self.size, self.candidate_sizes)

    def __call__(self, image: Any):
        """image: uint8 HxWx3 array, PIL image or path (vlmfo1.image.load_image rules) — the image I.

        Returns (pixel_values float32 C-contiguous [3, H_A, W_A], info) with info keys image_size (W_I, H_I),
        aux_size (W_A, H_A), scale (W_A / W_I, H_A / H_I) and aspect_ratio."""
        img = _as_rgb(image)
        h, w = img.shape[:2]
        tw, th = self.target_size(w, h)
        if self.aspect_ratio != "dynamic":  # do_resize: always resized, even to its own size (a Pillow copy)
            img = _pil_resize(img, tw, th, self.resample)
        vals = self._lut[img, np.arange(3)]              # [H_A, W_A, 3]
        pixel_values = np.ascontiguousarray(vals.transpose(2, 0, 1))
        info = {"image_size": (w, h), "aux_size": (tw, th), "scale": (tw / w, th / h),
                "aspect_ratio": self.aspect_ratio}
        return pixel_values, info


def boxes_to_aux(boxes, image_size: Tuple[int, int], aux_size: Tuple[int, int]) -> np.ndarray:
    """Official `adjust_bbox`: boxes [n, 4] (x1, y1, x2, y2) in I pixels -> float32 [n, 4] in aux pixels.

    Each coordinate is clamped to [0, W_I] (x) or [0, H_I] (y), then mapped as (x * W_A) / W_I in double precision
    and rounded once to float32. image_size = (W_I, H_I), aux_size = (W_A, H_A). No ordering / degeneracy check (as the
    reference); non-finite coordinates raise ValueError. The reference keeps only the first 100 boxes before this step
    (ERRATA E5); that policy belongs to the caller."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape [n, 4], got {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError("boxes contain NaN or inf")
    wi, hi = (float(v) for v in image_size)
    wa, ha = (float(v) for v in aux_size)
    if min(wi, hi, wa, ha) <= 0:
        raise ValueError(f"image_size {image_size} and aux_size {aux_size} must be positive")
    lim = np.array([wi, hi, wi, hi])
    b = np.maximum(0.0, np.minimum(lim, b))
    b = b * np.array([wa, ha, wa, ha]) / lim
    return b.astype(np.float32)
