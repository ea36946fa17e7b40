"""CountBench and PixmoCount: how many objects VLM-FO1 counts among the UPN proposals of the official files, scored
exactly as the official `evaluation/eval_countbench.py` (spec fo1_architecture.md §6.3).

    from vlmfo1.eval import CountBenchEvaluator, PixmoCountEvaluator, run
    ev = CountBenchEvaluator("countbench_images/", "fo1_eval/countbench_with_upn_score_0.3_0.8.json")
    ev = PixmoCountEvaluator("pixmo_images/", "fo1_eval/")     # a folder holding the official file
    run(ev, "/path/to/VLM-FO1_Qwen2.5-VL-3B-v01", "runs/pixmocount", workers=2)
    vlmfo1 eval countbench --model DIR --images DIR --annotations countbench_with_upn_score_0.3_0.8.json --out RUN

Data: the official files (`countbench_with_upn_score_0.3_0.8.json`, 487 items; `pixmoCount_with_upn_score_0.3_0.8.json`,
529 items): a JSON list of {"question", "answer" (int), "image" (a file name: "image_K.jpg", "00000-K.jpg"),
"bboxes" (xyxy ints, at most 100), "scores" (CountBench only)}. Users bring the images (`images=`, a folder with
those file names). A malformed file is a ValueError naming the record before any model work; an item whose image
is missing fails alone (FileNotFoundError from run_item, recorded by the runner) and counts as wrong.

Request per item: the file's question verbatim (484 of the CountBench questions and all PixmoCount ones are the
counting template with "in the image?"; three CountBench questions are free-form), the file's boxes (and scores) as
the proposals (or `proposals=`, any proposal source; at most `max_proposals`, default 100, the first ones), greedy.
`max_new_tokens`: None gives 64 + 2 per box, as `model.count` sizes it (the official script passes 4096; an answer is
a few dozen tokens).

Scoring (§6.3, `count_from_answer`): remove every `<region\\d+>` from the answer, take the first match of
`(?<!region)\\d+` as the count (none: 0), exact match with "answer". Accuracy = correct / items; an item without a
record (failed or not run) counts as wrong; a run limited to its first K items (`run(..., limit=K)`) is scored over
those K (`score_subset`). The confusion table has one row per true count in the file and one
column per predicted count 0..10, predictions above 10 in one column ">10" (the files' counts are 2..10, so every
prediction above 10 is wrong the same way), and a column "none" for items without a record.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..proposals import Proposals, _record_proposals
from .base import Evaluator, Item
from .sources import (check_coverage, describe_source, file_info, lookup, max_new_tokens_opt, max_proposals_opt,
                      open_source, read_json)

__all__ = ["count_from_answer", "CountingEvaluator", "CountBenchEvaluator", "PixmoCountEvaluator", "CONFUSION_MAX"]

CONFUSION_MAX = 10          # predicted counts above this share one confusion column (">10")
_REGION_TAG = re.compile(r"<region\d+>")
_NUMBER = re.compile(r"(?<!region)\d+")


def count_from_answer(text: str) -> int:
    """The official CountBench / PixmoCount rule: strip `<region\\d+>` tags, then the first `(?<!region)\\d+` is the
    count; no number means 0. ("<region12> 3" -> 3, "region5 then 3" -> 3, "no idea" -> 0.)"""
    m = _NUMBER.findall(_REGION_TAG.sub("", text))
    return int(m[0]) if m else 0


class CountingEvaluator(Evaluator):
    """A counting benchmark in the official FO1 evaluation-file layout (see the module docstring).

    images: the folder of the benchmark's images (file names as in the file; users bring them).
    annotations: the JSON file, or a folder that holds `default_file`.
    proposals: None uses the file's boxes and scores; a proposal source (or file) replaces them.
    max_new_tokens: None -> 64 + 2 per box; max_proposals: the first N proposals (default 100, FO1's limit).
    A run of the first K items only is `run(..., limit=K)`, scored over those K (`score_subset`).
    """

    name = "counting"
    default_file: Optional[str] = None

    def __init__(self, images, annotations, proposals: Any = None, *, max_new_tokens: Optional[int] = None,
                 max_proposals: int = 100) -> None:
        path = os.fspath(annotations)
        if os.path.isdir(path):
            if self.default_file is None:
                raise ValueError(f"{path}: a folder; pass the JSON file itself")
            path = os.path.join(path, self.default_file)
        self.path = path
        if images is None:
            raise ValueError(f"{self.name}: pass images= (--images: the folder of the benchmark's images; users bring "
                             "them)")
        self.images = os.path.abspath(os.fspath(images))
        self.source = open_source(proposals)
        self.max_new_tokens = max_new_tokens_opt(max_new_tokens)
        self.max_proposals = max_proposals_opt(max_proposals)
        self._items: Optional[List[Item]] = None
        self._truth: Dict[str, int] = {}

    def __getstate__(self) -> Dict[str, Any]:
        """Pickled for worker processes without the parsed file (run_item needs only the item)."""
        state = dict(self.__dict__)
        state.update(_items=None, _truth={})
        return state

    # ------------------------------------------------------------------ inputs
    def _read(self) -> List[Item]:
        data = read_json(self.path, f"{self.name} evaluation")
        if not isinstance(data, list) or not data:
            raise ValueError(f"{self.path}: expected a non-empty JSON list of {{'question', 'answer', 'image', "
                             f"'bboxes', ...}} records, got {type(data).__name__}"
                             + (" (empty)" if isinstance(data, list) else ""))
        items, seen = [], {}
        for i, rec in enumerate(data):
            where = f"{self.path}: record {i}"
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected an object, got a {type(rec).__name__}")
            missing = [k for k in ("question", "answer", "image", "bboxes") if k not in rec]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)} (expected 'question', "
                                 f"'answer', 'image', 'bboxes' and optionally 'scores')")
            q, a, image = rec["question"], rec["answer"], rec["image"]
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"{where}: 'question' must be a non-empty string")
            if isinstance(a, bool) or not isinstance(a, int) or a < 0:
                raise ValueError(f"{where}: 'answer' must be a count (an int >= 0), got {a!r}")
            if not isinstance(image, str) or not image.strip() or os.path.basename(image) in ("", ".", ".."):
                raise ValueError(f"{where}: 'image' must be a file name, got {image!r}")
            name = os.path.basename(image)
            if name in seen:
                raise ValueError(f"{where}: image {name!r} appears twice (also record {seen[name]})")
            seen[name] = i
            props = _record_proposals(rec["bboxes"], rec.get("scores"), f"{where} ({name})")
            task = {"question": q, "boxes": props.boxes.tolist(),
                    "scores": None if props.scores is None else props.scores.tolist()}
            items.append(Item(key=name, image=os.path.join(self.images, name), image_id=name, task=task))
            self._truth[name] = a
        return items

    def items(self) -> List[Item]:
        if self._items is None:
            items = self._read()
            if not os.path.isdir(self.images):
                raise FileNotFoundError(f"images folder not found: {self.images}" if not os.path.exists(self.images)
                                        else f"the images folder is a file: {self.images}")
            if self.source is not None:
                check_coverage(self.source, ((it.image, None) for it in items), self.path)
            self._items = items
        return list(self._items)

    def truth(self, key: str) -> int:
        """The true count of an item."""
        self.items()                     # reads the file once (the truth comes with the items)
        return self._truth[key]

    # ------------------------------------------------------------------ one request
    def proposals_for(self, item: Item) -> Proposals:
        if self.source is None:
            p = Proposals(item.task["boxes"], item.task["scores"])
        else:
            p = lookup(self.source, item.image, None)
        return p[:self.max_proposals] if len(p) > self.max_proposals else p

    def run_item(self, model, item: Item) -> Dict[str, Any]:
        if not os.path.isfile(item.image):
            raise FileNotFoundError(f"image not found: {item.image}")
        props = self.proposals_for(item)
        mnt = self.max_new_tokens if self.max_new_tokens is not None else 64 + 2 * len(props)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # invalid region indices: kept in the record
            res = model.chat(item.image, item.task["question"], boxes=props.boxes, scores=props.scores,
                             max_new_tokens=mnt)
        return {"answer": res.text, "count": count_from_answer(res.text),
                "picked": [int(i) for i in res.region_indices],
                "invalid_indices": [int(i) for i in res.invalid_indices], "finish_reason": res.finish_reason}

    # ------------------------------------------------------------------ scoring
    def score(self, records: Mapping[str, Dict[str, Any]]) -> Dict[str, Any]:
        """The report over every item of the file (items without a record count as wrong)."""
        return self.score_subset(records, [it.key for it in self.items()])

    def score_subset(self, records: Mapping[str, Dict[str, Any]], keys: Sequence[str]) -> Dict[str, Any]:
        """The report over the items `keys` only (a limited run); those without a record count as wrong."""
        by_key = {it.key: it for it in self.items()}
        scope = []
        for k in dict.fromkeys(keys):
            if k not in by_key:
                raise ValueError(f"{k!r} is not an image of {self.path}")
            scope.append(by_key[k])
        columns = [str(c) for c in range(CONFUSION_MAX + 1)] + [f">{CONFUSION_MAX}", "none"]
        truths = sorted({self._truth[it.key] for it in scope})
        table = {t: [0] * len(columns) for t in truths}
        per = {t: [0, 0] for t in truths}                  # true count -> [items, correct]
        correct = answered = no_number = 0
        for it in scope:
            t = self._truth[it.key]
            rec = records.get(it.key)
            per[t][0] += 1
            if rec is None:
                table[t][-1] += 1
                continue
            answered += 1
            text = rec.get("answer", "")
            pred = count_from_answer(text if isinstance(text, str) else "")
            if not _NUMBER.search(_REGION_TAG.sub("", text if isinstance(text, str) else "")):
                no_number += 1
            table[t][pred if pred <= CONFUSION_MAX else CONFUSION_MAX + 1] += 1
            if pred == t:
                correct += 1
                per[t][1] += 1
        n = len(scope)
        return {"benchmark": self.name, "metric": "accuracy", "items": n, "of_items": len(by_key),
                "answered": answered, "missing": n - answered, "correct": correct,
                "accuracy": correct / n if n else None, "no_number": no_number,
                "per_count": {str(t): {"items": c[0], "correct": c[1], "accuracy": c[1] / c[0] if c[0] else None}
                              for t, c in per.items()},
                "confusion": {"rows": "true count", "columns": columns, "counts": {str(t): table[t] for t in truths}}}

    def summary(self, report: Mapping[str, Any]) -> str:
        acc = report["accuracy"]
        limited = report.get("of_items", report["items"]) > report["items"]
        lines = [f"{report['benchmark']}: accuracy " + ("-" if acc is None else f"{100 * acc:.2f}%")
                 + f" ({report['correct']}/{report['items']}"
                 + (f", the first {report['items']} of {report['of_items']} items" if limited else "")
                 + f"; {report['answered']} answered, {report['missing']} without a record, "
                 f"{report['no_number']} answers without a number counted as 0)",
                 "", "true \\ predicted"]
        cols = report["confusion"]["columns"]
        width = max(4, max(len(c) for c in cols) + 1)
        head = f"{'true':>5} " + "".join(f"{c:>{width}}" for c in cols) + f"{'acc':>8}"
        lines += [head, "-" * len(head)]
        for t, row in report["confusion"]["counts"].items():
            acc = report["per_count"][t]["accuracy"]
            lines.append(f"{t:>5} " + "".join(f"{v:>{width}}" for v in row) + f"{100 * acc:>7.1f}%")
        return "\n".join(lines)

    def settings(self) -> Dict[str, Any]:
        return {"benchmark": self.name, "annotations": file_info(self.path),
                "prompt": "the question of each record, verbatim",
                "proposals": ({"kind": "the file's bboxes and scores"} if self.source is None
                              else describe_source(self.source)),
                "max_new_tokens": self.max_new_tokens if self.max_new_tokens is not None else "64 + 2 per box",
                "max_proposals": self.max_proposals,
                "scoring": "strip <region\\d+>, first (?<!region)\\d+ else 0, exact match"}

    # ------------------------------------------------------------------ the command line (vlmfo1 eval countbench)
    @classmethod
    def add_arguments(cls, p) -> None:
        p.add_argument("--images", required=True, metavar="DIR",
                       help="the folder of the benchmark's images (the file names of the annotation file)")
        p.add_argument("--annotations", required=True, metavar="FILE",
                       help=f"the official {cls.default_file} (or the folder holding it)")
        p.add_argument("--proposals", metavar="FILE",
                       help="proposals of the images instead of the annotation file's own UPN boxes (any proposal file "
                            "keyed by the image file name)")
        p.add_argument("--max-new-tokens", type=int, metavar="N",
                       help="answer length cap (default: sized by the task, 64 + 2 per proposal)")
        p.add_argument("--max-proposals", type=int, default=100, metavar="N",
                       help="proposals per image, the first N (default 100, FO1's limit)")

    @classmethod
    def from_args(cls, args) -> "CountingEvaluator":
        return cls(args.images, args.annotations, args.proposals, max_new_tokens=args.max_new_tokens,
                   max_proposals=args.max_proposals)


class CountBenchEvaluator(CountingEvaluator):
    """CountBench accuracy of VLM-FO1 counting among the official file's UPN proposals (spec 6.3)."""
    name = "countbench"
    default_file = "countbench_with_upn_score_0.3_0.8.json"


class PixmoCountEvaluator(CountingEvaluator):
    """PixmoCount accuracy of VLM-FO1 counting among the official file's UPN proposals (spec 6.3)."""
    name = "pixmocount"
    default_file = "pixmoCount_with_upn_score_0.3_0.8.json"
