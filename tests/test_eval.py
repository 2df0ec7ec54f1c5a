"""Evaluation: loss against a manual cross-entropy, bits per byte, uniform model, CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from andromeda.checkpoint import save_checkpoint
from andromeda.cli import main
from andromeda.data.prepare import open_prepared, prepare
from andromeda.data.tokenizer import ByteTokenizer
from andromeda.errors import UserError
from andromeda.eval.perplexity import evaluate
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer

TEXT = "It was the best of times, it was the worst of times — naïve ages.\n" * 3


def _model(max_seq_len=64, **position):
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(vocab_size=257, dim=32, depth=2, max_seq_len=max_seq_len,
                                     attention=dict(heads=4), position=position or dict(kind="rope")))
    return Transformer(cfg).eval()


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text(TEXT)
    return path


def _manual_chunked_nats(model, tokens, seq_len):
    """Predictions of tokens[1:] in chunks of seq_len by hand; the last, shorter chunk is
    read with earlier tokens in front as context, so its window is full length too."""
    nats, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, seq_len):
            scored = min(seq_len, len(tokens) - 1 - s)
            first = max(0, s + scored - seq_len)
            chunk = torch.tensor(tokens[first:s + scored + 1])
            logits = model(chunk[None, :-1])[0, -scored:]
            nats += F.cross_entropy(logits, chunk[-scored:], reduction="sum").item()
            count += scored
    return nats, count


def test_loss_matches_manual_cross_entropy(text_file):
    model = _model()
    tokens = [256] + list(TEXT.encode())
    result = evaluate(model, ByteTokenizer(), text_file, seq_len=16, batch_size=3)
    nats, count = _manual_chunked_nats(model, tokens, 16)
    assert result["tokens"] == count == len(tokens) - 1
    assert result["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)


def test_bits_per_byte_for_byte_tokenizer(text_file):
    result = evaluate(_model(), ByteTokenizer(), text_file, seq_len=32, batch_size=2)
    n_bytes = len(TEXT.encode())
    assert result["bytes"] == n_bytes == result["tokens"]  # every scored token is one byte
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2) * result["tokens"] / n_bytes)


def test_sliding_stride_with_full_context_equals_one_forward(text_file):
    model = _model(max_seq_len=512)
    tokens = torch.tensor([256] + list(TEXT.encode()))
    with torch.no_grad():
        full = F.cross_entropy(model(tokens[None, :-1])[0], tokens[1:]).item()
    for stride in (5, 64):
        result = evaluate(model, ByteTokenizer(), text_file, seq_len=len(tokens), batch_size=4, stride=stride)
        assert result["tokens"] == len(tokens) - 1
        assert result["loss"] == pytest.approx(full, rel=1e-5)
    short = evaluate(model, ByteTokenizer(), text_file, seq_len=32, batch_size=4, stride=8)
    assert short["tokens"] == len(tokens) - 1


def test_uniform_logits_give_log_vocab(text_file):
    model = _model()
    with torch.no_grad():
        model.head.weight.zero_()
    result = evaluate(model, ByteTokenizer(), text_file, seq_len=20, batch_size=4)
    assert result["loss"] == pytest.approx(math.log(257), rel=1e-6)
    assert result["perplexity"] == pytest.approx(257, rel=1e-5)


def test_prepared_val_split(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 4)
    prepare([str(tmp_path / "a.txt")], tmp_path / "data", val_fraction=0.2, progress=False)
    data = open_prepared(tmp_path / "data")
    model = _model()
    result = evaluate(model, ByteTokenizer(), tmp_path / "data", seq_len=24, batch_size=2)
    val = data.val.read(0, len(data.val)).tolist()
    nats, count = _manual_chunked_nats(model, val, 24)
    assert result["tokens"] == count and result["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert result["bytes"] == sum(1 for t in val[1:] if t < 256)
    (tmp_path / "b.txt").write_text(TEXT)
    prepare([str(tmp_path / "b.txt")], tmp_path / "chars", "char", progress=False)
    with pytest.raises(UserError, match="prepared with tokenizer char"):
        evaluate(model, ByteTokenizer(), tmp_path / "chars", seq_len=8)


def test_learned_positions_limit_seq_len(text_file):
    with pytest.raises(UserError, match="learned positions"):
        evaluate(_model(max_seq_len=16, kind="learned"), ByteTokenizer(), text_file, seq_len=32)


def test_cli_json_and_bad_inputs(tmp_path, text_file, capsys):
    save_checkpoint(tmp_path / "ckpt", _model(max_seq_len=32), ByteTokenizer())
    assert main(["eval", "--ckpt", str(tmp_path / "ckpt"), "--data", str(text_file), "--json",
                 "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(out)
    assert out["seq_len"] == 32 and out["tokens"] == len(TEXT.encode())
    (tmp_path / "empty.txt").write_text("")
    assert main(["eval", "--ckpt", str(tmp_path / "missing"), "--data", str(text_file)]) == 2
    assert main(["eval", "--ckpt", str(tmp_path / "ckpt"), "--data", str(tmp_path / "empty.txt")]) == 2
    assert main(["eval", "--ckpt", str(tmp_path / "ckpt"), "--data", str(tmp_path / "nope.txt")]) == 2
    assert main(["eval", "--ckpt", str(tmp_path / "ckpt"), "--data", str(text_file), "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "Traceback" not in err and "is not a device" in err
