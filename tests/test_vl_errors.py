"""Qwen2.5-VL error handling: bad images, bad prompts, bad pixel_values and broken checkpoints give clear
exceptions (ValueError / TypeError / OSError / KeyError) instead of crashes or silent garbage; extreme (but legal)
aspect ratios work and give transformers' grid. The request path gets the checks tests/test_request_hardening.py makes
for VLM-FO1: every bad generation option (NaN/inf/huge/negative/float/bool/str), 1 MB texts, lone surrogates, load
options (max_context, n_threads, mode/dtype/compute) and sessions are refused at once, before any image or model work,
with a TypeError/ValueError naming the option; a closed model refuses requests.

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


# ------------------------------------------------------------------------------------------ request options
# The QwenVL request path gets the checks tests/test_request_hardening.py makes for VLM-FO1: every bad generation
# option, text or load option is a TypeError / ValueError naming it, raised at once and before any image or model work.

FAST = 1.0          # seconds: every refusal must come at once
MB = 2 ** 20


@pytest.fixture
def no_work(vl, monkeypatch):
    """Fail the test if the image is read or encoded, or a decoder session is made."""
    def boom(*a, **k):
        raise AssertionError("image/model work was started for a bad request")
    import vlmfo1.qwen_vl as qv
    monkeypatch.setattr(qv, "load_image", boom)
    monkeypatch.setattr(vl, "encode_image", boom)
    monkeypatch.setattr(vl.decoder, "session", boom)
    return vl


def refused(fn, exc, match):
    import time
    t0 = time.perf_counter()
    with pytest.raises(exc, match=match):
        fn()
    dt = time.perf_counter() - t0
    assert dt < FAST, f"refused after {dt:.2f} s"
    return dt


def vl_bad_options(limit, vocab):
    """(options, exception, message pattern) for a model with `limit` positions and `vocab` tokens."""
    return [
        (dict(max_new_tokens=10 ** 9), ValueError, rf"max_new_tokens must be in \[0, {limit}\]"),
        (dict(max_new_tokens=2 ** 31), ValueError, r"max_new_tokens must be in \[0, "),
        (dict(max_new_tokens=10 ** 30), ValueError, r"max_new_tokens must be in \[0, "),
        (dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be in \[0, "),
        (dict(max_new_tokens=5.0), TypeError, r"max_new_tokens must be an int"),
        (dict(max_new_tokens=True), TypeError, r"max_new_tokens must be an int"),
        (dict(max_new_tokens="8"), TypeError, r"max_new_tokens must be an int"),
        (dict(max_new_tokens=None), TypeError, r"max_new_tokens must be an int"),
        (dict(temperature=float("nan")), ValueError, r"temperature must be a finite number"),
        (dict(temperature=float("inf")), ValueError, r"temperature must be a finite number"),
        (dict(temperature=np.float32("nan")), ValueError, r"temperature must be a finite number"),
        (dict(temperature=-0.5), ValueError, r"temperature must be >= 0"),
        (dict(temperature="hot"), TypeError, r"temperature must be a number"),
        (dict(temperature=None), TypeError, r"temperature must be a number"),
        (dict(top_p=float("nan")), ValueError, r"top_p must be a finite number"),
        (dict(top_p=-float("inf")), ValueError, r"top_p must be a finite number"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_k=float("nan")), TypeError, r"top_k must be an int >= 0"),
        (dict(top_k=2.0), TypeError, r"top_k must be an int >= 0"),
        (dict(top_k=True), TypeError, r"top_k must be an int >= 0"),
        (dict(top_k=-1), ValueError, r"top_k must be >= 0"),
        (dict(seed="1"), TypeError, r"seed must be None or an int"),
        (dict(seed=1.5), TypeError, r"seed must be None or an int"),
        (dict(seed=-1), ValueError, r"seed must be None or an int >= 0"),
        (dict(stop_ids=5), TypeError, r"stop_ids must be a list of token ids"),
        (dict(stop_ids="abc"), TypeError, r"stop_ids must be a list of token ids"),
        (dict(stop_ids=[1.5]), TypeError, r"stop_ids must hold token ids"),
        (dict(stop_ids=[10 ** 9]), ValueError, rf"stop id 1000000000 is outside the vocabulary \[0, {vocab}\)"),
        (dict(stop_ids=[-1]), ValueError, r"stop id -1 is outside the vocabulary"),
        (dict(repetition_penalty=float("nan")), ValueError, r"repetition_penalty"),
        (dict(repetition_penalty=0.0), ValueError, r"repetition_penalty"),
        (dict(repetition_penalty="1.1"), ValueError, r"repetition_penalty"),
        (dict(session="abc"), TypeError, r"session must be None or a Session of this model"),
        (dict(max_tokens=3), TypeError, r"max_tokens"),
    ]


def vl_calls(img):
    """Every QwenVL entry point that takes generation options."""
    return [("generate", lambda m, **kw: m.generate(img, "Hi.", **kw)),
            ("generate_ids", lambda m, **kw: m.generate_ids(img, "Hi.", **kw)),
            ("stream", lambda m, **kw: list(m.stream(img, "Hi.", **kw))),
            ("stream_ids", lambda m, **kw: list(m.stream_ids(img, "Hi.", **kw)))]


def test_every_entry_point_refuses_every_bad_option_at_once(no_work, small_img):
    vl = no_work
    bad = vl_bad_options(vl.decoder.max_positions, vl.decoder.vocab_size)
    worst = 0.0
    for name, call in vl_calls(small_img):
        for opts, exc, match in bad:
            try:
                worst = max(worst, refused(lambda: call(vl, **opts), exc, match))
            except AssertionError as e:
                raise AssertionError(f"{name}({opts}): {e}") from None
    refused(lambda: vl.generate(small_img, "Hi.", skip_special_tokens="no", max_new_tokens=1), TypeError,
            "skip_special_tokens must be True or False")
    print(f"[{4 * len(bad) + 1} cases, slowest refusal {worst * 1000:.1f} ms]")


HOSTILE_TEXT = [
    ("hello world " * (MB // 12), ValueError, r"too long: .* at least \d+ tokens, more than the \d+ that fit"),
    ("a" * MB, ValueError, r"too long"),
    ("1" * MB, ValueError, r"too long"),
    ("\u4e2d" * MB, ValueError, r"too long"),
    ("x" + " " * MB + "x", ValueError, r"too long"),
    ("ok \ud800 no", ValueError, r"lone surrogate '\\ud800' \(U\+D800\) at position 3"),
    ("\udcff", ValueError, r"lone surrogate .* at position 0"),
    (b"bytes", TypeError, r"must be a str"),
    (42, TypeError, r"must be a str"),
]


@pytest.mark.parametrize("text,exc,match", HOSTILE_TEXT, ids=[f"text{i}" for i in range(len(HOSTILE_TEXT))])
def test_hostile_text_in_every_text_argument(no_work, small_img, text, exc, match):
    vl = no_work
    img = small_img
    calls = [lambda: vl.generate(img, text, max_new_tokens=2),
             lambda: list(vl.stream(img, text, max_new_tokens=2)),
             lambda: vl.prepare(img, text),
             lambda: vl.generate(img, "Hi.", system=text, max_new_tokens=2),
             lambda: vl.generate(img, "Hi.", prompt=text, max_new_tokens=2)]
    for call in calls:
        refused(call, exc, match)
    refused(lambda: vl.generate(img, None, max_new_tokens=2), TypeError, "text must be a str")


def test_too_long_by_exact_count_is_refused_before_image_work(no_work, small_img):
    vl = no_work
    n = vl.decoder.max_context
    text = "hello world " * n            # under the quick bound, over the limit once tokenized
    assert vl.tokenizer.min_tokens(text) <= n < len(vl.tokenizer.encode(text))
    refused(lambda: vl.generate(small_img, text, max_new_tokens=2), ValueError,
            rf"the prompt is \d+ tokens long before the image is added, more than max_context {n}")


def test_prompt_plus_new_tokens_must_fit_the_positions(vl, small_img):
    n = vl.decoder.max_positions
    with pytest.raises(ValueError, match=rf"exceed the model's {n} positions .*ask for at most \d+ new tokens"):
        vl.generate(small_img, "Hi.", max_new_tokens=n)


def test_load_refuses_bad_options_at_once(ckpt_dir):
    from vlmfo1 import LanguageModel
    limit = 4096                          # the tiny checkpoint's max_position_embeddings
    for bad, exc in [(2 ** 31, ValueError), (10 ** 12, ValueError), (-5, ValueError), (0, ValueError),
                     (limit + 1, ValueError), (1.5, TypeError), (True, TypeError), ("8192", TypeError),
                     (float("nan"), TypeError)]:
        refused(lambda: QwenVL.load(str(ckpt_dir), n_threads=1, max_context=bad), exc,
                rf"max_context must be (an int )?in \[1, {limit}\]")
    # thread counts: never silently the default (0), truncated (1.5), parsed ("2") or a million threads at the first
    # request
    for bad, exc in [(0, ValueError), (-1, ValueError), (257, ValueError), (10 ** 6, ValueError), (1.5, TypeError),
                     ("2", TypeError), (True, TypeError), (float("nan"), TypeError)]:
        for load in (QwenVL.load, LanguageModel.load):
            refused(lambda: load(str(ckpt_dir), n_threads=bad), exc,
                    r"n_threads must be (None or an int )?in \[1, 256\]")
    for kw, match in [(dict(mode="fast"), "mode"), (dict(dtype="int3"), "dtype"), (dict(compute="fp8"), "compute")]:
        refused(lambda: QwenVL.load(str(ckpt_dir), n_threads=1, **kw), ValueError, match)
    assert QwenVL.load(str(ckpt_dir), n_threads=np.int64(1)).decoder.n_threads == 1


def test_sessions_must_belong_to_the_model_and_be_empty(vl, ckpt_dir, small_img):
    from vlmfo1 import LanguageModel
    other = LanguageModel.load(str(ckpt_dir), n_threads=1)   # same shapes: it would run on the wrong weights
    with pytest.raises(TypeError, match="session must be None or a Session of this model"):
        vl.generate(small_img, "Hi.", session=other.session(), max_new_tokens=1)
    s = vl.decoder.session(max_context=64)
    s.prefill([1, 2])
    with pytest.raises(ValueError, match=r"empty \(call reset\(\)\)"):
        vl.generate(small_img, "Hi.", session=s, max_new_tokens=1)
    s.reset()
    ref = vl.generate_ids(small_img, "Hi.", max_new_tokens=3, stop_ids=[])
    assert vl.generate_ids(small_img, "Hi.", session=s, max_new_tokens=3, stop_ids=[]) == ref
    small = vl.decoder.session(max_context=8)
    with pytest.raises(ValueError, match="exceed max_context 8"):
        vl.generate(small_img, "Hi.", session=small, max_new_tokens=1)


def test_empty_text_is_a_plain_image_prompt(vl, small_img):
    """Unlike FO1's task templates, Qwen2.5-VL takes an image with no text (transformers' processor does too)."""
    assert len(vl.generate_ids(small_img, "", max_new_tokens=2, stop_ids=[])) == 2


def test_close_releases_and_later_requests_are_refused(ckpt_dir, small_img):
    import os
    from vlmfo1 import LanguageModel

    def mapped():
        with open("/proc/self/maps") as f:
            return sum(str(ckpt_dir) in line for line in f)
    before = mapped()
    with QwenVL.load(str(ckpt_dir), n_threads=1) as m:
        assert mapped() > before
        assert len(m.generate_ids(small_img, "Hi.", max_new_tokens=1)) == 1
    assert mapped() == before
    for call in (lambda: m.generate(small_img, "Hi.", max_new_tokens=1), lambda: m.prepare(small_img, "Hi."),
                 lambda: m.encode_image(small_img)):
        with pytest.raises(RuntimeError, match="QwenVL model was closed"):
            call()
    m.close()                                                   # idempotent
    lm = LanguageModel.load(str(ckpt_dir), n_threads=1)
    s = lm.session(max_context=16)                              # a live session keeps the weights it uses
    lm.close()
    assert mapped() > before and s.prefill([1, 2]).shape == (lm.vocab_size,)
    del s
    assert mapped() == before
    for call in (lambda: lm.generate([1, 2], max_new_tokens=1), lambda: lm.session(), lambda: lm.embed([1])):
        with pytest.raises(RuntimeError, match="LanguageModel was closed"):
            call()
    assert os.path.isdir(ckpt_dir)
