"""Instruction tuning: the chat template, record validation, response-only loss, and a short
`andromeda train --sft` run that lowers the loss on response tokens."""

import json

import pytest
import torch
import torch.nn.functional as F

from andromeda.checkpoint import load_checkpoint, save_checkpoint
from andromeda.cli import main
from andromeda.data.chat_template import END_OF_TURN, render_chat, render_instruction
from andromeda.data.tokenizer import ByteTokenizer
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer
from andromeda.train.sft import IGNORE, SFTLoader, encode_example, load_sft, read_sft_records

TINY = dict(vocab_size=260, max_seq_len=128, dim=32, depth=2, attention=dict(heads=2),
            mlp=dict(multiple_of=16))

COLORS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
          ("blood", "red"), ("sun", "yellow")]


def dolly_records():
    return [{"instruction": f"What color is the {thing}?", "context": "" if i % 2 else "Answer briefly.",
             "response": f"The {thing} is {color}."} for i, (thing, color) in enumerate(COLORS)]


def chat_records():
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"Color of {thing}?"},
                          {"role": "assistant", "content": color},
                          {"role": "user", "content": "Sure?"},
                          {"role": "assistant", "content": "Yes."}]} for thing, color in COLORS]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def base_ckpt(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(TINY))
    return save_checkpoint(tmp_path / "base", model, ByteTokenizer())


def test_template_spans_are_exactly_the_assistant_turns():
    messages = chat_records()[0]["messages"]
    r = render_chat(messages)
    assert [r.text[a:b] for a, b in r.spans] == ["blue" + END_OF_TURN, "Yes." + END_OF_TURN]
    assert "".join(piece for piece, _ in r.segments()) == r.text
    # The generation prompt is the prefix the model saw before its answer in training.
    prompt = render_chat(messages[:2], add_generation_prompt=True).text
    assert r.text.startswith(prompt)
    inst = render_instruction("Q?", "ctx", "A.")
    assert inst.text.startswith(render_instruction("Q?", "ctx").text)
    assert [inst.text[a:b] for a, b in inst.spans] == ["A." + END_OF_TURN]


def test_only_response_tokens_are_targets(tmp_path):
    tok = ByteTokenizer()
    for records in (dolly_records(), chat_records()):
        path = write_jsonl(tmp_path / "d.jsonl", records)
        train, val = load_sft(path, tok, seq_len=250)
        assert len(train) == len(records) and not val
        for pack in (False, True):
            loader = SFTLoader(train, batch_size=3, seq_len=250, seed=1, pack=pack)
            seen = []
            for _ in range(4):
                x, y, doc = loader.next_batch()
                assert x.shape == y.shape and (doc is not None) == pack
                # Targets are the next input tokens wherever they carry loss.
                assert torch.equal(y[:, :-1][y[:, :-1] != IGNORE], x[:, 1:][y[:, :-1] != IGNORE])
                for row in y:
                    seen.append(tok.decode(row[row != IGNORE].tolist()))
            # Independent reference: the assistant contents of the records, each closed by the marker.
            answers = set()
            for rec in records:
                msgs = rec.get("messages") or [{"role": "assistant", "content": rec["response"]}]
                answers |= {m["content"] + END_OF_TURN for m in msgs if m["role"] == "assistant"}
            for text in seen:
                for part in text.split(END_OF_TURN)[:-1]:
                    assert part + END_OF_TURN in answers
                assert text.endswith(END_OF_TURN)


def padded_target_texts(path, tok):
    """The decoded loss-carrying targets of every padded row of one epoch (one record per row)."""
    train, _ = load_sft(path, tok, seq_len=250)
    loader = SFTLoader(train, batch_size=len(train), seq_len=250, seed=1, pack=False)
    _, y, _ = loader.next_batch()
    return sorted(tok.decode(row[row != IGNORE].tolist()) for row in y)


