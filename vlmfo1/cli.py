"""Command line: `vlmfo1 detect`, `vlmfo1 generate`, `vlmfo1 random-checkpoint`, `vlmfo1 demo`."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _load(args):
    from .decoder import LanguageModel
    from .tokenizer import Tokenizer

    lm = LanguageModel.load(args.model, mode=args.mode, compute=args.compute, dtype=args.dtype,
                            n_threads=args.threads, max_context=args.max_context)
    tok = Tokenizer.from_pretrained(args.tokenizer or args.model)
    return lm, tok


def _stream(lm, tok, prompt: str, chat: bool, system, args) -> None:
    from .tokenizer import chatml

    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt = chatml(msgs)
    ids = tok.encode(prompt)
    dec = tok.incremental_decoder(skip_special_tokens=True)
    t0 = time.perf_counter()
    first = None
    n = 0
    for t in lm.stream(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed):
        if first is None:
            first = time.perf_counter()
        n += 1
        sys.stdout.write(dec.feed(t))
        sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    t1 = time.perf_counter()
    if args.verbose:
        dt = t1 - (first or t1)
        print(f"[{len(ids)} prompt tokens in {(first or t1) - t0:.2f} s; {n} new tokens, "
              f"{(n - 1) / dt if n > 1 and dt > 0 else 0:.2f} tok/s decode]", file=sys.stderr)


def _add_gen_args(p):
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in a ChatML user turn")
    p.add_argument("--system", help="system message (with --chat; default: Qwen's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--mode", default="exact", choices=["exact", "reference"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="convert weights (default: as stored)")
    p.add_argument("--compute", choices=["f32", "bf16"], help="activation precision with bf16 weights")
    p.add_argument("--threads", type=int, help="worker threads (default: all available cores)")
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vlmfo1", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text with a Qwen2/Qwen2.5 checkpoint")
    g.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    g.add_argument("prompt")
    g.add_argument("--image", help="an image file: run Qwen2.5-VL (the checkpoint must hold the vision tower)")
    _add_gen_args(g)

    dt = sub.add_parser("detect", help="VLM-FO1: detect categories among proposal boxes")
    dt.add_argument("--model", required=True, help="VLM-FO1 checkpoint folder (official layout)")
    dt.add_argument("--image", required=True)
    dt.add_argument("--boxes", required=True,
                    help='JSON file: a list of [x1, y1, x2, y2] boxes in image pixels, or {"boxes": [...]}')
    dt.add_argument("categories", nargs="+", help="what to detect, e.g. orange apple")
    dt.add_argument("--prompt", help="a free prompt instead of the detection template (may use <regionK>)")
    dt.add_argument("--truncate-boxes", action="store_true", help="keep the first 100 boxes instead of failing")
    dt.add_argument("--json", action="store_true", help="print the result as one JSON object (text, detections, "
                                                        "token ids)")
    dt.add_argument("--draw", metavar="PNG", help="also save the image with the picked boxes drawn on it")
    _add_gen_args(dt)
    dt.set_defaults(mode="reference")

    r = sub.add_parser("random-checkpoint", help="write a random-weight Qwen2.5 (or, with --fo1, VLM-FO1) checkpoint "
                                                 "for tests and benchmarks")
    r.add_argument("path")
    r.add_argument("--fo1", action="store_true", help="a VLM-FO1 checkpoint in the official layout (the folder name "
                                                      "should contain 'vlm-fo1' and 'qwen2.5-vl' for the official "
                                                      "loader)")
    r.add_argument("--size", choices=["tiny", "3b", "full"], default="tiny", help="3b = full = the real shapes")
    r.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tiktoken", help="qwen.tiktoken to build the tokenizer files from")

    d = sub.add_parser("demo", help="write a small random VLM-FO1 checkpoint and run the official example on it")
    d.add_argument("--tiktoken", required=True, help="path of qwen.tiktoken (the Qwen BPE ranks)")
    d.add_argument("--demo-dir", help="folder with demo_image.jpg and demo_boxes.json (default: next to --tiktoken)")
    d.add_argument("--text", action="store_true", help="instead: a text-only Qwen2.5 chat on a random checkpoint")
    d.add_argument("--prompt", default="Describe the picture in one sentence.")
    d.add_argument("--size", choices=["tiny", "3b"], default="tiny")
    d.set_defaults(max_new_tokens=32)

    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError, FloatingPointError) as e:  # one clear line
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"vlmfo1 {args.cmd}: error: {msg}", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.cmd == "generate" and args.image:
        from .qwen_vl import DEFAULT_SYSTEM, QwenVL

        vl = QwenVL.load(args.model, mode=args.mode, compute=args.compute, dtype=args.dtype, n_threads=args.threads,
                         max_context=args.max_context)
        t0 = time.perf_counter()
        n = 0
        for piece in vl.stream(args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                               system=args.system or DEFAULT_SYSTEM):
            n += 1
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.verbose:
            print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)
        return 0
    if args.cmd == "generate":
        lm, tok = _load(args)
        _stream(lm, tok, args.prompt, args.chat, args.system, args)
        return 0
    if args.cmd == "random-checkpoint" and args.fo1:
        from .fo1_checkpoint import write_random_fo1

        write_random_fo1(args.path, size="tiny" if args.size == "tiny" else "full", dtype=args.dtype, seed=args.seed,
                         tiktoken_path=args.tiktoken)
        print(f"wrote {args.path}")
        return 0
    if args.cmd == "random-checkpoint":
        _write_random(args.path, args.size, args.dtype, args.seed, args.tiktoken)
        print(f"wrote {args.path}")
        return 0
    if args.cmd == "detect":
        return _detect(args)
    if args.cmd == "demo" and not args.text:
        return _fo1_demo(args)
    if args.cmd == "demo":
        from .decoder import LanguageModel
        from .tokenizer import Tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            _write_random(tmp, args.size, "bfloat16", 0, args.tiktoken)
            lm = LanguageModel.load(tmp)
            tok = Tokenizer.from_pretrained(tmp)
            print(f"random {args.size} Qwen2.5 checkpoint written and loaded in {time.perf_counter() - t0:.1f} s "
                  f"({lm.weight_bytes / 1e6:.1f} MB of weights, compute={lm.compute}); the text is gibberish by design")
            ns = argparse.Namespace(max_new_tokens=32, temperature=0.8, top_p=0.95, top_k=0, seed=0, verbose=True)
            _stream(lm, tok, args.prompt, True, None, ns)
        return 0
    return 1


def _read_boxes(path):
    import json

    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        if "boxes" not in data:
            raise ValueError(f'{path}: expected a list of [x1, y1, x2, y2] boxes or {{"boxes": [...]}}')
        data = data["boxes"]
    return data


def _print_result(res, t0):
    print(f"answer: {res.text}")
    for d in res.detections:
        print(f"  {d.label}: region {d.index} box {[round(v, 1) for v in d.box]}")
    if not res.detections:
        print("  (no detections)")
    print(f"[{len(res.token_ids)} tokens, {time.perf_counter() - t0:.1f} s]", file=sys.stderr)


def _detect(args) -> int:
    from .fo1 import FO1

    fo1 = FO1.load(args.model, mode=args.mode, compute=args.compute, dtype=args.dtype, n_threads=args.threads,
                   max_context=args.max_context)
    boxes = _read_boxes(args.boxes)
    t0 = time.perf_counter()
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              seed=args.seed, truncate_boxes=args.truncate_boxes)
    if args.prompt:
        res = fo1.generate(args.image, boxes, args.prompt, **kw)
    else:
        res = fo1.detect(args.image, boxes, args.categories, **kw)
    if args.draw:
        res.draw(args.image).save(args.draw)
    if args.json:
        import json

        print(json.dumps(res.to_dict()))
        print(f"[{len(res.token_ids)} tokens, {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    else:
        _print_result(res, t0)
    return 0


def _fo1_demo(args) -> int:
    from .fo1 import FO1
    from .fo1_checkpoint import write_random_fo1

    demo = args.demo_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.tiktoken))), "demo")
    boxes = _read_boxes(os.path.join(demo, "demo_boxes.json"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = os.path.join(tmp, "VLM-FO1_Qwen2.5-VL-3B-random-tiny")
        write_random_fo1(path, size="tiny", tiktoken_path=args.tiktoken)
        fo1 = FO1.load(path)
        print(f"random tiny VLM-FO1 checkpoint (official layout) written and loaded in {time.perf_counter() - t0:.1f} s;"
              " the weights are random, so the answer is too")
        t0 = time.perf_counter()
        res = fo1.detect(os.path.join(demo, "demo_image.jpg"), boxes, "orange", max_new_tokens=16)
        _print_result(res, t0)
    return 0


def _write_random(path, size, dtype, seed, tiktoken):
    from .random_model import QWEN25_3B, TINY, write_random_qwen2

    write_random_qwen2(path, TINY if size == "tiny" else QWEN25_3B, dtype=dtype, seed=seed)
    if tiktoken:
        from .tokenizer import Tokenizer

        Tokenizer.from_tiktoken(tiktoken).save(path)


if __name__ == "__main__":
    sys.exit(main())
