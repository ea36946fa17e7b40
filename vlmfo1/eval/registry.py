"""The benchmarks `vlmfo1 eval NAME` knows: name -> (evaluator class, argument adder).

Each entry gives the CLI what it needs to offer `vlmfo1 eval NAME ...`: the argument adder puts the benchmark's own
options on its subparser (the runner's options --model, --out, --workers, --threads, --limit, --ray, ... are added by
the CLI for every benchmark), and `cls.from_args(args)` builds the evaluator from the parsed arguments. Adding a
benchmark is one import and one line here, e.g.

    from .refcoco import RefCocoEvaluator
    EVALUATORS["refcoco"] = (RefCocoEvaluator, RefCocoEvaluator.add_arguments)
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

from .coco import CocoEvaluator

EVALUATORS: Dict[str, Tuple[type, Callable]] = {
    "coco": (CocoEvaluator, CocoEvaluator.add_arguments),
}
