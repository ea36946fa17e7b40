"""COCO detection with VLM-FO1, the official protocol (spec fo1_architecture.md §6.2), scored end to end.

    from vlmfo1.eval import run
    from vlmfo1.eval.coco import CocoEvaluator
    ev = CocoEvaluator("val2017/", "annotations/instances_val2017.json",
                       proposals="cocoVal2017_with_upn_score_0.3_0.8.jsonl")    # or oracle_proposals=True
    run(ev, "/path/to/VLM-FO1_Qwen2.5-VL-3B-v01", "runs/coco-val2017", workers=2)
    vlmfo1 eval coco --model DIR --images val2017 --annotations instances_val2017.json --proposals FILE --out RUN

Per image (one item, keyed by the COCO image id as a string), as the official `evaluation/eval_coco.py`:
  - the prompt of the official COCO data: "Please detect person; bicycle; ...; toothbrush in the image and return
    the object indexes." — the annotation file's category names in id order, "; "-separated (for COCO's 80
    categories exactly the official question; `vlmfo1.fo1.coco_detection_prompt`);
  - the image's proposals: the official `cocoVal2017_with_upn_score_0.3_0.8.jsonl`, any COCO detection-results file
    (your detector; sorted by score) or FO1's CountBench-style layout (`vlmfo1.proposals.open_proposals`), or any
    proposal source object; or, with oracle_proposals, the image's non-crowd ground-truth boxes (score 1) as an
    upper-bound diagnostic. At most `max_proposals` (100, FO1's limit) per image, the first ones (highest scores);
    an image with no proposals is recorded without asking the model (it can detect nothing);
  - greedy decoding (the official setting); a detection per (label, region index) of the answer whose label equals
    a category name exactly, bbox = the proposal in xywh, score = the proposal's score (1.0 when the source has
    none). Labels that are not category names are listed in the record ("unmatched_labels") and dropped.

Scoring: COCOeval (iouType bbox) with pycocotools, or faster-coco-eval (`scorer="faster-coco-eval"`, or "auto" when
it is installed; its stats equal pycocotools' to ~1e-16 on the test fixture), over every image of the run's scope
(images whose item failed count as images with no detections, as the official evaluation's skipped images do;
with `limit`, the ground truth is restricted to the images run). The report has the 12 COCO stats, a per-category
table (AP, AP50, AP75 at area all, 100 detections, as detectron2 computes it from the precision array), and the
proposal-recall ceiling:

  proposal recall = COCOeval of the proposals alone, class-agnostic (params.useCats = 0), every proposal given to
  the model (after the max_proposals cut) as a detection with its score, maxDets 1/10/100: AR@1, AR@10, AR@100,
  AR small/medium/large (COCO's average recall over IoU 0.50:0.95) and the recall at IoU 0.50 and 0.75 with 100
  proposals. It is the standard class-agnostic proposal AR (COCO / detectron2 box-proposal evaluation) and an upper
  bound of what picking among these proposals can recall: no answer can find an object no proposal covers.

Input checks (before any model work, ValueError naming the file): the annotation file must have "images",
"annotations" and "categories" lists with unique ids, annotations pointing at listed images and categories, finite
boxes; every image of the annotation file must exist under the images folder; the proposal source must hold every
annotated image (a COCO results file used as proposals gives 0 boxes to a listed image without detections).
Proposals for images that the annotation file does not list are ignored with a RuntimeWarning (a val2017 proposal
file used with a subset of the annotations is fine); a proposal file holding none of the annotated images is an
error. The annotation's "area" is taken as given (COCOeval's area ranges); a missing one is computed as w * h.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .base import Evaluator, Item
from .sources import file_info, max_proposals_opt

PROTOCOL = "VLM-FO1 COCO detection (official eval_coco.py; spec fo1_architecture.md 6.2)"
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
STAT_LINES = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)
SCORERS = ("auto", "pycocotools", "faster-coco-eval")
RESULTS_FILE = "coco_results.json"


# ---------------------------------------------------------------------------------------------- inputs

def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def load_annotations(path: str) -> Dict[str, Any]:
    """A COCO instances file, checked: {"images", "annotations", "categories"} lists with unique integer ids,
    annotations on listed images and categories with finite [x, y, w >= 0, h >= 0] boxes. Returns the parsed dict
    (a missing annotation "area" is set to w * h, "iscrowd" to 0)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}" if not os.path.exists(path)
                                else f"the annotation file is a folder: {path}")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid COCO annotation JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO annotation object {{'images', 'annotations', 'categories'}}, got "
                         f"a {type(data).__name__}")
    for k in ("images", "annotations", "categories"):
        if not isinstance(data.get(k), list):
            raise ValueError(f"{path}: no {k!r} list (a COCO instances file has 'images', 'annotations' and "
                             f"'categories'); keys: {sorted(map(str, data))[:8]}")
    if not data["images"]:
        raise ValueError(f"{path}: the 'images' list is empty: nothing to evaluate")
    if not data["categories"]:
        raise ValueError(f"{path}: the 'categories' list is empty")
    img_ids: Dict[int, int] = {}
    for j, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str) \
                or not im["file_name"]:
            raise ValueError(f"{path}: images[{j}]: expected {{'id': int, 'file_name': str, ...}}, got "
                             f"{_describe(im)}")
        if im["id"] in img_ids:
            raise ValueError(f"{path}: images[{j}]: image id {im['id']} appears twice (first at images"
                             f"[{img_ids[im['id']]}])")
        img_ids[im["id"]] = j
    cat_ids, names = set(), set()
    for j, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str) \
                or not c["name"].strip():
            raise ValueError(f"{path}: categories[{j}]: expected {{'id': int, 'name': str}}, got {_describe(c)}")
        if c["id"] in cat_ids:
            raise ValueError(f"{path}: categories[{j}]: category id {c['id']} appears twice")
        if c["name"] in names:
            raise ValueError(f"{path}: categories[{j}]: category name {c['name']!r} appears twice")
        cat_ids.add(c["id"])
        names.add(c["name"])
    ann_ids = set()
    for j, a in enumerate(data["annotations"]):
        where = f"{path}: annotations[{j}]"
        if not isinstance(a, dict) or not _is_int(a.get("id")) or not _is_int(a.get("image_id")) \
                or not _is_int(a.get("category_id")):
            raise ValueError(f"{where}: expected {{'id': int, 'image_id': int, 'category_id': int, 'bbox': "
                             f"[x, y, w, h], ...}}, got {_describe(a)}")
        if a["id"] in ann_ids:
            raise ValueError(f"{where}: annotation id {a['id']} appears twice")
        ann_ids.add(a["id"])
        if a["image_id"] not in img_ids:
            raise ValueError(f"{where}: image_id {a['image_id']} is not in the file's 'images' list (the annotation "
                             "file is missing images)")
        if a["category_id"] not in cat_ids:
            raise ValueError(f"{where}: category_id {a['category_id']} is not in the file's 'categories' list")
        b = a.get("bbox")
        if not isinstance(b, list) or len(b) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                              and math.isfinite(v) for v in b) or b[2] < 0 or b[3] < 0:
            raise ValueError(f"{where}: bbox must be 4 finite numbers [x, y, w >= 0, h >= 0], got {b!r}")
        if "area" not in a:
            a["area"] = float(b[2]) * float(b[3])
        elif not isinstance(a["area"], (int, float)) or isinstance(a["area"], bool) or not math.isfinite(a["area"]):
            raise ValueError(f"{where}: area must be a finite number, got {a['area']!r}")
        a.setdefault("iscrowd", 0)
    return data


