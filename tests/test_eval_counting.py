"""CountBench / PixmoCount evaluators (vlmfo1/eval/counting.py) on the official files (../shared/data/fo1_eval).

The model is a scripted stand-in (`ScriptedCountingModel`, a test double that only replays the answers it is given):
per item it answers one of the templates in ANSWERS, whose predicted count under the §6.3 rule is written out by
hand here (region tags are not numbers, "region5" is not a number but "region55" holds a 5, no number means 0,
"07" is 7, the first number wins). The expected accuracy and confusion table are computed here from the file's true
counts and those hand-written predictions, and must equal the evaluator's. A couple of items also go through the
real tiny random FO1 checkpoint.

Items are driven by `drive` (a plain loop with the runner's record / error semantics) until vlmfo1.eval.runner lands.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from vlmfo1.eval.counting import (CountBenchEvaluator, CountingEvaluator, PixmoCountEvaluator, count_from_answer)
from vlmfo1.fo1_prompt import parse_answer
from vlmfo1.proposals import CallableProposals

HERE = os.path.dirname(os.path.abspath(__file__))
FO1_EVAL = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "fo1_eval")
COUNTBENCH = os.path.join(FO1_EVAL, "countbench_with_upn_score_0.3_0.8.json")
PIXMO = os.path.join(FO1_EVAL, "pixmoCount_with_upn_score_0.3_0.8.json")
COCO_IMAGES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "coco_tiny", "val2017")

if not os.path.isfile(COUNTBENCH):
    pytest.skip("the official fo1_eval files are not here", allow_module_level=True)


def drive(ev, model):
    """Every item through run_item, as the runner does: a record (JSON round trip) or an error per key."""
    records, errors = {}, {}
    for it in ev.items():
        try:
            records[it.key] = json.loads(json.dumps(ev.run_item(model, it)))
        except Exception as e:  # noqa: BLE001 - the runner records any exception of one item
            errors[it.key] = f"{type(e).__name__}: {e}"
    return records, errors


# (answer template with {t} = the true count, predicted count as a function of t) — predictions written out by hand
ANSWERS = [
    ("<ground>headsets</ground><objects><region0><region1></objects>There are {t} headsets.", lambda t: t),
    ("<region12><region3> There are {t}.", lambda t: t),                 # region digits are not counted
    ("I cannot tell.", lambda t: 0),                                    # no number: 0
    ("region5 then {t}", lambda t: t),                                  # (?<!region): the 5 of region5 is skipped
    ("{u} or {t}", lambda t: t + 1),                                    # the first number wins
    ("There are {t:02d} of them", lambda t: t),                         # "07" is 7
    ("<ground>x</ground><objects><region4><region7></objects>", lambda t: 0),   # only tags: 0
    ("{v}", lambda t: t + 5),                                           # above 10 for t > 5
    ("region55 objects", lambda t: 5),                                  # the second 5 is not after "region"
    ("<region10>{t}<region2>1", lambda t: int(f"{t}1")),                # tags removed first: "{t}1"
]


class ScriptedCountingModel:
    """TEST DOUBLE, not a model: `chat` replays a prepared answer per image and notes what it was asked."""

    def __init__(self, answers):
        self.answers = answers          # image file name -> text
        self.calls = {}

    def chat(self, image, text, boxes=None, scores=None, max_new_tokens=None, **kw):
        name = os.path.basename(image)
        self.calls[name] = {"text": text, "boxes": np.asarray(boxes).tolist(),
                            "scores": None if scores is None else np.asarray(scores).tolist(),
                            "max_new_tokens": max_new_tokens, "kw": kw}
        return parse_answer(self.answers[name], np.asarray(boxes, dtype=np.float64).reshape(-1, 4), scores=scores,
                            task="chat", finish_reason="stop")


def images_dir(tmp_path, names, skip=()):
    """A folder with a (placeholder) file per image name, except `skip`."""
    d = tmp_path / "images"
    d.mkdir(exist_ok=True)
    for n in names:
        if n not in skip:
            (d / n).write_bytes(b"placeholder")
    return str(d)


def test_count_rule_table():
    cases = {"There are 3 dogs.": 3, "<region12>": 0, "<region12> 7": 7, "<region12><region3>There are 4": 4,
             "none here": 0, "": 0, "region5": 0, "region5 6": 6, "region55": 5, "12 or 3": 12, "007": 7,
             "<region1>2<region3>4": 24, "<region1>x<region3>4": 4, "two dogs": 0, "<regionX> 8": 8,
             "3.5": 3, "-2": 2, "<ground>dog</ground><objects><region0><region1></objects>2": 2}
    for text, want in cases.items():
        assert count_from_answer(text) == want, text


@pytest.mark.parametrize("cls,path,n", [(CountBenchEvaluator, COUNTBENCH, 487), (PixmoCountEvaluator, PIXMO, 529)])
def test_items_mirror_the_file(cls, path, n, tmp_path):
    with open(path) as f:
        data = json.load(f)
    ev = cls(FO1_EVAL, images=images_dir(tmp_path, []))          # a folder: the official file name is used
    items = ev.items()
    assert len(items) == n == len(data)
    for it, rec in zip(items, data):
        assert it.key == rec["image"] == it.image_id
        assert it.image == os.path.join(str(tmp_path / "images"), rec["image"])
        assert it.task["question"] == rec["question"]
        assert it.task["boxes"] == [[float(v) for v in b] for b in rec["bboxes"]]
        assert it.task["scores"] == rec.get("scores")
        assert ev.truth(it.key) == rec["answer"]
    assert [it.key for it in ev.items()] == [it.key for it in items]
    s = ev.settings()
    json.dumps(s)
    assert s["annotations"] == {"path": os.path.abspath(path), "bytes": os.path.getsize(path)}
    assert s["benchmark"] == cls.name


def test_countbench_accuracy_and_confusion_equal_the_independent_values(tmp_path):
    with open(COUNTBENCH) as f:
        data = json.load(f)[:60]
    names = [r["image"] for r in data]
    absent = set(names[7:10])                                      # the user lacks three images
    ev = CountBenchEvaluator(COUNTBENCH, images=images_dir(tmp_path, names, skip=absent), limit=60)
    answers, predicted = {}, {}
    for i, r in enumerate(data):
        template, pred = ANSWERS[i % len(ANSWERS)]
        t = r["answer"]
        answers[r["image"]] = template.format(t=t, u=t + 1, v=t + 5)
        predicted[r["image"]] = pred(t)
    model = ScriptedCountingModel(answers)
    records, errors = drive(ev, model)
    assert set(errors) == absent
    assert all(e.startswith("FileNotFoundError: image not found") for e in errors.values())
    report = ev.score(records)

    truth = {r["image"]: r["answer"] for r in data}
    answered = [n for n in names if n not in absent]
    correct = sum(predicted[n] == truth[n] for n in answered)
    assert report["items"] == 60 and report["answered"] == 57 and report["missing"] == 3
    assert report["correct"] == correct
    assert report["accuracy"] == correct / 60
    assert 0.3 < report["accuracy"] < 0.8
    assert report["no_number"] == sum(ANSWERS[i % len(ANSWERS)][0] in ("I cannot tell.", ANSWERS[6][0])
                                      for i, n in enumerate(names) if n not in absent)
    assert {n: records[n]["count"] for n in answered} == {n: predicted[n] for n in answered}
    # confusion: rows = true counts in the file, columns 0..10, >10, none (no record)
    cols = report["confusion"]["columns"]
    assert cols == [str(c) for c in range(11)] + [">10", "none"]
    want = {str(t): [0] * len(cols) for t in sorted(set(truth.values()))}
    for n in names:
        row = want[str(truth[n])]
        if n in absent:
            row[-1] += 1
        else:
            row[min(predicted[n], 11)] += 1
    assert report["confusion"]["counts"] == want
    assert any(row[11] for row in report["confusion"]["counts"].values())    # some predictions above 10
    for t, row in report["per_count"].items():
        items_t = [n for n in names if truth[n] == int(t)]
        assert row["items"] == len(items_t)
        assert row["correct"] == sum(n not in absent and predicted[n] == truth[n] for n in items_t)
    # what the model was asked: the file's question verbatim, its boxes and scores, 64 + 2 per box new tokens
    for r in data:
        if r["image"] in absent:
            continue
        call = model.calls[r["image"]]
        assert call["text"] == r["question"]
        assert call["boxes"] == [[float(v) for v in b] for b in r["bboxes"]]
        assert call["scores"] == r["scores"]
        assert call["max_new_tokens"] == 64 + 2 * len(r["bboxes"])
    text = ev.summary(report)
    assert text.splitlines()[0].startswith(f"countbench: accuracy {100 * correct / 60:.2f}% ({correct}/60")
    assert ">10" in text and "none" in text


def test_pixmocount_without_scores_and_options(tmp_path):
    with open(PIXMO) as f:
        data = json.load(f)[:5]
    names = [r["image"] for r in data]
    ev = PixmoCountEvaluator(PIXMO, images=images_dir(tmp_path, names), limit=5, max_new_tokens=9)
    model = ScriptedCountingModel({r["image"]: f"{r['answer']}" for r in data})
    records, errors = drive(ev, model)
    assert not errors
    assert ev.score(records)["accuracy"] == 1.0
    assert all(c["scores"] is None and c["max_new_tokens"] == 9 for c in model.calls.values())
    # proposals from another source replace the file's boxes
    src = CallableProposals(lambda image: [[1, 2, 30, 40], [5, 5, 50, 60]])
    ev = PixmoCountEvaluator(PIXMO, images=images_dir(tmp_path, names), limit=5, proposals=src)
    drive(ev, model)
    assert all(c["boxes"] == [[1, 2, 30, 40], [5, 5, 50, 60]] for c in model.calls.values())
    assert ev.settings()["proposals"]["kind"] == "CallableProposals"


def test_malformed_files_refused_before_any_work(tmp_path):
    with open(COUNTBENCH) as f:
        good = json.load(f)[:3]
    imgs = images_dir(tmp_path, [])

    def bad(records, match, raw=None):
        p = tmp_path / "bad.json"
        p.write_text(raw if raw is not None else json.dumps(records))
        with pytest.raises(ValueError, match=match) as e:
            CountBenchEvaluator(str(p), images=imgs).items()
        assert str(p) in str(e.value)

    def edit(i, **kw):
        recs = [dict(r) for r in good]
        for k, v in kw.items():
            if v is None:
                del recs[i][k]
            else:
                recs[i][k] = v
        return recs

    bad(None, "not a valid", raw="[{")
    bad(None, "non-empty JSON list", raw="{}")
    bad([], "non-empty JSON list")
    bad([1], "record 0: expected an object")
    bad(edit(1, answer=None), r"record 1: missing 'answer'")
    bad(edit(1, answer=True), "record 1: 'answer' must be a count")
    bad(edit(1, answer="3"), "record 1: 'answer' must be a count")
    bad(edit(2, question=""), "record 2: 'question' must be a non-empty string")
    bad(edit(2, image=7), "record 2: 'image' must be a file name")
    bad(edit(2, image=good[0]["image"]), "record 2: image 'image_0.jpg' appears twice")
    bad(edit(0, bboxes=[[1, 2, 3]]), r"record 0 \(image_0.jpg\)")
    bad(edit(0, bboxes=[[1, 2, 3, "x"]]), r"record 0 \(image_0.jpg\)")
    bad(edit(0, scores=[0.5]), r"record 0 \(image_0.jpg\).*scores")
    bad(None, "nested", raw="[" * 100 + "]" * 100)
    with pytest.raises(FileNotFoundError):
        CountBenchEvaluator(str(tmp_path / "missing.json"), images=imgs).items()
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        CountBenchEvaluator(COUNTBENCH, images=str(tmp_path / "no-images")).items()
    with pytest.raises(ValueError, match="images="):
        CountBenchEvaluator(COUNTBENCH, images=None)
    with pytest.raises(ValueError, match="a folder"):
        CountingEvaluator(FO1_EVAL, images=imgs)


def test_real_tiny_fo1_checkpoint(fo1_tiny_ckpt, tmp_path):
    """Two CountBench items through the real engine (random weights; coco_tiny pictures shrunk to 160x120 stand
    in for the CountBench images, whose boxes are then clamped)."""
    from PIL import Image

    from vlmfo1 import VLMFO1

    d = tmp_path / "images"
    d.mkdir()
    for i, name in enumerate(sorted(os.listdir(COCO_IMAGES))[:2]):
        with Image.open(os.path.join(COCO_IMAGES, name)) as im:
            im.convert("RGB").resize((160, 120)).save(d / f"image_{i}.jpg")
    ev = CountBenchEvaluator(COUNTBENCH, images=str(d), limit=2, max_new_tokens=8)
    with VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2) as model:
        records, errors = drive(ev, model)
    assert not errors and sorted(records) == ["image_0.jpg", "image_1.jpg"]
    for key, rec in records.items():
        assert isinstance(rec["answer"], str) and rec["count"] == count_from_answer(rec["answer"])
        assert rec["finish_reason"] in ("stop", "length")
    report = ev.score(records)
    assert report["answered"] == 2
    shutil.rmtree(d)


def test_evaluator_pickles_for_workers(tmp_path):
    """A worker gets the evaluator by pickle, without the parsed file, and answers items the same."""
    import pickle

    with open(COUNTBENCH) as f:
        data = json.load(f)[:4]
    ev = CountBenchEvaluator(COUNTBENCH, images=images_dir(tmp_path, [r["image"] for r in data]), limit=4)
    items = ev.items()
    blob = pickle.dumps(ev)
    assert len(blob) < 2000                       # the 487 records are not shipped
    worker = pickle.loads(blob)
    model = ScriptedCountingModel({r["image"]: f"{r['answer']} things" for r in data})
    records = {it.key: worker.run_item(model, it) for it in items}
    assert records == {it.key: ev.run_item(model, it) for it in items}
    assert worker.score(records) == ev.score(records) and ev.score(records)["accuracy"] == 1.0
