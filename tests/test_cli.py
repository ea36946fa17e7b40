"""The command line works end to end on random checkpoints written by the package itself; every error is one line
and exit status 1."""
import json
import os
from pathlib import Path

import pytest

from vlmfo1.cli import main

TIKTOKEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizer" / "qwen.tiktoken"
DEMO = TIKTOKEN.parent.parent / "demo"
needs_data = pytest.mark.skipif(not TIKTOKEN.exists(), reason="shared tokenizer data not found")


@pytest.fixture(scope="module")
def fo1_ckpt(tmp_path_factory):
    ck = tmp_path_factory.mktemp("cli") / "VLM-FO1_Qwen2.5-VL-3B-tiny"
    assert main(["random-checkpoint", "--fo1", str(ck), "--tiktoken", str(TIKTOKEN)]) == 0
    return str(ck)


@needs_data
def test_random_checkpoint_and_generate(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["random-checkpoint", str(ck), "--tiktoken", str(TIKTOKEN)]) == 0
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(ck))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".partial")]       # nothing half-written left
    capsys.readouterr()
    assert main(["generate", "--model", str(ck), "--chat", "Hello there", "--max-new-tokens", "5",
                 "--temperature", "0.7", "--seed", "1", "-v"]) == 0
    assert "5 new tokens" in capsys.readouterr().err
    assert main(["random-checkpoint", str(ck), "--tiktoken", str(TIKTOKEN)]) == 1       # never overwrites
    assert "exists" in capsys.readouterr().err


@needs_data
@pytest.mark.parametrize("cmd,args", [
    ("detect", ["orange", "apple"]), ("count", ["orange"]), ("refer", ["the big orange"]), ("ground", []),
    ("caption", ["--region", "2", "--detailed"]), ("ocr", ["--region", "0", "1"]), ("detect-like", ["--region", "3"]),
    ("reason", ["Which orange is ripest?"]), ("chat", ["What is <region1>?"])])
def test_every_task_subcommand(fo1_ckpt, tmp_path, capsys, cmd, args):
    from PIL import Image
    img = str(DEMO / "demo_image.jpg")
    boxes = json.load(open(DEMO / "demo_boxes.json"))["boxes"]
    capsys.readouterr()
    assert main([cmd, img, *args, "--model", fo1_ckpt, "--boxes", str(DEMO / "demo_boxes.json"), "--max-new-tokens",
                 "2", "--threads", "2", "--json", "--draw", str(tmp_path / "out.png")]) == 0
    res = json.loads(capsys.readouterr().out)
    task = {"caption": "describe_region_detailed", "ocr": "read_region", "detect-like": "detect_like"}.get(cmd, cmd)
    assert res["task"].startswith(task.split("_detailed")[0]) and len(res["token_ids"]) >= 1
    assert res["proposals"] == [[float(v) for v in b] for b in boxes]
    for d in res["detections"]:     # every detection is one of the input boxes
        assert d["box"] == [float(v) for v in boxes[d["index"]]]
    assert Image.open(tmp_path / "out.png").size == Image.open(img).size


