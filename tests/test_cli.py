"""The command line works end to end on a random checkpoint written by the package itself."""
import os
from pathlib import Path

import pytest

from vlmfo1.cli import main

TIKTOKEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizer" / "qwen.tiktoken"


@pytest.mark.skipif(not TIKTOKEN.exists(), reason="shared tokenizer data not found")
def test_random_checkpoint_and_generate(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["random-checkpoint", str(ck), "--tiktoken", str(TIKTOKEN)]) == 0
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(ck))
    capsys.readouterr()
    assert main(["generate", "--model", str(ck), "--chat", "Hello there", "--max-new-tokens", "5",
                 "--temperature", "0.7", "--seed", "1", "-v"]) == 0
    out = capsys.readouterr()
    assert "5 new tokens" in out.err


@pytest.mark.skipif(not TIKTOKEN.exists(), reason="shared tokenizer data not found")
def test_random_fo1_checkpoint_and_detect_json(tmp_path, capsys):
    import json

    ck = tmp_path / "VLM-FO1_Qwen2.5-VL-3B-tiny"
    assert main(["random-checkpoint", "--fo1", str(ck), "--tiktoken", str(TIKTOKEN)]) == 0
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "preprocessor_config.json"} <= \
        set(os.listdir(ck))
    demo = TIKTOKEN.parent.parent / "demo"
    capsys.readouterr()
    assert main(["detect", "--model", str(ck), "--image", str(demo / "demo_image.jpg"), "--boxes",
                 str(demo / "demo_boxes.json"), "orange", "--max-new-tokens", "4", "--threads", "2", "--json",
                 "--draw", str(tmp_path / "out.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "out.png").size == Image.open(demo / "demo_image.jpg").size
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"text", "detections", "token_ids", "invalid_indices"} and len(res["token_ids"]) >= 1
    boxes = json.load(open(demo / "demo_boxes.json"))
    boxes = boxes["boxes"] if isinstance(boxes, dict) else boxes
    for d in res["detections"]:     # every detection is one of the input boxes
        assert d["box"] == [float(v) for v in boxes[d["index"]]]


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "boxes.json"
    bad.write_text('{"box": []}')
    assert main(["detect", "--model", str(tmp_path / "nowhere"), "--image", "x.jpg", "--boxes", str(bad), "dog"]) == 1
    err = capsys.readouterr().err
    assert "vlmfo1 detect: error:" in err and "config.json" in err and "Traceback" not in err
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "hi"]) == 1
    assert "error:" in capsys.readouterr().err
    from vlmfo1.cli import _read_boxes
    with pytest.raises(ValueError, match="boxes"):
        _read_boxes(bad)
    bad.write_text("[[0, 0, 1")
    with pytest.raises(ValueError, match="not valid JSON"):
        _read_boxes(bad)
