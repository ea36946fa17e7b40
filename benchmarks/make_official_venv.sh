#!/usr/bin/env bash
# Make the interpreter for the OFFICIAL engines of benchmarks/bench_fo1.py (--official-python VENV_DIR/bin/python):
# torch 2.14.1 + torchvision 0.29.1, whose compiled ops (torchvision::roi_align) load and run on CPU tensors, so the
# official pipeline runs in its best CPU mode instead of with the pure-torch RoIAlign shim of
# tests/golden/make_fo1_golden.py. On x86_64 these are the CUDA builds from PyPI (they run on the CPU; the nvidia-*
# runtime wheels they pull in make the venv ~5.7 GB).
#
#     bash benchmarks/make_official_venv.sh /tmp/fo1tv
#     python benchmarks/bench_fo1.py --official /path/to/VLM-FO1 --official-python /tmp/fo1tv/bin/python --quick
#
# Every other package is pinned to the version of the reference venv used for tests/golden (/tmp/fo1ref; see
# tests/golden/README.md) -- in particular transformers==4.50.1, the version the official requirements.txt pins
# (do not upgrade it: the official code is written against it). The list is what the official code path imports
# (transformers, timm, accelerate, einops, safetensors, Pillow, numpy, requests) plus what the benchmark worker
# imports from this repo (vlmfo1: tokenizers, tqdm, scipy-openblas32 for the C extension; psutil), with their
# dependencies pinned as well. Running it again on an existing VENV_DIR only re-checks.
# PYTHON=... picks the interpreter (default python3.11; the worker also imports the repo's C extension, so use the
# Python version it was built for).
set -euo pipefail

if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV=$1
PY=${PYTHON:-python3.11}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
# dependencies of the packages below, at the reference venv's versions
cat > "$CONSTRAINTS" <<'EOF'
certifi==2026.10.19.post1
charset-normalizer==3.5.3
filelock==4.3.1
fsspec==2026.9.0
hf-xet==1.8.0
idna==3.20
Jinja2==3.1.6
MarkupSafe==3.0.4
mpmath==1.3.0
networkx==3.6.1
packaging==26.4
PyYAML==6.0.4
regex==2026.11.19
requests==2.34.2
sympy==1.14.0
typing_extensions==4.16.0
urllib3==2.8.0
EOF

"$VENV/bin/python" -m pip install -c "$CONSTRAINTS" \
    torch==2.14.1 torchvision==0.29.1 \
    transformers==4.50.1 tokenizers==0.21.4 huggingface_hub==0.36.2 safetensors==0.8.0 \
    accelerate==1.15.0 timm==1.0.9 einops==0.8.2 \
    numpy==2.4.6 pillow==13.0.0 requests==2.34.2 \
    tqdm==4.70.1 scipy-openblas32==0.3.34.481.3 psutil==7.2.2

# the point of this venv: torchvision's compiled RoIAlign runs on CPU tensors
"$VENV/bin/python" - <<'EOF'
import torch, torchvision, transformers
from torchvision.ops import roi_align
x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
rois = torch.tensor([[0, 0.5, 1.0, 6.5, 7.0], [1, 2.0, 2.0, 5.0, 4.0]])
y = roi_align(x, rois, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=-1, aligned=False)
assert y.shape == (2, 3, 2, 2) and torch.isfinite(y).all()
print(f"ok: torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}:"
      f" torchvision.ops.roi_align runs on CPU tensors")
EOF
