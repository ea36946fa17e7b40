"""CountBench / PixmoCount evaluators (vlmfo1/eval/counting.py) on the official files (../shared/data/fo1_eval).

The model is a scripted stand-in (`ScriptedCountingModel`, a test double that only replays the answers it is given):
per item it answers one of the templates in ANSWERS, whose predicted count under the §6.3 rule is written out by
hand here (region tags are not numbers, "region5" is not a number but "region55" holds a 5, no number means 0,
"07" is 7, the first number wins). The expected accuracy and confusion table are computed here from the file's true
counts and those hand-written predictions, and must equal the report of a run through the real runner
(vlmfo1.eval.run), limited to the first items of the file (scored over those alone). The CLI runs the real tiny random
FO1 checkpoint on a few items, is killed mid-run and resumes; bad inputs through the CLI are one line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eval_doubles import kill_after_first_record  # noqa: E402  (test doubles, tests only)
from vlmfo1.cli import main as cli_main
from vlmfo1.eval import CountBenchEvaluator, CountingEvaluator, PixmoCountEvaluator, run
from vlmfo1.eval.counting import count_from_answer
from vlmfo1.fo1_prompt import parse_answer
from vlmfo1.proposals import CallableProposals

HERE = os.path.dirname(os.path.abspath(__file__))
FO1_EVAL = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "fo1_eval")
COUNTBENCH = os.path.join(FO1_EVAL, "countbench_with_upn_score_0.3_0.8.json")
PIXMO = os.path.join(FO1_EVAL, "pixmoCount_with_upn_score_0.3_0.8.json")
COCO_IMAGES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "coco_tiny", "val2017")
ROOT = Path(HERE).parent

if not os.path.isfile(COUNTBENCH):
    pytest.skip("the official fo1_eval files are not here", allow_module_level=True)


def lines(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


def go(ev, model, out, **kw):
    """A run with the real runner: (report, records, errors), the records and errors read back from the run
    folder's predictions.jsonl."""
    report = run(ev, model, out, progress=False, summary=False, **kw)
    preds = lines(Path(out) / "predictions.jsonl")
    return (report, {p["key"]: p["record"] for p in preds if "record" in p},
            {p["key"]: p["error"] for p in preds if "error" in p})


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
    ev = cls(images_dir(tmp_path, []), FO1_EVAL)                 # a folder: the official file name is used
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
    assert s["annotations"]["name"] == os.path.basename(path) and s["annotations"]["bytes"] == os.path.getsize(path)
    assert s["benchmark"] == cls.name and s["max_proposals"] == 100 and "limit" not in s and "images" not in s


def test_countbench_accuracy_and_confusion_equal_the_independent_values(tmp_path):
    with open(COUNTBENCH) as f:
        data = json.load(f)[:60]
    names = [r["image"] for r in data]
    absent = set(names[7:10])                                      # the user lacks three images
    ev = CountBenchEvaluator(images_dir(tmp_path, names, skip=absent), COUNTBENCH)
    answers, predicted = {}, {}
    for i, r in enumerate(data):
        template, pred = ANSWERS[i % len(ANSWERS)]
        t = r["answer"]
        answers[r["image"]] = template.format(t=t, u=t + 1, v=t + 5)
        predicted[r["image"]] = pred(t)
    model = ScriptedCountingModel(answers)
    report, records, errors = go(ev, model, tmp_path / "run", limit=60)    # the first 60 of the 487, alone
    assert set(errors) == absent and report["run"]["errors"] == 3
    assert all(e.startswith("FileNotFoundError: image not found") for e in errors.values())
    assert report["of_items"] == 487 and len(model.calls) == 57

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
    assert text.splitlines()[0].startswith(f"countbench: accuracy {100 * correct / 60:.2f}% ({correct}/60, the first "
                                           f"60 of 487 items;")
    assert ">10" in text and "none" in text
    assert ev.score_subset(records, names) == {k: v for k, v in report.items() if k != "run"}
    whole = ev.score(records)                      # the whole file: the 427 items not run count as wrong
    assert whole["items"] == 487 and whole["correct"] == correct and whole["missing"] == 430
    assert whole["accuracy"] == correct / 487
    assert ev.score_subset({}, [])["accuracy"] is None
    with pytest.raises(ValueError, match="is not an image of"):
        ev.score_subset(records, ["no_such_image.jpg"])


