"""Tests for vlmfo1.proposals: every box input form and format, the format warnings, bad inputs, NMS against a
brute-force port of torchvision's CPU kernel (and supervision's NMS when installed), the UPN filter order, and the
proposal sources on the shared files (the official fo1_eval JSON) and on fixtures built from real COCO annotations.

torch and supervision are optional here: the cases that need them are skipped when they are not installed.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from vlmfo1.proposals import (
    BOX_FORMATS,
    BoxFormatWarning,
    CallableProposals,
    CocoJsonlProposals,
    CocoResultsProposals,
    FO1EvalProposals,
    Proposals,
    ProposalsNotFoundError,
    ProposalSource,
    as_boxes,
    filter_proposals,
    nms,
)

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
COUNTBENCH = os.path.join(SHARED, "fo1_eval", "countbench_with_upn_score_0.3_0.8.json")
PIXMO = os.path.join(SHARED, "fo1_eval", "pixmoCount_with_upn_score_0.3_0.8.json")
COCO_TINY_ANN = os.path.join(SHARED, "coco_tiny", "annotations", "instances_val2017.json")
COCO_FIX_ANN = os.path.join(SHARED, "coco_eval_fixture", "instances_val2014_100.json")
COCO_FIX_RES = os.path.join(SHARED, "coco_eval_fixture", "instances_val2014_fakebbox100_results.json")

needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared/data not found beside the repository")

# Dyadic values (exact in binary, and their halves / sums too) so every format round trip is exact.
XYXY = np.array([[10.0, 20.0, 50.5, 60.25],
                 [0.0, 0.0, 640.0, 480.0],
                 [100.125, 7.5, 101.0, 9.0],
                 [320.0, 240.0, 320.0, 240.0]])  # a degenerate box passes through (spec §1.5)
SIZE = (1024.0, 512.0)  # powers of two: the normalized formats round-trip exactly too


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------------------------------------------------------
# input forms
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda b: b.tolist(),
    lambda b: tuple(tuple(r) for r in b.tolist()),
    lambda b: b,
    lambda b: b.astype(np.float32),
    lambda b: np.asfortranarray(b),
    lambda b: b[::-1][::-1],  # a negative-stride view
], ids=["list", "tuple", "float64", "float32", "fortran", "view"])
def test_forms_exact(make, no_warnings):
    p = as_boxes(make(XYXY))
    assert p.boxes.dtype == np.float64 and p.boxes.shape == (4, 4) and p.boxes.flags.c_contiguous
    np.testing.assert_array_equal(p.boxes, XYXY)
    assert p.scores is None and len(p) == 4


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.int64, np.uint16, np.uint8])
def test_numpy_dtypes(dtype, no_warnings):
    b = np.array([[1, 2, 30, 40], [5, 6, 70, 80]], dtype=dtype)
    p = as_boxes(b, scores=np.array([0.5, 0.25], dtype=np.float16))
    np.testing.assert_array_equal(p.boxes, b.astype(np.float64))
    np.testing.assert_array_equal(p.scores, [0.5, 0.25])
    assert p.boxes.dtype == np.float64 and p.scores.dtype == np.float64


def test_float16_values_are_widened_not_rounded_again(no_warnings):
    b = np.array([[10.5, 20.25, 100.75, 200.125]], dtype=np.float16)  # all representable in float16
    np.testing.assert_array_equal(as_boxes(b).boxes, [[10.5, 20.25, 100.75, 200.125]])


def test_input_is_copied(no_warnings):
    b = XYXY.copy()
    p = as_boxes(b)
    b[0, 0] = -1
    assert p.boxes[0, 0] == 10.0


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32", "float64", "int64", "int32"])
def test_torch_tensors(dtype_name, no_warnings):
    torch = pytest.importorskip("torch")
    vals = [[1.0, 2.0, 128.0, 384.0], [3.0, 4.0, 256.0, 96.0]]  # exact in bfloat16
    t = torch.tensor(vals, dtype=getattr(torch, dtype_name))
    s = torch.tensor([0.5, 0.75], dtype=getattr(torch, dtype_name) if "float" in dtype_name else torch.float32)
    p = as_boxes(t, scores=s)
    np.testing.assert_array_equal(p.boxes, vals)
    np.testing.assert_array_equal(p.scores, [0.5, 0.75])


def test_torch_bfloat16_rounding_matches_torch(no_warnings):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x1y1 = rng.uniform(0, 300, (20, 2))
    vals = np.concatenate([x1y1, x1y1 + rng.uniform(1, 300, (20, 2))], axis=1)
    t = torch.tensor(vals, dtype=torch.bfloat16)
    np.testing.assert_array_equal(as_boxes(t).boxes, t.float().numpy().astype(np.float64))


def test_torch_requires_grad_and_upn_score_column(no_warnings):
    torch = pytest.importorskip("torch")
    t = torch.tensor([[1.0, 2.0, 30.0, 40.0]], requires_grad=True)
    s = torch.tensor([[0.5]])  # UPN keeps its scores as [N, 1]
    p = as_boxes(t * 1, scores=s)
    np.testing.assert_array_equal(p.boxes, [[1, 2, 30, 40]])
    np.testing.assert_array_equal(p.scores, [0.5])


def test_torch_empty(no_warnings):
    torch = pytest.importorskip("torch")
    assert len(as_boxes(torch.zeros((0, 4), dtype=torch.bfloat16))) == 0


class FakeDetections:
    """The duck-typed surface of supervision.Detections (xyxy, confidence)."""

    def __init__(self, xyxy, confidence=None):
        self.xyxy, self.confidence = xyxy, confidence


def test_detections_duck_typed(no_warnings):
    p = as_boxes(FakeDetections(XYXY.astype(np.float32), np.array([0.9, 0.8, 0.7, 0.6], np.float32)))
    np.testing.assert_array_equal(p.boxes, XYXY)
    np.testing.assert_allclose(p.scores, [0.9, 0.8, 0.7, 0.6], rtol=1e-7)
    assert as_boxes(FakeDetections(XYXY)).scores is None
    with pytest.raises(ValueError, match="xyxy"):
        as_boxes(FakeDetections(XYXY), box_format="xywh")


def test_supervision_detections(no_warnings):
    sv = pytest.importorskip("supervision")
    det = sv.Detections(xyxy=XYXY.copy(), confidence=np.array([0.9, 0.8, 0.7, 0.6]), class_id=np.arange(4))
    p = as_boxes(det)
    np.testing.assert_array_equal(p.boxes, XYXY)
    np.testing.assert_array_equal(p.scores, [0.9, 0.8, 0.7, 0.6])
    assert len(as_boxes(sv.Detections.empty())) == 0
    p2 = as_boxes(det, scores=[1, 2, 3, 4])  # explicit scores win
    np.testing.assert_array_equal(p2.scores, [1, 2, 3, 4])


def test_coco_dicts(no_warnings):
    dets = [{"image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [0.5, 1.5, 2.0, 2.5], "score": 0.25}]
    p = as_boxes(dets)  # COCO xywh by default
    np.testing.assert_array_equal(p.boxes, [[10, 20, 40, 60], [0.5, 1.5, 2.5, 4.0]])
    np.testing.assert_array_equal(p.scores, [0.9, 0.25])
    p = as_boxes(dets, box_format="xyxy")  # unless box_format says otherwise
    np.testing.assert_array_equal(p.boxes, [[10, 20, 30, 40], [0.5, 1.5, 2.0, 2.5]])
    p = as_boxes([{"bbox": [1, 2, 3, 4]}])
    assert p.scores is None
    np.testing.assert_array_equal(p.boxes, [[1, 2, 4, 6]])


def test_coco_dicts_errors():
    with pytest.raises(ValueError, match="no 'bbox' key"):
        as_boxes([{"box": [1, 2, 3, 4]}])
    with pytest.raises(ValueError, match="1 of 2 COCO-style dicts have a 'score'"):
        as_boxes([{"bbox": [1, 2, 3, 4], "score": 0.5}, {"bbox": [1, 2, 3, 4]}])
    with pytest.raises(TypeError, match="item 1 is list"):
        as_boxes([{"bbox": [1, 2, 3, 4]}, [1, 2, 3, 4]])
    with pytest.raises(TypeError, match="single dict"):
        as_boxes({"bbox": [1, 2, 3, 4]})


def test_proposals_passthrough(no_warnings):
    p = as_boxes(XYXY, scores=[4, 3, 2, 1])
    q = as_boxes(p)
    np.testing.assert_array_equal(q.boxes, p.boxes)
    np.testing.assert_array_equal(q.scores, p.scores)
    assert q.boxes is not p.boxes
    np.testing.assert_array_equal(as_boxes(p, scores=[1, 1, 1, 1]).scores, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="already holds xyxy"):
        as_boxes(p, box_format="cxcywh")


@pytest.mark.parametrize("empty", [[], (), np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4), np.int32), [[]]],
                         ids=["list", "tuple", "0x4", "0", "int0x4", "nested"])
def test_empty_inputs(empty, no_warnings):
    p = as_boxes(empty, scores=[])
    assert len(p) == 0 and p.boxes.shape == (0, 4) and p.scores.shape == (0,)
    assert len(as_boxes(empty)) == 0
    assert "0 boxes" in repr(p)
    np.testing.assert_array_equal(p.to_format("cxcywhn", SIZE), np.zeros((0, 4)))


def test_repr_and_indexing(no_warnings):
    p = as_boxes(XYXY, scores=[0.9, 0.8, 0.7, 0.35])
    r = repr(p)
    assert r.startswith("Proposals(4 boxes") and "0.35..0.9" in r
    assert len(p[:2]) == 2 and len(p[-1]) == 1 and len(p[p.scores > 0.75]) == 2
    np.testing.assert_array_equal(p[1].boxes, XYXY[1:2])
    np.testing.assert_array_equal(p[[3, 0]].scores, [0.35, 0.9])
    assert p.tolist() == XYXY.tolist()
    assert "scores=None" in repr(as_boxes(XYXY))


def test_proposals_as_array(no_warnings):
    """np.asarray(Proposals) is the box array, so code that takes box arrays takes a Proposals."""
    p = as_boxes(XYXY, scores=[1, 2, 3, 4])
    assert np.asarray(p) is p.boxes
    assert np.asarray(p, dtype=np.float32).dtype == np.float32
    assert np.asarray(p, dtype=np.float64, copy=True) is not p.boxes
    np.testing.assert_array_equal(np.asarray(p, dtype=np.float64), XYXY)


def test_proposals_constructor_validates():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        Proposals(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="3 values for 2 boxes"):
        Proposals(np.zeros((2, 4)), np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        Proposals(np.full((1, 4), np.nan))


# ---------------------------------------------------------------------------------------------------------------
# box formats
# ---------------------------------------------------------------------------------------------------------------

def test_format_known_values(no_warnings):
    want = [[10.0, 20.0, 40.0, 60.0]]
    np.testing.assert_array_equal(as_boxes([[10, 20, 40, 60]], "xyxy").boxes, want)
    np.testing.assert_array_equal(as_boxes([[10, 20, 30, 40]], "xywh").boxes, want)
    np.testing.assert_array_equal(as_boxes([[25, 40, 30, 40]], "cxcywh").boxes, want)
    size = (100, 200)
    np.testing.assert_array_equal(as_boxes([[0.1, 0.1, 0.4, 0.3]], "xyxyn", size).boxes, [[10, 20, 40, 60]])
    np.testing.assert_allclose(as_boxes([[0.1, 0.1, 0.3, 0.2]], "xywhn", size).boxes, want, rtol=1e-15)
    np.testing.assert_allclose(as_boxes([[0.25, 0.2, 0.3, 0.2]], "cxcywhn", size).boxes, want, rtol=1e-15)
    np.testing.assert_array_equal(as_boxes([[10, 20, 40, 60]], "XYXY").boxes, want)  # case-insensitive


@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_round_trip_exact(fmt, no_warnings):
    """The same boxes written in every format give identical xyxy (exact for these dyadic values)."""
    p = as_boxes(XYXY)
    raw = p.to_format(fmt, SIZE)
    assert raw.dtype == np.float64 and raw.shape == XYXY.shape
    back = as_boxes(raw, box_format=fmt, image_size=SIZE)
    np.testing.assert_array_equal(back.boxes, XYXY)
    np.testing.assert_array_equal(as_boxes(back.to_format(fmt, SIZE), fmt, SIZE).boxes, XYXY)


@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_round_trip_random(fmt):
    rng = np.random.default_rng(7)
    x1y1 = rng.uniform(0, 500, (200, 2))
    xyxy = np.concatenate([x1y1, x1y1 + rng.uniform(0.5, 300, (200, 2))], axis=1)
    size = (1023.0, 767.0)
    back = as_boxes(as_boxes(xyxy).to_format(fmt, size), box_format=fmt, image_size=size).boxes
    np.testing.assert_allclose(back, xyxy, rtol=0, atol=1e-12 * 1023)


def test_all_formats_agree():
    size = SIZE
    got = [as_boxes(as_boxes(XYXY).to_format(f, size), f, size).boxes for f in BOX_FORMATS]
    for g in got[1:]:
        np.testing.assert_array_equal(g, got[0])


def test_cxcywhn_matches_upn_postprocess():
    """UPN: x1 = cx - w/2, y1 = cy - h/2, then x2 = x1 + w, y2 = y1 + h, then scale by (W, H)."""
    rng = np.random.default_rng(3)
    c = rng.uniform(0, 1, (50, 4)).astype(np.float32).astype(np.float64)
    w, h = 1000, 667
    x1 = c[:, 0] - c[:, 2] / 2
    y1 = c[:, 1] - c[:, 3] / 2
    ref = np.stack([x1 * w, y1 * h, (x1 + c[:, 2]) * w, (y1 + c[:, 3]) * h], 1)
    np.testing.assert_array_equal(as_boxes(c, "cxcywhn", (w, h)).boxes, ref)


# ---------------------------------------------------------------------------------------------------------------
# warnings
# ---------------------------------------------------------------------------------------------------------------

def test_warns_xywh_given_as_xyxy():
    xywh = [[100, 120, 30, 40], [200, 50, 20, 10], [10, 10, 50, 50]]  # 2 of 3 have x2 < x1
    with pytest.warns(BoxFormatWarning, match="xywh"):
        as_boxes(xywh)


def test_warns_normalized_given_as_pixels():
    with pytest.warns(BoxFormatWarning, match="normalized"):
        as_boxes([[0.1, 0.2, 0.5, 0.6]])
    with pytest.warns(BoxFormatWarning, match="xywhn"):
        as_boxes([[0.1, 0.2, 0.3, 0.3]], box_format="xywh")


def test_warns_pixels_given_as_normalized():
    with pytest.warns(BoxFormatWarning, match="pixels"):
        as_boxes([[10, 20, 300, 400]], box_format="xyxyn", image_size=(640, 480))


def test_warns_xyxy_given_as_xywh():
    with pytest.warns(BoxFormatWarning, match="negative width"):
        as_boxes([[100, 100, -20, 30], [50, 50, -5, -5]], box_format="xywh")


def test_no_warning_for_sane_boxes(no_warnings):
    as_boxes([[0, 0, 0, 0]])  # all zeros: degenerate, not "normalized"
    as_boxes([[10, 20, 300, 400], [50, 60, 40, 70]])  # one inverted box of two: a minority
    as_boxes([[0.01, 0.02, 1.01, 1.02]], box_format="xyxyn", image_size=(10, 10))  # slight overshoot is fine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoxFormatWarning)  # filterable by category
        as_boxes([[0.1, 0.2, 0.5, 0.6]])


def test_warning_points_at_the_caller():
    with pytest.warns(BoxFormatWarning) as rec:
        as_boxes([[0.1, 0.2, 0.5, 0.6]])
    assert rec[0].filename == __file__


# ---------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ([1, 2, 3, 4], r"single box pass \[\[x1, y1, x2, y2\]\]"),
    ([[1, 2, 3]], r"shape \(1, 3\): expected \[N, 4\]"),
    (np.zeros((2, 5)), r"expected \[N, 4\]"),
    (np.zeros((1, 3, 4)), "batch of images"),
    ([[1, 2, 3, 4], [1, 2, 3]], "ragged"),
    ([[1, 2, np.nan, 4]], "NaN or infinite.*box 0, coordinate 2"),
    ([[1, 2, 3, 4], [1, np.inf, 3, 4]], "box 1, coordinate 1"),
])
def test_bad_shapes_and_values(bad, match):
    with pytest.raises(ValueError, match=match):
        as_boxes(bad)


@pytest.mark.parametrize("bad, match", [
    ([["a", 2, 3, 4]], "not a number: 'a'"),
    ([[None, 2, 3, 4]], "not a number: None"),
    (np.array([["1", "2", "3", "4"]]), "not a number: '1'"),
    (np.array([[True, False, True, True]]), "dtype bool"),
    (np.array([[1 + 2j, 0, 0, 0]]), "dtype complex"),
    ("1 2 3 4", "string"),
    (None, "None"),
    (42, r"\[N, 4\]"),
])
def test_bad_types(bad, match):
    with pytest.raises((TypeError, ValueError), match=match) as e:
        as_boxes(bad)
    if bad is not None and not isinstance(bad, int):
        assert e.type is TypeError


def test_unknown_format_names_the_valid_ones():
    with pytest.raises(ValueError, match="xyxy, xywh, cxcywh, xyxyn, xywhn, cxcywhn"):
        as_boxes(XYXY, box_format="yolo")
    with pytest.raises(ValueError, match="unknown box_format"):
        as_boxes(XYXY).to_format("ltrb")


def test_normalized_needs_image_size():
    with pytest.raises(ValueError, match=r"image_size=\(width, height\)"):
        as_boxes([[0.1, 0.1, 0.2, 0.2]], box_format="xyxyn")
    with pytest.raises(ValueError, match="image_size"):
        as_boxes(XYXY).to_format("xywhn")
    for bad in [(640,), (0, 480), (-1, 2), ("a", 3), (np.nan, 3), 640]:
        with pytest.raises(ValueError, match="image_size"):
            as_boxes([[0.1, 0.1, 0.2, 0.2]], box_format="xyxyn", image_size=bad)


def test_bad_scores():
    with pytest.raises(ValueError, match="got 3 scores for 4 boxes"):
        as_boxes(XYXY, scores=[1, 2, 3])
    with pytest.raises(ValueError, match=r"expected \[N\]"):
        as_boxes(XYXY, scores=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="scores contains NaN"):
        as_boxes(XYXY, scores=[0.1, np.nan, 0.2, 0.3])
    with pytest.raises(TypeError, match="scores"):
        as_boxes(XYXY, scores=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"scores has shape \(\): expected \[N\]"):
        as_boxes(XYXY, scores=0.5)


# ---------------------------------------------------------------------------------------------------------------
# NMS
# ---------------------------------------------------------------------------------------------------------------

def nms_bruteforce(boxes, scores, thr, dtype):
    """A line-by-line port of torchvision's CPU nms kernel (csrc/ops/cpu/nms_kernel.cpp) with NumPy scalars of
    `dtype`: stable descending sort, `ovr > thr` with ovr promoted to double, no +1 offsets."""
    t = np.dtype(dtype).type
    b = [[t(v) for v in row] for row in np.asarray(boxes, dtype=dtype)]
    s = [t(v) for v in np.asarray(scores, dtype=dtype)]
    order = sorted(range(len(s)), key=lambda i: -float(s[i]))  # Python's sort is stable
    areas = [(r[2] - r[0]) * (r[3] - r[1]) for r in b]
    suppressed = [False] * len(b)
    keep = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for _i, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(i)
            for j in order[_i + 1:]:
                if suppressed[j]:
                    continue
                w = max(t(0), min(b[i][2], b[j][2]) - max(b[i][0], b[j][0]))
                h = max(t(0), min(b[i][3], b[j][3]) - max(b[i][1], b[j][1]))
                inter = w * h
                ovr = inter / (areas[i] + areas[j] - inter)
                if float(ovr) > thr:
                    suppressed[j] = True
    return keep


def random_boxes(rng, n, span=100.0, integer=False):
    x1y1 = rng.uniform(0, span, (n, 2))
    wh = rng.uniform(0, span / 2, (n, 2))
    wh[rng.random(n) < 0.05] = 0  # some empty boxes
    b = np.concatenate([x1y1, x1y1 + wh], axis=1)
    dup = rng.random(n) < 0.15
    b[dup] = b[rng.integers(0, n, int(dup.sum()))]  # exact duplicates
    return np.floor(b) if integer else b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_nms_matches_bruteforce(dtype, thr):
    rng = np.random.default_rng(int(thr * 10) + (dtype == np.float32))
    for trial in range(12):
        n = int(rng.integers(1, 90))
        boxes = random_boxes(rng, n, integer=trial % 2 == 0)
        scores = rng.integers(0, 6, n) / 5.0  # many equal scores: the tie rule is exercised
        got = nms(boxes, scores, thr, dtype=dtype)
        assert got.dtype == np.int64
        assert got.tolist() == nms_bruteforce(boxes, scores, thr, dtype), (trial, n)


def test_nms_block_boundaries(monkeypatch):
    """The kernel works in row blocks of the IoU matrix; small blocks put many boundaries inside the greedy pass."""
    import vlmfo1.proposals as P
    rng = np.random.default_rng(99)
    boxes = random_boxes(rng, 150, span=60.0)
    scores = rng.integers(0, 4, 150) / 3.0
    want = nms_bruteforce(boxes, scores, 0.5, np.float32)
    for block in (1, 7, 64, 256):
        monkeypatch.setattr(P, "_NMS_BLOCK", block)
        assert nms(boxes, scores, 0.5, dtype=np.float32).tolist() == want


def test_nms_ties_keep_the_earlier_box():
    b = [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [50, 50, 60, 60]]
    assert nms(b, [0.5, 0.5, 0.7, 0.7], 0.5).tolist() == [2, 0]


def test_nms_iou_boundary_depends_on_precision():
    """IoU 8/10 is 0.800000012 in float32 (> 0.8: suppressed) and exactly 0.8 in float64 (kept)."""
    b = [[0, 0, 10, 1], [0, 0, 8, 1]]
    assert nms(b, [0.9, 0.8], 0.8, dtype=np.float32).tolist() == [0]
    assert nms(b, [0.9, 0.8], 0.8, dtype=np.float64).tolist() == [0, 1]
    assert nms(b, [0.9, 0.8], 0.8, dtype=np.float32).tolist() == nms_bruteforce(b, [0.9, 0.8], 0.8, np.float32)


def test_nms_no_plus_one_offset_and_empty_boxes():
    # touching boxes do not overlap; two empty boxes (0/0) never suppress each other
    assert nms([[0, 0, 10, 10], [10, 0, 20, 10]], [1, 0.5], 0.0).tolist() == [0, 1]
    assert nms([[5, 5, 5, 5], [5, 5, 5, 5]], [1, 0.5], 0.5).tolist() == [0, 1]
    assert nms(np.zeros((0, 4)), [], 0.5).tolist() == []
    with pytest.raises(ValueError, match="3 boxes but 2 scores"):
        nms(np.zeros((3, 4)), [1, 2], 0.5)
    with pytest.raises(ValueError, match="float32 or float64"):
        nms(np.zeros((1, 4)), [1], 0.5, dtype=np.float16)


def test_nms_matches_torchvision():
    torch = pytest.importorskip("torch")
    try:
        from torchvision.ops import nms as tv_nms
    except Exception:  # not installed, or a build whose C ops do not load (a CUDA wheel on a CPU torch)
        pytest.skip("torchvision (with working C ops) not installed")
    rng = np.random.default_rng(11)
    for _ in range(10):
        n = int(rng.integers(1, 120))
        boxes = random_boxes(rng, n)
        scores = rng.integers(0, 6, n) / 5.0
        for thr in (0.3, 0.5, 0.8):
            want = tv_nms(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32), thr)
            assert nms(boxes, scores, thr, dtype=np.float32).tolist() == want.tolist()


def test_nms_matches_supervision_on_distinct_scores():
    sv = pytest.importorskip("supervision")
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(1, 100))
        boxes = random_boxes(rng, n)
        scores = rng.permutation(n) / n + 0.001  # distinct
        for thr in (0.3, 0.5, 0.8):
            mask = sv.box_non_max_suppression(np.c_[boxes, scores], iou_threshold=thr)
            ours = np.zeros(n, bool)
            ours[nms(boxes, scores, thr, dtype=np.float32)] = True
            np.testing.assert_array_equal(ours, mask)


def test_supervision_differs_on_ties():
    """supervision sorts with np.flip(argsort(scores)): among equal scores the LATER box wins (torchvision and
    vlmfo1: the earlier one)."""
    sv = pytest.importorskip("supervision")
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=np.float64)
    assert sv.box_non_max_suppression(np.c_[b, [0.5, 0.5]], 0.5).tolist() == [False, True]
    assert nms(b, [0.5, 0.5], 0.5).tolist() == [0]


# ---------------------------------------------------------------------------------------------------------------
# the UPN filter
# ---------------------------------------------------------------------------------------------------------------

def upn_filter_reference(boxes, scores, min_score, nms_value):
    """ChatRex UPNWrapper.filter step by step in NumPy (float32 boxes and scores, as UPN hands them over), with
    the torchvision kernel replaced by the brute-force port above."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    keep = scores >= min_score
    boxes, scores = boxes[keep], scores[keep]
    if len(boxes) == 0:
        return [], []
    k = nms_bruteforce(boxes, scores, nms_value, np.float32)
    fb = boxes[k].astype(np.int32)
    fs = scores[k]
    order = np.argsort(fs)[::-1]
    return fb[order].tolist(), [round(s, 2) for s in fs[order]]


