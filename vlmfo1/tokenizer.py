"""Qwen2 byte-level BPE tokenizer for Qwen2 / Qwen2.5-VL and VLM-FO1 (HF's fast or slow `Qwen2Tokenizer` ids).

Two behaviours, chosen per checkpoint kind with the `slow` option (ERRATA E6):
  * slow=False (default): transformers' fast tokenizer, what `AutoTokenizer` gives for Qwen2 / Qwen2.5-VL:
    added tokens are split out first, then each remaining chunk is NFC-normalized.
  * slow=True: transformers' slow `Qwen2Tokenizer` (use_fast=False), what the official VLM-FO1 loader uses
    (`builder.py`: `AutoTokenizer.from_pretrained(path, use_fast=False)`): the WHOLE text is NFC-normalized first
    (`prepare_for_tokenization`), then the added tokens are split out. The two differ only when NFC changes text
    across an added token's edge: `"<|im_end|>\u0338"` composes `>` + U+0338 into U+226F, so the slow tokenizer no
    longer sees `<|im_end|>` ([27, 91, 318, 6213, 91, 58994, 107]) where the fast one does ([151645, 136, 116]).

Pipeline (spec backbones.md §2.7):
  0. (slow only) the whole text is NFC-normalized,
  1. added / special tokens are split out by exact match (no BOS/EOS is ever added),
  2. each remaining chunk is NFC-normalized,
  3. the Qwen2 regex pre-tokenizes it (every digit is its own piece),
  4. each piece is mapped to GPT-2 byte-level unicode and BPE-merged with the merges ranks.
Decoding concatenates the pieces with no extra spaces; byte runs are decoded as UTF-8 with errors="replace"
(like the slow tokenizer); special tokens are kept unless skip_special_tokens=True.

Steps 1-4 run in HF's Rust `tokenizers` library on a pipeline built here (never from a file's own pipeline);
decoding is done in Python. Sources: a checkpoint folder (`vocab.json` + `merges.txt`, or `tokenizer.json`,
plus added tokens from `tokenizer_config.json` / `added_tokens.json` / `tokenizer.json`), or a tiktoken rank
file (`qwen.tiktoken`), from which the merges are derived (~1 s for 151k tokens).

Only the standard library, `tokenizers` and vlmfo1.constants are imported here.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from tokenizers import AddedToken as _HFAddedToken
from tokenizers import Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from .constants import DEFAULT_SYSTEM_PROMPT, QWEN2_ADDED_TOKENS, QWEN2_BASE_VOCAB_SIZE  # noqa: F401  (re-exported)

# ----------------------------------------------------------------------------------------------------------------
# constants

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-VL / Qwen2.5-VL chat template (written to tokenizer_config.json by save(); `chatml` below mirrors it).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_ENCODER: Dict[int, str] = _bytes_to_unicode()
BYTE_DECODER: Dict[str, int] = {c: b for b, c in BYTE_ENCODER.items()}
_BYTE_TABLE: Tuple[str, ...] = tuple(BYTE_ENCODER[i] for i in range(256))


def bytes_to_token(b: bytes) -> str:
    """Raw bytes -> byte-level unicode token string (e.g. b' the' -> 'Ġthe')."""
    return "".join([_BYTE_TABLE[x] for x in b])


def token_to_bytes(token: str) -> bytes:
    """Byte-level unicode token string -> raw bytes. KeyError if `token` is not byte-level."""
    return bytes([BYTE_DECODER[c] for c in token])


@dataclass(frozen=True)
class AddedTokenSpec:
    """An added token (split out by exact match before BPE). special=True ones are dropped by skip_special_tokens."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False

    def to_config(self) -> dict:
        return {
            "content": self.content, "lstrip": self.lstrip, "normalized": False, "rstrip": self.rstrip,
            "single_word": self.single_word, "special": self.special,
        }


# ----------------------------------------------------------------------------------------------------------------
# tiktoken -> vocab + merges


