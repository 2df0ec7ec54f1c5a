"""Data preparation: sources, tokenizers, shards, splits and meta.json."""

import hashlib
import json

import numpy as np
import pytest

from andromeda.cli import main
from andromeda.data import sources as sources_module
from andromeda.data.prepare import open_prepared, prepare, prepare_default_corpus
from andromeda.data.shards import TokenStream, dtype_for_vocab
from andromeda.data.tokenizer import ByteTokenizer, load_tokenizer
from andromeda.errors import UserError

DOCS = ["The quick brown fox.\n", "Jumps over the lazy dog — twice.\n", "Ünïcödé text: 日本語\n", "short"]


def _write_folder(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "a.txt", folder / "b.md", folder / "sub" / "c.txt", folder / "sub" / "d.txt"]
    for path, text in zip(paths, DOCS):
        path.write_text(text, encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\0\1\2")  # unknown suffix inside a folder: skipped
    return folder, paths


def _documents(data, split):
    """Split a prepared stream at its document starts."""
    stream, starts = data.split(split), list(data.doc_starts[split]) + [len(data.split(split))]
    tokens = stream.read(0, len(stream))
    return [tokens[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def test_byte_prepare_keeps_every_document_and_meta(tmp_path):
    folder, paths = _write_folder(tmp_path)
    meta = prepare([str(folder)], tmp_path / "out", "byte", val_fraction=0.5, progress=False)
    data = open_prepared(tmp_path / "out")
    eos = ByteTokenizer.eos_id
    docs = _documents(data, "train") + _documents(data, "val")
    assert all(d[0] == eos for d in docs)  # layout: [eos] + tokens
    assert sorted(bytes(d[1:]).decode() for d in docs) == sorted(DOCS)
    assert meta["dtype"] == "uint16" and meta["documents"] == 4
    assert meta["splits"]["val"]["documents"] >= 1 and meta["splits"]["train"]["documents"] >= 1
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["tokens"] == len(data.split(split)) == sum(s["tokens"] for s in info["shards"])
        assert info["bytes"] == sum(len(bytes(d[1:])) for d in _documents(data, split))
    recorded = {r["path"]: r["sha256"] for r in meta["sources"]}
    assert recorded == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    raw = np.fromfile(tmp_path / "out" / meta["splits"]["train"]["shards"][0]["file"], dtype="<u2")
    assert raw.tolist() == data.train.read(0, len(raw)).tolist()  # plain little-endian files
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta


def test_shards_split_and_read_across_files(tmp_path):
    folder, _ = _write_folder(tmp_path)
    prepare([str(folder)], tmp_path / "one", "byte", val_fraction=0.5, progress=False)
    meta = prepare([str(folder)], tmp_path / "many", "byte", val_fraction=0.5, shard_tokens=7, progress=False)
    assert len(meta["splits"]["train"]["shards"]) > 2
    assert all(s["tokens"] <= 7 for s in meta["splits"]["train"]["shards"])
    one, many = open_prepared(tmp_path / "one"), open_prepared(tmp_path / "many")
    n = len(one.train)
    assert len(many.train) == n
    full = one.train.read(0, n)
    for start, length in [(0, n), (3, 11), (6, 2), (n - 5, 5)]:
        assert many.train.read(start, length).tolist() == full[start:start + length].tolist()


def test_single_document_splits_token_stream_at_the_end(tmp_path):
    text = "to be or not to be, that is the question\n" * 40
    (tmp_path / "one.txt").write_text(text)
    meta = prepare([str(tmp_path / "one.txt")], tmp_path / "out", "byte", val_fraction=0.1, progress=False)
    data = open_prepared(tmp_path / "out")
    expected = [256] + list(text.encode())
    joined = data.train.read(0, len(data.train)).tolist() + data.val.read(0, len(data.val)).tolist()
    assert joined == expected
    assert len(data.val) == round(0.1 * len(expected))
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(text.encode())


def test_val_never_empty_with_two_documents(tmp_path):
    for i, text in enumerate(["first document, rather long " * 5, "second"]):
        (tmp_path / f"{i}.txt").write_text(text)
    meta = prepare([str(tmp_path / "0.txt"), str(tmp_path / "1.txt")], tmp_path / "out", progress=False)
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 1
    data = open_prepared(tmp_path / "out")
    assert bytes(data.val.read(1, len(data.val) - 1).tolist()).decode() == "second"


def test_min_val_tokens_moves_the_end_of_training(tmp_path):
    folder, _ = _write_folder(tmp_path)
    meta = prepare([str(folder)], tmp_path / "out", val_fraction=0.001, min_val_tokens=30, progress=False)
    assert meta["splits"]["val"]["tokens"] >= 30
    data = open_prepared(tmp_path / "out")
    tokens = data.train.read(0, len(data.train)).tolist() + data.val.read(0, len(data.val)).tolist()
    assert bytes(t for t in tokens if t != 256).decode() == "".join(DOCS)  # order kept


def test_char_tokenizer_from_corpus(tmp_path):
    folder, _ = _write_folder(tmp_path)
    meta = prepare([str(folder)], tmp_path / "out", "char", val_fraction=0.5, progress=False)
    data = open_prepared(tmp_path / "out")
    assert meta["tokenizer"]["chars"] == "".join(sorted(set("".join(DOCS))))
    texts = sorted(data.tokenizer.decode(d[1:]) for d in _documents(data, "train") + _documents(data, "val"))
    assert texts == sorted(DOCS)


def test_bpe_tokenizer_trains_and_encodes_like_the_library(tmp_path):
    corpus = tmp_path / "c.jsonl"
    rows = [{"text": f"row {i}: the cat sat on the mat with {i % 7} friends."} for i in range(60)]
    corpus.write_text("\n".join(json.dumps(r) for r in rows))
    meta = prepare([str(corpus)], tmp_path / "out", "bpe:300", val_fraction=0.1, progress=False)
    data = open_prepared(tmp_path / "out")
    tok = data.tokenizer
    assert meta["vocab_size"] == tok.vocab_size <= 300 and tok.eos_id is not None
    assert tok.tok.id_to_token(tok.eos_id) == "<|endoftext|>"
    docs = _documents(data, "train") + _documents(data, "val")
    assert sorted(map(tuple, docs)) == sorted(tuple([tok.eos_id] + tok.encode(r["text"])) for r in rows)
    reloaded = load_tokenizer(meta["tokenizer"], tmp_path / "out")
    assert reloaded.encode("the cat sat") == tok.encode("the cat sat")
    assert tok.bytes_of([tok.eos_id] + tok.encode("café")) == len("café".encode())


def test_tokenizer_json_path_and_uint32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    vocab["<|endoftext|>"] = 70000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "t.txt").write_text("w5 w69999 w65536\n")
    (tmp_path / "u.txt").write_text("w1 w2\n")
    meta = prepare([str(tmp_path / "t.txt"), str(tmp_path / "u.txt")], tmp_path / "out",
                   str(tmp_path / "tokenizer.json"), progress=False)
    assert dtype_for_vocab(65535) == np.dtype("<u2") and meta["dtype"] == "uint32"
    data = open_prepared(tmp_path / "out")
    assert data.train.read(0, 4).tolist() == [70000, 5, 69999, 65536]


def test_sentencepiece_model_path(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"sentence number {i} about pieces and models" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="unigram", minloglevel=2)
    meta = prepare([str(text)], tmp_path / "out", str(tmp_path / "sp.model"), val_fraction=0.1, progress=False)
    data = open_prepared(tmp_path / "out")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    joined = data.train.read(0, len(data.train)).tolist() + data.val.read(0, len(data.val)).tolist()
    assert meta["tokenizer"]["kind"] == "sentencepiece"
    assert joined == [sp.eos_id()] + sp.encode(text.read_text())
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (tmp_path / "sp.model").read_bytes()


def test_parquet_and_datasets_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["alpha", "beta", "gamma"]}), tmp_path / "t.parquet")
    prepare([str(tmp_path / "t.parquet")], tmp_path / "pq", field="body", val_fraction=0.5, progress=False)
    data = open_prepared(tmp_path / "pq")
    texts = sorted(bytes(d[1:]).decode() for d in _documents(data, "train") + _documents(data, "val"))
    assert texts == ["alpha", "beta", "gamma"]
    with pytest.raises(UserError, match="no column 'text'"):
        prepare([str(tmp_path / "t.parquet")], tmp_path / "pq2", progress=False)

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two", "three"]}).save_to_disk(str(tmp_path / "ds"))
    meta = prepare([str(tmp_path / "ds")], tmp_path / "hf", val_fraction=0.5, progress=False)
    data = open_prepared(tmp_path / "hf")
    texts = sorted(bytes(d[1:]).decode() for d in _documents(data, "train") + _documents(data, "val"))
    assert texts == ["one", "three", "two"] and meta["sources"]


