"""Mamba-2 style selective state space (SSD) with one scalar decay per head.

Shapes: B batch, T time, H heads, P head width (headdim), N state width (d_state).
Two forms of the same recurrence

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t,    y_t = C_t . h_t + D * x_t

``ssd_chunked`` scans a whole sequence chunk by chunk with matmuls (training,
parallel forward); ``ssd_chunk_step`` advances an explicit state over up to one
chunk (the step API and the exported graphs). ``ssd_recurrent`` is the plain
per-token twin that the tests compare both against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HydraConfig
from .norm import GatedRMSNorm


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Return s[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j and -inf above the diagonal.

    Built from masked cumulative sums rather than differences of one cumulative
    sum, so long chunks keep full float32 precision.
    """
    t = a.shape[-1]
    a = a.unsqueeze(-1).expand(*a.shape, t)  # (..., T, T), a[..., i, j] = a_i
    below = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~below, 0.0)
    s = torch.cumsum(a, dim=-2)
    on_or_below = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device))
    return s.masked_fill(~on_or_below, float("-inf"))


def ssd_chunk_step(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the SSM over T tokens of one chunk from state h0.

    x: (B, T, H, P) input already scaled by dt; a: (B, T, H) log decay dt * A;
    b, c: (B, T, N); h0: (B, H, P, N). Returns y (B, T, H, P) without the D skip,
    and the state after the last token (B, H, P, N).
    """
    a = a.permute(0, 2, 1)  # (B, H, T)
    a_cum = torch.cumsum(a, dim=-1)
    xh = x.permute(0, 2, 1, 3)  # (B, H, T, P)

    # 1. within the call: causal mixing weighted by the decay between positions
    decay = torch.exp(segsum(a))  # (B, H, T, T)
    cb = torch.matmul(c, b.transpose(1, 2)).unsqueeze(1)  # (B, 1, T, T)
    y = torch.matmul(cb * decay, xh)  # (B, H, T, P)

    # 2. what the state from before the call contributes
    y_prev = torch.matmul(c.unsqueeze(1), h0.transpose(-1, -2))  # (B, H, T, P)
    y = y + y_prev * torch.exp(a_cum).unsqueeze(-1)

    # 3. the state after the last token
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (B, H, T)
    h = torch.matmul(xh.transpose(-1, -2) * decay_to_end.unsqueeze(2), b.unsqueeze(1))  # (B, H, P, N)
    h = h + h0 * torch.exp(a_cum[..., -1]).unsqueeze(-1).unsqueeze(-1)
    return y.permute(0, 2, 1, 3), h


def ssd_chunked(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    """Scan a whole sequence from a zero state, in chunks of ``chunk`` tokens.

    Same arguments as :func:`ssd_chunk_step` without h0; T is padded to a
    multiple of ``chunk`` and trimmed again. Returns y (B, T, H, P).
    """
    bsz, t, nheads, p = x.shape
    pad = (-t) % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        b = F.pad(b, (0, 0, 0, pad))
        c = F.pad(c, (0, 0, 0, pad))
    nc = (t + pad) // chunk
    x = x.reshape(bsz, nc, chunk, nheads, p)
    b = b.reshape(bsz, nc, chunk, -1)
    c = c.reshape(bsz, nc, chunk, -1)
    a = a.reshape(bsz, nc, chunk, nheads).permute(0, 3, 1, 2)  # (B, H, nc, L)
    a_cum = torch.cumsum(a, dim=-1)

    # 1. outputs within each chunk
    decay = torch.exp(segsum(a))  # (B, H, nc, L, L)
    y_diag = torch.einsum("bcln,bcsn,bhcls,bcshp->bclhp", c, b, decay, x)

    # 2. each chunk's contribution to the state at its end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (B, H, nc, L)
    states = torch.einsum("bcln,bhcl,bclhp->bchpn", b, decay_to_end, x)

    # 3. pass states from chunk to chunk: the state entering chunk k
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # (B, nc+1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (B, H, nc+1, nc+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]

    # 4. what the entering state contributes to each output
    y_off = torch.einsum("bcln,bchpn,bhcl->bclhp", c, states, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(bsz, nc * chunk, nheads, p)
    return y[:, :t]


def ssd_recurrent(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-token recurrence, the reference for the two fast forms."""
    h, ys = h0, []
    for t in range(x.shape[1]):
        h = torch.exp(a[:, t])[..., None, None] * h + x[:, t, :, :, None] * b[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", h, c[:, t]))
    return torch.stack(ys, dim=1), h


class Mamba2(nn.Module):
    """Mamba-2 mixer: in_proj -> causal depthwise conv -> SSD -> gated norm -> out_proj."""

    def __init__(self, cfg: HydraConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_in_proj = 2 * cfg.d_inner + 2 * cfg.d_state + cfg.nheads  # [z, x, B, C, dt]
        self.in_proj = nn.Linear(cfg.d_model, d_in_proj, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, bias=True)

        # dt spans [dt_min, dt_max] log-uniformly; dt_bias is the inverse softplus of it
        dt = torch.exp(torch.rand(cfg.nheads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(cfg.nheads).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(cfg.nheads))
        self.norm = GatedRMSNorm(cfg.d_inner, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)

    def _split(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        z, xbc, dt = torch.split(self.in_proj(u), [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)
        return z, xbc, F.softplus(dt + self.dt_bias)

    def _ssd_inputs(self, xbc: torch.Tensor, dt: torch.Tensor):
        cfg = self.cfg
        bsz, t, _ = xbc.shape
        x, b, c = torch.split(xbc, [cfg.d_inner, cfg.d_state, cfg.d_state], dim=-1)
        x = x.reshape(bsz, t, cfg.nheads, cfg.headdim)  # (B, T, H, P)
        a = -torch.exp(self.A_log) * dt  # (B, T, H)
        return x, x * dt.unsqueeze(-1), a, b, c

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y + x * self.D.unsqueeze(-1)
        y = y.reshape(*z.shape)  # (B, T, H*P)
        return self.out_proj(self.norm(y, z))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, T, D) -> (B, T, D), from a zero state."""
        t = u.shape[1]
        z, xbc, dt = self._split(u)
        xbc = F.pad(xbc.transpose(1, 2), (self.cfg.d_conv - 1, 0))
        xbc = F.silu(self.conv1d(xbc)[..., :t].transpose(1, 2))  # (B, T, conv_dim)
        x, xdt, a, b, c = self._ssd_inputs(xbc, dt)
        y = ssd_chunked(xdt, a, b, c, self.cfg.chunk)
        return self._output(y, x, z)

    def step(
        self, u: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u: (B, T, D) with T <= chunk; conv_state (B, conv_dim, d_conv-1); ssm_state (B, H, P, N)."""
        t = u.shape[1]
        k = self.cfg.d_conv
        z, xbc, dt = self._split(u)
        xbc = torch.cat([conv_state, xbc.transpose(1, 2)], dim=-1)  # (B, conv_dim, d_conv-1+T)
        new_conv_state = xbc[..., xbc.shape[-1] - (k - 1):]
        # the depthwise convolution as d_conv shifted multiply-adds: far fewer operations than a
        # Conv node for the short inputs of decoding, and the same result
        weight = self.conv1d.weight[:, 0, :]  # (conv_dim, d_conv)
        conv = self.conv1d.bias[:, None] + xbc[..., 0:t] * weight[:, 0:1]
        for i in range(1, k):
            conv = conv + xbc[..., i:i + t] * weight[:, i:i + 1]
        xbc = F.silu(conv.transpose(1, 2))  # (B, T, conv_dim)
        x, xdt, a, b, c = self._ssd_inputs(xbc, dt)
        y, new_ssm_state = ssd_chunk_step(xdt, a, b, c, ssm_state)
        return self._output(y, x, z), new_conv_state, new_ssm_state
