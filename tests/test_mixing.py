"""MixingCore and what every buffer built on it shares: the device-aware default config, the
``model_terminals="auto"`` decision, the one row layout (and its deprecated names), the exports."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import synther_buffer
from synther_buffer import GenerativeReplay, SynthERConfig, WrappedReplay
from synther_buffer.layout import RowLayout
from synther_buffer.mixing import MixingCore

from helpers import small, transitions  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OBS, ACT = 3, 2


class _Fields:
    """A loop's own buffer for WrappedReplay: fixed arrays of real transitions, grown by ``grow``."""

    def __init__(self, fields):
        self.fields, self.n = fields, 0

    def grow(self, n):
        self.n += n

    def all(self):
        return tuple(f[:self.n] for f in self.fields)

    def sample(self, k):
        idx = np.random.default_rng(k).integers(0, self.n, k)
        return tuple(f[idx] for f in self.fields)


def _generative(cfg, fields, **kw):
    buf = GenerativeReplay(OBS, ACT, capacity=1000, config=cfg, **kw)

    def add(lo, hi):
        buf.add(*(f[lo:hi] for f in fields))
    return buf, add


def _wrapped(cfg, fields, **kw):
    mine = _Fields(fields)
    buf = WrappedReplay(mine.sample, mine.all, OBS, ACT, config=cfg, **kw)

    def add(lo, hi):
        for _ in range(lo, hi):
            mine.grow(1)
            buf.step()
    return buf, add


OWNERS = {"GenerativeReplay": _generative, "WrappedReplay": _wrapped}


