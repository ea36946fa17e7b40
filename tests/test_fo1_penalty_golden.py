"""VLM-FO1 + repetition_penalty in generation_config.json, against the official code (ERRATA E8).

tests/golden/fo1_penalty_golden.json was made by tests/golden/make_fo1_penalty_golden.py (official VLM-FO1 e6bef8d,
transformers 4.50.1; see tests/golden/README.md) on the tiny random FO1 checkpoint (SimpleFP, dynamic, seed 0):
  * "official_rp*": the official generate with the penalty in generation_config.json RAISES (its prompt ids hold
    the placeholders -200/-300, which the penalty processor gathers at) -> vlmfo1's FO1 default is no penalty
    (with a warning), which equals the official run's only possible output: "no_penalty".
  * "skip_negative_rp*": the official run with the penalty processor skipping the negative ids: what vlmfo1
    applies when `repetition_penalty=` is passed explicitly (prompt's real ids + generated ids; bf16 logits ->
    float32 -> penalty -> argmax).
"""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
TIKTOKEN = SHARED / "tokenizer" / "qwen.tiktoken"
GOLDEN = HERE / "golden" / "fo1_penalty_golden.json"

pytestmark = pytest.mark.skipif(not TIKTOKEN.exists() or not GOLDEN.exists(), reason="shared data or golden missing")


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def fo1(tmp_path_factory, golden):
    from vlmfo1.fo1 import FO1
    from vlmfo1.testing.fo1 import write_random_fo1
    c = golden["checkpoint"]
    path = str(tmp_path_factory.mktemp("fo1pen") / "VLM-FO1_Qwen2.5-VL-3B-tiny-pen")
    write_random_fo1(path, size="tiny", seed=c["seed"], simple_fpn=c["simple_fpn"],
                     aux_image_aspect_ratio=c["aux_image_aspect_ratio"], tiktoken_path=str(TIKTOKEN))
    g = json.loads(open(os.path.join(path, "generation_config.json")).read())
    g["repetition_penalty"] = 1.5
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(g, f)
    with pytest.warns(RuntimeWarning, match="not applied to VLM-FO1"):
        m = FO1.load(path, mode="reference", compute="f32", n_threads=2)
    return m


def _run(fo1, golden, case, **kw):
    c = golden["cases"][case]
    image = str(SHARED / "coco_tiny" / "val2017" / golden["image"])
    trace = {}
    fo1.prepare(image, np.array(c["boxes_xyxy"]), c["prompt_text"], trace=trace)
    assert trace["input_ids"] == c["input_ids"]
    return list(fo1.stream_ids(image, np.array(c["boxes_xyxy"]), c["prompt_text"],
                               max_new_tokens=golden["max_new_tokens"], stop_ids=[], **kw))


def test_official_raises_with_penalty(golden):
    for rp in ("1.5", "1.05"):
        c = golden["cases"][f"official_rp{rp}"]
        assert c["raised"] == "RuntimeError" and "-200" in c["message"], c
    assert golden["versions"]["transformers"] == "4.50.1"


def test_default_is_official_behaviour(fo1, golden):
    """generation_config.json says 1.5, but FO1 runs without a penalty by default: the official output."""
    assert fo1.decoder.generation.repetition_penalty == 1.0
    assert fo1.decoder.generation.config_repetition_penalty == 1.5
    want = golden["cases"]["no_penalty"]["greedy_ids"]
    got = _run(fo1, golden, "no_penalty")
    print(f"[fo1 penalty] default: {sum(a == b for a, b in zip(got, want))}/{len(want)} equal")
    assert got == want


@pytest.mark.parametrize("rp", [1.5, 1.05])
def test_explicit_penalty_matches_official_skip_negative(fo1, golden, rp):
    case = f"skip_negative_rp{rp}"
    want = golden["cases"][case]["greedy_ids"]
    got = _run(fo1, golden, case, repetition_penalty=rp)
    print(f"[fo1 penalty] {case}: {sum(a == b for a, b in zip(got, want))}/{len(want)} equal")
    assert want != golden["cases"]["no_penalty"]["greedy_ids"]    # the penalty changes the official tokens
    assert got == want


def test_fo1_tokenizer_is_slow(fo1):
    assert fo1.tokenizer.slow
    assert fo1.tokenizer.encode("<|im_end|>\u0338") == [27, 91, 318, 6213, 91, 58994, 107]
