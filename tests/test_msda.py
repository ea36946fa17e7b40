"""Op-level tests of the deformable-DETR ops UPN needs (csrc/detr.c, bound in csrc/py_ops.h): multi-scale deformable
attention sampling (_core.msda), GroupNorm (_core.group_norm) and the two sine position embeddings
(_core.sine_pos_embed_hw, _core.sine_embed_boxes), each against the PyTorch code it ports (written out below; torch
is a test dependency, never imported by the runtime) and, where that says more, against the same code in float64.

Every case runs with 1, 2 and 3 threads and must give the same bits. The whole file runs again in subprocesses under
VLM_GEMM_ISA=avx2 and =generic (the cap is read once per process), as tests/test_ops.py does, so both MSDA paths
(AVX-512 intrinsics, portable C; avx2 has no path of its own and runs the portable one) are checked against the
references, and test_msda_isa_levels_agree compares the two paths' outputs directly.

Tolerances (each check prints its max errors next to them):
  msda: |got - ref| <= 1e-6 · scale + 1e-5 · |ref|, scale = max over (query, head) of Σ|aw| · max|value| (the size of
    the fp32 sums), against torch's fp32 reference and against float64. Coordinates and corner weights are computed
    with torch's grid_sample expressions, so the bilinear samples are torch's up to rounding; the sum runs in another
    fixed order. Between the AVX-512 and the portable path only FMA rounding differs: <= 2e-7 · scale.
  msda, non-finite locations: a NaN or ±inf location contributes nothing (torch's grid_sample gives NaN there and so
    NaN for the whole head's output; documented deviation), a huge finite one nothing (as in torch).
  group_norm: 1e-5 absolute (outputs are O(1)) against torch.nn.GroupNorm on the NCHW transpose; against float64
    1e-7 + 1e-7·|ref| (statistics and the normalized value in double, rounded once: <= 1/2 ulp).
  sine embeddings: 2e-6 absolute against torch (torch's dim_t comes from its vectorized powf, sin/cos from its
    vectorized sinf/cosf; ours from libm pow (rounded once) and sinf/cosf: ~1 ulp of the 2π-sized arguments apart).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from vlmfo1._native import core  # noqa: E402

THREADS = (1, 2, 3)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
f32 = np.float32


def rng(seed):
    return np.random.default_rng(seed)


def same_for_all_threads(fn, label):
    """fn(n_threads) for 1, 2 and 3 threads: the results must be bitwise equal; returns the 1-thread one."""
    outs = [fn(nt) for nt in THREADS]
    for nt, o in zip(THREADS[1:], outs[1:]):
        assert np.array_equal(outs[0], o, equal_nan=True), f"{label}: 1 and {nt} threads differ"
    return outs[0]


def check(label, got, ref, atol, rtol=1e-5):
    """|got - ref| <= atol + rtol·|ref| elementwise; prints the max abs error and the max relative error (|err| / |ref|
    over the entries with |ref| >= 1e-3·max|ref|)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (label, got.shape, ref.shape)
    assert np.isfinite(got).all(), f"{label}: non-finite output"
    err = np.abs(got - ref)
    worst = float(err.max()) if err.size else 0.0
    big = np.abs(ref) >= 1e-3 * (np.abs(ref).max() if ref.size else 0)
    rel = float((err[big] / np.abs(ref[big])).max()) if big.any() else 0.0
    print(f"[msda] {label}: max abs err {worst:.3g}, max rel err {rel:.3g} (atol {atol:.3g}, rtol {rtol:g})")
    bound = atol + rtol * np.abs(ref)
    if not np.all(err <= bound):
        idx = np.unravel_index(int(np.argmax(err - bound)), err.shape)
        raise AssertionError(f"{label}: max abs err {worst:.3g} at {idx}: got {got[idx]}, ref {ref[idx]}")
    return worst, rel


# ----------------------------------------------------------------------------- MSDA

