"""What a VLM-FO1 request returns: `FO1Result` (picked boxes, labels, region indices, proposal scores, raw text,
tokens, finish reason, per-stage timings) and its exports — COCO results, supervision.Detections, JSON, a picture.

    res = model.detect("photo.jpg", ["person", "dog"], boxes=proposals)
    res                                  # one line in a terminal; the picture in a notebook (_repr_png_)
    res.boxes, res.labels, res.scores    # [K, 4] xyxy original-image pixels, K labels, K proposal scores
    res.to_coco(image_id=42)             # [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]
    res.to_supervision()                 # supervision.Detections (optional extra: pip install vlmfo1[viz])
    res.save("out.json") / res.save("out.png")

Boxes are always the caller's proposals in original-image pixels: the model picks them by index, it never
writes coordinates (spec users_and_ecosystem.md §0).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# COCO's 80 detection categories and their ids in the 91-id space of instances_*.json.
COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
_COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
COCO_CATEGORY_IDS: Dict[str, int] = dict(zip(COCO_CATEGORIES, _COCO_IDS))

STAGES = ("preprocess", "vit", "davit", "hfre", "prefill", "decode")

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


def coco_results(coco_gt, detections: Sequence[Mapping]):
    """pycocotools' `coco_gt.loadRes(detections)` that also takes an empty list (loadRes itself fails on one):
    a COCO object of the detections, ready for COCOeval. Needs the optional pycocotools package."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise ImportError("COCO scoring needs pycocotools: pip install 'vlmfo1[eval]'") from None
    dets = list(detections)
    if dets:
        return coco_gt.loadRes(dets)
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                   "categories": list(coco_gt.dataset.get("categories", [])), "annotations": []}
    res.createIndex()
    return res


