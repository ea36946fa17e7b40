"""Bad input never crashes the interpreter: corrupt/truncated safetensors, wrong dtypes, missing keys,
shape mismatches, bad token ids, empty and over-long prompts, misuse of sessions across threads.
Checkpoints here are written with NumPy only (no torch needed)."""
import json
import os
import struct
import threading

import numpy as np
import pytest

import vlmfo1
from vlmfo1.safetensors import Checkpoint, f32_to_bf16_bits, save_file

CFG = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=32, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=64, rms_norm_eps=1e-6,
           rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=128, eos_token_id=63)


def random_tensors(cfg=CFG, seed=0, dtype="F32"):
    rng = np.random.default_rng(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D = H // cfg["num_attention_heads"]
    Q, KV = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        shapes.update({p + "self_attn.q_proj.weight": (Q, H), p + "self_attn.q_proj.bias": (Q,),
                       p + "self_attn.k_proj.weight": (KV, H), p + "self_attn.k_proj.bias": (KV,),
                       p + "self_attn.v_proj.weight": (KV, H), p + "self_attn.v_proj.bias": (KV,),
                       p + "self_attn.o_proj.weight": (H, Q), p + "mlp.gate_proj.weight": (I, H),
                       p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
                       p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
    out = {}
    for n, s in shapes.items():
        a = (1 + 0.1 * rng.standard_normal(s) if "norm" in n else 0.3 * rng.standard_normal(s)).astype(np.float32)
        out[n] = (dtype, f32_to_bf16_bits(a)) if dtype == "BF16" else ("F32", a)
    return out


def write_ckpt(path, tensors=None, cfg=CFG):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(random_tensors(cfg) if tensors is None else tensors, os.path.join(path, "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_ckpt(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def lm(good):
    return vlmfo1.LanguageModel.load(good, n_threads=2, max_context=64)


def test_good_checkpoint_generates(lm):
    out = lm.generate([1, 2, 3], max_new_tokens=5, stop_ids=[])
    assert len(out) == 5 and all(0 <= t < 64 for t in out)


def test_truncated_file(tmp_path, good):
    data = open(os.path.join(good, "model.safetensors"), "rb").read()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        d = tmp_path / f"cut{cut}"
        os.makedirs(d)
        open(d / "config.json", "w").write(json.dumps(CFG))
        open(d / "model.safetensors", "wb").write(data[:cut])
        with pytest.raises(ValueError, match="safetensors|truncated|offsets"):
            vlmfo1.LanguageModel.load(str(d))


def test_corrupt_header(tmp_path, good):
    data = bytearray(open(os.path.join(good, "model.safetensors"), "rb").read())
    bad = [struct.pack("<Q", 2**62) + data[8:],      # absurd header length
           data[:8] + b"\xff\xfe{not json" + data[18:],  # garbage JSON
           data[:8] + b"[" + data[9:]]                    # JSON that is not an object / invalid
    for i, blob in enumerate(bad):
        d = tmp_path / f"bad{i}"
        os.makedirs(d)
        open(d / "config.json", "w").write(json.dumps(CFG))
        open(d / "model.safetensors", "wb").write(bytes(blob))
        with pytest.raises(ValueError, match="header"):
            vlmfo1.LanguageModel.load(str(d))


def test_wrong_dtype(tmp_path):
    t = random_tensors()
    t["model.layers.0.mlp.up_proj.weight"] = ("I32", t["model.layers.0.mlp.up_proj.weight"][1].view(np.int32))
    with pytest.raises(ValueError, match="dtype"):
        vlmfo1.LanguageModel.load(write_ckpt(tmp_path / "c", t))


def test_unknown_dtype_in_header(tmp_path, good):
    data = open(os.path.join(good, "model.safetensors"), "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].replace(b'"F32"', b'"Q4K"', 1)
    d = tmp_path / "q"
    os.makedirs(d)
    open(d / "config.json", "w").write(json.dumps(CFG))
    open(d / "model.safetensors", "wb").write(data[:8] + header + data[8 + n:])
    with pytest.raises(ValueError, match="unsupported dtype Q4K"):
        vlmfo1.LanguageModel.load(str(d))


def test_missing_key(tmp_path):
    t = random_tensors()
    del t["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_proj.bias"):
        vlmfo1.LanguageModel.load(write_ckpt(tmp_path / "c", t))


def test_unexpected_key(tmp_path):
    t = random_tensors()
    t["model.layers.0.mlp.extra.weight"] = ("F32", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight"):
        vlmfo1.LanguageModel.load(write_ckpt(tmp_path / "c", t))


def test_shape_mismatch(tmp_path):
    t = random_tensors()
    t["model.layers.0.mlp.gate_proj.weight"] = ("F32", np.zeros((40, 32), np.float32))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight: shape \(40, 32\), expected \(48, 32\)"):
        vlmfo1.LanguageModel.load(write_ckpt(tmp_path / "c", t))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        vlmfo1.LanguageModel.load(str(tmp_path / "nowhere"))
    d = tmp_path / "noweights"
    os.makedirs(d)
    open(d / "config.json", "w").write(json.dumps(CFG))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        vlmfo1.LanguageModel.load(str(d))
    open(d / "config.json", "w").write("{broken")
    with pytest.raises(ValueError, match="config.json"):
        vlmfo1.LanguageModel.load(str(d))


def test_missing_shard(tmp_path, good):
    d = tmp_path / "sh"
    os.makedirs(d)
    open(d / "config.json", "w").write(json.dumps(CFG))
    names = list(Checkpoint(good).keys())
    json.dump({"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}},
              open(d / "model.safetensors.index.json", "w"))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
        vlmfo1.LanguageModel.load(str(d))


def test_bad_prompts(lm):
    s = lm.session(max_context=16)
    with pytest.raises(ValueError, match="empty"):
        s.prefill([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.prefill([1, 64])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.prefill([-1])
    with pytest.raises(ValueError, match="integers"):
        s.prefill(np.array([1.5]))
    with pytest.raises(ValueError, match="do not fit"):
        s.prefill(list(range(17)))
    assert s.n_past == 0
    s.prefill(list(range(16)))
    with pytest.raises(ValueError, match="do not fit"):
        s.step(1)
    with pytest.raises(ValueError):
        lm.generate([1], max_new_tokens=-1)
    with pytest.raises(ValueError):
        lm.generate([1], temperature=1.0, top_p=0.0)


def test_core_rejects_bad_ids_directly(lm):
    # the C core checks ids itself too (the Python checks are not the only guard)
    st = vlmfo1.decoder.core.Qwen2State(lm._core, 8, 8, 1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        st.forward(np.array([5, 99], np.int32), None, np.zeros((3, 2), np.int32))
    with pytest.raises(RuntimeError, match="context overflow"):
        st.forward(np.zeros(9, np.int32), None, np.zeros((3, 9), np.int32))
    with pytest.raises(ValueError, match="positions"):
        st.forward(np.zeros(2, np.int32), None, np.zeros((2, 2), np.int32))
    assert st.n_past == 0


def test_bad_options(good):
    with pytest.raises(ValueError, match="mode"):
        vlmfo1.LanguageModel.load(good, mode="fast")
    with pytest.raises(ValueError, match="dtype"):
        vlmfo1.LanguageModel.load(good, dtype="int3")
    with pytest.raises(ValueError, match="compute"):
        vlmfo1.LanguageModel.load(good, compute="fp8")


def test_sessions_in_parallel_threads(lm):
    """One model, several Python threads, one session each: same results as a serial run."""
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13]]
    serial = [lm.generate(p, max_new_tokens=8, stop_ids=[]) for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        results[i] = lm.generate(prompts[i], max_new_tokens=8, stop_ids=[])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_one_session_two_threads_is_refused(lm):
    s = lm.session(max_context=64)
    errors = []
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        try:
            for _ in range(20):
                s.prefill([1])
                s.truncate(0)
        except RuntimeError as e:
            errors.append(str(e))

    ts = [threading.Thread(target=run) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all("in use by another thread" in e for e in errors)
