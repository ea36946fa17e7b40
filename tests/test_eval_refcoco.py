"""RefCOCO evaluator (vlmfo1/eval/refcoco.py) on a RefCOCO built from coco_tiny in the refer toolkit's layout
(tests/refcoco_fixture.py: a Python 2 protocol-2 refs(unc).p + instances.json), and on its MDETR and Qwen-VL JSON
conversions.

The model is a scripted stand-in (`ScriptedReferringModel`, a test double: it looks the answer up, it computes
nothing of VLM-FO1): it answers with the proposal that best overlaps the ground truth, except on a fixed schedule of
expressions where it answers nothing, an index beyond the proposals, or the worst proposal first and the best second.
Every run goes through the real runner (vlmfo1.eval.run: the run folder, records.jsonl, the report); the expected
Acc@0.5 and proposal ceiling are computed here from the fixture's own ground truth, with this file's own IoU, and must
equal the report's, for the whole benchmark and for a run limited to its first items. The CLI runs the real tiny
random FO1 checkpoint on a few expressions, is killed mid-run and resumes; bad inputs through the CLI are one line.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import eval_doubles  # noqa: E402  (test doubles, tests only)
import refcoco_fixture as rf
from vlmfo1.cli import main as cli_main
from vlmfo1.eval import RefCocoEvaluator, run
from vlmfo1.eval.refcoco import in_split, read_refs
from vlmfo1.fo1_prompt import parse_answer
from vlmfo1.proposals import CocoResultsProposals

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------- helpers

def lines(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


def go(ev, model, out, **kw):
    """A run with the real runner: (report, records, errors) with the records and errors read back from the run
    folder's predictions.jsonl (what a user gets)."""
    report = run(ev, model, out, progress=False, summary=False, **kw)
    preds = lines(Path(out) / "predictions.jsonl")
    return (report, {p["key"]: p["record"] for p in preds if "record" in p},
            {p["key"]: p["error"] for p in preds if "error" in p})


