"""Relevance functions (synther_buffer/relevance.py) and relevance-guided pools in the buffers."""

import copy
import pickle

import numpy as np
import pytest
import torch

from synther_buffer import GenerativeReplay, SynthERConfig, WrappedReplay
from synther_buffer.layout import RowLayout
from synther_buffer.relevance import (CuriosityRelevance, RelevanceError, ScoreStats, check_scores,
                                      draw_conditions, top_fraction)
from tests.helpers import ACT, OBS, small, transitions

LAYOUT = RowLayout(OBS, ACT, terminal=False)


def cfg(**changes) -> SynthERConfig:
    return small(SynthERConfig.preset("tiny"), **changes)


def filled(config, n=120, fn=None, **kw) -> GenerativeReplay:
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=config, model_terminals=False, **kw)
    if fn is not None:
        buf.set_relevance_fn(fn)
    buf.add(*transitions(n))
    return buf


# ------------------------------------------------------------------ scores
def test_check_scores_refuses_bad_scores_clearly():
    assert check_scores(torch.ones(3, 1), 3).shape == (3,)
    with pytest.raises(RelevanceError, match=r"2 NaN/inf value\(s\) \(first at row 1"):
        check_scores([0.0, float("nan"), float("inf")], 3)
    with pytest.raises(RelevanceError, match="one score per row"):
        check_scores(np.zeros(4), 3)
    with pytest.raises(RelevanceError, match="numbers"):
        check_scores(["a", "b"], 2)
    assert issubclass(RelevanceError, ValueError)


def test_top_fraction_and_conditions():
    s = np.arange(100, dtype=np.float64)
    top = top_fraction(s, 0.25)
    assert top.min() == 75 and len(top) == 25
    assert len(top_fraction(s, 0.001)) == 1
    c = draw_conditions(top, 1000, seed=0)
    assert c.min() >= 75 and set(np.unique(c)) == set(top)
    assert np.array_equal(c, draw_conditions(top, 1000, seed=0))
    st = ScoreStats.fit(np.array([1.0, 3.0]))
    assert np.allclose(st.normalize([1.0, 3.0]), [-1, 1])
    assert ScoreStats.fit(np.ones(5)).std == 1.0


def test_curiosity_learns_and_scores_novel_transitions_higher():
    obs, act, rew, nxt, _ = transitions(2000)
    rows = LAYOUT.join(obs, act, rew, nxt, None)
    rel = CuriosityRelevance(OBS, ACT, hidden=64, steps=300, seed=0)
    before = {k: v.clone() for k, v in rel.net.state_dict().items()}
    trained = rel.prepare(rows, LAYOUT, seed=1)
    # prepare trains a copy: the original is untouched (a failed retrain keeps it)
    assert all(torch.equal(before[k], v) for k, v in rel.net.state_dict().items())
    assert trained.trained_steps == 300 and np.isfinite(trained.last_loss)
    seen = trained.score(rows, LAYOUT)
    novel = rows.copy()
    novel[:, -OBS:] = -novel[:, -OBS:] + 2.0      # next states the dynamics never produce
    assert trained.score(novel, LAYOUT).mean() > 3 * seen.mean()
    # state round trip
    back = CuriosityRelevance(OBS, ACT, hidden=64, steps=300, seed=5)
    back.load_state_dict(trained.state_dict())
    assert np.array_equal(back.score(rows, LAYOUT), seen)


def test_curiosity_prepare_leaves_a_trained_model_and_its_optimiser_untouched():
    # the second retrain: prepare() on a model that already has Adam moments must not move them
    obs, act, rew, nxt, _ = transitions(500)
    rows = LAYOUT.join(obs, act, rew, nxt, None)
    first = CuriosityRelevance(OBS, ACT, hidden=32, steps=20, seed=0).prepare(rows, LAYOUT, seed=1)
    opt_before = copy.deepcopy(first.opt.state_dict())
    net_before = {k: v.clone() for k, v in first.net.state_dict().items()}
    second = first.prepare(rows, LAYOUT, seed=2)
    assert second.trained_steps == 40 and first.trained_steps == 20
    assert all(torch.equal(net_before[k], v) for k, v in first.net.state_dict().items())
    state = first.opt.state_dict()["state"]
    assert state.keys() == opt_before["state"].keys() and state
    for i, moments in state.items():
        for name, t in moments.items():
            assert torch.equal(t, opt_before["state"][i][name]), (i, name)


# ------------------------------------------------------------------ buffers
def test_generative_replay_curiosity_guided_and_saved(tmp_path):
    buf = filled(cfg(relevance="curiosity", relevance_hidden=32, relevance_train_steps=50))
    assert buf.stats()["retrain_count"] == 1 and buf.model.conditional
    s = buf.stats()
    assert s["relevance"] == "curiosity"
    assert np.isfinite(s["relevance_mean_real"]) and np.isfinite(s["relevance_mean_synthetic"])
    batch = buf.sample(32)
    assert batch.obs.shape == (32, OBS)
    buf.save(tmp_path / "ck")
    back = GenerativeReplay.load(tmp_path / "ck")
    assert back.model.conditional and back.stats()["relevance_mean_real"] == s["relevance_mean_real"]
    for a, b in zip(buf.pool.relevance.net.parameters(), back.pool.relevance.net.parameters()):
        assert torch.equal(a, b)
    assert np.array_equal(back.model.sample(20, seed=2), buf.model.sample(20, seed=2))
    # pickling (SB3's save_replay_buffer path) keeps it too
    clone = pickle.loads(pickle.dumps(buf.pool))
    assert clone.model.conditional and clone.relevance.trained_steps == buf.pool.relevance.trained_steps


