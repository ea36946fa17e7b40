"""Qwen2.5-VL parity: vlmfo1's vision tower and image-conditioned generation against transformers.

Tiny random Qwen2_5_VLForConditionalGeneration checkpoints (written once per session by transformers; weights
std 0.15, norm weights 1 +- 0.2 so every path carries O(1) signal), run on two real COCO images of different
aspect ratios and one synthetic extreme strip (28 x 2000, aspect 71, a 1 x 71 merged grid: padded windows).

Checked, per image (the max errors are printed; run with -s to see them):
  (a) merged vision tokens vs `model.model.visual(pv, grid_thw).pooler_output`          rel 1e-4
  (b) the hidden states after each full-attention block vs transformers' block outputs,
      un-windowed (argsort(window_index) at merge-unit granularity) and converted from merge order to raster
      patch order (spec backbones.md §1.9)                                             rel 1e-4
  (c) M-RoPE positions [3, L] and rope delta vs `model.model.get_rope_index`            exact
  (d) last-position logits of the prefill vs the transformers forward                  rel 1e-4
  (e) 32 greedy tokens vs `model.generate` (eos disabled on both sides)                 identical
The reference always gets exactly our pixel_values, and `mm_token_type_ids` (without it transformers 5
silently falls back to text-only positions).

A second vision-only checkpoint (depth 8, full blocks [3, 7], MLP width 100: not a multiple of 16/32, so
kernel tails run) checks (a) and (b) through `VisionTower.from_checkpoint` on the stock `visual.*` layout.

"reference" mode (bf16-rounded rotary inv_freq, vision and text) is checked against a transformers copy whose
`inv_freq` buffers were replaced by their bf16-rounded values.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_close, max_errors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlmfo1.image import load_image  # noqa: E402
from vlmfo1.qwen_vl import QwenVL  # noqa: E402
from vlmfo1.safetensors import Checkpoint, round_bf16  # noqa: E402
from vlmfo1.vision import VisionTower  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO_DIR = DATA / "coco_tiny" / "val2017"
TIKTOKEN = DATA / "tokenizer" / "qwen.tiktoken"

RTOL = 1e-4          # vision tokens, full-attention features, logits (relative to max|reference|)
N_NEW = 32           # greedy tokens compared
THREADS = 2
IMAGE_TOKEN_ID = 151655
TEXT = "Describe this image."
# transformers attention for the reference: eager (per window / per image, fp32).  VLMFO1_REF_ATTN=sdpa switches
# to sdpa (same per-window calls, ~1.3x faster here, agrees with eager to ~1e-6).
ATTN = os.environ.get("VLMFO1_REF_ATTN", "eager")

TEXT_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                   max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                   tie_word_embeddings=True)
VISION_D4 = dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=64, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3])
VISION_D8 = dict(VISION_D4, depth=8, intermediate_size=100, fullatt_block_indexes=[3, 7])

IMAGES = {
    "coco_landscape": "000000005001.jpg",   # 640 x 480 -> grid 34 x 46
    "coco_portrait": "000000125952.jpg",    # 358 x 640 -> grid 46 x 26
    "strip_28x2000": None,                  # synthetic, H 28 x W 2000 -> grid 2 x 142 (merged 1 x 71)
}


def synthetic_strip(h=28, w=2000):
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 7 + y * 3) % 256, (x * y + 11 * y) % 253, 255 - (x + 5 * y) % 256], -1)
    return rgb.astype(np.uint8)


def image_array(name):
    f = IMAGES[name]
    if f is None:
        return synthetic_strip()
    p = COCO_DIR / f
    if not p.exists():
        pytest.skip(f"COCO image {p} not available")
    return load_image(str(p))


# ------------------------------------------------------------------------------------------ checkpoint builders

@torch.no_grad()
def randomize_(module, seed=0):
    """std 0.15 for every matrix / bias, 1 + 0.2 N(0,1) for RMSNorm weights: O(1) activations everywhere."""
    g = torch.Generator().manual_seed(seed)
    for n, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        p.copy_(1 + 0.2 * r if ("norm" in n or "ln_q" in n) else 0.15 * r)


def tokenizer_dir(base: Path) -> Path:
    d = base / "qwen_tokenizer"
    if not (d / "tokenizer.json").exists():
        from vlmfo1.tokenizer import Tokenizer

        if not TIKTOKEN.exists():
            pytest.skip(f"tokenizer {TIKTOKEN} not available")
        tmp = base / "qwen_tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        Tokenizer.from_tiktoken(str(TIKTOKEN)).save(str(tmp))
        tmp.rename(d)
    return d


def build_tiny_vl(base: Path, name: str = "tiny_vl_d4", vision=VISION_D4, seed=0) -> Path:
    """A tiny random Qwen2.5-VL checkpoint (stock layout, fp32) + tokenizer files under base/name; built once
    (also reused by test_vl_errors.py in the same session)."""
    base = Path(base)
    d = base / name
    if (d / "model.safetensors").exists():
        return d
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(text_config=dict(TEXT_CONFIG), vision_config=dict(vision), image_token_id=IMAGE_TOKEN_ID,
                           video_token_id=151656, vision_start_token_id=151652, tie_word_embeddings=True)
    m = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    randomize_(m, seed)
    tmp = base / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(str(tmp), safe_serialization=True)
    for f in tokenizer_dir(base).iterdir():
        shutil.copy(f, tmp / f.name)
    tmp.rename(d)
    return d


def build_vision_only(base: Path, name: str, vision=VISION_D8, seed=1):
    """A vision-only checkpoint in the stock layout (`visual.*` + config.json with a vision_config) and the
    transformers module that wrote it."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = Qwen2_5_VLConfig(text_config=dict(TEXT_CONFIG), vision_config=dict(vision))
    torch.manual_seed(seed)
    vis = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg.vision_config, attn_implementation=ATTN)
    vis = vis.float().eval()
    randomize_(vis, seed)
    d = Path(base) / name
    d.mkdir(parents=True, exist_ok=True)
    save_file({"visual." + k: v.contiguous() for k, v in vis.state_dict().items()}, str(d / "model.safetensors"))
    raw = {"model_type": "qwen2_5_vl", "vision_config": cfg.vision_config.to_dict()}
    (d / "config.json").write_text(json.dumps(raw, indent=1))
    return d, vis, raw


