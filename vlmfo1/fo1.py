"""VLM-FO1: detection and region understanding by picking proposal boxes by index.

    model = VLMFO1.from_pretrained("/path/to/VLM-FO1_Qwen2.5-VL-3B-v01")   # threads=, dtype=, mode=
    res = model.detect("photo.jpg", ["person", "dog"], boxes=proposals)    # any box form, box_format=, scores=
    res.boxes, res.labels, res.scores, res.text, res.timings               # see vlmfo1.results.FO1Result
    for piece in model.stream("detect", "photo.jpg", "person", boxes=proposals): ...   # text, then the result
    model.chat("photo.jpg", "What is <region2> holding?", boxes=proposals).text

Every task is one call: detect, detect_coco, count, refer, ground, describe_region, read_region, detect_like,
reason, chat (`TASKS`). Proposals come as `boxes=` (list / NumPy / torch / supervision.Detections / COCO dicts, in
`box_format`) or from `proposals=` (a ProposalSource: image -> boxes, scores). Boxes in and out are original-image
pixels; the model only picks them by index.

One request, as the official pipeline runs it (spec fo1_architecture.md §1, ERRATA):
  1. load the image (Pillow, RGB, no EXIF rotation), enlarge sides < 28 px, cap the long side at 2048
     and scale the boxes by the same ratios;
  2. Qwen2.5-VL ViT on the Qwen-processed image -> image tokens (-> mm_projector) and the hidden states
     after the full-attention blocks;
  3. DaViT on the aux-processed image -> 4 stage maps;
  4. HFRE: boxes clamped to the image and mapped to aux and Qwen space, RoIAlign on both feature
     sets, position embedding -> one region vector per box (-> mm_projector_aux);
  5. the prompt with one image placeholder and one <regionI><regionfeat> pair per box, tokenized in
     chunks; image tokens and region vectors spliced in; M-RoPE positions with region slots counted
     as text; greedy (or sampled) decoding; the answer mapped back to the input boxes.
"""
from __future__ import annotations

import os
import re
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from .aux_image import AuxImageProcessor
from .davit import DavitEncoder
from .config_check import check_fo1
from .decoder import (LanguageModel, check_options, check_request_length, check_sampling, decode_stream, read_config,
                      read_generation_eos)
from .fo1_prompt import (BRIEF_REGION_CAPTION_TEMPLATE, COUNT_TEMPLATE, DETAILED_REGION_CAPTION_TEMPLATE,
                         GROUNDING_TEMPLATE, IMAGE_INDEX, MAX_BOXES, OD_TEMPLATE, REC_TEMPLATE, REGION_INDEX,
                         REGION_OCR_TEMPLATE, REGION_REASONING_TEMPLATE, VISUAL_PROMPT_OD_TEMPLATE, check_boxes,
                         parse_answer, prompt_ids, region_tags)
from .hfre import HFRE, map_boxes
from .generation import GenerationSettings, check_repetition_penalty
from .image import QwenImageProcessor, fo1_global_resize, load_image
from .proposals import Proposals, as_boxes
from .qwen_vl import splice_image
from .results import COCO_CATEGORIES, FO1Result
from .tokenizer import check_text
from .safetensors import Checkpoint
from .threads import default_threads
from .vision import VisionTower

QWEN_IMAGE_TOKEN = 151655          # <|image_pad|>, when config.json does not name image_token_id
FO1_VISION_PREFIX = "model.vision_tower.image_tower."

TASKS = ("detect", "detect_coco", "count", "refer", "ground", "describe_region", "read_region", "detect_like",
         "reason", "chat")

# Default max_new_tokens per task: base + per_box * boxes + per_category * categories. An answer names each
# picked box with one <regionK> token plus ~10 tokens of tags per label; captions and reasoning are free text.
# (The official scripts pass 4096 to every task; a result cut short says finish_reason == "length".)
MAX_NEW_TOKENS = {"detect": (32, 2, 16), "detect_coco": (32, 2, 16), "count": (64, 2, 0), "refer": (32, 2, 0),
                  "ground": (256, 2, 0), "describe_region": (128, 0, 0), "describe_region_detailed": (512, 0, 0),
                  "read_region": (256, 0, 0), "detect_like": (32, 2, 0), "reason": (1024, 2, 0), "chat": (512, 0, 0),
                  "generate": (512, 0, 0)}

