"""HFRE (region encoder) and projectors against a pure-torch reference written from the spec
(fo1_architecture.md §2, ERRATA E5/E7): torchvision RoIAlign semantics (aligned=False,
sampling_ratio=-1) re-implemented sample by sample, F.interpolate bilinear align_corners=False with
the 3840-channel concatenation materialized, SimpleFP as nn.Sequential, the bbox sine PE, region
LayerNorms and the projectors. Small channel counts except one run at the real aux widths.
Tolerances: fp32 1e-5 of max|ref|; bf16 weights (same bf16 values in the reference, fp32 compute)
1e-5; compute="bf16" (GEMM inputs rounded to bf16) 1e-2.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import assert_close  # noqa: E402
from vlmfo1.hfre import HFRE, map_boxes  # noqa: E402
from vlmfo1.safetensors import Checkpoint, f32_to_bf16_bits, save_file  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
RTOL = 1e-5

# ---------------------------------------------------------------- reference (torch, from the spec)


def roi_align_mean(feat, boxes, S, scale, chunk=64):
    """torchvision roi_align(aligned=False, sampling_ratio=-1) on feat [C, H, W] float32, then the
    mean over the S x S bins -> [N, C]. Every sample evaluated as in roi_align_kernel.cpp."""
    C, H, W = feat.shape
    s = torch.tensor(scale, dtype=torch.float32)
    out = []
    for b in boxes:
        x1, y1, x2, y2 = b.to(torch.float32)
        xs, ys, xe, ye = x1 * s, y1 * s, x2 * s, y2 * s
        rw, rh = torch.clamp(xe - xs, min=1.0), torch.clamp(ye - ys, min=1.0)
        bw, bh = rw / S, rh / S
        gx, gy = int(torch.ceil(rw / S)), int(torch.ceil(rh / S))
        count = max(gx * gy, 1)

        def axis(start, binsz, g, size):
            p = torch.arange(S, dtype=torch.float32)[:, None]
            i = torch.arange(g, dtype=torch.float32)[None, :]
            v = (start + p * binsz + (i + 0.5) * binsz / g).reshape(-1)
            valid = (v >= -1.0) & (v <= size)
            v = torch.clamp(v, min=0.0)
            lo = torch.floor(v).long()
            clamp_hi = lo >= size - 1
            lo = torch.where(clamp_hi, torch.full_like(lo, size - 1), lo)
            hi = torch.where(clamp_hi, lo, lo + 1)
            v = torch.where(clamp_hi, lo.to(torch.float32), v)
            l = v - lo.to(torch.float32)
            return lo, hi, 1.0 - l, l, valid

        ylo, yhi, hy, ly, vy = axis(ys, bh, gy, H)
        xlo, xhi, hx, lx, vx = axis(xs, bw, gx, W)
        mask = (vy[:, None] & vx[None, :]).to(torch.float32)
        w1, w2 = hy[:, None] * hx[None, :] * mask, hy[:, None] * lx[None, :] * mask
        w3, w4 = ly[:, None] * hx[None, :] * mask, ly[:, None] * lx[None, :] * mask
        res = []
        for c0 in range(0, C, chunk):
            f = feat[c0:c0 + chunk]
            v = (w1 * f[:, ylo][:, :, xlo] + w2 * f[:, ylo][:, :, xhi] + w3 * f[:, yhi][:, :, xlo]
                 + w4 * f[:, yhi][:, :, xhi])
            v = v.reshape(-1, S, gy, S, gx).sum(dim=(2, 4)) / count      # [c, S, S] bin values
            res.append(v.mean(dim=(1, 2)))
        out.append(torch.cat(res))
    return torch.stack(out) if out else torch.zeros(0, C)


def sine_pe(boxes, Wn, Hn, R):
    """bbox PE of spec §2.6 / gen_sineembed_for_position (float32, [cy, cx, w, h])."""
    b = boxes.clone().to(torch.float32)
    b[:, [0, 2]] = b[:, [0, 2]] / Wn
    b[:, [1, 3]] = b[:, [1, 3]] / Hn
    b[:, 2] = b[:, 2] - b[:, 0]
    b[:, 3] = b[:, 3] - b[:, 1]
    b[:, 0] = b[:, 0] + b[:, 2] / 2
    b[:, 1] = b[:, 1] + b[:, 3] / 2
    d = R // 4
    dim_t = torch.arange(d, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / d)

    def emb(v):
        p = (v * (2 * math.pi))[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    return torch.cat([emb(b[:, 1]), emb(b[:, 0]), emb(b[:, 2]), emb(b[:, 3])], dim=1)


class ChannelLN(nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvLN(nn.Conv2d):
    def __init__(self, cin, cout, k):
        super().__init__(cin, cout, k, padding=k // 2, bias=False)
        self.norm = ChannelLN(cout)

    def forward(self, x):
        return self.norm(super().forward(x))


class SimpleFP(nn.Module):
    def __init__(self, D, Fc):
        super().__init__()
        self.simfp_1 = nn.Sequential(nn.ConvTranspose2d(D, D // 2, 2, 2), ChannelLN(D // 2), nn.GELU(),
                                     nn.ConvTranspose2d(D // 2, D // 4, 2, 2), ConvLN(D // 4, Fc, 1), ConvLN(Fc, Fc, 3))
        self.simfp_2 = nn.Sequential(nn.ConvTranspose2d(D, D // 2, 2, 2), ConvLN(D // 2, Fc, 1), ConvLN(Fc, Fc, 3))
        self.simfp_3 = nn.Sequential(ConvLN(D, Fc, 1), ConvLN(Fc, Fc, 3))
        self.simfp_4 = nn.Sequential(nn.MaxPool2d(2, 2), ConvLN(D, Fc, 1), ConvLN(Fc, Fc, 3))

    def forward(self, x):
        return [self.simfp_1(x), self.simfp_2(x), self.simfp_3(x), self.simfp_4(x)]


def projector(ptype, k, n):
    if ptype == "linear":
        return nn.Linear(k, n)
    if ptype == "identity":
        return nn.Identity()
    depth = int(ptype[3:-6])
    mods = [nn.Linear(k, n)]
    for _ in range(1, depth):
        mods += [nn.GELU(), nn.Linear(n, n)]
    return nn.Sequential(*mods)


class RefFO1(nn.Module):
    """HFREModule (concat family, bbox PE) + projectors, from the spec."""

    def __init__(self, cfg, aux_dims, D, Fc, n_full, hidden, mm_hidden):
        super().__init__()
        self.cfg, self.aux_dims, self.D, self.n_full = cfg, aux_dims, D, n_full
        vt = cfg.get("mm_use_vision_tower_region_feature", False)
        self.fpn = cfg.get("mm_use_simpleFPN_for_vt", False)
        self.Dv = (4 * Fc if self.fpn else n_full * D)
        vp = nn.Module()
        if self.fpn:
            vp.simple_fpn = SimpleFP(D, Fc)
        if cfg.get("mm_apply_region_layer_norm", False):
            if vt:
                vp.vt_region_norm = nn.LayerNorm(self.Dv)
            if not cfg.get("mm_use_vt_region_feature_only", False):
                vp.aux_region_norm = nn.LayerNorm(sum(aux_dims))
        self.object_vp_extractor = vp
        self.mm_projector = projector(cfg.get("mm_projector_type", "linear"), mm_hidden, hidden)
        self.mm_projector_aux = projector(cfg.get("mm_projector_aux_type", "linear"), cfg["mm_region_hidden_size"],
                                          hidden)

    def vt_feat(self, vt_maps, bq, S):
        if self.fpn:
            lv = self.object_vp_extractor.simple_fpn(vt_maps[-1][None])
            return torch.cat([roi_align_mean(l[0], bq, S, 1.0 / st) for l, st in zip(lv, [3.5, 7, 14, 28])], 1)
        return roi_align_mean(torch.cat(vt_maps, 0), bq, S, 1 / 14)

    @torch.no_grad()
    def regions(self, aux_maps, vt_maps, ba, bq):
        c, S, R = self.cfg, self.cfg.get("mm_roi_output_size", 7), self.cfg["mm_region_hidden_size"]
        vp = self.object_vp_extractor
        pe_on = c.get("mm_apply_position_embedding", True)
        if c.get("mm_use_vt_region_feature_only", False):
            f = self.vt_feat(vt_maps, bq, S)
            if pe_on:
                gh, gw = vt_maps[0].shape[-2:]
                f = f + sine_pe(bq, gw / (1 / 14), gh / (1 / 14), R)
            return f
        H0, W0 = aux_maps[0].shape[-2:]
        lv = [aux_maps[0]] + [F.interpolate(m[None], size=(H0, W0), mode="bilinear", align_corners=False)[0]
                              for m in aux_maps[1:]]
        fa = roi_align_mean(torch.cat(lv, 0), ba, S, 0.25)
        if hasattr(vp, "aux_region_norm"):
            fa = vp.aux_region_norm(fa)
        use_vt = c.get("mm_use_vision_tower_region_feature", False)
        if use_vt:
            fv = self.vt_feat(vt_maps, bq, S)
            if hasattr(vp, "vt_region_norm"):
                fv = vp.vt_region_norm(fv)
            f = torch.cat([fa, fv], 1)
        else:
            f = fa
        comb = c.get("mm_region_feature_combination", "concat")
        if pe_on and c.get("mm_pos_embedding_strategy", "bbox_based") in ("bbox_based", "hybrid"):
            if use_vt and comb != "concat_aux_pos":
                gh, gw = vt_maps[0].shape[-2:]
                f = f + sine_pe(bq, gw / (1 / 14), gh / (1 / 14), R)
            else:
                f = f + sine_pe(ba, W0 / 0.25, H0 / 0.25, R)
        return f


# ---------------------------------------------------------------- fixtures / helpers


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") and ("norm" in name or "simfp_1.1" in name) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:   # ConvTranspose2d (the only k = 2 kernels) is [in][out][2][2]: fan-in = in
                fan_in = p.shape[0] if (p.ndim == 4 and p.shape[2] == 2) else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def write_ckpt(tmp_path, model, bf16=False, drop=(), extra=None):
    t = {}
    for k, v in model.state_dict().items():
        name = "model." + k
        if any(name.startswith(d) for d in drop):
            continue
        a = v.detach().float().numpy()
        t[name] = ("BF16", f32_to_bf16_bits(a)) if bf16 else ("F32", a)
    for k, v in (extra or {}).items():
        t[k] = ("F32", v)
    path = str(tmp_path / f"hfre_{len(os.listdir(tmp_path))}.safetensors")
    save_file(t, path)
    return Checkpoint(path)


def round_model_bf16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def make_boxes(rng, n, W, H, extra=True):
    """Boxes in a W x H image: random, then degenerate, inverted, partly / fully outside, tiny, huge."""
    x1 = rng.uniform(-0.1 * W, 0.9 * W, n)
    y1 = rng.uniform(-0.1 * H, 0.9 * H, n)
    b = np.stack([x1, y1, x1 + rng.uniform(1, 0.6 * W, n), y1 + rng.uniform(1, 0.6 * H, n)], 1)
    if extra:
        b = np.concatenate([b, np.array([
            [0.3 * W, 0.2 * H, 0.3 * W, 0.7 * H],            # degenerate x1 = x2
            [0.5 * W, 0.5 * H, 0.5 * W, 0.5 * H],            # a point
            [0.8 * W, 0.9 * H, 0.2 * W, 0.1 * H],            # inverted
            [-0.3 * W, -0.2 * H, 0.4 * W, 0.3 * H],          # partly outside
            [0.7 * W, 0.6 * H, 1.4 * W, 1.3 * H],            # partly outside (bottom right)
            [1.2 * W, 1.1 * H, 1.5 * W, 1.6 * H],            # fully outside
            [-0.9 * W, -0.8 * H, -0.5 * W, -0.4 * H],        # fully outside (negative)
            [0.41 * W, 0.43 * H, 0.41 * W + 0.3, 0.43 * H + 0.2],  # tiny
            [-1.5 * W, -1.2 * H, 2.5 * W, 2.2 * H],          # huge
            [0, 0, W, H],                                   # whole image
        ])], 0)
    return b.astype(np.float32)


def run_case(tmp_path, cfg, *, aux_dims=(8, 12, 16, 20), aux_hw=(16, 20), D=32, Fc=16, n_full=4, gh=6, gw=8,
             hidden=24, mm_hidden=40, seed=0, n_boxes=6, bf16=False, compute=None, n_threads=2, check=True,
             rtol=RTOL):
    torch.manual_seed(seed)
    R = cfg["mm_region_hidden_size"]
    model = RefFO1(cfg, aux_dims, D, Fc, n_full, hidden, mm_hidden)
    randomize(model, seed)
    if bf16:
        round_model_bf16(model)
    raw = dict(cfg, hidden_size=hidden, mm_hidden_size=mm_hidden,
               vision_config=dict(hidden_size=D, patch_size=14, fullatt_block_indexes=list(range(n_full))))
    ckpt = write_ckpt(tmp_path, model, bf16=bf16)
    enc = HFRE.from_checkpoint(ckpt, raw, aux_dims=aux_dims, compute=compute, n_threads=n_threads)
    rng = np.random.default_rng(seed)
    H0, W0 = aux_hw
    sizes = [(H0, W0), ((H0 + 1) // 2, (W0 + 1) // 2), ((H0 + 3) // 4, (W0 + 3) // 4), ((H0 + 7) // 8, (W0 + 7) // 8)]
    aux = [rng.standard_normal((h, w, c)).astype(np.float32) for (h, w), c in zip(sizes, aux_dims)]
    vt = rng.standard_normal((n_full, gh, gw, D)).astype(np.float32)
    WA, HA, WQ, HQ = 4 * W0, 4 * H0, 14 * gw, 14 * gh
    ba = make_boxes(rng, n_boxes, WA, HA)
    bq = (ba * np.array([WQ / WA, HQ / HA] * 2, np.float64).astype(np.float32)).astype(np.float32)
    got = enc.region_features(vt, aux, ba, bq)
    assert got.shape == (len(ba), R)
    if not check:
        return enc, model, (aux, vt, ba, bq), got
    ref = model.regions([torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in aux],
                        [torch.from_numpy(v).permute(2, 0, 1).contiguous() for v in vt],
                        torch.from_numpy(ba), torch.from_numpy(bq)).numpy()
    assert_close(got, ref, rtol=rtol, name=f"region features {cfg.get('_name', '')}")
    with torch.no_grad():
        pr = model.mm_projector_aux(torch.from_numpy(ref)).numpy()
        img = rng.standard_normal((7, mm_hidden)).astype(np.float32)
        pi = model.mm_projector(torch.from_numpy(img)).numpy()
    assert_close(enc.project_regions(ref), pr, rtol=rtol if compute != "bf16" else 1e-2, name="mm_projector_aux")
    assert_close(enc.project_image(img), pi, rtol=rtol if compute != "bf16" else 1e-2, name="mm_projector")
    return enc, model, (aux, vt, ba, bq), got


FO1 = dict(mm_region_hidden_size=56 + 64, mm_use_vision_tower_region_feature=True, mm_use_simpleFPN_for_vt=True,
           mm_projector_aux_type="mlp2x_gelu", mm_projector_type="identity", _name="fo1")

# ---------------------------------------------------------------- tests


def test_fo1_simplefp(tmp_path):
    cfg = dict(FO1, mm_projector_type="mlp2x_gelu")
    run_case(tmp_path, dict(cfg, mm_hidden_size=40), n_boxes=8)


def test_fo1_roi14_odd_grid_linear(tmp_path):
    cfg = dict(FO1, mm_roi_output_size=14, mm_projector_type="linear", mm_projector_aux_type="linear",
               _name="S14")
    run_case(tmp_path, cfg, gh=4, gw=10, aux_hw=(13, 17), seed=1)


def test_no_simplefp_region_ln_aux_pos(tmp_path):
    cfg = dict(mm_region_hidden_size=56 + 4 * 16, mm_use_vision_tower_region_feature=True,
               mm_apply_region_layer_norm=True, mm_region_feature_combination="concat_aux_pos",
               mm_projector_type="mlp3x_gelu", mm_projector_aux_type="mlp1x_gelu", _name="noFPN+LN")
    run_case(tmp_path, cfg, D=16, seed=2)


def test_aux_only(tmp_path):
    cfg = dict(mm_region_hidden_size=56, mm_apply_region_layer_norm=True, mm_projector_aux_type="mlp2x_gelu",
               _name="aux-only")
    run_case(tmp_path, cfg, seed=3)


def test_aux_only_sep_combination_has_no_pe(tmp_path):
    cfg = dict(mm_region_hidden_size=56, mm_region_feature_combination="concat_sep_pos", _name="aux-only sep")
    enc, model, (aux, vt, ba, bq), got = run_case(tmp_path, cfg, seed=4, check=False)
    ref = roi_align_mean(torch.cat([torch.from_numpy(aux[0]).permute(2, 0, 1)] + [
        F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None], size=aux[0].shape[:2], mode="bilinear",
                      align_corners=False)[0] for a in aux[1:]]), torch.from_numpy(ba), 7, 0.25).numpy()
    assert_close(got, ref, rtol=RTOL, name="aux-only, no PE")


@pytest.mark.parametrize("fpn", [True, False])
def test_vt_only(tmp_path, fpn):
    cfg = dict(mm_region_hidden_size=64, mm_use_vision_tower_region_feature=True, mm_use_vt_region_feature_only=True,
               mm_use_simpleFPN_for_vt=fpn, mm_apply_region_layer_norm=True, _name=f"vt-only fpn={fpn}")
    run_case(tmp_path, cfg, D=16, seed=5)


def test_real_aux_dims(tmp_path):
    cfg = dict(FO1, mm_region_hidden_size=3840 + 64, _name="real aux dims")
    run_case(tmp_path, cfg, aux_dims=(256, 512, 1024, 2048), aux_hw=(12, 16), n_boxes=3, seed=6)


def test_bf16_weights(tmp_path):
    cfg = dict(FO1, mm_projector_type="mlp2x_gelu", _name="bf16 weights, f32 compute")
    enc, *_ = run_case(tmp_path, cfg, bf16=True, compute="f32", seed=7)
    assert enc.compute == "f32"
    cfg["_name"] = "bf16 weights, bf16 compute"
    enc, *_ = run_case(tmp_path, cfg, bf16=True, seed=7, rtol=1e-2)
    assert enc.compute == "bf16"


def test_threads_identical(tmp_path):
    cfg = dict(FO1, mm_projector_type="mlp2x_gelu")
    enc, model, (aux, vt, ba, bq), got2 = run_case(tmp_path, cfg, seed=8, n_boxes=20, check=False)
    enc.n_threads = 1
    got1 = enc.region_features(vt, aux, ba, bq)
    assert np.array_equal(got1, got2)
    p1 = enc.project_regions(got1)
    enc.n_threads = 2
    assert np.array_equal(p1, enc.project_regions(got1))


def test_vt_map_layouts_and_empty(tmp_path):
    enc, model, (aux, vt, ba, bq), got = run_case(tmp_path, dict(FO1), seed=9, check=False)
    gh, gw = vt.shape[1:3]
    chw = [v.transpose(2, 0, 1) for v in vt]                       # VisionTower's views
    assert np.array_equal(enc.region_features(chw, aux, ba, bq, qwen_hw=(14 * gh, 14 * gw)), got)
    rows = [v.reshape(gh * gw, -1) for v in vt]
    assert np.array_equal(enc.region_features(rows, aux, ba, bq, qwen_hw=(14 * gh, 14 * gw)), got)
    with pytest.raises(ValueError, match="qwen_hw"):
        enc.region_features(vt, aux, ba, bq, qwen_hw=(14 * gh, 14 * gw + 28))
    with pytest.raises(ValueError, match="qwen_hw"):
        enc.region_features(vt, aux, ba, bq, qwen_hw=(gh, gw))
    e = enc.region_features(vt, aux, np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32))
    assert e.shape == (0, enc.region_dim)
    assert enc.project_regions(e).shape[0] == 0
    many = np.tile(ba, (30, 1))                                    # > 100 boxes: no crash
    out = enc.region_features(vt, aux, many, np.tile(bq, (30, 1)))
    assert np.array_equal(out[:len(ba)], got)


def test_bad_inputs(tmp_path):
    enc, model, (aux, vt, ba, bq), got = run_case(tmp_path, dict(FO1), seed=10, check=False)
    bad = ba.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        enc.region_features(vt, aux, bad, bq)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        enc.region_features(vt, aux, ba, bad)
    with pytest.raises(ValueError, match="1e7"):
        enc.region_features(vt, aux, ba * 1e7, bq)
    with pytest.raises(ValueError, match="shape"):
        enc.region_features(vt, aux, ba[:, :3], bq)
    with pytest.raises(ValueError, match="boxes"):
        enc.region_features(vt, aux, ba, bq[:-1])
    with pytest.raises(ValueError, match="aux map 1"):
        enc.region_features(vt, [aux[0], aux[1][..., :-1], aux[2], aux[3]], ba, bq)
    with pytest.raises(ValueError, match="4 DaViT"):
        enc.region_features(vt, aux[:3], ba, bq)
    with pytest.raises(ValueError, match="larger than level 0"):
        enc.region_features(vt, [aux[0][:2], aux[1], aux[2], aux[3]], ba, bq)
    with pytest.raises(ValueError, match="ViT map"):
        enc.region_features(vt[..., :-1], aux, ba, bq)
    with pytest.raises(ValueError, match="ViT maps"):
        enc.region_features(vt[:2], aux, ba, bq)
    with pytest.raises(ValueError, match="projector"):
        enc.project_regions(np.zeros((2, 7), np.float32))


def _cfg_ckpt(tmp_path, cfg, **kw):
    model = RefFO1(cfg, (8, 12, 16, 20), 32, 16, 4, 24, 40)
    raw = dict(cfg, hidden_size=24, mm_hidden_size=40, vision_config=dict(hidden_size=32, patch_size=14))
    return model, raw


def test_config_errors(tmp_path):
    model, raw = _cfg_ckpt(tmp_path, dict(FO1))
    ckpt = write_ckpt(tmp_path, model)
    kw = dict(aux_dims=(8, 12, 16, 20))
    for ptype in ("cabstract", "tokenpacker"):
        with pytest.raises(NotImplementedError, match=ptype):
            HFRE.from_checkpoint(ckpt, dict(raw, mm_projector_aux_type=ptype), **kw)
    with pytest.raises(ValueError, match="Unknown projector"):
        HFRE.from_checkpoint(ckpt, dict(raw, mm_projector_type="mlpx_relu"), **kw)
    for comb in ("mean", "concat_sep_pos", "mean_sep_no_vt_pos"):
        with pytest.raises(NotImplementedError, match=comb):
            HFRE.from_checkpoint(ckpt, dict(raw, mm_region_feature_combination=comb), **kw)
    with pytest.raises(NotImplementedError, match="feature_map_based"):
        HFRE.from_checkpoint(ckpt, dict(raw, mm_pos_embedding_strategy="feature_map_based"), **kw)
    with pytest.raises(ValueError, match="simple_fpn"):       # tensors present, flag off
        HFRE.from_checkpoint(ckpt, dict(raw, mm_use_simpleFPN_for_vt=False), **kw)
    with pytest.raises(ValueError, match="mm_region_hidden_size"):
        HFRE.from_checkpoint(ckpt, dict(raw, mm_region_hidden_size=128), **kw)
    with pytest.raises(KeyError, match="mm_region_hidden_size"):
        HFRE.from_checkpoint(ckpt, {k: v for k, v in raw.items() if k != "mm_region_hidden_size"}, **kw)
    with pytest.raises(ValueError, match="mm_projector_aux"):   # mlp2x tensors, config says linear
        HFRE.from_checkpoint(ckpt, dict(raw, mm_projector_aux_type="linear"), **kw)
    with pytest.raises(ValueError, match="identity"):            # config identity, tensors present
        HFRE.from_checkpoint(ckpt, dict(raw, mm_projector_aux_type="identity"), **kw)
    ckpt2 = write_ckpt(tmp_path, model, drop=("model.object_vp_extractor.simple_fpn.simfp_2.1.norm",))
    with pytest.raises(KeyError, match="simfp_2.1.norm"):
        HFRE.from_checkpoint(ckpt2, raw, **kw)
    ckpt3 = write_ckpt(tmp_path, model, extra={"model.object_vp_extractor.aux_region_norm.weight":
                                               np.ones(56, np.float32)})
    with pytest.raises(ValueError, match="aux_region_norm"):
        HFRE.from_checkpoint(ckpt3, raw, **kw)
    sd = {("model." + k): v.numpy() for k, v in model.state_dict().items()}
    sd["model.object_vp_extractor.simple_fpn.simfp_3.1.weight"] = np.zeros((16, 16, 1, 3), np.float32)
    p = str(tmp_path / "bad_shape.safetensors")
    save_file({k: ("F32", v) for k, v in sd.items()}, p)
    with pytest.raises(ValueError, match="simfp_3.1.weight"):
        HFRE.from_checkpoint(Checkpoint(p), raw, **kw)


def test_map_boxes():
    boxes = np.array([[10.5, 20.25, 300.7, 250.1], [-5, -7, 1000, 1000], [50, 60, 40, 30], [np.float32(1 / 3)] * 4])
    img, aux, qw = (500, 399), (768, 768), (504, 392)
    a, q = map_boxes(boxes, img, aux, qw)
    for i, bb in enumerate(boxes.tolist()):     # mm_utils.adjust_bbox, then encode_regions
        x1, y1, x2, y2 = [max(0, min(lim, v)) for v, lim in zip(bb, (500, 399, 500, 399))]
        exp = torch.tensor([[x1 * 768 / 500, y1 * 768 / 399, x2 * 768 / 500, y2 * 768 / 399]])
        assert np.array_equal(a[i], exp[0].numpy())
        sh, sw = 392 / 768, 504 / 768
        vt = exp * torch.tensor([sw, sh, sw, sh])
        assert np.array_equal(q[i], vt[0].numpy())
    with pytest.raises(ValueError):
        map_boxes([[0, 0, np.nan, 1]], img, aux, qw)
    assert map_boxes(np.zeros((0, 4)), img, aux, qw)[0].shape == (0, 4)