@needs_data
def test_boxes_file_layouts_and_formats(fo1_ckpt, tmp_path, capsys):
    img = str(DEMO / "demo_image.jpg")
    boxes = json.load(open(DEMO / "demo_boxes.json"))["boxes"]
    xywh = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in boxes]
    files = {"plain.json": boxes, "fmt.json": {"boxes": xywh, "box_format": "xywh", "scores": [0.5] * 7},
             "coco.json": [{"bbox": b, "score": 0.9} for b in xywh]}
    outs = []
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
        capsys.readouterr()
        assert main(["detect", img, "orange", "--model", fo1_ckpt, "--boxes", str(tmp_path / name),
                     "--max-new-tokens", "3", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["token_ids"] == outs[1]["token_ids"] == outs[2]["token_ids"]
    assert outs[1]["proposal_scores"] == [0.5] * 7 and outs[2]["proposal_scores"] == [0.9] * 7
    (tmp_path / "raw.json").write_text(json.dumps(xywh))
    assert main(["detect", img, "orange", "--model", fo1_ckpt, "--boxes", str(tmp_path / "raw.json"),
                 "--box-format", "xywh", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == outs[0]["token_ids"]


@needs_data
def test_proposals_files(fo1_ckpt, tmp_path, capsys):
    import shutil
    coco = TIKTOKEN.parent.parent / "coco_tiny"
    ann = json.load(open(coco / "annotations" / "instances_val2017.json"))
    img = sorted(ann["images"], key=lambda x: x["id"])[4]
    path = str(coco / "val2017" / img["file_name"])
    gt = [a for a in ann["annotations"] if a["image_id"] == img["id"]]
    dets = [{"image_id": img["id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9 - 0.01 * i}
            for i, a in enumerate(gt)]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    (tmp_path / "boxes.json").write_text(json.dumps({"boxes": [d["bbox"] for d in dets], "box_format": "xywh",
                                                     "scores": [d["score"] for d in dets]}))
    outs = []
    for extra in (["--proposals", str(tmp_path / "dets.json"), "--image-id", str(img["id"])],
                  ["--proposals", str(tmp_path / "dets.json")],            # looked up by the COCO file name
                  ["--boxes", str(tmp_path / "boxes.json")]):
        capsys.readouterr()
        assert main(["detect", path, "person", "--model", fo1_ckpt, "--max-new-tokens", "3", "--json", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["token_ids"] == outs[1]["token_ids"] == outs[2]["token_ids"]
    assert outs[0]["proposal_scores"] == outs[2]["proposal_scores"]
    # the official CountBench file (UPN proposals), for an image of that name
    shutil.copy(path, tmp_path / "image_0.jpg")
    countbench = TIKTOKEN.parent.parent / "fo1_eval" / "countbench_with_upn_score_0.3_0.8.json"
    capsys.readouterr()
    assert main(["count", str(tmp_path / "image_0.jpg"), "headsets", "--model", fo1_ckpt, "--proposals",
                 str(countbench), "--max-new-tokens", "2", "--json"]) == 0
    rec = json.load(open(countbench))[0]
    res = json.loads(capsys.readouterr().out)
    assert res["proposals"] == [[float(v) for v in b] for b in rec["bboxes"]] and res["proposal_scores"] == rec["scores"]
    for argv, needle in ((["--proposals", str(tmp_path / "dets.json"), "--boxes", str(tmp_path / "boxes.json")],
                          "only one of --boxes, --proposals and --upn"),
                         (["--image-id", "5", "--boxes", str(tmp_path / "boxes.json")], "--image-id needs"),
                         (["--proposals", str(tmp_path / "boxes.json")], "not a proposals file"),
                         (["--proposals", str(tmp_path / "dets.json"), "--image-id", "999999999"], "999999999"),
                         ([], "proposal boxes are missing")):
        assert main(["detect", path, "person", "--model", fo1_ckpt, *argv]) == 1
        assert needle in _one_line_error(capsys, "detect"), argv


@needs_data
def test_demo_reuses_its_cached_checkpoint(tmp_path, capsys):
    args = ["demo", "--tiktoken", str(TIKTOKEN), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "d.png"),
            "--threads", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out and "answer:" in out and os.path.getsize(tmp_path / "d.png") > 1000
    (ck,) = os.listdir(tmp_path / "cache")
    stamp = os.path.getmtime(tmp_path / "cache" / ck / "model.safetensors.index.json")
    assert main(args) == 0
    assert os.path.getmtime(tmp_path / "cache" / ck / "model.safetensors.index.json") == stamp


def _one_line_error(capsys, cmd):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"vlmfo1 {cmd}: error:") or \
        lines[0].startswith("vlmfo1: error:"), err
    assert "Traceback" not in err
    return lines[0]


@needs_data
def test_cli_errors_are_one_clear_line(fo1_ckpt, tmp_path, capsys, monkeypatch):
    img = str(DEMO / "demo_image.jpg")
    bx = str(DEMO / "demo_boxes.json")
    cases = [
        (["segment", img], "invalid choice"),                                    # unknown task
        (["detect", img, "dog", "--model", str(tmp_path / "nowhere"), "--boxes", bx], "checkpoint folder not found"),
        (["detect", str(tmp_path / "no.jpg"), "dog", "--model", fo1_ckpt, "--boxes", bx], "image file not found"),
        (["detect", img, "dog", "--model", fo1_ckpt, "--boxes", str(tmp_path / "no.json")], "boxes file not found"),
        (["detect", img, "dog", "--model", fo1_ckpt, "--boxes", bx, "--prompt", "x"], "unrecognized"),
        (["detect", img, "dog", "--model", fo1_ckpt, "--boxes", bx, "--tokenizer", "x"], "unrecognized"),
        (["detect", img, "dog", "--model", fo1_ckpt, "--boxes", bx, "--box-format", "xywh"], "contradicts"),
        (["detect", img, "dog", "--model", fo1_ckpt, "--boxes", bx, "--box-format", "yxyx"], "invalid choice"),
        (["caption", img, "--model", fo1_ckpt, "--boxes", bx], "--region"),
        (["caption", img, "--region", "9", "--model", fo1_ckpt, "--boxes", bx], "out of range"),
        (["chat", img, "What is <region3>?", "--model", fo1_ckpt], "<region3>"),
        (["count", img, "--model", fo1_ckpt, "--boxes", bx], "required"),
        (["generate", "--model", str(tmp_path / "nowhere"), "hi"], "config.json"),
        (["generate", "--model", fo1_ckpt, "--image", img, "--chat", "hi"], "--chat"),
        (["demo", "--size", "3b"], "unrecognized"),
    ]
    for argv, needle in cases:
        assert main(argv) == 1, argv
        line = _one_line_error(capsys, argv[0])
        assert needle in line, (argv, line)
    bad = tmp_path / "bad.json"
    for text, needle in (('{"box": []}', "boxes"), ("[[0, 0, 1", "not valid JSON"),
                         ('{"boxes": [[0, 0, 1, 1]], "box_format": "yxyx"}', "yxyx")):
        bad.write_text(text)
        assert main(["detect", img, "dog", "--model", fo1_ckpt, "--boxes", str(bad)]) == 1
        assert needle in _one_line_error(capsys, "detect")
    # random-checkpoint --fo1 without a vocabulary: fails before writing anything
    import vlmfo1.constants as constants
    monkeypatch.setattr(constants, "DEFAULT_TIKTOKEN", str(tmp_path / "none.tiktoken"))
    monkeypatch.delenv("VLMFO1_QWEN_TIKTOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["random-checkpoint", "--fo1", str(tmp_path / "new")]) == 1
    assert "--tiktoken" in _one_line_error(capsys, "random-checkpoint")
    assert not (tmp_path / "new").exists()
    assert main(["--version"]) == 0 and "vlmfo1 0.2.0" in capsys.readouterr().out