def test_filter_matches_reference_steps():
    rng = np.random.default_rng(21)
    for trial in range(15):
        n = int(rng.integers(1, 300))
        boxes = random_boxes(rng, n, span=800.0) - 3.7  # negative coordinates: truncation toward zero
        scores = rng.uniform(0, 1, n).astype(np.float32)
        if trial % 3 == 0:
            scores = (rng.integers(0, 12, n) / 11).astype(np.float32)  # ties
        order = np.argsort(-scores, kind="stable")  # UPN hands the boxes over sorted by score
        boxes, scores = boxes[order].astype(np.float32), scores[order]
        ref_boxes, ref_scores = upn_filter_reference(boxes, scores, 0.3, 0.8)
        got = filter_proposals(as_boxes(boxes, scores=scores), 0.3, 0.8, max_boxes=None)
        assert got.boxes.tolist() == ref_boxes
        np.testing.assert_array_equal(got.scores, np.array(ref_scores, np.float32).astype(np.float64))


def test_filter_truncates_toward_zero_after_nms():
    props = as_boxes([[-0.7, 1.9, 10.99, 20.5], [-5.5, -1.2, 3.3, 4.999]], scores=[0.9, 0.8])
    got = filter_proposals(props, min_score=0.0)
    np.testing.assert_array_equal(got.boxes, [[0, 1, 10, 20], [-5, -1, 3, 4]])
    # IoU of the float boxes is 0.79 (kept); after truncation it would be 0.8 > 0.8 in float32: NMS runs first
    a, b = [0, 0, 10, 10], [0, 0, 7.9, 10]
    got = filter_proposals(as_boxes([a, b], scores=[0.9, 0.8]), min_score=0.0)
    assert len(got) == 2 and got.boxes.tolist() == [[0, 0, 10, 10], [0, 0, 7, 10]]
    np.testing.assert_array_equal(filter_proposals(props, 0.0, as_int=False).boxes, props.boxes)


