"""The Qwen2 / Qwen2.5 language model: checkpoint loading, sessions (KV cache), sampling, generation.

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
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from ._native import core
from .config_check import check_decoder, read_config_file
from .generation import GenerationSettings, check_repetition_penalty
from .safetensors import Checkpoint, check_tensors, round_bf16, stored_kind, weight
from .threads import check_threads, default_threads  # noqa: F401  (re-exported to vision, davit, hfre)

MODES = ("exact", "reference")

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


def _top(x: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m largest entries of x, sorted descending (stable)."""
    idx = np.argpartition(-x, m - 1)[:m] if m < x.size else np.arange(x.size)
    return idx[np.argsort(-x[idx], kind="stable")]


CONTEXT_CAP = 2 ** 20   # positions one request may ever use, whatever config.json's max_position_embeddings says


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def position_limit(config: "DecoderConfig") -> int:
    """The most positions (prompt + new tokens) one request may use: the checkpoint's max_position_embeddings,
    at most CONTEXT_CAP (2^20)."""
    try:
        n = int(config.max_position_embeddings)
    except (TypeError, ValueError, OverflowError):
        n = CONTEXT_CAP
    return max(1, min(n, CONTEXT_CAP))


def check_max_context(max_context, config: "DecoderConfig", default: int) -> int:
    """The max_context load option: None -> `default` (at most the position limit), else an int in
    [1, position_limit(config)]."""
    limit = position_limit(config)
    if max_context is None:
        return min(int(default), limit)
    if not _is_int(max_context):
        raise TypeError(f"max_context must be an int in [1, {limit}], got {type(max_context).__name__} "
                        f"{max_context!r}")
    if not 1 <= max_context <= limit:
        raise ValueError(f"max_context must be in [1, {limit}] (this checkpoint's max_position_embeddings, at most "
                         f"2^20), got {max_context}")
    return int(max_context)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, *, seed=None, stop_ids=None,
                   vocab_size: Optional[int] = None, max_new_tokens_limit: int = CONTEXT_CAP) -> None:
    """The generation options every entry point accepts; called before any prefill or image work. Each bad value
    is a TypeError (wrong type) or ValueError (out of range) that names the option and its valid range."""
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int in [0, {max_new_tokens_limit}], got "
                        f"{type(max_new_tokens).__name__} {max_new_tokens!r}")
    if not 0 <= max_new_tokens <= max_new_tokens_limit:
        raise ValueError(f"max_new_tokens must be in [0, {max_new_tokens_limit}] (the model's position limit), "
                         f"got {max_new_tokens}")
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if not _is_real(v):
            raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
        if not np.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not _is_int(top_k):
        raise TypeError(f"top_k must be an int >= 0 (0 = no top-k), got {type(top_k).__name__} {top_k!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {top_k}")
    if seed is not None:
        if not _is_int(seed):
            raise TypeError(f"seed must be None or an int >= 0, got {type(seed).__name__} {seed!r}")
        if seed < 0:
            raise ValueError(f"seed must be None or an int >= 0, got {seed}")
    if stop_ids is not None:
        check_stop_ids(stop_ids, vocab_size)


def check_stop_ids(stop_ids, vocab_size: Optional[int] = None) -> List[int]:
    """stop_ids: a list (any iterable but a string) of token ids, each in [0, vocab_size)."""
    if isinstance(stop_ids, (str, bytes, dict)) or _is_int(stop_ids) or not hasattr(stop_ids, "__iter__"):
        raise TypeError(f"stop_ids must be a list of token ids (ints), got {type(stop_ids).__name__} {stop_ids!r}")
    out = []
    for t in stop_ids:
        if not _is_int(t):
            raise TypeError(f"stop_ids must hold token ids (ints), got {type(t).__name__} {t!r}")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise ValueError(f"stop id {t} is outside the vocabulary [0, {vocab_size})" if vocab_size is not None
                             else f"stop id {t} is negative")
        out.append(int(t))
        if vocab_size is not None and len(out) > vocab_size:
            raise ValueError(f"stop_ids holds more than {vocab_size} ids (the vocabulary size)")
    return out


