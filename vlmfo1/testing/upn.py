"""Random-weight UPN checkpoints in the layout of the official model's state dict.

UPN (the Universal Proposal Network of ChatRex) proposes the boxes VLM-FO1 answers about. The official code is
`detect_tools/upn` of om-ai-lab/VLM-FO1 (e6bef8d): a Swin-L backbone (`swin_L_384_22k`, window 12, 4 output
stages), five 256-channel levels (`input_proj`: 1x1 conv + GroupNorm(32) per stage, one 3x3 stride-2 conv on the
last stage), a 6-layer deformable encoder, the two-stage query selection (contrastive logits against a learned
prompt embedding, top `num_queries`) and a 6-layer deformable decoder with one shared box MLP
(`configs/upn_large.py`). No trained weights are reachable here, so tests run on random weights written with exactly
the names, shapes and dtypes of `model.state_dict()` of the official `UPN` (manifests
tests/golden/upn_{tiny,full}_keys.json, generated from the official modules by tests/golden/make_upn_golden.py):

  backbone.model.backbone.*                  Swin (patch_embed, layers.{s}.blocks.{b}, layers.{s}.downsample, norm{s};
                                             attn.relative_position_index is an int64 BUFFER, written with its true
                                             values)
  input_proj.{0..4}.{0,1}.*                  level projections (conv, GroupNorm)
  transformer.level_embed, transformer.encoder.layers.*, transformer.decoder.layers.*, transformer.decoder.norm,
  transformer.decoder.ref_point_head*, transformer.tgt_embed, transformer.enc_output(_norm),
  transformer.enc_out_bbox_embed, transformer.{fine,coarse}_grained_prompt
  bbox_embed.{i}.* and transformer.decoder.bbox_embed.{i}.*   ONE shared MLP listed 2 x dec_layers times: every alias
                                             is written, with identical values (load_state_dict(strict=True) works)

`class_embed` (ContrastiveAssign) has no parameters. The state dict carries no config: the checkpoint's safetensors
metadata holds it as JSON under "upn_config" (see `upn_config`); `upn_config("full")` is the canonical UPN-large
config, which a loader of the official upn_large.pth (no metadata) assumes.

size="tiny": the same architecture with small sizes: Swin embed_dim 32, depths [2, 2, 2, 2] (every stage has a
shifted-window block, so shifts, masks and window padding run at every resolution), heads [1, 2, 4, 8], window 12;
2 encoder and 2 decoder layers, d_ffn 256, 300 queries. d_model stays 256 (the decoder's sine embedding hard-codes
128 features per coordinate, 512 = 2 * d_model, upn_decoder.py) and the GroupNorms keep 32 groups.

Every tensor comes from its own NumPy generator seeded by (seed, crc32(name)) (the scheme of vlmfo1.testing.fo1);
aliases of the shared box MLP use the name `bbox_embed.0.*`. Scales (see `_init`) keep activations O(1): norm
weights 1 + 0.1 N, biases 0.05 N, weights N / sqrt(fan_in); `relative_position_bias_table` 0.2 N; `level_embed` and
`tgt_embed` N(0, 1) as the official init; sampling-offset biases 2 N (pixels of each level). The output projections
of the encoder and decoder layers' residual branches (attention outputs, linear2) are at half scale: random
post-norm stacks collapse their tokens toward one common vector, and with full-scale branches all 900 UPN-large
scores land in (0.67, 0.98). The prompt embeddings are 0.125 N, so class logits (decoder state . prompt, norm
~16 x 0.125) spread over about +-4: the sigmoid scores cover (0.01, 0.99), about 60 % of them >= 0.3, and NMS at 0.8
removes some of those. `transformer.enc_output.bias` is ZERO: the two-stage selection zeroes the memory of invalid
proposals (near the borders), which then all share the logit LN(enc_output.bias) . prompt; with a zero bias that
logit is enc_output_norm.bias . prompt ~ 0, far below the top-k, so this exact tie never enters the selection.

Only the standard library, NumPy and vlmfo1 modules are imported. Test and demo code only: the runtime never imports
vlmfo1.testing.
"""
from __future__ import annotations