def test_long_text_file_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_module, "READ_CHUNK", 5)  # cut multi-byte characters between reads
    text = "línea uno\nzwei — drei\n日本語のテキスト\nlast line without newline"
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text("other")
    prepare([str(tmp_path)], tmp_path / "out", val_fraction=0.5, progress=False)
    data = open_prepared(tmp_path / "out")
    docs = _documents(data, "train") + _documents(data, "val")
    assert sorted(bytes(d[1:]).decode() for d in docs) == sorted([text, "other"])
    assert len(docs) == 2


def test_limits_and_default_corpus(tmp_path):
    meta = prepare_default_corpus(tmp_path / "std", max_docs=6, max_bytes=None, min_val_tokens=0, progress=False)
    assert meta["documents"] == 6 and meta["splits"]["val"]["tokens"] > 0
    assert len(meta["sources"]) == 6 and all(len(r["sha256"]) == 64 for r in meta["sources"])
    meta = prepare_default_corpus(tmp_path / "std2", max_bytes=20_000, progress=False)
    first_docs_bytes = sum(r["bytes"] for r in meta["sources"][:-1])
    assert first_docs_bytes < 20_000 <= first_docs_bytes + meta["sources"][-1]["bytes"]
    data = open_prepared(tmp_path / "std2")
    assert data.tokenizer.decode(data.train.read(1, 50).tolist()) in open(meta["sources"][0]["path"]).read()