def iou(a, b):
    """IoU of two xyxy boxes, continuous coordinates (this test's own, in plain Python)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


MODES = ("best", "none", "best", "worst_first", "best", "invalid", "best")


def mode_of(index):
    return MODES[index % len(MODES)]


class ScriptedReferringModel:
    """TEST DOUBLE, not a model: `refer` answers from a table of ground-truth boxes, by a fixed schedule (MODES)."""

    def __init__(self, expected, threads=None):
        self.truth = {}
        for i, e in enumerate(expected):
            assert (e.file_name, e.expression) not in self.truth, "fixture expressions must be unique per image"
            self.truth[(e.file_name, e.expression)] = (i, e.box)
        self.calls = []

    def refer(self, image, expression, boxes=None, scores=None, **kw):
        i, gt = self.truth[(os.path.basename(image), expression)]
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        ious = [iou(x, gt) for x in b.tolist()]
        best, worst = int(np.argmax(ious)), int(np.argmin(ious))
        mode = mode_of(i)
        self.calls.append((os.path.basename(image), expression, len(b), kw))
        text = {"best": f"<ground>{expression}</ground><objects><region{best}></objects>",
                "none": "I cannot find it in this image.",
                "worst_first": f"<ground>{expression}</ground><objects><region{worst}><region{best}></objects>",
                "invalid": f"<ground>{expression}</ground><objects><region{len(b) + 3}></objects>"}[mode]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return parse_answer(text, b, scores=scores, task="refer", finish_reason="stop")


def expected_outcome(fx, expected, shown_boxes):
    """key -> (correct, covered) from the ground truth, the boxes the model is shown, and the schedule (which goes
    by the expression's position among all of the fixture's expressions, as the stand-in's)."""
    position = {e.key: i for i, e in enumerate(fx["expected"])}
    out = {}
    for e in expected:
        boxes = shown_boxes(e)
        ious = [iou(b, e.box) for b in boxes]
        mode = mode_of(position[e.key])
        if mode in ("none", "invalid") or not boxes:
            correct = False
        else:
            first = int(np.argmax(ious)) if mode == "best" else int(np.argmin(ious))
            correct = ious[first] >= 0.5
        out[e.key] = (correct, max(ious, default=0.0) >= 0.5)
    return out


def check_report(report, expected, outcome, splits, missing=()):
    for split in splits:
        keys = [e.key for e in expected if in_split(e.split, split)]
        r = report["splits"][split]
        assert r["expressions"] == len(keys) > 0
        assert r["correct"] == sum(outcome[k][0] and k not in missing for k in keys)
        assert r["accuracy"] == pytest.approx(r["correct"] / len(keys), abs=0)
        assert r["proposal_recall"] == pytest.approx(sum(outcome[k][1] and k not in missing for k in keys)
                                                     / len(keys), abs=0)
        assert r["missing"] == sum(k in missing for k in keys)
    keys = {e.key for e in expected if any(in_split(e.split, s) for s in splits)}
    assert report["overall"]["expressions"] == len(keys)
    assert report["overall"]["correct"] == sum(outcome[k][0] and k not in missing for k in keys)


# ------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("refcoco")
    fix = rf.build(str(d))
    fix["dets"] = rf.write_proposals(fix, str(d / "dets.json"))
    json_dir = d / "json"
    json_dir.mkdir()
    fix["mdetr"] = [rf.write_mdetr(fix, str(json_dir), s) for s in ("val", "testA", "testB")]
    fix["jsonl"] = [rf.write_expression_list(fix, str(json_dir), s) for s in ("val", "testA", "testB")]
    return fix


def eval_expected(fx):
    """The expressions of the default splits (val, testA, testB) in the order the evaluator asks them."""
    return [e for e in fx["expected"] if e.split != "train"]


def oracle_boxes(fx):
    """image id -> the image's non-crowd GT boxes in instances.json order (read here, not by the evaluator)."""
    with open(fx["instances"]) as f:
        inst = json.load(f)
    out = {}
    for a in inst["annotations"]:
        if not a["iscrowd"]:
            x, y, w, h = a["bbox"]
            out.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    return out


def detector_boxes(fx):
    """image id -> the proposal file's boxes, score descending, ties in file order (read here)."""
    with open(fx["dets"]) as f:
        dets = json.load(f)
    out = {}
    for d in sorted(dets, key=lambda d: -d["score"]):
        x, y, w, h = d["bbox"]
        out.setdefault(d["image_id"], []).append([x, y, x + w, y + h])
    return out


# ------------------------------------------------------------------------------------------------- reading

def test_reads_the_refer_layout(fx):
    data = read_refs(fx["folder"])
    assert (data.form, data.dataset, data.split_by) == ("refer pickle", "refcoco", "unc")
    got = [(e.key, e.split, e.image, e.image_id, e.expression, e.box) for e in data.exprs]
    want = [(e.key, e.split, e.file_name, e.image_id, e.expression, e.box) for e in fx["expected"]]
    assert got == want
    assert any(e.expression == "the one near the café" for e in data.exprs)     # Python 2 byte string, UTF-8
    assert any(e.expression.endswith("(naïve)") for e in data.exprs)           # Python 2 unicode
    # the refs file itself, and instances.json named separately, read the same
    same = read_refs(fx["refs"], instances=fx["instances"])
    assert [e.key for e in same.exprs] == [e.key for e in data.exprs]


def test_splits_follow_the_refer_toolkit(fx):
    ev = RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], oracle_proposals=True)
    assert ev.splits == ["val", "testA", "testB"]                  # train is never reported by default
    items = ev.items()
    assert [it.key for it in items] == [e.key for e in eval_expected(fx)]
    assert all(it.task["split"] != "train" for it in items)
    ev = RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], oracle_proposals=True, splits=["test"])
    assert [it.key for it in ev.items()] == [e.key for e in fx["expected"] if e.split in ("testA", "testB")]
    ev = RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], oracle_proposals=True, splits=["val", "testA", "testB", "test"])
    assert len(ev.items()) == len(eval_expected(fx))              # each expression asked once
    assert ev.items() == ev.items()                                # deterministic, and a copy each time
    assert in_split("testAB", "testA") and in_split("testAB", "testB") and not in_split("train", "testA")


# ------------------------------------------------------------------------------------------------- scoring

