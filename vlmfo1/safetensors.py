"""Memory-mapped reading of Hugging Face safetensors checkpoints, single file or sharded, for files downloaded
from anywhere: every file is validated as strictly as the `safetensors` library does before anything is mapped.

Tensors come back as read-only NumPy views of the mapped file, so a tensor used in its stored dtype costs no copy
and no resident memory until it is touched. bf16 tensors are returned as uint16 arrays holding the bf16 bits (NumPy
has no bf16 type), fp8 tensors as uint8 arrays holding the bits; the C core consumes bf16 bits directly.

Validation (`read_header`): header length within the file and at most 100,000,000 bytes, UTF-8 JSON nested at most
a few levels deep (checked before parsing, so hostile nesting cannot exhaust the stack), no duplicate keys, an object
of tensor name -> {"dtype": known name, "shape": [non-negative ints], "data_offsets": [begin, end] ints} with an
optional "__metadata__" object of str -> str, end - begin == dtype size x elements, and offsets that tile the data
section exactly (sorted, no gap, no overlap, no trailing bytes). Shapes NumPy cannot hold (more than its 64
dimensions, or more than 2**63 - 1 bytes counting the non-zero dimensions, as NumPy counts even an empty array) are
refused although the library takes them, and so is a key twice in the header (the library keeps the last of two
well-formed entries of one tensor name, and the last value of a metadata key): such a header reads differently in
different JSON parsers.
`model.safetensors.index.json` must map tensor names to plain shard file names inside the folder. Every violation
raises SafetensorsError (a ValueError) naming the file, the tensor and what was expected; a missing shard raises
FileNotFoundError.

No object here references its owner, so a checkpoint's mappings and file descriptors are released by reference
counting alone as soon as the last array viewing them goes; Checkpoint.close() releases what no array still uses,
and a Checkpoint that fails to open releases everything it opened before raising.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .jsonsafe import nesting_depth

# safetensors dtype -> (numpy dtype used to hold the raw data, bytes per element)
_DTYPES = {
    "F32": (np.float32, 4),
    "BF16": (np.uint16, 2),
    "F16": (np.float16, 2),
    "F64": (np.float64, 8),
    "C64": (np.complex64, 8),
    "I64": (np.int64, 8),
    "U64": (np.uint64, 8),
    "I32": (np.int32, 4),
    "U32": (np.uint32, 4),
    "I16": (np.int16, 2),
    "U16": (np.uint16, 2),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
    "F8_E5M2": (np.uint8, 1),
    "F8_E4M3": (np.uint8, 1),
    "F8_E8M0": (np.uint8, 1),
    "F8_E4M3FNUZ": (np.uint8, 1),
    "F8_E5M2FNUZ": (np.uint8, 1),
}
# dtypes the format knows whose elements are not whole bytes: bits per element (validated, never returned as arrays)
_SUBBYTE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_MAX_HEADER = 100_000_000       # bytes, the `safetensors` library's limit
_MAX_INDEX = 100_000_000        # bytes of model.safetensors.index.json
_MAX_HEADER_DEPTH = 64          # a valid header nests 3 deep ({name: {"shape": [...]}}); the library allows 128
_MAX_INDEX_DEPTH = 64           # the index's "metadata" is free-form
_MAX_NBYTES = 2**63 - 1         # NumPy's limit for one array: elements (zero dimensions skipped) x item size


def _numpy_max_dims() -> int:
    """NumPy's limit on an array's number of dimensions (64 since NumPy 2.0, 32 before)."""
    for n in (64, 32):
        try:
            np.empty((1,) * n, np.uint8)
            return n
        except ValueError:
            continue
    return 32


_MAX_DIMS = _numpy_max_dims()
_INDEX_NAME = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    """A safetensors file or checkpoint index that breaks the format. The message names the file, the tensor (when
    one is at fault) and what was expected."""


class _DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _kind(v) -> str:
    """How a JSON value reads in a message."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({json.dumps(v)})"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    if isinstance(v, str):
        return f"a string ({v[:40]!r})"
    return "a list" if isinstance(v, list) else "an object" if isinstance(v, dict) else type(v).__name__




