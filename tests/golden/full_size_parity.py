#!/usr/bin/env python3
"""Full-size fp32 parity diagnosis: vlmfo1 vs the official VLM-FO1 code on the benchmark request.

The tiny golden cases (tests/test_fo1_golden.py) cover every path at small shapes. This script runs the one
full-size request of benchmarks/bench_fo1.py (random full checkpoint, 1000x750 image, 100 boxes, the COCO-80
prompt) through both implementations in fp32 "reference" mode and compares every stage, then the logits of
every generated step with teacher forcing (vlmfo1 is fed the official tokens), so a token difference can be
told apart from a numerical one: for each step it prints our logits' error and the official top-1/top-2 margin.

Two steps, in two processes (the official fp32 model alone peaks at ~20 GiB):

    python benchmarks/bench_fo1.py --official /tmp/fo1co --official-python /tmp/fo1ref/bin/python \\
        --engines vlmfo1-f32 --reps 1 --warmup 0      # once: writes the checkpoint and request_full.json
    /tmp/fo1ref/bin/python tests/golden/full_size_parity.py official --official /tmp/fo1co \\
        --request /tmp/vlmfo1_bench_fo1/request_full.json --out /tmp/fo1_full_official.npz
    python tests/golden/full_size_parity.py compare --request /tmp/vlmfo1_bench_fo1/request_full.json \\
        --golden /tmp/fo1_full_official.npz --json own.json

The random full-size DaViT-large is badly conditioned (its stage-2 depth of 9 amplifies fp32 rounding), so a
third step measures that, and the first two can then be repeated with the DaViT outputs replaced, in both
implementations, by the official DaViT evaluated in float64 -- which isolates everything downstream of it:

    /tmp/fo1ref/bin/python tests/golden/full_size_parity.py davit --official /tmp/fo1co \
        --request /tmp/vlmfo1_bench_fo1/request_full.json --out /tmp/fo1_full_davit_f64.npz --json davit.json
    /tmp/fo1ref/bin/python tests/golden/full_size_parity.py official ... --davit-maps /tmp/fo1_full_davit_f64.npz \
        --out /tmp/fo1_full_official_d64.npz
    python tests/golden/full_size_parity.py compare ... --davit-maps /tmp/fo1_full_davit_f64.npz \
        --golden /tmp/fo1_full_official_d64.npz --json f64.json

The results file of the README is then assembled, with the token agreement between every pair of runs, by

    python tests/golden/full_size_parity.py summary --davit davit.json --own own.json --f64 f64.json \
        --bench benchmarks/results/fo1_2026-11-27.json ... --out benchmarks/results/fo1_full_parity_2026-11-27.json

(davit.json: the davit step's --json; own.json / f64.json: compare's --json without / with --davit-maps).

The official steps reuse make_fo1_golden.py (its CPU shims and hooks; nothing of the official code is copied).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))


def official(a):
    import torch
    sys.path.insert(0, str(HERE))
    import make_fo1_golden as G

    torch.set_num_threads(a.threads)
    req = json.load(open(a.request))
    off = G.Official(a.official)
    t0 = time.perf_counter()
    tokenizer, model, procs = off.load(req["checkpoint"])
    model.float()
    model.eval()
    print(f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    d = G.run_case(off, tokenizer, model, procs, req["checkpoint"], req["image"], "reference", boxes=req["boxes"],
                   prompt=req["prompt"], max_new=a.max_new, all_logits=True, davit_maps=load_maps(a.davit_maps))
    print(f"ran in {time.perf_counter() - t0:.0f} s: {str(d['text'])[:120]!r}", flush=True)
    d["meta_json"] = np.array(json.dumps({"request": req, "official_commit": off.commit, "mode": "reference",
                                          "model_dtype": "float32 (bf16-valued weights)",
                                          "davit_maps": a.davit_maps or None}))
    np.savez_compressed(a.out, **d)
    print(f"wrote {a.out}")


def load_maps(path):
    if not path:
        return None
    z = np.load(path)
    return [z[f"stage{i}"] for i in range(4)]


def davit(a):
    """Official DaViT in float32 and float64 and vlmfo1's DaViT (fp32) on the request's aux pixel values (the same
    in both implementations, checked by `compare`): the float64 run is the truth both are measured against."""
    import glob
    import torch
    sys.path.insert(0, str(HERE))
    import make_fo1_golden as G
    from safetensors.torch import load_file
    from vlmfo1.aux_image import AuxImageProcessor
    from vlmfo1.davit import DavitEncoder
    from vlmfo1.options import read_config
    from vlmfo1.image import fo1_global_resize, load_image
    from vlmfo1.safetensors import Checkpoint

    torch.set_num_threads(a.threads)
    req = json.load(open(a.request))
    path = req["checkpoint"]
    raw = read_config(path)
    img = fo1_global_resize(load_image(req["image"]))[0]
    px, _ = AuxImageProcessor.from_config(raw)(img)
    ours = DavitEncoder.from_checkpoint(Checkpoint(path), raw, mode="reference", compute="f32", dtype=None,
                                        n_threads=a.threads)(px)
    off = G.Official(a.official)
    off.reset_globals(raw)
    from vlm_fo1.model.multimodal_encoder.davit.configuration_davit import DavitConfig
    from vlm_fo1.model.multimodal_encoder.davit.modeling_davit import DaViT
    m = DaViT.from_config(config=DavitConfig.from_dict(off.davit_configs.model_configs["davit-large"])).eval()
    pre = "model.vision_tower_aux.image_tower."
    sd = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        sd.update({k[len(pre):]: v.float() for k, v in load_file(f).items() if k.startswith(pre)})
    m.load_state_dict(sd, strict=True)
    res = {}
    for dt in (torch.float32, torch.float64):
        m = m.to(dt)
        with torch.no_grad():
            res[dt] = [x[0].double().numpy() for x in m(torch.from_numpy(px)[None].to(dt))["image_features"]]
    table = {"aux_pixels": list(px.shape), "official_fp32": [], "vlmfo1_fp32": [], "vlmfo1_vs_official_fp32": []}
    print(f"DaViT on {px.shape[1]}x{px.shape[2]} aux pixels; max |error| / max |float64 value|:")
    print("  stage  shape             official fp32   vlmfo1 fp32   vlmfo1 vs official fp32")
    for i in range(4):
        ref, o32 = res[torch.float64][i], res[torch.float32][i]
        row = (rel(o32, ref), rel(ours[i], ref), rel(ours[i], o32))
        for k, v in zip(("official_fp32", "vlmfo1_fp32", "vlmfo1_vs_official_fp32"), row):
            table[k].append(v)
        print(f"  {i}      {str(ref.shape):17s} {row[0]:.2e}        {row[1]:.2e}      {row[2]:.2e}")
    np.savez(a.out, **{f"stage{i}": t.astype(np.float32) for i, t in enumerate(res[torch.float64])})
    print(f"wrote {a.out} (the float64 stage outputs, as float32)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(table, f, indent=1)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def compare(a):
    sys.path.insert(0, str(REPO / "tests"))
    from test_fo1_golden import check
    from vlmfo1.fo1 import FO1
    from vlmfo1.safetensors import round_bf16

    req = json.load(open(a.request))
    g = np.load(a.golden, allow_pickle=False)
    fo1 = FO1.load(req["checkpoint"], mode="reference", compute="f32", n_threads=a.threads)
    maps = load_maps(a.davit_maps)
    if maps is not None:
        run = fo1.davit
        fo1.davit = lambda px: (run(px), maps)[1]
    trace: dict = {}
    ids, emb, pos, delta, _, _ = fo1.prepare(req["image"], req["boxes"], req["prompt"], trace=trace)
    errs: dict = {}
    same = {"input_ids": trace["input_ids"] == g["input_ids"].tolist(),
            "spliced_ids": ids == g["spliced_ids"].tolist(),
            "position_ids": bool(np.array_equal(pos, g["position_ids"])) and delta == int(g["rope_delta"][0]),
            "boxes_aux": bool(np.array_equal(trace["boxes_aux"], g["boxes_aux"])),
            "boxes_vt": bool(np.array_equal(trace["boxes_vt"], g["boxes_vt"]))}
    check("pixel_values", trace["pixel_values"], g, errs)
    check("aux_pixel_values", trace["aux_pixel_values"], g, errs)
    for i, m in enumerate(trace["davit_maps"]):
        check(f"davit_stage{i}", m, g, errs)          # 0 when both were given --davit-maps
    for j, b in enumerate(g["vt_map_blocks"].tolist()):
        check(f"vt_map_block{b}", trace["vt_maps"][j], g, errs)
    for k in ("region_features", "region_tokens", "image_tokens"):
        check(k, trace[k], g, errs)
    errs.pop("_fail", None)

    dec = fo1.decoder
    want = g["greedy_ids"].tolist()
    s = dec.session(max_context=len(ids) + len(want) + 8)
    logits = s.prefill_embeds(emb, pos)
    s.rope_delta = delta
    steps = []
    for t, tok in enumerate(want):
        top_ids, top_val = g[f"step{t}_top64_ids"], g[f"step{t}_top64_val"]
        e = rel(logits[top_ids], top_val)
        ours_top = int(np.argmax(round_bf16(logits)))
        steps.append({"step": t, "official": int(tok), "ours_greedy": ours_top, "top64_rel_err": e,
                      "official_margin": float(top_val[0] - top_val[1]),
                      "ours_margin_same_pair": float(logits[top_ids[0]] - logits[top_ids[1]])})
        if t + 1 < len(want):
            logits = s.step(int(tok))
    s2 = dec.session(max_context=len(ids) + len(want) + 8)
    from vlmfo1.generation import decode_stream
    l0 = s2.prefill_embeds(emb, pos)
    s2.rope_delta = delta
    free = list(decode_stream(dec, s2, l0, len(want), stop_ids=[]))
    agree = first_divergence(free, want)
    print("exact:", ", ".join(f"{k} {'ok' if v else 'DIFFER'}" for k, v in same.items()))
    print("max relative error (vs the largest official value):")
    for k, v in errs.items():
        print(f"  {k:22s} {v:.3e}")
    print("teacher-forced steps (official token fed back):")
    for st in steps:
        flag = "" if st["ours_greedy"] == st["official"] else "   <-- argmax differs"
        print(f"  step {st['step']:2d}: logits err {st['top64_rel_err']:.2e}, official top1-top2 margin "
              f"{st['official_margin']:.4f}, ours {st['ours_margin_same_pair']:.4f}{flag}")
    print(f"free-running greedy: {agree}/{len(want)} identical prefix; official {want[:8]}..., ours {free[:8]}...")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"exact": same, "rel_err": errs, "steps": steps, "free_prefix_agree": agree,
                       "official_tokens": want, "ours_tokens": free}, f, indent=1)


def first_divergence(a, b) -> int:
    """How many leading tokens two sequences share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summary(a):
    """One results file from the step outputs, with the token agreements between every pair of runs."""
    davit_t = json.load(open(a.davit))
    own, f64 = json.load(open(a.own)), json.load(open(a.f64))
    runs = {"official fp32, own DaViT": own["official_tokens"], "vlmfo1 fp32, own DaViT": own["ours_tokens"],
            "both, float64 DaViT (official tokens)": f64["official_tokens"],
            "both, float64 DaViT (vlmfo1 tokens)": f64["ours_tokens"]}
    for path in a.bench:
        for e, r in json.load(open(path))["results"].items():
            if "tokens" in r:
                runs[f"bench_fo1 {e}"] = r["tokens"]
    names = list(runs)
    pairs = {f"{x} | {y}": first_divergence(runs[x], runs[y]) for i, x in enumerate(names) for y in names[i + 1:]}
    print("DaViT vs float64, stage 0..3:")
    for k in ("official_fp32", "vlmfo1_fp32", "vlmfo1_vs_official_fp32"):
        print(f"  {k:24s} " + "  ".join(f"{v:.2e}" for v in davit_t[k]))
    for label, r in (("own DaViT", own), ("float64 DaViT in both", f64)):
        print(f"{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in r["rel_err"].items() if k.startswith(("region",
              "image", "davit_stage3"))) + f"; teacher-forced logits max err "
              f"{max(st['top64_rel_err'] for st in r['steps']):.2e}")
    print("identical leading tokens (of 20):")
    for k, v in pairs.items():
        print(f"  {v:2d}  {k}")
    with open(a.out, "w") as f:
        json.dump({"what": "full-size fp32 parity, vlmfo1 vs official VLM-FO1 (e6bef8d), reference mode, random full "
                   "checkpoint seed 0, 1000x750 COCO 000000404484, 100 boxes, COCO-80 prompt, 20 greedy tokens; "
                   "made by tests/golden/full_size_parity.py (davit, official, compare, summary steps)",
                   "davit_vs_float64": davit_t, "own_davit": own, "float64_davit_in_both": f64,
                   "leading_tokens_identical": pairs}, f, indent=1)
    print(f"wrote {a.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("official")
    o.add_argument("--official", required=True)
    o.add_argument("--request", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--max-new", type=int, default=20)
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--davit-maps", default="", help="npz from the davit step: replaces the DaViT outputs")
    d = sub.add_parser("davit")
    d.add_argument("--official", required=True)
    d.add_argument("--request", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--json", default="", help="also write the error table here")
    m = sub.add_parser("summary")
    m.add_argument("--davit", required=True, help="--json of the davit step")
    m.add_argument("--own", required=True, help="--json of compare without --davit-maps")
    m.add_argument("--f64", required=True, help="--json of compare with --davit-maps")
    m.add_argument("--bench", nargs="*", default=[], help="bench_fo1.py --json files whose tokens to include")
    m.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--davit-maps", default="")
    c.add_argument("--request", required=True)
    c.add_argument("--golden", required=True)
    c.add_argument("--json", default="")
    c.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    {"official": official, "davit": davit, "compare": compare, "summary": summary}[a.cmd](a)


if __name__ == "__main__":
    main()
