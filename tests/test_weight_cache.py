"""The weight cache of int8 / int4 loads (vlmfo1.weight_cache): a second load maps the stored arrays instead of
quantizing (the quantizers are made to raise to prove it) and gives bit-identical outputs; a changed checkpoint, a
bad cache file, an unwritable folder, cache_dir=False, the environment variable and the CLI behave as documented.
Everything runs on tiny random checkpoints written by vlmfo1.testing, each test with its own cache folder."""
from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

import vlmfo1.decoder
import vlmfo1.quant
import vlmfo1.weight_cache as wc
from vlmfo1 import UPN, VLMFO1, LanguageModel
from vlmfo1.cli import main
from vlmfo1.safetensors import Checkpoint, read_header, write_streaming
from vlmfo1.testing.qwen2 import write_random_qwen2
from vlmfo1.testing.upn import write_random_upn

TIKTOKEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizer" / "qwen.tiktoken"
# the tests that write a VLM-FO1 checkpoint need the shared tokenizer (CI always has ../shared beside the clone)
needs_tokenizer = pytest.mark.skipif(not TIKTOKEN.exists(), reason="../shared/data/tokenizer is absent")
IDS = np.array([3, 141, 326, 53, 5, 479, 3, 23, 46, 243, 383], np.int64)
SMALL = dict(vocab_size=4096, eos_token_id=7, bos_token_id=6)   # a small output layer: fast tests


@pytest.fixture
def qwen(tmp_path):
    """A tiny bf16 decoder checkpoint (input sizes multiples of 32: int4 takes it)."""
    return write_random_qwen2(str(tmp_path / "qwen"), dtype="bfloat16", seed=0, **SMALL)


def files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors")) if os.path.isdir(d) else []


def logits(path, dtype, **kw):
    lm = LanguageModel.load(path, dtype=dtype, n_threads=2, **kw)
    return lm, lm.session().prefill(IDS, all_logits=True)


@pytest.fixture
def no_quantizer(monkeypatch):
    """Call to make every later quantization fail: what a cache hit must not need."""
    def arm():
        def refuse(*a, **k):
            raise AssertionError("the quantizer ran although the weight cache should have served this load")
        monkeypatch.setattr(vlmfo1.quant.core, "quantize_i8", refuse)
        monkeypatch.setattr(vlmfo1.quant.core, "quantize_i4", refuse)
    return arm


def mapped_rss_kib(prefix: str) -> int:
    """Resident KiB of this process's mappings of files under `prefix`: pages it touched through a mapping (and
    their neighbours the kernel maps with them when they are in the page cache: fault-around, 64 KiB)."""
    total, cur = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                cur = parts[5] if len(parts) > 5 else None
            elif parts[:1] == ["Rss:"] and cur and cur.startswith(prefix):
                total += int(parts[1])
    return total


# ---------------------------------------------------------------------------------------------- hit and miss

@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_second_load_maps_the_cache_bit_identical(qwen, tmp_path, no_quantizer, dtype):
    cache = str(tmp_path / "cache")
    _, fresh = logits(qwen, dtype, cache_dir=False)
    assert files(cache) == []
    lm1, first = logits(qwen, dtype, cache_dir=cache)
    names = files(cache)
    assert len(names) == 2                              # the layers (int4 / int8) and the int8 output layer
    assert {n[:2] for n in names} == ({"q4", "q8"} if dtype == "int4" else {"q8"})
    no_quantizer()
    lm2, second = logits(qwen, dtype, cache_dir=cache)
    assert files(cache) == names
    assert np.array_equal(first, fresh) and np.array_equal(second, fresh)
    t = lm2._tensors
    for k in ("layers.0.q", "layers.1.down", "lm_head", "lm_head_scale", "layers.0.q_wsum"):
        assert not t[k].flags.writeable                 # read-only views of the mapped cache file
        assert np.array_equal(t[k], lm1._tensors[k])
    if dtype == "int4":
        assert t["layers.0.q"].dtype == np.uint8 and t["layers.0.q_sub"].dtype == np.uint8
    assert t["lm_head"].dtype == np.int8
    assert lm2.generate(IDS, max_new_tokens=5) == lm1.generate(IDS, max_new_tokens=5)
    # the key is in the file, in full
    meta = json.loads(read_header(os.path.join(cache, names[0])).metadata["vlmfo1_weight_cache"])
    assert meta["format"] == wc.FORMAT_VERSION and meta["bits"] in (4, 8)
    src = next(iter(meta["sources"].values()))
    assert src["file"] == os.path.realpath(os.path.join(qwen, "model.safetensors"))
    assert {"size", "mtime_ns", "name", "dtype", "shape", "offset"} <= set(src)


