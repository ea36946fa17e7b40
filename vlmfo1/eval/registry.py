"""The benchmarks `vlmfo1 eval NAME` knows: name -> (evaluator class, argument adder).

Each entry gives the CLI what it needs to offer `vlmfo1 eval NAME ...`: the argument adder puts the benchmark's own
options on its subparser (the runner's options --model, --out, --workers, --threads, --limit, --item-timeout, --ray,
... are added by the CLI for every benchmark), and `cls.from_args(args)` builds the evaluator from the parsed
arguments. The same things have the same option names in every benchmark: --images DIR, --annotations FILE,
--proposals FILE / --oracle-proposals, --max-new-tokens N, --max-proposals N. Adding a benchmark is one import and
one line here.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

from .coco import CocoEvaluator
from .counting import CountBenchEvaluator, PixmoCountEvaluator
from .refcoco import RefCocoEvaluator

EVALUATORS: Dict[str, Tuple[type, Callable]] = {
    "coco": (CocoEvaluator, CocoEvaluator.add_arguments),
    "refcoco": (RefCocoEvaluator, RefCocoEvaluator.add_arguments),
    "countbench": (CountBenchEvaluator, CountBenchEvaluator.add_arguments),
    "pixmocount": (PixmoCountEvaluator, PixmoCountEvaluator.add_arguments),
}
