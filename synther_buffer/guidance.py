"""A denoiser conditioned on a scalar relevance score, trained with condition dropout and sampled with
classifier-free guidance (Ho & Salimans 2022), as Prioritized Generative Replay uses it (PGR; Wang,
Frans, Abbeel, Levine, Efros, ICLR 2025).

The conditional network is the residual MLP of ``denoiser.py`` with one more input: the (normalised)
score ``c`` goes through a small MLP and is added to the noise-level embedding,

    h = proj(x) + time_mlp(rff(c_noise)) + keep * cond_mlp(c)

where ``keep`` is 1 for a conditioned row and 0 for the null condition. The null condition adds
exactly nothing, so a conditional network asked for the null condition computes the same numbers as
the unconditional ``ResidualMLPDenoiser`` with the same weights (``tests/test_guidance.py``).

Training drops each row's condition with probability ``p`` (``SynthERConfig.cond_dropout``), which
trains the unconditional branch guidance needs. Sampling combines the two branches,

    D_w(x; sigma, c) = D(x; sigma, null) + w (D(x; sigma, c) - D(x; sigma, null)),

with both passes batched into one forward of 2B rows; ``w = 0`` runs the unconditional pass alone
(exactly the unconditional model, at half the cost). The hand-written gradients of ``manual_grad.py``
do not cover the condition MLP: conditional models train by autograd (``manual_grad.structure_mismatch``
rejects them by type).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .denoiser import ResidualMLPDenoiser, init_parameters
from .edm import EDMPrecond, preconditioning


class ConditionalResidualMLPDenoiser(ResidualMLPDenoiser):
    """F_theta(x, c_noise, c): :class:`~synther_buffer.denoiser.ResidualMLPDenoiser` plus a scalar condition.

    Args:
        dim, width, depth, rff_dim, time_dim: as for ``ResidualMLPDenoiser``.
    """

    def __init__(self, dim: int, width: int = 1024, depth: int = 6, rff_dim: int = 16, time_dim: int = 128):
        super().__init__(dim, width, depth, rff_dim, time_dim)
        self.cond_mlp = nn.Sequential(nn.Linear(1, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Optional[torch.Tensor] = None,
                keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The denoiser's raw output.

        Args:
            x: [B, D] (already scaled by c_in).
            c_noise: [B] or [1] (shared by the batch).
            cond: normalised scores [B, 1]; ``None`` is the null condition for every row (the
                unconditional network, computed without the condition MLP).
            keep: [B, 1] 1 (conditioned) / 0 (null condition) per row; ``None`` = all conditioned.

        Returns:
            [B, D].
        """
        h = self.proj(x) + self.time_mlp(c_noise)
        if cond is not None:
            emb = self.cond_mlp(cond)
            h = h + (emb if keep is None else emb * keep)   # h + keep * cond_mlp(c)
        h = self.blocks(self.linear_in(h))
        return self.linear_out(torch.relu_(self.norm_out(h)))


