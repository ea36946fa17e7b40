"""Tests for vlmfo1.tokenizer (Qwen2 byte-level BPE, slow-Qwen2Tokenizer semantics).

Uses ../shared/data/tokenizer/{qwen.tiktoken, qwen2_cases.inp, qwen2_cases.out} (skipped if absent).
Cross-checks against transformers (if importable) and against a small pure-Python re-implementation of the slow
transformers-v4 `Qwen2Tokenizer` algorithm (transformers v5 no longer ships a slow Qwen2 tokenizer).
"""

import json
import random
import time
import unicodedata
from pathlib import Path

import pytest

from vlmfo1.tokenizer import (
    QWEN2_ADDED_TOKENS,
    AddedTokenSpec,
    IncrementalDecoder,
    Tokenizer,
    bytes_to_token,
    chatml,
)

SEP = "\n__ggml_vocab_test__\n"

EXTRA = [f"<region{i}>" for i in range(100)] + ["<ground>", "</ground>", "<objects>", "</objects>"]

# non-ASCII / NFC / special-token strings used in the cross-checks
EXTRA_STRINGS = [
    "e\u0301", "Ame\u0301lie a\u0300 cafe\u0301", "\u212b ngstr\u00f6m", "\u1100\u1161\u11a8 \ud55c\uad6d\uc5b4",
    "日本語のテキスト、句読点。", "Ωμέγα ελληνικά", "مرحبا بالعالم", "नमस्ते दुनिया",
    "ﬁ ligature ①②", "👍🏽👨‍👩‍👧 emoji",
    "1234567890 3.14159", "don't I'LL we'Ve", "\r\n\r\n\t \u00a0 x", "  leading   spaces  ",
    "<|im_start|>e\u0301<|im_end|>", "<region12>x<region1><region99>", "a<|endoftext|>b<|vision_start|>",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe <region3>.<|im_end|>\n",
    "<ground>person</ground><objects><region0><region5></objects>", "<tool_call>{}</tool_call><|fim_pad|>",
]


def shared_data(*parts) -> Path:
    """Path inside the shared test data folder (../shared/data next to the repo); skips the test if absent."""
    p = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").joinpath(*parts).resolve()
    if not p.exists():
        pytest.skip(f"shared test data not found: {p}")
    return p


def load_cases():
    inp = shared_data("tokenizer", "qwen2_cases.inp").read_text(encoding="utf-8")
    out = shared_data("tokenizer", "qwen2_cases.out").read_text(encoding="utf-8")
    texts = inp.split(SEP)
    assert texts[-1] == "", "inp file must end with the separator"
    texts = texts[:-1]
    lines = out.split("\n")
    assert len(lines) >= len(texts)
    return [(t, [int(v) for v in line.split()]) for t, line in zip(texts, lines)]


LOAD_SECONDS = {}


@pytest.fixture(scope="module")
def tok():
    path = shared_data("tokenizer", "qwen.tiktoken")
    t0 = time.process_time()  # CPU time: robust to a busy machine
    t = Tokenizer.from_tiktoken(path, extra_tokens=EXTRA)
    LOAD_SECONDS["from_tiktoken"] = time.process_time() - t0
    return t


@pytest.fixture(scope="module")
def cases():
    return load_cases()


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_tok")
    tok.save(d)
    return d


# ----------------------------------------------------------------------------------------------------------------
# reference vectors


def test_cases_count(cases):
    assert len(cases) == 46


def test_cases_match(tok, cases):
    bad = [(text, tok.encode(text), ids) for text, ids in cases if tok.encode(text) != ids]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]!r}"


def test_cases_roundtrip(tok, cases):
    for text, ids in cases:
        assert tok.decode(ids) == text


def test_load_time(tok):
    dt = LOAD_SECONDS["from_tiktoken"]  # measured by the fixture (~1.8 s CPU, of which merge derivation ~1 s)
    assert dt < 6.0, f"from_tiktoken took {dt:.2f} s of CPU time"


def test_vocab_and_specials(tok):
    for content, idx, special in QWEN2_ADDED_TOKENS:
        assert tok.token_to_id(content) == idx
        assert tok.id_to_token(idx) == content
        assert (idx in tok.special_ids) == special
    assert tok.base_vocab_size == 151643
    assert tok.vocab_size == 151665 + len(EXTRA)
    assert len(tok) == tok.vocab_size
    assert tok.im_start_id == 151644 and tok.im_end_id == 151645
    assert tok.eos_id == 151645 and tok.pad_id == 151643 and tok.endoftext_id == 151643
    assert tok.id_to_token(1879) == "Ġworld" and tok.token_to_id("Ġworld") == 1879
    assert tok.token_to_id("<nope>") is None and tok.id_to_token(10**7) is None


