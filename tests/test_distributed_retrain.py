"""SynthERConfig.retrain_backend="ray" on a local Ray instance: the same pool as the thread backend, a killed
actor, checkpoints with a retrain in flight, the three buffers, errors."""

from __future__ import annotations

import gc
import os
import pickle
import random
import signal
import sys
import time

import numpy as np
import pytest
import torch

from synther_buffer import GenerativeReplay, SynthERConfig, WrappedReplay
from synther_buffer.extras import MissingExtraError
from synther_buffer.layout import RowLayout
from synther_buffer.pool import SyntheticPool

from helpers import small, transitions  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("torch_one_thread")
OBS, ACT = 3, 2


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def release_actors():
    """Collect each test's buffers when it ends: an actor lives (and holds its CPU) while a handle does."""
    yield
    gc.collect()


def cfg_for(tiny_cfg, backend: str, **changes) -> SynthERConfig:
    return small(tiny_cfg, retrain_backend=backend, **changes)


def feed(buf: GenerativeReplay, lo: int, hi: int, fields) -> None:
    buf.add(*(f[lo:hi] for f in fields))


def same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for part in ("model", "ema"):
        for k in sa[part]:
            torch.testing.assert_close(sa[part][k], sb[part][k], rtol=0, atol=0, msg=f"{part}.{k}")


TIMING = {"last_fit_seconds", "last_generate_seconds"}


# ---------------------------------------------------------------------------------------- equivalence
class _Mine:
    """A loop's own buffer for WrappedReplay."""

    def __init__(self, fields):
        self.fields, self.n = fields, 0

    def all(self):
        return tuple(f[:self.n] for f in self.fields)

    def sample(self, k):
        idx = np.random.default_rng(k).integers(0, self.n, k)
        return tuple(f[idx] for f in self.fields)


def run_owner(owner: str, cfg: SynthERConfig, fields, n: int):
    if owner == "GenerativeReplay":
        buf = GenerativeReplay(OBS, ACT, capacity=1000, config=cfg, model_terminals=True)
        for lo in range(0, n, 50):
            feed(buf, lo, min(n, lo + 50), fields)
    else:
        mine = _Mine(fields)
        buf = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=cfg, model_terminals=True)
        for _ in range(n):
            mine.n += 1
            buf.step()
    buf.wait()
    return buf


@pytest.mark.parametrize("owner", ["GenerativeReplay", "WrappedReplay"])
def test_the_ray_backend_installs_the_thread_backends_pool(ray_local, tiny_cfg, owner):
    fields = transitions(250, seed=1, term_p=0.05)
    bufs = {b: run_owner(owner, cfg_for(tiny_cfg, b), fields, 250) for b in ("thread", "ray")}
    t, r = bufs["thread"], bufs["ray"]
    st, sr = t.stats(), r.stats()
    assert sr["retrain_count"] == st["retrain_count"] == 2 and sr["failed_retrains"] == 0
    assert {k: v for k, v in st.items() if k not in TIMING} == {k: v for k, v in sr.items() if k not in TIMING}
    torch.testing.assert_close(r.pool.pool, t.pool.pool, rtol=0, atol=0)
    same_model(r.model, t.model)
    assert r.model.device == r.pool.device == torch.device("cpu")
    assert r.pool.remote.actors_started == 1          # one actor served both retrains
    b = r.sample(64)
    assert b.obs.shape == (64, OBS)


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_warm_ray_retrain_continues_the_previous_model_like_a_thread_one(ray_local, tiny_cfg, background):
    """The actor receives the installed model (its state dict) and continues it: the same warm model and
    pool as the thread backend, which a cold retrain on the same data does not give."""
    fields = transitions(250, seed=1, term_p=0.05)
    warm = dict(warm_start=True, warm_start_steps=40, async_retrain=background)

    def run(cfg):   # a background retrain is waited for before the next is due: two retrains in both modes
        buf = GenerativeReplay(OBS, ACT, capacity=1000, config=cfg, model_terminals=True)
        for lo in range(0, 250, 50):
            feed(buf, lo, lo + 50, fields)
            buf.wait()
        return buf

    t, r = (run(cfg_for(tiny_cfg, b, **warm)) for b in ("thread", "ray"))
    st, sr = t.stats(), r.stats()
    assert sr["retrain_count"] == 2 and sr["warm_retrains"] == st["warm_retrains"] == 1 and sr["last_fit_warm"]
    assert r.model.last_fit["warm"] and r.model.last_fit["steps"] == 40
    torch.testing.assert_close(r.pool.pool, t.pool.pool, rtol=0, atol=0)
    same_model(r.model, t.model)
    cold = run(cfg_for(tiny_cfg, "thread", async_retrain=background))
    assert not torch.equal(cold.pool.pool, r.pool.pool)


