"""The EDM training loss and its parameter gradients for ``EDMPrecond(ResidualMLPDenoiser)``, derived
by hand: one forward that keeps what the backward needs, one backward written layer by layer, no
autograd graph.

Why: on CPU at the online size (width 256, batch 256) a third of a training step is per-op overhead,
and autograd adds a graph node, a ``t()`` and an ``AccumulateGrad`` per parameter on top. Here each
weight gradient is written by its matmul straight into ``p.grad`` (``out=``: into the flat gradient
buffer of ``synther_buffer/flat.py`` when the parameters are flattened), so nothing is zeroed or
accumulated. ``tests/test_manual_grad.py`` checks loss and every gradient against autograd.

The formulas hold for one network only: ``structure_mismatch`` verifies that a denoiser is exactly it
(layer types, order, activations, shapes, LayerNorm placement, no hooks) and that its forward computes
what the formulas assume; ``TransitionDiffusion.fit`` trains anything else by autograd.

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

Mixed precision (``matmul_dtype=torch.bfloat16``): bfloat16 matmuls as under
``torch.autocast(dtype=torch.bfloat16)``, by hand. Every matmul takes bfloat16 operands (the weights cast
once per step; fp32 master weights, gradients and Adam state stay untouched) and returns bfloat16;
everything else (sigma, preconditioning, LayerNorm, the residual stream, the loss, bias gradients) stays
float32. That last part differs from autocast, which carries the residual stream in bfloat16: the two
are about equally far from float32 (gradients within ~2% of it), not identical to each other.
It pays where bfloat16 matmuls are native: CPUs with AVX512-BF16 / AMX and tensor-core GPUs.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .denoiser import RandomFourierFeatures, ResidualBlock, ResidualMLPDenoiser
from .edm import EDMPrecond, preconditioning

aten = torch.ops.aten

# the matmul dtypes edm_loss_and_grads takes (float16 would need loss scaling: not offered)
MATMUL_DTYPES = (torch.float32, torch.bfloat16)
PROBE_ROWS = 8          # rows of the forward probe in structure_mismatch
PROBE_RTOL = 1e-3       # its tolerance: float32 reordering (and TF32) stays far below, a changed layer far above


# ------------------------------------------------------------------------------ what the formulas assume
def supports(denoiser: nn.Module) -> bool:
    """Whether ``edm_loss_and_grads`` computes this network's gradients: ``structure_mismatch`` finds
    nothing."""
    return structure_mismatch(denoiser) is None


def structure_mismatch(denoiser: nn.Module) -> Optional[str]:
    """Why the hand-written gradients would be wrong for ``denoiser``, or ``None`` when they are right.

    Checks, in order: exactly ``EDMPrecond(ResidualMLPDenoiser)`` (no subclass); the network's layers
    in the order and of the types the formulas index (``proj`` Linear; ``time_mlp`` = RFF, Linear,
    SiLU, Linear; ``linear_in`` Linear; ``blocks`` of ``ResidualBlock`` = LayerNorm then Linear;
    ``norm_out`` LayerNorm; ``linear_out`` Linear) and nothing else; the shapes chaining them; affine
    LayerNorms over the width; trainable float32 parameters with biases; no hooks or per-instance
    ``forward``; and finally a forward probe: the module's own ``forward`` on a few fixed rows equals
    the forward the gradients are derived from (this catches an edited ``forward``, e.g. another
    activation inside the residual blocks). The probe uses a local generator: no global RNG is read.

    Args:
        denoiser: the network ``TransitionDiffusion`` trains.

    Returns:
        A one-line reason, or ``None``.
    """
    if type(denoiser) is not EDMPrecond:
        return f"the network is a {type(denoiser).__name__}, not EDMPrecond"
    net = denoiser.net
    if type(net) is not ResidualMLPDenoiser:
        return f"EDMPrecond wraps a {type(net).__name__}, not ResidualMLPDenoiser"
    reason = _layers_mismatch(denoiser) or _parameters_mismatch(denoiser)
    return reason or _probe_mismatch(denoiser)


def _layers_mismatch(denoiser: EDMPrecond) -> Optional[str]:
    net: ResidualMLPDenoiser = denoiser.net
    layout = [("proj", nn.Linear), ("time_mlp", nn.Sequential), ("linear_in", nn.Linear),
              ("blocks", nn.Sequential), ("norm_out", nn.LayerNorm), ("linear_out", nn.Linear)]
    reason = _children_mismatch("EDMPrecond", denoiser, [("net", ResidualMLPDenoiser)])
    reason = reason or _children_mismatch("ResidualMLPDenoiser", net, layout)
    reason = reason or _children_mismatch("time_mlp", net.time_mlp, [
        ("0", RandomFourierFeatures), ("1", nn.Linear), ("2", nn.SiLU), ("3", nn.Linear)])
    for i, blk in enumerate(net.blocks):
        reason = reason or _children_mismatch(f"blocks[{i}]", blk, [("norm", nn.LayerNorm), ("linear", nn.Linear)],
                                              block_type=ResidualBlock)
    if reason:
        return reason
    rff_out = 2 * net.time_mlp[0].weights.numel() + 1
    time_dim, width = net.proj.out_features, net.linear_in.out_features
    linears = [("proj", net.proj, net.dim, time_dim), ("time_mlp[1]", net.time_mlp[1], rff_out, time_dim),
               ("time_mlp[3]", net.time_mlp[3], time_dim, time_dim), ("linear_in", net.linear_in, time_dim, width),
               ("linear_out", net.linear_out, width, net.dim)]
    linears += [(f"blocks[{i}].linear", blk.linear, width, width) for i, blk in enumerate(net.blocks)]
    for name, layer, fan_in, fan_out in linears:
        if layer.bias is None or tuple(layer.weight.shape) != (fan_out, fan_in):
            return f"{name} is not a Linear({fan_in}, {fan_out}) with a bias"
    norms = [(f"blocks[{i}].norm", blk.norm) for i, blk in enumerate(net.blocks)] + [("norm_out", net.norm_out)]
    for name, norm in norms:
        if tuple(norm.normalized_shape) != (width,) or not norm.elementwise_affine or norm.bias is None:
            return f"{name} is not an affine LayerNorm({width}) with a bias"
    return None


def _children_mismatch(where: str, module: nn.Module, expected: List[Tuple[str, type]],
                       block_type: Optional[type] = None) -> Optional[str]:
    """``module`` (of exactly ``block_type`` when given) has exactly the children ``expected``, by name,
    order and exact type."""
    if block_type is not None and type(module) is not block_type:
        return f"{where} is a {type(module).__name__}, not {block_type.__name__}"
    found = [(name, type(child)) for name, child in module.named_children()]
    if found != expected:
        show = lambda pairs: ", ".join(f"{n}: {t.__name__}" for n, t in pairs)  # noqa: E731
        return f"{where} holds [{show(found)}], expected [{show(expected)}]"
    return None


def _parameters_mismatch(denoiser: EDMPrecond) -> Optional[str]:
    for name, p in denoiser.named_parameters():
        if p.dtype != torch.float32 or not p.requires_grad:
            return f"parameter {name} is {p.dtype}{'' if p.requires_grad else ', frozen'} (needs trainable float32)"
        if getattr(p, "_backward_hooks", None):
            return f"parameter {name} has gradient hooks"
    for name, m in denoiser.named_modules():
        if "forward" in vars(m):
            return f"module {name or 'EDMPrecond'} has its own forward"
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return f"module {name or 'EDMPrecond'} has hooks"
    return None


@torch.no_grad()
def _probe_mismatch(denoiser: EDMPrecond) -> Optional[str]:
    """The module's forward D(x; sigma) against the forward the gradients are derived from, on
    ``PROBE_ROWS`` fixed rows at noise levels 0.5..5 (where D = c_skip x + c_out F is mostly F)."""
    net: ResidualMLPDenoiser = denoiser.net
    device = next(denoiser.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(PROBE_ROWS, net.dim, generator=gen).to(device)
    sigma = torch.logspace(-0.3, 0.7, PROBE_ROWS).reshape(-1, 1).to(device)
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, denoiser.sigma_data)
    f, _ = _forward(net, c_in * x, c_noise, _weights(net, torch.float32))
    ours = c_skip * x + c_out * f
    try:
        theirs = denoiser(x, sigma.flatten())
    except Exception as e:  # a forward that cannot run on the probe is not the forward assumed
        return f"the forward probe raised {type(e).__name__}: {e}"
    if theirs.shape != ours.shape:
        return f"the forward returns shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}"
    err = ((theirs - ours).norm() / ours.norm().clamp_min(1e-12)).item()
    if not err <= PROBE_RTOL:
        return f"the forward differs from the assumed one (relative error {err:.2g} on a probe)"
    return None


# ------------------------------------------------------------------------------ loss and gradients
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
    """The EDM loss with every parameter's gradient of it OVERWRITTEN into ``p.grad`` (allocated if missing).

    Args:
        denoiser: an ``EDMPrecond(ResidualMLPDenoiser)`` that ``supports`` accepts.
        x: clean rows [B, dim].
        rnd_normal: standard normal draws [B, 1] (ln sigma = P_std n + P_mean).
        unit_noise: standard normal noise [B, dim].
        p_mean, p_std: the training noise distribution.
        matmul_dtype: ``torch.float32`` (exact up to float rounding) or ``torch.bfloat16`` (the matmuls
            as under ``torch.autocast``; module docstring).

    Returns:
        ``edm_loss_from_noise(denoiser, x, rnd_normal, unit_noise, p_mean, p_std)``, detached.

    Raises:
        TypeError: ``denoiser`` is not the network the formulas are derived for (the reason is named).
        ValueError: ``matmul_dtype`` is not one of ``MATMUL_DTYPES``.
    """
    reason = structure_mismatch(denoiser)
    if reason is not None:
        raise TypeError(f"edm_loss_and_grads needs EDMPrecond(ResidualMLPDenoiser) as built by "
                        f"denoiser.build_denoiser: {reason}")
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
    """``edm_loss_and_grads`` without its checks, for a training loop that made them once (they include
    a forward probe, far more than a step can afford): ``denoiser`` satisfies ``supports``, every
    parameter has a ``.grad`` and ``matmul_dtype`` is one of ``MATMUL_DTYPES``."""
    net: ResidualMLPDenoiser = denoiser.net
    time1, time2 = net.time_mlp[1], net.time_mlp[3]
    md = matmul_dtype  # .to(md) is a no-op (the same tensor) for float32
    w = _weights(net, md)

    # ---- forward, as edm_loss_from_noise / EDMPrecond.forward / ResidualMLPDenoiser.forward
    sigma = (rnd_normal * p_std + p_mean).exp()                    # ln(sigma) ~ N(P_mean, P_std^2)
    sd = denoiser.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2            # lambda(sigma)
    y = x + unit_noise * sigma                                     # x + n, n ~ N(0, sigma^2 I)
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sd)      # Table 1
    f, (x_in, e, t1, t2, u, saved, h, mean_out, rstd_out, a_out) = _forward(net, c_in * y, c_noise, w)
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


def _weights(net: ResidualMLPDenoiser, md: torch.dtype) -> Dict[nn.Linear, torch.Tensor]:
    """Every Linear's weight in the matmul dtype (cast once per step; the same tensors for float32)."""
    time1, time2 = net.time_mlp[1], net.time_mlp[3]
    return {layer: layer.weight.to(md) for layer in (time1, time2, net.proj, net.linear_in, net.linear_out,
                                                     *(blk.linear for blk in net.blocks))}


def _forward(net: ResidualMLPDenoiser, c_in_y: torch.Tensor, c_noise: torch.Tensor,
             w: Dict[nn.Linear, torch.Tensor]) -> Tuple[torch.Tensor, tuple]:
    """F(c_in y; c_noise) as ``ResidualMLPDenoiser.forward`` computes it, by hand: returns F [B, dim]
    (float32) and what the backward needs, (x_in, e, t1, t2, u, per-block (h, a, mean, rstd), h_d,
    mean_out, rstd_out, a_out). Matmul operands are in ``w``'s dtype."""
    rff, time1, time2 = net.time_mlp[0], net.time_mlp[1], net.time_mlp[3]
    md = w[time1].dtype
    x_in = c_in_y.to(md)
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
    return f, (x_in, e, t1, t2, u, saved, h, mean_out, rstd_out, a_out)
