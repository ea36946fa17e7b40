"""Run an evaluator over its items: resumable, with worker processes, a progress bar and a report.

    from vlmfo1.eval import run
    from vlmfo1.eval.coco import CocoEvaluator
    ev = CocoEvaluator("val2017/", "instances_val2017.json", proposals="cocoVal2017_with_upn_score_0.3_0.8.jsonl")
    report = run(ev, "/path/to/VLM-FO1_Qwen2.5-VL-3B-v01", "runs/coco", workers=2)   # rerun: resumes

The run folder (`out_dir`):
  run.json           what the run is: evaluator name, `evaluator.settings()`, the model's identity (config.json
                     hash, weight bytes, load options). A rerun with anything different is refused (ValueError
                     naming the differences): use a new folder. Worker count, threads and `limit` are not part of
                     it (results do not depend on them).
  records.jsonl      append-only, one line per finished item, written by the parent process only and flushed +
                     fsync'd line by line: {"key": K, "record": {...}} or {"key": K, "error": "Type: message"},
                     plus "warnings" (the item's Python warnings, when any), "seconds" and for errors "where" (the
                     file and line that raised). Lines of different items
                     come in completion order (any order with several workers).
  predictions.jsonl  written when every item of the run has a line: one line per item in `items()` order, JSON with
                     sorted keys and no timings, so 1 worker, N workers (and Ray) give byte-identical files.
  report.json        `evaluator.score_subset(records, keys)` plus a "run" section (counts, errors, timings).
  + the evaluator's own exports (`evaluator.export`, e.g. coco_results.json).

Resume semantics: a rerun reads records.jsonl, skips every item with a record and runs the rest in items() order.
Items whose latest line is an error are run again (retry_errors=True, the default: a decode error from a file that
was since fixed, an out-of-memory...); with retry_errors=False they stay failed. The last entry of a key wins (an
error line followed by a record after a retry). A truncated or garbled *last* line (a kill mid-write) is dropped with
a warning and cut off the file; a bad line anywhere else is refused with a ValueError naming the line. Ctrl-C
(KeyboardInterrupt) stops the workers and raises `RunInterrupted` (a KeyboardInterrupt) with the file consistent.
A lock file (`.lock`, flock) refuses a second run in the same folder at the same time.

Execution (one code path for every backend, so a Ray backend only has to provide the `Backend` calls):
  - the items still to do are cut into chunks of consecutive items (deterministic: `chunk_size`, default about a
    quarter of an even share per worker, at most 16);
  - a scheduler hands chunks to idle workers; a worker answers one ("result", key, entry) per item as it finishes
    it, then ("done",);
  - a worker that dies (killed, crashed) has the unanswered rest of its chunk put back at the front of the queue;
    the item it was running is tried at most `max_attempts` times (default 2) and then gets an error record
    ("worker died ... while running this item"); a new worker takes the dead one's place. Deaths outside an item
    (e.g. while loading the model) are bounded too (RuntimeError after workers + 2);
  - `item_timeout` (seconds, default None = no limit): a worker process (or Ray actor) that has not answered its
    current item within it is killed and replaced, and the item is retried like one that killed its worker (at most
    `max_attempts` tries, then an error record "WorkerTimeout: ..."). It needs a worker process (a hung item
    cannot be stopped inside this process), so with item_timeout even workers=1 runs in one worker process.
Backends: `_InlineBackend` (workers=1: this process, the given model object or one loaded from the path),
`_ProcessBackend` (workers=N, or item_timeout: N spawned processes, each loading its own model with `threads`
threads) and `RayBackend` (ray="ADDRESS" or "auto": actors on a Ray cluster, one per slot of `threads` CPUs or
`workers` of them; see vlmfo1/eval/ray_backend.py).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import time
import warnings
from collections import deque
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .base import Evaluator, Item

RUN_FORMAT = "vlmfo1-eval-run/1"
RUN_FILE, RECORDS_FILE, PREDICTIONS_FILE, REPORT_FILE, LOCK_FILE = (
    "run.json", "records.jsonl", "predictions.jsonl", "report.json", ".lock")
MAX_ERROR_CHARS = 2000
MAX_WARNINGS = 20

__all__ = ["run", "RunInterrupted", "read_records", "run_entry", "load_model", "ModelSpec", "canonical_line"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the records file is consistent; rerun the same command to resume."""

    def __init__(self, done: int, total: int, out_dir: str):
        super().__init__(f"interrupted with {done} of {total} items recorded; rerun the same command to resume "
                         f"({out_dir})")
        self.done, self.total, self.out_dir = done, total, out_dir


