"""TEST DOUBLES for the evaluation tests (tests only; never shipped): scripted stand-ins for a VLM-FO1 model.

They are not models. `OracleStandIn.detect_coco` answers, in the official answer grammar
`<ground>label</ground><objects><regionK>...</objects>`, with the true category of every proposal that overlaps a
ground-truth box of the image with IoU >= 0.5 (the best-overlapping one), and parses its own answer with vlmfo1's
parser, so the evaluator's loop (items, prompts, parsing, detections, records, scoring) runs as with the real model.
The image is decoded first, as the real model does, so a corrupt file fails the same way.

Module-level and picklable (functools.partial(OracleStandIn, annotations_path, ...)) so that spawned worker
processes can build them: the runner calls factory(threads=T).
"""
from __future__ import annotations

import json
import os
import signal
from collections import defaultdict

import numpy as np

from vlmfo1.fo1_prompt import parse_answer
from vlmfo1.image import load_image


def iou_xyxy(a, b):
    """IoU of xyxy boxes a [N, 4] and b [M, 4] -> [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class OracleStandIn:
    """TEST DOUBLE: a scripted stand-in for VLMFO1 (see the module doc).

    die_once: file names on which the worker process SIGKILLs itself the first time (a marker file in
    `marker_dir` remembers it across processes); die_always: file names on which it always does;
    interrupt_after: raise KeyboardInterrupt on the N-th call (Ctrl-C in the middle of a run)."""

    def __init__(self, annotations, threads=None, die_once=(), die_always=(), marker_dir=None, interrupt_after=None):
        with open(annotations) as f:
            ds = json.load(f)
        names = {c["id"]: c["name"] for c in ds["categories"]}
        files = {im["id"]: os.path.basename(im["file_name"]) for im in ds["images"]}
        self.gt = defaultdict(lambda: (np.zeros((0, 4)), []))
        boxes, labels = defaultdict(list), defaultdict(list)
        for a in ds["annotations"]:
            if a.get("iscrowd"):
                continue
            x, y, w, h = a["bbox"]
            boxes[files[a["image_id"]]].append([x, y, x + w, y + h])
            labels[files[a["image_id"]]].append(names[a["category_id"]])
        for k in boxes:
            self.gt[k] = (np.asarray(boxes[k], dtype=np.float64), labels[k])
        self.threads = threads
        self.die_once, self.die_always = set(die_once), set(die_always)
        self.marker_dir, self.interrupt_after = marker_dir, interrupt_after
        self.calls = 0
        self.path = None

    def answer(self, name, boxes):
        gt_boxes, gt_labels = self.gt[name]
        groups = {}
        if len(boxes) and len(gt_labels):
            iou = iou_xyxy(boxes, gt_boxes)
            for k in range(len(boxes)):
                j = int(np.argmax(iou[k]))
                if iou[k, j] >= 0.5:
                    groups.setdefault(gt_labels[j], []).append(k)
        return "".join(f"<ground>{label}</ground><objects>{''.join(f'<region{k}>' for k in ks)}</objects>"
                       for label, ks in groups.items())

    def detect_coco(self, image, boxes=None, scores=None, categories=None, max_new_tokens=None, **kw):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        name = os.path.basename(image)
        if name in self.die_always:
            os.kill(os.getpid(), signal.SIGKILL)
        if name in self.die_once:
            marker = os.path.join(self.marker_dir, name + ".died")
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        load_image(image)                       # decode, as the real model does
        text = self.answer(name, boxes)
        return parse_answer(text, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), token_ids=[1] * len(text),
                            scores=scores, finish_reason="stop", task="detect_coco")
