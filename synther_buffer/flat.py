"""flatten_parameters: re-seat a module's parameters (and gradients) as views into one contiguous
buffer, so that gradient clipping, Adam and the EMA each run as one op on one tensor instead of one
op per layer (the multi-tensor trick of apex / DeepSpeed, with plain torch ops); clipped_adam_step:
the clipped optimizer step on such a buffer, the clip folded into the fused Adam kernel.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

ALIGN = 16  # elements: every view starts 64-byte aligned for float32, as separately allocated weights do


def flatten_parameters(module: nn.Module, *, with_grads: bool) -> nn.Parameter:
    """Move every parameter of ``module`` into one zero-padded contiguous buffer.

    Afterwards each ``p`` in ``module.parameters()`` is a view of the returned tensor (values unchanged),
    so an in-place update of the flat tensor (``Adam([flat]).step()``, ``lerp_``) updates the module.
    Padding stays zero: its gradient is zero, so clipping norms and Adam updates are those of the
    parameters alone. Two modules of the same architecture get the same layout (the EMA copy can be
    ``lerp_``-ed onto the trained weights in one op).

    Args:
        module: the network whose parameters are re-seated.
        with_grads: also give ``flat.grad`` (a zero buffer of the same layout) with each ``p.grad`` a view
            of it. Backward then accumulates into the views, so zero it with ``flat.grad.zero_()`` (not
            ``zero_grad(set_to_none=True)``, which would detach the views).

    Returns:
        The flat buffer, as a Parameter (``requires_grad`` as the module's first parameter).

    Raises:
        ValueError: ``module`` has no parameters, or they differ in dtype or device.
    """
    params = list(module.parameters())
    if not params:
        raise ValueError("module has no parameters to flatten")
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        raise ValueError("flatten_parameters needs all parameters on one device with one dtype")
    sizes = [-(-p.numel() // ALIGN) * ALIGN for p in params]
    flat = torch.zeros(sum(sizes), dtype=first.dtype, device=first.device)
    grad = torch.zeros_like(flat) if with_grads else None
    offset = 0
    with torch.no_grad():
        for p, size in zip(params, sizes):
            n = p.numel()
            flat[offset:offset + n].copy_(p.reshape(-1))
            p.data = flat[offset:offset + n].view_as(p)
            p.grad = grad[offset:offset + n].view_as(p) if grad is not None else None
            offset += size
    out = nn.Parameter(flat, requires_grad=first.requires_grad)
    out.grad = grad
    return out


def clipped_adam_step(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], max_norm: float, *,
                      host_check: Optional[bool] = None) -> None:
    """``clip_grad_norm_(params, max_norm)`` then ``opt.step()``, with one pass less over the gradient.

    When ``params`` is one flat tensor and ``opt`` a fused Adam, the clip becomes the kernel's
    ``grad_scale`` (the fused kernel divides each gradient element by it as it reads it, as it does for
    ``GradScaler``), so the gradient is read twice (norm, Adam) instead of three times and written once
    instead of twice. Scale = max(1, (||g|| + 1e-6) / max_norm) = 1 / clip_grad_norm_'s clamped
    coefficient. The gradient is left divided by the scale, as after ``clip_grad_norm_``. Any other
    optimizer or parameter list takes the plain ``clip_grad_norm_`` + ``step`` path.

    Args:
        opt: the optimizer over ``params``.
        params: the parameters whose gradients are clipped (one flat tensor for the fused path).
        max_norm: the largest global gradient norm, a positive finite number.
        host_check: read the norm on the host and, when no clip is due (the usual case once training
            settles: gradient norms stay below the reference's max_norm 1.0), run Adam without a scale,
            so the gradient is not written at all. Default: on CPU only, where reading a scalar waits
            for no device. Off (CUDA): the scale stays on the device, clamped to >= 1, no host sync.

    Raises:
        ValueError: ``max_norm`` is not a positive finite number (nothing is stepped).
    """
    try:
        ok = 0 < float(max_norm) < float("inf")   # numpy scalars pass, None / strings / nan do not
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
    params = list(params)
    if len(params) == 1 and opt.defaults.get("fused") and params[0].grad is not None:
        g = params[0].grad.view(-1)
        # ||g|| by one dot product: cheaper than vector_norm on CPU (benchmarks/THROUGHPUT.md)
        scale = torch.dot(g, g).sqrt_().add_(1e-6).div_(max_norm)
        if host_check is None:
            host_check = g.device.type == "cpu"
        if host_check:
            opt.grad_scale = scale if scale.item() > 1.0 else None   # None: no clip due, no division
        else:
            opt.grad_scale = scale.clamp_(min=1.0)
        try:
            opt.step()
        finally:
            opt.grad_scale = None
        return
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    opt.step()
