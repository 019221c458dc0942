"""WrappedReplay around a loop's own buffer: the fields of ``sample_real`` / ``real_data`` checked
and named, the all-zero-tail warning, batches on the data's device without a host round trip,
save/load of the SynthER half, and the docstring's SB3 ``ReplayBuffer`` (CleanRL) example. CPU, tiny."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from synther_buffer import GenerativeReplay, SynthERConfig, WrappedReplay

from helpers import small, transitions  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OBS, ACT = 3, 2
FIELDS = ("obs", "action", "reward", "next_obs", "terminated")
TRAILING = {"obs": (OBS,), "action": (ACT,), "reward": (), "next_obs": (OBS,), "terminated": ()}
NO_RETRAIN = SynthERConfig.preset("tiny").replace(device="cpu", retrain_every=10**9)
META = torch.device("meta")


class ArrayBuffer:
    """A loop's own preallocated buffer (numpy, or torch tensors when ``torch_fields``)."""

    def __init__(self, capacity: int, seed: int = 0, torch_fields: bool = False):
        self.arrays = [np.zeros((capacity,) + TRAILING[f], np.float32) for f in FIELDS]
        self.size, self.rng, self.torch_fields = 0, np.random.default_rng(seed), torch_fields

    def store(self, fields) -> None:
        n = len(fields[0])
        for a, f in zip(self.arrays, fields):
            a[self.size:self.size + n] = f
        self.size += n

    def _out(self, arrays):
        return tuple(torch.from_numpy(a) for a in arrays) if self.torch_fields else tuple(arrays)

    def sample(self, n: int):
        idx = self.rng.integers(0, self.size, n)
        return self._out(a[idx] for a in self.arrays)

    def all(self):
        return self._out(a[:self.size] for a in self.arrays)

    def all_with_tail(self):
        """The forgotten [:size]: the whole preallocated arrays."""
        return self._out(self.arrays)


def filled(n: int = 60, **kw) -> ArrayBuffer:
    mine = ArrayBuffer(1000, **kw)
    mine.store(transitions(n, term_p=0.2))
    return mine


def inject_pool(buf, n: int = 40) -> None:
    buf.pool.pool = 1000.0 + torch.arange(n * buf.layout.dim, dtype=torch.float32).reshape(n, buf.layout.dim)


# ============================================================================ checks on sample_real / real_data
@settings(max_examples=80, deadline=None)
@given(field=st.sampled_from(FIELDS), shape=st.lists(st.integers(0, 5), max_size=3).map(tuple),
       as_tensor=st.booleans())
def test_wrong_sample_real_shape_names_the_field(field, shape, as_tensor):
    k = FIELDS.index(field)
    n = 4
    allowed = {(n,) + TRAILING[field]} | ({(n, 1)} if not TRAILING[field] else set())
    assume(shape not in allowed)
    mine = filled()

    def sample_real(m):
        out = list(mine.sample(m))
        out[k] = np.zeros(shape, np.float32)
        return tuple(torch.from_numpy(np.asarray(f)) for f in out) if as_tensor else tuple(out)

    synth = WrappedReplay(sample_real, mine.all, OBS, ACT, config=NO_RETRAIN)
    with pytest.raises(ValueError) as ei:
        synth.sample(n)
    msg = str(ei.value)
    assert msg.startswith(f"{field} has shape {shape}"), msg
    assert "sample_real(4)" in msg and str((n,) + TRAILING[field]) in msg


@pytest.mark.parametrize("fields", [lambda f: f[:4], lambda f: f + (f[0],), lambda f: ()])
def test_sample_real_must_return_five_fields(fields):
    mine = filled()
    synth = WrappedReplay(lambda m: fields(mine.sample(m)), mine.all, OBS, ACT, config=NO_RETRAIN)
    with pytest.raises(ValueError, match="expected 5 fields"):
        synth.sample(8)


def test_sample_real_non_numeric_field_is_named():
    mine = filled()
    synth = WrappedReplay(lambda m: mine.sample(m)[:2] + (np.full(m, "x"),) + mine.sample(m)[3:], mine.all, OBS, ACT,
                          config=NO_RETRAIN)
    with pytest.raises(ValueError, match="^reward must be numeric"):
        synth.sample(8)


def _real_data_with(change):
    mine = filled()

    def real_data():
        fields = [np.array(f) for f in mine.all()]
        change(fields)
        return tuple(fields)
    return WrappedReplay(mine.sample, real_data, OBS, ACT, config=NO_RETRAIN)


@pytest.mark.parametrize("change,match", [
    (lambda f: f[0].__setitem__((5, 1), np.nan), "NaN/inf.*row 5"),
    (lambda f: f[2].__setitem__(7, np.inf), "NaN/inf.*row 7"),
    (lambda f: f[4].__setitem__(3, 0.5), r"0/1.*dones \* \(1 - timeouts\)"),
    (lambda f: f.__setitem__(1, f[1][:, :1]), r"^action has shape \(60, 1\), expected \(60, 2\).*real_data\(\)"),
])
def test_real_data_is_checked_at_retrain(change, match):
    synth = _real_data_with(change)
    with pytest.raises(ValueError, match=match):
        synth.retrain()
    assert synth.stats()["retrain_count"] == 0


