"""Benchmark evaluation: COCO detection mAP, RefCOCO/+/g Acc@0.5, CountBench and PixmoCount accuracy — resumable
runs on one machine (`workers`) or a Ray cluster. See `base.py` for the evaluator/runner contract."""
from .base import Evaluator, Item

__all__ = ["Evaluator", "Item"]
