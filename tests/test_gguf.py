"""`andromeda convert --to-gguf` checked two ways.

Without llama.cpp: the file is read back with `gguf.GGUFReader` (the llama.cpp project's own
reader) and every key and tensor is compared with the checkpoint. With llama-cpp-python
importable (it builds llama.cpp from source, so it is not in the dev extra): llama.cpp runs the
file, and its greedy continuation must be the text `andromeda generate` prints, token for token;
at q8_0 its loss on held-out text must stay within 1% of andromeda's float32 loss.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import andromeda.cli  # noqa: E402
from andromeda.checkpoint import save_checkpoint  # noqa: E402
from andromeda.data.tokenizer import ByteTokenizer, CharTokenizer  # noqa: E402
from andromeda.interop.gguf import CHAT_TEMPLATE  # noqa: E402
from andromeda.interop.hf_weights import state_to_hf  # noqa: E402
from andromeda.model.config import ModelConfig  # noqa: E402
from andromeda.model.transformer import Transformer  # noqa: E402

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n")
HELD_OUT = "All:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n"


def llama_config(vocab: int, **changes) -> ModelConfig:
    cfg = dict(vocab_size=vocab, max_seq_len=256, dim=64, depth=2, tie_embeddings=False,
               attention=dict(heads=4, kv_heads=2), position=dict(kind="rope", rope_theta=10000.0),
               norm=dict(kind="rms", placement="pre", eps=1e-5), mlp=dict(kind="swiglu", hidden_dim=96))
    cfg.update(changes)
    return ModelConfig(**cfg)


def make_checkpoint(folder, tok, seed=1, **changes):
    """A random Llama-shaped model with clear argmax margins (weights at std 0.15, norms
    away from 1), so greedy decoding is not decided by rounding; seed 1 greedily writes 48
    tokens after the test prompt before any end-of-text."""
    torch.manual_seed(seed)
    model = Transformer(llama_config(tok.vocab_size, **changes))
    with torch.no_grad():
        for name, p in model.named_parameters():
            (p.uniform_(0.5, 1.5) if p.ndim == 1 else p.normal_(0, 0.15))
    save_checkpoint(folder, model, tok)
    return model


@pytest.fixture(autouse=True)
def some_commands(monkeypatch):
    monkeypatch.setattr(andromeda.cli, "COMMANDS", {k: andromeda.cli.COMMANDS[k]
                                                    for k in ("convert", "generate", "eval")})


def cli(*argv):
    return andromeda.cli.main([*map(str, argv)])


def export(tmp_path, tok, qtype="f32", **changes):
    model = make_checkpoint(tmp_path / "ckpt", tok, **changes)
    out = tmp_path / f"model-{qtype}.gguf"
    assert cli("convert", "--to-gguf", tmp_path / "ckpt", "--out", out, "--type", qtype) == 0
    return model, out


def rotate_half_to_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows [0, h, 1, h+1, ...] of every head (h = head_dim / 2), written independently of
    andromeda.interop.gguf.rope_pairs."""
    hd = w.shape[0] // heads
    order = [head * hd + (i // 2) + (i % 2) * (hd // 2) for head in range(heads) for i in range(hd)]
    return w[order]


# ---------------------------------------------------------------- no llama.cpp needed
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_reader_sees_every_key_and_tensor(qtype, tmp_path, capsys):
    tok = CharTokenizer.from_text(TEXT)
    model, path = export(tmp_path, tok, qtype)
    cfg = model.cfg
    reader = gguf.GGUFReader(path)

    def value(key):
        return reader.fields[key].contents()

    expected = {
        "general.architecture": "llama", "llama.context_length": 256, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16, "llama.attention.value_length": 16,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5), "llama.vocab_size": tok.vocab_size,
        "general.file_type": {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}[qtype], "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, want in expected.items():
        assert value(key) == want, key
    # The vocabulary: each character as GPT-2's byte alphabet writes its UTF-8 bytes, then end-of-text.
    table = {b: c for b, c in zip(range(256), _gpt2_alphabet())}
    assert value("tokenizer.ggml.tokens") == ["".join(table[b] for b in ch.encode()) for ch in tok.chars] + \
        ["<|endoftext|>"]
    assert value("tokenizer.ggml.token_type") == [1] * len(tok.chars) + [3]

    # Every tensor: the names llama.cpp's llama graph reads, shapes, types, values.
    hf = state_to_hf(model.state_dict(), cfg)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.depth):
        for theirs, ours in per_layer.items():
            names[f"model.layers.{i}.{theirs}.weight"] = f"blk.{i}.{ours}.weight"
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(names.values())
    for hf_name, gguf_name in names.items():
        want = hf[hf_name].float().numpy()
        if "q_proj" in hf_name:
            want = rotate_half_to_pairs(want, cfg.attention.heads)
        elif "k_proj" in hf_name:
            want = rotate_half_to_pairs(want, cfg.attention.kv_heads)
        t = tensors[gguf_name]
        assert list(reversed(t.shape.tolist())) == list(want.shape), gguf_name  # GGUF lists dims fastest first
        if want.ndim == 1 or qtype == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want)
        elif qtype == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want.astype(np.float16))
        elif qtype == "q8_0":
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            scale = np.abs(want).reshape(-1, 32).max(1, keepdims=True) / 127  # one scale per 32 weights
            err = np.abs(got - want).reshape(-1, 32)
            # Half a step, plus the scale's own rounding to float16 (2^-11 relative) times 127 steps.
            assert (err <= scale * (0.5 + 127 / 2048) + 1e-7).all(), gguf_name
            assert (err > 0).any()  # really quantised
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            step = np.abs(want).reshape(-1, 32).max(1, keepdims=True) / 8  # 16 levels per 32 weights
            err = np.abs(got - want).reshape(-1, 32)
            # At most one step: q4_0 maps the largest magnitude to -8 and clips the other side at +7.
            assert (err <= step * (1 + 16 / 2048) + 1e-7).all(), gguf_name
            assert (err > step / 8).any()  # really 4-bit


