"""Random UPN checkpoints (vlmfo1.testing.upn): the layout equals the official model's state dict, the bytes are
deterministic, the config travels in the metadata, the shared box MLP's aliases hold identical values and the Swin
relative_position_index buffers hold their true values.

The manifests tests/golden/upn_{tiny,full}_keys.json (name -> [shape, dtype], in state-dict order) were generated
from the official UPN modules (detect_tools/upn of VLM-FO1 e6bef8d) by tests/golden/make_upn_golden.py (see
tests/golden/README.md, "UPN"). NumPy only.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from vlmfo1.safetensors import SafetensorsFile, bf16_bits_to_f32, f32_to_bf16_bits
from vlmfo1.testing import upn_config, upn_shapes, write_random_upn
from vlmfo1.testing.upn import canonical_name, count_params, random_tensor, relative_position_index

GOLDEN = Path(__file__).resolve().parent / "golden"
ST_DTYPE = {"float32": "F32", "int64": "I64"}


def manifest(size):
    return json.loads((GOLDEN / f"upn_{size}_keys.json").read_text())


def layout(path):
    with SafetensorsFile(path) as f:
        infos = sorted(f.tensors.values(), key=lambda i: i.begin)
        return [(i.name, list(i.shape), i.dtype) for i in infos], dict(f.metadata)


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_layout_matches_official_manifest(size):
    man = manifest(size)
    cfg = upn_config(size)
    ours = {k: [list(s), dt] for k, (s, dt) in upn_shapes(cfg).items()}
    want = man["tensors"]
    assert sorted(set(want) - set(ours)) == [], "missing tensors"
    assert sorted(set(ours) - set(want)) == [], "extra tensors"
    assert {k: v for k, v in ours.items() if want[k] != v} == {}, "shape / dtype mismatch"
    assert list(ours) == list(want), "state-dict order"
    assert man["config"] == cfg
    assert count_params(cfg) == man["n_float_values"]


def test_full_is_upn_large():
    cfg = upn_config("full")
    assert cfg["swin"]["embed_dim"] == 192 and cfg["swin"]["depths"] == [2, 2, 18, 2]
    assert cfg["swin"]["num_heads"] == [6, 12, 24, 48] and cfg["swin"]["window_size"] == 12
    assert (cfg["enc_layers"], cfg["dec_layers"], cfg["d_ffn"], cfg["num_queries"]) == (6, 6, 2048, 900)
    shapes = upn_shapes(cfg)
    assert len(shapes) == 701
    assert shapes["input_proj.4.0.weight"] == ((256, 1536, 3, 3), "float32")
    assert shapes["backbone.model.backbone.layers.2.blocks.17.attn.relative_position_index"] == ((144, 144), "int64")
    # one shared box MLP, listed under 12 names (6 decoder layers x 2 owners)
    assert sum(k.endswith("layers.2.weight") and "bbox_embed." in k and "enc_out" not in k for k in shapes) == 12


def test_tiny_written_layout_and_metadata(tmp_path):
    p = write_random_upn(str(tmp_path / "upn.safetensors"), size="tiny", seed=0)
    got, meta = layout(p)
    want = [(k, s, ST_DTYPE[dt]) for k, (s, dt) in manifest("tiny")["tensors"].items()]
    assert got == want
    assert json.loads(meta["upn_config"]) == upn_config("tiny")
    assert meta["format"] == "pt"


def test_deterministic(tmp_path):
    digests = []
    for i, seed in enumerate((0, 0, 1)):
        p = write_random_upn(str(tmp_path / f"u{i}.safetensors"), size="tiny", seed=seed)
        digests.append(hashlib.sha256(Path(p).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]
    # a tensor depends only on (seed, name): regenerated without writing the file
    with SafetensorsFile(tmp_path / "u0.safetensors") as f:
        name = "transformer.decoder.layers.1.cross_attn.sampling_offsets.weight"
        assert np.array_equal(f.get(name), random_tensor(name, f.tensors[name].shape, 0))


def test_values(tmp_path):
    p = write_random_upn(str(tmp_path / "upn.safetensors"), size="tiny", seed=0)
    cfg = upn_config("tiny")
    w = cfg["swin"]["window_size"]
    with SafetensorsFile(p) as f:
        # the Swin buffer: true values (WindowAttention.__init__)
        rpi = relative_position_index(w)
        assert rpi.shape == (w * w, w * w) and rpi.min() == 0 and rpi.max() == (2 * w - 1) ** 2 - 1
        assert np.all(np.diag(rpi) == (w - 1) * (2 * w - 1) + (w - 1))
        assert rpi[0, 1] == (w - 1) * (2 * w - 1) + (w - 2)          # (dy, dx) = (0, -1)
        assert rpi[0, w] == (w - 2) * (2 * w - 1) + (w - 1)          # (dy, dx) = (-1, 0)
        idx = [k for k in f.tensors if k.endswith("relative_position_index")]
        assert len(idx) == sum(cfg["swin"]["depths"])
        for k in idx:
            assert np.array_equal(f.get(k), rpi)
        # aliases of the shared box MLP: identical values
        groups = {}
        for k in f.tensors:
            groups.setdefault(canonical_name(k), []).append(k)
        shared = [g for g in groups.values() if len(g) > 1]
        assert len(shared) == 6 and all(len(g) == 2 * cfg["dec_layers"] for g in shared)
        for g in shared:
            for k in g[1:]:
                assert np.array_equal(f.get(k), f.get(g[0]))
        assert not np.array_equal(f.get("bbox_embed.0.layers.0.weight"),
                                  f.get("transformer.enc_out_bbox_embed.layers.0.weight"))
        # zero enc_output bias (no exact tie among invalid proposals reaches the top-k); norms near 1
        assert not f.get("transformer.enc_output.bias").any()
        lnw = f.get("transformer.decoder.norm.weight")
        assert abs(float(lnw.mean()) - 1) < 0.05 and 0.05 < float(lnw.std()) < 0.2
        assert f.get("transformer.tgt_embed.weight").shape == (cfg["num_queries"], 256)


def test_bfloat16(tmp_path):
    p32 = write_random_upn(str(tmp_path / "f32.safetensors"), size="tiny", dtype="float32")
    p16 = write_random_upn(str(tmp_path / "b16.safetensors"), size="tiny", dtype="bfloat16")
    l32, _ = layout(p32)
    l16, meta = layout(p16)
    assert [(n, s) for n, s, _ in l16] == [(n, s) for n, s, _ in l32]
    assert {dt for n, _, dt in l16 if n.endswith("relative_position_index")} == {"I64"}
    assert {dt for n, _, dt in l16 if not n.endswith("relative_position_index")} == {"BF16"}
    with SafetensorsFile(p32) as a, SafetensorsFile(p16) as b:
        for name in ("transformer.fine_grained_prompt.weight", "input_proj.4.0.weight",
                     "backbone.model.backbone.layers.0.blocks.1.attn.relative_position_bias_table"):
            assert np.array_equal(b.get(name), f32_to_bf16_bits(a.get(name)))
            assert np.allclose(bf16_bits_to_f32(b.get(name)), a.get(name), rtol=1 / 128, atol=0)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        upn_config("large")
    with pytest.raises(ValueError):
        write_random_upn(str(tmp_path / "x.safetensors"), dtype="float16")
    with pytest.raises(ValueError):
        write_random_upn(str(tmp_path / "x.pth"), fmt="pth")