def test_oracle_proposals_accuracy_equals_the_independent_value(fx, tmp_path):
    ev = RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], oracle_proposals=True)
    model = ScriptedReferringModel(fx["expected"])
    report, records, errors = go(ev, model, tmp_path / "run")
    assert not errors
    exp = eval_expected(fx)
    gt = oracle_boxes(fx)
    outcome = expected_outcome(fx, exp, lambda e: gt[e.image_id])
    check_report(report, exp, outcome, ["val", "testA", "testB"])
    assert report["run"]["records"] == len(exp) == report["of_expressions"]
    assert ev.score(records) == {k: v for k, v in report.items() if k != "run"}
    assert report["overall"]["proposal_recall"] == 1.0             # the referent is always among its GT boxes
    assert 0.3 < report["overall"]["accuracy"] < 0.9               # the schedule's misses are real misses
    no_pick = sum(mode_of(i) in ("none", "invalid") for i, e in enumerate(fx["expected"]) if e.split != "train")
    assert report["overall"]["no_pick"] == no_pick
    rec = records[fx["expected"][5].key]                            # an "invalid" answer: index kept, no pick
    assert rec["picked"] == [] and rec["invalid_indices"] and rec["pred_box"] is None
    assert all(n == len(gt[e.image_id]) for (_, _, n, _), e in zip(model.calls, exp))
    json.dumps(report)


def test_detector_proposals_accuracy_and_ceiling(fx, tmp_path):
    exp = eval_expected(fx)
    shown = detector_boxes(fx)
    outcome = expected_outcome(fx, exp, lambda e: shown[e.image_id])
    assert 0 < sum(c for c, _ in outcome.values()) < sum(v for _, v in outcome.values()) < len(exp)
    for n, proposals in enumerate((CocoResultsProposals(fx["dets"]), fx["dets"])):   # a source, or a file path
        ev = RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], proposals)
        report, records, errors = go(ev, ScriptedReferringModel(fx["expected"]), tmp_path / f"run{n}")
        assert not errors
        check_report(report, exp, outcome, ["val", "testA", "testB"])
        assert report["overall"]["proposal_recall"] < 1.0
        assert report["overall"]["accuracy"] <= report["overall"]["proposal_recall"]
        best = {k: r["best_proposal_iou"] for k, r in records.items()}
        assert all((best[e.key] >= 0.5) == outcome[e.key][1] for e in exp)


@pytest.mark.parametrize("form", ["mdetr", "jsonl"])
def test_json_conversions_score_the_same(fx, form, tmp_path):
    exp = eval_expected(fx)
    ev_pickle = RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], fx["dets"])
    ev_json = RefCocoEvaluator(rf.COCO_IMAGES, fx[form], fx["dets"])
    a, b = ev_pickle.items(), ev_json.items()
    assert ev_json.splits == ["val", "testA", "testB"]
    assert ev_json.data().form == {"mdetr": "mdetr json", "jsonl": "expression list"}[form]
    by_split = {s: [(it.image, it.image_id, it.task["expression"], it.task["gt"]) for it in a if it.task["split"] == s]
                for s in ev_json.splits}
    for s in ev_json.splits:
        got = [(it.image, it.image_id, it.task["expression"], it.task["gt"]) for it in b if it.task["split"] == s]
        assert got == by_split[s]
    model = ScriptedReferringModel(fx["expected"])
    r_pickle = go(ev_pickle, model, tmp_path / "pickle")[0]
    r_json = go(ev_json, model, tmp_path / "json")[0]
    for s in ev_json.splits:
        for field in ("expressions", "correct", "no_pick", "accuracy", "proposal_recall"):
            assert r_json["splits"][s][field] == r_pickle["splits"][s][field]
    # oracle boxes for the JSON forms come from a COCO annotation file
    with pytest.raises(ValueError, match="instances="):
        RefCocoEvaluator(rf.COCO_IMAGES, fx[form], oracle_proposals=True).items()
    ev = RefCocoEvaluator(rf.COCO_IMAGES, fx[form], oracle_proposals=True, instances=fx["instances"])
    gt = oracle_boxes(fx)
    assert all(it.task["boxes"] == gt[it.image_id] for it in ev.items())
    assert len(ev.items()) == len(exp)


