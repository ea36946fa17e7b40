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
