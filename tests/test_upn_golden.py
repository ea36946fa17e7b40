"""The UPN golden files (tests/golden/upn_tiny_*.npz, made by tests/golden/make_upn_golden.py from the official
detect_tools/upn of VLM-FO1 e6bef8d, see tests/golden/README.md "UPN") are complete and self-consistent, and the
official filter step they hold is what vlmfo1.proposals.filter_proposals computes. NumPy only; the UPN network itself
is not ported yet, so nothing here runs it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlmfo1.proposals import as_boxes, filter_proposals
from vlmfo1.testing import upn_config

GOLDEN = Path(__file__).resolve().parent / "golden"
FILES = sorted(GOLDEN.glob("upn_tiny_*.npz"))
pytestmark = pytest.mark.skipif(not FILES, reason="UPN golden files missing")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_golden_file(path):
    assert path.stat().st_size < 1.5e6
    z = np.load(path)
    meta = json.loads(str(z["meta_json"]))
    cfg = upn_config("tiny")
    assert meta["config"] == cfg and meta["official_commit"].startswith("e6bef8d")
    k, nl = cfg["num_queries"], cfg["dec_layers"]
    assert z["dec_hs"].shape == (nl, k, 256) and z["dec_refs"].shape == (nl + 1, k, 4)
    assert z["topk_proposals"].shape == (k,) and len(set(z["topk_proposals"].tolist())) == k
    assert np.all(np.diff(z["topk_logits"]) <= 0)
    assert meta["topk"]["invalid_in_topk"] == 0 and meta["topk"]["n_exact_ties_in_topk_or_boundary"] == 0
    # reference 0 of the decoder = sigmoid of the selected unsigmoid refpoints (float32 sigmoid: loose tolerance)
    ref0 = 1 / (1 + np.exp(-z["topk_refpoints_unsig"].astype(np.float64)))
    assert np.allclose(ref0, z["dec_refs"][0], rtol=0, atol=1e-6)
    # postprocess: sorted scores = sigmoid(pred_logits) sorted
    s = 1 / (1 + np.exp(-z["pred_logits"].astype(np.float64)))
    assert np.allclose(np.sort(s)[::-1], z["post_scores"], rtol=0, atol=1e-6)
    h, w = (int(v) for v in z["input_hw"])
    assert [w, h] == [int(v) for v in z["resized_u8_shape"][1::-1]]
    for name in ("backbone0", "proj4", "pos2", "memory", "enc_logits"):
        assert z[name + "__idx"].shape[0] == z[name + "__val"].shape[0] == 4096


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_filter_matches_official(path):
    z = np.load(path)
    meta = json.loads(str(z["meta_json"]))
    props = as_boxes(z["post_boxes"].astype(np.float64), scores=z["post_scores"])
    for j, f in enumerate(meta["filters"]):
        got = filter_proposals(props, min_score=f["min_score"], nms_iou=f["nms_value"], max_boxes=None)
        assert np.array_equal(np.asarray(got.boxes), z[f"filter{j}_boxes"])
        assert np.array_equal(np.asarray(got.scores).astype(np.float32), z[f"filter{j}_scores"])
        assert f["n_removed_by_nms"] > 0
