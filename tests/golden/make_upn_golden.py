#!/usr/bin/env python3
"""Make the UPN golden files (tests/golden/upn_<size>_<image>.npz, upn_resize_golden.json) and key manifests
(upn_tiny_keys.json, upn_full_keys.json).

Runs the OFFICIAL UPN code (`detect_tools/upn` of om-ai-lab/VLM-FO1, a checkout whose path is given with
--official; nothing of it is copied here) on a random checkpoint written by `vlmfo1.testing.upn.write_random_upn`,
on CPU, in float32 eager. See tests/golden/README.md ("UPN") for the exact command, environment and the meaning of
every array.

    /tmp/upnref/bin/python tests/golden/make_upn_golden.py --official /path/to/VLM-FO1 --out tests/golden/ [--size tiny]

Patches applied at import time (never to the checkout):
  * torchvision: its compiled ops do not load beside torch 2.13 ("operator torchvision::nms does not exist"), so the
    package's __init__ is never run: `torchvision` is a bare package whose __path__ is the installed one, so the real
    pure-Python `torchvision.transforms` (functional, _functional_pil, ...) and `torchvision.utils` import from it;
    `torchvision._is_tracing` is defined as in its __init__; every other `torchvision.*` module is a stub (timm
    imports some at module level); `torchvision.ops.nms` is `nms` below (torchvision's CPU-kernel semantics in
    torch ops);
  * `MultiScaleDeformableAttention` (the compiled CUDA/CPU extension, not built) is a stub module so that
    ops/functions/ms_deform_attn_func.py imports, and `MSDeformAttnFunction` (in ms_deform_attn.py's namespace, where
    MSDeformAttn.forward looks it up) is replaced by a class whose `apply` calls the official pure-PyTorch
    `ms_deform_attn_core_pytorch` of the same file (im2col_step is a CUDA batching detail, unused);
  * `UPNWrapper.__init__` (torch.load + `.to("cuda")`) and `UPNWrapper._inference` (`.to("cuda")`) are not called:
    the model is built here (Config.fromfile of configs/upn_large.py, the size's overrides applied to the config
    dict, `build_architecture`, our checkpoint loaded with load_state_dict(strict=True), `.eval()`), and the forward
    is `_inference`'s body without the device move (nested_tensor_from_tensor_list, torch.no_grad, model(samples,
    "fine_grained_prompt")); the wrapper's own construct_input / transform_image / postprocess / filter run
    unchanged on an instance made with object.__new__.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vlmfo1.testing.upn import upn_config, upn_shapes, write_random_upn  # noqa: E402

COCO = REPO.parent / "shared" / "data" / "coco_tiny" / "val2017"
IMAGES = ["000000261888.jpg", "000000125952.jpg"]    # landscape 640x426 -> 1201x800, portrait 358x640 -> 746x1333
SEED = 0
N_SUB = 4096                 # entries of a fixed random subset of a map
SUB_SEED = 20240611          # subset generator: default_rng([SUB_SEED, crc32(key)])
MIN_SCORE = 0.3
NMS_DEFAULT = 0.8
NMS_SECOND = (0.5, 0.3, 0.1)  # the first of these that removes more boxes than NMS_DEFAULT is the second filter
PROMPT = "fine_grained_prompt"
RESIZE_CASES = [(1000, 750), (640, 480), (500, 399), (3000, 200), (200, 3000), (801, 800), (800, 801), (800, 800),
                (1066, 800), (800, 1066), (1333, 800), (1334, 800), (800, 1333), (2000, 1000), (1000, 2000),
                (2666, 1335), (1335, 2666), (200, 150), (1, 1), (5000, 5000), (427, 640), (640, 427), (1920, 1080),
                (1080, 1920), (333, 555), (4000, 3), (3, 4000), (1599, 960), (1600, 960)]

import torch  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# torchvision.ops.nms, torchvision's CPU kernel (csrc/ops/cpu/nms_kernel.cpp) in torch ops

def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS with torchvision's CPU semantics: order = STABLE sort of the scores, descending
    (`scores.sort(/*stable=*/true, 0, /*descending=*/true)`); areas = (x2 - x1) * (y2 - y1) and
    IoU = inter / (area_i + area_j - inter), all in the boxes' dtype (float32 here), inter = max(0, min(x2) -
    max(x1)) * max(0, min(y2) - max(y1)); box j is suppressed when IoU > iou_threshold strictly, the comparison in
    double (C++ promotes `float > double`). Returns the kept indices (int64) in descending score order."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    order = torch.sort(scores, stable=True, dim=0, descending=True)[1]
    x1, y1, x2, y2 = (boxes[:, k].contiguous() for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    n = boxes.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    zero = torch.zeros((), dtype=boxes.dtype)
    for _i in range(n):
        i = int(order[_i])
        if suppressed[i]:
            continue
        keep.append(i)
        j = order[_i + 1:]
        xx1 = torch.maximum(x1[i], x1[j])
        yy1 = torch.maximum(y1[i], y1[j])
        xx2 = torch.minimum(x2[i], x2[j])
        yy2 = torch.minimum(y2[i], y2[j])
        w = torch.maximum(zero, xx2 - xx1)
        h = torch.maximum(zero, yy2 - yy1)
        inter = w * h
        ovr = inter / ((areas[i] + areas[j]) - inter)
        hit = ovr.double() > float(iou_threshold)
        suppressed[j[hit]] = True
    return torch.tensor(keep, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# import shims

class _StubMeta(type):
    """Classes whose every attribute is another stub class (enough for timm's module-level torchvision use)."""
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        v = _StubMeta(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(cls, name, v)
        return v


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        v = _StubMeta(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, v)
        return v


TV_REAL = ("torchvision.transforms", "torchvision.utils")


class _TorchvisionFinder:
    """`torchvision` = a bare package over the installed files (its __init__, which loads the compiled ops, is not
    run); the pure-Python modules in TV_REAL are the real ones, every other torchvision.* module is a stub."""
    def __init__(self, tv_dir: str):
        self.tv_dir = tv_dir

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or (name.startswith("torchvision.") and
                                     not any(name == r or name.startswith(r + ".") for r in TV_REAL)):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = [self.tv_dir] if spec.name == "torchvision" else []
        return m

    def exec_module(self, module):
        if module.__name__ == "torchvision":
            module._is_tracing = lambda: torch._C._get_tracing_state() is not None   # as torchvision/__init__.py


def install_shims() -> dict:
    spec = importlib.util.find_spec("torchvision")     # locates the package without importing it
    if spec is None:
        raise SystemExit("torchvision (0.28.0, --no-deps) must be installed: its Python transforms are used")
    tv_dir = os.path.dirname(spec.origin)
    for k in list(sys.modules):
        if k == "torchvision" or k.startswith("torchvision."):
            del sys.modules[k]
    sys.meta_path.insert(0, _TorchvisionFinder(tv_dir))
    import torchvision
    import torchvision.ops
    import torchvision.transforms.functional  # noqa: F401  (real)
    torchvision.__version__ = importlib.metadata.version("torchvision")
    torchvision.ops.nms = nms
    msda = types.ModuleType("MultiScaleDeformableAttention")

    def _missing(*a, **k):
        raise RuntimeError("MultiScaleDeformableAttention (compiled) is not available; the pure-PyTorch fallback "
                           "should have been used")
    msda.ms_deform_attn_forward = msda.ms_deform_attn_backward = _missing
    sys.modules["MultiScaleDeformableAttention"] = msda
    return {"torchvision": torchvision.__version__, "torchvision_dir": tv_dir}


class Official:
    def __init__(self, root: str, commit: str = ""):
        self.root = os.path.abspath(root)
        self.tv = install_shims()
        sys.path.insert(0, self.root)
        import detect_tools.upn as U
        import detect_tools.upn.ops.functions as Ff
        import detect_tools.upn.ops.functions.ms_deform_attn_func as Fm
        import detect_tools.upn.ops.modules.ms_deform_attn as Mm
        import detect_tools.upn.transforms.transform as T
        from detect_tools.upn.inference_wrapper import UPNWrapper
        from mmengine import Config
        core = Fm.ms_deform_attn_core_pytorch

        class MSDeformAttnFunctionPyTorch:
            """MSDeformAttnFunction.apply -> the official pure-PyTorch ms_deform_attn_core_pytorch."""
            @staticmethod
            def apply(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
                      im2col_step):
                return core(value, value_spatial_shapes, sampling_locations, attention_weights)
        Mm.MSDeformAttnFunction = Ff.MSDeformAttnFunction = Fm.MSDeformAttnFunction = MSDeformAttnFunctionPyTorch
        self.U, self.T, self.UPNWrapper, self.Config = U, T, UPNWrapper, Config
        self.commit = commit or subprocess.run(["git", "-C", self.root, "rev-parse", "HEAD"], capture_output=True,
                                               text=True).stdout.strip() or "unknown"

    def model_cfg(self, cfg: dict):
        """configs/upn_large.py's `model`, with `cfg`'s sizes written into it (no change for upn_config('full'))."""
        c = self.Config.fromfile(os.path.join(self.root, "detect_tools/upn/configs/upn_large.py")).model
        full = upn_config("full")
        t = c.transformer_cfg
        # the canonical config must be the file's
        assert (t.num_queries, c.num_queries, t.encoder_cfg.num_layers, t.decoder_cfg.num_layers,
                t.encoder_cfg.encoder_layer_cfg.d_ffn, t.decoder_cfg.decoder_layer_cfg.d_ffn, t.num_feature_levels,
                t.encoder_cfg.encoder_layer_cfg.n_heads, c.vision_backbone_cfg.backbone_cfg) == (
            full["num_queries"], full["num_queries"], full["enc_layers"], full["dec_layers"], full["d_ffn"],
            full["d_ffn"], full["n_levels"], full["n_heads"], full["swin"]["name"]), "upn_config('full') != file"
        s = cfg["swin"]
        if s.get("name") != full["swin"]["name"] or s != full["swin"]:
            c.vision_backbone_cfg.backbone_cfg = dict(
                type="SwinTransformer", embed_dim=s["embed_dim"], depths=list(s["depths"]),
                num_heads=list(s["num_heads"]), window_size=s["window_size"], out_indices=tuple(s["out_indices"]),
                dilation=False, use_checkpoint=False, pretrain_img_size=384)
        t.num_queries = c.num_queries = cfg["num_queries"]
        t.encoder_cfg.num_layers = cfg["enc_layers"]
        t.decoder_cfg.num_layers = cfg["dec_layers"]
        t.encoder_cfg.encoder_layer_cfg.d_ffn = t.decoder_cfg.decoder_layer_cfg.d_ffn = cfg["d_ffn"]
        return c

    def build(self, cfg: dict):
        return self.U.build_architecture(self.model_cfg(cfg))


# ----------------------------------------------------------------------------------------------------------------
# storage helpers

def _subset(key: str, shape) -> np.ndarray:
    n = int(np.prod(shape))
    if n <= N_SUB:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([SUB_SEED, zlib.crc32(key.encode())])
    return np.sort(rng.choice(n, N_SUB, replace=False)).astype(np.int64)


def put_map(d: dict, key: str, t) -> None:
    """A [C, H, W] map (or [N, C] token matrix): __shape, __idx ([n, ndim] coordinates of a fixed random subset, int16
    if they fit else int32), __val (float32), __chan_mean / __chan_absmean (float64 stats over all positions, stored
    float32; channel = axis 0 of a map, axis 1 of a token matrix), __sum / __sumsq (float64)."""
    a = t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
    idx = _subset(key, a.shape)
    coords = np.stack(np.unravel_index(idx, a.shape), 1)
    d[key + "__shape"] = np.array(a.shape, dtype=np.int64)
    d[key + "__idx"] = coords.astype(np.int16 if max(a.shape) < 32768 else np.int32)
    d[key + "__val"] = a.reshape(-1)[idx]
    a64 = a.astype(np.float64)
    per_chan = a64.reshape(a.shape[0], -1) if a.ndim == 3 else a64.reshape(-1, a.shape[-1]).T
    d[key + "__chan_mean"] = per_chan.mean(1).astype(np.float32)
    d[key + "__chan_absmean"] = np.abs(per_chan).mean(1).astype(np.float32)
    d[key + "__sum"] = np.array(a64.sum())
    d[key + "__sumsq"] = np.array((a64 ** 2).sum())


def versions(off: Official) -> dict:
    import mmengine
    import PIL
    import timm
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
         "pillow": PIL.__version__, "mmengine": mmengine.__version__, "timm": timm.__version__,
         "torchvision": off.tv["torchvision"] + " (Python transforms only; ops stubbed)"}
    try:
        import safetensors
        v["safetensors"] = safetensors.__version__
    except Exception:  # noqa: BLE001
        pass
    return v


# ----------------------------------------------------------------------------------------------------------------
# manifests and the resize rule

def manifest(off: Official, size: str) -> dict:
    cfg = upn_config(size)
    model = off.build(cfg)
    sd = model.state_dict()
    keys = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sd.items()}
    ours = {k: [list(s), dt] for k, (s, dt) in upn_shapes(cfg).items()}
    if keys != ours:
        missing = sorted(set(keys) - set(ours))[:10]
        extra = sorted(set(ours) - set(keys))[:10]
        bad = sorted(k for k in set(keys) & set(ours) if keys[k] != ours[k])[:10]
        raise SystemExit(f"{size}: writer layout != official: missing {missing} extra {extra} shape/dtype {bad}")
    if list(keys) != list(ours):
        raise SystemExit(f"{size}: same keys, different order")
    shared = {}
    for k, v in sd.items():
        shared.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    aliases = [ks for ks in shared.values() if len(ks) > 1]
    n_float = int(sum(v.numel() for v in sd.values() if v.is_floating_point()))
    n_unique = int(sum(p.numel() for p in model.parameters()))
    del model, sd
    return {"official_commit": off.commit,
            "note": "name -> [shape, dtype] of model.state_dict() of the official UPN (configs/upn_large.py with the "
                    "size's overrides), in state-dict order; written by tests/golden/make_upn_golden.py",
            "config": cfg, "n_tensors": len(keys), "n_float_values": n_float, "n_unique_parameters": n_unique,
            "aliases": aliases, "tensors": keys}


