#!/usr/bin/env python
"""What int8 and int4 weights cost in accuracy: per stage and end to end, against an fp32 reference (issue 12).

    python benchmarks/bench_quant.py --size tiny                       # all 80 coco_tiny images (~30 min here)
    python benchmarks/bench_quant.py --size full                       # the first 5 images (~19 min here)
    python benchmarks/bench_quant.py --size tiny --images 10 --json out.json --workdir /tmp/q
    python benchmarks/bench_quant.py --size tiny --report-only --json out.json     # the table from what is on disk

Configurations (vlmfo1.VLMFO1.from_pretrained on the same random bf16 checkpoint, mode "reference", 2 threads):
  fp32    dtype="float32", compute="f32": fp32 copies of the bf16 weights, fp32 maths -- the reference
  bf16    dtype=None: the weights as stored (bf16), compute "bf16" (the default for bf16 weights); the same weight
          values as fp32, so this column is what activation rounding alone costs -- the yardstick for int8
  mixed   dtype="mixed": int8 decoder, vision towers (ViT, DaViT, HFRE) as stored (their numbers equal bf16's)
  int8    dtype="int8": every linear layer of every tower int8 (per output channel; activations per token)
  int4    dtype="int4": the decoder's linear layers in 4-bit blocks of 32 (output layer int8), vision as stored
Checkpoints: size "tiny" (write_random_fo1(size="tiny"): full-width DaViT with depths 1,1,1,1, a 6-block ViT, a
2-layer decoder of width 256) and "full" (the real 3B shapes, ~8.3 GB bf16), both seed 0, kept in --ckpt-dir (the
folder bench_fo1 / bench_requests use; written once if missing). There is no "small" size (vlmfo1/testing/fo1.py).

Requests: the coco_tiny val2017 images (sorted by file name, the first --images), each with its ground-truth boxes as
the proposals (COCO xywh -> xyxy, annotation order, at most 100, crowd boxes included) and its ground-truth category
names (unique, COCO id order) in the prompt `VLMFO1.detect` builds (the official OD template, names joined by ", ").
--images defaults to 80 (tiny) and 5 (full): at full size one image costs ~110 s in fp32 and ~25 s in each other
configuration (measured at load average 2-4 on 2 cores), so the 4 configurations take ~19 min with loads and the
--verify request; a trial at load average ~7 ran its stages 1.3-2.3 times slower, which still fits in ~40 min.

Per image and configuration (one subprocess per configuration, fp32 first; each rewrites its per-image outputs into
<workdir>/quant_<size>/<config>.npz after every image, so a killed run resumes where it stopped; fp32 also keeps its
stage outputs in ref/<image>.npz, ~40 MB an image, for the others to be compared with). The vision side runs once,
traced (`encode_features(..., trace=)`); its outputs make an EncodedImage with the shared prompt prefix prefilled,
as `VLMFO1.encode` does, and the same EncodedImage serves the prefill logits, teacher forcing and `detect`. On the
first --verify images a fresh `model.detect(image, categories, boxes=)` must give the same tokens and regions.
  stages   image tokens (the ViT output; the mm_projector is "identity"), the 4 DaViT stage maps, region tokens
           (HFRE + mm_projector_aux), the logits of the last prompt position (exactly the logits detect samples
           from). cos = cosine similarity of the flattened tensors (float64); maxrel = max |x - ref| / max |ref| (the
           error relative to the largest reference value, as tests/test_fo1_golden.py measures it; an elementwise
           relative error is meaningless where the reference crosses zero). worst-row cos = the worst cosine over
           the region tokens; prefill greedy token = the greedy choice of the prefill logits equals fp32's.
  decode   teacher forcing: fp32's own greedy tokens t0..t20 (t0 from the prefill) are fed to every configuration;
           step k = 1..20 feeds t(k-1) and compares the configuration's greedy choice with t(k) ("greedy" = the
           engine's rule: argmax of the bf16-rounded logits in reference mode, ties to the lowest id; no stop token:
           the 20 steps always run). tf top1 = the fraction of the 20 steps that agree; tf top5 = the fraction where
           t(k) is among the configuration's 5 largest logits; fp32 margin = fp32's (bf16-rounded) logit of t(k)
           minus its runner-up's, at the steps where the configuration agrees and where it does not.
  end to end  `detect(categories)` on the EncodedImage (bit-identical to model.detect, vlmfo1/context.py) with the
           task's own max_new_tokens at tiny and 20 at full (--max-new-tokens; at full size decoding 100+ tokens per
           image would cost ~1 s a token in fp32) and the model's stop tokens: same region indexes (in answer
           order), same labels, same token ids as fp32's own detect. "detect = traced path" checks detect's tokens
           against the teacher-forced greedy choices up to their first disagreement with fp32.

What these numbers can and cannot say at random weights (no trained weights are reachable here). (1) Random i.i.d.
Gaussian weights (norm weights 1 +- 0.1) have none of the outlier channels trained LLMs are known to develop
(a few hidden dimensions far larger than the rest); per-token activation scales are set by the largest value of
the token, so on the real checkpoint int8 activations can lose more precision than here: in this respect int8 may
look better here than it will on the trained model. (2) In another respect these random networks are much more
fragile than trained ones are expected to be: they are built with sharp attention (q/k gain 2) and, at full size,
amplify any rounding enormously. At full size bf16 -- the same weights as fp32, only activations rounded -- already
moves the prefill logits to a median cosine of 0.81 and agrees with fp32 on 54 of 100 teacher-forced steps, DaViT
stage 3 to cosine 0.85; benchmarks/results/fo1_full_parity_2026-11-27.txt shows that even two fp32 implementations
(summation order only) share 1 of 20 greedy tokens with this random DaViT. So at full size the decode and end-to-end
rows measure this chaos at least as much as int8: read int8 against bf16 in the same row, never against 1. The
tiny model (2 decoder layers, DaViT depth 1 per stage) is far less chaotic (bf16: logits cosine median 0.9994, 97%
of the teacher-forced steps) and separates the configurations more cleanly. Neither direction of (1) and (2) can be
netted out here: these numbers are not an estimate of int8's cost on the real checkpoint. (3) The random model's
next-token distributions are not flat (fp32 top-1 probability median 0.99, greedy margin median ~6 logits), so
top-1 agreement is not a coin toss; it is strict in that any flip among 151,936 candidates counts. At tiny size
bf16's and mixed's flips are near-ties (fp32 margin median 0.25 at the differing steps against 6 at the agreeing
ones), while int8 also flips clearer choices (median 1.25, up to 10); at full size no configuration's flips are
near-ties (median 3.5-4.75) because the logits themselves moved. (4) The random model never emitted a <regionK>
token (0 fp32 answers picked a region), so "same region indexes" compares empty lists and says nothing; "same token
ids" is all-or-nothing over 20-278 tokens of a random continuation. No detection quality (AP) can be measured at
random weights. What the numbers do support: how int8's error compares with bf16's at each stage of this pipeline;
that the int8 vision towers (int8 vs mixed) cost more than the int8 decoder (mixed vs bf16) on both checkpoints;
that DaViT's int8 error grows stage by stage; and that the int8 and mixed paths run every stage end to end without
NaNs, with detect equal to the traced path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, REPO)
import _common as C  # noqa: E402

DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "coco_tiny")
CONFIGS = {"fp32": dict(dtype="float32", compute="f32"), "bf16": dict(dtype=None),
           "mixed": dict(dtype="mixed"), "int8": dict(dtype="int8"), "int4": dict(dtype="int4")}
COMPARED = ["bf16", "mixed", "int8", "int4"]
TF_STEPS = 20
TOP5 = 5
DEFAULT_IMAGES = {"tiny": 80, "full": 5}
FULL_MAX_NEW_TOKENS = 20
# per-image metrics: (key, label, higher is better)
STAGE_METRICS = [("vit_cos", "ViT image tokens cos", True), ("vit_maxrel", "ViT image tokens maxrel", False)]
for _i in range(4):
    STAGE_METRICS += [(f"davit{_i}_cos", f"DaViT stage {_i} cos", True),
                      (f"davit{_i}_maxrel", f"DaViT stage {_i} maxrel", False)]
STAGE_METRICS += [("region_cos", "region tokens cos", True), ("region_maxrel", "region tokens maxrel", False),
                  ("region_rowcos", "region tokens worst-row cos", True),
                  ("logits_cos", "prefill logits cos", True), ("logits_maxrel", "prefill logits maxrel", False),
                  ("tf_top1", f"decode tf top1 ({TF_STEPS} steps)", True),
                  ("tf_top5", f"decode tf top5 ({TF_STEPS} steps)", True)]


def _log(msg):
    print(f"[bench_quant] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# inputs

def requests(n_images):
    """[(file name, path, boxes [N, 4] xyxy float64, categories)] of the first n_images coco_tiny images."""
    import numpy as np

    ann = json.load(open(os.path.join(DATA, "annotations", "instances_val2017.json")))
    names = {c["id"]: c["name"] for c in ann["categories"]}
    by_image = {}
    for an in ann["annotations"]:
        by_image.setdefault(an["image_id"], []).append(an)
    out = []
    for info in sorted(ann["images"], key=lambda i: i["file_name"])[:n_images]:
        anns = by_image.get(info["id"], [])
        if not anns:
            continue
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (an["bbox"] for an in anns)][:100], np.float64)
        cats = [names[c] for c in sorted({an["category_id"] for an in anns})]
        out.append((info["file_name"], os.path.join(DATA, "val2017", info["file_name"]), boxes, cats))
    return out


def checkpoint(a) -> str:
    if a.checkpoint:
        return a.checkpoint
    return C.fo1_random_checkpoint(a.ckpt_dir, a.size, 0, log=_log)


def out_dir(a) -> str:
    return os.path.join(a.workdir, f"quant_{a.size}")


# ----------------------------------------------------------------------------------------------------------------
# npz store: one file per configuration, keys "<image>/<name>", rewritten (atomically) after every image

def load_store(path) -> dict:
    import numpy as np

    if not os.path.exists(path):
        return {}
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_store(path, store: dict) -> None:
    import numpy as np

    tmp = path + ".tmp.npz"
    np.savez(tmp, **store)
    os.replace(tmp, path)


def done_images(store: dict) -> list:
    return sorted({k.split("/", 1)[0] for k in store if k.endswith("/done")})


# ----------------------------------------------------------------------------------------------------------------
# metrics

def cos(x, ref) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    d = np.linalg.norm(x) * np.linalg.norm(ref)
    return float(x @ ref / d) if d > 0 else float("nan")


def maxrel(x, ref) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def rowcos_min(x, ref) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if len(ref) == 0:
        return float("nan")
    d = np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1)
    return float(((x * ref).sum(1) / np.maximum(d, 1e-300)).min())


def greedy_logits(logits, mode):
    """The scores the engine's greedy choice takes the argmax of (vlmfo1.generation._sample)."""
    import numpy as np
    from vlmfo1.safetensors import round_bf16

    return round_bf16(logits) if mode == "reference" else np.asarray(logits, np.float32)


