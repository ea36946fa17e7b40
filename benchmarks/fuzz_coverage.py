"""Coverage-guided fuzzing of vlmfo1's file front ends with atheris (libFuzzer for Python), for a fixed budget.

    pip install -e ".[fuzz]"                                       # atheris (a binary wheel; libFuzzer inside)
    python benchmarks/fuzz_coverage.py --seconds 60                # the four targets, 60 s of fuzzing each
    python benchmarks/fuzz_coverage.py --target safetensors --runs 20000 --stop-on-finding
    python benchmarks/fuzz_coverage.py --seconds 600 --workdir /tmp/fz   # keeps the grown corpora: a rerun resumes

Targets (the harness of tests/fuzz/targets.py; one fuzzing process per target, one target after the other):
  safetensors  a .safetensors file through SafetensorsFile (read_header, then every tensor read), judged against the
               `safetensors` library (targets.judge "oracle": both refuse, or both accept with identical bytes)
  image        an image file through load_image and the FO1 preprocessing (Harness.t_image; tiny FO1 checkpoint)
  boxes        a --boxes JSON file through the CLI reader, the proposal checks and the preprocessing (Harness.t_boxes)
  config       config.json of the tiny FO1 checkpoint through vlmfo1/config_check.py alone (read_config_file +
               check_fo1; no weights are loaded, for speed; Harness.t_config_check)

How: every vlmfo1 module is instrumented (atheris.instrument_imports(include=["vlmfo1"]); nothing else is), so the
coverage libFuzzer steers by is vlmfo1's own branches. The corpus starts from a few cases per target of the seeded
deterministic corpus (tests/fuzz/corpus.py) plus the saved findings, so fuzzing starts from valid structure. Inputs
are made by a structure-aware mutator beside libFuzzer's byte mutations (atheris.Mutate): safetensors files have
their JSON header edited as a tree (dtypes, shapes, offsets, names, metadata; sometimes re-laid out so the file is
valid again) or as bytes, and the length field re-packed; config and boxes files are edited as JSON trees with the
keys and enumerations vlmfo1 knows (taken from its source); PNG images get their chunk CRCs repaired after a
mutation so the decoder gets past the checksum. A libFuzzer dictionary of the same words serves the byte mutations.

A finding is: an exception Harness.run classifies as Unclear (wrong type, empty message, or a message naming no
file), any exception outside the clean set (ValueError, KeyError, TypeError, missing-file errors), a disagreement
with the safetensors library (safetensors target), and, found by libFuzzer itself, a crash (a signal), a hang (past
--timeout seconds for one input) or running out of memory (past --rss-limit-mb). A Python finding is minimised
in-process (JSON keys, then byte chunks, while its signature — kind, exception type and place — stays the same; a
few seconds at most), saved to tests/fuzz/corpus/<target>/<hash> (config findings to fo1_config/: the CI suite
replays them through the full load), printed, and fuzzing goes on (--stop-on-finding: the target stops). Each
signature is saved once per run; saved inputs that still fail when a target starts are reported as known.

Output: the command, then per target the executions, executions/s, vlmfo1 coverage as libFuzzer counts it (cov:
instrumented edges hit; ft: features, edges with hit-count buckets) at the start (the seeds) and at the end, corpus
size, findings (new unique / total hits / known), crashes, hangs, and the elapsed time.
"""
from __future__ import annotations

import argparse
import faulthandler
import hashlib
import importlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIKTOKEN = os.path.join(os.path.dirname(ROOT), "shared", "data", "tokenizer", "qwen.tiktoken")
SAVED = os.path.join(ROOT, "tests", "fuzz", "corpus")
TARGETS = ("safetensors", "image", "boxes", "config")
HARNESS = {"safetensors": "safetensors", "image": "image", "boxes": "boxes", "config": "config_check"}
SUITE = {"safetensors": "safetensors", "image": "image", "boxes": "boxes", "config": "fo1_config"}  # corpus/<dir>
MAX_LEN = {"safetensors": 4096, "image": 16384, "boxes": 4096, "config": 8192}
INSTRUMENTED = ("vlmfo1", "vlmfo1.jsonsafe", "vlmfo1.safetensors", "vlmfo1.config_check", "vlmfo1.options",
                "vlmfo1.decoder", "vlmfo1.generation", "vlmfo1.vision", "vlmfo1.davit", "vlmfo1.hfre", "vlmfo1.aux_image", "vlmfo1.image", "vlmfo1.proposals",
                "vlmfo1.fo1_prompt", "vlmfo1.fo1", "vlmfo1.cli")
MINIMIZE_SECONDS = 4.0
MINIMIZE_TESTS = 400
RESTARTS = 8        # a target whose process dies (crash, hang, OOM) is started again on its corpus, this many times


# ==================================================================== findings: classification and signatures
def _norm(s: str, n: int = 110) -> str:
    """A message with the parts that vary per input (paths, quoted names, numbers) blanked."""
    s = re.sub(r"(/[^\s:'\"(),]+)+", "<path>", s)
    s = re.sub(r"'[^']*'|\"[^\"]*\"", "<q>", s)
    s = re.sub(r"\d+", "N", s)
    return s[:n]


