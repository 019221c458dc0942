"""Warm-started retraining (SynthERConfig.warm_start, issue 18): a warm fit continues from the previous
weights, EMA and (refitted) normaliser; failures keep the old model and pool; checkpoints resume warm;
the three buffers and the CLIs. CPU, tiny configs."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch

import synther_buffer.diffusion as diffusion_mod
from synther_buffer import GenerativeReplay, SynthERConfig, TransitionDiffusion, WrappedReplay
from synther_buffer.edm import edm_loss_from_noise
from synther_buffer.layout import RowLayout
from synther_buffer.normalizer import Normalizer
from synther_buffer.pool import build_pool

from helpers import small, transitions  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OBS, ACT = 3, 2


def warm_cfg(tiny_cfg, **changes) -> SynthERConfig:
    return small(tiny_cfg, warm_start=True, warm_start_steps=50, **changes)


def feed(buf, seed: int, n: int) -> None:
    buf.add(*transitions(n, seed=seed))


def params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def _scratch(model: TransitionDiffusion, x: np.ndarray, steps: int) -> TransitionDiffusion:
    """A never-fitted model with ``model``'s config and fit counter (so the same seeds), fitted on ``x``."""
    fresh = TransitionDiffusion(model.dim, model.config)
    fresh.fit_count = model.fit_count
    fresh.fit(x, steps=steps)
    return fresh


# ============================================================================ config
def test_config_fields_default_off_and_validated(tiny_cfg):
    assert SynthERConfig().warm_start is False and SynthERConfig.preset("paper").warm_start is False
    cfg = tiny_cfg.replace(train_steps=1000)
    assert cfg.warm_steps() == 250                          # None: train_steps // 4
    rule = cfg.replace(train_steps_rows=100, train_steps_power=1.0)   # cold fits: 1000 steps per 100 rows
    assert rule.warm_steps(50) == 250 and rule.warm_steps(400) == 1000   # a quarter of the cold fit's steps
    assert rule.replace(warm_start_steps=30).warm_steps(400) == 30
    assert cfg.replace(warm_start_steps=30).warm_steps() == 30
    assert cfg.replace(train_steps=3).warm_steps() == 1     # never 0
    for bad in (0, -5, 2.5, "100", True):
        with pytest.raises(ValueError, match="warm_start_steps"):
            tiny_cfg.replace(warm_start_steps=bad)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="warm_start"):
            tiny_cfg.replace(warm_start=bad)
    assert SynthERConfig.from_dict(cfg.replace(warm_start=True).to_dict()).warm_start is True


# ============================================================================ the engine
@pytest.fixture(scope="module")
def fitted(make_mixture_2d):
    """A tiny model fitted (cold, 1000 steps) on 2,000 rows of the 2-D mixture, and the data."""
    cfg = SynthERConfig.preset("tiny").replace(device="cpu", warm_start=True, warm_start_steps=100)
    x_old = make_mixture_2d(2000, seed=0)
    model = TransitionDiffusion(2, cfg)
    model.fit(x_old)
    return model, x_old


def test_warm_fit_starts_from_the_previous_weights(fitted, make_mixture_2d):
    model, x_old = fitted
    x_all = np.concatenate([x_old, make_mixture_2d(2000, seed=1)])
    cold_final = model.last_fit["loss"]
    warm = TransitionDiffusion(2, model.config)
    assert warm.warm_start_from(model)
    out = warm.fit(x_all)
    fresh = TransitionDiffusion(2, model.config).fit(x_all, steps=100)   # same steps, from scratch
    assert out["warm"] and out["steps"] == 100 and not fresh["warm"]
    # the warm fit's first step is where the previous fit ended; a fresh network starts far above it
    assert out["first_loss"] < 1.2 * cold_final
    assert out["first_loss"] < 0.6 * fresh["first_loss"], (out, fresh)
    assert out["loss"] < fresh["loss"]
    assert warm.fit_count == model.fit_count + 1