def test_warns_when_most_real_rows_are_all_zeros(tiny_cfg, fake_diffusion):
    mine = filled(150)                                   # 150 stored, 850 zero rows preallocated
    cfg = small(tiny_cfg)
    forgot = WrappedReplay(mine.sample, mine.all_with_tail, OBS, ACT, config=cfg)
    with pytest.warns(UserWarning, match=r"850 of the 1000 transitions real_data\(\) returned are all zeros"):
        assert forgot.step(100)
    fine = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fine.step(100)


class CountingBuffer(ArrayBuffer):
    """An ArrayBuffer that counts ``real_data()`` calls (each copies the whole buffer)."""

    calls = 0

    def all(self):
        self.calls += 1
        return super().all()


def test_a_buffer_smaller_than_min_real_warns_once_and_is_not_copied_every_step(tiny_cfg, fake_diffusion):
    cfg = tiny_cfg.replace(retrain_every=10, min_real=100)
    mine = CountingBuffer(1000)
    mine.store(transitions(50))                         # a buffer that holds 50 and stays at 50
    synth = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=cfg)
    with pytest.warns(UserWarning, match=r"still returns 50 transitions, fewer than min_real=100.*capacity=50") as w:
        ran = [synth.step() for _ in range(300)]
    assert not any(ran) and synth.stats()["retrain_count"] == 0
    assert len([x for x in w if "min_real" in str(x.message)]) == 1
    assert mine.calls <= 300 // 10 + 1                  # at most once per retrain_every, not once per step
    told = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=cfg, capacity=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert any(told.step() for _ in range(10))      # capacity clamps min_real: the full buffer retrains


def test_a_growing_buffer_retrains_as_soon_as_it_holds_min_real(tiny_cfg, fake_diffusion):
    cfg = tiny_cfg.replace(retrain_every=10, min_real=100)
    mine = CountingBuffer(1000)
    synth = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=cfg)
    data = transitions(200)
    for t in range(1, 201):
        mine.store(tuple(f[t - 1:t] for f in data))
        if synth.step():
            break
    assert t == 100 and mine.size == 100                # the first due step with 100 rows, as before
    assert mine.calls == 2                              # at step 10 (10 rows: wait 90 steps) and step 100


def test_capacity_is_saved_and_restored(tiny_cfg, tmp_path):
    mine = filled()
    synth = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=tiny_cfg.replace(min_real=100), capacity=40)
    assert synth.core.min_real == 40
    synth.save(tmp_path / "w")
    back = WrappedReplay.load(tmp_path / "w", mine.sample, mine.all)
    assert back.capacity == 40 and back.core.min_real == 40
    with pytest.raises(ValueError, match="capacity must be at least 2"):
        WrappedReplay(mine.sample, mine.all, OBS, ACT, config=tiny_cfg, capacity=1)


# ============================================================================ device
def test_tensor_fields_make_no_host_round_trip(monkeypatch):
    mine = filled(torch_fields=True)
    synth = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=NO_RETRAIN.replace(real_ratio=0.5))
    inject_pool(synth)

    def no_host(*a, **k):
        raise AssertionError("a tensor went through numpy")

    monkeypatch.setattr(torch.Tensor, "numpy", no_host)
    monkeypatch.setattr(torch.Tensor, "__array__", no_host)
    b = synth.sample(16)
    assert all(t.device.type == "cpu" for t in b) and b.obs.shape == (16, OBS)
    assert (b.obs[8:] >= 1000).all() and not (b.obs[:8] >= 1000).any()


def test_device_none_follows_the_data_and_device_moves_it():
    mine = filled(torch_fields=True)

    def on_meta(m):
        return tuple(f.to(META) for f in mine.sample(m))

    follow = WrappedReplay(on_meta, mine.all, OBS, ACT, config=NO_RETRAIN.replace(real_ratio=0.5))
    inject_pool(follow)                                  # the pool lives on the CPU (config.device)
    assert follow.device is None
    assert all(t.device == META for t in follow.sample(8))

    told = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=NO_RETRAIN.replace(real_ratio=0.5), device="meta")
    inject_pool(told)
    assert all(t.device == META for t in told.sample(8))
    numpy_buf = filled()
    plain = WrappedReplay(numpy_buf.sample, numpy_buf.all, OBS, ACT, config=NO_RETRAIN)
    assert all(t.device.type == "cpu" for t in plain.sample(8))


