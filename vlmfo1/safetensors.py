"""Memory-mapped reading of Hugging Face safetensors checkpoints, single file or sharded.

Tensors come back as read-only NumPy views of the mapped file, so a tensor used in its stored
dtype costs no copy and no resident memory until it is touched. bf16 tensors are returned as
uint16 arrays holding the bf16 bits (NumPy has no bf16 type); the C core consumes them as bf16.
Every structural problem of a file (short file, absurd header length, invalid JSON, unknown dtype,
offsets outside the file, byte size not matching the shape) raises ValueError naming the file.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

# safetensors dtype -> (numpy dtype used to hold the raw data, bytes per element)
_DTYPES = {
    "F32": (np.float32, 4),
    "BF16": (np.uint16, 2),
    "F16": (np.float16, 2),
    "F64": (np.float64, 8),
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}
_MAX_HEADER = 100 * 1024 * 1024


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "begin", "end", "file")

    def __init__(self, name, dtype, shape, begin, end, file):
        self.name, self.dtype, self.shape, self.begin, self.end, self.file = name, dtype, shape, begin, end, file

    def __repr__(self):
        return f"TensorInfo({self.name!r}, {self.dtype}, {self.shape})"


class SafetensorsFile:
    """One .safetensors file: parsed header plus a read-only memory map of the data."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        if size < 8:
            raise ValueError(f"{self.path}: not a safetensors file (only {size} bytes)")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"{self.path}: corrupt or truncated safetensors header (header length {n}, "
                                 f"file size {size})")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start, data_len = 8 + n, size - 8 - n
        self.tensors: Dict[str, TensorInfo] = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
                begin, end = int(begin), int(end)
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: malformed header entry for tensor '{name}'") from None
            if dtype not in _DTYPES:
                raise ValueError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype}")
            if any(s < 0 for s in shape):
                raise ValueError(f"{self.path}: tensor '{name}' has a negative dimension {shape}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]
            if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
                raise ValueError(f"{self.path}: tensor '{name}' ({dtype}, shape {shape}) has data offsets "
                                 f"[{begin}, {end}) inconsistent with its size or the file (truncated file?)")
            self.tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end, self)
        self._mm = None
        if size > data_start:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        np_dtype, item = _DTYPES[info.dtype]
        count = (info.end - info.begin) // item
        if count == 0:
            return np.zeros(info.shape, dtype=np_dtype)
        arr = np.frombuffer(self._mm, dtype=np_dtype, count=count, offset=info.begin).reshape(info.shape)
        if arr.ctypes.data % item:  # misaligned data: the C kernels want natural alignment
            arr = arr.copy()
        return arr


