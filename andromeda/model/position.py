"""Positional schemes: rotary (RoPE) with context-extension scalings, xPos, ALiBi.

- `rope_inverse_frequencies(cfg, head_dim, max_seq_len)`: RoPE frequencies after 'linear'
  (Chen et al. 2023, position interpolation), 'ntk' (NTK-aware base change), 'yarn'
  (Peng et al. 2023) or 'llama3' scaling, plus the attention factor YaRN asks for.
- `Rotary`: turns absolute positions into (cos, sin[, xpos scales][, value gain]) once per
  forward; the same tables serve every layer. Positions may be a tensor, so cached decoding and
  compiled decoding share one code path.
- `apply_rotary(x, cos, sin)`: the rotate-half convention of GPT-NeoX / Llama, so Hugging Face
  weights load without permuting q and k; `scale_rotary_part(x, gain)` scales the rotary channels.
- `alibi_slopes(n)`: the head slopes of Press et al. 2021 ("Train Short, Test Long").

Positions are absolute token indices; all schemes here depend only on differences of
positions in the attention score, which is what makes cached decoding exact. Rotated values
(`position.rotate_values`, for x-transformers 1.16 models) depend on absolute positions, which a
cache also reproduces, and with `xpos_value_centre='call'` on where a call ends, which it cannot.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from andromeda.errors import ConfigError
from andromeda.model.config import ModelConfig, PositionConfig
from andromeda.model.layer import DerivedBuffers


def rope_inverse_frequencies(p: PositionConfig, rot_dim: int, max_seq_len: int) -> tuple[torch.Tensor, float]:
    """Return (inv_freq of shape (rot_dim/2,), attention scaling factor for cos/sin)."""
    theta = p.rope_theta
    # float32 as in Meta's Llama and transformers: imported models were trained with these exact
    # frequencies, and float64 ones drift from them by ~1e-7 relative, i.e. 0.01 rad at 100k tokens.
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim
    factor = p.rope_factor
    if p.rope_scaling == "ntk":
        # NTK-aware: stretch the base so the lowest frequency is interpolated by `factor`
        # while the highest stays put ("NTK-Aware Scaled RoPE", bloc97, 2023).
        theta = theta * factor ** (rot_dim / (rot_dim - 2))
    inv_freq = 1.0 / theta ** exponents
    attn_factor = 1.0
    original = p.original_max_seq_len or max(1, int(max_seq_len / factor))
    if p.rope_scaling == "linear":
        inv_freq = inv_freq / factor
    elif p.rope_scaling == "yarn":
        # YaRN: interpolate low frequencies, keep high ones, linear ramp between the
        # dimensions that complete beta_slow..beta_fast turns over the original context.
        def correction_dim(turns: float) -> float:
            return rot_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(p.rope_theta))

        low = max(math.floor(correction_dim(p.yarn_beta_fast)), 0)
        high = min(math.ceil(correction_dim(p.yarn_beta_slow)), rot_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1.0 - ramp  # 1 = extrapolate (unchanged), 0 = interpolate
        inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
        attn_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    elif p.rope_scaling == "llama3":
        # Llama 3.1: wavelengths longer than original/low_freq_factor are divided by factor,
        # shorter than original/high_freq_factor kept, smooth blend in between.
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = original / p.llama3_low_freq_factor
        high_wavelen = original / p.llama3_high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - p.llama3_low_freq_factor) / (
            p.llama3_high_freq_factor - p.llama3_low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq.float(), attn_factor


class RotaryTables(NamedTuple):
    cos: torch.Tensor  # (B or 1, 1, L, rot_dim) in the compute dtype
    sin: torch.Tensor  # (B or 1, 1, L, rot_dim)
    xpos_q: Optional[torch.Tensor]  # (B or 1, 1, L, rot_dim) multiplier for q, None without xPos
    xpos_k: Optional[torch.Tensor]  # multiplier for k (and for values when they are rotated)
    rotate_values: bool = False  # rotate v like k (position.rotate_values)
    value_gain: Optional[torch.Tensor] = None  # (B or 1, 1, 1, rot_dim) on the attention output (call centre)


class Rotary(DerivedBuffers, nn.Module):
    """Computes rotary tables for a vector of absolute positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p = self.pcfg = cfg.position
        self.max_seq_len = cfg.max_seq_len
        self.rot_dim = p.rope_dim or cfg.head_dim
        self.xpos = p.kind == "xpos"
        self.xpos_base = p.xpos_scale_base
        self.xpos_max_power = p.xpos_max_power
        self.rotate_values = p.rotate_values
        self.call_centred_values = self.rotate_values and self.xpos and p.xpos_value_centre == "call"
        # Centre the xPos exponent on the trained context so q and k scales stay near 1 there. With
        # rotated values it is also where their scale is 1: x-transformers' centre on a call of
        # max_seq_len tokens (position.xpos_value_centre='fixed').
        self.xpos_centre = cfg.max_seq_len // 2
        self.register_buffer("inv_freq", None, persistent=False)
        self.register_buffer("xpos_zeta", None, persistent=False)
        self.reset_buffers()

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` would round the frequencies; keep them float32 (the tables
        # are cast to the compute dtype after the angle is formed, as Llama does).
        super()._apply(fn, recurse)
        if self.inv_freq is not None and not self.inv_freq.is_meta and self.inv_freq.dtype != torch.float32:
            self.reset_buffers()
        return self

    def reset_buffers(self) -> None:
        """(Re)compute the derived tables, e.g. after loading onto a meta-built model."""
        device = self.inv_freq.device if self.inv_freq is not None and not self.inv_freq.is_meta else None
        inv_freq, self.attn_factor = rope_inverse_frequencies(self.pcfg, self.rot_dim, self.max_seq_len)
        self.inv_freq = inv_freq.to(device) if device is not None else inv_freq
        if self.xpos:
            half = torch.arange(0, self.rot_dim, 2, dtype=torch.float32)
            zeta = (half + 0.4 * self.rot_dim) / (1.4 * self.rot_dim)  # per-frequency decay base < 1
            self.xpos_zeta = torch.cat([zeta, zeta]).to(self.inv_freq.device)

    def _xpos_scale(self, positions: torch.Tensor) -> torch.Tensor:
        """zeta ** ((n - centre) / scale_base) for positions (B or 1, L) -> (B or 1, 1, L, rot)."""
        power = (positions.float() - self.xpos_centre) / self.xpos_base
        return self.xpos_zeta ** power.clamp(-self.xpos_max_power, self.xpos_max_power)[:, None, :, None]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, cached: bool = False) -> RotaryTables:
        """positions (B or 1, L) -> tables (B or 1, 1, L, rot) that broadcast over the heads of
        q and k (B, H, L, hd); a plain (L,) vector gives (L, rot) tables (references in tests).
        `cached` (a call with an inference cache) is refused with call-centred values."""
        if positions.dim() == 1:
            tables = self(positions[None], dtype, cached)
            return RotaryTables(*(t[0, 0] if isinstance(t, torch.Tensor) else t for t in tables))
        freqs = positions.float()[:, None, :, None] * self.inv_freq  # (B or 1, 1, L, rot/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.attn_factor).to(dtype)
        sin = (emb.sin() * self.attn_factor).to(dtype)
        if not self.xpos:
            return RotaryTables(cos, sin, None, None, self.rotate_values)
        scale = self._xpos_scale(positions)  # (B or 1, 1, L, rot)
        value_gain = None
        if self.call_centred_values:
            # x-transformers 1.16 scales v_j by zeta^-((j - c) / scale_base) with c = length // 2 of
            # the call. Values are scaled like keys, about the fixed centre; the difference,
            # zeta^((c - centre) / scale_base) per channel, passes through the attention weights
            # and is applied to the output. It changes every hidden state of a call whenever c
            # does, so no KV cache can carry it from one call to the next.
            if cached:
                raise ConfigError("position.xpos_value_centre='call' makes logits depend on where a call ends, "
                                  "which a KV cache cannot reproduce; decode with xpos_value_centre='fixed'")
            ends = positions[:, -1:] + 1  # (B or 1, 1)
            value_gain = self._xpos_scale(torch.div(ends, 2, rounding_mode="floor")).to(dtype)
        return RotaryTables(cos, sin, scale.to(dtype), scale.reciprocal().to(dtype), self.rotate_values, value_gain)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x (B, H, L, hd) by position."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        out = x * cos + _rotate_half(x) * sin
        return out * scale if scale is not None else out
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    out = x_rot * cos + _rotate_half(x_rot) * sin
    if scale is not None:
        out = out * scale
    return torch.cat([out, x_pass], dim=-1)


def scale_rotary_part(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Multiply the first gain.shape[-1] channels of x (B, H, L, hd) by gain; the rest pass."""
    rot = gain.shape[-1]
    if rot == x.shape[-1]:
        return x * gain
    return torch.cat([x[..., :rot] * gain, x[..., rot:]], dim=-1)


def alibi_slopes(n: int) -> torch.Tensor:
    """ALiBi head slopes: geometric 2^(-8/n) for n a power of two; otherwise the closest power
    of two's slopes plus every other slope of the next one (Press et al. 2021, section 3)."""

    def power_of_two(k: int) -> list[float]:
        start = 2 ** (-8 / k)
        return [start ** (i + 1) for i in range(k)]

    if n <= 0:
        return torch.zeros(0)
    if math.log2(n).is_integer():
        return torch.tensor(power_of_two(n))
    closest = 2 ** math.floor(math.log2(n))
    return torch.tensor(power_of_two(closest) + power_of_two(2 * closest)[0::2][: n - closest])
