"""Prefix caching: an image and its boxes encoded once, then asked any number of questions.

    ctx = model.encode("photo.jpg", boxes=proposals)   # ViT, DaViT, HFRE once + the shared prompt prefix prefilled
    ctx.detect(["person", "dog"]); ctx.count("dog"); ctx.describe_region(3); ctx.chat("What is <region2> doing?")
    chat = ctx.conversation(); chat.ask("What is in <region0>?"); chat.ask("And what colour is it?")

Every VLM-FO1 prompt starts with the same tokens for one image and one set of boxes — the system turn, the
user turn's image and its region slots — and only the text after them changes from task to task
(fo1_prompt.prompt_ids). An EncodedImage holds the vision side of a request (image tokens, region tokens) and the
decoder's KV cache over that prefix (a snapshot: [layers, 2, kv heads, positions, head dim] fp32, taken once). A
task call copies the snapshot into a working KV cache and prefills only its own text.

Bit-identity with the uncached request: every request prefills in two calls, the prefix and then the rest,
whether the prefix comes from a snapshot or was just computed (VLMFO1._request does the same); the KV rows of a
position do not depend on what follows it, so the snapshot rows are exactly the rows a fresh request computes, and
the results are the same bits (tests/test_context.py checks every task).

Thread safety: an EncodedImage is read-only after `encode` and may serve several threads at once (each request
takes its own working KV cache). A Conversation keeps one KV cache across turns and serves one thread at a time.
ImageCache: the model's LRU of EncodedImages (keyed by the decoded pixels, the boxes and the box options), bounded
in bytes; off (0 bytes) unless the model was loaded with image_cache= or `model.image_cache.max_bytes` is set.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from .constants import IMAGE_INDEX, REGION_INDEX, VISION_END_ID
from .results import FO1Result

if TYPE_CHECKING:   # pragma: no cover
    from .fo1 import VLMFO1


def prefix_length(ids: Sequence[int]) -> int:
    """How many leading ids (placeholders not yet expanded) every prompt on this image and these boxes shares:
    through the last region slot, or through <|vision_end|> when there are no boxes. What follows ("\\n" + the
    text + the assistant header) is tokenized as one piece, so it is never part of the shared prefix."""
    ids = list(ids)
    if REGION_INDEX in ids:
        return len(ids) - ids[::-1].index(REGION_INDEX)
    p = ids.index(IMAGE_INDEX)
    return p + 2 if p + 1 < len(ids) and ids[p + 1] == VISION_END_ID else p + 1


def image_key(pixels: np.ndarray, boxes: np.ndarray) -> bytes:
    """The ImageCache key: a digest of the decoded RGB pixels (with their shape) and the checked boxes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(np.asarray(pixels.shape, np.int64).tobytes())
    h.update(np.ascontiguousarray(pixels).data)
    h.update(np.ascontiguousarray(boxes, dtype=np.float64).tobytes())
    return h.digest()