def test_filter_scores_rounded_in_float32_after_sorting():
    props = as_boxes([[0, 0, 1, 1], [5, 5, 6, 6], [9, 9, 10, 10]], scores=[0.3051, 0.7912, 0.29999])
    got = filter_proposals(props)
    assert got.scores.tolist() == [float(np.float32(0.79)), float(np.float32(0.31))]  # 0.7900000214576721
    assert got.boxes.tolist() == [[5, 5, 6, 6], [0, 0, 1, 1]]
    # min_score compares in float32: float64 0.29999999999 rounds to float32(0.3) and passes
    assert len(filter_proposals(as_boxes([[0, 0, 8, 8]], scores=[0.29999999999]))) == 1
    assert len(filter_proposals(as_boxes([[0, 0, 8, 8]], scores=[0.29999999999]), precision="float64")) == 0


def test_filter_tie_order():
    boxes = [[i * 20, 0, i * 20 + 10, 10] for i in range(5)]
    props = as_boxes(boxes, scores=[0.5, 0.5, 0.5, 0.9, 0.5])
    ref = filter_proposals(props)  # np.argsort(...)[::-1]: equal scores in reverse order (<= 16 boxes)
    assert [b[0] for b in ref.boxes.tolist()] == [60, 80, 40, 20, 0]
    stable = filter_proposals(props, tie_order="stable")
    assert [b[0] for b in stable.boxes.tolist()] == [60, 0, 20, 40, 80]