def test_default_warm_steps_follow_the_data_size_rule(fitted, make_mixture_2d):
    """``warm_start_steps=None``: a warm fit trains a quarter of what a cold fit on the same rows would."""
    model, x_old = fitted
    cfg = model.config.replace(warm_start_steps=None, train_steps=400, train_steps_rows=2000, train_steps_power=1.0)
    x_all = np.concatenate([x_old, make_mixture_2d(2000, seed=1)])
    warm = TransitionDiffusion(2, cfg)
    assert warm.warm_start_from(model)
    out = warm.fit(x_all)
    assert out["warm"] and cfg.train_steps_for(len(x_all)) == 800 and out["steps"] == 200


def test_warm_start_false_and_unfitted_models_train_from_scratch(fitted):
    model, x_old = fitted
    cold = TransitionDiffusion(2, model.config)
    assert not cold.fit(x_old, steps=20)["warm"]            # nothing to continue: a full fit
    assert cold.last_fit["steps"] == 20
    again = TransitionDiffusion(2, model.config)
    again.warm_start_from(model)
    out = again.fit(x_old, steps=20, warm_start=False)      # forced cold, whatever the config says
    assert not out["warm"]
    assert torch.equal(params(again.ema), params(_scratch(model, x_old, 20).ema))


def test_warm_fit_leaves_the_previous_model_untouched(fitted):
    model, x_old = fitted
    before = (params(model.model), params(model.ema), model.normalizer.mean.copy())
    warm = TransitionDiffusion(2, model.config)
    warm.warm_start_from(model)
    assert warm.fit(x_old * 1.2 + 0.3)["warm"]
    after = (params(model.model), params(model.ema), model.normalizer.mean)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    np.testing.assert_array_equal(before[2], after[2])
    assert not torch.equal(params(warm.model), before[0])   # the copy did train


def test_warm_ema_continues_from_the_previous_ema(fitted):
    model, x_old = fitted
    every = model.config.ema_every
    # one update, at the decay where the last fit left the schedule (not a warm-up copy of the weights):
    # on the every-th step, or on the last step of a shorter fit
    for steps in (every, every - 1):
        warm2 = TransitionDiffusion(2, model.config)
        warm2.warm_start_from(model)
        warm2.fit(x_old, steps=steps)
        assert not torch.equal(params(warm2.model), params(model.model))
        decay = diffusion_mod.ema_decay_at(model.last_fit["ema_steps"] + steps, model.config.ema_decay)
        assert decay > 0.9
        expected = decay * params(model.ema) + (1 - decay) * params(warm2.model)
        torch.testing.assert_close(params(warm2.ema), expected, rtol=1e-5, atol=1e-6)
        assert warm2.last_fit["ema_steps"] == model.last_fit["ema_steps"] + steps


def _first_batch_loss(model: TransitionDiffusion, x: np.ndarray) -> float:
    """The loss ``model``'s network (weights as they are) gives the first batch a fit of ``model`` on ``x``
    draws (same generator, same order as ``_train``), with ``model``'s normaliser."""
    c = model.config
    gen = torch.Generator().manual_seed(c.seed + 7919 * model.fit_count)
    data = torch.as_tensor(model.normalizer.normalize(x.astype(np.float32)))
    bs = c.batch_size_for(len(x))
    idx = torch.randint(len(x), (bs,), generator=gen)
    rnd, noise = torch.randn(bs, 1, generator=gen), torch.randn(bs, x.shape[1], generator=gen)
    with torch.no_grad():
        return float(edm_loss_from_noise(model.model, data.index_select(0, idx), rnd, noise, c.p_mean, c.p_std))