def test_int8_and_int4_share_the_output_layer(qwen, tmp_path):
    cache = str(tmp_path / "cache")
    logits(qwen, "int8", cache_dir=cache)
    logits(qwen, "int4", cache_dir=cache)
    assert len(files(cache)) == 3                       # q8 layers, q4 layers, one q8 output layer


@needs_tokenizer
def test_fo1_every_tower_cached(tmp_path, no_quantizer):
    from PIL import Image
    from vlmfo1.testing.fo1 import write_random_fo1

    ck = str(tmp_path / "VLM-FO1_Qwen2.5-VL-3B-tiny")
    write_random_fo1(ck, size="tiny", tiktoken_path=str(TIKTOKEN))
    cache = str(tmp_path / "cache")
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    boxes = [[4, 4, 60, 50], [30, 20, 120, 90], [0, 0, 127, 95]]

    prefix = os.path.realpath(ck)

    def run(**kw):
        gc.collect()                                    # the earlier models' mappings go now
        before = mapped_rss_kib(prefix)
        m = VLMFO1.from_pretrained(ck, threads=2, **kw)
        run.touched = mapped_rss_kib(prefix) - before   # checkpoint pages the load read through its mappings
        feats = m.encode_features(img, boxes)
        return m.detect(img, "cat", boxes=boxes, max_new_tokens=6).token_ids, feats[0], feats[2]

    fresh = run(dtype="int8", cache_dir=False)
    first = run(dtype="int8", cache_dir=cache)
    assert len(files(cache)) == 5                       # decoder layers, output layer, ViT, DaViT, HFRE
    run(dtype="mixed", cache_dir=cache)                 # the int8 decoder's files again
    assert len(files(cache)) == 5
    fresh4 = run(dtype="int4", cache_dir=False)
    run(dtype="int4", cache_dir=cache)
    assert len(files(cache)) == 6
    no_quantizer()
    second = run(dtype="int8", cache_dir=cache)
    ckpt = Checkpoint(ck)
    quantized = sum(ckpt.info(n).end - ckpt.info(n).begin for n in ckpt.keys()
                    if len(ckpt.info(n).shape) > 1 and "embed_tokens" not in ckpt.info(n).name)
    ckpt.close()
    print(f"checkpoint pages touched by a cached int8 load: {run.touched} KiB of {quantized // 1024} KiB of "
          f"matrices")
    assert run.touched * 1024 < 0.05 * quantized        # the sources of the quantized matrices were not read
    assert first[0] == fresh[0] == second[0]
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(first[1:], fresh[1:], second[1:]))
    assert run(dtype="int4", cache_dir=cache)[0] == fresh4[0]