def test_pixmocount_without_scores_and_options(tmp_path):
    with open(PIXMO) as f:
        data = json.load(f)[:5]
    names = [r["image"] for r in data]
    ev = PixmoCountEvaluator(images_dir(tmp_path, names), PIXMO, max_new_tokens=9)
    model = ScriptedCountingModel({r["image"]: f"{r['answer']}" for r in data})
    report, records, errors = go(ev, model, tmp_path / "a", limit=5)
    assert not errors
    assert report["accuracy"] == 1.0 and report["items"] == 5
    assert all(c["scores"] is None and c["max_new_tokens"] == 9 for c in model.calls.values())
    # proposals from another source replace the file's boxes; max_proposals keeps the first N
    src = CallableProposals(lambda image: [[1, 2, 30, 40], [5, 5, 50, 60], [7, 7, 70, 70]])
    ev = PixmoCountEvaluator(images_dir(tmp_path, names), PIXMO, src, max_proposals=2)
    go(ev, model, tmp_path / "b", limit=5)
    assert all(c["boxes"] == [[1, 2, 30, 40], [5, 5, 50, 60]] for c in model.calls.values())
    assert all(c["max_new_tokens"] == 64 + 2 * 2 for c in model.calls.values())
    assert ev.settings()["proposals"]["kind"] == "CallableProposals"


def test_malformed_files_refused_before_any_work(tmp_path):
    with open(COUNTBENCH) as f:
        good = json.load(f)[:3]
    imgs = images_dir(tmp_path, [])

    def bad(records, match, raw=None):
        p = tmp_path / "bad.json"
        p.write_text(raw if raw is not None else json.dumps(records))
        with pytest.raises(ValueError, match=match) as e:
            CountBenchEvaluator(imgs, str(p)).items()
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
        CountBenchEvaluator(imgs, str(tmp_path / "missing.json")).items()
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        CountBenchEvaluator(str(tmp_path / "no-images"), COUNTBENCH).items()
    with pytest.raises(ValueError, match="images="):
        CountBenchEvaluator(None, COUNTBENCH)
    with pytest.raises(ValueError, match="a folder"):
        CountingEvaluator(imgs, FO1_EVAL)
    with pytest.raises(ValueError, match=r"max_proposals must be an int in \[1, 100\]"):
        CountBenchEvaluator(imgs, COUNTBENCH, max_proposals=101)


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def test_cli_tiny_checkpoint_kill_and_resume(fo1_tiny_ckpt, tmp_path):
    """`vlmfo1 eval countbench` with the real tiny random FO1 checkpoint on the first 3 items (coco_tiny pictures
    shrunk to 160x120 stand in for the CountBench images, whose boxes are then clamped): an uninterrupted in-process
    run, then the CLI SIGKILLed after its first record and rerun — byte-identical predictions."""
    from PIL import Image

    d = tmp_path / "images"
    d.mkdir()
    for i, name in enumerate(sorted(os.listdir(COCO_IMAGES))[:3]):
        with Image.open(os.path.join(COCO_IMAGES, name)) as im:
            im.convert("RGB").resize((160, 120)).save(d / f"image_{i}.jpg")
    t0 = time.perf_counter()
    a = tmp_path / "a"
    ev = CountBenchEvaluator(d, COUNTBENCH, max_new_tokens=8)
    report, records, errors = go(ev, fo1_tiny_ckpt, a, limit=3, threads=2)
    t_a = time.perf_counter() - t0
    assert not errors and list(records) == ["image_0.jpg", "image_1.jpg", "image_2.jpg"]
    for key, rec in records.items():
        assert isinstance(rec["answer"], str) and rec["count"] == count_from_answer(rec["answer"])
        assert rec["finish_reason"] in ("stop", "length")
    assert report["answered"] == 3 and report["items"] == 3

    b = tmp_path / "b"
    cmd = [sys.executable, "-m", "vlmfo1.cli", "eval", "countbench", "--model", fo1_tiny_ckpt, "--images", str(d),
           "--annotations", FO1_EVAL, "--out", str(b), "--limit", "3", "--threads", "2", "--max-new-tokens", "8",
           "--no-progress"]
    t0 = time.perf_counter()
    rec = b / "records.jsonl"
    n_killed = kill_after_first_record(cmd, b, _env(), ROOT)
    assert 1 <= n_killed < 3 and not (b / "predictions.jsonl").exists()
    r = subprocess.run(cmd, cwd=str(ROOT), env=_env(), capture_output=True, text=True, timeout=300)
    t_b = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("countbench: accuracy ") and "the first 3 of 487 items" in r.stdout
    assert len(lines(rec)) == 3 and len({x["key"] for x in lines(rec)}) == 3
    assert (b / "predictions.jsonl").read_bytes() == (a / "predictions.jsonl").read_bytes()
    print(f"[countbench CLI] in-process 3 items {t_a:.1f} s; CLI killed after {n_killed} record(s) and resumed "
          f"{t_b:.1f} s; predictions identical")


