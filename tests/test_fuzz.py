"""The fuzz suite in CI: the seeded sample of tests/fuzz (every target: safetensors files, Qwen2 and VLM-FO1
configs, index files, images, boxes files, plus every saved finding) must give 0 crashes, 0 hangs, 0 unclear
exceptions and 0 wrong successes; and the runner must really count a crash and a hang (its self-test).

The full corpus (several thousand cases) is `python -m tests.fuzz.run --all`.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout):
    return subprocess.run([sys.executable, "-m", "tests.fuzz.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_fuzz_sample_is_clean(fo1_tiny_ckpt, tmp_path):
    out = tmp_path / "fuzz.json"
    r = _run(["--fo1", fo1_tiny_ckpt, "--json", str(out), "--workdir", str(tmp_path)], timeout=900)
    print(r.stdout[-4000:], r.stderr[-2000:])
    results = json.loads(out.read_text())
    targets = {c["target"] for c in results}
    assert targets == {"safetensors", "qwen2_config", "fo1_config", "index", "image", "boxes"}, targets
    assert len(results) >= 600
    failed = [c for c in results if c["verdict"]]
    assert not failed, "\n".join(f"[{c['target']}] {c['name']}: {c['verdict']}" for c in failed[:20])
    assert r.returncode == 0
    # the sample holds both verdicts for every target (a harness that refused or accepted everything would show)
    for t in targets:
        got = {c["outcome"].split(":")[0] for c in results if c["target"] == t}
        assert {"accepted", "refused"} <= got, (t, got)


def test_fuzz_runner_counts_crashes_and_hangs(fo1_tiny_ckpt, tmp_path):
    out = tmp_path / "self.json"
    r = _run(["--selftest", "--timeout", "5", "--workers", "1", "--fo1", fo1_tiny_ckpt, "--json", str(out),
              "--workdir", str(tmp_path)], timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    res = {c["name"]: c for c in json.loads(out.read_text())}
    # (under .ci/sanitize, ASan catches the SIGSEGV and aborts: SIGABRT)
    assert res["selftest crash"]["verdict"].startswith(("crash (signal SIGSEGV)", "crash (signal SIGABRT)"))
    assert res["selftest hang"]["verdict"].startswith("hang")
    assert res["selftest after a crash and a hang"]["verdict"] == ""   # a fresh worker took over