_REGION_REF = re.compile(r"<region(\d+)>")


def coco_detection_prompt(categories: Sequence[str] = COCO_CATEGORIES) -> str:
    """The wording of the official COCO evaluation data (not OD_TEMPLATE; spec §6.2)."""
    return f"Please detect {'; '.join(_category_list(categories))} in the image and return the object indexes."


def _category_list(categories, what: str = "categories") -> List[str]:
    """A category name or a list of them -> a list of non-empty names (never str(list))."""
    if isinstance(categories, str):
        names = [categories]
    elif isinstance(categories, (list, tuple)) or (hasattr(categories, "__iter__") and
                                                   not isinstance(categories, (bytes, dict))):
        names = list(categories)
        if not names:
            raise ValueError(f"{what}: the list is empty; name at least one, e.g. ['person']")
        bad = [c for c in names if not isinstance(c, str)]
        if bad:
            raise TypeError(f"{what} must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    else:
        raise TypeError(f"{what} must be a string or a list of strings, got {type(categories).__name__}")
    for i, c in enumerate(names):
        check_text(c, what if isinstance(categories, str) else f"{what}[{i}]")
    if any(not c.strip() for c in names):
        raise ValueError(f"{what}: empty name in {names!r}")
    return [c.strip() for c in names]


def _one_text(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__} {value!r}"
                        + (" (count takes one category; call it once per category)" if what == "category" else ""))
    check_text(value, what)
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def _indices(index) -> List[int]:
    if isinstance(index, (bool, np.bool_)):
        raise TypeError("a region index must be an int, got a bool")
    if isinstance(index, (int, np.integer)):
        return [int(index)]
    try:
        out = list(index)
    except TypeError:
        raise TypeError(f"a region index must be an int or a list of ints, got {type(index).__name__}") from None
    if not out:
        raise ValueError("name at least one region index")
    if any(isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) for i in out):
        raise TypeError(f"region indices must be ints, got {out!r}")
    return [int(i) for i in out]