def _where(exc: BaseException) -> str:
    """The innermost vlmfo1 frame of an exception's traceback (file:line function), else the innermost frame."""
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if f"{os.sep}vlmfo1{os.sep}" in f.filename] or list(tb)
    if not frames:
        return "?"
    f = frames[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"


class Checker:
    """Runs one input through the harness and says whether it is a finding: None, or (kind, signature, detail)."""

    def __init__(self, target: str, fo1: str, scratch: str):
        from tests.fuzz.targets import Harness
        self.target, self.harness_target = target, HARNESS[target]
        self.h = Harness({"fo1": fo1}, scratch)

    def __call__(self, data: bytes) -> Optional[Tuple[str, str, str]]:
        from tests.fuzz.targets import Changed, Unclear, judge
        try:
            outcome = self.h.run(self.harness_target, data)
        except (Unclear, Changed) as exc:
            cause = exc.__cause__
            if cause is not None:
                sig = f"unclear: {type(cause).__name__} at {_where(cause)}"
            else:
                sig = f"unclear: {_norm(str(exc), 80)} at {_where(exc)}"
            return "unclear", sig, f"{type(exc).__name__}: {exc}"
        except KeyboardInterrupt:
            raise
        except BaseException as exc:   # noqa: BLE001 - anything outside the clean set is the finding
            return ("exception", f"{type(exc).__name__} at {_where(exc)}",
                    f"{type(exc).__name__}: {str(exc)[:300]}\n{''.join(traceback.format_exception(exc)[-6:])}")
        if self.target == "safetensors":
            verdict = judge("oracle", "safetensors", outcome, self.h, data)
            if verdict:
                return "oracle", f"oracle: {_norm(verdict, 120)}", verdict[:600]
        return None


# ==================================================================== minimisation (cheap, in-process)
class _Budget:
    def __init__(self, seconds: float, tests: int):
        self.end, self.left = time.monotonic() + seconds, tests

    def take(self) -> bool:
        self.left -= 1
        return self.left >= 0 and time.monotonic() < self.end


def _ddmin(b: bytes, ok: Callable[[bytes], bool], budget: _Budget) -> bytes:
    """Drop byte chunks (halves, quarters, ... single bytes) while ok() holds."""
    chunk = max(1, len(b) // 2)
    while chunk >= 1 and b:
        i = 0
        while i < len(b):
            if not budget.take():
                return b
            cand = b[:i] + b[i + chunk:]
            if ok(cand):
                b = cand
            else:
                i += chunk
        chunk //= 2
    return b


def _json_reduce(obj: Any, dump: Callable[[Any], bytes], ok: Callable[[bytes], bool], budget: _Budget) -> Any:
    """Delete object keys and list items (outermost first) while ok(dump(obj)) holds."""
    changed = True
    while changed:
        changed = False
        stack = [obj]
        while stack:
            node = stack.pop()
            keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node) - 1, -1, -1)) \
                if isinstance(node, list) else []
            for k in keys:
                if not budget.take():
                    return obj
                v = node[k]
                if isinstance(node, dict):
                    del node[k]
                else:
                    node.pop(k)
                if ok(dump(obj)):
                    changed = True
                    continue
                if isinstance(node, dict):
                    node[k] = v
                else:
                    node.insert(k, v)
                if isinstance(v, (dict, list)):
                    stack.append(v)
    return obj


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _st_split(data: bytes) -> Optional[Tuple[bytes, bytes]]:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return None
    return data[8:8 + n], data[8 + n:]


def _st_pack(hb: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(hb)) + hb + body


def minimize(target: str, data: bytes, sig: str, check: Checker) -> bytes:
    budget = _Budget(MINIMIZE_SECONDS, MINIMIZE_TESTS)

    def ok(cand: bytes) -> bool:
        r = check(cand)
        return r is not None and r[1] == sig

    best = data
    if target == "safetensors":
        sp = _st_split(best)
        if sp is not None:
            hb, body = sp
            try:
                h = json.loads(hb)
            except Exception:   # noqa: BLE001 - not JSON: bytes only
                h = None
            if isinstance(h, dict):
                h = _json_reduce(h, lambda o: _st_pack(_dumps(o), body), ok, budget)
                if ok(_st_pack(_dumps(h), body)):
                    hb = _dumps(h)
            hb = _ddmin(hb, lambda c: ok(_st_pack(c, body)), budget)
            body = _ddmin(body, lambda c: ok(_st_pack(hb, c)), budget)
            if ok(_st_pack(hb, body)):
                best = _st_pack(hb, body)
    elif target in ("config", "boxes"):
        try:
            obj = json.loads(best.decode("utf-8-sig"))
        except Exception:   # noqa: BLE001
            obj = None
        if isinstance(obj, (dict, list)):
            obj = _json_reduce(obj, _dumps, ok, budget)
            if ok(_dumps(obj)):
                best = _dumps(obj)
    best = _ddmin(best, ok, budget)
    return best if ok(best) else data


# ==================================================================== structure-aware mutators
INTS = [0, 1, 2, 3, 4, 7, 8, 14, 16, 28, 64, 100, 101, 127, 128, 255, 256, 1023, 1024, 4096, 65535, 65536, 2**20,
        2**24, 2**30, 2**31 - 1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -2, -2**31,
        -2**63]
FLOATS = [0.0, -0.0, 0.5, 1.5, 1e-30, 1e-6, 1e30, 1e308, -1.0, float("nan"), float("inf"), float("-inf"), 64.0,
          2.0**63]