def test_warm_fit_keeps_the_normaliser_so_it_starts_from_the_previous_function(fitted, make_mixture_2d):
    """The claim: a warm fit keeps the previous normaliser's mean and std, so on any data (the old rows
    and the new ones) its first step is the previous network exactly: the first step's loss is the
    previous model's loss on that batch in the previous model's units."""
    model, x_old = fitted
    x_all = np.concatenate([x_old, make_mixture_2d(3000, modes=(-2.0, 2.5), seed=4)])   # grown, moved a little
    assert not np.allclose(Normalizer(2).fit(x_all).mean, model.normalizer.mean, atol=0.05)
    warm = TransitionDiffusion(2, model.config)
    warm.warm_start_from(model)
    out = warm.fit(x_all, steps=1)
    assert out["warm"]
    assert out["first_loss"] == pytest.approx(_first_batch_loss(model, x_all), rel=1e-5)
    np.testing.assert_array_equal(warm.normalizer.mean, model.normalizer.mean)
    np.testing.assert_array_equal(warm.normalizer.std, model.normalizer.std)


def test_warm_fit_finds_constant_columns_again(tiny_cfg, rng):
    x = rng.standard_normal((500, 3)).astype(np.float32)
    x[:, 2] = 0.0                                           # a reward that never fired ...
    cfg = tiny_cfg.replace(warm_start=True)
    model = TransitionDiffusion(3, cfg)
    model.fit(x, steps=20)
    assert model.normalizer.constant[2] and (model.sample(50)[:, 2] == 0).all()
    y = x.copy()
    y[:250, 2] = rng.uniform(-1.5, 1.5, 250)                # ... fires now (within the drift limits)
    out = model.fit(y, steps=20)
    assert out["warm"] and not model.normalizer.constant[2]
    assert np.unique(model.sample(50)[:, 2]).size > 1


def test_data_far_from_the_normaliser_gets_a_full_fit(fitted, caplog):
    model, x_old = fitted
    caplog.set_level(logging.INFO, logger="synther_buffer.diffusion")
    for moved in (x_old * 8.0, x_old + np.float32(10.0)):   # a std 8x wider; a mean 10 units away
        warm = TransitionDiffusion(2, model.config)
        warm.warm_start_from(model)
        out = warm.fit(moved, steps=5)
        assert not out["warm"]
        assert torch.equal(params(warm.ema), params(_scratch(model, moved, 5).ema))
        ref = Normalizer(2).fit(moved)                      # a full fit refits the normaliser
        np.testing.assert_allclose(warm.normalizer.mean, ref.mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(warm.normalizer.std, ref.std, rtol=1e-5)
        assert "column" in out["warm_skipped"]             # why, in words
    assert sum("warm start skipped" in r.getMessage() for r in caplog.records) == 2
    assert diffusion_mod.normalizer_drift(model.normalizer, x_old) is None
    warm = TransitionDiffusion(2, model.config)
    warm.warm_start_from(model)
    out = warm.fit(x_old, steps=5)
    assert out["warm"] and out["warm_skipped"] is None


def test_a_column_constant_in_new_data_trains_on_zero_as_in_a_full_fit():
    """A column constant at a new value: the kept mean would put it 50 old stds away (the loss's whole
    target); the warm normaliser gives it a full fit's mean and std, and keeps every other column's."""
    rng = np.random.default_rng(0)
    old = rng.normal(size=(200, 3)).astype(np.float32)
    old[:, 2] = 0.0                                            # constant at 0 ...
    previous = Normalizer(3).fit(old)
    new = rng.normal(size=(200, 3)).astype(np.float32)
    new[:, 2] = 50.0                                           # ... then at 50
    assert diffusion_mod.normalizer_drift(previous, new) is None   # not drift: the column is not modelled
    warm = diffusion_mod.warm_normalizer(previous, new)
    assert np.array_equal(warm.normalize(new)[:, 2], np.zeros(200, dtype=np.float32))
    np.testing.assert_array_equal(warm.mean[:2], previous.mean[:2])
    np.testing.assert_array_equal(warm.std[:2], previous.std[:2])
    assert warm.constant.tolist() == [False, False, True] and warm.constant_value[2] == 50.0
    assert np.all(warm.unnormalize(rng.normal(size=(5, 3)).astype(np.float32))[:, 2] == 50.0)
    # and a fit on it stays at a full fit's loss scale (the old normaliser gave ~80 here)
    cfg = SynthERConfig.preset("tiny").replace(train_steps=40, warm_start=True, progress=False, device="cpu")
    model = TransitionDiffusion(3, cfg)
    model.fit(old)
    out = model.fit(new, steps=40)
    assert out["warm"] and out["loss"] < 5.0


def test_a_buffer_reports_a_warm_retrain_that_took_a_full_fit(tiny_cfg):
    """Data that drifted past the normaliser: the retrain is a full fit, counted and explained in stats()
    and in the run's retrain records (RetrainTracker)."""
    from synther_buffer.results import RetrainTracker

    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=warm_cfg(tiny_cfg), model_terminals=False)
    tracker = RetrainTracker(buf.stats)
    feed(buf, 0, 100)
    tracker.poll()
    obs, act, rew, nxt, term = transitions(100, seed=1)
    buf.add(obs * 50.0, act, rew * 50.0, nxt * 50.0, term)   # an agent in a new regime: std far past 6x
    tracker.poll()
    s = buf.stats()
    assert s["retrain_count"] == 2 and s["warm_retrains"] == 0 and s["warm_skipped"] == 1
    assert "column" in s["last_warm_skipped"] and not s["last_fit_warm"]
    assert [e.get("warm_skipped") is not None for e in tracker.events] == [False, True]
    feed(buf, 2, 100)                                         # close to the refitted normaliser: warm again
    tracker.poll()
    s = buf.stats()
    assert s["warm_retrains"] == 1 and s["warm_skipped"] == 1 and s["last_warm_skipped"] is None
    state = buf.pool.state_dict()
    assert state["warm_skipped"] == 1


