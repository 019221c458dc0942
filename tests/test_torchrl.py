"""synther_buffer.torchrl: a TensorDictReplayBuffer with SynthERTransform returns mixed batches in torchrl's format.

Transitions come from torchrl's own ``GymEnv("Pendulum-v1")`` rollouts (random actions in [-2, 2]),
extended 50 at a time through a retrain (tiny preset, ``retrain_every`` 200).
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("torchrl")
pytest.importorskip("gymnasium")
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer  # noqa: E402
from torchrl.envs import GymEnv  # noqa: E402

from synther_buffer import SynthERConfig  # noqa: E402
from synther_buffer.extras import MissingExtraError  # noqa: E402
from synther_buffer.torchrl import SynthERTransform  # noqa: E402

B = 64
CFG = SynthERConfig.preset("tiny").replace(device="cpu", train_steps=200, retrain_every=200, min_real=100)


def _rollouts(env, n_chunks: int, steps: int = 50):
    for _ in range(n_chunks):   # a fresh episode per chunk (random actions)
        yield env.rollout(steps, break_when_any_done=False)


def _structure(td) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in td.items(True, True) if k != "index"}


@pytest.fixture(scope="module")
def filled():
    torch.manual_seed(0)
    env = GymEnv("Pendulum-v1")
    env.set_seed(0)
    storage = LazyTensorStorage(1_000)
    low, high = env.action_spec.space.low, env.action_spec.space.high
    synther = SynthERTransform(storage, 3, 1, config=CFG, action_bounds=(low, high))
    rb = TensorDictReplayBuffer(storage=storage, batch_size=B, transform=synther)
    chunks = _rollouts(env, 5)
    for _ in range(3):                      # 150 transitions: no retrain due yet
        rb.extend(next(chunks))
    before = rb.sample()
    stats_before = synther.stats()
    rb.extend(next(chunks))                 # 200: due; runs at the next sample, on all 200
    due_stats = synther.stats()
    after = rb.sample()
    stats_after = synther.stats()
    rb.extend(next(chunks))
    return dict(rb=rb, synther=synther, storage=storage, before=before, after=after, stats_before=stats_before,
                due_stats=due_stats, stats_after=stats_after)


def test_all_real_before_the_first_retrain(filled):
    assert filled["stats_before"]["retrain_count"] == 0 and filled["stats_before"]["env_steps"] == 150
    assert not filled["before"]["synthetic"].any()
    assert filled["due_stats"]["retrain_count"] == 0 and filled["due_stats"]["env_steps"] == 200


def test_half_synthetic_after_a_retrain_in_torchrls_keys_shapes_dtypes(filled):
    before, after, storage = filled["before"], filled["after"], filled["storage"]
    s = filled["stats_after"]
    assert s["retrain_count"] == 1 and s["last_retrain_env_step"] == 200 and s["num_synthetic"] > 0, s
    assert after["synthetic"].tolist() == [False] * (B // 2) + [True] * (B // 2)
    assert _structure(after) == _structure(before)
    assert after["next", "reward"].shape == (B, 1) and after["next", "reward"].dtype == torch.float32
    assert after["observation"].shape == (B, 3) and after["next", "observation"].shape == (B, 3)
    assert after["action"].shape == (B, 1)
    for key in (("next", "done"), ("next", "terminated"), ("next", "truncated")):
        assert after[key].dtype == torch.bool and after[key].shape == (B, 1)
    # the real half is rows of the storage, the synthetic half is not
    stored = storage.get(torch.arange(len(storage)))["observation"]
    in_storage = (after["observation"][:, None, :] == stored[None]).all(-1).any(1)
    assert in_storage[: B // 2].all() and not in_storage[B // 2:].any()
    syn = after[B // 2:]
    assert torch.isfinite(syn["observation"]).all() and torch.isfinite(syn["next", "reward"]).all()
    # Pendulum never terminates: the terminal is not modelled, synthetic rows never end an episode
    assert not syn["next", "done"].any() and not syn["next", "truncated"].any()
    # env-scale actions (the bounds passed are Pendulum's [-2, 2]): synthetic ones are not clamped to [-1, 1]
    assert syn["action"].abs().max() <= 2.0 and syn["action"].abs().max() > 1.0
    # the synthetic rows look like Pendulum data: cos/sin of the angle lie near the unit circle on average
    radius = syn["observation"][:, :2].norm(dim=1)
    assert (radius - 1).abs().mean() < 0.5, radius


def test_every_later_batch_is_half_synthetic(filled):
    rb = filled["rb"]
    for _ in range(5):
        assert rb.sample()["synthetic"].sum() == B // 2
    assert filled["synther"].stats()["env_steps"] == 250 and filled["synther"].stats()["num_real"] == 250


def test_real_rows_read_in_chunks_equal_one_read(filled, monkeypatch):
    import synther_buffer.torchrl as synther_torchrl

    synther, storage = filled["synther"], filled["storage"]
    whole = synther.real_rows()
    monkeypatch.setattr(synther_torchrl, "READ_CHUNK", 7)         # 250 rows: 36 chunks, the last of 5
    np.testing.assert_array_equal(synther.real_rows(), whole)
    obs = storage.get(torch.arange(len(storage)))["observation"].numpy()
    np.testing.assert_array_equal(whole[:, :3], obs)              # storage order, every row once


def test_extend_names_a_missing_or_misshaped_entry():
    env = GymEnv("Pendulum-v1")
    storage = LazyTensorStorage(100)
    rb = TensorDictReplayBuffer(storage=storage, batch_size=8, transform=SynthERTransform(storage, 3, 1, config=CFG))
    td = env.rollout(10)
    with pytest.raises(ValueError, match="reward"):
        rb.extend(td.exclude(("next", "reward")))
    with pytest.raises(ValueError, match="'action' has shape"):
        rb.extend(td.set("action", torch.zeros(10, 2)))
    assert len(storage) == 0


def test_a_2d_storage_is_refused():
    with pytest.raises(ValueError, match="1-D storage"):
        SynthERTransform(LazyTensorStorage(100, ndim=2), 3, 1, config=CFG)


def test_missing_torchrl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchrl", None)
    monkeypatch.delitem(sys.modules, "synther_buffer.torchrl", raising=False)
    with pytest.raises(MissingExtraError) as e:
        importlib.import_module("synther_buffer.torchrl")
    assert e.value.extra == "torchrl" and 'pip install "synther-buffer[torchrl]"' in str(e.value)


def test_a_torchrl_sac_loop_trains_on_the_mixed_batches():
    """torchrl's own loop: a Collector feeds rb.extend, SACLoss trains on rb.sample() through a retrain."""
    from tensordict.nn import NormalParamExtractor, TensorDictModule
    from torchrl.collectors import Collector
    from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
    from torchrl.objectives import SACLoss, SoftUpdate

    torch.manual_seed(0)
    env = GymEnv("Pendulum-v1")
    env.set_seed(0)
    low, high = env.action_spec.space.low, env.action_spec.space.high
    net = torch.nn.Sequential(MLP(in_features=3, out_features=2, num_cells=[32, 32]), NormalParamExtractor())
    actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"], spec=env.action_spec, distribution_class=TanhNormal,
        distribution_kwargs={"low": low, "high": high}, return_log_prob=True)
    qvalue = ValueOperator(MLP(in_features=4, out_features=1, num_cells=[32, 32]), in_keys=["observation", "action"])
    loss = SACLoss(actor, qvalue, num_qvalue_nets=2)
    loss.make_value_estimator(gamma=0.99)
    target = SoftUpdate(loss, tau=0.005)
    opt = torch.optim.Adam(loss.parameters(), lr=3e-4)

    storage = LazyTensorStorage(1_000)
    synther = SynthERTransform(storage, 3, 1, config=CFG, action_bounds=(low, high))
    rb = TensorDictReplayBuffer(storage=storage, batch_size=B, transform=synther)
    collector = Collector(env, actor, frames_per_batch=50, total_frames=300, init_random_frames=100,
                          auto_register_policy_transforms=False)
    shares, losses = [], []
    for data in collector:
        rb.extend(data.reshape(-1))
        if len(storage) < 100:
            continue
        for _ in range(2):
            batch = rb.sample()
            shares.append(float(batch["synthetic"].float().mean()))
            out = loss(batch)
            total = out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]
            opt.zero_grad()
            total.backward()
            opt.step()
            target.step()
            losses.append(float(total.detach()))
    collector.shutdown()
    assert synther.stats()["retrain_count"] == 1 and synther.stats()["env_steps"] == 300
    # updates at 100, 150 stored: all real; at 200, 250, 300 (the retrain runs at the first of them): half synthetic
    assert shares == [0.0] * 4 + [0.5] * 6, shares
    assert all(np.isfinite(losses)), losses


