"""The EDM training loss and its parameter gradients for ``EDMPrecond(ResidualMLPDenoiser)``, derived
by hand: one forward that keeps what the backward needs, one backward written layer by layer, no
autograd graph.

Why: on CPU at the online size (width 256, batch 256) a third of a training step is per-op overhead,
and autograd adds a graph node, a ``t()`` and an ``AccumulateGrad`` per parameter on top. Here each
weight gradient is written by its matmul straight into ``p.grad`` (``out=``: into the flat gradient
buffer of ``synther_buffer/flat.py`` when the parameters are flattened), so nothing is zeroed or
accumulated. ``tests/test_manual_grad.py`` checks loss and every gradient against autograd.

Forward (``edm_loss_from_noise`` + ``EDMPrecond.forward`` + ``ResidualMLPDenoiser.forward``):
    sigma = exp(P_std n + P_mean);  lambda = (sigma^2 + sd^2) / (sigma sd)^2;  y = x + sigma eps
    c_skip, c_out, c_in, c_noise from Table 1;  e = rff(c_noise)
    h_0 = linear_in(proj(c_in y) + time2(silu(time1(e))))
    h_{k+1} = W_k relu(LN_k(h_k)) + b_k + h_k                                  (eq. 3)
    f = W_out relu(LN_out(h_d)) + b_out;   D = c_skip y + c_out f
    loss = mean(lambda (D - x)^2)          over B x dim entries
Backward: dL/dD = 2 lambda (D - x) / (B dim);  dL/df = c_out dL/dD;  then, per linear layer
z = a W^T + b:  dW = dz^T a,  db = sum_rows dz,  da = dz W;  relu: da * [a > 0];  LayerNorm: ATen's
``native_layer_norm_backward``; residual: dh_k = dLN_k + dh_{k+1}; SiLU: ATen's ``silu_backward``.

Mixed precision (``matmul_dtype=torch.bfloat16``): what ``torch.autocast(dtype=torch.bfloat16)`` does to
the same network, by hand. Every matmul takes bfloat16 operands (the weights cast once per step; fp32
master weights, gradients and Adam state stay untouched) and returns bfloat16; everything else
(sigma, preconditioning, LayerNorm, the residual stream, the loss, bias gradients) stays float32.
bfloat16 matmuls run ~2.3x faster than float32 on CPUs with AVX512-BF16 / AMX and on tensor-core GPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from .denoiser import ResidualMLPDenoiser
from .edm import EDMPrecond, preconditioning

aten = torch.ops.aten


def supports(denoiser: nn.Module) -> bool:
    """Whether ``edm_loss_and_grads`` knows this network: exactly ``EDMPrecond(ResidualMLPDenoiser)``
    with affine LayerNorms (a subclass or a changed layer falls back to autograd)."""
    if type(denoiser) is not EDMPrecond or type(denoiser.net) is not ResidualMLPDenoiser:
        return False
    net = denoiser.net
    norms = [blk.norm for blk in net.blocks] + [net.norm_out]
    return (all(type(n) is nn.LayerNorm and n.elementwise_affine and n.bias is not None for n in norms)
            and all(p.dtype == torch.float32 for p in denoiser.parameters()))


# the matmul dtypes edm_loss_and_grads takes (float16 would need loss scaling: not offered)
MATMUL_DTYPES = (torch.float32, torch.bfloat16)


def _linear(bias: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """z = a W^T + b in float32, ``a`` and ``w`` in the matmul dtype (bfloat16: the product is added
    to the float32 bias in one pass, as type promotion makes it float32)."""
    if a.dtype == torch.float32:
        return torch.addmm(bias, a, w.t())
    return torch.add(torch.mm(a, w.t()), bias)


def _add_linear_(acc: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """acc += a W^T in place (``acc`` float32, ``a`` / ``w`` in the matmul dtype)."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, w.t())
    return acc.add_(torch.mm(a, w.t()))


def _linear_grads(layer: nn.Linear, dz: torch.Tensor, dz_m: torch.Tensor, a: torch.Tensor) -> None:
    """z = a W^T + b:  dW = dz^T a,  db = sum over rows of dz, written into the layers' ``.grad``
    (float32). ``dz_m`` / ``a``: dz and the layer's input in the matmul dtype; the bias sum uses the
    float32 ``dz``."""
    if a.dtype == torch.float32:
        torch.mm(dz_m.t(), a, out=layer.weight.grad)
    else:  # bfloat16 product, accumulated in fp32 inside the matmul, widened into the fp32 gradient
        layer.weight.grad.copy_(torch.mm(dz_m.t(), a))
    torch.sum(dz, 0, out=layer.bias.grad)