def test_plain_synther_has_no_relevance_state():
    buf = filled(cfg())
    assert not buf.model.conditional
    assert "relevance_mean_real" not in buf.stats()
    assert "relevance" not in buf.pool.state_dict()


def test_reward_relevance_generates_higher_reward():
    config = cfg(relevance="reward", train_steps=600, num_generate=1000, synthetic_size=1000, retrain_every=400,
                 min_real=50)
    buf = filled(config, n=400)
    s = buf.stats()
    assert s["relevance"] == "reward"
    assert s["relevance_mean_synthetic"] > s["relevance_mean_real"] + 0.3


def test_relevance_fn_gets_all_real_rows():
    seen = []

    def fn(b):
        seen.append(b)
        return b.reward.numpy() * 2

    buf = filled(cfg(), fn=fn)
    assert buf.model.conditional and buf.stats()["relevance"] == "custom"
    real = seen[0]
    assert real.obs.shape == (120, OBS) and real.action.shape == (120, ACT) and real.terminated.shape == (120,)
    assert np.allclose(real.reward.numpy(), transitions(120)[2])
    assert len(seen) == 2 and seen[1].obs.shape[0] <= 500     # then the synthetic pool, for the stats


@pytest.mark.parametrize("bad", ["raise", "nan", "short"])
def test_relevance_fn_errors_keep_the_old_pool(bad):
    calls = {"n": 0}

    def fn(b):
        calls["n"] += 1
        if calls["n"] <= 2:        # first retrain (real rows, then the synthetic rows for the stats)
            return b.reward
        if bad == "raise":
            raise KeyError("critic not ready")
        if bad == "nan":
            return torch.full((len(b.reward),), float("nan"))
        return b.reward[:-1]

    buf = filled(cfg(), fn=fn)
    pool, model = buf.pool.pool.clone(), buf.model
    match = {"raise": "relevance function raised KeyError", "nan": "NaN/inf",
             "short": "one score per row"}[bad]
    with pytest.raises(RelevanceError, match=match):
        buf.add(*transitions(100, seed=1))
    assert buf.model is model and torch.equal(buf.pool.pool, pool) and buf.stats()["retrain_count"] == 1
    assert buf.stats()["next_retrain"] > buf.stats()["env_steps"]   # the schedule moved on: no retry storm
    buf.add(*transitions(10, seed=2))                                 # and the buffer keeps working
    assert buf.sample(16).obs.shape == (16, OBS)


def test_async_curiosity_retrain():
    buf = filled(cfg(relevance="curiosity", relevance_hidden=32, relevance_train_steps=20, async_retrain=True))
    buf.wait()
    s = buf.stats()
    assert s["retrain_count"] == 1 and buf.model.conditional and np.isfinite(s["relevance_mean_synthetic"])


def test_wrapped_replay_relevance_fn(tmp_path):
    obs, act, rew, nxt, term = transitions(150)
    rows = [torch.as_tensor(v) for v in (obs, act, rew, nxt, term)]

    def sample_real(n):
        idx = torch.randint(0, 150, (n,))
        return [v[idx] for v in rows]

    buf = WrappedReplay(sample_real, lambda: rows, OBS, ACT, cfg(), model_terminals=False)
    buf.set_relevance_fn(lambda b: b.obs[:, 0])
    for _ in range(150):
        buf.step()
    assert buf.model is not None and buf.model.conditional
    assert buf.sample(20).obs.shape == (20, OBS)


def test_set_relevance_fn_validation():
    buf = GenerativeReplay(OBS, ACT, capacity=100, config=cfg())
    with pytest.raises(ValueError, match="callable"):
        buf.set_relevance_fn(3)
    buf.set_relevance_fn(lambda b: b.reward)
    buf.set_relevance_fn(None)
    assert buf.pool.relevance is None


def test_warm_start_keeps_a_conditional_model_conditional():
    """Warm start and relevance together: the second retrain continues the conditional network (its
    condition MLP included) and still guides."""
    c = cfg(relevance="curiosity", relevance_hidden=32, relevance_train_steps=50, warm_start=True,
            warm_start_steps=20, retrain_every=60)
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=c, model_terminals=False)
    buf.add(*transitions(120))
    first = {k: v.clone() for k, v in buf.model.model.state_dict().items()}
    buf.add(*transitions(60, seed=1))
    s = buf.stats()
    assert s["retrain_count"] == 2 and s["failed_retrains"] == 0
    assert s["last_fit_warm"] is True and buf.model.conditional and buf.model.last_fit["steps"] == 20
    # continued, not rebuilt: 20 small steps move the condition MLP only a little from the first fit's
    moved = [(buf.model.model.state_dict()[k] - v).abs().max().item() for k, v in first.items() if "cond_mlp" in k]
    assert moved and 0 < max(moved) < 0.5
    assert np.isfinite(s["relevance_mean_synthetic"])