class EncodedImage:
    """An image and its proposal boxes after the vision side of VLM-FO1 (ViT, DaViT, HFRE, projectors) and the
    decoder's prefill of the prompt prefix they share. Made by `VLMFO1.encode(image, boxes)`; ask it any task
    (`detect`, `count`, `refer`, `ground`, `describe_region`, `read_region`, `detect_like`, `reason`, `chat`,
    `detect_coco`, `stream`) with the same options as the model's methods minus the image and the boxes. Each
    call prefills only its own text; the answers are bit-identical to the model's one-call methods."""

    def __init__(self, model: "VLMFO1", image: np.ndarray, source, boxes: np.ndarray, scores: Optional[np.ndarray],
                 image_tokens: np.ndarray, grid_hw, regions: np.ndarray, timings: Dict[str, float],
                 flops: Optional[Dict[str, Dict[str, int]]] = None):
        self.model = model
        self.image = image                         # the decoded RGB pixels [H, W, 3] uint8
        self.source = source                       # what FO1Result.image reports (a path, or the pixels)
        self.boxes = boxes                         # [N, 4] xyxy in image pixels, as checked
        self.scores = scores                       # [N] or None (the proposal scores results report)
        self.image_tokens = image_tokens           # [M, hidden] after the projector
        self.grid_hw = tuple(grid_hw)              # ViT patch grid (gh, gw)
        self.regions = regions                     # [N, hidden] region tokens after the aux projector
        self.encode_timings = dict(timings)        # preprocess, vit, davit, hfre, prefix (seconds)
        self.encode_flops = dict(flops or {})      # vit, davit, hfre, prefix: {"gemm": FLOPs, "attention": FLOPs}
        self._prefix: Optional[List[int]] = None   # the shared prompt prefix (placeholders not expanded)
        self._kv: Optional[np.ndarray] = None      # KV snapshot of the expanded prefix
        self._kv_delta = 0

    # ---------------------------------------------------------------- what it holds
    @property
    def image_size(self):
        return (int(self.image.shape[1]), int(self.image.shape[0]))

    @property
    def prefix_tokens(self) -> int:
        """Positions of the cached prefix (image and region slots expanded); 0 before it is prefilled."""
        return 0 if self._kv is None else int(self._kv.shape[3])

    @property
    def nbytes(self) -> int:
        """Bytes this object holds: KV snapshot, image and region tokens, pixels."""
        n = self.image_tokens.nbytes + self.regions.nbytes + self.image.nbytes
        return n + (0 if self._kv is None else self._kv.nbytes)

    def __repr__(self) -> str:
        w, h = self.image_size
        return (f"EncodedImage({w}x{h}, {len(self.boxes)} boxes, {len(self.image_tokens)} image tokens, prefix "
                f"{self.prefix_tokens} positions, {self.nbytes / 2**20:.1f} MiB)")

    def __reduce_ex__(self, protocol):
        raise TypeError("an EncodedImage belongs to the loaded model that made it and cannot be pickled; encode the "
                        "image again in the other process")

    # ---------------------------------------------------------------- the prompt prefix
    def _expand(self, ids: Sequence[int]):
        """ids with placeholders -> (ids, embeddings [L, hidden], positions [3, L], rope delta), checked."""
        return self.model._expand(ids, self.image_tokens, self.grid_hw, self.regions)

    def _prefill_prefix(self, session, ids: Sequence[int]) -> None:
        """Prefill the shared prefix of ids (placeholders) into an empty session and keep its KV snapshot."""
        k = prefix_length(ids)
        full, emb, pos, delta = self._expand(list(ids[:k]))
        session.reset()
        session.prefill_embeds(emb, pos, logits=False)
        session.rope_delta = delta
        self._kv, self._kv_delta, self._prefix = session.snapshot(), delta, list(ids[:k])

    def _start(self, session, ids: Sequence[int]):
        """Bring `session` to the state after prefilling the prompt `ids` (placeholders): restore the snapshot when
        the prompt starts with the cached prefix, else prefill the prompt's own prefix first; then prefill the
        rest. -> (expanded ids, logits of the last position)."""
        full, emb, pos, delta = self._expand(ids)
        k = prefix_length(ids)
        P = len(full) - (len(ids) - k)            # the prefix length with the image expanded
        if self._kv is not None and self._prefix == list(ids[:k]):
            session.restore(self._kv, self._kv_delta)
        else:
            session.reset()
            session.prefill_embeds(emb[:P], pos[:, :P], logits=False)
        session.rope_delta = delta
        return full, session.prefill_embeds(emb[P:], pos[:, P:])

    # ---------------------------------------------------------------- tasks (the model's, minus image and boxes)
    def _request(self, task: str, make_text, per_category: int, **kw):
        return self.model._request_encoded(self, task, make_text, per_category, **kw)

    def detect(self, categories: Union[str, Sequence[str]], **kw) -> FO1Result:
        """Object detection among the boxes (see VLMFO1.detect)."""
        return self._request("detect", *self.model._prompt_for("detect", categories), **kw)

    def detect_coco(self, categories: Optional[Sequence[str]] = None, **kw) -> FO1Result:
        """The official COCO evaluation prompt (see VLMFO1.detect_coco)."""
        return self._request("detect_coco", *self.model._prompt_for("detect_coco", categories), **kw)

    def count(self, category: str, **kw) -> FO1Result:
        """How many `category` there are (see VLMFO1.count)."""
        return self._request("count", *self.model._prompt_for("count", category), **kw)

    def refer(self, expression: str, **kw) -> FO1Result:
        """The boxes a referring expression describes (see VLMFO1.refer)."""
        return self._request("refer", *self.model._prompt_for("refer", expression), **kw)

    def ground(self, **kw) -> FO1Result:
        """A grounded brief caption (see VLMFO1.ground)."""
        return self._request("ground", *self.model._prompt_for("ground"), **kw)

    def describe_region(self, index, detailed: bool = False, **kw) -> FO1Result:
        """A caption of one region or several (see VLMFO1.describe_region)."""
        task = "describe_region_detailed" if detailed else "describe_region"
        return self._request(task, *self.model._prompt_for(task, index), **kw)

    def read_region(self, index, **kw) -> FO1Result:
        """OCR of one region or several (see VLMFO1.read_region)."""
        return self._request("read_region", *self.model._prompt_for("read_region", index), **kw)

    def detect_like(self, reference_indices, **kw) -> FO1Result:
        """Visual-prompt detection (see VLMFO1.detect_like)."""
        return self._request("detect_like", *self.model._prompt_for("detect_like", reference_indices), **kw)

    def reason(self, question: str, **kw) -> FO1Result:
        """Region reasoning (see VLMFO1.reason)."""
        return self._request("reason", *self.model._prompt_for("reason", question), **kw)

    def chat(self, text: str, **kw) -> FO1Result:
        """A free prompt; refer to boxes as <region0>, <region1>, … (see VLMFO1.chat). One turn: for a
        conversation that remembers earlier turns use `conversation()`."""
        return self._request("chat", *self.model._prompt_for("chat", text), **kw)

    def stream(self, task: str, *args, **kw) -> Iterator[Union[str, FO1Result]]:
        """`for piece in ctx.stream("detect", "dog")`: text pieces as generated, then the FO1Result."""
        return self.model._task_on(self, task)(*args, stream=True, **kw)

    def conversation(self) -> "Conversation":
        """A multi-turn chat about this image that keeps its KV cache between turns."""
        return Conversation(self)


