"""VLM-FO1 end to end on a tiny random checkpoint in the official layout (written by vlmfo1 itself):
real COCO images with their ground-truth boxes as proposals, and the bad inputs a user can give."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TIKTOKEN = SHARED / "tokenizer" / "qwen.tiktoken"
COCO = SHARED / "coco_tiny"

pytestmark = pytest.mark.skipif(not TIKTOKEN.exists() or not COCO.exists(), reason="shared data not found")


def coco_case(i):
    ann = json.load(open(COCO / "annotations" / "instances_val2017.json"))
    img = sorted(ann["images"], key=lambda x: x["id"])[i]
    boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
             for a in ann["annotations"] if a["image_id"] == img["id"]]
    return str(COCO / "val2017" / img["file_name"]), boxes


@pytest.fixture(scope="module")
def ckpt(fo1_tiny_ckpt):
    return fo1_tiny_ckpt   # conftest: written once per session, shared with test_thread_invariance


@pytest.fixture(scope="module")
def fo1(ckpt):
    from vlmfo1.fo1 import FO1
    return FO1.load(ckpt, n_threads=2)


def test_detect_on_coco(fo1):
    img, boxes = coco_case(0)
    res = fo1.detect(img, ["person", "dog"], boxes=boxes, max_new_tokens=6)
    assert len(res.token_ids) == 6 or res.token_ids[-1] in fo1.decoder.stop_ids
    assert isinstance(res.text, str)
    ids, emb, pos, delta, used, prompt = fo1.prepare(img, boxes, "Please detect dog in this image.")
    assert ids.count(-300) == len(boxes) and emb.shape == (len(ids), fo1.decoder.config.hidden_size)
    assert np.isfinite(emb).all() and pos.shape == (3, len(ids))
    # region slots count as text positions: each one is one step after its <regionI> tag
    r = [i for i, t in enumerate(ids) if t == -300]
    assert all(pos[0, i] == pos[0, i - 1] + 1 for i in r)
    assert prompt.count("<regionfeat>") == len(boxes)


def test_region_tokens_depend_on_their_box(fo1):
    img, boxes = coco_case(1)
    _, _, regions, _ = fo1.encode_features(img, boxes)
    _, _, regions2, _ = fo1.encode_features(img, boxes[::-1])
    assert regions.shape == (len(boxes), fo1.decoder.config.hidden_size)
    np.testing.assert_allclose(regions2[::-1], regions, rtol=1e-5, atol=1e-5)


def test_zero_boxes_and_odd_boxes(fo1):
    img, _ = coco_case(2)
    res = fo1.generate(img, [], "Describe the image.", max_new_tokens=3)
    assert len(res.token_ids) >= 1 and res.detections == []
    odd = [[50, 50, 10, 10],            # inverted
           [30, 30, 30, 30],            # degenerate
           [-500, -500, 5000, 5000],    # larger than the image
           [3000, 3000, 4000, 4000]]    # outside the image
    ids, emb, _, _, used, _ = fo1.prepare(img, odd, "Please detect cat in this image.")
    assert np.isfinite(emb).all() and ids.count(-300) == 4


def test_bad_boxes(fo1):
    img, boxes = coco_case(0)
    with pytest.raises(ValueError, match="NaN"):
        fo1.generate(img, [[0, 0, np.nan, 10]], "x", max_new_tokens=1)
    with pytest.raises(ValueError, match="infinite"):
        fo1.generate(img, [[0, 0, np.inf, 10]], "x", max_new_tokens=1)
    with pytest.raises(ValueError, match="at most 100"):
        fo1.generate(img, [[0, 0, 10, 10]] * 101, "x", max_new_tokens=1)
    with pytest.warns(RuntimeWarning, match="first 100"):
        ids, *_ = fo1.prepare(img, [[0, 0, 10, 10]] * 101, "x", truncate_boxes=True)
    assert ids.count(-300) == 100


def test_bad_image(fo1, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError):
        fo1.generate(str(bad), [[0, 0, 10, 10]], "x", max_new_tokens=1)
    with pytest.raises(ValueError):
        fo1.generate(np.zeros((0, 0, 3), np.uint8), [[0, 0, 10, 10]], "x", max_new_tokens=1)


@pytest.mark.parametrize("drop,match", [
    ("model.vision_tower_aux.", "DaViT"),                                   # the DaViT
    ("model.object_vp_extractor.simple_fpn.simfp_3.", "simfp_3"),           # one SimpleFP level
    ("model.mm_projector_aux.2.", "mm_projector_aux.2.weight"),             # half of the region projector
    ("model.vision_tower.", "vision tensors"),                              # the Qwen ViT
])
def test_checkpoint_missing_fo1_module(ckpt, tmp_path, drop, match):
    from vlmfo1.fo1 import FO1
    from vlmfo1.safetensors import Checkpoint, save_file
    src = Checkpoint(ckpt)
    dst = tmp_path / "VLM-FO1_Qwen2.5-VL-3B-broken"
    dst.mkdir()
    for f in os.listdir(ckpt):
        if not f.endswith(".safetensors") and f != "model.safetensors.index.json":
            shutil.copy(os.path.join(ckpt, f), dst / f)
    tensors = {n: (src.info(n).dtype, np.asarray(src.get(n))) for n in src.keys() if not n.startswith(drop)}
    assert len(tensors) < len(list(src.keys()))
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(KeyError, match=match):
        FO1.load(str(dst))


def test_truncated_fo1_shard(ckpt, tmp_path):
    from vlmfo1.fo1 import FO1
    dst = tmp_path / "VLM-FO1_Qwen2.5-VL-3B-truncated"
    shutil.copytree(ckpt, dst)
    last = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))[-1]
    with open(dst / last, "r+b") as f:
        f.truncate(os.path.getsize(dst / last) // 2)
    with pytest.raises(ValueError, match="offsets"):
        FO1.load(str(dst))


def test_cli_detect(ckpt, tmp_path, capsys):
    from vlmfo1.cli import main
    img, boxes = coco_case(0)
    bfile = tmp_path / "boxes.json"
    bfile.write_text(json.dumps({"boxes": boxes}))
    assert main(["detect", img, "person", "dog", "--model", ckpt, "--boxes", str(bfile),
                 "--max-new-tokens", "4", "--threads", "2"]) == 0
    assert "answer:" in capsys.readouterr().out


def test_markers_in_user_text_are_refused(fo1):
    img, boxes = coco_case(0)
    for bad in ("look at <|image_pad|> here", "a <regionfeat> marker", "two images <image>"):
        with pytest.raises(ValueError, match="must"):
            fo1.prepare(img, boxes, bad)
    ids, *_ = fo1.prepare(img, boxes, "Provide a brief description for <region1>.")   # region tags are fine
    assert ids.count(-300) == len(boxes)


def test_prompt_longer_than_tokenizer_model_max_length_is_refused(fo1):
    # ERRATA E7: the official model truncates the spliced embeddings but not the ids at this length and fails
    img, boxes = coco_case(0)
    ids = fo1.prepare(img, boxes, "Please detect dog in this image.")[0]
    old = fo1.config.get("tokenizer_model_max_length")
    try:
        fo1.config["tokenizer_model_max_length"] = len(ids)
        assert fo1.prepare(img, boxes, "Please detect dog in this image.")[0] == ids      # exactly at the limit
        fo1.config["tokenizer_model_max_length"] = len(ids) - 1
        with pytest.raises(ValueError, match="tokenizer_model_max_length"):
            fo1.detect(img, ["dog"], boxes=boxes, max_new_tokens=2)
    finally:
        if old is None:
            fo1.config.pop("tokenizer_model_max_length", None)
        else:
            fo1.config["tokenizer_model_max_length"] = old


def test_concurrent_requests_match_serial(fo1):
    # one loaded model serving several threads (weights are read-only; every request has its own state)
    import threading
    cases = [coco_case(i) for i in range(3)]
    serial = [fo1.detect(img, ["person", "dog"], boxes=boxes, max_new_tokens=5).token_ids for img, boxes in cases]
    got, errors = [None] * len(cases), []

    def run(i):
        try:
            img, boxes = cases[i]
            got[i] = fo1.detect(img, ["person", "dog"], boxes=boxes, max_new_tokens=5).token_ids
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and got == serial


def test_core_models_reject_missing_or_bad_entries(ckpt, monkeypatch):
    # the C binding is an API boundary too: every tensor it needs, taken away, is a KeyError (never a crash)
    from vlmfo1 import _native
    from vlmfo1.fo1 import FO1
    core = _native.core
    seen = {}
    for name in ("Qwen2Model", "VisionModel", "DavitModel", "HFREModel"):
        cls = getattr(core, name)

        def record(cfg, tensors, _cls=cls, _name=name):
            seen[_name] = (cfg, dict(tensors))
            return _cls(cfg, tensors)
        monkeypatch.setattr(core, name, record)
    fo1 = FO1.load(ckpt, n_threads=1)
    monkeypatch.undo()
    assert set(seen) == {"Qwen2Model", "VisionModel", "DavitModel", "HFREModel"}
    for name, (cfg, tensors) in seen.items():
        cls = getattr(core, name)
        for key in tensors:
            with pytest.raises(KeyError):
                cls(cfg, {k: v for k, v in tensors.items() if k != key})
    cfg, tensors = seen["VisionModel"]
    with pytest.raises(ValueError, match="num_heads"):
        core.VisionModel(dict(cfg, n_heads=0), tensors)
    with pytest.raises(ValueError, match="out of range"):
        core.VisionModel(dict(cfg, depth=2 ** 40), tensors)
    s = fo1.decoder.session(max_context=16)
    s.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="cache length"):
        s._state.truncate(2 ** 32)
    assert s._state.n_past == 3


def test_bad_requests_fail_before_the_image_work(fo1, monkeypatch):
    img, boxes = coco_case(0)
    calls = []
    monkeypatch.setattr(fo1, "encode", lambda *a, **k: calls.append(1))
    for bad in (dict(index=len(boxes)), dict(index=-1)):                   # no such region
        with pytest.raises(ValueError, match="region index out of range"):
            fo1.describe_region(img, boxes=boxes, max_new_tokens=2, **bad)
    with pytest.raises(ValueError, match="region index out of range"):
        fo1.detect_like(img, [0, 99], boxes=boxes, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):                            # bad sampling options
        fo1.detect(img, ["dog"], boxes=boxes, top_p=0.0)
    with pytest.raises(ValueError, match="must not contain"):                 # markers in the text
        fo1.prepare(img, boxes, "a <regionfeat> here")
    assert calls == []


def test_nan_logits_raise():
    from vlmfo1.generation import _sample
    rng = np.random.default_rng(0)
    x = np.zeros(10, np.float32)
    x[3] = np.nan
    for t, p, k in ((0.0, 1.0, 0), (1.0, 1.0, 0), (1.0, 0.9, 0), (1.0, 0.9, 5)):
        for ref in (False, True):
            with pytest.raises(FloatingPointError):
                _sample(x, t, p, k, rng, ref)
