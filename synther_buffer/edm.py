"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Written out equation by equation, as in NVlabs EDM ``training/loss.py`` and ``generate.py``:
  * Table 1 preconditioning: c_skip, c_out, c_in, c_noise and D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).
  * Training: ln(sigma) ~ N(P_mean, P_std^2), loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
  * Eq. 5 noise schedule, Algorithm 1 (deterministic Heun) and Algorithm 2 (stochastic Heun with churn).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import nn

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EDMPrecond(nn.Module):
    """D_theta(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma))  (Table 1).

    Args:
        net: the raw network F_theta(x, c_noise) (``denoiser.ResidualMLPDenoiser``).
        sigma_data: the data's standard deviation.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 1.0):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x`` [B, D]; ``sigma`` [B] (one level per row) or [1] (one for the batch, broadcast)."""
        c_skip, c_out, c_in, c_noise = preconditioning(sigma.to(x.dtype).reshape(-1, 1), self.sigma_data)
        f_x = self.net(c_in * x, c_noise.flatten())
        return c_skip * x + c_out * f_x


def preconditioning(sigma: torch.Tensor, sigma_data: float):
    """Table 1's coefficients for noise levels ``sigma`` (any shape, elementwise).

    Returns:
        ``(c_skip, c_out, c_in, c_noise)``, each shaped like ``sigma``.
    """
    sd2 = sigma_data ** 2
    c_skip = sd2 / (sigma ** 2 + sd2)                               # c_skip = sd^2 / (s^2 + sd^2)
    c_out = sigma * sigma_data / (sigma ** 2 + sd2).sqrt()          # c_out  = s sd / sqrt(s^2 + sd^2)
    c_in = 1.0 / (sd2 + sigma ** 2).sqrt()                          # c_in   = 1 / sqrt(sd^2 + s^2)
    c_noise = sigma.log() / 4                                       # c_noise = ln(s) / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss(denoiser: EDMPrecond, x: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """EDM training loss (Karras et al. eq. 2 with Table 1 choices), averaged over the batch.

    ln(sigma) ~ N(P_mean, P_std^2);  n ~ N(0, sigma^2 I);
    loss = lambda(sigma) * || D(x + n; sigma) - x ||^2,  lambda = (sigma^2 + sd^2) / (sigma sd)^2.

    Args:
        denoiser: D(x; sigma).
        x: clean rows [B, D].
        p_mean, p_std: the log-normal training noise distribution.
        generator: draws the noise levels and the noise (first [B, 1], then [B, D]).

    Returns:
        The scalar loss (with the autograd graph).
    """
    rnd_normal = torch.randn(x.shape[0], 1, device=x.device, dtype=x.dtype, generator=generator)
    unit_noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return edm_loss_from_noise(denoiser, x, rnd_normal, unit_noise, p_mean, p_std)


def edm_loss_from_noise(denoiser: EDMPrecond, x: torch.Tensor, rnd_normal: torch.Tensor,
                        unit_noise: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """``edm_loss`` with its two standard-normal draws passed in: a pure function of its inputs, so
    ``torch.compile`` can fuse it without a generator inside.

    Args:
        denoiser: D(x; sigma).
        x: clean rows [B, D].
        rnd_normal: standard normal draws [B, 1]; ln sigma = P_std n + P_mean.
        unit_noise: standard normal noise [B, D], scaled by sigma.
        p_mean, p_std: the log-normal training noise distribution.

    Returns:
        The scalar loss (with the autograd graph).
    """
    sigma = (rnd_normal * p_std + p_mean).exp()                    # ln(sigma) ~ N(P_mean, P_std^2)
    sd = denoiser.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2            # lambda(sigma)
    denoised = denoiser(x + unit_noise * sigma, sigma)             # D(x + n; sigma), n ~ N(0, sigma^2 I)
    return (weight * (denoised - x) ** 2).mean()


def sigma_schedule(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   rho: float = 7.0) -> List[float]:
    """Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, plus sigma_N = 0.

    Args:
        num_steps: N, the number of noise levels (>= 1; one step is just sigma_max).
        sigma_min, sigma_max, rho: the schedule's range and curvature.

    Returns:
        N + 1 host floats, decreasing to 0 (no device syncs in the sampling loop).

    Raises:
        ValueError: ``num_steps`` < 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return [float(sigma_max), 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sig = [(a + i / (num_steps - 1) * (b - a)) ** rho for i in range(num_steps)]
    return sig + [0.0]


@torch.no_grad()
def heun_sample(denoise: Denoise, x_init: torch.Tensor, sigmas: List[float], s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                generator: Optional[torch.Generator] = None,
                on_step: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Karras et al. Algorithm 2 (stochastic Heun); with ``s_churn=0`` it is Algorithm 1 (deterministic).

    Args:
        denoise: D(x; sigma) taking ``x`` [B, D] and ``sigma`` [1]: one noise level per step for the
            whole batch, broadcast over the rows (``EDMPrecond`` then embeds it once, not B times).
        x_init: standard normal noise [B, D]; scaled here by sigma_0 (x_0 ~ N(0, sigma_0^2 I)).
        sigmas: eq. 5 schedule from ``sigma_schedule`` (N + 1 floats ending in 0).
        s_churn, s_tmin, s_tmax, s_noise: Table 9 stochasticity.
        generator: draws the churn noise.
        on_step: optional callback after each step (progress bars).

    Returns:
        The samples x_N [B, D].
    """
    n = len(sigmas) - 1
    x = x_init * sigmas[0]
    gamma_max = min(s_churn / n, math.sqrt(2) - 1)
    for i in range(n):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        # gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_tmin, S_tmax] else 0
        gamma = gamma_max if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            # x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps,  eps ~ N(0, S_noise^2 I)
            eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) * s_noise
            x = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * eps
        # Euler step: d = (x_hat - D(x_hat; t_hat)) / t_hat;  x_{i+1} = x_hat + (t_{i+1} - t_hat) d
        d = (x - denoise(x, x.new_full((1,), t_hat))) / t_hat
        x_next = x + (t_next - t_hat) * d
        if t_next > 0:
            # 2nd-order correction: d' = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1}; average the slopes
            d_prime = (x_next - denoise(x_next, x.new_full((1,), t_next))) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
        if on_step is not None:
            on_step(i)
    return x


def num_function_evals(num_steps: int) -> int:
    """Denoiser evaluations per sample for Heun with N steps: 2N - 1 (no correction at the last step)."""
    return 2 * num_steps - 1
