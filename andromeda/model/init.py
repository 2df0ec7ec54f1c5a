"""Every weight-initialisation rule of the model, in one place.

- Linear and embedding weights: normal(0, init_std); biases zero; norm gains one.
- Pre-norm stacks: projections that write into the residual stream (marked
  `is_residual_out`) get std / sqrt(2 * depth) (GPT-2, Radford et al. 2019).
- DeepNorm stacks (Wang et al. 2022, "DeepNet"): Xavier-normal everywhere, with gain
  beta = (8N)^(-1/4) on the value, attention-output and FFN projections, gain 1 on q and k.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from andromeda.model.attention import Attention
from andromeda.model.block import Residual, deepnorm_beta
from andromeda.model.config import ModelConfig


def _weights(module: nn.Module):
    return [m for m in module.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2 and not isinstance(m, nn.Embedding)]


@torch.no_grad()
def xavier_normal_rows(weight: torch.Tensor, gain: float, fan_in: int, fan_out: int) -> None:
    weight.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    std = cfg.init_std
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
        elif hasattr(m, "reset_parameters_for_init"):
            m.reset_parameters_for_init(cfg)  # layers with their own rule (e.g. SSM parameters)
        elif isinstance(m, nn.Linear) or (isinstance(getattr(m, "weight", None), torch.Tensor)
                                          and m.weight.dim() == 2):
            m.weight.normal_(0.0, std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    if cfg.norm.placement == "deepnorm":
        _deepnorm(model, cfg)
        return
    residual_std = std / math.sqrt(2 * cfg.depth)
    for m in model.modules():
        if getattr(m, "is_residual_out", False):
            m.weight.normal_(0.0, residual_std)


@torch.no_grad()
def _deepnorm(model: nn.Module, cfg: ModelConfig) -> None:
    beta = deepnorm_beta(cfg.depth)
    for layer in model.layers:
        for m in layer.modules():
            if isinstance(m, Attention):
                q, k, v = m.wqkv.weight.split([m.q_width, m.kv_width, m.kv_width], dim=0)
                xavier_normal_rows(q, 1.0, cfg.dim, m.q_width)
                xavier_normal_rows(k, 1.0, cfg.dim, m.kv_width)
                xavier_normal_rows(v, beta, cfg.dim, m.kv_width)
                xavier_normal_rows(m.wo.weight, beta, m.q_width, cfg.dim)
        ffn = layer.ffn.fn if isinstance(layer.ffn, Residual) else layer.ffn
        for m in _weights(ffn):
            out_f, in_f = m.weight.shape
            xavier_normal_rows(m.weight, beta, in_f, out_f)