def test_filter_max_boxes_after_nms_and_empty_result():
    rng = np.random.default_rng(1)
    base = random_boxes(rng, 80, span=2000.0)
    boxes = np.concatenate([base, base + 0.01])  # each box duplicated: NMS removes 80 of 160
    scores = np.concatenate([np.linspace(0.99, 0.4, 80), np.linspace(0.98, 0.39, 80)])
    got = filter_proposals(as_boxes(boxes, scores=scores), max_boxes=50)
    assert len(got) == 50
    assert np.all(np.diff(got.scores) <= 0)
    empty = filter_proposals(as_boxes([[0, 0, 5, 5]], scores=[0.1]))
    assert len(empty) == 0 and empty.scores.shape == (0,)
    assert len(filter_proposals(as_boxes([], scores=[]))) == 0
    assert len(as_boxes(boxes, scores=scores).filter(max_boxes=3)) == 3


def test_filter_skips_and_errors():
    props = as_boxes([[0, 0, 10, 10], [0, 0, 10, 10]], scores=[0.2, 0.1])
    assert len(filter_proposals(props, min_score=None, nms_iou=None, max_boxes=None)) == 2
    assert len(filter_proposals(props, min_score=None)) == 1
    with pytest.raises(ValueError, match="needs a score per box"):
        filter_proposals(as_boxes([[0, 0, 8, 8]]))
    with pytest.raises(ValueError, match="nms_iou"):
        filter_proposals(props, nms_iou=1.5)
    with pytest.raises(ValueError, match="precision"):
        filter_proposals(props, precision="float16")
    with pytest.raises(ValueError, match="tie_order"):
        filter_proposals(props, tie_order="random")
    with pytest.raises(ValueError, match="max_boxes"):
        filter_proposals(props, max_boxes=-1)