def test_missing_image_is_one_items_error(fx, tmp_path):
    images = tmp_path / "train2014"
    images.mkdir()
    exp = eval_expected(fx)
    gone = exp[0].file_name
    for name in os.listdir(rf.COCO_IMAGES):
        if name != gone:
            os.symlink(os.path.join(rf.COCO_IMAGES, name), images / name)
    ev = RefCocoEvaluator(str(images), fx["folder"], oracle_proposals=True)
    report, records, errors = go(ev, ScriptedReferringModel(fx["expected"]), tmp_path / "run")
    missing = {e.key for e in exp if e.file_name == gone}
    assert set(errors) == missing and all(v.startswith("FileNotFoundError: image not found") for v in errors.values())
    assert report["run"]["errors"] == len(missing)
    gt = oracle_boxes(fx)
    check_report(report, exp, expected_outcome(fx, exp, lambda e: gt[e.image_id]), ["val", "testA", "testB"],
                 missing=missing)
    assert report["overall"]["missing"] == len(missing)
    assert "without a record" in ev.summary(report)


def test_limited_run_is_scored_over_its_own_expressions(fx, tmp_path):
    """run(limit=K) asks the first K expressions and scores them alone: the other expressions are not counted as
    wrong, a split with none of the K has no accuracy; the numbers equal the independent ones over the K."""
    exp = eval_expected(fx)
    shown = detector_boxes(fx)
    outcome = expected_outcome(fx, exp, lambda e: shown[e.image_id])
    ev = RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], fx["dets"], max_new_tokens=20)
    model = ScriptedReferringModel(fx["expected"])
    k = next(i for i, e in enumerate(exp) if e.split == "testB")        # val and testA only
    report, records, _ = go(ev, model, tmp_path / "run", limit=k)
    assert len(model.calls) == len(records) == k and all(kw == {"max_new_tokens": 20} for *_, kw in model.calls)
    first = exp[:k]
    check_report(report, first, outcome, ["val", "testA"])
    assert report["overall"]["expressions"] == k and report["of_expressions"] == len(exp)
    assert report["overall"]["correct"] == sum(outcome[e.key][0] for e in first)
    assert report["overall"]["accuracy"] == sum(outcome[e.key][0] for e in first) / k
    assert report["splits"]["testB"] == {"expressions": 0, "answered": 0, "missing": 0, "no_pick": 0, "correct": 0,
                                         "accuracy": None, "proposal_recall": None}
    assert report["run"]["limit"] == k and report["run"]["items"] == k
    # the whole benchmark afterwards: the same folder resumes (limit is not a setting) and runs the rest only
    full, _, _ = go(ev, model, tmp_path / "run")
    assert full["run"]["ran_now"] == len(exp) - k and len(model.calls) == len(exp)
    check_report(full, exp, outcome, ["val", "testA", "testB"])
    text = ev.summary(report)
    assert f"the first {k} of the {len(exp)} expressions" in text
    assert [ln.split()[:2] for ln in text.splitlines() if ln.startswith("testB")] == [["testB", "0"]]
    assert text.splitlines()[5].split()[-2:] == ["-", "-"]
    with pytest.raises(ValueError, match="is not an expression of"):
        ev.score_subset(records, ["sent999999"])


def test_settings_and_summary(fx):
    ev = RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], fx["dets"], max_new_tokens=20, max_proposals=7)
    s = ev.settings()
    json.dumps(s)
    assert [f["name"] for f in s["files"]] == ["refs(unc).p", "instances.json"]
    assert [f["bytes"] for f in s["files"]] == [os.path.getsize(p) for p in (fx["refs"], fx["instances"])]
    assert all(len(f["sha256"]) == 64 for f in s["files"])
    assert s["proposals"]["kind"] == "CocoResultsProposals" and s["proposals"]["bytes"] == os.path.getsize(fx["dets"])
    assert s["prompt"] == "Please detect {} in this image. Answer the question with object indexes."
    assert (s["splits"], s["iou_threshold"], s["max_proposals"], s["max_new_tokens"]) == (
        ["val", "testA", "testB"], 0.5, 7, 20)
    assert "limit" not in s and "images" not in s              # limit is the runner's; the data may move
    assert all(len(ev.proposals_for(it)) <= 7 for it in ev.items()[:20])
    assert max(len(detector_boxes(fx)[it.image_id]) for it in ev.items()) > 7
    report = ev.score({})
    text = ev.summary(report)
    lines_ = text.splitlines()
    assert lines_[0].startswith("refcoco (unc) — Acc@0.5, proposals: CocoResultsProposals(dets.json)")
    assert [ln.split()[0] for ln in lines_[3:7]] == ["val", "testA", "testB", "overall"]
    assert "without a record" in text and report["overall"]["accuracy"] == 0.0