class ConditionalEDMPrecond(EDMPrecond):
    """D_theta(x; sigma, c) = c_skip x + c_out F_theta(c_in x; c_noise, c)  (EDM Table 1 with a condition).

    Args:
        net: a :class:`ConditionalResidualMLPDenoiser`.
        sigma_data: the data's standard deviation.
    """

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Optional[torch.Tensor] = None,
                keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` [B, D]; ``sigma`` [B] or [1]; ``cond``, ``keep`` [B, 1] or None (see the network)."""
        c_skip, c_out, c_in, c_noise = preconditioning(sigma.to(x.dtype).reshape(-1, 1), self.sigma_data)
        f_x = self.net(c_in * x, c_noise.flatten(), cond, keep)
        return c_skip * x + c_out * f_x


def build_conditional_denoiser(dim: int, width: int, depth: int, rff_dim: int, time_dim: int, *,
                               seed: int) -> ConditionalResidualMLPDenoiser:
    """A freshly initialised :class:`ConditionalResidualMLPDenoiser` on the CPU, weights from ``seed`` alone
    (built on the meta device and initialised from a local generator, as ``denoiser.build_denoiser``)."""
    with torch.device("meta"):
        net = ConditionalResidualMLPDenoiser(dim, width, depth, rff_dim, time_dim)
    net = net.to_empty(device="cpu")
    return init_parameters(net, torch.Generator(device="cpu").manual_seed(int(seed)))


def split_conditioned_batch(batch: torch.Tensor, dim: int):
    """``(x, cond, keep)`` from a training batch ``[x | cond | keep]`` of ``dim + 2`` columns."""
    return batch[:, :dim], batch[:, dim:dim + 1], batch[:, dim + 1:dim + 2]


def cond_edm_loss_from_noise(denoiser: ConditionalEDMPrecond, batch: torch.Tensor, rnd_normal: torch.Tensor,
                             unit_noise: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """``edm.edm_loss_from_noise`` for a conditional denoiser, with the condition dropped where ``keep`` is 0.

    The batch carries its condition and dropout mask as two extra columns (``[x | cond | keep]``), so
    the training step (``train_step.AutogradStep``) calls it exactly as the unconditional loss.

    ln(sigma) ~ N(P_mean, P_std^2);  loss = lambda(sigma) || D(x + sigma n; sigma, keep ? c : null) - x ||^2.

    Args:
        denoiser: D(x; sigma, c).
        batch: [B, D + 2]: clean rows, normalised scores, keep mask (1 / 0).
        rnd_normal: standard normal draws [B, 1].
        unit_noise: standard normal noise [B, D].
        p_mean, p_std: the log-normal training noise distribution.

    Returns:
        The scalar loss (with the autograd graph).
    """
    x, cond, keep = split_conditioned_batch(batch, unit_noise.shape[1])
    sigma = (rnd_normal * p_std + p_mean).exp()                    # ln(sigma) ~ N(P_mean, P_std^2)
    sd = denoiser.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2            # lambda(sigma)
    denoised = denoiser(x + unit_noise * sigma, sigma, cond, keep)
    return (weight * (denoised - x) ** 2).mean()


def dropout_keep(batch_size: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Condition dropout: a [B, 1] mask, 0 with probability ``p`` (the null condition), else 1."""
    u = torch.rand(batch_size, 1, device=device, generator=generator)
    return (u >= p).to(torch.float32)


def cfg_combine(d_uncond: torch.Tensor, d_cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: D = D_uncond + w (D_cond - D_uncond)."""
    return d_uncond + w * (d_cond - d_uncond)


class GuidedDenoiser:
    """D_w(x; sigma) for ``edm.heun_sample``: one batch's conditions, guidance weight ``w``.

    Each call runs the conditional and the unconditional pass as one forward of 2B rows
    (``[x; x]`` with ``keep = [1; 0]``) and combines them with :func:`cfg_combine`; ``w == 0`` runs the
    unconditional pass alone.

    Args:
        net: the (EMA) :class:`ConditionalEDMPrecond`.
        cond: normalised conditions [B, 1] for the batch being sampled.
        w: the guidance scale (>= 0).
    """

    def __init__(self, net: ConditionalEDMPrecond, cond: torch.Tensor, w: float):
        self.net, self.w = net, float(w)
        b = cond.shape[0]
        self.cond2 = torch.cat([cond, cond], dim=0)
        self.keep2 = torch.cat([torch.ones(b, 1, device=cond.device, dtype=cond.dtype),
                                torch.zeros(b, 1, device=cond.device, dtype=cond.dtype)], dim=0)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.w == 0.0:
            return self.net(x, sigma)                      # the unconditional model, exactly
        d = self.net(torch.cat([x, x], dim=0), sigma, self.cond2, self.keep2)
        d_cond, d_uncond = d.chunk(2, dim=0)
        return cfg_combine(d_uncond, d_cond, self.w)