def test_stock_ids(tok):
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert tok.encode("system\nYou are a helpful assistant.") == [8948, 198, 2610, 525, 264, 10950, 17847, 13]
    assert tok.encode("assistant\n") == [77091, 198]
    assert tok.encode("\n") == [198]
    assert tok.encode("") == []
    assert tok.encode("Hello world") == [9707, 1879] and tok.encode(" Hello world") == [21927, 1879]


def test_nfc(tok):
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    assert tok.encode("Ame\u0301lie") == tok.encode("Amélie")
    assert tok.encode("\u212b") == tok.encode("\u00c5")
    assert tok.decode(tok.encode("e\u0301")) == "\u00e9"


def test_added_tokens_split(tok):
    r12 = tok.token_to_id("<region12>")
    assert r12 is not None and r12 >= 151665
    assert tok.encode("<region12>") == [r12]
    assert tok.encode("<region1>") == [tok.token_to_id("<region1>")]
    ids = tok.encode("a<region12>b")
    assert ids == tok.encode("a") + [r12] + tok.encode("b")
    # FO1's expected output format decodes back exactly (no spaces between added tokens)
    s = "<ground>person</ground><objects><region0><region5></objects>"
    assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(s)) == 7  # <ground> person </ground> <objects> <region0> <region5> </objects>


