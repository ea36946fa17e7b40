"""Command line: one subcommand per VLM-FO1 task, plus `generate` (Qwen2.5 / Qwen2.5-VL), `random-checkpoint`, `demo`,
`cache`.

    vlmfo1 detect IMAGE orange apple --model DIR --boxes boxes.json [--box-format xywh] [--json] [--draw out.png]
    vlmfo1 count IMAGE person --model DIR --boxes boxes.json
    vlmfo1 refer IMAGE "the man in red" ... | ground IMAGE ... | reason IMAGE "question" ... | chat IMAGE "text"
    vlmfo1 caption IMAGE --region 3 [--detailed] ... | ocr IMAGE --region 3 ... | detect-like IMAGE --region 0 ...
    vlmfo1 eval coco|refcoco|countbench|pixmocount --model DIR --images DIR --annotations FILE
        [--proposals FILE | --oracle-proposals] --out RUN_DIR [--workers N] [--limit K] [--item-timeout SECONDS]
    vlmfo1 cache info | clear [--stale] [--cache-dir DIR]     the weight cache of --dtype int8 / int4 loads

Every error ends in one line `vlmfo1 CMD: error: ...` and exit status 1. Options that do not apply to a subcommand
are rejected, not ignored.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from . import __version__
from .jsonsafe import nesting_depth

# subcommand -> (task method, positional argument after IMAGE or None, uses --region)

FO1_COMMANDS = {
    "detect": ("detect", "categories", False), "count": ("count", "category", False),
    "refer": ("refer", "expression", False), "ground": ("ground", None, False),
    "caption": ("describe_region", None, True), "ocr": ("read_region", None, True),
    "detect-like": ("detect_like", None, True), "reason": ("reason", "question", False),
    "chat": ("chat", "text", False),
}
_POSITIONAL_HELP = {"categories": "what to detect, e.g. orange apple (joined as 'orange, apple')",
                    "category": "one category to count, e.g. person", "expression": "a referring expression",
                    "question": "the question", "text": "a free prompt; refer to boxes as <region0>, <region1>, ..."}


def _add_model_args(p, default_mode: str, default_max_context: int) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors + tokenizer)")
    p.add_argument("--mode", default=default_mode, choices=["exact", "reference"],
                   help=f"numeric mode (default {default_mode})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "int8", "mixed", "int4"],
                   help="convert weights (default: as stored); int8: every linear layer quantized at load; mixed "
                        "(VLM-FO1 only): int8 language model, vision towers as stored; int4: the language model in "
                        "4-bit blocks (output layer int8), vision towers as stored")
    p.add_argument("--compute", choices=["f32", "bf16"], help="activation precision with bf16 weights")
    _add_cache_dir_arg(p, with_off=True)
    p.add_argument("--threads", type=int, help="worker threads (default: OMP_NUM_THREADS, else the CPUs this "
                                               "process may use)")
    p.add_argument("--max-context", type=int, metavar="N",
                   help=f"the longest prompt in positions, 1..the checkpoint's max_position_embeddings (default "
                        f"{default_max_context}, or that limit when smaller)")


def _add_cache_dir_arg(p, with_off: bool = False) -> None:
    """--cache-dir (and --no-cache): the weight cache of int8 / int4 loads (vlmfo1.weight_cache)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where int8 / int4 weights are cached between loads (default: $VLMFO1_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/vlmfo1/weights or ~/.cache/vlmfo1/weights; see `vlmfo1 cache info`)")
    if with_off:
        g.add_argument("--no-cache", action="store_true",
                       help="quantize at every load and write nothing (no weight cache)")


def _cache_dir(args):
    """The loaders' cache_dir for --cache-dir / --no-cache: a folder, False (off) or None (the default)."""
    return False if getattr(args, "no_cache", False) else args.cache_dir


