"""Reference side of the parity tests: tiny random Qwen2 checkpoints written with transformers, and
transformers runs over them (fp32, eager attention, KV cache, one token at a time).

Test-only: imports torch and transformers, which the vlmfo1 package itself never does.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

# Shapes of the tiny model.  Deliberately not powers of two where the engine may tile (MLP width, vocab,
# prompt length) so that tail handling in the kernels is exercised; head_dim = 128 / 4 = 32.
TINY_DEFAULTS = dict(
    vocab_size=300,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    hidden_act="silu",
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def tiny_qwen2_config(**overrides):
    """A tiny `transformers.Qwen2Config` (TINY_DEFAULTS updated with overrides)."""
    from transformers import Qwen2Config

    kw = dict(TINY_DEFAULTS)
    kw.update(overrides)
    return Qwen2Config(**kw)


@torch.no_grad()
def randomize_qwen2_(model, seed: int = 0, gain: float = 1.0, qk_gain: float = 3.0):
    """Fill a Qwen2ForCausalLM with weights that make activations O(1) everywhere (the default
    init, normal std 0.02, gives near-uniform attention and near-flat logits, which hides bugs).

    Linear weights: normal, std k * gain / sqrt(fan_in) with k = qk_gain (default 3) for q/k: sharp,
    position-dependent attention, so rotary or cache-position bugs change the output; k = 2 for
    o/down: layer outputs outweigh the embedding in the residual, else a tied random model just
    echoes one token; k = 3 for an untied lm_head; k = 1 otherwise.
    Biases: q/k std 0.5 (like the large q/k biases of real Qwen2), v std 0.1.
    RMSNorm weights: uniform [0.6, 1.4].  Embeddings: normal std 0.25.
    With the tiny defaults: logits up to ~12, greedy continuation of ~28 distinct tokens in 33.
    """
    g = torch.Generator().manual_seed(seed)

    def normal_(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * std + mean)

    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            normal_(p, 0.25)
        elif "norm" in name:
            p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g, dtype=torch.float32))
        elif name.endswith(".bias"):
            normal_(p, 0.1 if "v_proj" in name else 0.5)
        elif name.endswith(".weight") and p.dim() == 2:  # linear layers incl. an untied lm_head
            k = (qk_gain if ("q_proj" in name or "k_proj" in name) else 3.0 if "lm_head" in name
                 else 2.0 if ("o_proj" in name or "down_proj" in name) else 1.0)
            normal_(p, gain * k / math.sqrt(p.shape[1]))
        else:
            raise AssertionError(f"unexpected parameter {name} {tuple(p.shape)}")
    return model


def _rewrite_config(dirpath: str, dtype: str, config_style: str):
    """Make config.json look like a given era of checkpoint.

    "qwen2.5": what real Qwen2.5 checkpoints ship (written by transformers 4.4x): `torch_dtype`,
    top-level `rope_theta`, `rope_scaling: null`, `sliding_window` set but `use_sliding_window` false.
    "v5": what transformers 5 writes (`dtype`, `rope_parameters`, `layer_types`), plus `torch_dtype`.
    """
    path = os.path.join(dirpath, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    if config_style == "qwen2.5":
        rope = cfg.pop("rope_parameters", None) or {}
        cfg.pop("dtype", None)
        cfg.pop("layer_types", None)
        cfg["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 1e6)))
        cfg["rope_scaling"] = None
        cfg["sliding_window"] = 32768
        cfg["use_sliding_window"] = False
        cfg["max_window_layers"] = cfg["num_hidden_layers"]
    elif config_style == "v5":
        cfg["dtype"] = dtype
    else:
        raise ValueError(f"config_style must be 'qwen2.5' or 'v5', not {config_style!r}")
    cfg["torch_dtype"] = dtype
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def make_tiny_qwen2(dirpath, dtype: str = "float32", sharded: bool = False, seed: int = 0,
                    config_style: str = "qwen2.5", qk_gain: float = 3.0, **overrides):
    """Write a tiny random Qwen2ForCausalLM checkpoint to `dirpath` and return the reference model.

    dtype: dtype of the tensors on disk ("float32" or "bfloat16").
    sharded: write >= 2 shards (model-0000x-of-0000y.safetensors + model.safetensors.index.json).
    qk_gain: sharpness of attention (see randomize_qwen2_); lower = less sensitive to rounding.
    overrides: Qwen2Config fields (e.g. tie_word_embeddings=False, num_hidden_layers=3).

    Returns the model loaded back from `dirpath` by transformers in fp32 with eager attention, in
    eval mode: for a bf16 checkpoint, that is an fp32 model holding the bf16-rounded weights.
    """
    from transformers import Qwen2ForCausalLM

    dirpath = str(dirpath)
    os.makedirs(dirpath, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_qwen2_config(**overrides))
    randomize_qwen2_(model, seed=seed, qk_gain=qk_gain)
    model.eval()
    model.to(_torch_dtype(dtype))
    kw = {}
    if sharded:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        kw["max_shard_size"] = max(total // 3, 1024)  # -> 3 or 4 shards
    model.save_pretrained(dirpath, safe_serialization=True, **kw)
    _rewrite_config(dirpath, dtype, config_style)
    if sharded:
        names = os.listdir(dirpath)
        assert "model.safetensors.index.json" in names, names
        assert sum(n.endswith(".safetensors") for n in names) >= 2, names
    return load_hf(dirpath, "float32")


def load_hf(dirpath, dtype="float32", attn_implementation: str = "eager"):
    """Load a checkpoint folder in transformers as `dtype` (e.g. "bfloat16" for a bf16 reference run
    of a bf16 checkpoint, "float32" for an fp32 run of the same, bf16-rounded, weights)."""
    from transformers import Qwen2ForCausalLM

    m = Qwen2ForCausalLM.from_pretrained(str(dirpath), dtype=_torch_dtype(dtype),
                                         attn_implementation=attn_implementation)
    return m.eval()


def round_inv_freq_to_bf16_(model):
    """Emulate the original bf16 reference: rotary inv_freq rounded to bf16 (the engine's
    mode="reference").  Mutates and returns the model."""
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and isinstance(mod.inv_freq, torch.Tensor):
            mod.inv_freq.copy_(mod.inv_freq.to(torch.bfloat16).to(mod.inv_freq.dtype))
            if hasattr(mod, "original_inv_freq"):
                mod.original_inv_freq = mod.inv_freq.clone()
    return model


def bf16_round(x) -> np.ndarray:
    """Round-to-nearest-even to bf16, returned as float32 numpy (no torch needed by callers)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return t.to(torch.bfloat16).to(torch.float32).numpy()


