"""What a careless user does to a run folder: Ctrl-C or SIGTERM in the middle of training, a
refused --resume, two trainings on one --out, a truncated newest checkpoint. Each is run
through the command line, as the user met it; processes have bounded timeouts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from andromeda.cli import main
from andromeda.data.prepare import prepare
from andromeda.train.interrupt import GracefulStop
from andromeda.train.runlock import RunLock

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--preset", "llama-tiny", "--set", "dim=32", "--set", "train.seq_len=32", "--set", "train.batch_size=4",
         "--set", "train.log_every=1", "--set", "train.eval_every=0", "--no-progress"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture
def data(tmp_path):
    text = "".join(f"line {i % 17} says {'ab' * (i % 5)} and stops.\n" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    prepare([str(tmp_path / "corpus.txt")], tmp_path / "data", "byte", val_fraction=0.1, progress=False)
    return tmp_path / "data"


def train_argv(data, out, steps, *extra):
    return ["train", *MODEL, "--data", str(data), "--out", str(out), "--max-steps", str(steps), *extra]


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(s) for s in path.read_text().splitlines() if s.endswith("}")]
    return [r["step"] for r in records if "loss" in r]


def step_folders(run: Path) -> list[str]:
    folder = run / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step_")) if folder.is_dir() else []


def start_training(data, run, err_file, *extra) -> subprocess.Popen:
    argv = [sys.executable, "-m", "andromeda", *train_argv(data, run, 100000, *extra)]
    return subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err_file)


def wait_for_step(proc, run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while max(logged_steps(run), default=0) < step:
        assert proc.poll() is None, "training ended early"
        assert time.time() < deadline, "training did not reach the step in time"
        time.sleep(0.02)


# SIGTERM takes the same path as SIGINT; it runs under -m slow to keep the default suite short.
@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_saves_a_checkpoint_and_resume_says_where_it_continues(tmp_path, data, capsys, signum):
    run = tmp_path / "run"
    with open(tmp_path / "err.txt", "w") as err_file:
        # No periodic checkpoint before step 500: whatever is saved comes from the signal.
        proc = start_training(data, run, err_file)
        try:
            wait_for_step(proc, run, 3)
            proc.send_signal(signum)
            code = proc.wait(timeout=60)
        finally:
            proc.kill()
    err = (tmp_path / "err.txt").read_text()
    assert code == 128 + signum, err
    saved = step_folders(run)
    assert len(saved) == 1, saved
    step = int(saved[0].split("_")[1])
    assert step >= 3 and step == max(logged_steps(run))  # the step in flight was finished, then saved
    assert f"stopped by {signal.Signals(signum).name} at step {step}" in err and "Traceback" not in err
    assert (run / "checkpoints" / "latest").resolve().name == saved[0]
    # --resume continues from that step and says so.
    assert main(["train", "--out", str(run), "--resume", "--max-steps", str(step + 2), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {run / 'checkpoints' / saved[0]} at step {step}" in err
    assert logged_steps(run)[-2:] == [step + 1, step + 2]


def test_a_second_interrupt_stops_at_once():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert stop.signum == signal.SIGINT  # the first one is only a request
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_resume_with_nothing_to_resume_is_refused(tmp_path, capsys):
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        assert main(["train", "--out", str(folder), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"nothing to resume: {folder} holds no checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists()  # a refused run leaves nothing behind
    assert os.listdir(tmp_path / "empty") == []


def test_a_refused_run_changes_nothing_in_its_folder(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, 2)) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # Another model with --resume is refused; the saved config must survive the refusal...
    assert main(["train", "--preset", "gpt2-tiny", "--data", str(data), "--out", str(run), "--resume"]) == 2
    assert "another model config" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # ... so that a plain --resume still continues the run.
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert logged_steps(run) == [1, 2, 3]
    # A check that fails only after the data is read leaves no folder behind either.
    new = tmp_path / "new"
    assert main(train_argv(data, new, 2, "--set", "vocab_size=100")) == 2
    assert "vocab_size" in capsys.readouterr().err
    assert not new.exists()


def test_a_second_training_on_one_folder_is_refused_and_names_the_first(tmp_path, data, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom andromeda.train.runlock import RunLock\n"
                               f"with RunLock({str(run)!r}):\n    print('locked', flush=True)\n    time.sleep(60)"],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(train_argv(data, run, 2)) == 2
        err = capsys.readouterr().err
        assert f"in use by another training run (pid {holder.pid})" in err
        assert os.listdir(run) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # The holder died without cleaning up: its lock is stale and is taken over, with a message.
    assert (run / ".lock").read_text().strip() == str(holder.pid)
    assert main(train_argv(data, run, 2)) == 0
    err = capsys.readouterr().err
    assert f"taking over the stale lock of {run} (pid {holder.pid} is no longer running)" in err
    assert not (run / ".lock").exists() and step_folders(run) == ["step_0000002"]


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(Exception, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").__enter__()
    assert not (tmp_path / "run").exists()  # created by the lock, left empty: removed


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, 4, "--set", "train.save_every=2")) == 0
    weights = run / "checkpoints" / "step_0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated copy
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "5", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and str(weights) in err
    assert f"resuming from {run / 'checkpoints' / 'step_0000002'} at step 2" in err
    assert logged_steps(run)[-3:] == [3, 4, 5]
    # With every checkpoint damaged, one line names the damaged file.
    for folder in step_folders(run):
        state = run / "checkpoints" / folder / "train_state.pt"
        state.write_bytes(state.read_bytes()[:50])
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "every checkpoint" in err and "train_state.pt" in err and len(err.strip().splitlines()) == 1


def test_train_prints_a_one_line_summary_naming_the_saved_config(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, 1)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[-1] == str(run / "checkpoints" / "step_0000001")
    assert out[0].startswith("train: ") and out[0].endswith(f"full config: {run / 'run_config.json'}")
    assert "1 steps of 4 x 32 tokens" in out[0]
    assert json.loads((run / "run_config.json").read_text())["model"]["dim"] == 32


def test_checkpoint_files_share_the_usual_mode(tmp_path, data):
    run = tmp_path / "run"
    assert main(train_argv(data, run, 1)) == 0
    folder = run / "checkpoints" / "step_0000001"
    probe = tmp_path / "probe"
    probe.write_text("")  # a file created the ordinary way, under this process's umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {probe.stat().st_mode & 0o777}, modes
