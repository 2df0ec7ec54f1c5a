"""Smoke test of benchmarks/cpu_decode.py at a toy size: the andromeda model it builds from the
transformers model computes the same logits and the same greedy tokens (the comparison the
benchmark's speed figures rest on). Speed itself is not asserted."""

import pytest
from benchmark_scripts import load_benchmark

pytest.importorskip("transformers")


def test_benchmark_models_agree_before_they_are_timed():
    report = load_benchmark("cpu_decode").main(["--dim", "32", "--depth", "2", "--heads", "4", "--hidden", "64",
                                                "--new-tokens", "8", "--repeats", "1"])
    assert report["max_logit_diff"] < 1e-4
    assert report["greedy_tokens_agreeing"] == 8 == report["new_tokens"]
