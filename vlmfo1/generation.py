"""Generation: the sampling options, the next-token choice, the decode loop, and the logits processors.

    check_sampling(...)                        # max_new_tokens / temperature / top_p / top_k / seed / stop_ids
    tok = _sample(logits, temperature, top_p, top_k, rng, greedy_bf16)     # greedy, or the transformers warpers
    for tok in decode_stream(lm, session, logits, max_new_tokens, ...): ...  # process, sample, yield, feed back

Logits processors: the settings of a checkpoint's `generation_config.json`, applied as transformers applies them
(ERRATA E8).

transformers merges `generation_config.json` into every `generate` call, and several of its logits processors act
even under greedy decoding (`do_sample=False`). Stock Qwen2.5-VL checkpoints ship `repetition_penalty: 1.05`
(with `do_sample: true, top_k: 1, top_p: 0.001, temperature: 0.1`, which only matter when sampling), so a
transformers greedy run of such a checkpoint is penalised. This module reads the keys that act in greedy mode and
applies them to one step's logits in transformers' order (`GenerationMixin._get_logits_processor`, the same in
4.50.1 and 5.x for these):

    repetition_penalty -> no_repeat_ngram_size -> min_length -> min_new_tokens -> suppress_tokens
    -> begin_suppress_tokens

then the greedy argmax (or the sampling warpers). The ids a processor sees are transformers' `input_ids`: the prompt
ids followed by the generated ids (a token is penalised once however often it occurs; gather/scatter semantics).
Arithmetic is float32, as transformers runs the processors on `logits.float()`: a logit s of a seen token becomes
`s * float32(p)` if s < 0 else `s / float32(p)`.

Reference mode (E2): the official run's logits come out of a bf16 lm_head and are widened with `.float()` before the
processors, so the engine rounds the logits to bf16 FIRST, then applies the processors, then takes the argmax of the
processed float32 scores (ties to the lowest id).

Keys that transformers would apply but this engine does not implement (bad_words_ids, sequence_bias,
forced_bos/eos_token_id, exponential_decay_length_penalty, remove_invalid_values, guidance_scale,
num_beams > 1, ...) are reported with a RuntimeWarning at load time and ignored.

Checkpoint kinds (`GenerationSettings.from_pretrained(path, kind=...)`):
  * "qwen": stock Qwen2 / Qwen2.5(-VL) as transformers runs them: everything above binds.
  * "fo1": the official VLM-FO1 code calls transformers' generate with `inputs=input_ids` that contain the negative
    placeholder ids -200 (image) and -300 (regions) (`mm_utils.prepare_inputs`). With `repetition_penalty != 1`,
    `RepetitionPenaltyLogitsProcessor` gathers the logits at those ids and the official run raises
    ("index -200 is out of bounds"), so every official FO1 result was produced without a penalty. The "fo1" kind
    therefore defaults to no penalty (the JSON value is kept in `config_repetition_penalty` and a warning is
    given); an explicit `repetition_penalty=` at generate time still applies one, to the prompt's real token ids
    (placeholders left out) and the generated ids: what the official code computes once its negative ids are
    skipped.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .options import CONTEXT_CAP, _is_int, _is_real, check_int, read_generation_config
from .safetensors import round_bf16

if TYPE_CHECKING:   # pragma: no cover
    from .decoder import LanguageModel, Session

KINDS = ("qwen", "fo1")

# generation_config.json keys that only matter when sampling, or that the engine handles elsewhere (eos/pad/bos,
# max lengths), or that are bookkeeping: never warned about.
_INERT = {
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "max_length", "max_new_tokens",
    "transformers_version", "_from_model_config", "use_cache", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate", "cache_implementation",
    "renormalize_logits", "early_stopping", "length_penalty", "max_time", "stop_strings", "low_memory",
    "token_healing", "watermarking_config", "assistant_confidence_threshold", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "prompt_lookup_num_tokens", "is_assistant", "trust_remote_code",
    "compile_config", "disable_compile", "cache_config", "return_legacy_cache", "dola_layers",
}

# keys whose default value is inert: {key: predicate(value) -> True when the key has an effect}
_UNSUPPORTED = {
    "bad_words_ids": lambda v: bool(v),
    "sequence_bias": lambda v: bool(v),
    "forced_bos_token_id": lambda v: v is not None,
    "forced_eos_token_id": lambda v: v is not None,
    "forced_decoder_ids": lambda v: bool(v),
    "exponential_decay_length_penalty": lambda v: v is not None,
    "remove_invalid_values": lambda v: bool(v),
    "guidance_scale": lambda v: v is not None and float(v) != 1.0,
    "num_beams": lambda v: v is not None and int(v) > 1,
    "num_beam_groups": lambda v: v is not None and int(v) > 1,
    "diversity_penalty": lambda v: v is not None and float(v) > 0.0,
    "penalty_alpha": lambda v: v is not None and float(v) > 0.0,
    "encoder_repetition_penalty": lambda v: False,      # encoder-decoder models only
    "encoder_no_repeat_ngram_size": lambda v: False,    # encoder-decoder models only
}


def _ids(v, name) -> Tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int) and not isinstance(v, bool):
        return (int(v),)
    try:
        return tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"generation_config.json: {name} must be a list of token ids, got {v!r}") from None


@dataclass(frozen=True)
class GenerationSettings:
    """The logits processors that act in greedy mode (see module doc). The defaults change nothing.

    repetition_penalty: > 0; 1.0 = off.   no_repeat_ngram_size: 0 = off.   min_length: total length (prompt +
    generated, as transformers counts `input_ids`) below which the eos ids are banned.   min_new_tokens: the same
    for generated tokens only.   suppress_tokens: ids always banned.   begin_suppress_tokens: ids banned at the first
    generated step.   config_repetition_penalty: the value generation_config.json gave (informational)."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_length: int = 0
    min_new_tokens: int = 0
    suppress_tokens: Tuple[int, ...] = ()
    begin_suppress_tokens: Tuple[int, ...] = ()
    config_repetition_penalty: Optional[float] = field(default=None, compare=False)

    def __post_init__(self):
        check_repetition_penalty(self.repetition_penalty)
        for name in ("no_repeat_ngram_size", "min_length", "min_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
            object.__setattr__(self, name, int(v))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        object.__setattr__(self, "suppress_tokens", _ids(self.suppress_tokens, "suppress_tokens"))
        object.__setattr__(self, "begin_suppress_tokens", _ids(self.begin_suppress_tokens, "begin_suppress_tokens"))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, g: Dict, kind: str = "qwen", source: str = "generation_config.json") -> "GenerationSettings":
        """Settings from a generation_config dict, for a checkpoint `kind` ("qwen" or "fo1", see module doc)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for key, active in _UNSUPPORTED.items():
            try:
                on = key in g and active(g[key])
            except (TypeError, ValueError):
                on = True
            if on:
                warnings.warn(f"{source}: {key}={g[key]!r} is not implemented by vlmfo1 and is ignored (transformers "
                              "would apply it; greedy output may differ)", RuntimeWarning, stacklevel=3)
        rp = g.get("repetition_penalty")
        rp = 1.0 if rp is None else float(rp)
        kw = dict(
            no_repeat_ngram_size=int(g.get("no_repeat_ngram_size") or 0),
            min_length=int(g.get("min_length") or 0),
            min_new_tokens=int(g.get("min_new_tokens") or 0),
            suppress_tokens=_ids(g.get("suppress_tokens"), "suppress_tokens"),
            begin_suppress_tokens=_ids(g.get("begin_suppress_tokens"), "begin_suppress_tokens"),
            config_repetition_penalty=rp,
        )
        if kind == "fo1":
            if rp != 1.0:
                warnings.warn(
                    f"{source}: repetition_penalty={rp} is not applied to VLM-FO1 by default: the official FO1 code "
                    "cannot apply it (its prompt ids hold the negative placeholders -200/-300 and the penalty "
                    "processor fails on them), so its results were made without one. Pass repetition_penalty= to "
                    "generate to apply one anyway.", RuntimeWarning, stacklevel=3)
            return cls(repetition_penalty=1.0, **kw)
        return cls(repetition_penalty=check_repetition_penalty(rp), **kw)

    @classmethod
    def from_pretrained(cls, path: str, kind: str = "qwen") -> "GenerationSettings":
        """Settings from a checkpoint folder's generation_config.json (none = no processors)."""
        return cls.from_dict(read_generation_config(path), kind=kind,
                             source=os.path.join(os.fspath(path), "generation_config.json"))

    def with_overrides(self, repetition_penalty: Optional[float] = None) -> "GenerationSettings":
        """A copy with the call's explicit options (None keeps the checkpoint's value)."""
        if repetition_penalty is None:
            return self
        return replace(self, repetition_penalty=check_repetition_penalty(repetition_penalty))

    # ------------------------------------------------------------------ application
    @property
    def active(self) -> bool:
        return bool(self.repetition_penalty != 1.0 or self.no_repeat_ngram_size or self.min_length
                    or self.min_new_tokens or self.suppress_tokens or self.begin_suppress_tokens)

    def apply(self, scores: np.ndarray, input_ids: Sequence[int], prompt_len: int,
              eos_ids: Iterable[int] = ()) -> np.ndarray:
        """Process one step's float32 scores in place (and return them). input_ids: transformers' input_ids for the
        step (the prompt as transformers holds it, then the ids generated so far); prompt_len: the prompt's part."""
        V = scores.shape[0]
        n = len(input_ids)
        if self.repetition_penalty != 1.0 and n:
            seen = np.unique(np.asarray(input_ids, dtype=np.int64))
            if seen[0] < 0 or seen[-1] >= V:
                raise ValueError(f"repetition penalty: token id {int(seen[0] if seen[0] < 0 else seen[-1])} is outside "
                                 f"the vocabulary [0, {V})")
            s = scores[seen]
            p = np.float32(self.repetition_penalty)
            scores[seen] = np.where(s < 0, s * p, s / p).astype(np.float32)
        if self.no_repeat_ngram_size:
            k = self.no_repeat_ngram_size
            if n + 1 >= k:
                ids = [int(t) for t in input_ids]
                prefix = tuple(ids[n - k + 1:]) if k > 1 else ()
                banned = {ids[i + k - 1] for i in range(n - k + 1) if tuple(ids[i:i + k - 1]) == prefix}
                if banned:
                    scores[sorted(banned)] = -np.inf
        eos = [e for e in eos_ids if 0 <= e < V]
        if eos and self.min_length and n < self.min_length:
            scores[eos] = -np.inf
        if eos and self.min_new_tokens and n - prompt_len < self.min_new_tokens:
            scores[eos] = -np.inf
        if self.suppress_tokens:
            scores[[t for t in self.suppress_tokens if 0 <= t < V]] = -np.inf
        if self.begin_suppress_tokens and n == prompt_len:
            scores[[t for t in self.begin_suppress_tokens if 0 <= t < V]] = -np.inf
        return scores


def check_repetition_penalty(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not (float(p) > 0.0) \
            or not np.isfinite(float(p)):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {p!r}")
    return float(p)


# ---------------------------------------------------------------------------------------------- sampling options

def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, *, seed=None, stop_ids=None,
                   vocab_size: Optional[int] = None, max_new_tokens_limit: int = CONTEXT_CAP) -> None:
    """The generation options every entry point accepts; called before any prefill or image work. Each bad value
    is a TypeError (wrong type) or ValueError (out of range) that names the option and its valid range."""
    check_int(max_new_tokens, "max_new_tokens", 0, max_new_tokens_limit, " (the model's position limit)")
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


# ---------------------------------------------------------------------------------------------- sampling and the loop

def _top(x: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m largest entries of x, sorted descending (stable)."""
    idx = np.argpartition(-x, m - 1)[:m] if m < x.size else np.arange(x.size)
    return idx[np.argsort(-x[idx], kind="stable")]


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
    GenerationSettings), with `repetition_penalty` overriding its penalty when not None. context_ids: the prompt as
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


__all__ = ["GenerationSettings", "read_generation_config", "check_repetition_penalty", "KINDS", "check_sampling",
           "check_stop_ids", "decode_stream"]
