"""Background retraining, worker crashes, OOM fallback and action clipping (pool.py, diffusion.py)."""

from __future__ import annotations

import pickle
import random
import sys
import time

import numpy as np
import pytest
import torch

import synther_buffer.diffusion as diffusion_mod
from synther_buffer import GenerativeReplay, TransitionDiffusion


def _feed(buf: GenerativeReplay, n: int, rng: np.random.Generator, on_add=None) -> None:
    for _ in range(n):
        o = rng.standard_normal(3).astype(np.float32)
        a = rng.uniform(-1, 1, 1).astype(np.float32)
        buf.add(o, a, float(o.sum()), o + 0.1 * a, False)
        if on_add is not None:
            on_add()


@pytest.fixture
def async_cfg(tiny_cfg):
    return tiny_cfg.replace(async_retrain=True, retrain_every=200, min_real=100, train_steps=600,
                            num_generate=500, synthetic_size=500)


def test_env_keeps_stepping_during_background_retrain(async_cfg, rng):
    buf = GenerativeReplay(3, 1, capacity=5000, config=async_cfg, model_terminals=False)
    during = {"adds": 0, "all_real_batches": 0}

    def on_add():
        if buf.pool.retraining:
            during["adds"] += 1
            # before the first pool lands, batches are all real and sampling never blocks
            if buf.pool.num_synthetic == 0 and buf.sample(16).obs.shape[0] == 16:
                during["all_real_batches"] += 1
            time.sleep(0.002)

    _feed(buf, 200, rng)                 # the 200th add starts the retrain and returns at once
    assert buf.pool.retraining and buf.stats()["retrain_count"] == 0
    _feed(buf, 150, rng, on_add)
    assert during["adds"] > 0, "no env step happened while the model retrained"
    assert during["all_real_batches"] > 0
    buf.wait()
    s = buf.stats()
    assert s["retrain_count"] == 1 and s["num_synthetic"] == 500 and not s["retraining"]
    assert s["env_steps"] == 350


def _agent_draw() -> tuple:
    """What an agent's thread draws from the three process-global RNGs in one step."""
    return torch.rand(1).item(), float(np.random.random()), random.random()


def _seed_globals(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_background_retrain_leaves_the_agents_global_rng_alone(async_cfg, rng):
    # A wide network takes long enough to build that the agent's thread (switching every 10 us) is sure
    # to draw while the worker builds and trains it: with the worker on the global RNG it would get the
    # diffusion seed's numbers, then have its stream rewound.
    cfg = async_cfg.replace(width=1024, depth=4, train_steps=20, num_generate=64, synthetic_size=64)
    buf = GenerativeReplay(3, 1, capacity=5000, config=cfg, model_terminals=False)
    _feed(buf, 199, rng)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        _feed(buf, 1, rng)                   # step 200 submits the retrain
        assert buf.pool.retraining
        _seed_globals(1234)
        draws = []
        while buf.pool.retraining or not draws:
            draws.append(_agent_draw())
        buf.wait()
    finally:
        sys.setswitchinterval(switch)
    assert buf.stats()["retrain_count"] == 1
    _seed_globals(1234)                      # the same agent with no retrain running
    assert draws == [_agent_draw() for _ in draws], "the background retrain moved the agent's RNG stream"


def test_retrain_step_is_the_submission_step(async_cfg, rng):
    buf = GenerativeReplay(3, 1, capacity=5000, config=async_cfg, model_terminals=False)
    _feed(buf, 200, rng)                     # submitted at step 200
    _feed(buf, 50, rng)                      # the agent moves on while it trains
    buf.wait()
    assert buf.stats()["env_steps"] == 250
    assert buf.stats()["last_retrain_env_step"] == 200


def test_background_pool_swap_is_atomic(async_cfg, rng):
    buf = GenerativeReplay(3, 1, capacity=5000, config=async_cfg, model_terminals=False)
    _feed(buf, 200, rng)
    buf.wait()
    old_pool = buf.pool.pool
    _feed(buf, 200, rng)                 # second retrain starts at 400
    assert buf.pool.retraining
    assert buf.pool.pool is old_pool     # the old pool serves until the new one is complete
    buf.wait()
    assert buf.pool.pool is not old_pool and buf.pool.pool.shape[0] == 500


def test_worker_crash_is_raised_at_next_add(async_cfg, rng, monkeypatch):
    buf = GenerativeReplay(3, 1, capacity=5000, config=async_cfg, model_terminals=False)

    def boom(*args, **kwargs):
        raise ValueError("injected worker failure")

    monkeypatch.setattr(buf.pool, "_build", boom)
    _feed(buf, 200, rng)
    buf.pool._worker.join()
    with pytest.raises(RuntimeError, match="background retrain crashed") as info:
        _feed(buf, 1, rng)
    assert isinstance(info.value.__cause__, ValueError)


def test_save_and_pickle_wait_for_inflight_retrain(async_cfg, rng, tmp_path):
    buf = GenerativeReplay(3, 1, capacity=5000, config=async_cfg, model_terminals=False)
    _feed(buf, 200, rng)
    assert buf.pool.retraining
    clone = pickle.loads(pickle.dumps(buf))
    assert clone.stats()["retrain_count"] == 1 and clone.stats()["num_synthetic"] == 500
    buf.save(tmp_path / "ck")
    assert GenerativeReplay.load(tmp_path / "ck").stats()["retrain_count"] == 1


def test_sampling_falls_back_to_smaller_batches_on_oom(tiny_cfg, monkeypatch):
    x = np.random.default_rng(0).standard_normal((500, 3)).astype(np.float32)
    model = TransitionDiffusion(3, tiny_cfg.replace(train_steps=50))
    model.fit(x)
    real_heun = diffusion_mod.heun_sample
    seen = []

    def heun_with_memory_limit(denoise, x_init, *args, **kwargs):
        seen.append(x_init.shape[0])
        if x_init.shape[0] > 64:
            raise torch.OutOfMemoryError("injected: batch too large")
        return real_heun(denoise, x_init, *args, **kwargs)

    monkeypatch.setattr(diffusion_mod, "heun_sample", heun_with_memory_limit)
    y = model.sample(300, batch_size=256, seed=3)
    assert y.shape == (300, 3) and np.isfinite(y).all()
    assert seen == [256, 128, 64, 64, 64, 64, 44]    # starts over at each halving; 300 = 4 x 64 + 44
    monkeypatch.setattr(diffusion_mod, "heun_sample", real_heun)
    np.testing.assert_array_equal(y, model.sample(300, batch_size=64, seed=3))   # what batch 64 gives


def test_synthetic_actions_are_clipped_to_bounds(tiny_cfg, rng):
    cfg = tiny_cfg.replace(retrain_every=300, min_real=100, train_steps=100, num_generate=2000,
                           synthetic_size=2000)
    buf = GenerativeReplay(3, 1, capacity=5000, config=cfg, model_terminals=False,
                           action_bounds=(-0.5, 0.5))
    _feed(buf, 300, rng)   # real actions span [-1, 1], so an unclipped model exceeds the bounds
    actions = buf.pool.pool[:, 3].numpy()
    assert actions.min() >= -0.5 and actions.max() <= 0.5
    assert (np.abs(actions) == 0.5).mean() > 0.1   # clipping really happened
    with pytest.raises(ValueError, match="low <= high"):
        buf.pool.set_action_bounds(1.0, -1.0)
