"""Build of vlmfo1: one C extension, vlmfo1._core, from every .c file in csrc/.

It links against the OpenBLAS that pip installs (the `scipy-openblas32` wheel, the build NumPy and
SciPy ship), so no system BLAS is needed; vlmfo1/__init__.py loads that library before _core.
Set VLM_DEBUG=1 for an -O0 -g build with AddressSanitizer, or VLM_SANITIZE=1 for the -O1 build with
AddressSanitizer and UndefinedBehaviorSanitizer (every UB report fatal) that `.ci/sanitize` runs the tests on.
Both need gcc's libasan preloaded into the (uninstrumented) Python: see `.ci/sanitize`.
"""
import glob
import os

import numpy
import scipy_openblas32
from setuptools import Extension, setup

debug = os.environ.get("VLM_DEBUG") == "1"
sanitize = os.environ.get("VLM_SANITIZE") == "1"
cflags = ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden", "-pthread",
          "-fno-math-errno", "-DNPY_NO_DEPRECATED_API=NPY_1_21_API_VERSION"]
if sanitize:
    san = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"]
    cflags += ["-O1", "-g", "-fno-omit-frame-pointer"] + san
    ldflags = ["-pthread"] + san
elif debug:
    cflags += ["-O0", "-g", "-fsanitize=address"]
    ldflags = ["-pthread", "-fsanitize=address"]
else:
    cflags += ["-O3"]
    ldflags = ["-pthread"]

ext = Extension(
    "vlmfo1._core",
    sources=sorted(glob.glob("csrc/*.c")),
    include_dirs=["csrc", numpy.get_include(), scipy_openblas32.get_include_dir()],
    library_dirs=[scipy_openblas32.get_lib_dir()],
    libraries=[scipy_openblas32.get_library(), "m"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    depends=sorted(glob.glob("csrc/*.h")),
)

setup(ext_modules=[ext])
