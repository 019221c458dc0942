"""flatten_parameters: re-seat a module's parameters (and gradients) as views into one contiguous
buffer, so that gradient clipping, Adam and the EMA each run as one op on one tensor instead of one
op per layer (the multi-tensor trick of apex / DeepSpeed, with plain torch ops).
"""

from __future__ import annotations

import torch
from torch import nn

ALIGN = 16  # elements: every view starts 64-byte aligned for float32, as separately allocated weights do


def flatten_parameters(module: nn.Module, *, with_grads: bool) -> nn.Parameter:
    """Move every parameter of ``module`` into one zero-padded contiguous buffer; return it as a Parameter.

    Afterwards each ``p`` in ``module.parameters()`` is a view of the returned tensor (values unchanged),
    so an in-place update of the flat tensor (``Adam([flat]).step()``, ``lerp_``) updates the module.
    With ``with_grads``, ``flat.grad`` is a zero buffer of the same layout and each ``p.grad`` a view of
    it: backward then accumulates into the views, so zero it with ``flat.grad.zero_()`` (not
    ``zero_grad(set_to_none=True)``, which would detach the views). Padding stays zero: its gradient is
    zero, so clipping norms and Adam updates are those of the parameters alone.

    Two modules of the same architecture get the same layout (the EMA copy can be ``lerp_``-ed onto
    the trained weights in one op).
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