def test_f16_sources_are_not_read_on_a_hit(tmp_path, no_quantizer):
    """An F16 checkpoint's matrices are widened only on a miss (weight_cache.Deferred)."""
    bf16 = write_random_qwen2(str(tmp_path / "bf16"), dtype="bfloat16", seed=0, hidden_size=256,
                              intermediate_size=2048, **dict(SMALL, vocab_size=512))
    ck = Checkpoint(bf16)
    f16 = tmp_path / "f16"
    f16.mkdir()
    shutil.copy(os.path.join(bf16, "config.json"), f16 / "config.json")
    entries = []
    for n in ck.keys():
        a = ck.get(n)
        a = (a.astype(np.uint32) << 16).view(np.float32).astype(np.float16) if ck.info(n).dtype == "BF16" else a
        entries.append((n, "F16", a.shape, (lambda a=a: a)))
    ck.close()
    write_streaming(str(f16 / "model.safetensors"), entries)
    cache = str(tmp_path / "cache")
    _, fresh = logits(str(f16), "int8", cache_dir=False)
    logits(str(f16), "int8", cache_dir=cache)
    no_quantizer()
    prefix = os.path.realpath(str(f16))
    gc.collect()                                        # the earlier models' mappings go now, not while measured
    before = mapped_rss_kib(prefix)
    lm, second = logits(str(f16), "int8", cache_dir=cache)
    touched = mapped_rss_kib(prefix) - before
    layers = sum(lm._tensors[f"layers.{l}.{k}"].size * 2 for l in range(2) for k in vlmfo1.decoder.LINEAR)
    print(f"F16 checkpoint pages touched by a cached int8 load: {touched} KiB of {layers // 1024} KiB of layers")
    # the embedding table (widened) and the vectors only, each with the up to 64 KiB the kernel maps around a fault
    assert touched * 1024 < 0.3 * layers
    assert np.array_equal(second, fresh)


def test_upn_int8_cached(tmp_path, no_quantizer):
    path = str(tmp_path / "upn.safetensors")
    write_random_upn(path, size="tiny")
    cache = str(tmp_path / "cache")
    img = np.random.default_rng(5).integers(0, 255, (80, 120, 3), dtype=np.uint8)
    fresh = UPN.from_pretrained(path, dtype="int8", n_threads=2, cache_dir=False).predict(img)
    first = UPN.from_pretrained(path, dtype="int8", n_threads=2, cache_dir=cache).predict(img)
    assert len(files(cache)) == 2                       # the Swin backbone and the detector
    no_quantizer()
    second = UPN.from_pretrained(path, dtype="int8", n_threads=2, cache_dir=cache).predict(img)
    for k in ("boxes", "scores"):
        assert np.array_equal(first[k], fresh[k]) and np.array_equal(second[k], fresh[k])


def test_upn_torch_file_cached(tmp_path, no_quantizer):
    torch = pytest.importorskip("torch")
    st = str(tmp_path / "upn.safetensors")
    write_random_upn(st, size="tiny")
    ck = Checkpoint(st)
    sd = {n: torch.from_numpy(np.array(ck.get(n))) for n in ck.keys()}
    ck.close()
    pth = str(tmp_path / "upn.pth")
    torch.save({"model": sd}, pth)
    cache = str(tmp_path / "cache")
    img = np.random.default_rng(6).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    fresh = UPN.from_pretrained(pth, dtype="int8", n_threads=2, cache_dir=cache).predict(img)
    assert len(files(cache)) == 2
    no_quantizer()
    assert np.array_equal(UPN.from_pretrained(pth, dtype="int8", n_threads=2, cache_dir=cache).predict(img)["scores"],
                          fresh["scores"])


def test_in_memory_sources_are_not_cached(qwen, tmp_path, monkeypatch):
    from conftest import DictCheckpoint
    from vlmfo1.options import read_config
    from vlmfo1.upn import infer_config, load_upn_state_dict

    monkeypatch.setenv("VLMFO1_CACHE_DIR", str(tmp_path / "env"))
    ck = Checkpoint(qwen)
    arrays = {n: np.array(ck.get(n)) for n in ck.keys()}
    ck.close()
    LanguageModel.from_checkpoint(DictCheckpoint(arrays), read_config(qwen), dtype="int8", n_threads=1)
    upn = str(tmp_path / "upn.safetensors")
    write_random_upn(upn, size="tiny")
    sd, meta = load_upn_state_dict(upn)
    UPN(infer_config(sd, meta), sd, dtype="int8", n_threads=1)
    assert files(str(tmp_path / "env")) == []


# ---------------------------------------------------------------------------------------------- invalidation

