"""Weight binding (csrc/tensors.c + vlm_<net>_bind in each network's C file): the C objects of every network are
built from the tensors dict through one name -> tensor table, and a missing, mistyped or misshaped tensor is
refused with an error that names it (KeyError / TypeError / ValueError, as before the move)."""
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TIKTOKEN = SHARED / "tokenizer" / "qwen.tiktoken"

pytestmark = pytest.mark.skipif(not TIKTOKEN.exists(), reason="shared tokenizer not found")


@pytest.fixture(scope="module")
def fo1(fo1_tiny_ckpt):
    from vlmfo1 import VLMFO1
    return VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=1, dtype="float32")


def _builders(fo1):
    """name -> (tensors dict, function building the network's C object from a tensors dict)."""
    from vlmfo1.davit import DavitEncoder
    from vlmfo1.decoder import LanguageModel
    from vlmfo1.hfre import HFRE
    from vlmfo1.vision import VisionTower
    v, d, h, lm = fo1.vision, fo1.davit, fo1.hfre, fo1.decoder
    mlp_hidden = [d._tensors[f"blocks.{s}.0.spatial.fc1"].shape[0] for s in range(4)]
    return {
        "vision": (v._tensors, lambda t: VisionTower(v.config, t, v.mode, v.compute, 1)),
        "davit": (d._tensors, lambda t: DavitEncoder(d.config, t, d.mode, d.compute, 1, mlp_hidden)),
        "hfre": (h._tensors, lambda t: HFRE(h.config, h._cfg, t, h.compute, 1, h.proj_dims)),
        "decoder": (lm._tensors, lambda t: LanguageModel(lm.config, t, lm.mode, lm.compute, 1, lm.max_context)),
    }


# (network, tensor name): a weight matrix and a vector of each network
CASES = [("vision", "blocks.1.qkv"), ("vision", "blocks.2.ln2"), ("davit", "blocks.2.0.channel.fc1"),
         ("davit", "norm1_bias"), ("hfre", "proj_aux.1"), ("hfre", "proj_aux.0_bias"), ("hfre", "fpn2.ln3_w"), ("hfre", "fpn0.ct2"),
         ("decoder", "layers.1.down"), ("decoder", "layers.0.k_bias")]


@pytest.mark.parametrize("net,name", CASES)
def test_bad_tensor_is_named(fo1, net, name):
    tensors, build = _builders(fo1)[net]
    build(dict(tensors))   # the intact dict binds
    a = tensors[name]
    missing = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        build(missing)
    with pytest.raises(TypeError, match=name.replace(".", r"\.")):
        build({**tensors, name: a.astype(np.float64)})
    with pytest.raises(TypeError, match=name.replace(".", r"\.")):
        build({**tensors, name: a.tolist()})
    short = a[:-1] if a.ndim == 1 else a[:, :-1]
    # a vector is checked at lookup; a matrix's shape by the network's validation, in its own words
    # ("vision block 1: attn.qkv has shape [...]"), as before
    with pytest.raises(ValueError, match=name.replace(".", r"\.") if a.ndim == 1 else "has shape"):
        build({**tensors, name: np.ascontiguousarray(short)})
    if a.ndim == 2:
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            build({**tensors, name: a[None]})
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            build({**tensors, name: np.asfortranarray(a)})


def test_rebound_networks_compute_the_same(fo1):
    """A network bound a second time from the same dict gives the same bits (pointers into the same arrays)."""
    b = _builders(fo1)
    vt = b["vision"][1](dict(b["vision"][0]))
    img = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    px, grid, *_ = fo1.preprocess(img, [])
    assert np.array_equal(vt(px, grid), fo1.vision(px, grid))


def test_bad_packed_int8_weight_is_named(fo1_tiny_ckpt):
    """A packed int8 weight (vlmfo1.quant packs them on VNNI CPUs) whose panels do not hold its rows, or whose array
    is not [panels][k / 4][32][4], is refused with a ValueError naming it."""
    from vlmfo1 import VLMFO1
    from vlmfo1.decoder import LanguageModel
    from vlmfo1._native import core
    lm = VLMFO1.from_pretrained(fo1_tiny_ckpt, threads=1, dtype="int8", cache_dir=False).decoder
    t = dict(lm._tensors)
    name = "layers.1.down"
    build = lambda d: LanguageModel(lm.config, d, lm.mode, lm.compute, 1, lm.max_context)   # noqa: E731
    p = t[name] if t[name].ndim == 4 else core.pack_i8(np.ascontiguousarray(t[name]))
    build({**t, name: p})   # binds, packed or not
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*panels do not hold"):
        build({**t, name: np.concatenate([p, p[:1]])})
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + r".*\[panels\]\[k / 4\]\[32\]\[4\]"):
        build({**t, name: np.ascontiguousarray(p[:, :, :16])})