class Conversation:
    """A multi-turn chat about one EncodedImage (the Qwen chat template: each turn appends
    `<|im_end|>\\n<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n` after the previous answer's tokens).
    The KV cache of the whole history is kept between turns, so a turn prefills only its own text. One thread at a
    time; `close()` (or leaving a `with` block) gives the KV cache back."""

    def __init__(self, ctx: EncodedImage):
        self.ctx = ctx
        self.turns: List[FO1Result] = []
        self._ids: List[int] = []          # the whole history as ids (placeholders not expanded)
        self._pending: List[int] = []      # tokens generated but not yet in the KV cache
        self._session = None
        self._lock = threading.Lock()

    def ask(self, text: str, **kw) -> FO1Result:
        """One turn: the answer to `text` given the earlier turns (options as VLMFO1.chat)."""
        it = self.stream(text, **kw)
        for last in it:
            pass
        return last

    def stream(self, text: str, **kw) -> Iterator[Union[str, FO1Result]]:
        """One turn, streamed: text pieces as generated, then the FO1Result."""
        return self.ctx.model._converse(self, text, **kw)

    @property
    def history_ids(self) -> List[int]:
        """The conversation so far as prompt ids (placeholders not expanded), answers included."""
        return self._ids + self._pending

    def close(self) -> None:
        s, self._session = self._session, None
        if s is not None:
            self.ctx.model._release_session(s)

    def __enter__(self) -> "Conversation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ImageCache:
    """An LRU of EncodedImages bounded in bytes (the KV snapshots dominate: ~73 KiB per prefix position for the
    3B decoder). max_bytes = 0 turns it off. Thread-safe."""

    def __init__(self, max_bytes: int = 0):
        self._items: "OrderedDict[bytes, EncodedImage]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        return self._max

    @max_bytes.setter
    def max_bytes(self, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"image cache size must be a number of bytes >= 0, got {value!r}")
        self._max = int(value)
        with self._lock:
            self._evict()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(v.nbytes for v in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return (f"ImageCache({len(self)} images, {self.nbytes / 2**20:.1f} of {self._max / 2**20:.1f} MiB, "
                f"{self.hits} hits, {self.misses} misses)")

    def get(self, key: bytes) -> Optional[EncodedImage]:
        with self._lock:
            v = self._items.get(key)
            if v is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: bytes, value: EncodedImage) -> None:
        with self._lock:
            if value.nbytes > self._max:
                return
            self._items[key] = value
            self._items.move_to_end(key)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def _evict(self) -> None:
        total = sum(v.nbytes for v in self._items.values())
        while self._items and total > self._max:
            _, v = self._items.popitem(last=False)
            total -= v.nbytes