# --------------------------------------------------------------------------- reference runs


def _forward(model, ids, cache=None):
    """One forward with a KV cache; works with the transformers 5 (`cache=`) and 4.x
    (`past_key_values=`) spellings.  Returns (logits [1, T, V] fp32 tensor, cache)."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)
    kw = {"use_cache": True}
    if cache is not None:
        if "cache" in _forward_params(model):
            kw["cache"] = cache
        else:
            kw["past_key_values"] = cache
    out = model(input_ids=ids, **kw)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits.float(), new_cache


def _forward_params(model):
    import inspect

    cls = type(model)
    cached = getattr(cls, "_vlm_forward_params", None)
    if cached is None:
        cached = frozenset(inspect.signature(cls.forward).parameters)
        cls._vlm_forward_params = cached
    return cached


@dataclass
class RefRun:
    prefill: np.ndarray            # [T, vocab] float64: logits of every prompt position
    steps: list = field(default_factory=list)   # n_steps x [vocab] float64: logits after each decode step
    tokens: list = field(default_factory=list)  # n_steps + 1 greedy tokens: tokens[0] = argmax(prefill[-1])

    def __iter__(self):  # (prefill, steps, tokens) unpacking
        return iter((self.prefill, self.steps, self.tokens))

    def margins(self):
        """top-1 minus top-2 logit of the distributions the greedy tokens were drawn from."""
        rows = [self.prefill[-1]] + list(self.steps)
        out = []
        for r in rows:
            top2 = np.partition(r, -2)[-2:]
            out.append(float(top2[1] - top2[0]))
        return out


@torch.no_grad()
def ref_prefill_and_steps(model, ids, n_steps: int, feed_tokens=None, argmax_on=None) -> RefRun:
    """Reference run: prefill `ids` in one forward, then `n_steps` single-token decode steps with the
    KV cache.  Step i feeds tokens[i] (greedy: argmax of the previous logits, or
    `argmax_on(logits)` if given, e.g. bf16_round) unless `feed_tokens` forces the fed tokens
    (teacher forcing).  Returns RefRun(prefill [T, V] f64, steps list of [V] f64, greedy tokens with
    len n_steps + 1: the token chosen after the prefill and after each step)."""
    pick = (lambda l: int(np.argmax(argmax_on(l)))) if argmax_on else (lambda l: int(np.argmax(l)))
    logits, cache = _forward(model, ids)
    prefill = logits[0].double().numpy()
    run = RefRun(prefill=prefill)
    run.tokens.append(pick(prefill[-1]))
    for i in range(n_steps):
        fed = run.tokens[-1] if feed_tokens is None else int(feed_tokens[i])
        logits, cache = _forward(model, [fed], cache)
        row = logits[0, -1].double().numpy()
        run.steps.append(row)
        run.tokens.append(pick(row))
    return run


@torch.no_grad()
def ref_full_forward(model, ids) -> np.ndarray:
    """Logits [T, V] (float64) of one forward over `ids` without a cache (cross-check of the
    cached path)."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)
    return model(input_ids=ids, use_cache=False).logits[0].double().numpy()


BF16_ATTENTION = "vlmfo1_bf16_emulation"


def _bf16_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The engine's bf16 attention (csrc/attention.c) in torch: q·scale, k and v rounded to bf16, scores summed in
    fp32, softmax in fp32 with the exponentials rounded to bf16 before they meet v (the engine rounds them against
    its running maximum, here against the row's maximum), normalized by the fp32 sum."""
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv

    r = lambda t: t.to(torch.bfloat16).to(torch.float32)   # noqa: E731
    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    s = r(query * scaling) @ r(k).transpose(2, 3)
    if attention_mask is not None:
        s = s + attention_mask
    e = torch.exp(s - s.amax(-1, keepdim=True))
    out = (r(e) @ r(v)) / e.sum(-1, keepdim=True)
    return out.transpose(1, 2).contiguous(), None


def bf16_compute_emulation(model):
    """A copy of `model` with the engine's compute="bf16" numerics: the input of every nn.Linear rounded to bf16
    (weights are already bf16 values for a bf16 checkpoint) and the attention of _bf16_attention, fp32 accumulation
    elsewhere.  Used to justify the bf16 tolerance, not in the assertions."""
    import copy

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(BF16_ATTENTION, _bf16_attention)
    AttentionMaskInterface.register(BF16_ATTENTION, eager_mask)   # additive float masks, as eager attention takes
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(
                lambda _m, args: (args[0].to(torch.bfloat16).to(torch.float32),) + tuple(args[1:]))
    m.config._attn_implementation = BF16_ATTENTION
    for sub in m.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = BF16_ATTENTION
    return m


def rel_err(a, b) -> float:
    """max|a - b| / max|b| (b is the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
