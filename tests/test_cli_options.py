"""Every option of `generate`, `eval` and `prepare` changes what the user gets, the way the
library call with the same setting does. Each case also shows that the option matters here
(without it the outcome differs), and a negative control runs the command with the option
dropped on its way to the library, which the check must catch."""

import json

import pytest
import torch

from andromeda.checkpoint import load_checkpoint, save_checkpoint
from andromeda.cli import main
from andromeda.data.prepare import prepare
from andromeda.data.tokenizer import ByteTokenizer
from andromeda.eval.perplexity import evaluate
from andromeda.infer.engine import Engine
from andromeda.infer.sampling import SamplingParams
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer

PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig(vocab_size=257, max_seq_len=64, dim=32, depth=2, attention=dict(heads=4, kv_heads=2))
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # neither flat (every filter would keep almost all) nor one-hot
        model.head.weight.mul_(6.0)
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(folder, model, ByteTokenizer())
    return folder


def rows_per_forward(monkeypatch) -> list:
    """Record the batch size of every model forward from now on."""
    rows, real = [], Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, x, *a, **k: rows.append(len(x)) or real(self, x, *a, **k))
    return rows


def cli_json(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------- generate
BASE = dict(max_new_tokens=12, temperature=0.8, seed=3)  # the CLI's defaults, with a seed and a short budget


def library_text(ckpt, **params):
    model, tok, _ = load_checkpoint(ckpt)
    return Engine(model, tok).generate([PROMPT], SamplingParams(**{**BASE, **params}))[0].text


# (flag and value, the SamplingParams field it sets)
SAMPLING_CASES = [
    (["--temperature", "0"], dict(temperature=0.0)),
    (["--top-k", "3"], dict(top_k=3)),
    (["--top-p", "0.3"], dict(top_p=0.3)),
    (["--min-p", "0.3"], dict(min_p=0.3)),
    (["--seed", "4"], dict(seed=4)),
    (["--temperature", "0", "--repetition-penalty", "4"], dict(temperature=0.0, repetition_penalty=4.0)),
]


def generate_argv(ckpt, flags):
    return ["generate", "--ckpt", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "12", "--seed", "3",
            *flags, "--json"]


@pytest.mark.parametrize("flags, params", SAMPLING_CASES, ids=[" ".join(c[0]) for c in SAMPLING_CASES])
def test_each_sampling_option_reaches_the_engine(ckpt, capsys, monkeypatch, flags, params):
    want = library_text(ckpt, **params)
    # The option matters for this prompt: the library without it generates something else.
    without = {k: v for k, v in params.items() if k == "temperature" and "repetition_penalty" in params}
    assert library_text(ckpt, **without) != want
    assert cli_json(capsys, *generate_argv(ckpt, flags))["text"] == want

    # Negative control: a CLI that parses the option but drops it is caught by the same check.
    import andromeda.commands.generate as generate_command
    real = generate_command.sampling_params
    dropped = {k: getattr(SamplingParams(**BASE), k) for k in params if k not in without}
    monkeypatch.setattr(generate_command, "sampling_params", lambda args: real(args).replace(**dropped))
    assert cli_json(capsys, *generate_argv(ckpt, flags))["text"] != want


def test_stop_string_ends_the_streamed_and_the_json_text(ckpt, capsys):
    greedy = library_text(ckpt, temperature=0.0)
    stop = greedy[4:6]
    want = greedy[:greedy.index(stop)]
    assert want != greedy and stop not in want
    assert library_text(ckpt, temperature=0.0, stop=(stop,)) == want
    result = cli_json(capsys, *generate_argv(ckpt, ["--temperature", "0", "--stop", stop]))
    assert result["text"] == want and result["finish_reason"] == "stop"
    # Streamed to the terminal: exactly the same text, then a newline; nothing of the stop string.
    argv = generate_argv(ckpt, ["--temperature", "0", "--stop", stop])[:-1]
    assert main(argv) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(argv[:-2]) == 0  # without --stop the stream runs on
    assert capsys.readouterr().out == greedy + "\n"


def test_prompt_file_and_num_samples(ckpt, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text(PROMPT)
    argv = ["generate", "--ckpt", str(ckpt), "--max-new-tokens", "12", "--seed", "3", "--json"]
    from_file = cli_json(capsys, *argv, "--prompt-file", str(tmp_path / "prompt.txt"))
    assert from_file["prompt_tokens"] == len(PROMPT) and from_file["text"] == library_text(ckpt)
    other = tmp_path / "other.txt"
    other.write_text("a different prompt")
    assert cli_json(capsys, *argv, "--prompt-file", str(other))["prompt_tokens"] == len("a different prompt")
    # Two samples of one prompt: sample i draws with seed + i, so they differ, and the first is
    # what a single sample with the same seed gives.
    two = cli_json(capsys, *argv, "--prompt", PROMPT, "--num-samples", "2")
    assert [r["text"] for r in two] == [library_text(ckpt), library_text(ckpt, seed=4)]
    assert two[0]["text"] != two[1]["text"]


# ---------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A prepared folder whose splits hold several short documents each."""
    root = tmp_path_factory.mktemp("held_out")
    for i in range(12):
        (root / f"{i:02d}.txt").write_text(f"document {i}: it was the best of times, the worst of times. " * 2)
    prepare([str(root)], root / "data", val_fraction=0.5, progress=False)
    return root / "data"


# (flags, evaluate's keywords); every run also passes --seq-len 32 (a later --seq-len wins)
EVAL_CASES = [
    (["--seq-len", "16"], dict(seq_len=16)),
    (["--stride", "8"], dict(stride=8)),
    (["--doc-mask"], dict(doc_mask=True)),
    (["--split", "train"], dict(split="train")),
]


@pytest.mark.parametrize("flags, kwargs", EVAL_CASES, ids=[c[0][0] for c in EVAL_CASES])
def test_each_eval_option_reaches_evaluate(ckpt, held_out, capsys, flags, kwargs):
    model, tok, _ = load_checkpoint(ckpt)
    argv = ["eval", "--ckpt", str(ckpt), "--data", str(held_out), "--seq-len", "32", "--json"]
    want = evaluate(model, tok, held_out, **{"seq_len": 32, **kwargs})
    got = cli_json(capsys, *argv, *flags)
    assert got["tokens"] == want["tokens"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    # Negative control: a command that ignored the option would print the default run's figures,
    # which the same comparison rejects.
    default = cli_json(capsys, *argv)
    assert default["loss"] != pytest.approx(want["loss"], rel=1e-5)


def test_eval_batch_size_sets_the_windows_per_forward(ckpt, held_out, capsys, monkeypatch):
    """--batch-size only regroups windows (same figures by design), so it is seen in the forward calls."""
    widths = rows_per_forward(monkeypatch)
    argv = ["eval", "--ckpt", str(ckpt), "--data", str(held_out), "--seq-len", "16", "--json"]
    one = cli_json(capsys, *argv, "--batch-size", "1")
    assert set(widths) == {1}
    widths.clear()
    three = cli_json(capsys, *argv, "--batch-size", "3")
    assert max(widths) == 3 and one["loss"] == pytest.approx(three["loss"], rel=1e-5)


# ---------------------------------------------------------------- prepare
@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.txt").write_text(f"document number {i} " * (5 + i))
    (folder / "r.jsonl").write_text(json.dumps({"text": "row", "body": "a body field"}) + "\n")
    return folder


def sources_bytes(meta):
    return meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]


# (prepare's keyword, the flags that set it, what the resulting meta.json shows; None = the default run)
PREPARE_CASES = [
    ("max_docs", ["--max-docs", "3"], lambda m, base: m["documents"] == 3 < base["documents"]),
    ("shard_tokens", ["--shard-tokens", "50"],
     lambda m, base: len(m["splits"]["train"]["shards"]) > 1 == len(base["splits"]["train"]["shards"])),
    ("seed", ["--seed", "5"], lambda m, base: m["splits"]["val"]["tokens"] != base["splits"]["val"]["tokens"]),
    ("min_val_tokens", ["--min-val-tokens", "300"],
     lambda m, base: m["splits"]["val"]["tokens"] >= 300 > base["splits"]["val"]["tokens"]),
    ("doc_mask", ["--doc-mask"], lambda m, base: m["doc_mask"] is True and base["doc_mask"] is False),
    ("field", ["--field", "body"],
     lambda m, base: sources_bytes(m) == sources_bytes(base) - len("row") + len("a body field")),
    ("val_fraction", ["--val-fraction", "0.5"],
     lambda m, base: m["splits"]["val"]["documents"] > base["splits"]["val"]["documents"]),
]


@pytest.mark.parametrize("keyword, flags, shows", PREPARE_CASES, ids=[c[0] for c in PREPARE_CASES])
def test_each_prepare_option_reaches_prepare(corpus, tmp_path, capsys, monkeypatch, keyword, flags, shows):
    import inspect

    import andromeda.commands.prepare as prepare_command

    def run(name):
        return cli_json(capsys, "prepare", "--data", str(corpus), "--out", str(tmp_path / name), "--json",
                        "--val-fraction", "0.1", *flags if name != "base" else ())

    base = run("base")
    assert shows(run("with"), base)
    # Negative control: the option parsed but replaced by prepare's default on the way.
    default = inspect.signature(prepare).parameters[keyword].default
    real = prepare_command.prepare
    monkeypatch.setattr(prepare_command, "prepare", lambda *a, **k: real(*a, **{**k, keyword: default}))
    assert not shows(run("dropped"), base)


# ---------------------------------------------------------------- train
@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    (root / "corpus.txt").write_text("".join(f"line {i % 13} is here.\n" for i in range(300)))
    prepare([str(root / "corpus.txt")], root / "data", "byte", val_fraction=0.1, progress=False)
    return root / "data"


def train_once(tmp_path, data, name, *flags):
    from safetensors.torch import load_file
    run = tmp_path / name
    assert main(["train", "--preset", "llama-tiny", "--set", "dim=32", "--set", "train.seq_len=32", "--data",
                 str(data), "--out", str(run), "--max-steps", "1", "--no-progress", *flags]) == 0
    return load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))