def resize_golden(off: Official) -> dict:
    """The official RandomResize([800], max_size=1333) (transform.py:resize) on blank RGB images of each (W, H)."""
    from PIL import Image
    out = []
    for w, h in RESIZE_CASES:
        img = Image.new("RGB", (w, h))
        r, _ = off.T.RandomResize([800], max_size=1333)(img, None)
        out.append({"in_wh": [w, h], "out_wh": list(r.size), "resized": r is not img})
    return {"official_commit": off.commit,
            "rule": "detect_tools/upn/transforms/transform.py resize(image, None, 800, max_size=1333): "
                    "get_size_with_aspect_ratio, then torchvision F.resize (PIL bilinear) unless the size is "
                    "unchanged", "cases": out}


# ----------------------------------------------------------------------------------------------------------------
# one image

def run_image(off: Official, model, cfg: dict, image: str) -> tuple:
    from PIL import Image
    path = str(COCO / image)
    wrapper = object.__new__(off.UPNWrapper)          # the official pre/post-processing, no __init__ (cuda)
    wrapper.model = model
    d: dict = {}
    meta: dict = {}
    pil = Image.open(path)
    meta["image"] = image
    meta["image_mode"] = pil.mode
    meta["orig_wh"] = list(pil.size)
    # the official resize alone (uint8 result), for the port's resize check
    resized, _ = off.T.RandomResize([800], max_size=1333)(pil, None)
    u8 = np.asarray(resized)
    d["resized_u8_shape"] = np.array(u8.shape, dtype=np.int64)                     # [h, w, 3]
    idx = _subset("resized_u8", u8.shape)
    d["resized_u8__idx"] = np.stack(np.unravel_index(idx, u8.shape), 1).astype(np.int16)
    d["resized_u8__val"] = u8.reshape(-1)[idx]
    meta["resized_u8_sha256"] = hashlib.sha256(np.ascontiguousarray(u8).tobytes()).hexdigest()

    t0 = time.time()
    input_images, image_sizes = wrapper.construct_input([path])       # Image.open + transform_image (official)
    x = input_images[0]
    d["input_hw"] = np.array(x.shape[1:], dtype=np.int64)
    d["image_size_hw"] = np.array(image_sizes[0], dtype=np.int64)
    x64 = x.double()
    d["input__chan_mean"] = x64.mean((1, 2)).float().numpy()
    d["input__chan_absmean"] = x64.abs().mean((1, 2)).float().numpy()
    d["input__chan_min"] = x.amin((1, 2)).numpy()
    d["input__chan_max"] = x.amax((1, 2)).numpy()
    d["input__sum"] = np.array(float(x64.sum()))
    d["input__sumsq"] = np.array(float((x64 ** 2).sum()))
    idx = _subset("input", tuple(x.shape))
    d["input__idx"] = np.stack(np.unravel_index(idx, tuple(x.shape)), 1).astype(np.int16)
    d["input__val"] = x.numpy().reshape(-1)[idx]
    # the tensor is exactly to_tensor(resized) then normalize (checks that the split above describes it)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    ref = (torch.from_numpy(u8.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    meta["input_max_abs_diff_vs_u8_normalize"] = float((ref - x).abs().max())

    # hooks
    cap: dict = {"pos": [], "proj": {}}
    hooks = []
    m = model
    hooks.append(m.backbone.model.pos_embed.register_forward_hook(lambda mod, i, o: cap["pos"].append(o.detach())))
    for lv, proj in enumerate(m.input_proj):
        hooks.append(proj.register_forward_hook(
            lambda mod, i, o, lv=lv: cap["proj"].__setitem__(lv, (i[0].detach(), o.detach()))))
    hooks.append(m.transformer.register_forward_pre_hook(lambda mod, a: cap.__setitem__("tin", a)))
    hooks.append(m.transformer.encoder.register_forward_hook(lambda mod, i, o: cap.__setitem__("memory", o.detach())))
    hooks.append(m.transformer.enc_output_norm.register_forward_hook(
        lambda mod, i, o: cap.__setitem__("out_mem", o.detach())))
    hooks.append(m.transformer.enc_out_class_embed.register_forward_hook(
        lambda mod, i, o: cap.__setitem__("enc_cls", o.detach())))
    hooks.append(m.transformer.enc_out_bbox_embed.register_forward_hook(
        lambda mod, i, o: cap.__setitem__("enc_box", o.detach())))
    hooks.append(m.transformer.decoder.register_forward_hook(lambda mod, i, o: cap.__setitem__("dec", o)))
    try:
        # UPNWrapper._inference without `.to("cuda")`
        samples = off.U.nested_tensor_from_tensor_list(input_images)
        t1 = time.time()
        with torch.no_grad():
            outputs = model(samples, PROMPT)
        t2 = time.time()
    finally:
        for h in hooks:
            h.remove()
    meta["time_preprocess_s"] = round(t1 - t0, 3)
    meta["time_forward_s"] = round(t2 - t1, 3)

    # backbone levels, projected levels, position embeddings
    n_bb = len(m.backbone.num_channels)
    for lv in range(n_bb):
        put_map(d, f"backbone{lv}", cap["proj"][lv][0][0])
    for lv in range(len(m.input_proj)):
        put_map(d, f"proj{lv}", cap["proj"][lv][1][0])
    assert len(cap["pos"]) == len(m.input_proj), len(cap["pos"])
    for lv, p in enumerate(cap["pos"]):
        put_map(d, f"pos{lv}", p[0])
    src_flatten, lvl_pos, lsi, shapes, valid_ratios, mask_flatten, prompt_type = cap["tin"]
    d["spatial_shapes"] = shapes.numpy().astype(np.int64)
    d["level_start_index"] = lsi.numpy().astype(np.int64)
    d["valid_ratios"] = valid_ratios[0].numpy()
    d["n_masked_tokens"] = np.array(int(mask_flatten.sum()))
    put_map(d, "memory", cap["memory"][0])

    # two-stage selection (recomputed from the hooked values with the official functions; checked below)
    k = cfg["num_queries"]
    logits = cap["enc_cls"].max(-1)[0]                                        # [1, N]
    top_v, top_i = torch.topk(logits, k, dim=1)
    _, proposals = off.U.gen_encoder_output_proposals(cap["memory"], mask_flatten, shapes, None)
    coords = cap["enc_box"] + proposals
    ref_unsig = torch.gather(coords, 1, top_i.unsqueeze(-1).repeat(1, 1, 4))
    dec_hs, dec_refs = cap["dec"]
    if not torch.equal(ref_unsig.sigmoid()[0], dec_refs[0][0]):
        raise SystemExit("recomputed top-k selection differs from the decoder's input reference points")
    lg = logits[0]
    valid = torch.isfinite(proposals[0]).all(-1)
    put_map(d, "enc_logits", lg[:, None])
    d["topk_proposals"] = top_i[0].numpy().astype(np.int64)
    d["topk_logits"] = top_v[0].numpy()
    d["topk_refpoints_unsig"] = ref_unsig[0].numpy()
    d["topk_output_proposals"] = torch.gather(proposals, 1, top_i.unsqueeze(-1).repeat(1, 1, 4))[0].numpy()
    srt = torch.sort(lg, descending=True)[0].double()
    gaps = (srt[:k - 1] - srt[1:k])
    rel = gaps / torch.maximum(srt[:k - 1].abs(), srt[1:k].abs())
    bgap = float(srt[k - 1] - srt[k])
    inv = lg[~valid]
    ts = {"n_tokens": int(lg.numel()), "k": k, "n_invalid_proposals": int((~valid).sum()),
          "invalid_logits_distinct": sorted({float(v) for v in inv.tolist()})[:4],
          "invalid_in_topk": int((~valid[top_i[0]]).sum()),
          "kth_logit": float(srt[k - 1]), "next_logit": float(srt[k]), "boundary_gap": bgap,
          "boundary_gap_rel": bgap / max(abs(float(srt[k - 1])), abs(float(srt[k]))),
          "min_gap_selected": float(gaps.min()), "min_gap_selected_at": int(gaps.argmin()),
          "min_gap_selected_rel": float(rel.min()),
          "n_adjacent_rel_gap_below_1e-4": int((rel < 1e-4).sum()),
          "n_adjacent_rel_gap_below_1e-5": int((rel < 1e-5).sum()),
          "n_adjacent_rel_gap_below_1e-6": int((rel < 1e-6).sum()),
          "n_exact_ties_in_topk_or_boundary": int((srt[:k] == srt[1:k + 1]).sum())}
    if inv.numel():
        ts["invalid_logit_rank"] = int((lg > inv.max()).sum())
    meta["topk"] = ts
    d["topk_adjacent_rel_gap"] = rel.float().numpy()

    # decoder
    d["dec_hs"] = torch.stack([h[0] for h in dec_hs]).numpy()                  # [L, nq, 256] after decoder.norm
    d["dec_refs"] = torch.stack([r[0] for r in dec_refs]).numpy()              # [L+1, nq, 4] sigmoid space
    d["pred_logits"] = outputs["pred_logits"][0, :, 0].numpy()
    d["pred_boxes"] = outputs["pred_boxes"][0].numpy().copy()                  # cxcywh, normalized
    sc = torch.sigmoid(outputs["pred_logits"][0, :, 0])
    meta["scores"] = {"min": float(sc.min()), "median": float(sc.median()), "max": float(sc.max()),
                      "n_ge_0.3": int((sc >= MIN_SCORE).sum()), "n_ge_0.5": int((sc >= 0.5).sum())}

    # official post-processing (postprocess mutates pred_boxes in place: give it a copy)
    outs = {"pred_boxes": outputs["pred_boxes"].clone(), "pred_logits": outputs["pred_logits"].clone()}
    post = wrapper.postprocess(outs, image_sizes)
    d["post_boxes"] = np.asarray(post["original_xyxy_boxes"][0], dtype=np.float32)
    d["post_scores"] = post["scores"][0, :, 0].numpy()
    n_pass = int((post["scores"][0, :, 0] >= MIN_SCORE).sum())
    filters = []

    def do_filter(j, nms_value):
        f = wrapper.filter(post, min_score=MIN_SCORE, nms_value=nms_value)
        boxes = np.asarray(f["original_xyxy_boxes"][0] if f["original_xyxy_boxes"] else np.zeros((0, 4)),
                           dtype=np.int32).reshape(-1, 4)
        scores = np.asarray(f["scores"][0] if f["scores"] else [], dtype=np.float32)   # round(np.float32, 2)
        d[f"filter{j}_boxes"] = boxes
        d[f"filter{j}_scores"] = scores
        info = {"min_score": MIN_SCORE, "nms_value": nms_value, "n_score_pass": n_pass, "n_kept": len(boxes),
                "n_removed_by_nms": n_pass - len(boxes)}
        filters.append(info)
        return info

    a = do_filter(0, NMS_DEFAULT)
    for thr in NMS_SECOND:
        b = do_filter(1, thr)
        if b["n_removed_by_nms"] > a["n_removed_by_nms"]:
            break
        filters.pop()
    meta["filters"] = filters
    meta["patches"] = ["torchvision compiled ops not loaded (bare package, real Python transforms, stubs)",
                       "torchvision.ops.nms = pure-torch nms (CPU-kernel semantics)",
                       "MSDeformAttnFunction.apply = ms_deform_attn_core_pytorch (official fallback)",
                       "UPNWrapper.__init__ / _inference bypassed (no cuda): model built here, same forward"]
    meta["time_postprocess_s"] = round(time.time() - t2, 3)
    return d, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="path to an om-ai-lab/VLM-FO1 checkout (e.g. e6bef8d)")
    ap.add_argument("--commit", default="", help="commit of the checkout (default: git rev-parse HEAD in it)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--size", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", nargs="*", default=IMAGES)
    ap.add_argument("--no-manifests", action="store_true", help="skip upn_{tiny,full}_keys.json and the resize json")
    ap.add_argument("--manifests-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    off = Official(args.official, args.commit)
    vers = versions(off)
    print(json.dumps(vers), flush=True)
    if not args.no_manifests:
        for size in ("tiny", "full"):
            t = time.time()
            man = manifest(off, size)
            with open(out_dir / f"upn_{size}_keys.json", "w") as f:
                json.dump(man, f, indent=1)
            print(f"wrote upn_{size}_keys.json: {man['n_tensors']} tensors, {man['n_float_values']} float values, "
                  f"{man['n_unique_parameters']} unique parameters ({time.time() - t:.1f} s)", flush=True)
        rg = resize_golden(off)
        with open(out_dir / "upn_resize_golden.json", "w") as f:
            json.dump(rg, f, indent=1)
        print("wrote upn_resize_golden.json:", [(c["in_wh"], c["out_wh"]) for c in rg["cases"]], flush=True)
    if args.manifests_only:
        return

    cfg = upn_config(args.size)
    tmp = Path(tempfile.mkdtemp(prefix="upngolden_"))
    try:
        t = time.time()
        ckpt = write_random_upn(str(tmp / f"upn-{args.size}.safetensors"), size=args.size, seed=SEED,
                                dtype="float32")
        t_write = time.time() - t
        t = time.time()
        model = off.build(cfg)
        t_build = time.time() - t
        from safetensors.torch import load_file
        t = time.time()
        sd = load_file(ckpt)
        res = model.load_state_dict(sd, strict=False)
        if res.missing_keys or res.unexpected_keys:
            raise SystemExit(f"missing {res.missing_keys[:10]} unexpected {res.unexpected_keys[:10]}")
        model.load_state_dict(sd, strict=True)
        msd = model.state_dict()
        for kk, v in sd.items():
            if not torch.equal(msd[kk], v):
                raise SystemExit(f"loaded value of {kk} differs from the checkpoint")
        del sd, msd
        model.eval()
        t_load = time.time() - t
        print(f"checkpoint written {t_write:.1f} s, model built {t_build:.1f} s, loaded (strict, no missing/unexpected"
              f" keys) {t_load:.1f} s", flush=True)
        for image in args.images:
            t = time.time()
            d, meta = run_image(off, model, cfg, image)
            meta.update({"size": args.size, "config": cfg, "official_commit": off.commit, "versions": vers,
                         "threads": args.threads, "prompt_type": PROMPT,
                         "checkpoint": {"writer": "vlmfo1.testing.upn.write_random_upn", "size": args.size,
                                        "seed": SEED, "dtype": "float32"},
                         "subset": {"n": N_SUB, "seed": SUB_SEED}, "time_total_s": round(time.time() - t, 3)})
            d["meta_json"] = np.array(json.dumps(meta))
            name = f"upn_{args.size}_{Path(image).stem[-6:]}.npz"
            np.savez_compressed(out_dir / name, **d)
            print(f"=== {name}: {(out_dir / name).stat().st_size / 1e6:.2f} MB", json.dumps(
                {k: meta[k] for k in ("orig_wh", "time_forward_s", "time_total_s", "topk", "scores", "filters")}),
                flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