def _relu_backward_(da: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a = relu(n):  dL/dn = dL/da * [a > 0], in place in ``da`` (the matmul's fresh output, still in
    cache: no new buffer); returned in float32 (a no-op for float32)."""
    return aten.threshold_backward.grad_input(da, a, 0.0, grad_input=da).float()


def _norm_backward(norm: nn.LayerNorm, da: torch.Tensor, h: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor) -> torch.Tensor:
    """Back through LN(h) (its gamma/beta gradients written into ``.grad``); returns dL/dh."""
    dh, dgamma, dbeta = aten.native_layer_norm_backward(
        da, h, norm.normalized_shape, mean, rstd, norm.weight, norm.bias, [True, True, True])
    norm.weight.grad.copy_(dgamma)
    norm.bias.grad.copy_(dbeta)
    return dh


def edm_loss_and_grads(denoiser: EDMPrecond, x: torch.Tensor, rnd_normal: torch.Tensor,
                       unit_noise: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2, *,
                       matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``edm_loss_from_noise(denoiser, x, rnd_normal, unit_noise, p_mean, p_std)`` (returned, detached)
    with every parameter's gradient of it OVERWRITTEN into ``p.grad`` (allocated if missing).

    ``denoiser`` must satisfy ``supports`` (else ``TypeError``); ``x`` and ``unit_noise`` are [B, dim],
    ``rnd_normal`` [B, 1]. ``matmul_dtype``: ``torch.float32`` (exact up to float rounding) or
    ``torch.bfloat16`` (the matmuls as under ``torch.autocast``; module docstring), else ``ValueError``.
    """
    if not supports(denoiser):
        raise TypeError(f"edm_loss_and_grads needs EDMPrecond(ResidualMLPDenoiser), got {denoiser!r}")
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
    for p in denoiser.parameters():
        if p.grad is None:
            p.grad = torch.empty_like(p)
    return edm_loss_and_grads_unchecked(denoiser, x, rnd_normal, unit_noise, p_mean, p_std,
                                        matmul_dtype=matmul_dtype)


@torch.no_grad()
def edm_loss_and_grads_unchecked(denoiser: EDMPrecond, x: torch.Tensor, rnd_normal: torch.Tensor,
                                 unit_noise: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2, *,
                                 matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``edm_loss_and_grads`` without its checks, for a training loop that made them once: ``denoiser``
    satisfies ``supports``, every parameter has a ``.grad`` and ``matmul_dtype`` is one of
    ``MATMUL_DTYPES`` (~70 us of Python per step saved)."""
    net: ResidualMLPDenoiser = denoiser.net
    rff, time1, time2 = net.time_mlp[0], net.time_mlp[1], net.time_mlp[3]
    md = matmul_dtype  # .to(md) is a no-op (the same tensor) for float32
    w = {layer: layer.weight.to(md) for layer in (time1, time2, net.proj, net.linear_in, net.linear_out,
                                                  *(blk.linear for blk in net.blocks))}

    # ---- forward, as edm_loss_from_noise / EDMPrecond.forward / ResidualMLPDenoiser.forward
    sigma = (rnd_normal * p_std + p_mean).exp()                    # ln(sigma) ~ N(P_mean, P_std^2)
    sd = denoiser.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2            # lambda(sigma)
    y = x + unit_noise * sigma                                     # x + n, n ~ N(0, sigma^2 I)
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sd)      # Table 1
    x_in = (c_in * y).to(md)
    e = rff(c_noise).to(md)                                        # random Fourier features (no parameters)
    t1 = _linear(time1.bias, e, w[time1])
    t2 = torch.nn.functional.silu(t1).to(md)
    u = _linear(time2.bias, t2, w[time2])                          # time embedding ...
    u = _add_linear_(u, x_in, w[net.proj]).add_(net.proj.bias).to(md)  # ... + proj(c_in y)
    h = _linear(net.linear_in.bias, u, w[net.linear_in])
    saved = []
    for blk in net.blocks:                                         # h <- W relu(LN(h)) + b + h  (eq. 3)
        n, mean, rstd = aten.native_layer_norm(h, blk.norm.normalized_shape, blk.norm.weight,
                                               blk.norm.bias, blk.norm.eps)
        a = n.relu_().to(md)
        saved.append((h, a, mean, rstd))
        h = _add_linear_(h + blk.linear.bias, a, w[blk.linear])    # one pass less than addmm + add_
    n, mean_out, rstd_out = aten.native_layer_norm(h, net.norm_out.normalized_shape, net.norm_out.weight,
                                                   net.norm_out.bias, net.norm_out.eps)
    a_out = n.relu_().to(md)
    f = _linear(net.linear_out.bias, a_out, w[net.linear_out])
    r = c_skip * y + c_out * f - x                                  # D(x + n; sigma) - x
    wr = weight * r
    loss = (wr * r).mean()

    # ---- backward
    df = wr.mul_(c_out * (2.0 / r.numel()))                         # dL/df = c_out 2 lambda (D - x) / (B dim)
    df_m = df.to(md)
    _linear_grads(net.linear_out, df, df_m, a_out)
    da = _relu_backward_(torch.mm(df_m, w[net.linear_out]), a_out)
    dh = _norm_backward(net.norm_out, da, h, mean_out, rstd_out)
    for blk, (h_k, a, mean, rstd) in zip(reversed(net.blocks), reversed(saved)):
        dh_m = dh.to(md)
        _linear_grads(blk.linear, dh, dh_m, a)
        da = _relu_backward_(torch.mm(dh_m, w[blk.linear]), a)
        dh = _norm_backward(blk.norm, da, h_k, mean, rstd).add_(dh)  # + the residual path
    dh_m = dh.to(md)
    _linear_grads(net.linear_in, dh, dh_m, u)
    du = torch.mm(dh_m, w[net.linear_in]).float()                  # u = proj(x_in) + time2(t2)
    du_m = du.to(md)
    _linear_grads(net.proj, du, du_m, x_in)
    _linear_grads(time2, du, du_m, t2)
    dt1 = aten.silu_backward(torch.mm(du_m, w[time2]).float(), t1)
    _linear_grads(time1, dt1, dt1.to(md), e)
    return loss