def test_decode_skip_special(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><tool_call><region3>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi<tool_call>"
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|><tool_call><region3>"


def test_add_tokens_runtime(tok, saved):
    t = Tokenizer.from_pretrained(saved)
    n0 = t.vocab_size
    assert t.add_tokens(["<think>", "</think>", "<region0>"]) == 2
    assert t.token_to_id("<think>") == n0 and t.token_to_id("</think>") == n0 + 1
    assert t.encode("<think>hi</think>") == [n0, 6023, n0 + 1]


def test_incremental_decoder(tok):
    rng = random.Random(0)
    texts = ["héllo wörld 日本語 👍🏽 <|im_end|>done", "<region3>中文<ground>é</ground>"] + EXTRA_STRINGS
    for text in texts:
        ids = tok.encode(text)
        dec = IncrementalDecoder(tok)
        pieces = [dec.feed(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == tok.decode(ids)
        for p in pieces:
            assert "\ufffd" not in p  # never a broken char for valid text
        assert "".join(tok.incremental_decoder()(ids)) == tok.decode(ids)
    # byte tokens that split one 4-byte char: nothing is emitted until the char is complete
    ids = [tok.token_to_id(bytes_to_token(bytes([b]))) for b in "👍".encode("utf-8")]
    dec = tok.incremental_decoder()
    assert [dec.feed(i) for i in ids] == ["", "", "", "👍"]
    # random ids (invalid UTF-8 runs): streaming equals batch decode
    for _ in range(20):
        ids = [rng.randrange(0, tok.vocab_size) for _ in range(30)]
        dec = tok.incremental_decoder(skip_special_tokens=True)
        assert "".join(dec(ids)) == tok.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# save / load


def test_save_files(saved):
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (saved / name).is_file()
    cfg = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["model_max_length"] == 131072 and cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["added_tokens_decoder"]["151644"]["content"] == "<|im_start|>"
    assert cfg["added_tokens_decoder"]["151657"]["special"] is False
    merges = (saved / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and len(merges) == 151387 + 2


def test_save_roundtrip(tok, saved, cases):
    t2 = Tokenizer.from_pretrained(saved)
    assert t2.get_vocab() == tok.get_vocab()
    assert t2.special_ids == tok.special_ids
    for text in [c[0] for c in cases] + EXTRA_STRINGS:
        assert t2.encode(text) == tok.encode(text)


def test_from_tokenizer_json_only(tok, saved, tmp_path, cases):
    d = tmp_path / "tj_only"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((saved / "tokenizer.json").read_bytes())
    t2 = Tokenizer.from_pretrained(d)
    assert t2.get_vocab() == tok.get_vocab()
    for text in [c[0] for c in cases] + EXTRA_STRINGS:
        assert t2.encode(text) == tok.encode(text)


def test_vocab_merges_with_added_tokens_json(tok, saved, tmp_path):
    d = tmp_path / "slow_files"
    d.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (d / name).write_bytes((saved / name).read_bytes())
    (d / "added_tokens.json").write_text(json.dumps(tok.added_tokens), encoding="utf-8")
    t2 = Tokenizer.from_pretrained(d)
    assert t2.get_vocab() == tok.get_vocab()
    assert t2.encode(EXTRA_STRINGS[-3]) == tok.encode(EXTRA_STRINGS[-3])


def tiny_tokenizer(**kw):
    vocab = {bytes_to_token(bytes([b])): b for b in range(256)}
    vocab.update({"Ġ" + "t": 256, "he": 257, "Ġthe": 258})
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    return Tokenizer(vocab, merges, [AddedTokenSpec("<|endoftext|>", 300), AddedTokenSpec("<x>", 1000, False)], **kw)


def test_noncontiguous_added_ids(tmp_path):
    t = tiny_tokenizer(eos_token="<|endoftext|>")
    assert t.encode("a the<x>") == [97, 258, 1000]
    assert t.encode("<|endoftext|>") == [300] and t.eos_id == 300
    assert t.decode([97, 258, 1000, 300], skip_special_tokens=True) == "a the<x>"
    t.save(tmp_path)
    t2 = Tokenizer.from_pretrained(tmp_path)
    assert t2.get_vocab() == t.get_vocab() and t2.encode("a the<x>") == [97, 258, 1000]
    assert t2.special_ids == {300}


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        Tokenizer.from_pretrained(tmp_path)
    tiny_tokenizer().save(tmp_path / "ok")
    d = tmp_path / "ok"
    (d / "merges.txt").rename(d / "merges.bak")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_pretrained(d)
    (d / "merges.txt").write_text("#version: 0.2\nĠ t\nbroken_line_without_space\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt"):
        Tokenizer.from_pretrained(d)
    (d / "merges.bak").rename(d / "merges.txt")
    (d / "vocab.json").write_text('{"a": 1,', encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer.from_pretrained(d)
    (d / "vocab.json").unlink()
    (d / "merges.txt").unlink()  # falls back to tokenizer.json
    assert Tokenizer.from_pretrained(d).encode("a the") == [97, 258]
    (d / "tokenizer.json").write_text("not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        Tokenizer.from_tiktoken(tmp_path / "missing.tiktoken")
    (tmp_path / "bad.tiktoken").write_text("IQ== 0\n!!! 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.tiktoken"):
        Tokenizer.from_tiktoken(tmp_path / "bad.tiktoken")


# ----------------------------------------------------------------------------------------------------------------
# ChatML


def test_chatml():
    assert chatml([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert chatml([{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}], add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n")
    assert chatml([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n")


def test_chat_ids(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,
                   151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198]


# ----------------------------------------------------------------------------------------------------------------
# cross-checks


def slow_reference(folder: Path):
    """Pure-Python port of the slow (transformers v4) Qwen2Tokenizer algorithm, reading vocab.json + merges.txt +
    tokenizer_config.json: NFC the whole text, split out added tokens (leftmost-longest), regex pre-tokenize,
    GPT-2 byte-level BPE."""
    regex = pytest.importorskip("regex")
    from vlmfo1.tokenizer import BYTE_ENCODER, PRETOKENIZE_REGEX

    encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    ranks = {}
    for i, line in enumerate((folder / "merges.txt").read_text(encoding="utf-8").split("\n")):
        if line and not line.startswith("#version"):
            ranks[tuple(line.split(" "))] = i
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
    pat = regex.compile(PRETOKENIZE_REGEX)
    split_pat = regex.compile("(" + "|".join(regex.escape(a) for a in sorted(added, key=len, reverse=True)) + ")")

    def bpe(word):
        word = list(word)
        while len(word) > 1:
            pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            r, _ = min(pairs)
            if r == float("inf"):
                break
            first, second = next((word[i], word[i + 1]) for rr, i in pairs if rr == r)
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = new
        return word

    def encode(text):
        text = unicodedata.normalize("NFC", text)
        ids = []
        for chunk in split_pat.split(text):
            if chunk in added:
                ids.append(added[chunk])
                continue
            for piece in pat.findall(chunk):
                ids.extend(encoder[t] for t in bpe("".join(BYTE_ENCODER[b] for b in piece.encode("utf-8"))))
        return ids

    return encode


def test_slow_reference_port(tok, saved, cases):
    ref = slow_reference(saved)
    for text in [c[0] for c in cases] + EXTRA_STRINGS:
        assert tok.encode(text) == ref(text), repr(text)


@pytest.mark.parametrize("use_fast", [False, True])
def test_transformers_autotokenizer(tok, saved, cases, use_fast):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    ht = transformers.AutoTokenizer.from_pretrained(str(saved), use_fast=use_fast)
    assert type(ht).__name__.startswith("Qwen2Tokenizer")
    assert len(ht) == tok.vocab_size
    assert ht.eos_token == "<|im_end|>" and ht.pad_token == "<|endoftext|>"
    for text in [c[0] for c in cases] + EXTRA_STRINGS:
        ids = ht(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text), repr(text)
        assert ht.decode(ids) == tok.decode(ids), repr(text)
        assert ht.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True), repr(text)
    convs = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe <region2>."},
         {"role": "assistant", "content": "<ground>cat</ground>"}, {"role": "user", "content": "e\u0301?"}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    ]
    for msgs in convs:
        for gen in (True, False):
            ref = ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert chatml(msgs, add_generation_prompt=gen) == ref


# ----------------------------------------------------------------------------------------------------------------
# slow (FO1) vs fast (Qwen2 / Qwen2.5-VL) NFC order, ERRATA E6


GOLDEN_SLOW = Path(__file__).resolve().parent / "golden" / "slow_tokenizer_golden.json"


@pytest.fixture(scope="module")
def fo1_tok_dir(tmp_path_factory):
    shared_data("tokenizer", "qwen.tiktoken")
    from vlmfo1.testing.fo1 import write_fo1_tokenizer
    d = tmp_path_factory.mktemp("fo1_tok")
    write_fo1_tokenizer(str(d))
    return d


@pytest.fixture(scope="module")
def slow_golden():
    return json.loads(GOLDEN_SLOW.read_text(encoding="utf-8"))


def test_slow_option_issue_example(fo1_tok_dir):
    slow = Tokenizer.from_pretrained(fo1_tok_dir, slow=True)
    fast = Tokenizer.from_pretrained(fo1_tok_dir)
    assert slow.slow and not fast.slow
    assert slow.encode("<|im_end|>\u0338") == [27, 91, 318, 6213, 91, 58994, 107]
    assert fast.encode("<|im_end|>\u0338") == [151645, 136, 116]
    assert slow.encode_batch(["<|im_end|>\u0338"]) == [slow.encode("<|im_end|>\u0338")]
    assert slow.tokenize("<region3>\u0338")[0] == "<"
    t = slow.add_tokens(["<zz>"]) and slow.encode("<zz>\u0338")  # the option survives a rebuild
    assert slow.token_to_id("<zz>") not in t


def test_slow_golden_transformers_4_50(fo1_tok_dir, slow_golden):
    """Every string of the golden file: slow=True == transformers 4.50.1's slow Qwen2Tokenizer, slow=False == its
    fast Qwen2TokenizerFast (ids made by tests/golden/make_slow_tokenizer_golden.py)."""
    assert slow_golden["transformers"] == "4.50.1" and slow_golden["n_cases"] > 1000
    assert slow_golden["n_slow_fast_differ"] >= 40   # the file exercises the difference
    slow = Tokenizer.from_pretrained(fo1_tok_dir, slow=True)
    fast = Tokenizer.from_pretrained(fo1_tok_dir)
    bad_slow = [c["text"] for c in slow_golden["cases"] if slow.encode(c["text"]) != c["slow"]]
    bad_fast = [c["text"] for c in slow_golden["cases"] if fast.encode(c["text"]) != c["fast"]]
    assert not bad_slow, f"{len(bad_slow)} slow mismatches, first {bad_slow[0]!r}"
    assert not bad_fast, f"{len(bad_fast)} fast mismatches, first {bad_fast[0]!r}"
    for c in slow_golden["cases"][:200]:
        assert slow.decode(c["slow"]) == unicodedata.normalize("NFC", c["text"])


def test_slow_golden_python_port(fo1_tok_dir, slow_golden):
    ref = slow_reference(Path(fo1_tok_dir))
    slow = Tokenizer.from_pretrained(fo1_tok_dir, slow=True)
    for c in slow_golden["cases"]:
        assert ref(c["text"]) == c["slow"] == slow.encode(c["text"]), repr(c["text"])


def test_fast_vs_transformers_current(fo1_tok_dir, slow_golden):
    """slow=False == the installed transformers' AutoTokenizer (the fast one: what stock Qwen2.5-VL uses)."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    ht = transformers.AutoTokenizer.from_pretrained(str(fo1_tok_dir))
    fast = Tokenizer.from_pretrained(fo1_tok_dir)
    for c in slow_golden["cases"]:
        assert fast.encode(c["text"]) == ht(c["text"], add_special_tokens=False)["input_ids"], repr(c["text"])
