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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .constants import DEFAULT_SYSTEM_PROMPT, IM_END_ID, IM_START_ID, IMAGE_INDEX, MAX_BOXES, REGION_INDEX  # noqa: F401
from .results import COCO_CATEGORIES, Detection, FO1Result  # noqa: F401  (re-exported)

OD_TEMPLATE = "Please detect {} in this image. Answer the question with object indexes."
OD_COUNTING_TEMPLATE = ("How many {} are there in this image? Count each instance of the target object. Locate them "
                        "with object indexes and then answer the question with the number of objects.")
# The wording of the official counting evaluation data (CountBench / PixmoCount, spec §6.3): "in the image?"
COUNT_TEMPLATE = ("How many {} are there in the image? Count each instance of the target object. Locate them "
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
        sys_ids = [IM_START_ID] + tokenizer.encode("system\n" + DEFAULT_SYSTEM_PROMPT) + [IM_END_ID] \
            + tokenizer.encode("\n")
        ids = sys_ids + ids
        prompt = "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n" + prompt
    ids += [IM_START_ID] + tokenizer.encode("assistant\n")
    prompt += "<|im_start|>assistant\n"
    return ids, prompt


# ---------------------------------------------------------------------------------------------- answers

_GROUND = re.compile(r"<ground>(.*?)</ground><objects>(.*?)</objects>", re.S)
_REGION = re.compile(r"<region(\d+)>")


def parse_answer(text: str, boxes: Sequence[Sequence[float]], token_ids: Sequence[int] = (),
                 scores: Optional[Sequence[float]] = None, **fields) -> FO1Result:
    """Map `<ground>label</ground><objects><regionK>…</objects>` back to the input boxes (and their scores).

    Indices are de-duplicated per label in order of first appearance (the official parser keeps a
    set). An index that names no input box is dropped with a warning and listed in invalid_indices.
    fields: the other FO1Result fields (task, prompt, timings, ...)."""
    res = FO1Result(text=text, token_ids=list(token_ids),
                    proposals=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                    proposal_scores=None if scores is None else np.asarray(scores, dtype=np.float64), **fields)
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
            res.detections.append(Detection(label, k, (float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                                            None if scores is None else float(scores[k])))
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
