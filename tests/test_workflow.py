"""The researcher's workflow on a tiny random VLM-FO1 checkpoint and real images: every task in one call, proposals in
every form and format (identical tokens), results and their exports (COCO via pycocotools, supervision, JSON, PNG),
streaming, batches, loading options, and the bad inputs a user can give."""
import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TIKTOKEN = SHARED / "tokenizer" / "qwen.tiktoken"
COCO = SHARED / "coco_tiny"
DEMO = SHARED / "demo"

pytestmark = pytest.mark.skipif(not TIKTOKEN.exists() or not COCO.exists(), reason="shared data not found")


def coco_image(i):
    """(path, image id, GT boxes xyxy, GT category names) of the i-th coco_tiny image."""
    ann = json.load(open(COCO / "annotations" / "instances_val2017.json"))
    names = {c["id"]: c["name"] for c in ann["categories"]}
    img = sorted(ann["images"], key=lambda x: x["id"])[i]
    anns = [a for a in ann["annotations"] if a["image_id"] == img["id"]]
    boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
    return str(COCO / "val2017" / img["file_name"]), img["id"], boxes, [names[a["category_id"]] for a in anns]


def demo():
    d = json.load(open(DEMO / "demo_boxes.json"))
    return str(DEMO / "demo_image.jpg"), np.array(d["boxes"], dtype=np.float64)


@pytest.fixture(scope="module")
def ckpt(fo1_tiny_ckpt):
    return fo1_tiny_ckpt             # the session's tiny checkpoint (conftest), written once


@pytest.fixture(scope="module")
def model(ckpt):
    from vlmfo1 import VLMFO1
    return VLMFO1.from_pretrained(ckpt, threads=2)


# ---------------------------------------------------------------------------------------------- tasks

def test_every_task_is_one_call(model):
    img, boxes = demo()
    scores = np.linspace(0.9, 0.3, len(boxes))
    calls = {"detect": (["orange", "apple"],), "detect_coco": (), "count": ("orange",), "refer": ("the big orange",),
             "ground": (), "describe_region": (2,), "read_region": ([0, 1],), "detect_like": (3,),
             "reason": ("Which fruit is ripe?",), "chat": ("What is in <region4>?",)}
    from vlmfo1.fo1 import TASKS
    assert set(calls) == set(TASKS)
    for task, args in calls.items():
        res = getattr(model, task)(img, *args, boxes=boxes, scores=scores, max_new_tokens=3)
        assert res.task == task and len(res.token_ids) == 3 or res.finish_reason == "stop"
        assert res.finish_reason in ("stop", "length") and res.image_size == (500, 399)
        assert set(res.timings) == {"preprocess", "vit", "davit", "hfre", "prefill", "decode"}
        assert all(v >= 0 for v in res.timings.values())
        np.testing.assert_array_equal(res.proposals, boxes)
        np.testing.assert_array_equal(res.proposal_scores, scores)
        assert res.text == model.tokenizer.decode(res.token_ids).strip()
        assert repr(res).startswith(f"FO1Result({task}:")
    # the official wordings
    assert model.count(img, "orange", boxes=boxes, max_new_tokens=1).prompt.startswith(
        "How many orange are there in the image? Count each instance")
    coco = model.detect_coco(img, boxes=boxes, max_new_tokens=1).prompt
    assert coco.startswith("Please detect person; bicycle; car;") and coco.endswith(
        "toothbrush in the image and return the object indexes.")
    assert model.detect(img, ["person", "dog"], boxes=boxes, max_new_tokens=1).prompt == \
        "Please detect person, dog in this image. Answer the question with object indexes."
    assert model.describe_region(img, [1, 5], boxes=boxes, detailed=True, max_new_tokens=1).prompt == \
        "Provide a detailed description for <region1><region5>."


def test_default_max_new_tokens_is_sized_per_task(model):
    from vlmfo1.fo1 import MAX_NEW_TOKENS
    img, boxes = demo()
    res = model.detect(img, "orange", boxes=boxes)
    base, per_box, per_cat = MAX_NEW_TOKENS["detect"]
    assert len(res.token_ids) == base + per_box * len(boxes) + per_cat or res.finish_reason == "stop"
    first = res.token_ids[0]
    res = model.detect(img, "orange", boxes=boxes, stop_ids=[first])
    assert res.token_ids == [first] and res.finish_reason == "stop"


