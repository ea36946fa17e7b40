"""The evaluation runner: the run folder, resume after a kill (truncated last line, SIGKILL of the CLI), garbage in
the middle, items that fail (recorded, the run goes on), Ctrl-C, settings changes, worker processes (byte-identical
predictions, a killed worker's items retried), model folders that are not FO1. Most tests use a scripted stand-in
model (a test double, tests/eval_doubles.py); the full loop runs the tiny random FO1 checkpoint on coco_tiny."""
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eval_doubles import OracleStandIn, kill_after_first_record, write_proposals_jsonl  # noqa: E402  (test doubles, tests only)

pytest.importorskip("pycocotools")

from vlmfo1.cli import main as cli_main  # noqa: E402
from vlmfo1.eval import CocoEvaluator, RunInterrupted, run  # noqa: E402
from vlmfo1.eval.runner import read_records  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TINY = SHARED / "coco_tiny"
ANN = TINY / "annotations" / "instances_val2017.json"
IMAGES = TINY / "val2017"

pytestmark = pytest.mark.skipif(not ANN.exists(), reason="shared coco_tiny not found")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """coco_tiny with proposals (official jsonl layout) and an images folder whose 3rd image (in annotation order)
    is not an image at all."""
    root = tmp_path_factory.mktemp("evaldata")
    props = write_proposals_jsonl(ANN, root / "props.jsonl")
    images = root / "images"
    images.mkdir()
    ds = json.loads(ANN.read_text())
    names = [im["file_name"] for im in ds["images"]]
    for n in names:
        os.symlink(IMAGES / n, images / n)
    bad = names[2]
    (images / bad).unlink()
    (images / bad).write_bytes(b"this is not a JPEG file\n" * 10)
    return {"props": props, "images": images, "bad": bad, "names": names, "root": root}


def stand_in(**kw):
    return functools.partial(OracleStandIn, str(ANN), **kw)


def evaluator(data, **kw):
    kw.setdefault("scorer", "pycocotools")
    return CocoEvaluator(data["images"], ANN, data["props"], **kw)