_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_text(obj, where: str) -> None:
    """Every key and string in a parsed JSON value is valid Unicode (no lone surrogate from a "\\udXXX" escape; the
    safetensors library refuses those)."""
    stack = [obj]
    while stack:
        v = stack.pop()
        items = list(v.items()) if isinstance(v, dict) else [(None, x) for x in v] if isinstance(v, list) else []
        for k, x in items:
            for t in (k, x):
                if isinstance(t, str):
                    try:
                        t.encode("utf-8")
                    except UnicodeEncodeError:
                        raise SafetensorsError(f"{where} holds a lone UTF-16 surrogate escape in {t[:40]!r}, which "
                                               f"is not Unicode text") from None
            if isinstance(x, (dict, list)):
                stack.append(x)


def _load_json(raw: bytes, where: str, max_depth: int):
    """Parse a JSON text safely: UTF-8, nesting at most max_depth (checked before parsing), no duplicate keys, no
    NaN/Infinity. Raises SafetensorsError starting with `where`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{where} is not UTF-8 text ({e})") from None
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise SafetensorsError(f"{where} nests JSON {depth} levels deep, more than the {max_depth} allowed "
                               f"(corrupt or hostile file)")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        if _SURROGATE_ESCAPE.search(raw):   # "\ud800" escapes parse to strings that are not Unicode text
            _check_text(obj, where)
        return obj
    except _DuplicateKey as e:
        raise SafetensorsError(f"{where} has the key {e.key!r} twice") from None
    except RecursionError:
        raise SafetensorsError(f"{where} nests JSON too deeply (corrupt or hostile file)") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers beyond Python's digit limit
        raise SafetensorsError(f"{where} is not valid JSON ({e})") from None


class TensorInfo:
    """Where one tensor lives: name, dtype (safetensors name), shape, [begin, end) byte offsets in the file at
    `path`. Holds no reference to the open file."""
    __slots__ = ("name", "dtype", "shape", "begin", "end", "path")

    def __init__(self, name, dtype, shape, begin, end, path):
        self.name, self.dtype, self.shape, self.begin, self.end, self.path = name, dtype, shape, begin, end, path

    def __repr__(self):
        return f"TensorInfo({self.name!r}, {self.dtype}, {self.shape})"


class Header:
    """The validated header of one safetensors file (see read_header)."""
    __slots__ = ("path", "metadata", "tensors", "data_start", "size", "identity")

    def __init__(self, path, metadata, tensors, data_start, size, identity):
        self.path, self.metadata, self.tensors = path, metadata, tensors
        self.data_start, self.size, self.identity = data_start, size, identity


def _entry(path: str, name: str, e, data_len: int) -> Tuple[str, tuple, int, int]:
    """Validate one header entry -> (dtype, shape, begin, end) with offsets relative to the data section."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(e, dict):
        raise SafetensorsError(f"{where}: header entry is {_kind(e)}, expected an object with dtype, shape and "
                               f"data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
    if missing:
        raise SafetensorsError(f"{where}: header entry has no {' / '.join(missing)}")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or (dtype not in _DTYPES and dtype not in _SUBBYTE_BITS):
        shown = dtype if isinstance(dtype, str) else _kind(dtype)
        raise SafetensorsError(f"{where} has unsupported dtype {shown} (expected one of "
                               f"{', '.join(list(_DTYPES) + list(_SUBBYTE_BITS))})")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise SafetensorsError(f"{where}: shape is {json.dumps(shape)[:80]}, expected a list of non-negative "
                               f"integers")
    if len(shape) > _MAX_DIMS:     # the library has no such limit: a deviation NumPy forces (as for sizes below)
        raise SafetensorsError(f"{where}: shape has {len(shape)} dimensions, beyond what a NumPy array can hold "
                               f"(at most {_MAX_DIMS})")
    elements = 1
    for s in shape:
        elements *= s or 1
    item = _DTYPES[dtype][1] if dtype in _DTYPES else 1     # (sub-byte dtypes are never made into arrays)
    if elements * item > _MAX_NBYTES:   # zero dims are skipped: NumPy refuses such a shape even when it is empty
        what = (f"its other dimensions multiply to {elements}" if 0 in shape else f"it has {elements} elements")
        raise SafetensorsError(f"{where}: shape {shape} is beyond what a NumPy array can hold: {what}, x {item} "
                               f"bytes each is more than 2**63 - 1 bytes")
    elements = 0 if 0 in shape else elements
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        raise SafetensorsError(f"{where}: data_offsets is {json.dumps(offsets)[:80]}, expected [begin, end], two "
                               f"non-negative integers")
    begin, end = offsets
    bits = 8 * _DTYPES[dtype][1] if dtype in _DTYPES else _SUBBYTE_BITS[dtype]
    if elements * bits % 8:
        raise SafetensorsError(f"{where}: {elements} {dtype} elements of {bits} bits do not fill whole bytes")
    nbytes = elements * bits // 8
    if end < begin or end - begin != nbytes:
        raise SafetensorsError(f"{where} ({dtype}, shape {shape}) has data_offsets [{begin}, {end}], expected "
                               f"end - begin == {nbytes} bytes")
    if end > data_len:
        raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] run past the end of the data section "
                               f"({data_len} bytes; truncated file?)")
    return dtype, tuple(shape), begin, end