# ---------------------------------------------------------------------------------------- faults
def test_a_killed_actor_keeps_the_old_pool_counts_the_failure_and_the_next_retrain_works(ray_local, tiny_cfg, caplog):
    cfg = cfg_for(tiny_cfg, "ray", async_retrain=True, train_steps=1500)
    fields = transitions(400, seed=2)
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=cfg, model_terminals=False)
    feed(buf, 0, 100, fields)                       # retrain 1 submitted at step 100
    assert buf.pool.retraining
    buf.wait()
    assert buf.stats()["retrain_count"] == 1
    old_pool, old_model = buf.pool.pool, buf.model
    actor = buf.pool.remote.actor
    first = ray_local.get(actor.where.remote())

    feed(buf, 100, 200, fields)                     # retrain 2 in flight on the actor
    assert buf.pool.retraining
    time.sleep(0.5)                                 # let it start training (1500 steps take seconds)
    assert first["pid"] != os.getpid()               # the actor's process, never the test run's
    os.kill(first["pid"], signal.SIGKILL)
    with caplog.at_level("WARNING"):
        assert buf.wait() is False
    s = buf.stats()
    assert (s["retrain_count"], s["failed_retrains"], s["last_retrain_env_step"]) == (1, 1, 100)
    assert buf.pool.pool is old_pool and buf.model is old_model      # the old pool keeps serving
    assert buf.sample(32).obs.shape == (32, OBS)
    assert "retrain actor lost" in caplog.text and "keeping the previous pool" in caplog.text
    assert buf.pool.remote.actor is None and buf.pool.remote.actors_lost == 1

    feed(buf, 200, 300, fields)                     # retrain 3: a fresh actor
    buf.wait()
    s = buf.stats()
    assert (s["retrain_count"], s["failed_retrains"], s["last_retrain_env_step"]) == (2, 1, 300)
    assert buf.pool.pool is not old_pool and buf.pool.remote.actors_started == 2
    assert ray_local.get(buf.pool.remote.actor.where.remote())["pid"] != first["pid"]


def test_an_error_in_the_actor_is_raised_by_poll_like_the_threads(ray_local, tiny_cfg):
    cfg = cfg_for(tiny_cfg, "ray", async_retrain=True)
    pool = SyntheticPool(RowLayout(OBS, ACT, False), cfg)
    pool.step(100)
    good = RowLayout(OBS, ACT, True).join(*transitions(100))[:, :-1]
    pool.retrain(np.ascontiguousarray(good[:, :-1]))   # one column short: fit raises in the actor
    with pytest.raises(RuntimeError, match="background retrain crashed") as e:
        pool.wait()
    assert "must have shape" in repr(e.value.__cause__)
    pool.step(100)
    assert pool.retrain(np.ascontiguousarray(good)) and pool.wait()   # the actor survived an exception
    assert pool.stats()["retrain_count"] == 1 and pool.remote.actors_started == 1


# ---------------------------------------------------------------------------------------- checkpoints
def test_save_waits_for_the_remote_retrain_in_flight(ray_local, tiny_cfg, tmp_path):
    cfg = cfg_for(tiny_cfg, "ray", async_retrain=True)
    fields = transitions(200, seed=3)
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=cfg, model_terminals=False)
    feed(buf, 0, 100, fields)
    assert buf.pool.retraining and buf.stats()["retrain_count"] == 0
    buf.save(tmp_path / "ckpt")                     # waits: the checkpoint holds the new pool
    assert not buf.pool.retraining and buf.stats()["retrain_count"] == 1
    back = GenerativeReplay.load(tmp_path / "ckpt")
    assert back.config.retrain_backend == "ray" and back.stats()["retrain_count"] == 1
    torch.testing.assert_close(back.pool.pool, buf.pool.pool, rtol=0, atol=0)
    feed(back, 100, 200, fields)                    # the resumed buffer retrains remotely too
    back.wait()
    assert back.stats()["retrain_count"] == 2 and back.pool.remote.actors_started == 1


