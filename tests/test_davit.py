"""DaViT (FO1's auxiliary encoder) and its preprocessing.

Parity: vlmfo1's C DaViT against transformers' Florence-2 vision backbone (the same maths as the official
modeling_davit.py: conv embeddings, 12x12 windows over the zero-padded map without a mask, channel attention with q
scaled by N^-1/2, residual depthwise convs, exact GELU), at random weights, all four stage outputs:
  * a tiny config (depths 1/1/2/1, window 12) on images whose sizes are not multiples of the window or the strides,
    fp32 (1e-4 relative to max|ref|) and bf16 weights + bf16 compute (against fp32 torch on the same bf16 weights);
  * the real davit-large widths (256/512/1024/2048, heads/groups 8/16/32/64) with one block pair per stage.
Both checkpoint layouts (VLM-FO1's official names and transformers' names) are loaded.
Preprocessing: every aux_image_aspect_ratio mode against an independent computation from the spec (Pillow bicubic,
float64 rescale, float32 normalize), the dynamic_square choice (ties to the smaller size) and the box mapping.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from conftest import DictCheckpoint, assert_close

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from vlmfo1.aux_image import (DYNAMIC_SQUARE_SIZES, AuxImageProcessor, aux_aspect_ratio_from_config,  # noqa: E402
                              aux_target_size, boxes_to_aux)
from vlmfo1.davit import DavitConfig, DavitEncoder  # noqa: E402
from vlmfo1.safetensors import f32_to_bf16_bits  # noqa: E402

TINY = dict(embed_dim=[32, 64, 96, 128], depths=[1, 1, 2, 1], num_heads=[2, 4, 3, 4], num_groups=[2, 2, 3, 4],
            window_size=12)
SIZES = [(150, 200), (96, 96), (77, 130)]   # (H, W): 200x150, 96x96, 130x77 images


# ----------------------------------------------------------------------------- helpers


def make_backbone(seed, **cfg):
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig
    from transformers.models.florence2.modeling_florence2 import Florence2VisionBackbone

    config = Florence2VisionConfig(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Florence2VisionBackbone(config).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # O(1) activations; non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model


def hf_arrays(model, prefix="vision_tower."):
    return {prefix + k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def to_fo1_names(arrays, src_prefix="vision_tower.", dst_prefix="model.vision_tower_aux.image_tower."):
    """transformers' Florence-2 names -> the official DaViT names of the VLM-FO1 checkpoint."""
    rules = [(r"^convs\.(\d+)\.conv\.", r"convs.\1.proj."),
             (r"(_block)\.conv([12])\.", r"\1.conv\2.fn.dw."),
             (r"spatial_block\.norm1\.", "spatial_block.window_attn.norm."),
             (r"channel_block\.norm1\.", "channel_block.channel_attn.norm."),
             (r"(window_attn|channel_attn)\.(qkv|proj)\.", r"\1.fn.\2."),
             (r"_block\.norm2\.", "_block.ffn.norm."),
             (r"_block\.ffn\.(fc[12])\.", r"_block.ffn.fn.net.\1.")]
    out = {}
    for k, v in arrays.items():
        k = k[len(src_prefix):]
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[dst_prefix + k] = v
    return out


def torch_stages(model, px):
    """The four stage outputs (C, H, W) of the Florence-2 backbone (its forward, keeping every stage)."""
    h = torch.from_numpy(np.ascontiguousarray(px))[None].to(model.convs[0].conv.weight.dtype)
    outs = []
    with torch.no_grad():
        for conv, block in zip(model.convs, model.blocks):
            h = conv(h)
            for layer in block:
                h = layer(h)
            outs.append(h[0].float().numpy())
    return outs


