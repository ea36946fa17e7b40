"""The fused vision side (csrc/fo1.c, _core.FO1Model): one C call runs ViT -> mm_projector, DaViT -> HFRE ->
mm_projector_aux and writes the image and region rows into the caller's buffer. It must give the same bits as the
per-network path (`prepare(..., trace=...)`, which tests/test_fo1_golden.py ties to the official model) for every
thread count, touch only the rows it is given, keep one state per idle session, and refuse bad arguments."""
import numpy as np
import pytest

from test_fo1_model import COCO, TIKTOKEN, coco_case   # the same COCO requests as the end-to-end tests

pytestmark = pytest.mark.skipif(not TIKTOKEN.exists() or not COCO.exists(), reason="shared data not found")


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def fo1(fo1_tiny_ckpt, request):
    from vlmfo1 import VLMFO1
    return VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=2, dtype=request.param)


def _threads(fo1, nt):
    fo1.decoder.n_threads = fo1.vision.n_threads = fo1.davit.n_threads = fo1.hfre.n_threads = nt


@pytest.mark.parametrize("case", [0, 1, "no boxes"])
def test_fused_equals_per_network(fo1, case):
    path, boxes = coco_case(0 if case == "no boxes" else case)
    if case == "no boxes":
        boxes = []
    text = "Please detect person in this image."
    try:
        ref = fo1.prepare(path, boxes, text, trace={})       # per-network path
        for nt in (1, 2, 3):
            _threads(fo1, nt)
            got = fo1.prepare(path, boxes, text)            # fused path
            assert got[0] == ref[0]
            assert np.array_equal(got[1], ref[1]), f"n_threads {nt}: max |diff| {np.abs(got[1] - ref[1]).max():.3g}"
            assert np.array_equal(got[2], ref[2]) and got[3] == ref[3]
    finally:
        _threads(fo1, 2)


def test_encode_writes_only_its_rows(fo1):
    from vlmfo1.fo1 import FO1
    path, boxes = coco_case(1)
    px, grid, aux, ba, bq, b = fo1.preprocess(path, boxes)
    _, gh, gw = grid
    u, n, H = gh * gw // 4, len(b), fo1.decoder.config.hidden_size
    img_tok, _, regions, _ = fo1.encode_features(path, boxes)
    buf = np.full((u + 2 * n + 7, H), 7.0, np.float32)
    rows = np.arange(n)[::-1] * 2 + u + 5                   # scattered, in reverse order
    with fo1._session(1) as s:
        sec = fo1._fused.encode(s.workspace, px, gh, gw, aux, ba, bq, buf, 3, rows, n_threads=2)
    assert len(sec) == 3 and all(t >= 0 for t in sec)
    assert np.array_equal(buf[3:3 + u], img_tok) and np.array_equal(buf[rows], regions)
    rest = np.ones(len(buf), bool)
    rest[3:3 + u] = False
    rest[rows] = False
    assert (buf[rest] == 7.0).all()
    assert FO1 is type(fo1)


def test_state_is_reserved_once_and_reused(fo1):
    fo1._sessions.clear()
    small, big = coco_case(0), coco_case(1)
    fo1.prepare(*small, "x")
    ws = fo1._sessions[0].workspace
    assert ws.n_allocs == 1 and ws.nbytes > 0          # reserved for the largest request at creation
    for p, bx in (big, small, (small[0], []), big):
        fo1.prepare(p, bx, "x")
        assert fo1._sessions[0].workspace is ws
    assert ws.n_allocs == 1 and ws.n_pools == 1


def test_encode_refuses_bad_arguments(fo1):
    from vlmfo1._native import core
    path, boxes = coco_case(0)
    px, grid, aux, ba, bq, b = fo1.preprocess(path, boxes)
    _, gh, gw = grid
    u, n, H = gh * gw // 4, len(b), fo1.decoder.config.hidden_size
    ws = core.Workspace(1)
    ok = dict(out=np.zeros((u + n, H), np.float32), image_row=0, region_rows=np.arange(u, u + n))

    def call(**kw):
        a = dict(ok, **kw)
        return fo1._fused.encode(kw.get("state", ws), px, gh, gw, aux, ba, bq, a["out"], a["image_row"],
                                 a["region_rows"])

    call()
    with pytest.raises(ValueError, match="writable"):
        ro = np.zeros((u + n, H), np.float32)
        ro.flags.writeable = False
        call(out=ro)
    with pytest.raises(ValueError, match="writable"):
        call(out=np.zeros((u + n, H), np.float64))
    with pytest.raises(ValueError, match="image rows"):
        call(image_row=n + 1)
    with pytest.raises(ValueError, match="region row"):
        call(region_rows=np.arange(u, u + n) + 1)
    with pytest.raises(ValueError, match="mm_projector"):   # a buffer of the wrong width
        call(out=np.zeros((u + n, H + 1), np.float32))
    with pytest.raises(TypeError, match="Workspace"):
        call(state=None)
    with pytest.raises(ValueError, match="boxes must have shape"):
        fo1._fused.encode(ws, px, gh, gw, aux, ba[:-1], bq, ok["out"], 0, ok["region_rows"])
    with pytest.raises(TypeError, match="work must be a dict"):
        fo1._fused.encode(ws, px, gh, gw, aux, ba, bq, ok["out"], 0, ok["region_rows"], work=[])
    work = {}
    fo1._fused.encode(ws, px, gh, gw, aux, ba, bq, ok["out"], 0, ok["region_rows"], work=work)
    assert set(work) == {"vit", "davit", "hfre"} and all(v["gemm"] > 0 for v in work.values())