def check_request_length(lm: "LanguageModel", n_prompt: int, max_new_tokens: int) -> None:
    """A prompt of n_prompt positions must fit in the model's max_context, and prompt + max_new_tokens in its
    position limit (max_position_embeddings, at most 2^20)."""
    if n_prompt > lm.max_context:
        raise ValueError(f"the prompt is {n_prompt} positions long, more than max_context {lm.max_context}: shorten "
                         f"it, or load the model with a larger max_context (at most {lm.max_positions})")
    if n_prompt + max_new_tokens > lm.max_positions:
        raise ValueError(f"the prompt ({n_prompt} positions) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"{lm.max_positions} positions (max_position_embeddings): ask for at most "
                         f"{lm.max_positions - n_prompt} new tokens")


def _sample(logits: np.ndarray, temperature: float, top_p: float, top_k: int, rng: np.random.Generator,
            greedy_bf16: bool) -> int:
    """Next token from logits: greedy (temperature 0 or top_k 1; ties to the lowest id), else softmax
    sampling at `temperature`, restricted to the top_k most likely tokens and then to the smallest
    set whose probability reaches top_p (the order and semantics of the transformers warpers)."""
    if temperature <= 0.0 or top_k == 1:
        lg = round_bf16(logits) if greedy_bf16 else logits
        tok = int(np.argmax(lg))
        if not np.isfinite(lg[tok]):          # argmax stops at the first NaN
            raise FloatingPointError("the model produced NaN or infinite logits")
        return tok
    x = logits.astype(np.float64) / temperature
    V = x.size
    xmax = x.max()
    if not np.isfinite(xmax):
        raise FloatingPointError("the model produced NaN or infinite logits")
    k = top_k if 0 < top_k < V else V
    if top_p >= 1.0:
        cand = _top(x, k) if k < V else np.arange(V)
        p = np.exp(x[cand] - xmax)
    elif k < V:                                # the nucleus within the top k (sorted once)
        cand = _top(x, k)
        p = np.exp(x[cand] - xmax)
        p /= p.sum()
    else:
        z = np.exp(x - xmax)
        Z = z.sum()
        m = min(V, 1024)  # the nucleus is usually small: sort only a head that holds top_p
        while True:
            cand = _top(x, m)
            p = z[cand] / Z
            if p.sum() >= top_p or m == V:
                break
            m = min(V, m * 8)
        keep = (np.cumsum(p) - p) < top_p  # the smallest prefix whose mass reaches top_p
        keep[0] = True
        cand, p = cand[keep], p[keep]
    p = p / p.sum()
    return int(cand[rng.choice(p.size, p=p)])


def decode_stream(lm: "LanguageModel", session: "Session", logits: np.ndarray, max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                  stop_ids: Optional[Iterable[int]] = None, *, context_ids: Optional[Sequence[int]] = None,
                  repetition_penalty: Optional[float] = None,
                  generation: Optional[GenerationSettings] = None) -> Iterator[int]:
    """The generation loop after a prefill: process the logits, sample, yield, feed back; the stop token is
    yielded last.

    The logits processors are `generation` (default: the model's, from its generation_config.json; see
    vlmfo1.generation), with `repetition_penalty` overriding its penalty when not None. context_ids: the prompt as
    transformers' `input_ids` holds it (what the penalty and the n-gram ban look at, besides the generated ids);
    None = no prompt ids (only the generated ones count). In reference mode the greedy logits are rounded to bf16
    before the processors (ERRATA E2, E8)."""
    check_sampling(max_new_tokens, temperature, top_p, top_k, seed=seed, stop_ids=stop_ids,
                   vocab_size=getattr(lm, "vocab_size", None),   # (any object with the LanguageModel attributes)
                   max_new_tokens_limit=getattr(lm, "max_positions", CONTEXT_CAP))
    gen = (lm.generation if generation is None else generation).with_overrides(repetition_penalty)
    stops = set(lm.stop_ids if stop_ids is None else stop_ids)
    rng = np.random.default_rng(seed)
    greedy = temperature <= 0.0 or top_k == 1
    bf16 = lm.mode == "reference" and greedy
    hist: List[int] = [int(t) for t in context_ids] if (gen.active and context_ids is not None) else []
    prompt_len = len(hist)
    eos = sorted(stops)
    for i in range(max_new_tokens):
        if gen.active:
            logits = round_bf16(logits) if bf16 else np.array(logits, dtype=np.float32, copy=True)
            gen.apply(logits, hist, prompt_len, eos)
            tok = _sample(logits, temperature, top_p, top_k, rng, False)
            hist.append(tok)
        else:
            tok = _sample(logits, temperature, top_p, top_k, rng, bf16)
        yield tok
        if tok in stops or i == max_new_tokens - 1:
            return
        logits = session.step(tok)


