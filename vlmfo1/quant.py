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

Where the int8 kernel is AVX512-VNNI, each int8 matrix with k a multiple of 4 is then packed (core.pack_i8) into
the panel layout that kernel streams, [ceil(n / 32)][k / 4][32][4], so no matmul repacks its weight (csrc/gemm.h);
the bytes are the same codes, the results bitwise the same. On other CPUs the matrices stay [n][k] (the AVX2 and
portable kernels read rows; they unpack a packed matrix a panel at a time if handed one).

A quantize call may be cached on disk (vlmfo1.weight_cache; `cache=` an Origin naming where each matrix comes
from): a later load with the same source files maps the stored arrays instead of quantizing, bit for bit the same.
A source may then be a weight_cache.Deferred (a converted or transposed copy of checkpoint tensors), made only on a
miss, so a hit reads nothing of the checkpoint.

What the numbers mean: int8 changes the answers (unlike bf16 <-> fp32 compute, which only rounds differently); how
much is measured per stage and end to end by benchmarks/bench_quant.py, not assumed.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import numpy as np

from ._native import core
from .weight_cache import Deferred, Origin, checkpoint_identity, origin, resolve


def packs() -> bool:
    """Whether int8 matrices are packed at load on this CPU: where the int8 kernel is AVX512-VNNI (under a
    VLM_GEMM_ISA cap, what the cap leaves)."""
    return core.gemm_info()["int8_kernel"] == "avx512vnni"


def unpack_i8(q: np.ndarray, n: int) -> np.ndarray:
    """The int8 [n][k] rows of a matrix quantize_linear stored packed (a 4-D [ceil(n / 32)][k / 4][32][4] array; a
    2-D one is returned as it is): for inspection and export, the runtime never unpacks."""
    if q.ndim == 2:
        return q
    p, nq = q.shape[:2]
    return np.ascontiguousarray(q.transpose(0, 2, 1, 3).reshape(p * 32, nq * 4)[:n])


def quantize_linear(tensors: Dict[str, np.ndarray], keys: Iterable[str], n_threads: int,
                    release: Optional[Callable[[np.ndarray], None]] = None,
                    sources: Optional[Dict[str, np.ndarray]] = None, bits: int = 8,
                    cache: Optional[Origin] = None, pack: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """Quantize tensors[key] for each key in place of the dict (returned). sources: key -> the array to quantize
    instead of tensors[key] (e.g. a tied output layer made from the embedding table). A source may be a
    weight_cache.Deferred (made only when quantized). release(array) is called on each source array (a Deferred's
    `reads`) after its quantized copy exists (a Checkpoint's evict). bits: 8 or 4. cache: where the sources live on
    disk (weight_cache.origin): the call's arrays are read from the weight cache when it holds them (the quantizer
    and the sources are not touched) and written to it otherwise. pack: int8 matrices with k a multiple of 4 in the
    packed panel layout (None: where packs() says). A weight holding NaN or inf (or, for 4 bits, with k not a
    multiple of 32) raises ValueError naming it."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    packed = bits == 8 and (packs() if pack is None else bool(pack))
    keys = list(keys)
    srcs = {key: sources[key] if sources and key in sources else tensors[key] for key in keys}
    shapes = {key: tuple(int(d) for d in srcs[key].shape) for key in keys}
    if cache is not None and all(len(s) == 2 for s in shapes.values()):
        cached = cache.load(bits, keys, shapes, packed)
        if cached is not None:
            tensors.update(cached)
            return tensors
    made: Dict[str, np.ndarray] = {}
    for key in keys:
        src = srcs.pop(key)
        a = resolve(src)
        try:
            if bits == 8:
                q, scale, wsum = core.quantize_i8(a, n_threads=n_threads)
            else:
                q, made[key + "_sub"], scale, wsum = core.quantize_i4(a, n_threads=n_threads)
        except ValueError as e:
            raise ValueError(f"{key}: cannot quantize to int{bits}: {e}") from None
        if packed and q.shape[1] % 4 == 0:
            q = core.pack_i8(q, n_threads=n_threads)
        made[key], made[key + "_scale"], made[key + "_wsum"] = q, scale, wsum
        tensors[key] = q            # the dict drops its source as it goes (a converted copy is freed here)
        del a
        if release is not None:
            for r in (src.reads if isinstance(src, Deferred) else (src,)):
                release(r)
    tensors.update(made)
    if cache is not None:
        mapped = cache.store(bits, keys, shapes, made, packed)
        if mapped is not None:      # the same bytes, as shared and reclaimable pages of the cache file
            tensors.update(mapped)
    return tensors


def quantize_matrices(tensors: Dict[str, np.ndarray], n_threads: int,
                      release: Optional[Callable[[np.ndarray], None]] = None,
                      cache: Optional[Origin] = None) -> Dict[str, np.ndarray]:
    """quantize_linear over every 2-D float32 / bf16 array (or Deferred) of `tensors`: in the vision towers (ViT,
    DaViT, HFRE) every matrix is a linear layer or a convolution the core runs as matmuls (1-D arrays: norms,
    biases, depthwise taps, stay float)."""
    keys = [k for k, a in tensors.items() if isinstance(a, (np.ndarray, Deferred)) and a.ndim == 2
            and a.dtype in (np.float32, np.uint16)]
    return quantize_linear(tensors, keys, n_threads, release=release, cache=cache)


def quantize_checkpoint_matrices(tensors: Dict[str, np.ndarray], ckpt, names: Dict[str, str], n_threads: int,
                                 cache_dir=None) -> Dict[str, np.ndarray]:
    """quantize_matrices for a network loaded from a Checkpoint: the sources' pages are evicted after use and the
    call goes through the weight cache in cache_dir (names: core key -> checkpoint tensor name, the sources'
    identity; None = the default folder, False = no cache)."""
    return quantize_matrices(tensors, n_threads, release=getattr(ckpt, "evict", None),
                             cache=origin(cache_dir, checkpoint_identity(ckpt), names))
