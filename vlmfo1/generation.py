"""Generation settings from a checkpoint's `generation_config.json`, applied as transformers applies them (ERRATA E8).

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

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

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


def read_generation_config(path: str) -> Dict:
    """The JSON object of `generation_config.json` in a checkpoint folder (or the file itself); {} if absent."""
    p = os.fspath(path)
    gpath = os.path.join(p, "generation_config.json") if os.path.isdir(p) else p
    if not os.path.exists(gpath):
        return {}
    try:
        with open(gpath, encoding="utf-8") as f:
            g = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"{gpath}: unreadable ({e}), ignored", RuntimeWarning, stacklevel=2)
        return {}
    if not isinstance(g, dict):
        warnings.warn(f"{gpath}: not a JSON object, ignored", RuntimeWarning, stacklevel=2)
        return {}
    return g


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


__all__ = ["GenerationSettings", "read_generation_config", "check_repetition_penalty", "KINDS"]