def test_rb_dumps_and_loads_keep_the_synther_state(filled, tmp_path):
    rb, synther = filled["rb"], filled["synther"]
    rb.dumps(tmp_path / "rb")
    storage = LazyTensorStorage(1_000)
    fresh = SynthERTransform(storage, 3, 1, config=CFG)
    rb2 = TensorDictReplayBuffer(storage=storage, batch_size=B, transform=fresh)
    rb2.loads(tmp_path / "rb")
    saved, loaded = synther.stats(), fresh.stats()
    for key in ("env_steps", "retrain_count", "num_synthetic", "last_retrain_env_step", "next_retrain", "num_real"):
        assert loaded[key] == saved[key], (key, loaded, saved)
    assert torch.equal(fresh.core.pool.pool, synther.core.pool.pool)
    batch = rb2.sample()
    assert batch["synthetic"].sum() == B // 2
    # synthetic rows come from the restored pool
    pool_obs = synther.core.pool.pool[:, :3]
    syn_obs = batch["observation"][B // 2:]
    assert (syn_obs[:, None, :] == pool_obs[None]).all(-1).any(1).all()
    with pytest.raises(ValueError, match="obs_dim=3"):
        SynthERTransform(LazyTensorStorage(10), 4, 1, config=CFG).load_state_dict(synther.state_dict())


@pytest.mark.parametrize("kind", ["list", "memmap"])
def test_other_storages(kind, tmp_path):
    from torchrl.data import LazyMemmapStorage, ListStorage

    storage = ListStorage(1_000) if kind == "list" else LazyMemmapStorage(1_000, scratch_dir=tmp_path)
    synther = SynthERTransform(storage, 3, 1, config=CFG.replace(train_steps=50))
    rb = TensorDictReplayBuffer(storage=storage, batch_size=16, transform=synther)
    env = GymEnv("Pendulum-v1")
    for td in _rollouts(env, 4):
        rb.extend(td)
    batch = rb.sample()
    assert synther.stats()["retrain_count"] == 1 and synther.real_rows().shape == (200, 3 + 1 + 1 + 3 + 1)
    assert batch["synthetic"].tolist() == [False] * 8 + [True] * 8 and batch["observation"].shape == (16, 3)