def test_sb3_buffer_with_the_ray_backend(ray_local, tiny_cfg):
    gym = pytest.importorskip("gymnasium")
    from synther_buffer import GenerativeReplayBuffer

    env = gym.make("Pendulum-v1")
    buf = GenerativeReplayBuffer(1000, env.observation_space, env.action_space, device="cpu",
                                 config=cfg_for(tiny_cfg, "ray"), model_terminals=False)
    r = np.random.default_rng(0)
    for _ in range(100):
        obs = r.standard_normal((1, 3)).astype(np.float32)
        act = r.uniform(-1, 1, (1, 1)).astype(np.float32)
        buf.add(obs, 0.9 * obs, act, obs[:, 0] - act[:, 0], np.zeros(1, np.float32), [{}])
    s = buf.stats()
    assert s["retrain_count"] == 1 and s["num_synthetic"] > 0
    assert buf.pool.pool[:, buf.pool.layout.action_cols].abs().max() <= 1.0     # clipped in the actor
    # Pendulum's finite observation box (cos, sin in [-1, 1]) holds for the remotely built pool: the fed
    # standard-normal observations cross it, so the model's rows do too and are clipped on install
    o, a = buf.pool.layout.obs_dim, buf.pool.layout.action_dim
    low, high = (torch.as_tensor(b) for b in (env.observation_space.low, env.observation_space.high))
    for cols in (slice(0, o), slice(o + a + 1, 2 * o + a + 1)):
        part = buf.pool.pool[:, cols]
        assert bool(((part >= low) & (part <= high)).all())
    assert s["num_obs_clipped"] > 0
    assert buf.sample(32).observations.shape == (32, 3)
    back = pickle.loads(pickle.dumps(buf))          # SB3's save_replay_buffer path
    torch.testing.assert_close(back.pool.pool, buf.pool.pool, rtol=0, atol=0)
    assert back.pool.remote is not None


def test_the_agents_global_rng_is_untouched_by_a_remote_retrain(ray_local, tiny_cfg):
    cfg = cfg_for(tiny_cfg, "ray", async_retrain=True)
    fields = transitions(100, seed=4)
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=cfg, model_terminals=False)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    feed(buf, 0, 100, fields)                       # submits; the swap happens on this thread at wait()
    draws = []
    while buf.pool.retraining or not draws:
        draws.append((torch.rand(1).item(), float(np.random.random()), random.random()))
        time.sleep(0.002)                           # an agent's pace, not a busy loop
    buf.wait()
    draws.append((torch.rand(1).item(), float(np.random.random()), random.random()))
    assert buf.stats()["retrain_count"] == 1
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    assert draws == [(torch.rand(1).item(), float(np.random.random()), random.random()) for _ in draws]


# ---------------------------------------------------------------------------------------- arguments
def test_without_ray_the_ray_backend_fails_at_construction_naming_the_extra(tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"synther-buffer\[distributed\]") as e:
        GenerativeReplay(OBS, ACT, capacity=100, config=cfg_for(tiny_cfg, "ray"))
    assert e.value.extra == "distributed" and "retrain_backend" in str(e.value)
    GenerativeReplay(OBS, ACT, capacity=100, config=cfg_for(tiny_cfg, "thread"))    # the default needs no Ray


@pytest.mark.parametrize("bad", ["gpu", "Ray", None, 1])
def test_retrain_backend_is_validated(tiny_cfg, bad):
    with pytest.raises(ValueError, match="retrain_backend must be one of"):
        tiny_cfg.replace(retrain_backend=bad)
    assert SynthERConfig().retrain_backend == "thread"
    assert SynthERConfig.from_dict({k: v for k, v in tiny_cfg.to_dict().items() if k != "retrain_backend"}
                                   ).retrain_backend == "thread"      # configs saved before the field


def test_actor_options_need_the_ray_backend(tiny_cfg):
    pool = SyntheticPool(RowLayout(OBS, ACT, False), cfg_for(tiny_cfg, "thread"))
    with pytest.raises(ValueError, match="retrain_backend='ray'"):
        pool.set_ray_actor_options(num_gpus=1)
