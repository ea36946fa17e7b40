"""UPN on the CPU (vlmfo1.upn, csrc/swin.c, csrc/upn.c): parity with the official UPN code through the goldens of
tests/golden/make_upn_golden.py (random tiny weights, real COCO images), thread invariance, the .pth loader, and
bad input (a checkpoint that is not UPN, hostile pickles, an image with no proposal above the threshold)."""
import json
import os

import numpy as np
import pytest

from vlmfo1.proposals import Proposals
from vlmfo1.testing import write_random_upn
from vlmfo1.upn import UPN, load_upn_state_dict, postprocess, preprocess, to_proposals, upn_input_size

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
        cases = json.load(f)["cases"]
    assert len(cases) >= 20
    for case in cases:
        assert tuple(upn_input_size(*case["in_wh"])) == tuple(case["out_wh"]), case


def test_input_size_refuses_empty_images():
    with pytest.raises(ValueError, match="positive"):
        upn_input_size(0, 10)


# ----------------------------------------------------------------------------------------------- parity


def _golden_files():
    return sorted(f for f in os.listdir(GOLDEN) if f.startswith("upn_tiny_") and f.endswith(".npz"))


def _subset_err(ours, g, key):
    """max |ours - golden| over the golden's stored subset of `key` (ours in the golden's layout)"""
    if key + "__shape" in g:
        assert tuple(ours.shape) == tuple(g[key + "__shape"]), (key, ours.shape, g[key + "__shape"])
    idx = g[key + "__idx"].astype(np.int64)
    return float(np.abs(ours[tuple(idx.T)] - g[key + "__val"]).max())


@needs_coco
@pytest.mark.parametrize("name", _golden_files())
def test_parity_with_the_official_upn(upn, tiny_path, name):
    g = np.load(os.path.join(GOLDEN, name), allow_pickle=False)
    meta = json.loads(str(g["meta_json"]))
    image = os.path.join(COCO, meta["image"])
    pixels, size = preprocess(image)
    assert tuple(pixels.shape[1:]) == tuple(int(x) for x in g["input_hw"])
    assert abs(float(pixels.astype(np.float64).sum()) - float(g["input__sum"])) < 1e-3 * abs(float(g["input__sum"])) + 1
    assert _subset_err(pixels, g, "input") == 0.0
    logits, boxes, taps = upn.forward(pixels, taps=True)
    level_embed = np.asarray(load_upn_state_dict(tiny_path)[0]["transformer.level_embed"], np.float32)
    np.testing.assert_array_equal(taps["shapes"], g["spatial_shapes"])
    errs = {}
    for l in range(4):
        errs[f"backbone{l}"] = _subset_err(taps[f"backbone{l}"].transpose(2, 0, 1), g, f"backbone{l}")
    shapes = taps["shapes"]
    start = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])])
    for l in range(5):
        h, w = shapes[l]
        for key, tap in (("proj", "srcs"), ("pos", "pos")):
            ours = taps[tap][start[l]:start[l + 1]]
            if key == "pos":   # the golden holds the sine embedding; our tap has the level embedding added
                ours = ours - level_embed[l]
            errs[f"{key}{l}"] = _subset_err(ours.reshape(h, w, -1).transpose(2, 0, 1), g, f"{key}{l}")
    errs["memory"] = _subset_err(taps["memory"], g, "memory")
    errs["enc_logits"] = _subset_err(taps["enc_logits"][:, None], g, "enc_logits")
    # two-stage selection: the same tokens; the order may differ only where the golden's adjacent logits are
    # closer than our logit error allows (near-ties of 300 picks out of ~80k continuous values)
    gk = g["topk_proposals"].astype(np.int64)
    assert set(taps["topk"].tolist()) == set(gk.tolist())
    swapped = np.nonzero(taps["topk"] != gk)[0]
    gaps = g["topk_adjacent_rel_gap"]
    for i in swapped:
        near = [gaps[j] for j in (i - 1, i) if 0 <= j < len(gaps)]
        assert min(near) < 1e-5, (i, near)
    slot = {t: j for j, t in enumerate(gk.tolist())}
    perm = np.array([slot[t] for t in taps["topk"].tolist()])
    errs["ref0"] = float(np.abs(taps["ref0"] - g["topk_refpoints_unsig"][perm]).max())
    print(name, "swapped top-k slots:", swapped.tolist(), {k: f"{v:.1e}" for k, v in errs.items()})
    for k, v in errs.items():
        assert v < 1e-3, (k, v)
    if swapped.size:   # run the decoder on the reference's query order
        logits, boxes, taps = upn.forward(pixels, taps=True, select=gk.astype(np.int32))
    if True:
        errs["hs"] = float(np.abs(taps["hs"] - g["dec_hs"]).max())
        errs["refs"] = float(np.abs(taps["refs"] - g["dec_refs"]).max())
        errs["logits"] = float(np.abs(logits - g["pred_logits"]).max())
        errs["boxes"] = float(np.abs(boxes - g["pred_boxes"]).max())
        print(name, {k: f"{errs[k]:.1e}" for k in ("hs", "refs", "logits", "boxes")})
        assert errs["hs"] < 1e-3 and errs["refs"] < 1e-4 and errs["logits"] < 1e-3 and errs["boxes"] < 1e-4
    # post-processing and the filter: the same boxes and 2-decimal scores
    b, s = postprocess(logits, boxes, size)
    assert np.abs(s - g["post_scores"]).max() < 1e-4
    assert np.abs(b - g["post_boxes"]).max() < 0.05
    for f, (ms, nms) in (("filter0", (0.3, 0.8)), ("filter1", (0.3, 0.5))):
        # every box that survives (no top-100 cut: near-equal scores may trade places across it), from the outputs
        # compared above (the reference's query order)
        props = to_proposals(logits, boxes, size, ms, nms, None)
        gb, gs = g[f + "_boxes"].astype(np.float64), np.round(g[f + "_scores"].astype(np.float32), 2)
        assert len(props) == len(gb), (f, len(props), len(gb))
        # the filter sorts by the float32 score, so scores within our ~1e-6 error may trade places: match each box
        # to its nearest reference box; int truncation may put a coordinate within our error of an integer one apart
        d = np.abs(props.boxes[:, None, :] - gb[None, :, :]).max(-1)
        assert d.min(1).max() <= 1 and d.min(0).max() <= 1, f
        assert (d.min(1) > 0).mean() < 0.02, f
        np.testing.assert_allclose(np.sort(props.scores), np.sort(gs.astype(np.float64)), atol=0.0100001)
    assert len(upn.proposals(image)) == min(100, len(g["filter0_boxes"]))   # the network's own order, top 100


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
def test_cli_propose(tiny_path, tmp_path, capsys):
    from vlmfo1.cli import main
    out = tmp_path / "boxes.json"
    assert main(["propose", _coco_image(0), "--upn", tiny_path, "--out", str(out), "--threads", "2"]) == 0
    got = json.loads(out.read_text())
    assert got == json.loads(capsys.readouterr().out)
    assert got["box_format"] == "xyxy" and 0 < len(got["boxes"]) <= 100 and len(got["scores"]) == len(got["boxes"])
    # the file is a --boxes file
    from vlmfo1.cli import read_boxes_file
    boxes, fmt, scores = read_boxes_file(str(out))
    assert fmt == "xyxy" and len(boxes) == len(got["boxes"])