def test_streaming_equals_non_streaming(model, capsys):
    from vlmfo1 import FO1Result
    img, boxes = demo()
    whole = model.refer(img, "the left orange", boxes=boxes, max_new_tokens=12)
    pieces = list(model.stream("refer", img, "the left orange", boxes=boxes, max_new_tokens=12, progress=True))
    assert isinstance(pieces[-1], FO1Result) and all(isinstance(p, str) for p in pieces[:-1])
    assert "".join(pieces[:-1]).strip() == whole.text
    assert pieces[-1].token_ids == whole.token_ids and pieces[-1].detections == whole.detections
    err = capsys.readouterr().err                      # the tqdm bar over tokens
    assert "refer:" in err and "/12 [" in err and "tok/s" in err


def test_box_formats_and_forms_give_identical_tokens(model):
    import supervision as sv
    import torch
    from vlmfo1.proposals import Proposals, as_boxes
    img, xyxy = demo()
    W, H = 500, 399
    scores = np.linspace(0.9, 0.3, len(xyxy))
    x1, y1, x2, y2 = xyxy.T
    w, h = x2 - x1, y2 - y1
    xywh = np.stack([x1, y1, w, h], 1)
    cxcywh = np.stack([x1 + w / 2, y1 + h / 2, w, h], 1)
    norm = np.array([W, H, W, H], dtype=np.float64)
    forms = {
        "xyxy list": dict(boxes=xyxy.tolist()),
        "xywh": dict(boxes=xywh, box_format="xywh"),
        "cxcywh": dict(boxes=cxcywh, box_format="cxcywh"),
        "xyxyn": dict(boxes=xyxy / norm, box_format="xyxyn"),
        "xywhn": dict(boxes=xywh / norm, box_format="xywhn"),
        "cxcywhn": dict(boxes=cxcywh / norm, box_format="cxcywhn"),
        "torch float32": dict(boxes=torch.tensor(xyxy, dtype=torch.float32)),
        "torch float16": dict(boxes=torch.tensor(xyxy, dtype=torch.float16)),  # integers < 2048 are exact in fp16
        "supervision": dict(boxes=sv.Detections(xyxy=xyxy.astype(np.float32), confidence=scores.astype(np.float32))),
        "coco dicts": dict(boxes=[{"bbox": b.tolist(), "score": s} for b, s in zip(xywh, scores)]),
        "Proposals": dict(boxes=Proposals(xyxy, scores)),
    }
    for name, kw in forms.items():     # all the same boxes (up to float rounding of the normalized forms)
        got = as_boxes(kw["boxes"], box_format=kw.get("box_format"), image_size=(W, H)).boxes
        np.testing.assert_allclose(got, xyxy, rtol=0, atol=1e-9, err_msg=name)
    bf16 = torch.tensor(xyxy, dtype=torch.bfloat16)                     # bf16 keeps 8 bits: 357 -> 356
    np.testing.assert_array_equal(as_boxes(bf16).boxes, bf16.float().numpy())
    ref = model.detect(img, "orange", boxes=xyxy, max_new_tokens=6).token_ids
    for name in ("xywh", "cxcywhn", "torch float16", "supervision", "coco dicts"):
        got = model.detect(img, "orange", max_new_tokens=6, **forms[name]).token_ids
        assert got == ref, name