def max_pairwise_iou(b):
    b = np.asarray(b, np.float32)
    best = 0.0
    for i in range(len(b)):
        for j in range(i + 1, len(b)):
            w = max(0, min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]))
            h = max(0, min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]))
            inter = np.float32(w * h)
            ai = (b[i, 2] - b[i, 0]) * (b[i, 3] - b[i, 1])
            aj = (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1])
            best = max(best, float(inter / (ai + aj - inter)))
    return best


@needs_shared
def test_official_countbench_file_is_consistent_with_the_filter():
    """The stored proposals are integer, >= 0.3, 2-decimal, descending and at most 100, so the filter leaves them
    unchanged, except where two stored integer boxes overlap by IoU > 0.8: possible only because the reference
    truncates after NMS."""
    src = FO1EvalProposals(COUNTBENCH)
    changed = 0
    for name in src.keys():
        p = src(name)
        assert len(p) <= 100 and np.all(p.scores >= 0.3) and np.all(np.diff(p.scores) <= 0)
        np.testing.assert_array_equal(p.boxes, np.trunc(p.boxes))
        got = filter_proposals(p, tie_order="stable")
        if len(got) == len(p):
            np.testing.assert_array_equal(got.boxes, p.boxes)
            np.testing.assert_array_equal(got.scores, p.scores)
        else:
            changed += 1
            assert max_pairwise_iou(p.boxes) > 0.8, name
    assert changed < 20