class Checkpoint:
    """All tensors of a checkpoint folder (or a single file): `model.safetensors`, or the shards named
    by `model.safetensors.index.json`."""

    def __init__(self, path: str):
        path = os.fspath(path)
        self.files: Dict[str, SafetensorsFile] = {}
        self.index: Dict[str, TensorInfo] = {}
        if os.path.isfile(path):
            files = [path]
        else:
            idx = os.path.join(path, "model.safetensors.index.json")
            single = os.path.join(path, "model.safetensors")
            if os.path.exists(idx):
                try:
                    with open(idx) as f:
                        wmap = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{idx}: malformed index ({e})") from None
                files = sorted(set(os.path.join(path, v) for v in wmap.values()))
                for fpath in files:
                    if not os.path.exists(fpath):
                        raise FileNotFoundError(f"{idx} names shard {os.path.basename(fpath)}, which is missing")
            elif os.path.exists(single):
                files = [single]
            else:
                found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                if not found:
                    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
                files = [os.path.join(path, f) for f in found]
        for fpath in files:
            sf = SafetensorsFile(fpath)
            self.files[fpath] = sf
            for name, info in sf.tensors.items():
                if name in self.index:
                    raise ValueError(f"tensor '{name}' appears in both {self.index[name].file.path} and {fpath}")
                self.index[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def keys(self) -> Iterator[str]:
        return iter(self.index)

    def info(self, name: str) -> TensorInfo:
        return self.index[name]

    def get(self, name: str) -> np.ndarray:
        if name not in self.index:
            raise KeyError(f"tensor '{name}' is not in the checkpoint")
        return self.index[name].file.get(name)

    def dtypes(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for info in self.index.values():
            out[info.dtype] = out.get(info.dtype, 0) + 1
        return out


def bf16_bits_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even, like torch's .to(torch.bfloat16)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def round_bf16(a: np.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(f32_to_bf16_bits(a))


def as_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 copy/view of a tensor stored as `dtype` (safetensors name)."""
    if dtype == "BF16":
        return bf16_bits_to_f32(a)
    return np.ascontiguousarray(a, dtype=np.float32)


WEIGHT_DTYPES = ("F32", "BF16", "F16")


def check_tensors(ckpt: "Checkpoint", want: Dict[str, Tuple[str, tuple]], what: str, is_own) -> None:
    """Check the tensors a network needs. want: core key -> (checkpoint name, shape). Raises KeyError for missing
    tensors, ValueError for tensors `is_own(name)` claims for the network but `want` does not name (another
    architecture or config), for shapes that differ and for dtypes other than F32, BF16 and F16. `what` names the
    network in the messages ("decoder", "vision", "DaViT")."""
    missing = [n for n, _ in want.values() if n not in ckpt]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise KeyError(f"checkpoint is missing {what} tensors: " + ", ".join(missing[:10]) + more)
    names = {n for n, _ in want.values()}
    unexpected = [k for k in ckpt.keys() if k not in names and is_own(k)]
    if unexpected:
        raise ValueError(f"checkpoint has unexpected {what} tensors (another architecture or config?): "
                         + ", ".join(sorted(unexpected)[:10]))
    bad = [f"{n}: shape {tuple(ckpt.info(n).shape)}, expected {tuple(shp)}" for n, shp in want.values()
           if tuple(ckpt.info(n).shape) != tuple(shp)]
    if bad:
        raise ValueError(f"{what} tensor shapes do not match config.json: " + "; ".join(bad[:10]))
    kinds = {ckpt.info(n).dtype for n, _ in want.values()} - set(WEIGHT_DTYPES)
    if kinds:
        raise ValueError(f"unsupported {what} weight dtype(s) {sorted(kinds)}: expected F32, BF16 or F16")


def weight(ckpt: "Checkpoint", name: str, dtype: Optional[str], vector: bool = False) -> np.ndarray:
    """One tensor under the engine's dtype policy. Vectors (norms, biases) and dtype="float32" give float32;
    dtype="bfloat16" gives bf16 bits (uint16); dtype=None keeps the stored BF16 or F32 (F16 is widened to F32).
    Nothing is copied when nothing changes (the array stays a view of the memory-mapped file)."""
    sd = ckpt.info(name).dtype
    if sd not in WEIGHT_DTYPES:
        raise ValueError(f"tensor '{name}' has unsupported dtype {sd} (expected F32, BF16 or F16)")
    a = ckpt.get(name)
    if vector or dtype == "float32" or (sd == "F16" and dtype is None):
        return as_float32(a, sd)
    if dtype == "bfloat16" and sd != "BF16":
        return f32_to_bf16_bits(as_float32(a, sd))
    return a


def stored_kind(arrays: Dict[str, np.ndarray]) -> str:
    """"bf16" if any weight is held as bf16 bits, else "f32"."""
    return "bf16" if any(a.dtype == np.uint16 for a in arrays.values()) else "f32"


def write_streaming(path: str, entries, metadata: Dict[str, str] | None = None):
    """Write a safetensors file whose tensors are produced one at a time: entries is a list of
    (name, dtype name, shape, make) where make() returns the array holding the raw data."""
    header, off = {}, 0
    for name, dt, shape, _ in entries:
        n = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dt][1]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, dt, shape, make in entries:
            a = make()
            if tuple(a.shape) != tuple(shape):
                raise ValueError(f"{name}: produced shape {a.shape}, declared {tuple(shape)}")
            f.write(np.ascontiguousarray(a).tobytes())


def write_sharded(path: str, entries, shard_bytes: int, metadata: Dict[str, str] | None = None,
                  always_index: bool = False) -> None:
    """Write a checkpoint folder's weights from (name, dtype name, shape, make) entries, as Hugging Face does:
    one model.safetensors, or model-0000i-of-0000n.safetensors shards of at most shard_bytes (a tensor larger than
    that gets a shard of its own) plus model.safetensors.index.json (always written with always_index)."""
    nbytes = lambda e: int(np.prod(e[2], dtype=np.int64)) * _DTYPES[e[1]][1]  # noqa: E731
    shards, cur, cur_bytes = [], [], 0
    for e in entries:
        if cur and cur_bytes + nbytes(e) > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(e)
        cur_bytes += nbytes(e)
    shards.append(cur)
    if len(shards) == 1 and not always_index:
        write_streaming(os.path.join(path, "model.safetensors"), shards[0], metadata)
        return
    wmap = {}
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_streaming(os.path.join(path, fname), sh, metadata)
        wmap.update((e[0], fname) for e in sh)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(nbytes(e) for e in entries)}, "weight_map": wmap}, f, indent=2)


def save_file(tensors: Dict[str, Tuple[str, np.ndarray]], path: str, metadata: Dict[str, str] | None = None):
    """Write a safetensors file. tensors: name -> (dtype name, array holding the raw data)."""
    write_streaming(path, [(n, dt, a.shape, (lambda a=a: a)) for n, (dt, a) in tensors.items()], metadata)