def test_every_response_turn_is_a_target(tmp_path, monkeypatch):
    """A padded row's targets are exactly all assistant turns of its record: the test above only
    asks that each target piece be some answer, which a loader that trained on the first turn
    of a conversation alone (or dropped a turn) also passes."""
    import andromeda.train.sft as sft
    tok = ByteTokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", chat_records())
    want = sorted("".join(m["content"] + END_OF_TURN for m in rec["messages"] if m["role"] == "assistant")
                  for rec in chat_records())
    assert padded_target_texts(path, tok) == want
    # Negative control: only the first assistant span carries loss.
    real = sft.render_chat

    def first_turn_only(messages, **kw):
        r = real(messages, **kw)
        r.spans = r.spans[:1]
        return r
    monkeypatch.setattr(sft, "render_chat", first_turn_only)
    assert padded_target_texts(path, tok) != want


def test_packed_rows_keep_examples_apart(tmp_path):
    tok = ByteTokenizer()
    train, _ = load_sft(write_jsonl(tmp_path / "d.jsonl", dolly_records()), tok, seq_len=300)
    x, y, doc = SFTLoader(train, batch_size=2, seq_len=300, seed=0, pack=True).next_batch()
    assert x.shape[1] <= 300
    for r in range(x.shape[0]):
        assert doc[r].unique().numel() >= 2  # several examples share the row
        border = (doc[r, 1:] != doc[r, :-1]).nonzero().flatten()
        assert (y[r, border] == IGNORE).all()  # no target across an example border


def test_loader_state_resumes_the_same_batches(tmp_path):
    train, _ = load_sft(write_jsonl(tmp_path / "d.jsonl", dolly_records()), ByteTokenizer(), seq_len=120)
    a = SFTLoader(train, batch_size=4, seq_len=120, seed=3)
    for _ in range(3):
        a.next_batch()
    b = SFTLoader(train, batch_size=4, seq_len=120, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(3):  # crosses an epoch border
        assert all(torch.equal(u, v) for u, v in zip(a.next_batch()[:2], b.next_batch()[:2]))


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x"}', "line 2: record has no 'response'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: 'messages' has no assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
     "line 2: message 0 has role 'robot'"),
    ("not json", "line 2: not valid JSON"),
])
def test_bad_records_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(dolly_records()[0]) + "\n" + line + "\n")
    with pytest.raises(Exception, match=message):
        read_sft_records(path)


def test_cli_bad_record_exits_2(tmp_path, base_ckpt, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c"}\n')
    code = main(["train", "--sft", str(path), "--init", str(base_ckpt), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--no-progress"])
    assert code == 2
    assert "line 1" in capsys.readouterr().err


def response_loss(model, tokenizer, records) -> float:
    """Mean loss over response tokens, computed from the template spans directly."""
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            rendered = render_instruction(rec["instruction"], rec["context"], rec["response"])
            ex = encode_example(rendered, tokenizer, 10_000)
            ids = torch.tensor(ex.ids)
            logits = model(ids[None, :-1])[0]
            mask = torch.tensor(ex.loss[1:])
            total += F.cross_entropy(logits[mask], ids[1:][mask], reduction="sum").item()
            count += int(mask.sum())
    return total / count


def test_sft_run_lowers_response_loss(tmp_path, base_ckpt, capsys):
    records = dolly_records()
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    out = tmp_path / "run"
    code = main(["train", "--sft", str(data), "--init", str(base_ckpt), "--out", str(out), "--max-steps", "40",
                 "--set", "train.lr=3e-3", "--set", "train.batch_size=6", "--set", "train.warmup_frac=0.05",
                 "--set", "train.log_every=5", "--no-progress"])
    assert code == 0
    final = capsys.readouterr().out.strip().splitlines()[-1]
    base, tok, _ = load_checkpoint(base_ckpt)
    tuned, tok2, cfg = load_checkpoint(final)
    assert tok2.spec() == tok.spec()
    before, after = response_loss(base, tok, records), response_loss(tuned, tok, records)
    assert after < 0.6 * before, (before, after)
    # The logged train loss is the response-token loss, so it falls the same way.
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]


def test_sft_needs_init(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", dolly_records())
    assert main(["train", "--sft", str(data), "--preset", "llama-tiny", "--out", str(tmp_path / "r")]) == 2
