"""Proposal boxes for VLM-FO1: normalise every box form users have, filter them as the official UPN path does,
and read the proposals users already have on disk (NumPy and Pillow only).

VLM-FO1 answers by picking proposal regions by index, so every call needs a list of boxes in xyxy pixels of the
original image (spec fo1_architecture.md §1.1, §1.5). This module turns whatever the user holds into that list:

    props = as_boxes(boxes, box_format="xywh", scores=scores)       # -> Proposals (float64 [N,4] xyxy pixels)
    props = filter_proposals(props, min_score=0.3, nms_iou=0.8)     # the UPN filter of spec §7
    src = FO1EvalProposals("countbench_with_upn_score_0.3_0.8.json") # a ProposalSource
    props = src("path/to/image_12.jpg")                             # looked up by file name

Accepted box inputs (`as_boxes`): a list / tuple of 4-sequences, NumPy arrays of any int or float dtype, torch
tensors of any dtype including bfloat16 (duck-typed through `.detach()`, torch is never imported here),
`supervision.Detections` (duck-typed through `.xyxy` and `.confidence`), a list of COCO-style dicts
(`{"bbox": [x, y, w, h], "score": s}`), a `Proposals`, and an empty input.

Box formats: "xyxy" (default), "xywh" (COCO), "cxcywh", and the normalized variants "xyxyn", "xywhn", "cxcywhn"
(0..1 of the image width / height, which then must be given as `image_size=(width, height)`).

The UPN filter (`filter_proposals`, ChatRex `UPNWrapper.filter` followed by FO1's `[:100]`), in order:
  1. keep `score >= min_score`, compared in float32 (UPN scores are float32 sigmoid outputs);
  2. `nms` at IoU `nms_iou` with torchvision.ops.nms semantics, in float32 by default (see `nms`);
  3. cast the kept boxes to int32, i.e. truncation toward zero (`as_int=True`);
  4. re-sort by score descending with the reference's own call `np.argsort(scores)[::-1]`; the boxes are
     already in descending order after NMS, so this step can only permute equal scores (see `tie_order`);
  5. round the scores to 2 decimals in float32 (`round(np.float32, 2)`), stored as float64;
  6. keep the first `max_boxes` (100; FO1 builds features for the first 100 boxes only, ERRATA E5).
Deviation: when nothing survives, an empty `Proposals` is returned (the reference returns empty lists and its
caller then fails on `[0]`).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal, Optional, Protocol, Union, runtime_checkable

import numpy as np

__all__ = [
    "BOX_FORMATS",
    "open_proposals",
    "BoxFormatWarning",
    "ProposalsNotFoundError",
    "Proposals",
    "as_boxes",
    "nms",
    "filter_proposals",
    "ProposalSource",
    "FO1EvalProposals",
    "CocoJsonlProposals",
    "CocoResultsProposals",
    "CallableProposals",
]

BOX_FORMATS: tuple[str, ...] = ("xyxy", "xywh", "cxcywh", "xyxyn", "xywhn", "cxcywhn")
_NORMALIZED = {"xyxyn", "xywhn", "cxcywhn"}
MAX_PROPOSALS = 1_000_000   # boxes (or scores) one call accepts; more is refused before any conversion

ImageLike = Any  # a path (str / os.PathLike), a PIL.Image.Image or an HxWxC array
ImageSize = tuple[float, float]  # (width, height) in pixels


class BoxFormatWarning(UserWarning):
    """The boxes look like they are in another format than the one given (e.g. xywh passed as xyxy)."""


class ProposalsNotFoundError(KeyError):
    """A proposal source holds no entry for the requested image (a KeyError, hence a LookupError)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message (quoted)
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------------------------------
# Proposals and as_boxes
# ---------------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Proposals:
    """Proposal boxes for one image: `boxes` float64 [N, 4] xyxy in original-image pixels, `scores` float64 [N]
    or None. Region index i in the model's answer refers to `boxes[i]`."""

    boxes: np.ndarray
    scores: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"Proposals.boxes must have shape [N, 4] (xyxy pixels), got {boxes.shape}")
        if not np.all(np.isfinite(boxes)):
            raise ValueError("Proposals.boxes contains NaN or infinite values")
        self.boxes = np.ascontiguousarray(boxes)
        if self.scores is not None:
            scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
            if scores.shape[0] != boxes.shape[0]:
                raise ValueError(f"Proposals.scores has {scores.shape[0]} values for {boxes.shape[0]} boxes")
            if not np.all(np.isfinite(scores)):
                raise ValueError("Proposals.scores contains NaN or infinite values")
            self.scores = np.ascontiguousarray(scores)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        """np.asarray(proposals) is the [N, 4] xyxy box array, so code that takes box arrays takes a Proposals."""
        if copy is False and dtype is not None and np.dtype(dtype) != self.boxes.dtype:
            raise ValueError("a copy is needed to convert Proposals boxes to another dtype")
        out = self.boxes if dtype is None else self.boxes.astype(dtype, copy=False)
        return out.copy() if copy else out

    def __repr__(self) -> str:
        n = len(self)
        if self.scores is None:
            s = "scores=None"
        elif n:
            s = f"scores {self.scores.min():.3g}..{self.scores.max():.3g}"
        else:
            s = "scores=[]"
        if n:
            lo, hi = self.boxes.min(axis=0), self.boxes.max(axis=0)
            extent = f", extent x {lo[0]:.6g}..{hi[2]:.6g}, y {lo[1]:.6g}..{hi[3]:.6g}"
        else:
            extent = ""
        return f"Proposals({n} boxes xyxy px, {s}{extent})"

    def __getitem__(self, index: Any) -> "Proposals":
        """Select boxes by slice, index array or boolean mask (always returns a Proposals, never a row)."""
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1 if int(index) != -1 else None)
        return Proposals(self.boxes[index], None if self.scores is None else self.scores[index])

    def to_format(self, fmt: str, image_size: Optional[ImageSize] = None) -> np.ndarray:
        """The boxes as float64 [N, 4] in `fmt` (one of BOX_FORMATS); normalized formats need (width, height).
        The inverse of `as_boxes(..., box_format=fmt)`."""
        fmt = _check_format(fmt)
        b = self.boxes
        x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        if fmt in _NORMALIZED:
            w_img, h_img = _check_image_size(image_size, fmt)
            x1, x2, y1, y2 = x1 / w_img, x2 / w_img, y1 / h_img, y2 / h_img
        base = fmt.rstrip("n")
        if base == "xyxy":
            out = np.stack([x1, y1, x2, y2], axis=1)
        elif base == "xywh":
            out = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
        else:  # cxcywh
            out = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1)
        return np.ascontiguousarray(out, dtype=np.float64).reshape(-1, 4)

    def tolist(self) -> list[list[float]]:
        """The xyxy boxes as a list of [x1, y1, x2, y2] Python floats (the official `bbox_list`)."""
        return self.boxes.tolist()

    def filter(self, min_score: Optional[float] = 0.3, nms_iou: Optional[float] = 0.8,
               max_boxes: Optional[int] = 100, as_int: bool = True, **kwargs: Any) -> "Proposals":
        """`filter_proposals(self, ...)`: the UPN score threshold, NMS, int truncation and top-k."""
        return filter_proposals(self, min_score=min_score, nms_iou=nms_iou, max_boxes=max_boxes, as_int=as_int,
                                **kwargs)


