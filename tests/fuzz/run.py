"""Run the fuzz corpus: every case in a worker subprocess, so a crash (a signal) or a hang (past --timeout) is
counted against the case and the worker is replaced; nothing a case does can take the runner down.

    python -m tests.fuzz.run                       # the CI sample (about 700 cases, all targets)
    python -m tests.fuzz.run --all                 # every case (several thousand; ~15 min on 2 cores)
    python -m tests.fuzz.run --target boxes --all -v
    python -m tests.fuzz.run --fo1 DIR             # reuse a tiny FO1 checkpoint instead of writing one

Exit status 0 when every case met its expectation (targets.py), 1 otherwise; a summary table per target and every
failure are printed. Workers run with an address-space limit (--mem-gib, default 4; none under AddressSanitizer)
so a hostile claimed size shows up as a MemoryError instead of filling the machine.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TIKTOKEN = os.path.join(os.path.dirname(ROOT), "shared", "data", "tokenizer", "qwen.tiktoken")
CI_CASES = 700


# ---------------------------------------------------------------- worker side
def worker_main(bases: Dict[str, str], scratch: str, mem_gib: float) -> None:
    faulthandler.enable()
    if mem_gib > 0 and "asan" not in os.environ.get("LD_PRELOAD", ""):
        import resource
        lim = int(mem_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                     # anything printed by the code under test goes to the log, not the protocol
    sys.path.insert(0, ROOT)
    from tests.fuzz.targets import Changed, Harness, Unclear, judge
    h = Harness(bases, scratch)
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        with open(job["path"], "rb") as f:
            data = f.read()
        t0 = time.perf_counter()
        try:
            outcome = h.run(job["target"], data)
        except Changed as exc:
            outcome = f"changed: {exc}"
        except Unclear as exc:
            outcome = f"unclear: {exc}"
        except BaseException as exc:   # noqa: BLE001 - every other exception is the finding
            if isinstance(exc, KeyboardInterrupt):
                raise
            outcome = f"unclear: {type(exc).__name__}: {str(exc)[:300]}"
        try:
            verdict = judge(job["expect"], job["target"], outcome, h, data)
        except Exception as exc:   # noqa: BLE001
            verdict = f"judge failed: {type(exc).__name__}: {exc}"
        proto.write(json.dumps({"i": job["i"], "outcome": outcome[:500], "verdict": verdict[:500],
                                "seconds": time.perf_counter() - t0}) + "\n")


# ---------------------------------------------------------------- parent side
class Worker:
    def __init__(self, wid: int, args, bases: Dict[str, str], workdir: str):
        self.wid, self.args = wid, args
        self.scratch = os.path.join(workdir, f"w{wid}")
        os.makedirs(self.scratch, exist_ok=True)
        self.log = open(os.path.join(workdir, f"w{wid}.log"), "ab")
        env = dict(os.environ, VLMFO1_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.p = subprocess.Popen([sys.executable, "-m", "tests.fuzz.run", "--worker", "--bases", json.dumps(bases),
                                   "--scratch", self.scratch, "--mem-gib", str(args.mem_gib)],
                                  cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                  start_new_session=True)
        self.buf = b""
        self.job: Optional[dict] = None
        self.started = 0.0
        if self._read(args.timeout + 120) is None:
            raise RuntimeError(f"fuzz worker {wid} did not start (see {self.log.name})")

    def _read(self, timeout: float) -> Optional[dict]:
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.p.stdout], [], [], left)
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, job: dict) -> None:
        self.job, self.started = job, time.monotonic()
        self.p.stdin.write((json.dumps(job) + "\n").encode())
        self.p.stdin.flush()

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()
        self.log.close()


def run(cases, args, bases: Dict[str, str], workdir: str) -> List[dict]:
    results: List[Optional[dict]] = [None] * len(cases)
    todo = list(range(len(cases)))
    todo.reverse()
    workers: List[Optional[Worker]] = [None] * args.workers
    done = 0
    t_start = time.monotonic()
    casedir = os.path.join(workdir, "cases")
    os.makedirs(casedir, exist_ok=True)

    def dispatch(k: int) -> None:
        if not todo:
            return
        if workers[k] is None:
            workers[k] = Worker(k, args, bases, workdir)
        i = todo.pop()
        c = cases[i]
        path = os.path.join(casedir, f"{i}.bin")
        with open(path, "wb") as f:
            f.write(c.data)
        workers[k].send({"i": i, "target": c.target, "expect": c.expect, "path": path})

    for k in range(args.workers):
        dispatch(k)
    while True:
        busy = [w for w in workers if w is not None and w.job is not None]
        if not busy:
            break
        readable, _, _ = select.select([w.p.stdout for w in busy], [], [], 0.2)
        for w in busy:
            finished = None
            if w.p.stdout in readable:
                chunk = os.read(w.p.stdout.fileno(), 65536)
                w.buf += chunk
                if b"\n" in w.buf:
                    line, w.buf = w.buf.split(b"\n", 1)
                    finished = json.loads(line)
                elif not chunk:   # EOF: the worker died in the middle of the case
                    try:
                        rc = w.p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        rc = None
                    what = (f"signal {signal.Signals(-rc).name}" if rc is not None and rc < 0 else
                            f"exit status {rc}")
                    finished = {"i": w.job["i"], "outcome": f"crash: worker died ({what})",
                                "verdict": f"crash ({what})", "seconds": time.monotonic() - w.started}
                    w.kill()
                    workers[w.wid] = None
            elif time.monotonic() - w.started > args.timeout:
                finished = {"i": w.job["i"], "outcome": f"hang: no answer after {args.timeout:g} s",
                            "verdict": f"hang (> {args.timeout:g} s)", "seconds": args.timeout}
                w.kill()
                workers[w.wid] = None
            if finished is None:
                continue
            i = finished["i"]
            results[i] = finished
            try:
                os.unlink(os.path.join(casedir, f"{i}.bin"))
            except OSError:
                pass
            done += 1
            c = cases[i]
            if args.verbose or finished["verdict"]:
                mark = "FAIL" if finished["verdict"] else "ok  "
                print(f"{mark} [{c.target}] {c.name[:80]} ({c.expect}): {finished['outcome'][:160]}"
                      + (f"\n       -> {finished['verdict'][:300]}" if finished["verdict"] else ""), flush=True)
            if workers[w.wid] is not None:
                workers[w.wid].job = None
            dispatch(w.wid)
            if args.progress and done % 200 == 0:
                print(f"... {done}/{len(cases)} cases, {time.monotonic() - t_start:.0f} s", file=sys.stderr,
                      flush=True)
    for w in workers:
        if w is not None:
            w.kill()
    return results


def summarize(cases, results) -> tuple[str, int]:
    rows: Dict[str, Dict[str, float]] = {}
    failures = 0
    for c, r in zip(cases, results):
        row = rows.setdefault(c.target, {"cases": 0, "accepted": 0, "refused": 0, "failed": 0, "crash": 0, "hang": 0,
                                         "seconds": 0.0, "slowest": 0.0})
        row["cases"] += 1
        row["seconds"] += r["seconds"]
        row["slowest"] = max(row["slowest"], r["seconds"])
        if r["outcome"].startswith("accepted"):
            row["accepted"] += 1
        elif r["outcome"].startswith("refused"):
            row["refused"] += 1
        if r["verdict"]:
            failures += 1
            row["failed"] += 1
            row["crash"] += r["verdict"].startswith("crash")
            row["hang"] += r["verdict"].startswith("hang")
    lines = [f"{'target':<14}{'cases':>7}{'accepted':>10}{'refused':>9}{'failed':>8}{'crash':>7}{'hang':>6}"
             f"{'case s':>9}{'slowest':>9}"]
    for t, r in rows.items():
        lines.append(f"{t:<14}{r['cases']:>7}{r['accepted']:>10}{r['refused']:>9}{r['failed']:>8}{r['crash']:>7}"
                     f"{r['hang']:>6}{r['seconds']:>9.1f}{r['slowest']:>9.2f}")
    return "\n".join(lines), failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every case (default: the CI sample)")
    ap.add_argument("--cases", type=int, default=CI_CASES, help="size of the sample without --all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", action="append", help="only these targets (repeatable)")
    ap.add_argument("--match", help="only cases whose name contains this text")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    ap.add_argument("--mem-gib", type=float, default=4.0, help="address-space limit per worker (0: none)")
    ap.add_argument("--fo1", help="an existing tiny VLM-FO1 checkpoint folder to mutate (default: write one)")
    ap.add_argument("--workdir", help="where bases and scratch files go (default: a temporary folder)")
    ap.add_argument("--json", help="write every case's outcome here")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--selftest", action="store_true", help="run three cases that pass, crash and hang (the "
                    "runner must count the last two and carry on)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bases", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.bases), args.scratch, args.mem_gib)
        return 0

    sys.path.insert(0, ROOT)
    from tests.fuzz import corpus
    from tests.fuzz.targets import write_bases
    targets = tuple(args.target or corpus.TARGETS)
    unknown = set(targets) - set(corpus.TARGETS)
    if unknown:
        ap.error(f"unknown target(s) {sorted(unknown)}; known: {', '.join(corpus.TARGETS)}")
    with tempfile.TemporaryDirectory(prefix="vlmfo1-fuzz-", dir=args.workdir) as workdir:
        t0 = time.monotonic()
        bases = write_bases(workdir, TIKTOKEN, args.fo1)
        cases = corpus.build(bases, args.seed, targets) if not args.selftest else []
        total = len(cases)
        if args.selftest:
            cases = [corpus.Case("_crash", "selftest crash", b"", "any"), corpus.Case("_hang", "selftest hang", b"", "any"),
                     corpus.Case("boxes", "selftest after a crash and a hang", b"[[1, 2, 3, 4]]", "accept")]
        elif args.match:
            cases = [c for c in cases if args.match in c.name]
        elif not args.all:
            cases = corpus.sample(cases, args.cases, args.seed)
        print(f"fuzz: {len(cases)} of {total} cases ({', '.join(targets)}), seed {args.seed}, {args.workers} "
              f"workers, timeout {args.timeout:g} s", flush=True)
        results = run(cases, args, bases, workdir)
        table, failures = summarize(cases, results)
    print(table)
    print(f"fuzz: {len(cases)} cases, {failures} failed, {time.monotonic() - t0:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"target": c.target, "name": c.name, "expect": c.expect, **r} for c, r in zip(cases, results)],
                      f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
