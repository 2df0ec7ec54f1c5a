"""Streaming detokenisation and stop strings; the `generate` and `chat` commands (JSON keys,
prompt sources, error exits, chat driven through a pipe)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from andromeda.checkpoint import save_checkpoint
from andromeda.cli import main
from andromeda.data.tokenizer import ByteTokenizer
from andromeda.infer.generate import TextTracker
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- TextTracker
def feed(tracker, ids):
    return [tracker.add([i]) for i in ids]


def test_tracker_waits_for_whole_utf8_characters():
    t = TextTracker(ByteTokenizer())
    pieces = feed(t, list("aé€b".encode()))
    assert "".join(pieces) + t.flush() == "aé€b"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # the first byte of é alone is not text yet


def test_tracker_stops_and_never_emits_the_stop_string():
    t = TextTracker(ByteTokenizer(), stop=("STOP", "<|end|>"))
    pieces = feed(t, list(b"hello ST"))
    assert "".join(pieces) == "hello "  # 'ST' may be the start of STOP: held back
    pieces += feed(t, list(b"OP and more"))
    assert t.stopped and t.text == "hello "
    assert "".join(pieces) + t.flush() == "hello "


def test_tracker_releases_a_false_alarm():
    t = TextTracker(ByteTokenizer(), stop=("<|end|>",))
    out = "".join(feed(t, list(b"a <|en"))) + "".join(feed(t, list(b"x|> b"))) + t.flush()
    assert out == "a <|enx|> b" and not t.stopped


# ---------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig(vocab_size=257, max_seq_len=64, dim=32, depth=2, attention=dict(heads=4, kv_heads=2))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(folder, Transformer(cfg), ByteTokenizer())
    return folder


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_keys(ckpt, capsys):
    code, out, err = run_cli(capsys, "generate", "--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "5",
                             "--temperature", "0", "--json")
    assert code == 0, err
    result = json.loads(out)
    for key in ("text", "prompt_tokens", "new_tokens", "prefill_ms", "decode_tokens_per_s"):
        assert key in result
    assert result["prompt_tokens"] == 5 and 1 <= result["new_tokens"] <= 5


def test_generate_num_samples_gives_a_list_and_seeds_repeat(ckpt, capsys):
    argv = ["generate", "--ckpt", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "6", "--num-samples", "2",
            "--seed", "5", "--top-k", "20", "--json"]
    code, out, _ = run_cli(capsys, *argv)
    first = json.loads(out)
    assert code == 0 and isinstance(first, list) and len(first) == 2
    _, out, _ = run_cli(capsys, *argv)
    assert json.loads(out)[0]["text"] == first[0]["text"]


def test_generate_streams_text(ckpt, capsys):
    code, out, err = run_cli(capsys, "generate", "--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "4",
                             "--temperature", "0")
    assert code == 0 and "prompt tokens" in err


@pytest.mark.parametrize("extra,message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--max-new-tokens", "0"], "max new tokens"),
    (["--prompt", ""], "empty"),
    (["--prompt", "x" * 100], "context"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--dtype", "int3"], "")])
def test_generate_bad_input_exits_2_with_one_line(ckpt, capsys, extra, message):
    argv = ["generate", "--ckpt", str(ckpt)] + (["--prompt", "hi"] if "--prompt" not in extra else []) + extra
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err


def test_generate_missing_or_corrupt_checkpoint(tmp_path, ckpt, capsys):
    code, _, err = run_cli(capsys, "generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "hi")
    assert code == 2 and "not found" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    code, _, err = run_cli(capsys, "generate", "--ckpt", str(bad), "--prompt", "hi")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _subprocess(args, stdin_text):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "andromeda", *args], input=stdin_text, capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)


def test_generate_reads_the_prompt_from_stdin(ckpt):
    proc = _subprocess(["generate", "--ckpt", str(ckpt), "--max-new-tokens", "3", "--temperature", "0", "--json"],
                       "Hello")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt_tokens"] == 5


def test_chat_through_a_pipe(ckpt):
    script = "hello there\n/set temperature 0\n/set top_p 7\nsecond message\n/reset\n/bogus\n/exit\nnever read\n"
    proc = _subprocess(["chat", "--ckpt", str(ckpt), "--max-new-tokens", "4", "--temperature", "0.5",
                        "--seed", "1"], script)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "[temperature = 0.0]" in proc.stderr
    assert "cannot set top_p" in proc.stderr  # a bad value is reported, the chat goes on
    assert "[conversation reset]" in proc.stderr
    assert "commands:" in proc.stderr
    assert len(proc.stdout.splitlines()) == 2  # two answers, one line each


def test_chat_history_template_and_context_fitting():
    import io

    from andromeda.commands.chat import Chat
    from andromeda.infer.engine import Engine
    from andromeda.infer.sampling import SamplingParams

    def chat_for(max_seq_len):
        cfg = ModelConfig(vocab_size=257, max_seq_len=max_seq_len, dim=32, depth=1, attention=dict(heads=4))
        torch.manual_seed(0)
        engine = Engine(Transformer(cfg), ByteTokenizer())
        return Chat(engine, SamplingParams(max_new_tokens=3, temperature=0), system="be brief",
                    out=io.StringIO(), err=io.StringIO())

    chat = chat_for(512)
    chat.loop(["first", "second"])
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    prompt = chat._fit("third")
    assert prompt.index("be brief") < prompt.index("first") < prompt.index("second") < prompt.index("third")
    assert prompt.endswith("<|assistant|>\n")
    # A short context drops the oldest turns (never the system prompt) to leave room to answer.
    small = chat_for(96)
    small.loop(["one " * 5, "two " * 5, "three " * 5])
    prompt = small._fit("four")
    assert "be brief" in prompt and "one" not in prompt and "four" in prompt
    assert len(prompt.encode()) <= 96 - 3


def test_generate_with_a_draft_reports_acceptance(ckpt, tmp_path, capsys):
    base = ["generate", "--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "6", "--temperature", "0",
            "--json"]
    _, plain, _ = run_cli(capsys, *base)
    code, out, err = run_cli(capsys, *base, "--draft", str(ckpt), "--draft-tokens", "3")
    assert code == 0, err
    spec = json.loads(out)
    assert spec["text"] == json.loads(plain)["text"] and spec["acceptance_rate"] == 1.0
    other = tmp_path / "other"
    cfg = ModelConfig(vocab_size=300, max_seq_len=64, dim=32, depth=1, attention=dict(heads=4))
    save_checkpoint(other, Transformer(cfg), None)
    code, _, err = run_cli(capsys, *base, "--draft", str(other))
    assert code == 2 and "tokenizer" in err