def read_tiktoken(path: Union[str, os.PathLike]) -> Dict[bytes, int]:
    """Parse a tiktoken rank file (lines "base64token rank") into {token bytes: rank}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiktoken file not found: {path}")
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok_b64, rank = line.split()
                ranks[base64.b64decode(tok_b64, validate=True)] = int(rank)
            except Exception as e:  # noqa: BLE001 - re-raised with the file name
                raise ValueError(f"{path}:{lineno}: malformed tiktoken line {line[:80]!r} ({e})") from None
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def merges_from_ranks(ranks: Mapping[bytes, int]) -> List[Tuple[bytes, bytes]]:
    """Derive BPE merges from tiktoken ranks.

    For every multi-byte token (in rank order) run BPE on its bytes using only ranks below its own until two
    parts remain; those two parts are its merge. Merge order = token rank order. ~1 s for Qwen's 151k tokens.
    """
    get = ranks.get
    merges: List[Tuple[bytes, bytes]] = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        n = len(tok)
        if n == 1:
            continue
        if n == 2:
            parts = [tok[:1], tok[1:]]
        else:
            parts = [tok[i:i + 1] for i in range(n)]
            while len(parts) > 2:
                best, best_rank = -1, rank
                for i in range(len(parts) - 1):
                    r = get(parts[i] + parts[i + 1])
                    if r is not None and r < best_rank:
                        best, best_rank = i, r
                if best < 0:
                    break
                parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2 or get(parts[0], rank) >= rank or get(parts[1], rank) >= rank:
            raise ValueError(f"tiktoken token {tok!r} (rank {rank}) cannot be built by a merge of lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


# ----------------------------------------------------------------------------------------------------------------
# file helpers


def _read_json(path: Path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt tokenizer file {path}: {e}") from None


def _token_content(value) -> Optional[str]:
    """tokenizer_config values may be a string, an AddedToken dict ({"content": ...}) or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _parse_merges_list(raw, path: Path) -> List[Tuple[str, str]]:
    merges = []
    for i, m in enumerate(raw):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, (list, tuple)):
            parts = list(m)
        else:
            parts = []
        if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise ValueError(f"corrupt merges in {path}: entry {i} = {m!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_merges_txt(path: Path) -> List[Tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"corrupt tokenizer file {path}: {e}") from None
    merges = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"corrupt tokenizer file {path}: line {lineno} is not 'left right': {line[:80]!r}")
        merges.append((parts[0], parts[1]))
    return merges


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


_BYTE_CLASSES = (b"0123456789", b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", b" \t\n\r\x0b\x0c",
                 bytes(range(0x80, 0x100)))   # digits, ASCII letters, whitespace, the bytes of non-ASCII characters


