"""The encoders' reusable Workspace (csrc/workspace.c, _core.Workspace): one thread pool and one growing scratch
block that the ViT, DaViT, HFRE and projector calls reuse when given workspace=, and that VLMFO1 keeps with each
idle KV cache. Checked here: results are bit-identical with and without a workspace (also after a larger call
left stale data in it), the scratch is not reallocated for a smaller image, the same workspace serves request
after request, one workspace used by two threads at once raises, and RSS stays flat over 10 requests."""
import gc
import os
import threading
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TIKTOKEN = SHARED / "tokenizer" / "qwen.tiktoken"

pytestmark = pytest.mark.skipif(not TIKTOKEN.exists(), reason="shared tokenizer not found")

BOXES = [[10, 10, 60, 80], [30, 5, 140, 110], [0, 60, 150, 120]]


@pytest.fixture(scope="module")
def fo1(fo1_tiny_ckpt):
    from vlmfo1 import VLMFO1
    return VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2)


def _image(h, w, seed=11):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _encoder_outputs(fo1, img, ws):
    """Every encoder call of one request, straight through the wrappers, with workspace ws (or None)."""
    px, grid, aux_px, ba, bq, _ = fo1.preprocess(img, BOXES)
    _, gh, gw = (int(v) for v in grid)
    tokens, vt = fo1.vision(px, grid, features=True, workspace=ws)
    image_tokens = fo1.hfre.project_image(tokens, workspace=ws)
    aux = fo1.davit(aux_px, workspace=ws)
    feats = fo1.hfre.region_features([m.transpose(1, 2, 0) for m in vt], [m.transpose(1, 2, 0) for m in aux], ba, bq,
                                     qwen_hw=(14 * gh, 14 * gw), workspace=ws)
    regions = fo1.hfre.project_regions(feats, workspace=ws)
    return dict(tokens=tokens, image_tokens=image_tokens, feats=feats, regions=regions,
                **{f"vt{i}": m for i, m in enumerate(vt)}, **{f"aux{i}": m for i, m in enumerate(aux)})


def test_bit_identical_with_and_without_workspace(fo1):
    from vlmfo1._native import core
    ws = core.Workspace(fo1.vision.n_threads)
    _encoder_outputs(fo1, _image(300, 260, seed=1), ws)      # a larger image first: stale data in the scratch
    n = ws.n_allocs
    img = _image(120, 150)
    a = _encoder_outputs(fo1, img, None)
    b = _encoder_outputs(fo1, img, ws)
    for k in a:
        assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
    assert ws.n_allocs == n, "a smaller image reallocated the scratch"
    assert ws.n_pools == 1 and ws.n_threads == fo1.vision.n_threads


def test_scratch_grows_only(fo1):
    from vlmfo1._native import core
    ws = core.Workspace(2)
    assert ws.nbytes == 0 and ws.n_allocs == 0 and ws.n_pools == 1 and ws.n_threads == 2
    small, big = _image(100, 100, 2), _image(280, 300, 3)
    _encoder_outputs(fo1, small, ws)
    n_small, b_small = ws.n_allocs, ws.nbytes
    _encoder_outputs(fo1, big, ws)
    assert ws.nbytes > b_small and ws.n_allocs > n_small
    n_big, b_big = ws.n_allocs, ws.nbytes
    for img in (small, big, small):
        _encoder_outputs(fo1, img, ws)
    assert (ws.n_allocs, ws.nbytes) == (n_big, b_big)


def test_matmul_workspace_and_thread_count_change():
    from vlmfo1._native import core
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 96), dtype=np.float32)
    w = rng.standard_normal((200, 96), dtype=np.float32)
    ws = core.Workspace(1)
    ref = core.matmul(x, w, n_threads=3)
    assert np.array_equal(core.matmul(x, w, n_threads=3, workspace=ws), ref)
    assert ws.n_threads == 3 and ws.n_pools == 2   # the pool follows the call's n_threads
    with pytest.raises(TypeError, match="workspace must be"):
        core.matmul(x, w, workspace=object())
    with pytest.raises(ValueError, match="n_threads"):
        core.Workspace(0)


def test_one_workspace_two_threads_raises():
    """A long call holds the workspace; a second thread using it meanwhile gets a RuntimeError (and the
    long call is unaffected)."""
    from vlmfo1._native import core
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((1500, 1024), dtype=np.float32)
    wb = rng.standard_normal((1536, 1024), dtype=np.float32)
    xs, ws_ = xb[:4, :64].copy(), wb[:8, :64].copy()
    ws = core.Workspace(1)
    ref = core.matmul(xb, wb)
    res, errors, started = {}, [], threading.Event()

    def long_call():
        started.set()
        for _ in range(4):
            res["big"] = core.matmul(xb, wb, workspace=ws)

    t = threading.Thread(target=long_call)
    t.start()
    started.wait()
    while t.is_alive() and not errors:
        try:
            core.matmul(xs, ws_, workspace=ws)
        except RuntimeError as e:
            errors.append(str(e))
    t.join()
    assert errors and "in use by another thread" in errors[0]
    assert np.array_equal(res["big"], ref)
    core.matmul(xs, ws_, workspace=ws)   # free again once the other thread is done


def test_fo1_requests_reuse_one_workspace(fo1):
    img = _image(120, 150)
    fo1._sessions.clear()
    seen = []
    for _ in range(3):
        fo1.prepare(img, BOXES, "Please detect dog in this image.")
        assert len(fo1._sessions) == 1
        seen.append(fo1._sessions[0].workspace)
    assert seen[0] is not None and all(w is seen[0] for w in seen)
    n = seen[0].n_allocs
    fo1.prepare(_image(90, 100, 4), BOXES[:1], "Please detect dog in this image.")   # smaller: no new scratch
    fo1.detect(img, "dog", boxes=BOXES, max_new_tokens=2)
    assert fo1._sessions[0].workspace is seen[0] and seen[0].n_allocs == n


def _rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# Under .ci/sanitize (libasan preloaded) RSS measures ASan's allocator, whose quarantine keeps up to 256 MB of freed
# blocks (see test_soak.py): the RSS check runs on the plain build only.
SANITIZED = os.path.exists("/proc/self/maps") and "libasan" in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest.mark.skipif(SANITIZED, reason="RSS under ASan is its quarantine's, not ours")
def test_rss_flat_over_ten_requests(fo1):
    img = _image(120, 150)
    for _ in range(3):   # warm up: sessions, workspaces, tokenizer caches
        fo1.detect(img, "dog", boxes=BOXES, max_new_tokens=4)
    gc.collect()
    before = _rss()
    for _ in range(10):
        fo1.detect(img, "dog", boxes=BOXES, max_new_tokens=4)
    gc.collect()
    grown = _rss() - before
    assert grown < 4 * 2 ** 20, f"RSS grew by {grown / 2 ** 20:.1f} MiB over 10 requests"