def margin(scores, tok) -> float:
    """scores[tok] - the largest other score (> 0: tok wins; 0: a tie, won by the lower id)."""
    import numpy as np

    s = np.asarray(scores, np.float64)
    v = s[tok]
    s = s.copy()
    s[tok] = -np.inf
    return float(v - s.max())


# ----------------------------------------------------------------------------------------------------------------
# worker: one configuration, every image not yet in its npz

def worker(a) -> dict:
    import numpy as np
    from vlmfo1 import VLMFO1
    from vlmfo1.context import EncodedImage
    from vlmfo1.image import load_image

    cfg = a.worker
    od = out_dir(a)
    os.makedirs(os.path.join(od, "ref"), exist_ok=True)
    path = os.path.join(od, f"{cfg}.npz")
    store = load_store(path)
    done = set(done_images(store))
    reqs = requests(a.images)
    ref_store = load_store(os.path.join(od, "fp32.npz")) if cfg != "fp32" else store
    ref_done = set(done_images(ref_store))
    verify = {r[0] for r in reqs[:a.verify]}
    todo = [r for r in reqs if r[0] not in done and (cfg == "fp32" or r[0] in ref_done)]
    skipped = [r[0] for r in reqs if cfg != "fp32" and r[0] not in ref_done]
    if skipped:
        _log(f"{cfg}: {len(skipped)} images have no fp32 reference yet, skipped")
    res = {"config": cfg, "n_done_before": len(done & {r[0] for r in reqs}), "n_new": 0, "skipped": skipped}
    if not todo:
        return res
    t0 = time.perf_counter()
    fo1 = VLMFO1.from_pretrained(a.ckpt, threads=a.threads, **CONFIGS[cfg])
    res["load_s"] = time.perf_counter() - t0
    meta = {"repr": repr(fo1), "weight_bytes": fo1.weight_bytes, "load_s": res["load_s"], "threads": a.threads,
            "engine_compute": {"decoder": fo1.decoder.compute, "vit": fo1.vision.compute, "davit": fo1.davit.compute,
                        "hfre": fo1.hfre.compute}, "mode": fo1.mode, "checkpoint": a.ckpt, "options": CONFIGS[cfg]}
    _log(f"{cfg}: loaded in {res['load_s']:.1f} s: {meta['repr']}")
    mode = fo1.mode
    for n, (name, img, boxes, cats) in enumerate(todo):
        t_img = time.perf_counter()
        text = VLMFO1._prompt_for("detect", cats)[0](len(boxes))
        ids, _ = fo1._prompt(text, len(boxes))          # the prompt detect builds (placeholders not expanded)
        pixels = load_image(img)
        trace = {}
        t = time.perf_counter()
        image_tokens, grid_hw, regions, b = fo1.encode_features(pixels, boxes, trace=trace)
        t_prep = time.perf_counter() - t
        # What VLMFO1.encode does after encode_features (vlmfo1/context.py): an EncodedImage of these vision
        # outputs with the shared prompt prefix prefilled once. Its tasks are bit-identical to the model's one-call
        # methods, so the traced vision side serves both the teacher-forced run and detect (checked below against
        # a fresh model.detect on the first --verify images).
        t = time.perf_counter()
        ctx = EncodedImage(fo1, pixels, img, b, None, image_tokens, grid_hw, regions, {})
        with fo1._session(1) as s0:
            ctx._prefill_prefix(s0, ids)
        s = fo1.decoder.session(max_context=len(ids) - 1 + len(image_tokens) + TF_STEPS + 8)
        full, logits = ctx._start(s, ids)                # prefix restored, the rest prefilled: detect's logits
        t_prefill = time.perf_counter() - t
        out = {"image_tokens": trace["image_tokens"], "region_tokens": trace["region_tokens"], "logits": logits}
        for i, m in enumerate(trace["davit_maps"]):
            out[f"davit{i}"] = m
        rec = {}
        t = time.perf_counter()
        if cfg == "fp32":
            toks, gaps, p1 = [], [], []
            lg = logits
            for k in range(TF_STEPS + 1):
                sc = greedy_logits(lg, mode)
                tok = int(np.argmax(sc))
                toks.append(tok)
                gaps.append(margin(sc, tok))
                z = np.exp(np.asarray(lg, np.float64) - np.max(lg))
                p1.append(float(z[tok] / z.sum()))
                if k < TF_STEPS:
                    lg = s.step(tok)
            np.savez(os.path.join(od, "ref", f"{name}.tmp.npz"), **out)
            os.replace(os.path.join(od, "ref", f"{name}.tmp.npz"), os.path.join(od, "ref", f"{name}.npz"))
            rec.update(ref_tokens=np.array(toks, np.int64), ref_gap=np.array(gaps), ref_p1=np.array(p1))
            preds = toks
        else:
            ref_toks = [int(x) for x in ref_store[f"{name}/ref_tokens"]]
            with np.load(os.path.join(od, "ref", f"{name}.npz")) as z:
                ref = {k: z[k] for k in z.files}
            m = {"vit_cos": cos(out["image_tokens"], ref["image_tokens"]),
                 "vit_maxrel": maxrel(out["image_tokens"], ref["image_tokens"]),
                 "region_cos": cos(out["region_tokens"], ref["region_tokens"]),
                 "region_maxrel": maxrel(out["region_tokens"], ref["region_tokens"]),
                 "region_rowcos": rowcos_min(out["region_tokens"], ref["region_tokens"]),
                 "logits_cos": cos(logits, ref["logits"]), "logits_maxrel": maxrel(logits, ref["logits"])}
            for i in range(4):
                m[f"davit{i}_cos"] = cos(out[f"davit{i}"], ref[f"davit{i}"])
                m[f"davit{i}_maxrel"] = maxrel(out[f"davit{i}"], ref[f"davit{i}"])
            del ref
            sc = greedy_logits(logits, mode)
            preds = [int(np.argmax(sc))]
            m["logits_top1"] = float(preds[0] == ref_toks[0])
            agree, top5, cgap = [], [], []
            for k in range(1, TF_STEPS + 1):
                lg = s.step(ref_toks[k - 1])
                sc = greedy_logits(lg, mode)
                preds.append(int(np.argmax(sc)))
                agree.append(preds[-1] == ref_toks[k])
                top5.append(int((sc > sc[ref_toks[k]]).sum()) < TOP5)
                cgap.append(margin(sc, ref_toks[k]))
            m["tf_top1"] = float(np.mean(agree))
            m["tf_top5"] = float(np.mean(top5))
            rec.update({k: np.float64(v) for k, v in m.items()})
            rec.update(tf_pred=np.array(preds, np.int64), tf_agree=np.array(agree), tf_gap=np.array(cgap))
        t_tf = time.perf_counter() - t
        del s, out, trace
        # end to end: the detect task on the encoded image (= model.detect on the image and boxes)
        t = time.perf_counter()
        kw = {} if a.max_new_tokens is None else {"max_new_tokens": a.max_new_tokens}
        r = ctx.detect(cats, **kw)
        t_det = time.perf_counter() - t
        t_verify = 0.0
        if name in verify:
            t = time.perf_counter()
            r2 = fo1.detect(img, cats, boxes=boxes, box_format="xyxy", **kw)
            rec["fresh_detect_equal"] = np.bool_(r2.token_ids == r.token_ids and r2.region_indices == r.region_indices)
            t_verify = time.perf_counter() - t
            _log(f"{cfg} {name}: fresh model.detect {t_verify:.1f} s, same tokens and regions as the "
                 f"encoded-image path: {bool(rec['fresh_detect_equal'])}")
        del ctx
        det_toks = [int(x) for x in r.token_ids]
        rec.update(det_tokens=np.array(det_toks, np.int64), det_regions=np.array(r.region_indices, np.int64),
                   det_labels=np.array(json.dumps(r.labels)), det_finish=np.array(str(r.finish_reason)),
                   det_text=np.array(r.text))
        rec["seconds"] = np.array([t_prep, t_prefill, t_tf, t_det, time.perf_counter() - t_img - t_verify])
        # consistency of the traced path with detect: equal up to (and including) the first choice that differs
        # from fp32's greedy tokens (for fp32 itself: all TF_STEPS + 1)
        ref_toks = [int(x) for x in (rec if cfg == "fp32" else ref_store)[
            "ref_tokens" if cfg == "fp32" else f"{name}/ref_tokens"]]
        j = next((i for i, (p, q) in enumerate(zip(preds, ref_toks)) if p != q), len(preds) - 1)
        lim = min(j + 1, len(det_toks))
        rec["trace_consistent"] = np.bool_(det_toks[:lim] == preds[:lim])
        if cfg != "fp32":
            fr = ref_store[f"{name}/det_regions"].tolist()
            ft = ref_store[f"{name}/det_tokens"].tolist()
            rec["e2e_same_regions"] = np.bool_(r.region_indices == fr)
            rec["e2e_same_labels"] = np.bool_(r.labels == json.loads(str(ref_store[f"{name}/det_labels"])))
            rec["e2e_same_tokens"] = np.bool_(det_toks == ft)
            rec["e2e_common_prefix"] = np.int64(next((i for i, (p, q) in enumerate(zip(det_toks, ft)) if p != q),
                                                     min(len(det_toks), len(ft))))
        rec["n_boxes"] = np.int64(len(boxes))
        rec["n_positions"] = np.int64(len(full))
        rec["done"] = np.bool_(True)
        for k, v in rec.items():
            store[f"{name}/{k}"] = np.asarray(v)
        store["_meta"] = np.array(json.dumps(meta))
        save_store(path, store)
        res["n_new"] += 1
        _log(f"{cfg} [{n + 1}/{len(todo)}] {name}: {len(boxes)} boxes, {len(full)} positions, "
             f"vision {t_prep:.1f} s, prefill {t_prefill:.1f} s, tf {t_tf:.1f} s, detect {t_det:.1f} s "
             f"({len(det_toks)} tokens)" + ("" if cfg == "fp32" else
                                             f"; tf top1 {rec['tf_top1']:.2f}, logits cos {rec['logits_cos']:.5f}"))
    fo1.close()
    res["worker_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------------------------------------------
# report

def collect(a) -> dict:
    """Per configuration: per image metrics (dict of lists) read from the npz files, for the images done by fp32
    and that configuration."""
    import numpy as np

    od = out_dir(a)
    names = [r[0] for r in requests(a.images)]
    ref = load_store(os.path.join(od, "fp32.npz"))
    ref_done = [n for n in names if f"{n}/done" in ref]
    out = {"images": ref_done, "meta": {}, "per_image": {}, "fp32": {}}
    if "_meta" in ref:
        out["meta"]["fp32"] = json.loads(str(ref["_meta"]))
    out["fp32"] = {
        "seconds": {n: ref[f"{n}/seconds"].tolist() for n in ref_done},
        "det_n_tokens": {n: len(ref[f"{n}/det_tokens"]) for n in ref_done},
        "det_regions": {n: ref[f"{n}/det_regions"].tolist() for n in ref_done},
        "det_finish": {n: str(ref[f"{n}/det_finish"]) for n in ref_done},
        "trace_consistent": {n: bool(ref[f"{n}/trace_consistent"]) for n in ref_done},
        "fresh_detect_equal": {n: bool(ref[f"{n}/fresh_detect_equal"]) for n in ref_done
                               if f"{n}/fresh_detect_equal" in ref},
        "ref_gap": {n: ref[f"{n}/ref_gap"].tolist() for n in ref_done},
        "ref_p1": {n: ref[f"{n}/ref_p1"].tolist() for n in ref_done},
        "n_boxes": {n: int(ref[f"{n}/n_boxes"]) for n in ref_done},
        "n_positions": {n: int(ref[f"{n}/n_positions"]) for n in ref_done},
    }
    for cfg in COMPARED:
        st = load_store(os.path.join(od, f"{cfg}.npz"))
        if "_meta" in st:
            out["meta"][cfg] = json.loads(str(st["_meta"]))
        imgs = [n for n in ref_done if f"{n}/done" in st]
        per = {}
        for n in imgs:
            d = {k: float(st[f"{n}/{k}"]) for k, _, _ in STAGE_METRICS}
            d["logits_top1"] = bool(st[f"{n}/logits_top1"])
            agree = st[f"{n}/tf_agree"].astype(bool)
            gaps = np.array(ref[f"{n}/ref_gap"][1:TF_STEPS + 1])
            d.update(tf_first_miss=int(np.argmin(agree)) + 1 if not agree.all() else None,
                     fp32_gap_agree=gaps[agree].tolist(), fp32_gap_miss=gaps[~agree].tolist(),
                     e2e_same_regions=bool(st[f"{n}/e2e_same_regions"]),
                     e2e_same_labels=bool(st[f"{n}/e2e_same_labels"]),
                     e2e_same_tokens=bool(st[f"{n}/e2e_same_tokens"]),
                     e2e_common_prefix=int(st[f"{n}/e2e_common_prefix"]),
                     det_n_tokens=len(st[f"{n}/det_tokens"]), det_regions=st[f"{n}/det_regions"].tolist(),
                     trace_consistent=bool(st[f"{n}/trace_consistent"]),
                     fresh_detect_equal=(bool(st[f"{n}/fresh_detect_equal"]) if f"{n}/fresh_detect_equal" in st
                                         else None),
                     seconds=st[f"{n}/seconds"].tolist())
            per[n] = d
        out["per_image"][cfg] = per
    return out


def summarize(data: dict) -> dict:
    import numpy as np

    summ = {}
    for cfg, per in data["per_image"].items():
        if not per:
            continue
        s = {"n_images": len(per)}
        for k, _, _ in STAGE_METRICS:
            v = np.array([d[k] for d in per.values()], np.float64)
            v = v[np.isfinite(v)]
            s[k] = {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max()),
                    "mean": float(v.mean())} if len(v) else None
        ga = np.concatenate([d["fp32_gap_agree"] for d in per.values()] + [[]])
        gm = np.concatenate([d["fp32_gap_miss"] for d in per.values()] + [[]])
        s["fp32_gap_at_agree_median"] = float(np.median(ga)) if len(ga) else None
        s["fp32_gap_at_miss_median"] = float(np.median(gm)) if len(gm) else None
        s["fp32_gap_at_miss_max"] = float(gm.max()) if len(gm) else None
        s["tf_steps_agree"] = int(len(ga))
        s["tf_steps_miss"] = int(len(gm))
        s["tf_all_agree_images"] = sum(d["tf_first_miss"] is None for d in per.values())
        fm = [d["tf_first_miss"] for d in per.values() if d["tf_first_miss"] is not None]
        s["tf_first_miss_median"] = float(np.median(fm)) if fm else None
        for k in ("logits_top1", "e2e_same_regions", "e2e_same_labels", "e2e_same_tokens", "trace_consistent"):
            s[k] = sum(d[k] for d in per.values())
        fv = [d["fresh_detect_equal"] for d in per.values() if d["fresh_detect_equal"] is not None]
        s["fresh_detect_equal"] = f"{sum(fv)}/{len(fv)}"
        s["e2e_common_prefix_median"] = float(np.median([d["e2e_common_prefix"] for d in per.values()]))
        s["det_tokens_median"] = float(np.median([d["det_n_tokens"] for d in per.values()]))
        s["images_with_regions"] = sum(bool(d["det_regions"]) for d in per.values())
        s["seconds_per_image_median"] = float(np.median([d["seconds"][-1] for d in per.values()]))
        summ[cfg] = s
    f = data["fp32"]
    if f["seconds"]:
        gaps = np.concatenate([g[1:TF_STEPS + 1] for g in f["ref_gap"].values()])
        p1 = np.concatenate([p[1:TF_STEPS + 1] for p in f["ref_p1"].values()])
        summ["fp32"] = {"n_images": len(f["seconds"]),
                        "seconds_per_image_median": float(np.median([s[-1] for s in f["seconds"].values()])),
                        "images_with_regions": sum(bool(r) for r in f["det_regions"].values()),
                        "det_tokens_median": float(np.median(list(f["det_n_tokens"].values()))),
                        "det_finish": {k: list(f["det_finish"].values()).count(k)
                                       for k in sorted(set(f["det_finish"].values()))},
                        "trace_consistent": sum(f["trace_consistent"].values()),
                        "fresh_detect_equal": f"{sum(f['fresh_detect_equal'].values())}/{len(f['fresh_detect_equal'])}",
                        "gap_median": float(np.median(gaps)), "gap_p10": float(np.percentile(gaps, 10)),
                        "top1_prob_median": float(np.median(p1)), "top1_prob_p10": float(np.percentile(p1, 10)),
                        "top1_prob_p90": float(np.percentile(p1, 90)),
                        "boxes_median": float(np.median(list(f["n_boxes"].values()))),
                        "positions_median": float(np.median(list(f["n_positions"].values())))}
    return summ


