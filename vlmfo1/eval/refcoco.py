"""RefCOCO / RefCOCO+ / RefCOCOg referring expression comprehension: Acc@0.5 per split, with VLM-FO1 picking one of
the proposals for each expression.

    from vlmfo1.eval import RefCocoEvaluator, run
    ev = RefCocoEvaluator("coco/train2014", "data/refcoco", "my_detections.json")
    ev = RefCocoEvaluator("coco/train2014", "data", dataset="refcocog", split_by="umd", oracle_proposals=True)
    run(ev, "/path/to/VLM-FO1_Qwen2.5-VL-3B-v01", "runs/refcocog-umd", workers=2)
    vlmfo1 eval refcoco --model DIR --images train2014 --annotations data --dataset refcoco+ --proposals FILE --out RUN

Annotation forms read (`annotations=`; a list of files is read as one benchmark):

1. The refer toolkit layout users download (lichengunc/refer): a folder `refcoco/` (or `refcoco+/`, `refcocog/`)
   holding `refs(unc).p` (refcocog: `refs(umd).p` and/or `refs(google).p`; pick with `split_by=`) and
   `instances.json`; or the refer data root holding those folders, with `dataset=` naming one; or the path of the
   `refs(...).p` file itself (instances.json next to it, or `instances=`). The
   pickle is a Python 2 protocol-2 list of refs {"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent",
   "sent_id", ...}], ...}; it is read by `vlmfo1.eval.safe_pickle` (plain data only, never code). The referent's box
   is its COCO annotation's bbox in instances.json.
2. The MDETR / GLIP conversion `finetune_refcoco_val.json` (`..._testA`, `finetune_refcocog_test.json`, ...): a COCO
   file with one "image" entry per expression ({"id", "file_name", "caption", "original_id" (the COCO image id),
   "dataset_name"}) and exactly one annotation per entry (the referent, bbox xywh). The split comes from the file
   name (or `split=`).
3. Lists of expressions, one object per expression, in a `.jsonl` file (the Qwen-VL / InternVL evaluation files
   `refcoco_val.jsonl` ...) or a `.json` list: {"image" (or "file_name" / "image_path"), "sent" (or "expression" /
   "sentence" / "caption" / "text"), "bbox", optional "split", "image_id", "sent_id"/"id"}. "bbox" is xyxy pixels
   (the Qwen-VL files' layout) unless `box_format=` says otherwise ("xywh" for COCO-style boxes). The split is the
   record's "split", else the file name's `_val` / `_testA` / ... suffix, else `split=`, else the file stem.

Dataset: `dataset=` ("refcoco", "refcoco+", "refcocog") picks the folder of a refer data root and names the benchmark
in the report; a refer folder with one of those names must be the one named (a mislabelled report is refused).

Splits: `splits=` names the splits to report (default: every split present except train, in the order val, testA,
testB, testC, test). Membership follows the refer toolkit's getRefIds: "testA" means every ref whose split
contains "A" (testA, testAB), "test" every ref whose split contains "test" (so refcoco's "test" is testA + testB),
other names match exactly. An expression in several reported splits is asked once; "overall" counts each
expression once.

Proposals: `proposals=` (a proposal source from vlmfo1.proposals, or a proposal file path: the COCO .jsonl layout,
COCO detection results, ...; looked up by the COCO image id, else by file name) — the protocol of the VLM-FO1 paper
uses detector proposals — or `oracle_proposals=True`: the image's ground-truth boxes (its non-crowd COCO annotations
in file order, the referent always included) from instances.json (forms 2 and 3 need `instances=`, a COCO annotation file
such as instances_train2014.json). A proposal file must have an entry for every image (checked before any model
work). At most `max_proposals` (default 100, FO1's limit) per expression: the source's first ones (a COCO results
file is sorted by score).

Prompt: the REC template ("Please detect {expression} in this image. Answer the question with object indexes.",
`model.refer`), greedy.

Scoring (decided here; the official repository has no RefCOCO evaluator):
  * the prediction is the box of the FIRST region the answer picks (answer order, over every
    <ground>…</ground><objects>…</objects> group); several picks are not penalised beyond that; an answer that picks
    no valid region (none, or only indices beyond the proposals) is a miss;
  * correct when IoU(prediction, referent box) >= 0.5 (`iou_threshold`). COCO boxes [x, y, w, h] become
    [x, y, x + w, y + h]; IoU in continuous coordinates (no +1 pixel), as MDETR's RefExpEvaluator and torchvision's
    box_iou. The refer-era Matlab/MAttNet computeIoU ([x, y, x+w-1, y+h-1] with +1 widths) gives the same
    intersection and union for every overlap wider and taller than 1 pixel; it differs only for boxes that overlap
    by 1 pixel or less, which never reach IoU 0.5 unless a box is about 2 pixels wide;
  * Acc@0.5 = correct / expressions of the split; expressions without a record (failed or not run) count as wrong;
    a run limited to its first K expressions (`run(..., limit=K)`) is scored over those K (`score_subset`), a split
    with none of them has no accuracy (None);
  * the proposal-recall ceiling: the fraction of expressions for which some proposal the model was shown has
    IoU >= 0.5 with the referent (no answer can do better); computed from the records (expressions without a
    record count as not covered).
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..fo1_prompt import REC_TEMPLATE
from ..proposals import BoxFormatWarning, Proposals, _int_id, as_boxes
from .base import Evaluator, Item
from .safe_pickle import load_plain
from .sources import (box_iou, check_coverage, describe_source, file_info, lookup, max_new_tokens_opt,
                      max_proposals_opt, open_source, read_json, read_jsonl, xywh_to_xyxy)

__all__ = ["RefCocoEvaluator", "read_refs", "in_split", "SPLIT_ORDER", "DATASETS"]

SPLIT_ORDER = ("val", "testA", "testB", "testC", "test")
DATASETS = ("refcoco", "refcoco+", "refcocog")      # the refer toolkit's folder names
_TEXT_KEYS = ("sent", "expression", "sentence", "caption", "text")
_IMAGE_KEYS = ("image", "file_name", "image_path", "img_path")
_SPLIT_SUFFIX = re.compile(r"_(train|val|testA|testB|testC|testAB|testBC|testAC|test)$")
_REFS_NAME = re.compile(r"^refs\((.+)\)\.p(?:kl|ickle)?$")


def in_split(label: str, split: str) -> bool:
    """Whether a ref whose split is `label` belongs to the reported split `split` (refer toolkit getRefIds)."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in label
    if split == "test":
        return "test" in label
    return label == split


