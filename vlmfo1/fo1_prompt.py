"""VLM-FO1 prompts and answers: task templates, the exact prompt token ids, the output grammar.

The prompt is built exactly as the official `prepare_inputs` does (spec fo1_architecture.md §1.6):

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n          (only if "system" is absent)
    <|im_start|>user\n<|vision_start|><image><|vision_end|>\n<region0><regionfeat>…<region{N-1}><regionfeat>\n
    {TEXT}<|im_end|>\n<|im_start|>assistant\n

`<image>` and `<regionfeat>` are never tokenized: the text is split on them, every piece is
tokenized on its own (no BPE merge across a split), and the placeholders become IMAGE_INDEX (-200)
and REGION_INDEX (-300). The answer grammar is `<ground>label</ground><objects><region3>…</objects>`.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_INDEX = -200
REGION_INDEX = -300
IM_START_ID, IM_END_ID = 151644, 151645
MAX_BOXES = 100

OD_TEMPLATE = "Please detect {} in this image. Answer the question with object indexes."
OD_COUNTING_TEMPLATE = ("How many {} are there in this image? Count each instance of the target object. Locate them "
                        "with object indexes and then answer the question with the number of objects.")
REC_TEMPLATE = "Please detect {} in this image. Answer the question with object indexes."
REGION_OCR_TEMPLATE = "Please provide the ocr results of {} in the image."
BRIEF_REGION_CAPTION_TEMPLATE = "Provide a brief description for {}."
DETAILED_REGION_CAPTION_TEMPLATE = "Provide a detailed description for {}."
GROUNDING_TEMPLATE = ("Briefly describe this image and detect all mentioned objects. Answer with grounded object "
                      "indexes.")
VISUAL_PROMPT_OD_TEMPLATE = ("Using the provided object {} as a reference, identify all other objects of the same "
                             "category in this image. Respond with object indexes.")
REGION_REASONING_TEMPLATE = (
    "First thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>. Please give a detailed reasoning process "
    "process and provide image regions that can help you answer the question better. {}")

COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")


def region_tags(indices: Sequence[int], n_boxes: Optional[int] = None) -> str:
    """"<region3><region7>" for [3, 7]; with n_boxes, every index must name one of the boxes."""
    indices = [int(i) for i in indices]
    if n_boxes is not None and any(not 0 <= i < n_boxes for i in indices):
        raise ValueError(f"region index out of range: {indices} for {n_boxes} boxes (valid: 0..{n_boxes - 1})")
    return "".join(f"<region{i}>" for i in indices)


def user_text(n_boxes: int, text: str) -> str:
    """The user turn with the image and region placeholders, as the official make_message_context."""
    s = "<|im_start|>user\n<|vision_start|><image><|vision_end|>\n"
    if n_boxes > 0:
        s += "".join(f"<region{i}><regionfeat>" for i in range(n_boxes)) + "\n"
    return s + text + "<|im_end|>\n"


def prompt_ids(tokenizer, text: str, n_boxes: int) -> Tuple[List[int], str]:
    """Token ids with IMAGE_INDEX / REGION_INDEX placeholders, and the prompt text (for display)."""
    user = user_text(n_boxes, text)
    ids: List[int] = []
    for i, chunk in enumerate(user.split("<image>")):
        if i:
            ids.append(IMAGE_INDEX)
        for j, piece in enumerate(chunk.split("<regionfeat>")):
            if j:
                ids.append(REGION_INDEX)
            ids.extend(tokenizer.encode(piece))
    prompt = user
    if "system" not in prompt:  # the official rule: any "system" in the text drops the system turn
        sys_ids = [IM_START_ID] + tokenizer.encode("system\nYou are a helpful assistant.") + [IM_END_ID] \
            + tokenizer.encode("\n")
        ids = sys_ids + ids
        prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + prompt
    ids += [IM_START_ID] + tokenizer.encode("assistant\n")
    prompt += "<|im_start|>assistant\n"
    return ids, prompt


# ---------------------------------------------------------------------------------------------- answers

_GROUND = re.compile(r"<ground>(.*?)</ground><objects>(.*?)</objects>", re.S)
_REGION = re.compile(r"<region(\d+)>")


@dataclass
class Detection:
    label: str
    index: int                 # index into the input boxes
    box: Tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels


@dataclass
class FO1Result:
    """What VLM-FO1 answered: the raw text, the grounded detections and the tokens."""
    text: str
    detections: List[Detection] = field(default_factory=list)
    token_ids: List[int] = field(default_factory=list)
    invalid_indices: List[int] = field(default_factory=list)

    def by_label(self) -> Dict[str, List[Tuple[float, float, float, float]]]:
        out: Dict[str, List[Tuple[float, float, float, float]]] = {}
        for d in self.detections:
            out.setdefault(d.label, []).append(d.box)
        return out

    @property
    def boxes(self) -> np.ndarray:
        return np.array([d.box for d in self.detections], dtype=np.float64).reshape(-1, 4)

    @property
    def labels(self) -> List[str]:
        return [d.label for d in self.detections]

    def draw(self, image, width: int = 3, font_size: int = 0):
        """A copy of `image` (path, PIL image or uint8 array, as FO1 takes it) with the detections drawn: one colour
        per label, the label and region index above each box. Returns a PIL.Image (shown inline in notebooks)."""
        from PIL import Image, ImageDraw, ImageFont

        from .image import load_image

        im = Image.fromarray(load_image(image))
        d = ImageDraw.Draw(im)
        size = font_size or max(12, round(min(im.size) / 40))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:                       # Pillow < 10.1: fixed-size bitmap font
            font = ImageFont.load_default()
        colours = {}
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

    def to_dict(self) -> dict:
        """Plain JSON-ready data: text, detections (label, index into the input boxes, box), token ids."""
        return {"text": self.text, "detections": [{"label": d.label, "index": d.index, "box": list(d.box)}
                                                  for d in self.detections],
                "token_ids": list(self.token_ids), "invalid_indices": list(self.invalid_indices)}

    @property
    def count(self) -> Optional[int]:
        """The number the model answered (counting prompts): the official CountBench rule, i.e. the first
        number left after removing <regionK> tags; None when there is none (the official scorer uses 0)."""
        m = re.findall(r"(?<!region)\d+", re.sub(r"<region\d+>", "", self.text))
        return int(m[0]) if m else None


_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


def parse_answer(text: str, boxes: Sequence[Sequence[float]], token_ids: Sequence[int] = ()) -> FO1Result:
    """Map `<ground>label</ground><objects><regionK>…</objects>` back to the input boxes.

    Indices are de-duplicated per label in order of first appearance (the official parser keeps a
    set). An index that names no input box is dropped with a warning and listed in invalid_indices."""
    res = FO1Result(text=text, token_ids=list(token_ids))
    seen: Dict[str, set] = {}
    for label, objs in _GROUND.findall(text):
        label = label.strip()
        s = seen.setdefault(label, set())
        for k in (int(x) for x in _REGION.findall(objs)):
            if k >= len(boxes):
                res.invalid_indices.append(k)
                continue
            if k in s:
                continue
            s.add(k)
            b = boxes[k]
            res.detections.append(Detection(label, k, (float(b[0]), float(b[1]), float(b[2]), float(b[3]))))
    if res.invalid_indices:
        warnings.warn(f"the answer names region(s) {sorted(set(res.invalid_indices))} but only {len(boxes)} boxes "
                      "were given; they were dropped", RuntimeWarning, stacklevel=2)
    return res


def check_boxes(boxes, max_boxes: int = MAX_BOXES, truncate: bool = False) -> np.ndarray:
    """Validate proposal boxes [N, 4] (x1, y1, x2, y2 in image pixels).

    NaN/inf coordinates raise ValueError. More than `max_boxes` raises ValueError (the official code
    crashes there, ERRATA E5) unless truncate=True, which keeps the first max_boxes boxes *before* the
    prompt is built (a documented deviation, with a warning). Inverted, degenerate and out-of-image
    boxes are accepted and handled as the reference does (clamped to the image, then used as is)."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4] (x1, y1, x2, y2), got {b.shape}")
    if not np.isfinite(b).all():
        bad = np.where(~np.isfinite(b).all(axis=1))[0]
        raise ValueError(f"boxes {bad[:10].tolist()} have NaN or infinite coordinates")
    if len(b) > max_boxes:
        if not truncate:
            raise ValueError(f"{len(b)} boxes given; VLM-FO1 takes at most {max_boxes} (the official code fails "
                             f"beyond that). Pass truncate_boxes=True to keep the first {max_boxes}.")
        warnings.warn(f"{len(b)} boxes given: keeping the first {max_boxes} (deviation from the official code, "
                      "which fails)", RuntimeWarning, stacklevel=3)
        b = b[:max_boxes]
    return b
