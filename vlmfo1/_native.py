"""Loads the C core, vlmfo1._core, after the OpenBLAS it links against.

The core is linked against the OpenBLAS of the `scipy-openblas32` wheel (symbols prefixed
`scipy_`), which pip installs next to us. Its folder is not on the loader path, so we load the
library by absolute path with RTLD_GLOBAL first; the dynamic loader then resolves _core's
dependency on it by soname.
"""
import ctypes
import os
import warnings

import scipy_openblas32 as _ob

# The core keeps OpenBLAS single-threaded (its sgemm calls run on our own pool, see csrc/gemm.c), but should
# anything else in the process set OpenBLAS threads, they would busy-wait for 2^28 cycles (~0.1 s) after
# each call by default, competing with our pool; let them sleep after ~2^20 cycles instead. Read once,
# when the library initialises, so it must be set before the load below.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

_lib_path = os.path.join(_ob.get_lib_dir(), "lib" + _ob.get_library() + ".so")
if os.path.exists(_lib_path):
    ctypes.CDLL(_lib_path, mode=ctypes.RTLD_GLOBAL)

from . import _core  # noqa: E402

_info = _core.gemm_info()

# OpenBLAS picks its kernels from the CPU it detects, or from OPENBLAS_CORETYPE; a core class below what the CPU can
# run halves fp32 matmul speed or worse (measured on Zen 5 cores: 245-252 GF/s with OPENBLAS_CORETYPE=Haswell against
# 449-472 with its AVX-512 kernels). Say so, once, naming the cause, instead of running slow in silence.
_AVX512_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")
_AVX2_CORES = _AVX512_CORES + ("Haswell", "Zen", "Excavator")


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def blas_core_warning(blas: str, flags: set, env: dict) -> str:
    """The warning to give for an OpenBLAS running kernels below this CPU's class ("" if none)."""
    core = blas.split("core=", 1)[1].split()[0] if "core=" in blas else ""
    if not core or core == "?":
        return ""
    if "avx512f" in flags:
        want, cls = _AVX512_CORES, "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        want, cls = _AVX2_CORES, "AVX2"
    else:
        return ""
    if core in want:
        return ""
    why = (f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} is set" if env.get("OPENBLAS_CORETYPE")
           else "that is what it detected")
    fix = ("unset OPENBLAS_CORETYPE" if env.get("OPENBLAS_CORETYPE")
           else f"set OPENBLAS_CORETYPE={want[0]}")
    return (f"OpenBLAS runs its {core} kernels on this {cls} CPU ({why}): fp32 matmuls of more than 16 rows will "
            f"run at about half speed or worse; {fix} before importing vlmfo1 (bf16 and int8 weights do not use "
            f"OpenBLAS)")


_msg = blas_core_warning(_info.get("blas", ""), _cpu_flags(), os.environ)
if _msg:
    warnings.warn(_msg, RuntimeWarning, stacklevel=2)

core = _core