def _describe(x: Any) -> str:
    if isinstance(x, dict):
        return f"a dict with keys {sorted(map(str, x))[:8]}"
    r = repr(x)
    return r if len(r) <= 60 else f"a {type(x).__name__}"


def coco_records(detections: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """COCO detection results ([{"image_id", "category_id", "bbox", "score"}]) as CocoEvaluator records (keyed by
    the image id as a string, detections in their file order): to score an existing results file."""
    out: Dict[str, Dict[str, Any]] = {}
    for i, d in enumerate(detections):
        if not isinstance(d, Mapping) or not _is_int(d.get("image_id")):
            raise ValueError(f"detection {i}: expected {{'image_id': int, 'category_id', 'bbox', 'score'}}")
        rec = out.setdefault(str(int(d["image_id"])), {"answer": None, "detections": []})
        rec["detections"].append({"category_id": d["category_id"], "bbox": list(d["bbox"]), "score": d["score"]})
    return out


# ---------------------------------------------------------------------------------------------- scoring backends

def _scorer_module(scorer: str):
    """(name with version, COCO class, COCOeval class) of the chosen scorer."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    if scorer in ("auto", "faster-coco-eval"):
        try:
            import faster_coco_eval
            from faster_coco_eval import COCO, COCOeval_faster
            return f"faster-coco-eval {faster_coco_eval.__version__}", COCO, COCOeval_faster
        except ImportError:
            if scorer == "faster-coco-eval":
                raise ImportError("scorer 'faster-coco-eval' needs the faster-coco-eval package: pip install "
                                  "faster-coco-eval (or use the default pycocotools)") from None
    try:
        import pycocotools
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("COCO scoring needs pycocotools: pip install 'vlmfo1[eval]'") from None
    return f"pycocotools {getattr(pycocotools, '__version__', '')}".strip(), COCO, COCOeval


@contextlib.contextmanager
def _quiet():
    """pycocotools prints progress to stdout, faster-coco-eval logs: keep both out of the user's output."""
    import logging

    log = logging.getLogger("faster_coco_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def _coco_gt(COCO, dataset: Mapping[str, Any]):
    ds = {"images": [im for im in dataset["images"]], "annotations": list(dataset["annotations"]),
          "categories": list(dataset["categories"])}
    with _quiet():
        if COCO.__module__.startswith("faster_coco_eval"):
            gt = COCO(ds)
        else:
            gt = COCO()
            gt.dataset = ds
            gt.createIndex()
    return gt


def _coco_dt(COCO, gt, dets: List[Dict[str, Any]]):
    with _quiet():
        if dets:
            return gt.loadRes(dets)
        empty = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                 "annotations": []}
        if COCO.__module__.startswith("faster_coco_eval"):
            return COCO(empty)
        res = COCO()
        res.dataset = empty
        res.createIndex()
        return res


def _evaluate(COCOeval, gt, dt, image_ids: Sequence[int], use_cats: bool = True):
    with _quiet():
        E = COCOeval(gt, dt, "bbox")
        E.params.imgIds = sorted(int(i) for i in image_ids)
        if not use_cats:
            E.params.useCats = 0
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def _f(x: Any) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------- the evaluator

class CocoEvaluator(Evaluator):
    """COCO detection mAP of VLM-FO1 over proposals, the official protocol (see the module doc).

    images: the folder holding the annotation file's images (its "file_name"s); annotations: a COCO instances JSON;
    proposals: a proposals file (any layout `open_proposals` reads) or a proposal source object
    (`image, image_id=... -> Proposals`); oracle_proposals: use each image's ground-truth boxes instead.
    max_new_tokens: None = sized by the task (vlmfo1.fo1.MAX_NEW_TOKENS; the official scripts pass 4096);
    max_proposals: the first N proposals of each image (100 = FO1's limit); scorer: "auto" (faster-coco-eval when
    installed, else pycocotools), "pycocotools", "faster-coco-eval"; proposal_recall: compute the ceiling."""

    name = "coco"

    def __init__(self, images: Optional[str], annotations: str, proposals: Any = None, *,
                 oracle_proposals: bool = False, max_new_tokens: Optional[int] = None, max_proposals: int = 100,
                 scorer: str = "auto", proposal_recall: bool = True):
        if oracle_proposals and proposals is not None:
            raise ValueError("give proposals or oracle_proposals, not both")
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
        if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive int or None, got {max_new_tokens!r}")
        self.images = None if images is None else os.fspath(images)
        self.annotations = os.fspath(annotations)
        self.proposals = os.fspath(proposals) if isinstance(proposals, (str, os.PathLike)) else proposals
        self.oracle_proposals = bool(oracle_proposals)
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        self.max_proposals = max_proposals_opt(max_proposals)
        self.scorer = scorer
        self.proposal_recall = bool(proposal_recall)
        self._ann: Optional[Dict[str, Any]] = None
        self._props: Optional[Dict[int, Tuple[List[List[float]], List[float]]]] = None
        self._items: Optional[List[Item]] = None
        self._settings: Optional[Dict[str, Any]] = None
        self._cat_names: Optional[List[str]] = None
        self._name_to_id: Optional[Dict[str, int]] = None

    # ---- what workers receive: no annotation, proposal or item caches (run_item needs only the categories)
    def __getstate__(self):
        self._dataset()
        state = dict(self.__dict__)
        state.update(_ann=None, _props=None, _items=None)
        if not isinstance(state["proposals"], (str, type(None))):
            state["proposals"] = None           # an in-memory source stays here; items carry the boxes
        return state

    # ---- inputs
    def _dataset(self) -> Dict[str, Any]:
        if self._ann is None:
            self._ann = load_annotations(self.annotations)
            cats = sorted(self._ann["categories"], key=lambda c: c["id"])
            self._cat_names = [c["name"].strip() for c in cats]
            self._name_to_id = {c["name"].strip(): int(c["id"]) for c in cats}
        return self._ann

    @property
    def categories(self) -> List[str]:
        """The category names in id order (the prompt's list)."""
        self._dataset()
        return list(self._cat_names)

    @property
    def prompt(self) -> str:
        from ..fo1 import coco_detection_prompt

        return coco_detection_prompt(self.categories)

    def _source(self):
        from ..proposals import open_proposals

        if isinstance(self.proposals, str):
            return open_proposals(self.proposals, annotations=self.annotations)
        if not callable(self.proposals):
            raise TypeError(f"proposals must be a file path or a proposal source (image, image_id=... -> boxes), got "
                            f"{type(self.proposals).__name__}")
        return self.proposals

    def _image_proposals(self) -> Dict[int, Tuple[List[List[float]], List[float]]]:
        """image id -> (xyxy boxes, scores), at most max_proposals, for every annotated image."""
        if self._props is not None:
            return self._props
        ds = self._dataset()
        out: Dict[int, Tuple[List[List[float]], List[float]]] = {}
        if self.oracle_proposals:
            for im in ds["images"]:
                out[im["id"]] = ([], [])
            for a in ds["annotations"]:
                if a.get("iscrowd"):
                    continue
                boxes, scores = out[a["image_id"]]
                if len(boxes) < self.max_proposals:
                    x, y, w, h = (float(v) for v in a["bbox"])
                    boxes.append([x, y, x + w, y + h])
                    scores.append(1.0)
            self._props = out
            return out
        if self.proposals is None:
            raise ValueError("no proposals: give a proposals file (e.g. cocoVal2017_with_upn_score_0.3_0.8.jsonl, or "
                             "a COCO detection-results file of your detector) or oracle_proposals=True")
        from ..proposals import FO1EvalProposals, Proposals, ProposalsNotFoundError, as_boxes

        src = self._source()
        self._check_question()
        by_name = isinstance(src, FO1EvalProposals)
        where = self.proposals if isinstance(self.proposals, str) else repr(src)
        missing: List[Dict[str, Any]] = []
        for im in ds["images"]:
            path = os.path.join(self.images, im["file_name"]) if self.images else im["file_name"]
            try:
                got = src(path) if by_name else src(path, image_id=im["id"])
            except ProposalsNotFoundError:
                missing.append(im)
                continue
            props = got if isinstance(got, Proposals) else as_boxes(got)
            n = min(len(props), self.max_proposals)
            boxes = props.boxes[:n].tolist()
            scores = [1.0] * n if props.scores is None else props.scores[:n].tolist()
            out[im["id"]] = (boxes, scores)
        if missing:
            if len(missing) == len(ds["images"]):
                raise ValueError(f"{where}: holds proposals for none of the {len(ds['images'])} images of "
                                 f"{self.annotations} (e.g. id {missing[0]['id']} {missing[0]['file_name']!r}): is it "
                                 "the proposals file of another split?")
            raise ValueError(f"{where}: no proposals for {len(missing)} of the {len(ds['images'])} images of "
                             f"{self.annotations} (e.g. id {missing[0]['id']} {missing[0]['file_name']!r})")
        keys = getattr(src, "keys", None)
        if callable(keys):
            known = ({os.path.basename(im["file_name"]) for im in ds["images"]} if by_name
                     else {im["id"] for im in ds["images"]})
            extra = [k for k in keys() if k not in known]
            if extra:
                warnings.warn(f"{where}: proposals for {len(extra)} images that {os.path.basename(self.annotations)} "
                              f"does not list (e.g. {extra[0]!r}): ignored", RuntimeWarning, stacklevel=3)
        self._props = out
        return out

    def _check_question(self) -> None:
        """The official jsonl carries the question it was made for: warn if it is not the prompt asked here."""
        if not (isinstance(self.proposals, str) and self.proposals.endswith(".jsonl")):
            return
        with open(self.proposals, "r", encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            conv = json.loads(first).get("conversations")
            q = conv[0]["value"] if isinstance(conv, list) and conv and isinstance(conv[0], dict) else None
        except (ValueError, AttributeError, KeyError, TypeError):
            return                                # the reader reports a malformed file
        if isinstance(q, str) and q.replace("<image>", "").strip() != self.prompt:
            warnings.warn(f"{self.proposals}: its records ask {q.strip()[:100]!r}..., not this evaluator's question "
                          f"{self.prompt[:100]!r}... (built from the annotation file's categories)", RuntimeWarning,
                          stacklevel=4)

    def items(self) -> List[Item]:
        if self._items is not None:
            return list(self._items)
        ds = self._dataset()
        if self.images is None:
            raise ValueError("no images folder: CocoEvaluator(images=...) is needed to run the model (scoring "
                             "alone does not need it)")
        if not os.path.isdir(self.images):
            raise FileNotFoundError(f"images folder not found: {self.images}" if not os.path.exists(self.images)
                                    else f"the images folder is a file: {self.images}")
        absent = [im for im in ds["images"] if not os.path.isfile(os.path.join(self.images, im["file_name"]))]
        if absent:
            raise ValueError(f"{len(absent)} of the {len(ds['images'])} images of {self.annotations} are not in "
                             f"{self.images} (e.g. {absent[0]['file_name']!r}): give the folder that holds them")
        props = self._image_proposals()
        items = []
        for im in ds["images"]:
            boxes, scores = props[im["id"]]
            items.append(Item(key=str(im["id"]), image=os.path.join(self.images, im["file_name"]),
                              image_id=int(im["id"]), task={"boxes": boxes, "scores": scores}))
        self._items = items
        return list(items)

    def settings(self) -> Dict[str, Any]:
        if self._settings is None:
            ds = self._dataset()
            if self.oracle_proposals:
                props: Any = "oracle: the ground-truth boxes (non-crowd) of each image, score 1"
            elif isinstance(self.proposals, str):
                props = file_info(self.proposals)
            else:
                props = {"source": type(self.proposals).__name__}
            self._settings = {
                "protocol": PROTOCOL, "annotations": file_info(self.annotations), "images": len(ds["images"]),
                "proposals": props, "max_proposals": self.max_proposals, "prompt": self.prompt,
                "max_new_tokens": self.max_new_tokens, "decoding": "greedy",
            }
        return dict(self._settings)

    # ---- one image
    def run_item(self, model, item: Item) -> Dict[str, Any]:
        if self._name_to_id is None:
            self._dataset()
        boxes, scores = item.task["boxes"], item.task["scores"]
        if not boxes:
            return {"answer": None, "skipped": "no proposals", "detections": []}
        res = model.detect_coco(item.image, boxes=boxes, scores=scores, categories=self._cat_names,
                                max_new_tokens=self.max_new_tokens)
        dets, unmatched = [], []
        for d in res.detections:
            cid = self._name_to_id.get(d.label)
            if cid is None:
                unmatched.append(d.label)
                continue
            x1, y1, x2, y2 = boxes[d.index]
            dets.append({"label": d.label, "index": int(d.index), "category_id": cid,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": scores[d.index]})
        return {"answer": res.text, "finish_reason": res.finish_reason, "tokens": len(res.token_ids),
                "detections": dets, "unmatched_labels": sorted(set(unmatched)),
                "invalid_indices": [int(i) for i in res.invalid_indices]}

    # ---- scoring
    def score(self, records: Mapping[str, Dict[str, Any]]) -> Dict[str, Any]:
        """The report over every image of the annotation file (images without a record have no detections)."""
        return self._score(records, [im["id"] for im in self._dataset()["images"]])

    def score_subset(self, records: Mapping[str, Dict[str, Any]], keys: Sequence[str]) -> Dict[str, Any]:
        """The report over the images `keys` (image ids as strings), the ground truth restricted to them."""
        ds = self._dataset()
        ids = {im["id"] for im in ds["images"]}
        out = []
        for k in keys:
            try:
                i = int(k)
            except (TypeError, ValueError):
                i = None
            if i is None or i not in ids or str(i) != k:
                raise ValueError(f"{k!r} is not an image id of {self.annotations}")
            out.append(i)
        return self._score(records, out)

    def detections(self, records: Mapping[str, Dict[str, Any]], image_ids: Sequence[int]) -> List[Dict[str, Any]]:
        """The COCO results list (image_id, category_id, bbox xywh, score) of `image_ids`, in that order."""
        dets: List[Dict[str, Any]] = []
        for i in image_ids:
            rec = records.get(str(i))
            if rec is None:
                continue
            got = rec.get("detections") if isinstance(rec, Mapping) else None
            if not isinstance(got, list):
                raise ValueError(f"the record of image {i} has no 'detections' list: not a COCO record")
            for d in got:
                dets.append({"image_id": int(i), "category_id": int(d["category_id"]),
                             "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])})
        return dets

    def _score(self, records: Mapping[str, Dict[str, Any]], image_ids: Sequence[int]) -> Dict[str, Any]:
        ds = self._dataset()
        scope = list(dict.fromkeys(int(i) for i in image_ids))
        in_scope = set(scope)
        dets = self.detections(records, scope)
        scorer, COCO, COCOeval = _scorer_module(self.scorer)
        gt = _coco_gt(COCO, ds)
        answered = sum(1 for i in scope if str(i) in records)
        report: Dict[str, Any] = {
            "benchmark": "coco", "protocol": PROTOCOL, "scorer": scorer,
            "annotations": os.path.basename(self.annotations), "images": len(scope), "images_answered": answered,
            "images_missing": len(scope) - answered, "detections": len(dets),
        }
        if not scope:
            report.update(stats=[-1.0] * 12, metrics={n: -1.0 for n in STAT_NAMES}, per_category=[],
                          proposal_recall=None)
            return report
        E = _evaluate(COCOeval, gt, _coco_dt(COCO, gt, dets), scope)
        stats = [float(s) for s in E.stats]
        report["stats"] = stats
        report["metrics"] = dict(zip(STAT_NAMES, stats))
        report["per_category"] = self._per_category(E, ds, in_scope, dets)
        report["proposal_recall"] = self._proposal_recall(COCO, COCOeval, gt, scope) if self.proposal_recall else None
        return report

    def _per_category(self, E, ds, in_scope, dets) -> List[Dict[str, Any]]:
        prec = np.asarray(E.eval["precision"])           # [T, R, K, A, M]
        m = list(E.params.maxDets).index(100)
        names = {c["id"]: c["name"] for c in ds["categories"]}
        n_gt: Dict[int, int] = {}
        for a in ds["annotations"]:
            if a["image_id"] in in_scope and not a.get("iscrowd"):
                n_gt[a["category_id"]] = n_gt.get(a["category_id"], 0) + 1
        n_det: Dict[int, int] = {}
        for d in dets:
            n_det[d["category_id"]] = n_det.get(d["category_id"], 0) + 1
        rows = []
        for k, cid in enumerate(E.params.catIds):
            def ap(p):
                p = p[p > -1]
                return float(np.mean(p)) if p.size else None
            rows.append({"id": int(cid), "name": names[cid], "AP": ap(prec[:, :, k, 0, m]),
                         "AP50": ap(prec[0, :, k, 0, m]), "AP75": ap(prec[5, :, k, 0, m]),
                         "gt": n_gt.get(cid, 0), "detections": n_det.get(cid, 0)})
        return rows

    def _proposal_recall(self, COCO, COCOeval, gt, scope) -> Optional[Dict[str, Any]]:
        if not self.oracle_proposals and self.proposals is None:
            return None
        props = self._image_proposals()
        cid = int(sorted(c["id"] for c in self._dataset()["categories"])[0])
        dets = []
        for i in scope:
            boxes, scores = props.get(i, ([], []))
            for (x1, y1, x2, y2), s in zip(boxes, scores):
                dets.append({"image_id": int(i), "category_id": cid, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "score": float(s)})
        E = _evaluate(COCOeval, gt, _coco_dt(COCO, gt, dets), scope, use_cats=False)
        rec = np.asarray(E.eval["recall"])               # [T, K, A, M]
        m = list(E.params.maxDets).index(100)
        iou = list(np.round(E.params.iouThrs, 2))
        s = E.stats
        return {
            "definition": "class-agnostic COCOeval (useCats=0) of the proposals alone, each with its score; "
                          "recall averaged over IoU 0.50:0.95 unless named",
            "proposals": len(dets), "AR@1": _f(s[6]), "AR@10": _f(s[7]), "AR@100": _f(s[8]),
            "AR_small@100": _f(s[9]), "AR_medium@100": _f(s[10]), "AR_large@100": _f(s[11]),
            "recall@100_IoU0.50": _f(rec[iou.index(0.5), 0, 0, m]),
            "recall@100_IoU0.75": _f(rec[iou.index(0.75), 0, 0, m]),
        }

    def export(self, records: Mapping[str, Dict[str, Any]], keys: Sequence[str], out_dir: str) -> List[str]:
        """coco_results.json: the detections of the run's images in COCO results format (what the official
        eval_coco.py writes), for any COCO tool."""
        dets = self.detections(records, [int(k) for k in keys])
        path = os.path.join(out_dir, RESULTS_FILE)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dets, f)
        os.replace(tmp, path)
        return [RESULTS_FILE]

    def summary(self, report: Mapping[str, Any]) -> str:
        lines = [f"COCO detection, {report.get('protocol', PROTOCOL)}",
                 f"{report['images']} images ({report['images_answered']} answered, {report['images_missing']} "
                 f"without an answer), {report['detections']} detections; scored with {report['scorer']}"]
        for line, v in zip(STAT_LINES, report["stats"]):
            lines.append(f" {line} = {v:.3f}")
        pr = report.get("proposal_recall")
        if pr:
            lines.append(f"Proposal recall ceiling (class-agnostic, the proposals alone; {pr['proposals']} boxes): "
                         f"AR@100 {pr['AR@100']:.3f}, AR@10 {pr['AR@10']:.3f}, AR@1 {pr['AR@1']:.3f}, recall@100 "
                         f"IoU=0.50 {pr['recall@100_IoU0.50']:.3f}, IoU=0.75 {pr['recall@100_IoU0.75']:.3f}")
        rows = report.get("per_category") or []
        if rows:
            lines.append("Per-category AP (IoU=0.50:0.95, area all, 100 detections; '-' = no ground truth):")
            cells = [f"{r['name'][:14]:<14} {_fmt(r['AP']):>5}" for r in rows]
            for i in range(0, len(cells), 4):
                lines.append("  " + " | ".join(cells[i:i + 4]))
        return "\n".join(lines)

    # ---- the command line (vlmfo1 eval coco)
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("--images", required=True, metavar="DIR", help="the folder with the annotation file's images")
        p.add_argument("--annotations", required=True, metavar="FILE", help="COCO instances JSON (e.g. "
                                                                            "instances_val2017.json)")
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--proposals", metavar="FILE",
                       help="proposals: the official cocoVal2017_with_upn_score_0.3_0.8.jsonl, or a COCO detection-"
                            "results JSON of any detector (sorted by score, the first 100 used)")
        g.add_argument("--oracle-proposals", action="store_true",
                       help="use each image's ground-truth boxes as the proposals (an upper-bound diagnostic)")
        p.add_argument("--max-new-tokens", type=int, metavar="N",
                       help="answer length cap (default: sized by the task; the official scripts pass 4096)")
        p.add_argument("--max-proposals", type=int, default=100, metavar="N",
                       help="proposals per image, the first N (default 100, FO1's limit)")
        p.add_argument("--scorer", choices=SCORERS, default="auto",
                       help="COCOeval implementation (default auto: faster-coco-eval when installed, else pycocotools)")

    @classmethod
    def from_args(cls, args) -> "CocoEvaluator":
        return cls(args.images, args.annotations, args.proposals, oracle_proposals=args.oracle_proposals,
                   max_new_tokens=args.max_new_tokens, max_proposals=args.max_proposals, scorer=args.scorer)
