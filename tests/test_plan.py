"""The layer plan: layout patterns, refusals, and adding a mixer in one module plus one call.

`CumulativeMean` below is the worked example of docs/model.md: a toy token mixer (each position
reads the mean of the inputs up to it, through a learned projection) written against the layer
contract only. Registering it is the whole integration: the plan, the config checks, init,
FLOP counting, the inference cache, checkpoints and the generation engine then work with it,
as these tests show.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import nn

from andromeda.checkpoint import load_checkpoint, save_checkpoint
from andromeda.data.tokenizer import ByteTokenizer
from andromeda.errors import ConfigError
from andromeda.infer.engine import Engine
from andromeda.infer.sampling import SamplingParams
from andromeda.model import ModelConfig, Transformer
from andromeda.model import plan as layer_plan
from andromeda.model.layer import InitRule, Mixer
from andromeda.model.state import Context
from andromeda.train.flops import flops_per_token


# ---------------------------------------------------------------- the worked example
class MeanState(nn.Module):
    """Decoding state: the running sum of the inputs seen so far, per sequence."""

    def __init__(self, batch: int, dim: int, device=None):
        super().__init__()
        self.register_buffer("total", torch.zeros(batch, dim, device=device), persistent=False)


class CumulativeMean(Mixer):
    """y_t = W (x_1 + ... + x_t) / t: causal, one state vector per sequence."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def init_weights(self, rule: InitRule) -> None:
        rule.linear(self.proj, "out")  # it writes the residual stream

    def new_state(self, batch: int, max_len: int, dtype, device) -> MeanState:
        return MeanState(batch, self.proj.in_features, device)

    def flops_per_token(self, seq_len: int) -> float:
        return 2.0 * self.proj.weight.numel() + 2.0 * self.proj.in_features  # projection; running sum and mean

    def forward(self, x: torch.Tensor, ctx: Context, state: Optional[MeanState] = None):
        sums = x.float().cumsum(dim=1)  # (B, L, D)
        if state is not None:
            sums = sums + state.total[:, None]
            state.total.copy_(sums[:, -1])
        count = (ctx.positions.ids + 1).to(sums.dtype)[..., None]  # (B or 1, L, 1): tokens up to t
        return self.proj((sums / count).to(x.dtype)), None


@pytest.fixture
def toy_mixer():
    layer_plan.register_mixer("cumulative_mean", CumulativeMean)
    yield "cumulative_mean"
    del layer_plan.MIXERS["cumulative_mean"]


def toy_config(**extra) -> ModelConfig:
    return ModelConfig(vocab_size=257, dim=32, depth=4, max_seq_len=64, attention=dict(heads=4),
                       layout=dict(mixer="attention,cumulative_mean"), **extra)


def test_registered_mixer_is_planned_and_built(toy_mixer):
    cfg = toy_config()
    assert [s.mixer for s in cfg.plan] == ["attention", "cumulative_mean"] * 2
    model = Transformer(cfg)
    assert isinstance(model.layers[1].mixer, CumulativeMean)
    assert "layers.1.mixer.proj.weight" in model.state_dict()
    assert layer_plan.describe(cfg) == ["      0: attention + dense", "      1: cumulative_mean + dense",
                                        "      2: attention + dense", "      3: cumulative_mean + dense"]


def test_registered_mixer_decodes_with_the_cache_as_the_full_forward(toy_mixer):
    torch.manual_seed(0)
    model = Transformer(toy_config()).eval()
    x = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch=2, max_len=32)
        steps = [model(x[:, :7], cache=cache, start_pos=0)]  # chunked prefill, then one token at a time
        steps += [model(x[:, t:t + 1], cache=cache, start_pos=t) for t in range(7, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    # negative control: a cache that forgot the prefix gives other numbers
    with torch.no_grad():
        fresh = model.new_cache(batch=2, max_len=32)
        wrong = model(x[:, 7:8], cache=fresh, start_pos=7)
    assert not torch.allclose(wrong, full[:, 7:8], atol=1e-3)


def test_registered_mixer_is_counted_initialised_trained_and_saved(toy_mixer, tmp_path):
    cfg = toy_config()
    model = Transformer(cfg)
    attention_model = Transformer(ModelConfig(**{**toy_config().to_dict(), "layout": {"mixer": "attention"}}))
    toy_layer, attn_layer = model.layers[1], attention_model.layers[1]
    per_token = toy_layer.mixer.flops_per_token(16) - attn_layer.mixer.flops_per_token(16)
    assert flops_per_token(model, 16) - flops_per_token(attention_model, 16) == pytest.approx(3 * 2 * per_token)
    # init by role: 'out' gets the residual std / sqrt(2 * depth)
    assert toy_layer.mixer.proj.weight.std().item() == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 257, (4, 17))
    losses = []
    for _ in range(5):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert toy_layer.mixer.proj.weight.grad is not None
    save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    loaded, tokenizer, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)
    # the engine decodes it greedily as the full forward ranks the tokens
    result = Engine(loaded, tokenizer).generate(["abc"], SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    ids = list(b"abc")
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(loaded(torch.tensor([ids]))[0, -1].argmax()))
    assert result.token_ids == ids[3:]


# ---------------------------------------------------------------- patterns and refusals
def test_layout_patterns_expand_over_the_depth():
    jamba = ModelConfig(depth=8, dim=64, layout=dict(mixer="mamba*4,attention,mamba*3", ffn="dense,moe",
                                                     routing="none,mod"))
    assert [s.mixer for s in jamba.plan] == ["mamba"] * 4 + ["attention"] + ["mamba"] * 3
    assert [s.ffn for s in jamba.plan] == ["dense", "moe"] * 4
    assert [s.routing for s in jamba.plan] == ["none", "mod"] * 4
    assert jamba.moe is not None and jamba.mamba is not None and jamba.mod is not None and jamba.moa is None


@pytest.mark.parametrize("layout, message", [
    (dict(mixer="attention,toy"), "layout.mixer='attention,toy': unknown mixer kind 'toy'"),
    (dict(ffn="dense*0"), "needs a repeat count >= 1"),
    (dict(routing="none,,mod"), "empty name in the pattern"),
])
def test_bad_patterns_are_refused_with_the_key(layout, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        ModelConfig(layout=layout)


def test_family_sections_follow_the_plan():
    with pytest.raises(ConfigError, match="moe is configured but no layer uses it"):
        ModelConfig(moe=dict(num_experts=4))
    assert ModelConfig(layout=dict(ffn="moe"), moe=dict(num_experts=4)).moe.num_experts == 4