# ---------------------------------------------------------------------------------------------------------------
# proposal sources
# ---------------------------------------------------------------------------------------------------------------

@needs_shared
def test_fo1_eval_countbench(tmp_path):
    src = FO1EvalProposals(COUNTBENCH)
    assert isinstance(src, ProposalSource) and "not read yet" in repr(src)
    p = src("/some/where/image_0.jpg")
    assert len(src) == 487 and "487 images" in repr(src)
    with open(COUNTBENCH) as f:
        rec = json.load(f)[0]
    np.testing.assert_array_equal(p.boxes, rec["bboxes"])
    np.testing.assert_array_equal(p.scores, rec["scores"])
    assert p.scores[0] == 0.7900000214576721
    assert src(None, image_id="image_0.jpg") is p
    assert src(np.zeros((4, 4, 3), np.uint8), image_id="dir/image_0.jpg") is p
    assert "image_0.jpg" in src and "image_9999.jpg" not in src
    # a PIL image opened from a file is looked up by its file name
    path = tmp_path / "image_1.jpg"
    Image.new("RGB", (8, 8)).save(path)
    with Image.open(path) as im:
        assert len(src(im)) == len(src("image_1.jpg"))
    with pytest.raises(ValueError, match="pass image_id"):
        src(np.zeros((4, 4, 3), np.uint8))


@needs_shared
def test_fo1_eval_pixmo_has_no_scores():
    src = FO1EvalProposals(PIXMO)
    p = src("00000-0.jpg")
    assert len(src) == 529 and p.scores is None
    np.testing.assert_array_equal(p.boxes[0], [596, 261, 757, 413])