def test_warm_start_from_refuses_another_layout(fitted, caplog):
    model, _ = fitted
    caplog.set_level(logging.INFO, logger="synther_buffer.diffusion")
    for other in (TransitionDiffusion(3, model.config),                                  # row width
                  TransitionDiffusion(2, model.config.replace(width=64)),                 # network shape
                  TransitionDiffusion(2, model.config, terminal_dims=(1,))):              # terminal column
        assert other.warm_start_from(model) is False and not other.fitted
    assert TransitionDiffusion(2, model.config).warm_start_from(TransitionDiffusion(2, model.config)) is False
    assert sum("warm start not possible" in r.getMessage() for r in caplog.records) == 4


def test_warm_start_from_a_state_dict_equals_from_the_model(fitted, make_mixture_2d):
    model, x_old = fitted
    a, b = TransitionDiffusion(2, model.config), TransitionDiffusion(2, model.config)
    assert a.warm_start_from(model) and b.warm_start_from(model.state_dict())
    x = make_mixture_2d(500, seed=3)
    a.fit(x, steps=30)
    b.fit(x, steps=30)
    assert torch.equal(params(a.ema), params(b.ema))


# ============================================================================ the online pool
def test_build_pool_warm_needs_the_flag_and_a_previous_model(tiny_cfg):
    lay = RowLayout(OBS, ACT, False)
    rows = lay.join(*transitions(300, seed=0))
    cfg = warm_cfg(tiny_cfg)
    first = build_pool(cfg, rows, 0, 100, lay)
    assert first["error"] is None and not first["fit"]["warm"] and first["fit"]["steps"] == cfg.train_steps
    second = build_pool(cfg, rows, 1, 200, lay, previous=first["model"])
    assert second["fit"]["warm"] and second["fit"]["steps"] == 50
    off = build_pool(cfg.replace(warm_start=False), rows, 1, 200, lay, previous=first["model"])
    assert not off["fit"]["warm"] and off["fit"]["steps"] == cfg.train_steps


class _Mine:
    """A loop's own buffer for WrappedReplay."""

    def __init__(self):
        self.fields = transitions(400, seed=5)
        self.n = 0

    def all(self):
        return tuple(f[:self.n] for f in self.fields)

    def sample(self, k):
        idx = np.random.default_rng(k).integers(0, self.n, k)
        return tuple(f[idx] for f in self.fields)