class JsonMutator:
    """Edits a JSON document as a tree: replace a value by a related or hostile one, delete or insert a key, swap
    or copy subtrees; `words` are the keys and enumeration values worth trying."""

    def __init__(self, keys: List[str], strings: List[str]):
        self.keys, self.strings = keys, strings

    def value_like(self, v: Any, r: random.Random) -> Any:
        if isinstance(v, bool):
            return r.choice([not v, 0, 1, "true", None, [v]])
        if isinstance(v, int):
            return r.choice([v + 1, v - 1, -v, 2 * v, v // 2, 0, 1, float(v), v + 0.5, str(v), None, True, [v],
                             r.choice(INTS), r.choice(INTS), v * r.choice(INTS)])
        if isinstance(v, float):
            return r.choice([v * 2, v / 2, -v, int(v) if math.isfinite(v) else 0, r.choice(FLOATS),
                             r.choice(FLOATS), str(v), None])
        if isinstance(v, str):
            return r.choice([r.choice(self.strings), r.choice(self.strings), "", v + "x", v.upper(), v[:-1],
                             "a/" + v, v + ".pth", None, 1, [v], "\ud800"])
        if isinstance(v, list):
            c = list(v)
            op = r.randrange(8)
            if op == 0 or not c:
                c.append(self.fresh(r))
            elif op == 1:
                c.pop(r.randrange(len(c)))
            elif op == 2:
                c.append(r.choice(c))
            elif op == 3:
                c.reverse()
            elif op == 4:
                i = r.randrange(len(c))
                c[i] = self.value_like(c[i], r)
            elif op == 5:
                return []
            elif op == 6:
                return [c]
            else:
                return c * r.choice([2, 3, 50])
            return c
        if isinstance(v, dict):
            return r.choice([{}, [], None, {r.choice(self.keys): self.fresh(r)}])
        return self.fresh(r)

    def fresh(self, r: random.Random) -> Any:
        return r.choice([r.choice(INTS), r.choice(FLOATS), r.choice(self.strings), None, True, False, [], {},
                         [r.choice(INTS)] * r.choice([1, 3, 4]), [0.0, 0.0, 1.0, 1.0]])

    def mutate(self, obj: Any, r: random.Random, rounds: int = 0) -> Any:
        nodes: List[Tuple[Any, Any]] = []      # (container, key) of every value, the root excluded
        dicts: List[dict] = [obj] if isinstance(obj, dict) else []
        stack = [obj]
        while stack:
            node = stack.pop()
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for k, v in items:
                nodes.append((node, k))
                if isinstance(v, dict):
                    dicts.append(v)
                if isinstance(v, (dict, list)):
                    stack.append(v)
        if not nodes:
            return self.value_like(obj, r) if r.random() < 0.5 else [obj] if not isinstance(obj, dict) else \
                {r.choice(self.keys): self.fresh(r)}
        for _ in range(1 + (r.random() < 0.3) + rounds):
            op = r.random()
            node, k = r.choice(nodes)
            if k not in (node if isinstance(node, dict) else range(len(node))):
                continue
            if op < 0.55:
                node[k] = self.value_like(node[k], r)
            elif op < 0.7:
                if isinstance(node, dict):
                    del node[k]
                else:
                    node.pop(k)
            elif op < 0.85 and dicts:
                d = r.choice(dicts)
                d[r.choice(self.keys)] = r.choice([self.fresh(r), node[k]])
            else:
                other, k2 = r.choice(nodes)
                if k2 in (other if isinstance(other, dict) else range(len(other))):
                    node[k], other[k2] = other[k2], node[k]
        return obj


def _source_words(modules: List[str]) -> Tuple[List[str], List[str]]:
    """Keys and enumeration values written in vlmfo1's source: every string constant that looks like a JSON key
    (keys) and every short word (strings)."""
    import ast
    keys, words = set(), set()
    for m in modules:
        path = os.path.join(ROOT, "vlmfo1", m + ".py")
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except OSError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and 0 < len(node.value) <= 40:
                s = node.value
                if re.fullmatch(r"[a-z][a-z0-9_]*", s):
                    keys.add(s)
                if re.fullmatch(r"[\w./{}-]+", s):
                    words.add(s)
    return sorted(keys), sorted(words)