def test_results_exports(model, tmp_path):
    import supervision as sv
    from pycocotools.coco import COCO as CocoApi
    from pycocotools.cocoeval import COCOeval
    from vlmfo1.fo1_prompt import parse_answer
    from vlmfo1.proposals import as_boxes
    from vlmfo1.results import COCO_CATEGORY_IDS, FO1Result, coco_results

    gt = CocoApi(str(COCO / "annotations" / "instances_val2017.json"))
    assert COCO_CATEGORY_IDS == {c["name"]: c["id"] for c in gt.dataset["categories"]}   # the 91-id map
    img, image_id, boxes, names = coco_image(3)
    scores = np.linspace(0.95, 0.5, len(boxes))
    # an answer naming every GT box with its category: exported results must score AP = 1 on that image
    text = "".join(f"<ground>{n}</ground><objects><region{i}></objects>" for i, n in enumerate(names))
    res = parse_answer(text, boxes, scores=scores, image=img, image_size=(1, 1))
    dets = res.to_coco(image_id)
    assert len(dets) == len(boxes) and {d["score"] for d in dets} == set(scores.tolist())
    ev = COCOeval(gt, coco_results(gt, dets), "bbox")
    ev.params.imgIds = [image_id]
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    # zero detections: pycocotools' loadRes fails on an empty list; coco_results does not
    real = model.detect_coco(img, boxes=boxes, scores=scores, max_new_tokens=2)
    empty = coco_results(gt, real.to_coco(image_id) if real.to_coco(image_id) else [])
    ev = COCOeval(gt, empty, "bbox")
    ev.params.imgIds = [image_id]
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] in (0.0, -1.0) or len(real.detections)
    # supervision round trip
    d = res.to_supervision()
    assert isinstance(d, sv.Detections) and len(d) == len(boxes)
    back = as_boxes(d)
    np.testing.assert_allclose(back.boxes, np.asarray(boxes), atol=1e-3)
    np.testing.assert_allclose(back.scores, scores, atol=1e-6)
    assert list(d.data["class_name"]) == names and list(d.data["region_index"]) == list(range(len(boxes)))
    # JSON round trip, pictures
    again = FO1Result.from_dict(json.loads(res.to_json()))
    assert again.detections == res.detections and again.text == res.text
    png = real._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    real.save(tmp_path / "r.png")
    real.save(tmp_path / "r.json")
    from PIL import Image
    assert Image.open(tmp_path / "r.png").size == Image.open(img).size
    assert json.load(open(tmp_path / "r.json"))["task"] == "detect_coco"
    with pytest.raises(ValueError, match="extension"):
        real.save(tmp_path / "r.txt")
    arr = np.asarray(Image.open(img).convert("RGB"))
    from_array = model.refer(arr, "x", boxes=boxes, max_new_tokens=1)
    assert from_array._repr_png_()[:4] == b"\x89PNG"       # the result keeps the array it came from


