"""The Ray backend of the evaluation runner (vlmfo1/eval/ray_backend.py) on a real Ray cluster: a local head node
started by the module fixture in a subprocess, bound to 127.0.0.1 only, 2 CPUs, token authentication with a token
made for the test (never ~/.ray), shut down at the end; every test and the cluster start are bounded in time.

Proved: a Ray run gives byte-identical predictions.jsonl / coco_results.json to a single-process run; an actor that
dies in the middle of an item (SIGKILL of its process) or is killed from outside (ray.kill) has its chunk retried on a
replacement actor, with the process backend's attempt cap; Ctrl-C of the driver and SIGKILL of the `vlmfo1 eval coco
--ray` CLI leave a run that resumes to identical output (the tiny random FO1 checkpoint, real model); slots and
threads per actor; clear errors (loaded model, model that cannot load, ray missing). The stand-in model is the test
double of tests/eval_doubles.py (Ray actors import it: the runner puts the tests folder on their PYTHONPATH).

Skipped when ray is not installed (pip install 'vlmfo1[ray]').
"""
import _thread
import faulthandler
import functools
import importlib.util
import inspect
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eval_doubles import OracleStandIn, write_proposals_jsonl  # noqa: E402  (test doubles, tests only)
from ray_doubles import SlowStandIn  # noqa: E402

pytest.importorskip("pycocotools")

from vlmfo1.eval import CocoEvaluator, RunInterrupted, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT.parent / "shared" / "data" / "coco_tiny"
ANN = TINY / "annotations" / "instances_val2017.json"
IMAGES = TINY / "val2017"

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="ray is not installed (pip install 'vlmfo1[ray]')"),
              pytest.mark.skipif(not ANN.exists(), reason="shared coco_tiny not found")]

