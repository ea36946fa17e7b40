"""Fuzz harness: feed one input (bytes) to vlmfo1 the way a user's file reaches it, and judge what happened.

Targets (the input is the bytes of one file):
  safetensors   a .safetensors file, opened and every tensor read; judged against the `safetensors` library
  qwen2_config  config.json of a tiny Qwen2 checkpoint; a load that succeeds must give the base logits
  fo1_config    config.json of a tiny VLM-FO1 checkpoint; a load that succeeds must give the base embeddings,
                positions and prefill logits of a fixed request
  index         model.safetensors.index.json of the sharded tiny Qwen2; as qwen2_config
  image         an image file, through the FO1 front end (decode, resize, both processors, box mapping)
  boxes         a --boxes JSON file, through the CLI reader and the FO1 proposal checks
  config_check  config.json of a VLM-FO1 checkpoint through the schema check alone (vlmfo1/config_check.py, no
                weights loaded): the fast target of benchmarks/fuzz_coverage.py; its saved findings go to
                corpus/fo1_config/ and replay there through the full load

A case's expectation: "refuse" (a clean refusal is required), "accept", "not_changed" (refused, or accepted with
bit-identical outputs: a hostile value may be ignored but must never change the model silently), "oracle" (agree
with the `safetensors` library: both refuse, or both accept with identical bytes; vlmfo1 may refuse a shape NumPy
cannot hold or a duplicate key: DEVIATIONS) or "any" (accepted or cleanly refused). Every target fails a case on a
crash, a hang or an unclear exception (anything but a ValueError, KeyError or TypeError subclass or a missing-file
error with a message that names the file or folder it read).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Tuple

import numpy as np

CLEAN = (ValueError, KeyError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
QWEN2_IDS = [1, 5, 9, 200, 3000, 17, 4]
FO1_IMAGE_HW = (60, 80)
FO1_BOXES = [[1.0, 2.0, 30.0, 40.0], [10.0, 10.0, 50.0, 55.0]]
FO1_TEXT = "Please detect cat in this image. Answer the question with object indexes."
BOXES_IMAGE_WH = (640, 480)
# file names the refusal message must mention, per target (a message that names neither file nor key is unclear)
NAMES = {"safetensors": ("case.safetensors",), "qwen2_config": ("config.json",), "fo1_config": ("config.json",),
         "index": ("model.safetensors.index.json", "index"), "image": ("case.img", "image"),
         "boxes": ("case.json", "box"),   # after the file is read, a message about the boxes is clear
         "config_check": ("config.json",)}


# The documented ways vlmfo1's verdict on a safetensors file may differ from the library's (vlmfo1/safetensors.py):
# refusals, found in the full message of vlmfo1's error, of files the library accepts.
DEVIATIONS = {
    # shapes NumPy cannot hold (more than its 64 dimensions, or elements past 2**63 - 1 beside a zero dimension);
    # the library makes no arrays
    "beyond what a NumPy array can hold": "a shape NumPy cannot hold",
    # a key twice in the header JSON (two tensors of one name, a metadata key twice): the library keeps the last
    # tensor entry if every one is well formed; vlmfo1 refuses the ambiguous header
    "safetensors header has the key": "a duplicate JSON key",
}


class Unclear(Exception):
    """The harness saw an exception a user should not get (wrong type, or a message naming nothing)."""


class Changed(Exception):
    """A load was accepted but the model's outputs differ from the base checkpoint."""


def write_bases(root: str, tiktoken: str, fo1: str | None = None) -> Dict[str, str]:
    """The base checkpoints the cases mutate, written once under `root`: a sharded tiny Qwen2 (fp32) and, unless
    an existing folder is given, a tiny VLM-FO1."""
    from vlmfo1.testing import write_random_fo1, write_random_qwen2

    q = os.path.join(root, "qwen2")
    if not os.path.exists(os.path.join(q, "config.json")):
        write_random_qwen2(q, dtype="float32", shard_bytes=60_000, seed=3)
    if fo1 is None:
        fo1 = os.path.join(root, "VLM-FO1_Qwen2.5-VL-3B-tiny")
        if not os.path.exists(os.path.join(fo1, "model.safetensors.index.json")):
            write_random_fo1(fo1, size="tiny", tiktoken_path=tiktoken)
    return {"qwen2": q, "fo1": fo1}