# ---------------------------------------------------------------------------------------------- the model

class ModelSpec:
    """How a worker gets its model: a checkpoint folder (loaded with VLMFO1.from_pretrained(path, threads=T,
    **options)), a factory callable `factory(threads=T)` (tests: a scripted stand-in), or an already-loaded object
    (in this process only). Picklable for the path and (module-level) factory forms."""

    def __init__(self, kind: str, value: Any, options: Optional[Mapping[str, Any]] = None):
        self.kind, self.value, self.options = kind, value, dict(options or {})

    @classmethod
    def of(cls, model: Any, options: Optional[Mapping[str, Any]] = None) -> "ModelSpec":
        if isinstance(model, (str, os.PathLike)):
            opts = {k: v for k, v in dict(options or {}).items() if v is not None}
            opts.setdefault("mode", "reference")          # from_pretrained's default, named so resumes compare
            return cls("path", os.path.abspath(os.fspath(model)), opts)
        if options:
            raise ValueError("model_options apply when the model is given as a folder path")
        if isinstance(model, type) or (callable(model) and not hasattr(model, "detect")):
            return cls("factory", model)
        if model is None:
            raise TypeError("model must be a checkpoint folder path, a loaded model or a factory callable")
        return cls("object", model)

    def identity(self) -> Dict[str, Any]:
        """What run.json records about the model (compared on resume)."""
        if self.kind == "path":   # where the weight cache lives does not change the answers: not compared
            options = {k: v for k, v in self.options.items() if k != "cache_dir"}
            return {"path": self.value, "fingerprint": _folder_fingerprint(self.value), "options": options}
        if self.kind == "factory":               # identified by its name only (not its arguments)
            fn = getattr(self.value, "func", self.value)        # functools.partial
            return {"factory": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"}
        path = getattr(self.value, "path", None)
        ident: Dict[str, Any] = {"object": type(self.value).__name__}
        if isinstance(path, str) and os.path.isdir(path):
            ident.update(path=os.path.abspath(path), fingerprint=_folder_fingerprint(path))
        return ident

    def precheck(self) -> None:
        """A cheap check that a folder is a VLM-FO1 checkpoint (config.json and the region encoder's tensors),
        before any worker is started or any file written."""
        if self.kind != "path":
            return
        from ..config_check import check_fo1
        from ..options import read_config
        from ..safetensors import Checkpoint

        path = self.value
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder not found: {path}" if not os.path.exists(path)
                                    else f"the model must be a checkpoint folder, got a file: {path}")
        check_fo1(read_config(path))
        ckpt = Checkpoint(path)
        try:
            if not any(k.startswith(("model.object_vp_extractor.", "model.mm_projector_aux.")) for k in ckpt.keys()):
                raise ValueError(f"{path}: not a VLM-FO1 checkpoint (no model.object_vp_extractor.* / "
                                 "model.mm_projector_aux.* tensors: the region encoder is missing)")
        finally:
            ckpt.close()


def _folder_fingerprint(path: str) -> Dict[str, Any]:
    """config.json's sha256 and the total size of the weight files: moved or copied folders keep it."""
    out: Dict[str, Any] = {}
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, "rb") as f:
            out["config_sha256"] = hashlib.sha256(f.read()).hexdigest()
    try:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    except OSError:
        names = []
    out["weights_bytes"] = sum(os.path.getsize(os.path.join(path, n)) for n in names)
    return out


def load_model(spec: ModelSpec, threads: Optional[int]):
    """The model a worker uses (see ModelSpec)."""
    if spec.kind == "object":
        return spec.value
    if spec.kind == "factory":
        return spec.value(threads=threads)
    from ..fo1 import VLMFO1

    return VLMFO1.from_pretrained(spec.value, threads=threads, **spec.options)


# ---------------------------------------------------------------------------------------------- one item