def test_dataset_picks_the_folder_of_a_refer_data_root(fx, tmp_path):
    root = Path(fx["folder"]).parent                       # holds refcoco/
    ev = RefCocoEvaluator(rf.COCO_IMAGES, str(root), oracle_proposals=True, dataset="refcoco")
    assert [it.key for it in ev.items()] == [e.key for e in eval_expected(fx)]
    assert ev.data().dataset == "refcoco" and ev.settings()["dataset"] == "refcoco"
    with pytest.raises(ValueError, match=r"a refer data root .*refcoco/.*choose one with dataset= \(--dataset\)"):
        RefCocoEvaluator(rf.COCO_IMAGES, str(root), oracle_proposals=True).items()
    with pytest.raises(ValueError, match="it has no refcocog/"):
        RefCocoEvaluator(rf.COCO_IMAGES, str(root), oracle_proposals=True, dataset="refcocog").items()
    with pytest.raises(ValueError, match="the refs of refcoco, not of refcoco\\+"):
        RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], oracle_proposals=True, dataset="refcoco+").items()
    ev = RefCocoEvaluator(rf.COCO_IMAGES, fx["jsonl"], fx["dets"], dataset="refcoco+")   # names a JSON conversion
    assert ev.score({})["dataset"] == "refcoco+"


def test_two_workers_give_the_same_predictions(fx, tmp_path):
    """The stand-in in two worker processes (module-level, picklable): byte-identical predictions and report."""
    ev = RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], fx["dets"])
    factory = functools.partial(ScriptedReferringModel, fx["expected"])
    one, _, _ = go(ev, factory, tmp_path / "one", limit=40)
    two, _, _ = go(ev, factory, tmp_path / "two", limit=40, workers=2, chunk_size=5)
    preds = [(tmp_path / d / "predictions.jsonl").read_bytes() for d in ("one", "two")]
    assert preds[0] == preds[1]
    assert {k: v for k, v in one.items() if k != "run"} == {k: v for k, v in two.items() if k != "run"}


# ------------------------------------------------------------------------------------------------- bad input

