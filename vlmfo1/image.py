"""Image loading and Qwen2.5-VL preprocessing for VLM-FO1 (standard library, NumPy and Pillow only).

The pipeline of one FO1 inference call (spec fo1_architecture.md §1.2-1.3, ERRATA E3/E4/E7):

    img = load_image(src)                       # uint8 HxWx3, Image.open(...).convert("RGB"), no EXIF rotation
    img, rx, ry = fo1_global_resize(img)        # official load_image min-28 rule, then the 2048 long-side cap
    pixel_values, grid_thw, info = QwenImageProcessor.from_pretrained(model_dir)(img)

`QwenImageProcessor` reproduces transformers' Qwen2VLImageProcessor (the slow / PIL path the official code uses)
bit for bit: smart_resize, ONE Pillow resize with the configured filter, rescale `float32(float64(u8) * (1/255))`,
normalize `(x - mean_f32) / std_f32` in float32, and the 2x2 merge-block patch order with the single frame
duplicated in time.

Colour conversion rules of `load_image` (they are Pillow's `Image.convert("RGB")`, which is what the official
`load_image` applies to every file, so a file decodes exactly as in the reference):
  * L / 1 / P / CMYK / YCbCr ... -> Pillow's RGB conversion.
  * RGBA / LA / PA / P with transparency -> the alpha channel is DROPPED (no compositing on white). Note: recent
    transformers (5.x) composites transparent images on white inside its own processor; the FO1 reference
    (transformers 4.50 + `.convert("RGB")` in `load_image`) drops alpha, and so do we.
  * 16-bit (I;16, I;16B, I;16L), 32-bit integer (I) and float (F) images: Pillow's conversion CLIPS the values
    to [0, 255] (it does not rescale), so typical 16-bit content saturates. That is what the reference sees, and it
    is the default here (`high_bit_depth="clip"`). `high_bit_depth="scale"` maps integer images from [0, 65535] to
    [0, 255] instead (`round(v * 255 / 65535)`, values outside clipped first); float images keep the Pillow rule.
  * NumPy arrays: uint8 only. HxW and HxWx1 are grayscale (replicated to 3 channels, like L -> RGB), HxWx3 is RGB,
    HxWx4 is RGBA (alpha dropped). Any strides / memory layout are accepted.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .constants import QWEN_PATCH_SIZE

try:
    from PIL import Image, ImageOps
except ImportError as exc:  # pragma: no cover - Pillow is a hard dependency of the image path
    raise ImportError("vlmfo1.image needs Pillow (pip install pillow)") from exc

__all__ = [
    "ImageDecodeError",
    "load_image",
    "ensure_min_size",
    "cap_long_side",
    "fo1_global_resize",
    "smart_resize",
    "QwenImageProcessor",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "FO1_DEFAULT_MIN_PIXELS",
    "FO1_DEFAULT_MAX_PIXELS",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Effective limits when preprocessor_config.json has no min_pixels / max_pixels (ERRATA E4): the transformers
# version FO1 pins builds `size` from the class defaults 56*56 and 28*28*1280 and ignores both the JSON `size` dict and
# the min/max values FO1 passes to from_pretrained.
FO1_DEFAULT_MIN_PIXELS = 56 * 56          # 3,136
FO1_DEFAULT_MAX_PIXELS = 28 * 28 * 1280   # 1,003,520

MIN_SIDE = 28          # official load_image / resize_shortest_edge_images_and_bboxes minimum side
FO1_MAX_SIZE = 2048    # official long-side cap (max_size=2048)


class ImageDecodeError(OSError, ValueError):
    """A file or PIL image could not be decoded (truncated, corrupt, unsupported). Both an OSError and a ValueError."""


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------

_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _scale_high_bit_depth(im: "Image.Image") -> np.ndarray:
    """Integer image -> uint8 grayscale by mapping [0, 65535] to [0, 255] (round half up; inputs clipped)."""
    a = np.asarray(im)
    if a.ndim != 2:  # pragma: no cover - Pillow's I modes are single-band
        raise ValueError(f"unexpected array shape {a.shape} for mode {im.mode}")
    a = np.clip(a.astype(np.int64), 0, 65535)
    g = ((a * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def _pil_to_rgb_array(im: "Image.Image", high_bit_depth: str) -> np.ndarray:
    try:
        im.load()  # decode now: truncated / corrupt data raises here (LOAD_TRUNCATED_IMAGES is left untouched)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow raises these for broken streams
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    if im.width <= 0 or im.height <= 0:
        raise ValueError(f"image has zero size {im.width}x{im.height}")
    if high_bit_depth == "scale" and im.mode in _INT_MODES:
        return _scale_high_bit_depth(im)
    if im.mode != "RGB":
        try:
            with warnings.catch_warnings():
                # "Palette images with Transparency expressed in bytes should be converted to RGBA images":
                # we drop transparency on purpose (reference behaviour).
                warnings.simplefilter("ignore", UserWarning)
                im = im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ImageDecodeError(f"cannot convert image of mode {im.mode!r} to RGB: {exc}") from exc
    a = np.array(im)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:  # pragma: no cover - defensive
        raise ValueError(f"unexpected decoded array {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        raise TypeError(f"image array must have dtype uint8, got {a.dtype} (convert it explicitly, e.g. "
                        "np.clip(x * 255, 0, 255).round().astype(np.uint8))")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    h, w, c = a.shape
    if h == 0 or w == 0:
        raise ValueError(f"image array has zero size: shape {a.shape}")
    if c == 1:
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[...] = a  # broadcast the gray channel (L -> RGB is a plain copy in Pillow too)
        return out
    if c == 3:
        return np.ascontiguousarray(a)
    if c == 4:
        return np.ascontiguousarray(a[:, :, :3])  # RGBA -> RGB drops alpha, as Image.convert("RGB")
    raise ValueError(f"image array must have 1, 3 or 4 channels, got {c} (shape {a.shape})")


def load_image(src: Any, apply_exif: bool = False, high_bit_depth: str = "clip") -> np.ndarray:
    """Load an image as a C-contiguous uint8 array HxWx3 (RGB).

    src: a path (str / os.PathLike), a PIL.Image.Image, or a uint8 NumPy array (HxW, HxWx1, HxWx3, HxWx4; any
    strides). Files are decoded by Pillow and converted with `Image.convert("RGB")` exactly as the official
    `load_image` does (see the module docstring for the per-mode rules and `high_bit_depth`).
    apply_exif: apply `ImageOps.exif_transpose` (files and PIL images only). Off by default, like the reference.

    Raises FileNotFoundError (missing path), ImageDecodeError (an OSError and ValueError: unreadable, truncated or
    corrupt data), TypeError (unsupported object or array dtype), ValueError (bad array shape, zero size).
    """
    if high_bit_depth not in ("clip", "scale"):
        raise ValueError(f"high_bit_depth must be 'clip' or 'scale', got {high_bit_depth!r}")
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src)
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise FileNotFoundError(f"image file not found: {path}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"image path is a directory: {path}")
        try:
            with Image.open(path) as im:
                if apply_exif:
                    im.load()
                    im = ImageOps.exif_transpose(im)
                return _pil_to_rgb_array(im, high_bit_depth)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"cannot decode image file {path}: {exc}") from exc.__cause__
        except Image.DecompressionBombError as exc:
            raise ValueError(f"image file {path} is too large for Pillow's safety limit: {exc}") from exc
        except (OSError, SyntaxError, EOFError, ValueError) as exc:  # UnidentifiedImageError is an OSError;
            # Pillow's parsers raise ValueError too while Image.open reads the header (a PNG with a truncated IHDR)
            raise ImageDecodeError(f"cannot read image file {path}: {exc}") from exc
    if isinstance(src, Image.Image):
        if apply_exif:
            try:
                src.load()
            except (OSError, ValueError, SyntaxError, EOFError) as exc:
                raise ImageDecodeError(f"cannot decode image: {exc}") from exc
            src = ImageOps.exif_transpose(src)
        return _pil_to_rgb_array(src, high_bit_depth)
    if isinstance(src, (bytes, bytearray, memoryview)):
        raise TypeError("raw bytes are not accepted; pass a path, a PIL.Image or a uint8 array")
    raise TypeError(f"unsupported image source of type {type(src).__name__}; "
                    "expected a path, a PIL.Image.Image or a uint8 numpy array")


# --------------------------------------------------------------------------------------------------------------------
# FO1 global resizing (official mm_utils.load_image + resize_shortest_edge_images_and_bboxes)
# --------------------------------------------------------------------------------------------------------------------

def _resample_filter(resample: Any) -> "Image.Resampling":
    try:
        return Image.Resampling(int(resample))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"unknown PIL resample filter {resample!r}") from exc


def _pil_resize(img: np.ndarray, width: int, height: int, resample: Any = Image.Resampling.BICUBIC) -> np.ndarray:
    """uint8 HxWx3 -> uint8 height x width x 3 through Pillow (the reference's resampler, bit for bit)."""
    pil = Image.fromarray(np.ascontiguousarray(img))
    return np.array(pil.resize((int(width), int(height)), _resample_filter(resample)))


def _as_rgb(img: Any) -> np.ndarray:
    if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 \
            and img.shape[0] > 0 and img.shape[1] > 0:
        return img
    return load_image(img)


def ensure_min_size(img: Any, min_side: int = MIN_SIDE) -> np.ndarray:
    """Official `load_image` tail: if a side is < 28, resize to (max(28, W), max(28, H)) with Pillow's default filter
    for RGB (BICUBIC); the aspect ratio is NOT kept. The reference does not rescale boxes for this step."""
    img = _as_rgb(img)
    h, w = img.shape[:2]
    if w < min_side or h < min_side:
        return _pil_resize(img, max(min_side, w), max(min_side, h), Image.Resampling.BICUBIC)
    return img


def cap_long_side(img: Any, max_size: int = FO1_MAX_SIZE, min_side: int = MIN_SIDE):
    """Official `resize_shortest_edge_images_and_bboxes` without candidate sizes (ERRATA E4).

    If max(W, H) > max_size: s = max_size / max(W, H) (double), W' = int(W * s), H' = int(H * s) (truncation; the
    long side often comes out max_size - 1). Both sides are then clamped to >= min_side (always, as the reference).
    The image is resized with Pillow BICUBIC only if its size changed.
    Returns (image uint8 H'xW'x3, ratio_x = W'/W, ratio_y = H'/H); boxes map as x * ratio_x, y * ratio_y (double).
    """
    img = _as_rgb(img)
    h, w = img.shape[:2]
    new_h, new_w = h, w
    longest = max(new_h, new_w)
    if longest > max_size:
        scale = max_size / longest
        new_h, new_w = int(new_h * scale), int(new_w * scale)
    new_w = max(min_side, new_w)
    new_h = max(min_side, new_h)
    if (new_w, new_h) != (w, h):
        img = _pil_resize(img, new_w, new_h, Image.Resampling.BICUBIC)
    return img, new_w / w, new_h / h


def fo1_global_resize(img: Any, max_size: int = FO1_MAX_SIZE, min_side: int = MIN_SIDE):
    """`ensure_min_size` then `cap_long_side`: the image I that both FO1 encoders see.

    Returns (I, ratio_x, ratio_y). As in the reference, the ratios are those of the cap step only (relative to the
    image after the min-28 enlargement; the official code does not rescale boxes for that enlargement)."""
    return cap_long_side(ensure_min_size(img, min_side), max_size, min_side)


# --------------------------------------------------------------------------------------------------------------------
# smart_resize and the Qwen2-VL image processor
# --------------------------------------------------------------------------------------------------------------------

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 3136,
                 max_pixels: int = 12845056) -> tuple[int, int]:
    """transformers' `smart_resize` (qwen2_vl/image_processing_qwen2_vl.py), same float ops in the same order.

    round() is Python's round-half-to-even. Raises ValueError when a side is <= 0 or the aspect ratio exceeds 200
    (transformers raises the latter; a zero side would be a ZeroDivisionError there). Sides below `factor` are
    accepted as in transformers 5.x (4.50 raised; FO1 never passes them because of the min-28 enlargement).
    The floor branch keeps each side >= factor, as transformers 5.x does.
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)} "
            f"(height={height}, width={width})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar

def normalize_lut(rescale: Optional[float], mean_std=None) -> np.ndarray:
    """[3, 256] float32: the value of every (channel, uint8) pair with the reference's exact operations (ERRATA E3):
    float32(float64(u) * rescale), then (x - float32(mean)) / float32(std) in float32. None skips a step."""
    x = np.arange(256, dtype=np.uint8).astype(np.float64)
    if rescale is not None:
        x = x * rescale
    x = x.astype(np.float32)
    if mean_std is None:
        return np.stack([x, x, x])
    return np.stack([(x - np.float32(m)) / np.float32(s) for m, s in zip(*mean_std)]).astype(np.float32)


@dataclass
class QwenImageProcessor:
    """NumPy/Pillow port of transformers' Qwen2VLImageProcessor (slow path) for one image.

    The constructor defaults are transformers' class defaults (min 3,136 / max 1,003,520 pixels, patch 14,
    temporal patch 2, merge 2, OpenAI-CLIP mean/std, BICUBIC). Use `from_pretrained` for a checkpoint.
    """

    min_pixels: int = FO1_DEFAULT_MIN_PIXELS
    max_pixels: int = FO1_DEFAULT_MAX_PIXELS
    patch_size: int = QWEN_PATCH_SIZE
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN
    image_std: Sequence[float] = OPENAI_CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    _lut: np.ndarray = field(default=None, init=False, repr=False, compare=False)
    _lut_t: np.ndarray = field(default=None, init=False, repr=False, compare=False)
    _chan: np.ndarray = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
            setattr(self, name, int(v))
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 values")
        self.resample = int(_resample_filter(self.resample))
        self.rescale_factor = float(self.rescale_factor)
        self._lut = self._build_lut()
        self._lut_t = np.ascontiguousarray(self._lut.T)  # [256, 3]
        self._chan = np.arange(3, dtype=np.intp)

    # Value of every (channel, uint8) pair, computed with the reference's exact operations (ERRATA E3):
    # float32(float64(u) * rescale_factor), then (x - float32(mean)) / float32(std) in float32.
    def _build_lut(self) -> np.ndarray:
        return normalize_lut(self.rescale_factor if self.do_rescale else None,
                             (self.image_mean, self.image_std) if self.do_normalize else None)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, kind: str = "fo1", min_pixels: int | None = None,
                        max_pixels: int | None = None, default_min_pixels: int = FO1_DEFAULT_MIN_PIXELS,
                        default_max_pixels: int = FO1_DEFAULT_MAX_PIXELS,
                        honor_size_dict: bool | None = None) -> "QwenImageProcessor":
        """Read `preprocessor_config.json` (a checkpoint directory or the JSON file itself).

        Which keys bind depends on the checkpoint `kind`, i.e. on the transformers its reference runs:
          * "fo1" (default; the official FO1 code pins transformers 4.50.1, ERRATA E4): min = JSON `min_pixels` else
            3,136; max = JSON `max_pixels` else 1,003,520; a JSON `size` dict is IGNORED. (Its transformers also
            ignores the min/max FO1 passes in code, so do NOT pass FO1's 56*56 / 2048*2048 here for parity.)
          * "qwen" (stock Qwen2 / Qwen2.5-VL under transformers 5, `Qwen2VLImageProcessor.__init__`): start from the
            JSON `size` {shortest_edge, longest_edge} if present (it must then have both keys), else the class
            default {3,136, 1,003,520}; the JSON `min_pixels` / `max_pixels` keys, when present, override
            shortest_edge / longest_edge. transformers 5 writes only `size`, older writers wrote both.
        Explicit `min_pixels` / `max_pixels` arguments override both rules. `honor_size_dict` is the older spelling
        (True = "qwen", False = "fo1").
        """
        if honor_size_dict is not None:
            kind = "qwen" if honor_size_dict else "fo1"
        if kind not in ("fo1", "qwen"):
            raise ValueError(f"kind must be 'fo1' or 'qwen', got {kind!r}")
        p = os.fspath(path)
        cfg_path = os.path.join(p, "preprocessor_config.json") if os.path.isdir(p) else p
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"preprocessor_config.json not found: {cfg_path}")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {cfg_path}: {exc}") from exc
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object")

        lo, hi = default_min_pixels, default_max_pixels
        size = cfg.get("size")
        if kind == "qwen" and size is not None:
            if not isinstance(size, dict):
                raise ValueError(f"{cfg_path}: `size` must be a JSON object, got {size!r}")
            lo = size.get("shortest_edge", size.get("min_pixels"))
            hi = size.get("longest_edge", size.get("max_pixels"))
            if cfg.get("min_pixels") is not None:
                lo = cfg["min_pixels"]
            if cfg.get("max_pixels") is not None:
                hi = cfg["max_pixels"]
            if not lo or not hi:   # transformers 5 raises the same way
                raise ValueError(f"{cfg_path}: `size` dict must contain 'shortest_edge' and 'longest_edge' keys "
                                 f"but got {size}")
        if cfg.get("min_pixels") is not None:
            lo = cfg["min_pixels"]
        if cfg.get("max_pixels") is not None:
            hi = cfg["max_pixels"]
        if min_pixels is not None:
            lo = min_pixels
        if max_pixels is not None:
            hi = max_pixels

        kw: dict[str, Any] = {"min_pixels": lo, "max_pixels": hi}
        for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "resample",
                    "rescale_factor", "do_resize", "do_rescale", "do_normalize"):
            if cfg.get(key) is not None:
                kw[key] = cfg[key]
        return cls(**kw)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h̄, w̄) the processor resizes an image of this size to."""
        if not self.do_resize:
            return int(height), int(width)
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def __call__(self, image: Any):
        """image: anything `load_image` accepts (uint8 HxWx3 arrays are used as is).

        Returns (pixel_values float32 C-contiguous [N, 3*T*p*p] (N = gh*gw), grid_thw = (1, gh, gw) as a tuple of
        ints (transformers' image_grid_thw row), info dict).
        Rows are in 2x2 merge-block order (bh, bw, dy, dx); columns are (channel, t, y, x) with the frame repeated
        over t.
        """
        img = _as_rgb(image)
        h, w = img.shape[:2]
        rh, rw = self.resized_size(h, w)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        if rh % (p * m) or rw % (p * m):
            raise ValueError(f"image size {rh}x{rw} is not a multiple of patch_size*merge_size={p * m} "
                             "(set do_resize=True)")
        if self.do_resize:
            img = _pil_resize(img, rw, rh, self.resample)  # always, even for an unchanged size (as the reference)
        gh, gw = rh // p, rw // p
        # Rescale + normalize through the exact per-(channel, value) table: float32 HxWx3.
        vals = self._lut_t[img, self._chan]
        # (bh, dy, y, bw, dx, x, c) view -> (bh, bw, dy, dx, c, y, x), copied once with the frame repeated over t.
        v = vals.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        out = np.empty((gh // m, gw // m, m, m, 3, t, p, p), dtype=np.float32)
        out[...] = v[:, :, :, :, :, None]
        pixel_values = out.reshape(gh * gw, 3 * t * p * p)
        grid_thw = (1, gh, gw)
        info = {
            "input_size": (h, w),
            "resized_size": (rh, rw),
            "grid_thw": (1, gh, gw),
            "num_patches": gh * gw,
            "num_image_tokens": (gh // m) * (gw // m),
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
        }
        return pixel_values, grid_thw, info
