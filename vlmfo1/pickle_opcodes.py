"""The pickle opcodes vlmfo1's restricted readers (eval/safe_pickle.py, torch_checkpoint.py) run, and a dispatch table
for Python's own pure-Python unpickler that refuses every other opcode before it runs.

`pickle._Unpickler` looks each opcode up in its class's `dispatch` table; a reader that sets `dispatch` to
`dispatch_table(allowed, overrides)` runs the allowed opcodes with the stdlib's code (or its own, for the names in
`overrides`) and raises `Refused` for any other one, EXT1/2/4 included: those resolve a global through copyreg's
extension cache without calling `find_class`, so a reader that admits some globals must not dispatch them.
"""
from __future__ import annotations

import pickle
import pickletools
from typing import Callable, Iterable, Mapping

__all__ = ["OPCODE_NAMES", "PLAIN_OPCODES", "Refused", "dispatch_table"]

OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
_CODES = {name: code for code, name in OPCODE_NAMES.items()}

# opcodes that build plain data only (no global, call, persistent id, buffer, set or bytearray)
PLAIN_OPCODES = frozenset([
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
])


class Refused(pickle.UnpicklingError):
    """An opcode or lookup a restricted reader never performs."""


class _RefusingDispatch(dict):
    def __missing__(self, code: int):
        name = OPCODE_NAMES.get(code, f"unknown opcode 0x{code:02x}")

        def refuse(_self) -> None:
            raise Refused(f"the pickle uses the {name} opcode")
        return refuse


def dispatch_table(allowed: Iterable[str], overrides: Mapping[str, Callable] = {}) -> dict:
    """A `dispatch` for a `pickle._Unpickler` subclass: the stdlib's handlers of the `allowed` opcode names, the
    `overrides` (name -> handler(unpickler)) in place of the stdlib's, every other opcode refused (Refused)."""
    allowed = frozenset(allowed) | frozenset(overrides)
    unknown = allowed - set(_CODES)
    if unknown:
        raise ValueError(f"not pickle opcodes: {sorted(unknown)}")
    table = _RefusingDispatch({code: fn for code, fn in pickle._Unpickler.dispatch.items()  # type: ignore
                               if OPCODE_NAMES.get(code) in allowed})
    for name, fn in overrides.items():
        table[_CODES[name]] = fn
    return table
