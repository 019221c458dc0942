"""GenerativeReplayBuffer's n-step returns against SB3's own ``NStepReplayBuffer`` (same data, same
indices -> the same returns, discounts, next observations and dones) and against returns worked out by
hand; synthetic rows as 1-step transitions with ``discounts = gamma``. HerReplayBuffer refused with
why, argument checks, ``add`` sizes, pickles made before ``n_steps``. CPU, no diffusion fit."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.buffers import NStepReplayBuffer
from stable_baselines3.common.envs import BitFlippingEnv

from synther_buffer import GenerativeReplayBuffer, SynthERConfig

NO_RETRAIN = SynthERConfig.preset("tiny").replace(device="cpu", retrain_every=10**9)
OBS_SPACE = spaces.Box(-10, 10, (3,), np.float32)
ACT_SPACE = spaces.Box(-1, 1, (2,), np.float32)


def pair(n_steps=3, gamma=0.9, buffer_size=20, n_envs=2, **ours):
    """Our buffer and SB3's NStepReplayBuffer with the same settings."""
    kw = dict(device="cpu", n_envs=n_envs)
    mine = GenerativeReplayBuffer(buffer_size, OBS_SPACE, ACT_SPACE, config=NO_RETRAIN, n_steps=n_steps, gamma=gamma,
                                  **kw, **ours)
    ref = NStepReplayBuffer(buffer_size, OBS_SPACE, ACT_SPACE, n_steps=n_steps, gamma=gamma, **kw)
    return mine, ref


def feed(bufs, steps: int, seed: int = 0) -> None:
    """The same random vector steps into every buffer: terminals and time-limit truncations mixed in."""
    r = np.random.default_rng(seed)
    n = bufs[0].n_envs
    for _ in range(steps):
        obs, nxt = r.standard_normal((2, n, 3)).astype(np.float32)
        act = r.uniform(-1, 1, (n, 2)).astype(np.float32)
        rew = r.standard_normal(n).astype(np.float32)
        done = r.random(n) < 0.2
        infos = [{"TimeLimit.truncated": bool(d and r.random() < 0.5)} for d in done]
        for b in bufs:
            b.add(obs, nxt, act, rew, done.astype(np.float32), infos)


def assert_same(a, b) -> None:
    for name, x, y in zip(a._fields, a, b):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("steps", [8, 35])                 # not full / wrapped around
@pytest.mark.parametrize("n_steps", [2, 3, 5])
def test_real_rows_match_sb3_nstep_buffer(steps, n_steps):
    mine, ref = pair(n_steps=n_steps)
    feed([mine, ref], steps)
    for seed in range(5):
        np.random.seed(seed)
        want = ref.sample(64)
        np.random.seed(seed)
        got = mine.sample(64)                               # no pool yet: all real
        assert_same(got, want)
        assert got.discounts.shape == (64, 1)
        assert not torch.equal(got.discounts, torch.full((64, 1), 0.9))   # some rows really are n-step


def test_mixed_batch_real_half_matches_sb3_and_synthetic_half_is_one_step():
    mine, ref = pair(n_steps=3, gamma=0.9)
    feed([mine, ref], 30)
    d = mine.pool.layout.dim
    pool = torch.randn(40, d)
    mine.pool.pool = pool
    np.random.seed(7)
    want = ref.sample(16)
    np.random.seed(7)
    got = mine.sample(32)                                   # real_ratio 0.5: 16 real rows first
    assert_same(type(want)(*(f[:16] for f in got)), want)
    assert torch.equal(got.discounts[16:], torch.full((16, 1), 0.9))
    rows = {tuple(np.round(r.numpy(), 5)) for r in pool}
    for i in range(16, 32):                                 # whole pool rows, 1-step fields in place
        row = torch.cat([got.observations[i], got.actions[i], got.rewards[i], got.next_observations[i]])
        assert tuple(np.round(row.numpy(), 5)) in rows


def test_n_step_returns_worked_out_by_hand():
    """One env, rewards 0..9, a terminal at step 4, a time-limit truncation at step 7, gamma 0.5, n 3."""
    buf = GenerativeReplayBuffer(50, OBS_SPACE, ACT_SPACE, device="cpu", config=NO_RETRAIN, n_steps=3, gamma=0.5)
    for t in range(10):
        o = np.full((1, 3), t, np.float32)
        buf.add(o, o + 0.5, np.zeros((1, 2), np.float32), np.array([float(t)], np.float32),
                np.array([float(t in (4, 7))], np.float32), [{"TimeLimit.truncated": t == 7}])
    s = buf._get_samples(np.array([0, 2, 3, 4, 5, 8]))
    # rows: (return, discount, next obs from step, done)
    want = [(0 + .5 * 1 + .25 * 2, .125, 2, 0.0),          # no end within 3 steps
            (2 + .5 * 3 + .25 * 4, .125, 4, 1.0),          # the terminal is the third step
            (3 + .5 * 4, .25, 4, 1.0),                     # cut at the terminal
            (4.0, .5, 4, 1.0),                             # the terminal itself
            (5 + .5 * 6 + .25 * 7, .125, 7, 0.0),          # a truncation ends the sum, and is no terminal
            (8 + .5 * 9, .25, 9, 0.0)]                     # the newest row: cut at the buffer's end
    for i, (ret, disc, last, done) in enumerate(want):
        assert s.rewards[i, 0].item() == pytest.approx(ret), i
        assert s.discounts[i, 0].item() == pytest.approx(disc), i
        assert (s.next_observations[i] == last + 0.5).all(), i
        assert s.dones[i, 0].item() == done, i