def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def run_entry(evaluator: Evaluator, model, item: Item) -> Dict[str, Any]:
    """Run one item: {"record": {...}} (checked to be plain JSON) or {"error": "Type: message", "where":
    "file:line in function"}, plus "warnings" when the item raised Python warnings, and "seconds". Exceptions become error entries; KeyboardInterrupt and
    SystemExit propagate."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rec = evaluator.run_item(model, item)
            if not isinstance(rec, dict):
                raise TypeError(f"{type(evaluator).__name__}.run_item returned {type(rec).__name__}, expected a dict")
            try:
                rec = json.loads(json.dumps(rec, allow_nan=False))
            except (TypeError, ValueError) as e:
                raise TypeError(f"the record is not plain JSON: {e}") from None
            entry: Dict[str, Any] = {"record": rec}
        except Exception as e:  # noqa: BLE001 - every failure of one item becomes its error record
            entry = {"error": _one_line(f"{type(e).__name__}: {e}")}
            tb = e.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None:                        # where it was raised (records.jsonl only, for debugging)
                code = tb.tb_frame.f_code
                entry["where"] = f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}"
    if caught:
        msgs = list(dict.fromkeys(_one_line(f"{w.category.__name__}: {w.message}") for w in caught))
        entry["warnings"] = msgs[:MAX_WARNINGS]
    entry["seconds"] = round(time.perf_counter() - t0, 4)
    return entry


def canonical_line(key: str, entry: Mapping[str, Any]) -> str:
    """One predictions.jsonl line: key, record or error, warnings; sorted keys, no timings."""
    out: Dict[str, Any] = {"key": key}
    for k in ("record", "error", "warnings"):
        if k in entry:
            out[k] = entry[k]
    return json.dumps(out, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------------------- the records file

def _check_entry(obj: Any) -> Optional[str]:
    """None if obj is a valid records.jsonl entry, else what is wrong."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if not isinstance(obj.get("key"), str):
        return "no string 'key'"
    has_rec, has_err = "record" in obj, "error" in obj
    if has_rec == has_err:
        return "expected exactly one of 'record' and 'error'"
    if has_rec and not isinstance(obj["record"], dict):
        return "'record' is not an object"
    if has_err and not isinstance(obj["error"], str):
        return "'error' is not a string"
    return None