# ------------------------------------------------------------------------------------------ reference helpers

def window_index(grid, vcfg):
    from transformers.vision_utils import get_vision_window_index

    wi, _ = get_vision_window_index(torch.tensor([grid]), spatial_merge_size=2, window_size=vcfg.window_size,
                                    patch_size=vcfg.patch_size)
    return wi.numpy()


def window_to_raster(h, grid, wi):
    """[N, C] block output in transformers' window order -> (C, gh, gw) raster map (spec §1.9)."""
    _, gh, gw = grid
    C = h.shape[-1]
    merge = h.reshape(-1, 4, C)[np.argsort(wi)]                       # merge order (lh, lw, dy, dx)
    r = merge.reshape(gh // 2, gw // 2, 2, 2, C).transpose(0, 2, 1, 3, 4).reshape(gh, gw, C)
    return np.ascontiguousarray(r.transpose(2, 0, 1))


@torch.no_grad()
def ref_vision(visual, pv, grid):
    """(pooler_output [M, out], {block index: (C, gh, gw) raster map} for the full-attention blocks)."""
    full = list(visual.config.fullatt_block_indexes)
    got = {}
    hooks = [visual.blocks[i].register_forward_hook(
        lambda mod, args, out, i=i: got.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach().clone()))
        for i in full]
    try:
        out = visual(torch.from_numpy(pv), grid_thw=torch.tensor([grid]))
    finally:
        for h in hooks:
            h.remove()
    wi = window_index(grid, visual.config)
    maps = {i: window_to_raster(got[i].float().numpy(), grid, wi) for i in full}
    return out.pooler_output.float().numpy(), maps


def check_vision(tokens, feats, ref_tokens, ref_maps, label):
    assert tokens.shape == ref_tokens.shape, (tokens.shape, ref_tokens.shape)
    assert np.isfinite(ref_tokens).all()
    assert_close(tokens, ref_tokens, RTOL, name=f"{label} vision tokens")
    assert len(feats) == len(ref_maps)
    for f, (i, r) in zip(feats, sorted(ref_maps.items())):
        assert f.shape == r.shape, (i, f.shape, r.shape)
        assert_close(f, r, RTOL, name=f"{label} hidden state after full block {i}")


# ------------------------------------------------------------------------------------------ fixtures

class TinyVL:
    def __init__(self, path, model, vl):
        self.path, self.model, self.vl = path, model, vl
        self._cache = {}

    def inputs(self, name):
        """(image array, pixel_values, grid, ids, embeds, positions, delta) -- ours, computed once."""
        if name not in self._cache:
            img = image_array(name)
            pv, grid, _ = self.vl.processor(img)
            grid = tuple(int(v) for v in np.asarray(grid).ravel())
            ids, emb, pos, delta = self.vl.prepare(img, TEXT)
            self._cache[name] = (img, pv, grid, ids, emb, pos, delta)
        return self._cache[name]


