"""edm_loss_and_grads: the hand-derived loss and gradients equal autograd's, are written (not added)
into p.grad / the flat gradient buffer, and TransitionDiffusion.fit trains the same model with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from synther_buffer import SynthERConfig, TransitionDiffusion
from synther_buffer.denoiser import ResidualMLPDenoiser
from synther_buffer.edm import EDMPrecond, edm_loss_from_noise
from synther_buffer.flat import flatten_parameters
from synther_buffer.manual_grad import (edm_loss_and_grads, edm_loss_and_grads_unchecked, structure_mismatch,
                                        supports)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _denoiser(dim=5, width=16, depth=2, sigma_data=1.0, seed=0, device="cpu") -> EDMPrecond:
    torch.manual_seed(seed)
    net = ResidualMLPDenoiser(dim, width=width, depth=depth, rff_dim=4, time_dim=8)
    with torch.no_grad():  # non-trivial LayerNorm affines, so their gradients are exercised
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return EDMPrecond(net, sigma_data).to(device)


def _draws(batch, dim, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g) * 2
    return x.to(device), torch.randn(batch, 1, generator=g).to(device), torch.randn(batch, dim, generator=g).to(device)


def _autograd(model, x, rn, un, p_mean=-1.2, p_std=1.2):
    model.zero_grad(set_to_none=True)
    loss = edm_loss_from_noise(model, x, rn, un, p_mean, p_std)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_matches_autograd(model, x, rn, un, p_mean=-1.2, p_std=1.2):
    ref_loss, ref_grads = _autograd(model, x, rn, un, p_mean, p_std)
    model.zero_grad(set_to_none=True)
    loss = edm_loss_and_grads(model, x, rn, un, p_mean, p_std)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    # float32 round-off of backprop scales with the largest gradients flowing, not with each tensor's
    # own (a LayerNorm over 1-2 features has near-zero, cancellation-made input gradients)
    scale = max(g.abs().max().item() for g in ref_grads.values()) + 1e-6
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


# width >= 4: a LayerNorm over one feature outputs its bias whatever the input, so the gradients
# below it are pure round-off on both paths (opposite signs seen at width 1)
@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 9), width=st.integers(4, 24), depth=st.integers(0, 3), batch=st.integers(1, 20),
       sigma_data=st.floats(0.2, 3.0), p_mean=st.floats(-2.0, 1.0), p_std=st.floats(0.1, 2.0),
       seed=st.integers(0, 1000))
def test_loss_and_every_gradient_equal_autograd(dim, width, depth, batch, sigma_data, p_mean, p_std, seed):
    model = _denoiser(dim, width, depth, sigma_data, seed=seed)
    _assert_matches_autograd(model, *_draws(batch, dim, seed=seed + 1), p_mean, p_std)


def test_gradients_are_overwritten_not_accumulated():
    model = _denoiser()
    x, rn, un = _draws(12, 5)
    _, ref = _autograd(model, x, rn, un)
    for p in model.parameters():
        p.grad = torch.full_like(p, 123.0)                 # stale gradients from anywhere
    edm_loss_and_grads(model, x, rn, un)
    edm_loss_and_grads(model, x, rn, un)                   # twice: still one step's gradient
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradients_land_in_the_flat_buffer():
    model = _denoiser(width=20, depth=3)
    x, rn, un = _draws(16, 5)
    _, ref = _autograd(model, x, rn, un)
    flat = flatten_parameters(model, with_grads=True)
    flat.grad.fill_(7.0)                                   # the padding between views too
    edm_loss_and_grads(model, x, rn, un)
    for name, p in model.named_parameters():
        assert p.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6, msg=name)
    written = sum(p.numel() for p in model.parameters())
    assert (flat.grad == 7.0).sum().item() == flat.numel() - written   # only padding left untouched
    assert torch.isfinite(flat.grad).all()


def test_unsupported_networks_are_refused():
    model = _denoiser()
    assert supports(model)

    class Custom(EDMPrecond):
        pass

    assert not supports(Custom(model.net))
    assert not supports(model.net)                         # not preconditioned
    no_affine = _denoiser()
    no_affine.net.norm_out = nn.LayerNorm(16, elementwise_affine=False)
    assert not supports(no_affine)
    assert not supports(_denoiser().double())
    with pytest.raises(TypeError, match="EDMPrecond"):
        edm_loss_and_grads(Custom(model.net), *_draws(4, 5))


def _set_children(module: nn.Module, order) -> None:
    module._modules = {name: module._modules[name] for name in order}


# (what is changed, the change, a word the reason must name)
MODIFICATIONS = [
    ("GELU in the time MLP", lambda m: m.net.time_mlp.__setitem__(2, nn.GELU()), "GELU"),
    ("an extra layer in the time MLP", lambda m: m.net.time_mlp.append(nn.Linear(8, 8)), "time_mlp"),
    ("an extra block of another type", lambda m: m.net.blocks.append(nn.Linear(16, 16)), "blocks[2]"),
    ("an extra layer in the network", lambda m: m.net.add_module("drop", nn.Dropout(0.1)), "drop"),
    ("LayerNorm removed from a block", lambda m: setattr(m.net.blocks[0], "norm", nn.Identity()), "blocks[0]"),
    ("block layers reordered", lambda m: _set_children(m.net.blocks[1], ["linear", "norm"]), "blocks[1]"),
    ("a Linear without bias", lambda m: m.net.time_mlp.__setitem__(3, nn.Linear(8, 8, bias=False)), "time_mlp[3]"),
    ("a Linear of another shape", lambda m: setattr(m.net, "linear_out", nn.Linear(16, 4)), "linear_out"),
    ("a LayerNorm without affine", lambda m: setattr(m.net, "norm_out", nn.LayerNorm(16, elementwise_affine=False)),
     "norm_out"),
    ("a forward hook", lambda m: m.net.blocks[0].register_forward_hook(lambda mod, i, o: o * 2), "hooks"),
    ("a per-instance forward", lambda m: setattr(m.net.blocks[1], "forward", lambda x: x), "own forward"),
    ("a frozen parameter", lambda m: m.net.proj.weight.requires_grad_(False), "frozen"),
    ("float64 parameters", lambda m: m.double(), "float64"),
]


@pytest.mark.parametrize("what,modify,named", MODIFICATIONS, ids=[m[0] for m in MODIFICATIONS])
def test_structure_check_rejects_modified_denoisers(what, modify, named):
    """Any change to the network the hand-written gradients index by position is refused, naming it."""
    model = _denoiser()
    assert structure_mismatch(model) is None and supports(model)
    modify(model)
    reason = structure_mismatch(model)
    assert reason is not None and named in reason, (what, reason)
    assert not supports(model)
    with pytest.raises(TypeError, match="EDMPrecond"):
        edm_loss_and_grads(model, *_draws(4, 5))


def test_hand_written_gradients_would_be_wrong_on_a_gelu_time_mlp():
    """Why the check matters: on the GELU network the formulas (which assume SiLU) give a wrong loss
    gradient for the time MLP, while autograd follows the network."""
    model = _denoiser(width=16, depth=2, seed=3)
    model.net.time_mlp[2] = nn.GELU()
    x, rn, un = _draws(64, 5)
    _, ref = _autograd(model, x, rn, un)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    edm_loss_and_grads_unchecked(model, x, rn, un)
    g, r = model.net.time_mlp[1].weight.grad, ref["net.time_mlp.1.weight"]
    assert ((g - r).norm() / r.norm()).item() > 1e-2


def test_forward_probe_catches_an_edited_block_forward(monkeypatch):
    """An edit of ResidualBlock.forward itself (the classes and layers unchanged: GELU instead of ReLU,
    or the LayerNorm after the Linear) is caught by the forward probe."""
    import torch.nn.functional as F

    from synther_buffer.denoiser import ResidualBlock

    model = _denoiser()
    edits = {"gelu": lambda self, x: self.linear(F.gelu(self.norm(x))) + x,
             "norm after linear": lambda self, x: torch.relu(self.norm(self.linear(x))) + x}
    for name, forward in edits.items():
        with monkeypatch.context() as m:
            m.setattr(ResidualBlock, "forward", forward)
            reason = structure_mismatch(model)
            assert reason is not None and "forward differs" in reason, (name, reason)
    assert structure_mismatch(model) is None                 # the class restored: accepted again


def test_forward_probe_leaves_global_rng_alone():
    before = torch.get_rng_state()
    assert structure_mismatch(_denoiser()) is None
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------- bfloat16 matmuls
def _autocast_autograd(model, x, rn, un):
    """The reference for matmul_dtype=bfloat16: autograd through torch.autocast(bfloat16)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = edm_loss_from_noise(model, x, rn, un)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel_err(grads, ref) -> float:
    cat = lambda g: torch.cat([g[n].flatten() for n in sorted(ref)])  # noqa: E731
    return ((cat(grads) - cat(ref)).norm() / cat(ref).norm()).item()


