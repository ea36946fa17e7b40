"""Read pickles that hold plain data only (dict, list, tuple, str, bytes, int, float, bool, None), never code.

The RefCOCO / RefCOCO+ / RefCOCOg annotations users download (`refs(unc).p`, `refs(umd).p`, `refs(google).p`, from
the refer toolkit) are Python 2 pickles (protocol 2) of lists of dicts of str and int. `pickle.load` on a file from
the internet runs whatever the file asks for (`os.system` through GLOBAL + REDUCE is two opcodes); this reader
never does:

  * every global lookup is refused (`find_class` refuses everything), so GLOBAL, STACK_GLOBAL, INST, and with them
    REDUCE, BUILD, OBJ, NEWOBJ, NEWOBJ_EX (which need a callable or class from such a lookup) cannot do anything;
    persistent ids (PERSID, BINPERSID) and out-of-band buffers are refused too;
  * the extension-code opcodes (EXT1/2/4) bypass `find_class` once some other unpickling in this process resolved the
    code (copyreg's extension cache). Empty in every ordinary process; if it is not, this module falls back to its
    strict reader: Python's own unpickler with a dispatch table that holds the plain-data opcodes only, so any other
    opcode is refused before it runs (`strict=True` forces that reader; it is ~5x slower);
  * what comes out is walked once (iteratively, no recursion): only the plain types above are accepted (no set,
    frozenset, bytearray), and nesting deeper than `max_depth` (or a cycle) is refused;
  * Python 2 `str` values (dict keys included) become str, decoded as UTF-8 (the refer files are ASCII), or as
    Latin-1 when some of them are not UTF-8 (the whole file is then read again that way); Python 2 `unicode` and
    Python 3 str are str, Python 3 bytes stay bytes;
  * the file is read whole, after its size is checked against `max_bytes`, so a length field in the pickle cannot
    make the reader wait on a file; a pickle cannot expand beyond a constant factor of its size without a callable.

Every failure is a ValueError that names the file and says what was refused.

    from vlmfo1.eval.safe_pickle import load_plain
    refs = load_plain("refcoco/refs(unc).p")          # -> list of dicts of str / int / list
"""
from __future__ import annotations

import copyreg
import io
import os
import pickle
from typing import Any, Optional, Union

from ..pickle_opcodes import PLAIN_OPCODES, dispatch_table
from ..pickle_opcodes import Refused as _Refused

__all__ = ["load_plain", "loads_plain", "MAX_BYTES", "MAX_DEPTH"]

MAX_BYTES = 1 << 30     # 1 GiB; the largest refer pickle (refcocog, google split) is tens of MB
MAX_DEPTH = 100         # containers inside containers; a refs file is 5 deep (list/dict/list/dict/list)

_SCALARS = (type(None), bool, int, float, str)


