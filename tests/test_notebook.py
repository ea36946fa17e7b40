"""examples/quickstart.ipynb runs top to bottom, headless, on a tiny random VLM-FO1 checkpoint.

The notebook is executed with nbclient (kernel python3) with its own folder as working directory, as a user would
run it from Jupyter. The kernel imports this checkout's vlmfo1 (PYTHONPATH), writes its cached random checkpoint
into a temporary VLMFO1_CACHE, and reads the shared data folder (skipped when that folder is missing).
"""
import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
DATA = Path(os.environ.get("VLMFO1_NOTEBOOK_DATA") or ROOT.parent / "shared" / "data").resolve()
NEEDED = ["tokenizer/qwen.tiktoken", "demo/demo_image.jpg", "demo/demo_boxes.json",
          "coco_tiny/annotations/instances_val2017.json", "coco_tiny/val2017/000000010764.jpg",
          "coco_tiny/val2017/000000020992.jpg"]


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return output.get("data", {}).get("text/plain", "")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    missing = [p for p in NEEDED if not (DATA / p).is_file()]
    if missing:
        pytest.skip(f"shared data folder incomplete ({DATA}: no {missing[0]})")
    cache = tmp_path_factory.mktemp("vlmfo1_cache")
    env = {
        "VLMFO1_CACHE": str(cache),   # the notebook writes its own checkpoint
        "VLMFO1_NOTEBOOK_DATA": str(DATA),
        "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        "OMP_NUM_THREADS": "2",
    }
    saved = {k: os.environ.get(k) for k in list(env) + ["VLMFO1_NOTEBOOK_MODEL"]}
    os.environ.update(env)                     # the kernel process inherits this environment
    os.environ.pop("VLMFO1_NOTEBOOK_MODEL", None)
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        client.execute()                      # raises nbclient.exceptions.CellExecutionError on any failing cell
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, cache


def test_committed_notebook_is_clean():
    """The repository holds the notebook without outputs (they are large and machine-specific)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert "parameters" in code[0].metadata.get("tags", [])


def test_notebook_runs_top_to_bottom(executed):
    nb, cache = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a cell did not run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "".join(_text(o) for c in code for o in c.outputs)
    # the kernel used this checkout and the random checkpoint it wrote into the temporary cache
    assert f"from {ROOT / 'vlmfo1'}" in text
    assert f"model: {cache / 'VLM-FO1_Qwen2.5-VL-3B-random-tiny'}" in text
    assert "VLMFO1(" in text and "threads 2" in text
    # every box form describes the same boxes (the torch tensor form only when torch is installed)
    forms = 4 if importlib.util.find_spec("torch") else 3
    assert text.count("same boxes as the list: True") == forms and "same boxes as the list: False" not in text
    assert "COCO results: 7\n" in text           # the hand-written example answer: 5 oranges, 2 apples
    assert "supervision.Detections: 7 boxes" in text
    assert "COCO results for 2 images: " in text
    assert "read back: True" in text


def test_results_are_shown_as_pictures(executed):
    nb, _ = executed
    pictures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if "image/png" in o.get("data", {})]
    assert pictures
    # evaluating a result object (FO1Result._repr_png_) shows the picture inline, with the text repr beside it
    results = [o for o in pictures if o.output_type == "execute_result"
               and o.data.get("text/plain", "").startswith("FO1Result(")]
    assert len(results) >= 3                               # `res`, `example` and `results[0]`
    assert any(o.data["text/plain"].startswith("FO1Result(detect_coco:") for o in results)   # from model.batch
    assert all(o.data["image/png"] for o in results)