def _ref_kwargs(ids, pv, grid):
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, pixel_values=torch.from_numpy(pv), image_grid_thw=torch.tensor([grid]),
                mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).int(), attention_mask=torch.ones_like(input_ids))


@torch.no_grad()
def ref_greedy(model, ids, pv, grid, n=N_NEW):
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id, gc.pad_token_id = None, 0
    gc.do_sample, gc.max_new_tokens, gc.min_new_tokens = False, n, None
    out = model.generate(**_ref_kwargs(ids, pv, grid), generation_config=gc)
    toks = out[0, len(ids):].tolist()
    assert len(toks) == n
    return toks


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = build_tiny_vl(tmp_path_factory.getbasetemp())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                               attn_implementation=ATTN).eval()
    torch.set_num_threads(THREADS)
    return TinyVL(path, model, QwenVL.load(str(path), mode="exact", n_threads=THREADS))


@pytest.fixture(scope="session")
def tiny_vl_reference(tiny_vl):
    """Our reference mode, and a transformers copy with bf16-rounded rotary inv_freq (vision and text)."""
    m = copy.deepcopy(tiny_vl.model)
    for rot in (m.model.visual.rotary_pos_emb, m.model.language_model.rotary_emb):
        rot.inv_freq = rot.inv_freq.to(torch.bfloat16).float()
        rot.original_inv_freq = rot.original_inv_freq.to(torch.bfloat16).float()
    vl = QwenVL.load(str(tiny_vl.path), mode="reference", n_threads=THREADS)
    return TinyVL(tiny_vl.path, m, vl)


@pytest.fixture(scope="module")
def vision_d8(tmp_path_factory):
    d, vis, raw = build_vision_only(tmp_path_factory.getbasetemp(), "tiny_vision_d8")
    vt = VisionTower.from_checkpoint(Checkpoint(str(d)), json.loads((d / "config.json").read_text()),
                                     mode="exact", n_threads=THREADS)
    return vt, vis


# ------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("name", list(IMAGES))
def test_vision_tokens_and_features(tiny_vl, name):
    """(a) + (b) on the depth-4 tower (full blocks [1, 3])."""
    img, pv, grid, *_ = tiny_vl.inputs(name)
    tokens, feats = tiny_vl.vl.vision(pv, grid, features=True)
    ref_tokens, ref_maps = ref_vision(tiny_vl.model.model.visual, pv, grid)
    assert tokens.shape == (grid[1] * grid[2] // 4, 64)
    check_vision(tokens, feats, ref_tokens, ref_maps, f"d4 {name} grid {grid}")
    # the plain call returns the same tokens
    np.testing.assert_array_equal(tiny_vl.vl.vision(pv, grid), tokens)


@pytest.mark.parametrize("name", list(IMAGES))
def test_vision_depth8_mlp100(vision_d8, tiny_vl, name):
    """(a) + (b) on a depth-8 tower with full blocks [3, 7] and MLP width 100 (kernel tails)."""
    vt, vis = vision_d8
    _, pv, grid, *_ = tiny_vl.inputs(name)
    tokens, feats = vt(pv, grid, features=True)
    assert vt.n_full == 2
    ref_tokens, ref_maps = ref_vision(vis, pv, grid)
    check_vision(tokens, feats, ref_tokens, ref_maps, f"d8/I100 {name} grid {grid}")


@pytest.mark.parametrize("name", list(IMAGES))
def test_rope_positions(tiny_vl, name):
    """(c) M-RoPE positions and rope delta vs get_rope_index."""
    _, pv, grid, ids, emb, pos, delta = tiny_vl.inputs(name)
    assert ids.count(IMAGE_TOKEN_ID) == grid[1] * grid[2] // 4
    kw = _ref_kwargs(ids, pv, grid)
    rpos, rdelta = tiny_vl.model.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"],
                                                      attention_mask=kw["attention_mask"])
    rpos = rpos[:, 0].numpy()
    assert pos.shape == rpos.shape == (3, len(ids))
    bad = np.argwhere(pos != rpos)
    assert bad.size == 0, f"{name}: {len(bad)} positions differ, first at {bad[0]}: ours {pos[:, bad[0][1]]}, " \
                          f"reference {rpos[:, bad[0][1]]}"
    assert delta == int(rdelta.reshape(-1)[0]), (delta, rdelta)
    print(f"[rope] {name}: L {len(ids)}, positions equal, delta {delta}")


