"""Residual-MLP denoiser with a random-Fourier-feature noise embedding (seed B.2, eq. 3; Table 8).

Mirrors the reference SynthER network (``ResidualMLPDenoiser``):
    h   = proj(x) + time_mlp(rff(c_noise))
    h   = linear_in(h); h = h + linear(relu(layernorm(h)))  (x depth)   -- eq. 3
    out = linear_out(relu(layernorm(h)))
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RandomFourierFeatures(nn.Module):
    """[t, sin(2 pi w t), cos(2 pi w t)] with fixed Gaussian w (Tancik et al.); output dim = rff_dim + 1.

    Args:
        rff_dim: number of sine + cosine features (even).
        generator: draws w (default: the global RNG; ``build_denoiser`` re-draws it from its own).

    Raises:
        ValueError: ``rff_dim`` is odd.
    """

    def __init__(self, rff_dim: int, generator: torch.Generator | None = None):
        super().__init__()
        if rff_dim % 2:
            raise ValueError(f"rff_dim must be even, got {rff_dim}")
        self.register_buffer("weights", torch.randn(rff_dim // 2, generator=generator))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1)
        freqs = t * self.weights[None, :] * (2 * math.pi)
        return torch.cat([t, freqs.sin(), freqs.cos()], dim=-1)


class ResidualBlock(nn.Module):
    """x_{L+1} = linear(relu(layernorm(x_L))) + x_L  (seed eq. 3, with the reference code's LayerNorm)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: layernorm/linear backward need their inputs, not these outputs
        return self.linear(torch.relu_(self.norm(x))).add_(x)


class ResidualMLPDenoiser(nn.Module):
    """F_theta(x, c_noise): the raw network inside EDM's preconditioning.

    Args:
        dim: transition vector width D.
        width: hidden width (Table 8: 1024).
        depth: number of residual blocks (Table 8: 6).
        rff_dim: random Fourier feature dim of the noise embedding (Table 8: 16).
        time_dim: noise embedding / input projection width (reference code: 128).
    """

    def __init__(self, dim: int, width: int = 1024, depth: int = 6, rff_dim: int = 16, time_dim: int = 128):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(dim, time_dim)
        self.time_mlp = nn.Sequential(
            RandomFourierFeatures(rff_dim),
            nn.Linear(rff_dim + 1, time_dim),
            nn.SiLU(),
            nn.Linear(time_dim, time_dim),
        )
        self.linear_in = nn.Linear(time_dim, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.linear_out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """``x`` [B, D]; ``c_noise`` [B], or [1] when the whole batch shares one noise level (the
        sampler): the embedding is then computed once and broadcast over the rows."""
        h = self.proj(x) + self.time_mlp(c_noise)
        h = self.blocks(self.linear_in(h))
        return self.linear_out(torch.relu_(self.norm_out(h)))


def init_parameters(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """PyTorch's default initialisation, drawn from ``generator`` instead of the global RNG.

    ``nn.Linear``'s default (Kaiming-uniform with a = sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the
    weight and the bias; LayerNorm starts at (1, 0); the random Fourier frequencies are N(0, 1).

    Returns:
        ``net``, initialised in place.
    """
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, RandomFourierFeatures):
                m.weights.normal_(generator=generator)
    return net


def build_denoiser(dim: int, width: int, depth: int, rff_dim: int, time_dim: int, *, seed: int) -> ResidualMLPDenoiser:
    """A freshly initialised :class:`ResidualMLPDenoiser` (on the CPU) whose weights depend on ``seed`` alone.

    The network is built on the meta device and initialised from a local generator, so building one never
    reads or advances the process-global RNG (a background retrain must not disturb the agent's stream).

    Args:
        dim, width, depth, rff_dim, time_dim: as for :class:`ResidualMLPDenoiser`.
        seed: seeds the local generator of the initial weights.
    """
    with torch.device("meta"):
        net = ResidualMLPDenoiser(dim, width, depth, rff_dim, time_dim)
    net = net.to_empty(device="cpu")
    return init_parameters(net, torch.Generator(device="cpu").manual_seed(int(seed)))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
