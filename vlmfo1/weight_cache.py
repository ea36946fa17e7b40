"""The on-disk cache of quantized weights: an int8 / int4 load quantizes each network's linear layers once and later
loads memory-map the result instead of quantizing again (without it the full-size int4 VLM-FO1 load quantizes for
14-17 s every time; benchmarks/bench_load.py measures both).

    VLMFO1.from_pretrained(path, dtype="int4")                    # cached in the default folder (on by default)
    VLMFO1.from_pretrained(path, dtype="int4", cache_dir="/scratch/vlmfo1")   # another folder
    VLMFO1.from_pretrained(path, dtype="int4", cache_dir=False)   # no cache: quantize at every load, write nothing
    vlmfo1 cache info / vlmfo1 cache clear [--stale]              # what it holds (sizes, sources); empty it

Where: `cache_dir=` of the loaders that take `dtype=` (VLMFO1 / FO1, QwenVL, LanguageModel, the vision towers, UPN;
the CLI's `--cache-dir DIR` / `--no-cache`); by default `$VLMFO1_CACHE_DIR`, else `$XDG_CACHE_HOME/vlmfo1/weights`,
else `~/.cache/vlmfo1/weights`.

What: one safetensors file per quantize call (vlmfo1.quant.quantize_linear: e.g. the decoder's layers, its output
layer, the ViT), holding each matrix's arrays (`<key>` int8 / int4 codes, `<key>_sub`, `<key>_scale`, `<key>_wsum`),
named `q<bits>-<sha256 of its key>.safetensors`. The key (stored in full in the file's metadata and compared at load)
is FORMAT_VERSION, the bits, the matrices' names and [n, k] shapes, and for each matrix its source tensor: the
checkpoint file's real path, size, mtime_ns, ctime_ns and inode, and the tensor's name, dtype, shape and byte offset
in that file. A checkpoint that changes (rewritten, touched, replaced, moved) gets new files; the old ones stay until
`vlmfo1 cache clear` (`--stale`: only those whose source changed or is gone). (As with any cache keyed by file
metadata, a file rewritten in place to the same size within one tick of the file system's clock, keeping its inode,
would not be noticed; writing a checkpoint takes far longer than a tick.) Sources that are not files (arrays in
memory) are never cached. int8 matrices packed at load (vlmfo1.quant.packs(): the VNNI kernel's panel layout) are
stored packed, under a key that says so: a cache holds one entry per layout a load asked for, and serves each only
to its own. FORMAT_VERSION must be bumped whenever quantize_i8 / quantize_i4 output changes or a loader
lays out a quantized matrix differently (e.g. another transpose of a convolution).

Loading a cached file reads nothing of the checkpoint's quantized weights (their pages are never touched; a source
that would need converting first, e.g. F16 or a transposed convolution, is a weight_cache.Deferred that is made only
on a miss) and maps the cache file read-only: its pages are shared by every process that loads the same model (e.g.
the eval workers) and reclaimable. Results are bit-identical to a fresh quantization (the same arrays).

Robustness: files are written to a temporary name in the cache folder, fsync'd and renamed into place, so a crash
never leaves a partial file under a final name and concurrent writers are safe (the last rename wins; both wrote the
same bytes). A cache file that is unreadable, truncated, not a valid safetensors file, of another key, or whose arrays
do not have the shapes and dtypes the quantization gives (or whose scales are not finite and non-negative, or whose
sums are not integers in range) gives a RuntimeWarning naming it; the weights are quantized again and the file
rewritten. A folder that cannot be written (read-only, not a folder, disk full) gives one RuntimeWarning per folder
and process, and loading goes on without writing. A read-only folder that holds the files still serves them. The
bytes of the codes are not checksummed at load (as the checkpoint's are not).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .safetensors import SafetensorsFile, read_header, weight, write_streaming

__all__ = ["FORMAT_VERSION", "ENV_VAR", "default_cache_dir", "check_cache_dir", "resolve_cache_dir", "Deferred",
           "derive", "lazy_weight", "Origin", "origin", "checkpoint_identity", "file_identity", "CacheFile",
           "cache_info", "clear_cache", "human_bytes"]

FORMAT_VERSION = 1                  # bump when quantize_i8 / quantize_i4 output or a quantized matrix's layout changes
ENV_VAR = "VLMFO1_CACHE_DIR"
_META = "vlmfo1_weight_cache"       # the metadata entry holding the key (JSON)
_PAD = "__pad__"                    # a U8 tensor of 0-63 bytes that aligns the float32 arrays to 64 bytes
_ALIGN = 64
_FILE = re.compile(r"^q(4|8)-([0-9a-f]{64})\.safetensors$")
_TMP = re.compile(r"^\.q(4|8)-[0-9a-f]{64}\.[0-9a-z.]+\.tmp$")
_STALE_TMP_SECONDS = 3600           # `clear --stale` leaves younger temporary files (a writer may be at work)
_unwritable: set = set()            # folders this process could not write (warned once each)


# ---------------------------------------------------------------------------------------------- where

def default_cache_dir() -> str:
    """$VLMFO1_CACHE_DIR, else $XDG_CACHE_HOME/vlmfo1/weights, else ~/.cache/vlmfo1/weights (empty variables count
    as unset)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "vlmfo1", "weights"))


