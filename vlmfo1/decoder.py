"""The Qwen2 / Qwen2.5 language model (the decoder): its config, checkpoint loading, sessions (KV cache), generate.

    lm = LanguageModel.load("path/to/checkpoint")            # config.json + safetensors
    s = lm.session()                                         # one request; one thread at a time
    logits = s.prefill(ids); logits = s.step(tok)            # low level
    new_ids = lm.generate(ids, max_new_tokens=32)            # greedy, or temperature/top_p/top_k + seed
    for tok in lm.stream(ids): ...                           # the same, one id at a time

Numeric modes (ERRATA "Decisions"): "exact" does fp32 maths as the formulas say (what transformers
does); "reference" reproduces the official VLM-FO1 run's rounding of the rotary frequencies to bf16
(E1) and takes greedy argmax on bf16-rounded logits with ties to the lowest id (E2).

The checkpoint's generation_config.json logits processors (repetition_penalty, ...) act even in greedy mode, as in
transformers (ERRATA E8; vlmfo1.generation); `repetition_penalty=` overrides the penalty per call.

Load options and config files are read and checked by vlmfo1.options; sampling and the decode loop are
vlmfo1.generation's.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from ._native import core
from .config_check import check_decoder
from .generation import GenerationSettings, check_repetition_penalty, check_sampling, decode_stream
from .options import (CONTEXT_CAP, _is_int, check_ids, check_max_context, check_options, check_request_length,
                      position_limit, read_config, read_generation_eos)
from .quant import quantize_linear
from .safetensors import Checkpoint, check_tensors, round_bf16, stored_kind, weight
from .threads import check_threads
from .weight_cache import check_cache_dir, checkpoint_identity, lazy_weight, origin

# Moved out of this module and still importable from it (`from vlmfo1.decoder import ...`), with the names imported
# above: options and config files live in vlmfo1.options, sampling and the decode loop in vlmfo1.generation,
# thread counts in vlmfo1.threads.
from .generation import _sample, _top, check_stop_ids  # noqa: F401
from .options import MODES, _is_real  # noqa: F401
from .threads import default_threads  # noqa: F401

# where the decoder's tensors live in the checkpoint layouts we know
_PREFIXES = ("model.language_model.", "model.", "language_model.model.", "model.llm.", "")
_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")


@dataclass
class DecoderConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: Sequence[int] = ()
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    eos_token_id: List[int] = field(default_factory=list)
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, cfg: Dict) -> "DecoderConfig":
        """The decoder part of config.json (top level, or `text_config` as recent transformers save Qwen2.5-VL),
        checked by vlmfo1.config_check before anything is allocated (ConfigError, a ValueError, names the key)."""
        return cls(**check_decoder(cfg))


def rope_inv_freq(head_dim: int, theta: float, mode: str) -> np.ndarray:
    """ω_j = 1 / θ^(2j/d) in float32 as torch computes it; bf16-rounded in reference mode (ERRATA E1)."""
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(theta), exps, dtype=np.float32)).astype(np.float32)
    return round_bf16(inv) if mode == "reference" else inv


class Session:
    """One request against a LanguageModel: the KV cache, scratch memory and worker threads.

    Use one session per thread; several sessions can share one model and run concurrently."""

    def __init__(self, model: "LanguageModel", max_context: int, n_threads: int, chunk: int = 512):
        self.model = model
        self._state = core.Qwen2State(model._core, int(max_context), int(chunk), int(n_threads))
        self.rope_delta = 0  # added to cache indices to get rotary positions (M-RoPE after an image)
        self.workspace = None  # the encoders' threads + scratch that travel with this cache (VLMFO1's idle pool)

    @property
    def n_past(self) -> int:
        return self._state.n_past

    @property
    def max_context(self) -> int:
        return self._state.max_context

    @property
    def nbytes(self) -> int:
        return self._state.nbytes

    @property
    def flops(self) -> Dict[str, int]:
        """{"gemm": FLOPs, "attention": FLOPs} of every forward on this session so far (matmuls and attention
        products as csrc/pool.h counts them; differences between two reads give one call's work)."""
        return self._state.flops

    def reset(self):
        self._state.truncate(0)
        self.rope_delta = 0

    def truncate(self, n: int):
        self._state.truncate(int(n))

    def _check(self, T: int):
        if T == 0:
            raise ValueError("empty prompt: at least one token is needed")
        if self.n_past + T > self.max_context:
            raise ValueError(f"{T} new tokens do not fit: {self.n_past} cached, max_context {self.max_context}")

    def _text_positions(self, T: int) -> np.ndarray:
        p = np.arange(self.n_past, self.n_past + T, dtype=np.int32) + np.int32(self.rope_delta)
        return np.broadcast_to(p, (3, T))

    def prefill(self, ids, all_logits: bool = False, positions: Optional[np.ndarray] = None) -> np.ndarray:
        """Append token ids; return the logits of the last one ([vocab]) or of all ([T, vocab])."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError("ids must be a 1-D sequence of token ids")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        self._check(ids.size)
        vocab = self.model.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        pos = self._text_positions(ids.size) if positions is None else positions
        return self._state.forward(ids.astype(np.int32), None, pos, 2 if all_logits else 1)

    def prefill_embeds(self, embeds: np.ndarray, positions: np.ndarray, all_logits: bool = False,
                       logits: bool = True) -> Optional[np.ndarray]:
        """Append ready-made input embeddings [T, hidden] with explicit [3, T] M-RoPE positions. logits=False: no
        output head at all (returns None; a prefix whose next token is not sampled)."""
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        self._check(embeds.shape[0] if embeds.ndim == 2 else 0)
        return self._state.forward(None, embeds, positions, (2 if all_logits else 1) if logits else 0)

    def snapshot(self) -> np.ndarray:
        """The KV cache of every cached position, float32 [layers, 2, kv_heads, n_past, head_dim] (a copy)."""
        return self._state.save_kv(self.n_past)

    def restore(self, kv: np.ndarray, rope_delta: int = 0) -> None:
        """Continue from a snapshot: the cache becomes exactly the one `snapshot` copied."""
        self._state.load_kv(kv)
        self.rope_delta = int(rope_delta)

    def step(self, token_id: int) -> np.ndarray:
        """Append one token and return the next-token logits."""
        return self.prefill(np.array([int(token_id)], dtype=np.int64))


class LanguageModel:
    """A Qwen2/Qwen2.5 decoder loaded from a Hugging Face checkpoint folder."""

    def __init__(self, config: DecoderConfig, tensors: Dict[str, np.ndarray], mode: str, compute: str,
                 n_threads: int, max_context: int, checkpoint: Optional[Checkpoint] = None,
                 generation_eos: Sequence[int] = (), generation: Optional[GenerationSettings] = None):
        self.config = config
        # logits processors of generation_config.json (vlmfo1.generation); replaceable, e.g. lm.generation = ...
        self.generation = generation if generation is not None else GenerationSettings()
        self.mode = mode
        self.compute = compute
        self.n_threads = n_threads
        self.max_positions = position_limit(config)   # prompt + new tokens of one request, at most
        self.max_context = check_max_context(max_context, config, 4096)   # the longest prompt; the default cache
        self._ckpt = checkpoint  # keeps the memory maps alive
        self._tensors = tensors
        # an int8 output layer quantized from the tied embedding table: a copy, not parameters of its own
        self.tied_head_copy = "lm_head" in tensors and tensors["lm_head"].dtype == np.int8 and not any(
            n in checkpoint for n in _LM_HEAD) if checkpoint is not None else False
        self.stop_ids = sorted(set(config.eos_token_id) | set(generation_eos))
        c = config
        mr = list(c.mrope_section) if c.mrope_section else [c.head_dim // 2, 0, 0]
        core_cfg = dict(hidden=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                        n_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, inter=c.intermediate_size,
                        vocab=c.vocab_size, eps=c.rms_norm_eps, compute=1 if compute == "bf16" else 0,
                        mrope_t=mr[0], mrope_h=mr[1], mrope_w=mr[2])
        self._core = core.Qwen2Model(core_cfg, tensors)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, mode: str = "exact", compute: Optional[str] = None, dtype: Optional[str] = None,
             n_threads: Optional[int] = None, max_context: Optional[int] = None, cache_dir=None) -> "LanguageModel":
        """Load a checkpoint folder (config.json + model.safetensors or sharded safetensors).

        mode: "exact" or "reference" (see module doc). dtype: None keeps the stored dtype (F16 is
        widened to F32), or "float32" / "bfloat16" to convert, or "int8": every linear layer quantized at load
        (per-output-channel int8 weights, activations quantized per token: vlmfo1.quant), or "int4": the layers'
        weights in 4-bit blocks of 32 (the output layer int8; the input sizes must be multiples of 32). compute: "f32" or "bf16" (how activations
        meet bf16 weights; default "bf16" when weights are bf16). The logits processors of the folder's
        generation_config.json (e.g. repetition_penalty) are applied as transformers applies them (`generation`).
        cache_dir: where int8 / int4 weights are cached between loads (vlmfo1.weight_cache): None = the default
        folder ($VLMFO1_CACHE_DIR, else ~/.cache/vlmfo1/weights), a path, or False = no cache."""
        check_options(mode, dtype, compute, language_model=True)
        check_cache_dir(cache_dir)
        n_threads = check_threads(n_threads)
        path = os.fspath(path)
        raw = read_config(path)
        check_decoder(raw)        # before the weights are opened
        ckpt = Checkpoint(path)
        try:
            return cls.from_checkpoint(ckpt, raw, mode=mode, compute=compute, dtype=dtype,
                                       n_threads=n_threads, max_context=max_context,
                                       generation_eos=read_generation_eos(path),
                                       generation=GenerationSettings.from_pretrained(path, kind="qwen"),
                                       cache_dir=cache_dir)
        except BaseException:
            ckpt.close()  # a failed load releases the mappings and descriptors it opened
            raise

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, raw_config: Dict, mode: str = "exact", compute: Optional[str] = None,
                        dtype: Optional[str] = None, n_threads: Optional[int] = None,
                        max_context: Optional[int] = None,
                        generation_eos: Sequence[int] = (),
                        generation: Optional[GenerationSettings] = None,
                        default_context: int = 4096, cache_dir=None) -> "LanguageModel":
        check_options(mode, dtype, compute, language_model=True)
        check_cache_dir(cache_dir)
        n_threads = check_threads(n_threads)
        config = DecoderConfig.from_dict(raw_config)
        max_context = check_max_context(max_context, config, default_context)   # before any weight is read
        tensors, stored = _collect_tensors(ckpt, config, dtype, n_threads, cache_dir)
        if compute is None:
            compute = "bf16" if stored == "bf16" else "f32"
        tensors["inv_freq"] = rope_inv_freq(config.head_dim, config.rope_theta, mode)
        return cls(config, tensors, mode, compute, n_threads, max_context, ckpt, generation_eos, generation)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def close(self) -> None:
        """Drop the weights: the checkpoint's memory maps and file descriptors are released now (or, for arrays
        something else still holds, e.g. a live session, when the last of them goes). The model is unusable after.
        Idempotent; `with LanguageModel.load(path) as lm:` closes on exit."""
        ckpt, self._ckpt = self._ckpt, None
        self._core, self._tensors = None, {}
        if ckpt is not None and hasattr(ckpt, "close"):
            ckpt.close()

    def __enter__(self) -> "LanguageModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._core is None:
            raise RuntimeError("this LanguageModel was closed; load it again with LanguageModel.load(path)")

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights as the engine holds them (mapped or converted)."""
        seen, total = set(), 0
        for a in self._tensors.values():
            if id(a) not in seen:
                seen.add(id(a))
                total += a.nbytes
        return total

    def session(self, max_context: Optional[int] = None, chunk: int = 512) -> Session:
        """A new KV cache of max_context positions (default: the model's max_context; at most max_positions)."""
        if max_context is not None and (not _is_int(max_context) or not 1 <= max_context <= self.max_positions):
            raise ValueError(f"a session's max_context must be an int in [1, {self.max_positions}], got "
                             f"{max_context!r}")
        if not _is_int(chunk) or not 1 <= chunk <= CONTEXT_CAP:
            raise ValueError(f"chunk must be an int in [1, {CONTEXT_CAP}], got {chunk!r}")
        self._check_open()
        return Session(self, max_context or self.max_context, self.n_threads, chunk)

    def embed(self, ids) -> np.ndarray:
        self._check_open()
        return self._core.embed(np.asarray(ids, dtype=np.int32))

    # ------------------------------------------------------------------ generation
    def stream(self, ids, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: Optional[int] = None, stop_ids: Optional[Iterable[int]] = None,
               session: Optional[Session] = None, repetition_penalty: Optional[float] = None) -> Iterator[int]:
        """Yield new token ids one at a time (the stop token, when reached, is yielded last).

        repetition_penalty: None = the checkpoint's generation_config.json value (1.0 if absent); as in
        transformers it covers the prompt ids and the generated ids."""
        self._check_open()
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed=seed, stop_ids=stop_ids,
                       vocab_size=self.vocab_size, max_new_tokens_limit=self.max_positions)
        if repetition_penalty is not None:
            check_repetition_penalty(repetition_penalty)
        ids = check_ids(ids, self.vocab_size)
        if session is not None:
            if not isinstance(session, Session) or session.model is not self:
                raise TypeError("session must be a Session of this model (model.session())")
            if session.n_past + ids.size + max_new_tokens > session.max_context:
                raise ValueError(f"the prompt ({ids.size} tokens) + max_new_tokens ({max_new_tokens}) do not fit in "
                                 f"the session: {session.n_past} cached of its max_context {session.max_context}")
        else:
            check_request_length(self, ids.size, max_new_tokens)
        s = session or self.session(max_context=max(self.max_context, ids.size + max_new_tokens))
        logits = s.prefill(ids)
        yield from decode_stream(self, s, logits, max_new_tokens, temperature, top_p, top_k, seed, stop_ids,
                                 context_ids=ids.tolist(),
                                 repetition_penalty=repetition_penalty)

    def generate(self, ids, max_new_tokens: int = 256, **kw) -> List[int]:
        """New token ids after the prompt `ids` (greedy unless temperature > 0)."""
        return list(self.stream(ids, max_new_tokens=max_new_tokens, **kw))


