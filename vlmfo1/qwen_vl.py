"""Plain Qwen2.5-VL: image + text in, text out (a checkpoint in the stock `visual.*` layout).

    vl = QwenVL.load("/path/to/Qwen2.5-VL-3B-Instruct")
    print(vl.generate("photo.jpg", "Describe the image.", max_new_tokens=64))
    for piece in vl.stream(image, "What is in the box?"): print(piece, end="")

The image goes through the Qwen2.5-VL image processor and the vision tower; its merged tokens
replace the `<|image_pad|>` placeholder in the ChatML prompt, and the decoder runs with M-RoPE 3-D
positions (get_rope_index rules) and the rope delta during decode.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .config_check import check_decoder, check_vision
from .constants import DEFAULT_SYSTEM_PROMPT, IMAGE_PAD_ID
from .decoder import LanguageModel, Session
from .generation import GenerationSettings, check_repetition_penalty, check_sampling, decode_stream
from .image import QwenImageProcessor, load_image
from .options import check_options, check_request_length, read_config, read_generation_eos
from .safetensors import Checkpoint
from .threads import check_threads
from .tokenizer import check_text
from .vision import VisionTower
from .weight_cache import check_cache_dir

IMAGE_PAD = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
DEFAULT_SYSTEM = DEFAULT_SYSTEM_PROMPT


def rope_positions(ids: Sequence[int], image_spans: Sequence[Tuple[int, int, int, int]]) -> Tuple[np.ndarray, int]:
    """M-RoPE positions [3, L] for a sequence with image blocks, and the rope delta for decoding.

    image_spans: (start, length, lh, lw) of each block of image tokens (length = lh*lw), in order.
    Text (and anything that is not an image token) gets one shared counter on all three axes; an image
    block starting after text position s gets (s, s + row, s + col); the text after it continues at
    s + max(lh, lw) (transformers' get_rope_index for images)."""
    L = len(ids)
    pos = np.zeros((3, L), dtype=np.int64)
    nxt, i = 0, 0
    for start, length, lh, lw in sorted(image_spans):
        n = start - i
        pos[:, i:start] = np.arange(nxt, nxt + n)
        nxt += n
        r, c = np.divmod(np.arange(lh * lw), lw)
        pos[0, start:start + length] = nxt
        pos[1, start:start + length] = nxt + r
        pos[2, start:start + length] = nxt + c
        nxt += max(lh, lw)
        i = start + length
    pos[:, i:] = np.arange(nxt, nxt + L - i)
    delta = int(pos.max()) + 1 - L if L else 0
    return pos.astype(np.int32), delta


def splice_image(decoder: LanguageModel, ids: Sequence[int], p: int, image_tokens: np.ndarray, grid_hw: Tuple[int, int],
                 image_token_id: int):
    """Expand the one image placeholder at ids[p] to the M image tokens: (ids, input embeddings [L, hidden],
    M-RoPE positions [3, L], rope delta). Other negative ids (placeholders of the caller) get zero rows and count
    as text positions."""
    M = image_tokens.shape[0]
    full = list(ids[:p]) + [image_token_id] * M + list(ids[p + 1:])
    emb = np.zeros((len(full), decoder.config.hidden_size), dtype=np.float32)
    text = [i for i, t in enumerate(full) if t >= 0 and not p <= i < p + M]
    emb[text] = decoder.embed(np.asarray([full[i] for i in text], dtype=np.int32))
    emb[p:p + M] = image_tokens
    gh, gw = grid_hw
    pos, delta = rope_positions(full, [(p, M, gh // 2, gw // 2)])
    return full, emb, pos, delta


class QwenVL:
    """Qwen2.5-VL for image-conditioned generation with the vlmfo1 C core."""

    def __init__(self, decoder: LanguageModel, vision: VisionTower, tokenizer, processor: QwenImageProcessor,
                 image_token_id: int):
        self.decoder, self.vision, self.tokenizer, self.processor = decoder, vision, tokenizer, processor
        self.image_token_id = image_token_id
        if vision.config.out_hidden_size != decoder.config.hidden_size:
            raise ValueError(f"vision out_hidden_size {vision.config.out_hidden_size} != decoder hidden_size "
                             f"{decoder.config.hidden_size}")

    @classmethod
    def load(cls, path: str, mode: str = "exact", compute: Optional[str] = None, dtype: Optional[str] = None,
             n_threads: Optional[int] = None, max_context: Optional[int] = None, cache_dir=None) -> "QwenVL":
        """max_context: the longest prompt (image tokens included), an int in [1, max_position_embeddings (at most
        2^20)]; default 8192 (or the position limit when smaller). cache_dir: where int8 / int4 weights are cached
        between loads (vlmfo1.weight_cache; None = the default folder, False = no cache)."""
        from .tokenizer import Tokenizer

        check_options(mode, dtype, compute, language_model=True)   # int4: the decoder only
        check_cache_dir(cache_dir)
        n_threads = check_threads(n_threads)
        path = os.fspath(path)
        raw = read_config(path)
        check_decoder(raw)        # both parts of config.json, before either tower is loaded
        check_vision(raw)
        ckpt = Checkpoint(path)
        try:
            dec = LanguageModel.from_checkpoint(ckpt, raw, mode=mode, compute=compute, dtype=dtype, n_threads=n_threads,
                                                max_context=max_context, default_context=8192,
                                                generation_eos=read_generation_eos(path),
                                                generation=GenerationSettings.from_pretrained(path, kind="qwen"),
                                                cache_dir=cache_dir)
            vis = VisionTower.from_checkpoint(ckpt, raw, mode=mode, compute=compute,
                                              dtype=None if dtype == "int4" else dtype, n_threads=n_threads,
                                              cache_dir=cache_dir)
            tok = Tokenizer.from_pretrained(path)
            proc = QwenImageProcessor.from_pretrained(path, kind="qwen") if os.path.exists(
                os.path.join(path, "preprocessor_config.json")) else QwenImageProcessor()
            image_token_id = int(raw.get("image_token_id", tok.token_to_id(IMAGE_PAD) or IMAGE_PAD_ID))
        except BaseException:
            ckpt.close()  # a failed load releases the mappings and descriptors it opened
            raise
        return cls(dec, vis, tok, proc, image_token_id)

    def close(self) -> None:
        """Drop the weights: the checkpoint's memory maps and file descriptors are released now (or, for arrays
        something else still holds, when the last of them goes). The model is unusable after. Idempotent."""
        parts = [p for p in (self.decoder, self.vision) if p is not None]
        self.decoder = self.vision = None
        for p in parts:
            if hasattr(p, "close"):
                p.close()
            else:
                ck = getattr(p, "_ckpt", None)
                if ck is not None and hasattr(ck, "close"):
                    ck.close()

    def __enter__(self) -> "QwenVL":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.decoder is None:
            raise RuntimeError("this QwenVL model was closed; load it again with QwenVL.load(path)")

    # ------------------------------------------------------------------ prompt and embeddings
    def build_prompt(self, text: str, system: Optional[str] = DEFAULT_SYSTEM) -> str:
        """The stock Qwen2.5-VL chat prompt with one image placeholder before the text."""
        sys_turn = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return (f"{sys_turn}<|im_start|>user\n{VISION_START}{IMAGE_PAD}{VISION_END}{text}<|im_end|>\n"
                "<|im_start|>assistant\n")

    def encode_image(self, image) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        """Image (path, PIL image or uint8 array) -> merged image tokens [M, hidden] and grid_thw."""
        self._check_open()
        arr = load_image(image)
        pixel_values, grid_thw, _ = self.processor(arr)
        return self.vision(pixel_values, grid_thw), tuple(int(v) for v in grid_thw)

    def prepare(self, image, text: str, system: Optional[str] = DEFAULT_SYSTEM, prompt: Optional[str] = None):
        """Token ids, input embeddings [L, hidden], M-RoPE positions [3, L] and the rope delta."""
        self._check_open()
        if prompt is not None:
            full_text = check_text(prompt, "prompt")
        else:
            check_text(text, "text")
            if system is not None:
                check_text(system, "system")
            full_text = self.build_prompt(text, system)
        limit = self.decoder.max_context
        self.tokenizer.check_length(full_text, limit, "the prompt")   # at once, before tokenizing or image work
        ids = self.tokenizer.encode(full_text)
        if len(ids) > limit:
            raise ValueError(f"the prompt is {len(ids)} tokens long before the image is added, more than max_context "
                             f"{limit}: shorten it, or load the model with a larger max_context (at most "
                             f"{self.decoder.max_positions})")
        pads = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(pads) != 1:
            raise ValueError(f"the prompt must hold exactly one {IMAGE_PAD} placeholder, found {len(pads)}")
        tokens, (_, gh, gw) = self.encode_image(image)
        return splice_image(self.decoder, ids, pads[0], tokens, (gh, gw), self.image_token_id)

    # ------------------------------------------------------------------ generation
    def stream_ids(self, image, text: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0, seed: Optional[int] = None, stop_ids=None, system: Optional[str] = DEFAULT_SYSTEM,
                   prompt: Optional[str] = None, session: Optional[Session] = None,
                   repetition_penalty: Optional[float] = None) -> Iterator[int]:
        """repetition_penalty: None = generation_config.json's (as transformers); it covers the prompt ids (the
        image placeholder expanded to its <|image_pad|> run, as transformers' input_ids) and the generated ids."""
        self._check_open()
        dec = self.decoder
        if stop_ids is not None and not isinstance(stop_ids, (str, bytes, dict)) and hasattr(stop_ids, "__iter__"):
            stop_ids = list(stop_ids)
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed=seed, stop_ids=stop_ids,
                       vocab_size=dec.vocab_size, max_new_tokens_limit=dec.max_positions)
        if repetition_penalty is not None:
            check_repetition_penalty(repetition_penalty)
        if session is not None:
            if not isinstance(session, Session) or session.model is not dec:
                raise TypeError(f"session must be None or a Session of this model's decoder (vl.decoder.session()), "
                                f"got {type(session).__name__}")
            if session.n_past:
                raise ValueError("the session must be empty (call reset())")
        ids, emb, pos, delta = self.prepare(image, text, system, prompt)
        if session is None:
            check_request_length(dec, len(ids), max_new_tokens)
        s = session or dec.session(max_context=max(dec.max_context, len(ids) + max_new_tokens))
        if len(ids) + max_new_tokens > s.max_context:      # only a session passed in can be too small
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens exceed max_context {s.max_context}")
        logits = s.prefill_embeds(emb, pos)
        s.rope_delta = delta
        yield from decode_stream(dec, s, logits, max_new_tokens, temperature, top_p, top_k, seed, stop_ids,
                                 context_ids=ids, repetition_penalty=repetition_penalty)

    def stream(self, image, text: str, **kw) -> Iterator[str]:
        """Yield decoded text pieces as they are generated (special tokens skipped)."""
        yield from self.tokenizer.incremental_decoder(skip_special_tokens=True)(self.stream_ids(image, text, **kw))

    def generate_ids(self, image, text: str, **kw) -> List[int]:
        return list(self.stream_ids(image, text, **kw))

    def generate(self, image, text: str, skip_special_tokens: bool = True, **kw) -> str:
        if not isinstance(skip_special_tokens, (bool, np.bool_)):
            raise TypeError(f"skip_special_tokens must be True or False, got {skip_special_tokens!r}")
        return self.tokenizer.decode(self.generate_ids(image, text, **kw), skip_special_tokens=skip_special_tokens)
