"""Finite Box observation bounds hold for synthetic rows in the SB3 buffer (clipped and counted in
stats()["num_obs_clipped"]), as actions do; infinite bounds are no-ops (pool.py, sb3.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synther_buffer import SynthERConfig
from synther_buffer.layout import RowLayout
from synther_buffer.pool import SyntheticPool, clip_observations

pytestmark = pytest.mark.usefixtures("torch_one_thread")

spaces = pytest.importorskip("gymnasium.spaces")


def _cfg(**kw) -> SynthERConfig:
    base = dict(device="cpu", train_steps=150, num_generate=1000, synthetic_size=1000, retrain_every=200,
                min_real=100)
    base.update(kw)
    return SynthERConfig.preset("tiny").replace(**base)


def _buffer(high: float):
    from synther_buffer import GenerativeReplayBuffer

    obs_space = spaces.Box(low=-np.inf, high=high, shape=(3,), dtype=np.float32)
    act_space = spaces.Box(low=-1.0, high=1.0, shape=(1,), dtype=np.float32)
    return GenerativeReplayBuffer(1000, obs_space, act_space, device="cpu", config=_cfg(), model_terminals=False)


def _feed(buf, n: int = 200) -> None:
    """Observations whose first coordinate crowds the bound 100 from below (real ones never exceed it)."""
    r = np.random.default_rng(0)
    for _ in range(n):
        obs = np.array([[100.0 - abs(r.standard_normal()), r.standard_normal(), r.standard_normal()]], np.float32)
        nxt = np.minimum(obs + 0.1 * r.standard_normal((1, 3)).astype(np.float32), 100.0)
        act = r.uniform(-1, 1, (1, 1)).astype(np.float32)
        buf.add(obs, nxt, act, obs[:, 1:2].sum(1), np.zeros(1, np.float32), [{}])


def test_synthetic_observations_respect_a_finite_box_bound():
    bounded, free = _buffer(100.0), _buffer(np.inf)
    for buf in (bounded, free):
        _feed(buf)
        assert buf.stats()["retrain_count"] == 1
    lay = bounded.layout
    obs_cols = np.r_[0:3, 5:8]                                       # obs 3 | action | reward | next_obs 3
    unclipped = free.pool.pool.numpy()
    over = (unclipped[:, obs_cols] > 100.0).any(axis=1)
    assert over.sum() > 10, "premise: the model's own rows cross the bound"
    clipped = bounded.pool.pool.numpy()
    # same seed and data, so the same rows: the bounded pool is the free one clipped at 100
    np.testing.assert_array_equal(clipped[:, obs_cols], np.minimum(unclipped[:, obs_cols], 100.0))
    others = np.setdiff1d(np.arange(lay.dim), obs_cols)
    np.testing.assert_array_equal(clipped[:, others], unclipped[:, others])
    assert bounded.stats()["num_obs_clipped"] == int(over.sum())
    assert free.stats()["num_obs_clipped"] == 0 and free.pool.obs_low is None    # infinite: nothing to do
    batch = bounded.sample(512)
    assert batch.observations.max() <= 100.0 and batch.next_observations.max() <= 100.0


def test_obs_bounds_and_count_survive_save_and_pickle(tmp_path):
    import pickle

    buf = _buffer(100.0)
    _feed(buf)
    n = buf.stats()["num_obs_clipped"]
    assert n > 0
    back = pickle.loads(pickle.dumps(buf))
    assert back.stats()["num_obs_clipped"] == n
    np.testing.assert_array_equal(back.pool.obs_high, [100.0] * 3)
    state = buf.pool.state_dict()
    for key in ("obs_bounds", "num_obs_clipped"):       # a state saved before observation bounds existed
        del state[key]
    old = SyntheticPool(buf.pool.layout, buf.config)
    old.load_state_dict(state)
    assert old.obs_low is None and old.num_obs_clipped == 0


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 60), chunk=st.integers(1, 16), seed=st.integers(0, 10 ** 6), terminal=st.booleans())
def test_clip_observations_is_np_clip_on_the_obs_columns(n, chunk, seed, terminal):
    r = np.random.default_rng(seed)
    lay = RowLayout(3, 2, terminal)
    rows = (3 * r.standard_normal((n, lay.dim))).astype(np.float32)
    low = np.array([-1.0, -np.inf, -2.0], np.float32)
    high = np.array([1.0, np.inf, np.inf], np.float32)
    expected = rows.copy()
    obs, nxt = slice(0, 3), slice(6, 9)
    outside = np.zeros(n, bool)
    for cols in (obs, nxt):
        outside |= ((rows[:, cols] < low) | (rows[:, cols] > high)).any(axis=1)
        expected[:, cols] = np.clip(rows[:, cols], low, high)
    assert clip_observations(rows, lay, low, high, chunk=chunk) == int(outside.sum())
    np.testing.assert_array_equal(rows, expected)


def test_bad_obs_bounds_are_refused():
    pool = SyntheticPool(RowLayout(3, 2, False), _cfg())
    with pytest.raises(ValueError, match="observation bounds need low <= high"):
        pool.set_obs_bounds(1.0, -1.0)
    with pytest.raises(ValueError, match="observation bounds must be scalars or 3 values"):
        pool.set_obs_bounds([0, 0], [1, 1])
    pool.set_obs_bounds(-np.inf, np.inf)
    assert pool.obs_low is None
