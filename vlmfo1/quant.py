"""int8 and int4 weights at load: quantization of a network's linear layers.

    tensors = quantize_linear(tensors, ["layers.0.q", ...], n_threads, release=ckpt.evict)          # int8
    tensors = quantize_linear(tensors, ["layers.0.q", ...], n_threads, release=ckpt.evict, bits=4)  # int4

Each named 2-D weight W[n][k] (fp32 or bf16 bits) is replaced by q (int8 [n][k]) plus `<name>_scale` (float32 [n]:
W[j] ~ scale[j] * q[j]) and `<name>_wsum` (float32 [n]: the exact integer sum of q[j]), the three arrays the C core
binds as one int8 weight (csrc/gemm.h, gemm_i8.c: activations are quantized per token on the fly and the dot
products are exact integer sums). With bits=4 (k a multiple of 32) W[n][k] becomes 4-bit codes (uint8 [n][k/2]) plus
`<name>_sub` (uint8: one 4-bit scale per block of 32), `<name>_scale` and `<name>_wsum`: block b of row j holds the
integers (code - 8) * m_b, so W[j] ~ scale[j] * those integers and the same exact integer kernels run on them (4.125
bits per weight; the layout is in csrc/gemm.h). The quantization runs in C on a pool (about a second per billion weights on two
cores); the source pages of a memory-mapped checkpoint are dropped from the process after each weight, so the peak
is the int8 copy plus one source weight, not both whole models.

What the numbers mean: int8 changes the answers (unlike bf16 <-> fp32 compute, which only rounds differently); how
much is measured per stage and end to end by benchmarks/bench_quant.py, not assumed.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import numpy as np

from ._native import core


def quantize_linear(tensors: Dict[str, np.ndarray], keys: Iterable[str], n_threads: int,
                    release: Optional[Callable[[np.ndarray], None]] = None,
                    sources: Optional[Dict[str, np.ndarray]] = None, bits: int = 8) -> Dict[str, np.ndarray]:
    """Quantize tensors[key] for each key in place of the dict (returned). sources: key -> the array to quantize
    instead of tensors[key] (e.g. a tied output layer made from the embedding table). release(array) is called on
    each source array after its quantized copy exists (a Checkpoint's evict). bits: 8 or 4. A weight holding NaN or
    inf (or, for 4 bits, with k not a multiple of 32) raises ValueError naming it."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    for key in keys:
        src = sources[key] if sources and key in sources else tensors[key]
        try:
            if bits == 8:
                q, scale, wsum = core.quantize_i8(src, n_threads=n_threads)
            else:
                q, tensors[key + "_sub"], scale, wsum = core.quantize_i4(src, n_threads=n_threads)
        except ValueError as e:
            raise ValueError(f"{key}: cannot quantize to int{bits}: {e}") from None
        tensors[key], tensors[key + "_scale"], tensors[key + "_wsum"] = q, scale, wsum
        if release is not None:
            release(src)
    return tensors


def quantize_matrices(tensors: Dict[str, np.ndarray], n_threads: int,
                      release: Optional[Callable[[np.ndarray], None]] = None) -> Dict[str, np.ndarray]:
    """quantize_linear over every 2-D float32 / bf16 array of `tensors`: in the vision towers (ViT, DaViT, HFRE)
    every matrix is a linear layer or a convolution the core runs as matmuls (1-D arrays: norms, biases,
    depthwise taps, stay float)."""
    keys = [k for k, a in tensors.items() if isinstance(a, np.ndarray) and a.ndim == 2
            and a.dtype in (np.float32, np.uint16)]
    return quantize_linear(tensors, keys, n_threads, release=release)
