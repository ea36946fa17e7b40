"""The contract between an evaluator (what to ask, how to score) and the runner (order, resume, workers, Ray).

An evaluator turns a benchmark's files into a deterministic list of `Item`s, answers one item with a model
(`run_item`, which returns a JSON-serialisable record: the raw answer and the parsed predictions) and scores the
records (`score`). The runner (`vlmfo1.eval.runner`) owns everything else: the append-only JSONL file that makes a
run resumable, the per-item error records, the progress bar, worker processes and Ray actors.

`model` in `run_item` is anything with the `vlmfo1.VLMFO1` task methods (`detect`, `refer`, `count`, `generate`,
...): a loaded model, or in tests a scripted stand-in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence


@dataclass(frozen=True)
class Item:
    """One unit of work: one model request (an image with one prompt)."""
    key: str                          # unique and stable across runs; records are keyed (and resumed) by it
    image: str                        # path of the image file
    image_id: Any = None              # JSON scalar the benchmark uses for the image (COCO id, file name, ...)
    task: Dict[str, Any] = field(default_factory=dict)   # JSON-serialisable arguments `run_item` needs


class Evaluator:
    """Base class of the benchmark evaluators. Subclasses set `name` and implement the four methods."""

    name: str = ""

    def items(self) -> List[Item]:
        """Every item of the benchmark, in a deterministic order, inputs already validated (a bad annotation
        or proposal file raises a ValueError that names the file and what is wrong, before any model work)."""
        raise NotImplementedError

    def run_item(self, model, item: Item) -> Dict[str, Any]:
        """Ask `model` about `item`; a JSON-serialisable record with at least "answer" (the raw text) and the
        parsed predictions the scorer needs. An exception here becomes the item's error record."""
        raise NotImplementedError

    def score(self, records: Mapping[str, Dict[str, Any]]) -> Dict[str, Any]:
        """The JSON report (metrics and tables) from the successful records, keyed by `Item.key`; items with no
        record (failed or not run) count as wrong / missing as the benchmark's protocol says."""
        raise NotImplementedError

    def summary(self, report: Mapping[str, Any]) -> str:
        """A plain-text table of `report` for stdout."""
        raise NotImplementedError

    def settings(self) -> Dict[str, Any]:
        """JSON that identifies what this run asks and scores (input files with their sizes, prompts, options).
        The runner stores it with the run and refuses to resume a run made with different settings."""
        raise NotImplementedError

    # ---- optional hooks with defaults (added with the runner; evaluators may override them)

    def score_subset(self, records: Mapping[str, Dict[str, Any]], keys: Sequence[str]) -> Dict[str, Any]:
        """The report over the items `keys` only: the runner calls this (with every key of `items()` when there is
        no limit, the first K with `limit=K`). Items of `keys` without a record count as wrong / missing; items
        outside `keys` are left out of the report. The default calls `score` with the records of `keys`, which is
        right only when `keys` is every item (`score` counts over the whole benchmark): evaluators override it so
        that a limited run is scored over its own items (every evaluator of vlmfo1.eval does: CocoEvaluator restricts
        the ground truth to them, RefCocoEvaluator and the counting evaluators count over them)."""
        wanted = set(keys)
        return self.score({k: v for k, v in records.items() if k in wanted})

    def export(self, records: Mapping[str, Dict[str, Any]], keys: Sequence[str], out_dir: str) -> List[str]:
        """Write benchmark-specific files into the run folder after scoring (e.g. COCO's results JSON); return
        their names. Default: nothing."""
        return []