def _flops_from(v) -> Dict[str, Dict[str, int]]:
    """FO1Result.flops read back from to_dict's form: {stage: {kind: non-negative int}} (absent: {})."""
    if v is None:
        return {}
    ok = isinstance(v, Mapping) and all(isinstance(k, str) and isinstance(kinds, Mapping) and all(
        isinstance(kk, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0 for kk, n in kinds.items())
        for k, kinds in v.items())
    if not ok:
        raise ValueError(f"flops must map stage names to {{kind: non-negative int}}, got {v!r:.200}")
    return {k: dict(kinds) for k, kinds in v.items()}


@dataclass
class Detection:
    label: str
    index: int                                 # index into the input boxes (the <regionK> the model named)
    box: Tuple[float, float, float, float]     # x1, y1, x2, y2 in original image pixels
    score: Optional[float] = None              # the proposal's score, when the proposals carried scores


@dataclass(repr=False)
class FO1Result:
    """What VLM-FO1 answered for one image: the raw text, the grounded detections and everything needed to
    reproduce, score or show it."""
    text: str
    detections: List[Detection] = field(default_factory=list)
    token_ids: List[int] = field(default_factory=list)
    invalid_indices: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None        # "stop" (a stop token), "length" (max_new_tokens reached)
    task: Optional[str] = None
    prompt: Optional[str] = None               # the user text as sent (the task template filled in)
    image_size: Optional[Tuple[int, int]] = None                  # (width, height) of the original image
    proposals: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # every input box, xyxy pixels
    proposal_scores: Optional[np.ndarray] = None
    timings: Dict[str, float] = field(default_factory=dict)      # seconds per stage (STAGES)
    # the work each stage did, {stage: {"gemm": FLOPs, "attention": FLOPs}}: the matmuls (linear layers,
    # convolutions run as matmuls) and the attention products, as the C core counts them (csrc/pool.h; elementwise
    # work, norms and RoIAlign are not counted); 0 for a stage reused from an encoded image. FLOPs / timings
    # gives a stage's achieved rate.
    flops: Dict[str, Dict[str, int]] = field(default_factory=dict, compare=False)
    image: Any = field(default=None, compare=False)              # the image it came from (path or RGB array)

    # ------------------------------------------------------------------ views
    @property
    def boxes(self) -> np.ndarray:
        """[K, 4] float64 x1, y1, x2, y2 of the picked boxes, original image pixels, in answer order."""
        return np.array([d.box for d in self.detections], dtype=np.float64).reshape(-1, 4)

    @property
    def labels(self) -> List[str]:
        return [d.label for d in self.detections]

    @property
    def region_indices(self) -> List[int]:
        return [d.index for d in self.detections]

    @property
    def scores(self) -> Optional[np.ndarray]:
        """[K] proposal scores of the picked boxes (the detection confidence of the official COCO protocol), or
        None when the proposals came without scores."""
        if self.proposal_scores is None:
            return None
        return np.array([d.score for d in self.detections], dtype=np.float64)

    def by_label(self) -> Dict[str, List[Tuple[float, float, float, float]]]:
        out: Dict[str, List[Tuple[float, float, float, float]]] = {}
        for d in self.detections:
            out.setdefault(d.label, []).append(d.box)
        return out

    @property
    def count(self) -> Optional[int]:
        """The number the model answered (counting prompts): the official CountBench rule, i.e. the first
        number left after removing <regionK> tags; None when there is none (the official scorer uses 0)."""
        m = re.findall(r"(?<!region)\d+", re.sub(r"<region\d+>", "", self.text))
        return int(m[0]) if m else None

    def __len__(self) -> int:
        return len(self.detections)

    def __repr__(self) -> str:
        labels: Dict[str, int] = {}
        for d in self.detections:
            labels[d.label] = labels.get(d.label, 0) + 1
        picked = ", ".join(f"{k}×{v}" for k, v in labels.items()) or "nothing"
        size = f"{self.image_size[0]}x{self.image_size[1]}" if self.image_size else "?"
        t = sum(self.timings.values())
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return (f"FO1Result({self.task or 'generate'}: {len(self.detections)} of {len(self.proposals)} boxes "
                f"[{picked}], image {size}, {len(self.token_ids)} tokens ({self.finish_reason}), {t:.2f} s, "
                f"text={text!r})")

    # ------------------------------------------------------------------ exports
    def to_dict(self) -> dict:
        """Plain JSON-ready data (everything but the image itself); FO1Result.from_dict reads it back."""
        return {
            "task": self.task, "prompt": self.prompt, "text": self.text,
            "detections": [{"label": d.label, "index": d.index, "box": list(d.box), "score": d.score}
                           for d in self.detections],
            "token_ids": list(self.token_ids), "finish_reason": self.finish_reason,
            "invalid_indices": list(self.invalid_indices),
            "image_size": list(self.image_size) if self.image_size else None,
            "image": self.image if isinstance(self.image, str) else None,
            "proposals": np.asarray(self.proposals, dtype=np.float64).tolist(),
            "proposal_scores": None if self.proposal_scores is None else np.asarray(self.proposal_scores).tolist(),
            "timings": dict(self.timings),
            "flops": {k: dict(v) for k, v in self.flops.items()},
        }

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Mapping) -> "FO1Result":
        dets = [Detection(x["label"], int(x["index"]), tuple(float(v) for v in x["box"]), x.get("score"))
                for x in d.get("detections", [])]
        ps = d.get("proposal_scores")
        return cls(text=d["text"], detections=dets, token_ids=list(d.get("token_ids", [])),
                   invalid_indices=list(d.get("invalid_indices", [])), finish_reason=d.get("finish_reason"),
                   task=d.get("task"), prompt=d.get("prompt"),
                   image_size=tuple(d["image_size"]) if d.get("image_size") else None,
                   proposals=np.asarray(d.get("proposals") or np.zeros((0, 4)), dtype=np.float64).reshape(-1, 4),
                   proposal_scores=None if ps is None else np.asarray(ps, dtype=np.float64),
                   timings=dict(d.get("timings", {})), image=d.get("image"),
                   flops=_flops_from(d.get("flops")))

    def to_coco(self, image_id: int, category_map: Optional[Mapping[str, int]] = None,
                default_score: float = 1.0) -> List[dict]:
        """COCO detection results: one {"image_id", "category_id", "bbox": [x, y, w, h], "score"} per detection
        whose label is in `category_map` (label -> category id; default: COCO's 80 names -> their 91-space ids),
        as the official COCO evaluation does (exact label match; other labels are skipped). The score is the
        proposal's score (the official protocol), or `default_score` when the proposals had none."""
        cmap = COCO_CATEGORY_IDS if category_map is None else category_map
        out = []
        for d in self.detections:
            if d.label not in cmap:
                continue
            x1, y1, x2, y2 = d.box
            out.append({"image_id": int(image_id), "category_id": int(cmap[d.label]),
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                        "score": float(default_score if d.score is None else d.score)})
        return out

    def to_supervision(self, classes: Optional[Sequence[str]] = None):
        """supervision.Detections of the picked boxes: xyxy, confidence (proposal scores, or None),
        class_id (the label's position in `classes`, default: labels in order of first appearance; labels not in
        `classes` get -1), data["class_name"] and data["region_index"]. Needs the optional `supervision` package."""
        try:
            import supervision as sv
        except ImportError:
            raise ImportError("to_supervision needs the supervision package: pip install 'vlmfo1[viz]' "
                              "(or pip install supervision)") from None
        names = list(classes) if classes is not None else list(dict.fromkeys(self.labels))
        pos = {n: i for i, n in enumerate(names)}
        scores = self.scores
        return sv.Detections(
            xyxy=self.boxes.astype(np.float32).reshape(-1, 4),
            confidence=None if scores is None else scores.astype(np.float32),
            class_id=np.array([pos.get(l, -1) for l in self.labels], dtype=int),
            data={"class_name": np.array(self.labels, dtype=str),
                  "region_index": np.array(self.region_indices, dtype=int)})

    # ------------------------------------------------------------------ pictures
    def draw(self, image=None, width: int = 3, font_size: int = 0, proposals: bool = False):
        """A PIL image with the detections drawn: one colour per label, the label and region index above each box.
        image: the picture to draw on (path, PIL image or uint8 array; default: the one the result came from).
        proposals: also outline every input proposal in thin grey (as the official demo pictures do)."""
        from PIL import Image, ImageDraw, ImageFont

        from .image import load_image

        src = self.image if image is None else image
        if src is None:
            raise ValueError("this result does not hold its image (e.g. read back from JSON without a path): "
                             "pass image=")
        im = Image.fromarray(load_image(src))
        d = ImageDraw.Draw(im)
        size = font_size or max(12, round(min(im.size) / 40))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:                       # Pillow < 10.1: fixed-size bitmap font
            font = ImageFont.load_default()
        if proposals:
            for x1, y1, x2, y2 in np.asarray(self.proposals).reshape(-1, 4):
                d.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=(160, 160, 160), width=1)
        colours: Dict[str, Tuple[int, int, int]] = {}
        for det in self.detections:
            c = colours.setdefault(det.label, _PALETTE[len(colours) % len(_PALETTE)])
            x1, y1, x2, y2 = det.box
            d.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=c, width=width)
            tag = f"{det.label} <region{det.index}>"
            l, t, r, b = d.textbbox((0, 0), tag, font=font)
            ty = max(0.0, min(y1, y2) - (b - t) - 2 * width)
            d.rectangle([min(x1, x2), ty, min(x1, x2) + (r - l) + 2 * width, ty + (b - t) + 2 * width], fill=c)
            d.text((min(x1, x2) + width, ty + width - t), tag, fill=(255, 255, 255), font=font)
        return im

    def show(self, image=None):
        """Display the drawing (IPython display in a notebook, the system viewer elsewhere)."""
        pic = self.draw(image)
        try:
            from IPython.display import display
            display(pic)
        except ImportError:
            pic.show()

    def _repr_png_(self) -> Optional[bytes]:
        """IPython: evaluating `res` in a notebook shows the image with the picked boxes."""
        if self.image is None:
            return None
        import io

        try:
            pic = self.draw()
        except (OSError, ValueError):   # the image file moved or was deleted: fall back to the text repr
            return None
        buf = io.BytesIO()
        pic.save(buf, format="PNG")
        return buf.getvalue()

    def save(self, path) -> None:
        """Write the result: .json -> to_json(); .png / .jpg / .jpeg / .webp -> the drawing."""
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lower()
        if ext == ".json":
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.to_json(indent=1))
        elif ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            self.draw().save(path)
        else:
            raise ValueError(f"save: unknown extension {ext!r} (use .json, or .png/.jpg/.webp for the picture)")