class Mutators:
    """The custom mutator of each target: structure-aware edits most of the time, libFuzzer's byte mutations
    (atheris.Mutate) the rest."""

    def __init__(self, target: str):
        self.target = target
        if target == "config":
            keys, words = _source_words(["config_check", "decoder", "vision", "davit", "hfre", "aux_image", "fo1"])
        elif target == "boxes":
            keys, words = _source_words(["cli", "proposals"])
            keys += ["boxes", "box_format", "scores", "bbox", "score"]
            words += ["xyxy", "xywh", "cxcywh", "xyxyn", "xywhn", "cxcywhn", "yxyx"]
        else:
            keys, words = ["a", "b", "__metadata__", "dtype", "shape", "data_offsets", "format"], ["pt", "F32"]
        self.keys, self.words = keys, words
        self.json = JsonMutator(keys, words)

    def dictionary(self) -> List[bytes]:
        """libFuzzer dictionary entries (for its byte mutations)."""
        from vlmfo1.safetensors import _DTYPES, _SUBBYTE_BITS
        if self.target == "safetensors":
            ws = [f'"{d}"' for d in list(_DTYPES) + list(_SUBBYTE_BITS)] + [
                '"dtype"', '"shape"', '"data_offsets"', '"__metadata__"', "[0,0]", "[]", "18446744073709551615",
                "9223372036854775807", "4294967296", "NaN", "Infinity", "\\ud800", "-0", "1e308", "0.0"]
        elif self.target == "image":
            ws = ["\x89PNG\r\n\x1a\n", "IHDR", "IDAT", "IEND", "PLTE", "tRNS", "gAMA", "iCCP", "eXIf", "acTL", "fcTL",
                  "\xff\xd8\xff", "\xff\xc0", "\xff\xc2", "\xff\xda", "\xff\xd9", "\xff\xe1", "Exif\x00\x00", "GIF89a",
                  "NETSCAPE2.0", "BM", "II*\x00", "MM\x00*", "RIFF", "WEBPVP8 ", "WEBPVP8L", "VP8X", "P6\n", "P5\n",
                  "255\n", "65535\n", "\xff\xff\xff\x7f", "\x00\x00\x00\x00", "\xff\xff"]
            return [w.encode("latin-1") for w in ws]
        else:
            ws = [f'"{k}"' for k in self.keys] + [f'"{w}"' for w in self.words if w not in self.keys] + [
                "NaN", "Infinity", "-Infinity", "null", "true", "false", "1e308", "1e400", "-0", "0.5", "[]", "{}",
                "18446744073709551616"]
        return [w.encode("utf-8", "backslashreplace") for w in ws]

    def __call__(self, data: bytes, max_size: int, seed: int) -> bytes:
        import atheris
        r = random.Random(seed)
        try:
            out = getattr(self, "_" + self.target)(data, max_size, r)
        except Exception:   # noqa: BLE001 - a mutator bug must not stop the fuzzer: bytes instead
            out = None
        if out is None:
            out = atheris.Mutate(data, max_size)
        return out[:max_size]

    # ---------------------------------------------------------------- JSON files
    def _json_file(self, data: bytes, r: random.Random) -> Optional[bytes]:
        if r.random() < 0.3:
            return None
        try:
            obj = json.loads(data.decode("utf-8-sig"))
        except Exception:   # noqa: BLE001
            return None
        obj = self.json.mutate(obj, r)
        out = json.dumps(obj, indent=r.choice([None, None, 1]), ensure_ascii=r.random() < 0.8)
        return out.encode("utf-8", "surrogatepass")

    def _config(self, data, max_size, r):
        return self._json_file(data, r)

    def _boxes(self, data, max_size, r):
        return self._json_file(data, r)

    # ---------------------------------------------------------------- safetensors files
    def _safetensors(self, data, max_size, r):
        import atheris
        sp = _st_split(data)
        if sp is None or r.random() < 0.2:
            return None
        hb, body = sp
        op = r.random()
        if op < 0.25:
            hb = atheris.Mutate(hb, max(64, 2 * len(hb)))
        elif op < 0.85:
            try:
                h = json.loads(hb)
            except Exception:   # noqa: BLE001
                return None
            if not isinstance(h, dict):
                return None
            h, body = self._st_tree(h, body, r)
            hb = json.dumps(h, separators=(",", ":") if r.random() < 0.7 else (", ", ": ")).encode(
                "utf-8", "surrogatepass")
            if r.random() < 0.5:
                hb += b" " * (-len(hb) % 8)
        else:
            body = atheris.Mutate(body, len(body) + 64) if r.random() < 0.7 else body[:r.randrange(len(body) + 1)]
        n = len(hb)
        if r.random() < 0.05:
            n = max(0, n + r.choice([-8, -1, 1, 8, len(body)]))
        return struct.pack("<Q", n) + hb + body

    def _st_tree(self, h: dict, body: bytes, r: random.Random) -> Tuple[dict, bytes]:
        from vlmfo1.safetensors import _DTYPES, _SUBBYTE_BITS
        dtypes = list(_DTYPES) + list(_SUBBYTE_BITS)
        names = [k for k in h if k != "__metadata__"]
        op = r.randrange(11)
        if op <= 3 and names:       # one field of one tensor
            e = h[r.choice(names)]
            if not isinstance(e, dict):
                h[r.choice(names)] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
            else:
                f = r.choice(["dtype", "shape", "data_offsets", "dtype", "shape"])
                cur = e.get(f)
                if f == "dtype":
                    e[f] = r.choice(dtypes) if r.random() < 0.85 else self.json.value_like(cur or "F32", r)
                elif f == "shape" and isinstance(cur, list):
                    e[f] = self._shape_like(cur, r)
                elif f == "data_offsets" and isinstance(cur, list) and len(cur) == 2 and \
                        all(type(x) is int for x in cur):
                    b, en = cur
                    e[f] = r.choice([[b, en + 1], [b, en - 1], [b + 1, en], [b - 1, en], [en, b], [b, b],
                                     [b, b + r.choice(INTS)], [r.choice(INTS), r.choice(INTS)], [b, len(body)],
                                     [len(body), len(body)], [b], [b, en, en], [float(b), float(en)]])
                elif r.random() < 0.5:
                    e.pop(f, None)
                else:
                    e[f] = self.json.value_like(cur, r)
            if r.random() < 0.5:
                h, body = self._relayout(h, body, r)
        elif op == 4 and names:     # drop a tensor (and, half the time, lay the rest out again)
            del h[r.choice(names)]
            if r.random() < 0.5:
                h, body = self._relayout(h, body, r)
        elif op == 5:               # a new tensor, valid where it lands
            dt = r.choice(dtypes)
            shape = r.choice([[], [0], [1], [3], [2, 2], [1, 1, 5], [0, 2 ** 40], [7, 0]])
            name = r.choice(["z", "x" * r.choice([1, 64, 300]), "", "a.b", "__metadata__x", "\u00e9", "0"])
            h[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(body), len(body)]}
            h, body = self._relayout(h, body, r)
        elif op == 6 and names:     # alias: a second name for the same bytes
            src = r.choice(names)
            h[src + "_alias"] = json.loads(json.dumps(h[src]))
        elif op == 7:               # metadata
            h["__metadata__"] = r.choice([{"format": "pt"}, {}, None, {"x": 1}, {"x": None}, ["x"], "pt",
                                          {"x": {"y": "z"}}, {"": ""}, {"format": "pt" * r.choice([1, 1000])}])
        elif op == 8 and names:     # rename
            k = r.choice(names)
            h[r.choice(["", " ", "\ud800", "a\u0000b", k.upper(), k + k, "__metadata__"])] = h.pop(k)
        elif op == 9:               # re-lay out exactly (a valid file again, if every entry can be sized)
            h, body = self._relayout(h, body, r)
        else:
            h = self.json.mutate(h, r)
        return h, body

    @staticmethod
    def _shape_like(shape: List[Any], r: random.Random) -> List[Any]:
        s = list(shape)
        op = r.randrange(7)
        if op == 0 or not s:
            s.append(r.choice([0, 1, 2, 3, 2**32, 2**63 - 1]))
        elif op == 1:
            s.pop(r.randrange(len(s)))
        elif op == 2:
            i = r.randrange(len(s))
            s[i] = r.choice(INTS + [0, 0, 1, 1])
        elif op == 3:
            i = r.randrange(len(s))
            s[i] = r.choice([1.0, 2.5, "2", None, True, [2]])
        elif op == 4:
            s = [1] * r.choice([8, 17, 64, 200]) + s
        elif op == 5:               # same element count, other factorisation
            n = 1
            for d in s:
                n *= d if type(d) is int else 1
            s = [n] if r.random() < 0.5 else [1, n, 1]
        else:
            s = [0] + s
        return s

    @staticmethod
    def _relayout(h: dict, body: bytes, r: random.Random) -> Tuple[dict, bytes]:
        """Give every well-formed entry the offsets that tile the data section exactly (in its current order),
        keeping its bytes where it has them and filling the rest."""
        from vlmfo1.safetensors import _DTYPES, _SUBBYTE_BITS
        entries = []
        for k, e in h.items():
            if k == "__metadata__" or not isinstance(e, dict):
                continue
            dt, shape, off = e.get("dtype"), e.get("shape"), e.get("data_offsets")
            if not isinstance(dt, str) or dt not in _DTYPES and dt not in _SUBBYTE_BITS:
                continue
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                continue
            n = 1
            for d in shape:
                n *= d
            bits = 8 * _DTYPES[dt][1] if dt in _DTYPES else _SUBBYTE_BITS[dt]
            if n * bits % 8 or n * bits // 8 > 4096:
                continue
            b = off[0] if isinstance(off, list) and off and type(off[0]) is int and 0 <= off[0] < 2**32 else 0
            entries.append((b, k, n * bits // 8))
        entries.sort()
        out, pos = bytearray(), 0
        for b, k, nb in entries:
            chunk = body[b:b + nb]
            chunk += bytes(r.randrange(256) for _ in range(nb - len(chunk)))
            h[k]["data_offsets"] = [pos, pos + nb]
            out += chunk
            pos += nb
        return h, bytes(out)

    # ---------------------------------------------------------------- images
    def _image(self, data, max_size, r):
        import atheris
        out = atheris.Mutate(data, max_size)
        if out[:8] == b"\x89PNG\r\n\x1a\n":
            if r.random() < 0.15 and len(out) >= 33:        # IHDR: width, height, depth, colour type, interlace
                b = bytearray(out)
                field = r.choice([(16, ">I", [0, 1, 2, 3, 28, 29, 2**14, 2**16, 2**31 - 1, 2**32 - 1]),
                                  (20, ">I", [0, 1, 2, 3, 28, 29, 2**14, 2**16, 2**31 - 1, 2**32 - 1]),
                                  (24, ">B", [1, 2, 4, 8, 16, 3, 0]), (25, ">B", [0, 2, 3, 4, 6, 1, 7]),
                                  (28, ">B", [0, 1, 2])])
                struct.pack_into(field[1], b, field[0], r.choice(field[2]))
                out = bytes(b)
            if r.random() < 0.9:
                out = png_fix_crc(out)
        return out


def png_fix_crc(data: bytes) -> bytes:
    """Recompute the CRC of every complete PNG chunk (so a mutated chunk reaches the decoder, not the checksum)."""
    b = bytearray(data)
    i = 8
    while i + 12 <= len(b):
        (n,) = struct.unpack_from(">I", b, i)
        if i + 12 + n > len(b):
            break
        struct.pack_into(">I", b, i + 8 + n, zlib.crc32(bytes(b[i + 4:i + 8 + n])) & 0xFFFFFFFF)
        i += 12 + n
    return bytes(b)


# ==================================================================== seeds (from the deterministic corpus)
SEED_NAMES = {
    "safetensors": ["base", "unpadded header", "b overlaps a by 2", "e inside a", "extra tensor 2^62 x 4",
                    "metadata nested", "a.dtype='F4'", "b.shape=[1, 2]", "header deep list 1000"],
    "boxes": ["valid list", "valid dict", "valid dict xywh", "valid scores", "valid empty list", "valid coco dicts",
              "valid cxcywh", "scores too few", "unknown format", "odd but finite: inverted"],
    "config": ["base", "rope_scaling without mrope_section", "mm_pos_embedding_strategy='mask'",
               "vision_config.num_heads=0 (a division by zero once)", "file bom"],
}


def seeds(target: str, fo1: str) -> List[Tuple[str, bytes]]:
    import numpy as np
    from tests.fuzz import corpus
    if target == "safetensors":
        cases = list(corpus.gen_safetensors(np.random.default_rng([0, 1])))
    elif target == "image":
        cases = list(corpus.gen_image(np.random.default_rng([0, 5])))
        # every format and pixel mode the corpus seeds, small enough to mutate (no huge sizes)
        return [(c.name, c.data) for c in cases
                if c.name.startswith("seed ") and len(c.data) <= MAX_LEN["image"] and "size" not in c.name]
    elif target == "boxes":
        cases = list(corpus.gen_boxes(np.random.default_rng([0, 6])))
    else:
        cases = list(corpus.gen_fo1_config({"fo1": fo1}, np.random.default_rng([0, 3])))
    by_name = {c.name: c.data for c in cases}
    return [(n, by_name[n]) for n in SEED_NAMES[target] if n in by_name]


def saved_findings(target: str) -> List[Tuple[str, bytes]]:
    d = os.path.join(SAVED, SUITE[target])
    out = []
    if os.path.isdir(d):
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                out.append((name, f.read()))
    return out


# ==================================================================== the fuzzing process (one per target)
def child_main(args, libfuzzer_args: List[str]) -> None:
    import warnings
    import atheris
    warnings.simplefilter("ignore")     # BoxFormatWarning, DecompressionBombWarning ...: not findings
    sys.path.insert(0, ROOT)
    with atheris.instrument_imports(include=["vlmfo1"] + list(args.instrument or [])):
        for m in list(args.instrument or []) + list(INSTRUMENTED):
            importlib.import_module(m)
        if "PIL" in (args.instrument or []):
            from PIL import Image
            Image.init()                # the format plugins, imported (so instrumented) now
    target = args.child
    tdir = os.path.join(args.workdir, target)
    check = Checker(target, args.fo1, os.path.join(tdir, "scratch"))
    if target in ("image", "boxes"):
        check.h.fo1_model()             # the model loads once, before the clock starts
    findings_log = os.path.join(tdir, "findings.jsonl")
    seen: Dict[str, int] = {}
    known = set()
    if os.path.exists(findings_log):     # a restarted process: signatures found before in this run
        with open(findings_log) as f:
            for line in f:
                rec = json.loads(line)
                seen[rec["sig"]] = 0
                if rec.get("known"):
                    known.add(rec["sig"])
    else:
        for name, data in saved_findings(target):      # saved inputs that still fail: known, not saved again
            r = check(data)
            if r is not None and r[1] not in seen:
                seen[r[1]] = 0
                known.add(r[1])
                _log(findings_log, {"target": target, "kind": r[0], "sig": r[1], "detail": r[2][:600],
                                    "known": True, "file": os.path.join(SAVED, SUITE[target], name)})
                _say(f"KNOWN [{target}] {r[1]}  ({name}: still fails)")

    def stop(sig: str) -> None:
        with open(os.path.join(tdir, "stopped"), "w") as f:
            f.write(sig)
        raise RuntimeError(f"--stop-on-finding: {sig}")

    def one(data: bytes) -> None:
        if not faulthandler.is_enabled():   # now, after libFuzzer's handlers: a fatal signal shows the Python stack
            faulthandler.enable()           # first, then goes on to libFuzzer (which writes the crashing input)
        r = check(data)
        if r is None:
            return
        kind, sig, detail = r
        if sig in seen:
            seen[sig] += 1
            _log(os.path.join(tdir, "hits.jsonl"), {"sig": sig})
            if args.stop_on_finding and sig not in known:
                stop(sig)
            return
        seen[sig] = 1
        small = minimize(target, data, sig, check)
        h = hashlib.sha1(small).hexdigest()[:12]
        path = None
        if not args.no_save:
            d = os.path.join(args.save_dir, SUITE[target])
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, h)
            with open(path, "wb") as f:
                f.write(small)
        _log(findings_log, {"target": target, "kind": kind, "sig": sig, "detail": detail[:600], "file": path,
                            "size": len(small), "original_size": len(data),
                            "sha1": hashlib.sha1(data).hexdigest()})
        _say(f"FINDING [{target}] {kind}: {sig}\n  {detail.splitlines()[0][:300]}\n  saved: {path} "
             f"({len(small)} bytes, minimised from {len(data)})\n  input: {small[:400]!r}")
        if args.stop_on_finding:
            stop(sig)

    mut = Mutators(target)
    dict_path = os.path.join(tdir, "words.dict")
    with open(dict_path, "w", encoding="latin-1") as f:
        for w in mut.dictionary():
            f.write('"' + "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else f"\\x{ord(c):02x}"
                                  for c in w.decode("latin-1")) + '"\n')
    argv = [sys.argv[0]] + libfuzzer_args + [f"-dict={dict_path}"]
    atheris.Setup(argv, one, custom_mutator=mut)
    print("CHILD READY", file=sys.stderr, flush=True)
    atheris.Fuzz()