def _fmt(v, k):
    if v is None:
        return "-"
    if "maxrel" in k:
        return f"{v:.3g}"
    if "cos" in k:
        return f"{v:.6f}" if v > 0.99 else f"{v:.4f}"
    return f"{v:.2f}"


def report_text(a, data, summ) -> str:
    cfgs = [c for c in COMPARED if c in summ]
    f = summ.get("fp32")
    lines = [f"bench_quant: random {a.size} checkpoint {a.ckpt}, {len(data['images'])} coco_tiny images with fp32 "
             f"reference (first {a.images} by file name), GT boxes as proposals, GT categories in the detect "
             f"prompt, {a.threads} threads"]
    if f:
        lines.append(f"fp32 reference: median {f['boxes_median']:.0f} boxes, {f['positions_median']:.0f} prompt "
                     f"positions, {f['seconds_per_image_median']:.1f} s/image (traced pass + detect)")
    for c in ["fp32"] + cfgs:
        m = data["meta"].get(c)
        if m:
            lines.append(f"  {c}: load {m['load_s']:.1f} s, weights {m['weight_bytes'] / 2**30:.2f} GiB, compute "
                         + ", ".join(f"{k} {v}" for k, v in m.get("engine_compute", {}).items()))
    lines.append("")
    head = ["vs fp32 (min / median / max over images)"] + [f"{c} (n={summ[c]['n_images']})" for c in cfgs]
    rows = []
    for k, label, _ in STAGE_METRICS:
        row = [label]
        for c in cfgs:
            v = summ[c][k]
            row.append("-" if v is None else " / ".join(_fmt(v[x], k) for x in ("min", "median", "max")))
        rows.append(row)
    lines.append(C.markdown_table(head, rows))
    lines.append("")
    head = ["decode / end to end"] + cfgs
    rows = [
        ["prefill greedy token = fp32"] + [f"{summ[c]['logits_top1']}/{summ[c]['n_images']}" for c in cfgs],
        ["tf: images with all 20 steps = fp32"] + [f"{summ[c]['tf_all_agree_images']}/{summ[c]['n_images']}"
                                                   for c in cfgs],
        ["tf: steps = fp32 (all images)"] + [
            f"{summ[c]['tf_steps_agree']}/{summ[c]['tf_steps_agree'] + summ[c]['tf_steps_miss']}" for c in cfgs],
        ["tf: first differing step (median)"] + [_fmt(summ[c]["tf_first_miss_median"], "") for c in cfgs],
        ["fp32 margin at agreeing steps (median)"] + [_fmt(summ[c]["fp32_gap_at_agree_median"], "") for c in cfgs],
        ["fp32 margin at differing steps (median / max)"] + [
            f"{_fmt(summ[c]['fp32_gap_at_miss_median'], '')} / {_fmt(summ[c]['fp32_gap_at_miss_max'], '')}"
            for c in cfgs],
        ["detect: same region indexes as fp32"] + [f"{summ[c]['e2e_same_regions']}/{summ[c]['n_images']}"
                                                   for c in cfgs],
        ["detect: same labels as fp32"] + [f"{summ[c]['e2e_same_labels']}/{summ[c]['n_images']}" for c in cfgs],
        ["detect: same token ids as fp32"] + [f"{summ[c]['e2e_same_tokens']}/{summ[c]['n_images']}" for c in cfgs],
        ["detect: common token prefix (median)"] + [_fmt(summ[c]["e2e_common_prefix_median"], "") for c in cfgs],
        ["detect: answers that picked any region"] + [f"{summ[c]['images_with_regions']}/{summ[c]['n_images']}"
                                                      for c in cfgs],
        ["detect = traced path (consistency)"] + [f"{summ[c]['trace_consistent']}/{summ[c]['n_images']}"
                                                  for c in cfgs],
        ["fresh model.detect = encoded-image path"] + [summ[c]["fresh_detect_equal"] for c in cfgs],
        ["seconds per image (median)"] + [f"{summ[c]['seconds_per_image_median']:.1f}" for c in cfgs],
    ]
    lines.append(C.markdown_table(head, rows))
    if f:
        lines.append("")
        lines.append(f"fp32 itself: answers that picked any region {f['images_with_regions']}/{f['n_images']}, "
                     f"detect tokens median {f['det_tokens_median']:.0f} (finish {f['det_finish']}), detect = traced "
                     f"greedy {f['trace_consistent']}/{f['n_images']}, fresh model.detect = encoded-image path "
                     f"{f['fresh_detect_equal']}; greedy margin over the {TF_STEPS} decode steps "
                     f"(bf16-rounded logits): median {f['gap_median']:.3g}, 10th percentile {f['gap_p10']:.3g}; "
                     f"top-1 probability median {f['top1_prob_median']:.3g} (10th-90th percentile "
                     f"{f['top1_prob_p10']:.3g}-{f['top1_prob_p90']:.3g})")
    return "\n".join(lines)


