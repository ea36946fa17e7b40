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
if "Prescott" in _info.get("blas", "") or "Katmai" in _info.get("blas", ""):
    warnings.warn(
        f"OpenBLAS detected an old core ({_info['blas']}); fp32 matmuls will be several times slower. "
        "Set OPENBLAS_CORETYPE (e.g. SkylakeX or Haswell) before importing vlmfo1.",
        RuntimeWarning,
        stacklevel=2,
    )

core = _core
