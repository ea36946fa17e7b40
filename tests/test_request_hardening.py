"""Hostile request values: every bad image/boxes/prompt/generation option is a clear TypeError or ValueError that
names the option, raised in well under a second, before any image or model work; the same at the command line as
one `vlmfo1 CMD: error: ...` line and exit status 1."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VLMFO1_SHARED", ROOT.parent / "shared")) / "data"
if not SHARED.exists():
    SHARED = Path("/work/shared/data")
TIKTOKEN = SHARED / "tokenizer" / "qwen.tiktoken"
DEMO = SHARED / "demo"

pytestmark = pytest.mark.skipif(not TIKTOKEN.exists() or not DEMO.exists(), reason="shared tokenizer/demo data")

FAST = 1.0   # seconds: every refusal must come at once


@pytest.fixture(scope="module")
def ckpt(fo1_tiny_ckpt):
    return fo1_tiny_ckpt             # the session's tiny checkpoint (conftest), written once


@pytest.fixture(scope="module")
def model(ckpt):
    from vlmfo1 import VLMFO1
    m = VLMFO1.from_pretrained(ckpt, threads=2)
    m.tokenizer.min_tokens("warm up")   # the one-off vocabulary scan of the length bound is not a request's cost
    return m


@pytest.fixture(scope="module")
def demo():
    d = json.load(open(DEMO / "demo_boxes.json"))
    return str(DEMO / "demo_image.jpg"), d["boxes"]


@pytest.fixture
def no_image_work(model, monkeypatch):
    """Fail the test if the vision towers or the decoder are reached."""
    def boom(*a, **k):
        raise AssertionError("image/model work was started for a bad request")
    for name in ("encode", "encode_features", "_tokens", "_acquire_session"):
        monkeypatch.setattr(model, name, boom)
    monkeypatch.setattr(model.decoder, "session", boom)
    return model


def refused(fn, exc, match):
    t0 = time.perf_counter()
    with pytest.raises(exc, match=match):
        fn()
    dt = time.perf_counter() - t0
    assert dt < FAST, f"refused after {dt:.2f} s"
    return dt


MB = 2 ** 20
# (option values, exception, message pattern): each applies to every task method
BAD_OPTIONS = [
    (dict(max_new_tokens=10 ** 9), ValueError, r"max_new_tokens must be in \[0, 128000\]"),
    (dict(max_new_tokens=2 ** 31), ValueError, r"max_new_tokens must be in \[0, "),
    (dict(max_new_tokens=10 ** 30), ValueError, r"max_new_tokens must be in \[0, "),
    (dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be in \[0, "),
    (dict(max_new_tokens=5.0), TypeError, r"max_new_tokens must be an int"),
    (dict(max_new_tokens=True), TypeError, r"max_new_tokens must be an int"),
    (dict(max_new_tokens="8"), TypeError, r"max_new_tokens must be an int"),
    (dict(temperature=float("nan")), ValueError, r"temperature must be a finite number"),
    (dict(temperature=float("inf")), ValueError, r"temperature must be a finite number"),
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
    (dict(stop_ids=[10 ** 9]), ValueError, r"stop id 1000000000 is outside the vocabulary \[0, 151936\)"),
    (dict(stop_ids=[-1]), ValueError, r"stop id -1 is outside the vocabulary"),
    (dict(repetition_penalty=float("nan")), ValueError, r"repetition_penalty"),
    (dict(truncate_boxes="yes"), TypeError, r"truncate_boxes must be True or False"),
]


def task_calls(boxes):
    """(name, callable(**options)) for every task method, with valid arguments."""
    return [
        ("detect", lambda m, img, **kw: m.detect(img, ["orange", "apple"], boxes=boxes, **kw)),
        ("detect_coco", lambda m, img, **kw: m.detect_coco(img, boxes=boxes, **kw)),
        ("count", lambda m, img, **kw: m.count(img, "orange", boxes=boxes, **kw)),
        ("refer", lambda m, img, **kw: m.refer(img, "the big orange", boxes=boxes, **kw)),
        ("ground", lambda m, img, **kw: m.ground(img, boxes=boxes, **kw)),
        ("describe_region", lambda m, img, **kw: m.describe_region(img, 1, boxes=boxes, **kw)),
        ("read_region", lambda m, img, **kw: m.read_region(img, [0, 1], boxes=boxes, **kw)),
        ("detect_like", lambda m, img, **kw: m.detect_like(img, 2, boxes=boxes, **kw)),
        ("reason", lambda m, img, **kw: m.reason(img, "Which fruit is ripe?", boxes=boxes, **kw)),
        ("chat", lambda m, img, **kw: m.chat(img, "What is in <region0>?", boxes=boxes, **kw)),
        ("stream", lambda m, img, **kw: list(m.stream("count", img, "orange", boxes=boxes, **kw))),
    ]


def test_every_task_refuses_every_bad_option_at_once(no_image_work, demo):
    from vlmfo1.fo1 import TASKS
    img, boxes = demo
    calls = task_calls(boxes)
    assert {n for n, _ in calls} >= set(TASKS)
    worst = 0.0
    for name, call in calls:
        for opts, exc, match in BAD_OPTIONS:
            try:
                worst = max(worst, refused(lambda: call(no_image_work, img, **opts), exc, match))
            except AssertionError as e:
                raise AssertionError(f"{name}({opts}): {e}") from None
    print(f"[{len(calls) * len(BAD_OPTIONS)} cases, slowest refusal {worst * 1000:.1f} ms]")


HOSTILE_TEXT = [
    ("hello world " * (MB // 12), ValueError, r"too long: .* at least \d+ tokens, more than the 8192"),
    ("a" * MB, ValueError, r"too long"),
    ("1" * MB, ValueError, r"too long"),
    ("\u4e2d" * MB, ValueError, r"too long"),
    ("x" + " " * MB + "x", ValueError, r"too long"),
    ("ok \ud800 no", ValueError, r"lone surrogate '\\ud800' \(U\+D800\) at position 3"),
    ("\udcff", ValueError, r"lone surrogate .* at position 0"),
    (b"bytes", TypeError, r"must be (a )?str"),
    (None, TypeError, r"must be (a )?str"),
    (42, TypeError, r"must be (a )?str"),
    ("   ", ValueError, r"empty"),
]


@pytest.mark.parametrize("text,exc,match", HOSTILE_TEXT, ids=[f"text{i}" for i in range(len(HOSTILE_TEXT))])
def test_hostile_text_in_every_text_argument(no_image_work, demo, text, exc, match):
    img, boxes = demo
    m = no_image_work
    calls = [lambda: m.chat(img, text, boxes=boxes, max_new_tokens=2),
             lambda: m.count(img, text, boxes=boxes, max_new_tokens=2),
             lambda: m.refer(img, text, boxes=boxes, max_new_tokens=2),
             lambda: m.reason(img, text, boxes=boxes, max_new_tokens=2),
             lambda: m.detect(img, ["orange", text], boxes=boxes, max_new_tokens=2)]
    if isinstance(text, str):
        calls.append(lambda: list(m.stream_ids(img, boxes, text, max_new_tokens=2)))
    for call in calls:
        if isinstance(text, str) and not text.strip() and call is calls[-1]:
            continue                     # the low-level stream_ids takes any text, even a blank one
        refused(call, exc, match)


def test_too_long_by_exact_count_is_refused_before_image_work(no_image_work, demo):
    img, boxes = demo
    m = no_image_work
    n = m.decoder.max_context
    text = "hello world " * n            # under the quick bound, over the limit once tokenized
    assert m.tokenizer.min_tokens(text) <= n < len(m.tokenizer.encode(text))
    refused(lambda: m.chat(img, text, boxes=boxes, max_new_tokens=2), ValueError,
            r"the prompt is \d+ tokens long before the image is added, more than max_context 8192")


BAD_BOXES = [
    ([[[[[[0, 0, 1, 1]]]]]] * 1, ValueError, r"shape"),
    ([[0, 0, 1, 1]] * (10 ** 7), ValueError, r"at most 1000000"),
    (np.zeros((10 ** 7, 4)), ValueError, r"at most 1000000"),
    (np.array([[object()] * 4], dtype=object), TypeError, r"not a number"),
    ([[0, 0, 10 ** 400, 1]], ValueError, r"within float64 range"),
    ([[0, 0, 10 ** 5000, 1]], ValueError, r"within float64 range"),
    ([[0, 0, 1j, 1]], TypeError, r"complex"),
    ([[0, 0, float("nan"), 1]], ValueError, r"NaN or infinite"),
    ([[0, 0, 1]], ValueError, r"shape"),
    ("0 0 1 1", TypeError, r"string"),
    ({"bbox": [0, 0, 1, 1]}, TypeError, r"single dict"),
    ([[0, 0, 1, 1]] * 101, ValueError, r"at most 100"),
]


def _deep(n):
    x = [0, 0, 1, 1]
    for _ in range(n):
        x = [x]
    return x


@pytest.mark.filterwarnings("ignore::vlmfo1.proposals.BoxFormatWarning")
@pytest.mark.parametrize("i", range(len(BAD_BOXES) + 2))
def test_as_boxes_and_tasks_refuse_pathological_boxes(no_image_work, demo, i):
    from vlmfo1.proposals import as_boxes
    img, _ = demo
    if i < len(BAD_BOXES):
        boxes, exc, match = BAD_BOXES[i]
    else:                                      # nesting far past NumPy's 64 dimensions / the recursion limit
        boxes, exc, match = _deep([100, 5000][i - len(BAD_BOXES)]), ValueError, r"ragged|nested|shape"
    if i != len(BAD_BOXES) - 1:                # 101 boxes are fine for as_boxes; only the model refuses them
        refused(lambda: as_boxes(boxes), exc, match)
    refused(lambda: no_image_work.detect(img, "orange", boxes=boxes, max_new_tokens=2), exc, match)


def test_load_refuses_bad_max_context_at_once(ckpt):
    from vlmfo1 import VLMFO1, LanguageModel
    for bad, exc in [(2 ** 31, ValueError), (10 ** 12, ValueError), (-5, ValueError), (0, ValueError),
                     (128001, ValueError), (1.5, TypeError), (True, TypeError), ("8192", TypeError),
                     (float("nan"), TypeError)]:
        refused(lambda: VLMFO1.from_pretrained(ckpt, threads=1, max_context=bad), exc,
                r"max_context must be (an int )?in \[1, 128000\]")
        refused(lambda: LanguageModel.load(ckpt, n_threads=1, max_context=bad), exc,
                r"max_context must be (an int )?in \[1, 128000\]")


def test_language_model_generate_refuses_bad_values(model):
    lm = model.decoder
    ok = [1, 2, 3]
    cases = [(dict(max_new_tokens=10 ** 9), ValueError, "max_new_tokens"),
             (dict(max_new_tokens=2 ** 31), ValueError, "max_new_tokens"),
             (dict(max_new_tokens=128000 - 2), ValueError, r"exceed the model's 128000 positions"),
             (dict(temperature=float("nan")), ValueError, "temperature must be a finite"),
             (dict(top_k=float("nan")), TypeError, "top_k"),
             (dict(top_p=float("nan")), ValueError, "top_p"),
             (dict(seed=-2), ValueError, "seed"),
             (dict(stop_ids=[lm.vocab_size]), ValueError, "stop id"),
             (dict(repetition_penalty=-1.0), ValueError, "repetition_penalty")]
    for kw, exc, match in cases:
        refused(lambda: lm.generate(ok, **kw), exc, match)
    for ids, exc, match in [("hello", TypeError, "string"), ([], ValueError, "empty"), ([1.5], TypeError, "integers"),
                            ([[1, 2]], ValueError, "1-D"), ([lm.vocab_size], ValueError, "outside the vocabulary"),
                            ([-1], ValueError, "outside the vocabulary"),
                            (list(range(lm.max_context + 1)), ValueError, "more than max_context")]:
        refused(lambda: lm.generate(ids, max_new_tokens=1), exc, match)
    assert len(lm.generate(ok, max_new_tokens=2, stop_ids=[])) == 2        # still works


def test_tokenizer_refuses_lone_surrogates_and_bounds_lengths(model):
    tok = model.tokenizer
    with pytest.raises(ValueError, match="position 5"):
        tok.encode("hello\udc80")
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(b"x")
    samples = ["", "a", "hello world", "The 2024 report: 12.5% — naïve café\n\n\tend", "\u4e2d\u6587" * 50,
               " " * 1000, "1234567890" * 30, "<|im_start|>user\nhi<|im_end|>", "e\u0301" * 20]
    for s in samples:
        assert tok.min_tokens(s) <= len(tok.encode(s)), s
    t0 = time.perf_counter()
    tok.min_tokens("x" * (16 * MB))
    assert time.perf_counter() - t0 < FAST


def test_good_request_still_runs(model, demo):
    img, boxes = demo
    res = model.count(img, "orange", boxes=boxes, max_new_tokens=2, stop_ids=iter([]), seed=np.int64(3),
                      temperature=np.float32(0.0), top_k=np.int64(0))
    assert len(res.token_ids) == 2


# ---------------------------------------------------------------------------------------------- the CLI

def _nested_boxes(tmp_path, depth):
    p = tmp_path / f"nested{depth}.json"
    p.write_text('{"boxes": ' + "[" * depth + "0" + "]" * depth + "}")
    return str(p)


CLI_BAD = [
    (["--max-new-tokens", "1000000000"], r"max_new_tokens must be in \[0, "),
    (["--max-new-tokens", "-1"], r"max_new_tokens must be in \[0, "),
    (["--max-context", "2147483648"], r"max_context must be in \[1, 128000\]"),
    (["--max-context", "1000000000000"], r"max_context must be in \[1, 128000\]"),
    (["--max-context", "-5"], r"--max-context must be >= 1"),
    (["--max-context", "0"], r"--max-context must be >= 1"),
    (["--temperature", "nan"], r"temperature must be a finite number"),
    (["--temperature", "inf"], r"temperature must be a finite number"),
    (["--top-p", "nan"], r"top_p must be a finite number"),
    (["--top-k", "-3"], r"top_k must be >= 0"),
    (["--seed", "-1"], r"seed must be None or an int >= 0"),
    (["--repetition-penalty", "nan"], r"repetition_penalty"),
    (["--top-k", "nan"], r"invalid int value"),
]


def _run_cli(capsys, argv):
    from vlmfo1.cli import main
    t0 = time.perf_counter()
    rc = main(argv)
    dt = time.perf_counter() - t0
    out, err = capsys.readouterr()
    return rc, err, dt


@pytest.mark.parametrize("extra,match", CLI_BAD, ids=[" ".join(c[0]) for c in CLI_BAD])
def test_cli_bad_options_one_line_exit_1(ckpt, demo, tmp_path, capsys, extra, match):
    import re
    img, boxes = demo
    bfile = tmp_path / "boxes.json"
    bfile.write_text(json.dumps({"boxes": boxes}))
    rc, err, dt = _run_cli(capsys, ["detect", img, "orange", "--model", ckpt, "--boxes", str(bfile), "--threads", "1"]
                           + extra)
    assert rc == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("vlmfo1 detect: error: "), err
    assert re.search(match, err), err
    assert dt < 15.0       # at most a model load (the tiny one loads in well under a second)


@pytest.mark.parametrize("depth", [20, 1000, 100000])
def test_cli_nested_boxes_file(ckpt, demo, tmp_path, capsys, depth):
    img, _ = demo
    rc, err, dt = _run_cli(capsys, ["detect", img, "orange", "--model", ckpt, "--boxes", _nested_boxes(tmp_path, depth)])
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"JSON nested {depth + 1} levels deep" in err and dt < FAST


def test_read_boxes_file_nesting_is_a_value_error(tmp_path):
    from vlmfo1.cli import read_boxes_file
    with pytest.raises(ValueError, match="nested 3001 levels deep"):
        read_boxes_file(_nested_boxes(tmp_path, 3000))
    p = tmp_path / "brackets_in_strings.json"
    p.write_text(json.dumps({"note": "[[[[[[[[[[[[[[", "boxes": [[0, 0, 1, 1]]}))
    assert read_boxes_file(str(p))[0] == [[0, 0, 1, 1]]
    p = tmp_path / "bad_utf8.json"
    p.write_bytes(b'{"boxes": "\xff"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_boxes_file(str(p))


def test_cli_long_and_surrogate_prompts(ckpt, demo, capsys):
    img, _ = demo
    for text, match in [("a " * 300000, "tokens long"), ("a" * MB, "too long"), ("bad \udc80 text", "lone surrogate")]:
        rc, err, dt = _run_cli(capsys, ["chat", img, text, "--model", ckpt, "--threads", "1"])
        assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and match in err, err
        assert dt < 15.0    # a model load at most: no image or model work
