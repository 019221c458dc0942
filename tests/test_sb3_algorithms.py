"""GenerativeReplayBuffer under every SB3 off-policy algorithm with Box actions (SAC, TD3, DDPG) and
sb3-contrib's (TQC, CrossQ): each trains through two retrains on Pendulum-v1 at the tiny preset,
round-trips ``save_replay_buffer`` / ``load_replay_buffer`` and ``model.save`` / ``load``, and
retrains again after loading; CrossQ with n-step returns. Plus the action-bounds warning: silent on
SB3's rescaled actions, raised on CleanRL-style env-scale ones. CPU, tiny nets."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import DDPG, SAC, TD3

from synther_buffer import GenerativeReplayBuffer, SynthERConfig

from helpers import small  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CFG = small(SynthERConfig.preset("tiny").replace(device="cpu"))   # retrain every 100, 200 fit steps
COMMON = dict(batch_size=32, device="cpu", seed=0, verbose=0, train_freq=1, gradient_steps=1, learning_starts=150)


def _contrib(name: str):
    contrib = pytest.importorskip("sb3_contrib")
    return getattr(contrib, name)


ALGOS = {
    "SAC": lambda: SAC,
    "TD3": lambda: TD3,
    "DDPG": lambda: DDPG,
    "TQC": lambda: _contrib("TQC"),
    "CrossQ": lambda: _contrib("CrossQ"),
}


def _record(buf) -> dict:
    """Count the batches the algorithm drew and the synthetic rows in them; keep the last batch."""
    seen = {"batches": 0, "synthetic_rows": 0, "last": None}
    sample, split = buf.sample, buf.core.split

    def counting_split(batch_size):
        n_real, n_syn = split(batch_size)
        seen["synthetic_rows"] += n_syn
        return n_real, n_syn

    def counting_sample(batch_size, env=None):
        seen["batches"] += 1
        seen["last"] = sample(batch_size, env=env)
        return seen["last"]

    buf.core.split, buf.sample = counting_split, counting_sample
    seen["undo"] = lambda: (vars(buf).pop("sample"), vars(buf.core).pop("split"))   # before pickling
    return seen


def _outside_warnings(caught) -> list:
    return [str(w.message) for w in caught if "outside the bounds" in str(w.message)]


@pytest.mark.parametrize("algo,n_steps", [(a, 1) for a in sorted(ALGOS)] + [("CrossQ", 3), ("SAC", 3)])
def test_trains_through_retrains_and_round_trips(algo, n_steps, tmp_path):
    """CrossQ's own tests use n-step; SAC n-step stands for SB3's algorithms (one shared n-step path)."""
    cls = ALGOS[algo]()
    kw = dict(replay_buffer_class=GenerativeReplayBuffer, replay_buffer_kwargs=dict(config=CFG),
              policy_kwargs=dict(net_arch=[32, 32]), **COMMON)     # fresh dicts: SB3 writes into policy_kwargs
    if n_steps > 1:
        kw["replay_buffer_kwargs"].update(n_steps=n_steps, gamma=0.98)
        kw["gamma"] = 0.98
    model = cls("MlpPolicy", gym.make("Pendulum-v1"), **kw)
    buf = model.replay_buffer
    assert isinstance(buf, GenerativeReplayBuffer)
    seen = _record(buf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(230)
    s = buf.stats()
    assert s["retrain_count"] == 2 and s["failed_retrains"] == 0 and s["num_synthetic"] > 0
    assert seen["batches"] == 230 - 150 and seen["synthetic_rows"] == 80 * 16   # half of each: pool since 100
    assert not _outside_warnings(caught)                 # SB3 stores rescaled actions, inside [-1, 1]
    last = seen["last"]
    assert last.rewards.shape == last.dones.shape == (32, 1)
    if n_steps > 1:                                      # real rows: gamma ** k, synthetic rows: gamma
        assert torch.allclose(last.discounts[16:], torch.full((16, 1), 0.98))
        assert {round(float(d), 5) for d in last.discounts[:16, 0]} <= {round(0.98 ** k, 5) for k in (1, 2, 3)}
    else:
        assert last.discounts is None

    seen["undo"]()
    model.save(tmp_path / "model.zip")
    model.save_replay_buffer(tmp_path / "rb.pkl")
    loaded = cls.load(tmp_path / "model.zip", env=gym.make("Pendulum-v1"), device="cpu")
    loaded.load_replay_buffer(tmp_path / "rb.pkl")
    back = loaded.replay_buffer
    assert isinstance(back, GenerativeReplayBuffer) and back is not buf
    assert back.stats() == buf.stats() and torch.equal(back.pool.pool, buf.pool.pool)
    assert (back.n_steps, back.gamma) == (buf.n_steps, buf.gamma)
    np.testing.assert_array_equal(back.real_rows(), buf.real_rows())
    for (name, p), q in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(p, q), name
    loaded.learn(80, reset_num_timesteps=False)         # the schedule continues: a retrain at 300
    assert back.stats()["retrain_count"] == 3 and back.stats()["env_steps"] == loaded.num_timesteps == 310


# ============================================================================ action bounds, CleanRL-style
def _cleanrl_style(buf, env, steps: int) -> None:
    """CleanRL's loop around SB3's buffer class: env-scale actions, terminations as dones."""
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(steps):
        action = env.action_space.sample()                                   # Pendulum: [-2, 2]
        next_obs, reward, terminated, truncated, info = env.step(action)
        buf.add(obs[None], next_obs[None], action[None], np.array([reward]), np.array([terminated]), [info])
        obs = next_obs if not (terminated or truncated) else env.reset()[0]


@pytest.mark.parametrize("bounds", ["default", "env", None])
def test_env_scale_actions_warn_against_the_default_bounds(bounds, fake_diffusion):
    env = gym.make("Pendulum-v1")
    kw = {} if bounds == "default" else dict(action_bounds=(env.action_space.low, env.action_space.high)
                                              if bounds == "env" else None)
    buf = GenerativeReplayBuffer(1000, env.observation_space, env.action_space, device="cpu",
                                 handle_timeout_termination=False, config=CFG, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cleanrl_style(buf, env, 210)
    msgs = _outside_warnings(caught)
    assert buf.stats()["retrain_count"] == 2
    syn = buf.sample(200).actions[100:]
    if bounds == "default":
        assert len(msgs) == 2 and "env step 100" in msgs[0] and "env step 200" in msgs[1]
        assert syn.abs().max() <= 1.0                                          # clamped, as warned
    else:
        assert msgs == []
        assert syn.abs().max() > 1.0 and syn.abs().max() <= 2.0               # the env's scale kept
