"""Prefix caching (vlmfo1/context.py): `ctx = model.encode(image, boxes)` then any task on ctx gives the same bits
as the one-call task method, for every task, in any order, from several threads, from the image cache; the
snapshot restores the KV cache exactly; a conversation keeps its KV cache between turns.

On a tiny random FO1 checkpoint (bf16 as written, and converted to fp32 so the OpenBLAS path is covered), real COCO
images with their ground-truth boxes as proposals. stop_ids=[] makes every answer max_new_tokens long."""
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
from test_fo1_model import coco_case  # noqa: E402  (a COCO image and its ground-truth boxes)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TIKTOKEN = SHARED / "tokenizer" / "qwen.tiktoken"
COCO = SHARED / "coco_tiny"

pytestmark = pytest.mark.skipif(not TIKTOKEN.exists() or not COCO.exists(), reason="shared data not found")

N = 6   # new tokens per answer


# every task with its arguments (the image and boxes come from the case)
TASKS = [("detect", (["person", "dog"],), {}), ("detect_coco", (), {}), ("count", ("person",), {}),
         ("refer", ("the man on the left",), {}), ("ground", (), {}), ("describe_region", (0,), {}),
         ("describe_region", ([0, 1],), {"detailed": True}), ("read_region", (1,), {}),
         ("detect_like", (0,), {}), ("reason", ("What is <region0> doing?",), {}),
         ("chat", ("Is <region1> bigger than <region0>?",), {}),
         ("chat", ("Describe the system shown here.",), {})]   # "system" drops the system turn: no shared prefix


@pytest.fixture(scope="module")
def fo1(fo1_tiny_ckpt):
    from vlmfo1 import VLMFO1
    m = VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2)     # bf16 weights, as written
    yield m
    m.close()


@pytest.fixture(scope="module")
def fo1_fp32(fo1_tiny_ckpt):
    from vlmfo1 import VLMFO1
    m = VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2, dtype="float32")
    yield m
    m.close()


@pytest.fixture(params=["bf16", "fp32"])
def both(request, fo1, fo1_fp32):
    return fo1 if request.param == "bf16" else fo1_fp32


@pytest.fixture(scope="module")
def case():
    img, boxes = coco_case(1)
    assert len(boxes) >= 2
    return img, boxes


def _call(target, task, args, kw, **opts):
    return getattr(target, task)(*args, **kw, max_new_tokens=N, stop_ids=[], **opts)


def test_every_task_bit_identical_to_the_one_call_method(both, case):
    fo1 = both
    img, boxes = case
    ctx = fo1.encode(img, boxes=boxes)
    assert ctx.prefix_tokens > len(ctx.image_tokens) + len(boxes)
    fresh = [_call(fo1, t, (img,) + a, dict(kw, boxes=boxes)) for t, a, kw in TASKS]
    # on the encoded image, in reverse order (each task starts from the same snapshot, whatever ran before)
    cached = [_call(ctx, t, a, kw) for t, a, kw in TASKS[::-1]][::-1]
    for (t, _, _), f, c in zip(TASKS, fresh, cached):
        assert c.token_ids == f.token_ids, t
        assert c.text == f.text and c.prompt == f.prompt and c.task == f.task, t
        assert [d.box for d in c.detections] == [d.box for d in f.detections], t
        assert len(f.token_ids) == N
        assert c.timings["vit"] == c.timings["davit"] == c.timings["hfre"] == 0.0
        assert f.timings["vit"] > 0.0


def test_logits_bit_identical_and_snapshot_exact(both, case):
    fo1 = both
    """The prefill logits of a task on the snapshot equal those of the same request computed from nothing, and the
    snapshot holds exactly the KV rows a fresh prefix prefill computes."""
    from vlmfo1.context import EncodedImage, prefix_length
    img, boxes = case
    ctx = fo1.encode(img, boxes=boxes)
    bare = EncodedImage(fo1, ctx.image, ctx.source, ctx.boxes, None, ctx.image_tokens, ctx.grid_hw, ctx.regions, {})
    for text in ["Please detect dog in this image.", "x", "Provide a brief description for <region1>."]:
        ids, _ = fo1._prompt(text, len(boxes))
        with fo1._session(1) as s1:
            full1, lg1 = ctx._start(s1, ids)
            n1 = s1.n_past
        with fo1._session(1) as s2:
            full2, lg2 = bare._start(s2, ids)
            k = prefix_length(ids)
            P = len(full2) - (len(ids) - k)
            s2.truncate(P)
            snap = s2.snapshot()
        assert full1 == full2 and n1 == len(full1)
        assert np.array_equal(lg1, lg2), np.abs(lg1 - lg2).max()
        assert snap.shape == ctx._kv.shape and np.array_equal(snap, ctx._kv)