def check_ids(ids, vocab_size: int) -> np.ndarray:
    """A prompt of token ids -> a 1-D int64 array: TypeError for a non-integer input, ValueError for an empty one
    or an id outside [0, vocab_size)."""
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be token ids (a list of ints), got a string: encode it with the tokenizer first")
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError) as e:
        raise TypeError(f"ids must be a 1-D list of token ids (ints): {e}") from None
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("empty prompt: at least one token is needed")
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return arr.astype(np.int64)


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
             n_threads: Optional[int] = None, max_context: Optional[int] = None) -> "LanguageModel":
        """Load a checkpoint folder (config.json + model.safetensors or sharded safetensors).

        mode: "exact" or "reference" (see module doc). dtype: None keeps the stored dtype (F16 is
        widened to F32), or "float32" / "bfloat16" to convert. compute: "f32" or "bf16" (how activations
        meet bf16 weights; default "bf16" when weights are bf16). The logits processors of the folder's
        generation_config.json (e.g. repetition_penalty) are applied as transformers applies them (`generation`)."""
        check_options(mode, dtype, compute)
        n_threads = check_threads(n_threads)
        path = os.fspath(path)
        raw = read_config(path)
        check_decoder(raw)        # before the weights are opened
        ckpt = Checkpoint(path)
        try:
            return cls.from_checkpoint(ckpt, raw, mode=mode, compute=compute, dtype=dtype,
                                       n_threads=n_threads, max_context=max_context,
                                       generation_eos=read_generation_eos(path),
                                       generation=GenerationSettings.from_pretrained(path, kind="qwen"))
        except BaseException:
            ckpt.close()  # a failed load releases the mappings and descriptors it opened
            raise

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, raw_config: Dict, mode: str = "exact", compute: Optional[str] = None,
                        dtype: Optional[str] = None, n_threads: Optional[int] = None,
                        max_context: Optional[int] = None,
                        generation_eos: Sequence[int] = (),
                        generation: Optional[GenerationSettings] = None,
                        default_context: int = 4096) -> "LanguageModel":
        check_options(mode, dtype, compute)
        n_threads = check_threads(n_threads)
        config = DecoderConfig.from_dict(raw_config)
        max_context = check_max_context(max_context, config, default_context)   # before any weight is read
        tensors, stored = _collect_tensors(ckpt, config, dtype)
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


def check_options(mode: str, dtype: Optional[str], compute: Optional[str]) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"dtype must be None, 'float32' or 'bfloat16', got {dtype!r}")
    if compute not in (None, "f32", "bf16"):
        raise ValueError(f"compute must be 'f32' or 'bf16', got {compute!r}")


def read_config(path: str) -> Dict:
    """config.json of a checkpoint folder as a dict (size and nesting bounded, see vlmfo1.config_check)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found")
    return read_config_file(cfg_path)


def read_generation_eos(path: str) -> List[int]:
    gpath = os.path.join(path, "generation_config.json")
    if not os.path.exists(gpath):
        return []
    try:
        with open(gpath) as f:
            g = json.load(f).get("eos_token_id")
        return [] if g is None else ([int(g)] if isinstance(g, int) else [int(x) for x in g])
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
        warnings.warn(f"{gpath}: unreadable, ignored", RuntimeWarning, stacklevel=2)
        return []




def _collect_tensors(ckpt: Checkpoint, c: DecoderConfig, dtype: Optional[str]):
    """Map checkpoint names to the core's names, check presence and shapes, convert dtypes."""
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
    out = {key: weight(ckpt, name, dtype, vector=len(shp) == 1) for key, (name, shp) in want.items()}
    return out, stored_kind(out)
