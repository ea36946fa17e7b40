"""Benchmark evaluation: COCO detection mAP, RefCOCO/+/g Acc@0.5, CountBench and PixmoCount accuracy — resumable
runs on one machine (`workers`) or a Ray cluster. See `base.py` for the evaluator/runner contract, `runner.py` for
the run folder and the resume rules, `registry.py` for the `vlmfo1 eval` subcommands."""
from .base import Evaluator, Item
from .coco import CocoEvaluator
from .counting import CountBenchEvaluator, CountingEvaluator, PixmoCountEvaluator
from .refcoco import RefCocoEvaluator
from .runner import RunInterrupted, run

__all__ = ["Evaluator", "Item", "run", "RunInterrupted", "CocoEvaluator", "RefCocoEvaluator", "CountingEvaluator",
           "CountBenchEvaluator", "PixmoCountEvaluator"]
