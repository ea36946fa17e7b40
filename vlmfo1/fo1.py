"""VLM-FO1: detection and region understanding by picking proposal boxes by index.

    fo1 = FO1.load("/path/to/VLM-FO1_Qwen2.5-VL-3B-v01")          # the official checkpoint layout
    res = fo1.detect("photo.jpg", boxes, ["person", "dog"])       # boxes: [N, 4] x1,y1,x2,y2 pixels
    res.by_label()  -> {"person": [(x1, y1, x2, y2), ...], ...}
    fo1.generate(image, boxes, "Provide a brief description for <region2>.").text

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
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from .aux_image import AuxImageProcessor
from .davit import DavitEncoder
from .decoder import (LanguageModel, check_options, check_sampling, decode_stream, default_threads, read_config,
                      read_generation_eos)
from .fo1_prompt import (BRIEF_REGION_CAPTION_TEMPLATE, COCO_CATEGORIES, DETAILED_REGION_CAPTION_TEMPLATE,
                         GROUNDING_TEMPLATE, IMAGE_INDEX, MAX_BOXES, OD_COUNTING_TEMPLATE, OD_TEMPLATE, REC_TEMPLATE,
                         REGION_INDEX, REGION_OCR_TEMPLATE, REGION_REASONING_TEMPLATE, VISUAL_PROMPT_OD_TEMPLATE,
                         FO1Result, check_boxes, parse_answer, prompt_ids, region_tags)
from .hfre import HFRE, map_boxes
from .generation import GenerationSettings
from .image import QwenImageProcessor, fo1_global_resize, load_image
from .qwen_vl import splice_image
from .safetensors import Checkpoint
from .vision import VisionTower

QWEN_IMAGE_TOKEN = 151655          # <|image_pad|>, when config.json does not name image_token_id
FO1_VISION_PREFIX = "model.vision_tower.image_tower."


def coco_detection_prompt(categories: Sequence[str] = COCO_CATEGORIES) -> str:
    """The wording of the official COCO evaluation data (not OD_TEMPLATE; spec §6.2)."""
    return f"Please detect {'; '.join(categories)} in the image and return the object indexes."


class FO1:
    """A loaded VLM-FO1 model: decoder, Qwen2.5-VL ViT, DaViT, HFRE, projectors, tokenizer, processors."""

    def __init__(self, decoder: LanguageModel, vision: VisionTower, davit: DavitEncoder, hfre: HFRE, tokenizer,
                 processor: QwenImageProcessor, aux_processor: AuxImageProcessor, raw_config: dict):
        self.decoder, self.vision, self.davit, self.hfre = decoder, vision, davit, hfre
        self.tokenizer, self.processor, self.aux_processor = tokenizer, processor, aux_processor
        self.config = raw_config
        self.image_token_id = int(raw_config.get("image_token_id", QWEN_IMAGE_TOKEN))
        missing = [f"<region{i}>" for i in range(MAX_BOXES) if tokenizer.token_to_id(f"<region{i}>") is None]
        if missing:
            raise ValueError(f"the tokenizer lacks FO1's region tokens ({missing[0]} …): not a VLM-FO1 checkpoint?")

    @classmethod
    def load(cls, path: str, mode: str = "reference", compute: Optional[str] = None, dtype: Optional[str] = None,
             n_threads: Optional[int] = None, max_context: int = 8192) -> "FO1":
        """Load a VLM-FO1 checkpoint folder. mode="reference" (default) reproduces the official run's
        rounding (ERRATA E1/E2); "exact" is plain fp32 maths."""
        from .tokenizer import Tokenizer

        check_options(mode, dtype, compute)
        path = os.fspath(path)
        raw = read_config(path)
        ckpt = Checkpoint(path)
        n_threads = n_threads or default_threads()
        kw = dict(mode=mode, compute=compute, dtype=dtype, n_threads=n_threads)
        if not any(k.startswith("model.object_vp_extractor.") for k in ckpt.keys()) and \
                not any(k.startswith("model.mm_projector_aux.") for k in ckpt.keys()):
            raise KeyError("no VLM-FO1 region encoder in this checkpoint (no model.object_vp_extractor.* / "
                           "model.mm_projector_aux.* tensors)")
        decoder = LanguageModel.from_checkpoint(ckpt, raw, max_context=max_context,
                                                generation_eos=read_generation_eos(path),
                                                generation=GenerationSettings.from_pretrained(path, kind="fo1"), **kw)
        vision = VisionTower.from_checkpoint(ckpt, raw, prefix=FO1_VISION_PREFIX, **kw)
        davit = DavitEncoder.from_checkpoint(ckpt, raw, **kw)
        hfre = HFRE.from_checkpoint(ckpt, raw, **kw)
        tok = Tokenizer.from_pretrained(path, slow=True)
        proc = QwenImageProcessor.from_pretrained(path)
        aux = AuxImageProcessor.from_config(raw)
        return cls(decoder, vision, davit, hfre, tok, proc, aux, raw)

    # ------------------------------------------------------------------ one request
    def encode(self, image, boxes, truncate_boxes: bool = False, trace: Optional[dict] = None):
        """Image + boxes -> (image tokens [M, hidden], (gh, gw), region tokens [N, hidden], boxes used).

        trace: a dict that receives the named intermediates (pixel values, boxes in aux and Qwen space,
        DaViT and ViT maps, region features), for debugging and the golden tests."""
        t = trace if trace is not None else {}
        img = load_image(image)
        b = check_boxes(boxes, truncate=truncate_boxes)
        img, rx, ry = fo1_global_resize(img)
        b_img = b * np.array([rx, ry, rx, ry], dtype=np.float64)
        h_i, w_i = img.shape[:2]

        pixel_values, grid_thw, _ = self.processor(img)
        _, gh, gw = (int(v) for v in grid_thw)
        tokens, vt_maps = self.vision(pixel_values, grid_thw, features=True)
        image_tokens = self.hfre.project_image(tokens)
        t.update(pixel_values=pixel_values, image_grid_thw=(1, gh, gw), vt_maps=vt_maps, image_tokens=image_tokens)

        if len(b) == 0:
            return image_tokens, (gh, gw), np.zeros((0, self.decoder.config.hidden_size), np.float32), b
        aux_px, info = self.aux_processor(img)
        aux_maps = self.davit(aux_px)
        boxes_a, boxes_q = map_boxes(b_img, (w_i, h_i), info["aux_size"], (14 * gw, 14 * gh))
        feats = self.hfre.region_features([m.transpose(1, 2, 0) for m in vt_maps],
                                          [m.transpose(1, 2, 0) for m in aux_maps], boxes_a, boxes_q,
                                          qwen_hw=(14 * gh, 14 * gw))
        regions = self.hfre.project_regions(feats)
        t.update(aux_pixel_values=aux_px, davit_maps=aux_maps, boxes_aux=boxes_a, boxes_vt=boxes_q,
                 region_features=feats, region_tokens=regions)
        return image_tokens, (gh, gw), regions, b

    def prepare(self, image, boxes, text: str, truncate_boxes: bool = False, trace: Optional[dict] = None):
        """-> (ids with placeholders expanded, input embeddings [L, hidden], positions [3, L], rope delta,
        boxes used, prompt text)."""
        b = check_boxes(boxes, truncate=truncate_boxes)
        ids, prompt = prompt_ids(self.tokenizer, text, len(b))   # the text is checked before any image work
        if ids.count(IMAGE_INDEX) != 1:
            raise ValueError("the prompt must hold exactly one image")
        if self.image_token_id in ids:
            raise ValueError("the prompt text must not contain <|image_pad|>: the image is placed by the prompt builder")
        if ids.count(REGION_INDEX) != len(b):
            raise ValueError("the prompt text must not contain the <regionfeat> marker: region slots are placed by "
                             "the prompt builder (refer to boxes with <regionK>)")
        if trace is not None:
            trace["input_ids"] = list(ids)
        image_tokens, (gh, gw), regions, _ = self.encode(image, b, trace=trace)
        full, emb, pos, delta = splice_image(self.decoder, ids, ids.index(IMAGE_INDEX), image_tokens, (gh, gw),
                                             self.image_token_id)
        limit = self.config.get("tokenizer_model_max_length")
        if limit and len(full) > int(limit):
            # the official model cuts the spliced embeddings (not the ids) at this length and then fails (ERRATA E7)
            raise ValueError(f"the prompt is {len(full)} positions long with the image and region slots; this "
                             f"checkpoint's tokenizer_model_max_length is {int(limit)}: use a smaller image, fewer "
                             f"boxes or a shorter text")
        emb[[i for i, t in enumerate(full) if t == REGION_INDEX]] = regions
        return full, emb, pos, delta, b, prompt

    def stream_ids(self, image, boxes, text: str, max_new_tokens: int = 512, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None, stop_ids=None,
                   truncate_boxes: bool = False, repetition_penalty: Optional[float] = None) -> Iterator[int]:
        check_sampling(max_new_tokens, temperature, top_p, top_k)
        ids, emb, pos, delta, _, _ = self.prepare(image, boxes, text, truncate_boxes)
        dec = self.decoder
        s = dec.session(max_context=max(dec.max_context, len(ids) + max_new_tokens))
        logits = s.prefill_embeds(emb, pos)
        s.rope_delta = delta
        yield from decode_stream(dec, s, logits, max_new_tokens, temperature, top_p, top_k, seed, stop_ids,
                                 context_ids=[t for t in ids if t >= 0 and t != self.image_token_id],
                                 repetition_penalty=repetition_penalty)

    def generate(self, image, boxes, text: str, truncate_boxes: bool = False, **kw) -> FO1Result:
        """Run one prompt; the answer is parsed against the boxes (given in original image pixels)."""
        b = check_boxes(boxes, truncate=truncate_boxes)
        toks = list(self.stream_ids(image, b, text, **kw))
        text_out = self.tokenizer.decode(toks).strip()
        return parse_answer(text_out, b, toks)

    # ------------------------------------------------------------------ tasks
    def detect(self, image, boxes, categories: Union[str, Sequence[str]], **kw) -> FO1Result:
        """Object detection among the proposals: the official OD template."""
        cats = categories if isinstance(categories, str) else ", ".join(categories)
        return self.generate(image, boxes, OD_TEMPLATE.format(cats), **kw)

    def detect_coco(self, image, boxes, **kw) -> FO1Result:
        return self.generate(image, boxes, coco_detection_prompt(), **kw)

    def count(self, image, boxes, category: str, **kw) -> FO1Result:
        return self.generate(image, boxes, OD_COUNTING_TEMPLATE.format(category), **kw)

    def refer(self, image, boxes, expression: str, **kw) -> FO1Result:
        return self.generate(image, boxes, REC_TEMPLATE.format(expression), **kw)

    def ground(self, image, boxes, **kw) -> FO1Result:
        return self.generate(image, boxes, GROUNDING_TEMPLATE, **kw)

    def describe_region(self, image, boxes, index: int, detailed: bool = False, **kw) -> FO1Result:
        t = DETAILED_REGION_CAPTION_TEMPLATE if detailed else BRIEF_REGION_CAPTION_TEMPLATE
        return self._about_regions(image, boxes, t, [index], kw)

    def read_region(self, image, boxes, index: int, **kw) -> FO1Result:
        return self._about_regions(image, boxes, REGION_OCR_TEMPLATE, [index], kw)

    def detect_like(self, image, boxes, reference_indices: Sequence[int], **kw) -> FO1Result:
        return self._about_regions(image, boxes, VISUAL_PROMPT_OD_TEMPLATE, reference_indices, kw)

    def _about_regions(self, image, boxes, template: str, indices: Sequence[int], kw) -> FO1Result:
        """A template that names some of the boxes: every index must be one of them (ValueError otherwise)."""
        b = check_boxes(boxes, truncate=kw.pop("truncate_boxes", False))
        return self.generate(image, b, template.format(region_tags(indices, len(b))), **kw)

    def reason(self, image, boxes, question: str, **kw) -> FO1Result:
        return self.generate(image, boxes, REGION_REASONING_TEMPLATE.format(question), **kw)