# ============================================================================ save / load
def test_save_load_keeps_pool_model_schedule_and_continues(tiny_cfg, tmp_path):
    obs, act, rew, nxt, term = transitions(260, seed=4, term_p=0.1)
    bufs, synths = [], []
    for _ in range(2):
        mine = ArrayBuffer(1000, seed=1)
        synth = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=small(tiny_cfg), model_terminals="auto",
                              action_bounds=(-1.5, 1.5), device="cpu")
        bufs.append(mine)
        synths.append(synth)
    first, mine = synths[0], bufs[0]
    for t in range(150):
        mine.store([f[t:t + 1] for f in (obs, act, rew, nxt, term)])
        first.step()
    assert first.stats()["retrain_count"] == 1 and first.layout.terminal is True
    first.save(tmp_path / "synth")

    # the user restores their own buffer (here: the same data in a fresh one), then the SynthER half
    mine2 = bufs[1]
    mine2.store([f[:150] for f in (obs, act, rew, nxt, term)])
    back = WrappedReplay.load(tmp_path / "synth", mine2.sample, mine2.all)
    assert back.stats() == first.stats() and back.config == first.config and back.layout == first.layout
    assert back.model_terminals == "auto" and back.device == torch.device("cpu")
    assert torch.equal(back.pool.pool, first.pool.pool)
    np.testing.assert_array_equal(back.model.sample(16, seed=3), first.model.sample(16, seed=3))
    assert (back.pool.action_low == -1.5).all() and (back.pool.action_high == 1.5).all()
    for a, b in zip(first.sample(32), back.sample(32)):            # same user rng, same pool rng
        assert torch.equal(a, b)
    for synth, buf in ((first, mine), (back, mine2)):              # the schedule continues: both at 200
        steps = []
        for t in range(150, 260):
            buf.store([f[t:t + 1] for f in (obs, act, rew, nxt, term)])
            if synth.step():
                steps.append(t + 1)
        assert steps == [200]
    assert torch.equal(back.pool.pool, first.pool.pool)


def test_checkpoints_of_the_other_buffer_are_refused(tmp_path):
    mine = filled()
    WrappedReplay(mine.sample, mine.all, OBS, ACT, config=NO_RETRAIN).save(tmp_path / "w")
    gen = GenerativeReplay(OBS, ACT, capacity=10, config=NO_RETRAIN)
    gen.save(tmp_path / "g")
    with pytest.raises(ValueError, match="WrappedReplay checkpoint, not a GenerativeReplay one"):
        GenerativeReplay.load(tmp_path / "w")
    with pytest.raises(ValueError, match="GenerativeReplay checkpoint, not a WrappedReplay one"):
        WrappedReplay.load(tmp_path / "g", mine.sample, mine.all)
    with pytest.raises(FileNotFoundError):
        WrappedReplay.load(tmp_path / "missing", mine.sample, mine.all)


# ============================================================================ the docstring's SB3 example
@pytest.mark.parametrize("bounds,warns", [("env", False), ((-1.0, 1.0), True)])
def test_sb3_replay_buffer_as_cleanrl_uses_it(bounds, warns, tiny_cfg, fake_diffusion):
    """CleanRL's pattern: SB3's ReplayBuffer, handle_timeout_termination=False, env-scale actions."""
    gym = pytest.importorskip("gymnasium")
    from stable_baselines3.common.buffers import ReplayBuffer

    env = gym.make("Pendulum-v1")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    rb = ReplayBuffer(1000, env.observation_space, env.action_space, "cpu", handle_timeout_termination=False)

    def sample_real(n):
        d = rb.sample(n)
        return d.observations, d.actions, d.rewards, d.next_observations, d.dones

    def real_data():
        n = rb.buffer_size if rb.full else rb.pos
        flat = lambda a: a[:n].reshape(n * rb.n_envs, -1)  # noqa: E731
        return (flat(rb.observations), flat(rb.actions), flat(rb.rewards), flat(rb.next_observations),
                flat(rb.dones * (1 - rb.timeouts)))

    action_bounds = (env.action_space.low, env.action_space.high) if bounds == "env" else bounds
    synth = WrappedReplay(sample_real, real_data, obs_dim, act_dim, config=small(tiny_cfg),
                          action_bounds=action_bounds)
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(210):
            action = env.action_space.sample()                      # env scale: [-2, 2]
            next_obs, reward, terminated, truncated, info = env.step(action)
            rb.add(obs[None], next_obs[None], action[None], np.array([reward]), np.array([terminated]), [info])
            synth.step()
            obs = next_obs if not (terminated or truncated) else env.reset()[0]
    assert synth.stats()["retrain_count"] == 2
    outside = [w for w in caught if "outside the bounds" in str(w.message)]
    assert len(outside) == (2 if warns else 0)
    data = synth.sample(64).as_sb3()
    assert data.rewards.shape == data.dones.shape == (64, 1) and data.observations.shape == (64, obs_dim)
    high = float(env.action_space.high[0]) if bounds == "env" else 1.0
    assert data.actions[32:].abs().max() <= high                    # synthetic actions within the bounds
    if bounds == "env":
        assert data.actions.abs().max() > 1.0                       # real env-scale actions kept their scale
