"""Read PyTorch checkpoints (`torch.save` files, such as the UPN detector's upn_large.pth) without torch and without
running any code from the file: tensors come back as NumPy arrays, the rest as plain Python data.

    load(path, *, max_bytes=MAX_BYTES, allow_placeholders=False) -> object
        what torch.save wrote, tensors (and bare storages) as read-only NumPy arrays
    load_state_dict(path, key="model", *, max_bytes=MAX_BYTES, allow_placeholders=False) -> dict[str, np.ndarray]
        checkpoint[key] (key=None: the whole checkpoint) as name -> array, a leading "module." cut from every name
        (as the reference's clean_state_dict does); an error if the entry is missing or not a mapping name -> tensor
    TorchCheckpointError (a ValueError): every refusal and malformation, naming the file
    Placeholder: what allow_placeholders=True reads a disallowed object as
    MAX_BYTES = 64 GiB: the default bound on the pickle, on all storages together, and on any one tensor

`torch.load` unpickles the file, and a pickle from the internet can run anything (`os.system` is two opcodes away).
This reader runs the file's pickle on Python's own pure-Python unpickler with a dispatch table of its own
(vlmfo1.pickle_opcodes), so what the pickle can reach is an explicit allow-list:

  * globals (GLOBAL, STACK_GLOBAL): torch._utils._rebuild_tensor / _rebuild_tensor_v2 / _rebuild_tensor_v3 /
    _rebuild_parameter / _rebuild_parameter_with_state, torch._tensor._rebuild_from_type_v2 (for torch.Tensor and
    torch.nn.parameter.Parameter, attributes dropped), collections.OrderedDict, torch.Size, what protocol 2 needs
    for plain bytes and sets (_codecs.encode of latin1 text, builtins.bytes(), builtins.set / frozenset of a list,
    also under their Python 2 name __builtin__), the storage classes
    torch.{Float,Double,Half,BFloat16,ComplexFloat,ComplexDouble,Long,Int,Short,Char,Byte,Bool}Storage and
    torch.UntypedStorage / torch.storage.UntypedStorage, and the dtypes torch.float32 ... (which read as the strings
    "torch.float32" ...). Each maps to a function or an inert name of this module; nothing is imported or looked up,
    and nothing the file names is ever called. Every other global is refused with a TorchCheckpointError naming the
    file and the global (argparse.Namespace, numpy.core.multiarray._reconstruct, os.system, builtins.eval ...);
  * calls (REDUCE) go to this module's functions only; NEWOBJ / NEWOBJ_EX, BUILD, APPEND(S), SETITEM(S) and
    ADDITEMS act on this module's own objects and on list / dict / OrderedDict / set only (BUILD on an OrderedDict
    may set plain attributes, such as a state dict's `_metadata`); INST, OBJ, EXT1/2/4 (which resolve a global through
    copyreg's extension cache without `find_class`) and the out-of-band buffer opcodes are refused before they run;
  * persistent ids must be storage references: ('storage', storage class, key, location, numel) in the zip format,
    with a sixth item (None or a (view key, offset, size) view) in the legacy one. `location` ("cpu", "cuda:0" ...) is
    ignored: everything is read to the CPU.

A pickle cannot be skipped in parts, so by default one disallowed global anywhere refuses the whole file, even if it
sits in an entry the caller does not need (e.g. {"model": ..., "args": argparse.Namespace(...)}).
`allow_placeholders=True` reads such files anyway: every disallowed global becomes an inert `Placeholder` that
records its name, and calling it (REDUCE, NEWOBJ) or setting its state (BUILD, APPENDS, SETITEMS) records the
arguments in a new Placeholder; no class or function named by the file is imported, looked up or called.

Formats: the zip format of torch >= 1.6 (`<top>/data.pkl`, storages in `<top>/data/<key>`, `<top>/byteorder`,
`<top>/version`; the top folder's name is free) and the legacy format of torch < 1.6 (and of
`_use_new_zipfile_serialization=False`: the magic number, protocol 1001 and sys_info pickles, the main pickle, the
storage keys, then each storage as an 8-byte element count and its bytes; the storages follow the pickle, so it runs
twice: once to learn each storage's dtype and size, once to build the arrays). The tar format of the earliest
versions and big-endian files are refused with a message; tensors that are not plain strided tensors (sparse, quantized,
nested, meta, subclasses) need globals outside the allow-list, so they are refused as any other such global is (or
read as Placeholders).

Tensors: arrays with the tensor's dtype, shape and strides (a saved transposed view stays a strided view), sharing
memory where the tensors shared a storage. bf16 tensors come back as uint16 arrays holding the bf16 bits (as in
vlmfo1.safetensors), fp8 tensors as uint8 arrays holding the bits; conj / neg bits are applied (a copy). Arrays are
read-only. In the zip format, uncompressed storages (torch writes them stored, 64-byte aligned) are memory-mapped:
no copy, and the mapping goes with the last array viewing it; compressed ones are read (CRC checked), misaligned
ones copied (in the legacy format, where storages follow 8-byte counts, most are). The CRC of a mapped storage is not
checked (corruption changes values, never what runs). The pickle runs on the pure-Python unpickler: about 70 us per
tensor, as fast as torch.load(weights_only=True) (20,000 tensors in 1.4 s).

Validated: the zip directory (no duplicate names, no encryption, stored or deflated entries only, a stored entry's
data inside the file after a local header naming it, deflated sizes within deflate's 1032:1 limit, exactly one
`<top>/data.pkl`), byteorder "little", storage keys plain names with a `data/<key>` entry of exactly numel x item
size bytes (legacy: an element count equal to numel, the data inside the file, every key declared and stored once),
one dtype and size per storage key, sizes / strides / offsets non-negative ints with len(size) == len(stride), every
view inside its storage (offset + the last element it reaches < numel), and at most `max_bytes` of pickle, of storages
(together) and of any one tensor. Every violation raises TorchCheckpointError (a ValueError) naming the file.

    from vlmfo1.torch_checkpoint import load, load_state_dict
    sd = load_state_dict("upn_large.pth")                   # {"model": {...}} -> {name: np.ndarray}, "module." cut
    ck = load("upn_large.pth", allow_placeholders=True)      # everything; ck["args"] is a Placeholder
"""
from __future__ import annotations