# ============================================================================ config=None
@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("owner", sorted(OWNERS))
def test_config_none_is_the_preset_for_the_device(owner, cuda, monkeypatch):
    """config=None: the paper preset where "auto" resolves to CUDA, the fast one on CPU (SynthERConfig.for_device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    buf, _ = OWNERS[owner](None, transitions(10))
    expected = SynthERConfig.preset("paper" if cuda else "fast").replace(device="auto")
    assert buf.config == expected
    assert buf.pool.device == torch.device("cuda" if cuda else "cpu")     # the model's device ...
    # ... is not where batches go: the CPU unless told (WrappedReplay: None, the data's own device)
    assert buf.device == (torch.device("cpu") if owner == "GenerativeReplay" else None)


def test_config_none_is_announced_once(caplog, monkeypatch):
    import synther_buffer.config as config_mod

    monkeypatch.setattr(config_mod, "_ANNOUNCED", set())
    caplog.set_level(logging.INFO, logger="synther_buffer.config")
    GenerativeReplay(OBS, ACT, capacity=10)
    GenerativeReplay(OBS, ACT, capacity=10)
    said = [r.getMessage() for r in caplog.records if "config=None" in r.getMessage()]
    assert len(said) == 1 and "'fast'" in said[0]


# ============================================================================ model_terminals="auto"
@pytest.mark.parametrize("owner", sorted(OWNERS))
@pytest.mark.parametrize("terminals_first", [False, True])
def test_auto_terminals_decided_at_the_first_retrain(owner, terminals_first, tiny_cfg, fake_diffusion):
    """"auto" models the terminal column iff a real terminal is stored by the first retrain, and
    keeps that decision afterwards (later terminals do not change the layout)."""
    cfg = small(tiny_cfg, real_ratio=0.0)                  # retrain every 100, min_real 50; all-synthetic batches
    fields = list(transitions(300, seed=1))
    fields[4] = np.zeros(300, np.float32)
    if terminals_first:
        fields[4][:100:7] = 1.0                              # terminals before the first retrain
    fields[4][150:300:5] = 1.0                               # and after it, in every case
    buf, add = OWNERS[owner](cfg, fields)
    assert buf.model_terminals == "auto" and not buf.layout.terminal   # undecided: no terminal column yet
    add(0, 100)
    assert buf.stats()["retrain_count"] == 1 and fake_diffusion.calls == 1
    assert buf.layout.terminal is terminals_first
    assert buf.model.dim == 2 * OBS + ACT + 1 + int(terminals_first)
    synth_terms = set(torch.unique(buf.sample(400).terminated).tolist())
    assert synth_terms == ({0.0, 1.0} if terminals_first else {0.0})
    add(100, 200)                                            # terminals keep arriving
    add(200, 300)
    assert buf.stats()["retrain_count"] == 3
    assert buf.layout.terminal is terminals_first            # decided once
    assert buf.model.dim == 2 * OBS + ACT + 1 + int(terminals_first)


@pytest.mark.parametrize("setting", [True, False])
def test_explicit_model_terminals_are_not_overridden(setting, tiny_cfg, fake_diffusion):
    fields = list(transitions(100, seed=2, term_p=0.0 if setting else 0.5))
    buf, add = _generative(small(tiny_cfg), fields, model_terminals=setting)
    add(0, 100)
    assert buf.stats()["retrain_count"] == 1 and buf.layout.terminal is setting


@pytest.mark.parametrize("retrain_first", [False, True])
def test_save_load_keeps_the_auto_setting_and_its_decision(retrain_first, tiny_cfg, fake_diffusion, tmp_path):
    fields = list(transitions(200, seed=3, term_p=0.2))
    buf, add = _generative(small(tiny_cfg), fields)
    add(0, 100 if retrain_first else 60)
    buf.save(tmp_path / "ckpt")
    back = GenerativeReplay.load(tmp_path / "ckpt")
    assert back.model_terminals == "auto" and back.layout == buf.layout
    assert back.layout.terminal is retrain_first
    for b in (buf, back):                                    # both decide (or keep) the same way
        b.add(*(f[100:200] for f in fields))
    assert back.layout == buf.layout and back.layout.terminal is True
    assert back.stats()["retrain_count"] == buf.stats()["retrain_count"]


@pytest.mark.parametrize("bad", ["yes", None, 2, "AUTO"])
def test_model_terminals_must_be_true_false_or_auto(bad):
    with pytest.raises(ValueError, match="model_terminals"):
        MixingCore(OBS, ACT, SynthERConfig.preset("tiny"), bad)


# ============================================================================ the core itself
def test_core_layout_is_fixed_once_a_model_exists(tiny_cfg, fake_diffusion):
    core = MixingCore(OBS, ACT, small(tiny_cfg))
    rows = RowLayout(OBS, ACT, terminal=True).join(*transitions(60, term_p=0.3))
    with pytest.raises(RuntimeError, match="at least 2"):
        core.retrain(rows[:1])
    assert core.retrain(rows) and core.model_layout.terminal
    with pytest.raises(RuntimeError, match="fixed"):
        core.pool.set_layout(core.model_layout.with_terminal(False))
    with pytest.raises(ValueError, match="widths"):
        MixingCore(OBS, ACT, small(tiny_cfg)).pool.set_layout(RowLayout(OBS + 1, ACT))
    # a checkpoint without the terminal column cannot load into this trained core: a named ValueError
    other = MixingCore(OBS, ACT, small(tiny_cfg), model_terminals=False)
    assert other.retrain(rows) and not other.model_layout.terminal
    state = other.state_dict()
    with pytest.raises(ValueError, match="lacks the terminal column.*fresh buffer"):
        core.load_state_dict(state["pool"], state["terminal_column"])
    fresh = MixingCore(OBS, ACT, small(tiny_cfg))
    fresh.load_state_dict(state["pool"], state["terminal_column"])     # a fresh core takes it
    assert not fresh.model_layout.terminal and fresh.pool.num_synthetic == other.pool.num_synthetic


def test_core_min_real_is_clamped_to_the_capacity(tiny_cfg):
    assert MixingCore(OBS, ACT, tiny_cfg.replace(min_real=500), capacity=120).min_real == 120
    assert MixingCore(OBS, ACT, tiny_cfg.replace(min_real=500)).min_real == 500
    with pytest.raises(ValueError, match="capacity"):
        MixingCore(OBS, ACT, tiny_cfg, capacity=0)
    with pytest.raises(ValueError, match="at least 2"):
        MixingCore(OBS, ACT, tiny_cfg, capacity=1)


def test_core_batch_puts_real_rows_first_and_zero_terminals_where_not_modelled(tiny_cfg):
    core = MixingCore(OBS, ACT, tiny_cfg.replace(real_ratio=0.25), model_terminals=False)
    d = core.model_layout.dim
    core.pool.pool = 1000.0 + torch.arange(10 * d, dtype=torch.float32).reshape(10, d)
    n_real, n_syn = core.split(8)
    assert (n_real, n_syn) == (2, 6)
    real = torch.from_numpy(core.store_layout.join(*transitions(n_real, term_p=1.0)))
    b = core.batch(real, n_syn)
    assert (b.obs[:n_real] < 1000).all() and (b.obs[n_real:] >= 1000).all()
    assert b.terminated.tolist() == [1.0, 1.0] + [0.0] * n_syn
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            core.split(bad)


# ============================================================================ names
def test_wrapped_replay_is_exported():
    from synther_buffer.replay import WrappedReplay as direct

    assert synther_buffer.WrappedReplay is direct and "WrappedReplay" in synther_buffer.__all__


def test_one_row_layout_and_its_deprecated_names():
    from synther_buffer import datasets, pool

    assert datasets.RowLayout is RowLayout
    with pytest.warns(DeprecationWarning, match="RowLayout"):
        old = pool.TransitionLayout(OBS, ACT, model_terminals=True)
    assert isinstance(old, RowLayout) and old.terminal and old.dim == 2 * OBS + ACT + 2
    assert old.as_row_layout() == RowLayout(OBS, ACT, terminal=True)
    with pytest.warns(DeprecationWarning, match="terminal"):
        assert RowLayout(OBS, ACT, terminal=True).model_terminals is True
    lay = RowLayout(OBS, ACT, terminal=True)
    assert lay.terminal_dims == (lay.terminal_col,) == (lay.dim - 1,)
    assert lay.with_terminal(False).terminal_dims == () and lay.with_terminal(False).terminal_col is None
    assert lay.column_names()[lay.action_cols] == ["action_0", "action_1"]