def test_doc_index_agrees_with_eos_positions(tmp_path):
    folder, _ = _write_folder(tmp_path)
    prepare([str(folder)], tmp_path / "out", val_fraction=0.3, doc_mask=True, progress=False)
    data = open_prepared(tmp_path / "out")
    assert data.meta["doc_mask"] is True
    for split in ("train", "val"):
        tokens = data.split(split).read(0, len(data.split(split)))
        assert np.flatnonzero(tokens == 256).tolist() == list(data.doc_starts[split])


@pytest.mark.parametrize("setup, message", [
    (lambda p: p.write_bytes(b"abc\0def"), "looks binary"),
    (lambda p: p.write_bytes(b"caf\xe9"), "not UTF-8"),
    (lambda p: p.write_text(""), "empty"),
])
def test_bad_text_inputs(tmp_path, setup, message):
    path = tmp_path / "x.txt"
    setup(path)
    with pytest.raises(UserError, match=message):
        prepare([str(path)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_jsonl_and_options(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"body": "c"}\n')
    with pytest.raises(UserError, match=r"x.jsonl:4: record has no field 'text'"):
        prepare([str(path)], tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="unknown tokenizer"):
        prepare([str(path)], tmp_path / "out", "wordpiece", progress=False)
    with pytest.raises(UserError, match="val-fraction"):
        prepare([str(path)], tmp_path / "out", val_fraction=0.0, progress=False)
    with pytest.raises(UserError, match="not found"):
        prepare([str(tmp_path / "missing.txt")], tmp_path / "out", progress=False)


def test_existing_folder_is_protected(tmp_path):
    (tmp_path / "a.txt").write_text("some text here")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not prepared data"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_cli_prepare(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello there\n" * 20)
    out = tmp_path / "out"
    assert main(["prepare", "--data", str(tmp_path / "a.txt"), "--tokenizer", "char", "--val-fraction", "0.1",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert open_prepared(out).meta["tokenizer"]["kind"] == "char"
    assert main(["prepare", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert main(["prepare", "--data", str(tmp_path / "a.txt"), "--tokenizer", "bpe:x",
                 "--out", str(tmp_path / "o3")]) == 2
    assert "error:" in capsys.readouterr().err


def test_token_stream_bounds(tmp_path):
    np.arange(10, dtype="<u2").tofile(tmp_path / "s0.bin")
    np.arange(10, 13, dtype="<u2").tofile(tmp_path / "s1.bin")
    stream = TokenStream(tmp_path, [("s0.bin", 10), ("s1.bin", 3)], np.dtype("<u2"))
    assert stream.read(8, 5).tolist() == [8, 9, 10, 11, 12]
    with pytest.raises(IndexError):
        stream.read(9, 5)


def test_prepare_says_when_validation_is_tiny(tmp_path, capsys):
    """One long document with the default split leaves a few tokens of validation: the summary
    says so and names the flags; a split of the size it suggests is not flagged."""
    (tmp_path / "book.txt").write_text("to be or not to be, that is the question\n" * 500)
    assert main(["prepare", "--data", str(tmp_path / "book.txt"), "--tokenizer", "char",
                 "--out", str(tmp_path / "small")]) == 0
    err = capsys.readouterr().err
    val = open_prepared(tmp_path / "small").meta["splits"]["val"]["tokens"]
    assert val < 100 and f"validation holds only {val:,} tokens" in err and "--min-val-tokens" in err
    assert main(["prepare", "--data", str(tmp_path / "book.txt"), "--tokenizer", "char",
                 "--min-val-tokens", "5000", "--out", str(tmp_path / "big")]) == 0
    assert "validation holds only" not in capsys.readouterr().err
    assert open_prepared(tmp_path / "big").meta["splits"]["val"]["tokens"] >= 5000
