"""The conditional denoiser, condition dropout and classifier-free guidance (synther_buffer/guidance.py)."""

import logging

import numpy as np
import pytest
import torch

import synther_buffer.diffusion as diffusion_mod
from synther_buffer import SynthERConfig, TransitionDiffusion
from synther_buffer.denoiser import build_denoiser
from synther_buffer.edm import EDMPrecond
from synther_buffer.guidance import (ConditionalEDMPrecond, GuidedDenoiser, build_conditional_denoiser,
                                     cfg_combine, cond_edm_loss_from_noise)
from synther_buffer.manual_grad import structure_mismatch
from synther_buffer.relevance import RelevanceError

DIM = 4


def tiny(**changes) -> SynthERConfig:
    return SynthERConfig.preset("tiny").replace(**{"train_steps": 200, **changes})


def data(n=400, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x, x[:, 0].copy()


def nets(seed=3):
    cond = build_conditional_denoiser(DIM, 64, 2, 16, 32, seed=seed)
    plain = build_denoiser(DIM, 64, 2, 16, 32, seed=seed)
    return ConditionalEDMPrecond(cond), EDMPrecond(plain)


def test_null_condition_is_the_unconditional_network_exactly():
    cond_net, plain = nets()
    # same seed: the shared layers are initialised identically, the condition MLP comes last
    missing = plain.load_state_dict(cond_net.state_dict(), strict=False)
    assert all(k.startswith("net.cond_mlp") for k in missing.unexpected_keys) and not missing.missing_keys
    x = torch.randn(16, DIM)
    sigma = torch.rand(16) + 0.1
    assert torch.equal(cond_net(x, sigma), plain(x, sigma))
    # keep = 0 rows of a conditioned batch add exactly nothing either
    c = torch.randn(16, 1)
    assert torch.equal(cond_net(x, sigma, c, torch.zeros(16, 1)), plain(x, sigma))
    assert not torch.allclose(cond_net(x, sigma, c), plain(x, sigma))


@pytest.mark.parametrize("w", [0.0, 1.0, 2.0, 3.5])
def test_guided_denoiser_batches_both_passes(w):
    net, _ = nets()
    x, c = torch.randn(8, DIM), torch.randn(8, 1)
    sigma = torch.full((1,), 0.7)
    d_cond, d_uncond = net(x, sigma, c), net(x, sigma)
    got = GuidedDenoiser(net, c, w)(x, sigma)
    torch.testing.assert_close(got, d_uncond + w * (d_cond - d_uncond), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cfg_combine(d_uncond, d_cond, w), d_uncond + w * (d_cond - d_uncond))
    if w == 0.0:
        assert torch.equal(got, d_uncond)


def test_guided_denoiser_runs_one_forward_pass():
    net, _ = nets()
    calls = []
    net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    GuidedDenoiser(net, torch.randn(5, 1), 2.0)(torch.randn(5, DIM), torch.full((1,), 1.0))
    assert calls == [10]


def _unconditional_twin(model: TransitionDiffusion) -> TransitionDiffusion:
    twin = TransitionDiffusion(model.dim, model.config)
    twin.ema.load_state_dict(model.ema.state_dict(), strict=False)
    twin.normalizer = model.normalizer
    twin.fitted = True
    return twin


@pytest.mark.parametrize("sampler", ["deterministic", "stochastic"])
def test_guidance_zero_equals_the_unconditional_model(sampler):
    x, s = data()
    model = TransitionDiffusion(DIM, tiny(sampler=sampler), conditional=True)
    model.fit(x, cond=s)
    twin = _unconditional_twin(model)
    a = model.sample(300, seed=11, guidance_scale=0.0)
    b = twin.sample(300, seed=11)
    assert np.array_equal(a, b)
    guided = model.sample(300, seed=11, guidance_scale=2.0)
    assert not np.array_equal(a, guided)


def test_condition_dropout_rate_and_unconditional_branch(monkeypatch):
    x, s = data(600)
    masks = []
    real_keep = diffusion_mod.dropout_keep

    def spy(bs, p, gen, device):
        keep = real_keep(bs, p, gen, device)
        masks.append(keep.clone())
        return keep

    monkeypatch.setattr(diffusion_mod, "dropout_keep", spy)
    losses = {}
    for p in (0.0, 0.5):
        masks.clear()
        model = TransitionDiffusion(DIM, tiny(cond_dropout=p, guidance_scale=2.0 if p else 1.0, train_steps=400), conditional=True)
        model.fit(x, cond=s)
        dropped = 1.0 - torch.cat(masks).mean().item()
        n = sum(m.numel() for m in masks)
        assert abs(dropped - p) < 4 * np.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9   # ~ Binomial(n, p) / n
        # the null-condition loss on the data: trained only where conditions were dropped
        xb = torch.as_tensor(model.normalizer.normalize(x))
        gen = torch.Generator().manual_seed(0)
        rn, un = torch.randn(len(xb), 1, generator=gen), torch.randn(len(xb), DIM, generator=gen)
        batch = torch.cat([xb, torch.zeros(len(xb), 1), torch.zeros(len(xb), 1)], dim=1)
        with torch.no_grad():
            losses[p] = cond_edm_loss_from_noise(model.ema, batch, rn, un).item()
    assert losses[0.5] < 0.8 * losses[0.0]


def test_guidance_puts_more_mass_on_the_high_score_mode():
    rng = np.random.default_rng(0)
    n = 2000
    mode = rng.integers(0, 2, n)                          # two equal modes at x0 = -2 and +2
    x = np.stack([np.where(mode == 1, 2.0, -2.0) + 0.3 * rng.standard_normal(n),
                  0.3 * rng.standard_normal(n)], axis=1).astype(np.float32)
    score = (mode + 0.05 * rng.standard_normal(n)).astype(np.float32)   # mode 1 is relevant
    cfg = SynthERConfig.preset("tiny").replace(train_steps=1500, relevance_top_frac=0.25)
    model = TransitionDiffusion(2, cfg, conditional=True)
    model.fit(x, cond=score)
    unguided = (model.sample(1000, seed=5, guidance_scale=0.0)[:, 0] > 0).mean()
    guided = (model.sample(1000, seed=5, guidance_scale=2.0)[:, 0] > 0).mean()
    assert 0.35 < unguided < 0.65
    assert guided > 0.85 and guided > unguided + 0.25


def test_save_load_round_trip(tmp_path):
    x, s = data()
    model = TransitionDiffusion(DIM, tiny(), conditional=True)
    model.fit(x, cond=s)
    model.save(tmp_path / "m.pt")
    back = TransitionDiffusion.load(tmp_path / "m.pt")
    assert back.conditional and back.score_stats.mean == model.score_stats.mean
    assert np.array_equal(back.top_scores, model.top_scores)
    assert np.array_equal(back.sample(100, seed=4), model.sample(100, seed=4))
    assert np.array_equal(back.sample(50, seed=4, cond=1.5), model.sample(50, seed=4, cond=1.5))
    # an unconditional model's file carries none of it
    plain = TransitionDiffusion(DIM, tiny())
    assert "conditional" not in plain.state_dict() and not TransitionDiffusion.from_state_dict(
        plain.state_dict()).conditional


def test_bf16_guided_sampling_runs():
    x, s = data()
    model = TransitionDiffusion(DIM, tiny(precision="bf16"), conditional=True)
    model.fit(x, cond=s)
    y = model.sample(64, seed=1)
    assert y.shape == (64, DIM) and np.isfinite(y).all()


def test_conditional_models_train_by_autograd_without_warning(caplog):
    x, s = data()
    model = TransitionDiffusion(DIM, tiny(train_steps=20), conditional=True)
    assert structure_mismatch(model.model) is not None
    with caplog.at_level(logging.WARNING):
        assert model.fit(x, cond=s)["gradients"] == "autograd"
    assert not [r for r in caplog.records if "hand-written" in r.getMessage()]


def test_cond_errors_are_clear_and_keep_the_model():
    x, s = data()
    with pytest.raises(ValueError, match="unconditional"):
        TransitionDiffusion(DIM, tiny()).fit(x, cond=s)
    model = TransitionDiffusion(DIM, tiny(), conditional=True)
    with pytest.raises(ValueError, match="needs cond"):
        model.fit(x)
    model.fit(x, cond=s)
    before = model.sample(20, seed=0)
    bad = s.copy()
    bad[7] = np.nan
    with pytest.raises(RelevanceError, match="row 7"):
        model.fit(x, cond=bad)
    with pytest.raises(RelevanceError, match="one score per row"):
        model.fit(x, cond=s[:-1])
    assert np.array_equal(model.sample(20, seed=0), before)
    with pytest.raises(ValueError, match="guidance_scale"):
        model.sample(5, guidance_scale=-1.0)
    plain = TransitionDiffusion(DIM, tiny(train_steps=10))
    plain.fit(x)
    with pytest.raises(ValueError, match="conditional"):
        plain.sample(5, cond=1.0)


def test_a_conditional_model_samples_right_after_warm_start_from():
    """warm_start_from carries the fitted scores too: the copy samples as the model it copied."""
    x, s = data()
    fitted = TransitionDiffusion(DIM, tiny(train_steps=50), conditional=True)
    fitted.fit(x, cond=s)
    copy = TransitionDiffusion(DIM, tiny(train_steps=50), conditional=True)
    assert copy.warm_start_from(fitted)
    np.testing.assert_array_equal(copy.sample(64, seed=3), fitted.sample(64, seed=3))