class _FastUnpickler(pickle.Unpickler):
    """The C unpickler with every way to reach code refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"the pickle asks for the global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("the pickle holds a persistent id")


class _StrictUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # the pure-Python unpickler
    """Python's own unpickler, restricted to the plain-data opcodes (any other opcode is refused before it runs)."""

    dispatch = dispatch_table(PLAIN_OPCODES)

    def find_class(self, module: str, name: str) -> Any:   # unreachable (GLOBAL is not dispatched); kept as a net
        raise _Refused(f"the pickle asks for the global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("the pickle holds a persistent id")


_CONTAINERS = (list, tuple, dict)
_PLAIN_TYPES = frozenset(_SCALARS + (bytes,) + _CONTAINERS)
_KEY_TYPES = frozenset(_SCALARS + (bytes, tuple))


def _check_plain(root: Any, where: str, max_depth: int) -> None:
    """Refuse anything but plain data, nesting deeper than max_depth, and cycles. Iterative post-order walk over the
    containers only (the scalars of a container are checked in bulk by type); a container shared by several parents
    is walked once, its height remembered, so sharing cannot make the walk exponential."""

    def refuse(t: type) -> None:
        raise ValueError(f"{where}: refused: the pickle holds a {t.__name__}; only dict, list, tuple, str, bytes, "
                         "int, float, bool and None are accepted")

    def sub_containers(x: Any) -> list:
        if type(x) is dict:
            kt = set(map(type, x))
            if not kt <= _KEY_TYPES:
                refuse(next(iter(kt - _KEY_TYPES)))
            keys = [k for k in x if type(k) is tuple] if tuple in kt else []
            vals = x.values()
        else:
            keys, vals = [], x
        vt = set(map(type, vals))
        if not vt <= _PLAIN_TYPES:
            refuse(next(iter(vt - _PLAIN_TYPES)))
        if vt.isdisjoint(_CONTAINERS):
            return keys
        return keys + [v for v in vals if type(v) in _CONTAINERS]

    if type(root) not in _CONTAINERS:
        if type(root) not in _PLAIN_TYPES:
            refuse(type(root))
        return
    height: dict[int, int] = {}              # id -> height of a checked container (1 = only scalars inside)
    active: set[int] = {id(root)}
    stack = [[root, iter(sub_containers(root)), 0]]   # container, its sub-containers, deepest checked child
    while stack:
        frame = stack[-1]
        for child in frame[1]:
            cid = id(child)
            h = height.get(cid)
            if h is None:
                if cid in active:
                    raise ValueError(f"{where}: refused: the pickle holds a container that contains itself")
                if len(stack) >= max_depth:
                    raise ValueError(f"{where}: refused: containers nested deeper than {max_depth} levels")
                sub = sub_containers(child)
                if sub:                                       # walk into it
                    active.add(cid)
                    stack.append([child, iter(sub), 0])
                    break
                h = height[cid] = 1                           # scalars only: done here
            elif len(stack) + h > max_depth:                  # a shared container, met again deeper
                raise ValueError(f"{where}: refused: containers nested deeper than {max_depth} levels")
            if h > frame[2]:
                frame[2] = h
        else:
            obj, _, deepest = stack.pop()
            active.discard(id(obj))
            h = height[id(obj)] = deepest + 1
            if stack and h > stack[-1][2]:
                stack[-1][2] = h


def _unpickle(data: bytes, where: str, strict: bool, encoding: str) -> Any:
    cls = _StrictUnpickler if strict else _FastUnpickler
    try:
        return cls(io.BytesIO(data), encoding=encoding).load()
    except _Refused as e:
        raise ValueError(f"{where}: refused: {e}; only plain data (dict, list, tuple, str, bytes, int, float, bool, "
                         "None) is read from pickles, never code") from None
    except UnicodeDecodeError:
        raise                                   # the caller retries Python 2 strings as Latin-1
    except MemoryError:
        raise ValueError(f"{where}: not a plain-data pickle (a length field asks for more memory than there is)") \
            from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, struct.error, ...: all mean a malformed file
        raise ValueError(f"{where}: not a readable plain-data pickle ({type(e).__name__}: {e})") from None


def loads_plain(data: Union[bytes, bytearray, memoryview], *, where: str = "pickle data",
                max_depth: int = MAX_DEPTH, strict: Optional[bool] = None) -> Any:
    """Unpickle `data`, which must hold plain data only (see the module docstring). `where` names the source in
    errors. Python 2 `str` values become str, decoded as UTF-8 (ASCII in the refer files), or as Latin-1 if some of
    them are not UTF-8. strict: None picks the fast C reader unless copyreg's extension cache is in use; True forces
    the plain-opcode reader."""
    if strict is None:
        strict = bool(copyreg._extension_cache)   # type: ignore[attr-defined]
    data = bytes(data)
    try:
        obj = _unpickle(data, where, strict, "utf-8")
    except UnicodeDecodeError:
        try:
            obj = _unpickle(data, where, strict, "latin-1")
        except UnicodeDecodeError as e:  # pragma: no cover - Latin-1 decodes every byte string
            raise ValueError(f"{where}: not a readable plain-data pickle ({e})") from None
    _check_plain(obj, where, max_depth)
    return obj


def load_plain(path: Union[str, os.PathLike], *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH,
               strict: Optional[bool] = None) -> Any:
    """Read the pickle file `path`, which must hold plain data only (see the module docstring): a ValueError naming
    the file otherwise, or when it is larger than max_bytes. Python 2 str values (and dict keys) come back as str."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pickle file not found: {path}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, more than the {max_bytes} this reader accepts (max_bytes=)")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: more than the {max_bytes} bytes this reader accepts (max_bytes=)")
    return loads_plain(data, where=path, max_depth=max_depth, strict=strict)
