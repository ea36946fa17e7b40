#!/usr/bin/env python3
"""Golden ids of transformers' SLOW Qwen2Tokenizer (use_fast=False, as the official VLM-FO1 loader uses) for many
strings: slow_tokenizer_golden.json (ERRATA E6).

The tokenizer folder is written by `vlmfo1.testing.fo1.write_fo1_tokenizer` (the shipped Qwen2 vocabulary
shared/data/tokenizer/qwen.tiktoken, Qwen2.5's added tokens, FO1's <regionI>/<ground>/... tokens). transformers 5
has no slow Qwen2Tokenizer any more, so this runs in the reference environment of tests/golden/README.md
(transformers 4.50.1):

    /tmp/fo1ref/bin/python tests/golden/make_slow_tokenizer_golden.py --out tests/golden/

The strings are built here (deterministic, seed 0): combining marks right before / after added tokens (the case
where the slow tokenizer's whole-text NFC makes an added token disappear), region tokens, NFC-changing texts,
ordinary text, and random mixes of those pieces. The fast tokenizer's ids (transformers 4.50.1, use_fast=True) are
stored too, so the file also shows where the two differ.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from vlmfo1.testing.fo1 import write_fo1_tokenizer  # noqa: E402

ADDED = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|vision_start|>", "<|image_pad|>", "<region3>",
         "<region12>", "<region99>", "<ground>", "</ground>", "<objects>", "</objects>", "<tool_call>", "<think>"]
MARKS = ["\u0338", "\u0301", "\u0300", "\u0308", "\u0327", "\u0323", "\u0302", "\u20d2", "\u3099", "\u0345"]
NFC_TEXTS = ["e\u0301", "Ame\u0301lie a\u0300 cafe\u0301", "\u212b ngstr\u00f6m", "\u1100\u1161\u11a8 \u1112\u1161\u11ab",
             "\u2126 ohm \u212a kelvin", "=\u0338 <\u0338 >\u0338", "\u304b\u3099\u306f\u309a", "\u0041\u030a\u0301",
             "\u1e9b\u0323", "q\u0307\u0323", "\u0958\u0959 \u09dc", "\uf900\uf901", "\u00c5\u0301", "o\u0328\u0304"]
ORDINARY = ["Hello world", " Hello world", "The quick brown fox jumps over the lazy dog.", "1234567890 3.14159",
            "don't I'LL we'Ve", "\r\n\r\n\t \u00a0 x", "  leading   spaces  ", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
            "\u03a9\u03bc\u03ad\u03b3\u03b1", "\u0645\u0631\u062d\u0628\u0627", "\U0001f44d\U0001f3fd emoji",
            "Detect person, car, dog in the image.", "<region0><region1> are two cats"]


def strings():
    out = []
    for a in ADDED:
        for m in MARKS:
            out += [a + m, m + a, "x" + a + m + "y", a + m + a, a + " " + m]
    for a in ADDED:
        out += [a, "a" + a + "b", a + a, " " + a + " ", a + "\n", "<" + a + ">", a[:-1], a + ">"]
    out += NFC_TEXTS + ORDINARY
    out += [t + a for t in NFC_TEXTS for a in ("<|im_end|>", "<region3>")]
    out += [a + t for t in NFC_TEXTS for a in ("<|im_end|>", "<region3>")]
    out += ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe <region3>.<|im_end|>\n",
            "<ground>person</ground><objects><region0><region5></objects>\u0338",
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>caf\u0065\u0301<|im_end|>\n"]
    rng = random.Random(0)
    pieces = ADDED + MARKS + NFC_TEXTS + ORDINARY + [" ", "\n", ">", "<", "e", "a"]
    for _ in range(200):
        out.append("".join(rng.choice(pieces) for _ in range(rng.randint(2, 8))))
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args()
    import transformers
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as d:
        write_fo1_tokenizer(d)
        slow = AutoTokenizer.from_pretrained(d, use_fast=False)
        fast = AutoTokenizer.from_pretrained(d, use_fast=True)
        assert type(slow).__name__ == "Qwen2Tokenizer", type(slow)
        assert type(fast).__name__ == "Qwen2TokenizerFast", type(fast)
        cases = []
        for s in strings():
            cases.append({"text": s, "slow": slow(s, add_special_tokens=False)["input_ids"],
                          "fast": fast(s, add_special_tokens=False)["input_ids"],
                          "nfc_changes": unicodedata.normalize("NFC", s) != s})
    n_diff = sum(c["slow"] != c["fast"] for c in cases)
    res = {"made_by": "tests/golden/make_slow_tokenizer_golden.py", "transformers": transformers.__version__,
           "tokenizer": "vlmfo1.testing.fo1.write_fo1_tokenizer (qwen.tiktoken + Qwen2.5 + FO1 added tokens)",
           "n_cases": len(cases), "n_slow_fast_differ": n_diff, "cases": cases}
    out = Path(args.out) / "slow_tokenizer_golden.json"
    out.write_text(json.dumps(res, ensure_ascii=False, indent=0))
    print(f"wrote {out}: {len(cases)} strings, slow != fast on {n_diff}")


if __name__ == "__main__":
    main()