import copy
import json
import os
import re
import zlib
from typing import Dict, Optional, Tuple

import numpy as np

from ..safetensors import f32_to_bf16_bits, write_streaming

# configs/upn_large.py (+ the Swin defaults of models/backbone/swin.py and the encoder/decoder defaults it relies
# on: n_points 4, mlp_ratio 4, patch 4, LayerNorm eps 1e-5, GroupNorm eps 1e-5)
UPN_LARGE: Dict = {
    "model_type": "upn",
    "swin": {"name": "swin_L_384_22k", "embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48],
             "window_size": 12, "patch_size": 4, "in_chans": 3, "mlp_ratio": 4.0, "out_indices": [0, 1, 2, 3]},
    "d_model": 256,
    "n_heads": 8,
    "n_levels": 5,
    "n_points": 4,
    "enc_layers": 6,
    "dec_layers": 6,
    "d_ffn": 2048,
    "num_queries": 900,
    "groupnorm_groups": 32,
    "dec_pred_bbox_embed_share": True,
    "position_embedding": {"num_pos_feats": 128, "temperatureH": 20, "temperatureW": 20, "normalize": True},
    "image": {"min_size": 800, "max_size": 1333, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}
TINY_OVERRIDES: Dict = {
    "swin": {"name": None, "embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]},
    "enc_layers": 2,
    "dec_layers": 2,
    "d_ffn": 256,
    "num_queries": 300,
}
SIZES = ("tiny", "full")
DTYPES = {"float32": "F32", "bfloat16": "BF16"}

# value scales (see the module docstring)
_NORM_STD = 0.1
_BIAS_STD = 0.05
_REL_POS_STD = 0.2
_OFFSET_BIAS_STD = 2.0
_EMBED_STD = 1.0
_PROMPT_STD = 0.125
# Random post-norm transformer stacks collapse their tokens toward one common vector (every layer adds a branch
# output with a large shared component, LayerNorm then shrinks the per-token part): with plain 1/sqrt(fan_in) output
# projections the 6-layer UPN-large decoder ends with all 900 scores in (0.67, 0.98). Halving the branch outputs of
# the encoder and decoder layers keeps the queries distinct (scores ~ (0.01, 0.99)).
_BRANCH_GAIN = 0.5
_BRANCH = re.compile(r"^transformer\.(encoder|decoder)\.layers\.\d+\."
                     r"(self_attn\.output_proj|cross_attn\.output_proj|self_attn\.out_proj|linear2)\.weight$")


def upn_config(size: str = "tiny") -> Dict:
    """The UPN config of a size: "full" = configs/upn_large.py (canonical UPN-large), "tiny" = small test sizes."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    cfg = copy.deepcopy(UPN_LARGE)
    if size == "tiny":
        for k, v in TINY_OVERRIDES.items():
            if isinstance(v, dict):
                cfg[k].update(copy.deepcopy(v))
            else:
                cfg[k] = v
    cfg["size"] = size
    return cfg


def _check_config(cfg: Dict) -> None:
    s = cfg["swin"]
    if cfg["d_model"] != 256:
        raise ValueError("UPN's d_model must be 256 (the decoder's sine embedding hard-codes 128 per coordinate)")
    if len(s["depths"]) != 4 or len(s["num_heads"]) != 4:
        raise ValueError("UPN's Swin has 4 stages")
    for i, h in enumerate(s["num_heads"]):
        if (s["embed_dim"] << i) % h:
            raise ValueError(f"Swin stage {i}: dim {s['embed_dim'] << i} not divisible by {h} heads")
    if cfg["n_levels"] != 5:
        raise ValueError("UPN uses 5 feature levels (4 Swin stages + 1 downsampled)")


def relative_position_index(window: int) -> np.ndarray:
    """[window^2, window^2] int64: the Swin WindowAttention buffer, as the official module computes it."""
    c = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)   # 2, N
    rel = (c[:, :, None] - c[:, None, :]).transpose(1, 2, 0).astype(np.int64)                        # N, N, 2
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1)


def upn_shapes(cfg: Dict) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """name -> (shape, dtype name "float32" | "int64") of every state-dict entry, in the official order."""
    _check_config(cfg)
    s = cfg["swin"]
    C, W, D, F, Q = s["embed_dim"], s["window_size"], cfg["d_model"], cfg["d_ffn"], cfg["num_queries"]
    H, L, P = cfg["n_heads"], cfg["n_levels"], cfg["n_points"]
    hid = lambda c: int(c * s["mlp_ratio"])  # noqa: E731
    out: Dict[str, Tuple[Tuple[int, ...], str]] = {}

    def f(name, *shape):
        out[name] = (tuple(int(x) for x in shape), "float32")

    def ln(name, n):
        f(name + ".weight", n)
        f(name + ".bias", n)

    def lin(name, n_out, n_in, bias=True):
        f(name + ".weight", n_out, n_in)
        if bias:
            f(name + ".bias", n_out)

    b = "backbone.model.backbone."
    f(b + "patch_embed.proj.weight", C, s["in_chans"], s["patch_size"], s["patch_size"])
    f(b + "patch_embed.proj.bias", C)
    ln(b + "patch_embed.norm", C)
    dims = [C << i for i in range(4)]
    for i, (dim, depth, heads) in enumerate(zip(dims, s["depths"], s["num_heads"])):
        for j in range(depth):
            p = f"{b}layers.{i}.blocks.{j}."
            ln(p + "norm1", dim)
            f(p + "attn.relative_position_bias_table", (2 * W - 1) ** 2, heads)
            out[p + "attn.relative_position_index"] = ((W * W, W * W), "int64")
            lin(p + "attn.qkv", 3 * dim, dim)
            lin(p + "attn.proj", dim, dim)
            ln(p + "norm2", dim)
            lin(p + "mlp.fc1", hid(dim), dim)
            lin(p + "mlp.fc2", dim, hid(dim))
        if i < 3:
            lin(f"{b}layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
            ln(f"{b}layers.{i}.downsample.norm", 4 * dim)
    for i in s["out_indices"]:
        ln(f"{b}norm{i}", dims[i])

    t = "transformer."
    f(t + "level_embed", L, D)

    def msda(p):
        lin(p + "sampling_offsets", H * L * P * 2, D)
        lin(p + "attention_weights", H * L * P, D)
        lin(p + "value_proj", D, D)
        lin(p + "output_proj", D, D)

    for i in range(cfg["enc_layers"]):
        p = f"{t}encoder.layers.{i}."
        msda(p + "self_attn.")
        ln(p + "norm1", D)
        lin(p + "linear1", F, D)
        lin(p + "linear2", D, F)
        ln(p + "norm2", D)
    for i in range(cfg["dec_layers"]):
        p = f"{t}decoder.layers.{i}."
        msda(p + "cross_attn.")
        ln(p + "norm1", D)
        f(p + "self_attn.in_proj_weight", 3 * D, D)
        f(p + "self_attn.in_proj_bias", 3 * D)
        lin(p + "self_attn.out_proj", D, D)
        ln(p + "norm2", D)
        lin(p + "linear1", F, D)
        lin(p + "linear2", D, F)
        ln(p + "norm3", D)
    ln(t + "decoder.norm", D)
    lin(t + "decoder.ref_point_head.layers.0", D, 2 * D)
    lin(t + "decoder.ref_point_head.layers.1", D, D)
    lin(t + "decoder.ref_point_head_point.layers.0", D, D)
    lin(t + "decoder.ref_point_head_point.layers.1", D, D)

    def box_mlp(p):
        lin(p + "layers.0", D, D)
        lin(p + "layers.1", D, D)
        lin(p + "layers.2", 4, D)

    for i in range(cfg["dec_layers"]):
        box_mlp(f"{t}decoder.bbox_embed.{i}.")
    f(t + "tgt_embed.weight", Q, D)
    lin(t + "enc_output", D, D)
    ln(t + "enc_output_norm", D)
    box_mlp(t + "enc_out_bbox_embed.")
    f(t + "fine_grained_prompt.weight", 1, D)
    f(t + "coarse_grained_prompt.weight", 1, D)
    for i, c_in in enumerate(dims):
        f(f"input_proj.{i}.0.weight", D, c_in, 1, 1)
        f(f"input_proj.{i}.0.bias", D)
        ln(f"input_proj.{i}.1", D)
    f("input_proj.4.0.weight", D, dims[-1], 3, 3)
    f("input_proj.4.0.bias", D)
    ln("input_proj.4.1", D)
    for i in range(cfg["dec_layers"]):
        box_mlp(f"bbox_embed.{i}.")
    return out


_SHARED_BOX = re.compile(r"^(?:transformer\.decoder\.)?bbox_embed\.\d+\.(.*)$")


def canonical_name(name: str) -> str:
    """The name whose generator gives a tensor's values: the aliases of the shared box MLP map to bbox_embed.0.*."""
    m = _SHARED_BOX.match(name)
    return "bbox_embed.0." + m.group(1) if m else name


def _init(name: str, shape: Tuple[int, ...]) -> Tuple[str, float]:
    """(kind, std): 'norm' -> 1 + std N, 'zero' -> 0, else std N."""
    if len(shape) == 1:
        if name.endswith(".weight"):                     # every 1-D weight is a LayerNorm / GroupNorm scale
            return "norm", _NORM_STD
        if name == "transformer.enc_output.bias":        # see the module docstring: no tie in the top-k
            return "zero", 0.0
        if name.endswith("sampling_offsets.bias"):
            return "weight", _OFFSET_BIAS_STD
        return "weight", _BIAS_STD
    if name.endswith("relative_position_bias_table"):
        return "weight", _REL_POS_STD
    if name in ("transformer.level_embed", "transformer.tgt_embed.weight"):
        return "weight", _EMBED_STD
    if name.endswith("_grained_prompt.weight"):
        return "weight", _PROMPT_STD
    std = 1.0 / np.sqrt(float(np.prod(shape[1:])))
    return "weight", std * _BRANCH_GAIN if _BRANCH.match(name) else std


def random_tensor(name: str, shape: Tuple[int, ...], seed: int = 0, window: Optional[int] = None) -> np.ndarray:
    """The values of one state-dict entry: float32 (before any bf16 rounding), or the int64 relative_position_index
    (window: the Swin window, default from the shape)."""
    shape = tuple(int(s) for s in shape)
    if name.endswith("relative_position_index"):
        w = window or int(round(np.sqrt(shape[0])))
        a = relative_position_index(w)
        if a.shape != shape:
            raise ValueError(f"{name}: shape {shape} is not that of window {w}")
        return a
    key = canonical_name(name)
    kind, std = _init(key, shape)
    if kind == "zero":
        return np.zeros(shape, dtype=np.float32)
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(std)
    if kind == "norm":
        a += np.float32(1.0)
    return a


def count_params(cfg: Dict) -> int:
    """Number of float values of the state dict (aliases of the shared box MLP counted each time, buffers not)."""
    return int(sum(int(np.prod(s, dtype=np.int64)) for s, dt in upn_shapes(cfg).values() if dt == "float32"))


def write_random_upn(path: str, size: str = "tiny", seed: int = 0, dtype: str = "float32",
                     fmt: str = "safetensors") -> str:
    """Write a random UPN checkpoint (one safetensors file, every state-dict key, config in the metadata key
    "upn_config") and return its path. dtype: "float32" or "bfloat16" for the float tensors (the
    relative_position_index buffers are int64 either way)."""
    if fmt != "safetensors":
        raise ValueError(f"fmt must be 'safetensors' (tests that need a .pth write one with torch.save), got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    cfg = upn_config(size)
    st = DTYPES[dtype]
    window = cfg["swin"]["window_size"]
    entries = []
    for name, (shape, kind) in upn_shapes(cfg).items():
        def make(name=name, shape=shape, kind=kind):
            a = random_tensor(name, shape, seed, window)
            return a if kind == "int64" or st == "F32" else f32_to_bf16_bits(a)
        entries.append((name, "I64" if kind == "int64" else st, shape, make))
    meta = {"format": "pt", "upn_config": json.dumps(cfg, sort_keys=True), "seed": str(int(seed)),
            "writer": "vlmfo1.testing.upn.write_random_upn"}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    write_streaming(path, entries, meta)
    return path
