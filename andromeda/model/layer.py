"""The contract every mixer and feed-forward keeps, and the initialisation rule they follow.

A block (andromeda.model.block) holds one `Mixer` and one `FFN`, each built from the layer
plan's tables (andromeda.model.plan). Everything outside a layer reaches it only through this
contract, so init, FLOP counting, parameter counting and the inference cache need no
knowledge of layer types:

- `forward(x, ctx, state=None) -> (y, aux)`: x and y (B, L, D); `aux` is an `Aux` of
  auxiliary losses and statistics, or None.
- `new_state(batch, max_len, dtype, device)`: the layer's inference state (a KV cache, an SSM
  state), or None when it keeps none. Only mixers keep state.
- `init_weights(rule)`: initialise its own parameters for the stack's residual rule.
- `flops_per_token(seq_len)`: forward FLOPs per token: 2 per active parameter (the N of the
  6N rule, counted as nanoGPT and PaLM do), plus what depends on the context (attention
  scores, Mamba's scan); the trainer counts training as 3x forward.
- `active_parameters()`: parameters one token uses (experts it is not routed to left out).

`DerivedBuffers` marks modules whose buffers are computed from the config (rotary tables, ALiBi
slopes): `Transformer.reset_derived_buffers` recomputes them after loading or moving a model.

`InitRule` carries the rule: GPT-2's (normal(std), and std / sqrt(2 * depth) for projections
that write the residual stream) or DeepNet's (Wang et al. 2022: Xavier-normal, gain beta =
(8N)^(-1/4) on values, attention outputs and feed-forward weights, gain 1 on queries and keys).
Layers state each weight's role ('qk', 'value', 'ffn', 'out', 'gate'); the rule decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from andromeda.model.state import Aux, Context

ROLES = ("qk", "value", "ffn", "out", "gate")


def deepnorm_alpha(depth: int) -> float:
    """Residual scale of DeepNet (Wang et al. 2022) for a decoder-only stack of `depth` layers."""
    return (2 * depth) ** 0.25


def deepnorm_beta(depth: int) -> float:
    """Init gain of DeepNet for v, output and FFN projections of a decoder-only stack."""
    return (8 * depth) ** -0.25


@dataclass(frozen=True)
class InitRule:
    std: float
    depth: int
    deepnorm: bool = False

    @classmethod
    def for_config(cls, cfg) -> "InitRule":
        return cls(cfg.init_std, cfg.depth, cfg.norm.placement == "deepnorm")

    @property
    def residual_std(self) -> float:
        return self.std / math.sqrt(2 * self.depth)

    @torch.no_grad()
    def matrix(self, weight: torch.Tensor, role: str) -> None:
        """Initialise a weight used as x @ W^T (out, in), or a stack of them (..., out, in);
        see `stacked` for (E, in, out) expert stacks."""
        self._fill(weight, role, fan_in=weight.shape[-1], fan_out=weight.shape[-2])

    @torch.no_grad()
    def stacked(self, weight: torch.Tensor, role: str) -> None:
        """Initialise an (E, in, out) stack of expert matrices used as x @ W[e]."""
        self._fill(weight, role, fan_in=weight.shape[-2], fan_out=weight.shape[-1])

    def _fill(self, weight: torch.Tensor, role: str, fan_in: int, fan_out: int) -> None:
        assert role in ROLES, role
        if self.deepnorm and role != "gate":
            gain = 1.0 if role == "qk" else deepnorm_beta(self.depth)
            weight.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))
        else:
            weight.normal_(0.0, self.residual_std if role == "out" else self.std)

    @torch.no_grad()
    def linear(self, module: nn.Module, role: str) -> None:
        """A linear layer (nn.Linear or BitLinear): its weight by role, its bias zero."""
        self.matrix(module.weight, role)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()


class DerivedBuffers:
    """Mixin: `reset_buffers()` recomputes the module's non-persistent, config-derived buffers."""

    def reset_buffers(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must recompute its derived buffers")


def reset_derived_buffers(module: nn.Module) -> None:
    """Recompute every config-derived buffer under `module` (after loading or moving it)."""
    for m in module.modules():
        if isinstance(m, DerivedBuffers):
            m.reset_buffers()


class Sublayer(nn.Module):
    """Base of `Mixer` and `FFN`: the defaults of the contract."""

    def forward(self, x: torch.Tensor, ctx: Context, state=None) -> tuple[torch.Tensor, Optional[Aux]]:
        raise NotImplementedError  # every sublayer defines its forward

    def new_state(self, batch: int, max_len: int, dtype, device) -> Optional[nn.Module]:
        return None

    def init_weights(self, rule: InitRule) -> None:
        """Each sublayer states the role of each of its weights (no default: a guess would be
        silently wrong under DeepNorm)."""
        raise NotImplementedError(f"{type(self).__name__} must say how its weights are initialised")

    def active_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Default: one multiply-add (2 FLOPs) per active parameter per token."""
        return 2.0 * self.active_parameters()


class Mixer(Sublayer):
    """Mixes information across positions (attention, Mamba); may keep inference state."""


class FFN(Sublayer):
    """Transforms each position on its own (dense MLP, mixture of experts)."""