def _gpt2_alphabet():
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def test_non_llama_config_is_refused_naming_the_field(tmp_path, capsys):
    tok = CharTokenizer.from_text(TEXT)
    make_checkpoint(tmp_path / "ckpt", tok, mlp=dict(kind="gelu"))
    capsys.readouterr()
    assert cli("convert", "--to-gguf", tmp_path / "ckpt", "--out", tmp_path / "m.gguf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mlp.kind" in err
    assert os.listdir(tmp_path) == ["ckpt"]  # nothing written


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    tok = CharTokenizer.from_text(TEXT)
    make_checkpoint(tmp_path / "ckpt", tok)
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    capsys.readouterr()
    assert cli("convert", "--to-gguf", tmp_path / "ckpt", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and out.read_text() == "keep me"
    assert cli("convert", "--to-gguf", tmp_path / "ckpt", "--out", out, "--overwrite") == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_failure_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    tok = CharTokenizer.from_text(TEXT)
    make_checkpoint(tmp_path / "ckpt", tok)

    def disk_full(self, *a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError):
        cli("convert", "--to-gguf", tmp_path / "ckpt", "--out", tmp_path / "m.gguf")
    assert os.listdir(tmp_path) == ["ckpt"]  # no file, no temporary left behind


# ---------------------------------------------------------------- llama.cpp runs the file
def _llama(path, n_ctx=256, logits_all=False):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, n_batch=n_ctx, logits_all=logits_all,
                           verbose=False, seed=0)


def _llama_greedy(llm, prompt: str, n: int) -> list[int]:
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        if t == llm.token_eos() or len(out) == n:
            break
        out.append(t)
    return out


@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_llamacpp_greedy_continuation_is_andromeda_generate(tokenizer, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    tok = CharTokenizer.from_text(TEXT + HELD_OUT) if tokenizer == "char" else ByteTokenizer()
    _, path = export(tmp_path, tok, "f32")
    prompt, n = "First Citizen:\nYou are", 48
    capsys.readouterr()
    assert cli("generate", "--ckpt", tmp_path / "ckpt", "--prompt", prompt, "--temperature", "0",
               "--max-new-tokens", n, "--json") == 0
    ours = json.loads(capsys.readouterr().out)
    llm = _llama(path)
    try:
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == tok.encode(prompt)
        theirs = _llama_greedy(llm, prompt, n)
        text = llm.detokenize(theirs).decode("utf-8", errors="replace")
    finally:
        llm.close()
    assert len(theirs) == ours["new_tokens"] and len(theirs) >= 8
    assert text == ours["text"]


def _llamacpp_loss(path, ids: list[int]) -> float:
    llm = _llama(path, logits_all=True)
    try:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    finally:
        llm.close()
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def test_llamacpp_q8_0_loss_within_1_percent_of_float32(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    tok = CharTokenizer.from_text(TEXT + HELD_OUT)
    export(tmp_path, tok, "f32")
    make_checkpoint(tmp_path / "ckpt", tok)  # same seed: the same weights again
    assert cli("convert", "--to-gguf", tmp_path / "ckpt", "--out", tmp_path / "q8.gguf", "--type", "q8_0") == 0
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(HELD_OUT)
    capsys.readouterr()
    assert cli("eval", "--ckpt", tmp_path / "ckpt", "--data", held_out, "--doc-start", "none",
               "--dtype", "float32", "--json") == 0
    ours = json.loads(capsys.readouterr().out)["loss"]
    ids = tok.encode(HELD_OUT)
    f32 = _llamacpp_loss(tmp_path / "model-f32.gguf", ids)
    q8 = _llamacpp_loss(tmp_path / "q8.gguf", ids)
    assert math.isclose(f32, ours, rel_tol=1e-4)  # the same model, the same text, the same loss
    assert abs(q8 - ours) / ours < 0.01
    assert q8 != f32  # the q8_0 file really holds 8-bit weights


def test_cpu_vs_llamacpp_benchmark_compares_the_same_model():
    """benchmarks/cpu_vs_llamacpp.py at a toy size: llama.cpp and andromeda decode the same
    greedy tokens from the exported weights before either is timed. Speed is not asserted."""
    pytest.importorskip("llama_cpp")
    from benchmark_scripts import load_benchmark

    report = load_benchmark("cpu_vs_llamacpp").main(["--dim", "64", "--depth", "2", "--heads", "4", "--hidden", "128",
                                                     "--new-tokens", "16", "--repeats", "1", "--eager",
                                                     "--precisions", "f32"])
    (row,) = report["rows"]
    assert row["greedy_tokens_agreeing"] == 16 and row["llamacpp_tokens_per_s"] > 0
