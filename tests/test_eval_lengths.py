"""`andromeda eval --lengths`: same targets at every length, against a per-token manual loss."""

import json

import torch
import torch.nn.functional as F

from andromeda.checkpoint import save_checkpoint
from andromeda.cli import main
from andromeda.data.tokenizer import ByteTokenizer
from andromeda.eval.lengths import evaluate_lengths
from andromeda.eval.perplexity import load_eval_tokens
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 2


def _model(max_seq_len=32, **position):
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(vocab_size=257, dim=32, depth=2, max_seq_len=max_seq_len,
                                     attention=dict(heads=4), position=position or dict(kind="rope")))
    return Transformer(cfg).eval()


def _manual(model, tokens, length, first):
    """Each target t >= first predicted from exactly the `length` tokens before it."""
    nats = 0.0
    with torch.no_grad():
        for t in range(first, len(tokens)):
            logits = model(torch.tensor(tokens[t - length:t])[None])[0, -1]
            nats += F.cross_entropy(logits, torch.tensor(tokens[t])).item()
    return nats / (len(tokens) - first)


def test_lengths_score_same_targets_and_match_manual(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    model = _model()
    data = load_eval_tokens(path, ByteTokenizer())
    tokens = data.tokens.read(0, data.length).tolist()
    rows = evaluate_lengths(model, data, [8, 24], stride=1)
    assert [r["tokens"] for r in rows] == [len(tokens) - 24] * 2
    for row in rows:
        assert abs(row["loss"] - _manual(model, tokens, row["length"], 24)) < 1e-4
    # Negative control: the manual loss at the other length differs, so the check can fail.
    assert abs(rows[0]["loss"] - _manual(model, tokens, 24, 24)) > 1e-4
    strided = evaluate_lengths(model, data, [8, 24], stride=4)
    assert [r["tokens"] for r in strided] == [r["tokens"] for r in rows]
    assert abs(strided[1]["loss"] - rows[1]["loss"]) < 0.2  # same targets, a little less context


def test_cli_lengths_json_and_bad_inputs(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    (tmp_path / "short.txt").write_text("tiny")
    save_checkpoint(tmp_path / "rope", _model(), ByteTokenizer())
    save_checkpoint(tmp_path / "alibi", _model(kind="none", alibi_heads=4), ByteTokenizer())
    data = str(tmp_path / "t.txt")
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "alibi"), "--data", data, "--lengths", "16,64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [sorted(r) for r in rows] == [["length", "loss", "perplexity", "tokens"]] * 2
    assert [r["length"] for r in rows] == [16, 64] and rows[0]["tokens"] == rows[1]["tokens"]
    # RoPE beyond max_seq_len without scaling: says what to set.
    assert main(["eval", "--ckpt", str(tmp_path / "rope"), "--data", data, "--lengths", "16,64"]) == 2
    assert "rope_scaling" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path / "rope"), "--data", str(tmp_path / "short.txt"),
                 "--lengths", "8,16"]) == 2
    assert "too short" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path / "rope"), "--data", data, "--lengths", "8,x"]) == 2


def test_cli_lengths_table_plot_and_one_line_errors(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("")
    save_checkpoint(tmp_path / "rope", _model(), ByteTokenizer())
    ckpt, data = str(tmp_path / "rope"), str(tmp_path / "t.txt")
    png = tmp_path / "len.png"
    capsys.readouterr()
    assert main(["eval", "--ckpt", ckpt, "--data", data, "--lengths", "8,16,32", "--plot", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["length", "loss", "perplexity", "tokens"]
    table = [line.split() for line in lines[1:]]
    assert [int(r[0]) for r in table] == [8, 16, 32] and len({r[3] for r in table}) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The table shows what --json reports.
    assert main(["eval", "--ckpt", ckpt, "--data", data, "--lengths", "8,16,32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [f"{r['loss']:.4f}" for r in rows] == [r[1] for r in table]
    # Bad input: one line on stderr, exit 2, before any scoring.
    for argv, words in [
        (["--data", str(tmp_path / "empty.txt"), "--lengths", "8,16"], "no text"),
        (["--data", data, "--lengths", "8,16", "--plot", str(tmp_path / "len.txt")], ".png"),
        (["--data", data, "--lengths", "8,16", "--plot", str(tmp_path / "no" / "x.png")], "does not exist"),
        (["--data", data, "--plot", str(png)], "--lengths"),
        (["--data", data, "--lengths", "8,64"], "position.rope_factor >= 2"),
        (["--data", data, "--lengths", "1,8"], ">= 2"),
    ]:
        assert main(["eval", "--ckpt", ckpt] + argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (argv, err)
