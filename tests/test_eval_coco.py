"""The COCO evaluator: scoring parity with pycocotools (and faster-coco-eval), the official prompt, the loop checked
against an independently computed proposal-oracle mAP with a scripted stand-in model (a test double), proposal
sources, and bad inputs."""
import functools
import json
import os
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eval_doubles import OracleStandIn, write_proposals_jsonl  # noqa: E402  (test doubles, tests only)

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from vlmfo1.eval import run  # noqa: E402
from vlmfo1.eval.coco import CocoEvaluator, coco_records, load_annotations  # noqa: E402
from vlmfo1.fo1 import coco_detection_prompt  # noqa: E402
from vlmfo1.results import COCO_CATEGORIES  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
FIXTURE = SHARED / "coco_eval_fixture"
FIX_ANN = FIXTURE / "instances_val2014_100.json"
FIX_RES = FIXTURE / "instances_val2014_fakebbox100_results.json"
TINY = SHARED / "coco_tiny"
TINY_ANN = TINY / "annotations" / "instances_val2017.json"
TINY_IMAGES = TINY / "val2017"

needs_fixture = pytest.mark.skipif(not FIX_ANN.exists(), reason="shared coco_eval_fixture not found")
needs_tiny = pytest.mark.skipif(not TINY_ANN.exists(), reason="shared coco_tiny not found")