def check_text(text, what: str = "the text") -> str:
    """A str that is valid Unicode: TypeError for another type, ValueError naming the position of a lone
    surrogate (e.g. from a bad decode with errors="surrogateescape"; it has no UTF-8 form)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what} holds a lone surrogate {text[e.start]!r} (U+{ord(text[e.start]):04X}) at "
                             f"position {e.start}: not valid Unicode (decode the input with errors='replace' or "
                             f"fix its encoding)") from None
    return text


class Tokenizer:
    """Qwen2 byte-level BPE tokenizer (see module docstring).

    tok = Tokenizer.from_pretrained(ckpt_dir)            # or Tokenizer.from_tiktoken("qwen.tiktoken")
    ids = tok.encode("<|im_start|>user\\nhi<|im_end|>")    # [151644, 872, 198, 6023, 151645]
    tok.decode(ids)                                       # round-trips
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[Tuple[str, str]],
        added_tokens: Iterable[AddedTokenSpec] = (),
        *,
        eos_token: Optional[str] = "<|im_end|>",
        pad_token: Optional[str] = "<|endoftext|>",
        model_max_length: int = 131072,
        chat_template: Optional[str] = QWEN2_VL_CHAT_TEMPLATE,
        slow: bool = False,
    ):
        self.slow = bool(slow)  # NFC the whole text before splitting out added tokens (slow Qwen2Tokenizer)
        self._vocab: Dict[str, int] = dict(vocab)
        self._merges: List[Tuple[str, str]] = [tuple(m) for m in merges]  # type: ignore[misc]
        self._added: Dict[str, AddedTokenSpec] = {}
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.model_max_length = int(model_max_length)
        self.chat_template = chat_template
        self._check_base_vocab()
        for spec in added_tokens:
            self._register_added(spec)
        self._rebuild()

    # -- construction ------------------------------------------------------------------------------------------

    def _check_base_vocab(self) -> None:
        ids = self._vocab.values()
        if len(set(ids)) != len(self._vocab):
            raise ValueError("vocab maps several tokens to the same id")
        if any((not isinstance(i, int)) or i < 0 for i in ids):
            raise ValueError("vocab ids must be non-negative integers")
        self._id_to_base: Dict[int, str] = {i: t for t, i in self._vocab.items()}

    def _register_added(self, spec: AddedTokenSpec) -> None:
        if not spec.content:
            raise ValueError("added token content must be non-empty")
        base_id = self._vocab.get(spec.content)
        if base_id is not None and base_id != spec.id:
            raise ValueError(f"added token {spec.content!r} has id {spec.id} but the vocab gives it id {base_id}")
        other = self._id_to_base.get(spec.id)
        if other is not None and other != spec.content:
            raise ValueError(f"added token {spec.content!r} id {spec.id} is already taken by vocab token {other!r}")
        for old in self._added.values():
            if old.id == spec.id and old.content != spec.content:
                raise ValueError(f"added tokens {old.content!r} and {spec.content!r} share id {spec.id}")
        self._added[spec.content] = spec

    def _rebuild(self) -> None:
        # Added tokens are also put into the BPE model vocab at their ids, so arbitrary (even non-contiguous) ids
        # are honoured: `tokenizers` reuses the model id of an added token whose content is in the vocab.
        model_vocab = dict(self._vocab)
        for spec in self._added.values():
            model_vocab[spec.content] = spec.id
        try:
            bpe = models.BPE(vocab=model_vocab, merges=self._merges, dropout=None, unk_token=None,
                             continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                             byte_fallback=False)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"invalid vocab/merges: {e}") from None
        tk = _HFTokenizer(bpe)
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
        tk.decoder = decoders.ByteLevel()
        specs = sorted(self._added.values(), key=lambda s: s.id)
        tk.add_tokens([
            _HFAddedToken(s.content, single_word=s.single_word, lstrip=s.lstrip, rstrip=s.rstrip,
                          normalized=False, special=s.special)
            for s in specs
        ])
        for s in specs:  # sanity: ids must be exactly the requested ones
            if tk.token_to_id(s.content) != s.id:
                raise RuntimeError(f"added token {s.content!r} got id {tk.token_to_id(s.content)}, expected {s.id}")
        self._tk = tk
        self._id_to_added: Dict[int, AddedTokenSpec] = {s.id: s for s in specs}
        self._special_ids = frozenset(s.id for s in specs if s.special)
        self._id_bytes: Optional[Dict[int, bytes]] = None  # built lazily by decode
        self._caps: Optional[Tuple[int, Tuple[int, ...]]] = None  # built lazily by min_tokens

    @classmethod
    def from_tiktoken(
        cls,
        path: Union[str, os.PathLike],
        extra_tokens: Union[None, Sequence[str], Mapping[str, int]] = None,
        **kwargs,
    ) -> "Tokenizer":
        """Build from a tiktoken rank file + the Qwen2.5 added tokens (ids 151643..151664).

        extra_tokens: more added tokens, either a list (special, ids assigned after the last one) or {content: id}.
        """
        ranks = read_tiktoken(path)
        merges_b = merges_from_ranks(ranks)
        vocab = {bytes_to_token(b): r for b, r in ranks.items()}
        merges = [(bytes_to_token(a), bytes_to_token(b)) for a, b in merges_b]
        base = len(vocab)
        added = {c: AddedTokenSpec(c, base + (i - QWEN2_BASE_VOCAB_SIZE), s) for c, i, s in QWEN2_ADDED_TOKENS}
        if isinstance(extra_tokens, Mapping):
            for content, idx in extra_tokens.items():
                added[content] = AddedTokenSpec(content, int(idx), True)
        elif extra_tokens:
            next_id = base + len(QWEN2_ADDED_TOKENS)
            for content in extra_tokens:
                if content not in added:
                    idx = vocab.get(content)
                    if idx is None:
                        idx, next_id = next_id, next_id + 1
                    added[content] = AddedTokenSpec(content, idx, True)
        return cls(vocab, merges, list(added.values()), **kwargs)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike],
                        extra_tokens: Optional[Sequence[str]] = None, slow: bool = False) -> "Tokenizer":
        """Load from a checkpoint folder: `vocab.json` + `merges.txt` (preferred: what the slow reference reads) or
        `tokenizer.json`; added tokens from `tokenizer.json` `added_tokens`, then `added_tokens.json`, then
        `tokenizer_config.json` `added_tokens_decoder` (later sources win). eos/pad/model_max_length/chat_template
        from `tokenizer_config.json`. If no source lists any added token and the vocab is Qwen2's, the Qwen2.5
        added tokens are used. slow: the slow Qwen2Tokenizer's NFC order (see module doc): True for VLM-FO1
        (loaded with use_fast=False), False for stock Qwen2 / Qwen2.5-VL (AutoTokenizer gives the fast one)."""
        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {d}")
        vocab_p, merges_p, tj_p = d / "vocab.json", d / "merges.txt", d / "tokenizer.json"
        cfg_p, at_p, stm_p = d / "tokenizer_config.json", d / "added_tokens.json", d / "special_tokens_map.json"

        cfg = _read_json(cfg_p) if cfg_p.is_file() else {}
        if not isinstance(cfg, dict):
            raise ValueError(f"corrupt tokenizer file {cfg_p}: expected a JSON object")
        stm = _read_json(stm_p) if stm_p.is_file() else {}
        if not isinstance(stm, dict):
            raise ValueError(f"corrupt tokenizer file {stm_p}: expected a JSON object")

        tj = None
        if vocab_p.is_file() or merges_p.is_file():
            if not vocab_p.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {vocab_p} (merges.txt is present)")
            if not merges_p.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {merges_p} (vocab.json is present)")
            vocab = _read_json(vocab_p)
            if not isinstance(vocab, dict):
                raise ValueError(f"corrupt tokenizer file {vocab_p}: expected a JSON object token -> id")
            merges = _read_merges_txt(merges_p)
        elif tj_p.is_file():
            tj = _read_json(tj_p)
            model = tj.get("model") if isinstance(tj, dict) else None
            if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict) or "merges" not in model:
                raise ValueError(f"corrupt tokenizer file {tj_p}: no BPE model with vocab and merges")
            if model.get("type", "BPE") != "BPE":
                raise ValueError(f"{tj_p}: model type {model.get('type')!r} is not BPE")
            vocab = model["vocab"]
            merges = _parse_merges_list(model["merges"], tj_p)
        else:
            raise FileNotFoundError(
                f"no tokenizer files in {d}: need vocab.json + merges.txt, or tokenizer.json")
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
            raise ValueError(f"corrupt vocab in {vocab_p if vocab_p.is_file() else tj_p}: entries must be str -> int")

        # names of tokens that are special through the special-tokens attributes
        special_names = set()
        for src in (stm, cfg):
            for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
                c = _token_content(src.get(key))
                if c:
                    special_names.add(c)
            for v in src.get("additional_special_tokens") or []:
                c = _token_content(v)
                if c:
                    special_names.add(c)

        added: Dict[str, AddedTokenSpec] = {}
        found_source = False
        if (tj is None and tj_p.is_file() and not at_p.is_file()
                and not isinstance(cfg.get("added_tokens_decoder"), dict)):
            tj = _read_json(tj_p)  # only needed for its added_tokens
        if isinstance(tj, dict) and isinstance(tj.get("added_tokens"), list):
            found_source = True
            for e in tj["added_tokens"]:
                try:
                    added[e["content"]] = AddedTokenSpec(
                        e["content"], int(e["id"]), bool(e.get("special", True)), bool(e.get("lstrip", False)),
                        bool(e.get("rstrip", False)), bool(e.get("single_word", False)))
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"corrupt added_tokens entry in {tj_p}: {e!r}") from None
        if at_p.is_file():
            found_source = True
            at = _read_json(at_p)
            if not isinstance(at, dict):
                raise ValueError(f"corrupt tokenizer file {at_p}: expected a JSON object token -> id")
            for content, idx in at.items():
                if not isinstance(idx, int):
                    raise ValueError(f"corrupt tokenizer file {at_p}: id of {content!r} is {idx!r}")
                prev = added.get(content)
                added[content] = AddedTokenSpec(content, idx, prev.special if prev else content in special_names)
        atd = cfg.get("added_tokens_decoder")
        if isinstance(atd, dict):
            found_source = True
            for idx, e in atd.items():
                try:
                    content = e["content"] if isinstance(e, dict) else str(e)
                    e = e if isinstance(e, dict) else {}
                    added[content] = AddedTokenSpec(
                        content, int(idx), bool(e.get("special", True)), bool(e.get("lstrip", False)),
                        bool(e.get("rstrip", False)), bool(e.get("single_word", False)))
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"corrupt added_tokens_decoder entry in {cfg_p}: {idx!r}: {e!r}") from None
        if not found_source and len(vocab) == QWEN2_BASE_VOCAB_SIZE and "<|endoftext|>" not in vocab:
            added = {c: AddedTokenSpec(c, i, s) for c, i, s in QWEN2_ADDED_TOKENS}
        added = {c: (s if s.special or c not in special_names else AddedTokenSpec(
            c, s.id, True, s.lstrip, s.rstrip, s.single_word)) for c, s in added.items()}

        kwargs = {"slow": slow}
        if "eos_token" in cfg:
            kwargs["eos_token"] = _token_content(cfg["eos_token"])
        if "pad_token" in cfg:
            kwargs["pad_token"] = _token_content(cfg["pad_token"])
        if isinstance(cfg.get("model_max_length"), (int, float)) and cfg["model_max_length"] < 1e12:
            kwargs["model_max_length"] = int(cfg["model_max_length"])
        if "chat_template" in cfg:
            kwargs["chat_template"] = cfg["chat_template"]
        tok = cls(vocab, merges, sorted(added.values(), key=lambda s: s.id), **kwargs)
        if extra_tokens:
            tok.add_tokens(list(extra_tokens), special=True)
        return tok

    # -- saving ------------------------------------------------------------------------------------------------

    def tokenizer_config(self) -> dict:
        specs = sorted(self._added.values(), key=lambda s: s.id)
        cfg = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": {str(s.id): s.to_config() for s in specs},
            "additional_special_tokens": [
                s.content for s in specs if s.special and s.content not in (self.eos_token, self.pad_token)],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "errors": "replace",
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        return cfg

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write vocab.json, merges.txt, tokenizer.json and tokenizer_config.json (loadable by from_pretrained
        and by transformers' AutoTokenizer)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(self._vocab, f, ensure_ascii=False)
        with open(d / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.write("".join(f"{a} {b}\n" for a, b in self._merges))
        # tokenizer.json: the pipeline serialized by `tokenizers` with the base vocab only, added tokens listed
        # with their ids (as in Qwen's own tokenizer.json)
        tk = _HFTokenizer(models.BPE(vocab=self._vocab, merges=self._merges, dropout=None, unk_token=None,
                                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                     byte_fallback=False))
        tk.normalizer = self._tk.normalizer
        tk.pre_tokenizer = self._tk.pre_tokenizer
        tk.decoder = self._tk.decoder
        tj = json.loads(tk.to_str())
        tj["added_tokens"] = [dict(id=s.id, **s.to_config())
                              for s in sorted(self._added.values(), key=lambda s: s.id)]
        with open(d / "tokenizer.json", "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False)
        with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(self.tokenizer_config(), f, ensure_ascii=False, indent=2)

    # -- vocabulary --------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens, added ones included (151665 for Qwen2.5)."""
        return len(self._vocab) + sum(1 for c in self._added if c not in self._vocab)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def base_vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> Dict[str, int]:
        v = dict(self._vocab)
        v.update({c: s.id for c, s in self._added.items()})
        return v

    @property
    def added_tokens(self) -> Dict[str, int]:
        return {c: s.id for c, s in sorted(self._added.items(), key=lambda kv: kv[1].id)}

    @property
    def special_ids(self) -> frozenset:
        return self._special_ids

    def token_to_id(self, token: str) -> Optional[int]:
        spec = self._added.get(token)
        return spec.id if spec is not None else self._vocab.get(token)

    def id_to_token(self, idx: int) -> Optional[str]:
        spec = self._id_to_added.get(idx)
        return spec.content if spec is not None else self._id_to_base.get(idx)

    def _require(self, token: Optional[str]) -> int:
        i = self.token_to_id(token) if token is not None else None
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def eos_id(self) -> int:
        return self._require(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self._require(self.pad_token)

    @property
    def endoftext_id(self) -> int:
        return self._require("<|endoftext|>")

    @property
    def im_start_id(self) -> int:
        return self._require("<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self._require("<|im_end|>")

    def add_tokens(self, tokens: Sequence[str], special: bool = True) -> int:
        """Add tokens (split out before BPE) with ids after the current largest id. Returns how many were new."""
        next_id = max([*self._id_to_base, *self._id_to_added, -1]) + 1
        n = 0
        for t in tokens:
            if t in self._added:
                continue
            idx = self._vocab.get(t)
            if idx is None:
                idx, next_id = next_id, next_id + 1
            self._register_added(AddedTokenSpec(t, idx, special))
            n += 1
        if n:
            self._rebuild()
        return n

    # -- encode / decode ---------------------------------------------------------------------------------------

    def _prep(self, text: str) -> str:
        check_text(text, "the text")
        return unicodedata.normalize("NFC", text) if self.slow else text

    def _class_caps(self) -> Tuple[int, Tuple[int, ...]]:
        """(the most bytes one token covers, the most bytes of each of _BYTE_CLASSES one token covers), over the
        base vocab and the added tokens: a text with B bytes of a class is at least B / cap tokens long."""
        if self._caps is None:
            longest, caps = 1, [0] * len(_BYTE_CLASSES)
            for b in list(self._bytes_of().values()) + [s.content.encode("utf-8") for s in self._added.values()]:
                longest = max(longest, len(b))
                for k, cls in enumerate(_BYTE_CLASSES):
                    n = len(b) - len(b.translate(None, cls))
                    if n > caps[k]:
                        caps[k] = n
            self._caps = (longest, tuple(caps))
        return self._caps

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), computed without tokenizing (linear, fast on megabytes): every token
        covers at most as many bytes, and as many digits, letters, spaces, ... as the vocabulary's longest."""
        check_text(text, "the text")
        longest, caps = self._class_caps()
        lows = []
        for t in {text, unicodedata.normalize("NFC", text)}:   # what the BPE sees, with or without NFC
            b = t.encode("utf-8")
            low = -(-len(b) // longest)
            for cls, cap in zip(_BYTE_CLASSES, caps):
                if cap:
                    low = max(low, -(-(len(b) - len(b.translate(None, cls))) // cap))
            lows.append(low)
        return min(lows)

    def check_length(self, text: str, max_tokens: int, what: str = "the prompt") -> None:
        """ValueError at once when `text` cannot fit in max_tokens tokens (by the min_tokens bound), before any
        tokenizing; the exact count is the caller's check after encode."""
        low = self.min_tokens(text)
        if low > max_tokens:
            raise ValueError(f"{what} is too long: {len(text)} characters are at least {low} tokens, more than the "
                             f"{max_tokens} that fit (max_context)")

    def encode(self, text: str) -> List[int]:
        """Token ids of `text` (no BOS/EOS added; added tokens split out; NFC; Qwen2 BPE)."""
        return self._tk.encode(self._prep(text), add_special_tokens=False).ids

    __call__ = encode

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tk.encode_batch([self._prep(t) for t in texts], add_special_tokens=False)]

    def tokenize(self, text: str) -> List[str]:
        """Token strings (byte-level unicode) of `text`."""
        return self._tk.encode(self._prep(text), add_special_tokens=False).tokens

    def _bytes_of(self) -> Dict[int, bytes]:
        if self._id_bytes is None:
            table = {}
            for t, i in self._vocab.items():
                if i in self._id_to_added:
                    continue
                try:
                    table[i] = token_to_bytes(t)
                except KeyError:  # non byte-level vocab entry: decode it as its UTF-8 text
                    table[i] = t.encode("utf-8")
            self._id_bytes = table
        return self._id_bytes

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Concatenate token texts with no extra spaces. Runs of BPE tokens are decoded as UTF-8 with
        errors='replace' (as the slow tokenizer does); unknown ids are skipped (as the fast tokenizer does)."""
        table = self._bytes_of()
        out: List[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            b = table.get(i)
            if b is not None:
                buf += b
                continue
            spec = self._id_to_added.get(i)
            if spec is None or (skip_special_tokens and spec.special):
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            out.append(spec.content)
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> Union[str, List[int]]:
        """ChatML prompt (see `chatml`), as ids (tokenize=True) or text."""
        text = chatml(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, base={len(self._vocab)}, merges={len(self._merges)}, "
                f"added={len(self._added)}, eos={self.eos_token!r}, slow={self.slow})")


class IncrementalDecoder:
    """Streaming decode: feed ids one at a time; each feed returns the newly completed text (possibly "").

    A multi-byte UTF-8 character split over several tokens is held back until complete; invalid bytes become
    U+FFFD exactly as in `Tokenizer.decode`, so "".join(feeds) + flush() == tok.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._table = tokenizer._bytes_of()
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, idx: int) -> str:
        idx = int(idx)
        b = self._table.get(idx)
        if b is not None:
            return self._utf8.decode(b)
        spec = self._tok._id_to_added.get(idx)
        if spec is None or (self._skip and spec.special):
            return ""
        return self.flush() + spec.content

    def flush(self) -> str:
        """End of stream (or of a BPE run): emit whatever is pending (an incomplete char becomes U+FFFD)."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out

    def __call__(self, ids: Iterable[int]):
        """Generator over non-empty pieces for `ids`, flushed at the end."""
        for i in ids:
            s = self.feed(i)
            if s:
                yield s
        s = self.flush()
        if s:
            yield s


# ----------------------------------------------------------------------------------------------------------------
# ChatML


def chatml(messages: Sequence[Mapping], add_generation_prompt: bool = True,
           default_system: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> str:
    """ChatML text as Qwen2/2.5-VL's chat template renders it for these messages.

    Each message {"role": ..., "content": str | [{"type": "text", "text": ...}, {"type": "image"}, ...]} becomes
    "<|im_start|>{role}\\n{content}<|im_end|>\\n"; images/videos become <|vision_start|><|image_pad|><|vision_end|>
    (resp. <|video_pad|>). If the first message is not a system one, the default system turn
    "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n" is prepended (default_system=None disables
    that). add_generation_prompt appends "<|im_start|>assistant\\n".
    """
    parts: List[str] = []
    for k, m in enumerate(messages):
        role = m["role"]
        if k == 0 and role != "system" and default_system is not None:
            parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        parts.append(f"<|im_start|>{role}\n")
        content = m.get("content", "")
        if isinstance(content, str):
            parts.append(content)
        else:
            for c in content:
                if c.get("type") == "image" or "image" in c or "image_url" in c:
                    parts.append("<|vision_start|><|image_pad|><|vision_end|>")
                elif c.get("type") == "video" or "video" in c:
                    parts.append("<|vision_start|><|video_pad|><|vision_end|>")
                elif "text" in c:
                    parts.append(str(c["text"]))
        parts.append("<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


__all__ = [
    "Tokenizer", "IncrementalDecoder", "AddedTokenSpec", "chatml", "read_tiktoken", "merges_from_ranks",
    "bytes_to_token", "token_to_bytes", "PRETOKENIZE_REGEX", "QWEN2_ADDED_TOKENS", "QWEN2_VL_CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
]
