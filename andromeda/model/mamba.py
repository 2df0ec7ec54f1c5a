"""Mamba-2 selective state-space mixer in plain PyTorch (Dao & Gu 2024, "Transformers are
SSMs"; Gu & Dao 2023, "Mamba").

Offers:
- `ssd_chunked(x, dt, A, B, C, chunk, initial_state)`: the state-space-duality scan: within
  a chunk the output is a masked (decaying) attention-like matmul; chunk boundary states are
  passed on by a short recurrence over chunks. Runs on CPU; O(L * chunk) work.
- `ssd_step(...)`: one token of the same recurrence, h <- exp(dt A) h + dt B x, y = C h, for
  cached decoding; it matches the chunked form (tests).
- `MambaState`: conv window (last d_conv - 1 inputs) and SSM state, made by `new_state`.
- `Mamba`: the 'mamba' mixer of the layer plan (options in the config's `mamba` section):
  in_proj -> causal depthwise conv1d -> SSD -> gated RMSNorm ->
  out_proj. On CUDA, when the `mamba_ssm` package is installed, its fused Triton scan
  (`mamba_chunk_scan_combined`) replaces `ssd_chunked`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from andromeda.model.config import ModelConfig
from andromeda.model.layer import InitRule, Mixer
from andromeda.model.linear import make_linear
from andromeda.model.norm import RMSNorm

try:  # optional fused kernels (GPU only)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:  # ImportError, or a CUDA/Triton mismatch raised while importing
    mamba_chunk_scan_combined = None


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> (..., T, T) with [i, j] = a[j+1] + ... + a[i] for i >= j, -inf above."""
    T = a.shape[-1]
    rep = a[..., :, None].expand(*a.shape, T)  # [..., d, j] = a[d]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    sums = rep.masked_fill(~strict, 0).cumsum(dim=-2)
    return sums.masked_fill(~torch.ones_like(strict).tril(), float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk: int, initial_state: Optional[torch.Tensor] = None):
    """x (b, l, h, p), dt (b, l, h) > 0, A (h,) < 0, B and C (b, l, h, n); float32.
    Returns y (b, l, h, p) and the final state (b, h, p, n)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    pad = (-l) % chunk  # padded steps have dt = 0: no input and no decay
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c, T = (l + pad) // chunk, chunk
    x = (x * dt[..., None]).view(b, c, T, h, p)
    a = (dt * A).view(b, c, T, h).permute(0, 3, 1, 2)  # (b, h, c, T) log-decays
    B, C = B.view(b, c, T, h, n), C.view(b, c, T, h, n)
    a_cs = a.cumsum(dim=-1)
    # Within chunks: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1} + ... + a_i) x_j dt_j.
    decay = torch.exp(_segsum(a))  # (b, h, c, T, T)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, x)
    # State at each chunk end from that chunk's inputs alone.
    to_end = torch.exp(a_cs[..., -1:] - a_cs)  # (b, h, c, T)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, x)
    # Carry states across chunks: a recurrence of length c, written as one small matmul.
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n)
    states = torch.cat([initial_state[:, None].float(), states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(a_cs[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final = states[:, :-1], states[:, -1]
    # Contribution of the state entering each chunk.
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cs))
    return y.reshape(b, c * T, h, p)[:, :l], final


def ssd_step(x, dt, A, B, C, state):
    """One token: x (b, h, p), dt (b, h), B and C (b, h, n), state (b, h, p, n) -> y, state."""
    state = torch.exp(dt * A)[..., None, None] * state + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state, C), state


class MambaState(nn.Module):
    def __init__(self, batch: int, conv_dim: int, d_conv: int, heads: int, head_dim: int, d_state: int,
                 dtype, device=None):
        super().__init__()
        self.register_buffer("conv", torch.zeros(batch, conv_dim, d_conv - 1, dtype=dtype, device=device),
                             persistent=False)
        # The SSM state is a long-lived running sum: keep it in float32 whatever the model dtype.
        self.register_buffer("ssm", torch.zeros(batch, heads, head_dim, d_state, dtype=torch.float32,
                                                device=device), persistent=False)


class Mamba(Mixer):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        m = self.mcfg = cfg.mamba
        self.d_inner = m.expand * cfg.dim
        self.heads = self.d_inner // m.head_dim
        self.bc_width = m.ngroups * m.d_state
        self.conv_dim = self.d_inner + 2 * self.bc_width
        self.in_proj = make_linear(cfg, "mixer", cfg.dim, self.d_inner + self.conv_dim + self.heads)
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, m.d_conv, groups=self.conv_dim, bias=m.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.norm = RMSNorm(self.d_inner, cfg.norm.eps)
        self.out_proj = make_linear(cfg, "mixer", self.d_inner, cfg.dim)

    @torch.no_grad()
    def init_weights(self, rule: InitRule) -> None:
        """Projections by the stack's rule; Mamba's own init for the rest: A in [-16, -1], dt
        log-uniform in [dt_min, dt_max] through softplus, D = 1, PyTorch's conv default."""
        m = self.mcfg
        rule.linear(self.in_proj, "ffn")
        rule.linear(self.out_proj, "out")
        self.norm.weight.fill_(1.0)
        self.conv.reset_parameters()
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(m.dt_min), math.log(m.dt_max)))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.D.fill_(1.0)

    def new_state(self, batch: int, max_len: int, dtype, device) -> MambaState:
        m = self.mcfg
        return MambaState(batch, self.conv_dim, m.d_conv, self.heads, m.head_dim, m.d_state, dtype, device)

    def flops_per_token(self, seq_len: int) -> float:
        """2 per parameter (the conv weights counted once per channel and tap, which is what
        they cost), and the chunked SSD scan per token: within its chunk of T tokens, C.B scores
        and their product with x (2 * H * T * (N + P)), and the chunk-state terms (B x into the
        state and C reading it: 2 * 2 * H * P * N)."""
        m = self.mcfg
        proj = 2.0 * (self.active_parameters() - self.conv.weight.numel())
        conv = 2.0 * self.conv_dim * m.d_conv
        T = min(m.chunk_size, seq_len)
        scan = 2.0 * self.heads * T * (m.d_state + m.head_dim) + 4.0 * self.heads * m.head_dim * m.d_state
        return proj + conv + scan

    def _conv(self, xbc: torch.Tensor, state: Optional[MambaState]) -> torch.Tensor:
        """Causal depthwise conv over time; the state's window replaces the zero padding."""
        B, _, Cd = xbc.shape
        xt = xbc.transpose(1, 2)  # (B, C, L)
        k = self.mcfg.d_conv
        past = state.conv.to(xt.dtype) if state is not None else xt.new_zeros(B, Cd, k - 1)
        full = torch.cat([past, xt], dim=-1)  # (B, C, k - 1 + L)
        if state is not None:
            state.conv.copy_(full[:, :, full.shape[-1] - (k - 1):])
        return F.silu(F.conv1d(full, self.conv.weight, self.conv.bias, groups=Cd)).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx=None, state: Optional[MambaState] = None):
        B, L, _ = x.shape
        m, H, P = self.mcfg, self.heads, self.mcfg.head_dim
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        xs, Bm, Cm = self._conv(xbc, state).split([self.d_inner, self.bc_width, self.bc_width], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, L, H)
        A = -torch.exp(self.A_log.float())  # (H,)
        xs = xs.reshape(B, L, H, P)
        Bm = Bm.reshape(B, L, m.ngroups, m.d_state)
        Cm = Cm.reshape(B, L, m.ngroups, m.d_state)
        init = state.ssm if state is not None else None
        if m.use_kernels and mamba_chunk_scan_combined is not None and x.is_cuda:
            y, final = mamba_chunk_scan_combined(xs, dt.to(xs.dtype), A, Bm, Cm, m.chunk_size,
                                                 initial_states=init, return_final_states=True)
            y = y.float()
        else:
            rep = H // m.ngroups
            Bh = Bm.float().repeat_interleave(rep, dim=2)  # (B, L, H, N)
            Ch = Cm.float().repeat_interleave(rep, dim=2)
            if state is not None and L == 1:
                y, final = ssd_step(xs[:, 0].float(), dt[:, 0], A, Bh[:, 0], Ch[:, 0], init)
                y = y[:, None]
            else:
                y, final = ssd_chunked(xs.float(), dt, A, Bh, Ch, m.chunk_size, init)
        if state is not None:
            state.ssm.copy_(final)
        y = y + xs.float() * self.D.float()[:, None]  # skip connection D x
        y = y.reshape(B, L, self.d_inner).to(x.dtype)
        return self.out_proj(self.norm(y * F.silu(z))), None  # gated RMSNorm (Mamba-2)