def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Deformable-DETR's reference (models/ops/functions/ms_deform_attn_func.py), as UPN runs it on CPU."""
    N_, S_, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    value_list = value.split([H_ * W_ for H_, W_ in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (H_, W_) in enumerate(value_spatial_shapes):
        # N_, H_*W_, M_, D_ -> N_, H_*W_, M_*D_ -> N_, M_*D_, H_*W_ -> N_*M_, D_, H_, W_
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
        # N_, Lq_, M_, P_, 2 -> N_, M_, Lq_, P_, 2 -> N_*M_, Lq_, P_, 2
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        # N_*M_, D_, Lq_, P_
        sampling_value_l_ = F.grid_sample(value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
        sampling_value_list.append(sampling_value_l_)
    # (N_, Lq_, M_, L_, P_) -> (N_, M_, Lq_, L_, P_) -> (N_, M_, 1, Lq_, L_*P_)
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1).view(N_, M_ * D_, Lq_)
    return output.transpose(1, 2).contiguous()


def msda_ref(value, shapes, loc, aw, dtype=torch.float32):
    """The reference at batch 1 on NumPy arrays: value [S, M, D], loc [Lq, M, L, P, 2], aw [Lq, M, L, P]."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)[None]  # noqa: E731
    with torch.no_grad():
        out = ms_deform_attn_core_pytorch(t(value), [tuple(map(int, s)) for s in shapes], t(loc), t(aw))
    return out[0].numpy()


def msda_scale(value, aw):
    """The size of the output's fp32 sums: max over (query, head) of Σ|aw| · max|value|."""
    return float(np.abs(aw).sum((2, 3)).max() * np.abs(value).max()) if aw.size else 1.0


def msda_inputs(seed, shapes, M, D, P, Lq, borders=True):
    """Random value, attention weights (softmax over the L·P samples, as UPN's) and locations: uniform over
    [-0.15, 1.15] (some outside the level), plus (borders) exact level edges and pixel boundaries / centres."""
    r = rng(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = r.standard_normal((S, M, D)).astype(f32)
    logits = r.standard_normal((Lq, M, L * P))
    aw = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(Lq, M, L, P).astype(f32)
    loc = r.uniform(-0.15, 1.15, (Lq, M, L, P, 2)).astype(f32)
    if borders:
        for lid, (h, w) in enumerate(shapes):
            for ax, n in ((0, w), (1, h)):
                special = np.array([0.0, 1.0, -0.5 / n, 1 + 0.5 / n, 1 / n, 0.5 / n, (n - 0.5) / n,
                                    (n - 1) / n, r.integers(0, n + 1) / n], f32)
                pick = r.random((Lq, M, P)) < 0.3
                loc[:, :, lid, :, ax][pick] = r.choice(special, int(pick.sum()))
    return value, loc, aw


LEVELS = [(7, 5), (4, 3), (2, 2), (1, 1), (13, 17)]
MSDA_CASES = [  # (levels, M, D, P, Lq)
    (LEVELS, 3, 5, 3, 37),
    (LEVELS, 8, 32, 4, 53),                            # UPN's heads, channels and points
    ([(9, 11), (1, 1)], 2, 17, 2, 9),                  # a masked tail vector
    ([(6, 3)], 1, 80, 1, 5),                           # one 64-channel block + a 16-channel one
    ([(3, 4)], 2, 256, 3, 4),                          # the largest head (VLM_MAX_HEAD)
    ([(2, 3)] * 16, 3, 16, 16, 3),                     # L·P = 256 samples: one head per taps batch
    ([(5, 5)], 40, 3, 1, 6),                           # L·P = 1: 40 heads in one batch
    ([(1, 1)], 1, 1, 1, 1),
]


@pytest.mark.parametrize("shapes,M,D,P,Lq", MSDA_CASES, ids=[f"L{len(c[0])}-M{c[1]}-D{c[2]}-P{c[3]}" for c in MSDA_CASES])
def test_msda(shapes, M, D, P, Lq):
    value, loc, aw = msda_inputs(M * 100 + D + P, shapes, M, D, P, Lq)
    sh = np.array(shapes, np.int64)
    got = same_for_all_threads(lambda nt: core.msda(value, loc, aw, sh, n_threads=nt), "msda")
    assert got.shape == (Lq, M * D) and got.dtype == f32
    scale = msda_scale(value, aw)
    label = f"msda levels={len(shapes)} M={M} D={D} P={P} Lq={Lq}"
    check(label + " vs torch fp32", got, msda_ref(value, shapes, loc, aw), 1e-6 * scale)
    check(label + " vs float64", got, msda_ref(value, shapes, loc, aw, torch.float64), 1e-6 * scale)


def test_msda_torch_fp32_error():
    """For scale: the fp32 reference's own error against float64 on UPN's sizes (not a check of ours)."""
    value, loc, aw = msda_inputs(5, LEVELS, 8, 32, 4, 64)
    r32, r64 = msda_ref(value, LEVELS, loc, aw), msda_ref(value, LEVELS, loc, aw, torch.float64)
    check("torch fp32 reference vs float64 (for scale)", r32, r64, 1e-6 * msda_scale(value, aw))


def test_msda_nonfinite_locations():
    """NaN, ±inf and huge locations never index memory and contribute nothing; torch gives NaN for NaN / inf."""
    value, loc, aw = msda_inputs(11, LEVELS, 3, 8, 3, 40, borders=False)
    r = rng(12)
    bad = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 3.4e38, -3.4e38, 2.0 ** 31, -(2.0 ** 31)], f32)
    pick = r.random(loc.shape) < 0.2
    loc[pick] = r.choice(bad, int(pick.sum()))
    loc[0, 0] = np.nan   # one (query, head) with every sample NaN: output 0
    sh = np.array(LEVELS)
    got = same_for_all_threads(lambda nt: core.msda(value, loc, aw, sh, n_threads=nt), "msda non-finite")
    assert np.isfinite(got).all()
    assert not got[0, :8].any()
    # reference: the same samples moved far outside (zero contribution)
    far = loc.copy()
    far[~np.isfinite(far) | (np.abs(far) > 1e3)] = -10.0
    check("msda non-finite locations vs torch with them moved outside", got, msda_ref(value, LEVELS, far, aw),
          1e-6 * msda_scale(value, aw))
    t = msda_ref(value, LEVELS, loc, aw)
    print(f"[msda] torch on the same locations: {np.isnan(t).mean():.0%} NaN outputs (ours: none)")


def test_msda_strided_value_out_workspace_and_empty():
    """value[:, :M] of a wider array (rows ld_v > M·D floats apart) equals the contiguous copy; out= and workspace=
    give the same bits; Lq = 0 is fine."""
    shapes, M, D, P = [(5, 4), (2, 3)], 3, 16, 2
    value, loc, aw = msda_inputs(21, shapes, M, D, P, 7)
    wide = np.zeros((value.shape[0], M + 2, D), f32)
    wide[:, :M] = value
    view = wide[:, :M]
    assert not view.flags.c_contiguous
    a = core.msda(view, loc, aw, np.array(shapes))
    assert np.array_equal(a, core.msda(value, loc, aw, np.array(shapes)))
    out = np.full((7, M * D), np.nan, f32)
    ws = core.Workspace(2)
    for _ in range(2):   # a workspace's pool serves call after call
        assert core.msda(value, loc, aw, np.array(shapes), n_threads=2, out=out, workspace=ws) is out
        assert np.array_equal(out, a)
    x = rng(22).standard_normal((9, 12)).astype(f32)
    assert np.array_equal(core.group_norm(x, x[0], x[1], 3, n_threads=2, workspace=ws), core.group_norm(x, x[0], x[1], 3))
    assert np.array_equal(core.sine_pos_embed_hw(3, 4, n_threads=2, workspace=ws), core.sine_pos_embed_hw(3, 4))
    assert np.array_equal(core.sine_embed_boxes(x[:, :4], n_threads=2, workspace=ws), core.sine_embed_boxes(x[:, :4]))
    with pytest.raises(TypeError, match="workspace"):
        core.msda(value, loc, aw, np.array(shapes), workspace="ws")
    e = core.msda(value, loc[:0], aw[:0], np.array(shapes))
    assert e.shape == (0, M * D)


def test_msda_bad_input():
    shapes = np.array([(3, 4), (2, 2)])
    value, loc, aw = msda_inputs(31, [(3, 4), (2, 2)], 2, 8, 2, 5)
    ok = dict(value=value, loc=loc, aw=aw, shapes=shapes)

    def bad(exc, match, **kw):
        with pytest.raises(exc, match=match):
            core.msda(**dict(ok, **kw))

    bad(ValueError, "levels hold 16 tokens, value has 15", value=value[:15])
    bad(ValueError, "expected a 3-D", value=value.reshape(16, 16))
    bad(ValueError, "expected a 5-D", loc=loc[..., 0])
    bad(ValueError, "needs loc", loc=loc[:, :1])
    bad(ValueError, "needs loc", aw=aw[:4])
    bad(ValueError, "needs loc", shapes=np.array([(3, 4), (2, 2), (1, 1)]))
    bad(ValueError, r"shapes: expected \[L, 2\]", shapes=np.zeros((0, 2), np.int64))
    bad(ValueError, r"shapes: expected \[L, 2\]", shapes=shapes[:, :1])
    bad(ValueError, "sides must be in", shapes=np.array([(0, 16), (2, 2)]))
    bad(ValueError, "sides must be in", shapes=np.array([(-3, -4), (2, 2)]))
    bad(ValueError, "sides must be in", shapes=np.array([(2 ** 40, 1), (2, 2)]))
    bad(TypeError, None, shapes=shapes.astype(np.float64))   # no unsafe casts
    bad(TypeError, None, value=value.astype(np.float64))
    bad(ValueError, "could not convert", value="value")
    bad(ValueError, "at most", value=np.zeros((16, 1, 257), f32), loc=loc[:, :1], aw=aw[:, :1])
    bad(ValueError, "at most", loc=np.zeros((5, 2, 2, 17, 2), f32), aw=np.zeros((5, 2, 2, 17), f32))
    bad(ValueError, "out must be", out=np.zeros((5, 15), f32))
    bad(ValueError, "out must be", out=np.zeros((5, 16), np.float64))
    bad(ValueError, "n_threads", n_threads=0)
    many = np.array([(1, 1)] * 17)
    with pytest.raises(ValueError, match=r"shapes: expected \[L, 2\]"):
        core.msda(np.zeros((17, 1, 4), f32), np.zeros((2, 1, 17, 1, 2), f32), np.zeros((2, 1, 17, 1), f32), many)


def _isa_outputs(isa: str, path: str):
    """Runs the MSDA cases in a subprocess under VLM_GEMM_ISA=isa and saves their outputs to `path` (.npz)."""
    code = ("import sys, numpy as np\n"
            f"sys.path.insert(0, {HERE!r})\n"
            "import test_msda as t\n"
            "from vlmfo1._native import core\n"
            "outs = {}\n"
            "for i, (shapes, M, D, P, Lq) in enumerate(t.MSDA_CASES):\n"
            "    value, loc, aw = t.msda_inputs(M * 100 + D + P, shapes, M, D, P, Lq)\n"
            "    outs[str(i)] = core.msda(value, loc, aw, np.array(shapes))\n"
            f"np.savez({path!r}, kernel=core.gemm_info()['kernel'], **outs)\n")
    env = dict(os.environ, VLM_GEMM_ISA=isa, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return np.load(path)


@pytest.mark.skipif(bool(os.environ.get("VLM_GEMM_ISA")), reason="already under an ISA cap")
def test_msda_isa_levels_agree(tmp_path):
    """The portable path (VLM_GEMM_ISA=generic) against this process's path (AVX-512 where the CPU has it): the same
    taps, sums that differ by FMA rounding only."""
    gen = _isa_outputs("generic", str(tmp_path / "generic.npz"))
    assert str(gen["kernel"]) == "generic"
    here = core.gemm_info()["kernel"]
    worst = 0.0
    for i, (shapes, M, D, P, Lq) in enumerate(MSDA_CASES):
        value, loc, aw = msda_inputs(M * 100 + D + P, shapes, M, D, P, Lq)
        a = core.msda(value, loc, aw, np.array(shapes))
        scale = msda_scale(value, aw)
        worst = max(worst, float(np.abs(a - gen[str(i)]).max()) / scale)
        check(f"msda {here} vs generic, case {i}", a, gen[str(i)], 2e-7 * scale, rtol=0)
    print(f"[msda] {here} vs generic: max |diff| / scale = {worst:.3g}")


# ----------------------------------------------------------------------------- GroupNorm

def group_norm_ref(x, w, b, G, eps, dtype=torch.float32):
    """torch.nn.GroupNorm(G, C) on the NCHW transpose of a channels-last [HW, C] map, back to [HW, C]."""
    HW, C = x.shape
    gn = torch.nn.GroupNorm(G, C, eps=eps).to(dtype)
    with torch.no_grad():
        gn.weight.copy_(torch.from_numpy(w))
        gn.bias.copy_(torch.from_numpy(b))
        y = gn(torch.from_numpy(np.ascontiguousarray(x.T)).to(dtype)[None, :, :, None])
    return y[0, :, :, 0].T.numpy()


GN_CASES = [(1, 4, 2), (37, 256, 32), (5, 12, 3), (300, 48, 1), (3, 600, 2), (7, 9, 9), (64, 520, 4), (1000, 64, 8)]


@pytest.mark.parametrize("HW,C,G", GN_CASES)
def test_group_norm(HW, C, G):
    r = rng(HW * C + G)
    x = (r.standard_normal((HW, C)) * 2.5 + r.uniform(-4, 4, C)).astype(f32)   # per-channel offsets
    w, b = r.standard_normal(C).astype(f32), r.standard_normal(C).astype(f32)
    eps = 1e-5
    got = same_for_all_threads(lambda nt: core.group_norm(x, w, b, G, eps=eps, n_threads=nt), "group_norm")
    label = f"group_norm HW={HW} C={C} G={G}"
    inplace = x.copy()
    assert core.group_norm(inplace, w, b, G, eps=eps, n_threads=2, out=inplace) is inplace   # y aliasing x
    assert np.array_equal(inplace, got)
    check(label + " vs torch", got, group_norm_ref(x, w, b, G, eps), 1e-5, rtol=0)
    check(label + " vs float64", got, group_norm_ref(x, w, b, G, eps, torch.float64), 1e-7, rtol=1e-7)


def test_group_norm_bad_input():
    x, w = np.zeros((4, 12), f32), np.ones(12, f32)
    with pytest.raises(ValueError, match="do not split"):
        core.group_norm(x, w, w, 5)
    with pytest.raises(ValueError, match="do not split"):
        core.group_norm(x, w, w, 0)
    with pytest.raises(ValueError, match="need 12 values"):
        core.group_norm(x, w[:11], w, 3)
    with pytest.raises(ValueError, match="expected a 2-D"):
        core.group_norm(x.ravel(), w, w, 3)
    with pytest.raises(ValueError, match="eps"):
        core.group_norm(x, w, w, 3, eps=float("nan"))
    with pytest.raises(TypeError):
        core.group_norm(x.astype(np.float64), w, w, 3)
    with pytest.raises(ValueError, match="out must be"):
        core.group_norm(x, w, w, 3, out=np.zeros((4, 11), f32))
    assert core.group_norm(np.zeros((0, 12), f32), w, w, 3).shape == (0, 12)


# ----------------------------------------------------------------------------- sine position embeddings

def position_embedding_sine_hw(H, W, num_pos_feats, temperatureH, temperatureW):
    """PositionEmbeddingSineHW.forward (DINO / UPN; normalize=True, scale 2π) for one unmasked H x W map, as
    [H·W, 2F] channels-last."""
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_tx = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_tx = temperatureW ** (2 * (dim_tx // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_tx
    dim_ty = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_ty = temperatureH ** (2 * (dim_ty // 2) / num_pos_feats)
    pos_y = y_embed[:, :, :, None] / dim_ty
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
    return pos[0].permute(1, 2, 0).reshape(H * W, 2 * num_pos_feats).numpy()


@pytest.mark.parametrize("H,W,nf,th,tw", [(1, 1, 128, 20, 20), (1, 7, 128, 20, 20), (5, 1, 128, 20, 20),
                                          (13, 17, 128, 20, 20), (50, 75, 128, 20, 20), (6, 9, 64, 20, 10000),
                                          (4, 3, 2, 10000, 20)])
def test_sine_pos_embed_hw(H, W, nf, th, tw):
    got = same_for_all_threads(
        lambda nt: core.sine_pos_embed_hw(H, W, num_pos_feats=nf, temperature_h=th, temperature_w=tw, n_threads=nt),
        "sine_pos_embed_hw")
    assert got.shape == (H * W, 2 * nf) and got.dtype == f32
    check(f"sine_pos_embed_hw {H}x{W} F={nf} T=({th}, {tw}) vs torch", got,
          position_embedding_sine_hw(H, W, nf, th, tw), 2e-6, rtol=0)


def gen_sineembed_for_position(pos_tensor, num_pos_feats=128, temperature=10000):
    """DINO / UPN's gen_sineembed_for_position (4-d boxes; pos_tensor [n_query, bs, 4]); the 128 and 10000 of the
    original are parameters here."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos_tensor.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    x_embed = pos_tensor[:, :, 0] * scale
    y_embed = pos_tensor[:, :, 1] * scale
    pos_x = x_embed[:, :, None] / dim_t
    pos_y = y_embed[:, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[:, :, 0::2].sin(), pos_y[:, :, 1::2].cos()), dim=3).flatten(2)
    w_embed = pos_tensor[:, :, 2] * scale
    pos_w = w_embed[:, :, None] / dim_t
    pos_w = torch.stack((pos_w[:, :, 0::2].sin(), pos_w[:, :, 1::2].cos()), dim=3).flatten(2)
    h_embed = pos_tensor[:, :, 3] * scale
    pos_h = h_embed[:, :, None] / dim_t
    pos_h = torch.stack((pos_h[:, :, 0::2].sin(), pos_h[:, :, 1::2].cos()), dim=3).flatten(2)
    return torch.cat((pos_y, pos_x, pos_w, pos_h), dim=2)


@pytest.mark.parametrize("N,nf,T", [(1, 128, 10000), (7, 128, 10000), (900, 128, 10000), (33, 64, 20)])
def test_sine_embed_boxes(N, nf, T):
    boxes = rng(N + nf).uniform(-0.1, 1.1, (N, 4)).astype(f32)
    got = same_for_all_threads(lambda nt: core.sine_embed_boxes(boxes, num_pos_feats=nf, temperature=T, n_threads=nt),
                               "sine_embed_boxes")
    assert got.shape == (N, 4 * nf) and got.dtype == f32
    ref = gen_sineembed_for_position(torch.from_numpy(boxes)[:, None], nf, T)[:, 0].numpy()
    check(f"sine_embed_boxes N={N} F={nf} T={T} vs torch", got, ref, 2e-6, rtol=0)


def test_sine_embed_bad_input():
    with pytest.raises(ValueError, match="num_pos_feats"):
        core.sine_pos_embed_hw(3, 3, num_pos_feats=7)
    with pytest.raises(ValueError, match="num_pos_feats"):
        core.sine_embed_boxes(np.zeros((2, 4), f32), num_pos_feats=0)
    with pytest.raises(ValueError, match="H and W"):
        core.sine_pos_embed_hw(0, 3)
    with pytest.raises(ValueError, match="temperatures"):
        core.sine_pos_embed_hw(3, 3, temperature_h=-1)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        core.sine_embed_boxes(np.zeros((2, 3), f32))
    assert core.sine_embed_boxes(np.zeros((0, 4), f32)).shape == (0, 512)
    nan = core.sine_embed_boxes(np.full((1, 4), np.nan, f32))
    assert np.isnan(nan).all()


# ----------------------------------------------------------------------------- dispatch levels

@pytest.mark.skipif(bool(os.environ.get("VLM_GEMM_ISA")), reason="already under an ISA cap")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_msda_under_isa_cap(isa):
    env = dict(os.environ, VLM_GEMM_ISA=isa)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", __file__], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [ln[ln.index("[msda]"):] for ln in p.stdout.splitlines() if "[msda]" in ln]
    errs = [ln for ln in lines if "max abs err" in ln]
    print(f"[msda] under VLM_GEMM_ISA={isa}: {len(errs)} checks; largest errors:")
    for ln in sorted(errs, key=lambda s: -float(s.split("max abs err ")[1].split(",")[0]))[:5]:
        print("   ", ln)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert f"[msda] kernel {isa}" in lines, lines[:3]


def test_kernel_level():
    """The dispatch level the ops run at (the cap's, in the subprocesses above)."""
    kernel = core.gemm_info()["kernel"]
    print(f"[msda] kernel {kernel}")
    if os.environ.get("VLM_GEMM_ISA"):
        assert kernel == os.environ["VLM_GEMM_ISA"]