@dataclass(frozen=True)
class RefExpr:
    """One referring expression: what to ask and the referent's box."""
    key: str
    split: str                      # the ref's split label as stored (val, testA, ...)
    image: str                      # image file name or path as the annotation gives it
    image_id: Any                   # COCO image id (int) when known
    expression: str
    box: Tuple[float, float, float, float]   # referent, xyxy pixels


@dataclass
class RefData:
    form: str                       # "refer pickle", "mdetr json", "expression list"
    dataset: str
    split_by: Optional[str]
    exprs: List[RefExpr]
    files: List[str]
    gt_boxes: Optional[Dict[Any, List[List[float]]]] = None   # image id -> oracle boxes (xyxy), when known
    images_by_id: Optional[Dict[Any, str]] = None             # image id -> file name, when known


# ----------------------------------------------------------------------------------------------- readers

def _bbox_xywh(b: Any, where: str) -> Tuple[float, float, float, float]:
    if (not isinstance(b, (list, tuple)) or len(b) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)
            or not all(np.isfinite(float(v)) for v in b)):
        raise ValueError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {str(b)[:80]}")
    return tuple(xywh_to_xyxy(b))  # type: ignore[return-value]


def _coco_index(inst: Any, path: str) -> Tuple[Dict[Any, dict], Dict[Any, dict], Dict[Any, List[dict]]]:
    """images by id, annotations by id, annotations per image id (file order) of a COCO annotation file."""
    if not isinstance(inst, dict) or not isinstance(inst.get("images"), list) \
            or not isinstance(inst.get("annotations"), list):
        raise ValueError(f"{path}: expected a COCO annotation file ({{'images': [...], 'annotations': [...], "
                         f"'categories': [...]}})")
    images: Dict[Any, dict] = {}
    for j, im in enumerate(inst["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"{path}: images[{j}]: expected {{'id', 'file_name', ...}}")
        images[im["id"]] = im
    anns: Dict[Any, dict] = {}
    per_image: Dict[Any, List[dict]] = {}
    for j, a in enumerate(inst["annotations"]):
        if not isinstance(a, dict) or "id" not in a or "image_id" not in a or "bbox" not in a:
            raise ValueError(f"{path}: annotations[{j}]: expected {{'id', 'image_id', 'bbox', ...}}")
        anns[a["id"]] = a
        per_image.setdefault(a["image_id"], []).append(a)
    return images, anns, per_image


def _oracle_boxes(per_image: Dict[Any, List[dict]], path: str, keep_ids: Mapping[Any, set]) -> Dict[Any, list]:
    """image id -> xyxy boxes of its non-crowd annotations (file order), plus any referent annotation."""
    out: Dict[Any, list] = {}
    for image_id, anns in per_image.items():
        keep = keep_ids.get(image_id, set())
        out[image_id] = [list(_bbox_xywh(a["bbox"], f"{path}: annotation {a['id']}")) for a in anns
                         if not a.get("iscrowd") or a["id"] in keep]
    return out


def _refs_files(folder: str) -> Dict[str, str]:
    out = {}
    for name in sorted(os.listdir(folder)):
        m = _REFS_NAME.match(name)
        if m:
            out[m.group(1)] = os.path.join(folder, name)
    return out


def _read_refer(path: str, split_by: Optional[str], instances: Optional[str],
                dataset: Optional[str] = None) -> RefData:
    if os.path.isdir(path):
        found = _refs_files(path)
        if not found:
            roots = [d for d in DATASETS if os.path.isdir(os.path.join(path, d))]
            if dataset is not None and dataset in roots:
                return _read_refer(os.path.join(path, dataset), split_by, instances, dataset)
            if roots:
                raise ValueError(f"{path}: a refer data root (it holds {', '.join(r + '/' for r in roots)}): choose "
                                 f"one with dataset= (--dataset)" + (f"; it has no {dataset}/" if dataset else ""))
            raise ValueError(f"{path}: no refs(<split_by>).p file in this folder (the refer toolkit layout: "
                             f"refcoco/refs(unc).p + refcoco/instances.json)")
        if split_by is None:
            if len(found) > 1:
                raise ValueError(f"{path}: holds {', '.join(os.path.basename(f) for f in found.values())}: choose "
                                 f"one with split_by= (--split-by) ({' or '.join(repr(k) for k in found)})")
            split_by = next(iter(found))
        if split_by not in found:
            raise ValueError(f"{path}: no refs({split_by}).p (found: {', '.join(found) or 'none'})")
        refs_path, folder = found[split_by], path
    else:
        refs_path, folder = path, os.path.dirname(os.path.abspath(path))
        m = _REFS_NAME.match(os.path.basename(path))
        split_by = split_by or (m.group(1) if m else None)
    name = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    if dataset is not None and name in DATASETS and name != dataset:
        raise ValueError(f"{refs_path}: the refs of {name}, not of {dataset} (dataset= / --dataset)")
    inst_path = instances or os.path.join(folder, "instances.json")
    if not os.path.isfile(inst_path):
        raise FileNotFoundError(f"{refs_path}: its instances.json is missing (looked for {inst_path}; pass "
                                f"instances= (--instances))")
    refs = load_plain(refs_path)
    inst = read_json(inst_path, "RefCOCO instances")
    images, anns, per_image = _coco_index(inst, inst_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got a {type(refs).__name__}")
    exprs: List[RefExpr] = []
    referents: Dict[Any, set] = {}
    for i, ref in enumerate(refs):
        where = f"{refs_path}: ref {i}"
        if not isinstance(ref, dict) or not all(k in ref for k in ("ann_id", "image_id", "split", "sentences")):
            raise ValueError(f"{where}: expected {{'ref_id', 'ann_id', 'image_id', 'split', 'sentences', ...}}, got "
                             f"{_describe(ref)}")
        split = ref["split"]
        if not isinstance(split, str):
            raise ValueError(f"{where}: split must be a string, got {split!r}")
        ann = anns.get(ref["ann_id"])
        if ann is None:
            raise ValueError(f"{where}: annotation {ref['ann_id']!r} is not in {inst_path}")
        image = images.get(ref["image_id"])
        if image is None:
            raise ValueError(f"{where}: image {ref['image_id']!r} is not in {inst_path}")
        if ann["image_id"] != ref["image_id"]:
            raise ValueError(f"{where}: annotation {ref['ann_id']} belongs to image {ann['image_id']}, not "
                             f"{ref['image_id']}")
        box = _bbox_xywh(ann["bbox"], f"{inst_path}: annotation {ann['id']}")
        referents.setdefault(ref["image_id"], set()).add(ref["ann_id"])
        sents = ref["sentences"]
        if not isinstance(sents, list):
            raise ValueError(f"{where}: sentences must be a list")
        for j, s in enumerate(sents):
            text = s.get("sent", s.get("raw")) if isinstance(s, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: sentence {j}: expected {{'sent': str, 'sent_id': int, ...}}")
            sid = s.get("sent_id")
            key = f"sent{sid}" if isinstance(sid, int) else f"ref{ref.get('ref_id', i)}-{j}"
            exprs.append(RefExpr(key, split, image["file_name"], ref["image_id"], text.strip(), box))
    gt = _oracle_boxes(per_image, inst_path, referents)
    return RefData("refer pickle", dataset or name or "refcoco", split_by, exprs, [refs_path, inst_path], gt,
                   {k: v["file_name"] for k, v in images.items()})


def _split_from_name(path: str) -> Tuple[Optional[str], str]:
    stem = os.path.splitext(os.path.basename(path))[0]
    m = _SPLIT_SUFFIX.search(stem)
    return (m.group(1), stem[:m.start()]) if m else (None, stem)


def _read_mdetr(path: str, data: dict, split: Optional[str]) -> RefData:
    name_split, stem = _split_from_name(path)
    split = split or name_split or stem
    images, _, per_image = _coco_index(data, path)
    dataset = stem[len("finetune_"):] if stem.startswith("finetune_") else stem
    exprs = []
    for eid, im in images.items():
        where = f"{path}: image entry {eid!r}"
        text = im.get("caption")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: no 'caption' (the referring expression)")
        anns = per_image.get(eid, [])
        if len(anns) != 1:
            raise ValueError(f"{where}: expected exactly one annotation (the referent), found {len(anns)}")
        box = _bbox_xywh(anns[0]["bbox"], f"{where} annotation")
        coco_id = im.get("original_id")
        dataset = im.get("dataset_name", dataset) if isinstance(im.get("dataset_name"), str) else dataset
        exprs.append(RefExpr(f"{split}/{eid}", split, im["file_name"], coco_id, text.strip(), box))
    return RefData("mdetr json", dataset, None, exprs, [path])


def _read_expression_list(path: str, records: list, split: Optional[str], box_format: str) -> RefData:
    name_split, stem = _split_from_name(path)
    exprs = []
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object, got {_describe(rec)}")
        text = next((rec[k] for k in _TEXT_KEYS if isinstance(rec.get(k), str)), None)
        image = next((rec[k] for k in _IMAGE_KEYS if isinstance(rec.get(k), str)), None)
        if text is None or image is None or "bbox" not in rec or not text.strip():
            raise ValueError(f"{where}: expected {{'image': str, 'sent': str, 'bbox': [4 numbers], ...}} (text keys: "
                             f"{', '.join(_TEXT_KEYS)}; image keys: {', '.join(_IMAGE_KEYS)}), got "
                             f"{_describe(rec)}")
        w, h = rec.get("width"), rec.get("height")
        size = (w, h) if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (w, h)) else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", BoxFormatWarning)
                b = as_boxes([rec["bbox"]], box_format=box_format, image_size=size).boxes[0]
        except BoxFormatWarning as warn:
            raise ValueError(f"{where}: bbox {rec['bbox']} does not look like {box_format!r} ({warn}); pass the "
                             f"file's box_format=") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bbox: {e}") from None
        s = rec.get("split") if isinstance(rec.get("split"), str) else (split or name_split or stem)
        iid = rec.get("image_id")
        iid = iid if isinstance(iid, int) and not isinstance(iid, bool) else _int_id(image)
        sid = next((rec[k] for k in ("sent_id", "id") if isinstance(rec.get(k), (int, str))
                    and not isinstance(rec.get(k), bool)), i)
        exprs.append(RefExpr(f"{s}/{sid}", s, image, iid, text.strip(), tuple(float(v) for v in b)))
    return RefData("expression list", stem, None, exprs, [path])


def read_refs(annotations: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], *,
              split_by: Optional[str] = None, instances: Optional[Union[str, os.PathLike]] = None,
              split: Optional[str] = None, box_format: str = "xyxy", dataset: Optional[str] = None) -> RefData:
    """Read the referring expressions of one or several annotation files (see the module docstring)."""
    if dataset is not None and (not isinstance(dataset, str) or not dataset.strip()):
        raise ValueError(f"dataset must be a name such as {', '.join(DATASETS)}, got {dataset!r}")
    paths = [annotations] if isinstance(annotations, (str, os.PathLike)) else list(annotations)
    if not paths:
        raise ValueError("annotations: give at least one file or folder")
    inst = None if instances is None else os.fspath(instances)
    parts = []
    for p in map(os.fspath, paths):
        if not os.path.exists(p):
            raise FileNotFoundError(f"RefCOCO annotations not found: {p}")
        if os.path.isdir(p) or _REFS_NAME.match(os.path.basename(p)) or p.endswith((".p", ".pkl", ".pickle")):
            parts.append(_read_refer(p, split_by, inst, dataset))
        elif p.endswith(".jsonl"):
            parts.append(_read_expression_list(p, read_jsonl(p, "RefCOCO expressions"), split, box_format))
        else:
            data = read_json(p, "RefCOCO annotation")
            if isinstance(data, dict) and isinstance(data.get("images"), list) and \
                    "annotations" in data and any(isinstance(im, dict) and "caption" in im
                                                  for im in data["images"][:1]):
                parts.append(_read_mdetr(p, data, split))
            elif isinstance(data, list):
                parts.append(_read_expression_list(p, data, split, box_format))
            else:
                raise ValueError(f"{p}: not a RefCOCO annotation file this reader knows (a refer-toolkit refs(...).p "
                                 f"with instances.json, an MDETR finetune_*.json with a 'caption' per image entry, or "
                                 f"a list of {{'image', 'sent', 'bbox'}} records); got {_describe(data)}")
    out = parts[0]
    for other in parts[1:]:
        if other.form != out.form:
            raise ValueError(f"annotations mix forms ({out.form} and {other.form}); evaluate them separately")
        out = RefData(out.form, out.dataset, out.split_by, out.exprs + other.exprs, out.files + other.files,
                      out.gt_boxes, out.images_by_id)
    if dataset is not None:
        out.dataset = dataset
    seen: Dict[str, int] = {}
    for e in out.exprs:
        seen[e.key] = seen.get(e.key, 0) + 1
    dup = [k for k, n in seen.items() if n > 1]
    if dup:
        raise ValueError(f"annotations: expression key {dup[0]!r} appears {seen[dup[0]]} times (the same file "
                         f"given twice, or records without distinct ids in one split)")
    return out


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:8]}"
    return f"a {type(obj).__name__}"


