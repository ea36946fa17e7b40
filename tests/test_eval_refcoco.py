"""RefCOCO evaluator (vlmfo1/eval/refcoco.py) on a RefCOCO built from coco_tiny in the refer toolkit's layout
(tests/refcoco_fixture.py: a Python 2 protocol-2 refs(unc).p + instances.json), and on its MDETR and Qwen-VL JSON
conversions.

The model is a scripted stand-in (`ScriptedReferringModel`, a test double: it looks the answer up, it computes
nothing of VLM-FO1): it answers with the proposal that best overlaps the ground truth, except on a fixed schedule of
expressions where it answers nothing, an index beyond the proposals, or the worst proposal first and the best second.
The expected Acc@0.5 and proposal ceiling are computed here from the fixture's own ground truth, with this file's
own IoU, and must equal the evaluator's. A couple of items also go through the real tiny random FO1 checkpoint.

Items are driven by `drive` (a plain loop with the runner's record / error semantics) until vlmfo1.eval.runner lands;
switching means replacing `drive`.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest

import refcoco_fixture as rf
from vlmfo1.eval.refcoco import RefCOCOEvaluator, in_split, read_refs
from vlmfo1.fo1_prompt import parse_answer
from vlmfo1.proposals import CocoResultsProposals


# ------------------------------------------------------------------------------------------------- helpers

def drive(ev, model):
    """Every item through run_item, as the runner does: a record (JSON round trip, as through the JSONL file) or an
    error per key."""
    records, errors = {}, {}
    for it in ev.items():
        try:
            records[it.key] = json.loads(json.dumps(ev.run_item(model, it)))
        except Exception as e:  # noqa: BLE001 - the runner records any exception of one item
            errors[it.key] = f"{type(e).__name__}: {e}"
    return records, errors


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

    def __init__(self, expected):
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
    ev = RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, oracle=True)
    assert ev.splits == ["val", "testA", "testB"]                  # train is never reported by default
    items = ev.items()
    assert [it.key for it in items] == [e.key for e in eval_expected(fx)]
    assert all(it.task["split"] != "train" for it in items)
    ev = RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, oracle=True, splits=["test"])
    assert [it.key for it in ev.items()] == [e.key for e in fx["expected"] if e.split in ("testA", "testB")]
    ev = RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, oracle=True, splits=["val", "testA", "testB", "test"])
    assert len(ev.items()) == len(eval_expected(fx))              # each expression asked once
    assert ev.items() == ev.items()                                # deterministic, and a copy each time
    assert in_split("testAB", "testA") and in_split("testAB", "testB") and not in_split("train", "testA")


# ------------------------------------------------------------------------------------------------- scoring

def test_oracle_proposals_accuracy_equals_the_independent_value(fx):
    ev = RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, oracle=True)
    model = ScriptedReferringModel(fx["expected"])
    records, errors = drive(ev, model)
    assert not errors
    exp = eval_expected(fx)
    gt = oracle_boxes(fx)
    outcome = expected_outcome(fx, exp, lambda e: gt[e.image_id])
    report = ev.score(records)
    check_report(report, exp, outcome, ["val", "testA", "testB"])
    assert report["overall"]["proposal_recall"] == 1.0             # the referent is always among its GT boxes
    assert 0.3 < report["overall"]["accuracy"] < 0.9               # the schedule's misses are real misses
    no_pick = sum(mode_of(i) in ("none", "invalid") for i, e in enumerate(fx["expected"]) if e.split != "train")
    assert report["overall"]["no_pick"] == no_pick
    rec = records[fx["expected"][5].key]                            # an "invalid" answer: index kept, no pick
    assert rec["picked"] == [] and rec["invalid_indices"] and rec["pred_box"] is None
    assert all(n == len(gt[e.image_id]) for (_, _, n, _), e in zip(model.calls, exp))
    json.dumps(report)


def test_detector_proposals_accuracy_and_ceiling(fx):
    exp = eval_expected(fx)
    shown = detector_boxes(fx)
    outcome = expected_outcome(fx, exp, lambda e: shown[e.image_id])
    assert 0 < sum(c for c, _ in outcome.values()) < sum(v for _, v in outcome.values()) < len(exp)
    for proposals in (CocoResultsProposals(fx["dets"]), fx["dets"]):   # a source, or a file path
        ev = RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, proposals=proposals)
        records, errors = drive(ev, ScriptedReferringModel(fx["expected"]))
        assert not errors
        report = ev.score(records)
        check_report(report, exp, outcome, ["val", "testA", "testB"])
        assert report["overall"]["proposal_recall"] < 1.0
        assert report["overall"]["accuracy"] <= report["overall"]["proposal_recall"]
        best = {k: r["best_proposal_iou"] for k, r in records.items()}
        assert all((best[e.key] >= 0.5) == outcome[e.key][1] for e in exp)


@pytest.mark.parametrize("form", ["mdetr", "jsonl"])
def test_json_conversions_score_the_same(fx, form):
    exp = eval_expected(fx)
    ev_pickle = RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, proposals=fx["dets"])
    ev_json = RefCOCOEvaluator(fx[form], images=rf.COCO_IMAGES, proposals=fx["dets"])
    a, b = ev_pickle.items(), ev_json.items()
    assert ev_json.splits == ["val", "testA", "testB"]
    assert ev_json.data().form == {"mdetr": "mdetr json", "jsonl": "expression list"}[form]
    by_split = {s: [(it.image, it.image_id, it.task["expression"], it.task["gt"]) for it in a if it.task["split"] == s]
                for s in ev_json.splits}
    for s in ev_json.splits:
        got = [(it.image, it.image_id, it.task["expression"], it.task["gt"]) for it in b if it.task["split"] == s]
        assert got == by_split[s]
    model = ScriptedReferringModel(fx["expected"])
    r_pickle = ev_pickle.score(drive(ev_pickle, model)[0])
    r_json = ev_json.score(drive(ev_json, model)[0])
    for s in ev_json.splits:
        for field in ("expressions", "correct", "no_pick", "accuracy", "proposal_recall"):
            assert r_json["splits"][s][field] == r_pickle["splits"][s][field]
    # oracle boxes for the JSON forms come from a COCO annotation file
    with pytest.raises(ValueError, match="instances="):
        RefCOCOEvaluator(fx[form], images=rf.COCO_IMAGES, oracle=True).items()
    ev = RefCOCOEvaluator(fx[form], images=rf.COCO_IMAGES, oracle=True, instances=fx["instances"])
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
    ev = RefCOCOEvaluator(fx["folder"], images=str(images), oracle=True)
    records, errors = drive(ev, ScriptedReferringModel(fx["expected"]))
    missing = {e.key for e in exp if e.file_name == gone}
    assert set(errors) == missing and all(v.startswith("FileNotFoundError: image not found") for v in errors.values())
    gt = oracle_boxes(fx)
    report = ev.score(records)
    check_report(report, exp, expected_outcome(fx, exp, lambda e: gt[e.image_id]), ["val", "testA", "testB"],
                 missing=missing)
    assert report["overall"]["missing"] == len(missing)
    assert "without a record" in ev.summary(report)


def test_limit_settings_and_summary(fx):
    ev = RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, proposals=fx["dets"], limit=7, max_new_tokens=20)
    assert [it.key for it in ev.items()] == [e.key for e in eval_expected(fx)[:7]]
    model = ScriptedReferringModel(fx["expected"])
    records, _ = drive(ev, model)
    assert all(kw == {"max_new_tokens": 20} for *_, kw in model.calls)
    report = ev.score(records)
    assert report["overall"]["expressions"] == 7
    s = ev.settings()
    json.dumps(s)
    assert s["files"] == [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)}
                          for p in (fx["refs"], fx["instances"])]
    assert s["proposals"]["kind"] == "CocoResultsProposals" and s["proposals"]["bytes"] == os.path.getsize(fx["dets"])
    assert s["prompt"] == "Please detect {} in this image. Answer the question with object indexes."
    assert (s["splits"], s["limit"], s["iou_threshold"]) == (["val", "testA", "testB"], 7, 0.5)
    text = ev.summary(report)
    lines = text.splitlines()
    assert lines[0].startswith("refcoco (unc) — Acc@0.5, proposals: CocoResultsProposals(dets.json)")
    assert [ln.split()[0] for ln in lines[3:]] == ["val", "testA", "testB", "overall"]
    assert f"{100 * report['overall']['accuracy']:.2f}%" in lines[-1]


# ------------------------------------------------------------------------------------------------- bad input

def test_bad_inputs(fx, tmp_path):
    with pytest.raises(ValueError, match="needs proposals"):
        RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES)
    with pytest.raises(ValueError, match="not both"):
        RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, oracle=True, proposals=fx["dets"])
    with pytest.raises(ValueError, match=r"no expressions in split\(s\) \['testC'\]"):
        RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, oracle=True, splits=["testC"]).items()
    with pytest.raises(FileNotFoundError):
        RefCOCOEvaluator(tmp_path / "nothing", images=rf.COCO_IMAGES, oracle=True).items()

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
        RefCOCOEvaluator(d, images=rf.COCO_IMAGES, oracle=True).items()
    assert RefCOCOEvaluator(d, images=rf.COCO_IMAGES, oracle=True, split_by="umd").data().split_by == "umd"
    with pytest.raises(FileNotFoundError, match="instances.json"):
        RefCOCOEvaluator(folder_with({"refs(unc).p": good}, instances=False), images=rf.COCO_IMAGES,
                         oracle=True).items()
    # a refs pickle that carries code is refused, never run
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    import pickle
    d = folder_with({"refs(unc).p": pickle.dumps([Evil()], protocol=2)})
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: refused"):
        RefCOCOEvaluator(d, images=rf.COCO_IMAGES, oracle=True).items()
    assert not marker.exists()
    # refs pointing at annotations / images that instances.json does not have
    refs = [{"ref_id": 0, "ann_id": 123456789, "image_id": 5001, "split": "val", "category_id": 1,
             "sentences": [{"sent": "x", "sent_id": 0, "tokens": ["x"], "raw": "x"}]}]
    d = folder_with({"refs(unc).p": rf.py2_dumps(refs)})
    with pytest.raises(ValueError, match=r"ref 0: annotation 123456789 is not in .*instances.json"):
        RefCOCOEvaluator(d, images=rf.COCO_IMAGES, oracle=True).items()
    d = folder_with({"refs(unc).p": rf.py2_dumps([{"ref_id": 0, "split": "val"}])})
    with pytest.raises(ValueError, match=r"ref 0: expected"):
        RefCOCOEvaluator(d, images=rf.COCO_IMAGES, oracle=True).items()
    d = folder_with({"refs(unc).p": rf.py2_dumps({"not": "a list"})})
    with pytest.raises(ValueError, match="expected a list of refs"):
        RefCOCOEvaluator(d, images=rf.COCO_IMAGES, oracle=True).items()
    # a proposal file that lacks an image: refused before any model work
    dets = [d for d in json.load(open(fx["dets"])) if d["image_id"] != fx["expected"][0].image_id]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(dets))
    with pytest.raises(ValueError, match=r"no proposals for 1 of the \d+ images"):
        RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, proposals=str(partial)).items()
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


# ------------------------------------------------------------------------------------------------- the real engine

def test_real_tiny_fo1_checkpoint(fx, fo1_tiny_ckpt, tmp_path):
    """The wiring with the real engine (random weights: the answers are gibberish, the records are real). The two
    images are shrunk to 160x120 to keep the test fast (the boxes, in the original pixels, are clamped)."""
    from PIL import Image

    from vlmfo1 import VLMFO1

    for e in eval_expected(fx)[:2]:
        with Image.open(os.path.join(rf.COCO_IMAGES, e.file_name)) as im:
            im.convert("RGB").resize((160, 120)).save(tmp_path / e.file_name)
    ev = RefCOCOEvaluator(fx["folder"], images=str(tmp_path), oracle=True, limit=2, max_new_tokens=8)
    with VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2) as model:
        records, errors = drive(ev, model)
    assert not errors and len(records) == 2
    for it in ev.items():
        rec = records[it.key]
        assert isinstance(rec["answer"], str) and rec["finish_reason"] in ("stop", "length")
        assert rec["n_proposals"] == len(it.task["boxes"]) and rec["best_proposal_iou"] == 1.0
        assert all(0 <= i < rec["n_proposals"] for i in rec["picked"])
    report = ev.score(records)
    assert report["overall"]["answered"] == 2 and report["overall"]["proposal_recall"] == 1.0


def test_evaluator_pickles_for_workers(fx):
    """A worker gets the evaluator by pickle, without the parsed annotations, and answers items the same."""
    import pickle

    ev = RefCOCOEvaluator(fx["folder"], images=rf.COCO_IMAGES, proposals=fx["dets"], limit=20)
    items = ev.items()
    blob = pickle.dumps(ev)
    worker = pickle.loads(blob)
    assert worker._data is None and worker._items is None      # the proposal source travels as it is
    model = ScriptedReferringModel(fx["expected"])
    records = {it.key: worker.run_item(model, it) for it in items}
    assert records == {it.key: ev.run_item(model, it) for it in items}
    assert worker.score(records) == ev.score(records)
