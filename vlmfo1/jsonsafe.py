"""The nesting depth of a JSON text without parsing it, in linear time — so hostile files (safetensors headers,
config.json, index and boxes files) can be refused before json.loads recurses.

Brackets inside strings do not count. A quote is a string delimiter unless an odd run of backslashes precedes it.
Vectorised with NumPy over chunks (constant memory per chunk, state carried between chunks); no regular expression,
so no input can make it backtrack (a regex string matcher is quadratic on `"\\"\\"\\"...`).
"""
from __future__ import annotations

from typing import Union

import numpy as np

_BRACKET = np.zeros(256, np.int32)
_BRACKET[[ord("["), ord("{")]] = 1
_BRACKET[[ord("]"), ord("}")]] = -1
_CHUNK = 1 << 22


def nesting_depth(data: Union[bytes, bytearray, memoryview, str]) -> int:
    """Deepest bracket nesting of a JSON text (0 for a scalar). str is taken as its UTF-8 bytes: the characters that
    matter are ASCII and never occur inside a multi-byte UTF-8 sequence."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    a = np.frombuffer(bytes(data) if isinstance(data, memoryview) else data, np.uint8)
    deepest = depth = 0
    in_str = False        # inside a string at the start of the chunk
    run = 0               # backslashes just before the chunk
    for s in range(0, a.size, _CHUNK):
        c = a[s:s + _CHUNK]
        n = c.size
        pos = np.arange(n, dtype=np.int64)
        is_bs = c == 0x5C
        last_other = np.maximum.accumulate(np.where(is_bs, -1, pos))        # last non-backslash at or before i
        before = np.empty(n, np.int64)                                      # backslashes right before i
        before[0] = run
        prev = last_other[:-1]
        before[1:] = np.where(prev >= 0, pos[:-1] - prev, pos[1:] + run)
        quote = (c == 0x22) & (before % 2 == 0)
        toggles = np.cumsum(quote, dtype=np.int64)
        inside = ((toggles - quote) % 2 == 1) ^ in_str                    # string state just before i
        step = np.where(inside | quote, 0, _BRACKET[c])
        if step.any():
            levels = np.cumsum(step, dtype=np.int64) + depth
            deepest = max(deepest, int(levels.max()))
            depth = int(levels[-1])
        in_str ^= bool(toggles[-1] % 2)
        run = int(n - 1 - last_other[-1]) if last_other[-1] >= 0 else run + n
    return deepest