def _say(text: str) -> None:
    """A message for the parent to show (libFuzzer's own output shares stderr)."""
    print("".join("@@ " + line + "\n" for line in text.splitlines()), end="", file=sys.stderr, flush=True)


def _log(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ==================================================================== the parent: one process per target, stats
STAT = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)(?: lim: \d+)? exec/s: (\d+) rss: (\d+)Mb")


def fo1_checkpoint(path: Optional[str]) -> str:
    if path:
        return path
    from vlmfo1.cli import demo_checkpoint
    if not os.path.exists(TIKTOKEN):
        sys.exit(f"fuzz_coverage: the Qwen tokenizer {TIKTOKEN} is needed for the tiny FO1 checkpoint (or --fo1 DIR)")
    return demo_checkpoint(TIKTOKEN)


def run_target(target: str, args, fo1: str) -> Dict[str, Any]:
    tdir = os.path.join(args.workdir, target)
    cdir, adir = os.path.join(tdir, "corpus"), os.path.join(tdir, "artifacts")
    for d in (cdir, adir):
        os.makedirs(d, exist_ok=True)
    for sub in ("findings.jsonl", "hits.jsonl", "stopped"):
        if os.path.exists(os.path.join(tdir, sub)):
            os.unlink(os.path.join(tdir, sub))
    n_seeds = 0
    if not os.listdir(cdir):          # a fresh corpus: the seeds and the saved findings
        for _, data in seeds(target, fo1) + saved_findings(target):
            with open(os.path.join(cdir, hashlib.sha1(data).hexdigest()), "wb") as f:
                f.write(data)
        n_seeds = len(os.listdir(cdir))
    env = dict(os.environ, VLMFO1_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    st = {"target": target, "execs": 0, "cov0": None, "ft0": None, "cov": 0, "ft": 0, "corpus": 0, "crashes": 0,
          "hangs": 0, "ooms": 0, "restarts": 0, "fatal_sigs": {}, "peak_rss_mb": 0,
          "seeds": n_seeds or len(os.listdir(cdir)),
          "artifacts": []}
    t_start = time.monotonic()
    fuzz_seconds = 0.0
    runs_left = args.runs
    log = open(os.path.join(tdir, "libfuzzer.log"), "a")
    while True:
        left = args.seconds - fuzz_seconds if args.seconds else None
        if (left is not None and left < 1) or (runs_left is not None and runs_left <= 0):
            break
        lf = [cdir, f"-timeout={args.timeout:g}", f"-rss_limit_mb={args.rss_limit_mb}", f"-max_len={MAX_LEN[target]}",
              "-print_final_stats=1", f"-artifact_prefix={adir}/", f"-seed={args.seed + st['restarts']}",
              "-len_control=0"]
        if left is not None:
            lf.append(f"-max_total_time={int(math.ceil(left))}")
        if runs_left is not None:
            lf.append(f"-runs={runs_left}")
        if args.value_profile:
            lf.append("-use_value_profile=1")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", target, "--workdir", args.workdir, "--fo1", fo1,
               "--save-dir", args.save_dir] + (["--no-save"] if args.no_save else []) + \
            (["--stop-on-finding"] if args.stop_on_finding else []) + \
            [a for m in args.instrument or [] for a in ("--instrument", m)] + ["--"] + lf
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             errors="replace")
        t_fuzz = None
        execs_here, last_kind, written = 0, None, None
        tail: List[str] = []
        for line in p.stderr:
            log.write(line)
            tail = (tail + [line])[-200:]
            if line.startswith("CHILD READY"):
                t_fuzz = time.monotonic()
            m = STAT.match(line)
            if m:
                execs_here = int(m.group(1))
                st["cov"], st["ft"], st["corpus"] = int(m.group(3)), int(m.group(4)), int(m.group(5))
                st["peak_rss_mb"] = max(st["peak_rss_mb"], int(m.group(8)))
                if m.group(2) == "INITED" and st["cov0"] is None:
                    st["cov0"], st["ft0"] = int(m.group(3)), int(m.group(4))
                if args.verbose and m.group(2) in ("NEW", "REDUCE", "pulse", "INITED", "DONE") and \
                        (m.group(2) != "REDUCE"):
                    print(f"  [{target}] {line.rstrip()}", flush=True)
            elif line.startswith("@@ "):
                print("  " + line[3:].rstrip(), flush=True)
            elif "ERROR: libFuzzer: deadly signal" in line or "Uncaught Python exception" in line:
                last_kind = "crash"
            elif "ERROR: libFuzzer: timeout" in line or "ALARM: working on the last Unit" in line:
                last_kind = "hang"
            elif "ERROR: libFuzzer: out-of-memory" in line:
                last_kind = "oom"
            elif line.startswith("stat::peak_rss_mb:"):
                st["peak_rss_mb"] = max(st["peak_rss_mb"], int(line.split()[-1]))
            elif line.startswith("stat::number_of_executed_units:"):
                execs_here = max(execs_here, int(line.split()[-1]))
            m2 = re.search(r"Test unit written to (\S+)", line)
            if m2:
                written = m2.group(1)
        rc = p.wait()
        now = time.monotonic()
        if t_fuzz is None:
            sys.stdout.write("".join(tail))
            raise RuntimeError(f"the {target} fuzzing process did not start (exit status {rc}); log: {log.name}")
        fuzz_seconds += now - t_fuzz
        st["execs"] += execs_here
        if runs_left is not None:
            runs_left -= execs_here
        if rc == 0:
            break
        # the process died on an input: a crash / hang / OOM that libFuzzer wrote out, or our stop-on-finding
        if os.path.exists(os.path.join(tdir, "stopped")):
            break                      # --stop-on-finding: the child recorded the finding and stopped
        kind = last_kind or "crash"
        sig = f"{kind} at {_fatal_frame(tail)}"
        st[{"crash": "crashes", "hang": "hangs", "oom": "ooms"}[kind]] += 1
        saved, first = None, sig not in st["fatal_sigs"]
        st["fatal_sigs"][sig] = st["fatal_sigs"].get(sig, 0) + 1
        if written and os.path.exists(written):
            with open(written, "rb") as f:
                data = f.read()
            sha = hashlib.sha1(data).hexdigest()
            if os.path.exists(os.path.join(cdir, sha)):    # a corpus input (a seed): the restart must not load it
                os.unlink(os.path.join(cdir, sha))
            if not args.no_save and first:     # one input per signature (libFuzzer cannot minimise it here)
                d = os.path.join(args.save_dir, SUITE[target])
                os.makedirs(d, exist_ok=True)
                saved = os.path.join(d, sha[:12])
                shutil.copyfile(written, saved)
            print(f"  FINDING [{target}] {sig} (exit status {rc}): {written}\n  saved: {saved}\n  input: "
                  f"{data[:400]!r}\n" + ("".join("    " + x for x in tail[-16:]) if first else ""), flush=True)
        if first:
            st["artifacts"].append({"kind": kind, "sig": sig, "artifact": written, "saved": saved, "exit_status": rc})
        if args.stop_on_finding or st["restarts"] >= RESTARTS:
            break
        st["restarts"] += 1
    log.close()
    st["fuzz_seconds"] = fuzz_seconds
    st["elapsed"] = time.monotonic() - t_start
    st["findings"], st["hits"], st["known"] = [], 0, []
    fpath = os.path.join(tdir, "findings.jsonl")
    if os.path.exists(fpath):
        with open(fpath) as f:
            for line in f:
                rec = json.loads(line)
                (st["known"] if rec.get("known") else st["findings"]).append(rec)
    hpath = os.path.join(tdir, "hits.jsonl")
    st["hits"] = len(st["findings"]) + (sum(1 for _ in open(hpath)) if os.path.exists(hpath) else 0)
    return st