# ----------------------------------------------------------------------------------------------- the evaluator

class RefCocoEvaluator(Evaluator):
    """RefCOCO / RefCOCO+ / RefCOCOg Acc@0.5 of VLM-FO1 picking one proposal per referring expression.

    See the module doc for the annotation forms, splits and scoring.

    images: the folder of the COCO images (train2014 for RefCOCO/+/g); for expression lists with usable paths it may
        be None (paths relative to the list file's folder).
    annotations: a refer-toolkit folder, its data root (with `dataset`) or a refs(...).p, an MDETR finetune_*.json,
        or a .jsonl/.json expression list (or a list of files of one form).
    proposals: a proposal source or a proposal file; or oracle_proposals=True (the image's ground-truth boxes).
    dataset: refcoco, refcoco+ or refcocog (picks the folder of a refer data root; names the report).
    splits: the splits to report (default: every non-train split present); split_by: the refs file (unc, umd,
        google) when a folder holds several.
    instances: the COCO annotation file for oracle boxes of forms 2 and 3 (and a refs file in another folder).
    split: the split label of an MDETR / expression-list file whose name does not carry one.
    box_format: of an expression list's "bbox" (default "xyxy").
    max_new_tokens: None sizes it per request as model.refer does (32 + 2 per box); max_proposals: the first N
        proposals (default 100, FO1's limit).
    A run of the first K expressions only is `run(..., limit=K)`, scored over those K (`score_subset`).
    """

    name = "refcoco"

    def __init__(self, images, annotations, proposals: Any = None, *, oracle_proposals: bool = False,
                 dataset: Optional[str] = None, splits: Optional[Sequence[str]] = None,
                 split_by: Optional[str] = None, instances=None, split: Optional[str] = None,
                 box_format: str = "xyxy", iou_threshold: float = 0.5, max_new_tokens: Optional[int] = None,
                 max_proposals: int = 100) -> None:
        if oracle_proposals and proposals is not None:
            raise ValueError("give proposals or oracle_proposals, not both")
        if not oracle_proposals and proposals is None:
            raise ValueError("RefCOCO needs proposals: pass proposals= (--proposals: a proposal source or file; the "
                             "paper's protocol uses detector proposals) or oracle_proposals=True (--oracle-proposals: "
                             "the image's ground-truth boxes)")
        if not isinstance(iou_threshold, (int, float)) or isinstance(iou_threshold, bool) \
                or not 0.0 < float(iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
        if splits is not None:
            if isinstance(splits, str):
                splits = [splits]
            splits = list(splits)
            if not splits or not all(isinstance(s, str) and s for s in splits):
                raise ValueError(f"splits must be a list of split names, got {splits!r}")
        self.annotations = annotations
        self.images = None if images is None else os.path.abspath(os.fspath(images))
        self.dataset = dataset
        self.requested_splits = splits
        self.split_by = split_by
        self.oracle_proposals = bool(oracle_proposals)
        self.source = open_source(proposals)
        self.instances = None if instances is None else os.fspath(instances)
        self.split = split
        self.box_format = box_format
        self.iou_threshold = float(iou_threshold)
        self.max_new_tokens = max_new_tokens_opt(max_new_tokens)
        self.max_proposals = max_proposals_opt(max_proposals)
        self._data: Optional[RefData] = None
        self._items: Optional[List[Item]] = None
        self._splits: Optional[List[str]] = None

    def __getstate__(self) -> Dict[str, Any]:
        """Pickled for worker processes without the parsed annotations (run_item needs only the item and the
        proposal source; a worker that asks for items() reads the files again, deterministically)."""
        state = dict(self.__dict__)
        state.update(_data=None, _items=None, _splits=None)
        return state

    # ------------------------------------------------------------------ inputs
    def data(self) -> RefData:
        if self._data is None:
            self._data = read_refs(self.annotations, split_by=self.split_by, instances=self.instances,
                                   split=self.split, box_format=self.box_format, dataset=self.dataset)
        return self._data

    @property
    def splits(self) -> List[str]:
        """The reported splits."""
        if self._splits is None:
            labels = {e.split for e in self.data().exprs}
            if self.requested_splits is not None:
                missing = [s for s in self.requested_splits if not any(in_split(l, s) for l in labels)]
                if missing:
                    raise ValueError(f"{self._where()}: no expressions in split(s) {missing} (the splits present: "
                                     f"{', '.join(sorted(labels))})")
                self._splits = list(dict.fromkeys(self.requested_splits))
            else:
                present = [s for s in SPLIT_ORDER if s in labels]
                others = sorted(l for l in labels if l not in SPLIT_ORDER and l != "train")
                self._splits = present + others or sorted(labels)
        return self._splits

    def _where(self) -> str:
        a = self.annotations
        return os.fspath(a) if isinstance(a, (str, os.PathLike)) else ", ".join(map(os.fspath, a))

    def _image_path(self, e: RefExpr, data: RefData) -> str:
        if self.images is not None:
            return os.path.join(self.images, os.path.basename(e.image))
        if data.form != "expression list":
            raise ValueError(f"{self._where()}: pass images= (--images: the folder of the COCO images, e.g. "
                             "train2014)")
        if os.path.isabs(e.image):
            return e.image
        return os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(data.files[0])), e.image))

    def _oracle_index(self, data: RefData) -> Dict[Any, List[List[float]]]:
        if data.gt_boxes is not None:
            return data.gt_boxes
        if self.instances is None:
            raise ValueError(f"{self._where()}: oracle proposals need the images' COCO annotations: pass instances= "
                             "(--instances; e.g. instances_train2014.json)")
        inst = read_json(self.instances, "COCO annotation")
        _, _, per_image = _coco_index(inst, self.instances)
        data.gt_boxes = _oracle_boxes(per_image, self.instances, {})
        return data.gt_boxes

    def items(self) -> List[Item]:
        if self._items is not None:
            return list(self._items)
        data = self.data()
        splits = self.splits
        chosen = [e for e in data.exprs if any(in_split(e.split, s) for s in splits)]
        if self.images is not None and data.form != "expression list" and not os.path.isdir(self.images):
            raise FileNotFoundError(f"images folder not found: {self.images}" if not os.path.exists(self.images)
                                    else f"the images folder is a file: {self.images}")
        oracle = self._oracle_index(data) if self.oracle_proposals else None
        items = []
        for e in chosen:
            task: Dict[str, Any] = {"expression": e.expression, "gt": list(e.box), "split": e.split}
            if oracle is not None:
                if e.image_id not in oracle:
                    raise ValueError(f"{self._where()}: oracle boxes: image {e.image_id!r} ({e.image}) has no COCO "
                                     f"annotations in {self.instances or data.files[-1]}")
                task["boxes"] = oracle[e.image_id]
            items.append(Item(key=e.key, image=self._image_path(e, data), image_id=e.image_id, task=task))
        if self.source is not None:
            check_coverage(self.source, ((it.image, it.image_id) for it in items), self._where())
        self._items = items
        return list(items)

    # ------------------------------------------------------------------ one request
    def proposals_for(self, item: Item) -> Proposals:
        """The proposals the model is shown for `item`: the first max_proposals of the source."""
        if self.oracle_proposals:
            p = Proposals(np.asarray(item.task["boxes"], dtype=np.float64).reshape(-1, 4))
        else:
            p = lookup(self.source, item.image, item.image_id)
        return p[:self.max_proposals] if len(p) > self.max_proposals else p

    def run_item(self, model, item: Item) -> Dict[str, Any]:
        if not os.path.isfile(item.image):
            raise FileNotFoundError(f"image not found: {item.image}")
        props = self.proposals_for(item)
        kw: Dict[str, Any] = {}
        if self.max_new_tokens is not None:
            kw["max_new_tokens"] = self.max_new_tokens
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # invalid region indices: kept in the record
            res = model.refer(item.image, item.task["expression"], boxes=props.boxes, scores=props.scores, **kw)
        picked = [int(i) for i in res.region_indices]
        pred = [float(v) for v in res.boxes[0]] if picked else None
        best = float(box_iou(props.boxes, item.task["gt"]).max()) if len(props) else 0.0
        return {"answer": res.text, "picked": picked, "pred_box": pred, "n_proposals": len(props),
                "best_proposal_iou": best, "invalid_indices": [int(i) for i in res.invalid_indices],
                "finish_reason": res.finish_reason}

    # ------------------------------------------------------------------ scoring
    def score(self, records: Mapping[str, Dict[str, Any]]) -> Dict[str, Any]:
        """The report over every expression of the reported splits (those without a record count as wrong)."""
        return self.score_subset(records, [it.key for it in self.items()])

    def score_subset(self, records: Mapping[str, Dict[str, Any]], keys: Sequence[str]) -> Dict[str, Any]:
        """The report over the expressions `keys` only (a limited run): per split and overall, those without a record
        count as wrong; a split with none of them has accuracy None."""
        by_key = {it.key: it for it in self.items()}
        scope = []
        for k in dict.fromkeys(keys):
            if k not in by_key:
                raise ValueError(f"{k!r} is not an expression of {self._where()} (splits {', '.join(self.splits)})")
            scope.append(by_key[k])
        thr = self.iou_threshold
        outcome: Dict[str, Tuple[bool, bool, bool, bool]] = {}   # key -> (answered, picked, correct, covered)
        for it in scope:
            rec = records.get(it.key)
            if rec is None:
                outcome[it.key] = (False, False, False, False)
                continue
            pred = rec.get("pred_box")
            ok = pred is not None and float(box_iou([pred], it.task["gt"])[0]) >= thr
            covered = float(rec.get("best_proposal_iou", 0.0)) >= thr
            outcome[it.key] = (True, pred is not None, ok, covered)

        def tally(keys: List[str]) -> Dict[str, Any]:
            n = len(keys)
            answered = sum(outcome[k][0] for k in keys)
            picked = sum(outcome[k][1] for k in keys)
            correct = sum(outcome[k][2] for k in keys)
            covered = sum(outcome[k][3] for k in keys)
            return {"expressions": n, "answered": answered, "missing": n - answered, "no_pick": answered - picked,
                    "correct": correct, "accuracy": correct / n if n else None,
                    "proposal_recall": covered / n if n else None}

        per_split = {s: tally([it.key for it in scope if in_split(it.task["split"], s)]) for s in self.splits}
        data = self.data()
        return {"benchmark": self.name, "metric": f"Acc@{thr:g}", "dataset": data.dataset, "split_by": data.split_by,
                "form": data.form, "iou_threshold": thr, "proposals": self._proposal_text(),
                "of_expressions": len(by_key), "splits": per_split, "overall": tally([it.key for it in scope])}

    def _proposal_text(self) -> str:
        if self.oracle_proposals:
            return "oracle: the image's ground-truth boxes"
        d = describe_source(self.source)
        return f"{d['kind']}({d['name']})" if "name" in d else d["kind"]

    def summary(self, report: Mapping[str, Any]) -> str:
        title = (f"{report['dataset']}" + (f" ({report['split_by']})" if report.get("split_by") else "")
                 + f" — {report['metric']}, proposals: {report['proposals']}")
        head = f"{'split':<10} {'expressions':>11} {'answered':>9} {'no pick':>8} {report['metric']:>9} " \
               f"{'proposal ceiling':>17}"
        lines = [title, head, "-" * len(head)]
        rows = list(report["splits"].items()) + [("overall", report["overall"])]

        def pct(x: Optional[float], width: int) -> str:
            return f"{'-':>{width}} " if x is None else f"{100 * x:>{width}.2f}%"
        for name, r in rows:
            lines.append(f"{name:<10} {r['expressions']:>11} {r['answered']:>9} {r['no_pick']:>8} "
                         f"{pct(r['accuracy'], 8)} {pct(r['proposal_recall'], 16)}")
        n, total = report["overall"]["expressions"], report.get("of_expressions", report["overall"]["expressions"])
        if n < total:
            lines.append(f"the first {n} of the {total} expressions (a limited run); '-' = no expression of the split")
        if report["overall"]["missing"]:
            lines.append(f"{report['overall']['missing']} expressions without a record (failed or not run) count as "
                         f"wrong and not covered")
        return "\n".join(lines)

    def settings(self) -> Dict[str, Any]:
        data = self.data()
        return {"benchmark": self.name, "form": data.form, "dataset": data.dataset, "split_by": data.split_by,
                "files": [file_info(f) for f in data.files], "splits": self.splits,
                "prompt": REC_TEMPLATE, "proposals": ({"kind": "oracle"} if self.oracle_proposals
                                                      else describe_source(self.source)),
                "instances": None if self.instances is None else file_info(self.instances),
                "box_format": self.box_format if data.form == "expression list" else None,
                "iou_threshold": self.iou_threshold, "max_new_tokens": self.max_new_tokens,
                "max_proposals": self.max_proposals, "prediction": "first picked region"}

    # ------------------------------------------------------------------ the command line (vlmfo1 eval refcoco)
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("--images", required=True, metavar="DIR", help="the folder of the COCO images (train2014)")
        p.add_argument("--annotations", required=True, nargs="+", metavar="FILE",
                       help="the refer toolkit folder (refcoco/ with refs(unc).p + instances.json), its data root "
                            "with --dataset, a refs(...).p, MDETR finetune_*.json or .jsonl expression lists")
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--proposals", metavar="FILE",
                       help="proposals of the images: a COCO detection-results JSON of any detector (sorted by score), "
                            "or the official COCO .jsonl layout")
        g.add_argument("--oracle-proposals", action="store_true",
                       help="use each image's ground-truth boxes as the proposals (an upper-bound diagnostic)")
        p.add_argument("--dataset", choices=DATASETS,
                       help="which of the refer data root's folders to read; names the report")
        p.add_argument("--splits", "--split", nargs="+", metavar="SPLIT", dest="splits",
                       help="the splits to report (default: every split but train: val, testA, testB / val, test)")
        p.add_argument("--split-by", metavar="NAME", help="the refs file when there are several: unc, umd, google")
        p.add_argument("--instances", metavar="FILE",
                       help="COCO instances JSON for --oracle-proposals with the JSON forms (instances_train2014.json)")
        p.add_argument("--box-format", choices=["xyxy", "xywh"], default="xyxy",
                       help="the boxes of an expression list (default xyxy)")
        p.add_argument("--iou-threshold", type=float, default=0.5, metavar="T", help="correct at IoU >= T (0.5)")
        p.add_argument("--max-new-tokens", type=int, metavar="N",
                       help="answer length cap (default: sized by the task, 32 + 2 per proposal)")
        p.add_argument("--max-proposals", type=int, default=100, metavar="N",
                       help="proposals per expression, the first N (default 100, FO1's limit)")

    @classmethod
    def from_args(cls, args) -> "RefCocoEvaluator":
        ann = args.annotations[0] if len(args.annotations) == 1 else args.annotations
        return cls(args.images, ann, args.proposals, oracle_proposals=args.oracle_proposals, dataset=args.dataset,
                   splits=args.splits, split_by=args.split_by, instances=args.instances, box_format=args.box_format,
                   iou_threshold=args.iou_threshold, max_new_tokens=args.max_new_tokens,
                   max_proposals=args.max_proposals)
