#!/usr/bin/env python3
"""Token agreement with the official VLM-FO1 run as shipped (bf16 modules), on the tiny golden configurations.

The official loader casts every module to bf16 and runs it that way (ERRATA E3 lists the rounding points); vlmfo1
does not reproduce those roundings, so tokens are compared, not tensors. For each of the 12 reference-mode golden
cases (SimpleFP on/off x aux modes dynamic/squash x 3 COCO images with their ground-truth boxes, the official OD
prompt), this runs the official code in bf16, then vlmfo1 with compute="bf16" and compute="f32" (mode "reference"),
and the official code in fp32 (loader's bf16 cast, then .float(); greedy on bf16-rounded logits), 32 greedy tokens
each, and prints how many tokens agree (identical prefix and position-wise).

    /tmp/fo1ref/bin/python tests/golden/shipped_bf16_agreement.py --official /tmp/fo1co [--json out.json]

Runs in the reference environment (tests/golden/README.md); vlmfo1 is imported from this checkout (it needs no
torch). Nothing of the official code is copied: make_fo1_golden.py's shims and run_case are reused.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_fo1_golden as G  # noqa: E402  (puts the checkout's root on sys.path too)


def prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import torch
    from vlmfo1.generation import decode_stream
    from vlmfo1.fo1 import FO1
    from vlmfo1.testing.fo1 import write_random_fo1

    torch.set_num_threads(a.threads)
    off = G.Official(a.official)
    tmp = Path(tempfile.mkdtemp(prefix="fo1bf16_"))
    rows = []
    try:
        for sfpn in (True, False):
            for ar in ("dynamic", "squash"):
                p = tmp / f"VLM-FO1_Qwen2.5-VL-3B-tiny-{int(sfpn)}-{ar}"
                write_random_fo1(str(p), size="tiny", seed=G.SEED, simple_fpn=sfpn, aux_image_aspect_ratio=ar)
                tok, model, procs = off.load(str(p))        # bf16 modules, as shipped
                model.eval()
                shipped = {im: G.run_case(off, tok, model, procs, str(p), im, "shipped") for im in G.IMAGES}
                model.float()                                # the fp32 reference of tests/golden
                ref = {im: G.run_case(off, tok, model, procs, str(p), im, "reference") for im in G.IMAGES}
                del model
                ours = {c: FO1.load(str(p), mode="reference", compute=c, n_threads=a.threads) for c in ("bf16", "f32")}
                for im in G.IMAGES:
                    d = shipped[im]
                    want = d["greedy_ids"].tolist()
                    row = {"case": f"{'sfpn' if sfpn else 'nofpn'}_{ar}_{im[-10:-4]}", "n": len(want),
                           "official_bf16": want}
                    for c, fo1 in ours.items():
                        ids, emb, pos, delta, _, _ = fo1.prepare(str(G.COCO / "val2017" / im), d["boxes_xyxy"],
                                                                 str(d["prompt_text"]))
                        s = fo1.decoder.session(max_context=len(ids) + len(want) + 8)
                        logits = s.prefill_embeds(emb, pos)
                        s.rope_delta = delta
                        row[f"vlmfo1_{c}"] = list(decode_stream(fo1.decoder, s, logits, len(want), stop_ids=[]))
                    row["official_fp32"] = ref[im]["greedy_ids"].tolist()[:len(want)]
                    for k in ("vlmfo1_bf16", "vlmfo1_f32", "official_fp32"):
                        row[k + "_prefix"] = prefix(row[k], want)
                        row[k + "_same"] = sum(x == y for x, y in zip(row[k], want))
                    rows.append(row)
                    print(f"{row['case']:26s} vs official bf16 ({len(want)} tokens): "
                          + ", ".join(f"{k} prefix {row[k + '_prefix']:2d} / same {row[k + '_same']:2d}"
                                      for k in ("vlmfo1_bf16", "vlmfo1_f32", "official_fp32")), flush=True)
                del ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tot = sum(r["n"] for r in rows)
    print("total, position-wise agreement with the official bf16 run:")
    for k in ("vlmfo1_bf16", "vlmfo1_f32", "official_fp32"):
        print(f"  {k:14s} {sum(r[k + '_same'] for r in rows)}/{tot} tokens; identical prefix "
              f"{sum(r[k + '_prefix'] for r in rows)}/{tot}; all-identical cases "
              f"{sum(r[k + '_same'] == r['n'] for r in rows)}/{len(rows)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"official_commit": off.commit, "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
