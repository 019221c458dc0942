"""GenerativeReplay / WrappedReplay: ring buffer, input validation (hypothesis), mixed-batch ratio,
retrain schedule, terminals, pickling, save/load (incl. corrupt files) and kill-and-resume. CPU, tiny."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from synther_buffer import GenerativeReplay, SynthERConfig
from synther_buffer.replay import ReplaySamples, WrappedReplay

from helpers import small, transitions  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OBS, ACT = 3, 2
D_STORE = 2 * OBS + ACT + 2
FIELDS = ("obs", "action", "reward", "next_obs", "terminated")
FIELD_SHAPE = {"obs": (OBS,), "action": (ACT,), "reward": (), "next_obs": (OBS,), "terminated": ()}
# No retrain ever (schedule tests that do not need the diffusion model).
NO_RETRAIN = SynthERConfig.preset("tiny").replace(device="cpu", retrain_every=10**9)
REQUIRED_STATS = ("env_steps", "num_real", "num_synthetic", "retrain_count", "last_train_loss",
                  "last_fit_seconds", "last_generate_seconds", "real_ratio")




def stream_transition(t: int):
    """Transition number t of an endless deterministic stream (also run inside a subprocess)."""
    import numpy as np
    r = np.random.default_rng([12345, t])
    obs = r.standard_normal(3).astype(np.float32)
    act = r.uniform(-1, 1, 2).astype(np.float32)
    return obs, act, float(obs[0] - act[0] ** 2), (0.9 * obs + 0.1 * act[0]).astype(np.float32), False


def feed_singles(buf, n: int, seed: int = 0, term_p: float = 0.0, on_retrain=None):
    """Add n transitions one at a time; return the env steps at which retrain_count went up."""
    obs, act, rew, nxt, term = transitions(n, seed, term_p)
    steps = []
    for i in range(n):
        before = buf.pool.retrain_count
        buf.add(obs[i], act[i], rew[i], nxt[i], term[i])
        if buf.pool.retrain_count != before:
            steps.append(buf.env_steps)
    return steps


def inject_pool(buf, n: int = 50) -> torch.Tensor:
    """Replace the synthetic pool with recognisable rows (every value >= 1000, distinct)."""
    d = buf.layout.dim
    rows = 1000.0 + torch.arange(n * d, dtype=torch.float32).reshape(n, d)
    if buf.layout.terminal:
        rows[:, -1] = (torch.arange(n) % 2).float()
    buf.pool.pool = rows
    return rows


def row_set(rows) -> set:
    return {np.asarray(r, dtype=np.float32).tobytes() for r in np.asarray(rows)}


def batch_rows(batch: ReplaySamples) -> np.ndarray:
    """A ReplaySamples batch back to store rows concat(obs, action, reward, next_obs, terminated)."""
    return np.concatenate([batch.obs.numpy(), batch.action.numpy(), batch.reward.numpy()[:, None],
                           batch.next_obs.numpy(), batch.terminated.numpy()[:, None]], axis=1)


def assert_batch_format(batch: ReplaySamples, b: int, device) -> None:
    shapes = {"obs": (b, OBS), "action": (b, ACT), "reward": (b,), "next_obs": (b, OBS), "terminated": (b,)}
    for name in FIELDS:
        v = getattr(batch, name)
        assert isinstance(v, torch.Tensor) and v.dtype == torch.float32, name
        assert tuple(v.shape) == shapes[name], (name, v.shape)
        assert v.device == torch.device(device) and torch.isfinite(v).all(), name
    assert set(torch.unique(batch.terminated).tolist()) <= {0.0, 1.0}


def assert_same_batch(a: ReplaySamples, b: ReplaySamples) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ============================================================================ stats
def test_stats_keys_and_counts():
    buf = GenerativeReplay(OBS, ACT, capacity=10, config=NO_RETRAIN.replace(real_ratio=0.25))
    s = buf.stats()
    assert set(REQUIRED_STATS) <= set(s)
    assert (s["env_steps"], s["num_real"], s["num_synthetic"], s["retrain_count"]) == (0, 0, 0, 0)
    assert s["real_ratio"] == 0.25 and s["failed_retrains"] == 0 and s["num_dropped"] == 0
    buf.add(*transitions(13))
    s = buf.stats()
    assert (s["env_steps"], s["num_real"], s["num_synthetic"]) == (13, 10, 0)
    assert buf.env_steps == 13 and len(buf) == 10


# ============================================================================ ring buffer
def _id_batch(start: int, b: int):
    ids = np.arange(start, start + b, dtype=np.float32)
    obs = np.repeat(ids[:, None], OBS, axis=1)
    return obs, np.zeros((b, ACT), np.float32), ids, obs, np.zeros(b, np.float32)


def _stored_ids(buf) -> list:
    return sorted(buf.real_rows()[:, 0].astype(int).tolist())


def test_ring_batch_crossing_boundary_and_oversized_batch():
    buf = GenerativeReplay(OBS, ACT, capacity=7, config=NO_RETRAIN)
    buf.add(*_id_batch(0, 4))
    buf.add(*_id_batch(4, 5))                   # crosses the end: 0 and 1 overwritten
    assert _stored_ids(buf) == list(range(2, 9)) and len(buf) == 7
    buf.add(*_id_batch(9, 3))
    assert _stored_ids(buf) == list(range(5, 12))
    buf.add(*_id_batch(12, 20))                 # larger than capacity: keeps the last 7
    assert _stored_ids(buf) == list(range(25, 32))
    for t in range(32, 35):                     # single adds after that still drop the oldest
        o, a, r, n, d = _id_batch(t, 1)
        buf.add(o[0], a[0], r[0], n[0], d[0])
    assert _stored_ids(buf) == list(range(28, 35))
    assert buf.env_steps == 35 and buf.stats()["num_real"] == 7


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(2, 8), batches=st.lists(st.integers(1, 12), min_size=1, max_size=8))
def test_ring_keeps_newest(capacity, batches):
    buf = GenerativeReplay(OBS, ACT, capacity=capacity, config=NO_RETRAIN)
    t = 0
    for b in batches:
        buf.add(*_id_batch(t, b))
        t += b
        assert len(buf) == min(t, capacity)
        assert _stored_ids(buf) == list(range(max(0, t - capacity), t))
        rows = buf.real_rows()                  # fields stay together
        np.testing.assert_array_equal(rows[:, OBS + ACT], rows[:, 0])
    assert buf.env_steps == t


def test_empty_batch_is_a_noop():
    buf = GenerativeReplay(OBS, ACT, capacity=4, config=NO_RETRAIN)
    buf.add(*_id_batch(0, 2))
    buf.add(*_id_batch(2, 0))
    assert _stored_ids(buf) == [0, 1] and buf.env_steps == 2


# ============================================================================ add() validation
def _valid(b):
    """Valid fields for a batch of b (or one transition when b is None), as a dict."""
    obs, act, rew, nxt, term = transitions(b or 1, seed=9, term_p=0.5)
    if b is None:
        return dict(obs=obs[0], action=act[0], reward=rew[0], next_obs=nxt[0], terminated=term[0])
    return dict(obs=obs, action=act, reward=rew, next_obs=nxt, terminated=term)


def _fresh(on_invalid="raise", capacity=64):
    return GenerativeReplay(OBS, ACT, capacity=capacity, config=NO_RETRAIN, on_invalid=on_invalid)


def _assert_untouched(buf):
    assert len(buf) == 0 and buf.stats()["num_real"] == 0


@settings(max_examples=150, deadline=None)
@given(b=st.one_of(st.none(), st.integers(1, 6)),
       field=st.sampled_from(["action", "reward", "next_obs", "terminated"]),
       shape=st.lists(st.integers(0, 5), max_size=3).map(tuple))
def test_add_wrong_shape_names_field_and_expected_shape(b, field, shape):
    expected = FIELD_SHAPE[field] if b is None else (b,) + FIELD_SHAPE[field]
    allowed = {expected} | ({(b, 1)} if b is not None and FIELD_SHAPE[field] == () else set())
    assume(shape not in allowed)
    fields = _valid(b)
    fields[field] = np.zeros(shape, np.float32)
    buf = _fresh()
    with pytest.raises(ValueError) as ei:
        buf.add(**fields)
    msg = str(ei.value)
    assert msg.split()[0] == field, msg
    assert str(expected) in msg, msg
    _assert_untouched(buf)
    assert buf.env_steps == 0


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 5), max_size=3).map(tuple))
def test_add_wrong_obs_shape_rejected(shape):
    assume(shape != (OBS,))
    fields = _valid(None)
    fields["obs"] = np.zeros(shape, np.float32)
    buf = _fresh()
    with pytest.raises(ValueError, match="shape"):
        buf.add(**fields)
    _assert_untouched(buf)


@settings(max_examples=60, deadline=None)
@given(b=st.one_of(st.none(), st.integers(1, 4)), field=st.sampled_from(FIELDS),
       kind=st.sampled_from(["str", "object", "complex", "bytes"]))
def test_add_bad_dtype_names_field(b, field, kind):
    fields = _valid(b)
    good = np.asarray(fields[field])
    if kind == "str":
        bad = np.full(good.shape, "x")
    elif kind == "bytes":
        bad = np.full(good.shape, b"x")
    elif kind == "complex":
        bad = good.astype(np.complex64) + 1j
    else:
        bad = np.empty(good.shape, dtype=object)
        bad[...] = None
    fields[field] = bad
    buf = _fresh()
    with pytest.raises(ValueError) as ei:
        buf.add(**fields)
    assert str(ei.value).split()[0] == field, str(ei.value)
    _assert_untouched(buf)


def test_add_accepts_numeric_dtypes_and_column_vectors():
    buf = _fresh()
    f = _valid(4)
    buf.add(f["obs"].astype(np.float64), f["action"].astype(np.float16), f["reward"].reshape(4, 1),
            torch.from_numpy(f["next_obs"]), f["terminated"].astype(bool).reshape(4, 1))
    buf.add(np.ones(OBS, np.int64), [0.5, -0.5], 1, np.zeros(OBS, np.int32), True)
    rows = buf.real_rows()
    assert rows.shape == (5, D_STORE) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[4], [1, 1, 1, 0.5, -0.5, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(rows[:4, -1], f["terminated"])


def _poison(fields, b, data):
    """Put NaN/inf/overflowing values in some rows of a valid batch; return the set of bad rows."""
    bad_rows = data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=b, unique=True))
    for row in bad_rows:
        field = data.draw(st.sampled_from(FIELDS))
        value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e39]))  # 1e39 overflows float32
        arr = np.asarray(fields[field], dtype=np.float64).copy()
        if arr.ndim == 2:
            arr[row, data.draw(st.integers(0, arr.shape[1] - 1))] = value
        else:
            arr[row] = value
        fields[field] = arr
    return set(bad_rows)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(max_examples=80, deadline=None)
@given(b=st.integers(1, 8), data=st.data())
def test_nonfinite_rejected_by_default(b, data):
    fields = _valid(b)
    _poison(fields, b, data)
    buf = _fresh()
    with pytest.raises(ValueError, match="NaN/inf"):
        buf.add(**fields)
    _assert_untouched(buf)
    assert np.isfinite(buf.real_rows()).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(max_examples=80, deadline=None)
@given(b=st.integers(1, 8), prefill=st.integers(0, 5), data=st.data())
def test_nonfinite_dropped_and_counted(b, prefill, data):
    buf = _fresh(on_invalid="drop")
    if prefill:
        buf.add(**_valid(prefill))
    fields = _valid(b)
    clean = buf.store_layout.join(*(np.asarray(fields[k], np.float32) for k in FIELDS))
    bad = _poison(fields, b, data)
    buf.add(**fields)
    good = [i for i in range(b) if i not in bad]
    s = buf.stats()
    assert s["num_dropped"] == len(bad)
    assert len(buf) == prefill + len(good) and s["num_real"] == prefill + len(good)
    assert s["env_steps"] == prefill + b            # env steps count every transition offered
    rows = buf.real_rows()
    assert np.isfinite(rows).all()
    np.testing.assert_array_equal(rows[prefill:], clean[good])


def test_rejected_add_has_no_side_effects():
    buf = _fresh()
    fields = _valid(3)
    fields["reward"] = np.array([0.0, np.nan, 1.0], np.float32)
    with pytest.raises(ValueError):
        buf.add(**fields)
    assert buf.env_steps == 0 and buf.stats()["env_steps"] == 0


def test_sample_argument_checks():
    buf = _fresh()
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(4)
    buf.add(**_valid(3))
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError):
            buf.sample(bad)


@pytest.mark.parametrize("bad", [dict(capacity=0), dict(capacity=1), dict(capacity=2.0), dict(on_invalid="ignore"),
                                 dict(config={"width": 8}), dict(config="tiny")])
def test_constructor_rejects_bad_arguments(bad):
    kw = dict(capacity=10, config=NO_RETRAIN)
    kw.update(bad)
    with pytest.raises(ValueError):
        GenerativeReplay(OBS, ACT, **kw)


# ============================================================================ mixed batches
@settings(max_examples=80, deadline=None)
@given(batch=st.integers(1, 512),
       ratio=st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0)),
       model_terminals=st.booleans())
def test_mixed_batch_ratio_exact(batch, ratio, model_terminals):
    buf = GenerativeReplay(OBS, ACT, capacity=64, config=NO_RETRAIN.replace(real_ratio=ratio),
                           model_terminals=model_terminals)
    buf.add(*transitions(40, term_p=0.5))
    real = row_set(buf.real_rows())
    before = buf.sample(batch)                          # no pool yet: all real
    assert_batch_format(before, batch, buf.device)
    assert all(r.tobytes() in real for r in batch_rows(before))

    pool = inject_pool(buf)
    b = buf.sample(batch)
    assert_batch_format(b, batch, buf.device)
    n_real = int(np.floor(ratio * batch + 0.5))
    is_syn = (b.obs[:, 0] >= 1000).numpy()
    assert not is_syn[:n_real].any() and is_syn[n_real:].all()
    rows = batch_rows(b)
    assert all(r.tobytes() in real for r in rows[:n_real])
    pool_np = pool.numpy()
    d = buf.layout.dim
    for r in rows[n_real:]:                             # each synthetic row is one whole pool row
        k = int(round((r[0] - 1000.0) / d))
        assert 0 <= k < len(pool_np)
        np.testing.assert_array_equal(r[:-1], pool_np[k, :D_STORE - 1])
        assert r[-1] == (pool_np[k, -1] if model_terminals else 0.0)


# ============================================================================ retrain schedule (real model)
def test_retrain_schedule_and_synthetic_rows_without_terminal_model(tiny_cfg):
    """model_terminals=False: retrain every 100 steps, synthetic rows are new, finite, never terminal."""
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=small(tiny_cfg), model_terminals=False)
    assert feed_singles(buf, 99, seed=0, term_p=0.3) == []
    before = buf.sample(64)                             # before the first retrain: all real
    real = row_set(buf.real_rows())
    assert all(r.tobytes() in real for r in batch_rows(before))

    assert feed_singles(buf, 151, seed=1, term_p=0.3) == [100, 200]
    s = buf.stats()
    assert s["retrain_count"] == 2 and s["num_synthetic"] > 0 and s["next_retrain"] == 300
    assert s["last_train_loss"] == s["last_train_loss"] and s["last_fit_seconds"] > 0
    assert s["last_generate_seconds"] > 0
    assert buf.real_rows()[:, -1].any()                 # the real data does hold terminals

    batch = buf.sample(64)
    assert_batch_format(batch, 64, buf.device)
    real = row_set(buf.real_rows())
    in_real = np.array([r.tobytes() in real for r in batch_rows(batch)])
    assert in_real[:32].all() and not in_real[32:].any()
    assert (batch.terminated[32:] == 0).all()


def test_model_terminals_true_gives_binary_synthetic_terminals(tiny_cfg):
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=small(tiny_cfg, real_ratio=0.0),
                           model_terminals=True)
    buf.add(*transitions(100, seed=3, term_p=0.3))
    assert buf.stats()["retrain_count"] == 1 and buf.layout.terminal
    batch = buf.sample(256)                             # real_ratio 0: all synthetic
    assert_batch_format(batch, 256, buf.device)
    assert set(torch.unique(batch.terminated).tolist()) == {0.0, 1.0}


# ============================================================================ WrappedReplay
class ListReplay:
    """A minimal pre-existing replay buffer of an existing training loop (numpy arrays)."""

    def __init__(self, capacity: int, seed: int = 0):
        self.obs = np.zeros((capacity, OBS), np.float32)
        self.act = np.zeros((capacity, ACT), np.float32)
        self.rew = np.zeros((capacity, 1), np.float32)
        self.nxt = np.zeros((capacity, OBS), np.float32)
        self.done = np.zeros((capacity, 1), np.float32)
        self.size = 0
        self.sample_sizes = []
        self.rng = np.random.default_rng(seed)

    def store(self, o, a, r, n, d):
        i = self.size
        self.obs[i], self.act[i], self.rew[i], self.nxt[i], self.done[i] = o, a, r, n, d
        self.size += 1

    def sample(self, n):
        self.sample_sizes.append(n)
        i = self.rng.integers(0, self.size, n)
        return self.obs[i], self.act[i], self.rew[i], self.nxt[i], self.done[i]

    def all(self):
        s = self.size
        return self.obs[:s], self.act[:s], self.rew[:s], self.nxt[:s], self.done[:s]


def test_wrapped_replay_existing_loop(tiny_cfg):
    mine = ListReplay(1000)
    synth = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=small(tiny_cfg), model_terminals=False)
    obs, act, rew, nxt, term = transitions(250, seed=6, term_p=0.1)
    retrained_at = []
    for t in range(250):
        mine.store(obs[t], act[t], rew[t], nxt[t], term[t])
        if synth.step():
            retrained_at.append(t + 1)
        if t == 60:                                     # before the first retrain: all real
            b = synth.sample(32)
            assert mine.sample_sizes[-1] == 32
            real = row_set(np.concatenate([a.reshape(mine.size, -1) for a in mine.all()], 1))
            assert all(r.tobytes() in real for r in batch_rows(b))
    assert retrained_at == [100, 200]
    s = synth.stats()
    assert s["env_steps"] == 250 and s["retrain_count"] == 2 and s["num_synthetic"] > 0
    assert set(REQUIRED_STATS) - {"num_real"} <= set(s)

    b = synth.sample(48)
    assert mine.sample_sizes[-1] == 24
    assert_batch_format(b, 48, "cpu")                 # numpy fields, device=None: the CPU
    real = row_set(np.concatenate([a.reshape(mine.size, -1) for a in mine.all()], 1))
    in_real = np.array([r.tobytes() in real for r in batch_rows(b)])
    assert in_real[:24].all() and not in_real[24:].any()
    assert (b.terminated[24:] == 0).all()


def test_wrapped_replay_waits_for_min_real(tiny_cfg, fake_diffusion):
    mine = ListReplay(1000)
    synth = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=small(tiny_cfg, min_real=150),
                          model_terminals=True)
    obs, act, rew, nxt, term = transitions(260)
    retrained_at = []
    for t in range(260):
        mine.store(obs[t], act[t], rew[t], nxt[t], term[t])
        if synth.step():
            retrained_at.append(t + 1)
    # due at 100 but only 100 < min_real rows: the first retrain waits for 150, then 200 as scheduled
    assert retrained_at == [150, 200]
    assert fake_diffusion.calls == 2


@pytest.mark.parametrize("ratio,batch", [(0.0, 16), (0.3, 1)])
def test_wrapped_replay_all_synthetic_batch(ratio, batch):
    mine = ListReplay(100)
    obs, act, rew, nxt, term = transitions(20)
    for t in range(20):
        mine.store(obs[t], act[t], rew[t], nxt[t], term[t])
    synth = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=NO_RETRAIN.replace(real_ratio=ratio),
                          model_terminals=False)
    inject_pool(synth)
    b = synth.sample(batch)
    assert_batch_format(b, batch, "cpu")
    assert (b.obs[:, 0] >= 1000).all()


# ============================================================================ pickling
def test_pickle_keeps_pool_model_and_rng(tiny_cfg):
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=small(tiny_cfg), model_terminals=True,
                           log_fn=lambda k, v: None)       # a lambda: must not break pickling
    buf.add(*transitions(120, seed=2, term_p=0.2))
    assert buf.stats()["retrain_count"] == 1
    clone = pickle.loads(pickle.dumps(buf))
    assert clone.stats() == buf.stats()
    assert torch.equal(clone.pool.pool, buf.pool.pool)
    np.testing.assert_array_equal(clone.real_rows(), buf.real_rows())
    np.testing.assert_array_equal(clone.model.sample(32, seed=11), buf.model.sample(32, seed=11))
    assert_same_batch(clone.sample(64), buf.sample(64))


def test_pickle_keeps_min_real_clamped_to_the_capacity(tiny_cfg, fake_diffusion):
    cfg = tiny_cfg.replace(min_real=1_000, retrain_every=100, num_generate=50, synthetic_size=50)
    buf = GenerativeReplay(OBS, ACT, capacity=150, config=cfg, model_terminals=False)
    clone = pickle.loads(pickle.dumps(buf))
    assert clone.pool.min_real == buf.pool.min_real == 150
    clone.add(*transitions(150))                        # full: retrains although 150 < config.min_real
    assert clone.stats()["retrain_count"] == 1


# ============================================================================ save / load
def test_save_load_roundtrip_and_schedule_continues(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg, min_real=50)
    buf = GenerativeReplay(OBS, ACT, capacity=120, config=cfg, model_terminals=True)
    buf.add(*transitions(100, seed=0, term_p=0.2))      # retrain at 100
    buf.add(*transitions(50, seed=1, term_p=0.2))       # 150 added: the ring has wrapped
    buf.sample(10)                                      # advance both rngs
    assert buf.stats()["retrain_count"] == 1 and buf.full
    ckpt = tmp_path / "ckpt"
    buf.save(ckpt)
    buf.save(ckpt)                                      # overwriting an existing checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert isinstance(state, dict)

    back = GenerativeReplay.load(ckpt)
    assert back.stats() == buf.stats()
    assert back.config == buf.config and back.layout == buf.layout
    np.testing.assert_array_equal(back.real_rows(), buf.real_rows())
    assert (back.pos, back.full) == (buf.pos, buf.full)
    assert torch.equal(back.pool.pool, buf.pool.pool)
    np.testing.assert_array_equal(back.model.normalizer.mean, buf.model.normalizer.mean)
    np.testing.assert_array_equal(back.model.normalizer.std, buf.model.normalizer.std)
    np.testing.assert_array_equal(back.model.sample(16, seed=5), buf.model.sample(16, seed=5))
    assert_same_batch(back.sample(64), buf.sample(64))  # rng states were saved

    # the schedule continues: both retrain at env step 200, identically
    for b in (buf, back):
        assert feed_singles(b, 60, seed=7, term_p=0.2) == [200]
    assert back.stats() == buf.stats() or {k for k in buf.stats() if back.stats()[k] != buf.stats()[k]} \
        <= {"last_fit_seconds", "last_generate_seconds"}
    assert torch.equal(back.pool.pool, buf.pool.pool)
    np.testing.assert_array_equal(back.real_rows(), buf.real_rows())


def test_set_progress_after_load_reaches_later_retrains(tiny_cfg, tmp_path):
    """A buffer saved with progress bars on, loaded by a run that wants none (a resumed ``--quiet``)."""
    buf = GenerativeReplay(OBS, ACT, capacity=300, config=small(tiny_cfg, min_real=50, progress=True))
    buf.add(*transitions(100, seed=0))                  # one retrain
    buf.save(tmp_path / "ckpt")
    back = GenerativeReplay.load(tmp_path / "ckpt")
    assert back.config.progress and back.model.config.progress
    back.set_progress(False)
    assert not (back.config.progress or back.pool.config.progress or back.model.config.progress)
    back.add(*transitions(100, seed=1))                 # the next retrain builds its model from the pool's config
    assert back.stats()["retrain_count"] == 2 and back.model.config.progress is False


def test_load_recovers_from_kill_between_renames(tmp_path):
    buf = GenerativeReplay(OBS, ACT, capacity=20, config=NO_RETRAIN)
    buf.add(*transitions(7))
    buf.save(tmp_path / "ckpt")
    os.replace(tmp_path / "ckpt", tmp_path / "ckpt.old")   # as if killed between save()'s renames
    back = GenerativeReplay.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(back.real_rows(), buf.real_rows())
    with pytest.raises(FileNotFoundError):
        GenerativeReplay.load(tmp_path / "missing")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('SYNTHER_PWNED', '/nonexistent/x')}",))


def _corrupt(kind: str, ckpt: Path, tmp_path: Path) -> None:
    state_p, real_p = ckpt / "state.pt", ckpt / "real.npy"
    if kind == "state_truncated":
        data = state_p.read_bytes()
        state_p.write_bytes(data[:len(data) // 2])
    elif kind == "state_garbage":
        state_p.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "state_empty":
        state_p.write_bytes(b"")
    elif kind == "state_pickle_payload":                 # plain pickle with a code-running reduce
        os.environ["SYNTHER_PWNED"] = str(tmp_path / "pwned")
        state_p.write_bytes(pickle.dumps({"version": 1, "x": _Payload()}))
    elif kind == "state_torch_payload":
        os.environ["SYNTHER_PWNED"] = str(tmp_path / "pwned")
        torch.save({"version": 1, "x": _Payload()}, state_p)
    elif kind == "state_not_a_dict":
        torch.save([1, 2, 3], state_p)
    elif kind == "state_missing_keys":
        torch.save({"version": 1}, state_p)
    elif kind == "real_truncated":
        data = real_p.read_bytes()
        real_p.write_bytes(data[:len(data) // 2])
    elif kind == "real_garbage":
        real_p.write_bytes(np.random.default_rng(1).bytes(4096))
    elif kind == "real_object_pickle":
        np.save(real_p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif kind == "real_wrong_width":
        np.save(real_p, np.zeros((5, D_STORE + 1), np.float32))
    elif kind == "real_fewer_rows":                      # 3 rows for a state that says pos=7
        np.save(real_p, np.zeros((3, D_STORE), np.float32))
    elif kind == "real_1d":
        np.save(real_p, np.zeros(5 * D_STORE, np.float32))
    else:
        raise AssertionError(kind)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's note on the foreign pickle protocol
@pytest.mark.parametrize("kind", [
    "state_truncated", "state_garbage", "state_empty", "state_pickle_payload", "state_torch_payload",
    "state_not_a_dict",
    "state_missing_keys",
    "real_truncated", "real_garbage", "real_object_pickle", "real_wrong_width",
    "real_fewer_rows",
    "real_1d",
])
def test_corrupt_checkpoint_raises_value_error(kind, tmp_path):
    buf = GenerativeReplay(OBS, ACT, capacity=20, config=NO_RETRAIN)
    buf.add(*transitions(7))
    ckpt = tmp_path / "ckpt"
    buf.save(ckpt)
    _corrupt(kind, ckpt, tmp_path)
    try:
        with pytest.raises(ValueError):
            GenerativeReplay.load(ckpt)
    finally:
        os.environ.pop("SYNTHER_PWNED", None)
    assert not (tmp_path / "pwned").exists(), "loading a checkpoint ran code"


# ============================================================================ kill and resume
CHILD = r'''
import json, sys, time
import torch
torch.set_num_threads(1)
from synther_buffer import GenerativeReplay, SynthERConfig

{stream_src}
args = json.loads(sys.argv[1])
buf = GenerativeReplay(3, 2, capacity=args["capacity"], config=SynthERConfig.from_dict(args["config"]),
                       model_terminals=False)
for t in range(args["steps"]):
    if t == args["stall_at"]:
        time.sleep(600)                       # never gets past here: the parent kills us
    buf.add(*stream_transition(t))
    if (t + 1) % args["every"] == 0:
        buf.save(args["ckpt"])
        print("ckpt", t + 1, buf.stats()["retrain_count"], flush=True)
'''


def _run_stream(buf, start: int, stop: int) -> list:
    steps = []
    for t in range(start, stop):
        before = buf.pool.retrain_count
        buf.add(*stream_transition(t))
        if buf.pool.retrain_count != before:
            steps.append(buf.env_steps)
    return steps


def test_kill_and_resume_matches_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg, train_steps=100)               # retrain every 100, min_real 50
    total, every = 260, 30
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(stream_src=inspect.getsource(stream_transition)))
    args = dict(capacity=1000, config=cfg.to_dict(), steps=total, every=every, stall_at=195, ckpt=str(ckpt))
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    killed_after = None
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            parts = line.split()
            if parts and parts[0] == "ckpt" and int(parts[1]) >= 150:
                killed_after = int(parts[1])
                os.kill(proc.pid, signal.SIGKILL)        # between the retrains at 100 and 200
                break
            assert time.monotonic() < deadline, "child too slow"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert killed_after is not None, proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL

    resumed = GenerativeReplay.load(ckpt)
    start = resumed.env_steps
    assert start % every == 0 and 100 < start < 200 and resumed.stats()["retrain_count"] == 1
    resumed_steps = _run_stream(resumed, start, total)

    straight = GenerativeReplay(OBS, ACT, capacity=1000, config=cfg, model_terminals=False)
    straight_steps = _run_stream(straight, 0, total)
    assert straight_steps == [100, 200]
    assert resumed_steps == [200]
    np.testing.assert_array_equal(resumed.real_rows(), straight.real_rows())
    a, b = resumed.stats(), straight.stats()
    for k in ("env_steps", "num_real", "num_synthetic", "retrain_count", "next_retrain", "num_filtered"):
        assert a[k] == b[k], k
    assert torch.equal(resumed.pool.pool, straight.pool.pool)   # same seeds, same data: same pool


# --------------------------------------------------------------------------- added with the fixes
@pytest.mark.parametrize("value", [0.5, 2.0, -1.0])
def test_non_binary_terminal_is_rejected_without_side_effects(value):
    buf = _fresh()
    fields = _valid(3)
    fields["terminated"] = np.array([0.0, value, 1.0], np.float32)
    with pytest.raises(ValueError, match="terminated must hold 0/1"):
        buf.add(**fields)
    _assert_untouched(buf)
    assert buf.stats()["env_steps"] == 0


def test_min_real_larger_than_capacity_still_retrains_when_full(tiny_cfg, fake_diffusion):
    cfg = tiny_cfg.replace(min_real=1_000, retrain_every=100, num_generate=50, synthetic_size=50)
    buf = GenerativeReplay(OBS, ACT, capacity=150, config=cfg, model_terminals=False)
    for _ in range(3):
        buf.add(**_valid(50))
    s = buf.stats()
    assert s["retrain_count"] == 1 and s["last_retrain_env_step"] == 150 and s["num_synthetic"] == 50


def test_last_retrain_env_step_tracks_the_schedule(tiny_cfg, fake_diffusion):
    cfg = tiny_cfg.replace(min_real=10, retrain_every=40, num_generate=20, synthetic_size=20)
    buf = GenerativeReplay(OBS, ACT, capacity=500, config=cfg, model_terminals=False)
    assert buf.stats()["last_retrain_env_step"] == -1
    seen = []
    for _ in range(10):
        buf.add(**_valid(10))
        seen.append(buf.stats()["last_retrain_env_step"])
    assert seen == [-1, -1, -1, 40, 40, 40, 40, 80, 80, 80]
