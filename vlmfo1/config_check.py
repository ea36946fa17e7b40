"""Schema check of a checkpoint's config.json: types, ranges, relations and enumerations, before anything is built.

Every loader reads its configuration through this module (DecoderConfig.from_dict, VisionConfig.from_dict,
DavitConfig.from_dict, HFREConfig.from_dict, AuxImageProcessor.from_config, read_config's JSON parsing), so a hostile
or broken config.json fails at once, before any per-layer list or C object is allocated, with a ConfigError (a
ValueError) that names the file, the key path (e.g. `vision_config.depth`) and what was expected:

    config.json: vision_config.depth: expected an integer in [1, 256], got 1000000000000

Rules (one place for all of them):
  * Integers are JSON integers. A float is accepted only if it is integral and finite (64.0 -> 64: some writers emit
    sizes as floats); 64.5, NaN, Infinity, true/false, strings, lists and null (unless the key documents null as
    "use the default", as transformers does, e.g. num_key_value_heads, head_dim, rope_scaling) are refused.
  * Sizes have generous but finite caps consistent with the C core (csrc/module.c, qwen_vit.c, davit.c, hfre.c):
    decoder layers <= 4096, ViT depth <= 256, DaViT depth per stage <= 64, widths <= 2^20, vocabulary <= 2^24.
  * Floats (eps, rope theta, mlp_ratio) are finite and > 0.
  * Relations: heads divide the hidden size, KV heads divide heads, head_dim even, mrope_section has 3 entries summing
    to head_dim/2 (and is required for Qwen2.5-VL / VLM-FO1 configs; a plain Qwen2 text model uses 1-D RoPE), the ViT
    window is a multiple of patch * merge, full-attention block indexes are blocks, token ids are in the vocabulary.
  * Enumerations (hidden_act, rope types, mm_pos_embedding_strategy, mm_region_feature_combination, projector types,
    aux_image_aspect_ratio, DaViT variants): an unknown value is an error naming the allowed ones.
  * config.json itself: at most 64 MiB and 64 levels of nesting (checked before json.loads recurses).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .constants import QWEN_PATCH_SIZE
from .jsonsafe import nesting_depth

__all__ = ["ConfigError", "ConfigKeyError", "parse_config_json", "read_config_file", "check_decoder", "check_vision",
           "check_davit", "check_hfre", "check_aux_aspect_ratio", "check_fo1", "LIMITS"]

FILE = "config.json"
MAX_JSON_BYTES = 64 << 20
MAX_NESTING = 64

LIMITS = dict(
    layers=4096,            # csrc/module.c Qwen2Model_init
    vit_depth=256,          # VLM_VIT_MAX_DEPTH
    davit_depth=64,         # VLM_DAVIT_MAX_DEPTH
    width=1 << 20,          # hidden / intermediate / channel sizes
    heads=1 << 14,
    head_dim=1024,
    vocab=1 << 24,
    positions=1 << 30,
    vit_head_dim=256,       # qwen_vit.c: head_dim multiple of 4 and <= 256
    patch=1024,
    window=1 << 16,
    channels=64,
    temporal_patch=16,
    davit_window=256,       # DV_MAX_WINDOW
    davit_head=256,         # DV_MAX_HEAD
    davit_kernel=64,
    roi=1024,               # hfre.c: roi output size <= 1024
    hfre_vt_maps=8,         # VLM_HFRE_MAX_VT
    mlp_layers=16,          # VLM_MLP_MAX_LAYERS
)

ROPE_TYPES = ("default", "mrope")
VISION_ROPE_TYPES = ("default", "axial")
HIDDEN_ACTS = ("silu", "swish")
POS_EMBEDDING_STRATEGIES = ("bbox_based", "feature_map_based", "hybrid")
REGION_COMBINATIONS = ("concat", "concat_aux_pos", "mean", "mean_aux_pos", "concat_sep_pos", "mean_sep_pos",
                       "concat_sep_no_vt_pos", "mean_sep_no_vt_pos")
PROJECTOR_TYPES = ("linear", "identity", "mlp{N}x_gelu", "cabstract", "tokenpacker")
AUX_ASPECT_RATIOS = ("squash", "pad", "dynamic", "dynamic_square")
# model_type values of Qwen2.5-VL-style checkpoints, whose decoder needs M-RoPE
VL_MODEL_TYPES = ("qwen2_5_vl", "qwen2_5_vl_text", "qwen2_vl", "qwen2_vl_text", "omchat_qwen2_5_vl")
TOKEN_ID_KEYS = ("bos_token_id", "pad_token_id", "image_token_id", "video_token_id", "vision_start_token_id",
                 "vision_end_token_id", "vision_token_id")

_REQUIRED = object()


class ConfigError(ValueError):
    """A config.json value is malformed: `file`, `key` (path such as vision_config.depth) and the expectation."""

    def __init__(self, key: str, expected: str, got: Any = _REQUIRED, file: str = FILE):
        self.file, self.key, self.expected = file, key, expected
        msg = f"{file}: {key}: {expected}" if key else f"{file}: {expected}"
        if got is not _REQUIRED:
            msg += f", got {_show(got)}"
        super().__init__(msg)


class ConfigKeyError(ConfigError, KeyError):
    """A required key is missing (also a KeyError, as the loaders raised before)."""

    def __str__(self) -> str:
        return self.args[0]


def _show(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, int) and abs(v) > 10 ** 30:
        return f"an integer of {len(str(abs(v)))} digits"
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# --------------------------------------------------------------------------------------------------------------------
# reading config.json

def parse_config_json(data, file: str = FILE) -> Dict:
    """config.json bytes/str -> dict. Refuses oversized files and deep nesting before json.loads recurses."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > MAX_JSON_BYTES:
        raise ConfigError("", f"larger than {MAX_JSON_BYTES >> 20} MiB ({len(data)} bytes): not a config file",
                          file=file)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not UTF-8 text ({e})", file=file) from None
    depth = nesting_depth(text)
    if depth > MAX_NESTING:
        raise ConfigError("", f"JSON nested {depth} levels deep (at most {MAX_NESTING} allowed)", file=file)
    try:
        raw = json.loads(text)
    except RecursionError:   # cannot happen after the scan, kept as a guard
        raise ConfigError("", f"JSON nested too deeply (at most {MAX_NESTING} levels allowed)", file=file) from None
    except ValueError as e:  # JSONDecodeError, or an integer literal beyond Python's digit limit
        raise ConfigError("", f"invalid JSON ({e})", file=file) from None
    if not isinstance(raw, dict):
        raise ConfigError("", "expected a JSON object at the top level", raw if not isinstance(raw, (list, dict))
                          else type(raw).__name__, file=file)
    return raw