def _run(owner: str, cfg: SynthERConfig, n: int = 250):
    """``n`` env steps through one of the three buffers; returns it (background retrains waited for)."""
    if owner == "GenerativeReplay":
        buf = GenerativeReplay(OBS, ACT, capacity=1000, config=cfg, model_terminals=False)
        for lo in range(0, n, 50):
            feed(buf, lo, 50)
            buf.wait()
    elif owner == "WrappedReplay":
        mine = _Mine()
        buf = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=cfg, model_terminals=False)
        for _ in range(n):
            mine.n += 1
            buf.step()
            buf.wait()
    else:
        gym = pytest.importorskip("gymnasium")
        pytest.importorskip("stable_baselines3")
        from synther_buffer.sb3 import GenerativeReplayBuffer
        env = gym.make("Pendulum-v1")
        buf = GenerativeReplayBuffer(1000, env.observation_space, env.action_space, device="cpu", config=cfg,
                                     model_terminals=False)
        r = np.random.default_rng(0)
        for _ in range(n):
            obs = r.standard_normal((1, 3)).astype(np.float32)
            act = r.uniform(-1, 1, (1, 1)).astype(np.float32)
            buf.add(obs, 0.9 * obs, act, obs[:, :1].ravel(), np.zeros(1, np.float32), [{}])
            buf.wait()
    buf.wait()
    return buf


@pytest.mark.parametrize("owner", ["GenerativeReplay", "WrappedReplay", "GenerativeReplayBuffer"])
@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_every_buffer_retrains_warm_after_the_first(tiny_cfg, owner, background):
    buf = _run(owner, warm_cfg(tiny_cfg, async_retrain=background))
    s = buf.stats()
    assert s["retrain_count"] == 2 and s["failed_retrains"] == 0
    assert s["last_fit_warm"] is True and s["warm_retrains"] == 1        # the first was a full fit
    assert buf.model.last_fit["steps"] == 50 and buf.model.last_fit["warm"]
    cold = _run(owner, small(tiny_cfg, async_retrain=background)).stats()
    assert cold["last_fit_warm"] is False and cold["warm_retrains"] == 0


def test_a_failed_warm_retrain_keeps_the_old_pool_and_model(tiny_cfg, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="synther_buffer.pool")
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=warm_cfg(tiny_cfg), model_terminals=False)
    feed(buf, 0, 100)
    feed(buf, 1, 100)                                      # env step 200: a successful warm retrain
    assert buf.stats()["warm_retrains"] == 1
    old_model, old_pool = buf.model, buf.pool.pool.clone()
    old_weights, old_ema = params(old_model.model), params(old_model.ema)
    old_draw = old_model.sample(16, seed=3)

    for name in ("edm_loss_from_noise", "edm_loss_and_grads_unchecked"):   # autograd and manual paths
        real = getattr(diffusion_mod, name)
        monkeypatch.setattr(diffusion_mod, name, lambda *a, _real=real, **k: _real(*a, **k) * float("nan"))
    feed(buf, 2, 100)                                      # env step 300: the warm retrain diverges
    s = buf.stats()
    assert s["failed_retrains"] == 1 and s["retrain_count"] == 2 and s["warm_retrains"] == 1
    assert buf.model is old_model and torch.equal(buf.pool.pool, old_pool)
    assert torch.equal(params(old_model.model), old_weights) and torch.equal(params(old_model.ema), old_ema)
    assert any("failed" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)

    monkeypatch.undo()
    np.testing.assert_array_equal(old_model.sample(16, seed=3), old_draw)
    feed(buf, 3, 100)                                      # healthy again: warm from the kept model
    s = buf.stats()
    assert s["retrain_count"] == 3 and s["last_fit_warm"] and s["warm_retrains"] == 2


