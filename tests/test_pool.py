"""SyntheticPool / RowLayout: row layout, retrain schedule, mixed-batch split, outlier filter,
fault injection (NaN mid-fit, NaN samples), determinism and state round-trips. CPU, tiny configs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import synther_buffer.diffusion as diffusion_mod
from synther_buffer import GenerativeReplay, SynthERConfig, TransitionDiffusion
from synther_buffer.layout import RowLayout
from synther_buffer.pool import SyntheticPool

from helpers import small, transitions  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OBS, ACT = 3, 2




def store_rows(n: int, seed: int = 0, term_p: float = 0.0) -> np.ndarray:
    return RowLayout(OBS, ACT, True).join(*transitions(n, seed, term_p))


# ============================================================================ RowLayout
@pytest.mark.parametrize("model_terminals", [False, True])
def test_layout_join_split_roundtrip(model_terminals):
    lay = RowLayout(OBS, ACT, model_terminals)
    assert lay.dim == 2 * OBS + ACT + 1 + int(model_terminals)
    assert lay.reward_col == OBS + ACT
    assert lay.terminal_dims == ((lay.dim - 1,) if model_terminals else ())
    obs, act, rew, nxt, term = transitions(7, term_p=0.5)
    rows = lay.join(obs, act, rew.reshape(-1, 1), nxt, term)   # [B, 1] reward accepted too
    assert rows.shape == (7, lay.dim) and rows.dtype == np.float32
    for as_torch in (False, True):
        src = torch.from_numpy(rows) if as_torch else rows
        o, a, r, n, t = (np.asarray(v) for v in lay.split(src))
        np.testing.assert_array_equal(o, obs)
        np.testing.assert_array_equal(a, act)
        np.testing.assert_array_equal(r, rew)
        np.testing.assert_array_equal(n, nxt)
        np.testing.assert_array_equal(t, term if model_terminals else np.zeros(7, np.float32))


@pytest.mark.parametrize("model_terminals", [False, True])
def test_layout_join_empty_batch(model_terminals):
    lay = RowLayout(OBS, ACT, model_terminals)
    rows = lay.join(*transitions(0))
    assert rows.shape == (0, lay.dim) and rows.dtype == np.float32


@pytest.mark.parametrize("obs_dim,action_dim", [(0, 1), (1, 0), (-3, 2), (2.5, 1), (True, 1), ("3", 1)])
def test_layout_rejects_bad_dims(obs_dim, action_dim):
    with pytest.raises(ValueError):
        RowLayout(obs_dim, action_dim, False)


# ============================================================================ schedule
def test_schedule_due_and_advance(tiny_cfg, fake_diffusion):
    pool = SyntheticPool(RowLayout(OBS, ACT, False), small(tiny_cfg))
    assert pool.next_retrain == 100 and not pool.due(10_000)
    pool.step(99)
    assert not pool.due(10_000)
    pool.step(1)
    assert pool.due(50) and not pool.due(49)          # min_real gates it
    pool.step(250)                                      # env step 350: several periods missed
    assert pool.retrain(store_rows(200)[:, :-1]) is True
    # the schedule moves to the next multiple of retrain_every after the current step, no backlog
    assert pool.next_retrain == 400 and not pool.due(10_000)
    assert pool.retrain_count == 1 and pool.num_synthetic == 500 and fake_diffusion.calls == 1
    pool.step(50)
    assert pool.due(10_000)


def test_sample_before_any_pool_raises(tiny_cfg):
    pool = SyntheticPool(RowLayout(OBS, ACT, False), small(tiny_cfg))
    assert pool.split_batch(64) == (64, 0)
    with pytest.raises(RuntimeError, match="empty"):
        pool.sample(4)


@pytest.fixture
def marked_diffusion(fake_diffusion, monkeypatch):
    """``fake_diffusion`` whose samples are marked: obs_0 of synthetic row k is 1000 + k (real |obs| < 10)."""
    def sample(self, n, **kw):
        rows = np.zeros((n, self.dim), np.float32)
        rows[:, 0] = 1000.0 + np.arange(n)
        return rows

    monkeypatch.setattr(TransitionDiffusion, "sample", sample)
    return fake_diffusion


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 700),
       ratio=st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0)))
def test_batches_hold_the_documented_number_of_real_rows(tiny_cfg, marked_diffusion, batch, ratio):
    """Counted in the batches a buffer serves, its pool made by a retrain: all real before the first
    retrain, then floor(real_ratio * B + 0.5) real rows first (the nearest count to real_ratio * B)
    and synthetic ones after."""
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=small(tiny_cfg, real_ratio=ratio, outlier_std=None),
                           model_terminals=False)
    buf.add(*transitions(60, seed=1)[:5])
    assert buf.stats()["num_synthetic"] == 0
    assert (buf.sample(batch).obs[:, 0].abs() < 10).all()
    buf.add(*transitions(60, seed=2)[:5])                          # env step 120: the retrain at 100 ran
    assert buf.stats()["num_synthetic"] == 500
    real_rows = {r.tobytes() for r in buf.real_rows()[:, :OBS]}
    for _ in range(3):
        b = buf.sample(batch)
        is_real = (b.obs[:, 0].abs() < 10).numpy()
        n_real = int(is_real.sum())
        assert n_real == int(np.floor(ratio * batch + 0.5))
        assert abs(n_real - ratio * batch) <= 0.5                  # the nearest whole count
        assert is_real[:n_real].all() and not is_real[n_real:].any()   # real rows first
        assert all(r.tobytes() in real_rows for r in b.obs[:n_real].numpy())
        assert (b.obs[n_real:, 0] >= 1000).all() and len(b.obs) == batch


def test_pool_sample_draws_pool_rows(tiny_cfg):
    pool = SyntheticPool(RowLayout(OBS, ACT, False), small(tiny_cfg))
    rows = torch.arange(20 * pool.layout.dim, dtype=torch.float32).reshape(20, -1)
    pool.pool = rows
    got = pool.sample(64)
    assert got.shape == (64, pool.layout.dim)
    assert all(any(torch.equal(g, r) for r in rows) for g in got)


# ============================================================================ outlier filter
def test_outlier_rows_dropped_and_counted(tiny_cfg, monkeypatch):
    """Rows beyond outlier_std real stds on any dim are dropped and counted; the terminal column is
    exempt (rare real terminals have a tiny std, a synthetic 1 must not count as an outlier)."""
    real = store_rows(300, term_p=0.0)
    real[:3, -1] = 1.0                                   # 1% terminals: terminal z of a 1 is ~10
    mean, std = real.mean(0), real.std(0)
    n_gen, n_out = 500, 37

    def fake_sample(self, n, **kw):
        r = np.random.default_rng(5)
        out = real[r.integers(0, len(real), n)].copy()
        out[:, -1] = 0.0
        cols = r.integers(0, real.shape[1] - 1, n_out)          # any non-terminal column
        out[np.arange(n_out), cols] = mean[cols] + 50.0 * std[cols] * np.where(r.random(n_out) < 0.5, 1, -1)
        out[n_out:n_out + 10, 0] = mean[0] + 9.0 * std[0]        # within 10 std: kept
        out[n_out + 10:n_out + 30, -1] = 1.0                    # terminals: never filtered
        return out.astype(np.float32)

    monkeypatch.setattr(TransitionDiffusion, "fit", lambda self, x, **kw: {"loss": 0.1, "seconds": 0.0})
    monkeypatch.setattr(TransitionDiffusion, "sample", fake_sample)
    logged = {}
    cfg = small(tiny_cfg, num_generate=n_gen, synthetic_size=n_gen)
    assert cfg.outlier_std == 10.0
    pool = SyntheticPool(RowLayout(OBS, ACT, True), cfg, log_fn=logged.__setitem__)
    assert pool.retrain(real)
    assert pool.num_filtered == n_out and pool.num_synthetic == n_gen - n_out
    assert logged["synther/num_filtered"] == n_out and logged["synther/num_synthetic"] == n_gen - n_out
    z = np.abs((pool.pool.numpy()[:, :-1] - mean[:-1]) / std[:-1])
    assert z.max() <= 10.0
    assert pool.pool[:, -1].sum().item() == 20.0
    assert pool.retrain(real)                            # counts accumulate over retrains
    assert pool.stats()["num_filtered"] == 2 * n_out

    unfiltered = SyntheticPool(RowLayout(OBS, ACT, True), cfg.replace(outlier_std=None))
    assert unfiltered.retrain(real)
    assert unfiltered.num_filtered == 0 and unfiltered.num_synthetic == n_gen


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 300), chunk=st.integers(1, 64), k=st.floats(0.5, 5.0), seed=st.integers(0, 10 ** 6),
       terminals=st.booleans())
def test_outlier_mask_chunked_equals_the_z_score_rule(tiny_cfg, n, chunk, k, seed, terminals):
    """The chunked float32 filter keeps exactly the rows with |x - mean| / std <= k on every judged dim
    (constant dims and the terminal column are not judged; NaN rows are dropped)."""
    r = np.random.default_rng(seed)
    real = store_rows(200, seed=seed % 97, term_p=0.05 if terminals else 0.0)
    real[:, 1] = 0.25                                                   # a constant column
    synth = (real.mean(0) + real.std(0) * r.standard_normal((n, real.shape[1])) * 3).astype(np.float32)
    synth[r.random(n) < 0.05, 0] = np.nan
    layout = RowLayout(OBS, ACT, True) if terminals else RowLayout(OBS, ACT, False)
    real, synth = real[:, :layout.dim], synth[:, :layout.dim]
    pool = SyntheticPool(layout, small(tiny_cfg, outlier_std=k))
    mean, std = real.mean(0, dtype=np.float64), real.std(0, dtype=np.float64)
    judged = std >= 1e-6
    if terminals:
        judged[-1] = False
    with np.errstate(invalid="ignore"):
        expected = (np.abs(synth[:, judged] - mean[judged]) / std[judged] <= k).all(axis=1)
    got = pool._in_range(synth, real, terminals, chunk=chunk)
    # float32 bounds can differ from the float64 rule only within rounding of the boundary
    z = np.abs(synth[:, judged] - mean[judged]) / std[judged]
    near = np.isclose(z, k, rtol=1e-5).any(axis=1)
    assert np.array_equal(got[~near], expected[~near])


@given(n=st.integers(0, 200), chunk=st.integers(1, 50), p=st.floats(0.0, 1.0), seed=st.integers(0, 10 ** 6))
def test_compact_in_place_equals_boolean_indexing(n, chunk, p, seed):
    from synther_buffer.pool import _compact
    r = np.random.default_rng(seed)
    rows = r.standard_normal((n, 4)).astype(np.float32)
    keep = r.random(n) < p
    expected = rows[keep].copy()
    got = _compact(rows, keep, chunk=chunk)
    assert np.array_equal(got, expected)
    assert got.base is rows or got is rows or len(got) == 0 or np.shares_memory(got, rows)   # no new array


def test_constant_column_does_not_empty_the_pool(tiny_cfg):
    # Sparse reward not yet seen (reward column all 0) plus a constant observation dimension.
    obs, act, rew, nxt, term = transitions(200)
    obs[:, 2] = 0.0
    nxt[:, 2] = 0.0
    rew[:] = 0.0
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=small(tiny_cfg), model_terminals=False)
    buf.add(obs[:100], act[:100], rew[:100], nxt[:100], term[:100])
    s = buf.stats()
    assert s["retrain_count"] == 1
    assert s["num_synthetic"] >= 0.9 * 500, s


# ============================================================================ fault injection
def _feed(buf, seed: int, n: int, term_p: float = 0.0):
    obs, act, rew, nxt, term = transitions(n, seed=seed, term_p=term_p)
    for i in range(n):
        buf.add(obs[i], act[i], rew[i], nxt[i], term[i])


@pytest.mark.parametrize("where", ["fit_loss", "samples", "all_outliers"])
def test_nan_mid_retrain_keeps_old_pool_and_model(tiny_cfg, monkeypatch, caplog, where):
    caplog.set_level(logging.WARNING, logger="synther_buffer.pool")
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=small(tiny_cfg), model_terminals=False)
    _feed(buf, 0, 100)
    assert buf.stats()["retrain_count"] == 1
    old_model, old_pool = buf.model, buf.pool.pool.clone()
    old_draw = old_model.sample(16, seed=3)

    if where == "fit_loss":
        for name in ("edm_loss_from_noise", "edm_loss_and_grads_unchecked"):   # autograd and manual paths
            real = getattr(diffusion_mod, name)
            monkeypatch.setattr(diffusion_mod, name, lambda *a, _real=real, **k: _real(*a, **k) * float("nan"))
    else:   # NaN rows, or finite rows 1e6 stds out that the outlier filter removes, every one
        bad = float("nan") if where == "samples" else 1e6
        monkeypatch.setattr(diffusion_mod, "heun_sample", lambda denoise, x, *a, **k: torch.full_like(x, bad))
    _feed(buf, 1, 100)                                   # env step 200: the retrain fails
    s = buf.stats()
    assert s["failed_retrains"] == 1 and s["retrain_count"] == 1
    assert s["next_retrain"] == 300                      # no retry storm on every add
    assert buf.model is old_model
    assert torch.equal(buf.pool.pool, old_pool)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "failed" in r.getMessage()]
    assert len(warnings) == 1 and "200" in warnings[0].getMessage()

    batch = buf.sample(64)                               # sampling still works, from the old pool
    assert batch.obs.shape == (64, OBS) and torch.isfinite(batch.obs).all()
    syn = torch.cat([batch.obs, batch.action], 1)[32:]
    pool_rows = torch.cat([old_pool[:, :OBS], old_pool[:, OBS:OBS + ACT]], 1)
    assert all((pool_rows == r).all(1).any() for r in syn)

    monkeypatch.undo()                                   # healthy again: the next retrain succeeds
    np.testing.assert_array_equal(old_model.sample(16, seed=3), old_draw)   # old weights untouched
    _feed(buf, 2, 100)
    s = buf.stats()
    assert s["retrain_count"] == 2 and s["failed_retrains"] == 1 and buf.model is not old_model


# ============================================================================ determinism
def test_same_seed_same_pool(tiny_cfg):
    tiny_cfg = tiny_cfg.replace(async_retrain=False)    # the synchronous (reproducible) schedule
    bufs = [GenerativeReplay(OBS, ACT, capacity=1000, config=small(tiny_cfg), model_terminals=True)
            for _ in range(2)]
    for b in bufs:
        b.add(*transitions(100, seed=4, term_p=0.2))
    assert bufs[0].stats()["retrain_count"] == bufs[1].stats()["retrain_count"] == 1
    assert torch.equal(bufs[0].pool.pool, bufs[1].pool.pool)
    b0, b1 = bufs[0].sample(50), bufs[1].sample(50)
    for f0, f1 in zip(b0, b1):
        assert torch.equal(f0, f1)
    other = GenerativeReplay(OBS, ACT, capacity=1000, config=small(tiny_cfg, seed=1), model_terminals=True)
    other.add(*transitions(100, seed=4, term_p=0.2))
    assert not torch.equal(other.pool.pool, bufs[0].pool.pool)


def test_runs_with_neighbouring_seeds_share_no_retrain_stream(tiny_cfg):
    """Run seed 1's first retrain is not run seed 0's second (as it was with ``seed + retrain_index``)."""
    from synther_buffer.pool import build_pool, retrain_seed

    seeds = {retrain_seed(s, k) for s in range(10) for k in range(30)}
    assert len(seeds) == 300 and retrain_seed(7, 0) == 7            # distinct; the first retrain keeps the seed
    layout = RowLayout(OBS, ACT, terminal=False)
    rows = np.ascontiguousarray(layout.join(*transitions(100, seed=4)))
    cfg = small(tiny_cfg.replace(async_retrain=False))
    run0_second = build_pool(cfg, rows, 1, 200, layout)
    run1_first = build_pool(cfg.replace(seed=1), rows, 0, 200, layout)
    again = build_pool(cfg, rows, 1, 200, layout)
    assert np.array_equal(run0_second["pool"], again["pool"])      # deterministic
    assert not np.array_equal(run0_second["pool"], run1_first["pool"])


# ============================================================================ state round-trips
def test_state_dict_roundtrip_weights_only(tiny_cfg, fake_diffusion, tmp_path):
    pool = SyntheticPool(RowLayout(OBS, ACT, True), small(tiny_cfg))
    pool.set_action_bounds(-1.0, 1.0)
    pool.step(130)
    pool.retrain(store_rows(130, term_p=0.1))
    pool.sample(7)                                       # advance the rng
    torch.save(pool.state_dict(), tmp_path / "pool.pt")
    state = torch.load(tmp_path / "pool.pt", weights_only=True)
    clone = SyntheticPool(RowLayout(OBS, ACT, True), small(tiny_cfg))
    clone.load_state_dict(state)
    a, b = pool.stats(), clone.stats()
    assert a == b or all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)
    assert torch.equal(pool.pool, clone.pool)
    assert torch.equal(pool.sample(11), clone.sample(11))
    np.testing.assert_array_equal(pool.action_low, clone.action_low)
    for (k, v), (k2, v2) in zip(pool.model.state_dict()["ema"].items(), clone.model.state_dict()["ema"].items()):
        assert k == k2 and torch.equal(v, v2)