def read_config_file(path: str) -> Dict:
    """Read and parse a config.json file (see parse_config_json); errors name the file's path."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except IsADirectoryError:
        raise ConfigError("", "is a directory, expected a JSON file", file=path) from None
    return parse_config_json(data, file=path)


# --------------------------------------------------------------------------------------------------------------------
# typed accessors

def _int(v: Any, key: str, lo: int, hi: int, what: str = "an integer") -> int:
    ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not ok and isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        ok = True                     # 64.0 -> 64 (documented); 64.5 / NaN / Infinity refused
    if not ok or not lo <= v <= hi:
        raise ConfigError(key, f"expected {what} in [{lo}, {hi}]", v)
    return int(v)


def _float(v: Any, key: str, lo: float, hi: float, lo_open: bool = True) -> float:
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    if ok:
        x = float(v)
        ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and x <= hi
    if not ok:
        raise ConfigError(key, f"expected a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]", v)
    return float(v)


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, "expected true or false", v)
    return v


def _enum(v: Any, key: str, allowed: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in allowed:
        raise ConfigError(key, "expected one of " + ", ".join(repr(a) for a in allowed), v)
    return v


def _int_list(v: Any, key: str, n: Optional[int], lo: int, hi: int, max_len: int = 4096) -> List[int]:
    if not isinstance(v, (list, tuple)) or (n is not None and len(v) != n) or len(v) > max_len:
        raise ConfigError(key, f"expected a list of {n if n is not None else f'at most {max_len}'} integers", v)
    return [_int(x, f"{key}[{i}]", lo, hi) for i, x in enumerate(v)]


class _Src:
    """Key lookup over one or more dicts (first wins), remembering the key path of each value."""

    def __init__(self, *scopes: Tuple[Optional[Dict], str]):
        self.scopes = [(d, p) for d, p in scopes if isinstance(d, dict)]

    def find(self, key: str) -> Tuple[bool, Any, str]:
        for d, p in self.scopes:
            if key in d:
                return True, d[key], p + key
        return False, None, (self.scopes[0][1] if self.scopes else "") + key

    def get(self, key: str, default: Any = _REQUIRED, nullable: bool = False) -> Tuple[Any, str, bool]:
        """(value, path, given): the default when absent (or null, if nullable); missing required -> error."""
        present, v, path = self.find(key)
        if not present or (v is None and nullable):
            if default is _REQUIRED:
                raise ConfigKeyError(path, "required key is missing" if not present else "required, got null")
            return default, path, False
        return v, path, True       # null where not allowed: the typed check says what was expected

    def int(self, key, lo, hi, default=_REQUIRED, nullable=False):
        v, path, given = self.get(key, default, nullable)
        return _int(v, path, lo, hi) if given else v

    def float(self, key, lo, hi, default=_REQUIRED, nullable=False):
        v, path, given = self.get(key, default, nullable)
        return _float(v, path, lo, hi) if given else v

    def bool(self, key, default=_REQUIRED, nullable=False):
        v, path, given = self.get(key, default, nullable)
        return _bool(v, path) if given else v

    def enum(self, key, allowed, default=_REQUIRED, nullable=False):
        v, path, given = self.get(key, default, nullable)
        return _enum(v, path, allowed) if given else v

    def path(self, key: str) -> str:
        return self.find(key)[2]


def _need_object(raw: Any, key: str = "") -> Dict:
    if not isinstance(raw, dict):
        raise ConfigError(key, "expected a JSON object", raw if not isinstance(raw, (list, dict)) else
                          type(raw).__name__)
    return raw


def _sub(raw: Dict, key: str, prefix: str = "") -> Optional[Dict]:
    """raw[key] as a dict, None when absent or null; anything else is an error."""
    v = raw.get(key)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ConfigError(prefix + key, "expected a JSON object", v)
    return v


# --------------------------------------------------------------------------------------------------------------------
# the decoder (Qwen2 / Qwen2.5 / the Qwen2.5-VL text model)

def is_vl_config(raw: Dict) -> bool:
    """A Qwen2.5-VL / VLM-FO1 style config (its decoder needs M-RoPE)."""
    tc = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    types = [raw.get("model_type"), tc.get("model_type")]
    return (isinstance(raw.get("vision_config"), dict) or "mm_vision_tower" in raw
            or any(isinstance(t, str) and t in VL_MODEL_TYPES for t in types))


def check_decoder(raw: Dict) -> Dict[str, Any]:
    """The decoder keys of config.json (top level, or text_config as recent transformers write Qwen2.5-VL), checked
    and normalised: the keyword arguments of DecoderConfig."""
    L = LIMITS
    _need_object(raw)
    tc = _sub(raw, "text_config")
    src = _Src((tc, "text_config."), (raw, ""))      # text_config wins (as the merge in DecoderConfig did)
    top_first = _Src((raw, ""), (tc, "text_config."))
    hidden = src.int("hidden_size", 1, L["width"])
    layers = src.int("num_hidden_layers", 1, L["layers"])
    heads = src.int("num_attention_heads", 1, L["heads"])
    kv = src.int("num_key_value_heads", 1, L["heads"], default=heads, nullable=True)
    if heads % kv:
        raise ConfigError(src.path("num_key_value_heads"), f"expected a divisor of num_attention_heads ({heads})",
                          kv)
    inter = src.int("intermediate_size", 1, L["width"])
    vocab = src.int("vocab_size", 1, L["vocab"])
    head_dim = src.int("head_dim", 2, L["head_dim"], default=None, nullable=True)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(src.path("num_attention_heads"), f"expected a divisor of hidden_size ({hidden})", heads)
        head_dim = hidden // heads
        if head_dim % 2:
            raise ConfigError(src.path("num_attention_heads"), "expected hidden_size / num_attention_heads "
                              f"(= {head_dim} here) to be even (rotary pairs)", heads)
    elif head_dim % 2:
        raise ConfigError(src.path("head_dim"), "expected an even integer (rotary pairs)", head_dim)
    eps = src.float("rms_norm_eps", 0.0, 1.0, default=1e-6)
    act = src.enum("hidden_act", HIDDEN_ACTS, default="silu")

    # rotary embedding: rope_scaling (transformers 4) or rope_parameters (transformers 5)
    rope, rope_key = {}, ""
    for k in ("rope_scaling", "rope_parameters"):
        present, v, path = src.find(k)
        if present and v is not None and not isinstance(v, dict):
            raise ConfigError(path, "expected a JSON object or null", v)
        if present and v:
            rope, rope_key = v, path
            break
    for k in ("rope_type", "type"):
        if rope.get(k) is not None:
            _enum(rope[k], f"{rope_key}.{k}", ROPE_TYPES)   # yarn / linear / dynamic scaling is not implemented
    theta = 1_000_000.0
    if rope.get("rope_theta") is not None:      # checked even when a top-level rope_theta takes precedence
        theta = _float(rope["rope_theta"], f"{rope_key}.rope_theta", 1e-30, 1e30)
    present, top_theta, tpath = src.find("rope_theta")
    if present and top_theta is not None:
        theta = _float(top_theta, tpath, 1e-30, 1e30)
    mrope: Tuple[int, ...] = ()
    if rope.get("mrope_section") is not None:
        mkey = f"{rope_key}.mrope_section"
        mrope = tuple(_int_list(rope["mrope_section"], mkey, 3, 0, head_dim // 2))
        if sum(mrope) != head_dim // 2:
            raise ConfigError(mkey, f"expected 3 entries (t, h, w) summing to head_dim/2 = {head_dim // 2}",
                              list(mrope))
    elif is_vl_config(raw):
        mkey = (rope_key or src.path("rope_scaling")) + ".mrope_section"
        raise ConfigError(mkey, "a Qwen2.5-VL / VLM-FO1 config needs M-RoPE: expected mrope_section = [t, h, w] "
                          f"summing to head_dim/2 = {head_dim // 2} (1-D RoPE would silently change the model)")

    # features the engine does not implement must not be switched on silently
    if src.bool("use_sliding_window", default=False, nullable=True):
        raise ConfigError(src.path("use_sliding_window"), "expected false (sliding-window attention is not "
                          "supported; the engine attends to the whole context)", True)
    present, lt, lpath = src.find("layer_types")
    if present and lt is not None:
        if not isinstance(lt, list) or len(lt) != layers:
            raise ConfigError(lpath, f"expected a list of {layers} layer types (num_hidden_layers)", lt)
        for i, t in enumerate(lt):
            _enum(t, f"{lpath}[{i}]", ("full_attention",))

    tie = top_first.bool("tie_word_embeddings", default=False, nullable=True)
    max_pos = src.int("max_position_embeddings", 1, L["positions"], default=32768, nullable=True)
    present, eos, epath = top_first.find("eos_token_id")
    eos_ids: List[int] = []
    if present and eos is not None:
        if isinstance(eos, (list, tuple)):
            eos_ids = _int_list(eos, epath, None, 0, vocab - 1, max_len=1024)
        else:
            eos_ids = [_int(eos, epath, 0, vocab - 1, "a token id (or a list of them)")]
    for d, p in ((raw, ""), (tc, "text_config.")):
        for k in TOKEN_ID_KEYS:
            if isinstance(d, dict) and d.get(k) is not None:
                _int(d[k], p + k, 0, vocab - 1, f"a token id inside the vocabulary (vocab_size {vocab})")
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=inter, vocab_size=vocab, head_dim=head_dim, rms_norm_eps=eps, rope_theta=theta,
                mrope_section=mrope, tie_word_embeddings=tie, max_position_embeddings=max_pos,
                eos_token_id=eos_ids, hidden_act="silu" if act == "swish" else act)


# --------------------------------------------------------------------------------------------------------------------
# the Qwen2.5-VL vision tower

def check_vision(raw: Dict) -> Dict[str, Any]:
    """vision_config (or, without one, the top level) -> the keyword arguments of VisionConfig."""
    L = LIMITS
    _need_object(raw)
    if "vision_config" in raw:
        v, p = raw["vision_config"], "vision_config."
        if not isinstance(v, dict):
            raise ConfigError("vision_config", "expected a JSON object", v)
    else:
        v, p = raw, ""
    src = _Src((v, p))
    depth = src.int("depth", 1, L["vit_depth"], default=32)
    hidden = src.int("hidden_size", 1, L["width"], default=1280)
    heads = src.int("num_heads", 1, L["heads"], default=16)
    if hidden % heads:
        raise ConfigError(p + "num_heads", f"expected a divisor of hidden_size ({hidden})", heads)
    hd = hidden // heads
    if hd % 4 or hd > L["vit_head_dim"]:
        raise ConfigError(p + "num_heads", f"expected hidden_size / num_heads (= {hd} here) to be a multiple of 4 "
                          f"and at most {L['vit_head_dim']} (2-D rotary halves)", heads)
    inter = src.int("intermediate_size", 1, L["width"], default=3420)
    out = src.int("out_hidden_size", 1, L["width"], default=2048)
    chans = _alias(src, ("in_channels", "in_chans"), 1, L["channels"], 3)
    patch = _alias(src, ("patch_size", "spatial_patch_size"), 1, L["patch"], QWEN_PATCH_SIZE)
    tpatch = src.int("temporal_patch_size", 1, L["temporal_patch"], default=2)
    merge = src.int("spatial_merge_size", 1, L["patch"], default=2)
    if merge != 2:
        raise ConfigError(p + "spatial_merge_size", "expected 2 (the only merge size supported)", merge)
    window = src.int("window_size", 1, L["window"], default=112)
    if window % (patch * merge):
        raise ConfigError(p + "window_size", f"expected a multiple of patch_size * spatial_merge_size "
                          f"({patch} * {merge} = {patch * merge})", window)
    full = src.get("fullatt_block_indexes", default=[7, 15, 23, 31])[0]
    full = _int_list(full, p + "fullatt_block_indexes", None, 0, depth - 1, max_len=depth)
    if len(set(full)) != len(full):
        raise ConfigError(p + "fullatt_block_indexes", "expected distinct block indexes", full)
    theta = 10000.0
    present, rope, rpath = src.find("rope_parameters")
    if present and rope is not None:
        if not isinstance(rope, dict):
            raise ConfigError(rpath, "expected a JSON object or null", rope)
        for k in ("rope_type", "type"):
            if rope.get(k) is not None:
                _enum(rope[k], f"{rpath}.{k}", VISION_ROPE_TYPES)
        if rope.get("rope_theta") is not None:
            theta = _float(rope["rope_theta"], f"{rpath}.rope_theta", 1e-30, 1e30)
    act = src.enum("hidden_act", HIDDEN_ACTS, default="silu")
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, intermediate_size=inter, out_hidden_size=out,
                in_channels=chans, patch_size=patch, temporal_patch_size=tpatch, spatial_merge_size=merge,
                window_size=window, fullatt_block_indexes=tuple(full), rope_theta=theta,
                hidden_act="silu" if act == "swish" else act)


def _alias(src: _Src, keys: Sequence[str], lo: int, hi: int, default: int) -> int:
    """A value that config.json may spell two ways (both given: they must agree)."""
    vals = [(k, src.int(k, lo, hi, default=None)) for k in keys]
    given = [(k, x) for k, x in vals if x is not None]
    if len(given) == 2 and given[0][1] != given[1][1]:
        raise ConfigError(src.path(given[1][0]), f"expected the same value as {src.path(given[0][0])} "
                          f"({given[0][1]})", given[1][1])
    return given[0][1] if given else default


# --------------------------------------------------------------------------------------------------------------------
# DaViT (the auxiliary vision encoder)

DAVIT_LIST_KEYS = ("depths", "dims", "num_heads", "num_groups", "patch_size", "patch_stride", "patch_padding")


def check_davit_name(name: Any, key: str, known: Sequence[str]) -> str:
    if not isinstance(name, str):
        raise ConfigError(key, "expected a string naming a DaViT variant (" + ", ".join(sorted(known)) + ")", name)
    k = name.split("/")[-1].replace(".pth", "")
    if k not in known:
        raise ConfigError(key, "unknown DaViT variant: expected one of " + ", ".join(sorted(known))
                          + " (path and .pth are stripped)", name)
    return k


def check_davit_fields(c: Dict[str, Any], prefix: str = "", names: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """DaViT architecture numbers (DavitConfig fields, already gathered) -> checked, normalised values.
    prefix / names: where the fields live in config.json (key-path prefix, and config key of a field when its name
    differs, e.g. dims <- embed_dim), for the error messages."""
    L = LIMITS
    out = dict(c)
    names = dict(names or {})

    def key(f):
        return prefix + names.get(f, f)

    for f in DAVIT_LIST_KEYS:
        lo, hi = {"depths": (0, L["davit_depth"]), "patch_padding": (0, L["davit_kernel"]),
                  "patch_size": (1, L["davit_kernel"]), "patch_stride": (1, L["davit_kernel"])}.get(f, (1, L["width"]))
        out[f] = tuple(_int_list(c[f], key(f), 4, lo, hi))
    pn = c["patch_prenorm"]
    if not isinstance(pn, (list, tuple)) or len(pn) != 4:
        raise ConfigError(key("patch_prenorm"), "expected a list of 4 booleans", pn)
    out["patch_prenorm"] = tuple(_bool(b, f"{key('patch_prenorm')}[{i}]") for i, b in enumerate(pn))
    if out["patch_prenorm"][0]:
        raise ConfigError(key("patch_prenorm") + "[0]", "expected false (the official ConvEmbed never applies a "
                          "pre-norm to the image)", True)
    for s in range(4):
        C = out["dims"][s]
        for f in ("num_heads", "num_groups"):
            h = out[f][s]
            if C % h or C // h > L["davit_head"]:
                raise ConfigError(f"{key(f)}[{s}]", f"expected a divisor of {names.get('dims', 'dims')}[{s}] = {C} "
                                  f"(must be divisible, at most {L['davit_head']} channels each)", h)
    out["window_size"] = _int(c["window_size"], key("window_size"), 1, L["davit_window"])
    out["mlp_ratio"] = _float(c["mlp_ratio"], key("mlp_ratio"), 0.0, 64.0)
    out["in_chans"] = _int(c["in_chans"], key("in_chans"), 1, L["channels"])
    return out


def check_davit(raw: Dict, defaults: Dict[str, Any], known: Sequence[str],
                variants: Dict[str, Dict]) -> Dict[str, Any]:
    """The DaViT part of a config: FO1's `mm_vision_tower_aux` (+ the test-only `vlmfo1_davit_depths`), a Florence-2
    `vision_config`, or a bare DaViT dict -> DavitConfig keyword arguments (checked)."""
    _need_object(raw)
    if raw.get("mm_vision_tower_aux"):
        name = check_davit_name(raw["mm_vision_tower_aux"], "mm_vision_tower_aux", known)
        c = dict(defaults, **variants[name], name=name)
        if raw.get("vlmfo1_davit_depths") is not None:
            c["depths"] = tuple(_int_list(raw["vlmfo1_davit_depths"], "vlmfo1_davit_depths", 4, 0,
                                          LIMITS["davit_depth"]))
        return check_davit_fields(c, names={"depths": "vlmfo1_davit_depths"})
    if "vision_config" in raw:
        v, p = raw["vision_config"], "vision_config."
        if not isinstance(v, dict):
            raise ConfigError("vision_config", "expected a JSON object", v)
    else:
        v, p = raw, ""
    if not ("dim_embed" in v or "embed_dim" in v):
        raise ConfigError("", "no DaViT configuration: expected `mm_vision_tower_aux` (VLM-FO1), a Florence-2 "
                          "`vision_config`, or `dim_embed` / `embed_dim` keys")
    dk = "dim_embed" if "dim_embed" in v else "embed_dim"
    c = dict(defaults)
    for f, k in (("depths", "depths"), ("dims", dk), ("num_heads", "num_heads"), ("num_groups", "num_groups"),
                 ("patch_size", "patch_size"), ("patch_stride", "patch_stride"), ("patch_padding", "patch_padding"),
                 ("patch_prenorm", "patch_prenorm"), ("window_size", "window_size"), ("mlp_ratio", "mlp_ratio")):
        if k in v:
            c[f] = v[k]
    src = _Src((v, p))
    c["in_chans"] = _alias(src, ("in_channels", "in_chans"), 1, LIMITS["channels"], 3)
    mt = v.get("model_type", "davit")
    c["name"] = mt if isinstance(mt, str) else "davit"
    return check_davit_fields(c, prefix=p, names={"dims": dk})


# --------------------------------------------------------------------------------------------------------------------
# HFRE (region encoder) and projectors

def _projector(v: Any, key: str) -> str:
    if isinstance(v, str):
        if v in ("linear", "identity", "cabstract", "tokenpacker"):
            return v
        m = re.fullmatch(r"mlp(\d+)x_gelu", v)
        if m and 1 <= int(m.group(1)) <= LIMITS["mlp_layers"]:
            return v
    raise ConfigError(key, "Unknown projector type: expected one of 'linear', 'identity', 'mlp{N}x_gelu' with N in [1, "
                      f"{LIMITS['mlp_layers']}], 'cabstract', 'tokenpacker'", v)


def check_hfre(raw: Dict) -> Dict[str, Any]:
    """FO1's region-encoder keys (names and defaults of the official omchat_arch.py / builder.py) -> HFREConfig
    keyword arguments. Only the vision keys the HFRE reads are checked here (patch_size, hidden_size,
    fullatt_block_indexes); check_vision covers the tower."""
    L = LIMITS
    _need_object(raw)
    src = _Src((raw, ""))
    R = src.int("mm_region_hidden_size", 1, L["width"])
    v = _sub(raw, "vision_config") or {}
    vs = _Src((v, "vision_config."))
    full = vs.get("fullatt_block_indexes", default=[7, 15, 23, 31])[0]
    full = _int_list(full, "vision_config.fullatt_block_indexes", None, 0, L["vit_depth"] - 1, max_len=L["vit_depth"])
    out = dict(
        roi_output_size=src.int("mm_roi_output_size", 1, L["roi"], default=7),
        region_hidden_size=R,
        apply_position_embedding=src.bool("mm_apply_position_embedding", default=True),
        pos_embedding_strategy=src.enum("mm_pos_embedding_strategy", POS_EMBEDDING_STRATEGIES, default="bbox_based"),
        use_vt_region_feature_only=src.bool("mm_use_vt_region_feature_only", default=False),
        use_vision_tower_region_feature=src.bool("mm_use_vision_tower_region_feature", default=False),
        region_feature_combination=src.enum("mm_region_feature_combination", REGION_COMBINATIONS, default="concat"),
        apply_region_layer_norm=src.bool("mm_apply_region_layer_norm", default=False),
        use_simple_fpn=src.bool("mm_use_simpleFPN_for_vt", default=False),
        projector_type=_projector(src.get("mm_projector_type", default="linear")[0], "mm_projector_type"),
        projector_aux_type=_projector(src.get("mm_projector_aux_type", default="linear")[0], "mm_projector_aux_type"),
        mm_hidden_size=src.int("mm_hidden_size", 1, L["width"], default=None, nullable=True),
        hidden_size=src.int("hidden_size", 1, L["width"], default=None, nullable=True),
        patch_size=_alias(vs, ("patch_size", "spatial_patch_size"), 1, L["patch"], QWEN_PATCH_SIZE),
        vt_hidden=vs.int("hidden_size", 1, L["width"], default=1280),
        n_full=len(full))
    if out["use_vision_tower_region_feature"] or out["use_vt_region_feature_only"]:
        if not 1 <= len(full) <= L["hfre_vt_maps"]:
            raise ConfigError("vision_config.fullatt_block_indexes", f"expected 1 to {L['hfre_vt_maps']} full-attention"
                              " blocks (one ViT map each) when mm_use_vision_tower_region_feature is on", full)
    return out


# --------------------------------------------------------------------------------------------------------------------
# the aux image processor, and the whole FO1 config

def check_aux_aspect_ratio(raw: Dict) -> str:
    """The aux resize mode the official loader ends up using (see vlmfo1.aux_image.aux_aspect_ratio_from_config)."""
    _need_object(raw)
    if _Src((raw, "")).bool("delay_load", default=True) is False:
        return "squash"
    if "aux_image_aspect_ratio" not in raw:
        raise ConfigKeyError("aux_image_aspect_ratio", "required key is missing (the official loader requires it)")
    return _enum(raw["aux_image_aspect_ratio"], "aux_image_aspect_ratio", AUX_ASPECT_RATIOS)


def check_fo1(raw: Dict) -> None:
    """Every part of a VLM-FO1 config.json, before any tower is loaded."""
    from .davit import DavitConfig
    from .hfre import HFREConfig
    from .vision import VisionConfig
    from .decoder import DecoderConfig

    DecoderConfig.from_dict(raw)
    VisionConfig.from_dict(raw)
    DavitConfig.from_dict(raw)
    HFREConfig.from_dict(raw)
    check_aux_aspect_ratio(raw)
    # read per request (the prompt length limit of ERRATA E7): null / absent = no limit
    _Src((raw, "")).int("tokenizer_model_max_length", 1, LIMITS["positions"], default=None, nullable=True)
