"""`andromeda bench prefill` on CPU: rows shortest first, each with its growth over the weights."""

import json

from andromeda.cli import main


def test_bench_prefill_cpu_reports_memory_per_length(capsys):
    argv = ["bench", "prefill", "--preset", "andromeda-tiny", "--seq", "96,32", "--device", "cpu",
            "--repeats", "1", "--warmup", "0", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["results"]
    assert out["preset"] == "andromeda-tiny" and [r["seq"] for r in rows] == [32, 96]
    for r in rows:
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0
        assert 0 <= r["prefill_mb"] <= r["peak_memory_mb"]
    assert rows[0]["peak_memory_mb"] <= rows[1]["peak_memory_mb"]  # a high-water mark, hence the order