def test_bad_inputs(fx, tmp_path):
    with pytest.raises(ValueError, match=r"needs proposals: pass proposals= \(--proposals"):
        RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"])
    with pytest.raises(ValueError, match="not both"):
        RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], fx["dets"], oracle_proposals=True)
    with pytest.raises(ValueError, match=r"no expressions in split\(s\) \['testC'\]"):
        RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], oracle_proposals=True, splits=["testC"]).items()
    with pytest.raises(FileNotFoundError):
        RefCocoEvaluator(rf.COCO_IMAGES, tmp_path / "nothing", oracle_proposals=True).items()

    def folder_with(refs_files, instances=True):
        d = tmp_path / f"case{len(os.listdir(tmp_path))}"
        d.mkdir()
        for name, data in refs_files.items():
            (d / name).write_bytes(data)
        if instances:
            shutil.copy(fx["instances"], d / "instances.json")
        return str(d)

    good = open(fx["refs"], "rb").read()
    # refcocog ships two refs files: the choice must be explicit
    d = folder_with({"refs(umd).p": good, "refs(google).p": good})
    with pytest.raises(ValueError, match="split_by="):
        RefCocoEvaluator(rf.COCO_IMAGES, d, oracle_proposals=True).items()
    assert RefCocoEvaluator(rf.COCO_IMAGES, d, oracle_proposals=True, split_by="umd").data().split_by == "umd"
    with pytest.raises(FileNotFoundError, match="instances.json"):
        RefCocoEvaluator(rf.COCO_IMAGES, folder_with({"refs(unc).p": good}, instances=False),
                         oracle_proposals=True).items()
    # a refs pickle that carries code is refused, never run
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    import pickle
    d = folder_with({"refs(unc).p": pickle.dumps([Evil()], protocol=2)})
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: refused"):
        RefCocoEvaluator(rf.COCO_IMAGES, d, oracle_proposals=True).items()
    assert not marker.exists()
    # refs pointing at annotations / images that instances.json does not have
    refs = [{"ref_id": 0, "ann_id": 123456789, "image_id": 5001, "split": "val", "category_id": 1,
             "sentences": [{"sent": "x", "sent_id": 0, "tokens": ["x"], "raw": "x"}]}]
    d = folder_with({"refs(unc).p": rf.py2_dumps(refs)})
    with pytest.raises(ValueError, match=r"ref 0: annotation 123456789 is not in .*instances.json"):
        RefCocoEvaluator(rf.COCO_IMAGES, d, oracle_proposals=True).items()
    d = folder_with({"refs(unc).p": rf.py2_dumps([{"ref_id": 0, "split": "val"}])})
    with pytest.raises(ValueError, match=r"ref 0: expected"):
        RefCocoEvaluator(rf.COCO_IMAGES, d, oracle_proposals=True).items()
    d = folder_with({"refs(unc).p": rf.py2_dumps({"not": "a list"})})
    with pytest.raises(ValueError, match="expected a list of refs"):
        RefCocoEvaluator(rf.COCO_IMAGES, d, oracle_proposals=True).items()
    # a proposal file that lacks an image: refused before any model work
    dets = [d for d in json.load(open(fx["dets"])) if d["image_id"] != fx["expected"][0].image_id]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(dets))
    with pytest.raises(ValueError, match=r"no proposals for 1 of the \d+ images"):
        RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], str(partial)).items()
    # an MDETR file whose image entry has two annotations; an expression list whose boxes are xywh
    data = json.load(open(fx["mdetr"][0]))
    data["annotations"].append(dict(data["annotations"][0], id=99999))
    bad = tmp_path / "finetune_refcoco_val.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="exactly one annotation"):
        read_refs(str(bad))
    bad = tmp_path / "refcoco_val.jsonl"
    bad.write_text(json.dumps({"image": "a.jpg", "sent": "the dog", "bbox": [100, 100, 20, 30]}) + "\n")
    with pytest.raises(ValueError, match="box_format="):
        read_refs(str(bad))
    assert read_refs(str(bad), box_format="xywh").exprs[0].box == (100.0, 100.0, 120.0, 130.0)
    bad.write_text('{"image": "a.jpg"}\n')
    with pytest.raises(ValueError, match=r"refcoco_val.jsonl: record 0: expected"):
        read_refs(str(bad))
    bad.write_text('{"image": "a.jpg", "sent": "x", "bbox": [1, 2, 3, 4]}\n{"image": \n')
    with pytest.raises(ValueError, match="line 2"):
        read_refs(str(bad))
    with pytest.raises(ValueError, match="mix forms"):
        read_refs([fx["mdetr"][0], fx["jsonl"][0]])
    with pytest.raises(ValueError, match="appears 2 times"):
        read_refs([fx["jsonl"][0], fx["jsonl"][0]])


# ------------------------------------------------------------------------------------------------- the CLI

def _cli(*args):
    return [sys.executable, "-m", "vlmfo1.cli", "eval", "refcoco", *map(str, args)]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def kill_after_first_record(cmd, out):
    return eval_doubles.kill_after_first_record(cmd, out, _env(), ROOT)