@pytest.fixture(scope="module")
def empty_model(tmp_path_factory):
    return str(tmp_path_factory.mktemp("not_fo1"))


@pytest.mark.parametrize("bench", ["countbench", "pixmocount"])
@pytest.mark.parametrize("case", ["missing annotations", "malformed annotations", "images folder missing",
                                  "model not FO1"])
def test_cli_bad_inputs_are_one_line(tmp_path, capsys, bench, case, empty_model):
    ann, images = FO1_EVAL, tmp_path / "images"
    images.mkdir()
    if case == "missing annotations":
        ann, want = tmp_path / f"{bench}.json", f"{bench} evaluation file not found"
    elif case == "malformed annotations":
        ann = tmp_path / f"{bench}.json"
        ann.write_text('[{"question": "How many dogs are there in the image?", "answer": 3, "image": "a.jpg"}]')
        want = "record 0: missing 'bboxes'"
    elif case == "images folder missing":
        images, want = tmp_path / "no_images", "images folder not found"
    else:
        want = "config.json not found"
    out = tmp_path / "out"
    code = cli_main(["eval", bench, "--model", empty_model, "--images", str(images), "--annotations", str(ann),
                     "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith(f"vlmfo1 eval {bench}: error: ") and want in err[0], err
    assert not out.exists()                                    # refused before the run folder is made


def test_evaluator_pickles_for_workers(tmp_path):
    """A worker gets the evaluator by pickle, without the parsed file, and answers items the same."""
    import pickle

    with open(COUNTBENCH) as f:
        data = json.load(f)[:4]
    ev = CountBenchEvaluator(images_dir(tmp_path, [r["image"] for r in data]), COUNTBENCH)
    items = ev.items()[:4]
    blob = pickle.dumps(ev)
    assert len(blob) < 2000                       # the 487 records are not shipped
    worker = pickle.loads(blob)
    model = ScriptedCountingModel({r["image"]: f"{r['answer']} things" for r in data})
    records = {it.key: worker.run_item(model, it) for it in items}
    assert records == {it.key: ev.run_item(model, it) for it in items}
    keys = [it.key for it in items]
    assert worker.score_subset(records, keys) == ev.score_subset(records, keys)
    assert ev.score_subset(records, keys)["accuracy"] == 1.0
