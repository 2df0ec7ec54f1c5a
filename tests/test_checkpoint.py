"""Checkpoint folders: round trip, atomic replacement, clear errors."""

import json

import pytest
import torch

from andromeda.checkpoint import load_checkpoint, save_checkpoint
from andromeda.data.tokenizer import ByteTokenizer, CharTokenizer
from andromeda.errors import UserError
from andromeda.model.transformer import build_model
from andromeda.presets import get_preset


@pytest.mark.parametrize("preset", ["andromeda-tiny", "gpt2-tiny", "minimal-sota-tiny"])
def test_round_trip_same_logits(tmp_path, preset):
    model = build_model(get_preset(preset)).eval()
    with torch.no_grad():  # norm gains and biases start as constants: a skipped one would go unseen
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ck", model, ByteTokenizer(), meta={"step": 3})
    loaded, tok, config = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 257, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert tok.encode("hé") == [104, 195, 169] and config["meta"]["step"] == 3
    if model.cfg.tie_embeddings:
        assert loaded.head.weight is loaded.embed.weight


def test_overwrite_keeps_a_complete_folder(tmp_path):
    model = build_model(get_preset("llama-tiny"))
    save_checkpoint(tmp_path / "ck", model, CharTokenizer.from_text("abc"))

    def boom(folder):
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="No space left"):
        save_checkpoint(tmp_path / "ck", model, ByteTokenizer(), extra=boom)
    _, tok, _ = load_checkpoint(tmp_path / "ck")  # the old checkpoint survives intact
    assert tok.kind == "char"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folder left


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")
    model = build_model(get_preset("llama-tiny"))
    save_checkpoint(tmp_path / "ck", model, ByteTokenizer())
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model"]["dim"] = 128
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="shape"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read"):
        load_checkpoint(tmp_path / "ck")


def test_tokenizer_larger_than_vocab_is_refused(tmp_path):
    model = build_model(get_preset("llama-tiny").__class__.from_dict(
        {**get_preset("llama-tiny").to_dict(), "vocab_size": 100}))
    save_checkpoint(tmp_path / "ck", model, ByteTokenizer())
    with pytest.raises(UserError, match="vocab_size"):
        load_checkpoint(tmp_path / "ck")


def test_stored_dtype_is_kept(tmp_path):
    model = build_model(get_preset("llama-tiny"), dtype=torch.bfloat16)
    save_checkpoint(tmp_path / "ck", model, ByteTokenizer())
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert loaded.rotary.inv_freq.dtype == torch.float32  # derived tables stay in float32
    as_fp32, _, _ = load_checkpoint(tmp_path / "ck", dtype=torch.float32)
    assert as_fp32.embed.weight.dtype == torch.float32


def test_half_precision_model_keeps_float32_rotary_tables():
    model = build_model(get_preset("llama-tiny"), dtype=torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    model = build_model(get_preset("andromeda-tiny")).to(torch.float16)
    assert model.rotary.inv_freq.dtype == torch.float32 and model.rotary.xpos_zeta.dtype == torch.float32


def test_a_run_folder_loads_its_latest_checkpoint(tmp_path):
    from andromeda.train.checkpoint import point
    torch.manual_seed(0)
    run = tmp_path / "run"
    models = [build_model(get_preset("llama-tiny")).eval() for _ in range(2)]
    for step, model in enumerate(models, start=1):
        save_checkpoint(run / "checkpoints" / f"step_{step}", model, ByteTokenizer())
    point(run, "latest", run / "checkpoints" / "step_1")
    x = torch.randint(0, 256, (1, 7))
    loaded, _, _ = load_checkpoint(run)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), models[0](x))
    point(run, "latest", run / "checkpoints" / "step_2")
    loaded, _, _ = load_checkpoint(run)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), models[1](x))
    with pytest.raises(UserError, match="not an andromeda checkpoint"):
        load_checkpoint(tmp_path)