def read_records(path: str, repair: bool = False) -> Tuple[Dict[str, Dict[str, Any]], int]:
    """Read records.jsonl -> ({key: latest entry}, number of entry lines).

    A last line that is truncated or not a valid entry (a kill mid-write) is dropped with a RuntimeWarning and,
    with repair=True, cut off the file (a complete last line without its newline gets one). A bad line before the
    last one raises ValueError naming the line. Blank lines are skipped."""
    if not os.path.exists(path):
        return {}, 0
    with open(path, "rb") as f:
        data = f.read()
    entries: Dict[str, Dict[str, Any]] = {}
    pos, lineno, n = 0, 0, 0
    size = len(data)
    while pos < size:
        end = data.find(b"\n", pos)
        nl = end >= 0
        end = end if nl else size
        raw = data[pos:end]
        lineno += 1
        nxt = end + 1 if nl else size
        if raw.strip():
            problem = None
            try:
                obj = json.loads(raw.decode("utf-8"))
                problem = _check_entry(obj)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                problem = f"not valid JSON ({type(e).__name__}: {_one_line(e)[:120]})"
            if problem is not None:
                if data[nxt:].strip():           # something follows: damage in the middle
                    raise ValueError(f"{path}: line {lineno}: {problem}. The file is damaged before its last line, "
                                     "which a killed run cannot cause: fix or delete that line, or start a new run "
                                     "folder")
                warnings.warn(f"{path}: line {lineno} (the last) is incomplete or garbled ({problem}), probably cut "
                              "by a kill: dropped; its item will run again", RuntimeWarning, stacklevel=3)
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(pos)
                        f.flush()
                        os.fsync(f.fileno())
                return entries, n
            entry = {k: v for k, v in obj.items() if k != "key"}
            entries[obj["key"]] = entry
            n += 1
            if not nl and repair:                 # complete, but the newline was cut
                with open(path, "ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
        pos = nxt
    return entries, n


class _RecordWriter:
    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "ab")

    def write(self, key: str, entry: Mapping[str, Any]) -> None:
        line = {"key": key}
        line.update(entry)
        self.f.write((json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------------- run.json

def _json_norm(x: Any) -> Any:
    return json.loads(json.dumps(x, allow_nan=False, sort_keys=True))


def _differences(a: Any, b: Any, path: str = "", out: Optional[List[str]] = None) -> List[str]:
    out = [] if out is None else out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append(f"{p}: absent now, {_short(b[k])} in the run folder")
            elif k not in b:
                out.append(f"{p}: {_short(a[k])} now, absent in the run folder")
            else:
                _differences(a[k], b[k], p, out)
    elif a != b:
        out.append(f"{path or 'value'}: {_short(a)} now, {_short(b)} in the run folder")
    return out


def _short(x: Any) -> str:
    s = json.dumps(x, ensure_ascii=False)
    return s if len(s) <= 80 else s[:77] + "..."


def _model_differences(now: Mapping[str, Any], before: Mapping[str, Any]) -> List[str]:
    """A model identity must match on resume in what both identities know: the checkpoint fingerprint, the load
    options, the factory's name (the folder path may move; a loaded model object does not know its load options)."""
    out: List[str] = []
    for k in ("fingerprint", "options", "factory"):
        if now.get(k) is not None and before.get(k) is not None:
            _differences(now[k], before[k], f"model.{k}", out)
    return out


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(path: str, lines: Sequence[str]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_run(out_dir: str, meta: Dict[str, Any]) -> None:
    """Create run.json, or check that the existing one describes the same run."""
    path = os.path.join(out_dir, RUN_FILE)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(out_dir, RECORDS_FILE)):
            raise ValueError(f"{out_dir} holds {RECORDS_FILE} but no {RUN_FILE}: not a vlmfo1 run folder (or a "
                             "damaged one); use a new --out folder")
        _write_json_atomic(path, dict(meta, created=datetime.datetime.now().isoformat(timespec="seconds")))
        return
    try:
        with open(path, "r", encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable run description ({e}); delete the run folder to start again")
    if not isinstance(old, dict) or old.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: not a vlmfo1 run description (format {old.get('format') if isinstance(old, dict) else None!r}, "
                         f"expected {RUN_FORMAT!r}); use a new --out folder")
    diffs: List[str] = []
    if old.get("evaluator") != meta["evaluator"]:
        diffs.append(f"evaluator: {meta['evaluator']!r} now, {old.get('evaluator')!r} in the run folder")
    _differences(meta["settings"], old.get("settings"), "settings", diffs)
    if isinstance(old.get("model"), dict):
        diffs += _model_differences(meta["model"], old["model"])
    if diffs:
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise ValueError(f"{out_dir} holds a run made with different settings: " + "; ".join(diffs[:6]) + more +
                         ". Resume with the same settings, or use a new --out folder")


@contextlib.contextmanager
def _lock(out_dir: str):
    try:
        import fcntl
    except ImportError:              # not POSIX: no protection against two runs in one folder
        yield
        return
    f = open(os.path.join(out_dir, LOCK_FILE), "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"{out_dir} is in use by another run (it holds the lock {LOCK_FILE}); wait for it "
                               "or use another --out folder") from None
        yield
    finally:
        f.close()


# ---------------------------------------------------------------------------------------------- backends

class Backend:
    """What the scheduler needs from a way of running chunks (in this process, worker processes, Ray actors).

    Workers are numbered 0..n-1. `idle()` lists workers ready for a chunk; `submit(w, items)` gives worker w a chunk;
    `poll(timeout)` returns events, each a tuple:
      ("result", w, key, entry)   one item finished (entry as run_entry makes it), in chunk order;
      ("done", w)                 worker w finished its chunk and is idle again;
      ("died", w, reason)         worker w is gone (its unanswered items are the scheduler's to retry);
      ("timeout", w, reason)      worker w was killed because its current item took longer than item_timeout
                                  (handled like "died"; only backends that enforce a timeout send it);
      ("failed", w, message)      worker w could not load the model (the run stops with this message).
    `replace(w)` starts a new worker in a dead one's place; `close()` stops everything (also on errors)."""

    n: int = 1

    def start(self) -> None: ...
    def idle(self) -> List[int]: raise NotImplementedError
    def submit(self, w: int, items: List[Item]) -> None: raise NotImplementedError
    def poll(self, timeout: float) -> List[tuple]: raise NotImplementedError
    def replace(self, w: int) -> None: raise NotImplementedError
    def close(self) -> None: ...


class _InlineBackend(Backend):
    """One worker: this process. poll() runs the next item of the chunk."""

    n = 1

    def __init__(self, evaluator: Evaluator, spec: ModelSpec, threads: Optional[int]):
        self.evaluator, self.spec, self.threads = evaluator, spec, threads
        self.model = None
        self.queue: deque = deque()
        self.busy = False

    def start(self) -> None:
        self.model = load_model(self.spec, self.threads)

    def idle(self) -> List[int]:
        return [] if self.busy else [0]

    def submit(self, w: int, items: List[Item]) -> None:
        self.queue.extend(items)
        self.busy = True

    def poll(self, timeout: float) -> List[tuple]:
        if not self.busy:
            return []
        item = self.queue.popleft()
        ev = [("result", 0, item.key, run_entry(self.evaluator, self.model, item))]
        if not self.queue:
            self.busy = False
            ev.append(("done", 0))
        return ev

    def replace(self, w: int) -> None:  # this process cannot die and go on
        raise RuntimeError("the in-process worker cannot be replaced")

    def close(self) -> None:
        if self.spec.kind != "object" and self.model is not None and hasattr(self.model, "close"):
            self.model.close()
        self.model = None


def _worker_main(conn, evaluator: Evaluator, spec: ModelSpec, threads: Optional[int]) -> None:
    """A worker process: load the model, then run the chunks the parent sends until it sends None or goes away."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the parent's to handle
    try:
        model = load_model(spec, threads)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops the run
        with contextlib.suppress(Exception):
            conn.send(("failed", _one_line(f"{type(e).__name__}: {e}")))
        return
    conn.send(("ready",))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for item in chunk:
            entry = run_entry(evaluator, model, item)
            try:
                conn.send(("result", item.key, entry))
            except (BrokenPipeError, OSError):
                return
        conn.send(("done",))


class _ProcessBackend(Backend):
    """N spawned processes, each with its own model (loaded from the path with `threads` threads)."""

    def __init__(self, evaluator: Evaluator, spec: ModelSpec, threads: Optional[int], n: int,
                 item_timeout: Optional[float] = None):
        if spec.kind == "object":
            raise ValueError("a loaded model cannot be sent to worker processes (it is memory-mapped C state): pass "
                             "its checkpoint folder path with workers > 1")
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.evaluator, self.spec, self.threads, self.n = evaluator, spec, threads, n
        self.procs: List[Any] = [None] * n
        self.conns: List[Any] = [None] * n
        self.state: List[str] = ["new"] * n          # new, starting, idle, busy, dead
        self.item_timeout = item_timeout
        self.started: List[Optional[float]] = [None] * n   # when worker w's current item started (monotonic)
        self.unanswered = [0] * n                           # items of worker w's chunk without a result yet

    def _spawn(self, w: int) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        p = self.ctx.Process(target=_worker_main, args=(child, self.evaluator, self.spec, self.threads),
                             name=f"vlmfo1-eval-{w}", daemon=True)
        try:
            p.start()
        except Exception as e:  # noqa: BLE001 - e.g. a lambda or a local function cannot go to a process
            parent.close()
            child.close()
            raise TypeError(f"worker processes need a picklable evaluator and model factory (defined at module "
                            f"level): {type(e).__name__}: {e}") from None
        child.close()
        self.procs[w], self.conns[w], self.state[w] = p, parent, "starting"

    def start(self) -> None:
        for w in range(self.n):
            self._spawn(w)

    def idle(self) -> List[int]:
        return [w for w in range(self.n) if self.state[w] == "idle"]

    def submit(self, w: int, items: List[Item]) -> None:
        self.state[w] = "busy"
        self.started[w], self.unanswered[w] = time.monotonic(), len(items)
        try:
            self.conns[w].send(list(items))
        except (BrokenPipeError, OSError):
            pass                                        # its death shows up in poll()

    def _messages(self, w: int, events: List[tuple]) -> bool:
        """Drain worker w's pipe into events; False when the pipe is closed."""
        conn = self.conns[w]
        try:
            while conn.poll():
                msg = conn.recv()
                kind = msg[0]
                if kind == "ready":
                    self.state[w] = "idle"
                elif kind == "result":
                    events.append(("result", w, msg[1], msg[2]))
                    self.unanswered[w] -= 1
                    self.started[w] = time.monotonic() if self.unanswered[w] > 0 else None
                elif kind == "done":
                    self.state[w] = "idle"
                    self.started[w] = None
                    events.append(("done", w))
                elif kind == "failed":
                    self.state[w] = "dead"
                    events.append(("failed", w, msg[1]))
        except (EOFError, OSError):
            return False
        return True

    def poll(self, timeout: float) -> List[tuple]:
        from multiprocessing.connection import wait

        live = [w for w in range(self.n) if self.state[w] in ("starting", "idle", "busy")]
        if not live:
            return []
        handles = {}
        for w in live:
            handles[self.conns[w]] = w
            handles[self.procs[w].sentinel] = w
        if self.item_timeout is not None:           # wake up for the first item deadline
            due = [self.started[w] + self.item_timeout for w in live if self.state[w] == "busy"
                   and self.started[w] is not None]
            if due:
                timeout = max(0.0, min(timeout, min(due) - time.monotonic()))
        ready = wait(list(handles), timeout)
        events: List[tuple] = []
        for w in sorted({handles[h] for h in ready}):
            alive = self._messages(w, events)
            p = self.procs[w]
            if self.state[w] == "dead":
                continue
            if not alive or not p.is_alive():
                p.join(timeout=5)
                self._messages(w, events)         # anything sent just before the end
                code = p.exitcode
                reason = (f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}")
                self.state[w] = "dead"
                events.append(("died", w, reason))
        if self.item_timeout is not None:
            self._kill_overdue(events)
        return events

    def _kill_overdue(self, events: List[tuple]) -> None:
        """Kill the busy workers whose current item has run longer than item_timeout (a "timeout" event each)."""
        for w in range(self.n):
            if self.state[w] != "busy" or self.started[w] is None:
                continue
            if time.monotonic() - self.started[w] <= self.item_timeout:
                continue
            self._messages(w, events)                 # an answer that came in meanwhile counts
            if self.state[w] != "busy" or self.started[w] is None \
                    or time.monotonic() - self.started[w] <= self.item_timeout:
                continue
            p = self.procs[w]
            p.kill()
            p.join(timeout=5)
            self.state[w] = "dead"
            self.started[w] = None
            events.append(("timeout", w, f"no answer within {self.item_timeout:g} s; the worker process was killed"))

    def replace(self, w: int) -> None:
        with contextlib.suppress(Exception):
            self.conns[w].close()
        self._spawn(w)

    def close(self) -> None:
        for w in range(self.n):
            conn, p = self.conns[w], self.procs[w]
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.send(None)
        deadline = time.monotonic() + 5
        for w in range(self.n):
            p = self.procs[w]
            if p is None:
                continue
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():                        # still busy with an item: stop it
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
            with contextlib.suppress(Exception):
                self.conns[w].close()
            self.state[w] = "dead"


# ---------------------------------------------------------------------------------------------- the scheduler

def _schedule(backend: Backend, chunks: List[List[Item]], write: Callable[[str, Dict[str, Any]], None],
              max_attempts: int) -> None:
    """Hand chunks to idle workers until every item has an entry (see the module doc)."""
    pending: deque = deque(chunks)
    inflight: Dict[int, List[Item]] = {}
    attempts: Dict[str, int] = {}
    idle_deaths, death_budget = 0, backend.n + 2
    while pending or inflight:
        for w in backend.idle():
            if not pending:
                break
            chunk = pending.popleft()
            inflight[w] = list(chunk)
            backend.submit(w, chunk)
        for ev in backend.poll(0.5):
            kind, w = ev[0], ev[1]
            if kind == "result":
                key, entry = ev[2], ev[3]
                left = inflight.get(w, [])
                for i, it in enumerate(left):
                    if it.key == key:
                        del left[i]
                        break
                write(key, entry)
            elif kind == "done":
                inflight.pop(w, None)
            elif kind == "failed":
                raise RuntimeError(f"a worker could not load the model: {ev[2]}")
            elif kind in ("died", "timeout"):
                left = inflight.pop(w, [])
                if left:
                    first = left[0]
                    attempts[first.key] = attempts.get(first.key, 0) + 1
                    if attempts[first.key] >= max_attempts:
                        n = attempts[first.key]
                        write(first.key, {"error": f"WorkerDied: the worker process died ({ev[2]}) while running "
                                                   f"this item, {n} times" if kind == "died" else
                                                   f"WorkerTimeout: this item timed out ({ev[2]}), {n} times"})
                        left = left[1:]
                    if left:
                        pending.appendleft(left)
                else:
                    idle_deaths += 1
                    if idle_deaths > death_budget:
                        raise RuntimeError(f"worker processes keep dying outside any item ({ev[2]}; {idle_deaths} "
                                           "times): out of memory while loading the model? Rerun to resume")
                if pending or any(inflight.values()):
                    backend.replace(w)


def _default_chunk_size(n_items: int, workers: int) -> int:
    if workers <= 1:
        return max(1, n_items)
    return max(1, min(16, math.ceil(n_items / (4 * workers))))


def _split_threads(workers: int, threads: Optional[int]) -> Optional[int]:
    from ..threads import available_cpus

    cpus = available_cpus()
    if threads is None:
        if workers == 1:
            return None                         # the model's default (VLMFO1_NUM_THREADS, OMP_..., the CPUs)
        if workers > cpus:
            warnings.warn(f"{workers} workers on {cpus} CPUs: they will compete for the cores", RuntimeWarning,
                          stacklevel=3)
        return max(1, cpus // workers)
    if workers * threads > cpus:
        warnings.warn(f"{workers} workers x {threads} threads = {workers * threads} threads on {cpus} CPUs: the "
                      "cores are oversubscribed (slower)", RuntimeWarning, stacklevel=3)
    return threads


def _check_int(name: str, v: Any, lo: int, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}{' or None' if allow_none else ''}, got {v!r}")


# ---------------------------------------------------------------------------------------------- run

def run(evaluator: Evaluator, model, out_dir, *, workers: Optional[int] = None, threads: Optional[int] = None,
        limit: Optional[int] = None, progress=True, ray: Optional[str] = None, retry_errors: bool = True,
        chunk_size: Optional[int] = None, max_attempts: int = 2, model_options: Optional[Mapping[str, Any]] = None,
        summary: bool = True, item_timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run `evaluator` with `model`, recording into `out_dir`; resumes what is there. Returns the report.

    model: a checkpoint folder (each worker loads VLMFO1.from_pretrained(path, threads=..., **model_options)), a
    loaded model (workers=1 only), or a factory `factory(threads=T)` returning a model (tests).
    workers: processes (each its own model; default 1); threads: threads per worker (default: the CPUs split evenly
    among the workers; with workers=1 the model's default). limit: the first `limit` items only (scored on their own).
    progress: a tqdm bar (True / False / a dict of tqdm options). ray: a Ray cluster address or "auto" (Ray actors
    instead of processes; workers: the number of actors, default one per slot of `threads` CPUs; see ray_backend).
    retry_errors: run items whose last attempt failed again (default). summary: print the summary table.
    item_timeout: seconds a worker may spend on one item before it is killed and the item retried (then recorded
    as a WorkerTimeout error); runs the items in worker processes (even with workers=1). Default: no limit.
    See the module doc for the files, the resume rules and how workers are handled."""
    if not isinstance(evaluator, Evaluator):
        raise TypeError(f"evaluator must be a vlmfo1.eval.Evaluator, got {type(evaluator).__name__}")
    _check_int("workers", workers, 1, allow_none=True)
    if ray is not None and (not isinstance(ray, str) or not ray.strip()):
        raise ValueError(f"ray must be a Ray cluster address or 'auto', got {ray!r}")
    _check_int("threads", threads, 1, allow_none=True)
    _check_int("limit", limit, 0, allow_none=True)
    _check_int("chunk_size", chunk_size, 1, allow_none=True)
    _check_int("max_attempts", max_attempts, 1)
    if item_timeout is not None and (isinstance(item_timeout, bool) or not isinstance(item_timeout, (int, float))
                                     or not 0 < item_timeout < math.inf):
        raise ValueError(f"item_timeout must be a positive number of seconds or None, got {item_timeout!r}")
    out_dir = os.fspath(out_dir)
    spec = ModelSpec.of(model, model_options)
    if spec.kind == "object" and ray is not None:
        raise ValueError("Ray actors load the model themselves: pass the checkpoint folder path (memory-mapped on "
                         "each node), not a loaded model")
    if spec.kind == "object" and ((workers or 1) > 1 or item_timeout is not None):
        raise ValueError("a loaded model cannot be shared with worker processes (workers > 1, or item_timeout, "
                         "which runs the items in a worker process): pass its checkpoint folder path (each worker "
                         "loads it, memory-mapped) or use workers=1 without item_timeout")
    if ray is not None:
        from .ray_backend import check_ray

        check_ray()                                   # before anything is written
    t_start = time.perf_counter()

    items = list(evaluator.items())                  # validates the inputs before anything else
    keys = [it.key for it in items]
    bad = next((k for k in keys if not isinstance(k, str)), None)
    if bad is not None:
        raise TypeError(f"{type(evaluator).__name__}.items(): Item.key must be a str, got {bad!r}")
    if len(set(keys)) != len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ValueError(f"{type(evaluator).__name__}.items(): the key {dup!r} appears twice")
    scope = items if limit is None else items[:limit]
    spec.precheck()
    n_workers = workers or 1
    per_worker_threads = _split_threads(n_workers, threads) if ray is None else threads
    meta = {"format": RUN_FORMAT, "evaluator": evaluator.name, "settings": _json_norm(evaluator.settings()),
            "model": _json_norm(spec.identity())}
    try:
        from .. import __version__ as version
        meta["vlmfo1"] = version
    except ImportError:
        pass

    os.makedirs(out_dir, exist_ok=True)
    with _lock(out_dir):
        _open_run(out_dir, meta)
        rec_path = os.path.join(out_dir, RECORDS_FILE)
        entries, _ = read_records(rec_path, repair=True)
        known = set(keys)
        strangers = [k for k in entries if k not in known]
        if strangers:
            warnings.warn(f"{rec_path}: {len(strangers)} record(s) for keys this evaluator does not have (e.g. "
                          f"{strangers[0]!r}): ignored", RuntimeWarning, stacklevel=2)

        def done(k: str) -> bool:
            e = entries.get(k)
            return e is not None and ("record" in e or not retry_errors)

        todo = [it for it in scope if not done(it.key)]
        if todo:
            for name in (PREDICTIONS_FILE, REPORT_FILE):      # stale until this run completes
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out_dir, name))
        n_done_before = len(scope) - len(todo)
        writer = _RecordWriter(rec_path)
        bar = _bar(progress, len(scope), n_done_before, evaluator.name)
        errors = [0]
        seconds: List[float] = []
        t_items = time.perf_counter()

        def write(key: str, entry: Dict[str, Any]) -> None:
            writer.write(key, entry)
            entries[key] = entry
            if "error" in entry:
                errors[0] += 1
            if isinstance(entry.get("seconds"), (int, float)):
                seconds.append(float(entry["seconds"]))
            if bar is not None:
                if errors[0]:
                    bar.set_postfix(errors=errors[0], refresh=False)
                bar.update(1)

        backend: Optional[Backend] = None
        try:
            if todo:
                if ray is not None:
                    from .ray_backend import RayBackend

                    backend = RayBackend(evaluator, spec, threads, workers, ray, max_workers=len(todo),
                                         item_timeout=item_timeout)
                    n_workers, per_worker_threads = backend.n, backend.threads
                else:
                    backend = (_InlineBackend(evaluator, spec, per_worker_threads)
                               if n_workers == 1 and item_timeout is None else
                               _ProcessBackend(evaluator, spec, per_worker_threads, n_workers, item_timeout))
                cs = chunk_size or _default_chunk_size(len(todo), n_workers)
                chunks = [todo[i:i + cs] for i in range(0, len(todo), cs)]
                backend.start()
                _schedule(backend, chunks, write, max_attempts)
        except KeyboardInterrupt:
            if backend is not None:
                backend.close()
                backend = None
            n_now = sum(1 for it in scope if it.key in entries)
            raise RunInterrupted(n_now, len(scope), out_dir) from None
        finally:
            if backend is not None:
                backend.close()
            writer.close()
            if bar is not None:
                bar.close()
        elapsed_items = time.perf_counter() - t_items

        missing = [it.key for it in scope if it.key not in entries]
        if missing:                                   # cannot happen unless a backend lost items
            raise RuntimeError(f"{len(missing)} items have no record after the run (e.g. {missing[0]!r}); rerun to "
                               "resume")
        _write_text_atomic(os.path.join(out_dir, PREDICTIONS_FILE),
                           [canonical_line(it.key, entries[it.key]) for it in scope])
        records = {it.key: entries[it.key]["record"] for it in scope if "record" in entries[it.key]}
        failed = [(it.key, entries[it.key]["error"]) for it in scope if "error" in entries[it.key]]
        report = dict(evaluator.score_subset(records, [it.key for it in scope]))
        exported = evaluator.export(records, [it.key for it in scope], out_dir) or []
        report["run"] = {
            "out_dir": os.path.abspath(out_dir), "items": len(scope), "of_items": len(items), "limit": limit,
            "records": len(records), "errors": len(failed),
            "error_examples": [{"key": k, "error": e} for k, e in failed[:10]],
            "ran_now": len(todo), "workers": n_workers, "threads_per_worker": per_worker_threads,
            "seconds": round(time.perf_counter() - t_start, 3),
            "items_per_second_now": round(len(todo) / elapsed_items, 4) if todo and elapsed_items > 0 else None,
            "mean_item_seconds": round(sum(seconds) / len(seconds), 4) if seconds else None,
            "files": [PREDICTIONS_FILE, REPORT_FILE] + list(exported),
        }
        _write_json_atomic(os.path.join(out_dir, REPORT_FILE), report)
    if summary:
        print(evaluator.summary(report))
        r = report["run"]
        line = (f"{r['items']} items ({r['ran_now']} run now, {r['records']} answered, {r['errors']} failed"
                + (f", e.g. {failed[0][0]}: {failed[0][1][:160]}" if failed else "") + f"); {out_dir}/{REPORT_FILE}")
        print(line)
    return report


def _bar(progress, total: int, initial: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    opts = dict(total=total, initial=initial, desc=desc or "eval", unit="img", smoothing=0.1, dynamic_ncols=True)
    if isinstance(progress, dict):
        opts.update(progress)
    return tqdm(**opts)
