"""flatten_parameters: parameters become aligned views of one buffer, gradients land in its flat
gradient, and clip + Adam on the flat tensor train exactly like per-tensor clip + Adam."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from synther_buffer import SynthERConfig, TransitionDiffusion
from synther_buffer.denoiser import ResidualMLPDenoiser
from synther_buffer.flat import ALIGN, clipped_adam_step, flatten_parameters

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _net(width: int = 16, depth: int = 2, dim: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return ResidualMLPDenoiser(dim, width=width, depth=depth, rff_dim=4, time_dim=8)


def _inside(t: torch.Tensor, flat: torch.Tensor) -> bool:
    start = flat.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + flat.numel() * 4


@settings(max_examples=15, deadline=None)
@given(width=st.integers(1, 40), depth=st.integers(1, 3), dim=st.integers(1, 9))
def test_parameters_become_aligned_views_with_values_kept(width, depth, dim):
    net = _net(width, depth, dim)
    before = [p.detach().clone() for p in net.parameters()]
    flat = flatten_parameters(net, with_grads=False)
    params = list(net.parameters())
    assert flat.grad is None and flat.dtype == torch.float32
    assert flat.numel() == sum(-(-p.numel() // ALIGN) * ALIGN for p in params)
    for p, b in zip(params, before):
        assert torch.equal(p, b) and p.is_contiguous() and _inside(p, flat)
        assert (p.data_ptr() - flat.data_ptr()) % (ALIGN * 4) == 0
    with torch.no_grad():
        flat.mul_(0.0)                   # one in-place op on the flat tensor reaches every layer
    assert all(not p.any() for p in net.parameters())


def test_backward_accumulates_into_the_flat_gradient():
    net = _net()
    ref = copy.deepcopy(net)
    flat = flatten_parameters(net, with_grads=True)
    x, c = torch.randn(7, 5), torch.randn(7)
    net(x, c).square().sum().backward()
    ref(x, c).square().sum().backward()
    for p, r in zip(net.parameters(), ref.parameters()):
        assert _inside(p.grad, flat.grad)
        torch.testing.assert_close(p.grad, r.grad)
    # padding gets no gradient: the flat norm is the norm over the parameters
    torch.testing.assert_close(flat.grad.norm(), torch.cat([r.grad.flatten() for r in ref.parameters()]).norm())
    flat.grad.zero_()
    assert all(not p.grad.any() for p in net.parameters())


def test_flat_clip_and_adam_train_like_per_tensor():
    net = _net()
    ref = copy.deepcopy(net)
    flat = flatten_parameters(net, with_grads=True)
    opt = torch.optim.Adam([flat], lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, c = torch.randn(8, 5, generator=g), torch.randn(8, generator=g)
        flat.grad.zero_()
        (net(x, c).square().mean() * 50).backward()          # large loss: the clip is active
        torch.nn.utils.clip_grad_norm_([flat], 1.0)
        opt.step()
        ref_opt.zero_grad(set_to_none=True)
        (ref(x, c).square().mean() * 50).backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        ref_opt.step()
    for p, r in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-5)
    pad = torch.ones_like(flat, dtype=torch.bool)
    for p in net.parameters():
        start = (p.data_ptr() - flat.data_ptr()) // 4
        pad[start:start + p.numel()] = False
    assert not flat.detach()[pad].any()                    # padding never moves


@pytest.mark.parametrize("fused,host_check", [(True, None), (True, True), (True, False), (False, None)])
@settings(max_examples=6, deadline=None)
@given(max_norm=st.floats(0.05, 20.0), scales=st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=8))
def test_clipped_adam_step_is_clip_grad_norm_then_adam(fused, host_check, max_norm, scales):
    """The clip folded into fused Adam's grad_scale takes the steps of clip_grad_norm_ + Adam, with
    gradients above and below max_norm (Adam is near scale-invariant on one step, not across steps
    of different scales: a missing clamp or a wrong scale shows up here), with the norm read on the host
    (CPU's default) or kept on the device (CUDA's)."""
    net = _net()
    ref = copy.deepcopy(net)
    flat = flatten_parameters(net, with_grads=True)
    ref_flat = flatten_parameters(ref, with_grads=True)
    opt = torch.optim.Adam([flat], lr=1e-2, fused=fused)
    ref_opt = torch.optim.Adam([ref_flat], lr=1e-2, fused=fused)
    g = torch.Generator().manual_seed(2)
    for scale in scales:
        grad = torch.randn(flat.shape, generator=g) * scale / flat.numel() ** 0.5   # norm ~ scale
        flat.grad.copy_(grad)
        ref_flat.grad.copy_(grad)
        clipped_adam_step(opt, [flat], max_norm, host_check=host_check)   # False: CUDA's way
        torch.nn.utils.clip_grad_norm_([ref_flat], max_norm)
        ref_opt.step()
        torch.testing.assert_close(flat.grad, ref_flat.grad, rtol=1e-5, atol=1e-7)   # left clipped
        torch.testing.assert_close(flat.detach(), ref_flat.detach(), rtol=1e-5, atol=1e-6)
    assert getattr(opt, "grad_scale", None) is None        # nothing left on the optimizer


def test_clipped_adam_step_on_a_parameter_list_clips_globally():
    net, ref = _net(), _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    for m in (net, ref):
        m(torch.ones(3, 5), torch.ones(3)).square().sum().mul(100).backward()
    clipped_adam_step(opt, list(net.parameters()), 0.5)
    torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
    ref_opt.step()
    for p, r in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r)
        torch.testing.assert_close(p.grad, r.grad)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("inf"), float("nan"), None])
def test_clipped_adam_step_refuses_a_bad_max_norm(max_norm):
    flat = flatten_parameters(_net(), with_grads=True)
    opt = torch.optim.Adam([flat], lr=1e-2, fused=True)
    before = flat.detach().clone()
    with pytest.raises(ValueError, match="max_norm"):
        clipped_adam_step(opt, [flat], max_norm)
    assert torch.equal(flat.detach(), before)              # nothing stepped


def test_bad_modules_raise():
    with pytest.raises(ValueError, match="no parameters"):
        flatten_parameters(nn.ReLU(), with_grads=False)
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="one dtype"):
        flatten_parameters(mixed, with_grads=True)


@pytest.mark.parametrize("gradients", ["autograd", "manual"])
def test_fit_with_flat_buffer_matches_per_tensor_fit(rng, gradients):
    """TransitionDiffusion.fit trains the same model whether it uses the flat buffer
    (param_layout="flat": "auto"'s choice for small models on CPU and for hand-written gradients) or
    per-tensor clip/Adam/EMA ("per_tensor": "auto"'s choice for large autograd models on CPU)."""
    x = rng.standard_normal((300, 4)).astype(np.float32)
    cfg = SynthERConfig.preset("tiny").replace(device="cpu", gradients=gradients)
    flat_fit = TransitionDiffusion(4, cfg.replace(param_layout="flat"))
    flat_fit.fit(x, steps=40)
    per_tensor = TransitionDiffusion(4, cfg.replace(param_layout="per_tensor"))
    per_tensor.fit(x, steps=40)
    assert flat_fit.last_fit["gradients"] == per_tensor.last_fit["gradients"] == gradients
    assert flat_fit.last_fit["loss"] == pytest.approx(per_tensor.last_fit["loss"], rel=1e-4)
    for (name, a), b in zip(flat_fit.ema.state_dict().items(), per_tensor.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    storages = lambda m: {p.untyped_storage().data_ptr() for p in m.parameters()}  # noqa: E731
    assert len(storages(flat_fit.model)) == 1 and len(storages(per_tensor.model)) > 1
    assert all(p.grad is None for m in (flat_fit, per_tensor) for p in m.model.parameters())  # none kept


def test_auto_layout_rule():
    """param_layout="auto": flat for hand-written gradients and on CUDA; on CPU, autograd flattens up to
    FLAT_MAX_PARAMS_CPU parameters and not above. "flat" / "per_tensor" are taken as said."""
    from synther_buffer.train_step import FLAT_MAX_PARAMS_CPU, resolve_flat

    cpu, cuda, limit = torch.device("cpu"), torch.device("cuda"), FLAT_MAX_PARAMS_CPU
    assert resolve_flat("auto", "autograd", cpu, limit) and not resolve_flat("auto", "autograd", cpu, limit + 1)
    assert resolve_flat("auto", "manual", cpu, 10 * limit) and resolve_flat("auto", "autograd", cuda, 10 * limit)
    assert resolve_flat("flat", "autograd", cpu, 10 * limit) and not resolve_flat("per_tensor", "manual", cuda, 1)
    with pytest.raises(ValueError, match="param_layout"):
        resolve_flat("packed", "manual", cpu, 1)


def test_fit_follows_the_auto_layout(rng):
    """A small tiny-preset model: "auto" trains it flat on both gradient paths (one storage)."""
    x = rng.standard_normal((300, 4)).astype(np.float32)
    cfg = SynthERConfig.preset("tiny").replace(device="cpu")
    storages = lambda m: len({p.untyped_storage().data_ptr() for p in m.model.parameters()})  # noqa: E731
    for gradients in ("autograd", "manual"):
        model = TransitionDiffusion(4, cfg.replace(gradients=gradients))
        model.fit(x, steps=2)
        assert storages(model) == 1, gradients