def test_train_seed_and_batch_size_options(tmp_path, train_data, capsys, monkeypatch):
    """--seed sets the initialisation (and data order): the same seed twice gives the same
    weights, another seed others; a command that ignored it would give equal weights for both."""
    a = train_once(tmp_path, train_data, "a", "--seed", "1")
    again = train_once(tmp_path, train_data, "again", "--seed", "1")
    b = train_once(tmp_path, train_data, "b", "--seed", "2")
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not torch.equal(a["embed.weight"], b["embed.weight"])
    # --batch-size: the training forwards see that many rows (the preset's own is another number).
    rows = rows_per_forward(monkeypatch)
    train_once(tmp_path, train_data, "batch3", "--batch-size", "3", "--set", "train.eval_batches=1")
    assert rows[0] == 3
    rows.clear()
    train_once(tmp_path, train_data, "default", "--set", "train.eval_batches=1")
    assert rows[0] != 3
    capsys.readouterr()


# ---------------------------------------------------------------- chat
def test_chat_system_prompt_reaches_the_model(ckpt, capsys, monkeypatch):
    """--system had no test through the command: the answer to the same message with and without
    it differs, and each is what the Chat loop with that system prompt answers."""
    import io
    import sys

    from andromeda.commands.chat import Chat

    def cli_answer(*flags):
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
        assert main(["chat", "--ckpt", str(ckpt), "--temperature", "0", "--max-new-tokens", "6", *flags]) == 0
        return capsys.readouterr().out

    def library_answer(system):
        model, tok, _ = load_checkpoint(ckpt)
        out = io.StringIO()
        Chat(Engine(model, tok), SamplingParams(max_new_tokens=6, temperature=0), system=system, out=out,
             err=io.StringIO()).loop(["hi"])
        return out.getvalue()

    with_system = cli_answer("--system", "be brief")
    assert with_system == library_answer("be brief") and with_system.strip()
    assert cli_answer() == library_answer(None) != with_system