def test_cli_tiny_checkpoint_kill_and_resume(fx, fo1_tiny_ckpt, tmp_path):
    """`vlmfo1 eval refcoco` with the real tiny random FO1 checkpoint on the first 3 expressions (their pictures
    shrunk to 160x120 to keep it short; the oracle boxes, in the original pixels, are clamped): an uninterrupted
    in-process run, then the CLI SIGKILLed after its first record and rerun — byte-identical predictions."""
    from PIL import Image

    images = tmp_path / "train2014"
    images.mkdir()
    exp = eval_expected(fx)[:3]
    for name in {e.file_name for e in exp}:
        with Image.open(os.path.join(rf.COCO_IMAGES, name)) as im:
            im.convert("RGB").resize((160, 120)).save(images / name)
    t0 = time.perf_counter()
    a = tmp_path / "a"
    ev = RefCocoEvaluator(images, fx["folder"], oracle_proposals=True, max_new_tokens=8)
    report, records, errors = go(ev, fo1_tiny_ckpt, a, limit=3, threads=2)
    t_a = time.perf_counter() - t0
    assert not errors and list(records) == [e.key for e in exp]
    for it in ev.items()[:3]:
        rec = records[it.key]
        assert isinstance(rec["answer"], str) and rec["finish_reason"] in ("stop", "length")
        assert rec["n_proposals"] == len(it.task["boxes"]) and rec["best_proposal_iou"] == 1.0
        assert all(0 <= i < rec["n_proposals"] for i in rec["picked"])
    assert report["overall"]["answered"] == 3 and report["overall"]["proposal_recall"] == 1.0

    b = tmp_path / "b"
    cmd = _cli("--model", fo1_tiny_ckpt, "--images", images, "--annotations", fx["folder"], "--oracle-proposals",
               "--out", b, "--limit", 3, "--threads", 2, "--max-new-tokens", 8, "--no-progress")
    t0 = time.perf_counter()
    n_killed = kill_after_first_record(cmd, b)
    assert 1 <= n_killed < 3 and not (b / "predictions.jsonl").exists()
    r = subprocess.run(cmd, cwd=str(ROOT), env=_env(), capture_output=True, text=True, timeout=300)
    t_b = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert "refcoco (unc) — Acc@0.5, proposals: oracle" in r.stdout and "3 items (" in r.stdout
    assert "the first 3 of the" in r.stdout
    recs = lines(b / "records.jsonl")
    assert len(recs) == 3 and len({x["key"] for x in recs}) == 3          # nothing lost or duplicated
    assert (b / "predictions.jsonl").read_bytes() == (a / "predictions.jsonl").read_bytes()
    assert json.loads((b / "report.json").read_text())["overall"] == report["overall"]
    print(f"[refcoco CLI] in-process 3 expressions {t_a:.1f} s; CLI killed after {n_killed} record(s) and resumed "
          f"{t_b:.1f} s; predictions identical")


@pytest.fixture(scope="module")
def empty_model(tmp_path_factory):
    return str(tmp_path_factory.mktemp("not_fo1"))


@pytest.mark.parametrize("case", ["missing annotations", "malformed annotations", "malformed refs pickle",
                                  "images folder missing", "model not FO1"])
def test_cli_bad_inputs_are_one_line(fx, tmp_path, capsys, case, empty_model):
    ann, images, model, extra = fx["folder"], rf.COCO_IMAGES, empty_model, []
    if case == "missing annotations":
        ann, want = tmp_path / "refcoco_nope", "RefCOCO annotations not found"
    elif case == "malformed annotations":
        ann = tmp_path / "refcoco_val.json"
        ann.write_text('[{"image": "a.jpg", "sent": "x", "bbox": [1, 2, 3')
        want = "not a valid RefCOCO annotation JSON file"
    elif case == "malformed refs pickle":
        ann = tmp_path / "refcoco"
        ann.mkdir()
        (ann / "refs(unc).p").write_bytes(b"\x80\x02]q\x00(K\x01")       # cut short
        shutil.copy(fx["instances"], ann / "instances.json")
        want = "refs(unc).p"
    elif case == "images folder missing":
        images, want = tmp_path / "no_train2014", "images folder not found"
    else:
        want = "config.json not found"
    out = tmp_path / "out"
    code = cli_main(["eval", "refcoco", "--model", model, "--images", str(images), "--annotations", str(ann),
                     "--oracle-proposals", "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("vlmfo1 eval refcoco: error: ") and want in err[0], err
    assert not out.exists()                                    # refused before the run folder is made


def test_evaluator_pickles_for_workers(fx):
    """A worker gets the evaluator by pickle, without the parsed annotations, and answers items the same."""
    import pickle

    ev = RefCocoEvaluator(rf.COCO_IMAGES, fx["folder"], fx["dets"])
    items = ev.items()[:20]
    blob = pickle.dumps(ev)
    worker = pickle.loads(blob)
    assert worker._data is None and worker._items is None      # the proposal source travels as it is
    model = ScriptedReferringModel(fx["expected"])
    records = {it.key: worker.run_item(model, it) for it in items}
    assert records == {it.key: ev.run_item(model, it) for it in items}
    keys = [it.key for it in items]
    assert worker.score_subset(records, keys) == ev.score_subset(records, keys)
