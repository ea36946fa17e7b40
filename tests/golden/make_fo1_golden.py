#!/usr/bin/env python3
"""Make the VLM-FO1 golden files (tests/golden/fo1_*.npz) and key manifests (fo1_tiny_keys.json, fo1_full_keys.json).

Runs the OFFICIAL VLM-FO1 code (om-ai-lab/VLM-FO1, a checkout whose path is given with --official; nothing of it is
copied here) on tiny random checkpoints written by `vlmfo1.testing.fo1.write_random_fo1`, on CPU, in float32.
See tests/golden/README.md for the exact command, environment and the meaning of every array.

    /tmp/fo1ref/bin/python tests/golden/make_fo1_golden.py --official /path/to/VLM-FO1 --out tests/golden/

Patches applied at import time (never to the checkout):
  * torchvision.ops.roi_align -> a pure-torch RoIAlign with torchvision's semantics (aligned=False, adaptive
    sampling grid, float32 coordinates), because torchvision's compiled ops do not load beside this torch (other
    users, e.g. benchmarks/bench_fo1.py, may keep the compiled op where it runs: Official(roi_align_impl="auto");
    tests/golden/check_roi_align.py compares the two);
  * flash_attention_2 -> eager attention (ViT and LLM);
  * the module-level `img_cfg` of the DaViT processor is restored before each load (the official loader mutates it:
    after a 'dynamic' load, do_resize stays False for every later load in the same process);
  * for tiny checkpoints, `model_configs['davit-large']['depths']` is set from config key `vlmfo1_davit_depths`.
Numeric modes (ERRATA): "reference" = loader's bf16 cast (which rounds both rotary inv_freq buffers, E1), then
.float(); greedy argmax on bf16-rounded logits (E2). "exact" = same weights, inv_freq recomputed in fp32, argmax on
fp32 logits. Weights are bf16 values in both (the checkpoint is bf16).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vlmfo1.testing.fo1 import fo1_shapes, write_random_fo1  # noqa: E402

DATA = REPO.parent / "shared" / "data"
COCO = DATA / "coco_tiny"
IMAGES = ["000000404484.jpg", "000000168974.jpg", "000000261888.jpg"]   # 320x240 (5 boxes), 375x500 (3), 640x426 (6)
SEED = 0
MAX_NEW = 32
FULL_LIMIT_MAPS = 128 * 1024           # DaViT stage outputs, ViT full-attention maps: full if below (the 2 MB of
                                       # the brief would make one case ~9.5 MB; all committed files must stay < 10 MB)
FULL_LIMIT_OTHER = 256 * 1024          # other tensors (image tokens, ...): full if below
N_SUB = 2048                           # size of a fixed subsample

import torch  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# torchvision RoIAlign, pure torch (torchvision semantics: csrc/ops/cpu/roi_align_kernel.cpp)

def _axis_weights(start, bin_sz, pooled, grid, size):
    """[pooled*grid, size] float64 interpolation matrix of one axis (sample coordinates in float32, as torchvision)."""
    f32 = torch.float32
    p = torch.arange(pooled, dtype=f32).view(pooled, 1)
    i = (torch.arange(grid, dtype=f32) + 0.5).view(1, grid)
    y = (start + p * bin_sz) + (i * bin_sz) / torch.tensor(float(grid), dtype=f32)
    y = y.reshape(-1)
    valid = ~((y < -1.0) | (y > float(size)))
    y = torch.where(y <= 0, torch.zeros_like(y), y)
    lo = y.floor().long()
    end = lo >= size - 1
    lo = torch.where(end, torch.full_like(lo, size - 1), lo)
    hi = torch.where(end, lo, lo + 1)
    y = torch.where(end, lo.to(f32), y)
    l = y - lo.to(f32)
    h = 1.0 - l
    v = valid.to(torch.float64)
    m = torch.zeros(y.numel(), size, dtype=torch.float64)
    r = torch.arange(y.numel())
    m.index_put_((r, lo), h.double() * v, accumulate=True)
    m.index_put_((r, hi), l.double() * v, accumulate=True)
    return m


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    if isinstance(boxes, (list, tuple)):
        rois = torch.cat([torch.cat([torch.full((b.shape[0], 1), float(i), dtype=b.dtype), b], 1)
                          for i, b in enumerate(boxes)], 0)
    else:
        rois = boxes
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    n, c, hgt, wid = input.shape
    f32 = torch.float32
    scale = torch.tensor(spatial_scale, dtype=f32)
    off = torch.tensor(0.5 if aligned else 0.0, dtype=f32)
    out = torch.zeros(rois.shape[0], c, ph, pw, dtype=input.dtype)
    for k in range(rois.shape[0]):
        r = rois[k].to(f32)
        b = int(r[0])
        x1, y1 = r[1] * scale - off, r[2] * scale - off
        x2, y2 = r[3] * scale - off, r[4] * scale - off
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw = torch.clamp(rw, min=1.0)
            rh = torch.clamp(rh, min=1.0)
        bh, bw = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(rh / ph)))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(rw / pw)))
        count = max(gh * gw, 1)
        my = _axis_weights(y1, bh, ph, gh, hgt)             # [ph*gh, H]
        mx = _axis_weights(x1, bw, pw, gw, wid)             # [pw*gw, W]
        f = input[b].double()                               # [C, H, W]
        s = torch.matmul(torch.matmul(my, f), mx.t())       # [C, ph*gh, pw*gw]
        s = s.view(c, ph, gh, pw, gw).sum(dim=(2, 4)) / count
        out[k] = s.to(input.dtype)
    return out


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


class _StubFinder:
    """Meta-path finder serving a stub module for every torchvision.* import."""
    def find_spec(self, name, path=None, target=None):
        import importlib.machinery
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


ROI_ALIGN_IMPLS = ("shim", "auto", "torchvision")


def _compiled_roi_align():
    """torchvision.ops.roi_align when the real torchvision is imported and its compiled op runs on CPU tensors
    (with the arguments HFRE passes: float32 map, a list with one float32 [N, 4] box tensor), else None."""
    tv = sys.modules.get("torchvision")
    if tv is None or isinstance(tv, _StubModule):
        return None
    try:
        from torchvision.ops import roi_align as ra
        x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
        y = ra(x, [torch.tensor([[0.5, 0.5, 3.0, 3.5]])], output_size=2, spatial_scale=1.0)
        if tuple(y.shape) != (1, 2, 2, 2) or not torch.isfinite(y).all():
            return None
        return ra
    except Exception:  # noqa: BLE001  (e.g. "operator torchvision::roi_align does not exist")
        return None


def install_shims(roi_align_impl: str = "shim") -> str:
    """torchvision: the real package if it imports, else stubs (timm imports torchvision at module level; VLM-FO1
    uses only ops.roi_align and transforms.ToPILImage, the latter on a path not taken here).

    roi_align_impl: "shim" (default; the golden files are made with it) replaces torchvision.ops.roi_align by the
    pure-torch `roi_align` above; "auto" keeps torchvision's compiled roi_align when the real torchvision imports and
    the op runs on CPU tensors, else the shim; "torchvision" requires the compiled op (SystemExit otherwise).
    Must run before the official HFRE module is imported (it binds roi_align at import). Returns the one in use:
    "torchvision" or "shim"."""
    if roi_align_impl not in ROI_ALIGN_IMPLS:
        raise ValueError(f"roi_align_impl must be one of {ROI_ALIGN_IMPLS}, not {roi_align_impl!r}")
    try:
        import torchvision.ops  # noqa: F401
        import torchvision.transforms  # noqa: F401
    except Exception:  # noqa: BLE001  (e.g. "operator torchvision::nms does not exist": compiled ops not loadable)
        for k in list(sys.modules):
            if k == "torchvision" or k.startswith("torchvision."):
                del sys.modules[k]
        sys.meta_path.insert(0, _StubFinder())
        import torchvision.ops  # noqa: F401
        import torchvision.transforms  # noqa: F401
    compiled = _compiled_roi_align() if roi_align_impl != "shim" else None
    if compiled is not None:
        sys.modules["torchvision.ops"].roi_align = compiled
        return "torchvision"
    if roi_align_impl == "torchvision":
        raise SystemExit("roi_align_impl='torchvision': torchvision's compiled roi_align does not import or run on "
                         "CPU tensors here (make a venv with benchmarks/make_official_venv.sh)")
    sys.modules["torchvision.ops"].roi_align = roi_align
    return "shim"


# ----------------------------------------------------------------------------------------------------------------
# official code

class Official:
    def __init__(self, root: str, commit: str = "", roi_align_impl: str = "shim"):
        self.root = os.path.abspath(root)
        sys.path.insert(0, self.root)
        self.roi_align_impl = install_shims(roi_align_impl)      # "torchvision" or "shim"
        from vlm_fo1.model.builder import load_pretrained_model
        from vlm_fo1.model.language_model.omchat_qwen2_5_vl import OmChatQwen25VLForCausalLM, OmChatQwen25VLConfig
        from vlm_fo1.model.multimodal_encoder.qwen2_5_vl.modeling_qwen2_5_vl import \
            Qwen2_5_VisionTransformerPretrainedModel as ViT
        from vlm_fo1.model.multimodal_encoder.davit import configs as davit_configs
        from vlm_fo1.model.multimodal_visual_prompt_encoder.hybrid_finegrained_region_encoder import HFREModule
        from vlm_fo1 import mm_utils
        self.load_pretrained_model = load_pretrained_model
        self.Model, self.Config, self.ViT, self.HFRE, self.mm_utils = (OmChatQwen25VLForCausalLM, OmChatQwen25VLConfig,
                                                                      ViT, HFREModule, mm_utils)
        self.davit_configs = davit_configs
        self.img_cfg0 = copy.deepcopy(davit_configs.img_cfg)
        self.davit_large0 = copy.deepcopy(davit_configs.model_configs["davit-large"])
        self.commit = commit or subprocess.run(["git", "-C", self.root, "rev-parse", "HEAD"], capture_output=True,
                                               text=True).stdout.strip() or "unknown"
        # eager attention instead of flash_attention_2
        fp = OmChatQwen25VLForCausalLM.from_pretrained.__func__

        def from_pretrained(cls, *a, **kw):
            kw["attn_implementation"] = "eager"
            return fp(cls, *a, **kw)
        OmChatQwen25VLForCausalLM.from_pretrained = classmethod(from_pretrained)
        fc = ViT._from_config.__func__

        def _from_config(cls, config, **kw):
            kw["attn_implementation"] = "eager"
            return fc(cls, config, **kw)
        ViT._from_config = classmethod(_from_config)

    def reset_globals(self, cfg: dict):
        self.davit_configs.img_cfg.clear()
        self.davit_configs.img_cfg.update(copy.deepcopy(self.img_cfg0))
        d = copy.deepcopy(self.davit_large0)
        if "vlmfo1_davit_depths" in cfg:
            d["depths"] = list(cfg["vlmfo1_davit_depths"])
        self.davit_configs.model_configs["davit-large"] = d

    def load(self, path: str):
        cfg = json.load(open(os.path.join(path, "config.json")))
        self.reset_globals(cfg)
        tokenizer, model, procs = self.load_pretrained_model(path, device="cpu")
        return tokenizer, model, procs

    def skeleton_keys(self, path: str) -> dict:
        """name -> shape of the saved layout, from the official modules built without weights (accelerate's
        init_empty_weights), towers built as the loader builds them; tied lm_head dropped as save_pretrained does."""
        from accelerate import init_empty_weights
        cfg_d = json.load(open(os.path.join(path, "config.json")))
        self.reset_globals(cfg_d)
        config = self.Config.from_pretrained(path)
        config._attn_implementation = "eager"
        with init_empty_weights():
            model = self.Model(config)
            model.get_vision_tower().load_model(model_path=path, is_train=False)
            model.get_vision_tower_aux().load_model(image_size=getattr(config, "aux_image_size", 768),
                                                    is_train=False, aspect_ratio=config.aux_image_aspect_ratio)
        sd = model.state_dict()
        keys = {k: list(v.shape) for k, v in sd.items()}
        if config.tie_word_embeddings:
            keys.pop("lm_head.weight", None)
        return keys


# ----------------------------------------------------------------------------------------------------------------
# storage helpers

def _sub_idx(key: str, n: int) -> np.ndarray:
    if n <= N_SUB:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return np.sort(rng.choice(n, N_SUB, replace=False)).astype(np.int64)


def put(d: dict, key: str, t, limit: int, chan_mean: bool = False):
    """Store a float tensor in full if below `limit` bytes (as float32), else shape + fixed subsample + sum + sumsq
    (+ the float64 mean over all but the first axis, as float32, if chan_mean: per-channel means of [C, H, W] maps)."""
    a = (t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)).astype(np.float32)
    if chan_mean and a.nbytes >= limit:
        d[key + "__chan_mean"] = a.reshape(a.shape[0], -1).astype(np.float64).mean(1).astype(np.float32)
    if a.nbytes < limit:
        d[key] = a
        return
    flat = a.reshape(-1)
    idx = _sub_idx(key, flat.size)
    d[key + "__shape"] = np.array(a.shape, dtype=np.int64)
    d[key + "__idx"] = idx.astype(np.int32 if flat.size < 2**31 else np.int64)
    d[key + "__val"] = flat[idx]
    d[key + "__sum"] = np.array(flat.astype(np.float64).sum())
    d[key + "__sumsq"] = np.array((flat.astype(np.float64) ** 2).sum())


def coco_boxes(file_name: str):
    ann = json.load(open(COCO / "annotations" / "instances_val2017.json"))
    img = next(i for i in ann["images"] if i["file_name"] == file_name)
    boxes = [a["bbox"] for a in ann["annotations"] if a["image_id"] == img["id"]]
    cats = [c["name"] for c in sorted(ann["categories"], key=lambda c: c["id"])]
    return [[x, y, x + w, y + h] for x, y, w, h in boxes], cats


# ----------------------------------------------------------------------------------------------------------------
# one case

def run_case(off: Official, tokenizer, model, procs, model_path: str, image: str, mode: str, boxes=None,
             prompt: str = "", max_new: int = MAX_NEW, all_logits: bool = False, davit_maps=None) -> dict:
    """One request through the official model with hooks; `image` is a coco_tiny file name (its ground-truth boxes
    and the official OD template with the 80 COCO names are the defaults) or a path. davit_maps: four [C, H, W]
    arrays that replace the DaViT stage outputs (the DaViT still runs; its outputs are dropped)."""
    image_path = str(COCO / "val2017" / image) if os.sep not in image else image
    if boxes is None or not prompt:
        gt, cats = coco_boxes(os.path.basename(image))
        from vlm_fo1.task_templates import OD_template
        boxes = gt if boxes is None else boxes
        prompt = prompt or OD_template.format(", ".join(cats))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_path}},
                                             {"type": "text", "text": prompt}], "bbox_list": boxes}]
    cap: dict = {}
    m = model.get_model()
    hooks = []

    def first(key, value):
        if key not in cap:
            cap[key] = value

    hooks.append(m.mm_projector.register_forward_hook(lambda mod, i, o: first("image_tokens", o.detach().clone())))
    hooks.append(m.mm_projector_aux.register_forward_hook(lambda mod, i, o: first("region_tokens", o.detach().clone())))
    hooks.append(m.norm.register_forward_hook(lambda mod, i, o: first("final_hidden", o[0, -1].detach().clone())))
    aux = m.get_vision_tower_aux().image_tower
    aux_fwd = aux.forward

    def aux_forward(x):
        o = aux_fwd(x)
        if davit_maps is not None:
            feats = [torch.from_numpy(np.asarray(a, np.float32))[None].to(t.dtype) for a, t in
                     zip(davit_maps, o["image_features"])]
            assert [f.shape for f in feats] == [t.shape for t in o["image_features"]], "davit_maps: wrong shapes"
            o = {"image_features": feats, "last_feat": feats[-1]}
        first("davit_input", x.detach().clone())
        first("davit", [t.detach().clone() for t in o["image_features"]])
        return o
    aux.forward = aux_forward
    vt = m.get_vision_tower()
    gml = vt.get_multi_level_features

    def get_multi_level_features():
        o = gml()
        first("vt_maps", [t.detach().clone() for t in o[0]])
        return o
    vt.get_multi_level_features = get_multi_level_features
    hfre_call = off.HFRE.__call__

    def hfre(self, aux_multi_level_features, aux_boxes, vt_multi_level_features=None, vt_boxes=None):
        first("aux_boxes", aux_boxes[0].detach().clone())
        first("vt_boxes", vt_boxes[0].detach().clone() if vt_boxes is not None else None)
        o = hfre_call(self, aux_multi_level_features, aux_boxes, vt_multi_level_features, vt_boxes)
        first("region_features", o.detach().clone())
        return o
    off.HFRE.__call__ = hfre
    gri = model.get_rope_index

    def get_rope_index(*a, **kw):
        o = gri(*a, **kw)
        first("spliced_ids", kw["input_ids"].detach().clone())
        first("position_ids", o[0].detach().clone())
        first("rope_deltas", o[1].detach().clone())
        return o
    model.get_rope_index = get_rope_index

    from transformers import LogitsProcessor, LogitsProcessorList

    class Bf16Logits(LogitsProcessor):   # E2: greedy argmax over bf16-rounded logits (ties -> lowest id)
        def __call__(self, input_ids, scores):
            return scores.to(torch.bfloat16).float()
    try:
        kw = off.mm_utils.prepare_inputs(model_path, model, procs, tokenizer, messages, device="cpu",
                                         max_tokens=max_new, top_p=0.05, temperature=0.0, do_sample=False)
        kw.pop("streamer", None)
        if mode == "reference":
            kw["logits_processor"] = LogitsProcessorList([Bf16Logits()])
        with torch.inference_mode():
            out = model.generate(**kw, output_logits=True, return_dict_in_generate=True)
    finally:
        for h in hooks:
            h.remove()
        off.HFRE.__call__ = hfre_call
        del aux.forward, vt.get_multi_level_features, model.get_rope_index
    in_ids = kw["inputs"][0]
    gen = out.sequences[0, in_ids.shape[0]:]
    text = tokenizer.decode(gen).strip()
    logits = out.logits[0][0].float()

    d: dict = {}
    d["input_ids"] = in_ids.numpy().astype(np.int64)
    d["spliced_ids"] = cap["spliced_ids"][0].numpy().astype(np.int64)
    d["position_ids"] = cap["position_ids"][:, 0].numpy().astype(np.int64)
    d["rope_delta"] = cap["rope_deltas"].reshape(-1).numpy().astype(np.int64)
    pv = kw["images"][0]
    d["pixel_values_shape"] = np.array(pv.shape, dtype=np.int64)
    d["image_grid_thw"] = kw["image_grid_thws"][0].reshape(-1).numpy().astype(np.int64)
    put(d, "pixel_values", pv, 0)
    d["aux_pixel_values_shape"] = np.array(kw["images_aux"][0].shape, dtype=np.int64)
    put(d, "aux_pixel_values", kw["images_aux"][0], 0)
    d["boxes_xyxy"] = np.array(boxes, dtype=np.float64)
    d["boxes_aux"] = cap["aux_boxes"].numpy().astype(np.float32)
    d["boxes_vt"] = cap["vt_boxes"].numpy().astype(np.float32)
    for s, t in enumerate(cap["davit"]):
        put(d, f"davit_stage{s}", t[0], FULL_LIMIT_MAPS, chan_mean=True)
    full_idx = list(model.get_vision_tower().image_tower.config.fullatt_block_indexes)
    d["vt_map_blocks"] = np.array(full_idx, dtype=np.int64)
    for blk, t in zip(full_idx, cap["vt_maps"]):
        put(d, f"vt_map_block{blk}", t[0], FULL_LIMIT_MAPS, chan_mean=True)
    d["region_features"] = cap["region_features"][0].float().numpy()            # [N, R] before mm_projector_aux
    d["region_tokens"] = cap["region_tokens"].float().numpy()                   # [N, hidden]
    put(d, "image_tokens", cap["image_tokens"][0], FULL_LIMIT_OTHER)           # [N_img, hidden] after mm_projector
    d["final_hidden"] = cap["final_hidden"].float().numpy()                     # prefill last position, after norm
    put(d, "prefill_logits", logits, 0)                                          # subsample + sum/sumsq
    top = torch.topk(logits, 64)
    d["prefill_logits_top64_ids"] = top.indices.numpy().astype(np.int64)
    d["prefill_logits_top64_val"] = top.values.numpy().astype(np.float32)
    d["greedy_ids"] = gen.numpy().astype(np.int64)
    if all_logits:                                 # every step's top 64 (the first step is the prefill's)
        for t, lg in enumerate(out.logits):
            top = torch.topk(lg[0].float(), 64)
            d[f"step{t}_top64_ids"] = top.indices.numpy().astype(np.int64)
            d[f"step{t}_top64_val"] = top.values.numpy().astype(np.float32)
    d["text"] = np.array(text)
    d["prompt_text"] = np.array(prompt)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="path to an om-ai-lab/VLM-FO1 checkout (e.g. e6bef8d)")
    ap.add_argument("--commit", default="", help="commit of the checkout (default: git rev-parse HEAD in it)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", nargs="*", default=IMAGES)
    ap.add_argument("--no-exact", action="store_true", help="skip the 'exact' (fp32 inv_freq) cases")
    ap.add_argument("--manifests-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    off = Official(args.official, args.commit)
    import transformers
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
                "python": sys.version.split()[0]}
    try:
        import timm
        versions["timm"] = timm.__version__
    except Exception:  # noqa: BLE001
        pass
    tmp = Path(tempfile.mkdtemp(prefix="fo1golden_"))
    try:
        # ---- manifests (official module definitions, no weights)
        for size in ("tiny", "full"):
            man = {}
            for sfpn in (True, False):
                p = tmp / f"VLM-FO1_Qwen2.5-VL-3B-{size}-skel-{int(sfpn)}"
                write_random_fo1(str(p), size=size, simple_fpn=sfpn, weights=False)
                keys = off.skeleton_keys(str(p))
                cfg = json.load(open(p / "config.json"))
                ours = {k: list(v) for k, v in fo1_shapes(cfg).items()}
                if keys != ours:
                    missing = sorted(set(keys) - set(ours))[:10]
                    extra = sorted(set(ours) - set(keys))[:10]
                    bad = sorted(k for k in set(keys) & set(ours) if keys[k] != ours[k])[:10]
                    raise SystemExit(f"{size} sfpn={sfpn}: writer layout != official: missing {missing} "
                                     f"extra {extra} shape {bad}")
                if list(keys) != list(ours):
                    print(f"note: {size} sfpn={sfpn}: same keys, different order")
                man["simple_fpn" if sfpn else "no_simple_fpn"] = {
                    "config": {k: cfg[k] for k in ("mm_region_hidden_size", "mm_projector_type",
                                                   "mm_projector_aux_type", "hidden_size", "num_hidden_layers")},
                    "vision_config": cfg["vision_config"], "davit_depths": cfg.get("vlmfo1_davit_depths",
                                                                                   [1, 1, 9, 1]),
                    "n_params": int(sum(int(np.prod(s)) for s in keys.values())), "tensors": keys}
            with open(out_dir / f"fo1_{size}_keys.json", "w") as f:
                json.dump({"official_commit": off.commit, "note": "name -> shape of the saved layout (tied lm_head "
                           "absent), from the official modules; written by tests/golden/make_fo1_golden.py",
                           **man}, f, indent=1)
            print(f"wrote fo1_{size}_keys.json")
        if args.manifests_only:
            return

        # ---- golden cases
        cases = []
        for sfpn in (True, False):
            for ar in ("dynamic", "squash"):
                for mode in ("reference",) + (() if args.no_exact or not (sfpn and ar == "dynamic") else ("exact",)):
                    cases.append((sfpn, ar, mode))
        for sfpn, ar, mode in cases:
            p = tmp / f"VLM-FO1_Qwen2.5-VL-3B-tiny-{int(sfpn)}-{ar}"
            if not p.exists():
                write_random_fo1(str(p), size="tiny", seed=SEED, simple_fpn=sfpn, aux_image_aspect_ratio=ar)
            tokenizer, model, procs = off.load(str(p))
            # the loaded model holds exactly the checkpoint's tensors
            cfg_text = (p / "config.json").read_text()
            cfg = json.loads(cfg_text)
            sd = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
            if sd != {k: tuple(v) for k, v in fo1_shapes(cfg).items()}:
                raise SystemExit("loaded model's tensors differ from the checkpoint")
            from safetensors.torch import load_file
            msd = model.state_dict()
            for f in sorted(p.glob("*.safetensors")):
                for k, v in load_file(str(f)).items():
                    if not torch.equal(msd[k], v):
                        raise SystemExit(f"loaded value of {k} differs from the checkpoint")
            del msd
            model.float()
            if mode == "exact":
                vt = model.get_vision_tower().image_tower.rotary_pos_emb
                dim = vt.inv_freq.numel() * 2
                vt.inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
                re_ = model.model.rotary_emb
                inv, _ = re_.rope_init_fn(re_.config, None)
                re_.inv_freq = inv.float()
                re_.original_inv_freq = re_.inv_freq
            for image in args.images:
                name = f"fo1_{'sfpn' if sfpn else 'nofpn'}_{ar}_{mode}_{Path(image).stem[-6:]}"
                print(f"=== {name}", flush=True)
                d = run_case(off, tokenizer, model, procs, str(p), image, mode)
                meta = {"case": name, "image": image, "mode": mode, "model_dtype": "float32 (bf16-valued weights)",
                        "checkpoint": {"writer": "vlmfo1.testing.fo1.write_random_fo1", "size": "tiny",
                                       "dtype": "bfloat16", "seed": SEED, "simple_fpn": sfpn,
                                       "aux_image_aspect_ratio": ar},
                        "official_commit": off.commit, "versions": versions, "max_new_tokens": MAX_NEW,
                        "n_generated": int(d["greedy_ids"].size),
                        "greedy": "bf16-rounded logits (E2)" if mode == "reference" else "fp32 logits",
                        "rotary_inv_freq": "bf16-rounded (E1)" if mode == "reference" else "fp32 exact"}
                d["meta_json"] = np.array(json.dumps(meta))
                d["config_json"] = np.array(cfg_text)
                np.savez_compressed(out_dir / f"{name}.npz", **d)
                print(f"    {len(d['input_ids'])} ids, {d['region_features'].shape} regions, text {str(d['text'])[:80]!r}",
                      flush=True)
            del model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