def _add_eval_run_args(p) -> None:
    """The runner's options, the same for every benchmark of `vlmfo1 eval`."""
    _add_model_args(p, "reference", 8192)
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="the run folder (run.json, records.jsonl, predictions.jsonl, report.json); rerun to resume")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes, each with its own model (default 1); threads are split among them. With "
                        "--ray: the number of Ray actors (default: one per slot of --threads CPUs)")
    p.add_argument("--limit", type=int, metavar="K", help="only the first K items (scored on their own)")
    p.add_argument("--item-timeout", type=float, metavar="SECONDS",
                   help="kill a worker that spends longer on one item and retry the item once, then record it as "
                        "failed (WorkerTimeout); items then run in worker processes (default: no limit)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run on a Ray cluster (HOST:PORT or 'auto'; pip install 'vlmfo1[ray]'): one actor per slot, "
                        "each loading the model from --model, which every node must see at the same path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_sampling_args(p, max_new_default) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_default,
                   help="default: sized for the task" if max_new_default is None else None)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the official setting)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--repetition-penalty", type=float, help="default: the checkpoint's generation_config.json for "
                                                            "Qwen; none for VLM-FO1 (the official run cannot apply one)")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 1, like every other error of the CLI."""

    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vlmfo1", description="Fast CPU inference for VLM-FO1.")
    ap.add_argument("--version", action="version", version=f"vlmfo1 {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    for cmd, (task, positional, region) in FO1_COMMANDS.items():
        p = sub.add_parser(cmd, help=f"VLM-FO1 {task.replace('_', ' ')} among proposal boxes")
        p.add_argument("image", metavar="IMAGE", help="image file (JPEG, PNG, ...)")
        if positional == "categories":
            p.add_argument("categories", nargs="+", help=_POSITIONAL_HELP[positional])
        elif positional:
            p.add_argument(positional, help=_POSITIONAL_HELP[positional])
        if region:
            p.add_argument("--region", type=int, nargs="+", required=True, metavar="K",
                           help="the region index(es) (positions in the boxes file, from 0)")
        if cmd == "caption":
            p.add_argument("--detailed", action="store_true", help="a detailed instead of a brief description")
        p.add_argument("--boxes", metavar="FILE",
                       help='proposal boxes, JSON: [[x1, y1, x2, y2], ...], {"boxes": [...], "box_format": "xywh", '
                            '"scores": [...]}, or COCO-style [{"bbox": [x, y, w, h], "score": s}, ...]')
        p.add_argument("--box-format", choices=["xyxy", "xywh", "cxcywh", "xyxyn", "xywhn", "cxcywhn"],
                       help="coordinates in the boxes file (default: the file's box_format, else xyxy; xywh for "
                            "COCO-style dicts; *n = normalized to 0..1)")
        p.add_argument("--proposals", metavar="FILE",
                       help="instead of --boxes: a proposals file holding this image (the official COCO .jsonl, "
                            "CountBench/PixmoCount .json, or COCO detection results), looked up by the image's file "
                            "name or --image-id")
        p.add_argument("--image-id", type=int, help="the image's id in a COCO-keyed --proposals file")
        p.add_argument("--upn", metavar="CKPT",
                       help="instead of --boxes: propose the boxes with UPN on the CPU (upn_large.pth or a safetensors "
                            "conversion), filtered as the official pipeline does (score >= 0.3, NMS 0.8, top 100)")
        p.add_argument("--truncate-boxes", action="store_true", help="keep the first 100 boxes instead of failing")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object")
        p.add_argument("--draw", metavar="PNG", help="also save the image with the picked boxes drawn on it")
        _add_model_args(p, "reference", 8192)
        _add_sampling_args(p, None)

    u = sub.add_parser("propose", help="propose boxes for an image with UPN on the CPU (the official proposal network)")
    u.add_argument("image", metavar="IMAGE", help="image file (JPEG, PNG, ...)")
    u.add_argument("--upn", metavar="CKPT", required=True, help="upn_large.pth or a safetensors conversion")
    u.add_argument("--prompt", choices=["fine_grained_prompt", "coarse_grained_prompt"], default="fine_grained_prompt")
    u.add_argument("--min-score", type=float, default=0.3, help="score threshold (default %(default)s)")
    u.add_argument("--nms", type=float, default=0.8, help="NMS IoU threshold (default %(default)s)")
    u.add_argument("--max-boxes", type=int, default=100, help="keep at most this many (default %(default)s)")
    u.add_argument("--out", metavar="JSON", help='also write {"boxes": [...], "scores": [...]} there (a --boxes file)')
    u.add_argument("--threads", type=int)

    cu = sub.add_parser("convert-upn", help="write a UPN checkpoint (upn_large.pth) as safetensors (memory-mapped at load)")
    cu.add_argument("src", help="upn_large.pth (read without torch; nothing in it is executed)")
    cu.add_argument("dst", help="the .safetensors file to write")

    g = sub.add_parser("generate", help="generate text with a Qwen2/Qwen2.5 (or, with --image, Qwen2.5-VL) checkpoint")
    g.add_argument("prompt")
    g.add_argument("--image", help="an image file: run Qwen2.5-VL (the checkpoint must hold the vision tower)")
    g.add_argument("--tokenizer", help="tokenizer folder (text only; default: the model folder)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in a ChatML user turn (text only; with "
                                                       "--image the prompt is always a chat turn)")
    g.add_argument("--system", help="system message (with --chat or --image; default: Qwen's)")
    g.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr")
    _add_model_args(g, "exact", 4096)
    _add_sampling_args(g, 128)

    r = sub.add_parser("random-checkpoint", help="write a random-weight Qwen2.5 (or, with --fo1, VLM-FO1) checkpoint "
                                                 "for tests and benchmarks")
    r.add_argument("path")
    r.add_argument("--fo1", action="store_true", help="a VLM-FO1 checkpoint in the official layout (the folder name "
                                                      "should contain 'vlm-fo1' and 'qwen2.5-vl' for the official "
                                                      "loader)")
    r.add_argument("--upn", action="store_true", help="a UPN proposal network (one .safetensors file with the official "
                                                      "tensor names; full = UPN-large)")
    r.add_argument("--size", choices=["tiny", "3b", "full"], default="tiny", help="3b = full = the real shapes")
    r.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tiktoken", help="qwen.tiktoken to build the tokenizer files from (default: "
                                      "$VLMFO1_QWEN_TIKTOKEN, else ../shared/data/tokenizer/qwen.tiktoken)")

    e = sub.add_parser("eval", help="run a benchmark (COCO, RefCOCO, CountBench, PixmoCount) end to end: resumable, "
                                    "with worker processes")
    esub = e.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    from .eval.registry import EVALUATORS

    for name, (cls, add_arguments) in EVALUATORS.items():
        doc = (cls.__doc__ or name).strip().splitlines()[0]
        p = esub.add_parser(name, help=doc, description=doc + " Rerunning the same command resumes the run.")
        add_arguments(p)
        _add_eval_run_args(p)

    c = sub.add_parser("cache", help="the weight cache of int8 / int4 loads: what it holds, or empty it")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    ci = csub.add_parser("info", help="the cache folder, its files with their sizes and source checkpoints")
    _add_cache_dir_arg(ci)
    cc = csub.add_parser("clear", help="delete the cached files (nothing else in the folder is touched)")
    _add_cache_dir_arg(cc)
    cc.add_argument("--stale", action="store_true",
                    help="only the files whose source checkpoint changed or is gone (they can never be used again)")

    d = sub.add_parser("demo", help="run the official quick-start example on a small random VLM-FO1 checkpoint")
    d.add_argument("--tiktoken", help="qwen.tiktoken (default: $VLMFO1_QWEN_TIKTOKEN, else "
                                      "../shared/data/tokenizer/qwen.tiktoken)")
    d.add_argument("--demo-dir", help="folder with demo_image.jpg and demo_boxes.json (default: next to the "
                                      "tokenizer data)")
    d.add_argument("--out", default="vlmfo1_demo.png", help="where to save the picture (default %(default)s)")
    d.add_argument("--cache", help="where the random checkpoint is kept between runs (default: $VLMFO1_CACHE, "
                                   "else ~/.cache/vlmfo1)")
    d.add_argument("--threads", type=int)
    d.add_argument("--upn", action="store_true", help="propose the boxes with a tiny random UPN on the CPU (the official "
                                                      "pipeline's proposal network) instead of reading demo_boxes.json")
    d.add_argument("--text", action="store_true", help="instead: a text-only Qwen2.5 chat on a random checkpoint")
    d.add_argument("--prompt", help="the chat prompt (with --text)")
    return ap


def main(argv=None) -> int:
    ap = _parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:          # --help / --version (0) or a usage error (1, one line already printed)
        return int(e.code or 0)
    cmd = f"{args.cmd} {args.benchmark}" if args.cmd == "eval" else \
        f"{args.cmd} {args.action}" if args.cmd == "cache" else args.cmd
    try:
        return _run(args)
    except (OSError, ValueError, KeyError, TypeError, LookupError, NotImplementedError, ArithmeticError,
            RuntimeError, RecursionError, ImportError, MemoryError) as e:  # one clear line
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"vlmfo1 {cmd}: error: {msg}", file=sys.stderr)
        return 1


def _check_sampling_args(args) -> None:
    """The generation options, checked before any model is loaded (the model's own limits are checked after)."""
    from .generation import check_repetition_penalty, check_sampling

    check_sampling(0 if args.max_new_tokens is None else args.max_new_tokens, args.temperature, args.top_p,
                   args.top_k, seed=args.seed)
    if args.repetition_penalty is not None:
        check_repetition_penalty(args.repetition_penalty)
    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context must be >= 1 (at most the checkpoint's max_position_embeddings), got "
                         f"{args.max_context}")


def _run(args) -> int:
    if args.cmd in FO1_COMMANDS or args.cmd == "generate":
        _check_sampling_args(args)
    if args.cmd in FO1_COMMANDS:
        return _fo1_task(args)
    if args.cmd == "generate":
        return _generate(args)
    if args.cmd == "propose":
        return _propose(args)
    if args.cmd == "convert-upn":
        from .upn import convert_upn

        if os.path.exists(args.dst):
            raise FileExistsError(f"{args.dst} exists")
        cfg = convert_upn(args.src, args.dst)
        print(f"wrote {args.dst} (UPN: Swin embed {cfg.embed}, depths {list(cfg.depths)}, {cfg.queries} queries)")
        return 0
    if args.cmd == "random-checkpoint":
        return _random_checkpoint(args)
    if args.cmd == "eval":
        return _eval(args)
    if args.cmd == "cache":
        return _cache(args)
    if args.cmd == "demo":
        return _text_demo(args) if args.text else _fo1_demo(args)
    return 1


# ---------------------------------------------------------------------------------------------- FO1 tasks

MAX_BOXES_NESTING = 8                 # {"boxes": [{"bbox": [...]}]} is 3 deep
MAX_BOXES_FILE_BYTES = 256 * 2 ** 20


def read_boxes_file(path, box_format=None):
    """A boxes JSON file -> (boxes, box_format, scores). Layouts: a list of 4-number boxes; {"boxes": [...],
    "box_format": ..., "scores": [...]}; a list of COCO-style {"bbox": [x, y, w, h], "score": s} (xywh).
    box_format (the --box-format option) must agree with a format the file names."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"boxes file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"boxes file is a folder: {path}")
    size = os.path.getsize(path)
    if size > MAX_BOXES_FILE_BYTES:
        raise ValueError(f"{path}: {size} bytes is too big for a boxes file (at most {MAX_BOXES_FILE_BYTES})")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (not UTF-8: {e})") from None
    depth = nesting_depth(text)
    if depth > MAX_BOXES_NESTING:
        raise ValueError(f"{path}: JSON nested {depth} levels deep; a boxes file nests at most {MAX_BOXES_NESTING} "
                         f"(e.g. {{\"boxes\": [[x1, y1, x2, y2], ...]}})")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    scores, fmt = None, None
    if isinstance(data, dict):
        if "boxes" not in data:
            raise ValueError(f'{path}: expected a list of [x1, y1, x2, y2] boxes or {{"boxes": [...]}}')
        fmt, scores = data.get("box_format"), data.get("scores")
        if fmt is not None and not isinstance(fmt, str):
            raise ValueError(f"{path}: box_format must be a string, got {fmt!r}")
        data = data["boxes"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: boxes must be a JSON list, got {type(data).__name__}")
    if data and all(isinstance(b, dict) for b in data):
        fmt = fmt or "xywh"                                   # COCO-style dicts
    if box_format and fmt and box_format != fmt:
        raise ValueError(f"--box-format {box_format} contradicts the file's box format {fmt} ({path})")
    fmt = box_format or fmt or "xyxy"
    if _holds_bool(data) or _holds_bool(scores):
        raise ValueError(f"{path}: boxes and scores must be numbers, not true/false")
    import warnings

    from .proposals import as_boxes
    try:   # shape, numbers, format and score count, checked here so the error names the file (warnings come later)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            as_boxes(data, box_format=fmt, scores=scores, image_size=(1, 1) if fmt.endswith("n") else None)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: {e}") from None
    return data, fmt, scores


def _holds_bool(v, depth: int = 0) -> bool:
    if isinstance(v, bool):
        return True
    if isinstance(v, dict):
        v = list(v.values())
    return isinstance(v, list) and depth < MAX_BOXES_NESTING and any(_holds_bool(x, depth + 1) for x in v)


def _fo1_task(args) -> int:
    from .fo1 import VLMFO1

    task, positional, region = FO1_COMMANDS[args.cmd]
    if not os.path.exists(args.image):
        raise FileNotFoundError(f"image file not found: {args.image}")
    if sum(bool(x) for x in (args.boxes, args.proposals, args.upn)) > 1:
        raise ValueError("give only one of --boxes, --proposals and --upn")
    if not args.boxes and not args.proposals and not args.upn and args.cmd != "chat":
        raise ValueError("the proposal boxes are missing: give --boxes FILE, --proposals FILE or --upn CKPT")
    if args.box_format and not args.boxes:
        raise ValueError("--box-format needs --boxes")
    if args.image_id is not None and not args.proposals:
        raise ValueError("--image-id needs --proposals")
    source = None
    if args.proposals:
        from .proposals import open_proposals

        source = open_proposals(args.proposals)
        boxes, fmt, scores = None, None, None
    elif args.upn:
        from .upn import UPN

        source = UPN.from_pretrained(args.upn, n_threads=args.threads)
        boxes, fmt, scores = None, None, None
    else:
        boxes, fmt, scores = read_boxes_file(args.boxes, args.box_format) if args.boxes else ([], "xyxy", None)
    model = VLMFO1.from_pretrained(args.model, mode=args.mode, compute=args.compute, dtype=args.dtype,
                                   threads=args.threads, max_context=args.max_context, cache_dir=_cache_dir(args))
    kw = dict(boxes=boxes, box_format=fmt, scores=scores, proposals=source, image_id=args.image_id,
              truncate_boxes=args.truncate_boxes,
              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              seed=args.seed, repetition_penalty=args.repetition_penalty)
    pos = []
    if positional:
        pos.append(getattr(args, positional))
    if region:
        pos.append(args.region)
    if args.cmd == "caption":
        kw["detailed"] = args.detailed
    res = getattr(model, task)(args.image, *pos, **kw)
    print(f"[{model.memory_report()}]", file=sys.stderr)   # after the request: an error stays one line
    if args.draw:
        res.save(args.draw)
    if args.json:
        print(res.to_json())
    else:
        _print_result(res)
    return 0


def _print_result(res) -> None:
    print(f"answer: {res.text}")
    for d in res.detections:
        score = "" if d.score is None else f" score {d.score:.2f}"
        print(f"  {d.label}: region {d.index} box {[round(v, 1) for v in d.box]}{score}")
    if not res.detections:
        print("  (no detections)")
    if res.count is not None and res.task == "count":
        print(f"count: {res.count}")
    t = res.timings
    stages = ", ".join(f"{k} {v:.2f}" for k, v in t.items())
    print(f"[{len(res.token_ids)} tokens ({res.finish_reason}); {sum(t.values()):.2f} s: {stages}]", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- benchmarks

def _eval(args) -> int:
    """vlmfo1 eval NAME: build the evaluator from the arguments and run it (resuming what --out holds)."""
    import warnings

    from .eval.registry import EVALUATORS
    from .eval.runner import RunInterrupted, run

    cmd = f"vlmfo1 eval {args.benchmark}"

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"{cmd}: warning: {message}", file=sys.stderr)

    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context must be >= 1, got {args.max_context}")
    cls, _ = EVALUATORS[args.benchmark]
    options = {"mode": args.mode, "dtype": args.dtype, "compute": args.compute, "max_context": args.max_context,
               "cache_dir": _cache_dir(args)}
    old = warnings.showwarning
    warnings.showwarning = one_line
    try:
        evaluator = cls.from_args(args)
        run(evaluator, args.model, args.out, workers=args.workers, threads=args.threads, limit=args.limit,
            progress=not args.no_progress, ray=args.ray, model_options=options, item_timeout=args.item_timeout)
    except RunInterrupted as e:
        print(f"{cmd}: {e}", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = old
    return 0


# ---------------------------------------------------------------------------------------------- the weight cache

def _cache(args) -> int:
    """vlmfo1 cache info | clear [--stale]: the weight cache of int8 / int4 loads (vlmfo1.weight_cache)."""
    from .weight_cache import cache_info, clear_cache, human_bytes

    if args.action == "clear":
        removed = clear_cache(args.cache_dir, stale_only=args.stale)
        info = cache_info(args.cache_dir)
        what = "stale " if args.stale else ""
        print(f"removed {len(removed)} {what}file{'' if len(removed) == 1 else 's'} "
              f"({human_bytes(sum(n for _, n in removed))}) from {info['directory']}; "
              f"{len(info['files'])} left ({human_bytes(info['bytes'])})")
        return 0
    info = cache_info(args.cache_dir)
    files = info["files"]
    where = "--cache-dir" if args.cache_dir else "$VLMFO1_CACHE_DIR" if os.environ.get("VLMFO1_CACHE_DIR") else \
        "the default"
    print(f"weight cache: {info['directory']} ({where})")
    print(f"{len(files)} file{'' if len(files) == 1 else 's'}, {human_bytes(info['bytes'])}"
          + (f" ({sum(f.stale for f in files)} stale: `vlmfo1 cache clear --stale` removes them)"
             if any(f.stale for f in files) else ""))
    for f in files:
        kind = f"int{f.bits} {f.matrices:4d} matrices" if f.bits else f"unreadable ({f.error})"
        state = "  STALE" if f.stale else ""
        print(f"  {human_bytes(f.bytes):>11}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(f.mtime))}  {kind}  "
              f"{os.path.basename(f.path)}{state}")
        for src in f.sources:
            print(f"{'':15}from {src}")
    for p, n in info["temporary"]:
        print(f"  {human_bytes(n):>11}  temporary (a writer at work or killed): {os.path.basename(p)}")
    return 0


# ---------------------------------------------------------------------------------------------- Qwen text / VL

def _generate(args) -> int:
    if args.image:
        if args.chat or args.tokenizer:
            raise ValueError("--chat and --tokenizer apply to text-only generation, not with --image")
        from .qwen_vl import DEFAULT_SYSTEM, QwenVL

        vl = QwenVL.load(args.model, mode=args.mode, compute=args.compute, dtype=args.dtype, n_threads=args.threads,
                         max_context=args.max_context, cache_dir=_cache_dir(args))
        t0 = time.perf_counter()
        for piece in vl.stream(args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                               system=args.system or DEFAULT_SYSTEM, repetition_penalty=args.repetition_penalty):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.verbose:
            print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)
        return 0
    if args.system and not args.chat:
        raise ValueError("--system needs --chat (or --image)")
    from .decoder import LanguageModel
    from .tokenizer import Tokenizer

    lm = LanguageModel.load(args.model, mode=args.mode, compute=args.compute, dtype=args.dtype,
                            n_threads=args.threads, max_context=args.max_context, cache_dir=_cache_dir(args))
    tok = Tokenizer.from_pretrained(args.tokenizer or args.model)
    _stream(lm, tok, args.prompt, args.chat, args.system, args)
    return 0


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
                       top_k=args.top_k, seed=args.seed, repetition_penalty=getattr(args, "repetition_penalty", None)):
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


# ---------------------------------------------------------------------------------------------- checkpoints, demo

def find_tiktoken(given=None) -> str:
    """The Qwen BPE ranks file: the given path, $VLMFO1_QWEN_TIKTOKEN, the project's ../shared data (next to a
    source checkout, or under the current folder's parent). FileNotFoundError, before anything is written, if none."""
    from .constants import DEFAULT_TIKTOKEN

    if given:
        if not os.path.isfile(given):
            raise FileNotFoundError(f"tiktoken file not found: {given}")
        return given
    cands = [os.environ.get("VLMFO1_QWEN_TIKTOKEN"), DEFAULT_TIKTOKEN,
             os.path.join("..", "shared", "data", "tokenizer", "qwen.tiktoken"),
             os.path.join("shared", "data", "tokenizer", "qwen.tiktoken")]
    for c in cands:
        if c and os.path.isfile(c):
            return os.path.normpath(c)
    raise FileNotFoundError("no Qwen vocabulary found: pass --tiktoken PATH/qwen.tiktoken (or set "
                            "VLMFO1_QWEN_TIKTOKEN); looked for " + ", ".join(os.path.normpath(c) for c in cands[1:]))


def _write_atomically(path: str, write) -> None:
    """write(tmp) into a sibling temporary folder, then rename it to path: never a half-written folder."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path} exists and is not an empty folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        work = os.path.join(tmp, os.path.basename(path))   # keeps the folder name (the official loader reads it)
        write(work)
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(work, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _propose(args) -> int:
    from .upn import UPN

    if not os.path.exists(args.image):
        raise FileNotFoundError(f"image file not found: {args.image}")
    upn = UPN.from_pretrained(args.upn, n_threads=args.threads, prompt=args.prompt)
    props = upn.proposals(args.image, min_score=args.min_score, nms_iou=args.nms, max_boxes=args.max_boxes)
    out = {"boxes": props.boxes.tolist(), "box_format": "xyxy", "scores": props.scores.tolist()}
    if args.out:
        tmp = args.out + ".partial"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, args.out)
    print(json.dumps(out))
    return 0


def _random_checkpoint(args) -> int:
    size = "tiny" if args.size == "tiny" else "full"
    if args.upn:
        from .testing.upn import write_random_upn

        if args.fo1 or args.tiktoken:
            raise ValueError("--upn writes a UPN checkpoint: --fo1 and --tiktoken do not apply")
        if not args.path.endswith(".safetensors"):
            raise ValueError(f"--upn writes one file: give a path ending in .safetensors, got {args.path}")
        if os.path.exists(args.path):
            raise FileExistsError(f"{args.path} exists")
        tmp = args.path + ".partial.safetensors"
        write_random_upn(tmp, size=size, seed=args.seed, dtype=args.dtype)
        os.replace(tmp, args.path)
        print(f"wrote {args.path}")
        return 0
    tk = find_tiktoken(args.tiktoken) if (args.fo1 or args.tiktoken) else None
    if args.fo1:
        from .testing.fo1 import write_random_fo1

        _write_atomically(args.path, lambda p: write_random_fo1(p, size=size, dtype=args.dtype, seed=args.seed,
                                                                tiktoken_path=tk))
    else:
        _write_atomically(args.path, lambda p: _write_random(p, args.size, args.dtype, args.seed, tk))
    print(f"wrote {args.path}")
    return 0


def _write_random(path, size, dtype, seed, tiktoken):
    from .testing.qwen2 import QWEN25_3B, TINY, write_random_qwen2

    write_random_qwen2(path, TINY if size == "tiny" else QWEN25_3B, dtype=dtype, seed=seed)
    if tiktoken:
        from .tokenizer import Tokenizer

        Tokenizer.from_tiktoken(tiktoken).save(path)


def demo_checkpoint(tiktoken: str, cache=None) -> str:
    """The tiny random VLM-FO1 checkpoint of the demo, written once into the cache folder and reused."""
    from .testing.fo1 import write_random_fo1

    cache = cache or os.environ.get("VLMFO1_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlmfo1")
    path = os.path.join(cache, f"VLM-FO1_Qwen2.5-VL-3B-random-tiny-v{__version__}")
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        if os.path.isdir(path):                      # left by an older, interrupted writer: start again
            shutil.rmtree(path)
        _write_atomically(path, lambda p: write_random_fo1(p, size="tiny", tiktoken_path=tiktoken))
    return path


def demo_upn_checkpoint(cache=None) -> str:
    """The tiny random UPN checkpoint of `demo --upn`, written once into the cache folder and reused."""
    from .testing.upn import write_random_upn

    cache = cache or os.environ.get("VLMFO1_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlmfo1")
    path = os.path.join(cache, f"upn-random-tiny-v{__version__}.safetensors")
    if not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        write_random_upn(path + ".partial.safetensors", size="tiny")
        os.replace(path + ".partial.safetensors", path)
    return path


def _fo1_demo(args) -> int:
    from .fo1 import VLMFO1

    if args.prompt:
        raise ValueError("--prompt applies to --text; the VLM-FO1 demo runs the official 'detect orange' example")
    tk = find_tiktoken(args.tiktoken)
    demo = args.demo_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(tk))), "demo")
    image = os.path.join(demo, "demo_image.jpg")
    if args.upn:
        from .upn import UPN

        t0 = time.perf_counter()
        upn = UPN.from_pretrained(demo_upn_checkpoint(args.cache), n_threads=args.threads)
        props = upn(image)
        print(f"{upn}\nproposed {len(props)} boxes in {time.perf_counter() - t0:.1f} s (random UPN weights)")
        boxes, fmt, scores = props.boxes, "xyxy", props.scores
    else:
        boxes, fmt, scores = read_boxes_file(os.path.join(demo, "demo_boxes.json"))
    t0 = time.perf_counter()
    path = demo_checkpoint(tk, args.cache)
    model = VLMFO1.from_pretrained(path, threads=args.threads)
    print(f"{model}\n(loaded in {time.perf_counter() - t0:.1f} s from the demo cache {path})")
    print("NOTE: the weights are RANDOM (no trained weights can be downloaded here), so the answer is gibberish; "
          "the pipeline is the real one. Use --model with the real checkpoint for real answers.")
    res = model.detect(image, "orange", boxes=boxes, box_format=fmt, scores=scores, max_new_tokens=16)
    _print_result(res)
    res.draw(proposals=True).save(args.out)
    print(f"picture: {args.out} (proposals in grey, the picked boxes in colour)")
    return 0


def _text_demo(args) -> int:
    from .decoder import LanguageModel
    from .tokenizer import Tokenizer

    tk = find_tiktoken(args.tiktoken)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _write_random(tmp, "tiny", "bfloat16", 0, tk)
        lm = LanguageModel.load(tmp, n_threads=args.threads)
        tok = Tokenizer.from_pretrained(tmp)
        print(f"random tiny Qwen2.5 checkpoint written and loaded in {time.perf_counter() - t0:.1f} s "
              f"({lm.weight_bytes / 1e6:.1f} MB of weights, compute={lm.compute}); the text is gibberish by design")
        ns = argparse.Namespace(max_new_tokens=32, temperature=0.8, top_p=0.95, top_k=0, seed=0, verbose=True)
        _stream(lm, tok, args.prompt or "Describe the picture in one sentence.", True, None, ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