def test_proposal_sources(model, tmp_path):
    from vlmfo1.proposals import CallableProposals, CocoResultsProposals
    img, image_id, boxes, names = coco_image(5)
    scores = np.linspace(0.9, 0.4, len(boxes))
    ref = model.detect(img, "dog", boxes=boxes, scores=scores, max_new_tokens=4)
    src = CallableProposals(lambda image: (np.asarray(boxes), scores))
    got = model.detect(img, "dog", proposals=src, max_new_tokens=4)
    assert got.token_ids == ref.token_ids
    np.testing.assert_array_equal(got.proposal_scores, scores)
    dets = [{"image_id": image_id, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            for b, s in zip(boxes, scores)]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    src = CocoResultsProposals(str(tmp_path / "dets.json"))
    got = model.detect(img, "dog", proposals=src, image_id=image_id, max_new_tokens=4)
    assert got.token_ids == ref.token_ids


def test_batch_reuses_the_model(model):
    cases = [coco_image(i) for i in (0, 1)]
    res = model.batch("detect", [c[0] for c in cases], ["person", "dog"], boxes=[c[2] for c in cases],
                      max_new_tokens=3, progress=False)
    for r, c in zip(res, cases):
        assert r.token_ids == model.detect(c[0], ["person", "dog"], boxes=c[2], max_new_tokens=3).token_ids
    with pytest.raises(ValueError, match="2 entries for 1 images"):
        model.batch("detect", [cases[0][0]], "dog", boxes=[c[2] for c in cases])


# ---------------------------------------------------------------------------------------------- loading

def test_loading_options_repr_and_close(ckpt):
    from vlmfo1 import FO1, VLMFO1
    with VLMFO1.from_pretrained(ckpt, threads=1, mode="exact", dtype="float32") as m:
        r = repr(m)
        assert "threads 1" in r and "mode 'exact'" in r and "f32" in r and "GiB" in r and "decoder" in r
        assert m.threads == 1 and m.num_parameters["decoder"] > 0 and m.weight_bytes > 0
        with pytest.raises(TypeError, match="cannot be pickled.*from_pretrained"):
            pickle.dumps(m)
    assert "closed" in repr(m)
    img, boxes = demo()
    with pytest.raises(RuntimeError, match="closed"):
        m.detect(img, "orange", boxes=boxes)
    assert FO1 is VLMFO1 and FO1.load(ckpt, n_threads=1).threads == 1


def test_default_threads(monkeypatch, tmp_path):
    from vlmfo1.threads import available_cpus, cgroup_cpu_limit, default_threads
    monkeypatch.delenv("VLMFO1_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")
    assert default_threads() == 3
    monkeypatch.setenv("VLMFO1_NUM_THREADS", "5")
    assert default_threads() == 5
    monkeypatch.setenv("VLMFO1_NUM_THREADS", "lots")
    with pytest.warns(RuntimeWarning, match="not a thread count"):
        assert default_threads() == 3
    monkeypatch.delenv("VLMFO1_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == available_cpus() <= len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")          # a cgroup v2 quota of 1.5 CPUs
    assert cgroup_cpu_limit(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_exception(model, ckpt, tmp_path):
    from vlmfo1 import VLMFO1
    img, boxes = demo()
    with pytest.raises(ValueError, match="unknown task 'segment'"):
        model.stream("segment", img, "x", boxes=boxes)
    with pytest.raises(ValueError, match="list is empty"):
        model.detect(img, [], boxes=boxes)
    with pytest.raises(TypeError, match="one category"):
        model.count(img, ["orange", "apple"], boxes=boxes)
    with pytest.raises(TypeError, match="must be strings"):
        model.detect(img, ["orange", 3], boxes=boxes)
    with pytest.raises(TypeError, match="string"):
        model.refer(img, ["the orange"], boxes=boxes)
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        model.detect(str(tmp_path / "nowhere.jpg"), "orange", boxes=boxes)
    with pytest.raises(ValueError, match="box_format|format"):
        model.detect(img, "orange", boxes=boxes, box_format="yxyx")
    with pytest.raises(ValueError, match="no proposal boxes"):
        model.detect(img, "orange")
    with pytest.raises(ValueError, match="not both"):
        model.detect(img, "orange", boxes=boxes, proposals=lambda im, image_id=None: boxes)
    with pytest.raises(ValueError, match="<region9>"):
        model.chat(img, "What is <region9>?", boxes=boxes)
    with pytest.raises(ValueError, match="region index out of range"):
        model.describe_region(img, 7, boxes=boxes)
    with pytest.raises(TypeError, match="region ind"):
        model.read_region(img, "2", boxes=boxes)
    with pytest.raises(TypeError, match="max_new_tokens"):
        model.detect(img, "orange", boxes=boxes, max_new_tokens=2.5)
    with warnings.catch_warnings(record=True) as w:                   # xywh boxes passed as xyxy
        warnings.simplefilter("always")
        x1, y1, x2, y2 = boxes.T
        model.detect(img, "orange", boxes=np.stack([x1 + 100, y1 + 100, x2 - x1, y2 - y1], 1), max_new_tokens=1)
    assert any("xywh" in str(x.message) for x in w)
    with pytest.raises(FileNotFoundError, match="not found"):
        VLMFO1.from_pretrained(tmp_path / "no-such-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        VLMFO1.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="threads"):
        VLMFO1.from_pretrained(ckpt, threads=0)


def _worker_init(path):
    global _worker_model
    from vlmfo1 import VLMFO1
    _worker_model = VLMFO1.from_pretrained(path, threads=1)


def _worker_detect(job):
    image, boxes = job
    return _worker_model.detect(image, "person", boxes=boxes, max_new_tokens=3).token_ids


def test_the_documented_multi_process_pattern(model, ckpt):
    """README 'Many images, many processes': one model per worker, loaded from the path; results equal one process."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    jobs = [(c[0], c[2]) for c in (coco_image(0), coco_image(2))]
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(ckpt,)) as ex:
        got = list(ex.map(_worker_detect, jobs))
    assert got == [model.detect(im, "person", boxes=b, max_new_tokens=3).token_ids for im, b in jobs]