def _overlay(base: str, dst: str, replaced: str) -> None:
    """dst = base with every file symlinked except `replaced` (which the caller writes)."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    for name in os.listdir(base):
        if name != replaced:
            os.symlink(os.path.join(base, name), os.path.join(dst, name))


class Harness:
    """Runs cases in one process; loads the base models lazily and keeps their reference outputs."""

    def __init__(self, bases: Dict[str, str], scratch: str):
        self.bases, self.scratch = bases, scratch
        self._ref: Dict[str, Any] = {}
        self._fo1 = None

    # ---------------------------------------------------------------- reference outputs of the base checkpoints
    def _qwen2_out(self, path: str):
        from vlmfo1 import LanguageModel
        m = LanguageModel.load(path, n_threads=1)
        try:
            return m.session(max_context=64).prefill(QWEN2_IDS).copy()
        finally:
            del m

    def _fo1_out(self, path: str, keep: bool = False):
        from vlmfo1 import VLMFO1
        m = VLMFO1.from_pretrained(path, threads=1)
        try:
            img = np.full(FO1_IMAGE_HW + (3,), 97, np.uint8)
            img[10:40, 20:60] = (200, 30, 60)
            ids, emb, pos, delta, _, _ = m.prepare(img, np.array(FO1_BOXES), FO1_TEXT)
            logits = m.decoder.session(max_context=len(ids) + 1).prefill_embeds(emb, pos)
            return list(ids), emb.copy(), np.asarray(pos).copy(), delta, logits.copy()
        finally:
            if keep:
                self._fo1 = m
            else:
                m.close()

    def ref(self, what: str):
        if what not in self._ref:
            self._ref[what] = (self._qwen2_out(self.bases["qwen2"]) if what == "qwen2"
                               else self._fo1_out(self.bases["fo1"]))
        return self._ref[what]

    def fo1_model(self):
        if self._fo1 is None:
            from vlmfo1 import VLMFO1
            self._fo1 = VLMFO1.from_pretrained(self.bases["fo1"], threads=1)
        return self._fo1

    # ---------------------------------------------------------------- targets
    def run(self, target: str, data: bytes) -> str:
        """-> "accepted" or "refused: <message>"; raises Unclear / Changed / anything unexpected."""
        fn = getattr(self, "t_" + target)
        self.last_error = None
        try:
            detail = fn(data)
        except (Unclear, Changed):
            raise
        except CLEAN as exc:
            self.last_error = exc     # the whole message (the outcome keeps 300 characters of it)
            msg = str(exc)
            if not msg.strip():
                raise Unclear(f"{type(exc).__name__} with an empty message") from exc
            if not any(n.lower() in msg.lower() for n in NAMES[target]) and self.scratch not in msg:
                raise Unclear(f"{type(exc).__name__} that names no file: {msg[:300]}") from exc
            return f"refused: {type(exc).__name__}: {msg[:300]}"
        return "accepted" + (f": {detail}" if detail else "")

    def _file(self, name: str, data: bytes) -> str:
        d = os.path.join(self.scratch, "file")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, name)
        with open(p, "wb") as f:
            f.write(data)
        return p

    def t_safetensors(self, data: bytes):
        from vlmfo1.safetensors import _SUBBYTE_BITS, SafetensorsFile
        p = self._file("case.safetensors", data)
        with SafetensorsFile(p) as f:
            out = {}
            for name, info in f.tensors.items():
                if info.dtype in _SUBBYTE_BITS:
                    continue
                a = f.get(name)
                if tuple(a.shape) != tuple(info.shape):
                    raise Unclear(f"{name}: array shape {a.shape} != header shape {info.shape}")
                out[name] = (info.dtype, list(info.shape), a.tobytes())
        self.last_tensors = out
        return f"{len(out)} tensors"

    def t_qwen2_config(self, data: bytes):
        return self._qwen2_folder("config.json", data)

    def t_index(self, data: bytes):
        return self._qwen2_folder("model.safetensors.index.json", data)

    def _qwen2_folder(self, name: str, data: bytes):
        ref = self.ref("qwen2")
        d = os.path.join(self.scratch, "qwen2")
        _overlay(self.bases["qwen2"], d, name)
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        out = self._qwen2_out(d)
        if out.shape != ref.shape or not np.array_equal(out, ref):
            raise Changed("logits differ from the base checkpoint")
        return "same logits"

    def t_fo1_config(self, data: bytes):
        ref = self.ref("fo1")
        d = os.path.join(self.scratch, "VLM-FO1_Qwen2.5-VL-3B-case")
        _overlay(self.bases["fo1"], d, "config.json")
        with open(os.path.join(d, "config.json"), "wb") as f:
            f.write(data)
        ids, emb, pos, delta, logits = self._fo1_out(d)
        if ids != ref[0] or delta != ref[3]:
            raise Changed("prompt ids or rope delta differ from the base checkpoint")
        for what, a, b in (("embeddings", emb, ref[1]), ("positions", pos, ref[2]), ("logits", logits, ref[4])):
            if a.shape != b.shape or not np.array_equal(a, b):
                raise Changed(f"{what} differ from the base checkpoint")
        return "same outputs"

    def t_config_check(self, data: bytes):
        from vlmfo1.config_check import check_fo1, read_config_file
        d = os.path.join(self.scratch, "config_check")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, "config.json")
        with open(p, "wb") as f:
            f.write(data)
        check_fo1(read_config_file(p))
        return ""

    def t_image(self, data: bytes):
        p = self._file("case.img", data)
        m = self.fo1_model()
        pv, grid, aux, ba, bq, b = m.preprocess(p, np.array([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 1e4, 1e4]]))
        _check_front(pv, grid, aux, ba, bq)
        return f"grid {tuple(int(v) for v in grid)}"

    def t_boxes(self, data: bytes):
        from vlmfo1.cli import read_boxes_file
        from vlmfo1.fo1_prompt import check_boxes
        p = self._file("case.json", data)
        boxes, fmt, scores = read_boxes_file(p)
        m = self.fo1_model()
        props = m._proposals(None, boxes, None, fmt, scores, None, BOXES_IMAGE_WH)
        b = check_boxes(props.boxes)
        if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all():
            raise Unclear(f"accepted boxes are not finite [N, 4]: {b.shape}")
        if props.scores is not None:
            s = np.asarray(props.scores, dtype=np.float64)
            if s.shape != (len(props.boxes),) or not np.isfinite(s).all():
                raise Unclear(f"accepted scores are not {len(props.boxes)} finite numbers: {s.shape}")
        img = np.zeros((BOXES_IMAGE_WH[1], BOXES_IMAGE_WH[0], 3), np.uint8)
        _check_front(*m.preprocess(img, b)[:5])
        return f"{len(b)} boxes"


    # the runner's self-test (run.py --selftest): a case that kills its worker and one that never answers
    def t__crash(self, data: bytes):
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)

    def t__hang(self, data: bytes):
        import time
        time.sleep(3600)


def _check_front(pv, grid, aux, ba, bq) -> None:
    _, gh, gw = (int(v) for v in grid)
    if pv.shape[0] != gh * gw or not np.isfinite(pv).all():
        raise Unclear(f"pixel rows {pv.shape} do not match grid {gh}x{gw} or are not finite")
    for name, a in (("aux pixels", aux), ("aux boxes", ba), ("vt boxes", bq)):
        if a is not None and not np.isfinite(np.asarray(a, dtype=np.float64)).all():
            raise Unclear(f"{name} are not finite")


def safetensors_oracle(data: bytes) -> Tuple[bool, Any]:
    """(accepted, {name: (dtype, shape, bytes)}) by the `safetensors` library (the format's reference)."""
    import safetensors
    try:
        out = safetensors.deserialize(bytes(data))
    except Exception as exc:   # the library raises SafetensorError, and a few built-in types for odd input
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    return True, {name: (t["dtype"], list(t["shape"]), bytes(t["data"])) for name, t in out}


def judge(expect: str, target: str, outcome: str, harness: "Harness | None" = None, data: bytes = b"") -> str:
    """'' if the outcome meets the expectation, else why not. outcome: accepted[...] / refused: ... / changed: ..."""
    accepted, refused = outcome.startswith("accepted"), outcome.startswith("refused")
    if expect == "any":   # a legal value may change the outputs
        return "" if accepted or refused or outcome.startswith("changed") else outcome
    if expect == "refuse":
        return "" if refused else f"wrong success: {outcome}"
    if expect == "accept":
        return "" if accepted else f"wrong refusal: {outcome}"
    if expect == "not_changed":
        return "" if accepted or refused else f"wrong success: {outcome}"
    if expect == "oracle":
        if not (accepted or refused):
            return outcome
        ok, lib = safetensors_oracle(data)
        full = str(getattr(harness, "last_error", None) or outcome)
        if ok and refused and any(m in full for m in DEVIATIONS):
            return ""   # a documented deviation
        if ok and refused:
            return f"wrong refusal (the safetensors library accepts it): {outcome}"
        if not ok and accepted:
            return f"wrong success (the safetensors library refuses it: {lib}): {outcome}"
        if ok and accepted:
            mine = harness.last_tensors
            lib = {k: v for k, v in lib.items() if k in mine or v[0] not in ("F4", "F6_E2M3", "F6_E3M2")}
            if set(mine) != set(lib):
                return f"tensor names differ from the library's: {sorted(set(mine) ^ set(lib))[:5]}"
            for k in mine:
                if mine[k] != lib[k]:
                    return f"tensor {k!r} differs from the library's reading"
        return ""
    raise ValueError(f"unknown expectation {expect!r}")


def config_json(cfg: Any) -> bytes:
    return json.dumps(cfg, indent=1).encode()
