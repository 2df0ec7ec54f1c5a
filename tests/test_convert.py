"""`andromeda convert` end to end on `save_pretrained` folders made here (no downloads).

The Hugging Face folder holds a tiny random Llama (single-file or sharded safetensors) and a
BPE tokenizer trained in the test and saved through transformers' PreTrainedTokenizerFast.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import andromeda.cli  # noqa: E402
from andromeda.checkpoint import load_checkpoint  # noqa: E402

ALL_COMMANDS = dict(andromeda.cli.COMMANDS)

CORPUS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
          "to be or not to be, that is the question", "all that glitters is not gold"] * 5
SAMPLES = ["the lazy fox", "to be, or not", "gold stitch 42!", "unseen wörds"]


def make_tokenizer(adds_bos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if adds_bos:  # like Llama's tokenizer: bos is added in front of every text when special tokens are on
        bos = ("<s>", tok.token_to_id("<s>"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def make_llama(vocab: int, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15,
                                      bos_token_id=1, eos_token_id=2, **overrides)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def hf_tokenizer():
    return make_tokenizer()


def save_hf(folder, model, tokenizer=None, **save_kwargs):
    model.save_pretrained(folder, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def only_convert_command(monkeypatch):
    """The real CLI entry point, with the table cut to this command so that the test does
    not depend on every other subcommand module importing."""
    monkeypatch.setattr(andromeda.cli, "COMMANDS", {"convert": andromeda.cli.COMMANDS["convert"]})


def cli(*argv):
    return andromeda.cli.main(["convert", *map(str, argv)])


def logits(model, x, hf=False):
    with torch.no_grad():
        return model(x).logits if hf else model(x)


@pytest.mark.parametrize("sharded", [False, True])
def test_convert_from_hf_end_to_end(sharded, tmp_path, capsys, hf_tokenizer):
    vocab = len(hf_tokenizer) + 4  # models often pad the vocabulary past the tokenizer
    hf = make_llama(vocab)
    src = save_hf(tmp_path / "hf", hf, hf_tokenizer, **({"max_shard_size": "40KB"} if sharded else {}))
    assert (src / "model.safetensors.index.json").exists() == sharded
    assert cli("--from-hf", src, "--out", tmp_path / "ckpt", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "LlamaForCausalLM" and summary["dtype"] == "float32"
    assert summary["tokenizer"]["eos_token"] == "</s>" and summary["tokenizer"]["bos_token"] == "<s>"

    assert summary["tokenizer"]["add_bos"] is True

    model, tok, config = load_checkpoint(tmp_path / "ckpt")
    assert config["tokenizer"]["add_bos"] is True and config["meta"]["architecture"] == "LlamaForCausalLM"
    assert hf_tokenizer.encode("the fox")[0] == tok.bos_id  # what add_bos stands for
    for text in SAMPLES:
        assert tok.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert (tok.eos_id, tok.bos_id) == (hf_tokenizer.eos_token_id, hf_tokenizer.bos_token_id)
    x = torch.tensor([hf_tokenizer.encode(SAMPLES[0] + " " + SAMPLES[1])])
    assert (logits(model, x) - logits(hf, x, hf=True)).abs().max().item() < 1e-4


@pytest.mark.parametrize("adds_bos", [True, False])
def test_generate_prints_what_transformers_generates(adds_bos, tmp_path, capsys, monkeypatch):
    """Through the CLI: greedy `andromeda generate` on an imported model prints the text that
    transformers' greedy `generate` produces from `tokenizer(prompt)`, for a tokenizer that adds
    bos itself and for one that names a bos token but does not add it (the prompt must then
    not get one)."""
    monkeypatch.setattr(andromeda.cli, "COMMANDS", {k: ALL_COMMANDS[k] for k in ("convert", "generate")})
    hf_tok = make_tokenizer(adds_bos)
    hf = make_llama(len(hf_tok), seed=1)
    src = save_hf(tmp_path / "hf", hf, hf_tok)
    assert cli("--from-hf", src, "--out", tmp_path / "ckpt") == 0
    prompt, new = "the quick brown fox", 12
    inputs = hf_tok(prompt, return_tensors="pt")
    assert (inputs.input_ids[0, 0].item() == hf_tok.bos_token_id) == adds_bos
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=hf_tok.eos_token_id)
    ids = out[0, inputs.input_ids.shape[1]:].tolist()
    ids = ids[:ids.index(hf_tok.eos_token_id)] if hf_tok.eos_token_id in ids else ids
    expected = hf_tok.decode(ids)
    capsys.readouterr()
    assert andromeda.cli.main(["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", prompt,
                               "--max-new-tokens", str(new), "--temperature", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == inputs.input_ids.shape[1]
    assert len(ids) >= 4 and result["text"] == expected


def test_eval_scores_text_as_transformers_reads_it(tmp_path, capsys, monkeypatch, hf_tokenizer):
    """`andromeda eval` of an imported Llama-style model puts BOS before the text, as the
    tokenizer does, so its loss is transformers' loss on `tokenizer(text)`; it reports the
    convention, and --doc-start eos scores the other way (a different number)."""
    monkeypatch.setattr(andromeda.cli, "COMMANDS", {k: ALL_COMMANDS[k] for k in ("convert", "eval")})
    hf = make_llama(len(hf_tokenizer), seed=2)
    src = save_hf(tmp_path / "hf", hf, hf_tokenizer)
    assert cli("--from-hf", src, "--out", tmp_path / "ckpt") == 0
    text = " ".join(SAMPLES)
    (tmp_path / "held_out.txt").write_text(text)
    ids = hf_tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf(ids, labels=ids).loss.item()
    results = {}
    for start in ("auto", "eos"):
        capsys.readouterr()
        assert andromeda.cli.main(["eval", "--ckpt", str(tmp_path / "ckpt"), "--data", str(tmp_path / "held_out.txt"),
                                   "--doc-start", start, "--json"]) == 0
        results[start] = json.loads(capsys.readouterr().out)
    assert results["auto"]["doc_start"] == "bos" and results["eos"]["doc_start"] == "eos"
    assert results["auto"]["tokens"] == ids.shape[1] - 1
    assert abs(results["auto"]["loss"] - expected) < 1e-4
    assert abs(results["eos"]["loss"] - expected) > 1e-3


def test_special_tokens_from_generation_config_ids(tmp_path, hf_tokenizer):
    """Without tokenizer_config.json the ids in generation_config.json name eos/bos."""
    hf = make_llama(len(hf_tokenizer))
    src = save_hf(tmp_path / "hf", hf, hf_tokenizer)
    (src / "tokenizer_config.json").unlink()
    assert json.loads((src / "generation_config.json").read_text())["eos_token_id"] == 2
    assert cli("--from-hf", src, "--out", tmp_path / "ckpt") == 0
    _, tok, _ = load_checkpoint(tmp_path / "ckpt")
    assert (tok.eos_token, tok.bos_token) == ("</s>", "<s>")


def test_convert_to_bfloat16(tmp_path, hf_tokenizer):
    hf = make_llama(len(hf_tokenizer))
    src = save_hf(tmp_path / "hf", hf, hf_tokenizer)
    assert cli("--from-hf", src, "--out", tmp_path / "ckpt", "--dtype", "bfloat16") == 0
    from safetensors.torch import load_file
    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert torch.equal(state["embed.weight"], hf.model.embed_tokens.weight.detach().to(torch.bfloat16))


def test_round_trip_to_hf_loads_in_transformers(tmp_path, capsys, hf_tokenizer):
    hf = make_llama(len(hf_tokenizer), tie_word_embeddings=True)
    src = save_hf(tmp_path / "hf", hf, hf_tokenizer)
    assert cli("--from-hf", src, "--out", tmp_path / "ckpt") == 0
    capsys.readouterr()
    assert cli("--to-hf", tmp_path / "ckpt", "--out", tmp_path / "back", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "LlamaForCausalLM" and summary["tokenizer"] is True
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, len(hf_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    assert (logits(back, x, hf=True) - logits(hf, x, hf=True)).abs().max().item() < 1e-5
    tok_back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    for text in SAMPLES:
        assert tok_back.encode(text, add_special_tokens=False) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tok_back.eos_token == "</s>"


def test_native_model_exports_with_sliding_window(tmp_path):
    """An andromeda-built Llama-shaped model with a window becomes a Mistral folder with equal logits."""
    from andromeda.checkpoint import save_checkpoint
    from andromeda.model.config import ModelConfig
    from andromeda.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=80, dim=64, depth=2, max_seq_len=64, init_std=0.15,
                      attention=dict(heads=4, kv_heads=2, window=5), mlp=dict(hidden_dim=96))
    ours = Transformer(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", ours)
    assert cli("--to-hf", tmp_path / "ckpt", "--out", tmp_path / "hf") == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(back).__name__ == "MistralForCausalLM"
    x = torch.randint(0, 80, (2, 16), generator=torch.Generator().manual_seed(0))
    assert (logits(back, x, hf=True) - logits(ours, x)).abs().max().item() < 1e-4


# ---------------------------------------------------------------- bad input
def _gpt2_folder(folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                    "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 50}))


def _no_weights(folder, tok):
    save_hf(folder, make_llama(len(tok)), tok)
    (folder / "model.safetensors").unlink()


def _pickle_only(folder, tok):
    _no_weights(folder, tok)
    torch.save({}, folder / "pytorch_model.bin")


def _shape_mismatch(folder, tok):
    save_hf(folder, make_llama(len(tok)), tok)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))


def _missing_shard(folder, tok):
    save_hf(folder, make_llama(len(tok)), tok, max_shard_size="40KB")
    max(folder.glob("model-*.safetensors")).unlink()


def _no_tokenizer(folder, tok):
    save_hf(folder, make_llama(len(tok)))


def _unknown_rope(folder, tok):
    save_hf(folder, make_llama(len(tok)), tok)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))


BAD = {
    "missing_folder": (lambda folder, tok: None, "not found"),
    "gpt2": (lambda folder, tok: _gpt2_folder(folder), "GPT2LMHeadModel"),
    "no_weights": (_no_weights, "no weights"),
    "pickle_only": (_pickle_only, "pytorch_model.bin"),
    "shape_mismatch": (_shape_mismatch, "gate_proj.weight has shape"),
    "missing_shard": (_missing_shard, "shard missing"),
    "no_tokenizer": (_no_tokenizer, "no tokenizer.json"),
    "dynamic_rope": (_unknown_rope, "rope_parameters.rope_type='dynamic'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_no_output(case, tmp_path, capsys, hf_tokenizer):
    make, message = BAD[case]
    make(tmp_path / "hf", hf_tokenizer)
    capsys.readouterr()  # drop what saving the folder printed
    out_dir = tmp_path / "out" / "ckpt"
    assert cli("--from-hf", tmp_path / "hf", "--out", out_dir) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out_dir.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no temp folder left


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys, hf_tokenizer):
    src = save_hf(tmp_path / "hf", make_llama(len(hf_tokenizer)), hf_tokenizer)
    out_dir = tmp_path / "ckpt"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert cli("--from-hf", src, "--out", out_dir) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out_dir / "keep.txt").read_text() == "mine"
    assert cli("--from-hf", src, "--out", out_dir, "--overwrite") == 0
    assert (out_dir / "config.json").exists() and not (out_dir / "keep.txt").exists()


def test_export_of_unsupported_architecture_is_refused(tmp_path, capsys):
    from andromeda.checkpoint import save_checkpoint
    from andromeda.model.config import ModelConfig
    from andromeda.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=50, dim=32, depth=1, position=dict(kind="xpos", alibi_heads=2),
                      attention=dict(heads=4))
    save_checkpoint(tmp_path / "ckpt", Transformer(cfg))
    capsys.readouterr()
    assert cli("--to-hf", tmp_path / "ckpt", "--out", tmp_path / "hf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "position.kind='xpos'" in err
    assert not (tmp_path / "hf").exists()


def test_no_tokenizer_and_export_dtype_options(tmp_path, hf_tokenizer):
    """--no-tokenizer and --to-hf --dtype had no test: a command that ignored them passed."""
    src = save_hf(tmp_path / "hf", make_llama(len(hf_tokenizer)), hf_tokenizer)
    # A folder without tokenizer.json converts with --no-tokenizer (and is refused without it, above).
    bare = save_hf(tmp_path / "bare", make_llama(len(hf_tokenizer)))
    assert cli("--from-hf", bare, "--out", tmp_path / "bare_ckpt", "--no-tokenizer") == 0
    assert load_checkpoint(tmp_path / "bare_ckpt")[1] is None
    # With a tokenizer present, --no-tokenizer still leaves it out; without the flag it is kept.
    assert cli("--from-hf", src, "--out", tmp_path / "with") == 0
    assert cli("--from-hf", src, "--out", tmp_path / "without", "--no-tokenizer") == 0
    assert load_checkpoint(tmp_path / "with")[1] is not None and load_checkpoint(tmp_path / "without")[1] is None
    # Export: --no-tokenizer writes no tokenizer files, --dtype sets the stored weights' dtype.
    assert cli("--to-hf", tmp_path / "with", "--out", tmp_path / "back") == 0
    assert cli("--to-hf", tmp_path / "with", "--out", tmp_path / "back_bare", "--no-tokenizer",
               "--dtype", "bfloat16") == 0
    assert (tmp_path / "back" / "tokenizer.json").exists() and not (tmp_path / "back_bare" / "tokenizer.json").exists()
    from safetensors.torch import load_file
    dtypes = {t.dtype for f in (tmp_path / "back_bare").glob("*.safetensors") for t in load_file(f).values()}
    assert dtypes == {torch.bfloat16}
    assert {t.dtype for t in load_file(tmp_path / "back" / "model.safetensors").values()} == {torch.float32}
