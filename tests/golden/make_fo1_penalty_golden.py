#!/usr/bin/env python3
"""Golden file for VLM-FO1 + a repetition penalty in generation_config.json (ERRATA E8): fo1_penalty_golden.json.

Runs the OFFICIAL VLM-FO1 code (a checkout given with --official; nothing of it is copied here) through the same
harness as make_fo1_golden.py (same environment, shims and tiny checkpoint writer) on a tiny random FO1 checkpoint
(SimpleFP, dynamic, seed 0) whose generation_config.json sets `repetition_penalty`, on one COCO image:

  1. "official": the official `prepare_inputs` + `model.generate` exactly as the official scripts call them
     (do_sample=False, temperature=0.0, top_p=0.05). transformers merges generation_config.json, so its
     RepetitionPenaltyLogitsProcessor receives the official `inputs` ids, which hold the placeholders -200 / -300;
     the exception it raises is recorded (type, message, where).
  2. "skip_negative": the same run with ONE change: the penalty processor drops the negative placeholder ids before
     its gather/scatter (what vlmfo1 applies when a penalty is requested explicitly for FO1). Reference numerics as
     the shipped run has them: rotary inv_freq bf16-rounded by the loader (E1), the lm_head output rounded to bf16
     by a forward hook and widened by `.float()` inside generate before the processors (E2, E8: bf16 logits ->
     float32 -> penalty -> argmax, ties to the lowest id). Greedy ids recorded for each penalty.
  3. "no_penalty": the penalty key removed (= 1.0), same numerics as 2, as a control that the penalty changes tokens.

    /tmp/fo1ref/bin/python tests/golden/make_fo1_penalty_golden.py --official /path/to/VLM-FO1 --out tests/golden/
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_fo1_golden as mg  # noqa: E402  (also puts the repo on sys.path)
import torch  # noqa: E402

from vlmfo1.testing.fo1 import GENERATION_CONFIG, write_random_fo1  # noqa: E402

IMAGE = "000000404484.jpg"
PENALTIES = (1.5, 1.05)
MAX_NEW = 32


def set_generation_config(path: Path, penalty):
    g = dict(GENERATION_CONFIG)
    if penalty is not None:
        g["repetition_penalty"] = penalty
    (path / "generation_config.json").write_text(json.dumps(g, indent=2))
    return g


def patch_penalty_skip_negative():
    """RepetitionPenaltyLogitsProcessor that leaves out negative ids (the official run's placeholders)."""
    from transformers.generation import logits_process as lp
    orig = lp.RepetitionPenaltyLogitsProcessor.__call__

    def call(self, input_ids, scores):
        rows = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][input_ids[b] >= 0]
            score = torch.gather(scores[b:b + 1], 1, ids[None])
            score = torch.where(score < 0, score * self.penalty, score / self.penalty)
            rows.append(scores[b:b + 1].scatter(1, ids[None], score))
        return torch.cat(rows, 0)
    lp.RepetitionPenaltyLogitsProcessor.__call__ = call
    return lambda: setattr(lp.RepetitionPenaltyLogitsProcessor, "__call__", orig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True)
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    off = mg.Official(args.official, args.commit)
    import transformers
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
                "python": sys.version.split()[0]}
    tmp = Path(tempfile.mkdtemp(prefix="fo1pen_"))
    result = {"official_commit": off.commit, "versions": versions, "image": IMAGE, "max_new_tokens": MAX_NEW,
              "checkpoint": {"writer": "vlmfo1.testing.fo1.write_random_fo1", "size": "tiny",
                             "dtype": "bfloat16", "seed": mg.SEED, "simple_fpn": True,
                             "aux_image_aspect_ratio": "dynamic"},
              "numerics": "loader's bf16 inv_freq (E1), then model.float(); lm_head output rounded to bf16 by a "
                          "forward hook (E2), processors on logits.float(), argmax (ties to the lowest id)",
              "cases": {}}
    try:
        p = tmp / "VLM-FO1_Qwen2.5-VL-3B-tiny-pen"
        write_random_fo1(str(p), size="tiny", seed=mg.SEED, simple_fpn=True, aux_image_aspect_ratio="dynamic")
        for penalty in (None,) + PENALTIES:
            g = set_generation_config(p, penalty)
            tokenizer, model, procs = off.load(str(p))
            model.float()
            assert float(getattr(model.generation_config, "repetition_penalty", 1.0) or 1.0) == (penalty or 1.0)
            hook = model.lm_head.register_forward_hook(lambda m, i, o: o.to(torch.bfloat16).float())
            try:
                if penalty is not None:
                    name = f"official_rp{penalty}"
                    print(f"=== {name}", flush=True)
                    try:
                        mg.run_case(off, tokenizer, model, procs, str(p), IMAGE, "exact", max_new=MAX_NEW)
                        result["cases"][name] = {"generation_config": g, "raised": None}
                        print("    no exception", flush=True)
                    except Exception as e:  # noqa: BLE001 - recorded
                        tb = traceback.extract_tb(e.__traceback__)[-1]
                        result["cases"][name] = {
                            "generation_config": g, "raised": type(e).__name__, "message": str(e)[:300],
                            "where": f"{os.path.basename(tb.filename)}:{tb.lineno} {tb.line}"}
                        print(f"    raised {type(e).__name__}: {str(e)[:120]}", flush=True)
                    restore = patch_penalty_skip_negative()
                    name = f"skip_negative_rp{penalty}"
                else:
                    restore = lambda: None  # noqa: E731
                    name = "no_penalty"
                print(f"=== {name}", flush=True)
                try:
                    d = mg.run_case(off, tokenizer, model, procs, str(p), IMAGE, "exact", max_new=MAX_NEW)
                finally:
                    restore()
                result["cases"][name] = {
                    "generation_config": g, "repetition_penalty": penalty or 1.0,
                    "input_ids": d["input_ids"].tolist(), "greedy_ids": d["greedy_ids"].tolist(),
                    "text": str(d["text"]), "prompt_text": str(d["prompt_text"]),
                    "boxes_xyxy": d["boxes_xyxy"].tolist(),
                    "prefill_logits_top64_ids": d["prefill_logits_top64_ids"].tolist(),
                    "prefill_logits_top64_val": d["prefill_logits_top64_val"].tolist()}
                print(f"    {len(d['greedy_ids'])} ids: {d['greedy_ids'].tolist()}", flush=True)
            finally:
                hook.remove()
            del model
        Path(args.out).mkdir(parents=True, exist_ok=True)
        out = Path(args.out) / "fo1_penalty_golden.json"
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
