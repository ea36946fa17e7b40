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

import contextlib
import os
import re
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from .aux_image import AuxImageProcessor
from .davit import DavitEncoder
from .config_check import check_fo1
from .context import Conversation, EncodedImage, ImageCache, image_key
from .decoder import LanguageModel
from .constants import IM_END_ID, IMAGE_INDEX, IMAGE_PAD_ID as QWEN_IMAGE_TOKEN, MAX_BOXES, REGION_INDEX
from .fo1_prompt import (BRIEF_REGION_CAPTION_TEMPLATE, COUNT_TEMPLATE, DETAILED_REGION_CAPTION_TEMPLATE,
                         GROUNDING_TEMPLATE, OD_TEMPLATE, REC_TEMPLATE, REGION_OCR_TEMPLATE, REGION_REASONING_TEMPLATE,
                         VISUAL_PROMPT_OD_TEMPLATE, check_boxes, parse_answer, prompt_ids, region_tags)
from .hfre import HFRE, map_boxes
from .generation import GenerationSettings, check_repetition_penalty, check_sampling, decode_stream
from .image import QwenImageProcessor, fo1_global_resize, load_image
from .options import DTYPES, check_options, check_request_length, read_config, read_generation_eos
from .proposals import Proposals, as_boxes
from .qwen_vl import splice_image
from .results import COCO_CATEGORIES, FO1Result
from .tokenizer import check_text
from .safetensors import Checkpoint
from .threads import default_threads
from .vision import VisionTower
from .weight_cache import check_cache_dir
from ._native import core

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
                 path: Optional[str] = None, image_cache: int = 0):
        self.image_cache = ImageCache(image_cache)   # LRU of EncodedImages for the task methods (0 bytes: off)
        self._sessions: List = []                     # idle KV caches, reused by the next request
        self._sessions_lock = threading.Lock()
        self.decoder, self.vision, self.davit, self.hfre = decoder, vision, davit, hfre
        # the five vision-side networks as one C model: a request's encode is one call (csrc/fo1.c)
        self._fused = core.FO1Model(vision._core, davit._core, hfre._core)
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
                        max_context: Optional[int] = None, n_threads: Optional[int] = None,
                        image_cache: int = 0, cache_dir=None) -> "VLMFO1":
        """Load a VLM-FO1 checkpoint folder (the official layout: config.json, safetensors, tokenizer files).

        dtype: None keeps the stored weights (bf16 stays bf16, memory-mapped), "float32" / "bfloat16" convert;
        "int8" quantizes every linear layer (and the convolutions run as matmuls) at load: int8 weights with one
        scale per output channel, activations quantized per token (vlmfo1.quant); "mixed" does that for the
        language model only and keeps the vision towers as stored; "int4" puts the language model's layers in 4-bit
        blocks of 32 (its output layer int8) and keeps the vision towers as stored.
        threads: worker threads (default: vlmfo1.threads.default_threads() — VLMFO1_NUM_THREADS or
        OMP_NUM_THREADS if set, else the CPUs this process may use). mode: "reference" (default) reproduces the
        official run's rounding (ERRATA E1/E2); "exact" is plain fp32 maths. compute: "bf16" / "f32" activations
        with bf16 weights. n_threads: the older name of threads. max_context: the longest prompt (image and region
        slots included) a request may have, an int in [1, max_position_embeddings (at most 2^20)]; default 8192 (or
        the position limit when smaller). Prompt + max_new_tokens must fit in max_position_embeddings.
        image_cache: bytes for an LRU of encoded images (vision features + the KV cache of the shared prompt
        prefix, ~73 KiB per prefix position at 3B): a task on an image and boxes seen before then skips the vision
        towers and the prefix prefill (default 0: off; `model.image_cache.max_bytes` changes it later).
        cache_dir: where int8 / int4 weights are cached between loads, so that a later load maps them instead of
        quantizing again (vlmfo1.weight_cache): None = the default folder ($VLMFO1_CACHE_DIR, else
        $XDG_CACHE_HOME/vlmfo1/weights or ~/.cache/vlmfo1/weights), a folder path, or False = no cache."""
        from .tokenizer import Tokenizer

        if threads is not None and n_threads is not None and threads != n_threads:
            raise ValueError("give threads= or n_threads=, not both")
        ImageCache(image_cache)   # checked before anything is loaded
        check_cache_dir(cache_dir)
        threads = threads if threads is not None else n_threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or not 1 <= threads <= 256):
            raise ValueError(f"threads must be an int in [1, 256], got {threads!r}")
        if dtype not in DTYPES + ("mixed", "int4"):
            raise ValueError(f"dtype must be None, 'float32', 'bfloat16', 'int8', 'mixed' or 'int4', got {dtype!r}")
        check_options(mode, None if dtype in ("mixed", "int4") else dtype, compute)
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint folder not found: {path}" if not os.path.exists(path)
                                    else f"not a checkpoint folder (a file): {path}")
        raw = read_config(path)
        check_fo1(raw)            # every part of config.json, before any tower is loaded
        ckpt = Checkpoint(path)
        try:
            threads = int(threads or default_threads())
            kw = dict(mode=mode, compute=compute, dtype=None if dtype in ("mixed", "int4") else dtype,
                      n_threads=threads, cache_dir=cache_dir)
            if not any(k.startswith("model.object_vp_extractor.") for k in ckpt.keys()) and \
                    not any(k.startswith("model.mm_projector_aux.") for k in ckpt.keys()):
                raise KeyError("no VLM-FO1 region encoder in this checkpoint (no model.object_vp_extractor.* / "
                               "model.mm_projector_aux.* tensors)")
            generation = GenerationSettings.from_pretrained(path, kind="fo1")
            decoder = LanguageModel.from_checkpoint(ckpt, raw, max_context=max_context, default_context=8192,
                                                    generation_eos=read_generation_eos(path), generation=generation,
                                                    **dict(kw, dtype="int8" if dtype == "mixed" else dtype))
            vision = VisionTower.from_checkpoint(ckpt, raw, prefix=FO1_VISION_PREFIX, **kw)
            davit = DavitEncoder.from_checkpoint(ckpt, raw, **kw)
            hfre = HFRE.from_checkpoint(ckpt, raw, **kw)
            tok = Tokenizer.from_pretrained(path, slow=True)
            proc = QwenImageProcessor.from_pretrained(path)
            aux = AuxImageProcessor.from_config(raw)
        except BaseException:
            ckpt.close()  # a failed load releases the mappings and descriptors it opened
            raise
        return cls(decoder, vision, davit, hfre, tok, proc, aux, raw, path=path, image_cache=image_cache)

    @classmethod
    def load(cls, path, mode: str = "reference", compute: Optional[str] = None, dtype: Optional[str] = None,
             n_threads: Optional[int] = None, max_context: Optional[int] = None, cache_dir=None) -> "VLMFO1":
        """The older name of from_pretrained (same arguments, n_threads for threads)."""
        return cls.from_pretrained(path, dtype=dtype, threads=n_threads, mode=mode, compute=compute,
                                   max_context=max_context, cache_dir=cache_dir)

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
        stack = list(arrays.items())
        while stack:
            key, a = stack.pop()
            if isinstance(a, dict):
                stack.extend(a.items())
            elif isinstance(a, (list, tuple)):
                stack.extend((key, v) for v in a)
            elif isinstance(a, np.ndarray) and id(a) not in seen:
                seen.add(id(a))
                if not (isinstance(key, str) and (key.endswith(("_scale", "_wsum", "_sub"))   # int8/int4 bookkeeping
                                                  or (key == "lm_head" and getattr(part, "tied_head_copy", False)))):
                    n += a.size * (2 if a.dtype == np.uint8 else 1)   # uint8: two 4-bit codes a byte
                nbytes += a.nbytes
                if not (isinstance(key, str) and key.endswith("_sub")):
                    kinds.add({np.dtype(np.uint16): "bf16", np.dtype(np.uint8): "int4"}.get(
                        a.dtype, str(a.dtype).replace("float", "f")))
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

    def memory_report(self) -> str:
        """The weights each network holds, by element type, e.g. "weights: decoder 3.15 GiB (int8/f32/bf16), ViT
        1.26 GiB (bf16/f32), ...; 5.10 GiB in all" (memory-mapped stored weights included: what the engine reads)."""
        self._check_open()
        sizes = {name: self._size(p) for name, p in self._parts()}
        parts = ", ".join(f"{name} {b / 2**30:.2f} GiB ({'/'.join(sorted(k))})" for name, (_, b, k) in sizes.items())
        return f"weights: {parts}; {sum(b for _, b, _ in sizes.values()) / 2**30:.2f} GiB in all"

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
        self.decoder = self.vision = self.davit = self.hfre = self._fused = None
        self.image_cache.clear()
        with self._sessions_lock:
            self._sessions.clear()
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
    def encode_features(self, image, boxes, truncate_boxes: bool = False, trace: Optional[dict] = None,
                        timings: Optional[Dict[str, float]] = None, flops: Optional[dict] = None):
        """The vision side of a request: image + boxes ([N, 4] xyxy pixels) -> (image tokens [M, hidden], (gh, gw),
        region tokens [N, hidden], boxes used). `encode` wraps it with the prefix prefill.

        Without trace the networks run as one C call (csrc/fo1.c) that writes the image and region tokens into one
        buffer; with trace they run one by one (the same bits) and every intermediate comes back.
        trace: a dict that receives the named intermediates (pixel values, boxes in aux and Qwen space,
        DaViT and ViT maps, region features), for debugging and the golden tests. timings: a dict that
        receives seconds per stage (preprocess, vit, davit, hfre); flops: a dict that receives the work of each
        network stage, {stage: {"gemm": FLOPs, "attention": FLOPs}} (vit, davit, hfre; see FO1Result.flops)."""
        self._check_open()
        t = trace if trace is not None else {}
        tm = timings if timings is not None else {}
        fl = flops if flops is not None else {}
        clock = time.perf_counter()
        pixel_values, grid_thw, aux_px, boxes_a, boxes_q, b = self.preprocess(image, boxes, truncate_boxes)
        _, gh, gw = (int(v) for v in grid_thw)
        now = time.perf_counter()
        tm["preprocess"], clock = tm.get("preprocess", 0.0) + now - clock, now

        with self._session(1) as s:   # its Workspace: the encoders' threads and scratch, kept between requests
            ws = s.workspace
            if trace is None:
                return self._encode_fused(ws, pixel_values, grid_thw, aux_px, boxes_a, boxes_q, b, tm, fl)
            work = ws.flops
            tokens, vt_maps = self.vision(pixel_values, grid_thw, features=True, workspace=ws)
            image_tokens = self.hfre.project_image(tokens, workspace=ws)
            t.update(pixel_values=pixel_values, image_grid_thw=(1, gh, gw), vt_maps=vt_maps, image_tokens=image_tokens)
            now = time.perf_counter()
            tm["vit"], clock = now - clock, now
            fl["vit"], work = _work_since(work, ws.flops), ws.flops
            if len(b) == 0:
                tm["davit"] = tm["hfre"] = 0.0
                fl.update(_no_work("davit", "hfre"))
                return image_tokens, (gh, gw), np.zeros((0, self.decoder.config.hidden_size), np.float32), b

            aux_maps = self.davit(aux_px, workspace=ws)
            now = time.perf_counter()
            tm["davit"], clock = now - clock, now
            fl["davit"], work = _work_since(work, ws.flops), ws.flops
            feats = self.hfre.region_features([m.transpose(1, 2, 0) for m in vt_maps],
                                              [m.transpose(1, 2, 0) for m in aux_maps], boxes_a, boxes_q,
                                              qwen_hw=(self.processor.patch_size * gh, self.processor.patch_size * gw),
                                              workspace=ws)
            regions = self.hfre.project_regions(feats, workspace=ws)
            tm["hfre"] = time.perf_counter() - clock
            fl["hfre"] = _work_since(work, ws.flops)
        t.update(aux_pixel_values=aux_px, davit_maps=aux_maps, boxes_aux=boxes_a, boxes_vt=boxes_q,
                 region_features=feats, region_tokens=regions)
        return image_tokens, (gh, gw), regions, b

    def _encode_fused(self, ws, pixel_values, grid_thw, aux_px, boxes_a, boxes_q, b, tm, fl):
        """encode_features as one C call: [image tokens | region tokens] written into one buffer (the returned
        arrays are views of it); no feature map comes back to Python. Inputs are checked as the per-network
        wrappers check them."""
        px, gh, gw = self.vision.check_input(pixel_values, grid_thw)
        n = len(b)
        aux = ba = bq = None
        if n:
            aux = self.davit.check_input(aux_px)
            ba, bq, _ = self.hfre.check_boxes(boxes_a, boxes_q)
        u = gh * gw // 4
        buf = np.empty((u + n, self.decoder.config.hidden_size), np.float32)
        tm["vit"], tm["davit"], tm["hfre"] = self._fused.encode(ws, px, gh, gw, aux, ba, bq, buf, 0,
                                                                np.arange(u, u + n), n_threads=self.vision.n_threads,
                                                                work=fl)
        return buf[:u], (gh, gw), buf[u:], b

    def _state_reserve(self) -> int:
        """Bytes of encoder state for the largest request: an image at the FO1 size cap (2048 px sides) with the
        most boxes. Reserved address space only: a request touches the part it uses."""
        try:
            h, w = self.processor.resized_size(2048, 2048)
            wa, ha = self.aux_processor.target_size(2048, 2048)
            p = self.processor.patch_size
            return self._fused.arena_bytes(h // p, w // p, ha, wa, MAX_BOXES, n_threads=self.vision.n_threads)
        except (AttributeError, ValueError):
            return 0

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
            ps = self.processor.patch_size         # the ViT input is gh x gw patches of ps pixels
            boxes_a, boxes_q = map_boxes(b_img, (w_i, h_i), info["aux_size"], (ps * gw, ps * gh))
        return pixel_values, grid_thw, aux_px, boxes_a, boxes_q, b

    def prepare(self, image, boxes, text: str, truncate_boxes: bool = False, trace: Optional[dict] = None,
                timings: Optional[Dict[str, float]] = None):
        """-> (ids with placeholders expanded, input embeddings [L, hidden], positions [3, L], rope delta,
        boxes used, prompt text)."""
        self._check_open()
        b = check_boxes(boxes, truncate=truncate_boxes)
        ids, prompt = self._prompt(text, len(b))        # the text is checked before any image work
        if trace is not None:
            trace["input_ids"] = list(ids)
        image_tokens, grid_hw, regions, _ = self.encode_features(image, b, trace=trace, timings=timings)
        full, emb, pos, delta = self._expand(ids, image_tokens, grid_hw, regions)
        return full, emb, pos, delta, b, prompt

    def _prompt(self, text: str, n_boxes: int):
        """The prompt ids (placeholders not expanded) and text for a user text and n_boxes region slots, checked."""
        self._check_prompt_text(text)
        ids, prompt = prompt_ids(self.tokenizer, text, n_boxes)
        if len(ids) > self.decoder.max_context:   # the image placeholder is one id here, >= 1 position later
            raise ValueError(f"the prompt is {len(ids)} tokens long before the image is added, more than max_context "
                             f"{self.decoder.max_context}: shorten the text, or load the model with a larger "
                             f"max_context (at most {self.decoder.max_positions})")
        if ids.count(IMAGE_INDEX) != 1:
            raise ValueError("the prompt must hold exactly one image")
        if self.image_token_id in ids:
            raise ValueError("the prompt text must not contain <|image_pad|>: the image is placed by the prompt builder")
        if ids.count(REGION_INDEX) != n_boxes:
            raise ValueError("the prompt text must not contain the <regionfeat> marker: region slots are placed by "
                             "the prompt builder (refer to boxes with <regionK>)")
        return ids, prompt

    def _expand(self, ids, image_tokens, grid_hw, regions):
        """Prompt ids with placeholders -> (ids, input embeddings [L, hidden], M-RoPE positions [3, L], rope delta)
        with the image tokens and region tokens in their slots."""
        full, emb, pos, delta = splice_image(self.decoder, ids, ids.index(IMAGE_INDEX), image_tokens, tuple(grid_hw),
                                             self.image_token_id)
        check_request_length(self.decoder, len(full), 0)
        limit = self.config.get("tokenizer_model_max_length")
        if limit and len(full) > int(limit):
            # the official model cuts the spliced embeddings (not the ids) at this length and then fails (ERRATA E7)
            raise ValueError(f"the prompt is {len(full)} positions long with the image and region slots; this "
                             f"checkpoint's tokenizer_model_max_length is {int(limit)}: use a smaller image, fewer "
                             f"boxes or a shorter text")
        emb[[i for i, t in enumerate(full) if t == REGION_INDEX]] = regions
        return full, emb, pos, delta

    # ------------------------------------------------------------------ KV caches + workspaces, reused across requests
    def _acquire_session(self, need: int):
        """An idle KV cache with room for `need` positions (or a new one), with its encoder Workspace
        (`s.workspace`: a thread pool and an arena reserved for the largest request, that only grows): reused across
        requests so that a request neither allocates a KV cache or encoder scratch nor starts threads (see
        _release_session). The thread that acquired it is its only user until it is released."""
        with self._sessions_lock:
            for i, s in enumerate(self._sessions):
                if s.max_context >= need:
                    return self._sessions.pop(i)
        dec = self.decoder
        s = dec.session(max_context=max(dec.max_context, need))
        try:
            s.workspace = core.Workspace(self.vision.n_threads, reserve=self._state_reserve())
        except MemoryError:   # no address space for the worst case (strict overcommit): grow per request instead
            s.workspace = core.Workspace(self.vision.n_threads)
        return s

    def _release_session(self, s) -> None:
        s.reset()
        with self._sessions_lock:
            if self.decoder is not None and len(self._sessions) < _IDLE_SESSIONS:
                self._sessions.append(s)

    @contextlib.contextmanager
    def _session(self, need: int):
        s = self._acquire_session(need)
        try:
            yield s
        finally:
            self._release_session(s)

    # ------------------------------------------------------------------ encoded images (prefix caching)
    def encode(self, image, boxes=None, *, proposals=None, box_format: Optional[str] = None, scores=None,
               image_id=None, truncate_boxes: bool = False) -> EncodedImage:
        """Run the vision side once and prefill the prompt prefix every task shares; ask the result any number of
        tasks: `ctx = model.encode(img, boxes=b); ctx.detect("dog"); ctx.count("dog"); ctx.chat("…")`. Each task
        then prefills only its own text (answers bit-identical to `model.detect(img, "dog", boxes=b)` etc.).
        Boxes as the task methods take them (boxes= in any form with box_format=/scores=, or proposals=); no boxes
        at all is allowed (questions about the whole image). With an image cache (image_cache=) the result is
        also kept there for the task methods to find."""
        self._check_open()
        _check_flag(truncate_boxes, "truncate_boxes")
        timings: Dict[str, float] = {}
        clock = time.perf_counter()
        img = load_image(image)
        h, w = img.shape[:2]
        if boxes is None and proposals is None:
            boxes = []
        props = self._proposals(image, boxes, proposals, box_format, scores, image_id, (w, h))
        b = check_boxes(props.boxes, truncate=truncate_boxes)
        sc = None if props.scores is None else np.asarray(props.scores, dtype=np.float64)[:len(b)]
        source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else img
        return self._context(img, source, b, sc, timings, clock, prefix=True)

    def _encode_new(self, img, source, b, sc, timings, clock, prefix: bool, flops=None) -> EncodedImage:
        fl = flops if flops is not None else {}
        image_tokens, grid_hw, regions, _ = self.encode_features(img, b, timings=timings, flops=fl)
        timings["preprocess"] += time.perf_counter() - clock - sum(timings.values())   # + loading and checks
        ctx = EncodedImage(self, img, source, b, sc, image_tokens, grid_hw, regions, timings, fl)
        if prefix:
            t0 = time.perf_counter()
            ids, _ = prompt_ids(self.tokenizer, "", len(b))
            with self._session(1) as s:
                work = s.flops
                ctx._prefill_prefix(s, ids)
                ctx.encode_flops["prefix"] = _work_since(work, s.flops)
            ctx.encode_timings["prefix"] = time.perf_counter() - t0
        return ctx

    def _context(self, img, source, b, sc, timings, clock, prefix: bool = False, flops=None) -> EncodedImage:
        """The EncodedImage of one image and its boxes: from the image cache, or encoded now (kept there when the
        cache is on). prefix: snapshot the shared prompt prefix (always when the result is cached)."""
        key = image_key(img, b) if self.image_cache.max_bytes else None
        ctx = self.image_cache.get(key) if key is not None else None
        if ctx is not None:
            timings.update(vit=0.0, davit=0.0, hfre=0.0)
            timings["preprocess"] = time.perf_counter() - clock
            if flops is not None:
                flops.update(_no_work("vit", "davit", "hfre"))
            return ctx
        ctx = self._encode_new(img, source, b, sc, timings, clock, prefix=prefix or key is not None, flops=flops)
        if key is not None:
            self.image_cache.put(key, ctx)
        return ctx

    # ------------------------------------------------------------------ one request, low level
    def stream_ids(self, image, boxes, text: str, max_new_tokens: int = 512, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None, stop_ids=None,
                   truncate_boxes: bool = False, repetition_penalty: Optional[float] = None) -> Iterator[int]:
        """The new token ids of one request, one at a time (low level: boxes as [N, 4] xyxy pixels)."""
        self._check_open()
        gen = self._check_generation(max_new_tokens, temperature, top_p, top_k, seed, stop_ids, repetition_penalty)
        b = check_boxes(boxes, truncate=truncate_boxes)
        ids, _ = self._prompt(text, len(b))
        img = load_image(image)
        ctx = self._encode_new(img, img, b, None, {}, time.perf_counter(), prefix=False)
        yield from self._tokens(ctx, ids, gen, {})

    def generate(self, image, boxes, text: str, truncate_boxes: bool = False, **kw) -> FO1Result:
        """Run one free prompt (low level: boxes as [N, 4] xyxy pixels; `chat` is the full-featured form)."""
        return self.chat(image, text, boxes=boxes, truncate_boxes=truncate_boxes, **kw)

    def _tokens(self, ctx: EncodedImage, ids, gen: dict, timings: Dict[str, float],
                session=None, flops: Optional[dict] = None) -> Iterator[int]:
        """Prefill the prompt `ids` (placeholders) on ctx — the cached prefix restored, or prefilled first — then
        decode. gen: the checked generation options (max_new_tokens set); timings / flops receive the prefill and
        decode stages' seconds / work."""
        dec = self.decoder
        n_prompt = len(ids) - 1 + len(ctx.image_tokens)
        check_request_length(dec, n_prompt, gen["max_new_tokens"])
        with contextlib.ExitStack() as stack:
            s = session if session is not None else stack.enter_context(self._session(n_prompt + gen["max_new_tokens"]))
            clock, work = time.perf_counter(), s.flops
            full, logits = ctx._start(s, ids)
            now = time.perf_counter()
            timings["prefill"], clock = now - clock, now
            timings["decode"] = 0.0
            yield from self._decode(s, logits, full, gen, timings, clock, work, flops)

    def _decode(self, s, logits, ids, gen, timings, clock, work, flops) -> Iterator[int]:
        """The decode loop after a prefill that started with the session's counters at `work` and ended at `clock`:
        the tokens, with timings["decode"] and flops["prefill"] / flops["decode"] kept up to date."""
        if flops is not None:
            flops["prefill"], work = _work_since(work, s.flops), s.flops
            flops.update(_no_work("decode"))
        try:
            # the penalty (if asked for) sees the prompt's real ids, as the official computation with its negative
            # placeholder ids skipped (the official run itself fails on them; vlmfo1/generation.py)
            context = [t for t in ids if t >= 0 and t != self.image_token_id]
            sampling = {k: v for k, v in gen.items() if k != "max_new_tokens"}
            for tok in decode_stream(self.decoder, s, logits, gen["max_new_tokens"], context_ids=context, **sampling):
                timings["decode"] = time.perf_counter() - clock
                yield tok
            timings["decode"] = time.perf_counter() - clock
        finally:
            if flops is not None:
                flops["decode"] = _work_since(work, s.flops)

    # ------------------------------------------------------------------ one request, every option
    def _check_generation(self, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop_ids=None,
                          repetition_penalty=None) -> dict:
        if stop_ids is not None and not isinstance(stop_ids, (str, bytes, dict)) and hasattr(stop_ids, "__iter__"):
            stop_ids = list(stop_ids)   # read once (a generator would be used up by the check)
        check_sampling(0 if max_new_tokens is None else max_new_tokens, temperature, top_p, top_k, seed=seed,
                       stop_ids=stop_ids, vocab_size=self.decoder.vocab_size,
                       max_new_tokens_limit=self.decoder.max_positions)
        if repetition_penalty is not None:
            check_repetition_penalty(repetition_penalty)
        return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    stop_ids=stop_ids, repetition_penalty=repetition_penalty)

    def _check_longest(self, make_text: Callable[[int], str]) -> None:
        """The text with the most region tags it can have: too long a text is refused before the image is read."""
        try:
            longest = make_text(MAX_BOXES)
        except ValueError:   # a region index beyond every box: refused with the real box count later
            return
        self._check_prompt_text(longest)

    def _task_text(self, make_text: Callable[[int], str], n_boxes: int) -> str:
        text = make_text(n_boxes)
        bad = [int(k) for k in _REGION_REF.findall(text) if int(k) >= n_boxes]
        if bad:
            raise ValueError(f"the prompt names <region{bad[0]}> but there are only {n_boxes} boxes "
                             f"(valid: <region0>..<region{n_boxes - 1}>)" if n_boxes else
                             f"the prompt names <region{bad[0]}> but no boxes were given")
        return text

    def _request(self, task: str, image, make_text: Callable[[int], str], per_category: int, boxes, *,
                 proposals=None, box_format: Optional[str] = None, scores=None, image_id=None, truncate_boxes: bool = False,
                 max_new_tokens: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: Optional[int] = None, stop_ids=None, repetition_penalty: Optional[float] = None,
                 progress=None, stream: bool = False):
        """Everything a task call does; returns the FO1Result, or with stream=True an iterator of text pieces
        that ends with the FO1Result."""
        self._check_open()
        gen = self._check_generation(max_new_tokens, temperature, top_p, top_k, seed, stop_ids, repetition_penalty)
        _check_flag(truncate_boxes, "truncate_boxes")
        self._check_longest(make_text)
        timings: Dict[str, float] = {}
        clock = time.perf_counter()
        img = load_image(image)
        h, w = img.shape[:2]
        props = self._proposals(image, boxes, proposals, box_format, scores, image_id, (w, h))
        b = check_boxes(props.boxes, truncate=truncate_boxes)
        sc = None if props.scores is None else np.asarray(props.scores, dtype=np.float64)[:len(b)]
        text = self._task_text(make_text, len(b))
        ids, _ = self._prompt(text, len(b))
        source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else img
        flops: Dict[str, Dict[str, int]] = {}
        ctx = self._context(img, source, b, sc, timings, clock, flops=flops)
        return self._answer(ctx, task, ids, text, per_category, gen, timings, b, sc, source, (w, h), progress, stream,
                            flops)

    def _request_encoded(self, ctx: EncodedImage, task: str, make_text: Callable[[int], str], per_category: int, *,
                         max_new_tokens: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0,
                         top_k: int = 0, seed: Optional[int] = None, stop_ids=None,
                         repetition_penalty: Optional[float] = None, progress=None, stream: bool = False):
        """A task on an EncodedImage: the same request with the vision side and the prompt prefix reused."""
        self._check_open()
        if ctx.model is not self:
            raise ValueError("this EncodedImage was made by another model")
        gen = self._check_generation(max_new_tokens, temperature, top_p, top_k, seed, stop_ids, repetition_penalty)
        self._check_longest(make_text)
        clock = time.perf_counter()
        text = self._task_text(make_text, len(ctx.boxes))
        ids, _ = self._prompt(text, len(ctx.boxes))
        timings = dict(preprocess=time.perf_counter() - clock, vit=0.0, davit=0.0, hfre=0.0)
        return self._answer(ctx, task, ids, text, per_category, gen, timings, ctx.boxes, ctx.scores, ctx.source,
                            ctx.image_size, progress, stream, _no_work("vit", "davit", "hfre"))

    def _answer(self, ctx, task, ids, text, per_category, gen, timings, b, sc, source, size, progress, stream,
                flops):
        """Decode the answer of one prompt on ctx and parse it (or stream it)."""
        if gen["max_new_tokens"] is None:   # sized for the task, within the model's positions
            base, per_box, per_cat = MAX_NEW_TOKENS[task]
            gen["max_new_tokens"] = min(base + per_box * len(b) + per_cat * per_category,
                                        self.decoder.max_positions - (len(ids) - 1 + len(ctx.image_tokens)))
        stops = set(self.decoder.stop_ids if gen["stop_ids"] is None else gen["stop_ids"])
        fields = dict(task=task, prompt=text, image_size=size, timings=timings, image=source, flops=flops)

        def run():
            toks: List[int] = []
            yield from self._pieces(self._tokens(ctx, ids, gen, timings, flops=flops), toks, progress,
                                    gen["max_new_tokens"], task)
            finish = "stop" if toks and toks[-1] in stops else "length"
            yield parse_answer(self.tokenizer.decode(toks).strip(), b, toks, scores=sc, finish_reason=finish,
                               **fields)

        it = run()
        if stream:
            return it
        for last in it:
            pass
        return last

    def _pieces(self, token_iter, toks: List[int], progress, total: int, desc: str) -> Iterator[str]:
        """The answer's text pieces as the tokens of token_iter come (each also appended to toks), with a progress
        bar over tokens when asked for."""
        bar = _progress_bar(progress, total, desc)

        def tokens():
            for tok in token_iter:
                toks.append(tok)
                if bar is not None:
                    bar.update(1)
                yield tok
        try:
            yield from self.tokenizer.incremental_decoder()(tokens())
        finally:
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------ multi-turn chat on an EncodedImage
    def _converse(self, conv: Conversation, text: str, max_new_tokens: Optional[int] = None, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None, stop_ids=None,
                  repetition_penalty: Optional[float] = None, progress=None):
        """Check the options and the text now; the turn itself (which owns the conversation while it runs) starts
        when the returned iterator is first advanced, so an iterator that is never used holds nothing."""
        self._check_open()
        gen = self._check_generation(max_new_tokens, temperature, top_p, top_k, seed, stop_ids, repetition_penalty)
        t = _one_text(text, "text")
        self._task_text(lambda n: t, len(conv.ctx.boxes))
        self._check_prompt_text(t)
        return self._turn(conv, t, gen, progress)

    def _turn(self, conv: Conversation, text, gen, progress):
        ctx, dec = conv.ctx, self.decoder
        if not conv._lock.acquire(blocking=False):
            raise RuntimeError("this conversation is answering in another thread; one turn at a time")
        try:
            if conv._session is None:            # the first turn: the one-turn chat prompt
                ids, _ = self._prompt(text, len(ctx.boxes))
                feed = None
            else:                                # later turns: the answer's last token + the next user turn
                end = [] if conv._pending and conv._pending[-1] == IM_END_ID else [IM_END_ID]
                feed = conv._pending + end + self.tokenizer.encode(
                    "\n<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n")
                ids = conv._ids + feed
            n_prompt = len(ids) - 1 + len(ctx.image_tokens)
            if gen["max_new_tokens"] is None:
                gen["max_new_tokens"] = min(MAX_NEW_TOKENS["chat"][0], dec.max_positions - n_prompt)
            check_request_length(dec, n_prompt, gen["max_new_tokens"])
            if conv._session is not None and n_prompt + gen["max_new_tokens"] > conv._session.max_context:
                raise ValueError(f"the conversation would reach {n_prompt + gen['max_new_tokens']} positions, more "
                                 f"than its KV cache holds ({conv._session.max_context}); start a new conversation or "
                                 "ask for fewer max_new_tokens")
            timings = dict(preprocess=0.0, vit=0.0, davit=0.0, hfre=0.0)
            flops = _no_work("vit", "davit", "hfre")
            stops = set(dec.stop_ids if gen["stop_ids"] is None else gen["stop_ids"])
            toks: List[int] = []
            if conv._session is None:
                conv._session = self._acquire_session(dec.max_context)
                inner = self._tokens(ctx, ids, gen, timings, session=conv._session, flops=flops)
            else:
                inner = self._continue(conv._session, feed, ids, gen, timings, flops)
            try:
                yield from self._pieces(inner, toks, progress, gen["max_new_tokens"], "chat")
            finally:
                conv._ids, conv._pending = ids + toks[:-1], toks[-1:]   # the last token is not in the KV cache yet
            finish = "stop" if toks and toks[-1] in stops else "length"
            res = parse_answer(self.tokenizer.decode(toks).strip(), ctx.boxes, toks, scores=ctx.scores,
                               finish_reason=finish, task="chat", prompt=text, image_size=ctx.image_size,
                               timings=timings, image=ctx.source, flops=flops)
            conv.turns.append(res)
            yield res
        finally:
            conv._lock.release()

    def _continue(self, s, feed, ids, gen, timings, flops=None) -> Iterator[int]:
        clock, work = time.perf_counter(), s.flops
        logits = s.prefill(np.asarray(feed, dtype=np.int64))
        now = time.perf_counter()
        timings["prefill"], clock = now - clock, now
        timings["decode"] = 0.0
        yield from self._decode(s, logits, ids, gen, timings, clock, work, flops)

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
    @staticmethod
    def _prompt_for(task: str, *args):
        """A task's arguments -> (the text for n boxes, a function of n; the number of categories), checked."""
        if task in ("detect", "detect_coco"):
            arg = args[0] if args else None
            cats = _category_list(COCO_CATEGORIES if arg is None and task == "detect_coco" else arg)
            if task == "detect":
                return (lambda n: OD_TEMPLATE.format(", ".join(cats))), len(cats)
            return (lambda n: coco_detection_prompt(cats)), len(cats)
        if task == "count":
            cat = _one_text(args[0], "category")
            return (lambda n: COUNT_TEMPLATE.format(cat)), 1
        if task == "refer":
            e = _one_text(args[0], "expression")
            return (lambda n: REC_TEMPLATE.format(e)), 0
        if task == "ground":
            return (lambda n: GROUNDING_TEMPLATE), 0
        if task in ("describe_region", "describe_region_detailed", "read_region", "detect_like"):
            idx = _indices(args[0])
            t = {"describe_region": BRIEF_REGION_CAPTION_TEMPLATE, "read_region": REGION_OCR_TEMPLATE,
                 "describe_region_detailed": DETAILED_REGION_CAPTION_TEMPLATE,
                 "detect_like": VISUAL_PROMPT_OD_TEMPLATE}[task]
            return (lambda n: t.format(region_tags(idx, n))), 0
        if task == "reason":
            q = _one_text(args[0], "question")
            return (lambda n: REGION_REASONING_TEMPLATE.format(q)), 0
        if task == "chat":
            t = _one_text(args[0], "text")
            return (lambda n: t), 0
        raise ValueError(f"unknown task {task!r}")

    def detect(self, image, categories: Union[str, Sequence[str]], boxes=None, **kw):
        """Object detection among the proposals (the official OD template). Several categories are joined with
        ", " as the official demo does ("person, dog")."""
        return self._request("detect", image, *self._prompt_for("detect", categories), boxes, **kw)

    def detect_coco(self, image, boxes=None, categories: Sequence[str] = COCO_CATEGORIES, **kw):
        """The official COCO evaluation prompt: every category, "; "-separated (spec §6.2); result.to_coco()."""
        return self._request("detect_coco", image, *self._prompt_for("detect_coco", categories), boxes, **kw)

    def count(self, image, category: str, boxes=None, **kw):
        """How many `category` (one name) there are: the wording of the official counting data ("in the image?").
        result.count is the number (the CountBench rule), result.boxes the objects it located."""
        return self._request("count", image, *self._prompt_for("count", category), boxes, **kw)

    def refer(self, image, expression: str, boxes=None, **kw):
        """Referring expression comprehension: the boxes that `expression` describes."""
        return self._request("refer", image, *self._prompt_for("refer", expression), boxes, **kw)

    def ground(self, image, boxes=None, **kw):
        """A brief caption with every mentioned object grounded to its boxes."""
        return self._request("ground", image, *self._prompt_for("ground"), boxes, **kw)

    def describe_region(self, image, index, boxes=None, detailed: bool = False, **kw):
        """A brief (or detailed) caption of one region or several (index: an int or a list of ints)."""
        task = "describe_region_detailed" if detailed else "describe_region"
        return self._request(task, image, *self._prompt_for(task, index), boxes, **kw)

    def read_region(self, image, index, boxes=None, **kw):
        """OCR of one region or several (index: an int or a list of ints)."""
        return self._request("read_region", image, *self._prompt_for("read_region", index), boxes, **kw)

    def detect_like(self, image, reference_indices, boxes=None, **kw):
        """Visual-prompt detection: every other box of the same category as the reference region(s)."""
        return self._request("detect_like", image, *self._prompt_for("detect_like", reference_indices), boxes, **kw)

    def reason(self, image, question: str, boxes=None, **kw):
        """Region reasoning: <think>…</think><answer>…</answer> with the regions that support the answer."""
        return self._request("reason", image, *self._prompt_for("reason", question), boxes, **kw)

    def chat(self, image, text: str, boxes=None, **kw):
        """A free prompt; refer to boxes as <region0>, <region1>, … (each must name a given box)."""
        made = self._prompt_for("chat", text)
        if boxes is None and kw.get("proposals") is None:
            boxes = []                           # a question about the whole image needs no boxes
        return self._request("chat", image, *made, boxes, **kw)

    # ------------------------------------------------------------------ streaming, many images
    def stream(self, task: str, image, *args, **kw) -> Iterator[Union[str, FO1Result]]:
        """`for piece in model.stream("detect", img, "dog", boxes=b)`: the answer's text pieces as they are
        generated (str), then the parsed FO1Result as the last item. Same arguments as the task method."""
        return self._task(task)(image, *args, stream=True, **kw)

    def _task(self, task: str):
        if not isinstance(task, str) or task not in TASKS:
            raise ValueError(f"unknown task {task!r}; the tasks are: {', '.join(TASKS)}")
        return getattr(self, task)

    def _task_on(self, ctx: EncodedImage, task: str):
        if not isinstance(task, str) or task not in TASKS:
            raise ValueError(f"unknown task {task!r}; the tasks are: {', '.join(TASKS)}")
        return getattr(ctx, task)

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
_IDLE_SESSIONS = 4   # idle KV caches a model keeps for reuse (one per thread that ran requests at once, up to this)


def _no_work(*stages: str) -> Dict[str, Dict[str, int]]:
    """FO1Result.flops of stages that did not run (fresh dicts: a result's are its own)."""
    return {s: {"gemm": 0, "attention": 0} for s in stages}


def _work_since(before: Dict[str, int], now: Dict[str, int]) -> Dict[str, int]:
    """The work counters' difference between two reads of one Workspace / Session (FO1Result.flops)."""
    return {k: now[k] - before[k] for k in now}


def _check_flag(value, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


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
