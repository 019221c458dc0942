"""EMA: the warm-up decay schedule and the update, checked far past the warm-up against a closed form
written out here independently of synther_buffer/ema.py, and wired into TransitionDiffusion.fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from synther_buffer import SynthERConfig, TransitionDiffusion
from synther_buffer.ema import EMA, EMA_WARMUP, ema_decay_at

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MAX_DECAY, WARMUP, EVERY = 0.995, 100, 10
STEPS = 4_000   # the decay reaches its cap at step 2,929: far past the warm-up, and past the cap


def reference_decay(step: int) -> float:
    """ema_pytorch's schedule, written out: 0 until epoch = step - warmup - 1 > 0, then
    min(max_decay, 1 - (1 + epoch)^(-2/3))."""
    epoch = step - WARMUP - 1
    return 0.0 if epoch <= 0 else min(MAX_DECAY, 1.0 - (1.0 + epoch) ** (-2.0 / 3.0))


def trajectory(step: int, shape) -> np.ndarray:
    """Scripted weights at ``step``: a slow oscillation plus a drift, different per element."""
    k = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    return np.sin(0.002 * step * (1 + 0.1 * k) + k) + 1e-3 * step * (k - 2)


def closed_form(w0: np.ndarray, steps: int) -> np.ndarray:
    """EMA after ``steps`` in closed form: with updates at s_1 < ... < s_K (multiples of EVERY) and
    decays d_k, ema = (prod_k d_k) w0 + sum_k (1 - d_k) (prod_{j > k} d_j) w(s_k)."""
    update_steps = [s for s in range(1, steps + 1) if s % EVERY == 0]
    d = np.array([reference_decay(s) for s in update_steps])
    after = np.append(np.cumprod(d[::-1])[::-1][1:], 1.0)          # prod_{j > k} d_j
    ema = np.prod(d) * w0
    for s, dk, later in zip(update_steps, d, after):
        ema = ema + (1.0 - dk) * later * trajectory(s, w0.shape)
    return ema


def test_decay_schedule_values():
    """Warm-up copies (decay 0 through step warmup + 1), then 1 - 2^(-2/3) at the next step, rising to
    the cap and staying there."""
    assert EMA_WARMUP == WARMUP
    assert [ema_decay_at(s, MAX_DECAY) for s in (1, 50, 100, 101)] == [0.0] * 4
    assert ema_decay_at(102, MAX_DECAY) == pytest.approx(1.0 - 2.0 ** (-2.0 / 3.0))   # 0.370
    for s in (102, 150, 500, 2_000, 2_928, 2_929, 10_000):
        assert ema_decay_at(s, MAX_DECAY) == pytest.approx(reference_decay(s), abs=1e-15)
    assert ema_decay_at(2_928, MAX_DECAY) < MAX_DECAY == ema_decay_at(2_929, MAX_DECAY)
    assert ema_decay_at(500, 0.5) == 0.5 and ema_decay_at(150, 0.0) == 0.0


@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
def test_ema_after_many_steps_equals_closed_form(flat):
    """Drive the EMA with scripted weights for 4,000 steps (updates every 10): it equals the closed
    form at the end and at a step inside the warm-up ramp, and is not just the latest weights."""
    model = nn.Linear(3, 2).double()
    w0 = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    source = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
    ema = EMA(model, MAX_DECAY, every=EVERY, warmup=WARMUP, flat=flat)
    if flat:   # the flat EMA follows a flat source of the same layout, as in fit
        from synther_buffer.flat import flatten_parameters
        src_model = nn.Linear(3, 2).double()
        source = [flatten_parameters(src_model, with_grads=False)]
        src_params = list(src_model.parameters())
    else:
        src_params = source
    names = [n for n, _ in model.named_parameters()]
    checkpoints = {}
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for n, p in zip(names, src_params):
                p.copy_(torch.from_numpy(trajectory(step, tuple(p.shape))))
        ema.update(step, source)
        if step in (250, STEPS):
            checkpoints[step] = {n: p.detach().numpy().copy() for n, p in ema.module.named_parameters()}
    for step, got in checkpoints.items():
        for n in names:
            want = closed_form(w0[n], step)
            np.testing.assert_allclose(got[n], want, rtol=1e-12, atol=1e-11, err_msg=f"{n} at step {step}")
            assert np.abs(want - trajectory(step, want.shape)).max() > 1e-3   # a real average, not a copy
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_update_only_on_multiples_of_every():
    model = nn.Linear(2, 2).double()
    ema = EMA(model, 0.5, every=EVERY, warmup=0)
    before = [p.detach().clone() for p in ema.module.parameters()]
    target = [torch.full_like(p, 3.0) for p in model.parameters()]
    for step in range(1, EVERY):
        ema.update(step, target)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), before))
    ema.update(EVERY, target)   # decay 0.5 at step 10 with no warm-up: halfway to the target
    for p, b in zip(ema.module.parameters(), before):
        torch.testing.assert_close(p, 0.5 * b + 1.5)


def test_the_last_step_always_updates():
    model = nn.Linear(2, 2).double()
    ema = EMA(model, 0.5, every=EVERY, warmup=0)
    before = [p.detach().clone() for p in ema.module.parameters()]
    target = [torch.full_like(p, 3.0) for p in model.parameters()]
    ema.update(3, target)              # step 3 of a longer fit: no update
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), before))
    ema.update(3, target, last=True)   # step 3 of a 3-step fit: averaged in at step 3's decay
    decay = ema.decay_at(3)
    assert decay == 0.5
    for p, b in zip(ema.module.parameters(), before):
        torch.testing.assert_close(p, decay * b + (1 - decay) * 3.0)


def test_a_fit_shorter_than_ema_every_samples_with_trained_weights():
    from synther_buffer import SynthERConfig, TransitionDiffusion
    cfg = SynthERConfig.preset("tiny").replace(ema_every=10, progress=False, device="cpu")
    model = TransitionDiffusion(3, cfg)
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    model.fit(x, steps=4)   # inside the EMA warm-up: the average is a copy of the trained weights
    for a, b in zip(model.ema.parameters(), model.model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs,match", [(dict(max_decay=1.0), "max_decay"), (dict(max_decay=-0.1), "max_decay"),
                                          (dict(every=0), "every"), (dict(warmup=-1), "warmup")])
def test_bad_arguments_raise(kwargs, match):
    args = dict(max_decay=0.9) | kwargs
    with pytest.raises(ValueError, match=match):
        EMA(nn.Linear(2, 2), args.pop("max_decay"), **args)


def test_fit_keeps_the_ema_past_warmup():
    """A 300-step fit (past the 100-step warm-up): with ema_decay=0 the EMA is the final weights
    exactly (the last step, 300, is an update step); with the default decay it lags them."""
    x = np.random.default_rng(0).standard_normal((400, 3)).astype(np.float32)
    cfg = SynthERConfig.preset("tiny").replace(device="cpu", train_steps=300)
    copy_ = TransitionDiffusion(3, cfg.replace(ema_decay=0.0))
    copy_.fit(x)
    for (n, a), b in zip(copy_.model.state_dict().items(), copy_.ema.state_dict().values()):
        assert torch.equal(a, b), n
    avg = TransitionDiffusion(3, cfg)
    avg.fit(x)
    assert avg.config.ema_decay == 0.995
    lin = avg.model.net.linear_out.weight
    lin_ema = avg.ema.net.linear_out.weight
    assert not torch.equal(lin, lin_ema) and (lin - lin_ema).abs().max() > 1e-4
