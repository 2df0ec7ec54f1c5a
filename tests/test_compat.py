"""Checkpoints of format version 1 (configs with `extras`, option-dependent tensor names) load
into the current model and compute the logits that version computed, with the same
parameter order (so optimizer state of a version-1 run lines up)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from andromeda.checkpoint import load_checkpoint
from andromeda.model.compat import upgrade_name

V1 = Path(__file__).parent / "data" / "v1_checkpoints"


@pytest.mark.parametrize("name", sorted(p.name for p in V1.iterdir()))
def test_version_1_checkpoint_loads_with_its_logits(name):
    folder = V1 / name
    model, _, _ = load_checkpoint(folder)
    expected = load_file(str(folder / "expected_logits.safetensors"))
    with torch.no_grad():
        logits = model(expected["tokens"])
    torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=1e-6)
    old_order = json.loads((folder / "parameter_order.json").read_text())
    assert [upgrade_name(n, model.cfg.block.parallel) for n in old_order] == [n for n, _ in model.named_parameters()]


def test_current_names_do_not_depend_on_options():
    model, _, _ = load_checkpoint(V1 / "parallel_mamba_mod")
    names = set(model.state_dict())
    assert "layers.0.mixer.wqkv.weight" in names and "layers.0.mixer_norm.weight" in names
    assert "layers.1.mixer.in_proj.weight" in names and "layers.1.route.router.weight" in names
    assert not any(".block." in n or ".fn." in n for n in names)