def reference_stats(ann_path, dets):
    """pycocotools directly: COCO(file), loadRes, COCOeval bbox over every image."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        dt = gt.loadRes(dets)
        E = COCOeval(gt, dt, "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E


# ---------------------------------------------------------------------------------------------- scoring parity

@needs_fixture
def test_scoring_reproduces_pycocotools_on_the_fixture():
    dets = json.loads(FIX_RES.read_text())
    ref = reference_stats(FIX_ANN, dets)
    ev = CocoEvaluator(None, FIX_ANN, scorer="pycocotools")
    rep = ev.score(coco_records(dets))
    err = float(np.max(np.abs(np.asarray(rep["stats"]) - ref.stats)))
    print(f"[coco parity] pycocotools stats {np.round(ref.stats, 4).tolist()}; max |evaluator - pycocotools| = "
          f"{err:.3e}")
    assert err <= 1e-12
    assert rep["scorer"].startswith("pycocotools")
    assert rep["images"] == 100 and rep["detections"] == len(dets)
    assert rep["metrics"]["AP"] == rep["stats"][0] and rep["metrics"]["ARl"] == rep["stats"][11]
    # per-category AP: the mean over categories with ground truth is the overall AP; AP50/AP75 likewise
    rows = rep["per_category"]
    assert [r["name"] for r in rows] == list(COCO_CATEGORIES)
    for key, stat in (("AP", 0), ("AP50", 1), ("AP75", 2)):
        vals = [r[key] for r in rows if r[key] is not None]
        assert abs(np.mean(vals) - ref.stats[stat]) <= 1e-12
    prec = ref.eval["precision"][:, :, :, 0, 2]
    k = [r["name"] for r in rows].index("person")
    assert rows[k]["AP"] == pytest.approx(float(np.mean(prec[:, :, k][prec[:, :, k] > -1])), abs=1e-15)
    assert sum(r["detections"] for r in rows) == len(dets)
    assert rep["proposal_recall"] is None        # scoring a results file: no proposals
    assert "Average Precision" in ev.summary(rep)


@needs_fixture
def test_faster_coco_eval_gives_the_same_numbers():
    pytest.importorskip("faster_coco_eval")
    dets = json.loads(FIX_RES.read_text())
    ref = reference_stats(FIX_ANN, dets)
    rep = CocoEvaluator(None, FIX_ANN, scorer="faster-coco-eval").score(coco_records(dets))
    assert rep["scorer"].startswith("faster-coco-eval")
    err = float(np.max(np.abs(np.asarray(rep["stats"]) - ref.stats)))
    print(f"[coco parity] max |faster-coco-eval - pycocotools| = {err:.3e}")
    assert err <= 1e-10                          # its documented agreement; measured ~1e-16
    auto = CocoEvaluator(None, FIX_ANN).score(coco_records(dets))     # auto picks it when installed
    assert auto["scorer"] == rep["scorer"]


@needs_fixture
@pytest.mark.parametrize("scorer", ["pycocotools", "faster-coco-eval"])
def test_empty_predictions_score(scorer):
    if scorer == "faster-coco-eval":
        pytest.importorskip("faster_coco_eval")
    ev = CocoEvaluator(None, FIX_ANN, scorer=scorer)
    for records in ({}, {"1146": {"answer": "", "detections": []}}):
        rep = ev.score(records)
        assert rep["detections"] == 0 and rep["images"] == 100
        assert rep["stats"][0] == 0.0 and rep["stats"][8] == 0.0
        assert all(r["AP"] in (0.0, None) for r in rep["per_category"])
    sub = ev.score_subset({}, ["1146"])            # a limited run: the ground truth of its images only
    assert sub["images"] == 1
    with pytest.raises(ValueError, match="not an image id"):
        ev.score_subset({}, ["999999999"])


# ---------------------------------------------------------------------------------------------- the prompt

@needs_tiny
def test_the_prompt_is_the_official_coco_question():
    ev = CocoEvaluator(TINY_IMAGES, TINY_ANN, oracle_proposals=True)
    assert ev.categories == list(COCO_CATEGORIES)
    assert ev.prompt == coco_detection_prompt()
    assert ev.prompt.startswith("Please detect person; bicycle; car; motorcycle; airplane; ")
    assert ev.prompt.endswith("; hair drier; toothbrush in the image and return the object indexes.")
    assert ev.prompt.count("; ") == 79
    assert ev.settings()["prompt"] == ev.prompt

    calls = []

    class Recorder:   # TEST DOUBLE: records what the evaluator asks
        def detect_coco(self, image, **kw):
            calls.append((image, kw))
            return OracleStandIn(TINY_ANN).detect_coco(image, **kw)

    item = ev.items()[0]
    rec = ev.run_item(Recorder(), item)
    image, kw = calls[0]
    assert image == item.image and kw["categories"] == list(COCO_CATEGORIES) and kw["max_new_tokens"] is None
    assert kw["boxes"] == item.task["boxes"] and kw["scores"] == item.task["scores"]
    assert rec["detections"] and all(d["label"] in COCO_CATEGORIES for d in rec["detections"])
    x1, y1, x2, y2 = item.task["boxes"][rec["detections"][0]["index"]]
    assert rec["detections"][0]["bbox"] == [x1, y1, x2 - x1, y2 - y1]


# ---------------------------------------------------------------------------------------------- the loop

def oracle_reference(ann_path, proposals_path, max_boxes=100):
    """The proposal-oracle detections computed independently (pycocotools' IoU): every proposal whose best
    ground-truth overlap is >= 0.5 becomes a detection of that ground truth's category with the proposal's score."""
    ds = json.loads(Path(ann_path).read_text())
    gts = defaultdict(list)
    for a in ds["annotations"]:
        if not a.get("iscrowd"):
            gts[a["image_id"]].append(a)
    props = {}
    for line in Path(proposals_path).read_text().splitlines():
        r = json.loads(line)
        props[r["id"]] = r
    dets, agnostic = [], []
    for im in ds["images"]:
        r = props[im["id"]]
        boxes = [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in r["bbox_list"][:max_boxes]]
        scores = r["score_list"][:max_boxes]
        agnostic += [{"image_id": im["id"], "category_id": 1, "bbox": b, "score": s} for b, s in zip(boxes, scores)]
        g = gts[im["id"]]
        if not boxes or not g:
            continue
        iou = mask_utils.iou([list(map(float, b)) for b in boxes], [a["bbox"] for a in g], [0] * len(g))
        for k, (b, s) in enumerate(zip(boxes, scores)):
            j = int(np.argmax(iou[k]))
            if iou[k, j] >= 0.5:
                dets.append({"image_id": im["id"], "category_id": g[j]["category_id"], "bbox": b, "score": s})
    return dets, agnostic


@pytest.fixture(scope="module")
def tiny_proposals(tmp_path_factory):
    if not TINY_ANN.exists():
        pytest.skip("shared coco_tiny not found")
    return write_proposals_jsonl(TINY_ANN, tmp_path_factory.mktemp("props") / "coco_tiny_upn.jsonl")


@needs_tiny
def test_loop_with_a_stand_in_model_equals_the_proposal_oracle(tiny_proposals, tmp_path):
    ev = CocoEvaluator(TINY_IMAGES, TINY_ANN, tiny_proposals, scorer="pycocotools")
    rep = run(ev, functools.partial(OracleStandIn, str(TINY_ANN)), tmp_path / "run", progress=False, summary=False)
    dets, agnostic = oracle_reference(TINY_ANN, tiny_proposals)
    ref = reference_stats(TINY_ANN, dets)
    err = float(np.max(np.abs(np.asarray(rep["stats"]) - ref.stats)))
    print(f"[coco loop] proposal-oracle mAP {ref.stats[0]:.4f} (AP50 {ref.stats[1]:.4f}); evaluator "
          f"{rep['stats'][0]:.4f}; max |diff| over the 12 stats {err:.3e}")
    assert 0.2 < ref.stats[0] < 0.95             # a real test: neither trivial nor empty
    assert err <= 1e-12
    assert rep["detections"] == len(dets) and rep["run"]["errors"] == 0 and rep["run"]["records"] == 80
    # the proposal-recall ceiling: class-agnostic COCOeval of the proposals alone, computed here independently
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(TINY_ANN))
        E = COCOeval(gt, gt.loadRes(agnostic), "bbox")
        E.params.useCats = 0
        E.evaluate()
        E.accumulate()
        E.summarize()
    pr = rep["proposal_recall"]
    assert pr["proposals"] == len(agnostic)
    assert abs(pr["AR@100"] - E.stats[8]) <= 1e-12 and abs(pr["AR@1"] - E.stats[6]) <= 1e-12
    assert abs(pr["recall@100_IoU0.50"] - E.eval["recall"][0, 0, 0, 2]) <= 1e-12
    try:                                            # faster-coco-eval, when installed: the same numbers
        import faster_coco_eval  # noqa: F401
        records = {json.loads(x)["key"]: json.loads(x)["record"]
                   for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()}
        fast = CocoEvaluator(TINY_IMAGES, TINY_ANN, tiny_proposals, scorer="faster-coco-eval").score(records)
        assert max(abs(x - y) for x, y in zip(fast["stats"], rep["stats"])) <= 1e-10
        assert all(abs(fast["proposal_recall"][k] - v) <= 1e-10 for k, v in pr.items() if isinstance(v, float))
    except ImportError:
        pass
    # the official predictions file: the detections in COCO results format, scored by pycocotools as is
    exported = json.loads((tmp_path / "run" / "coco_results.json").read_text())
    assert len(exported) == len(dets)
    assert abs(reference_stats(TINY_ANN, exported).stats[0] - ref.stats[0]) <= 1e-12


@needs_tiny
def test_a_limited_run_is_scored_over_its_own_images(tiny_proposals, tmp_path):
    """run(limit=K) scores the first K images alone: equal to pycocotools on an annotation file that holds only those
    images (the other images are not counted as images without detections)."""
    ev = CocoEvaluator(TINY_IMAGES, TINY_ANN, tiny_proposals, scorer="pycocotools")
    rep = run(ev, functools.partial(OracleStandIn, str(TINY_ANN)), tmp_path / "run", limit=10, progress=False,
              summary=False)
    ds = json.loads(TINY_ANN.read_text())
    ids = [im["id"] for im in ds["images"][:10]]
    sub = dict(ds, images=ds["images"][:10], annotations=[a for a in ds["annotations"] if a["image_id"] in ids])
    sub_path = tmp_path / "first10.json"
    sub_path.write_text(json.dumps(sub))
    dets, agnostic = oracle_reference(TINY_ANN, tiny_proposals)
    ref = reference_stats(sub_path, [d for d in dets if d["image_id"] in ids])
    err = float(np.max(np.abs(np.asarray(rep["stats"]) - ref.stats)))
    assert err <= 1e-12 and rep["images"] == 10 and rep["images_missing"] == 0, err
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(sub_path))
        E = COCOeval(gt, gt.loadRes([d for d in agnostic if d["image_id"] in ids]), "bbox")
        E.params.useCats = 0
        E.evaluate()
        E.accumulate()
        E.summarize()
    assert abs(rep["proposal_recall"]["AR@100"] - E.stats[8]) <= 1e-12
    assert sum(r["gt"] for r in rep["per_category"]) == sum(not a.get("iscrowd") for a in sub["annotations"])
    records = {p["key"]: p["record"] for p in map(json.loads, (tmp_path / "run" / "predictions.jsonl").read_text()
                                                  .splitlines())}
    whole = ev.score(records)                      # the whole file: the 70 images not run have no detections
    assert whole["images"] == 80 and whole["images_missing"] == 70 and whole["stats"][0] < rep["stats"][0]


@needs_tiny
def test_coco_results_file_as_proposals(tiny_proposals, tmp_path):
    """A detector's COCO results file as the proposal source: sorted by score, the first max_proposals, a listed
    image without detections gets no proposals and is recorded without asking the model."""
    lines = [json.loads(s) for s in Path(tiny_proposals).read_text().splitlines()]
    results = []
    for r in lines[1:]:                            # the first image has no detections at all
        for b, s in zip(r["bbox_list"], r["score_list"]):
            results.append({"image_id": r["id"], "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            "score": s})
    results.reverse()                              # any order: the reader sorts by score
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(results))
    ev = CocoEvaluator(TINY_IMAGES, TINY_ANN, path, max_proposals=5)
    items = ev.items()
    assert items[0].task == {"boxes": [], "scores": []}
    assert all(len(it.task["boxes"]) <= 5 for it in items)
    assert all(it.task["scores"] == sorted(it.task["scores"], reverse=True) for it in items)
    assert ev.run_item(None, items[0]) == {"answer": None, "skipped": "no proposals", "detections": []}
    assert ev.settings()["proposals"]["name"] == "detector.json"


# ---------------------------------------------------------------------------------------------- bad input

def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@needs_tiny
def test_bad_annotation_files(tmp_path):
    ds = json.loads(TINY_ANN.read_text())
    no_images = _write(tmp_path / "a.json", {k: v for k, v in ds.items() if k != "images"})
    with pytest.raises(ValueError, match="no 'images' list"):
        CocoEvaluator(TINY_IMAGES, no_images, oracle_proposals=True).items()
    lost = dict(ds, images=ds["images"][1:])        # annotations of an image the file no longer lists
    with pytest.raises(ValueError, match=r"image_id \d+ is not in the file's 'images' list"):
        load_annotations(_write(tmp_path / "b.json", lost))
    (tmp_path / "c.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="not a valid COCO annotation JSON"):
        load_annotations(tmp_path / "c.json")
    bad_box = json.loads(TINY_ANN.read_text())
    bad_box["annotations"][3]["bbox"] = [1, 2, float("nan"), 4]
    with pytest.raises(ValueError, match=r"annotations\[3\]: bbox"):
        load_annotations(_write(tmp_path / "d.json", bad_box))
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_annotations(tmp_path / "nope.json")


@needs_tiny
def test_annotated_images_missing_from_the_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in sorted(TINY_IMAGES.iterdir())[:-2]:
        os.symlink(p, folder / p.name)
    with pytest.raises(ValueError, match=r"2 of the 80 images of .* are not in .*images"):
        CocoEvaluator(folder, TINY_ANN, oracle_proposals=True).items()
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        CocoEvaluator(tmp_path / "nope", TINY_ANN, oracle_proposals=True).items()


@needs_tiny
def test_proposals_for_unknown_and_missing_images(tiny_proposals, tmp_path):
    lines = Path(tiny_proposals).read_text().splitlines()
    extra = json.loads(lines[0])
    extra.update(id=123456789, image="000123456789.jpg")
    more = tmp_path / "more.jsonl"
    more.write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
    with pytest.warns(RuntimeWarning, match=r"proposals for 1 images that instances_val2017.json does not list "
                                            r"\(e.g. 123456789\): ignored"):
        items = CocoEvaluator(TINY_IMAGES, TINY_ANN, more).items()
    assert len(items) == 80
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(ValueError, match=r"no proposals for 3 of the 80 images"):
        CocoEvaluator(TINY_IMAGES, TINY_ANN, fewer).items()
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(extra) + "\n")
    with pytest.raises(ValueError, match="none of the 80 images"):
        CocoEvaluator(TINY_IMAGES, TINY_ANN, other).items()
    with pytest.raises(ValueError, match="not both"):
        CocoEvaluator(TINY_IMAGES, TINY_ANN, other, oracle_proposals=True)
    with pytest.raises(ValueError, match="no proposals"):
        CocoEvaluator(TINY_IMAGES, TINY_ANN).items()
    asked = [json.loads(x) for x in lines]
    for r in asked:
        r["conversations"][0]["value"] = "<image>\nPlease detect cat; dog in the image and return the object indexes."
    other_q = tmp_path / "other_question.jsonl"
    other_q.write_text("".join(json.dumps(r) + "\n" for r in asked))
    with pytest.warns(RuntimeWarning, match=r"its records ask .*Please detect cat; dog.*not this evaluator's question"):
        CocoEvaluator(TINY_IMAGES, TINY_ANN, other_q).items()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # the official question: no warning
        CocoEvaluator(TINY_IMAGES, TINY_ANN, tiny_proposals).items()
    with pytest.raises(ValueError, match="unknown scorer"):
        CocoEvaluator(TINY_IMAGES, TINY_ANN, oracle_proposals=True, scorer="detectron")
