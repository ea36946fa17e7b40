"""The fuzz suite: a seeded corpus of hostile checkpoint headers, index files, configs, images and boxes files
(`corpus.py`), the harness that feeds one input to vlmfo1 and judges the outcome (`targets.py`), and the runner
that executes cases in worker subprocesses so a crash or hang is counted, not fatal (`run.py`).

    python -m tests.fuzz.run                 # the CI sample (as tests/test_fuzz.py runs it)
    python -m tests.fuzz.run --all           # every generated case and every saved finding
    python -m tests.fuzz.run --target image --limit 50 -v

Saved findings (from benchmarks/fuzz_coverage.py or by hand) live in tests/fuzz/corpus/<target>/ and run every time.
"""
