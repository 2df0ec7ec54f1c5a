"""The CPU thread count of the computing commands: `--threads` is applied, the default is the
free cores (measured from /proc/stat) unless OMP_NUM_THREADS is set, and OpenMP's wait policy
is chosen from them before torch loads. Speed itself is measured in benchmarks/busy_cpu.py."""

import os
import sys
from pathlib import Path

import pytest
import torch

from andromeda import threads
from andromeda.checkpoint import save_checkpoint
from andromeda.cli import main
from andromeda.data.tokenizer import ByteTokenizer
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig(vocab_size=257, max_seq_len=32, dim=32, depth=1, attention=dict(heads=4, kv_heads=2))
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(folder, Transformer(cfg), ByteTokenizer())
    return folder


def generate(ckpt, *extra):
    return main(["generate", "--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2", "--json", *extra])


@pytest.mark.parametrize("command", ["train", "eval", "generate", "chat"])
def test_threads_flag_is_applied(tmp_path, capsys, command):
    # The count is set before the command runs; a missing checkpoint then ends it cheaply.
    missing = ["--out", str(tmp_path / "run"), "--init", str(tmp_path / "nope")] if command == "train" else \
        ["--ckpt", str(tmp_path / "nope"), *{"eval": ["--data", "x"], "generate": ["--prompt", "x"]}.get(command, [])]
    assert main([command, *missing, "--threads", "3"]) == 2
    assert torch.get_num_threads() == 3
    assert main([command, *missing, "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_default_is_the_free_cores_unless_omp_num_threads_is_set(ckpt, monkeypatch):
    monkeypatch.setattr(threads, "free_cores", lambda: 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert generate(ckpt) == 0 and torch.get_num_threads() == 1  # the user's choice stands
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert generate(Path("missing-checkpoint")) == 2 and torch.get_num_threads() == 3


def fake_proc_stat(monkeypatch, samples):
    """/proc/stat readings: per call, {cpu: (busy jiffies, idle jiffies)}."""
    readings = iter(samples)

    def cpu_times(cpus):
        sample = next(readings)
        return sum(sample[c][0] for c in cpus), sum(sum(sample[c]) for c in cpus)
    monkeypatch.setattr(threads, "_cpu_times", cpu_times)
    monkeypatch.setattr(threads, "_allowed_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "SAMPLE_S", 0.0)


@pytest.mark.parametrize("busy_cores, free", [(0, 4), (1, 3), (3, 1), (4, 1)])
def test_free_cores_counts_the_cores_other_processes_keep_busy(monkeypatch, busy_cores, free):
    start = {c: (1000, 1000) for c in range(4)}
    # Over the sample, `busy_cores` cores stay busy for all 10 ticks, the others idle.
    end = {c: (1010, 1000) if c < busy_cores else (1000, 1010) for c in range(4)}
    fake_proc_stat(monkeypatch, [start, end])
    assert threads.free_cores() == free


@pytest.mark.parametrize("free, expected", [(4, ("GOMP_SPINCOUNT", threads.SHORT_SPIN)),
                                            (3, ("OMP_WAIT_POLICY", "PASSIVE")),
                                            (1, ("OMP_WAIT_POLICY", "PASSIVE"))])
def test_wait_policy_follows_the_free_cores_and_is_set_only_before_torch_loads(monkeypatch, free, expected):
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_allowed_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "free_cores", lambda: free)
    monkeypatch.setattr(threads, "_sampled_free", None)  # restored to None afterwards
    threads.choose_wait_policy()  # torch is loaded in this process: too late to matter
    assert "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    threads.choose_wait_policy()
    var, value = expected
    assert os.environ[var] == value
    assert ({"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} - {var}).isdisjoint(os.environ)  # one knob, not both
    assert threads._sampled_free == free  # apply_threads uses this sample rather than taking another


@pytest.mark.parametrize("var, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "5")])
def test_the_users_wait_policy_stands(monkeypatch, var, value):
    for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, value)
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    monkeypatch.setattr(threads, "_sampled_free", None)
    threads.choose_wait_policy()
    assert os.environ[var] == value and len({"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ)) == 1
