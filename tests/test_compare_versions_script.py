"""benchmarks/compare_versions.py run on one checkout against itself (slow: it compiles the
6x384 decode step in both workers): every case is reported for both sides, the second worker
ran the weights the first saved, and the per-case ratios stay near 1."""

from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_checkout_compared_with_itself():
    report = load_benchmark("compare_versions").main(["--before", str(REPO), "--after", str(REPO), "--rounds", "1"])
    cases = {r["case"] for r in report["rows"]}
    assert {"6x384 decode eager", "6x384 decode compiled", "anemone-tiny eval", "llama-tiny train"} <= cases
    for row in report["rows"]:
        assert row["params_before"] == row["params_after"]
        assert row["before_per_cpu_s"] > 0 and row["after_per_cpu_s"] > 0
        assert 0.25 < row["after_over_before"] < 4, row  # one noisy round; identical code