def test_one_step_default_has_no_discounts():
    buf, _ = pair(n_steps=1)
    feed([buf], 10)
    buf.pool.pool = torch.randn(10, buf.pool.layout.dim)
    b = buf.sample(8)
    assert buf.n_steps == 1 and b.discounts is None


# ============================================================================ HER
HER_MSG = "does not compose with HerReplayBuffer"


@pytest.mark.parametrize("kw", [dict(n_sampled_goal=4), dict(goal_selection_strategy="future"),
                                dict(copy_info_dict=True)])
def test_her_arguments_are_refused_with_why(kw):
    with pytest.raises(ValueError, match=HER_MSG) as ei:
        GenerativeReplayBuffer(100, OBS_SPACE, ACT_SPACE, device="cpu", config=NO_RETRAIN, **kw)
    assert "relabel" in str(ei.value) and "synthetic transitions belong to no episode" in str(ei.value)


def test_goal_conditioned_env_is_refused_through_sac():
    env = BitFlippingEnv(n_bits=4, continuous=True)
    with pytest.raises(ValueError, match=HER_MSG):
        SAC("MultiInputPolicy", env, replay_buffer_class=GenerativeReplayBuffer,
            replay_buffer_kwargs=dict(config=NO_RETRAIN), device="cpu")
    with pytest.raises(ValueError, match=HER_MSG):
        SAC("MultiInputPolicy", env, replay_buffer_class=GenerativeReplayBuffer,
            replay_buffer_kwargs=dict(config=NO_RETRAIN, goal_selection_strategy="future"), device="cpu")


def test_other_unexpected_keywords_are_a_type_error():
    with pytest.raises(TypeError, match="no_such_option"):
        GenerativeReplayBuffer(100, OBS_SPACE, ACT_SPACE, device="cpu", config=NO_RETRAIN, no_such_option=1)


# ============================================================================ argument checks
@pytest.mark.parametrize("kw", [dict(n_steps=0), dict(n_steps=-2), dict(n_steps=2.0), dict(n_steps=True),
                                dict(gamma=0.0), dict(gamma=1.5), dict(gamma="x"), dict(gamma=float("nan")),
                                dict(n_steps=3, optimize_memory_usage=True), dict(action_bounds=(1.0, -1.0)),
                                dict(action_bounds=([0, 0, 0], [1, 1, 1]))])
def test_bad_n_step_and_bound_arguments(kw):
    with pytest.raises(ValueError):
        GenerativeReplayBuffer(100, OBS_SPACE, ACT_SPACE, device="cpu", config=NO_RETRAIN, **kw)


def test_add_sizes_are_checked_and_our_order_is_named():
    buf = GenerativeReplayBuffer(100, OBS_SPACE, ACT_SPACE, device="cpu", config=NO_RETRAIN, n_envs=2)
    obs, nxt = np.zeros((2, 2, 3), np.float32)
    act, rew, done = np.zeros((2, 2), np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match=r"^next_obs has 4 values, expected n_envs \* 3 = 6.*GenerativeReplay's order"):
        buf.add(obs, act, rew, nxt, done, [{}, {}])        # (obs, action, reward, next_obs, terminated)
    with pytest.raises(ValueError, match=r"^action has 6 values, expected n_envs \* 2 = 4") as ei:
        buf.add(obs, nxt, np.zeros((2, 3), np.float32), rew, done, [{}, {}])
    assert "order" not in str(ei.value)
    assert buf.pos == 0 and buf.stats()["env_steps"] == 0
    buf.add(obs, nxt, act, rew, done, [{}, {}])
    assert buf.pos == 1


def test_pickle_from_before_n_steps_loads_as_one_step():
    buf, _ = pair(n_steps=1)
    feed([buf], 5)
    del buf.n_steps, buf.gamma                             # what a pickle made before n_steps holds
    back = pickle.loads(pickle.dumps(buf))
    assert (back.n_steps, back.gamma) == (1, 0.99)
    assert back.sample(4).discounts is None


def test_config_device_none_pendulum_still_builds():
    env = gym.make("Pendulum-v1")
    buf = GenerativeReplayBuffer(10, env.observation_space, env.action_space, device="cpu", n_steps=2, gamma=0.95)
    assert (buf.n_steps, buf.gamma) == (2, 0.95) and buf.pool.action_low.tolist() == [-1.0]