def test_changed_checkpoint_is_quantized_again(qwen, tmp_path):
    cache = str(tmp_path / "cache")
    _, old = logits(qwen, "int8", cache_dir=cache)
    assert len(files(cache)) == 2
    write_random_qwen2(qwen, dtype="bfloat16", seed=1, **SMALL)     # same names, shapes and size; other weights
    _, new = logits(qwen, "int8", cache_dir=cache)
    assert len(files(cache)) == 4
    _, fresh = logits(qwen, "int8", cache_dir=False)
    assert np.array_equal(new, fresh) and not np.array_equal(new, old)
    st = os.stat(os.path.join(qwen, "model.safetensors"))
    os.utime(os.path.join(qwen, "model.safetensors"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # touch
    calls = []
    real = vlmfo1.quant.core.quantize_i8

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    try:
        vlmfo1.quant.core.quantize_i8 = counting
        _, touched = logits(qwen, "int8", cache_dir=cache)
    finally:
        vlmfo1.quant.core.quantize_i8 = real
    assert calls and len(files(cache)) == 6 and np.array_equal(touched, fresh)
    # what `cache clear --stale` removes: the four files of the old contents and the old mtime
    assert sum(f.stale for f in wc.cache_info(cache)["files"]) == 4
    assert len(wc.clear_cache(cache, stale_only=True)) == 4 and len(files(cache)) == 2


def test_format_version_is_part_of_the_key(qwen, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    logits(qwen, "int8", cache_dir=cache)
    monkeypatch.setattr(wc, "FORMAT_VERSION", wc.FORMAT_VERSION + 1)
    logits(qwen, "int8", cache_dir=cache)
    assert len(files(cache)) == 4


# ---------------------------------------------------------------------------------------------- bad cache files

def _truncate(p):
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def _empty(p):
    open(p, "wb").close()


def _garbage_header(p):
    with open(p, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{")


def _other_key(p):   # a well-formed file whose key names other sources (same length, so the layout stays valid)
    with open(p, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = f.read(n)
        i = h.index(b'"bits\\":')
        f.seek(8 + i + len(b'"bits\\":'))
        f.write(b"7")


def _nan_scale(p):
    h = read_header(p)
    name = next(n for n in h.tensors if n.endswith("_scale"))
    with open(p, "r+b") as f:
        f.seek(h.tensors[name].begin)
        f.write(np.full(2, np.nan, np.float32).tobytes())


def _wrong_shape(p):   # the right key, arrays of other shapes
    h = read_header(p)
    key = h.metadata["vlmfo1_weight_cache"]
    q = next(n for n in h.tensors if not n.endswith(("_scale", "_wsum", "_sub")) and n != "__pad__")
    shape = tuple(h.tensors[q].shape)      # [n][k], or [panels][k / 4][32][4] packed (vlmfo1.quant)
    n = int(h.tensors[q + "_scale"].shape[0])
    bad = shape[:-1] + (shape[-1] - 1,)
    write_streaming(p, [(q, "I8", bad, lambda: np.zeros(bad, np.int8)),
                        (q + "_scale", "F32", (n,), lambda: np.ones(n, np.float32)),
                        (q + "_wsum", "F32", (n,), lambda: np.zeros(n, np.float32))], {"vlmfo1_weight_cache": key})


@pytest.mark.parametrize("damage", [_truncate, _empty, _garbage_header, _other_key, _nan_scale, _wrong_shape])
def test_bad_cache_file_warns_and_is_rewritten(qwen, tmp_path, damage, no_quantizer):
    cache = str(tmp_path / "cache")
    _, fresh = logits(qwen, "int8", cache_dir=cache)
    victim = os.path.join(cache, files(cache)[0])
    spare = str(tmp_path / "spare")                     # damaged beside it, then renamed over it: a mapping of the
    shutil.copy(victim, spare)                          # old file (a model not yet collected) never sees it shrink
    damage(spare)
    os.replace(spare, victim)
    with pytest.warns(RuntimeWarning, match=f"ignoring {victim}: .*quantizing again and rewriting it"):
        _, again = logits(qwen, "int8", cache_dir=cache)
    assert np.array_equal(again, fresh)
    no_quantizer()                                      # rewritten: the next load is a clean hit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, third = logits(qwen, "int8", cache_dir=cache)
    assert np.array_equal(third, fresh)


def test_unreadable_cache_file(qwen, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    _, fresh = logits(qwen, "int8", cache_dir=cache)
    victim = os.path.join(cache, files(cache)[0])
    if os.geteuid() != 0:
        os.chmod(victim, 0)
    else:                                               # root reads any file: the error is made up
        real = wc.SafetensorsFile

        def refuse(path, *a, **k):
            if os.fspath(path) == victim:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), victim)
            return real(path, *a, **k)
        monkeypatch.setattr(wc, "SafetensorsFile", refuse)
    with pytest.warns(RuntimeWarning, match=f"ignoring {victim}: .*Permission denied"):
        _, again = logits(qwen, "int8", cache_dir=cache)
    assert np.array_equal(again, fresh)


# ---------------------------------------------------------------------------------------------- folders

def test_unwritable_folder_warns_once(qwen, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = str(blocker / "cache")
    _, fresh = logits(qwen, "int8", cache_dir=False)
    with pytest.warns(RuntimeWarning, match="cannot write to .*without caching") as rec:
        _, got = logits(qwen, "int8", cache_dir=cache)
    assert len([w for w in rec if "cannot write" in str(w.message)]) == 1   # two quantize calls, one warning
    assert np.array_equal(got, fresh)


def test_read_only_folder(qwen, tmp_path, no_quantizer):
    cache = tmp_path / "ro"
    _, fresh = logits(qwen, "int8", cache_dir=str(cache))
    os.chmod(cache, 0o555)
    try:
        if os.geteuid() != 0:                           # (root writes anyway)
            with pytest.warns(RuntimeWarning, match="cannot write"):
                logits(qwen, "int4", cache_dir=str(cache))
        no_quantizer()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, got = logits(qwen, "int8", cache_dir=str(cache))   # a read-only cache still serves its files
        assert np.array_equal(got, fresh)
    finally:
        os.chmod(cache, 0o755)


def test_full_disk(qwen, tmp_path, monkeypatch):
    cache = tmp_path / "full"

    def enospc(path, entries, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(wc, "write_streaming", enospc)
    _, fresh = logits(qwen, "int8", cache_dir=False)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        _, got = logits(qwen, "int8", cache_dir=str(cache))
    assert np.array_equal(got, fresh)
    assert os.listdir(cache) == []                      # no temporary file is left behind


def test_concurrent_writers(qwen, tmp_path):
    cache = str(tmp_path / "cache")
    out, errors = {}, []

    def load(i):
        try:
            out[i] = logits(qwen, "int4", cache_dir=cache)[1]
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert not [w for w in rec if "weight cache" in str(w.message)]
    assert len(files(cache)) == 2 and sorted(os.listdir(cache)) == files(cache)    # no temporary file left
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])


def test_cache_dir_false_writes_nothing(qwen, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFO1_CACHE_DIR", str(tmp_path / "env"))
    logits(qwen, "int8", cache_dir=False)
    assert not os.path.exists(tmp_path / "env")


def test_default_folder(qwen, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFO1_CACHE_DIR", str(tmp_path / "env"))
    logits(qwen, "int8")                                # cache_dir=None: the environment's folder
    assert len(files(str(tmp_path / "env"))) == 2
    monkeypatch.setenv("VLMFO1_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert wc.default_cache_dir() == str(tmp_path / "xdg" / "vlmfo1" / "weights")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert wc.default_cache_dir() == str(tmp_path / "home" / ".cache" / "vlmfo1" / "weights")


def test_bad_cache_dir_argument(qwen):
    for bad, exc in ((1, TypeError), (True, TypeError), ("", ValueError), (["x"], TypeError)):
        with pytest.raises(exc, match="cache_dir"):
            LanguageModel.load(qwen, dtype="int8", cache_dir=bad)
        with pytest.raises(exc, match="cache_dir"):
            VLMFO1.from_pretrained(qwen, dtype="int8", cache_dir=bad)


def test_eval_run_identity_ignores_the_cache_folder(tmp_path):
    from vlmfo1.eval.runner import ModelSpec

    (tmp_path / "config.json").write_text("{}")
    a = ModelSpec.of(str(tmp_path), {"dtype": "int8", "cache_dir": "/somewhere"}).identity()
    assert a == ModelSpec.of(str(tmp_path), {"dtype": "int8"}).identity()
    assert ModelSpec.of(str(tmp_path), {"dtype": "int8", "cache_dir": False}).options["cache_dir"] is False


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_cache_info_and_clear(qwen, tmp_path, capsys):
    cache = tmp_path / "cache"
    logits(qwen, "int4", cache_dir=str(cache))
    (cache / "notes.txt").write_text("not ours")        # clear never touches other files
    (cache / (".q8-" + "0" * 64 + ".123.abcd1234.tmp")).write_bytes(b"x" * 10)   # a killed writer's leftover
    capsys.readouterr()
    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert str(cache) in out and "2 files" in out and "int4" in out and "int8" in out and "temporary" in out
    assert os.path.realpath(os.path.join(qwen, "model.safetensors")) in out
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "removed 3 files" in out and "0 left" in out
    assert os.listdir(cache) == ["notes.txt"]
    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    assert "0 files, 0 B" in capsys.readouterr().out


def test_cli_cache_uses_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLMFO1_CACHE_DIR", str(tmp_path / "env"))
    assert main(["cache", "info"]) == 0
    assert f"{tmp_path / 'env'} ($VLMFO1_CACHE_DIR)" in capsys.readouterr().out


@needs_tokenizer
def test_cli_no_cache_and_cache_dir(tmp_path, monkeypatch, capsys):
    ck = str(tmp_path / "ck")
    assert main(["random-checkpoint", ck, "--tiktoken", str(TIKTOKEN)]) == 0
    monkeypatch.setenv("VLMFO1_CACHE_DIR", str(tmp_path / "env"))
    gen = ["generate", "--model", ck, "Hello", "--max-new-tokens", "3", "--dtype", "int8", "--threads", "2"]
    capsys.readouterr()
    assert main(gen + ["--no-cache"]) == 0
    a = capsys.readouterr().out
    assert not os.path.exists(tmp_path / "env")
    assert main(gen + ["--cache-dir", str(tmp_path / "mine")]) == 0
    assert capsys.readouterr().out == a and len(files(str(tmp_path / "mine"))) == 2
    assert main(gen) == 0                               # the default: $VLMFO1_CACHE_DIR
    assert capsys.readouterr().out == a and len(files(str(tmp_path / "env"))) == 2
    assert main(gen + ["--no-cache", "--cache-dir", "x"]) == 1
    assert "not allowed with argument" in capsys.readouterr().err


def test_packed_and_row_layouts_are_separate_entries(tmp_path):
    """int8 matrices are cached in the layout the load asked for (packed panels where the VNNI kernel runs, rows
    elsewhere): two entries, each served back only to its own layout, holding the same codes."""
    from vlmfo1.quant import quantize_linear, unpack_i8
    from vlmfo1.weight_cache import Origin
    w = np.random.default_rng(3).standard_normal((70, 40)).astype(np.float32)
    org = Origin(str(tmp_path), {"w": {"file": "test-source", "size": 1}})
    packed = quantize_linear({"w": w}, ["w"], 1, cache=org, pack=True)
    rows = quantize_linear({"w": w}, ["w"], 1, cache=org, pack=False)
    assert packed["w"].shape == (3, 10, 32, 4) and rows["w"].shape == (70, 40)
    assert len(os.listdir(tmp_path)) == 2
    for pack, first in ((True, packed), (False, rows)):
        again = quantize_linear({"w": w}, ["w"], 1, cache=org, pack=pack)   # hits: mapped from the file
        assert not again["w"].flags.writeable
        assert all(np.array_equal(again[k], first[k]) for k in ("w", "w_scale", "w_wsum"))
    assert np.array_equal(unpack_i8(packed["w"], 70), rows["w"])
