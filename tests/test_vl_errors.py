"""Qwen2.5-VL error handling: bad images, bad prompts, bad pixel_values and broken checkpoints give clear
exceptions (ValueError / TypeError / OSError / KeyError) instead of crashes or silent garbage; extreme (but legal)
aspect ratios work and give transformers' grid.

Uses the tiny random checkpoint of test_vl_parity.py (built once per session, shared when both files run).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_vl_parity import COCO_DIR, IMAGE_TOKEN_ID, THREADS, build_tiny_vl, synthetic_strip  # noqa: E402
from vlmfo1.qwen_vl import QwenVL  # noqa: E402

COCO_IMG = COCO_DIR / "000000005001.jpg"


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return build_tiny_vl(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def vl(ckpt_dir):
    return QwenVL.load(str(ckpt_dir), mode="exact", n_threads=THREADS)


@pytest.fixture(scope="module")
def small_img():
    return synthetic_strip(56, 84)  # grid 4 x 6: 6 image tokens, fast


def _both(vl, image, text="Hi.", **kw):
    """Call prepare and generate_ids; return the two exceptions (each call must raise)."""
    excs = []
    for fn in (lambda: vl.prepare(image, text, **kw), lambda: vl.generate_ids(image, text, max_new_tokens=2, **kw)):
        with pytest.raises(Exception) as ei:
            fn()
        excs.append(ei.value)
    return excs


# ------------------------------------------------------------------------------------------ images

def test_garbage_file(vl, tmp_path):
    p = tmp_path / "garbage.jpg"
    p.write_bytes(b"this is not an image" * 50)
    for e in _both(vl, str(p)):
        assert isinstance(e, OSError), repr(e)
        assert "garbage.jpg" in str(e)


def test_truncated_jpeg(vl, tmp_path):
    if not COCO_IMG.exists():
        pytest.skip("COCO image not available")
    data = COCO_IMG.read_bytes()
    p = tmp_path / "truncated.jpg"
    p.write_bytes(data[: len(data) // 3])
    for e in _both(vl, str(p)):
        assert isinstance(e, OSError), repr(e)
        assert "truncated.jpg" in str(e)


def test_empty_and_missing_file(vl, tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    for e in _both(vl, str(p)):
        assert isinstance(e, OSError), repr(e)
    for e in _both(vl, str(tmp_path / "does_not_exist.jpg")):
        assert isinstance(e, FileNotFoundError), repr(e)


@pytest.mark.parametrize("shape", [(0, 10, 3), (10, 0, 3), (0, 0), (0, 5, 1)])
def test_zero_size_array(vl, shape):
    for e in _both(vl, np.zeros(shape, np.uint8)):
        assert isinstance(e, ValueError), repr(e)
        assert "zero size" in str(e)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int64, bool])
def test_wrong_dtype(vl, dtype):
    for e in _both(vl, np.zeros((56, 56, 3), dtype)):
        assert isinstance(e, TypeError), repr(e)
        assert "uint8" in str(e)


@pytest.mark.parametrize("shape", [(56, 56, 2), (56, 56, 5), (3, 56, 56), (2, 56, 56, 3), (56,)])
def test_wrong_channels_or_rank(vl, shape):
    for e in _both(vl, np.zeros(shape, np.uint8)):
        assert isinstance(e, ValueError), repr(e)


def test_unsupported_source(vl):
    for src in (b"\xff\xd8\xff", 3.5, None):
        for e in _both(vl, src):
            assert isinstance(e, TypeError), repr(e)


# ------------------------------------------------------------------------------------------ prompts

def test_prompt_without_image_pad(vl, small_img):
    for e in _both(vl, small_img, prompt="<|im_start|>user\nno image here<|im_end|>\n<|im_start|>assistant\n"):
        assert isinstance(e, ValueError) and "<|image_pad|>" in str(e) and "found 0" in str(e), repr(e)
    for e in _both(vl, small_img, system=None, prompt=""):
        assert isinstance(e, ValueError), repr(e)


def test_prompt_with_two_image_pads(vl, small_img):
    two = "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>hi"
    for e in _both(vl, small_img, prompt=two):
        assert isinstance(e, ValueError) and "found 2" in str(e), repr(e)
    # a second placeholder smuggled in through the user text of the default prompt
    for e in _both(vl, small_img, text="look: <|image_pad|>"):
        assert isinstance(e, ValueError) and "found 2" in str(e), repr(e)


def test_good_prompt_still_works(vl, small_img):
    ids, emb, pos, delta = vl.prepare(small_img, "Hi.")
    assert ids.count(IMAGE_TOKEN_ID) == 6 and emb.shape == (len(ids), 64) and pos.shape == (3, len(ids))
    assert len(vl.generate_ids(small_img, "Hi.", max_new_tokens=3, stop_ids=[])) == 3


# ------------------------------------------------------------------------------------------ pixel_values

@pytest.fixture(scope="module")
def pv_grid(vl, small_img):
    pv, grid, _ = vl.processor(small_img)
    return pv, tuple(int(v) for v in np.asarray(grid).ravel())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pixel_values_nonfinite(vl, pv_grid, bad):
    pv, grid = pv_grid
    x = pv.copy()
    x[3, 17] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        vl.vision(x, grid)
    with pytest.raises(ValueError, match="NaN or inf"):
        vl.vision(x, grid, features=True)


def test_pixel_values_wrong_shape(vl, pv_grid):
    pv, grid = pv_grid
    t, gh, gw = grid
    cases = [pv[:-1], pv[:, :-1], pv.reshape(-1), pv[None], np.zeros((0, pv.shape[1]), np.float32)]
    for x in cases:
        with pytest.raises(ValueError, match="pixel_values must have shape"):
            vl.vision(x, grid)
    # grid that does not match the rows, or an odd grid (not divisible by the 2x2 merge)
    for g in [(1, gh + 2, gw), (1, gh, gw - 2)]:
        with pytest.raises(ValueError):
            vl.vision(pv, g)
    with pytest.raises(ValueError):
        vl.vision(np.zeros((3 * 5, pv.shape[1]), np.float32), (1, 3, 5))
    with pytest.raises(ValueError, match="grid_t"):
        vl.vision(np.concatenate([pv, pv]), (2, gh, gw))
    # non-float32 but valid values are converted, not rejected
    np.testing.assert_allclose(vl.vision(pv.astype(np.float64), grid), vl.vision(pv, grid), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ checkpoints

def test_missing_vision_tensor(ckpt_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "broken"
    shutil.copytree(ckpt_dir, d)
    tensors = load_file(str(d / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("visual.blocks.0.attn.qkv.bias"))
    del tensors[name]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError) as ei:
        QwenVL.load(str(d), n_threads=THREADS)
    assert name in str(ei.value), str(ei.value)
    print(f"[missing tensor] {ei.value}")


# ------------------------------------------------------------------------------------------ aspect ratios

def _ref_processor():
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as cls
    return cls(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


@pytest.mark.parametrize("hw", [(28, 2000), (2000, 28), (20, 3990), (4000, 21)])
def test_extreme_aspect_ratio(vl, hw):
    from PIL import Image

    img = synthetic_strip(*hw)
    out = _ref_processor()(images=Image.fromarray(img), return_tensors="np")
    ref_grid = tuple(int(v) for v in np.asarray(out["image_grid_thw"])[0])
    pv, grid, _ = vl.processor(img)
    grid = tuple(int(v) for v in np.asarray(grid).ravel())
    assert grid == ref_grid
    np.testing.assert_allclose(pv, np.asarray(out["pixel_values"]), rtol=0, atol=1e-6)
    ids, emb, pos, delta = vl.prepare(img, "Hi.")
    assert ids.count(IMAGE_TOKEN_ID) == grid[1] * grid[2] // 4
    assert np.isfinite(emb).all()
    toks = vl.generate_ids(img, "Hi.", max_new_tokens=2, stop_ids=[])
    assert len(toks) == 2
    print(f"[aspect] {hw}: grid {grid}")


@pytest.mark.parametrize("hw", [(28, 5657), (5657, 28), (10, 2010)])
def test_aspect_over_200(vl, hw):
    img = synthetic_strip(*hw)
    for e in _both(vl, img):
        assert isinstance(e, ValueError) and "200" in str(e), repr(e)
    from PIL import Image

    with pytest.raises(ValueError):  # the reference refuses it too
        _ref_processor()(images=Image.fromarray(img), return_tensors="np")
