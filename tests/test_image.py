"""vlmfo1.image: loading, FO1 global resize, smart_resize and the Qwen2-VL image processor.

The reference is transformers' slow (PIL / NumPy) Qwen2VLImageProcessor — the class the official FO1 code uses —
constructed directly with the same min/max pixels. Tests that need it importorskip transformers and torch.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageFile, ImageOps  # noqa: E402

from vlmfo1.image import (  # noqa: E402
    FO1_DEFAULT_MAX_PIXELS,
    FO1_DEFAULT_MIN_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageDecodeError,
    QwenImageProcessor,
    cap_long_side,
    ensure_min_size,
    fo1_global_resize,
    load_image,
    smart_resize,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO = sorted((DATA / "coco_tiny" / "val2017").glob("*.jpg"))
DEMO = DATA / "demo" / "demo_image.jpg"
TOL = 1e-6
STOCK_MAX = 12845056


# ----------------------------------------------------------------------------------------------------------- helpers

def _ref_class():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    try:  # transformers >= 5: the PIL backend is a separate class (Qwen2VLImageProcessor is torchvision-based)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # transformers 4.x: Qwen2VLImageProcessor is the slow PIL/NumPy one
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as cls
    return cls


@pytest.fixture(scope="module")
def ref_factory():
    cls = _ref_class()
    cache = {}

    def make(min_pixels=FO1_DEFAULT_MIN_PIXELS, max_pixels=FO1_DEFAULT_MAX_PIXELS, **kw):
        key = repr((min_pixels, max_pixels, sorted(kw.items())))
        if key not in cache:
            cache[key] = cls(min_pixels=min_pixels, max_pixels=max_pixels, **kw)
        return cache[key]
    return make


@pytest.fixture(scope="module")
def ref_smart_resize():
    _ref_class()
    try:  # transformers >= 5 (this module needs no torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as f
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as f
    return f


def run_ref(ref, rgb: np.ndarray):
    out = ref(images=Image.fromarray(rgb), return_tensors="np")
    return np.asarray(out["pixel_values"]), tuple(int(x) for x in np.asarray(out["image_grid_thw"])[0])


def compare(ours_proc, ref, rgb, label, tol=TOL):
    pv, grid, info = ours_proc(rgb)
    rpv, rgrid = run_ref(ref, rgb)
    assert grid == rgrid, f"{label}: grid {grid} != reference {rgrid}"
    assert pv.shape == rpv.shape and pv.dtype == np.float32
    err = float(np.max(np.abs(pv.astype(np.float64) - rpv))) if pv.size else 0.0
    assert err <= tol, f"{label}: max abs error {err}"
    assert info["resized_size"] == (14 * grid[1], 14 * grid[2])
    return err


def rand_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth_rgb(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 7 + y * 3) % 256, (x * y) % 253, (255 - (x + 2 * y) % 256)], -1).astype(np.uint8)


def need_coco():
    if not COCO:
        pytest.skip(f"shared data not found under {DATA}")


# ------------------------------------------------------------------------------------------------------ smart_resize

def test_smart_resize_matches_transformers(ref_smart_resize):
    sizes = list(range(1, 130)) + [140, 182, 195, 196, 210, 333, 399, 424, 480, 500, 640, 1000, 1023, 2044, 2047,
                                   2048, 3000, 5000]
    rng = np.random.default_rng(1)
    pairs = [(h, w) for h in sizes for w in sizes if max(h, w) / min(h, w) <= 200]
    pairs += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(3000)]
    pairs = [(h, w) for h, w in pairs if max(h, w) / min(h, w) <= 200]
    n = 0
    for lo, hi in [(3136, FO1_DEFAULT_MAX_PIXELS), (3136, STOCK_MAX), (56 * 56, 2048 * 2048), (200704, 401408)]:
        for h, w in pairs:
            assert smart_resize(h, w, 28, lo, hi) == ref_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
            n += 1
    print(f"smart_resize: {n} cases identical to transformers")


def test_smart_resize_rounding_rules():
    # Python round = half to even (spec examples): 42 -> 56, 70 -> 56, 98 -> 112
    assert smart_resize(42, 280) == (56, 280)
    assert smart_resize(70, 280) == (56, 280)
    assert smart_resize(98, 280) == (112, 280)
    # min branch multiplies by beta (ERRATA E4): 27x27 -> beta = 56/27 -> 56x56 (not 84)
    assert smart_resize(27, 27) == (56, 56)
    assert smart_resize(1, 1) == (56, 56)
    # defaults are min 3136 / max 12845056: the max never binds after the 2048 cap
    assert smart_resize(2047, 2047) == (2044, 2044)
    h, w = smart_resize(2047, 2047, max_pixels=FO1_DEFAULT_MAX_PIXELS)
    assert h * w <= FO1_DEFAULT_MAX_PIXELS and h % 28 == 0 and w % 28 == 0


def test_smart_resize_errors(ref_smart_resize):
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(28, 5601)
    with pytest.raises(ValueError):
        ref_smart_resize(28, 5601)
    assert smart_resize(28, 5600) == ref_smart_resize(28, 5600)  # exactly 200 is accepted
    for h, w in [(0, 10), (10, 0), (-3, 40)]:
        with pytest.raises(ValueError):
            smart_resize(h, w)
    with pytest.raises(ValueError, match="aspect ratio"):
        QwenImageProcessor()(np.zeros((2, 500, 3), np.uint8))


# ------------------------------------------------------------------------------------------ processor vs transformers

def test_coco_against_transformers(ref_factory):
    need_coco()
    ours = QwenImageProcessor()
    ref = ref_factory()
    paths = COCO + ([DEMO] if DEMO.exists() else [])
    worst = 0.0
    for p in paths:
        rgb = load_image(p)
        np.testing.assert_array_equal(rgb, np.asarray(Image.open(p).convert("RGB")))  # reference decode
        img, rx, ry = fo1_global_resize(rgb)
        assert img is rgb and rx == ry == 1.0  # COCO images are far below the cap
        worst = max(worst, compare(ours, ref, img, p.name))
    print(f"coco_tiny + demo: {len(paths)} images, max abs error {worst:.3g}")


def test_coco_stock_limits_from_path(ref_factory):
    """Stock Qwen2.5-VL limits (3136 / 12845056), path input straight into the processor."""
    need_coco()
    ours = QwenImageProcessor(min_pixels=3136, max_pixels=STOCK_MAX)
    ref = ref_factory(3136, STOCK_MAX)
    worst = 0.0
    for p in COCO[:10]:
        pv, grid, _ = ours(p)
        rpv, rgrid = run_ref(ref, np.asarray(Image.open(p).convert("RGB")))
        assert grid == rgrid
        worst = max(worst, float(np.max(np.abs(pv - rpv))))
    assert worst <= TOL
    print(f"stock limits, 10 COCO images: max abs error {worst:.3g}")


EDGE_SIZES = [(1, 1), (27, 27), (28, 28), (1, 40), (27, 200), (29, 57), (55, 83), (56, 56), (97, 131), (28, 2000),
              (2000, 28), (3000, 1000), (1000, 3000), (333, 500), (1033, 777)]


@pytest.mark.parametrize("hw", EDGE_SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_edge_sizes_processor_direct(ref_factory, hw):
    """The processor alone (no FO1 resizing), as transformers on the same array."""
    h, w = hw
    rgb = rand_rgb(h, w, seed=h * 7 + w)
    err = compare(QwenImageProcessor(), ref_factory(), rgb, f"{h}x{w}")
    err2 = compare(QwenImageProcessor(max_pixels=STOCK_MAX), ref_factory(3136, STOCK_MAX), rgb, f"{h}x{w} stock")
    print(f"{h}x{w}: max abs error {max(err, err2):.3g}")


def _cap_formula(w, h):
    """ERRATA E4, written independently: s = 2048.0/L; W' = int(W*s); H' = int(H*s); clamp >= 28; only if L > 2048."""
    L = max(w, h)
    if L > 2048:
        s = 2048.0 / L
        w2, h2 = int(w * s), int(h * s)
    else:
        w2, h2 = w, h
    return max(28, w2), max(28, h2)


@pytest.mark.parametrize("hw", [(3000, 1000), (1000, 3000), (28, 3000), (2215, 60), (60, 2244), (2276, 2302),
                                (2365, 100), (2049, 2049), (2048, 1500), (1, 1), (27, 50), (10, 3000)],
                         ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_fo1_global_resize_then_processor(ref_factory, hw):
    h, w = hw
    rgb = smooth_rgb(h, w)
    img, rx, ry = fo1_global_resize(rgb)
    # min-28 step of the official load_image: (max(28, W), max(28, H)), default filter for RGB = BICUBIC
    w0, h0 = max(28, w), max(28, h)
    base = rgb if (w0, h0) == (w, h) else np.asarray(Image.fromarray(rgb).resize((w0, h0)))
    ew, eh = _cap_formula(w0, h0)
    assert img.shape == (eh, ew, 3)
    assert rx == ew / w0 and ry == eh / h0
    expect = base if (ew, eh) == (w0, h0) else np.asarray(Image.fromarray(base).resize((ew, eh), Image.BICUBIC))
    np.testing.assert_array_equal(img, expect)
    if max(w0, h0) in (2215, 2244, 2276, 2302, 2365):
        assert max(ew, eh) == 2047  # E4: 2048/L is inexact
    err = compare(QwenImageProcessor(), ref_factory(), img, f"{h}x{w} capped")
    print(f"{h}x{w} -> {eh}x{ew}: max abs error {err:.3g}")


def test_cap_long_side_ratios_and_clamp():
    img = np.zeros((10, 3000, 3), np.uint8)
    out, rx, ry = cap_long_side(img)
    assert out.shape == (28, 2048, 3) and rx == 2048 / 3000 and ry == 28 / 10
    same = np.zeros((2048, 30, 3), np.uint8)
    out, rx, ry = cap_long_side(same)
    assert out is same and rx == ry == 1.0
    assert ensure_min_size(np.zeros((5, 40, 3), np.uint8)).shape == (28, 40, 3)


def test_resample_from_config(ref_factory, tmp_path):
    cfg = {"min_pixels": 3136, "max_pixels": STOCK_MAX, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "resample": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    ours = QwenImageProcessor.from_pretrained(tmp_path)
    assert ours.resample == 2 and ours.max_pixels == STOCK_MAX
    ref = ref_factory(3136, STOCK_MAX, resample=2, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    err = compare(ours, ref, rand_rgb(301, 467, 5), "bilinear/custom mean")
    print(f"resample=2, custom mean/std: max abs error {err:.3g}")


# --------------------------------------------------------------------------------------- independent layout checks

def test_patch_layout_and_rescale_rule():
    """Row/column order and values from the spec formulas (backbones.md §1.3, ERRATA E3), without transformers."""
    h, w = 56, 84  # multiple of 28: smart_resize keeps it and Pillow's same-size resize is a copy
    rgb = rand_rgb(h, w, 3)
    pv, grid, info = QwenImageProcessor()(rgb)
    assert grid == (1, 4, 6) and pv.shape == (24, 1176) and pv.dtype == np.float32 and pv.flags.c_contiguous
    assert info["num_image_tokens"] == 6
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    norm = (x - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
    gh, gw = 4, 6
    for r in range(gh * gw):
        blk, rem = divmod(r, 4)
        bh, bw = divmod(blk, gw // 2)
        dy, dx = divmod(rem, 2)
        py, px = 2 * bh + dy, 2 * bw + dx
        patch = norm[14 * py:14 * py + 14, 14 * px:14 * px + 14, :].transpose(2, 0, 1)  # (c, y, x)
        expect = np.stack([patch, patch], axis=1).reshape(-1)                            # (c, t, y, x)
        np.testing.assert_array_equal(pv[r], expect)


def test_from_pretrained_limits(tmp_path):
    d = tmp_path
    (d / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
    p = QwenImageProcessor.from_pretrained(d)
    assert (p.min_pixels, p.max_pixels) == (3136, 1003520)
    p = QwenImageProcessor.from_pretrained(d, default_max_pixels=2048 * 2048)
    assert p.max_pixels == 2048 * 2048
    (d / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 1000, "longest_edge": 5000}}))
    assert QwenImageProcessor.from_pretrained(d).max_pixels == 1003520       # size dict ignored (E4)
    p = QwenImageProcessor.from_pretrained(d, honor_size_dict=True)
    assert (p.min_pixels, p.max_pixels) == (1000, 5000)
    (d / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": STOCK_MAX}))
    p = QwenImageProcessor.from_pretrained(d / "preprocessor_config.json")
    assert (p.min_pixels, p.max_pixels) == (3136, STOCK_MAX)
    assert QwenImageProcessor.from_pretrained(d, max_pixels=12345).max_pixels == 12345
    with pytest.raises(FileNotFoundError):
        QwenImageProcessor.from_pretrained(d / "nope")
    (d / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError):
        QwenImageProcessor.from_pretrained(d)
    with pytest.raises(ValueError):
        QwenImageProcessor(min_pixels=0)


# ----------------------------------------------------------------------------------------------- colour conversions

def _modes():
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (23, 31, 1), dtype=np.uint8)], -1)
    p = Image.fromarray(rgb).convert("P")
    pt = p.copy()
    pt.info["transparency"] = 5
    return {
        "L": Image.fromarray(rgb[..., 0]),
        "1": Image.fromarray(rgb[..., 0]).convert("1"),
        "LA": Image.fromarray(rgba).convert("LA"),
        "RGBA": Image.fromarray(rgba),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "YCbCr": Image.fromarray(rgb).convert("YCbCr"),
        "P": p,
        "P+transparency": pt,
        "PA": Image.fromarray(rgba).convert("PA"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (23, 31), dtype=np.uint16)),
        "I;16 small": Image.fromarray(rng.integers(0, 300, (23, 31), dtype=np.uint16)),
        "I": Image.fromarray(rng.integers(-100, 70000, (23, 31)).astype(np.int32)),
        "F": Image.fromarray(rng.uniform(-10, 300, (23, 31)).astype(np.float32)),
    }


@pytest.mark.parametrize("name", list(_modes()))
def test_pil_modes_follow_convert_rgb(name):
    im = _modes()[name]
    out = load_image(im)
    assert out.dtype == np.uint8 and out.shape == (23, 31, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("fmt,mode", [("PNG", "L"), ("PNG", "LA"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "I;16"),
                                      ("TIFF", "CMYK"), ("JPEG", "CMYK"), ("JPEG", "L"), ("TIFF", "F"),
                                      ("GIF", "P")])
def test_file_modes_follow_convert_rgb(tmp_path, fmt, mode):
    im = _modes()["I;16"] if mode == "I;16" else _modes()[mode]
    path = tmp_path / f"img.{fmt.lower()}"
    im.save(path, fmt)
    with Image.open(path) as ref_im:
        expect = np.asarray(ref_im.convert("RGB"))
    np.testing.assert_array_equal(load_image(path), expect)
    np.testing.assert_array_equal(load_image(str(path)), expect)


def test_high_bit_depth_scale_option():
    a = np.array([[0, 128, 257, 32767, 65535]], np.uint16)
    clip = load_image(Image.fromarray(a))
    assert clip[0, :, 0].tolist() == [0, 128, 255, 255, 255]  # Pillow's rule (reference): clip
    scaled = load_image(Image.fromarray(a), high_bit_depth="scale")
    assert scaled[0, :, 0].tolist() == [0, 0, 1, 127, 255]
    assert (scaled[..., 0] == scaled[..., 2]).all()
    with pytest.raises(ValueError):
        load_image(Image.fromarray(a), high_bit_depth="nope")


def test_array_inputs_gray_rgba():
    rng = np.random.default_rng(3)
    g = rng.integers(0, 256, (9, 13), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(g), np.asarray(Image.fromarray(g).convert("RGB")))
    np.testing.assert_array_equal(load_image(g[:, :, None]), np.repeat(g[:, :, None], 3, 2))
    rgba = rng.integers(0, 256, (9, 13, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(rgba), np.asarray(Image.fromarray(rgba).convert("RGB")))
    rgb = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    ro = rgb.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(load_image(ro), rgb)


def test_non_contiguous_arrays():
    need = rand_rgb(151, 263, 11)
    proc = QwenImageProcessor()
    base_pv, base_grid, _ = proc(np.ascontiguousarray(need))
    big = np.zeros((302, 526, 5), np.uint8)
    big[::2, ::2, 1:4] = need
    wt = np.ascontiguousarray(need.transpose(1, 0, 2)).transpose(1, 0, 2)   # transposed storage
    views = {
        "transposed": wt,
        "fortran": np.asfortranarray(need),
        "strided": big[::2, ::2, 1:4],
        "neg-rows": np.ascontiguousarray(need[::-1])[::-1],
        "neg-cols": np.ascontiguousarray(need[:, ::-1])[:, ::-1],
        "neg-chan": np.ascontiguousarray(need[..., ::-1])[..., ::-1],
    }
    for name, v in views.items():
        assert not v.flags.c_contiguous, name
        np.testing.assert_array_equal(load_image(v), need)
        pv, grid, _ = proc(v)
        assert grid == base_grid
        np.testing.assert_array_equal(pv, base_pv, err_msg=name)
    # gray negative-stride view
    g = need[..., 0]
    np.testing.assert_array_equal(load_image(g[::-1, ::-1]), load_image(np.ascontiguousarray(g[::-1, ::-1])))


def test_exif_orientation(tmp_path):
    rgb = smooth_rgb(40, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "exif.jpg"
    Image.fromarray(rgb).save(path, "JPEG", exif=exif.tobytes())
    raw = load_image(path)
    assert raw.shape == (40, 64, 3)  # default: no rotation (reference)
    rot = load_image(path, apply_exif=True)
    assert rot.shape == (64, 40, 3)
    with Image.open(path) as im:
        np.testing.assert_array_equal(rot, np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
        np.testing.assert_array_equal(load_image(im, apply_exif=True), rot)


# ------------------------------------------------------------------------------------------------------------ errors

def test_truncated_jpeg(tmp_path):
    need_coco()
    data = COCO[0].read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(OSError, match="half.jpg") as ei:
        load_image(path)
    assert isinstance(ei.value, ImageDecodeError) and isinstance(ei.value, ValueError)
    with pytest.raises(ImageDecodeError):
        load_image(Image.open(path))  # lazily opened PIL image: the error surfaces on load()
    with pytest.raises(ImageDecodeError):
        QwenImageProcessor()(path)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageDecodeError, match="junk.jpg"):
        load_image(junk)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(OSError):
        load_image(empty)
    header_only = tmp_path / "hdr.png"
    buf = io.BytesIO()
    Image.fromarray(rand_rgb(64, 64)).save(buf, "PNG")
    header_only.write_bytes(buf.getvalue()[:60])
    with pytest.raises(OSError):
        load_image(header_only)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(IsADirectoryError):
        load_image(tmp_path)


@pytest.mark.parametrize("arr,exc", [
    (np.zeros((0, 10, 3), np.uint8), ValueError),
    (np.zeros((10, 0), np.uint8), ValueError),
    (np.zeros((10, 10, 3), np.float32), TypeError),
    (np.zeros((10, 10, 3), np.uint16), TypeError),
    (np.zeros((10, 10, 3), bool), TypeError),
    (np.zeros((10, 10, 2), np.uint8), ValueError),
    (np.zeros((10, 10, 5), np.uint8), ValueError),
    (np.zeros((2, 10, 10, 3), np.uint8), ValueError),
    (np.zeros((10,), np.uint8), ValueError),
], ids=["zero-h", "zero-w", "float32", "uint16", "bool", "2ch", "5ch", "4d", "1d"])
def test_bad_arrays(arr, exc):
    with pytest.raises(exc):
        load_image(arr)
    with pytest.raises(exc):
        QwenImageProcessor()(arr)


@pytest.mark.parametrize("obj", [42, None, 3.5, {"a": 1}, [[1, 2, 3]], b"\xff\xd8\xff"])
def test_non_image_objects(obj):
    with pytest.raises(TypeError):
        load_image(obj)


def test_runtime_imports_no_torch():
    import ast
    src = (Path(__file__).resolve().parents[1] / "vlmfo1" / "image.py").read_text()
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    # (+ vlmfo1.constants, the standard library only)
    assert mods <= {"__future__", "json", "math", "os", "warnings", "dataclasses", "typing", "numpy", "PIL",
                    "constants"}, mods


def test_math_sanity():
    # E4 examples: long side 2047 for these L
    for L in (2215, 2244, 2276, 2302, 2365):
        assert int(L * (2048.0 / L)) == 2047
    assert math.isclose(FO1_DEFAULT_MAX_PIXELS, 28 * 28 * 1280)


def test_demo_worked_example():
    """fo1_architecture.md §1.10: demo_image.jpg (500x399) -> 504x392, grid (1, 28, 36), 252 image tokens."""
    if not DEMO.exists():
        pytest.skip(f"{DEMO} not found")
    img, rx, ry = fo1_global_resize(load_image(DEMO))
    pv, grid, info = QwenImageProcessor()(img)
    assert img.shape == (399, 500, 3) and (rx, ry) == (1.0, 1.0)
    assert grid == (1, 28, 36) and pv.shape == (1008, 1176) and info["num_image_tokens"] == 252