# derandomized: a fixed, checked set of examples (a ReLU mask flipped by forward rounding can move
# one gradient a lot in a tiny net; at these sizes that averages out)
@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(dim=st.integers(2, 41), width=st.sampled_from([64, 128, 256]), depth=st.integers(1, 4),
       batch=st.integers(128, 256), seed=st.integers(0, 1000))
def test_bf16_gradients_are_as_accurate_as_autocast(dim, width, depth, batch, seed):
    """matmul_dtype=bfloat16: loss and gradients off the float32 ones by bfloat16 rounding only, as
    much as autograd under torch.autocast(bfloat16) is (60 random nets of these sizes: 0.4-3.5%
    relative, at most 1.43x autocast's error); a structural slip (a lost bias or cast back, a
    gradient off by 5%) fails."""
    model = _denoiser(dim, width, depth, seed=seed)
    x, rn, un = _draws(batch, dim, seed=seed + 1)
    ref_loss, ref = _autograd(model, x, rn, un)
    ac_loss, ac = _autocast_autograd(model, x, rn, un)
    model.zero_grad(set_to_none=True)
    loss = edm_loss_and_grads(model, x, rn, un, matmul_dtype=torch.bfloat16)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.dtype == torch.float32 for g in got.values())      # fp32 gradients for fp32 Adam
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-3)   # measured <= 2.4e-4
    err, ac_err = _rel_err(got, ref), _rel_err(ac, ref)
    assert 0 < err <= 1.75 * ac_err + 0.005, (err, ac_err)          # > 0: bfloat16 really ran
    assert err < 0.05, (err, ac_err)