def _check_format(fmt: Any) -> str:
    if not isinstance(fmt, str) or fmt.lower() not in BOX_FORMATS:
        raise ValueError(f"unknown box_format {fmt!r}; valid formats are {', '.join(BOX_FORMATS)} "
                         "(the ones ending in 'n' are normalized to 0..1 of image_size=(width, height))")
    return fmt.lower()


def _check_image_size(image_size: Any, fmt: str) -> tuple[float, float]:
    if image_size is None:
        raise ValueError(f"box_format {fmt!r} is normalized (0..1): pass image_size=(width, height) in pixels")
    try:
        w, h = (float(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height) in pixels, got {image_size!r}") from None
    if not (np.isfinite(w) and np.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"image_size must be two positive numbers (width, height), got {image_size!r}")
    return w, h


def _is_torch_tensor(obj: Any) -> bool:
    return hasattr(obj, "detach") and hasattr(obj, "cpu") and not isinstance(obj, np.ndarray)


def _is_detections(obj: Any) -> bool:
    return hasattr(obj, "xyxy") and not isinstance(obj, (np.ndarray, Mapping, Proposals))


def _to_numeric_array(obj: Any, what: str, expected: str) -> np.ndarray:
    """obj (list, NumPy array, torch tensor) -> a float64 ndarray, with TypeError/ValueError that say what was
    expected."""
    if _is_torch_tensor(obj):
        arr = obj.detach().cpu().float().numpy()  # bfloat16 / float16 / ints -> float32, no torch import
    else:
        if isinstance(obj, Sized) and not isinstance(obj, np.ndarray) and len(obj) > MAX_PROPOSALS:
            raise ValueError(f"{what} holds {len(obj)} entries; at most {MAX_PROPOSALS} are accepted")
        try:
            arr = np.asarray(obj)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"{what} must be {expected}; got a ragged sequence ({e})") from None
        except OverflowError:   # a Python int beyond every NumPy integer and float64
            raise ValueError(f"{what} must be {expected} of numbers within float64 range; got an integer too large "
                             f"to convert") from None
        except RecursionError:
            raise ValueError(f"{what} must be {expected}; got a sequence nested too deeply") from None
    if arr.dtype == object or arr.dtype.kind in "USV":  # None, strings, ... inside the sequence
        bad = _first_non_number(obj)
        if isinstance(bad, int) and not isinstance(bad, bool):
            raise ValueError(f"{what} must be {expected} of numbers within float64 range; got an integer of "
                             f"{bad.bit_length()} bits")
        if bad is not _NO_BAD_ELEMENT:
            shown = repr(str(bad)[:60]) if isinstance(bad, str) else _describe_value(bad)
            raise TypeError(f"{what} must be {expected} of numbers; got an element that is not a number: {shown}")
        try:
            arr = arr.astype(np.float64)
        except OverflowError:
            raise ValueError(f"{what} must be {expected} of numbers within float64 range; got an integer too large "
                             f"to convert") from None
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be {expected} of numbers; got dtype {arr.dtype}") from None
    if arr.ndim >= 1 and arr.shape[0] > MAX_PROPOSALS:
        raise ValueError(f"{what} holds {arr.shape[0]} entries; at most {MAX_PROPOSALS} are accepted")
    if arr.dtype.kind not in "iuf":  # bool, complex, datetime ...
        raise TypeError(f"{what} must be {expected} of numbers; got dtype {arr.dtype}")
    return arr.astype(np.float64)


