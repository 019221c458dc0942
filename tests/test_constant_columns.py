"""Columns that cannot vary, don't: a column constant in the real data comes back exactly constant in every
synthetic row (normalizer.py records it, TransitionDiffusion.sample writes it), in the online buffers and
in ``upsample``; saved models keep it, and files saved before it still load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synther_buffer import GenerativeReplay, SynthERConfig, TransitionDiffusion, offline
from synther_buffer.normalizer import Normalizer

from helpers import transitions  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _tiny(**kw) -> SynthERConfig:
    return SynthERConfig.preset("tiny").replace(device="cpu", **kw)


# ============================================================================ the normaliser's record
def test_constant_columns_found_relative_to_their_scale(rng):
    n = 400
    one_ulp = np.nextafter(np.float32(1.0), np.float32(2.0))
    x = np.stack([
        rng.standard_normal(n),                                     # 0 varies
        np.full(n, 1.0),                                            # 1 constant 1.0
        np.full(n, 1e-3),                                           # 2 constant 1e-3
        np.zeros(n),                                                # 3 all zero
        np.where(np.arange(n) % 2, one_ulp, np.float32(1.0)),      # 4 float32 rounding noise around 1
        1e-8 * rng.standard_normal(n),                              # 5 tiny but varying: not constant
        np.where(np.arange(n) == 7, 1.0, 0.0),                      # 6 one nonzero row: not constant
        np.full(n, -2.5e6),                                         # 7 constant, large
    ], axis=1).astype(np.float32)
    norm = Normalizer(8).fit(x)
    assert norm.constant.tolist() == [False, True, True, True, True, False, False, True]
    assert norm.constant_value[[1, 2, 3, 7]].tolist() == [np.float32(1.0), np.float32(1e-3), 0.0, np.float32(-2.5e6)]
    assert np.float32(1.0) <= norm.constant_value[4] <= one_ulp


@pytest.mark.parametrize("as_torch", [False, True])
def test_unnormalize_writes_constants_exactly_in_every_kind_of_column(rng, as_torch):
    """Normalised, skip (raw) and terminal columns alike; model output of any size there is overwritten."""
    n = 300
    x = np.stack([rng.standard_normal(n), np.full(n, 0.7), np.full(n, 1e-3), np.ones(n)], axis=1).astype(np.float32)
    norm = Normalizer(4, terminal_dims=[3], skip_dims=[2]).fit(x)
    noisy = (3.0 * rng.standard_normal((50, 4))).astype(np.float32)      # a poor model's output
    y = norm.unnormalize(torch.from_numpy(noisy) if as_torch else noisy)
    y = y.numpy() if as_torch else y
    assert (y[:, 1] == np.float32(0.7)).all() and (y[:, 2] == np.float32(1e-3)).all() and (y[:, 3] == 1.0).all()
    assert np.unique(y[:, 0]).size == 50                                 # the varying column is untouched


def test_constants_survive_state_dict_and_old_states_load(rng):
    x = np.stack([rng.standard_normal(100), np.full(100, 4.0)], axis=1).astype(np.float32)
    norm = Normalizer(2).fit(x)
    back = Normalizer.from_state_dict(norm.state_dict())
    assert back.constant.tolist() == [False, True] and back.constant_value[1] == 4.0
    old = {k: v for k, v in norm.state_dict().items() if k not in ("constant", "constant_value")}
    legacy = Normalizer.from_state_dict(old)                              # saved before constants existed
    assert not legacy.constant.any()
    with pytest.raises(ValueError, match="constants"):
        Normalizer.from_state_dict({**norm.state_dict(), "constant_value": torch.tensor([0.0, float("nan")])})


# ============================================================================ the model
@pytest.fixture(scope="module")
def reward_rows():
    """[N, 7] rows of obs 3 | action 2 | reward | next_obs... cut to (obs, action, reward, 1 more) for speed."""
    obs, act, rew, nxt, _ = transitions(600, seed=3)
    return np.concatenate([obs, act, rew[:, None], nxt[:, :1]], axis=1).astype(np.float32)


@pytest.mark.parametrize("value", [1.0, 1e-3])
@pytest.mark.parametrize("skip", [False, True])
def test_tiny_preset_constant_reward_comes_back_exact(reward_rows, value, skip):
    """The issue's case: a reward equal in every real row (1.0, or 1e-3) is that value in every synthetic row,
    whether the reward column is normalised or left raw."""
    x = reward_rows.copy()
    x[:, 5] = value
    model = TransitionDiffusion(7, _tiny(train_steps=300), skip_dims=(5,) if skip else ())
    model.fit(x)
    y = model.sample(2000, seed=0)
    assert (y[:, 5] == np.float32(value)).all(), (y[:, 5].min(), y[:, 5].max())
    assert y[:, 0].std() > 0.3                                           # the other columns still vary


def test_saved_model_keeps_its_constants_and_old_files_load(reward_rows, tmp_path):
    x = reward_rows.copy()
    x[:, 5] = 1.0
    model = TransitionDiffusion(7, _tiny(train_steps=100))
    model.fit(x)
    model.save(tmp_path / "m.pt")
    loaded = TransitionDiffusion.load(tmp_path / "m.pt")
    y = loaded.sample(500, seed=1)
    np.testing.assert_array_equal(y, model.sample(500, seed=1))
    assert (y[:, 5] == 1.0).all()
    # a file written before constants were recorded: loads, and samples as such a model always did
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    for k in ("constant", "constant_value"):
        del state["normalizer"][k]
    torch.save(state, tmp_path / "old.pt")
    old = TransitionDiffusion.load(tmp_path / "old.pt")
    z = old.sample(500, seed=1)
    assert not old.normalizer.constant.any()
    assert not (z[:, 5] == 1.0).all() and np.abs(z[:, 5] - 1.0).max() < 1.0   # near 1, by the model's error
    np.testing.assert_array_equal(np.delete(z, 5, axis=1), np.delete(y, 5, axis=1))


# ============================================================================ the online buffer
def _add(buf, obs, act, rew, nxt, term):
    for i in range(len(obs)):
        buf.add(obs[i], act[i], rew[i], nxt[i], term[i])


def test_sparse_reward_stream_first_success_between_retrains():
    """All-zero rewards: the first pool's rewards are exactly 0. Successes arrive before the next retrain:
    the next pool has both rewards near 0 and rewards near 1 (the constant is re-decided at every fit)."""
    cfg = _tiny(retrain_every=200, min_real=100, num_generate=1000, synthetic_size=1000)
    buf = GenerativeReplay(3, 2, capacity=1000, config=cfg, model_terminals=False)
    obs, act, _, nxt, term = transitions(400, seed=11)
    rew = np.zeros(400, np.float32)
    _add(buf, obs[:200], act[:200], rew[:200], nxt[:200], term[:200])
    assert buf.stats()["retrain_count"] == 1
    first = buf.pool.pool[:, buf.layout.reward_col].numpy()
    assert len(first) > 900 and (first == 0.0).all()
    rew[200:] = (obs[200:, 0] > 0.5).astype(np.float32)                  # successes in ~30% of the new rows
    assert 40 < rew[200:].sum() < 100
    _add(buf, obs[200:], act[200:], rew[200:], nxt[200:], term[200:])
    assert buf.stats()["retrain_count"] == 2
    second = buf.pool.pool[:, buf.layout.reward_col].numpy()
    assert (np.abs(second) < 0.25).sum() > 0.3 * len(second)            # failures ...
    assert (np.abs(second - 1.0) < 0.25).sum() > 0.03 * len(second)     # ... and successes
    # and the batches the agent gets carry both
    batch = buf.sample(1000)
    syn = batch.reward[500:].numpy()
    assert (syn < 0.25).any() and (syn > 0.75).any()


def test_constant_observation_and_reward_exact_in_the_pool():
    cfg = _tiny(retrain_every=200, min_real=100, train_steps=200, num_generate=500, synthetic_size=500)
    buf = GenerativeReplay(3, 2, capacity=1000, config=cfg, model_terminals=True)
    obs, act, rew, nxt, term = transitions(200, seed=5)
    obs[:, 1] = nxt[:, 1] = -0.125       # a sensor that never changes
    rew[:] = 1.0
    term[::20] = 1.0
    _add(buf, obs, act, rew, nxt, term)
    o, a, r, n, t = buf.layout.split(buf.pool.pool.numpy())
    assert (o[:, 1] == np.float32(-0.125)).all() and (n[:, 1] == np.float32(-0.125)).all() and (r == 1.0).all()
    assert buf.stats()["num_synthetic"] == 500                            # nothing filtered for it


# ============================================================================ upsample
def test_upsample_writes_constant_columns_exactly(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    obs = rng.standard_normal((n, 3)).astype(np.float32)
    obs[:, 2] = 3.0
    data = {"observations": obs, "actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
            "rewards": np.full(n, 1e-3, np.float32),
            "next_observations": (obs + 0.1 * rng.standard_normal((n, 3))).astype(np.float32),
            "terminals": np.zeros(n, np.float32)}
    data["next_observations"][:, 2] = 3.0
    out = tmp_path / "up.npz"
    offline.upsample(data, out, num_samples=1000, config=_tiny(train_steps=200, sample_steps=8), progress=False,
                     write_json=False)
    with np.load(out) as f:
        assert f["observations"].shape == (1000, 3)
        assert (f["observations"][:, 2] == 3.0).all() and (f["next_observations"][:, 2] == 3.0).all()
        assert (f["rewards"] == np.float32(1e-3)).all() and (f["terminals"] == 0).all()
        assert f["observations"][:, 0].std() > 0.3
