"""What a user of GenerativeReplay meets first: where batches go (``device``, apart from the model's),
SB3's names and shapes (``ReplaySamples.as_sb3()``), ``add``'s argument order (keywords; SB3's order
named in the error), and the warning when real actions lie outside the clip bounds. CPU; the
"meta" device stands in for an accelerator (no data, but a device of its own)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from synther_buffer import GenerativeReplay, SynthERConfig
from synther_buffer.mixing import ReplaySamples, SB3Samples

from helpers import small, transitions  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OBS, ACT = 3, 2
NO_RETRAIN = SynthERConfig.preset("tiny").replace(device="cpu", retrain_every=10**9)
META = torch.device("meta")


def inject_pool(buf, n: int = 40) -> None:
    buf.pool.pool = 1000.0 + torch.arange(n * buf.layout.dim, dtype=torch.float32).reshape(n, buf.layout.dim)


# ============================================================================ device
def test_batches_go_to_the_cpu_unless_told_whatever_the_model_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # config.device "auto" would pick CUDA
    buf = GenerativeReplay(OBS, ACT, capacity=50, config=NO_RETRAIN.replace(device="auto"))
    assert buf.pool.device == torch.device("cuda") and buf.device == torch.device("cpu")


def test_batches_go_to_their_device_apart_from_the_pool():
    buf = GenerativeReplay(OBS, ACT, capacity=50, config=NO_RETRAIN.replace(real_ratio=0.5), device="meta")
    buf.add(*transitions(20))
    inject_pool(buf)                                    # the synthetic pool is on the CPU (config.device)
    b = buf.sample(8)
    assert buf.device == META and buf.pool.device == torch.device("cpu")
    assert all(t.device == META for t in b), [t.device for t in b]
    buf.device = "cpu"                                  # settable
    assert all(t.device.type == "cpu" for t in buf.sample(8))
    with pytest.raises(ValueError, match="device"):
        buf.device = "no-such-device"


def test_save_load_keeps_the_batch_device_and_old_checkpoints_use_the_model_device(tmp_path):
    buf = GenerativeReplay(OBS, ACT, capacity=50, config=NO_RETRAIN, device="meta")
    buf.add(*transitions(10))
    buf.save(tmp_path / "ckpt")
    assert GenerativeReplay.load(tmp_path / "ckpt").device == META
    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)
    del state["batch_device"], state["kind"]            # as written before batches had their own device
    torch.save(state, tmp_path / "ckpt" / "state.pt")
    assert GenerativeReplay.load(tmp_path / "ckpt").device == torch.device("cpu")   # the model's, as then


# ============================================================================ as_sb3
def test_as_sb3_has_sb3_names_order_and_column_shapes():
    sb3 = pytest.importorskip("stable_baselines3.common.type_aliases")
    assert SB3Samples._fields == sb3.ReplayBufferSamples._fields
    buf = GenerativeReplay(OBS, ACT, capacity=50, config=NO_RETRAIN.replace(real_ratio=0.5))
    obs, act, rew, nxt, term = transitions(30, term_p=0.5)
    buf.add(obs, act, rew, nxt, term)
    inject_pool(buf)
    b = buf.sample(16)
    s = b.as_sb3()
    assert s.observations.shape == (16, OBS) and s.next_observations.shape == (16, OBS)
    assert s.actions.shape == (16, ACT) and s.rewards.shape == (16, 1) and s.dones.shape == (16, 1)
    assert s.discounts is None
    assert torch.equal(s.observations, b.obs) and torch.equal(s.next_observations, b.next_obs)
    assert torch.equal(s.rewards[:, 0], b.reward) and torch.equal(s.dones[:, 0], b.terminated)
    # the TD target of an SB3-style loop keeps one value per row (a [B] reward would broadcast to [B, B])
    q = torch.randn(16, 1)
    target = s.rewards + (1 - s.dones) * 0.99 * q
    assert target.shape == (16, 1)
    torch.testing.assert_close(target[:, 0], b.reward + (1 - b.terminated) * 0.99 * q[:, 0])
    assert (b.reward[:, None] + (1 - b.terminated) * q).shape == (16, 16)   # what as_sb3 prevents


def test_as_sb3_of_a_hand_made_batch():
    r = ReplaySamples(torch.zeros(4, 3), torch.zeros(4, 1), torch.arange(4.), torch.ones(4, 3), torch.tensor([0., 1, 0, 1]))
    s = r.as_sb3()
    assert isinstance(s, SB3Samples) and s.rewards.tolist() == [[0.], [1.], [2.], [3.]]
    assert s.dones.tolist() == [[0.], [1.], [0.], [1.]]


# ============================================================================ add(): order
def test_add_takes_keywords_in_any_order():
    buf = GenerativeReplay(OBS, ACT, capacity=50, config=NO_RETRAIN)
    obs, act, rew, nxt, term = transitions(5, term_p=0.5)
    buf.add(obs=obs, next_obs=nxt, action=act, reward=rew, terminated=term)   # SB3's keyword order
    ref = GenerativeReplay(OBS, ACT, capacity=50, config=NO_RETRAIN)
    ref.add(obs, act, rew, nxt, term)
    np.testing.assert_array_equal(buf.real_rows(), ref.real_rows())
    np.testing.assert_array_equal(buf.real_rows()[:, OBS + ACT + 1:2 * OBS + ACT + 1], nxt)


def _sb3_order_undetectable(obs_dim, act_dim, b, reward_col) -> bool:
    """The one case the shapes cannot tell apart: batched, obs_dim == action_dim == 1, rewards [B, 1]."""
    return b is not None and obs_dim == act_dim == 1 and reward_col


@settings(max_examples=80, deadline=None)
@given(obs_dim=st.integers(1, 4), act_dim=st.integers(1, 4), b=st.one_of(st.none(), st.integers(1, 4)),
       reward_col=st.booleans(), tensors=st.booleans())
def test_sb3_positional_order_is_named(obs_dim, act_dim, b, reward_col, tensors):
    assume(not _sb3_order_undetectable(obs_dim, act_dim, b, reward_col))
    reward_col = reward_col and b is not None      # one transition: a scalar reward
    n = b or 1
    r = np.random.default_rng(0)
    obs, nxt = r.standard_normal((2, n, obs_dim)).astype(np.float32)
    act = r.uniform(-1, 1, (n, act_dim)).astype(np.float32)
    rew, done = r.standard_normal((n, 1) if reward_col else n).astype(np.float32), np.zeros(n, np.float32)
    fields = [obs, nxt, act, rew, done]                       # SB3's add(obs, next_obs, action, reward, done)
    if b is None:
        fields = [f[0] for f in fields]
    if tensors:
        fields = [torch.from_numpy(np.asarray(f)) for f in fields]
    buf = GenerativeReplay(obs_dim, act_dim, capacity=20, config=NO_RETRAIN)
    with pytest.raises(ValueError, match="stable-baselines3's order") as ei:
        buf.add(*fields)
    assert "keywords" in str(ei.value)
    assert len(buf) == 0 and buf.env_steps == 0


def test_sb3_order_undetectable_case_is_the_documented_one():
    """obs_dim == action_dim == 1 with [B, 1] rewards: both orders have the same shapes (documented in add)."""
    buf = GenerativeReplay(1, 1, capacity=20, config=NO_RETRAIN)
    o, a, r = np.zeros((4, 1), np.float32), np.ones((4, 1), np.float32), np.full((4, 1), 2.0, np.float32)
    buf.add(o, o, a, r, np.zeros(4, np.float32))              # SB3's order, accepted: nothing to tell them apart
    assert len(buf) == 4


def test_wrong_shape_without_sb3_pattern_has_no_hint():
    buf = GenerativeReplay(OBS, ACT, capacity=20, config=NO_RETRAIN)
    obs, act, rew, nxt, term = transitions(4)
    with pytest.raises(ValueError) as ei:
        buf.add(obs, act, rew, nxt[:, :2], term)
    assert str(ei.value).startswith("next_obs has shape (4, 2), expected (4, 3)")
    assert "stable-baselines3" not in str(ei.value)


# ============================================================================ action bounds
def _feed_actions(buf, scale: float, n: int = 120) -> None:
    obs, act, rew, nxt, term = transitions(n)
    buf.add(obs, act * scale, rew, nxt, term)


@pytest.mark.parametrize("scale,bounds,warns", [
    (2.0, (-1.0, 1.0), True),        # env-scale actions (Pendulum: [-2, 2]) against SB3's [-1, 1]
    (1.0, (-1.0, 1.0), False),       # rescaled actions: inside
    (2.0, (-2.0, 2.0), False),       # the env's own bounds
    (2.0, None, False),              # no clipping, nothing to warn about
    (1.0, ([-1.0, -0.5], [1.0, 0.5]), True),   # per-dimension bounds: the second is too narrow
])
def test_retrain_warns_when_real_actions_lie_outside_the_clip_bounds(scale, bounds, warns, tiny_cfg, fake_diffusion):
    buf = GenerativeReplay(OBS, ACT, capacity=500, config=small(tiny_cfg), action_bounds=bounds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _feed_actions(buf, scale)
        _feed_actions(buf, scale, n=100)                 # a second retrain warns again
    msgs = [str(w.message) for w in caught if "outside the bounds" in str(w.message)]
    assert buf.stats()["retrain_count"] == 2
    assert len(msgs) == (2 if warns else 0), msgs
    if warns:
        assert "env step 120" in msgs[0] and "env step 220" in msgs[1]
        assert "action_bounds=(env.action_space.low, env.action_space.high)" in msgs[0]
    if bounds is not None:                               # synthetic actions stay inside the bounds
        low, high = (np.broadcast_to(np.asarray(x, np.float32), (ACT,)) for x in bounds)
        pool_actions = buf.pool.pool[:, OBS:OBS + ACT].numpy()
        assert (pool_actions >= low).all() and (pool_actions <= high).all()


def test_pickle_keeps_the_batch_device_and_old_pickles_use_the_model_device():
    import pickle

    buf = GenerativeReplay(OBS, ACT, capacity=50, config=NO_RETRAIN, device="meta")
    assert pickle.loads(pickle.dumps(buf)).device == META
    del buf._device                                      # what a pickle made before batches had a device holds
    old = pickle.loads(pickle.dumps(buf))
    assert old.device == old.pool.device == torch.device("cpu")
