"""The package's layering (issue 11): the runtime never imports the random-checkpoint writers (vlmfo1.testing) nor
torch / transformers; the model's constants are defined once (vlmfo1.constants); the names that moved are still
importable from their old modules."""
from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "vlmfo1")

# the old homes of the writers: thin modules that re-export vlmfo1.testing (not runtime)
WRITER_SHIMS = {"vlmfo1.random_model", "vlmfo1.fo1_checkpoint"}


def runtime_modules():
    """Every module of the package but vlmfo1.testing and the writer shims, found without importing anything."""
    out = ["vlmfo1"]
    for sub, prefix in ((PKG, "vlmfo1."), (os.path.join(PKG, "eval"), "vlmfo1.eval.")):
        for m in pkgutil.iter_modules([sub]):
            name = prefix + m.name
            if name == "vlmfo1.testing" or name in WRITER_SHIMS:
                continue
            out.append(name)
    return sorted(out)


def _source(name: str) -> str:
    rel = name.split(".")[1:]
    path = os.path.join(ROOT, "vlmfo1", *rel)
    return path + "/__init__.py" if os.path.isdir(path) else path + ".py"


def test_runtime_modules_do_not_import_testing_torch_or_transformers():
    names = runtime_modules()
    for must in ("vlmfo1.options", "vlmfo1.generation", "vlmfo1.constants", "vlmfo1.decoder", "vlmfo1.fo1",
                 "vlmfo1.cli", "vlmfo1.eval.runner"):
        assert must in names
    code = ("import importlib, json, sys\n"
            f"for n in {names!r}:\n"
            "    importlib.import_module(n)\n"
            "bad = sorted(m for m in sys.modules if m == 'vlmfo1.testing' or m.startswith('vlmfo1.testing.')\n"
            "             or m.split('.')[0] in ('torch', 'transformers'))\n"
            "print(json.dumps(bad))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def _imports(tree):
    """(module-level?, imported module name) of every import statement."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield id(node) in top, "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield id(node) in top, a.name


@pytest.mark.parametrize("name", [n for n in runtime_modules() if n != "vlmfo1._core"])   # (the C extension)
def test_runtime_source_imports_no_writer(name):
    """Only the CLI's random-checkpoint and demo commands reach the writers, by an import inside the command."""
    with open(_source(name), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for top, mod in _imports(tree):
        writer = any(w in mod for w in ("testing", "random_model", "fo1_checkpoint"))
        assert not writer or (name == "vlmfo1.cli" and not top), (name, mod)


def _docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                yield id(first.value)


def test_constants_defined_once():
    """No module but vlmfo1.constants spells a Qwen2.5 added-token id, an FO1 placeholder or the system prompt."""
    from vlmfo1.constants import DEFAULT_SYSTEM_PROMPT, IMAGE_INDEX, QWEN2_ADDED_TOKENS, REGION_INDEX

    ids = {i for _, i, _ in QWEN2_ADDED_TOKENS}
    found = []
    for dirpath, _, files in os.walk(PKG):
        for fn in files:
            path = os.path.join(dirpath, fn)
            if not fn.endswith(".py") or path == os.path.join(PKG, "constants.py"):
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            docs = set(_docstrings(tree))
            for node in ast.walk(tree):
                if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
                        and isinstance(node.operand, ast.Constant) and -node.operand.value in (IMAGE_INDEX, REGION_INDEX):
                    found.append((path, node.lineno, -node.operand.value))
                elif isinstance(node, ast.Constant) and id(node) not in docs:
                    v = node.value
                    if (isinstance(v, int) and not isinstance(v, bool) and v in ids) or \
                            (isinstance(v, str) and DEFAULT_SYSTEM_PROMPT in v):
                        found.append((path, node.lineno, v))
    assert not found, found


def test_moved_names_still_import_from_their_old_modules():
    import vlmfo1.constants as C
    import vlmfo1.generation as G
    import vlmfo1.options as O
    import vlmfo1.testing.fo1 as TF
    import vlmfo1.testing.qwen2 as TQ
    from vlmfo1 import decoder, fo1_checkpoint, fo1_prompt, random_model
    from vlmfo1.decoder import LanguageModel, Session, decode_stream  # noqa: F401
    from vlmfo1.fo1 import FO1, VLMFO1, coco_detection_prompt  # noqa: F401

    for name in ("check_options", "read_config", "read_generation_eos", "check_max_context", "position_limit",
                 "check_request_length", "check_ids", "CONTEXT_CAP", "MODES", "_is_int", "_is_real"):
        assert getattr(decoder, name) is getattr(O, name), name
    for name in ("check_sampling", "check_stop_ids", "decode_stream", "_sample", "_top"):
        assert getattr(decoder, name) is getattr(G, name), name
    assert G.read_generation_config is O.read_generation_config
    assert random_model.write_random_qwen2 is TQ.write_random_qwen2 and random_model.TINY is TQ.TINY
    for name in ("write_random_fo1", "write_fo1_tokenizer", "random_tensor", "fo1_config", "fo1_shapes",
                 "fo1_token_ids", "davit_shapes", "vision_shapes", "count_params", "GENERATION_CONFIG"):
        assert getattr(fo1_checkpoint, name) is getattr(TF, name), name
    assert (fo1_checkpoint.IMAGE_TOKEN_INDEX, fo1_checkpoint.REGION_TOKEN_INDEX, fo1_checkpoint.MAX_REGIONS) == \
        (C.IMAGE_INDEX, C.REGION_INDEX, C.MAX_BOXES) == (fo1_prompt.IMAGE_INDEX, fo1_prompt.REGION_INDEX,
                                                          fo1_prompt.MAX_BOXES) == (-200, -300, 100)
    assert (C.IM_START_ID, C.IM_END_ID, C.VISION_END_ID, C.IMAGE_PAD_ID, C.QWEN25_VOCAB_END) == \
        (151644, 151645, 151653, 151655, 151665)
