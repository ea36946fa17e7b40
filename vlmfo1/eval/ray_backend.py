"""The Ray backend of the evaluation runner: `run(..., ray="ADDRESS" | "auto")`, `vlmfo1 eval ... --ray ADDRESS`.

Ray is an optional extra (`pip install 'vlmfo1[ray]'`); this module imports it only when a run uses it.

    ray start --head                                            # on the head node; `ray start --address=...` on others
    vlmfo1 eval coco --model DIR ... --out RUN_DIR --ray auto   # on a node of the cluster (or --ray HOST:PORT)

How it runs (the scheduler, the records file, resume and the canonical predictions.jsonl are the runner's, shared with
the process backend, so a Ray run gives byte-identical files):
  - the driver connects (`ray.init(address=...)`; a process already connected with `ray.init()` keeps its
    connection) and starts one actor per slot: a slot is `threads` CPUs of one node (`num_cpus=threads`), so the
    cluster holds sum(node CPUs // threads) actors; `workers=N` asks for N actors instead. Default threads: the CPUs
    of the smallest node (one actor per node), or with `workers=N` the cluster's CPUs split among the N actors.
    Never more actors than items. VLMFO1_NUM_THREADS, OMP_NUM_THREADS and OPENBLAS_NUM_THREADS are set to `threads`
    in each actor's runtime environment;
  - each actor loads its own model from the checkpoint folder path (memory-mapped: the nodes must see the model
    and the images at the same paths, e.g. a shared file system). A loaded model object cannot go to an actor (a
    ValueError says so); a factory callable (tests) is sent as it is. The evaluator is put in the object store once;
  - the actors import vlmfo1, the evaluator's module and the factory's module; when those come from source folders
    (a checkout, not site-packages) the folders are put on the actors' PYTHONPATH, so the actors run the same code
    as the driver (same layout on every node, as for the model);
  - a chunk of items goes to one actor as one call per item, executed in order (a plain Ray actor runs its calls
    one at a time in submission order); the driver writes each record as it arrives;
  - an actor that dies (ray.exceptions.RayActorError: killed, node lost, out of memory) has the unanswered rest of
    its chunk put back in the queue and a replacement actor is started; the item it was running is tried at most
    `max_attempts` times, as with worker processes. An actor found dead before it started a chunk (killed while
    idle) does not count against the chunk's items: a new actor takes the chunk (at most workers + 2 times);
  - `item_timeout` (seconds, RayBackend(item_timeout=...), the process backend's option): an actor whose current item
    has run longer is killed, a ("timeout", w, reason) event, which the scheduler treats like a death (retried up to
    `max_attempts`, then a WorkerTimeout error record);
  - a model that cannot be loaded (or an evaluator / factory that an actor cannot import) stops the run with the
    actor's error; Ctrl-C or any error kills the actors (`ray.kill`) and disconnects the driver if it connected.

A loopback address (127.0.0.1:PORT, localhost:PORT) means a single-machine cluster started with
`ray start --head --node-ip-address=127.0.0.1` under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which makes Ray bind to
the loopback interface only): the driver then sets that variable too when Ray is not imported yet, else Ray would
look for the cluster at this machine's network address. "local" starts a throwaway cluster on this machine for the
run (ray.init's own meaning), bound to the loopback interface the same way.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import sysconfig
import time
import uuid
import warnings
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from .base import Evaluator, Item
from .runner import Backend, ModelSpec, _one_line, load_model, run_entry

__all__ = ["RayBackend", "check_ray"]

RAY_MISSING = ("the Ray backend needs the ray package: pip install 'vlmfo1[ray]' (or pip install ray), on the "
               "driver and on every node of the cluster")
THREAD_VARS = ("VLMFO1_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def check_ray() -> None:
    """ImportError (with the install command) when ray is not installed; imports nothing."""
    if sys.modules.get("ray") is None and importlib.util.find_spec("ray") is None:
        raise ImportError(RAY_MISSING)


def _is_loopback(address: str) -> bool:
    """A single-machine cluster: 127.x.x.x:PORT, localhost:PORT, or "local" (ray.init starts a new one)."""
    if address.strip() == "local":
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _import_ray(address: str):
    if _is_loopback(address) and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"{RAY_MISSING} ({e})") from None
    return ray


# ---------------------------------------------------------------------------------------------- the actor

class _EvalActor:
    """One slot of the cluster: its own model, answering items one at a time (wrapped by ray.remote at run time)."""

    def __init__(self, evaluator: Evaluator, spec: ModelSpec, threads: Optional[int]):
        self.evaluator, self.model, self.error = evaluator, None, None
        try:
            self.model = load_model(spec, threads)
        except Exception as e:  # noqa: BLE001 - reported by ready(); the driver stops the run
            self.error = _one_line(f"{type(e).__name__}: {e}")

    def ready(self) -> Optional[str]:
        """None when the model is loaded, else the error."""
        return self.error

    def ping(self) -> None:
        return None

    def run(self, item: Item) -> Dict[str, Any]:
        return run_entry(self.evaluator, self.model, item)


def _source_roots(module_names: List[str]) -> List[str]:
    """The folders to put on the actors' PYTHONPATH so that they import these modules from where the driver does:
    the folder holding each module's top-level package, unless it is an installed (site-packages) or stdlib one."""
    installed = {os.path.realpath(p) for p in (sysconfig.get_paths().get(k) for k in ("purelib", "platlib",
                                                                                     "stdlib", "platstdlib")) if p}
    roots: List[str] = []
    for name in module_names:
        if not name or name in ("__main__", "builtins"):
            continue
        top = sys.modules.get(name.split(".")[0])
        f = getattr(top, "__file__", None)
        if not f:
            continue
        d = os.path.dirname(os.path.abspath(f))
        root = os.path.dirname(d) if os.path.basename(f).startswith("__init__.") else d
        real = os.path.realpath(root)
        if real in installed or any(part in ("site-packages", "dist-packages") for part in real.split(os.sep)):
            continue
        if root not in roots:
            roots.append(root)
    return roots


