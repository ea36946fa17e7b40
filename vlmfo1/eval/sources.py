"""Input files and proposal sources for the evaluators: bounded JSON reading, file identities for `settings()`,
proposal lookup for one item, a pre-check that a proposal file covers every image, box IoU and the option checks the
evaluators share."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from ..jsonsafe import nesting_depth
from ..proposals import (BoxFormatWarning, CallableProposals, CocoJsonlProposals, CocoResultsProposals,
                         FO1EvalProposals, Proposals, ProposalsNotFoundError, as_boxes, open_proposals)

MAX_JSON_BYTES = 2 << 30     # instances_train2014.json (what the JSON RefCOCO forms need for oracle boxes) is 0.3 GB
MAX_JSON_DEPTH = 64          # COCO annotations are 6 deep (segmentation polygons)

FILE_SOURCES = (FO1EvalProposals, CocoJsonlProposals, CocoResultsProposals)


def file_info(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """A file's name, size and sha256: how settings() names an input file (what run.json compares on resume; the
    folder the file sits in may move, its content may not change)."""
    path = os.fspath(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"name": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def read_json(path: Union[str, os.PathLike], what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """json.load with the file's size and nesting bounded first; every problem is a ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, more than the {max_bytes} a {what} file may have")
    with open(path, "rb") as f:
        data = f.read()
    depth = nesting_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{path}: not a {what} file (JSON nested {depth} deep; at most {MAX_JSON_DEPTH})")
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid {what} JSON file ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a valid {what} JSON file (not UTF-8 text: {e})") from None


def read_jsonl(path: Union[str, os.PathLike], what: str, max_bytes: int = MAX_JSON_BYTES) -> list:
    """A JSON-lines file as a list of its objects (blank lines skipped); errors name the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, more than the {max_bytes} a {what} file may have")
    out = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if nesting_depth(line) > MAX_JSON_DEPTH:
                raise ValueError(f"{path}: line {lineno}: JSON nested deeper than {MAX_JSON_DEPTH}")
            try:
                out.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: line {lineno}: not a JSON object ({e})") from None
    return out


def open_source(proposals: Any) -> Any:
    """A proposal source from what the user passed: a path (read by its layout, vlmfo1.proposals.open_proposals)
    or anything callable as `source(image, image_id=None)`."""
    if proposals is None:
        return None
    if isinstance(proposals, (str, os.PathLike)):
        return open_proposals(proposals)
    if not callable(proposals):
        raise TypeError(f"proposals must be a proposal source (image -> boxes, scores) or a file path, got "
                        f"{type(proposals).__name__}")
    return proposals


def describe_source(src: Any) -> Dict[str, Any]:
    """JSON that identifies a proposal source (its class, and its file with the file's size)."""
    out: Dict[str, Any] = {"kind": type(src).__name__}
    path = getattr(src, "path", None)
    if isinstance(path, str) and os.path.isfile(path):
        out.update(file_info(path))
    if isinstance(src, CocoResultsProposals):
        out["score_threshold"] = src.score_threshold
        if src.annotations is not None:
            out["annotations"] = file_info(src.annotations)
    if isinstance(src, CallableProposals):
        fn = src.fn
        out["function"] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        out["box_format"] = src.box_format
    elif not isinstance(src, FILE_SOURCES):
        out["repr"] = repr(src)[:200]
    return out


def lookup(src: Any, image: str, image_id: Any = None) -> Proposals:
    """The proposals of one image from a source. The CountBench / PixmoCount files are keyed by file name, so
    they are asked by path; other sources get the dataset's image id too when there is one."""
    if isinstance(src, FO1EvalProposals) or image_id is None:
        got = src(image)
    else:
        got = src(image, image_id=image_id)
    if isinstance(got, Proposals):
        return got
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoxFormatWarning)
        return as_boxes(got)


def check_coverage(src: Any, images: Iterable[Tuple[str, Any]], where: str) -> None:
    """For proposal files (not detector callables, which would run here): every image must have an entry. A
    ValueError before any model work lists how many lack one."""
    if not isinstance(src, FILE_SOURCES):
        return
    missing = []
    seen = set()
    total = 0
    for image, image_id in images:
        if (image, image_id) in seen:
            continue
        seen.add((image, image_id))
        total += 1
        try:
            lookup(src, image, image_id)
        except ProposalsNotFoundError:
            missing.append(os.path.basename(image) if image_id is None else image_id)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise ValueError(f"{getattr(src, 'path', src)}: no proposals for {len(missing)} of the {total} images of "
                         f"{where} (e.g. {shown}); give a proposal file that covers them")


def box_iou(boxes: Any, box: Sequence[float]) -> np.ndarray:
    """IoU of each xyxy box in `boxes` [N, 4] with one xyxy `box`, continuous coordinates (no +1 pixel):
    inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1)), union = area_a + area_b - inter, with
    area = (x2 - x1) * (y2 - y1) (inverted boxes have area 0). 0 where the union is 0."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(box, dtype=np.float64).reshape(4)
    w = np.clip(np.minimum(b[:, 2], g[2]) - np.maximum(b[:, 0], g[0]), 0, None)
    h = np.clip(np.minimum(b[:, 3], g[3]) - np.maximum(b[:, 1], g[1]), 0, None)
    inter = w * h
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    area_g = max(g[2] - g[0], 0.0) * max(g[3] - g[1], 0.0)
    union = area_b + area_g - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def xywh_to_xyxy(b: Sequence[float]) -> list:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


def max_new_tokens_opt(value: Optional[int]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"max_new_tokens must be a positive int or None, got {value!r}")
    return int(value)


def max_proposals_opt(value: Any) -> int:
    """The proposals per request, the first N of the source (FO1 takes at most 100 boxes)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 100:
        raise ValueError(f"max_proposals must be an int in [1, 100] (FO1 takes at most 100 boxes), got {value!r}")
    return int(value)