def lines(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


def go(data, out, limit=None, model=None, **kw):
    return run(evaluator(data), model or stand_in(), out, limit=limit, progress=False, summary=False, **kw)


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """One uninterrupted single-process run over 12 items: the predictions every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    rep = go(data, out, limit=12)
    return out, rep


# ---------------------------------------------------------------------------------------------- the run folder

def test_a_run_records_every_item_once_and_a_failing_image_does_not_stop_it(data, reference_run):
    out, rep = reference_run
    recs = lines(out / "records.jsonl")
    preds = lines(out / "predictions.jsonl")
    keys = [str(k) for k in [it.key for it in evaluator(data).items()[:12]]]
    assert [p["key"] for p in preds] == keys                     # items() order, one line each
    assert sorted(r["key"] for r in recs) == sorted(keys)
    bad = preds[2]
    assert "record" not in bad and bad["error"].startswith("ImageDecodeError: cannot ")
    assert data["bad"] in bad["error"]
    assert all("record" in p for i, p in enumerate(preds) if i != 2)
    assert all("seconds" in r for r in recs) and not any("seconds" in p or "where" in p for p in preds)
    where = next(r for r in recs if "error" in r)["where"]        # records.jsonl says where it was raised
    assert "image.py:" in where and where.endswith(" in load_image"), where
    assert rep["run"]["errors"] == 1 and rep["run"]["records"] == 11 and rep["images"] == 12
    assert rep["images_missing"] == 1                            # the failed image counts as no detections
    assert json.loads((out / "report.json").read_text())["stats"] == rep["stats"]
    meta = json.loads((out / "run.json").read_text())
    assert meta["evaluator"] == "coco" and meta["settings"]["max_proposals"] == 100


def test_rerun_of_a_complete_run_runs_nothing_and_retries_errors(data, reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out)
    before = (out / "records.jsonl").read_text()
    rep = go(data, out, limit=12, retry_errors=False)
    assert rep["run"]["ran_now"] == 0 and (out / "records.jsonl").read_text() == before
    rep = go(data, out, limit=12)                                # the failed item is tried again (and fails again)
    assert rep["run"]["ran_now"] == 1
    recs = lines(out / "records.jsonl")
    bad_key = lines(reference_run[0] / "predictions.jsonl")[2]["key"]
    assert len(recs) == 13 and recs[-1]["key"] == bad_key and "error" in recs[-1]
    assert (out / "predictions.jsonl").read_bytes() == (reference_run[0] / "predictions.jsonl").read_bytes()


def test_resume_drops_a_truncated_last_line(data, reference_run, tmp_path):
    out = tmp_path / "run"
    go(data, out, limit=5)
    rec = out / "records.jsonl"
    good = rec.read_bytes()
    extra = json.dumps({"key": lines(reference_run[0] / "predictions.jsonl")[5]["key"], "record": {"answer": "x"}})
    rec.write_bytes(good + extra[:37].encode())                # a kill in the middle of writing item 6
    with pytest.warns(RuntimeWarning, match=r"line 6 \(the last\) is incomplete or garbled .* dropped"):
        rep = go(data, out, limit=12)
    assert rep["run"]["ran_now"] == 8                          # items 6..12, and the failed 3rd one again
    recs = lines(rec)
    ok = [r["key"] for r in recs if "record" in r]
    assert len(ok) == 11 and len(set(ok)) == 11                # nothing lost or duplicated
    assert len(recs) == 13 and sum("error" in r for r in recs) == 2
    assert rec.read_bytes().startswith(good)
    assert (out / "predictions.jsonl").read_bytes() == (reference_run[0] / "predictions.jsonl").read_bytes()


def test_a_complete_last_line_without_its_newline_is_kept(data, reference_run, tmp_path):
    out = tmp_path / "run"
    go(data, out, limit=4)
    rec = out / "records.jsonl"
    rec.write_bytes(rec.read_bytes()[:-1])
    rep = go(data, out, limit=6, retry_errors=False)
    assert rep["run"]["ran_now"] == 2                          # the 4th line was taken as it is
    assert len(lines(rec)) == 6 and rec.read_bytes().count(b"\n") == 6


def test_garbage_in_the_middle_is_refused(data, tmp_path):
    out = tmp_path / "run"
    go(data, out, limit=4)
    rec = out / "records.jsonl"
    rows = rec.read_text().splitlines(keepends=True)
    rec.write_text(rows[0] + "{not json\n" + "".join(rows[1:]))
    with pytest.raises(ValueError, match=r"records.jsonl: line 2: not valid JSON .* damaged before its last line"):
        go(data, out, limit=6)
    rec.write_text(rows[0] + '{"key": 5, "record": {}}\n' + "".join(rows[1:]))
    with pytest.raises(ValueError, match=r"line 2: no string 'key'"):
        go(data, out, limit=6)
    rec.write_text(rows[0] + '{"key": "5", "record": {}, "error": "x"}\n' + "".join(rows[1:]))
    with pytest.raises(ValueError, match=r"line 2: expected exactly one of 'record' and 'error'"):
        read_records(str(rec))


def test_resume_with_other_settings_or_model_is_refused(data, tmp_path):
    out = tmp_path / "run"
    go(data, out, limit=2)
    with pytest.raises(ValueError, match=r"different settings: settings.max_new_tokens: 8 now, null in the run folder"):
        run(evaluator(data, max_new_tokens=8), stand_in(), out, limit=2, progress=False, summary=False)
    with pytest.raises(ValueError, match=r"settings.proposals: .* now, .* in the run folder"):
        run(CocoEvaluator(data["images"], ANN, oracle_proposals=True), stand_in(), out, progress=False,
            summary=False)

    def another_model(threads=None):
        return OracleStandIn(str(ANN))
    with pytest.raises(ValueError, match=r"model.factory: \"test_eval_runner\..* now, \"eval_doubles.OracleStandIn\" in the run folder"):
        run(evaluator(data), another_model, out, limit=2, progress=False, summary=False)
    (out / "run.json").write_text("{garbage")
    with pytest.raises(ValueError, match="run.json: not a readable run description"):
        go(data, out, limit=2)


def test_ctrl_c_leaves_a_resumable_run(data, reference_run, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted, match=r"interrupted with 4 of 12 items recorded; rerun"):
        go(data, out, limit=12, model=stand_in(interrupt_after=4))
    assert len(lines(out / "records.jsonl")) == 4 and not (out / "predictions.jsonl").exists()
    rep = go(data, out, limit=12)
    assert rep["run"]["ran_now"] == 9                          # 8 left, and the failed 3rd item again
    assert (out / "predictions.jsonl").read_bytes() == (reference_run[0] / "predictions.jsonl").read_bytes()


def test_the_run_folder_is_locked(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="in use by another run"):
            go(data, out, limit=1)


def test_argument_checks(data, tmp_path):
    with pytest.raises(ValueError, match="Ray actors load the model themselves"):      # more: test_eval_ray.py
        go(data, tmp_path / "r", model=OracleStandIn(str(ANN)), ray="auto")
    with pytest.raises(ValueError, match="loaded model cannot be shared"):
        go(data, tmp_path / "r", model=OracleStandIn(str(ANN)), workers=2)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        go(data, tmp_path / "r", workers=0)
    with pytest.raises(ValueError, match="limit must be"):
        go(data, tmp_path / "r", limit=-1)
    assert not (tmp_path / "r").exists()                       # nothing written for a refused run
    with pytest.raises(TypeError, match="picklable evaluator and model factory"):
        go(data, tmp_path / "r", limit=1, workers=2, model=lambda threads=None: OracleStandIn(str(ANN)))


# ---------------------------------------------------------------------------------------------- worker processes

def test_two_workers_give_byte_identical_predictions(data, reference_run, tmp_path):
    out = tmp_path / "run"
    rep = go(data, out, limit=12, workers=2, chunk_size=2)
    assert rep["run"]["workers"] == 2 and rep["run"]["threads_per_worker"] >= 1
    for name in ("predictions.jsonl", "coco_results.json"):
        assert (out / name).read_bytes() == (reference_run[0] / name).read_bytes()
    assert rep["stats"] == reference_run[1]["stats"]


def test_a_killed_worker_has_its_items_retried(data, reference_run, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "markers"
    marker.mkdir()
    names = data["names"]
    rep = go(data, out, limit=12, workers=2, chunk_size=3,
             model=stand_in(die_once=[names[4], names[9]], marker_dir=str(marker)))
    assert sorted(os.listdir(marker)) == sorted([names[4] + ".died", names[9] + ".died"])   # they did die
    assert rep["run"]["errors"] == 1                                                      # the bad image only
    assert (out / "predictions.jsonl").read_bytes() == (reference_run[0] / "predictions.jsonl").read_bytes()
    recs = lines(out / "records.jsonl")
    assert len(recs) == 12 and len({r["key"] for r in recs}) == 12


def test_an_item_that_always_kills_its_worker_is_reported(data, tmp_path):
    out = tmp_path / "run"
    names = data["names"]
    rep = go(data, out, limit=6, workers=2, chunk_size=2, model=stand_in(die_always=[names[1]]))
    preds = lines(out / "predictions.jsonl")
    assert preds[1]["error"].startswith("WorkerDied: the worker process died (killed by signal 9) while running "
                                        "this item, 2 times")
    assert rep["run"]["errors"] == 2 and all("record" in p for i, p in enumerate(preds) if i not in (1, 2))


def test_a_hung_worker_is_killed_after_item_timeout(data, reference_run, tmp_path):
    """item_timeout: a worker that does not answer an item within it is killed and replaced; the item is tried again
    (here it answers the second time) or, after max_attempts, gets a WorkerTimeout error record. The stand-in hangs
    for 60 s: the run must end well before that."""
    out = tmp_path / "run"
    marker = tmp_path / "markers"
    marker.mkdir()
    names = data["names"]
    t0 = time.monotonic()
    rep = go(data, out, limit=12, workers=2, chunk_size=3, item_timeout=4,
             model=stand_in(hang_once=[names[4]], hang_always=[names[7]], marker_dir=str(marker)))
    elapsed = time.monotonic() - t0
    assert os.listdir(marker) == [names[4] + ".hung"]
    preds = lines(out / "predictions.jsonl")
    ref = lines(reference_run[0] / "predictions.jsonl")
    assert preds[7]["error"] == ("WorkerTimeout: this item timed out (no answer within 4 s; the worker process was "
                                 "killed), 2 times")
    assert preds[:7] + preds[8:] == ref[:7] + ref[8:]          # the item that hung once answered on its retry
    assert rep["run"]["errors"] == 2 and len(lines(out / "records.jsonl")) == 12
    assert elapsed < 45, elapsed

    # workers=1 with a timeout runs in one worker process (a hung item cannot be stopped in this one)
    out1 = tmp_path / "run1"
    t0 = time.monotonic()
    rep = go(data, out1, limit=6, item_timeout=4, model=stand_in(hang_once=[names[1]], marker_dir=str(marker)))
    assert time.monotonic() - t0 < 30 and (marker / (names[1] + ".hung")).exists()
    assert lines(out1 / "predictions.jsonl") == ref[:6] and rep["run"]["errors"] == 1   # the bad image only
    with pytest.raises(ValueError, match="item_timeout, which runs the items in a worker process"):
        go(data, tmp_path / "r", model=OracleStandIn(str(ANN)), item_timeout=5)
    for bad in (0, -1, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="item_timeout must be a positive number of seconds"):
            go(data, tmp_path / "r", item_timeout=bad)


# ---------------------------------------------------------------------------------------------- not a FO1 folder

def test_a_model_folder_that_is_not_fo1(data, tmp_path, capsys):
    from vlmfo1.testing.qwen2 import TINY as QWEN_TINY, write_random_qwen2

    empty = tmp_path / "empty"
    empty.mkdir()
    qwen = tmp_path / "qwen"
    write_random_qwen2(str(qwen), QWEN_TINY)                   # a plain Qwen2.5 checkpoint, no vision, no regions
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"x")
    base = ["eval", "coco", "--images", str(data["images"]), "--annotations", str(ANN), "--proposals",
            str(data["props"]), "--no-progress", "--limit", "1", "--max-new-tokens", "2"]
    for folder, workers, msg in ((empty, "1", "config.json not found"), (qwen, "2", "config.json: "),
                                 (a_file, "2", "must be a checkpoint folder, got a file")):
        out = tmp_path / f"out-{folder.name}"
        assert cli_main(base + ["--model", str(folder), "--out", str(out), "--workers", workers]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vlmfo1 eval coco: error: ") and msg in err[0], err
        assert not out.exists()                                # refused before the run folder is made


# ---------------------------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def small_coco(data, tmp_path_factory):
    """coco_tiny at 0.4x resolution (images, annotation boxes and sizes, proposals scaled alike), to keep the runs of
    the real model short (its cost grows with the pixels); the 3rd image is not an image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("small_coco")
    ds = json.loads(ANN.read_text())
    f = 0.4
    images = root / "images"
    images.mkdir()
    for im in ds["images"][:6]:
        with Image.open(IMAGES / im["file_name"]) as pic:
            pic.convert("RGB").resize((round(im["width"] * f), round(im["height"] * f)), Image.BICUBIC).save(
                images / im["file_name"], quality=90)
    for im in ds["images"][6:]:
        os.symlink(IMAGES / im["file_name"], images / im["file_name"])
    for im in ds["images"]:
        im["width"], im["height"] = round(im["width"] * f), round(im["height"] * f)
    for a in ds["annotations"]:
        a["bbox"] = [v * f for v in a["bbox"]]
        a["area"] = a["area"] * f * f
        a.pop("segmentation", None)
    ann = root / "instances_small.json"
    ann.write_text(json.dumps(ds))
    (images / data["bad"]).unlink()
    (images / data["bad"]).write_bytes(b"this is not a JPEG file\n" * 10)
    return {"ann": ann, "images": images, "props": write_proposals_jsonl(ann, root / "props.jsonl")}


def test_full_loop_tiny_checkpoint_kill_resume_and_workers(small_coco, fo1_tiny_ckpt, tmp_path):
    """The tiny random FO1 checkpoint on the first 3 images of coco_tiny (0.4x; the 3rd is not an image): one
    in-process run; the CLI SIGKILLed mid-run and rerun; 2 worker processes — byte-identical predictions."""
    d = small_coco
    common = dict(max_new_tokens=6, max_proposals=8, scorer="pycocotools")
    t0 = time.perf_counter()
    a = tmp_path / "a"
    rep = run(CocoEvaluator(d["images"], d["ann"], d["props"], **common), fo1_tiny_ckpt, a, limit=3, threads=2,
              progress=False, summary=False)
    t_a = time.perf_counter() - t0
    preds = lines(a / "predictions.jsonl")
    assert [("record" in p) for p in preds] == [True, True, False]
    assert all(p["record"]["tokens"] <= 6 and isinstance(p["record"]["answer"], str) for p in preds[:2])
    assert preds[2]["error"].startswith("ImageDecodeError: ")
    assert rep["run"]["errors"] == 1 and rep["images"] == 3

    from vlmfo1 import VLMFO1
    with VLMFO1.from_pretrained(fo1_tiny_ckpt) as m:           # the same checkpoint, loaded: resumes (nothing to do)
        again = run(CocoEvaluator(d["images"], d["ann"], d["props"], **common), m, a, limit=3, progress=False,
                    summary=False)
    assert again["run"]["ran_now"] == 1                        # only the failed image, tried again
    assert lines(a / "predictions.jsonl") == preds

    b = tmp_path / "b"
    cmd = [sys.executable, "-m", "vlmfo1.cli", "eval", "coco", "--model", fo1_tiny_ckpt, "--images",
           str(d["images"]), "--annotations", str(d["ann"]), "--proposals", str(d["props"]), "--out", str(b),
           "--limit", "3", "--threads", "2", "--max-new-tokens", "6", "--max-proposals", "8", "--scorer",
           "pycocotools", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    rec = b / "records.jsonl"
    n_killed = kill_after_first_record(cmd, b, env, ROOT)
    assert 1 <= n_killed < 3 and not (b / "predictions.jsonl").exists()
    r = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Average Precision" in r.stdout and "3 items (" in r.stdout
    recs = lines(rec)
    assert len({x["key"] for x in recs if "record" in x}) == 2 and len(recs) <= n_killed + 3
    assert (b / "predictions.jsonl").read_bytes() == (a / "predictions.jsonl").read_bytes()

    c = tmp_path / "c"
    t0 = time.perf_counter()
    run(CocoEvaluator(d["images"], d["ann"], d["props"], **common), fo1_tiny_ckpt, c, limit=3, workers=2,
        chunk_size=1, progress=False, summary=False)
    t_c = time.perf_counter() - t0
    for name in ("predictions.jsonl", "coco_results.json"):
        assert (c / name).read_bytes() == (a / name).read_bytes()
    print(f"[eval full loop] 1 worker x 2 threads {t_a:.1f} s, 2 workers x 1 thread {t_c:.1f} s for 3 images "
          f"(one not an image); the CLI killed after {n_killed} record(s), resumed; predictions identical")