LINEAR = ("q", "k", "v", "o", "gate", "up", "down")   # the per-layer weights int8 / int4 quantize (all but the norms)


def _collect_tensors(ckpt: Checkpoint, c: DecoderConfig, dtype: Optional[str], n_threads: int = 1, cache_dir=None):
    """Map checkpoint names to the core's names, check presence and shapes, convert dtypes (int8: every linear
    layer and the output layer, made from the embedding table when tied; the embedding table stays as stored;
    int8 / int4 go through the weight cache in cache_dir, vlmfo1.weight_cache)."""
    prefix = next((p for p in _PREFIXES if p + "embed_tokens.weight" in ckpt), None)
    if prefix is None:
        raise KeyError(f"no decoder in checkpoint {getattr(ckpt, 'path', '')}: no '*embed_tokens.weight' tensor "
                       f"found (looked for "
                       + ", ".join(p + "embed_tokens.weight" for p in _PREFIXES) + ")")
    H, Q, KV = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    I, V = c.intermediate_size, c.vocab_size
    want = {"embed": (prefix + "embed_tokens.weight", (V, H)), "norm": (prefix + "norm.weight", (H,))}
    per = {"q": ("self_attn.q_proj.weight", (Q, H)), "q_bias": ("self_attn.q_proj.bias", (Q,)),
           "k": ("self_attn.k_proj.weight", (KV, H)), "k_bias": ("self_attn.k_proj.bias", (KV,)),
           "v": ("self_attn.v_proj.weight", (KV, H)), "v_bias": ("self_attn.v_proj.bias", (KV,)),
           "o": ("self_attn.o_proj.weight", (H, Q)), "gate": ("mlp.gate_proj.weight", (I, H)),
           "up": ("mlp.up_proj.weight", (I, H)), "down": ("mlp.down_proj.weight", (H, I)),
           "ln1": ("input_layernorm.weight", (H,)), "ln2": ("post_attention_layernorm.weight", (H,))}
    for l in range(c.num_hidden_layers):
        for k, (n, shp) in per.items():
            want[f"layers.{l}.{k}"] = (f"{prefix}layers.{l}.{n}", shp)
    head = next((n for n in _LM_HEAD if n in ckpt), None)
    if head is not None:
        want["lm_head"] = (head, (V, H))
    elif not c.tie_word_embeddings:
        warnings.warn("checkpoint has no lm_head.weight: using the input embedding as output layer (tied)",
                      RuntimeWarning, stacklevel=3)

    scoped = prefix in ("model.language_model.", "language_model.model.")  # only the decoder lives there
    check_tensors(ckpt, want, "decoder", lambda k: k.startswith(prefix) and not k.endswith("inv_freq")
                  and (scoped or k.startswith(prefix + "layers.")))
    if dtype == "int4":   # before any weight is read
        bad = next(((n, shp[1]) for n, shp in want.values() if len(shp) == 2 and shp[1] % 32 and
                    not n.endswith("embed_tokens.weight") and n != head), None)
        if bad:
            raise ValueError(f"dtype 'int4' needs every linear layer's input size to be a multiple of 32 (4-bit blocks "
                             f"of 32 weights): {bad[0]} has {bad[1]}")
    if dtype not in ("int8", "int4"):
        out = {key: weight(ckpt, name, dtype, vector=len(shp) == 1) for key, (name, shp) in want.items()}
        return out, stored_kind(out)
    keys = [f"layers.{l}.{k}" for l in range(c.num_hidden_layers) for k in LINEAR]
    # the matrices to quantize as mapped views (or, F16, made only if the weight cache misses): nothing is read here
    out = {key: lazy_weight(ckpt, name) if key in keys or key == "lm_head"
           else weight(ckpt, name, None, vector=len(shp) == 1) for key, (name, shp) in want.items()}
    stored = stored_kind(out)
    release = getattr(ckpt, "evict", None)
    names = {key: name for key, (name, _) in want.items()}
    names.setdefault("lm_head", want["embed"][0])          # a tied output layer is made from the embedding table
    cache = origin(cache_dir, checkpoint_identity(ckpt), names)
    quantize_linear(out, keys, n_threads, release=release, bits=8 if dtype == "int8" else 4, cache=cache)
    # the output layer stays int8 under int4 too (as llama.cpp keeps it at 6 bits or more)
    quantize_linear(out, ["lm_head"], n_threads, release=release,
                    sources=None if "lm_head" in out else {"lm_head": out["embed"]}, cache=cache)
    return out, stored
