"""Relevance-guided generation (PGR) in the stable-baselines3 buffer: SAC at UTD=20, a TD-error
relevance function from the agent's critic, the logger, save / load."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.logger import Logger

from synther_buffer import GenerativeReplayBuffer
from synther_buffer.relevance import RelevanceError
from synther_buffer.sb3 import SynthERLogCallback
from tests.test_sb3 import SAC_KW, Capture, cfg_small


def sac(cfg, **kw):
    return SAC("MlpPolicy", gym.make("Pendulum-v1"), train_freq=1, gradient_steps=20, learning_starts=180,
               replay_buffer_class=GenerativeReplayBuffer, replay_buffer_kwargs=dict(config=cfg), **SAC_KW, **kw)


@pytest.fixture(scope="module")
def curiosity_run():
    """SAC at UTD=20 on Pendulum-v1 with relevance="curiosity": retrains at env steps 100 and 200."""
    cfg = cfg_small(relevance="curiosity", relevance_hidden=32, relevance_train_steps=50)
    model = sac(cfg)
    capture = Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    model.learn(200, callback=SynthERLogCallback(verbose=0), log_interval=1)
    return model, capture


def test_sac_utd20_with_curiosity(curiosity_run):
    model, capture = curiosity_run
    buf = model.replay_buffer
    s = buf.stats()
    assert s["retrain_count"] == 2 and s["failed_retrains"] == 0 and buf.model.conditional
    assert s["relevance"] == "curiosity" and np.isfinite(s["relevance_mean_synthetic"])
    assert buf.pool.relevance.trained_steps == 100            # 50 steps per retrain, continued
    assert model._n_updates == 20 * 20
    seen = set().union(*(kv.keys() for _, kv in capture.dumps)) | set(model.logger.name_to_value)
    assert {"synther/relevance_mean_real", "synther/relevance_mean_synthetic"} <= seen


def test_sb3_save_load_keeps_the_relevance_model(curiosity_run, tmp_path):
    model, _ = curiosity_run
    model.save_replay_buffer(tmp_path / "rb.pkl")
    fresh = sac(cfg_small(relevance="curiosity", relevance_hidden=32, relevance_train_steps=50))
    fresh.load_replay_buffer(tmp_path / "rb.pkl")
    a, b = model.replay_buffer, fresh.replay_buffer
    assert b.model.conditional and b.pool.relevance.trained_steps == a.pool.relevance.trained_steps
    assert np.array_equal(a.model.sample(10, seed=1), b.model.sample(10, seed=1))
    a.save_synther(tmp_path / "synther")
    c = sac(cfg_small(relevance="curiosity", relevance_hidden=32, relevance_train_steps=50))
    c.replay_buffer.load_synther(tmp_path / "synther")
    assert c.replay_buffer.model.conditional
    assert c.replay_buffer.stats()["relevance_mean_real"] == a.stats()["relevance_mean_real"]


def test_td_error_relevance_fn_from_the_critic():
    model = sac(cfg_small())
    calls = []

    def td_error(b):
        calls.append(len(b.reward))
        with torch.no_grad():
            obs, act, nxt = b.obs, b.action, b.next_obs
            q = torch.min(*model.critic(obs, act))
            next_act, _ = model.actor.action_log_prob(nxt)
            target = b.reward[:, None] + 0.99 * (1 - b.terminated[:, None]) * torch.min(*model.critic_target(nxt, next_act))
            return (q - target).abs()[:, 0]

    model.replay_buffer.set_relevance_fn(td_error)
    model.learn(100)
    buf = model.replay_buffer
    assert buf.stats()["retrain_count"] == 1 and buf.model.conditional and calls[0] == 100
    assert buf.stats()["relevance"] == "custom"


def test_bad_relevance_fn_raises_from_learn_and_keeps_the_pool():
    model = sac(cfg_small())
    model.learn(100)
    buf = model.replay_buffer
    pool = buf.pool.pool.clone()
    buf.set_relevance_fn(lambda b: np.full(len(b.reward), np.inf))
    with pytest.raises(RelevanceError, match="NaN/inf"):
        model.learn(100, reset_num_timesteps=False)
    assert torch.equal(buf.pool.pool, pool) and buf.stats()["retrain_count"] == 1