def check_cache_dir(cache_dir) -> None:
    """A loader's cache_dir: None (the default folder), False (no cache) or a folder path (str / os.PathLike).
    Anything else is a TypeError, an empty path a ValueError."""
    if cache_dir is None or cache_dir is False:
        return
    if isinstance(cache_dir, bool) or not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be None (the default folder), False (no cache) or a folder path, got "
                        f"{type(cache_dir).__name__} {cache_dir!r}")
    if not os.fspath(cache_dir):
        raise ValueError("cache_dir must not be an empty path (None: the default folder, False: no cache)")


def resolve_cache_dir(cache_dir=None) -> Optional[str]:
    """The folder a loader's cache_dir means (absolute), or None when caching is off (cache_dir=False)."""
    check_cache_dir(cache_dir)
    if cache_dir is False:
        return None
    if cache_dir is None:
        return default_cache_dir()
    return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))


# ---------------------------------------------------------------------------------------------- lazy sources

class Deferred:
    """A matrix that exists only when it is quantized: a converted or re-laid-out copy of checkpoint tensors (an F16
    weight widened, a convolution transposed). On a cache hit it is never made, so the checkpoint is never read.
    `reads`: the mapped arrays make() reads (a Checkpoint's evict drops their pages after quantization)."""
    __slots__ = ("shape", "dtype", "reads", "_make")

    def __init__(self, make: Callable[[], np.ndarray], shape: Sequence[int], dtype, reads: Tuple = ()):
        self.shape, self.dtype, self.reads, self._make = tuple(int(d) for d in shape), np.dtype(dtype), reads, make

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __call__(self) -> np.ndarray:
        a = self._make()
        if tuple(a.shape) != self.shape or a.dtype != self.dtype:   # a loader bug, never the user's input
            raise AssertionError(f"a deferred matrix was declared {self.dtype} {self.shape}, made {a.dtype} {a.shape}")
        return a

    def __repr__(self) -> str:
        return f"Deferred({self.dtype}, {self.shape})"


def resolve(x) -> np.ndarray:
    """The array itself, or a Deferred made now."""
    return x() if isinstance(x, Deferred) else x


def derive(x, fn: Callable[[np.ndarray], np.ndarray], shape: Sequence[int], lazy: bool):
    """fn(x) (a reshape, a transposed copy, ... of the same dtype and `shape`): made now (lazy=False), or as a
    Deferred made only when a quantization needs it (lazy=True; x an array or a Deferred)."""
    if not lazy:
        return fn(resolve(x))
    if isinstance(x, Deferred):
        return Deferred(lambda: fn(x()), shape, x.dtype, x.reads)
    return Deferred(lambda: fn(x), shape, x.dtype, (x,))


def lazy_weight(ckpt, name: str):
    """vlmfo1.safetensors.weight(ckpt, name, None) for a matrix about to be quantized: the mapped view when that is
    what weight() gives (reading nothing), else (F16 widened to float32) a Deferred."""
    info = ckpt.info(name)
    if info.dtype in ("BF16", "F32"):
        return weight(ckpt, name, None)
    return Deferred(lambda: weight(ckpt, name, None), info.shape, np.float32, (ckpt.get(name),))


