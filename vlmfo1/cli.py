"""Command line: `vlmfo1 generate`, `vlmfo1 random-checkpoint`, `vlmfo1 demo`."""
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

    r = sub.add_parser("random-checkpoint", help="write a random-weight Qwen2.5 checkpoint (for tests/benchmarks)")
    r.add_argument("path")
    r.add_argument("--size", choices=["tiny", "3b"], default="tiny")
    r.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tiktoken", help="qwen.tiktoken to build the tokenizer files from")

    d = sub.add_parser("demo", help="write a small random checkpoint and stream a chat answer from it")
    d.add_argument("--tiktoken", required=True, help="path of qwen.tiktoken (the Qwen BPE ranks)")
    d.add_argument("--prompt", default="Describe the picture in one sentence.")
    d.add_argument("--size", choices=["tiny", "3b"], default="tiny")
    d.set_defaults(max_new_tokens=32)

    args = ap.parse_args(argv)
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
    if args.cmd == "random-checkpoint":
        _write_random(args.path, args.size, args.dtype, args.seed, args.tiktoken)
        print(f"wrote {args.path}")
        return 0
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


def _write_random(path, size, dtype, seed, tiktoken):
    from .random_model import QWEN25_3B, TINY, write_random_qwen2

    write_random_qwen2(path, QWEN25_3B if size == "3b" else TINY, dtype=dtype, seed=seed)
    if tiktoken:
        from .tokenizer import Tokenizer

        Tokenizer.from_tiktoken(tiktoken).save(path)


if __name__ == "__main__":
    sys.exit(main())
