"""Smoke test of benchmarks/efficiency.py at toy sizes: every section runs and reports
what it claims (matched active parameters, packed BitNet identical to its twin and smaller,
MoE against a dense FFN of equal active width). Speed itself is not asserted."""

import json

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def efficiency():
    return load_benchmark("efficiency")


def test_sections_report_matched_models_packing_and_dispatch(efficiency, tmp_path):
    out = tmp_path / "eff.json"
    assert efficiency.main(["--device", "cpu", "--dim", "32", "--depth", "4", "--seq-len", "20", "--batch-size", "2",
                            "--new-tokens", "3", "--repeats", "1", "--expert-hidden", "16", "--moe-tokens", "256",
                            "--models", "dense,moe,bitnet", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    models = {row["model"]: row for row in r["matched_models"]}
    assert set(models) == {"dense", "moe", "bitnet"}
    dense_active = models["dense"]["active_params"]
    for row in models.values():
        assert abs(row["active_params"] - dense_active) <= 0.05 * dense_active
    assert models["moe"]["total_params"] > models["moe"]["active_params"]
    unpacked, packed = r["bitnet_packed"]
    assert packed["max_logit_diff_vs_unpacked"] == 0.0
    assert packed["resident_weight_mb"] < unpacked["resident_weight_mb"]
    assert unpacked["ternary_weights_mb_bf16"] >= 7 * packed["ternary_weights_mb"]
    dense_ffn, moe_ffn = r["moe_dispatch"]
    assert dense_ffn["tokens"] == moe_ffn["tokens"] == 256 and moe_ffn["params"] > dense_ffn["params"]


def test_bad_arguments_exit_with_a_message(efficiency):
    with pytest.raises(SystemExit, match="unknown model"):
        efficiency.main(["--models", "dense,nope"])
    with pytest.raises(SystemExit, match="depth"):
        efficiency.main(["--depth", "2"])
    with pytest.raises(SystemExit, match="seq-len"):
        efficiency.main(["--seq-len", "32", "--new-tokens", "17"])
