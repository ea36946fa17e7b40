"""Which preprocessor_config.json keys bind the pixel limits, per checkpoint kind (ERRATA E4).

"qwen": stock Qwen2.5-VL under the installed transformers 5 (`Qwen2VLImageProcessor`: the JSON `size`
{shortest_edge, longest_edge} if present, overridden by the JSON min_pixels / max_pixels keys) -- checked against
transformers' own processor loaded from the same folder (image_grid_thw of several image sizes).
"fo1": the official FO1 run (transformers 4.50.1): min = JSON min_pixels else 3136, max = JSON max_pixels else
1,003,520, `size` ignored (E4) -- checked against that rule.
"""
import json

import numpy as np
import pytest

from vlmfo1.image import FO1_DEFAULT_MAX_PIXELS, FO1_DEFAULT_MIN_PIXELS, QwenImageProcessor, smart_resize

BASE = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "resample": 3}

# layouts: (name, extra JSON keys). The limits are chosen so that they bind on the test images.
LAYOUTS = [
    ("size_only", {"size": {"shortest_edge": 40000, "longest_edge": 90000}}),          # what transformers 5 writes
    ("minmax_only", {"min_pixels": 50000, "max_pixels": 120000}),                      # what older writers wrote
    ("both_differ", {"size": {"shortest_edge": 40000, "longest_edge": 90000}, "min_pixels": 60000,
                     "max_pixels": 150000}),
    ("size_and_max", {"size": {"shortest_edge": 40000, "longest_edge": 90000}, "max_pixels": 200000}),
    ("neither", {}),
]
SIZES = [(60, 80), (150, 200), (240, 320), (480, 640), (700, 1000), (1100, 1500)]


def _write(tmp_path, extra):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**BASE, **extra}))
    return tmp_path


def _fo1_rule(extra):
    return (extra.get("min_pixels", FO1_DEFAULT_MIN_PIXELS), extra.get("max_pixels", FO1_DEFAULT_MAX_PIXELS))


@pytest.mark.parametrize("name,extra", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_qwen_kind_matches_transformers(tmp_path, name, extra):
    transformers = pytest.importorskip("transformers")
    d = _write(tmp_path, extra)
    hp = transformers.AutoImageProcessor.from_pretrained(str(d))
    ours = QwenImageProcessor.from_pretrained(d, kind="qwen")
    for h, w in SIZES:
        img = np.zeros((h, w, 3), np.uint8)
        out = hp(images=[img], return_tensors="np")
        t, gh, gw = (int(v) for v in np.asarray(out["image_grid_thw"]).reshape(-1))
        rh, rw = ours.resized_size(h, w)
        assert (rh // 14, rw // 14) == (gh, gw), (name, h, w, ours.min_pixels, ours.max_pixels)
    # the FO1 rule gives other limits on every layout whose size dict is not fully overridden by min/max keys
    fo1 = QwenImageProcessor.from_pretrained(d, kind="fo1")
    if "size" in extra and not ("min_pixels" in extra and "max_pixels" in extra):
        assert (fo1.min_pixels, fo1.max_pixels) != (ours.min_pixels, ours.max_pixels)


@pytest.mark.parametrize("name,extra", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_fo1_kind_rule(tmp_path, name, extra):
    d = _write(tmp_path, extra)
    fo1 = QwenImageProcessor.from_pretrained(d, kind="fo1")
    assert (fo1.min_pixels, fo1.max_pixels) == _fo1_rule(extra)
    assert QwenImageProcessor.from_pretrained(d) == fo1          # "fo1" is the default kind
    for h, w in SIZES:
        assert fo1.resized_size(h, w) == smart_resize(h, w, 28, *_fo1_rule(extra))


def test_size_only_binds_differently(tmp_path):
    """transformers-5 layout: the size dict binds for Qwen, not for FO1 (which then uses 3136 / 1,003,520)."""
    d = _write(tmp_path, LAYOUTS[0][1])
    q = QwenImageProcessor.from_pretrained(d, kind="qwen")
    f = QwenImageProcessor.from_pretrained(d, kind="fo1")
    assert (q.min_pixels, q.max_pixels) == (40000, 90000)
    assert (f.min_pixels, f.max_pixels) == (3136, 1003520)
    assert q.resized_size(700, 1000) != f.resized_size(700, 1000)
    assert QwenImageProcessor.from_pretrained(d, honor_size_dict=True) == q


def test_qwen_kind_incomplete_size(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _write(tmp_path, {"size": {"shortest_edge": 40000}})
    with pytest.raises(ValueError, match="longest_edge"):
        QwenImageProcessor.from_pretrained(d, kind="qwen")
    with pytest.raises(ValueError):
        transformers.AutoImageProcessor.from_pretrained(str(d))(images=[np.zeros((60, 80, 3), np.uint8)])
    assert QwenImageProcessor.from_pretrained(d, kind="fo1").max_pixels == FO1_DEFAULT_MAX_PIXELS
    with pytest.raises(ValueError, match="kind"):
        QwenImageProcessor.from_pretrained(d, kind="llava")