@needs_shared
def test_fo1_eval_missing_image():
    src = FO1EvalProposals(COUNTBENCH)
    with pytest.raises(ProposalsNotFoundError) as e:
        src("cat.jpg")
    msg = str(e.value)
    assert "'cat.jpg'" in msg and "image_0.jpg" in msg and "countbench" in msg
    assert isinstance(e.value, KeyError) and isinstance(e.value, LookupError)


@needs_shared
def test_fo1_eval_reads_once_and_lazily(tmp_path):
    copy = tmp_path / "cb.json"
    shutil.copy(COUNTBENCH, copy)
    src = FO1EvalProposals(copy)
    n = len(src("image_3.jpg"))
    copy.unlink()
    assert len(src("image_3.jpg")) == n  # not read again
    missing = FO1EvalProposals(tmp_path / "nope.json")  # constructing does not read
    with pytest.raises(FileNotFoundError):
        missing("image_0.jpg")


@pytest.mark.parametrize("content, match", [
    ("{not json", "not a valid FO1 eval JSON"),
    ('{"image": "a.jpg"}', "expected a JSON list"),
    ('[{"image": "a.jpg"}]', r"record 0: expected \{'image'"),
    ('[{"image": "a.jpg", "bboxes": [[1, 2, 3]]}]', r"record 0 \(a.jpg\): boxes has shape \(1, 3\)"),
    ('[{"image": "a.jpg", "bboxes": [[1, 2, 3, 4]], "scores": [1, 2]}]', "got 2 scores for 1 boxes"),
    ('[{"image": "a.jpg", "bboxes": []}, {"image": "x/a.jpg", "bboxes": []}]', "appears twice"),
])
def test_fo1_eval_malformed(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        FO1EvalProposals(path)("a.jpg")
    assert str(path) in str(e.value)


@pytest.fixture(scope="module")
def coco_jsonl(tmp_path_factory):
    """A §6.2-style jsonl built from the real coco_tiny annotations: per image, its ground-truth boxes as integer
    xyxy (as UPN's int32 cast would give), with descending 2-decimal scores."""
    if not os.path.isfile(COCO_TINY_ANN):
        pytest.skip("shared/data/coco_tiny not found")
    with open(COCO_TINY_ANN) as f:
        ann = json.load(f)
    by_image = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    question = "Please detect person; bicycle in the image and return the object indexes."
    records = []
    for im in ann["images"][:6]:
        boxes = [[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h in by_image.get(im["id"], [])][:100]
        scores = [round(0.95 - 0.6 * k / max(len(boxes), 1), 2) for k in range(len(boxes))]
        records.append({"id": im["id"], "image": im["file_name"],
                        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": ""}],
                        "bbox_list": boxes, "score_list": scores})
    path = tmp_path_factory.mktemp("coco") / "coco_with_upn.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")  # a trailing blank line is fine
    return path, records


def test_coco_jsonl_lookups(coco_jsonl):
    path, records = coco_jsonl
    src = CocoJsonlProposals(path)
    assert isinstance(src, ProposalSource)
    r = records[1]
    p = src(None, image_id=r["id"])
    np.testing.assert_array_equal(p.boxes, np.asarray(r["bbox_list"], np.float64).reshape(-1, 4))
    np.testing.assert_array_equal(p.scores, r["score_list"])
    assert src("/data/coco/val2017/" + r["image"]) is p  # by file name
    assert src(None, image_id=r["image"]) is p
    assert src(None, image_id=np.int64(r["id"])) is p
    assert src("renamed_%012d.png" % r["id"]) is p  # a COCO-style stem resolves through the id
    assert len(src) == len(records) and src.keys() == [x["id"] for x in records]
    assert r["id"] in src and 1 not in src
    with pytest.raises(ProposalsNotFoundError, match=f"image id 1 .*{records[0]['id']}"):
        src(None, image_id=1)
    with pytest.raises(ProposalsNotFoundError, match="'dog.jpg'"):
        src("dog.jpg")
    with pytest.raises(TypeError, match="image_id"):
        src(None, image_id=1.5)


@pytest.mark.parametrize("lines, match", [
    (['{"id": 1, "image": "a.jpg", "bbox_list": [], "score_list": []}', "{oops"], "line 2: not a JSON object"),
    (['{"image": "a.jpg", "bbox_list": []}'], r"line 1: expected \{'id': int"),
    (['{"id": "1", "image": "a.jpg", "bbox_list": []}'], r"line 1: expected \{'id': int"),
    (['{"id": 1, "bbox_list": [[1, 2, 3, 4]], "score_list": [0.5, 0.4]}'], r"line 1 \(id 1\): got 2 scores"),
    (['{"id": 1, "bbox_list": []}', '{"id": 1, "bbox_list": []}'], "line 2: image id 1 appears twice"),
])
def test_coco_jsonl_malformed(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=match):
        CocoJsonlProposals(path)(None, image_id=1)


@needs_shared
def test_coco_results_grouped_and_sorted():
    with open(COCO_FIX_RES) as f:
        dets = json.load(f)
    src = CocoResultsProposals(COCO_FIX_RES)
    assert isinstance(src, ProposalSource)
    mine = [d for d in dets if d["image_id"] == 164]
    p = src(None, image_id=164)
    assert len(p) == len(mine) == 39
    order = np.argsort([-d["score"] for d in mine], kind="stable")
    want = np.array([[x, y, x + w, y + h] for x, y, w, h in (mine[i]["bbox"] for i in order)])
    np.testing.assert_array_equal(p.boxes, want)
    np.testing.assert_array_equal(p.scores, [mine[i]["score"] for i in order])
    assert np.all(np.diff(p.scores) <= 0)
    assert len(src) == 99
    high = CocoResultsProposals(COCO_FIX_RES, score_threshold=0.5)(None, image_id=164)
    assert len(high) == sum(d["score"] >= 0.5 for d in mine) and np.all(high.scores >= 0.5)
    # no annotations: a COCO-style name resolves through its digits
    assert src("COCO_val2014_000000000164.jpg") is p
    with pytest.raises(ProposalsNotFoundError, match="image id 7"):
        src(None, image_id=7)
    with pytest.raises(ProposalsNotFoundError, match="pass image_id= or annotations="):
        src("holiday.jpg")


@needs_shared
def test_coco_results_with_annotations():
    with open(COCO_FIX_ANN) as f:
        ann = json.load(f)
    with open(COCO_FIX_RES) as f:
        det_ids = {d["image_id"] for d in json.load(f)}
    src = CocoResultsProposals(COCO_FIX_RES, annotations=COCO_FIX_ANN)
    im = next(i for i in ann["images"] if i["id"] in det_ids)
    assert src(f"/x/{im['file_name']}") is src(None, image_id=im["id"])
    no_dets = [i for i in ann["images"] if i["id"] not in det_ids]
    assert no_dets  # the fixture has one image without detections: 0 boxes, not an error
    p = src(no_dets[0]["file_name"])
    assert len(p) == 0 and p.scores.shape == (0,)
    with pytest.raises(ProposalsNotFoundError, match="'unknown.jpg'.*COCO_val2014_"):
        src("unknown.jpg")


@pytest.mark.parametrize("content, match", [
    ('{"annotations": []}', "expected a JSON list"),
    ('[{"image_id": 1, "bbox": [1, 2, 3, 4]}]', r"detection 0: expected \{'image_id': int"),
    ('[{"image_id": "1", "bbox": [1, 2, 3, 4], "score": 0.5}]', "detection 0"),
    ('[{"image_id": 1, "bbox": [1, 2, 3], "score": 0.5}]', r"image_id 1: boxes has shape \(1, 3\)"),
    ('[{"image_id": 1, "bbox": [1, 2, 3, 4], "score": "high"}]', "image_id 1: scores"),
    ("[1, 2", "not a valid COCO results JSON"),
])
def test_coco_results_malformed(tmp_path, content, match):
    path = tmp_path / "res.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        CocoResultsProposals(path)(None, image_id=1)


def test_coco_results_malformed_annotations(tmp_path):
    res = tmp_path / "res.json"
    res.write_text('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]')
    ann = tmp_path / "ann.json"
    ann.write_text('{"images": [{"file_name": "a.jpg"}]}')
    with pytest.raises(ValueError, match=r"images\[0\]"):
        CocoResultsProposals(res, annotations=ann)(None, image_id=1)
    ann.write_text("[]")
    with pytest.raises(ValueError, match="'images' list"):
        CocoResultsProposals(res, annotations=ann)(None, image_id=1)


def test_callable_proposals(tmp_path, no_warnings):
    calls = []

    def detector(image):
        calls.append(image)
        return np.array([[1, 2, 30, 40], [5, 6, 70, 80]], np.float32), np.array([0.9, 0.4], np.float32)

    src = CallableProposals(detector)
    assert isinstance(src, ProposalSource)
    p = src("img.jpg")
    np.testing.assert_array_equal(p.boxes, [[1, 2, 30, 40], [5, 6, 70, 80]])
    np.testing.assert_allclose(p.scores, [0.9, 0.4], rtol=1e-7)
    assert calls == ["img.jpg"]
    # a tuple of two boxes is boxes, not (boxes, scores)
    two = CallableProposals(lambda im: ((1, 2, 30, 40), (5, 6, 70, 80)))("x")
    assert len(two) == 2 and two.scores is None
    assert len(CallableProposals(lambda im: ([], []))("x")) == 0
    p = CallableProposals(lambda im: as_boxes([[1, 2, 3, 4]], scores=[0.5]))("x")
    assert p.scores.tolist() == [0.5]
    # normalized output: the size comes from the image (array, PIL, path) unless given
    norm = CallableProposals(lambda im: [[0.25, 0.5, 0.5, 1.0]], box_format="xyxyn")
    np.testing.assert_array_equal(norm(np.zeros((40, 80, 3), np.uint8)).boxes, [[20, 20, 40, 40]])
    np.testing.assert_array_equal(norm(Image.new("RGB", (80, 40))).boxes, [[20, 20, 40, 40]])
    path = tmp_path / "i.png"
    Image.new("RGB", (8, 4)).save(path)
    np.testing.assert_array_equal(norm(str(path)).boxes, [[2, 2, 4, 4]])
    fixed = CallableProposals(lambda im: [[0.25, 0.5, 0.5, 1.0]], box_format="xyxyn", image_size=(100, 10))
    np.testing.assert_array_equal(fixed("x").boxes, [[25, 5, 50, 10]])
    with_id = CallableProposals(lambda im, iid: [[iid, 0, iid + 1, 1]], pass_image_id=True)
    np.testing.assert_array_equal(with_id("x", image_id=7).boxes, [[7, 0, 8, 1]])
    with pytest.raises(TypeError, match="callable"):
        CallableProposals(42)
    with pytest.raises(ValueError, match="unknown box_format"):
        CallableProposals(detector, box_format="xy")
    with pytest.raises(ValueError, match=r"expected \[N, 4\]"):
        CallableProposals(lambda im: [[1, 2, 3]])("x")


def test_callable_proposals_with_torch_and_detections(no_warnings):
    torch = pytest.importorskip("torch")
    src = CallableProposals(lambda im: (torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16),
                                        torch.tensor([0.5])))
    p = src("x")
    assert p.boxes.tolist() == [[1, 2, 3, 4]] and p.scores.tolist() == [0.5]
    p = CallableProposals(lambda im: FakeDetections(np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([0.25])))("x")
    assert p.scores.tolist() == [0.25]