import io
import math
import mmap
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional

import numpy as np

from .pickle_opcodes import PLAIN_OPCODES, Refused, dispatch_table
from .safetensors import _MAX_DIMS, _MAX_NBYTES

__all__ = ["load", "load_state_dict", "TorchCheckpointError", "Placeholder", "MAX_BYTES"]

MAX_BYTES = 1 << 36             # 64 GiB: pickle, storages (together), any one tensor
_MAX_PICKLE = 1 << 30           # data.pkl of a large state dict with optimizer state is a few MB
_MAX_SMALL = 64                 # byteorder / version entries
_MAX_RATIO = 1100               # deflate expands at most 1032:1
_KEY = re.compile(r"[A-Za-z0-9_]{1,100}\Z")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little") + b"."    # pickle.dumps(magic, 2)
_LEGACY_PROTOCOL = 1001
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")   # zip local file header: ..., name length, extra length

# torch dtype name -> NumPy dtype holding it (bf16 and fp8 as their bits)
_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16,
    "complex64": np.complex64, "complex128": np.complex128,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
    "uint64": np.uint64, "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8, "bool": np.bool_,
    "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8, "float8_e4m3fnuz": np.uint8, "float8_e5m2fnuz": np.uint8,
    "float8_e8m0fnu": np.uint8,
}
_BITS_ONLY = frozenset(d for d in _DTYPES if d == "bfloat16" or d.startswith("float8"))
_UNTYPED = "untyped"            # torch.UntypedStorage: bytes (numel counts bytes)
_STORAGE_CLASSES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128", "LongStorage": "int64",
    "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class TorchCheckpointError(ValueError):
    """A torch.save file this reader refuses or cannot read. The message names the file and what was expected."""


class _Invalid(Exception):
    """A malformed checkpoint (the message is prefixed with the file's name before it reaches the caller)."""


class _Name:
    """A global the pickle may name that stands for data, never code: a storage class (with its dtype), torch.Tensor,
    torch.nn.parameter.Parameter. Not callable."""
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: Optional[str] = None):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Placeholder:
    """Stands for an object of a class this reader does not admit (load(..., allow_placeholders=True)): `name` is the
    global the file named ("argparse.Namespace"); `args` / `kwargs` what the pickle called it with (None: the global
    itself, never called); `state` what BUILD would have set; `items` / `pairs` what APPENDS / SETITEMS would have
    added. Building one never imports, looks up or calls anything; it has no behaviour but its repr."""
    __slots__ = ("name", "args", "kwargs", "state", "items", "pairs")

    def __init__(self, name: str, args: Optional[tuple] = None, kwargs: Optional[dict] = None):
        self.name, self.args, self.kwargs = name, args, kwargs
        self.state: Any = None
        self.items: list = []
        self.pairs: list = []

    def __repr__(self) -> str:
        return f"Placeholder({self.name!r}{'' if self.args is None else ', called'})"


_TENSOR_TYPES = {n: _Name(n) for n in ("torch.Tensor", "torch.nn.parameter.Parameter")}
_DATA_GLOBALS: Dict[str, Any] = {
    **{f"torch.{c}": _Name(f"torch.{c}", d) for c, d in _STORAGE_CLASSES.items()},
    "torch.UntypedStorage": _Name("torch.UntypedStorage", _UNTYPED),
    "torch.storage.UntypedStorage": _Name("torch.storage.UntypedStorage", _UNTYPED),
    **{f"torch.{d}": f"torch.{d}" for d in _DTYPES},
    **_TENSOR_TYPES,
}


