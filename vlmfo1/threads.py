"""How many worker threads to use by default: the CPUs this process may run on, as the user already limited them.

Order: VLMFO1_NUM_THREADS, then OMP_NUM_THREADS (the setting users already make for NumPy/torch/OpenMP codes; the
first entry of a nested list "4,2"), else min(CPU affinity mask, cgroup CPU quota rounded up) — so a container
limited to 2 CPUs on a 64-core host gets 2, not 64.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

from .options import check_int


def _env_threads(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or not v.strip():
        return None
    try:
        n = int(v.split(",")[0].strip())
    except ValueError:
        warnings.warn(f"{name}={v!r} is not a thread count: ignored", RuntimeWarning, stacklevel=3)
        return None
    if n < 1:
        warnings.warn(f"{name}={v!r} is not a positive thread count: ignored", RuntimeWarning, stacklevel=3)
        return None
    return n


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> Optional[float]:
    """CPUs allowed by the cgroup CPU quota (v2 cpu.max, or v1 cfs quota/period) of this process; None if none."""
    try:  # cgroup v2: the file of this process's own group, else the root
        with open("/proc/self/cgroup") as f:
            rel = next((ln.split(":", 2)[2].strip() for ln in f if ln.startswith("0::")), "")
    except OSError:
        rel = ""
    for p in (os.path.join(root, rel.lstrip("/"), "cpu.max"), os.path.join(root, "cpu.max")):
        try:
            with open(p) as f:
                quota, period = f.read().split()[:2]
            if quota == "max":
                return None
            return int(quota) / int(period)
        except (OSError, ValueError):
            continue
    try:  # cgroup v1
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup quota (rounded up)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    q = cgroup_cpu_limit()
    if q is not None and q > 0:
        n = min(n, max(1, math.ceil(q)))
    return max(1, n)


def default_threads() -> int:
    """The thread count used when none is given (see the module doc)."""
    for name in ("VLMFO1_NUM_THREADS", "OMP_NUM_THREADS"):
        n = _env_threads(name)
        if n is not None:
            return min(n, 256)
    return min(available_cpus(), 256)


MAX_THREADS = 256   # the C core's limit per pool


def check_threads(n_threads, what: str = "n_threads") -> int:
    """A thread-count load option: None -> default_threads(); else an int in [1, MAX_THREADS]. A bool, float or
    string is a TypeError and an int out of range a ValueError, both naming the option (never silently the default,
    truncated, or a pool of a million threads at the first request)."""
    if n_threads is None:
        return default_threads()
    return check_int(n_threads, what, 1, MAX_THREADS, " (None = the CPUs this process may use)", kind="None or an int")
