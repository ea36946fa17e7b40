"""UPN on the CPU (vlmfo1.upn, csrc/swin.c, csrc/upn.c): parity with the official UPN code through the goldens of
tests/golden/make_upn_golden.py (random tiny weights, real COCO images), thread invariance, the .pth loader, and
bad input (a checkpoint that is not UPN, hostile pickles, an image with no proposal above the threshold)."""
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from vlmfo1.proposals import Proposals
from vlmfo1.testing import upn_config, write_random_upn
from vlmfo1.upn import UPN, load_upn_state_dict, postprocess, preprocess, upn_input_size

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
COCO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "coco_tiny", "val2017")
needs_coco = pytest.mark.skipif(not os.path.isdir(COCO), reason="../shared/data/coco_tiny is absent")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_random_upn(str(tmp_path_factory.mktemp("upn") / "upn_tiny.safetensors"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def upn(tiny_path):
    return UPN.from_pretrained(tiny_path, n_threads=2)


def _coco_image(i=0):
    return os.path.join(COCO, sorted(os.listdir(COCO))[i])


# ----------------------------------------------------------------------------------------------- preprocessing


def test_input_size_matches_the_reference_rule():
    with open(os.path.join(GOLDEN, "upn_resize_golden.json")) as f:
        gold = json.load(f)
    cases = gold["cases"] if isinstance(gold, dict) and "cases" in gold else gold
    assert len(cases) >= 6
    for case in cases:
        (w, h), want = case["in"], case["out"]
        assert tuple(upn_input_size(w, h)) == tuple(want), (w, h)


def test_input_size_refuses_empty_images():
    with pytest.raises(ValueError, match="positive"):
        upn_input_size(0, 10)


# ----------------------------------------------------------------------------------------------- parity


def _golden_files():
    return sorted(f for f in os.listdir(GOLDEN) if f.startswith("upn_tiny_") and f.endswith(".npz"))


def _at(arr, idx):
    """arr[idx[:, 0], idx[:, 1], ...] for an index matrix"""
    return arr[tuple(idx.T)]


@needs_coco
@pytest.mark.parametrize("name", _golden_files())
def test_parity_with_the_official_upn(upn, name):
    g = np.load(os.path.join(GOLDEN, name), allow_pickle=False)
    image = os.path.join(COCO, str(g["image"]))
    pixels, size = preprocess(image)
    assert tuple(pixels.shape[1:]) == tuple(int(x) for x in g["input_hw"])
    logits, boxes, taps = upn.forward(pixels, taps=True)
    errs = {}
    # backbone levels and neck: subsets of (channel, y, x) entries of the NCHW maps
    for l in range(4):
        ours = taps[f"backbone{l}"].transpose(2, 0, 1)
        errs[f"backbone{l}"] = np.abs(_at(ours, g[f"backbone{l}_idx"]) - g[f"backbone{l}_val"]).max()
    shapes = taps["shapes"]
    start = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])])
    for l in range(5):
        h, w = shapes[l]
        for key, ours_all in (("srcs", taps["srcs"]), ("pos", taps["pos"]), ("memory", taps["memory"])):
            k = f"{key}{l}"
            if k + "_idx" not in g:
                continue
            ours = ours_all[start[l]:start[l + 1]].reshape(h, w, -1).transpose(2, 0, 1)
            errs[k] = np.abs(_at(ours, g[k + "_idx"]) - g[k + "_val"]).max()
    # two-stage selection: the same tokens in the same order
    np.testing.assert_array_equal(taps["topk"], g["topk"])
    errs["ref0"] = np.abs(taps["ref0"] - g["ref0"]).max()
    errs["hs"] = np.abs(taps["hs"] - g["hs"]).max()
    errs["logits"] = np.abs(logits - g["pred_logits"]).max()
    errs["boxes"] = np.abs(boxes - g["pred_boxes"]).max()
    print(name, {k: f"{v:.2e}" for k, v in errs.items()})
    for k, v in errs.items():
        assert v < 2e-3, (k, v)
    assert errs["boxes"] < 1e-4 and errs["logits"] < 2e-3
    # post-processing and the filter: identical int boxes and scores
    b, s = postprocess(logits, boxes, size)
    assert np.abs(b - g["post_boxes"]).max() < 0.05
    props = upn.proposals(image)
    np.testing.assert_array_equal(props.boxes, g["filter_boxes"])
    np.testing.assert_array_equal(props.scores, g["filter_scores"])