def _death_reason(e: BaseException) -> str:
    """One short line for an actor's death (the scheduler puts it in WorkerDied error records)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    ip = next((ln[3:].strip() for ln in lines if ln.startswith("ip:")), None)
    detail = next((ln for ln in reversed(lines) if not ln.endswith(":") and ":" not in ln[:12]),
                  lines[-1] if lines else type(e).__name__)
    detail = detail.split(" Some common causes")[0].rstrip(". ")     # Ray's troubleshooting advice: left out
    return _one_line(f"Ray actor died{f' on {ip}' if ip else ''}: {detail}")[:240]


# ---------------------------------------------------------------------------------------------- the backend

class RayBackend(Backend):
    """Actors on a Ray cluster (see the module doc). `n` (actors) and `threads` (per actor) are known after
    construction, which connects to the cluster."""

    def __init__(self, evaluator: Evaluator, spec: ModelSpec, threads: Optional[int], workers: Optional[int],
                 address: str, max_workers: Optional[int] = None, item_timeout: Optional[float] = None):
        if spec.kind == "object":
            raise ValueError("Ray actors load the model themselves: pass the checkpoint folder path (memory-mapped "
                             "on each node), not a loaded model")
        ray = _import_ray(address)
        self.ray, self.address, self.item_timeout = ray, address, item_timeout
        self.owns_connection = False
        if not ray.is_initialized():
            ray.init(address=address, logging_level=logging.WARNING)
            self.owns_connection = True
        try:
            self._plan(threads, workers, max_workers)
            self.evaluator_ref = ray.put(evaluator)
            self.spec = spec
            self.token = uuid.uuid4().hex[:8]
            mods = ["vlmfo1", type(evaluator).__module__]
            if spec.kind == "factory":
                fn = getattr(spec.value, "func", spec.value)
                mods.append(getattr(fn, "__module__", None) or "")
            env = {k: str(self.threads) for k in THREAD_VARS}
            roots = _source_roots(mods)
            if roots:
                env["PYTHONPATH"] = os.pathsep.join(roots)
            self.actor_cls = ray.remote(_EvalActor)
            self.actor_options = dict(num_cpus=self.threads, max_restarts=0, max_task_retries=0, max_concurrency=1,
                                      scheduling_strategy="SPREAD", runtime_env={"env_vars": env})
        except BaseException:
            self._disconnect()
            raise
        self.actors: List[Any] = [None] * self.n
        self.state: List[str] = ["new"] * self.n          # new, starting, idle, busy, dead
        self.ready_ref: List[Any] = [None] * self.n
        self.waiting: List[Optional[List[Item]]] = [None] * self.n   # the chunk of an actor that is (re)starting
        self.ping_ref: List[Any] = [None] * self.n
        self.calls: List[Deque[Tuple[Item, Any]]] = [deque() for _ in range(self.n)]
        self.item_started: List[float] = [0.0] * self.n   # when the actor's current item began (about)
        self.generation = [0] * self.n
        self.silent_deaths, self.silent_budget = 0, self.n + 2

    def _plan(self, threads: Optional[int], workers: Optional[int], max_workers: Optional[int]) -> None:
        cpus = sorted(int(n.get("Resources", {}).get("CPU", 0)) for n in self.ray.nodes() if n.get("Alive"))
        cpus = [c for c in cpus if c > 0]
        if not cpus:
            raise RuntimeError(f"the Ray cluster at {self.address!r} has no node with CPUs")
        if threads is None:
            threads = cpus[0] if workers is None else max(1, min(cpus[-1], sum(cpus) // workers))
        if threads > cpus[-1]:
            raise ValueError(f"{threads} threads per actor, but the largest node of the Ray cluster has {cpus[-1]} "
                             "CPUs: use fewer threads")
        slots = sum(c // threads for c in cpus)
        if workers is None:
            n = slots
        else:
            n = workers
            if n > slots:
                warnings.warn(f"{n} Ray actors of {threads} threads, but the cluster has room for {slots}: the others "
                              "wait for free CPUs", RuntimeWarning, stacklevel=4)
        if max_workers is not None:
            n = min(n, max(1, max_workers))
        self.threads, self.n, self.slots, self.node_cpus = threads, max(1, n), slots, cpus

    # ---- actors

    def _spawn(self, w: int) -> None:
        self.generation[w] += 1
        name = f"vlmfo1-eval-{self.token}-{w}.{self.generation[w]}"
        try:
            actor = self.actor_cls.options(name=name, **self.actor_options).remote(self.evaluator_ref, self.spec,
                                                                                  self.threads)
        except Exception as e:  # noqa: BLE001 - e.g. a factory that cannot be serialised
            raise TypeError(f"Ray actors need a serialisable evaluator and model factory: {type(e).__name__}: "
                            f"{e}") from None
        self.actors[w], self.ready_ref[w], self.state[w] = actor, actor.ready.remote(), "starting"
        self.ping_ref[w] = None
        self.calls[w] = deque()

    def _kill(self, w: int) -> None:
        actor, self.actors[w] = self.actors[w], None
        if actor is not None:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)

    def _send(self, w: int, items: List[Item]) -> None:
        actor = self.actors[w]
        self.ping_ref[w] = actor.ping.remote()            # answered => the actor was alive when the chunk began
        self.calls[w] = deque((it, actor.run.remote(it)) for it in items)
        self.state[w] = "busy"
        self.item_started[w] = time.monotonic()

    def start(self) -> None:
        for w in range(self.n):
            self._spawn(w)

    def idle(self) -> List[int]:
        return [w for w in range(self.n) if self.state[w] == "idle"]

    def submit(self, w: int, items: List[Item]) -> None:
        self._send(w, list(items))

    def replace(self, w: int) -> None:
        self._kill(w)
        self._spawn(w)

    # ---- events

    def _restart_with(self, w: int, items: List[Item], e: BaseException) -> None:
        """The actor was dead before it began its chunk: a new actor takes the whole chunk (no attempt counted)."""
        self.silent_deaths += 1
        if self.silent_deaths > self.silent_budget:
            raise RuntimeError(f"Ray actors keep dying before they start any item ({_death_reason(e)}; "
                               f"{self.silent_deaths} times); rerun to resume")
        self.replace(w)
        self.waiting[w] = items

    def _dead(self, w: int, e: BaseException, events: List[tuple]) -> None:
        self._kill(w)
        self.calls[w] = deque()
        self.ping_ref[w] = None
        self.state[w] = "dead"
        events.append(("died", w, _death_reason(e)))

    def _check_ready(self, w: int, events: List[tuple]) -> None:
        ray = self.ray
        try:
            err = ray.get(self.ready_ref[w])
        except ray.exceptions.RayActorError as e:
            if getattr(e, "actor_init_failed", False):   # its arguments could not be unpickled (a missing module)
                self.state[w] = "dead"
                events.append(("failed", w, _one_line(str(e))[:1000]))
                return
            if self.waiting[w] is not None:        # a chunk is waiting for this actor: try again without charge
                items, self.waiting[w] = self.waiting[w], None
                self._restart_with(w, items, e)
                return
            self._dead(w, e, events)
            return
        except ray.exceptions.RayError as e:
            self._dead(w, e, events)
            return
        self.ready_ref[w] = None
        if err is not None:
            self.state[w] = "dead"
            events.append(("failed", w, err))
            return
        if self.waiting[w] is not None:
            items, self.waiting[w] = self.waiting[w], None
            self._send(w, items)
        else:
            self.state[w] = "idle"

    def _began(self, w: int) -> bool:
        """Whether the actor was alive when its chunk began (its ping answered); False when the ping failed."""
        ref = self.ping_ref[w]
        if ref is None:
            return True
        ready, _ = self.ray.wait([ref], timeout=10)
        if not ready:
            return True
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayError:
            return False
        self.ping_ref[w] = None
        return True

    def _drain(self, w: int, events: List[tuple]) -> None:
        ray = self.ray
        calls = self.calls[w]
        while calls:
            item, ref = calls[0]
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                return
            try:
                entry = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if not self._began(w):
                    self._restart_with(w, [it for it, _ in calls], e)
                    return
                self._dead(w, e, events)
                return
            except ray.exceptions.RayTaskError as e:  # the call itself raised (not an item error: those are entries)
                cause = getattr(e, "cause", None) or e
                entry = {"error": _one_line(f"{type(cause).__name__}: {cause}"), "where": "ray actor"}
            except ray.exceptions.RayError as e:       # object lost, worker crashed...: treat as a death
                self._dead(w, e, events)
                return
            calls.popleft()
            self.ping_ref[w] = None
            self.item_started[w] = time.monotonic()
            events.append(("result", w, item.key, entry))
        self.state[w] = "idle"
        events.append(("done", w))

    def poll(self, timeout: float) -> List[tuple]:
        ray = self.ray
        watch = []
        for w in range(self.n):
            if self.state[w] == "starting" and self.ready_ref[w] is not None:
                watch.append(self.ready_ref[w])
            elif self.state[w] == "busy" and self.calls[w]:
                watch.append(self.calls[w][0][1])
        if not watch:
            time.sleep(min(timeout, 0.05))
            return []
        if self.item_timeout is not None:              # wake up for the first item deadline
            due = [self.item_started[w] + self.item_timeout for w in range(self.n)
                   if self.state[w] == "busy" and self.calls[w]]
            if due:
                timeout = max(0.0, min(timeout, min(due) - time.monotonic()))
        ray.wait(watch, num_returns=1, timeout=timeout)
        events: List[tuple] = []
        for w in range(self.n):
            if self.state[w] == "starting" and self.ready_ref[w] is not None:
                done, _ = ray.wait([self.ready_ref[w]], timeout=0)
                if done:
                    self._check_ready(w, events)
            if self.state[w] == "busy":
                self._drain(w, events)
            if (self.item_timeout is not None and self.state[w] == "busy" and self.calls[w]
                    and time.monotonic() - self.item_started[w] > self.item_timeout):
                self._kill(w)                          # its unanswered items go back to the scheduler
                self.calls[w], self.ping_ref[w], self.state[w] = deque(), None, "dead"
                events.append(("timeout", w, f"no answer within {self.item_timeout:g} s; the Ray actor was killed"))
        return events

    # ---- the end

    def _disconnect(self) -> None:
        if self.owns_connection:
            self.owns_connection = False
            with contextlib.suppress(Exception):
                self.ray.shutdown()

    def close(self) -> None:
        for w in range(len(getattr(self, "actors", []))):
            self._kill(w)
            self.state[w] = "dead"
        self.evaluator_ref = None
        self._disconnect()