def test_cli_propose_bad_checkpoint_is_one_line(tmp_path, capsys):
    from PIL import Image
    from vlmfo1.cli import main
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    assert main(["propose", str(img), "--upn", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vlmfo1 propose: error" in err


# ----------------------------------------------------------------------------------------------- the whole pipeline


@needs_coco
def test_image_to_answer_with_upn_proposals(fo1_tiny_ckpt, upn, tiny_path, capsys):
    """image -> UPN proposals -> VLM-FO1 -> boxes, in one call (Python and CLI)."""
    from vlmfo1.cli import main
    from vlmfo1.fo1 import VLMFO1
    image = _coco_image(0)
    props = upn(image)
    model = VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2)
    res = model.detect(image, ["person"], proposals=upn, max_new_tokens=3)
    np.testing.assert_array_equal(np.asarray(res.proposals.boxes if hasattr(res.proposals, "boxes") else
                                             res.proposals, dtype=np.float64), props.boxes)
    for d in res.detections:   # every detection is one of UPN's boxes
        assert list(d.box) == props.boxes[d.index].tolist()
    capsys.readouterr()
    assert main(["detect", image, "person", "--model", fo1_tiny_ckpt, "--upn", tiny_path, "--max-new-tokens", "3",
                 "--threads", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["proposals"] == props.boxes.tolist()


def test_cli_refuses_two_proposal_sources(fo1_tiny_ckpt, tiny_path, tmp_path, capsys):
    from PIL import Image
    from vlmfo1.cli import main
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 48)).save(img)
    (tmp_path / "b.json").write_text("[[0, 0, 10, 10]]")
    assert main(["detect", str(img), "cat", "--model", fo1_tiny_ckpt, "--upn", tiny_path, "--boxes",
                 str(tmp_path / "b.json")]) == 1
    assert "one of --boxes, --proposals and --upn" in capsys.readouterr().err


def test_cli_random_upn_checkpoint(tmp_path, capsys):
    from vlmfo1.cli import main
    p = tmp_path / "upn.safetensors"
    assert main(["random-checkpoint", "--upn", str(p), "--dtype", "float32"]) == 0
    sd, meta = load_upn_state_dict(str(p))
    assert meta is not None and len(sd) == 277
    assert main(["random-checkpoint", "--upn", str(p)]) == 1          # never overwrites
    assert main(["random-checkpoint", "--upn", str(tmp_path / "x")]) == 1
    assert "exists" in capsys.readouterr().err


def test_bfloat16_and_int8_weights_stay_close(tiny_path):
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((3, 160, 224)).astype(np.float32)
    ref_logits, ref_boxes, ref = UPN.from_pretrained(tiny_path, n_threads=2).forward(pixels, taps=True)
    for dtype, tol in (("bfloat16", 0.05), ("int8", 0.05)):
        # on fp32's query selection: near-equal logits may pick other queries at lower precision
        net = UPN.from_pretrained(tiny_path, n_threads=2, dtype=dtype)
        logits, boxes, taps = net.forward(pixels, taps=True, select=ref["topk"])
        err = np.abs(boxes - ref_boxes).max()
        same = len(set(taps["topk"].tolist()) & set(ref["topk"].tolist())) / len(ref["topk"])
        print(dtype, "max box error", err, "max logit error", np.abs(logits - ref_logits).max(), "same top-k", same)
        assert err < tol and same > 0.9, (dtype, err, same)
    with pytest.raises(ValueError, match="dtype"):
        UPN.from_pretrained(tiny_path, dtype="int4")


def test_convert_pth_to_safetensors(tiny_path, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from vlmfo1.cli import main
    sd, _ = load_upn_state_dict(tiny_path)
    pth = tmp_path / "upn.pth"
    torch.save({"model": {k: torch.from_numpy(np.array(v)).to(torch.bfloat16) if np.asarray(v).dtype == np.float32
                          else torch.from_numpy(np.array(v)) for k, v in sd.items()}}, pth)
    dst = tmp_path / "upn.safetensors"
    assert main(["convert-upn", str(pth), str(dst)]) == 0
    a, meta = load_upn_state_dict(str(dst))
    assert meta is not None and set(a) == set(sd)
    name = "transformer.tgt_embed.weight"
    assert a[name].dtype == np.uint16      # bf16 stays bf16
    pixels = np.random.default_rng(2).standard_normal((3, 120, 150)).astype(np.float32)
    x = UPN.from_pretrained(str(pth), n_threads=2).forward(pixels)
    y = UPN.from_pretrained(str(dst), n_threads=2).forward(pixels)
    for u, v in zip(x, y):
        np.testing.assert_array_equal(u, v)
    assert main(["convert-upn", str(pth), str(dst)]) == 1     # never overwrites
    assert "exists" in capsys.readouterr().err


def test_request_state_is_reused_and_threads_agree(tiny_path):
    import threading
    upn = UPN.from_pretrained(tiny_path, n_threads=2)
    pixels = np.random.default_rng(3).standard_normal((3, 140, 170)).astype(np.float32)
    first = upn.forward(pixels)
    ws = upn._idle[0]
    assert ws.nbytes > 0 and ws.n_pools == 1
    again = upn.forward(pixels)
    assert upn._idle[0] is ws and ws.n_allocs == 1 and ws.n_pools == 1   # the same pool and arena
    outs = [None] * 3

    def go(i):
        outs[i] = upn.forward(pixels)
    ts = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for o in [again] + outs:
        for x, y in zip(first, o):
            np.testing.assert_array_equal(x, y)


TIKTOKEN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tokenizer", "qwen.tiktoken")


@pytest.mark.skipif(not os.path.exists(TIKTOKEN), reason="../shared/data is absent")
def test_demo_with_upn_proposals(tmp_path, capsys):
    from vlmfo1.cli import main
    args = ["demo", "--upn", "--tiktoken", TIKTOKEN, "--cache", str(tmp_path / "cache"), "--out",
            str(tmp_path / "d.png"), "--threads", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "proposed" in out and "UPN(" in out and "answer:" in out and os.path.getsize(tmp_path / "d.png") > 1000
    upn_files = [f for f in os.listdir(tmp_path / "cache") if f.startswith("upn-random-tiny")]
    assert len(upn_files) == 1
    stamp = os.path.getmtime(tmp_path / "cache" / upn_files[0])
    assert main(args) == 0                                              # the cached UPN is reused
    assert os.path.getmtime(tmp_path / "cache" / upn_files[0]) == stamp
