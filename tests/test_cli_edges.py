"""Edges a user met on the command line: output pipes closed early, prompts at the context
limit, wrong types in config files, flags whose 0 meant something else, a prepared folder
replaced without asking, a run folder given to `convert --to-hf`, a BPE smaller than asked."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from andromeda.checkpoint import save_checkpoint
from andromeda.cli import main
from andromeda.data.prepare import prepare
from andromeda.data.tokenizer import ByteTokenizer
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig(vocab_size=257, max_seq_len=64, dim=32, depth=2, attention=dict(heads=4, kv_heads=2))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(folder, Transformer(cfg), ByteTokenizer())
    return folder


@pytest.fixture
def data(tmp_path):
    (tmp_path / "corpus.txt").write_text("".join(f"line {i % 13} is here.\n" for i in range(300)))
    prepare([str(tmp_path / "corpus.txt")], tmp_path / "data", "byte", val_fraction=0.1, progress=False)
    return tmp_path / "data"


# ---------------------------------------------------------------- closed pipes
def run_with_closed_stdout(argv, timeout=120):
    """Run `andromeda ARGV` as `... | head -0` would: the reader is gone before the first write."""
    proc = subprocess.Popen([sys.executable, "-m", "andromeda", *argv], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    try:
        err = proc.stderr.read()
        return proc.wait(timeout=timeout), err
    finally:
        proc.kill()


def test_presets_into_a_closed_pipe_exits_quietly():
    code, err = run_with_closed_stdout(["presets"])
    assert code == 141 and err == "", err


def test_train_piped_into_head_still_trains(tmp_path, data):
    run = tmp_path / "run"
    argv = ["train", "--preset", "llama-tiny", "--set", "dim=32", "--set", "train.seq_len=32", "--set",
            "train.batch_size=2", "--data", str(data), "--out", str(run), "--max-steps", "3", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "andromeda", *argv], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # `| head -1`: read one line, then go away
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert first.startswith("train: ")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == 141  # the final line had no reader, but the run completed and saved
    assert (run / "checkpoints" / "latest").resolve().name == "step_0000003"


class ClosedAfter(io.StringIO):
    """A stdout whose reader leaves after `limit` characters (`| head -c LIMIT`)."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def write(self, text):
        if self.tell() + len(text) > self.limit:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_generate_into_head_c_exits_quietly(ckpt, monkeypatch, capsys):
    out = ClosedAfter(20)
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["generate", "--ckpt", str(ckpt), "--prompt", "hello", "--max-new-tokens", "40",
                 "--temperature", "0"])
    monkeypatch.undo()
    assert code == 141 and capsys.readouterr().err == ""
    assert len(out.getvalue()) <= 20


# ---------------------------------------------------------------- the context limit
def gen_json(ckpt, capsys, *extra):
    code = main(["generate", "--ckpt", str(ckpt), "--temperature", "0", "--json", *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_truncation_leaves_room_for_the_tokens_asked_for(ckpt, capsys):
    code, r, err = gen_json(ckpt, capsys, "--prompt", "x" * 100, "--max-new-tokens", "5", "--truncate")
    assert code == 0 and r["prompt_tokens"] == 64 - 5 and r["new_tokens"] == 5 and "capped" not in err
    # More than the context can hold: the prompt keeps half of it, and the cap is reported.
    code, r, err = gen_json(ckpt, capsys, "--prompt", "x" * 100, "--max-new-tokens", "1000000", "--truncate")
    assert code == 0 and r["prompt_tokens"] == 32 and r["new_tokens"] == 32
    assert "--max-new-tokens 1000000 capped to 32" in err


def test_a_capped_budget_is_reported_without_truncation(ckpt, capsys):
    code, r, err = gen_json(ckpt, capsys, "--prompt", "y" * 60, "--max-new-tokens", "10")
    assert code == 0 and r["new_tokens"] == 4 and r["finish_reason"] == "length"
    assert "--max-new-tokens 10 capped to 4: the prompt takes 60 of the model's 64 positions" in err


def test_a_prompt_too_long_names_the_truncate_flag(ckpt, capsys):
    code, _, err = gen_json(ckpt, capsys, "--prompt", "z" * 100)
    assert code == 2 and "pass --truncate" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- config files
@pytest.mark.parametrize("config, message", [
    ({"depth": "two", "dim": 64}, "depth='two': expected int, got str"),
    ({"depth": 2, "attention": 5}, "attention must be a mapping of its fields, got int 5"),
    ({"depth": 2, "moe": [1, 2]}, "moe must be a mapping of its fields, got list"),
    ({"depth": "two", "extras": {}}, "depth='two': expected int, got str"),  # a version-1 config
    ({"depth": 2, "format_version": "x"}, "format_version='x': expected int"),
    ({"model": {"depth": 2}, "train": 5}, "train in"),
    ({"model": {"depth": 2}, "train": {"lr": "fast"}}, "train.lr='fast': expected float"),
])
def test_wrong_types_in_a_config_file_name_the_key(tmp_path, capsys, config, message):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(config))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- silent surprises
@pytest.mark.parametrize("flag", ["--seq-len", "--stride"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_eval_refuses_zero_like_any_other_non_positive_value(ckpt, tmp_path, capsys, flag, value):
    (tmp_path / "t.txt").write_text("some held-out text " * 20)
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(tmp_path / "t.txt"), flag, value]) == 2
    assert f"{flag} must be >= 1, got {value}" in capsys.readouterr().err


def test_prepare_into_prepared_data_needs_overwrite(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first corpus\n" * 20)
    (tmp_path / "b.txt").write_text("second corpus\n" * 20)
    out = tmp_path / "out"
    argv = ["prepare", "--data", str(tmp_path / "a.txt"), "--val-fraction", "0.5", "--out", str(out)]
    assert main(argv) == 0
    before = (out / "meta.json").read_text()
    assert main([*argv[:2], str(tmp_path / "b.txt"), *argv[3:]]) == 2
    assert "already holds prepared data; pass --overwrite" in capsys.readouterr().err
    assert (out / "meta.json").read_text() == before
    assert main([*argv[:2], str(tmp_path / "b.txt"), *argv[3:], "--overwrite"]) == 0
    assert "b.txt" in json.loads((out / "meta.json").read_text())["inputs"][0]


def test_bpe_with_fewer_merges_than_asked_says_so(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc abd abe\n" * 30)
    assert main(["prepare", "--data", str(tmp_path / "a.txt"), "--tokenizer", "bpe:100000",
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)["vocab_size"]
    assert got < 400 and f"so the tokenizer has {got} ids, not 100000" in err


def test_convert_to_hf_takes_a_run_folder(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "llama-tiny", "--set", "dim=32", "--set", "train.seq_len=32", "--data",
                 str(data), "--out", str(run), "--max-steps", "1", "--no-progress"]) == 0
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "a")]) == 0
    assert main(["convert", "--to-hf", str(run / "checkpoints" / "latest"), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_convert_is_described_as_both_directions():
    from andromeda.cli import build_parser
    parser, _ = build_parser(["--help"])
    assert "convert between Hugging Face folders and andromeda checkpoints" in " ".join(parser.format_help().split())