class VLMFO1:
    """A loaded VLM-FO1 model: decoder, Qwen2.5-VL ViT, DaViT, HFRE, projectors, tokenizer, processors.

    One model serves several Python threads at once (the GIL is released during compute; every request has
    its own KV cache). It cannot be pickled: in worker processes, load it from the path (see the README)."""

    def __init__(self, decoder: LanguageModel, vision: VisionTower, davit: DavitEncoder, hfre: HFRE, tokenizer,
                 processor: QwenImageProcessor, aux_processor: AuxImageProcessor, raw_config: dict,
                 path: Optional[str] = None):
        self.decoder, self.vision, self.davit, self.hfre = decoder, vision, davit, hfre
        self.tokenizer, self.processor, self.aux_processor = tokenizer, processor, aux_processor
        self.config = raw_config
        self.path = path
        tok = raw_config.get("image_token_id")
        self.image_token_id = QWEN_IMAGE_TOKEN if tok is None else int(tok)
        missing = [f"<region{i}>" for i in range(MAX_BOXES) if tokenizer.token_to_id(f"<region{i}>") is None]
        if missing:
            raise ValueError(f"the tokenizer lacks FO1's region tokens ({missing[0]} …): not a VLM-FO1 checkpoint?")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], dtype: Optional[str] = None,
                        threads: Optional[int] = None, mode: str = "reference", compute: Optional[str] = None,
                        max_context: Optional[int] = None, n_threads: Optional[int] = None) -> "VLMFO1":
        """Load a VLM-FO1 checkpoint folder (the official layout: config.json, safetensors, tokenizer files).

        dtype: None keeps the stored weights (bf16 stays bf16, memory-mapped), "float32" / "bfloat16" convert.
        threads: worker threads (default: vlmfo1.threads.default_threads() — VLMFO1_NUM_THREADS or
        OMP_NUM_THREADS if set, else the CPUs this process may use). mode: "reference" (default) reproduces the
        official run's rounding (ERRATA E1/E2); "exact" is plain fp32 maths. compute: "bf16" / "f32" activations
        with bf16 weights. n_threads: the older name of threads. max_context: the longest prompt (image and region
        slots included) a request may have, an int in [1, max_position_embeddings (at most 2^20)]; default 8192 (or
        the position limit when smaller). Prompt + max_new_tokens must fit in max_position_embeddings."""
        from .tokenizer import Tokenizer

        if threads is not None and n_threads is not None and threads != n_threads:
            raise ValueError("give threads= or n_threads=, not both")
        threads = threads if threads is not None else n_threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or not 1 <= threads <= 256):
            raise ValueError(f"threads must be an int in [1, 256], got {threads!r}")
        check_options(mode, dtype, compute)
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint folder not found: {path}" if not os.path.exists(path)
                                    else f"not a checkpoint folder (a file): {path}")
        raw = read_config(path)
        check_fo1(raw)            # every part of config.json, before any tower is loaded
        ckpt = Checkpoint(path)
        try:
            threads = int(threads or default_threads())
            kw = dict(mode=mode, compute=compute, dtype=dtype, n_threads=threads)
            if not any(k.startswith("model.object_vp_extractor.") for k in ckpt.keys()) and \
                    not any(k.startswith("model.mm_projector_aux.") for k in ckpt.keys()):
                raise KeyError("no VLM-FO1 region encoder in this checkpoint (no model.object_vp_extractor.* / "
                               "model.mm_projector_aux.* tensors)")
            generation = GenerationSettings.from_pretrained(path, kind="fo1")
            decoder = LanguageModel.from_checkpoint(ckpt, raw, max_context=max_context, default_context=8192,
                                                    generation_eos=read_generation_eos(path), generation=generation,
                                                    **kw)
            vision = VisionTower.from_checkpoint(ckpt, raw, prefix=FO1_VISION_PREFIX, **kw)
            davit = DavitEncoder.from_checkpoint(ckpt, raw, **kw)
            hfre = HFRE.from_checkpoint(ckpt, raw, **kw)
            tok = Tokenizer.from_pretrained(path, slow=True)
            proc = QwenImageProcessor.from_pretrained(path)
            aux = AuxImageProcessor.from_config(raw)
        except BaseException:
            ckpt.close()  # a failed load releases the mappings and descriptors it opened
            raise
        return cls(decoder, vision, davit, hfre, tok, proc, aux, raw, path=path)

    @classmethod
    def load(cls, path, mode: str = "reference", compute: Optional[str] = None, dtype: Optional[str] = None,
             n_threads: Optional[int] = None, max_context: Optional[int] = None) -> "VLMFO1":
        """The older name of from_pretrained (same arguments, n_threads for threads)."""
        return cls.from_pretrained(path, dtype=dtype, threads=n_threads, mode=mode, compute=compute,
                                   max_context=max_context)

    # ------------------------------------------------------------------ what it is
    @property
    def threads(self) -> int:
        return self.decoder.n_threads

    @property
    def mode(self) -> str:
        return self.decoder.mode

    def _parts(self):
        return (("decoder", self.decoder), ("ViT", self.vision), ("DaViT", self.davit), ("HFRE", self.hfre))

    @staticmethod
    def _size(part):
        arrays = part._tensors if isinstance(part._tensors, dict) else vars(part._tensors)
        seen, n, nbytes, kinds = set(), 0, 0, set()
        stack = list(arrays.values())
        while stack:
            a = stack.pop()
            if isinstance(a, dict):
                stack.extend(a.values())
            elif isinstance(a, (list, tuple)):
                stack.extend(a)
            elif isinstance(a, np.ndarray) and id(a) not in seen:
                seen.add(id(a))
                n += a.size
                nbytes += a.nbytes
                kinds.add("bf16" if a.dtype == np.uint16 else str(a.dtype).replace("float", "f"))
        return n, nbytes, kinds

    @property
    def num_parameters(self) -> Dict[str, int]:
        """Parameters per sub-network (the HFRE entry includes both projectors)."""
        self._check_open()
        return {name: self._size(p)[0] for name, p in self._parts()}

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights as the engine holds them (memory-mapped bf16, or converted copies)."""
        self._check_open()
        return sum(self._size(p)[1] for _, p in self._parts())

    def __repr__(self) -> str:
        if self.decoder is None:
            return f"VLMFO1(closed, path={self.path!r})"
        sizes = {name: self._size(p) for name, p in self._parts()}
        kinds = sorted(set().union(*(k for _, _, k in sizes.values())))
        parts = ", ".join(f"{name} {n / 1e9:.2f}B" if n >= 1e8 else f"{name} {n / 1e6:.1f}M"
                          for name, (n, _, _) in sizes.items())
        total = sum(n for n, _, _ in sizes.values())
        nbytes = sum(b for _, b, _ in sizes.values())
        c = self.decoder.config
        return (f"VLMFO1({self.path!r}: {total / 1e9:.2f}B parameters ({parts}), {c.num_hidden_layers} decoder layers "
                f"× {c.hidden_size}, weights {'/'.join(kinds)} {nbytes / 2**30:.2f} GiB, compute "
                f"{self.decoder.compute}, mode {self.mode!r}, threads {self.threads}, "
                f"max_context {self.decoder.max_context})")

    def close(self) -> None:
        """Drop the weights: the checkpoint's memory maps and file descriptors are released now, or, for arrays
        something else still holds, when the last of them goes. The model is unusable after."""
        ckpts = {id(c): c for c in (getattr(p, "_ckpt", None) for p in (self.decoder, self.vision, self.davit))
                 if c is not None and hasattr(c, "close")}
        self.decoder = self.vision = self.davit = self.hfre = None
        for c in ckpts.values():
            c.close()

    def __enter__(self) -> "VLMFO1":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.decoder is None:
            raise RuntimeError("this VLMFO1 model was closed; load it again with VLMFO1.from_pretrained(path)")

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a loaded VLMFO1 model cannot be pickled (its weights are memory-mapped C objects, and copying 8 GB per "
            "worker would defeat the point). Load it once per worker process from the checkpoint path instead, e.g. "
            "ProcessPoolExecutor(initializer=init, initargs=(path,)) with init() calling VLMFO1.from_pretrained(path),"
            " or a Ray actor whose __init__ loads it (README: 'Many images, many processes').")

    # ------------------------------------------------------------------ one request, low level
    def encode(self, image, boxes, truncate_boxes: bool = False, trace: Optional[dict] = None,
               timings: Optional[Dict[str, float]] = None):
        """Image + boxes -> (image tokens [M, hidden], (gh, gw), region tokens [N, hidden], boxes used).

        trace: a dict that receives the named intermediates (pixel values, boxes in aux and Qwen space,
        DaViT and ViT maps, region features), for debugging and the golden tests. timings: a dict that
        receives seconds per stage (preprocess, vit, davit, hfre)."""
        self._check_open()
        t = trace if trace is not None else {}
        tm = timings if timings is not None else {}
        clock = time.perf_counter()
        pixel_values, grid_thw, aux_px, boxes_a, boxes_q, b = self.preprocess(image, boxes, truncate_boxes)
        _, gh, gw = (int(v) for v in grid_thw)
        now = time.perf_counter()
        tm["preprocess"], clock = tm.get("preprocess", 0.0) + now - clock, now

        tokens, vt_maps = self.vision(pixel_values, grid_thw, features=True)
        image_tokens = self.hfre.project_image(tokens)
        t.update(pixel_values=pixel_values, image_grid_thw=(1, gh, gw), vt_maps=vt_maps, image_tokens=image_tokens)
        now = time.perf_counter()
        tm["vit"], clock = now - clock, now
        if len(b) == 0:
            tm["davit"] = tm["hfre"] = 0.0
            return image_tokens, (gh, gw), np.zeros((0, self.decoder.config.hidden_size), np.float32), b

        aux_maps = self.davit(aux_px)
        now = time.perf_counter()
        tm["davit"], clock = now - clock, now
        feats = self.hfre.region_features([m.transpose(1, 2, 0) for m in vt_maps],
                                          [m.transpose(1, 2, 0) for m in aux_maps], boxes_a, boxes_q,
                                          qwen_hw=(14 * gh, 14 * gw))
        regions = self.hfre.project_regions(feats)
        tm["hfre"] = time.perf_counter() - clock
        t.update(aux_pixel_values=aux_px, davit_maps=aux_maps, boxes_aux=boxes_a, boxes_vt=boxes_q,
                 region_features=feats, region_tokens=regions)
        return image_tokens, (gh, gw), regions, b

    def preprocess(self, image, boxes, truncate_boxes: bool = False):
        """The front end of `encode` (no network runs): image + boxes -> (ViT pixel rows, grid (1, gh, gw), DaViT
        pixels or None, boxes in DaViT input pixels, boxes in ViT input pixels, the checked boxes [N, 4])."""
        img = load_image(image)
        b = check_boxes(boxes, truncate=truncate_boxes)
        img, rx, ry = fo1_global_resize(img)
        b_img = b * np.array([rx, ry, rx, ry], dtype=np.float64)
        h_i, w_i = img.shape[:2]
        pixel_values, grid_thw, _ = self.processor(img)
        _, gh, gw = (int(v) for v in grid_thw)
        aux_px = boxes_a = boxes_q = None
        if len(b):
            aux_px, info = self.aux_processor(img)
            boxes_a, boxes_q = map_boxes(b_img, (w_i, h_i), info["aux_size"], (14 * gw, 14 * gh))
        return pixel_values, grid_thw, aux_px, boxes_a, boxes_q, b

    def prepare(self, image, boxes, text: str, truncate_boxes: bool = False, trace: Optional[dict] = None,
                timings: Optional[Dict[str, float]] = None):
        """-> (ids with placeholders expanded, input embeddings [L, hidden], positions [3, L], rope delta,
        boxes used, prompt text)."""
        self._check_open()
        b = check_boxes(boxes, truncate=truncate_boxes)
        self._check_prompt_text(text)
        ids, prompt = prompt_ids(self.tokenizer, text, len(b))   # the text is checked before any image work
        if len(ids) > self.decoder.max_context:   # the image placeholder is one id here, >= 1 position later
            raise ValueError(f"the prompt is {len(ids)} tokens long before the image is added, more than max_context "
                             f"{self.decoder.max_context}: shorten the text, or load the model with a larger "
                             f"max_context (at most {self.decoder.max_positions})")
        if ids.count(IMAGE_INDEX) != 1:
            raise ValueError("the prompt must hold exactly one image")
        if self.image_token_id in ids:
            raise ValueError("the prompt text must not contain <|image_pad|>: the image is placed by the prompt builder")
        if ids.count(REGION_INDEX) != len(b):
            raise ValueError("the prompt text must not contain the <regionfeat> marker: region slots are placed by "
                             "the prompt builder (refer to boxes with <regionK>)")
        if trace is not None:
            trace["input_ids"] = list(ids)
        image_tokens, (gh, gw), regions, _ = self.encode(image, b, trace=trace, timings=timings)
        full, emb, pos, delta = splice_image(self.decoder, ids, ids.index(IMAGE_INDEX), image_tokens, (gh, gw),
                                             self.image_token_id)
        check_request_length(self.decoder, len(full), 0)
        limit = self.config.get("tokenizer_model_max_length")
        if limit and len(full) > int(limit):
            # the official model cuts the spliced embeddings (not the ids) at this length and then fails (ERRATA E7)
            raise ValueError(f"the prompt is {len(full)} positions long with the image and region slots; this "
                             f"checkpoint's tokenizer_model_max_length is {int(limit)}: use a smaller image, fewer "
                             f"boxes or a shorter text")
        emb[[i for i, t in enumerate(full) if t == REGION_INDEX]] = regions
        return full, emb, pos, delta, b, prompt

    def _decode(self, ids, emb, pos, delta, max_new_tokens: int, sampling: dict,
                timings: Dict[str, float]) -> Iterator[int]:
        dec = self.decoder
        check_request_length(dec, len(ids), max_new_tokens)
        s = dec.session(max_context=max(dec.max_context, len(ids) + max_new_tokens))
        clock = time.perf_counter()
        logits = s.prefill_embeds(emb, pos)
        s.rope_delta = delta
        now = time.perf_counter()
        timings["prefill"], clock = now - clock, now
        timings["decode"] = 0.0
        # the penalty (if asked for) sees the prompt's real ids, as the official computation with its negative
        # placeholder ids skipped (the official run itself fails on them; vlmfo1/generation.py)
        context = [t for t in ids if t >= 0 and t != self.image_token_id]
        for tok in decode_stream(dec, s, logits, max_new_tokens, context_ids=context, **sampling):
            timings["decode"] = time.perf_counter() - clock
            yield tok
        timings["decode"] = time.perf_counter() - clock

    def stream_ids(self, image, boxes, text: str, max_new_tokens: int = 512, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None, stop_ids=None,
                   truncate_boxes: bool = False, repetition_penalty: Optional[float] = None) -> Iterator[int]:
        """The new token ids of one request, one at a time (low level: boxes as [N, 4] xyxy pixels)."""
        self._check_open()
        if stop_ids is not None and not isinstance(stop_ids, (str, bytes, dict)) and hasattr(stop_ids, "__iter__"):
            stop_ids = list(stop_ids)
        self._check_sampling(max_new_tokens, temperature, top_p, top_k, seed, stop_ids)
        if repetition_penalty is not None:
            check_repetition_penalty(repetition_penalty)
        ids, emb, pos, delta, _, _ = self.prepare(image, boxes, text, truncate_boxes)
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop_ids=stop_ids,
                        repetition_penalty=repetition_penalty)
        yield from self._decode(ids, emb, pos, delta, max_new_tokens, sampling, {})

    def generate(self, image, boxes, text: str, truncate_boxes: bool = False, **kw) -> FO1Result:
        """Run one free prompt (low level: boxes as [N, 4] xyxy pixels; `chat` is the full-featured form)."""
        return self.chat(image, text, boxes=boxes, truncate_boxes=truncate_boxes, **kw)

    # ------------------------------------------------------------------ one request, every option
    def _request(self, task: str, image, make_text: Callable[[int], str], per_category: int, boxes, *,
                 proposals=None, box_format: Optional[str] = None, scores=None, image_id=None, truncate_boxes: bool = False,
                 max_new_tokens: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: Optional[int] = None, stop_ids=None, repetition_penalty: Optional[float] = None,
                 progress=None, stream: bool = False):
        """Everything a task call does; returns the FO1Result, or with stream=True an iterator of text pieces
        that ends with the FO1Result."""
        self._check_open()
        if stop_ids is not None and not isinstance(stop_ids, (str, bytes, dict)) and hasattr(stop_ids, "__iter__"):
            stop_ids = list(stop_ids)   # read once (a generator would be used up by the check)
        self._check_sampling(0 if max_new_tokens is None else max_new_tokens, temperature, top_p, top_k, seed,
                             stop_ids)
        if repetition_penalty is not None:
            check_repetition_penalty(repetition_penalty)
        if not isinstance(truncate_boxes, (bool, np.bool_)):
            raise TypeError(f"truncate_boxes must be True or False, got {truncate_boxes!r}")
        # the text with the most region tags it can have: too long a text is refused before the image is read
        try:
            longest = make_text(MAX_BOXES)
        except ValueError:   # a region index beyond every box: refused with the real box count below
            longest = None
        if longest is not None:
            self._check_prompt_text(longest)
        timings: Dict[str, float] = {}
        clock = time.perf_counter()
        img = load_image(image)
        h, w = img.shape[:2]
        props = self._proposals(image, boxes, proposals, box_format, scores, image_id, (w, h))
        b = check_boxes(props.boxes, truncate=truncate_boxes)
        sc = None if props.scores is None else np.asarray(props.scores, dtype=np.float64)[:len(b)]
        text = make_text(len(b))
        bad = [int(k) for k in _REGION_REF.findall(text) if int(k) >= len(b)]
        if bad:
            raise ValueError(f"the prompt names <region{bad[0]}> but there are only {len(b)} boxes "
                             f"(valid: <region0>..<region{len(b) - 1}>)" if len(b) else
                             f"the prompt names <region{bad[0]}> but no boxes were given")
        ids, emb, pos, delta, _, _ = self.prepare(img, b, text, timings=timings)
        if max_new_tokens is None:   # sized for the task, within the model's positions
            base, per_box, per_cat = MAX_NEW_TOKENS[task]
            max_new_tokens = min(base + per_box * len(b) + per_cat * per_category,
                                 self.decoder.max_positions - len(ids))
        timings["preprocess"] += time.perf_counter() - clock - sum(timings.values())   # + loading and checks
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop_ids=stop_ids,
                        repetition_penalty=repetition_penalty)
        stops = set(self.decoder.stop_ids if stop_ids is None else stop_ids)
        source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else img
        fields = dict(task=task, prompt=text, image_size=(w, h), timings=timings, image=source)

        def run():
            toks: List[int] = []
            bar = _progress_bar(progress, max_new_tokens, task)

            def tokens():
                for tok in self._decode(ids, emb, pos, delta, max_new_tokens, sampling, timings):
                    toks.append(tok)
                    if bar is not None:
                        bar.update(1)
                    yield tok
            try:
                yield from self.tokenizer.incremental_decoder()(tokens())
            finally:
                if bar is not None:
                    bar.close()
            finish = "stop" if toks and toks[-1] in stops else "length"
            yield parse_answer(self.tokenizer.decode(toks).strip(), b, toks, scores=sc, finish_reason=finish,
                               **fields)

        it = run()
        if stream:
            return it
        for last in it:
            pass
        return last

    def _check_sampling(self, max_new_tokens, temperature, top_p, top_k, seed, stop_ids) -> None:
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed=seed, stop_ids=stop_ids,
                       vocab_size=self.decoder.vocab_size, max_new_tokens_limit=self.decoder.max_positions)

    def _check_prompt_text(self, text) -> None:
        """A str without lone surrogates that can fit in max_context (a lower bound on its token count, computed
        without tokenizing, so a megabyte is refused at once)."""
        check_text(text, "the prompt text")
        self.tokenizer.check_length(text, self.decoder.max_context, "the prompt text")

    def _proposals(self, image, boxes, proposals, box_format, scores, image_id, size) -> Proposals:
        if proposals is not None:
            if boxes is not None:
                raise ValueError("give boxes= or proposals=, not both")
            if not callable(proposals):
                raise TypeError(f"proposals= must be a ProposalSource (image -> boxes, scores), got "
                                f"{type(proposals).__name__}; pass boxes in boxes=")
            got = proposals(image, image_id=image_id)
            return got if isinstance(got, Proposals) else as_boxes(got, box_format=box_format, image_size=size)
        if boxes is None:
            raise ValueError("no proposal boxes: pass boxes=[[x1, y1, x2, y2], ...] in image pixels (from any "
                             "detector, or drawn by hand) or proposals=<a ProposalSource>")
        return as_boxes(boxes, box_format=box_format, image_size=size, scores=scores)

    # ------------------------------------------------------------------ tasks
    def detect(self, image, categories: Union[str, Sequence[str]], boxes=None, **kw):
        """Object detection among the proposals (the official OD template). Several categories are joined with
        ", " as the official demo does ("person, dog")."""
        cats = _category_list(categories)
        return self._request("detect", image, lambda n: OD_TEMPLATE.format(", ".join(cats)), len(cats), boxes,
                             **kw)

    def detect_coco(self, image, boxes=None, categories: Sequence[str] = COCO_CATEGORIES, **kw):
        """The official COCO evaluation prompt: every category, "; "-separated (spec §6.2); result.to_coco()."""
        cats = _category_list(categories)
        return self._request("detect_coco", image, lambda n: coco_detection_prompt(cats), len(cats), boxes, **kw)

    def count(self, image, category: str, boxes=None, **kw):
        """How many `category` (one name) there are: the wording of the official counting data ("in the image?").
        result.count is the number (the CountBench rule), result.boxes the objects it located."""
        cat = _one_text(category, "category")
        return self._request("count", image, lambda n: COUNT_TEMPLATE.format(cat), 1, boxes, **kw)

    def refer(self, image, expression: str, boxes=None, **kw):
        """Referring expression comprehension: the boxes that `expression` describes."""
        e = _one_text(expression, "expression")
        return self._request("refer", image, lambda n: REC_TEMPLATE.format(e), 0, boxes, **kw)

    def ground(self, image, boxes=None, **kw):
        """A brief caption with every mentioned object grounded to its boxes."""
        return self._request("ground", image, lambda n: GROUNDING_TEMPLATE, 0, boxes, **kw)

    def describe_region(self, image, index, boxes=None, detailed: bool = False, **kw):
        """A brief (or detailed) caption of one region or several (index: an int or a list of ints)."""
        idx = _indices(index)
        t = DETAILED_REGION_CAPTION_TEMPLATE if detailed else BRIEF_REGION_CAPTION_TEMPLATE
        return self._request("describe_region_detailed" if detailed else "describe_region", image,
                             lambda n: t.format(region_tags(idx, n)), 0, boxes, **kw)

    def read_region(self, image, index, boxes=None, **kw):
        """OCR of one region or several (index: an int or a list of ints)."""
        idx = _indices(index)
        return self._request("read_region", image, lambda n: REGION_OCR_TEMPLATE.format(region_tags(idx, n)), 0,
                             boxes, **kw)

    def detect_like(self, image, reference_indices, boxes=None, **kw):
        """Visual-prompt detection: every other box of the same category as the reference region(s)."""
        idx = _indices(reference_indices)
        return self._request("detect_like", image, lambda n: VISUAL_PROMPT_OD_TEMPLATE.format(region_tags(idx, n)),
                             0, boxes, **kw)

    def reason(self, image, question: str, boxes=None, **kw):
        """Region reasoning: <think>…</think><answer>…</answer> with the regions that support the answer."""
        q = _one_text(question, "question")
        return self._request("reason", image, lambda n: REGION_REASONING_TEMPLATE.format(q), 0, boxes, **kw)

    def chat(self, image, text: str, boxes=None, **kw):
        """A free prompt; refer to boxes as <region0>, <region1>, … (each must name a given box)."""
        t = _one_text(text, "text")
        if boxes is None and kw.get("proposals") is None:
            boxes = []                           # a question about the whole image needs no boxes
        return self._request("chat", image, lambda n: t, 0, boxes, **kw)

    # ------------------------------------------------------------------ streaming, many images
    def stream(self, task: str, image, *args, **kw) -> Iterator[Union[str, FO1Result]]:
        """`for piece in model.stream("detect", img, "dog", boxes=b)`: the answer's text pieces as they are
        generated (str), then the parsed FO1Result as the last item. Same arguments as the task method."""
        return self._task(task)(image, *args, stream=True, **kw)

    def _task(self, task: str):
        if not isinstance(task, str) or task not in TASKS:
            raise ValueError(f"unknown task {task!r}; the tasks are: {', '.join(TASKS)}")
        return getattr(self, task)

    def imap(self, task: str, images: Sequence, *args, boxes=None, scores=None, proposals=None, image_ids=None,
             progress=True, **kw) -> Iterator[FO1Result]:
        """Run `task` on many images with this one loaded model, yielding results in order.

        boxes / scores / image_ids: None or one entry per image; proposals: one ProposalSource for all.
        progress: a tqdm bar over images (True, False, or a dict of tqdm options)."""
        fn = self._task(task)
        images = list(images)
        for name, v in (("boxes", boxes), ("scores", scores), ("image_ids", image_ids)):
            if v is not None and len(v) != len(images):
                raise ValueError(f"{name} has {len(v)} entries for {len(images)} images")
        if boxes is None and proposals is None and task != "chat":
            raise ValueError("no proposal boxes: pass boxes= (one list per image) or proposals=<a ProposalSource>")
        bar = _progress_bar(progress, len(images), task, unit="img")
        try:
            for i, im in enumerate(images):
                one = dict(kw)
                if boxes is not None:
                    one["boxes"] = boxes[i]
                if scores is not None:
                    one["scores"] = scores[i]
                if proposals is not None:
                    one["proposals"] = proposals
                if image_ids is not None:
                    one["image_id"] = image_ids[i]
                yield fn(im, *args, **one)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def batch(self, task: str, images: Sequence, *args, **kw) -> List[FO1Result]:
        """imap, collected into a list."""
        return list(self.imap(task, images, *args, **kw))


FO1 = VLMFO1   # the older name


def _progress_bar(progress, total: int, desc: str, unit: str = "tok"):
    """A tqdm.auto bar (a widget in notebooks, text in a terminal) or None. progress: None/False, True, or a dict
    of tqdm options."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    opts = dict(total=total, desc=desc, unit=unit, leave=False)
    if isinstance(progress, dict):
        opts.update(progress)
    return tqdm(**opts)
