"""Crash safety and exact resume: N steps + resume + N steps == 2N steps straight (weights
and losses bit for bit), a resume under another config is refused, a full disk leaves the
previous checkpoint intact, and SIGKILL at random moments loses nothing."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from andromeda.checkpoint import load_checkpoint
from andromeda.cli import build_parser, main
from andromeda.data.prepare import prepare
from andromeda.train import checkpoint as ckpt
from andromeda.train.run import resolve_run, train_run

REPO = Path(__file__).resolve().parents[1]
# Dropout draws random numbers every step, so exactness also covers the restored RNG state.
MODEL = ["--preset", "llama-tiny", "--set", "dim=32", "--set", "mlp.dropout=0.1", "--set", "train.seq_len=32",
         "--set", "train.batch_size=4", "--set", "train.log_every=1", "--set", "train.eval_every=4",
         "--set", "train.eval_batches=1", "--set", "train.lr=2e-3", "--no-progress"]


@pytest.fixture
def data(tmp_path):
    text = "".join(f"line {i % 17} says {'ab' * (i % 5)} and stops.\n" for i in range(800))
    (tmp_path / "corpus.txt").write_text(text)
    prepare([str(tmp_path / "corpus.txt")], tmp_path / "data", "byte", val_fraction=0.1, progress=False)
    return tmp_path / "data"


def train_argv(data, out, steps, *extra):
    return ["train", *MODEL, "--data", str(data), "--out", str(out), "--max-steps", str(steps), *extra]


def losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def weights(folder: Path) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_split_run_is_bit_identical(tmp_path, data, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(train_argv(data, straight, 12, "--set", "train.save_every=4")) == 0
    parser, _ = build_parser()
    args = parser.parse_args(train_argv(data, split, 12, "--set", "train.save_every=4"))
    first = train_run(resolve_run(args), progress=False, stop_after=6)
    assert first.name == "step_0000006"
    assert main(train_argv(data, split, 12, "--resume")) == 0
    out, err = capsys.readouterr()
    assert f"resuming from {split / 'checkpoints' / 'step_0000006'} at step 6 of 12" in err
    assert out.strip().splitlines()[-1].endswith("step_0000012")
    assert losses(straight) == losses(split)
    assert [s for s, _ in losses(split)] == list(range(1, 13))
    assert_same_weights(straight / "checkpoints" / "latest", split / "checkpoints" / "latest")
    # The optimizer state and RNG saved at the end agree as well.
    sa = ckpt.load_train_state(straight / "checkpoints" / "latest")
    sb = ckpt.load_train_state(split / "checkpoints" / "latest")
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])
    assert sa["loader"] == sb["loader"]


def test_resume_with_another_config_is_refused(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, 2)) == 0
    code = main(train_argv(data, run, 4, "--resume", "--set", "attention.heads=2"))
    err = capsys.readouterr().err
    assert code == 2 and "another model config" in err and "attention.heads" in err
    assert (run / "checkpoints" / "latest").resolve().name == "step_0000002"


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, data, capsys, monkeypatch):
    import andromeda.checkpoint as core
    real_save, calls = core.save_file, []

    def disk_full_on_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)
    monkeypatch.setattr(core, "save_file", disk_full_on_second_save)
    run = tmp_path / "run"
    code = main(train_argv(data, run, 6, "--set", "train.save_every=2", "--set", "train.eval_every=0"))
    err = capsys.readouterr().err
    assert code == 2
    assert "No space left on device" in err and "step_0000002" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    model, _, config = load_checkpoint(run / "checkpoints" / "latest")
    assert config["meta"]["step"] == 2
    # Space comes back: the run resumes from the surviving checkpoint and completes.
    monkeypatch.setattr(core, "save_file", real_save)
    assert main(train_argv(data, run, 6, "--resume")) == 0
    assert [s for s, _ in losses(run)] == list(range(1, 7))


def _max_logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(s).get("step", 0) for s in path.read_text().splitlines() if s.endswith("}")]
    return max(steps, default=0)


def _kill_and_resume(data: Path, run: Path, steps: int, kills: int, rng: random.Random) -> int:
    """Start `andromeda train --resume` again and again, SIGKILL it `kills` times at random
    moments (a few steps after it got going, plus a random delay), then let it finish."""
    argv = [sys.executable, "-m", "andromeda", *train_argv(data, run, steps, "--resume",
                                                              "--set", "train.save_every=3")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    killed = 0
    while True:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if killed < kills:
            target = _max_logged_step(run) + rng.randint(1, 6)
            deadline = time.time() + 120
            while proc.poll() is None and _max_logged_step(run) < target and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.15))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed += 1
                continue
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return killed


def _check_killed_run_matches(tmp_path, data, steps, kills, seed):
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert main(train_argv(data, reference, steps, "--set", "train.save_every=3")) == 0
    killed = _kill_and_resume(data, run, steps, kills, random.Random(seed))
    assert killed >= 1
    assert losses(run) == losses(reference)
    assert losses(run)[-1][0] == steps
    assert_same_weights(run / "checkpoints" / "latest", reference / "checkpoints" / "latest")
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]


def test_sigkill_at_random_moments_then_resume(tmp_path, data):
    _check_killed_run_matches(tmp_path, data, steps=24, kills=2, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_many_times(tmp_path, data, seed):
    _check_killed_run_matches(tmp_path, data, steps=60, kills=6, seed=seed)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "galore"])
def test_lowmem_optimizer_state_resumes_exactly(tmp_path, optimizer):
    pytest.importorskip("andromeda.train.lowmem")
    from andromeda.model.config import ModelConfig
    from andromeda.model.transformer import Transformer
    from andromeda.train.benchmark import RandomTokens
    from andromeda.train.config import TrainConfig
    from andromeda.train.trainer import Trainer

    cpu = torch.device("cpu")

    def trainer(run):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=64, max_seq_len=16, dim=32, depth=2,
                                        attention=dict(heads=2), mlp=dict(multiple_of=16)))
        cfg = TrainConfig(max_steps=8, batch_size=2, seq_len=16, optimizer=optimizer, save_every=4,
                          tensorboard=False)
        return Trainer(run, model, None, cfg, RandomTokens(64, 2, 16, cpu, seed=1), None, cpu, progress=False)
    straight = trainer(tmp_path / "a")
    expected = [straight.train_step() for _ in range(8)]
    trainer(tmp_path / "b").fit(stop_after=4)
    resumed = trainer(tmp_path / "b")
    resumed.resume(tmp_path / "b" / "checkpoints" / "step_0000004")
    assert [resumed.train_step() for _ in range(4)] == expected[4:]
    for p, q in zip(straight.raw.parameters(), resumed.raw.parameters()):
        assert torch.equal(p, q)
