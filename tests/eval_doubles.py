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
import time
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
    hang_once / hang_always: file names on which it sleeps `hang_seconds` (a hung worker), the first time / always;
    interrupt_after: raise KeyboardInterrupt on the N-th call (Ctrl-C in the middle of a run)."""

    def __init__(self, annotations, threads=None, die_once=(), die_always=(), marker_dir=None, interrupt_after=None,
                 hang_once=(), hang_always=(), hang_seconds=60.0):
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
        self.hang_once, self.hang_always, self.hang_seconds = set(hang_once), set(hang_always), hang_seconds
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
        if name in self.hang_always:
            time.sleep(self.hang_seconds)
        if name in self.hang_once:
            marker = os.path.join(self.marker_dir, name + ".hung")
            if not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(self.hang_seconds)
        load_image(image)                       # decode, as the real model does
        text = self.answer(name, boxes)
        return parse_answer(text, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), token_ids=[1] * len(text),
                            scores=scores, finish_reason="stop", task="detect_coco")


# ---------------------------------------------------------------------------------------------- test data

def write_proposals_jsonl(annotations, path, seed=0, max_boxes=100, per_gt=2, clutter=5):
    """Proposals for every image of `annotations` in the official cocoVal2017_with_upn_score_0.3_0.8.jsonl layout
    (test data, made up): per non-crowd ground-truth box `per_gt` jittered copies (some overlap it with IoU >= 0.5,
    some do not), plus up to `clutter` random boxes; integer xyxy boxes, 2-decimal scores in [0.3, 1), sorted by
    score descending, at most max_boxes. Boxes whose IoU with any ground truth is within 0.05 of 0.5 are left out,
    so that "overlaps with IoU >= 0.5" means the same to every IoU implementation."""
    from vlmfo1.fo1 import coco_detection_prompt

    rng = np.random.default_rng(seed)
    with open(annotations) as f:
        ds = json.load(f)
    gts = defaultdict(list)
    for a in ds["annotations"]:
        if not a.get("iscrowd"):
            x, y, w, h = a["bbox"]
            gts[a["image_id"]].append([x, y, x + w, y + h])
    prompt = coco_detection_prompt()
    with open(path, "w") as f:
        for im in ds["images"]:
            W, H = im["width"], im["height"]
            gt = np.asarray(gts[im["id"]], dtype=np.float64).reshape(-1, 4)
            cand = []
            for x1, y1, x2, y2 in gt:
                w, h = x2 - x1, y2 - y1
                for _ in range(per_gt):
                    d = rng.uniform(-0.3, 0.3, 4) * [w, h, w, h]
                    cand.append([x1 + d[0], y1 + d[1], x2 + d[2], y2 + d[3]])
            for _ in range(int(rng.integers(0, clutter + 1))):
                x, y = rng.uniform(0, W - 20), rng.uniform(0, H - 20)
                cand.append([x, y, x + rng.uniform(10, W - x), y + rng.uniform(10, H - y)])
            boxes = []
            for b in cand:
                b = [int(np.clip(b[0], 0, W - 2)), int(np.clip(b[1], 0, H - 2)), int(np.clip(b[2], 0, W)),
                     int(np.clip(b[3], 0, H))]
                if b[2] <= b[0] + 1 or b[3] <= b[1] + 1:
                    continue
                if len(gt):
                    iou = iou_xyxy([b], gt)[0]
                    if np.any(np.abs(iou - 0.5) < 0.05):
                        continue
                    top = np.sort(iou)[::-1]
                    if len(top) > 1 and top[1] >= 0.5 and top[0] - top[1] < 1e-3:
                        continue
                boxes.append(b)
            scores = [round(float(s), 2) for s in rng.uniform(0.3, 0.9999, len(boxes))]
            order = sorted(range(len(boxes)), key=lambda i: -scores[i])[:max_boxes]
            f.write(json.dumps({"id": im["id"], "image": im["file_name"],
                                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}],
                                "bbox_list": [boxes[i] for i in order], "score_list": [scores[i] for i in order]})
                    + "\n")
    return path


def kill_after_first_record(cmd, out, env, cwd, timeout=120):
    """Start `cmd` (a `vlmfo1 eval` run into the folder `out`), SIGKILL it once records.jsonl has a complete line (so
    the kill is mid-run) and return how many lines the file then has."""
    import subprocess
    from pathlib import Path

    p = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rec = Path(out) / "records.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if rec.exists() and rec.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.01)
    assert p.poll() is None, p.communicate()                   # still running: the kill is mid-run
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    return rec.read_bytes().count(b"\n")