def test_bf16_gradients_land_in_the_flat_buffer_and_weights_stay_float32():
    model = _denoiser(width=32, depth=2)
    flat = flatten_parameters(model, with_grads=True)
    before = flat.detach().clone()
    edm_loss_and_grads(model, *_draws(64, 5), matmul_dtype=torch.bfloat16)
    assert flat.dtype == flat.grad.dtype == torch.float32 and torch.equal(flat.detach(), before)
    for p in model.parameters():
        assert p.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()
    assert torch.isfinite(flat.grad).all() and flat.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, "bf16", None])
def test_unsupported_matmul_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match="matmul_dtype"):
        edm_loss_and_grads(_denoiser(), *_draws(4, 5), matmul_dtype=dtype)


def _cfg(**kw) -> SynthERConfig:
    return SynthERConfig.preset("tiny").replace(device="cpu", progress=False, **kw)


def test_fit_with_manual_gradients_matches_autograd_fit(rng):
    """Same draws, same optimiser: the manual path (the default, gradients="auto") trains the autograd
    path's model (float sums reordered only), and last_fit says which path ran."""
    x = rng.standard_normal((300, 4)).astype(np.float32)
    manual = TransitionDiffusion(4, _cfg())
    a = manual.fit(x, steps=60)
    auto = TransitionDiffusion(4, _cfg(gradients="autograd"))
    b = auto.fit(x, steps=60)
    assert a["gradients"] == "manual" and b["gradients"] == "autograd"
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    for (name, pa), pb in zip(manual.ema.state_dict().items(), auto.ema.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4, msg=name)
    np.testing.assert_allclose(manual.sample(64, seed=1), auto.sample(64, seed=1), rtol=1e-3, atol=1e-3)
    assert all(p.grad is None for p in manual.model.parameters())   # no gradient buffer kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("restore_matmul_flags")
def test_loss_and_gradients_equal_autograd_on_cuda():
    model = _denoiser(dim=41, width=256, depth=4, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    _assert_matches_autograd(model, *_draws(256, 41, device="cuda"))


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
                    reason="needs CUDA with bfloat16")
@pytest.mark.usefixtures("restore_matmul_flags")
def test_bf16_gradients_as_accurate_as_autocast_on_cuda():
    model = _denoiser(dim=41, width=256, depth=4, device="cuda")
    x, rn, un = _draws(256, 41, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    _, ref = _autograd(model, x, rn, un)
    _, ac = _autocast_autograd(model, x, rn, un)
    model.zero_grad(set_to_none=True)
    edm_loss_and_grads(model, x, rn, un, matmul_dtype=torch.bfloat16)
    err = _rel_err({n: p.grad.clone() for n, p in model.named_parameters()}, ref)
    assert 0 < err <= 1.75 * _rel_err(ac, ref) + 0.005 and err < 0.05


def test_matmul_flags_are_restored_after_a_test_changes_them():
    """What ``restore_matmul_flags`` (used by the CUDA tests above) does, checked on any machine."""
    from helpers import matmul_flags_restored

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    with matmul_flags_restored():
        torch.backends.cuda.matmul.allow_tf32 = not before[0]
        torch.backends.cudnn.allow_tf32 = not before[1]
        torch.set_float32_matmul_precision("medium")
        assert torch.get_float32_matmul_precision() != before[2] or before[2] == "medium"
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision()) == before
