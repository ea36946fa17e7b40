"""Reading and checking what a caller or a checkpoint folder gives: load options, request limits, config files.

The first layer of every load and request, before any weight is read or any image work is done:
  * load options: check_options (mode / dtype / compute), check_max_context and position_limit (a checkpoint's
    positions, at most CONTEXT_CAP); thread counts are vlmfo1.threads';
  * a request: check_ids (a prompt of token ids), check_request_length (prompt + new tokens fit the model);
    the sampling options are checked by vlmfo1.generation.check_sampling;
  * checkpoint files: read_config (config.json, bounded; its schema is vlmfo1.config_check's),
    read_generation_config / read_generation_eos (generation_config.json).
Every bad value is a TypeError (wrong type) or ValueError (out of range) that names the option and its valid range.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np

from .config_check import read_config_file

if TYPE_CHECKING:   # pragma: no cover
    from .decoder import DecoderConfig, LanguageModel

MODES = ("exact", "reference")
# weight storage: None keeps the stored dtype; "int8" quantizes the linear layers at load (vlmfo1.quant); "int4"
# (4-bit blocks) is offered for language models only (LM_DTYPES)
DTYPES = (None, "float32", "bfloat16", "int8")
LM_DTYPES = DTYPES + ("int4",)

CONTEXT_CAP = 2 ** 20   # positions one request may ever use, whatever config.json's max_position_embeddings says


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_int(v, name: str, lo: int, hi: int, why: str = "", kind: str = "an int") -> int:
    """An integer option in [lo, hi]: a TypeError naming it for anything but an int (a bool too), a ValueError for
    one out of range (`why` says where the range comes from)."""
    if not _is_int(v):
        raise TypeError(f"{name} must be {kind} in [{lo}, {hi}], got {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}]{why}, got {v}")
    return int(v)


# ---------------------------------------------------------------------------------------------- load options

def check_options(mode: str, dtype: Optional[str], compute: Optional[str], language_model: bool = False) -> None:
    """language_model: the network is a decoder, which also takes dtype "int4"."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if language_model and dtype not in LM_DTYPES:
        raise ValueError(f"dtype must be None, 'float32', 'bfloat16', 'int8' or 'int4', got {dtype!r}")
    if dtype == "int4" and not language_model:
        raise ValueError("dtype 'int4' is offered for language models only (4-bit vision weights are not); use "
                         "'int8' or keep the stored weights")
    if dtype not in LM_DTYPES:
        raise ValueError(f"dtype must be None, 'float32', 'bfloat16' or 'int8', got {dtype!r}")
    if compute not in (None, "f32", "bf16"):
        raise ValueError(f"compute must be 'f32' or 'bf16', got {compute!r}")


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
    return check_int(max_context, "max_context", 1, limit,
                     " (this checkpoint's max_position_embeddings, at most 2^20)")


# ---------------------------------------------------------------------------------------------- a request

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


# ---------------------------------------------------------------------------------------------- checkpoint files

def read_config(path: str) -> Dict:
    """config.json of a checkpoint folder as a dict (size and nesting bounded, see vlmfo1.config_check)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found")
    return read_config_file(cfg_path)


def read_generation_eos(path: str) -> List[int]:
    """The eos_token_id of a checkpoint folder's generation_config.json as a list ([] if absent or unreadable)."""
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


__all__ = ["MODES", "DTYPES", "LM_DTYPES", "CONTEXT_CAP", "check_int", "check_options", "position_limit", "check_max_context", "check_ids",
           "check_request_length", "read_config", "read_generation_eos", "read_generation_config"]