# ---------------------------------------------------------------------------------------------- the key

def file_identity(path: str, st: Optional[os.stat_result] = None) -> dict:
    """What identifies a file's contents without reading them: real path, size, mtime_ns, ctime_ns, inode."""
    st = st if st is not None else os.stat(path)
    return {"file": os.path.realpath(path), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns),
            "ctime_ns": int(st.st_ctime_ns), "inode": int(st.st_ino)}


def checkpoint_identity(ckpt) -> Callable[[str], Optional[dict]]:
    """name -> the identity of that tensor of a vlmfo1.safetensors.Checkpoint (its file as mapped, plus name, dtype,
    shape and byte offset), or None when the checkpoint is not file-backed (e.g. arrays in memory)."""
    files = getattr(ckpt, "files", None)

    def identify(name: str) -> Optional[dict]:
        if not isinstance(files, dict):
            return None
        info = ckpt.info(name)
        sf = files.get(getattr(info, "path", None))
        st = getattr(sf, "stat", None)
        if st is None:
            return None
        ident = file_identity(sf.realpath, st)
        ident.update(name=name, dtype=info.dtype, shape=[int(d) for d in info.shape], offset=int(info.begin))
        return ident
    return identify


class Origin:
    """Where the matrices of quantize calls come from on disk (key -> source identity) and the cache folder: what
    vlmfo1.quant.quantize_linear needs to look a call up and store it. Build it with origin()."""

    def __init__(self, directory: str, identities: Dict[str, dict]):
        self.directory, self.identities = directory, identities

    def key(self, bits: int, keys: List[str], shapes: Dict[str, Tuple[int, int]], packed: bool = False) -> Optional[str]:
        """The canonical JSON key of one call, or None when a matrix has no file-backed source. packed: the int8
        matrices with k a multiple of 4 are stored in the VNNI kernel's panel layout (vlmfo1.quant.packs)."""
        if any(k not in self.identities for k in keys):
            return None
        d = {"format": FORMAT_VERSION, "bits": bits, "keys": keys, "shapes": {k: list(shapes[k]) for k in keys},
             "sources": {k: self.identities[k] for k in keys}}
        if packed:
            d["packed"] = True
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def path(self, bits: int, key: str) -> str:
        return os.path.join(self.directory, f"q{bits}-{hashlib.sha256(key.encode()).hexdigest()}.safetensors")

    def load(self, bits: int, keys: List[str], shapes: Dict[str, Tuple[int, int]],
             packed: bool = False) -> Optional[Dict[str, np.ndarray]]:
        """The cached arrays of this call (read-only views of the mapped file), or None (a miss; a bad file is a
        RuntimeWarning naming it)."""
        key = self.key(bits, keys, shapes, packed)
        if key is None:
            return None
        path = self.path(bits, key)
        if not os.path.exists(path):
            return None
        try:
            return _read(path, key, bits, keys, shapes, packed)
        except (OSError, ValueError) as e:
            warnings.warn(f"vlmfo1 weight cache: ignoring {path}: {e}; quantizing again and rewriting it",
                          RuntimeWarning, stacklevel=3)
            return None

    def store(self, bits: int, keys: List[str], shapes: Dict[str, Tuple[int, int]],
              arrays: Dict[str, np.ndarray], packed: bool = False) -> Optional[Dict[str, np.ndarray]]:
        """Write this call's arrays (atomically); returns them read back as views of the written file (shared and
        reclaimable pages instead of private memory), or None when nothing was written (warned once per folder)."""
        key = self.key(bits, keys, shapes, packed)
        if key is None or self.directory in _unwritable:
            return None
        path = self.path(bits, key)
        tmp = os.path.join(self.directory, f".{os.path.basename(path)[:-len('.safetensors')]}."
                                           f"{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.makedirs(self.directory, exist_ok=True)
            write_streaming(tmp, _entries(bits, keys, arrays, shapes, packed), {_META: key}, align=_ALIGN, fsync=True)
            os.replace(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if not isinstance(e, OSError):
                raise
            _unwritable.add(self.directory)
            warnings.warn(f"vlmfo1 weight cache: cannot write to {self.directory} ({e.strerror or e}); loading goes "
                          f"on without caching (cache_dir= / --cache-dir / ${ENV_VAR} choose another folder, "
                          f"cache_dir=False / --no-cache turn the cache off)", RuntimeWarning, stacklevel=3)
            return None
        try:
            return _read(path, key, bits, keys, shapes, packed)
        except (OSError, ValueError):   # replaced meanwhile by a bad file: keep the arrays in memory
            return None


def origin(cache_dir, identify: Callable[[str], Optional[dict]], names: Dict[str, str]) -> Optional[Origin]:
    """The Origin of matrices named key -> source tensor name (identify: name -> identity, e.g.
    checkpoint_identity(ckpt)), or None when caching is off (cache_dir=False). A key whose source is not
    file-backed is left out, and a call that quantizes it is then not cached."""
    directory = resolve_cache_dir(cache_dir)
    if directory is None:
        return None
    identities = {}
    for key, name in names.items():
        ident = identify(name)
        if ident is not None:
            identities[key] = ident
    return Origin(directory, identities) if identities else None


# ---------------------------------------------------------------------------------------------- the file

def _expected(bits: int, keys: List[str], shapes: Dict[str, Tuple[int, int]],
              packed: bool = False) -> Dict[str, Tuple[str, tuple]]:
    """name -> (safetensors dtype, shape) of every array a quantization of these matrices gives (packed: int8
    matrices with k a multiple of 4 in panels, csrc/gemm.h)."""
    out = {}
    for k in keys:
        n, kk = shapes[k]
        if bits == 8 and packed and kk % 4 == 0:
            out[k] = ("I8", (-(-n // 32), kk // 4, 32, 4))
        elif bits == 8:
            out[k] = ("I8", (n, kk))
        else:
            out[k] = ("U8", (n, kk // 2))
            out[k + "_sub"] = ("U8", (n, (kk // 32 + 1) // 2))
        out[k + "_scale"] = ("F32", (n,))
        out[k + "_wsum"] = ("F32", (n,))
    return out


def _entries(bits: int, keys: List[str], arrays: Dict[str, np.ndarray], shapes: Dict[str, Tuple[int, int]],
             packed: bool):
    """(name, dtype, shape, make) in file order: the codes, the block scales, a pad, the float32 arrays (the data
    section starts 64-byte aligned, and so do the float32 arrays)."""
    want = _expected(bits, keys, shapes, packed)
    # the codes first (each starts 64-byte aligned when the ones before fill whole cache lines, as real shapes do)
    small = keys + [k + "_sub" for k in keys if bits == 4]
    floats = [n for n, (dt, _) in want.items() if dt == "F32"]
    pad = -sum(arrays[n].nbytes for n in small) % _ALIGN
    out = [(n, want[n][0], want[n][1], (lambda a=arrays[n]: a)) for n in small]
    out.append((_PAD, "U8", (pad,), lambda: np.zeros(pad, np.uint8)))
    return out + [(n, "F32", want[n][1], (lambda a=arrays[n]: a)) for n in floats]


def _read(path: str, key: str, bits: int, keys: List[str], shapes, packed: bool = False) -> Dict[str, np.ndarray]:
    """Map a cache file and check it against the key and what quantization gives; ValueError / OSError if not."""
    sf = SafetensorsFile(path)
    try:
        if sf.metadata.get(_META) != key:
            raise ValueError("it was written for other source weights or another vlmfo1 version (key mismatch)")
        want = _expected(bits, keys, shapes, packed)
        extra = sorted(set(sf.tensors) - set(want) - {_PAD})
        if extra:
            raise ValueError(f"unexpected arrays {', '.join(extra[:4])}")
        out = {}
        for name, (dt, shape) in want.items():
            info = sf.tensors.get(name)
            if info is None:
                raise ValueError(f"array {name} is missing")
            if info.dtype != dt or tuple(info.shape) != shape:
                raise ValueError(f"array {name} is {info.dtype} {list(info.shape)}, expected {dt} {list(shape)}")
            out[name] = sf.get(name)
    finally:
        sf.close()   # the mapping stays while the arrays view it
    for k in keys:
        s, w = out[k + "_scale"], out[k + "_wsum"]
        limit = (128 if bits == 8 else 120) * shapes[k][1]
        if not (np.isfinite(s).all() and (s >= 0).all()):
            raise ValueError(f"array {k}_scale holds values that are not finite and >= 0 (corrupt file)")
        if not (np.isfinite(w).all() and (np.abs(w) <= limit).all() and (w == np.rint(w)).all()):
            raise ValueError(f"array {k}_wsum holds values that are not integer sums of the codes (corrupt file)")
    return out


# ---------------------------------------------------------------------------------------------- info and clear

class CacheFile:
    """One file of the cache, as `cache_info` describes it."""
    __slots__ = ("path", "bytes", "bits", "matrices", "sources", "stale", "error", "mtime")

    def __init__(self, path, nbytes, mtime, bits=None, matrices=0, sources=(), stale=False, error=None):
        self.path, self.bytes, self.mtime, self.bits, self.matrices = path, nbytes, mtime, bits, matrices
        self.sources, self.stale, self.error = list(sources), stale, error

    def __repr__(self) -> str:
        return f"CacheFile({self.path!r}, {self.bytes} bytes, int{self.bits}, {self.matrices} matrices)"


def _describe(path: str, st: os.stat_result) -> CacheFile:
    try:
        meta = json.loads(read_header(path).metadata[_META])
        srcs: Dict[str, dict] = {}
        for ident in meta["sources"].values():
            srcs.setdefault(ident["file"], ident)
        stale = False
        for f, ident in srcs.items():
            try:
                now = file_identity(f)
            except OSError:
                stale = True
                continue
            stale = stale or any(now[k] != ident.get(k) for k in ("size", "mtime_ns", "ctime_ns", "inode"))
        return CacheFile(path, st.st_size, st.st_mtime, int(meta["bits"]), len(meta["keys"]), sorted(srcs), stale)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return CacheFile(path, st.st_size, st.st_mtime, stale=True, error=str(e) or type(e).__name__)


def _listing(directory: str) -> Tuple[List[Tuple[str, os.stat_result]], List[Tuple[str, os.stat_result]]]:
    """(cache files, temporary files of writers) in the folder: only names this module writes."""
    files, tmps = [], []
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return files, tmps
    for n in names:
        kind = files if _FILE.match(n) else tmps if _TMP.match(n) else None
        if kind is None:
            continue
        p = os.path.join(directory, n)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            kind.append((p, st))
    return files, tmps


def cache_info(cache_dir=None) -> Dict:
    """What the cache folder holds: {"directory", "files": [CacheFile ...] (newest first), "bytes", "temporary":
    [(path, bytes)] (files of writers at work or killed)}. Reads the files' headers only."""
    directory = resolve_cache_dir(cache_dir)
    if directory is None:
        raise ValueError("cache_dir=False: there is no cache folder to describe")
    files, tmps = _listing(directory)
    described = sorted((_describe(p, st) for p, st in files), key=lambda c: -c.mtime)
    return {"directory": directory, "files": described, "bytes": sum(c.bytes for c in described),
            "temporary": [(p, st.st_size) for p, st in tmps]}


def clear_cache(cache_dir=None, stale_only: bool = False) -> List[Tuple[str, int]]:
    """Delete the cache's files (only the names this module writes: nothing else in the folder is touched); with
    stale_only, only those whose source files changed or are gone (and temporary files older than an hour).
    Returns [(path, bytes)] of what was deleted. Models already loaded keep their mappings."""
    directory = resolve_cache_dir(cache_dir)
    if directory is None:
        raise ValueError("cache_dir=False: there is no cache folder to clear")
    files, tmps = _listing(directory)
    doomed = [(p, st.st_size) for p, st in files if not stale_only or _describe(p, st).stale]
    now = time.time()
    doomed += [(p, st.st_size) for p, st in tmps if not stale_only or now - st.st_mtime > _STALE_TMP_SECONDS]
    removed = []
    for p, n in doomed:
        try:
            os.unlink(p)
            removed.append((p, n))
        except FileNotFoundError:
            pass
    return removed


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"   # pragma: no cover
