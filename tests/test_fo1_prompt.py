"""VLM-FO1 prompt token ids (official chunked tokenization) and answer parsing."""
import warnings
from pathlib import Path

import numpy as np
import pytest

from vlmfo1.fo1_prompt import (IMAGE_INDEX, REGION_INDEX, OD_TEMPLATE, check_boxes, parse_answer, prompt_ids,
                               user_text)

TIKTOKEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizer" / "qwen.tiktoken"
FO1_TOKENS = [f"<region{i}>" for i in range(100)] + ["<ground>", "</ground>", "<objects>", "</objects>"]


@pytest.fixture(scope="module")
def tok():
    if not TIKTOKEN.exists():
        pytest.skip("shared tokenizer data not found")
    from vlmfo1.tokenizer import Tokenizer
    return Tokenizer.from_tiktoken(str(TIKTOKEN), extra_tokens=FO1_TOKENS)


def test_prompt_layout(tok):
    ids, text = prompt_ids(tok, OD_TEMPLATE.format("orange"), 3)
    # the stock system turn and assistant header (spec §1.6)
    assert ids[:11] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert ids[-3:] == [151644, 77091, 198]
    assert ids.count(IMAGE_INDEX) == 1 and ids.count(REGION_INDEX) == 3
    r0, r1, r2 = (tok.token_to_id(f"<region{i}>") for i in range(3))
    i = ids.index(IMAGE_INDEX)
    assert ids[i - 1] == 151652 and ids[i + 1] == 151653          # <|vision_start|> -200 <|vision_end|>
    j = ids.index(REGION_INDEX)
    assert ids[j - 1] == r0 and ids[j + 1] == r1 and ids[j + 2] == REGION_INDEX and ids[j + 3] == r2
    # each chunk tokenized separately: "\n" + text + <|im_end|>\n after the last region feature
    k = len(ids) - 1 - ids[::-1].index(REGION_INDEX)
    assert ids[k + 1:-3] == tok.encode("\n" + OD_TEMPLATE.format("orange") + "<|im_end|>\n")
    assert text.startswith("<|im_start|>system\n") and "<region2><regionfeat>\n" in text


def test_system_rule_and_no_boxes(tok):
    ids, text = prompt_ids(tok, "Is this a system diagram?", 0)
    assert ids[0] == 151644 and ids[1:3] == tok.encode("user\n")   # no system turn: "system" occurs in the text
    assert REGION_INDEX not in ids and user_text(0, "x") == "<|im_start|>user\n<|vision_start|><image><|vision_end|>\nx<|im_end|>\n"


def test_parse_answer():
    boxes = [[0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4]]
    r = parse_answer("<ground>cat</ground><objects><region2><region0><region2></objects>"
                     "<ground>dog</ground><objects><region1></objects>", boxes)
    assert [(d.label, d.index) for d in r.detections] == [("cat", 2), ("cat", 0), ("dog", 1)]
    assert r.by_label()["cat"] == [(1.0, 2.0, 3.0, 4.0), (0.0, 0.0, 10.0, 10.0)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = parse_answer("<ground>cat</ground><objects><region7><region1></objects>", boxes)
    assert r.invalid_indices == [7] and [d.index for d in r.detections] == [1] and w
    d = r.to_dict()
    assert {k: d[k] for k in ("text", "detections", "token_ids", "invalid_indices", "proposals")} == {
        "text": "<ground>cat</ground><objects><region7><region1></objects>",
        "detections": [{"label": "cat", "index": 1, "box": [5.0, 5.0, 20.0, 20.0], "score": None}],
        "token_ids": [], "invalid_indices": [7], "proposals": [[float(v) for v in b] for b in boxes]}
    r = parse_answer("<ground>cat</ground><objects><region1></objects>", boxes, scores=[0.9, 0.8, 0.7])
    assert r.detections[0].score == 0.8 and r.scores.tolist() == [0.8]
    assert parse_answer("no objects here", boxes).detections == []


def test_check_boxes():
    assert check_boxes([]).shape == (0, 4)
    with pytest.raises(ValueError, match="NaN"):
        check_boxes([[0, 0, 1, np.nan]])
    with pytest.raises(ValueError, match="infinite"):
        check_boxes([[0, 0, 1, np.inf]])
    with pytest.raises(ValueError, match="shape"):
        check_boxes([[0, 0, 1]])
    many = np.tile([0, 0, 10, 10], (101, 1))
    with pytest.raises(ValueError, match="at most 100"):
        check_boxes(many)
    with pytest.warns(RuntimeWarning):
        assert check_boxes(many, truncate=True).shape == (100, 4)
    inv = check_boxes([[10, 10, 0, 0], [5, 5, 5, 5], [-50, -50, 1e5, 1e5]])   # accepted as the reference does
    assert inv.shape == (3, 4)


def test_draw_detections():
    img = np.full((120, 160, 3), 255, np.uint8)
    r = parse_answer("<ground>cat</ground><objects><region1></objects><ground>dog</ground><objects><region0>"
                     "</objects>", [[10, 60, 50, 110], [80, 50, 150, 100]])
    im = r.draw(img, width=2)
    a = np.asarray(im)
    assert im.size == (160, 120) and a.shape == (120, 160, 3)
    assert (a[100, 80] != 255).any() and (a[100, 149] != 255).any()      # left and right edges of region 1
    assert tuple(a[100, 80]) != tuple(a[108, 10])                        # one colour per label
    assert (a[75, 115] == 255).all()                                     # the inside stays untouched
    assert (img == 255).all()                                            # the input is not modified
    assert parse_answer("nothing", []).draw(img).size == (160, 120)