def read_header(path) -> Header:
    """Read and validate the header of one safetensors file (nothing is mapped). Raises SafetensorsError for
    every way the file breaks the format, OSError when it cannot be read."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        if size < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes; the format starts with an "
                                   f"8-byte header length)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER:
            raise SafetensorsError(f"{path}: corrupt safetensors header length {n} (at most {_MAX_HEADER} bytes "
                                   f"allowed; not a safetensors file?)")
        if n > size - 8:
            raise SafetensorsError(f"{path}: safetensors header length {n} runs past the end of the file "
                                   f"({size} bytes; truncated or corrupt file)")
        raw = f.read(n)
    if len(raw) != n:
        raise SafetensorsError(f"{path}: file shrank while its header was read (truncated?)")
    header = _load_json(raw, f"{path}: safetensors header", _MAX_HEADER_DEPTH)
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: safetensors header is {_kind(header)}, expected a JSON object of tensor "
                               f"name -> {{dtype, shape, data_offsets}}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ is {_kind(metadata)}"
                               f"{' with non-string values' if isinstance(metadata, dict) else ''}, expected an "
                               f"object of string -> string")
    data_start, data_len = 8 + n, size - 8 - n
    entries = {name: _entry(path, name, e, data_len) for name, e in header.items()}
    # the tensors must tile the data section exactly, as the safetensors library requires
    pos, prev = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            raise SafetensorsError(f"{path}: tensor '{name}' data_offsets [{begin}, {end}] overlap tensor '{prev}' "
                                   f"(which ends at {pos}); tensors must not share bytes")
        if begin > pos:
            raise SafetensorsError(f"{path}: tensor '{name}' starts at data offset {begin}, expected {pos}: bytes "
                                   f"[{pos}, {begin}) belong to no tensor")
        pos, prev = end, name
    if pos != data_len:
        raise SafetensorsError(f"{path}: the tensors cover {pos} bytes but the data section after the {n}-byte "
                               f"header is {data_len} bytes (wrong header length or trailing bytes)")
    tensors = {name: TensorInfo(name, dt, shape, data_start + b, data_start + e, path)
               for name, (dt, shape, b, e) in entries.items()}
    return Header(path, metadata, tensors, data_start, size, (st.st_dev, st.st_ino, size))


class SafetensorsFile:
    """One .safetensors file: validated header plus a read-only memory map of the data (none when it has no data).
    The mapping lives as long as this object or any array returned by get(); close() drops this object's hold."""

    def __init__(self, path, header: Optional[Header] = None):
        self.path = os.fspath(path)
        self.realpath = os.path.realpath(self.path)
        self._mm = None
        h = header if header is not None else read_header(self.path)
        self.metadata: Dict[str, str] = h.metadata
        self.tensors: Dict[str, TensorInfo] = h.tensors
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino, st.st_size) != h.identity:
                raise SafetensorsError(f"{self.path}: file changed since its header was read "
                                       f"({h.identity[2]} -> {st.st_size} bytes)")
            if h.size > h.data_start:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.stat: os.stat_result = st   # the file as mapped (size, mtime, inode: the weight cache's key)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap the file now if no array returned by get() still views it; otherwise the mapping goes with the last
        such array. get() raises after close(). Idempotent."""
        self._closed = True
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # arrays still view it: they keep it alive, the last one unmaps it
                pass

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(f"tensor '{name}' is not in {self.path}")
        if self._closed:
            raise ValueError(f"{self.path} was closed")
        info = self.tensors[name]
        if info.dtype in _SUBBYTE_BITS:
            raise SafetensorsError(f"{self.path}: tensor '{name}' has dtype {info.dtype} ({_SUBBYTE_BITS[info.dtype]}"
                                   f" bits per element), which vlmfo1 does not unpack")
        np_dtype, item = _DTYPES[info.dtype]
        count = (info.end - info.begin) // item
        if count == 0:
            return np.zeros(info.shape, dtype=np_dtype)
        arr = np.frombuffer(self._mm, dtype=np_dtype, count=count, offset=info.begin).reshape(info.shape)
        if arr.ctypes.data % item:  # misaligned data: the C kernels want natural alignment
            arr = arr.copy()
        return arr


def _plain_file_name(s: str) -> bool:
    return bool(s) and s not in (".", "..") and not any(c in s for c in "/\\\0") and \
        os.path.basename(s) == s and not os.path.isabs(s) and not os.path.splitdrive(s)[0]


def read_index(path) -> List[str]:
    """The shard files (full paths, sorted) named by a model.safetensors.index.json, validated: a JSON object whose
    "weight_map" is a non-empty object of tensor name -> plain file name in the index's folder. Raises
    SafetensorsError for a malformed index, FileNotFoundError naming the missing shards."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    size = os.path.getsize(path)
    if size > _MAX_INDEX:
        raise SafetensorsError(f"{path}: index is {size} bytes, more than the {_MAX_INDEX} allowed")
    with open(path, "rb") as f:
        raw = f.read(_MAX_INDEX + 1)
    idx = _load_json(raw, f"{path}: checkpoint index", _MAX_INDEX_DEPTH)
    if not isinstance(idx, dict):
        raise SafetensorsError(f"{path}: checkpoint index is {_kind(idx)}, expected a JSON object with a weight_map")
    if "weight_map" not in idx:
        raise SafetensorsError(f"{path}: checkpoint index has no weight_map (tensor name -> shard file)")
    wmap = idx["weight_map"]
    if not isinstance(wmap, dict):
        raise SafetensorsError(f"{path}: weight_map is {_kind(wmap)}, expected an object of tensor name -> shard "
                               f"file name")
    if not wmap:
        raise SafetensorsError(f"{path}: weight_map is empty (no tensors, no shards)")
    for name, shard in wmap.items():
        if not isinstance(shard, str):
            raise SafetensorsError(f"{path}: weight_map gives tensor '{name}' the shard {_kind(shard)}, expected a "
                                   f"file name")
        if not _plain_file_name(shard):
            raise SafetensorsError(f"{path}: weight_map puts tensor '{name}' in {shard!r}, which is not a plain file "
                                   f"name in the checkpoint folder")
    shards = sorted(set(wmap.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{path} names shard{'s' if len(missing) > 1 else ''} {', '.join(missing[:5])}{more}, "
                                f"missing from {folder or '.'}")
    return [os.path.join(folder, s) for s in shards]


class Checkpoint:
    """All tensors of a checkpoint folder (or a single file): `model.safetensors`, or the shards named
    by `model.safetensors.index.json`. Every file's header is validated before any file is mapped; a failure
    releases everything opened so far. close() (or `with Checkpoint(path) as ck:`) releases the mappings that no
    array still views."""

    def __init__(self, path):
        path = os.fspath(path)
        self.path = path
        self.files: Dict[str, SafetensorsFile] = {}
        self.index: Dict[str, TensorInfo] = {}
        if os.path.isfile(path):
            files = [path]
        else:
            idx = os.path.join(path, _INDEX_NAME)
            single = os.path.join(path, "model.safetensors")
            if os.path.exists(idx):
                files = read_index(idx)
            elif os.path.exists(single):
                files = [single]
            else:
                found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                if not found:
                    raise FileNotFoundError(f"no model.safetensors or {_INDEX_NAME} in {path}")
                files = [os.path.join(path, f) for f in found]
        headers = [read_header(f) for f in files]  # validate everything before mapping anything
        for h in headers:
            for name, info in h.tensors.items():
                if name in self.index:
                    raise SafetensorsError(f"tensor '{name}' appears in both {self.index[name].path} and {h.path}")
                self.index[name] = info
        try:
            for h in headers:
                self.files[h.path] = SafetensorsFile(h.path, h)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release every file's mapping that no array returned by get() still views (those go with the last such
        array). The checkpoint cannot be read after."""
        for sf in self.files.values():
            sf.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def keys(self) -> Iterator[str]:
        return iter(self.index)

    def info(self, name: str) -> TensorInfo:
        return self.index[name]

    def get(self, name: str) -> np.ndarray:
        if name not in self.index:
            raise KeyError(f"tensor '{name}' is not in the checkpoint")
        return self.files[self.index[name].path].get(name)

    def evict(self, arr: np.ndarray) -> None:
        """Drop the pages of `arr` (an array get() returned: a view of one file's mapping) from this process's
        memory: the mapping stays valid and reading the array again faults the pages back in from the file. For
        weights converted at load (int8), so that their source does not stay resident beside the copy. Arrays
        that are not views of a mapping (copies, converted arrays) are ignored."""
        base = arr.ctypes.data
        for sf in self.files.values():
            mm = sf._mm
            if mm is None or sf.closed:
                continue
            start = np.frombuffer(mm, dtype=np.uint8, count=0).ctypes.data if len(mm) else 0
            if start <= base < start + len(mm):
                page = mmap.PAGESIZE
                lo = -(-(base - start) // page) * page                   # whole pages inside the array only
                hi = (base - start + arr.nbytes) // page * page
                if hi > lo and hasattr(mm, "madvise"):
                    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                return

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
        raise KeyError(f"checkpoint {getattr(ckpt, 'path', '')} is missing {what} tensors (does config.json match "
                       f"the weights?): " + ", ".join(missing[:10]) + more)
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
    if dtype == "int8":   # loaded as stored; vlmfo1.quant makes the int8 copy
        dtype = None
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


def write_streaming(path: str, entries, metadata: Dict[str, str] | None = None, align: int = 8,
                    fsync: bool = False):
    """Write a safetensors file whose tensors are produced one at a time: entries is a list of
    (name, dtype name, shape, make) where make() returns the array holding the raw data. The header is padded with
    spaces so that the data section starts at a multiple of `align` bytes (8, as the safetensors library does, or a
    multiple of 8); fsync=True flushes the file to disk before returning (for a write then rename that must not
    leave a file of the final name with missing data after a crash)."""
    if align < 8 or align % 8:
        raise ValueError(f"align must be a positive multiple of 8, got {align}")
    header, off = {}, 0
    for name, dt, shape, _ in entries:
        n = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dt][1]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-(8 + len(h)) % align)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, dt, shape, make in entries:
            a = make()
            if tuple(a.shape) != tuple(shape):
                raise ValueError(f"{name}: produced shape {a.shape}, declared {tuple(shape)}")
            a = np.ascontiguousarray(a)
            if a.size:
                f.write(a.reshape(-1).view(np.uint8).data)   # the array's bytes, without a copy
        if fsync:
            f.flush()
            os.fsync(f.fileno())


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