def test_split_prefill_equals_one_call_prefill_bf16(both, case):
    fo1 = both
    """bf16 weights: the prefix + rest prefill of every request gives the same bits as one prefill of the whole
    prompt (the row results of the bf16 kernels do not depend on how many rows a call has). With fp32 weights the
    OpenBLAS path sums in an order that depends on the call's row count, so there the two differ in the last bits;
    every request (cached or not) prefills in the same two calls, so cached and uncached still agree exactly."""
    img, boxes = case
    ids, emb, pos, delta, _, _ = fo1.prepare(img, boxes, "Please detect dog in this image.")
    with fo1._session(1) as s:
        one = s.prefill_embeds(emb, pos)
    ctx = fo1.encode(img, boxes=boxes)
    with fo1._session(1) as s:
        _, two = ctx._start(s, fo1._prompt("Please detect dog in this image.", len(boxes))[0])
    err = float(np.abs(one - two).max())
    bf16 = fo1.decoder._tensors["embed"].dtype == np.uint16
    print(f"\n{'bf16' if bf16 else 'fp32'} weights, one-call vs split prefill: max |diff| {err:.3g}")
    if bf16:
        assert err == 0.0
    else:
        assert err < 1e-3


def test_sampling_and_stream_identical(fo1, case):
    img, boxes = case
    ctx = fo1.encode(img, boxes=boxes)
    opts = dict(temperature=0.9, top_p=0.95, top_k=20, seed=7)
    a = _call(fo1, "detect", (img, "dog"), {"boxes": boxes}, **opts)
    b = _call(ctx, "detect", ("dog",), {}, **opts)
    assert a.token_ids == b.token_ids
    pieces = list(ctx.stream("detect", "dog", max_new_tokens=N, stop_ids=[], **opts))
    assert pieces[-1].token_ids == a.token_ids and all(isinstance(p, str) for p in pieces[:-1])


def test_threads_share_one_encoded_image(fo1, case):
    img, boxes = case
    ctx = fo1.encode(img, boxes=boxes)
    jobs = [("detect", ("dog",), {}), ("count", ("person",), {}), ("describe_region", (1,), {}),
            ("chat", ("What is <region0>?",), {})] * 2
    serial = [_call(ctx, t, a, kw).token_ids for t, a, kw in jobs]
    got = [None] * len(jobs)

    def run(i):
        t, a, kw = jobs[i]
        got[i] = _call(ctx, t, a, kw).token_ids
    th = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert got == serial


def test_image_cache(fo1_tiny_ckpt, case):
    from vlmfo1 import VLMFO1
    img, boxes = case
    img2, boxes2 = coco_case(2)
    with VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2) as plain, \
            VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2, image_cache=1 << 30) as m:
        want = [_call(plain, "detect", (img, "dog"), {"boxes": boxes}), _call(plain, "count", (img, "dog"), {"boxes": boxes}),
                _call(plain, "detect", (img2, "dog"), {"boxes": boxes2})]
        r1 = _call(m, "detect", (img, "dog"), {"boxes": boxes})
        assert r1.timings["vit"] > 0 and len(m.image_cache) == 1 and m.image_cache.misses == 1
        r2 = _call(m, "count", (img, "dog"), {"boxes": boxes})
        assert r2.timings["vit"] == 0.0 and m.image_cache.hits == 1
        r3 = _call(m, "detect", (img2, "dog"), {"boxes": boxes2})
        assert [r.token_ids for r in (r1, r2, r3)] == [r.token_ids for r in want]
        # other boxes on the same pixels: another entry
        _call(m, "detect", (img, "dog"), {"boxes": boxes[:1]})
        assert len(m.image_cache) == 3 and m.image_cache.hits == 1
        # encode() finds and fills the same cache
        assert m.encode(img, boxes=boxes) is m.encode(img, boxes=boxes)
        # the byte bound evicts the least recently used
        one = m.encode(img2, boxes=boxes2).nbytes
        m.image_cache.max_bytes = one
        assert len(m.image_cache) == 1 and m.image_cache.nbytes <= one
        m.image_cache.max_bytes = 0
        assert len(m.image_cache) == 0
        r4 = _call(m, "count", (img, "dog"), {"boxes": boxes})
        assert r4.timings["vit"] > 0 and r4.token_ids == want[1].token_ids and len(m.image_cache) == 0
        for bad in (-1, 1.5, "1GB", True):
            with pytest.raises(ValueError, match="bytes"):
                m.image_cache.max_bytes = bad
    with pytest.raises(ValueError, match="bytes"):
        VLMFO1.from_pretrained(fo1_tiny_ckpt, image_cache=-5)