def test_checkpoint_resume_continues_warm_and_matches_the_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = warm_cfg(tiny_cfg)
    straight = GenerativeReplay(OBS, ACT, capacity=1000, config=cfg, model_terminals=False)
    for seed in range(3):
        feed(straight, seed, 100)                          # retrains at 100 (full), 200 and 300 (warm)

    first = GenerativeReplay(OBS, ACT, capacity=1000, config=cfg, model_terminals=False)
    feed(first, 0, 100)
    feed(first, 1, 100)
    first.save(tmp_path / "ckpt")
    resumed = GenerativeReplay.load(tmp_path / "ckpt")
    assert resumed.stats()["warm_retrains"] == 1 and resumed.stats()["last_fit_warm"]
    feed(resumed, 2, 100)
    s = resumed.stats()
    assert s["retrain_count"] == 3 and s["warm_retrains"] == 2 and resumed.model.last_fit["warm"]
    # it continued from the checkpointed model: the same model and pool as the run never stopped
    assert torch.equal(params(resumed.model.ema), params(straight.model.ema))
    assert torch.equal(resumed.pool.pool, straight.pool.pool)
    # and that is not what a cold retrain on the same data gives
    cold = GenerativeReplay.load(tmp_path / "ckpt")
    cold.pool.config = cold.pool.config.replace(warm_start=False)
    feed(cold, 2, 100)
    assert not cold.stats()["last_fit_warm"] and not torch.equal(cold.pool.pool, straight.pool.pool)


def test_sb3_buffer_pickled_mid_run_continues_warm(tiny_cfg):
    """SB3's save_replay_buffer / load_replay_buffer pickle the buffer: the unpickled one continues warm
    from the pickled model, as if the run had never stopped."""
    import pickle

    straight = _run("GenerativeReplayBuffer", warm_cfg(tiny_cfg), n=300)
    first = _run("GenerativeReplayBuffer", warm_cfg(tiny_cfg), n=200)
    resumed = pickle.loads(pickle.dumps(first))
    assert resumed.stats()["warm_retrains"] == 1
    r = np.random.default_rng(0)
    for _ in range(200):                                   # _run's stream, replayed to step 200
        r.standard_normal((1, 3)), r.uniform(-1, 1, (1, 1))
    for _ in range(100):
        obs = r.standard_normal((1, 3)).astype(np.float32)
        act = r.uniform(-1, 1, (1, 1)).astype(np.float32)
        resumed.add(obs, 0.9 * obs, act, obs[:, :1].ravel(), np.zeros(1, np.float32), [{}])
    s = resumed.stats()
    assert s["retrain_count"] == 3 and s["warm_retrains"] == 2 and s["last_fit_warm"]
    assert torch.equal(resumed.pool.pool, straight.pool.pool)


def test_stats_survive_a_state_saved_before_warm_start(tiny_cfg):
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=warm_cfg(tiny_cfg), model_terminals=False)
    feed(buf, 0, 100)
    state = buf.pool.state_dict()
    for k in ("last_fit_warm", "warm_retrains"):
        state.pop(k)
    buf.pool.load_state_dict(state)
    assert buf.stats()["warm_retrains"] == 0 and buf.stats()["last_fit_warm"] is False


# ============================================================================ CLIs
def test_cli_flags_set_the_config():
    from synther_buffer import train
    from synther_buffer.sb3_run import synther_config

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    args = p.parse_args(["--env", "Pendulum-v1", "--warm-start", "--warm-start-steps", "123"])
    cfg = train.synther_config(args)
    assert cfg.warm_start is True and cfg.warm_start_steps == 123
    assert train.synther_config(p.parse_args(["--env", "Pendulum-v1"])).warm_start is False
    base = SynthERConfig.preset("tiny")
    ns = argparse.Namespace(device="cpu", seed=0, quiet=True, warm_start=True, warm_start_steps=None)
    assert synther_config(base, ns).warm_start is True
    with pytest.raises(ValueError, match="warm_start_steps"):
        train.synther_config(p.parse_args(["--env", "Pendulum-v1", "--warm-start", "--warm-start-steps", "0"]))
