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


def test_agreement_counts_a_missing_token_as_a_difference():
    """The agreement used to be counted over zip(hf, ours), so an engine that returned fewer
    tokens (none at all, even) reported full agreement."""
    agreement = load_benchmark("cpu_decode").greedy_agreement
    assert agreement([1, 2, 3], [1, 2, 3]) == 3
    assert agreement([1, 2, 3], [1, 9, 3]) == 1
    assert agreement([1, 2, 3], [1, 2]) == 2 and agreement([1, 2], [1, 2, 3]) == 2
    assert agreement([1, 2, 3], []) == 0


@pytest.mark.slow  # compiles three decode steps with Inductor (about a minute)
def test_quant_mode_decodes_float_int8_and_int4_of_the_same_weights():
    report = load_benchmark("cpu_decode").main(["--quant", "--dim", "64", "--depth", "1", "--heads", "2",
                                                "--hidden", "128", "--new-tokens", "4", "--repeats", "1"])
    assert report["float32_speedup"] == 1.0
    for name in ("int8", "int4"):
        assert report[f"{name}_tokens_per_s"] > 0 and 0 <= report[f"{name}_greedy_tokens_agreeing"] <= 4