HEAD = """
import sys, ray
ctx = ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False, _temp_dir=sys.argv[2], logging_level="WARNING")
print(ctx.address_info["gcs_address"], flush=True)
sys.stdin.read()                      # until the test closes stdin (or dies)
ray.shutdown()
"""
TEST_SECONDS = 150                    # per test (the watchdog dumps the stacks and ends pytest)


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(TEST_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _readline(stream, seconds):
    out = []
    t = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    t.start()
    t.join(seconds)
    return out[0].strip() if out else None


@pytest.fixture(scope="module")
def cluster():
    """A local Ray head node (2 CPUs) on 127.0.0.1 in a subprocess of its own session; this process is set up as a
    driver of it (environment variables), the address is passed as run(ray=...)."""
    token = secrets.token_hex(32)
    tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")              # short: Ray's socket paths must fit 107 bytes
    ray_env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",           # bind to 127.0.0.1 only, and find it there
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(ray_env)
    log = open(os.path.join(tmp, "head.log"), "w")
    head = subprocess.Popen([sys.executable, "-c", HEAD, "2", tmp], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=log, env=env, text=True, start_new_session=True)
    mp = pytest.MonkeyPatch()
    try:
        address = _readline(head.stdout, 90)
        if not address:
            head.kill()
            pytest.fail(f"the Ray head did not start in 90 s: {Path(tmp, 'head.log').read_text()[-2000:]}")
        for k, v in ray_env.items():
            mp.setenv(k, v)
        mp.delenv("RAY_ADDRESS", raising=False)
        if "ray" in sys.modules:                                   # imported before the variable was set
            mp.setattr(sys.modules["ray"]._private.ray_constants, "ENABLE_RAY_CLUSTER", False, raising=False)
        yield {"address": address, "env": env, "tmp": tmp}
    finally:
        mp.undo()
        head.stdin.close()                                         # the head shuts Ray down and exits
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:                                                       # anything of its session left: stop it
            os.killpg(head.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        head.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """coco_tiny with proposals; the 3rd image is not an image."""
    root = tmp_path_factory.mktemp("raydata")
    images = root / "images"
    images.mkdir()
    names = [im["file_name"] for im in json.loads(ANN.read_text())["images"]]
    for n in names:
        os.symlink(IMAGES / n, images / n)
    (images / names[2]).unlink()
    (images / names[2]).write_bytes(b"this is not a JPEG file\n" * 10)
    return {"props": write_proposals_jsonl(ANN, root / "props.jsonl"), "images": images, "names": names}


def evaluator(data):
    return CocoEvaluator(data["images"], ANN, data["props"], scorer="pycocotools")


def go(data, out, model, **kw):
    kw.setdefault("limit", 12)
    return run(evaluator(data), model, out, progress=False, summary=False, **kw)


def lines(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One single-process run over 12 items: what every Ray run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "run"
    go(data, out, functools.partial(OracleStandIn, str(ANN)))
    return out


def same_files(out, ref, names=("predictions.jsonl", "coco_results.json")):
    for name in names:
        assert (Path(out) / name).read_bytes() == (Path(ref) / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------- runs

def test_ray_run_is_byte_identical_to_one_process(cluster, data, reference, tmp_path):
    out = tmp_path / "run"
    rep = go(data, out, functools.partial(OracleStandIn, str(ANN)), ray=cluster["address"], workers=2, threads=1,
             chunk_size=2)
    same_files(out, reference)
    assert rep["run"]["workers"] == 2 and rep["run"]["threads_per_worker"] == 1 and rep["run"]["errors"] == 1
    recs = lines(out / "records.jsonl")
    assert len(recs) == 12 and len({r["key"] for r in recs}) == 12
    again = go(data, out, functools.partial(OracleStandIn, str(ANN)), ray=cluster["address"], retry_errors=False)
    assert again["run"]["ran_now"] == 0                            # complete: resumes without starting any actor


def test_slots_threads_and_actor_environment(cluster, data):
    from vlmfo1.eval.ray_backend import RayBackend
    from vlmfo1.eval.runner import ModelSpec

    spec = ModelSpec.of(functools.partial(OracleStandIn, str(ANN)))
    cases = [(None, None, 100, 1, 2),            # threads default: the smallest node's CPUs -> one actor per node
             (1, None, 100, 2, 1),               # one actor per slot of 1 CPU
             (1, None, 1, 1, 1),                 # never more actors than items
             (None, 2, 100, 2, 1)]               # workers=2: the CPUs split among them
    for threads, workers, items, n, t in cases:
        b = RayBackend(evaluator(data), spec, threads, workers, cluster["address"], max_workers=items)
        try:
            assert (b.n, b.threads, b.slots) == (n, t, 2 // t), (threads, workers)
            env = b.actor_options["runtime_env"]["env_vars"]
            assert {env[k] for k in ("VLMFO1_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")} == {str(t)}
            assert b.actor_options["num_cpus"] == t
            roots = env["PYTHONPATH"].split(os.pathsep)
            assert str(ROOT) in roots and str(ROOT / "tests") in roots          # vlmfo1 and eval_doubles from here
        finally:
            b.close()
    with pytest.warns(RuntimeWarning, match=r"3 Ray actors of 1 threads, but the cluster has room for 2: the others "
                                            r"wait"):
        RayBackend(evaluator(data), spec, 1, 3, cluster["address"]).close()
    with pytest.raises(ValueError, match="4 threads per actor, but the largest node of the Ray cluster has 2 CPUs"):
        RayBackend(evaluator(data), spec, 4, None, cluster["address"])


def test_an_actor_that_dies_has_its_chunk_retried(cluster, data, reference, tmp_path):
    """Item 5 SIGKILLs its actor's process the first time, item 7 every time (-> an error record after 2 attempts,
    as with worker processes)."""
    out = tmp_path / "run"
    marker = tmp_path / "markers"
    marker.mkdir()
    names = data["names"]
    model = functools.partial(OracleStandIn, str(ANN), die_once=[names[4]], die_always=[names[6]],
                              marker_dir=str(marker))
    rep = go(data, out, model, ray=cluster["address"], workers=2, threads=1, chunk_size=3)
    assert os.listdir(marker) == [names[4] + ".died"]                                     # it did die
    preds, ref = lines(out / "predictions.jsonl"), lines(reference / "predictions.jsonl")
    assert preds[6]["error"].startswith("WorkerDied: the worker process died (Ray actor died") and \
        preds[6]["error"].endswith("while running this item, 2 times"), preds[6]
    assert [p for i, p in enumerate(preds) if i != 6] == [p for i, p in enumerate(ref) if i != 6]
    assert rep["run"]["errors"] == 2
    recs = lines(out / "records.jsonl")
    assert len(recs) == 12 and len({r["key"] for r in recs}) == 12


def test_ray_kill_of_an_actor_then_ctrl_c_of_the_driver_then_resume(cluster, data, reference, tmp_path):
    """ray.kill of one busy actor (found by its name) after 3 records, Ctrl-C of the driver after 6: a resumable
    run; the rerun gives output identical to one process, nothing lost or doubled."""
    import ray

    out = tmp_path / "run"
    rec = out / "records.jsonl"
    killed = []

    def n_records():
        return rec.read_bytes().count(b"\n") if rec.exists() else 0

    def meddle():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not killed and n_records() >= 3:
                names = sorted(n for n in ray.util.list_named_actors() if n.startswith("vlmfo1-eval-"))
                if names:
                    ray.kill(ray.get_actor(names[0]), no_restart=True)
                    killed.append(names[0])
            if killed and n_records() >= 6:
                _thread.interrupt_main()
                return
            time.sleep(0.02)

    t = threading.Thread(target=meddle, daemon=True)
    t.start()
    with pytest.raises(RunInterrupted, match=r"interrupted with \d+ of 12 items recorded; rerun"):
        go(data, out, functools.partial(SlowStandIn, str(ANN), delay=0.3), ray=cluster["address"], workers=2,
           threads=1, chunk_size=3)
    t.join(5)
    assert killed, "no actor was killed"
    n = len(lines(rec))
    assert 6 <= n < 12 and not (out / "predictions.jsonl").exists()
    rep = go(data, out, functools.partial(SlowStandIn, str(ANN), delay=0.0), ray=cluster["address"], workers=2,
             threads=1)
    assert rep["run"]["ran_now"] == 12 - n + sum("error" in r for r in lines(rec)[:n])
    same_files(out, reference)
    assert rep["run"]["errors"] == 1
    recs = lines(rec)
    assert len(recs) == n + rep["run"]["ran_now"] and len({r["key"] for r in recs if "record" in r}) == 11


def test_an_item_that_takes_too_long_kills_its_actor(cluster, data):
    """RayBackend(item_timeout=T) at the Backend level: an item slower than T -> its actor is killed and a
    ("timeout", w, reason) event says so (the scheduler retries it like a death); the chunk's other items are the
    scheduler's again (no result for them)."""
    from vlmfo1.eval.ray_backend import RayBackend
    from vlmfo1.eval.runner import ModelSpec

    items = evaluator(data).items()[:2]
    b = RayBackend(evaluator(data), ModelSpec.of(functools.partial(SlowStandIn, str(ANN), delay=60)), 1, 1,
                   cluster["address"], item_timeout=1.0)
    try:
        b.start()
        deadline = time.monotonic() + 60
        while not b.idle() and time.monotonic() < deadline:
            assert b.poll(0.2) == []
        assert b.idle() == [0]
        t0 = time.monotonic()
        b.submit(0, items)
        events = []
        while not events and time.monotonic() < deadline:
            events = b.poll(0.5)
        assert events == [("timeout", 0, "no answer within 1 s; the Ray actor was killed")]
        assert 1.0 < time.monotonic() - t0 < 10 and b.state[0] == "dead" and b.actors[0] is None
    finally:
        b.close()


@pytest.mark.skipif("item_timeout" not in inspect.signature(run).parameters
                    or "hang_always" not in inspect.signature(OracleStandIn).parameters,
                    reason="this runner has no item_timeout (it comes with the process backend's, branch wt-evali)")
def test_item_timeout_through_run(cluster, data, reference, tmp_path):
    """run(ray=..., item_timeout=T) (once the runner has item_timeout): an item that always hangs is killed after T
    and tried twice -> a WorkerTimeout error record; every other item as in one process."""
    names = data["names"]
    model = functools.partial(OracleStandIn, str(ANN), hang_always=[names[5]])
    rep = go(data, tmp_path / "run", model, limit=8, ray=cluster["address"], workers=2, threads=1, chunk_size=2,
             item_timeout=2)
    preds, ref = lines(tmp_path / "run" / "predictions.jsonl"), lines(reference / "predictions.jsonl")[:8]
    assert preds[5]["error"] == ("WorkerTimeout: this item timed out (no answer within 2 s; the Ray actor was "
                                 "killed), 2 times")
    assert preds[:5] + preds[6:] == ref[:5] + ref[6:] and rep["run"]["errors"] == 2


# ---------------------------------------------------------------------------------------------- the CLI, real model

@pytest.fixture(scope="module")
def small3(tmp_path_factory):
    """The first 3 images of coco_tiny at 0.4x (annotations and proposals alike; the 3rd is not an image), to keep
    the tiny checkpoint's runs short."""
    from PIL import Image

    root = tmp_path_factory.mktemp("small3")
    ds = json.loads(ANN.read_text())
    ds["images"] = ds["images"][:3]
    keep = {im["id"] for im in ds["images"]}
    ds["annotations"] = [a for a in ds["annotations"] if a["image_id"] in keep]
    images = root / "images"
    images.mkdir()
    f = 0.4
    for im in ds["images"][:2]:
        with Image.open(IMAGES / im["file_name"]) as pic:
            pic.convert("RGB").resize((round(im["width"] * f), round(im["height"] * f)), Image.BICUBIC).save(
                images / im["file_name"], quality=90)
    (images / ds["images"][2]["file_name"]).write_bytes(b"this is not a JPEG file\n" * 10)
    for im in ds["images"]:
        im["width"], im["height"] = round(im["width"] * f), round(im["height"] * f)
    for a in ds["annotations"]:
        a["bbox"] = [v * f for v in a["bbox"]]
        a["area"] = a["area"] * f * f
        a.pop("segmentation", None)
    ann = root / "instances_small.json"
    ann.write_text(json.dumps(ds))
    return {"ann": ann, "images": images, "props": write_proposals_jsonl(ann, root / "props.jsonl")}


def _cluster_cpus_free(address, want, seconds):
    """Wait until `want` CPUs of the cluster are free (the actors of a killed driver are gone)."""
    import ray

    ray.init(address=address, logging_level="WARNING")
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ray.available_resources().get("CPU", 0) >= want:
                return True
            time.sleep(0.2)
        return False
    finally:
        ray.shutdown()


def test_cli_ray_killed_driver_resumes_with_the_tiny_checkpoint(cluster, small3, fo1_tiny_ckpt, tmp_path):
    """`vlmfo1 eval coco --ray ADDRESS` with the tiny random FO1 checkpoint: SIGKILL of the CLI after its first
    record (1 actor of 2 threads, items in order), its actors go away, the rerun (2 actors of 1 thread) completes;
    predictions identical to an in-process run."""
    d = small3
    a = tmp_path / "a"
    run(CocoEvaluator(d["images"], d["ann"], d["props"], max_new_tokens=6, max_proposals=8, scorer="pycocotools"),
        fo1_tiny_ckpt, a, threads=2, progress=False, summary=False)
    b = tmp_path / "b"
    base = [sys.executable, "-m", "vlmfo1.cli", "eval", "coco", "--model", fo1_tiny_ckpt, "--images",
            str(d["images"]), "--annotations", str(d["ann"]), "--proposals", str(d["props"]), "--out", str(b),
            "--max-new-tokens", "6", "--max-proposals", "8", "--scorer", "pycocotools", "--no-progress",
            "--ray", cluster["address"]]
    env = dict(cluster["env"], PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                                         if p]))
    p = subprocess.Popen(base + ["--workers", "1", "--threads", "2"], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    rec = b / "records.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and p.poll() is None:
        if rec.exists() and rec.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.01)
    assert p.poll() is None, p.communicate()                       # still running: the kill is mid-run
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    n_killed = rec.read_bytes().count(b"\n")
    assert 1 <= n_killed < 3 and not (b / "predictions.jsonl").exists()
    assert _cluster_cpus_free(cluster["address"], 2, 30), "the killed driver's actors still hold CPUs"
    r = subprocess.run(base + ["--workers", "2", "--threads", "1"], cwd=str(ROOT), env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Average Precision" in r.stdout and "3 items (" in r.stdout
    for name in ("predictions.jsonl", "coco_results.json"):
        assert (b / name).read_bytes() == (a / name).read_bytes()
    rep = json.loads((b / "report.json").read_text())
    assert rep["run"]["workers"] == 2 and rep["run"]["threads_per_worker"] == 1


# ---------------------------------------------------------------------------------------------- errors

def test_a_model_that_cannot_load_stops_the_run(cluster, data, tmp_path):
    with pytest.raises(RuntimeError, match=r"a worker could not load the model: FileNotFoundError: .*no-such\.json"):
        go(data, tmp_path / "run", functools.partial(OracleStandIn, str(tmp_path / "no-such.json")),
           ray=cluster["address"], workers=1, threads=1, limit=2)


def test_argument_errors(data, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Ray actors load the model themselves: pass the checkpoint folder path"):
        go(data, tmp_path / "r", OracleStandIn(str(ANN)), ray="auto")
    with pytest.raises(ValueError, match="ray must be a Ray cluster address or 'auto'"):
        go(data, tmp_path / "r", functools.partial(OracleStandIn, str(ANN)), ray="")
    monkeypatch.setitem(sys.modules, "ray", None)                  # as if ray were not installed
    with pytest.raises(ImportError, match=r"the Ray backend needs the ray package: pip install 'vlmfo1\[ray\]'"):
        go(data, tmp_path / "r", functools.partial(OracleStandIn, str(ANN)), ray="auto")
    assert not (tmp_path / "r").exists()                           # nothing written for a refused run