def _fatal_frame(lines: List[str]) -> str:
    """The innermost vlmfo1 frame (else the innermost frame) of the Python stack faulthandler printed."""
    frames = [m.groups() for m in (re.match(r'\s+File "(.+)", line (\d+) in (\S+)', x) for x in lines) if m]
    mine = [f for f in frames if f"{os.sep}vlmfo1{os.sep}" in f[0]] or frames   # most recent call first
    if not mine:
        return "?"
    f = mine[0]
    return f"{os.path.basename(f[0])}:{f[1]} {f[2]}"


def report(results: List[Dict[str, Any]], cmd: str, total: float) -> str:
    lines = [f"command: {cmd}",
             f"atheris {_atheris_version()}, Python {sys.version.split()[0]}, instrumented: vlmfo1 "
             f"({len(INSTRUMENTED)} modules){''.join(', ' + m for m in ARGS.instrument or [])}; per-input timeout "
             f"{ARGS.timeout:g} s, rss limit {ARGS.rss_limit_mb} MB",
             "",
             f"{'target':<12}{'seeds':>6}{'execs':>9}{'exec/s':>8}{'fuzz s':>8}{'cov start':>10}{'cov end':>9}"
             f"{'ft start':>9}{'ft end':>8}{'corpus':>7}{'new':>5}{'hits':>6}{'known':>6}{'crash':>6}{'hang':>5}"
             f"{'oom':>4}{'elapsed s':>10}"]
    for s in results:
        eps = s["execs"] / s["fuzz_seconds"] if s["fuzz_seconds"] else 0.0
        lines.append(f"{s['target']:<12}{s['seeds']:>6}{s['execs']:>9}{eps:>8.0f}{s['fuzz_seconds']:>8.1f}"
                     f"{s['cov0'] or 0:>10}{s['cov']:>9}{s['ft0'] or 0:>9}{s['ft']:>8}{s['corpus']:>7}"
                     f"{len(s['findings']):>5}{s['hits']:>6}{len(s['known']):>6}{s['crashes']:>6}{s['hangs']:>5}"
                     f"{s['ooms']:>4}{s['elapsed']:>10.1f}")
    lines += ["  cov = instrumented edges hit (vlmfo1, and --instrument packages); ft = libFuzzer features (edges x",
              "  hit-count buckets); start = after the seeds, end = after fuzzing. new = unique finding signatures",
              "  (each saved once), hits = inputs that hit a finding, known = saved findings that still fail; crash /",
              "  hang / oom = processes lost that way. fuzz s excludes start-up (imports, instrumenting, model load)."]
    for s in results:
        for f in s["findings"]:
            lines.append(f"  finding [{s['target']}] {f['kind']}: {f['sig']}\n"
                         f"      {f['detail'].splitlines()[0][:200]}\n      saved: {f['file']} ({f.get('size')} bytes)")
        for f in s["known"]:
            lines.append(f"  known   [{s['target']}] {f['sig']} ({f['file']})")
        for a in s["artifacts"]:
            lines.append(f"  {a['kind']:<7} [{s['target']}] {a['sig']} (x{s['fatal_sigs'][a['sig']]}, exit status "
                         f"{a['exit_status']}): saved {a['saved']}")
    n = sum(len(s["findings"]) + len(s["artifacts"]) for s in results)
    lines.append(f"fuzz_coverage: {len(results)} targets, {sum(s['execs'] for s in results)} executions, {n} "
                 f"findings, {total:.0f} s")
    return "\n".join(lines)