def report(a) -> int:
    data = collect(a)
    if not data["images"]:
        _log("no fp32 results yet")
        return 1
    summ = summarize(data)
    print(report_text(a, data, summ))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"size": a.size, "images_requested": a.images, "checkpoint": a.ckpt, "threads": a.threads,
                       "max_new_tokens": a.max_new_tokens, "tf_steps": TF_STEPS, "images": data["images"],
                       "meta": data["meta"], "summary": summ, "per_image": data["per_image"],
                       "fp32_per_image": data["fp32"]}, fh, indent=1)
    return 0


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--images", type=int, default=None,
                   help=f"the first N images (default: {DEFAULT_IMAGES['tiny']} tiny, {DEFAULT_IMAGES['full']} full)")
    p.add_argument("--configs", default="fp32,bf16,mixed,int8,int4", help="comma list (fp32 always runs first)")
    p.add_argument("--workdir", default="/tmp/vlmfo1_bench_quant", help="npz outputs go to <workdir>/quant_<size>/")
    p.add_argument("--ckpt-dir", default="/tmp/vlmfo1_bench_fo1",
                   help="where the random checkpoint is kept (shared with bench_fo1 / bench_requests)")
    p.add_argument("--checkpoint", help="use this checkpoint folder instead")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"for detect (default: the task's own at tiny, {FULL_MAX_NEW_TOKENS} at full)")
    p.add_argument("--verify", type=int, default=1,
                   help="the first N images also run a fresh model.detect, which must equal the encoded-image path")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="per configuration, seconds")
    p.add_argument("--json", help="write the summary and per-image numbers here")
    p.add_argument("--report-only", action="store_true", help="no worker runs: report what the npz files hold")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.images is None:
        a.images = DEFAULT_IMAGES[a.size]
    if a.max_new_tokens is None and a.size == "full":
        a.max_new_tokens = FULL_MAX_NEW_TOKENS
    if a.worker:
        a.ckpt = a.checkpoint
        res = worker(a)
        res["peak_rss"] = C.peak_rss_bytes()
        with open(a.out, "w") as fh:
            json.dump(res, fh)
        return 0
    cfgs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in cfgs if c not in CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; choose from {list(CONFIGS)}")
    cfgs = [c for c in CONFIGS if c in cfgs]          # fp32 first: its tokens are fed to the others
    a.ckpt = checkpoint(a)
    if not a.report_only:
        os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
        argv_w = [os.path.abspath(__file__), "--size", a.size, "--images", str(a.images), "--workdir", a.workdir,
                  "--checkpoint", a.ckpt, "--threads", str(a.threads), "--verify", str(a.verify)]
        if a.max_new_tokens is not None:
            argv_w += ["--max-new-tokens", str(a.max_new_tokens)]
        for c in cfgs:
            _log(f"configuration {c} ...")
            t = time.perf_counter()
            r = C.run_worker(argv_w + ["--worker", c], a.timeout)
            _log(f"  {c}: " + (r.get("error") or f"{r['n_new']} new images ({r['n_done_before']} done before), "
                               f"{time.perf_counter() - t:.0f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB"))
    return report(a)


if __name__ == "__main__":
    sys.exit(main())