# ----------------------------------------------------------------------------------------------- invariance


@needs_coco
def test_results_do_not_depend_on_the_thread_count(tiny_path):
    pixels, _ = preprocess(_coco_image(1))
    a = UPN.from_pretrained(tiny_path, n_threads=1).forward(pixels)
    b = UPN.from_pretrained(tiny_path, n_threads=2).forward(pixels)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_pth_and_safetensors_give_the_same_network(tiny_path, tmp_path):
    torch = pytest.importorskip("torch")
    sd, _ = load_upn_state_dict(tiny_path)
    pth = tmp_path / "upn.pth"
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, "epoch": 7}, pth)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 131, 97)).astype(np.float32)
    a = UPN.from_pretrained(tiny_path, n_threads=2).forward(pixels)
    b = UPN.from_pretrained(str(pth), n_threads=2).forward(pixels)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------- the source


@needs_coco
def test_upn_is_a_proposal_source(upn):
    image = _coco_image(0)
    props = upn(image)
    assert isinstance(props, Proposals) and 0 < len(props) <= 100
    assert np.all(props.boxes == np.trunc(props.boxes))
    assert np.all(np.diff(props.scores) <= 0) and np.all(props.scores >= 0.3)
    raw = upn.predict(image)
    assert raw["boxes"].shape == (upn.config.queries, 4) and np.all(np.diff(raw["scores"]) <= 0)


@needs_coco
def test_no_proposal_above_the_threshold_is_an_empty_result(upn):
    props = upn.proposals(_coco_image(0), min_score=1.01)
    assert len(props) == 0 and props.boxes.shape == (0, 4)


# ----------------------------------------------------------------------------------------------- bad input


def test_a_checkpoint_that_is_not_upn_is_refused(tmp_path):
    from vlmfo1.safetensors import save_file
    p = tmp_path / "not_upn.safetensors"
    save_file({"model.embed_tokens.weight": ("F32", np.zeros((4, 4), np.float32))}, str(p))
    with pytest.raises(ValueError, match="not a UPN checkpoint"):
        UPN.from_pretrained(str(p))


def test_a_wrong_shape_is_refused(tiny_path, tmp_path):
    sd, meta = load_upn_state_dict(tiny_path)
    sd = dict(sd)
    sd["transformer.encoder.layers.0.linear1.bias"] = np.zeros(7, np.float32)
    from vlmfo1.upn import infer_config
    with pytest.raises(ValueError, match="linear1.bias has shape"):
        UPN(infer_config(sd, meta), sd)


def test_a_wrong_relative_position_index_is_refused(tiny_path):
    sd, meta = load_upn_state_dict(tiny_path)
    sd = dict(sd)
    name = "backbone.model.backbone.layers.0.blocks.0.attn.relative_position_index"
    sd[name] = np.zeros_like(np.asarray(sd[name]))
    from vlmfo1.upn import infer_config
    with pytest.raises(ValueError, match="relative position index"):
        UPN(infer_config(sd, meta), sd)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Evil(marker)}, p, pickle_protocol=2)
    with pytest.raises(ValueError):
        UPN.from_pretrained(str(p))
    assert not marker.exists()


def test_a_model_entry_holding_code_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    p = tmp_path / "evil2.pth"
    torch.save({"model": {"w": _Evil(marker)}}, p, pickle_protocol=2)
    with pytest.raises(ValueError):
        UPN.from_pretrained(str(p))
    assert not marker.exists()


def test_bad_pixels_and_prompt(upn):
    with pytest.raises(ValueError, match="pixels must have shape"):
        upn.forward(np.zeros((1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="prompt"):
        upn.forward(np.zeros((3, 64, 64), np.float32), prompt="other")
    with pytest.raises(ValueError, match="fewer than"):
        upn.forward(np.zeros((3, 8, 8), np.float32))   # fewer tokens than queries


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        UPN.from_pretrained(str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------------------------- CLI


@needs_coco
def test_cli_propose(tiny_path, tmp_path):
    out = tmp_path / "boxes.json"
    r = subprocess.run([sys.executable, "-m", "vlmfo1", "propose", _coco_image(0), "--upn", tiny_path, "--out",
                        str(out), "--threads", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert got["box_format"] == "xyxy" and 0 < len(got["boxes"]) <= 100 and len(got["scores"]) == len(got["boxes"])


def test_cli_propose_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(img)
    r = subprocess.run([sys.executable, "-m", "vlmfo1", "propose", str(img), "--upn", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "error" in r.stderr