def test_conversation_keeps_its_cache(fo1, case):
    """Turn 2 continues turn 1's KV cache; replaying the whole history as one prompt from nothing gives the same
    greedy tokens (its prefill sums the answer rows in other calls, so logits agree to rounding, not bits)."""
    img, boxes = case
    ctx = fo1.encode(img, boxes=boxes)
    with ctx.conversation() as conv:
        a1 = conv.ask("What is <region0>?", max_new_tokens=N)
        n1 = conv._session.n_past
        a2 = conv.ask("And <region1>?", max_new_tokens=N)
        assert conv._session.n_past > n1 + len(a1.token_ids)
        assert len(conv.turns) == 2 and conv.turns[1] is a2
        history = conv.history_ids
    one = ctx.chat("What is <region0>?", max_new_tokens=N)           # turn 1 is the one-turn chat
    assert a1.token_ids == one.token_ids
    # replay: the full history (both questions, the first answer) prefilled at once, then greedy decoding
    from vlmfo1.generation import decode_stream
    upto = history[:len(history) - len(a2.token_ids)]               # through turn 2 prompt
    with fo1._session(1) as s:
        full, emb, pos, delta = ctx._expand(upto)
        logits = s.prefill_embeds(emb, pos)
        s.rope_delta = delta
        replay = list(decode_stream(fo1.decoder, s, logits, len(a2.token_ids), stop_ids=fo1.decoder.stop_ids))
    assert replay == a2.token_ids


def test_conversation_errors(fo1, case):
    img, boxes = case
    ctx = fo1.encode(img, boxes=boxes)
    conv = ctx.conversation()
    with pytest.raises(ValueError, match="region5"):
        conv.ask("What is <region5>?")
    with pytest.raises(TypeError):
        conv.ask(None)
    it = conv.stream("What is <region0>?", max_new_tokens=N)
    next(it)
    with pytest.raises(RuntimeError, match="another thread"):
        conv.ask("again")
    for _ in it:
        pass
    unused = conv.stream("never read")      # a turn that is never iterated holds nothing
    del unused
    with pytest.raises(ValueError, match="positions"):
        conv.ask("more", max_new_tokens=fo1.decoder.max_positions - 10)
    conv.ask("more", max_new_tokens=2)
    conv.close()


def test_bad_uses(fo1, fo1_tiny_ckpt, case):
    from vlmfo1 import VLMFO1
    img, boxes = case
    ctx = fo1.encode(img, boxes=boxes)
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(ctx)
    with pytest.raises(ValueError, match="out of range"):
        ctx.describe_region(9)
    with pytest.raises(ValueError, match="unknown task"):
        ctx.stream("nope")
    with pytest.raises(TypeError, match="truncate_boxes"):
        fo1.encode(img, boxes=boxes, truncate_boxes="yes")
    with VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=1) as other:
        with pytest.raises(ValueError, match="another model"):
            other._request_encoded(ctx, "detect", *other._prompt_for("detect", "dog"))
    assert "EncodedImage(" in repr(ctx) and "boxes" in repr(ctx)
    empty = fo1.encode(img)                 # no boxes: questions about the whole image
    assert len(empty.boxes) == 0 and empty.chat("What is this?", max_new_tokens=2).text is not None