@pytest.mark.parametrize("name", list(IMAGES))
def test_prefill_logits(tiny_vl, name):
    """(d) last-position logits of the image-conditioned prefill."""
    _, pv, grid, ids, emb, pos, delta = tiny_vl.inputs(name)
    with torch.no_grad():
        ref = tiny_vl.model(**_ref_kwargs(ids, pv, grid)).logits[0, -1].float().numpy()
    ours = tiny_vl.vl.decoder.session().prefill_embeds(emb, pos)
    assert_close(ours, ref, RTOL, name=f"{name} last logits")
    assert int(np.argmax(ours)) == int(np.argmax(ref))


@pytest.mark.parametrize("name", list(IMAGES))
def test_greedy_tokens(tiny_vl, name):
    """(e) 32 greedy tokens identical (no stop tokens on either side)."""
    img, pv, grid, ids, *_ = tiny_vl.inputs(name)
    ref = ref_greedy(tiny_vl.model, ids, pv, grid)
    ours = tiny_vl.vl.generate_ids(img, TEXT, max_new_tokens=N_NEW, stop_ids=[])
    print(f"[greedy] {name}: {ours}")
    assert len(set(ref)) > 1, "degenerate reference continuation"
    assert ours == ref, f"{name}: first difference at step {next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)}"


# ------------------------------------------------------------------------------------------ reference mode

@pytest.mark.parametrize("name", ["coco_landscape", "strip_28x2000"])
def test_reference_mode_vision(tiny_vl, tiny_vl_reference, name):
    _, pv, grid, *_ = tiny_vl.inputs(name)
    exact = tiny_vl.vl.vision(pv, grid)
    tokens, feats = tiny_vl_reference.vl.vision(pv, grid, features=True)
    # close to exact mode, but not identical (bf16-rounded rotary frequencies)
    assert not np.array_equal(tokens, exact), "reference mode gave exactly the exact-mode tokens"
    _, rel = max_errors(tokens, exact)
    print(f"[reference mode] {name}: vision tokens vs exact mode: max rel diff {rel:.3e}")
    assert rel < 0.2
    ref_tokens, ref_maps = ref_vision(tiny_vl_reference.model.model.visual, pv, grid)
    check_vision(tokens, feats, ref_tokens, ref_maps, f"reference-mode {name}")


@pytest.mark.parametrize("name", ["coco_landscape", "strip_28x2000"])
def test_reference_mode_generation(tiny_vl_reference, name):
    """Logits and greedy tokens vs transformers with bf16-rounded inv_freq.  Our reference-mode greedy argmax
    runs on bf16-rounded logits (the official bf16 run's rounding); if that ever flips a token vs the fp32
    reference, the step logits (teacher-forced along the reference tokens) must still agree."""
    t = tiny_vl_reference
    img, pv, grid, *_ = t.inputs(name)
    ids, emb, pos, delta = t.vl.prepare(img, TEXT)
    kw = _ref_kwargs(ids, pv, grid)
    with torch.no_grad():
        ref_last = t.model(**kw).logits[0, -1].float().numpy()
    s = t.vl.decoder.session()
    assert_close(s.prefill_embeds(emb, pos), ref_last, RTOL, name=f"reference-mode {name} last logits")
    ref = ref_greedy(t.model, ids, pv, grid)
    ours = t.vl.generate_ids(img, TEXT, max_new_tokens=N_NEW, stop_ids=[])
    if ours != ref:
        k = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
        print(f"[reference mode] {name}: greedy token flip at step {k} (ours {ours[k]}, reference {ref[k]}); "
              "comparing step logits instead")
        with torch.no_grad():
            full = torch.tensor([ids + ref[:-1]])
            kw2 = dict(kw, input_ids=full, mm_token_type_ids=(full == IMAGE_TOKEN_ID).int(),
                       attention_mask=torch.ones_like(full))
            ref_steps = t.model(**kw2).logits[0, len(ids) - 1:].float().numpy()
        s = t.vl.decoder.session()
        lg = [s.prefill_embeds(emb, pos)]
        s.rope_delta = delta
        for tok in ref[:-1]:
            lg.append(s.step(tok))
        assert_close(np.stack(lg), ref_steps, RTOL, name=f"reference-mode {name} step logits")
        # the flip must be explained by the bf16 rounding of the logits: there our token wins (ties -> lowest id)
        r16 = round_bf16(ref_steps[k])
        assert r16[ours[k]] >= r16[ref[k]] and (r16[ours[k]] > r16[ref[k]] or ours[k] < ref[k]), \
            (k, ref_steps[k][[ours[k], ref[k]]], r16[[ours[k], ref[k]]])
        print(f"[reference mode] {name}: step {k} fp32 logits {ref_steps[k][[ref[k], ours[k]]]} round to "
              f"{r16[[ref[k], ours[k]]]} in bf16")
    else:
        print(f"[reference mode] {name}: {N_NEW} greedy tokens equal")