def _atheris_version() -> str:
    try:
        from importlib.metadata import version
        return version("atheris")
    except Exception:   # noqa: BLE001
        return "?"


ARGS = None


def main(argv=None) -> int:
    global ARGS
    argv = list(sys.argv[1:] if argv is None else argv)
    lf_args: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, lf_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", choices=TARGETS, help="only these targets (repeatable; default all)")
    ap.add_argument("--seconds", type=float, help="fuzzing time per target (default 60 unless --runs is given)")
    ap.add_argument("--runs", type=int, help="executions per target (with --seconds: whichever ends first)")
    ap.add_argument("--timeout", type=float, default=10, help="seconds one input may take before it is a hang")
    ap.add_argument("--rss-limit-mb", type=int, default=3072, help="memory of a fuzzing process before it is an OOM")
    ap.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    ap.add_argument("--value-profile", action="store_true", help="libFuzzer -use_value_profile=1 (comparison "
                    "operands as features)")
    ap.add_argument("--instrument", action="append", metavar="PACKAGE", help="instrument this package too "
                    "(repeatable), e.g. PIL: Pillow's pure-Python format parsers then steer the image target")
    ap.add_argument("--stop-on-finding", action="store_true", help="stop a target at its first new finding")
    ap.add_argument("--no-save", action="store_true", help="do not write findings into tests/fuzz/corpus/")
    ap.add_argument("--save-dir", default=SAVED, help="where findings go, <dir>/<target>/<hash> (default %(default)s)")
    ap.add_argument("--fo1", help="a tiny VLM-FO1 checkpoint folder (default: the demo's, written once into "
                    "$VLMFO1_CACHE or ~/.cache/vlmfo1)")
    ap.add_argument("--workdir", help="corpora, logs and artifacts (default: a temporary folder, removed after)")
    ap.add_argument("--json", help="write the per-target results here")
    ap.add_argument("-v", "--verbose", action="store_true", help="show libFuzzer's progress lines")
    ap.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ARGS = args
    if args.child:
        child_main(args, lf_args)
        return 0
    if importlib.util.find_spec("atheris") is None:
        ap.error('atheris is not installed: pip install -e ".[fuzz]" (or pip install atheris)')
    if args.seconds is None and args.runs is None:
        args.seconds = 60.0
    sys.path.insert(0, ROOT)
    cmd = "python benchmarks/fuzz_coverage.py " + " ".join(sys.argv[1:] if argv is None else argv)
    targets = list(dict.fromkeys(args.target or TARGETS))
    t0 = time.monotonic()
    # the FO1 checkpoint: the model of the image and boxes targets, the base config.json of the config target
    fo1 = os.path.abspath(fo1_checkpoint(args.fo1)) if set(targets) - {"safetensors"} else ""
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="vlmfo1-fuzzcov-")
        args.workdir = tmp
    args.workdir = os.path.abspath(args.workdir)
    print(f"fuzz_coverage: {', '.join(targets)}; "
          + (f"{args.seconds:g} s" if args.seconds else "") + (" / " if args.seconds and args.runs else "")
          + (f"{args.runs} runs" if args.runs else "") + f" per target; workdir {args.workdir}", flush=True)
    results = []
    try:
        for t in targets:
            print(f"== {t}", flush=True)
            results.append(run_target(t, args, fo1))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    out = report(results, cmd, time.monotonic() - t0)
    print(out, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "results": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