def rand_pixels(h, w, seed):
    return np.random.default_rng(seed).standard_normal((3, h, w)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    model = make_backbone(0, **TINY)
    return model, hf_arrays(model), {"vision_config": dict(TINY, model_type="florence_vision")}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("hw", SIZES)
def test_tiny_fp32_parity(tiny, hw):
    model, arrays, raw = tiny
    enc = DavitEncoder.from_checkpoint(DictCheckpoint(arrays), raw, n_threads=2)
    px = rand_pixels(*hw, seed=hw[0])
    ref = torch_stages(model, px)
    got = enc(px)
    assert [g.shape for g in got] == [r.shape for r in ref]
    assert [g.shape[1:] for g in got] == enc.stage_sizes(*hw)
    for s, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == np.float32
        assert_close(g, r, rtol=1e-4, name=f"tiny fp32 {hw[1]}x{hw[0]} stage {s}")


def test_fo1_layout_and_thread_invariance(tiny):
    """Official (FO1) names load to the same model; results are bitwise identical for 1 and 3 threads (fp32 weights:
    shape-only sgemm tiles; see also test_thread_invariance.py)."""
    model, arrays, _ = tiny
    fo1 = to_fo1_names(arrays)
    assert "model.vision_tower_aux.image_tower.blocks.2.1.channel_block.ffn.fn.net.fc2.weight" in fo1
    px = rand_pixels(77, 130, seed=5)
    raw = {"vision_config": TINY}
    a = DavitEncoder.from_checkpoint(DictCheckpoint(fo1), raw, n_threads=1)(px)
    b = DavitEncoder.from_checkpoint(DictCheckpoint(arrays), raw, n_threads=3)(px)
    ref = torch_stages(model, px)
    for s in range(4):
        assert_close(a[s], ref[s], rtol=1e-4, name=f"fo1 layout stage {s}")
        np.testing.assert_array_equal(a[s], b[s])
    # bf16 weights use the engine's own kernels on every path: bitwise identical too
    c1 = DavitEncoder.from_checkpoint(DictCheckpoint(fo1), raw, dtype="bfloat16", n_threads=1)(px)
    c3 = DavitEncoder.from_checkpoint(DictCheckpoint(fo1), raw, dtype="bfloat16", n_threads=3)(px)
    for s in range(4):
        np.testing.assert_array_equal(c1[s], c3[s])


def test_tiny_bf16(tiny):
    """bf16 weights, bf16 activations into every matmul (fp32 accumulation, fp32 elsewhere) vs fp32 torch on the same
    bf16-rounded weights: within 1e-2 of max|ref| per stage. The error of transformers' all-bf16 model against the same
    reference is printed for comparison."""
    model, arrays, raw = tiny
    bf = {k: f32_to_bf16_bits(v) if v.ndim >= 2 else v for k, v in arrays.items()}
    enc = DavitEncoder.from_checkpoint(DictCheckpoint(bf), raw, n_threads=2)
    assert enc.compute == "bf16"
    rounded = make_backbone(0, **TINY)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim >= 2:
                p.copy_(p.to(torch.bfloat16).float())
    px = rand_pixels(150, 200, seed=9)
    ref = torch_stages(rounded, px)
    got = enc(px)
    hf_bf16 = torch_stages(rounded.to(torch.bfloat16), px)
    for s in range(4):
        assert_close(hf_bf16[s], ref[s], rtol=1.0, name=f"(info) transformers bf16 stage {s}")
        assert_close(got[s], ref[s], rtol=1e-2, name=f"vlmfo1 bf16 stage {s}")
    # bf16 weights widened exactly, fp32 compute: fp32-level agreement
    got32 = DavitEncoder.from_checkpoint(DictCheckpoint(bf), raw, compute="f32", n_threads=2)(px)
    for s in range(4):
        assert_close(got32[s], ref[s], rtol=1e-4, name=f"bf16 weights, f32 compute stage {s}")


def test_large_dims_one_block_per_stage():
    cfg = dict(embed_dim=[256, 512, 1024, 2048], depths=[1, 1, 1, 1], num_heads=[8, 16, 32, 64],
               num_groups=[8, 16, 32, 64], window_size=12)
    model = make_backbone(3, **cfg)
    arrays = to_fo1_names(hf_arrays(model))
    fo1_cfg = dataclasses.replace(DavitConfig.named("davit-large"), depths=(1, 1, 1, 1))
    enc = DavitEncoder.from_checkpoint(DictCheckpoint(arrays), fo1_cfg, n_threads=2)
    px = rand_pixels(128, 128, seed=11)
    ref = torch_stages(model, px)
    got = enc(px)
    assert [g.shape for g in got] == [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]
    for s in range(4):
        assert_close(got[s], ref[s], rtol=1e-4, name=f"davit-large dims stage {s}")


# ----------------------------------------------------------------------------- config and bad input


def test_fo1_config_lookup():
    c = DavitConfig.from_dict({"mm_vision_tower_aux": "/ckpt/aux/davit-large.pth"})
    assert c.dims == (256, 512, 1024, 2048) and c.depths == (1, 1, 9, 1)
    assert c.num_heads == (8, 16, 32, 64) and c.num_groups == (8, 16, 32, 64) and c.window_size == 12
    assert c.stage_sizes(750, 1000) == [(188, 250), (94, 125), (47, 63), (24, 32)]
    assert c.stage_sizes(768, 768) == [(192, 192), (96, 96), (48, 48), (24, 24)]
    with pytest.raises(ValueError, match="unknown DaViT variant"):
        DavitConfig.from_dict({"mm_vision_tower_aux": "davit-huge"})
    with pytest.raises(ValueError, match="no DaViT configuration"):
        DavitConfig.from_dict({"hidden_size": 3})


def test_bad_inputs(tiny):
    model, arrays, raw = tiny
    enc = DavitEncoder.from_checkpoint(DictCheckpoint(arrays), raw, n_threads=1)
    with pytest.raises(ValueError, match="shape"):
        enc(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="shape"):
        enc(np.zeros((4, 64, 64), np.float32))
    with pytest.raises(ValueError, match="shape"):
        enc(np.zeros((3, 0, 64), np.float32))
    px = rand_pixels(40, 40, 1)
    px[1, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        enc(px)
    with pytest.raises(TypeError):
        enc(np.zeros((3, 40, 40), np.uint8))
    # missing / unexpected / mis-shaped tensors
    name = "vision_tower.blocks.1.0.channel_block.channel_attn.qkv.weight"
    with pytest.raises(KeyError, match="missing DaViT tensors"):
        DavitEncoder.from_checkpoint(DictCheckpoint({k: v for k, v in arrays.items() if k != name}), raw)
    extra = dict(arrays, **{"vision_tower.blocks.0.0.spatial_block.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unexpected"):
        DavitEncoder.from_checkpoint(DictCheckpoint(extra), raw)
    bad = dict(arrays, **{name: np.zeros((10, 64), np.float32)})
    with pytest.raises(ValueError, match="shapes do not match"):
        DavitEncoder.from_checkpoint(DictCheckpoint(bad), raw)
    with pytest.raises(ValueError, match="depths"):
        DavitEncoder.from_checkpoint(DictCheckpoint(arrays), {"vision_config": dict(TINY, depths=[1, 1, 1, 1])})
    with pytest.raises(KeyError, match="no DaViT"):
        DavitEncoder.from_checkpoint(DictCheckpoint({"x.weight": np.zeros((2, 2), np.float32)}), raw)
    with pytest.raises(ValueError, match="divisible"):
        DavitConfig.from_dict({"vision_config": dict(TINY, num_heads=[3, 4, 3, 4])})


# ----------------------------------------------------------------------------- aux preprocessing


def _expected_pixels(img_u8, size_wh):
    """Spec §1.4 / ERRATA E3, independently: Pillow BICUBIC to size (None: no resize), float64 rescale, float32
    (x - mean) / std, channel-first."""
    if size_wh is not None:
        img_u8 = np.array(Image.fromarray(img_u8).resize(size_wh, Image.Resampling.BICUBIC))
    x = (img_u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((x - mean) / std).astype(np.float32).transpose(2, 0, 1)


def _closest_square(w, h):
    cands = [384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024, 1280, 1536, 1792, 2048]
    return min(cands, key=lambda s: (abs(s * s - w * h), s))


@pytest.mark.parametrize("mode", ["squash", "pad", "dynamic", "dynamic_square"])
@pytest.mark.parametrize("wh", [(333, 250), (1000, 750), (40, 900)])
def test_aux_preprocessing(mode, wh):
    w, h = wh
    img = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    proc = AuxImageProcessor.from_config({"aux_image_aspect_ratio": mode, "aux_image_size": 1024})
    pv, info = proc(img)
    if mode == "dynamic":
        size = None
        aux = (w, h)
    elif mode == "dynamic_square":
        s = _closest_square(w, h)
        size = aux = (s, s)
    else:
        size = aux = (768, 768)   # squash and every other string; aux_image_size is ignored
    exp = _expected_pixels(img, size)
    assert pv.dtype == np.float32 and pv.flags.c_contiguous and pv.shape == exp.shape
    np.testing.assert_array_equal(pv, exp)
    assert info["aux_size"] == aux and info["image_size"] == (w, h)


def test_dynamic_square_choice():
    assert DYNAMIC_SQUARE_SIZES == (384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024, 1280, 1536, 1792, 2048)
    assert aux_target_size(340, 512, "dynamic_square") == (384, 384)   # 174080: exactly between 384^2 and 448^2
    assert aux_target_size(341, 512, "dynamic_square") == (448, 448)
    assert aux_target_size(10, 10, "dynamic_square") == (384, 384)
    assert aux_target_size(2048, 2047, "dynamic_square") == (2048, 2048)
    assert aux_target_size(1000, 750, "dynamic_square") == (896, 896)
    for w, h in [(1000, 750), (2047, 1365), (640, 480), (1152, 1152)]:
        assert aux_target_size(w, h, "dynamic_square")[0] == _closest_square(w, h)


def test_aux_config_rules():
    assert aux_aspect_ratio_from_config({"aux_image_aspect_ratio": "dynamic"}) == "dynamic"
    assert aux_aspect_ratio_from_config({"aux_image_aspect_ratio": "dynamic", "delay_load": False}) == "squash"
    with pytest.raises(KeyError, match="aux_image_aspect_ratio"):
        aux_aspect_ratio_from_config({})


def test_boxes_to_aux():
    boxes = [[-5.0, 10.25, 1200.0, 700.5], [33.3, 0.0, 33.3, 749.9], [100, 200, 50, 20]]
    W_I, H_I, W_A, H_A = 1000, 750, 768, 768
    got = boxes_to_aux(boxes, (W_I, H_I), (W_A, H_A))
    exp = []
    for x1, y1, x2, y2 in boxes:   # official adjust_bbox, in Python floats
        x1, y1 = max(0, min(W_I, x1)), max(0, min(H_I, y1))
        x2, y2 = max(0, min(W_I, x2)), max(0, min(H_I, y2))
        exp.append([x1 * W_A / W_I, y1 * H_A / H_I, x2 * W_A / W_I, y2 * H_A / H_I])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array(exp, dtype=np.float32))
    assert boxes_to_aux([], (10, 10), (10, 10)).shape == (0, 4)
    with pytest.raises(ValueError):
        boxes_to_aux([[0, 0, np.nan, 1]], (10, 10), (10, 10))
    with pytest.raises(ValueError):
        boxes_to_aux([[0, 0, 1]], (10, 10), (10, 10))