def _describe(x: Any) -> str:
    if isinstance(x, (_Name, Placeholder)):
        return x.name
    if isinstance(x, str):
        return repr(x[:60])
    return f"a {type(x).__name__}"


def _short(x: Any, depth: int = 2) -> str:
    """A value from the file in a message, at bounded cost (a pickle can share one tuple into 2**60 paths, and
    repr() of a 5000-digit int raises): scalars and small flat tuples / lists in full, the rest by type."""
    if type(x) in (str, bytes):
        return repr(x[:60])
    if type(x) in (bool, float, type(None)) or (type(x) is int and x.bit_length() < 128):
        return repr(x)
    if type(x) in (tuple, list) and depth and len(x) <= 8:
        inner = ", ".join(_short(v, depth - 1) for v in x)
        return f"({inner}{',' if len(x) == 1 else ''})" if type(x) is tuple else f"[{inner}]"
    return _describe(x)


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(np.uint8 if name == _UNTYPED else _DTYPES[name])


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _array_at(buf, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
    """count elements of dtype at buf[offset:], read-only; copied only if misaligned."""
    if count == 0:
        return _readonly(np.empty(0, dtype))
    a = np.frombuffer(buf, dtype, count=count, offset=offset)
    return _readonly(a.copy()) if a.ctypes.data % dtype.alignment else a


def _ordered_dict(items: Any = None) -> OrderedDict:
    """collections.OrderedDict() (Python 3 pickles), or OrderedDict([[key, value], ...]) (Python 2 ones)."""
    if items is None:
        return OrderedDict()
    if type(items) is not list or not all(type(p) in (list, tuple) and len(p) == 2 for p in items):
        raise _Invalid(f"collections.OrderedDict is called with {_describe(items)}, not a list of (key, value) pairs")
    return OrderedDict((k, v) for k, v in items)


def _size(dims: Any) -> tuple:
    """torch.Size(dims) -> a tuple of ints."""
    if type(dims) not in (tuple, list) or not all(type(d) is int for d in dims):
        raise _Invalid(f"torch.Size is called with {_describe(dims)}, not a tuple of ints")
    return tuple(dims)


def _latin1(text: Any, encoding: Any = None) -> bytes:
    """_codecs.encode(text, "latin1"): how protocol 2 pickles non-empty bytes."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _Invalid(f"_codecs.encode is called with {_describe(text)}, {_describe(encoding)}; only the latin1 "
                       f"text of bytes is read")
    return text.encode("latin-1")


def _empty_bytes() -> bytes:
    """builtins.bytes(): how protocol 2 pickles empty bytes."""
    return b""


def _set_of(cls: type) -> Callable:
    def build(items: Any = ()) -> Any:                      # builtins.set / frozenset(list): protocol 2 sets
        if type(items) not in (list, tuple):
            raise _Invalid(f"{cls.__name__} is called with {_describe(items)}, not a list")
        return cls(items)
    return build


def _dims(x: Any, what: str) -> tuple:
    if type(x) is not tuple or len(x) > _MAX_DIMS or not all(type(v) is int and v >= 0 for v in x):
        raise _Invalid(f"a tensor's {what} is {_short(x)}, expected a tuple of at most {_MAX_DIMS} non-negative ints")
    return x


def _op_reduce(u: "_Unpickler") -> None:
    args = u.stack.pop()
    u.stack[-1] = u.call(u.stack[-1], args, None, "REDUCE")


def _op_newobj(u: "_Unpickler") -> None:
    args = u.stack.pop()
    u.stack[-1] = u.call(u.stack[-1], args, None, "NEWOBJ")


def _op_newobj_ex(u: "_Unpickler") -> None:
    kwargs = u.stack.pop()
    args = u.stack.pop()
    u.stack[-1] = u.call(u.stack[-1], args, kwargs, "NEWOBJ_EX")


def _op_build(u: "_Unpickler") -> None:
    state = u.stack.pop()
    inst = u.stack[-1]
    if isinstance(inst, Placeholder):
        inst.state = state
    elif type(inst) is OrderedDict and type(state) is dict and all(
            type(k) is str and not k.startswith("__") and not hasattr(OrderedDict, k) for k in state):
        vars(inst).update(state)                # a state dict's _metadata
    else:
        raise Refused(f"the pickle sets the state (BUILD) of {_describe(inst)}")


def _list_of(target: Any) -> list:
    if type(target) is list:
        return target
    if isinstance(target, Placeholder):
        return target.items
    raise Refused(f"the pickle appends to {_describe(target)}")


def _op_append(u: "_Unpickler") -> None:
    item = u.stack.pop()
    _list_of(u.stack[-1]).append(item)


def _op_appends(u: "_Unpickler") -> None:
    items = u.pop_mark()
    _list_of(u.stack[-1]).extend(items)


def _set_items(target: Any, items: list) -> None:
    if len(items) % 2:
        raise _Invalid("SETITEMS with an odd number of items")
    pairs = list(zip(items[::2], items[1::2]))
    if type(target) in (dict, OrderedDict):
        for k, v in pairs:
            target[k] = v
    elif isinstance(target, Placeholder):
        target.pairs.extend(pairs)
    else:
        raise Refused(f"the pickle sets items of {_describe(target)}")


def _op_setitem(u: "_Unpickler") -> None:
    value = u.stack.pop()
    key = u.stack.pop()
    _set_items(u.stack[-1], [key, value])


def _op_setitems(u: "_Unpickler") -> None:
    items = u.pop_mark()
    _set_items(u.stack[-1], items)


def _op_additems(u: "_Unpickler") -> None:
    items = u.pop_mark()
    target = u.stack[-1]
    if type(target) is not set:
        raise Refused(f"the pickle adds items to {_describe(target)}")
    target.update(items)


_SET, _FROZENSET = _set_of(set), _set_of(frozenset)
_OPCODES = PLAIN_OPCODES | {"GLOBAL", "STACK_GLOBAL", "PERSID", "BINPERSID", "EMPTY_SET", "FROZENSET"}
_OVERRIDES = {"REDUCE": _op_reduce, "NEWOBJ": _op_newobj, "NEWOBJ_EX": _op_newobj_ex, "BUILD": _op_build,
              "APPEND": _op_append, "APPENDS": _op_appends, "SETITEM": _op_setitem, "SETITEMS": _op_setitems,
              "ADDITEMS": _op_additems}

# (key, numpy dtype, numel) -> the storage as a 1-D array
_StorageReader = Callable[[str, np.dtype, int], np.ndarray]


class _Unpickler(pickle._Unpickler):  # type: ignore[name-defined]  # the pure-Python unpickler
    """One torch.save pickle, on the allow-list of the module docstring. `storage` reads a storage (None: the pickle
    may hold no persistent id); `dry` validates everything but reads no storage (tensors come back as zero-stride
    stand-ins): the legacy format's first pass, which learns every storage's dtype and size."""

    dispatch = dispatch_table(_OPCODES, _OVERRIDES)

    def __init__(self, file, storage: Optional[_StorageReader], *, max_bytes: int, placeholders: bool = False,
                 legacy: bool = False, dry: bool = False):
        super().__init__(file, encoding="utf-8")
        self._read_storage, self._max_bytes, self._placeholders = storage, max_bytes, placeholders
        self._legacy, self._dry = legacy, dry
        self.storages: Dict[str, tuple] = {}     # key -> (array, dtype name)
        self._views: Dict[str, np.ndarray] = {}  # legacy view key -> array
        self._arrays: Dict[int, tuple] = {}      # id(storage array) -> (array, dtype name)
        self._total = 0
        self._tensor_fns = {
            "torch._utils._rebuild_tensor": self._rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter_with_state,
        }
        self._globals = {**_DATA_GLOBALS, **self._tensor_fns,
                         "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
                         "collections.OrderedDict": _ordered_dict, "torch.Size": _size, "_codecs.encode": _latin1}
        for builtins in ("builtins", "__builtin__"):          # (Python 2 names: protocol 2 pickles)
            self._globals.update({f"{builtins}.bytes": _empty_bytes, f"{builtins}.set": _SET,
                                  f"{builtins}.frozenset": _FROZENSET})
        self._calls = {id(f): f for f in self._globals.values() if callable(f)}

    # -- what the pickle may name and call --------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._globals:
            return self._globals[full]
        if self._placeholders:
            return Placeholder(full)
        raise Refused(f"the pickle asks for the global {full[:200]}")

    def call(self, func: Any, args: Any, kwargs: Any, how: str) -> Any:
        if type(args) is not tuple or not (kwargs is None or type(kwargs) is dict):
            raise _Invalid(f"{how} with arguments that are {_describe(args)}, not a tuple")
        if isinstance(func, Placeholder):
            return Placeholder(func.name, args, kwargs or {})
        if self._calls.get(id(func)) is not func:
            raise Refused(f"the pickle calls {_describe(func)}, which is not an admitted function")
        if how != "REDUCE":
            raise Refused(f"the pickle uses {how} on {func.__name__.lstrip('_')}")
        return func(*args)

    def persistent_load(self, pid: Any) -> Any:
        if self._read_storage is None:
            raise Refused("the pickle holds a persistent id")
        n = 6 if self._legacy else 5
        if type(pid) is not tuple or len(pid) != n or pid[0] != "storage":
            raise _Invalid(f"persistent id {_short(pid)} is not ('storage', storage class, key, location, numel"
                           f"{', view' if self._legacy else ''})")
        cls, key, location, numel = pid[1:5]
        if not isinstance(cls, _Name) or cls.dtype is None:
            raise _Invalid(f"persistent id {_short(pid)}: {_describe(cls)} is not a torch storage class")
        if type(key) is not str or not _KEY.match(key):
            raise _Invalid(f"storage key {_short(key)} is not a plain name (letters, digits, _)")
        if type(location) is not str or type(numel) is not int or numel < 0:
            raise _Invalid(f"persistent id {_short(pid)}: expected a location string and a non-negative numel")
        arr = self._storage(key, cls.dtype, numel)
        if self._legacy and pid[5] is not None:
            arr = self._legacy_view(pid[5], arr, cls.dtype)
        return arr

    def _storage(self, key: str, dtype: str, numel: int) -> np.ndarray:
        if key in self.storages:
            arr, seen = self.storages[key]
            if seen != dtype or len(arr) != numel:
                raise _Invalid(f"storage '{key}' is declared as {len(arr)} {seen} and as {numel} {dtype} elements")
            return arr
        dt = _np_dtype(dtype)
        self._total += numel * dt.itemsize
        if self._total > self._max_bytes:
            raise _Invalid(f"the storages add up to more than max_bytes={self._max_bytes} bytes (at storage "
                           f"'{key}': {numel} {dtype} elements)")
        arr = np.broadcast_to(np.zeros((), dt), (numel,)) if self._dry else self._read_storage(key, dt, numel)
        self.storages[key] = (arr, dtype)
        self._arrays[id(arr)] = (arr, dtype)
        return arr

    def _legacy_view(self, view: Any, root: np.ndarray, dtype: str) -> np.ndarray:
        if type(view) is not tuple or len(view) != 3 or type(view[0]) is not str or not _KEY.match(view[0]) \
                or not all(type(v) is int and v >= 0 for v in view[1:]):
            raise _Invalid(f"storage view {_short(view)} is not (plain key, offset, size)")
        key, offset, size = view
        if offset + size > len(root):
            raise _Invalid(f"storage view '{key}' [{offset}, {offset + size}) runs past its storage "
                           f"({len(root)} elements)")
        if key not in self._views:
            self._views[key] = arr = root[offset:offset + size]
            self._arrays[id(arr)] = (arr, dtype)
        return self._views[key]

    # -- the functions the pickle may call --------------------------------------------------------------------
    def _tensor(self, storage: Any, offset: Any, size: Any, stride: Any, metadata: Any = None,
                dtype: Optional[str] = None) -> np.ndarray:
        got = self._arrays.get(id(storage))
        if got is None or got[0] is not storage:
            raise _Invalid(f"a tensor's storage is {_describe(storage)}, not a storage of the checkpoint")
        arr, sdtype = got
        if dtype is None:
            if sdtype == _UNTYPED:
                raise _Invalid("a tensor on an untyped storage names no dtype")
            dtype = sdtype
        elif sdtype == _UNTYPED:                        # _rebuild_tensor_v3: bytes viewed as dtype
            dt = _np_dtype(dtype)
            n = len(arr) // dt.itemsize
            arr = np.broadcast_to(np.zeros((), dt), (n,)) if self._dry else arr[:n * dt.itemsize].view(dt)
            if arr.ctypes.data % dt.alignment:
                arr = _readonly(arr.copy())
        elif sdtype != dtype:
            raise _Invalid(f"a {dtype} tensor on a {sdtype} storage")
        if type(offset) is not int or offset < 0:
            raise _Invalid(f"a tensor's storage offset is {_short(offset)}, expected a non-negative int")
        size, stride = _dims(size, "size"), _dims(stride, "stride")
        if len(size) != len(stride):
            raise _Invalid(f"a tensor's size {size} and stride {stride} differ in length")
        item = arr.dtype.itemsize
        nbytes = math.prod(s for s in size if s) * item
        if nbytes > min(self._max_bytes, _MAX_NBYTES):
            raise _Invalid(f"a tensor of size {size} ({nbytes} bytes) is larger than max_bytes={self._max_bytes}")
        if 0 in size:
            return _readonly(np.empty(size, arr.dtype))
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= len(arr):
            raise _Invalid(f"a tensor view (storage offset {offset}, size {size}, stride {stride}) reaches element "
                           f"{last} of a storage of {len(arr)} elements")
        if self._dry:
            return np.broadcast_to(np.zeros((), arr.dtype), size)
        out = np.lib.stride_tricks.as_strided(arr[offset:], size, tuple(st * item for st in stride), writeable=False)
        return self._apply_metadata(out, dtype, metadata)

    @staticmethod
    def _apply_metadata(out: np.ndarray, dtype: str, metadata: Any) -> np.ndarray:
        if metadata is None or (type(metadata) is dict and not metadata):
            return out
        if type(metadata) is not dict or not set(metadata) <= {"conj", "neg"} or \
                not all(type(v) is bool for v in metadata.values()):
            raise _Invalid(f"tensor metadata {_short(metadata)} is not supported (only the conj and neg bits)")
        if metadata.get("neg"):
            if dtype in _BITS_ONLY or dtype == "bool":
                raise _Invalid(f"a {dtype} tensor with the negative bit set is not supported")
            out = np.negative(out)
        if metadata.get("conj") and out.dtype.kind == "c":
            out = np.conjugate(out)
        return _readonly(out) if out.flags.writeable else out

    @staticmethod
    def _flags(requires_grad: Any, backward_hooks: Any) -> None:
        if type(requires_grad) is not bool or not isinstance(backward_hooks, dict):
            raise _Invalid(f"a tensor's requires_grad / backward_hooks are {_describe(requires_grad)} / "
                           f"{_describe(backward_hooks)}, expected a bool and a dict")

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                           metadata=None):
        self._flags(requires_grad, backward_hooks)
        return self._tensor(storage, storage_offset, size, stride, metadata)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        self._flags(requires_grad, backward_hooks)
        if type(dtype) is not str or not dtype.startswith("torch.") or dtype[6:] not in _DTYPES:
            raise _Invalid(f"a tensor's dtype is {_describe(dtype)}, not a torch dtype this reader knows")
        return self._tensor(storage, storage_offset, size, stride, metadata, dtype[6:])

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        self._flags(requires_grad, backward_hooks)
        if not isinstance(data, np.ndarray):
            raise _Invalid(f"a parameter's data is {_describe(data)}, not a tensor")
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return self._rebuild_parameter(data, requires_grad, backward_hooks)     # (attributes dropped)

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        if not any(func is f for f in self._tensor_fns.values()) \
                or not any(new_type is t for t in _TENSOR_TYPES.values()) or type(args) is not tuple:
            raise _Invalid(f"_rebuild_from_type_v2 of {_describe(new_type)} through {_describe(func)}: only plain "
                           f"tensors and parameters are read")
        return func(*args)                                                      # (attributes dropped)


def _load(u: _Unpickler, where: str) -> Any:
    """Run one pickle; every failure but a refusal becomes _Invalid naming `where`."""
    try:
        return u.load()
    except (Refused, _Invalid):
        raise
    except MemoryError:
        raise _Invalid(f"{where}: a length field asks for more memory than there is") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, TypeError from a bad call, ...: malformed
        raise _Invalid(f"{where} is not a readable torch.save pickle ({type(e).__name__}: {e})") from None


class _Reader:
    """read / readline over a bytes-like object between pos and end: the file pickle._Unpickler reads from."""

    def __init__(self, buf, pos: int, end: int):
        self.buf, self.pos, self.end = buf, pos, end

    def read(self, n: int = -1) -> bytes:
        stop = self.end if n < 0 else min(self.pos + n, self.end)
        out = self.buf[self.pos:stop]
        self.pos = stop
        return out

    def readline(self) -> bytes:
        i = self.buf.find(b"\n", self.pos, self.end)
        return self.read(self.end - self.pos if i < 0 else i + 1 - self.pos)


def _check_entry(info: zipfile.ZipInfo, size: int) -> None:
    if info.flag_bits & 1:
        raise _Invalid(f"zip entry {info.filename} is encrypted")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size or info.header_offset + 30 + info.file_size > size:
            raise _Invalid(f"zip entry {info.filename} declares {info.file_size} bytes that do not fit in the file "
                           f"({size} bytes; truncated?)")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > _MAX_RATIO * info.compress_size + 64:
            raise _Invalid(f"zip entry {info.filename} declares {info.file_size} bytes from {info.compress_size} "
                           f"compressed (beyond deflate's limit: a zip bomb?)")
    else:
        raise _Invalid(f"zip entry {info.filename} uses compression method {info.compress_type} (only stored and "
                       f"deflated entries are read)")


def _data_start(mm, info: zipfile.ZipInfo, size: int) -> int:
    """Where a stored entry's bytes begin: after its local header, which must name the entry."""
    off = info.header_offset
    if off + _LOCAL_HEADER.size > size:
        raise _Invalid(f"zip entry {info.filename}: local header outside the file")
    sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack_from(mm, off)
    raw = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    start = off + _LOCAL_HEADER.size + name_len + extra_len
    if sig != 0x04034B50 or mm[off + _LOCAL_HEADER.size:off + _LOCAL_HEADER.size + name_len] != raw:
        raise _Invalid(f"zip entry {info.filename}: the local header does not name it (corrupt or crafted zip)")
    if start + info.file_size > size:
        raise _Invalid(f"zip entry {info.filename}: its {info.file_size} bytes run past the end of the file "
                       f"({size} bytes; truncated?)")
    return start


def _load_zip(path: str, f, size: int, max_bytes: int, placeholders: bool) -> Any:
    try:
        zf = zipfile.ZipFile(f)
    except zipfile.BadZipFile as e:
        raise _Invalid(f"not a readable zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        by_name: Dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in by_name:
                raise _Invalid(f"the zip archive holds {info.filename} twice")
            by_name[info.filename] = info
            _check_entry(info, size)
        pkls = [n for n in by_name if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise _Invalid("a zip archive without a <folder>/data.pkl: not a torch.save checkpoint" if not pkls else
                           f"a zip archive with several data.pkl ({', '.join(sorted(pkls)[:4])})")
        top = pkls[0][:-len("data.pkl")]

        def small(name: str, cap: int, what: str) -> Optional[bytes]:
            info = by_name.get(top + name)
            if info is None:
                return None
            if info.file_size > cap:
                raise _Invalid(f"{info.filename} is {info.file_size} bytes, more than {what}={cap}")
            return zf.read(info)

        order = small("byteorder", _MAX_SMALL, "the limit")
        if order is not None and order.strip() != b"little":
            raise _Invalid(f"{top}byteorder is {order[:20]!r}: only little-endian checkpoints are read (load and "
                           f"save it again with torch on a little-endian machine)" if order.strip() == b"big" else
                           f"{top}byteorder is {order[:20]!r}, expected 'little'")
        version = small("version", _MAX_SMALL, "the limit")
        if version is not None and not version.strip().isdigit():
            raise _Invalid(f"{top}version is {version[:20]!r}, expected a number")
        data = small("data.pkl", min(max_bytes, _MAX_PICKLE), "max_bytes" if max_bytes < _MAX_PICKLE else "the limit")
        mapped = []

        def storage(key: str, dt: np.dtype, numel: int) -> np.ndarray:
            info = by_name.get(f"{top}data/{key}")
            if info is None:
                raise _Invalid(f"storage '{key}' has no entry {top}data/{key} in the archive")
            if info.file_size != numel * dt.itemsize:
                raise _Invalid(f"storage entry {info.filename} holds {info.file_size} bytes; the pickle declares "
                               f"{numel} elements of {dt.itemsize} bytes ({numel * dt.itemsize} bytes)")
            if numel == 0:
                return _array_at(b"", 0, dt, 0)
            if info.compress_type != zipfile.ZIP_STORED:
                return _array_at(zf.read(info), 0, dt, numel)
            if not mapped:
                mapped.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            return _array_at(mapped[0], _data_start(mapped[0], info, size), dt, numel)

        u = _Unpickler(io.BytesIO(data), storage, max_bytes=max_bytes, placeholders=placeholders)
        return _load(u, f"{top}data.pkl")


def _load_legacy(path: str, f, size: int, max_bytes: int, placeholders: bool) -> Any:
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    r = _Reader(mm, len(_LEGACY_PREFIX), size)

    def plain(what: str) -> Any:
        return _load(_Unpickler(r, None, max_bytes=max_bytes), f"the legacy {what} pickle")

    protocol = plain("protocol")
    if protocol != _LEGACY_PROTOCOL:
        raise _Invalid(f"legacy protocol version {_short(protocol)}, expected {_LEGACY_PROTOCOL}")
    sys_info = plain("sys_info")
    if type(sys_info) is not dict or sys_info.get("little_endian") is not True:
        raise _Invalid("only little-endian checkpoints are read (load and save it again with torch on a "
                       "little-endian machine)" if type(sys_info) is dict and sys_info.get("little_endian") is False
                       else f"the legacy sys_info is {_short(sys_info)}, expected a dict with little_endian")
    start = r.pos
    r.end = min(size, start + min(max_bytes, _MAX_PICKLE))
    first = _Unpickler(r, lambda *a: None, max_bytes=max_bytes, placeholders=placeholders, legacy=True, dry=True)
    _load(first, "the legacy main pickle")             # pass 1: each storage's dtype and size
    main_end, r.end = r.pos, size
    keys = plain("storage keys")
    if type(keys) is not list or not all(type(k) is str for k in keys) or len(set(keys)) != len(keys):
        raise _Invalid(f"the legacy storage key list is {_short(keys)}, expected distinct strings")
    declared = {k: (len(a), _np_dtype(d)) for k, (a, d) in first.storages.items()}
    if set(keys) != set(declared):
        raise _Invalid(f"the legacy storage keys {sorted(set(keys) ^ set(declared))[:5]} are listed or used, not both")
    offsets, pos = {}, r.pos
    for key in keys:
        numel, dt = declared[key]
        if pos + 8 > size:
            raise _Invalid(f"storage '{key}' starts past the end of the file (truncated?)")
        (count,) = struct.unpack_from("<q", mm, pos)
        if count != numel:
            raise _Invalid(f"storage '{key}' holds {count} elements; the pickle declares {numel}")
        offsets[key], pos = pos + 8, pos + 8 + numel * dt.itemsize
        if pos > size:
            raise _Invalid(f"storage '{key}' runs past the end of the file ({size} bytes; truncated?)")
    second = _Unpickler(_Reader(mm, start, main_end), lambda key, dt, numel: _array_at(mm, offsets[key], dt, numel),
                        max_bytes=max_bytes, placeholders=placeholders, legacy=True)
    return _load(second, "the legacy main pickle")     # pass 2: the same pickle, with the storages


def _not_a_checkpoint(size: int, head: bytes) -> str:
    if size == 0:
        return "an empty file, not a torch.save checkpoint"
    if head[257:262] == b"ustar":
        return ("a tar archive: the tar format of the earliest torch versions is not supported (convert it with a "
                "recent torch: torch.save(torch.load(f), g), or to safetensors)")
    if head.startswith(b"\x80\x02\x8a\x0a"):
        return "a legacy torch.save file with an unknown magic number"
    return "not a torch.save checkpoint (neither a zip archive, torch >= 1.6, nor the legacy format)"


def load(path, *, max_bytes: int = MAX_BYTES, allow_placeholders: bool = False) -> Any:
    """The object torch.save wrote to `path`, with tensors (and storages) as read-only NumPy arrays and every other
    object built from the allow-list of the module docstring, never by running code from the file. A disallowed
    global refuses the whole file (TorchCheckpointError naming it) unless allow_placeholders=True, which reads it as an
    inert Placeholder. max_bytes bounds the pickle, the storages (together) and any one tensor."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(512)
        try:
            if head.startswith(_LEGACY_PREFIX):
                return _load_legacy(path, f, size, max_bytes, allow_placeholders)
            if zipfile.is_zipfile(f):
                return _load_zip(path, f, size, max_bytes, allow_placeholders)
        except Refused as e:
            hint = "" if allow_placeholders or "global" not in str(e) else \
                " (load(..., allow_placeholders=True) reads such objects as inert Placeholders)"
            raise TorchCheckpointError(f"{path}: refused: {e}; only tensors, OrderedDict and plain data are read from "
                                       f"checkpoints, never code{hint}") from None
        except _Invalid as e:
            raise TorchCheckpointError(f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - zipfile / struct / mmap errors on a malformed archive
            raise TorchCheckpointError(f"{path}: not a readable torch.save checkpoint ({type(e).__name__}: {e})") \
                from None
    raise TorchCheckpointError(f"{path}: {_not_a_checkpoint(size, head)}")


def load_state_dict(path, key: Optional[str] = "model", *, max_bytes: int = MAX_BYTES,
                    allow_placeholders: bool = False) -> Dict[str, np.ndarray]:
    """The name -> tensor mapping at checkpoint[key] (key=None: the checkpoint itself), as a dict of read-only NumPy
    arrays with a leading "module." cut from every name (as DataParallel checkpoints have it). The whole file is read
    as load() reads it: strict by default, so an extra entry such as "args" holding an argparse.Namespace refuses
    it; allow_placeholders=True reads past such entries. TorchCheckpointError if the entry is missing or is not a
    mapping of str -> tensor."""
    obj = load(path, max_bytes=max_bytes, allow_placeholders=allow_placeholders)
    where = os.fspath(path)
    if key is not None:
        if not isinstance(obj, dict):
            raise TorchCheckpointError(f"{where}: the checkpoint is {_describe(obj)}, not a dict with a {key!r} entry")
        if key not in obj:
            keys = ", ".join(_short(k) for k in list(obj)[:10])
            raise TorchCheckpointError(f"{where}: no {key!r} entry (the checkpoint's keys: {keys or 'none'})")
        obj, label = obj[key], f"entry {key!r}"
    else:
        label = "the checkpoint"
    if not isinstance(obj, dict):
        raise TorchCheckpointError(f"{where}: {label} is {_describe(obj)}, not a mapping of name -> tensor")
    out: Dict[str, np.ndarray] = {}
    for name, t in obj.items():
        if type(name) is not str or not isinstance(t, np.ndarray):
            raise TorchCheckpointError(f"{where}: {label} maps {_short(name)} to {_describe(t)}, expected names -> "
                                       f"tensors")
        clean = name[len("module."):] if name.startswith("module.") else name
        if clean in out:
            raise TorchCheckpointError(f"{where}: {label} names the tensor {clean!r} twice (with and without "
                                       f"'module.')")
        out[clean] = t
    return out