_NO_BAD_ELEMENT = object()


def _describe_value(x: Any) -> str:
    try:
        r = repr(x)
    except Exception:  # noqa: BLE001 - a repr that fails says nothing useful either
        r = f"<{type(x).__name__}>"
    return r if len(r) <= 80 else r[:77] + "..."


def _first_non_number(obj: Any) -> Any:
    """The first element of a nested sequence that is not a real number (None, a string, ...), or
    _NO_BAD_ELEMENT."""
    stack = [obj]
    while stack:
        x = stack.pop(0)
        if isinstance(x, (str, bytes)) or x is None or not isinstance(x, Iterable):
            if isinstance(x, (str, bytes, bool)) or x is None:
                return x
            try:
                float(x)
            except (TypeError, ValueError, OverflowError):
                return x
        else:
            stack.extend(x)
    return _NO_BAD_ELEMENT


def _coco_dicts_to_arrays(items: Sequence[Mapping]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    boxes, scores = [], []
    for i, d in enumerate(items):
        if not isinstance(d, Mapping):
            raise TypeError(f"a list of COCO-style dicts must hold only dicts; item {i} is {type(d).__name__}")
        if "bbox" not in d:
            raise ValueError(f"COCO-style dict {i} has no 'bbox' key (keys: {sorted(map(str, d))[:8]}); "
                             "expected {'bbox': [x, y, w, h], 'score': s, ...}")
        boxes.append(d["bbox"])
        scores.append(d.get("score"))
    n_scored = sum(s is not None for s in scores)
    if 0 < n_scored < len(scores):
        raise ValueError(f"{n_scored} of {len(scores)} COCO-style dicts have a 'score': give it for all or none")
    box_arr = _to_numeric_array(boxes, "COCO 'bbox' values", "a list of [x, y, w, h]")
    score_arr = _to_numeric_array(scores, "COCO 'score' values", "numbers") if n_scored else None
    return box_arr, score_arr


def _warn_if_suspicious(raw: np.ndarray, fmt: str, stacklevel: int) -> None:
    """BoxFormatWarning when the values look like another format than `fmt`."""
    if raw.shape[0] == 0:
        return
    base = fmt.rstrip("n")
    if base == "xyxy":
        inverted = (raw[:, 2] < raw[:, 0]) | (raw[:, 3] < raw[:, 1])
        if inverted.mean() > 0.5:
            warnings.warn(f"{int(inverted.sum())} of {raw.shape[0]} boxes have x2 < x1 or y2 < y1 for "
                          f"box_format={fmt!r}: are they [x, y, w, h] (box_format='xywh') or "
                          "[cx, cy, w, h] ('cxcywh')?", BoxFormatWarning, stacklevel=stacklevel)
    else:
        negative = (raw[:, 2] < 0) | (raw[:, 3] < 0)
        if negative.mean() > 0.5:
            warnings.warn(f"{int(negative.sum())} of {raw.shape[0]} boxes have a negative width or height for "
                          f"box_format={fmt!r}: are they [x1, y1, x2, y2] (box_format='xyxy')?",
                          BoxFormatWarning, stacklevel=stacklevel)
    peak = float(np.max(np.abs(raw)))
    if fmt in _NORMALIZED:
        if peak > 1.5:
            warnings.warn(f"box_format={fmt!r} is normalized to 0..1 but the values reach {peak:.6g}: are they "
                          f"pixels (box_format={base!r})?", BoxFormatWarning, stacklevel=stacklevel)
    elif peak <= 1.0 and peak > 0:
        warnings.warn(f"all box values are within [-1, 1] for the pixel format {fmt!r}: are they normalized "
                      f"(box_format={fmt + 'n'!r} with image_size=(width, height))?",
                      BoxFormatWarning, stacklevel=stacklevel)


def _to_xyxy_pixels(raw: np.ndarray, fmt: str, image_size: Optional[ImageSize]) -> np.ndarray:
    a0, a1, a2, a3 = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
    base = fmt.rstrip("n")
    if base == "xyxy":
        x1, y1, x2, y2 = a0, a1, a2, a3
    elif base == "xywh":
        x1, y1, x2, y2 = a0, a1, a0 + a2, a1 + a3
    else:  # cxcywh, in UPN's order: x1 = cx - w/2, then x2 = x1 + w (ChatRex UPNWrapper.postprocess)
        x1, y1 = a0 - a2 / 2, a1 - a3 / 2
        x2, y2 = x1 + a2, y1 + a3
    if fmt in _NORMALIZED:  # convert in normalized space, then scale (the order UPN uses)
        w_img, h_img = _check_image_size(image_size, fmt)
        x1, x2, y1, y2 = x1 * w_img, x2 * w_img, y1 * h_img, y2 * h_img
    return np.stack([x1, y1, x2, y2], axis=1)


def as_boxes(boxes: Any, box_format: Optional[str] = None, image_size: Optional[ImageSize] = None,
             scores: Any = None) -> Proposals:
    """Normalise `boxes` to a Proposals (float64 [N, 4] xyxy in original-image pixels, optional float64 scores).

    boxes: list/tuple of 4-sequences, NumPy array [N, 4] (any int/float dtype), torch tensor [N, 4] (any dtype,
        incl. bfloat16), supervision.Detections (xyxy; its `confidence` becomes the scores), a list of COCO-style
        dicts ({"bbox": ..., "score": ...}), a Proposals, or an empty input (0 boxes).
    box_format: one of BOX_FORMATS. None means "xyxy", except for COCO-style dicts where it means "xywh" (COCO's
        bbox layout). Detections and Proposals are xyxy pixels by definition; another format is an error.
    image_size: (width, height) in pixels; required by the normalized formats, unused otherwise.
    scores: [N] (or [N, 1]) per-box scores; when given they replace scores carried by `boxes`.

    Raises TypeError for non-numeric input, ValueError for a bad shape, NaN/inf, an unknown format or a score
    count that does not match. Warns (BoxFormatWarning) when the values look like another format.
    """
    fmt = _check_format(box_format) if box_format is not None else None
    carried_scores: Optional[np.ndarray] = None

    if isinstance(boxes, Proposals) or _is_detections(boxes):
        kind = "a Proposals" if isinstance(boxes, Proposals) else "supervision.Detections"
        if fmt not in (None, "xyxy"):
            raise ValueError(f"{kind} already holds xyxy pixel boxes; box_format={fmt!r} cannot apply")
        fmt = "xyxy"
        if isinstance(boxes, Proposals):
            raw, carried_scores = boxes.boxes, boxes.scores
        else:
            raw = _to_numeric_array(boxes.xyxy, "Detections.xyxy", "an [N, 4] array")
            conf = getattr(boxes, "confidence", None)
            if conf is not None:
                carried_scores = _to_numeric_array(conf, "Detections.confidence", "an [N] array")
    elif isinstance(boxes, (list, tuple)) and len(boxes) > 0 and isinstance(boxes[0], Mapping):
        raw, carried_scores = _coco_dicts_to_arrays(boxes)
        fmt = fmt or "xywh"
    elif isinstance(boxes, Mapping):
        raise TypeError("got a single dict: pass a list of COCO-style dicts [{'bbox': [x, y, w, h], ...}], or the "
                        "box list itself (e.g. record['bbox_list'])")
    elif boxes is None:
        raise TypeError("boxes is None: pass [N, 4] boxes (an empty list means no boxes)")
    elif isinstance(boxes, (str, bytes)):
        raise TypeError(f"boxes must be [N, 4] numbers, got a string {boxes[:40]!r}")
    else:
        raw = _to_numeric_array(boxes, "boxes", "an [N, 4] array / list of [x1, y1, x2, y2]")
    fmt = fmt or "xyxy"

    if raw.size == 0:
        raw = raw.reshape(0, 4)
    if raw.ndim == 1 and raw.shape[0] == 4:
        raise ValueError(f"boxes has shape {raw.shape}: expected [N, 4]; for a single box pass [[x1, y1, x2, y2]] "
                         f"(in box_format {fmt!r})")
    if raw.ndim != 2 or raw.shape[1] != 4:
        hint = " (a batch of images? pass one image's boxes)" if raw.ndim == 3 else ""
        raise ValueError(f"boxes has shape {raw.shape}: expected [N, 4] in box_format {fmt!r}{hint}")
    if not np.all(np.isfinite(raw)):
        bad = np.argwhere(~np.isfinite(raw))[0]
        raise ValueError(f"boxes contains NaN or infinite values (first at box {bad[0]}, coordinate {bad[1]})")

    if scores is not None:
        score_arr = _to_numeric_array(scores, "scores", "an [N] sequence")
    else:
        score_arr = carried_scores
    if score_arr is not None:
        if score_arr.ndim == 2 and score_arr.shape[1] == 1:
            score_arr = score_arr[:, 0]
        if score_arr.size == 0:
            score_arr = score_arr.reshape(0)
        if score_arr.ndim != 1:
            raise ValueError(f"scores has shape {score_arr.shape}: expected [N] (one score per box)")
        if score_arr.shape[0] != raw.shape[0]:
            raise ValueError(f"got {score_arr.shape[0]} scores for {raw.shape[0]} boxes: expected one score per box")
        if not np.all(np.isfinite(score_arr)):
            raise ValueError("scores contains NaN or infinite values")

    _warn_if_suspicious(raw, fmt, stacklevel=3)
    xyxy = raw.copy() if fmt == "xyxy" else _to_xyxy_pixels(raw, fmt, image_size)
    return Proposals(xyxy, None if score_arr is None else score_arr.copy())


# ---------------------------------------------------------------------------------------------------------------
# NMS and the UPN filter
# ---------------------------------------------------------------------------------------------------------------

_NMS_BLOCK = 256  # rows of the IoU matrix computed at once (memory: 256 x N values)


def nms(boxes: Any, scores: Any, iou_threshold: float, *, dtype: Any = np.float64) -> np.ndarray:
    """Indices (int64) of the boxes kept by greedy non-maximum suppression, in decreasing score order:
    torchvision.ops.nms semantics (its CPU kernel), in `dtype` arithmetic.

      * order: a STABLE sort by score descending, so among equal scores the earlier input box wins;
      * a box is suppressed when its IoU with an already kept box is > iou_threshold (strictly);
      * IoU = inter / (area_i + area_j - inter) with area = (x2 - x1) * (y2 - y1): no +1 pixel offsets;
        0/0 (two empty boxes) is NaN and suppresses nothing;
      * the IoU is computed in `dtype` (torchvision: the tensor's dtype, float32 for UPN) and compared with the
        threshold in float64, as C++ promotes `float > double`. This matters at the boundary: an IoU of exactly
        8/10 is 0.800000012 in float32 (suppressed at 0.8) but 0.8 in float64 (kept).
    boxes: [N, 4] xyxy; scores: [N].
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"nms dtype must be float32 or float64, got {dt}")
    b = np.asarray(boxes, dtype=dt).reshape(-1, 4)
    s = np.asarray(scores, dtype=dt).reshape(-1)
    if b.shape[0] != s.shape[0]:
        raise ValueError(f"nms: {b.shape[0]} boxes but {s.shape[0]} scores")
    n = b.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-s, kind="stable")  # -s is exact, so this is a stable descending sort
    b = b[order]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    thr = float(iou_threshold)
    zero = dt.type(0)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    # Rows in blocks of _NMS_BLOCK: the [block, N] "IoU > thr" matrix is computed vectorised (the same float ops,
    # in the same order, as the torchvision kernel), then the greedy pass walks the block's rows in score order.
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, n, _NMS_BLOCK):
            rows = slice(start, min(start + _NMS_BLOCK, n))
            w = np.maximum(zero, np.minimum(x2[rows, None], x2[None, :]) - np.maximum(x1[rows, None], x1[None, :]))
            h = np.maximum(zero, np.minimum(y2[rows, None], y2[None, :]) - np.maximum(y1[rows, None], y1[None, :]))
            inter = w * h
            ovr = inter / (areas[rows, None] + areas[None, :] - inter)
            over = ovr.astype(np.float64) > thr  # C++ compares float > double in double; NaN > thr is False
            for r, i in enumerate(range(rows.start, rows.stop)):
                if suppressed[i]:
                    continue
                keep.append(i)
                suppressed[i + 1:] |= over[r, i + 1:]
    return order[np.asarray(keep, dtype=np.int64)].astype(np.int64)


def filter_proposals(props: Any, min_score: Optional[float] = 0.3, nms_iou: Optional[float] = 0.8,
                     max_boxes: Optional[int] = 100, as_int: bool = True, *,
                     precision: Literal["float32", "float64"] = "float32",
                     tie_order: Literal["reference", "stable"] = "reference") -> Proposals:
    """The official UPN proposal filter (spec §7; ChatRex UPNWrapper.filter, then FO1's `[:100]`).

    props: a Proposals with scores (or anything `as_boxes` accepts that carries scores), boxes xyxy pixels.
    Steps, in order (None skips a step):
      1. keep score >= min_score (compared in `precision`: UPN's scores are float32);
      2. nms(boxes, scores, nms_iou) with torchvision semantics (see `nms`), in `precision` arithmetic;
      3. as_int: boxes -> int32 by truncation toward zero (of the `precision`-cast boxes, as the reference casts
         its float32 tensor); as_int=False keeps the input float64 boxes;
      4. re-sort by score descending. tie_order="reference" uses the reference's call
         `np.argsort(scores)[::-1]` (NumPy's default unstable sort, reversed; for <= 16 boxes equal scores come out
         in reverse NMS order); "stable" keeps the NMS order (equal scores: earlier input box first);
      5. round the scores to 2 decimals in `precision` (`np.round`, half to even on score*100), returned as
         float64 (e.g. float32 0.79 -> 0.7900000214576721, as in the official eval files);
      6. keep the first max_boxes.
    Input order matters only among equal scores (the reference's input was sorted by torch.argsort).
    Returns an empty Proposals when nothing survives (the reference returns empty lists).
    """
    if not isinstance(props, Proposals):
        props = as_boxes(props)
    if props.scores is None:
        raise ValueError("filter_proposals needs a score per box: pass as_boxes(boxes, scores=...)")
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    if tie_order not in ("reference", "stable"):
        raise ValueError(f"tie_order must be 'reference' or 'stable', got {tie_order!r}")
    if nms_iou is not None and not 0.0 <= float(nms_iou) <= 1.0:
        raise ValueError(f"nms_iou must be in [0, 1], got {nms_iou!r}")
    if max_boxes is not None and int(max_boxes) < 0:
        raise ValueError(f"max_boxes must be >= 0 or None, got {max_boxes!r}")
    dt = np.dtype(precision)
    boxes = props.boxes
    scores_c = props.scores.astype(dt)
    idx = np.arange(len(props))
    if min_score is not None:
        idx = idx[scores_c >= dt.type(min_score)]
    if nms_iou is not None and idx.size:
        idx = idx[nms(boxes[idx].astype(dt), scores_c[idx], float(nms_iou), dtype=dt)]
    out_boxes = boxes[idx].astype(dt).astype(np.int32).astype(np.float64) if as_int else boxes[idx]
    out_scores = scores_c[idx]
    if tie_order == "reference":
        order = np.argsort(out_scores)[::-1]
    else:
        order = np.argsort(-out_scores, kind="stable")
    out_boxes, out_scores = out_boxes[order], out_scores[order]
    out_scores = np.round(out_scores, 2).astype(np.float64)
    if max_boxes is not None:
        out_boxes, out_scores = out_boxes[: int(max_boxes)], out_scores[: int(max_boxes)]
    return Proposals(out_boxes, out_scores)


# ---------------------------------------------------------------------------------------------------------------
# Proposal sources
# ---------------------------------------------------------------------------------------------------------------

@runtime_checkable
class ProposalSource(Protocol):
    """Anything that gives the proposals of one image: `source(image, image_id=None) -> Proposals`.
    image: a path, a PIL image or an array; image_id: an optional key (file name or dataset id) that takes
    precedence over the image for the lookup."""

    def __call__(self, image: ImageLike, image_id: Optional[Hashable] = None) -> Proposals: ...


def _image_name(image: ImageLike) -> Optional[str]:
    """The file name (basename) that identifies `image`, or None for in-memory images without one."""
    if isinstance(image, (str, os.PathLike)):
        return os.path.basename(os.fspath(image))
    filename = getattr(image, "filename", None)  # PIL images opened from a file
    if isinstance(filename, (str, os.PathLike)) and os.fspath(filename):
        return os.path.basename(os.fspath(filename))
    return None


def _image_size_of(image: ImageLike) -> ImageSize:
    """(width, height) of a path, PIL image or HxW[xC] array (a path is opened lazily, not decoded)."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image
        with Image.open(image) as im:
            return float(im.size[0]), float(im.size[1])
    size = getattr(image, "size", None)
    if isinstance(size, tuple) and len(size) == 2:  # PIL
        return float(size[0]), float(size[1])
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) in (2, 3):
        return float(shape[1]), float(shape[0])
    raise TypeError(f"cannot tell the size of an image of type {type(image).__name__}: pass image_size=")


def _not_found(what: str, key: Any, source: str, known: Iterable[Any]) -> ProposalsNotFoundError:
    sample = []
    for k in known:
        sample.append(repr(k))
        if len(sample) == 5:
            break
    return ProposalsNotFoundError(f"{source}: no proposals for {what} {key!r} (known keys include "
                                  f"{', '.join(sample) or 'none: the file is empty'})")


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid {what} JSON file ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a valid {what} JSON file (not UTF-8 text: {e})") from None


def _record_proposals(boxes: Any, scores: Any, where: str, box_format: str = "xyxy") -> Proposals:
    """as_boxes with the file / record named in any error (the box errors point at the data file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BoxFormatWarning)  # stored data: the format is known
            return as_boxes(boxes, box_format=box_format, scores=scores)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


class FO1EvalProposals:
    """The official CountBench / PixmoCount proposal files (`*_with_upn_score_0.3_0.8.json`): a JSON list of
    {"image": "image_0.jpg", "bboxes": [[x1, y1, x2, y2], ...], "scores": [...] (CountBench only), "question",
    "answer"}. Looked up by the image's file name (basename of the path given, or `image_id`). The file is read
    once, on the first lookup."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = os.fspath(path)
        self._by_name: Optional[dict[str, Proposals]] = None

    def _load(self) -> dict[str, Proposals]:
        if self._by_name is not None:
            return self._by_name
        data = _read_json(self.path, "FO1 eval")
        if not isinstance(data, list):
            raise ValueError(f"{self.path}: expected a JSON list of {{'image', 'bboxes', ...}} records, "
                             f"got a {type(data).__name__}")
        by_name: dict[str, Proposals] = {}
        for i, rec in enumerate(data):
            where = f"{self.path}: record {i}"
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or "bboxes" not in rec:
                raise ValueError(f"{where}: expected {{'image': str, 'bboxes': [[x1, y1, x2, y2], ...], "
                                 f"'scores': [...]}}, got {_describe(rec)}")
            name = os.path.basename(rec["image"])
            if name in by_name:
                raise ValueError(f"{where}: image {name!r} appears twice; the file name cannot identify it")
            by_name[name] = _record_proposals(rec["bboxes"], rec.get("scores"), f"{where} ({name})")
        self._by_name = by_name
        return by_name

    def keys(self) -> list[str]:
        return list(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, (str, os.PathLike)) and os.path.basename(os.fspath(key)) in self._load()

    def __call__(self, image: ImageLike = None, image_id: Optional[Hashable] = None) -> Proposals:
        by_name = self._load()
        if image_id is not None:
            key = os.path.basename(os.fspath(image_id) if isinstance(image_id, os.PathLike) else str(image_id))
        else:
            key = _image_name(image)
        if key is None:
            raise ValueError(f"{self.path}: an in-memory image has no file name; pass image_id='image_K.jpg'")
        if key not in by_name:
            raise _not_found("image", key, self.path, by_name)
        return by_name[key]

    def __repr__(self) -> str:
        n = "not read yet" if self._by_name is None else f"{len(self._by_name)} images"
        return f"FO1EvalProposals({self.path!r}, {n})"


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:8]}"
    return f"a {type(obj).__name__}"


def _int_id(key: Any) -> Optional[int]:
    """An integer image id from an int or a COCO-style file stem: '000000532481.jpg' -> 532481,
    'COCO_val2014_000000000042.jpg' -> 42 (the digits after the last underscore)."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, (str, os.PathLike)):
        m = re.search(r"(?:^|_)(\d+)$", os.path.splitext(os.path.basename(os.fspath(key)))[0])
        if m:
            return int(m.group(1))
    return None


class CocoJsonlProposals:
    """The official COCO proposal file (spec §6.2, `cocoVal2017_with_upn_score_0.3_0.8.jsonl`): one JSON object per
    line with `id` (COCO image id), `image` (file name), `bbox_list` (xyxy pixels) and `score_list`.
    Looked up by `image_id` (the COCO id, or a file name) or by the image's file name; a COCO-style name whose stem
    is the id ('000000532481.jpg') also resolves through the id. Read once, on the first lookup."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = os.fspath(path)
        self._by_id: Optional[dict[int, Proposals]] = None
        self._by_name: dict[str, Proposals] = {}

    def _load(self) -> dict[int, Proposals]:
        if self._by_id is not None:
            return self._by_id
        by_id: dict[int, Proposals] = {}
        by_name: dict[str, Proposals] = {}
        with open(self.path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}: line {lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not a JSON object ({e})") from None
                if (not isinstance(rec, dict) or "bbox_list" not in rec or not isinstance(rec.get("id"), int)
                        or isinstance(rec.get("id"), bool)):
                    raise ValueError(f"{where}: expected {{'id': int, 'image': str, 'bbox_list': [[x1, y1, x2, y2], "
                                     f"...], 'score_list': [...]}}, got {_describe(rec)}")
                image_id = int(rec["id"])
                if image_id in by_id:
                    raise ValueError(f"{where}: image id {image_id} appears twice")
                props = _record_proposals(rec["bbox_list"], rec.get("score_list"), f"{where} (id {image_id})")
                by_id[image_id] = props
                if isinstance(rec.get("image"), str):
                    by_name[os.path.basename(rec["image"])] = props
        self._by_id, self._by_name = by_id, by_name
        return by_id

    def keys(self) -> list[int]:
        return list(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: Any) -> bool:
        try:
            self._lookup(key)
        except (ProposalsNotFoundError, ValueError):
            return False
        return True

    def _lookup(self, key: Any) -> Proposals:
        by_id = self._load()
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if int(key) in by_id:
                return by_id[int(key)]
            raise _not_found("image id", int(key), self.path, by_id)
        if isinstance(key, (str, os.PathLike)):
            name = os.path.basename(os.fspath(key))
            if name in self._by_name:
                return self._by_name[name]
            as_id = _int_id(name)
            if as_id is not None and as_id in by_id:
                return by_id[as_id]
            raise _not_found("image", name, self.path, list(self._by_name) or by_id)
        raise TypeError(f"image_id must be a COCO image id (int) or a file name, got {type(key).__name__}")

    def __call__(self, image: ImageLike = None, image_id: Optional[Hashable] = None) -> Proposals:
        if image_id is not None:
            return self._lookup(image_id)
        name = _image_name(image)
        if name is None:
            raise ValueError(f"{self.path}: an in-memory image has no file name; pass image_id=<COCO image id>")
        return self._lookup(name)

    def __repr__(self) -> str:
        n = "not read yet" if self._by_id is None else f"{len(self._by_id)} images"
        return f"CocoJsonlProposals({self.path!r}, {n})"


class CocoResultsProposals:
    """A COCO detection-results file (a JSON list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"}),
    grouped per image id and sorted by score descending (stable: equal scores keep file order); category ids are
    dropped (VLM-FO1 assigns the classes).

    score_threshold: keep detections with score >= it (None keeps all).
    annotations: an optional COCO annotation file (instances_*.json) that maps file names to image ids; it also
    fixes the image set, so an image listed there without detections gets 0 boxes instead of an error.
    Lookup: `image_id` (an int id or a file name), else the image's file name through `annotations`, else a
    COCO-style file stem ('000000532481.jpg' or 'COCO_val2014_000000000042.jpg').
    Files are read once, on the first lookup."""

    def __init__(self, path: Union[str, os.PathLike], score_threshold: Optional[float] = None,
                 annotations: Union[str, os.PathLike, None] = None) -> None:
        self.path = os.fspath(path)
        self.score_threshold = score_threshold
        self.annotations = None if annotations is None else os.fspath(annotations)
        self._by_id: Optional[dict[int, Proposals]] = None
        self._name_to_id: dict[str, int] = {}
        self._known_ids: Optional[set[int]] = None

    def _load(self) -> dict[int, Proposals]:
        if self._by_id is not None:
            return self._by_id
        data = _read_json(self.path, "COCO results")
        if not isinstance(data, list):
            raise ValueError(f"{self.path}: expected a JSON list of {{'image_id', 'category_id', 'bbox', 'score'}} "
                             f"detections, got {_describe(data)}")
        groups: dict[int, tuple[list[Any], list[Any]]] = {}
        for i, det in enumerate(data):
            if (not isinstance(det, dict) or "bbox" not in det or "score" not in det
                    or not isinstance(det.get("image_id"), int) or isinstance(det.get("image_id"), bool)):
                raise ValueError(f"{self.path}: detection {i}: expected {{'image_id': int, 'category_id': int, "
                                 f"'bbox': [x, y, w, h], 'score': float}}, got {_describe(det)}")
            g = groups.setdefault(det["image_id"], ([], []))
            g[0].append(det["bbox"])
            g[1].append(det["score"])
        by_id: dict[int, Proposals] = {}
        for image_id, (boxes, scores) in groups.items():
            props = _record_proposals(boxes, scores, f"{self.path}: image_id {image_id}", box_format="xywh")
            keep = np.argsort(-props.scores, kind="stable")
            if self.score_threshold is not None:
                keep = keep[props.scores[keep] >= float(self.score_threshold)]
            by_id[image_id] = props[keep]
        if self.annotations is not None:
            ann = _read_json(self.annotations, "COCO annotation")
            images = ann.get("images") if isinstance(ann, dict) else None
            if not isinstance(images, list):
                raise ValueError(f"{self.annotations}: expected a COCO annotation file with an 'images' list")
            for j, im in enumerate(images):
                if not isinstance(im, dict) or not isinstance(im.get("id"), int) or "file_name" not in im:
                    raise ValueError(f"{self.annotations}: images[{j}]: expected {{'id': int, 'file_name': str}}, "
                                     f"got {_describe(im)}")
                self._name_to_id[os.path.basename(str(im["file_name"]))] = im["id"]
            self._known_ids = set(self._name_to_id.values())
        self._by_id = by_id
        return by_id

    def keys(self) -> list[int]:
        """Image ids with at least one detection (before score_threshold)."""
        return list(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def _resolve_id(self, key: Any) -> int:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return int(key)
        if isinstance(key, (str, os.PathLike)):
            name = os.path.basename(os.fspath(key))
            if name in self._name_to_id:
                return self._name_to_id[name]
            if self.annotations is not None:
                raise _not_found("image file", name, self.annotations, self._name_to_id)
            as_id = _int_id(name)
            if as_id is not None:
                return as_id
            raise ProposalsNotFoundError(f"{self.path}: cannot tell the COCO image id of {name!r}: pass image_id= "
                                         "or annotations= (a COCO annotation file mapping file names to ids)")
        raise TypeError(f"image_id must be a COCO image id (int) or a file name, got {type(key).__name__}")

    def __call__(self, image: ImageLike = None, image_id: Optional[Hashable] = None) -> Proposals:
        by_id = self._load()
        if image_id is not None:
            key = image_id
        else:
            key = _image_name(image)
            if key is None:
                raise ValueError(f"{self.path}: an in-memory image has no file name; pass image_id=<COCO image id>")
        iid = self._resolve_id(key)
        if iid in by_id:
            return by_id[iid]
        if self._known_ids is not None and iid in self._known_ids:
            return Proposals(np.zeros((0, 4)), np.zeros(0))  # a known image with no detections
        raise _not_found("image id", iid, self.path, by_id)

    def __repr__(self) -> str:
        n = "not read yet" if self._by_id is None else f"{len(self._by_id)} images"
        return f"CocoResultsProposals({self.path!r}, {n})"


class CallableProposals:
    """Wrap a function `fn(image) -> boxes` (or `(boxes, scores)`, a Proposals, or supervision.Detections) as a
    ProposalSource: the bring-your-own-detector hook.

    box_format: the format `fn` returns (default xyxy pixels). For the normalized formats the image size is taken
    from the image itself (path, PIL image or array) unless image_size is given.
    pass_image_id: call `fn(image, image_id)` instead of `fn(image)`.
    """

    def __init__(self, fn: Callable[..., Any], box_format: Optional[str] = None,
                 image_size: Optional[ImageSize] = None, pass_image_id: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"CallableProposals needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.box_format = None if box_format is None else _check_format(box_format)
        self.image_size = image_size
        self.pass_image_id = pass_image_id

    def __call__(self, image: ImageLike, image_id: Optional[Hashable] = None) -> Proposals:
        out = self.fn(image, image_id) if self.pass_image_id else self.fn(image)
        boxes, scores = out, None
        if isinstance(out, tuple) and len(out) == 2 and _looks_like_boxes_and_scores(out):
            boxes, scores = out
        size = self.image_size
        if size is None and self.box_format in _NORMALIZED:
            size = _image_size_of(image)
        return as_boxes(boxes, box_format=self.box_format, image_size=size, scores=scores)

    def __repr__(self) -> str:
        return f"CallableProposals({getattr(self.fn, '__qualname__', self.fn)!r})"


def _ndim(obj: Any) -> int:
    if _is_detections(obj) or isinstance(obj, Proposals):
        return 2
    nd = getattr(obj, "ndim", None)
    if isinstance(nd, int):
        return nd
    try:
        return int(np.ndim(obj))
    except Exception:  # ragged: let as_boxes report it
        return -1


def _looks_like_boxes_and_scores(pair: tuple) -> bool:
    """(boxes [N, 4], scores [N] or [N, 1]) rather than a tuple of two boxes: the first element is 2-D (or
    empty) and the second 1-D (or a column)."""
    first, second = pair
    n_first, n_second = _ndim(first), _ndim(second)
    first_ok = n_first == 2 or (n_first == 1 and len(first) == 0)
    second_ok = n_second == 1 or (n_second == 2 and tuple(getattr(second, "shape", np.shape(second)))[-1:] == (1,))
    return first_ok and second_ok


def open_proposals(path: Union[str, os.PathLike], **kw: Any) -> ProposalSource:
    """The proposal source for a file on disk, by its layout: `*.jsonl` -> CocoJsonlProposals (the official COCO
    file); a JSON list of {"image", "bboxes", ...} -> FO1EvalProposals (CountBench / PixmoCount); a JSON list of
    {"image_id", "bbox", "score", ...} -> CocoResultsProposals (kw: score_threshold, annotations)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"proposals file not found: {path}")
    if path.endswith(".jsonl"):
        return CocoJsonlProposals(path)
    data = _read_json(path, "proposals")
    first = data[0] if isinstance(data, list) and data else None
    if isinstance(first, dict) and "bboxes" in first and "image" in first:
        return FO1EvalProposals(path)
    if isinstance(first, dict) and "bbox" in first and "image_id" in first:
        return CocoResultsProposals(path, **kw)
    raise ValueError(f"{path}: not a proposals file this reader knows (a .jsonl COCO proposal file, a list of "
                     f"{{'image', 'bboxes'}} records, or a list of COCO results {{'image_id', 'bbox', 'score'}}); "
                     f"got {_describe(first if first is not None else data)}")
