"""The JSON nesting pre-check (vlmfo1.jsonsafe) every bounded reader uses: equal to a plain state machine on random
texts (also across chunk boundaries), and linear on inputs that make a regex string matcher quadratic."""
import json
import random
import time

import pytest

import vlmfo1.jsonsafe as js
from vlmfo1.jsonsafe import nesting_depth


def reference(t):
    """A quote delimits a string unless an odd run of backslashes precedes it; brackets count outside strings."""
    d = best = 0
    inside = False
    run = 0
    for ch in t:
        if ch == '"' and run % 2 == 0:
            inside = not inside
        elif not inside and ch in "[{":
            d += 1
            best = max(best, d)
        elif not inside and ch in "]}":
            d -= 1
        run = run + 1 if ch == "\\" else 0
    return best


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_equals_the_state_machine(monkeypatch, chunk):
    monkeypatch.setattr(js, "_CHUNK", chunk)
    rng = random.Random(0)
    alpha = ['[', ']', '{', '}', '"', '\\', 'a', ',', ':', 'é']
    for _ in range(3000):
        t = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 60)))
        assert nesting_depth(t) == reference(t), t
    for obj in ({"a": [1, {"b": "x]]\"[["}]}, [[[[]]]], "s", {"k\\": ["\\\\", "\"{"]}, 3, []):
        t = json.dumps(obj)
        assert nesting_depth(t) == reference(t)
        assert nesting_depth(t.encode()) == nesting_depth(t)


def test_linear_on_hostile_texts(tmp_path):
    """`"\\"\\"\\"...` (1 MB) made the earlier regex scanners quadratic (12 s at 64 KB); every reader refuses or
    parses such files at once."""
    from vlmfo1.cli import read_boxes_file
    from vlmfo1.config_check import parse_config_json
    hostile = b'"' + b'\\"' * 500_000
    t0 = time.perf_counter()
    assert nesting_depth(hostile) == 0 and nesting_depth(b"[" * 10**6) == 10**6
    assert time.perf_counter() - t0 < 2.0
    for text in (hostile, b"[" + hostile + b"]", b"[" * 100 + hostile):
        p = tmp_path / "boxes.json"
        p.write_bytes(text)
        t0 = time.perf_counter()
        with pytest.raises(ValueError):
            read_boxes_file(p)
        with pytest.raises(ValueError):
            parse_config_json(text)
        assert time.perf_counter() - t0 < 2.0
