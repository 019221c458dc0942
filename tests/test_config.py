"""SynthERConfig: presets (seed Tables 8/9, D.2), replace semantics, validation, serialisation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synther_buffer import SynthERConfig, TransitionDiffusion

# Exactly the seed's values (Table 8, Table 9, D.2, reference code's 50/50 mixing).
PAPER_VALUES = dict(
    width=1024, depth=6, rff_dim=16, lr=3e-4, train_steps=100_000, batch_size=None,
    sample_steps=128, sampler="stochastic", s_churn=80.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003,
    sigma_min=0.002, sigma_max=80.0, sigma_data=1.0, rho=7.0, p_mean=-1.2, p_std=1.2,
    retrain_every=10_000, synthetic_size=1_000_000, real_ratio=0.5, device="auto",
)

FIXED_FIELDS = ("width", "depth", "rff_dim", "train_steps", "batch_size", "lr", "ema_decay",
                "sample_steps", "sampler", "s_churn", "s_tmin", "s_tmax", "s_noise", "sigma_min",
                "sigma_max", "sigma_data", "retrain_every", "synthetic_size", "num_generate",
                "real_ratio", "device", "seed")

POSITIVE_INT_FIELDS = ("width", "depth", "train_steps", "sample_steps", "retrain_every",
                       "synthetic_size", "num_generate")

FUZZ = settings(max_examples=40, deadline=None, database=None)


# ---------------------------------------------------------------------------- presets
def test_design_field_names_exist():
    names = {f.name for f in dataclasses.fields(SynthERConfig)}
    assert set(FIXED_FIELDS) <= names


@pytest.mark.parametrize("field,value", sorted(PAPER_VALUES.items()))
def test_paper_preset_matches_seed(field, value):
    cfg = SynthERConfig.preset("paper")
    assert getattr(cfg, field) == value, field  # exact, not approximate


def test_paper_batch_size_rule():
    cfg = SynthERConfig.preset("paper")
    assert cfg.batch_size is None
    assert cfg.batch_size_for(10_000) == 256
    assert cfg.batch_size_for(999_999) == 256
    assert cfg.batch_size_for(1_000_000) == 1024
    # An explicit batch size wins over the rule.
    assert cfg.replace(batch_size=64).batch_size_for(1_000_000) == 64


@pytest.mark.parametrize("name", ["paper", "fast", "tiny"])
def test_presets_build_and_validate(name):
    cfg = SynthERConfig.preset(name)
    assert isinstance(cfg, SynthERConfig)
    cfg.validate()
    assert cfg.sampler in ("stochastic", "deterministic")
    assert 0.0 <= cfg.real_ratio <= 1.0


def test_fast_and_tiny_are_smaller_than_paper():
    paper, fast, tiny = (SynthERConfig.preset(n) for n in ("paper", "fast", "tiny"))
    assert fast.width * fast.depth < paper.width * paper.depth
    assert fast.train_steps < paper.train_steps
    assert tiny.width <= fast.width and tiny.train_steps <= fast.train_steps
    assert tiny.train_steps <= 5_000, "tiny must fit in seconds on a CPU"


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="bogus"):
        SynthERConfig.preset("bogus")


def test_paper_model_has_about_6m_params():
    """Seed B.2: width 1024 / depth 6 residual MLP is ~6M parameters (D=41 ~ cheetah transition)."""
    cfg = SynthERConfig.preset("paper").replace(device="cpu")
    n = TransitionDiffusion(41, cfg).num_params
    print(f"paper preset, dim=41: {n:,} parameters")
    assert 5_500_000 <= n <= 7_000_000


# ---------------------------------------------------------------------------- replace
def test_replace_returns_new_and_leaves_original():
    cfg = SynthERConfig.preset("paper")
    new = cfg.replace(retrain_every=5_000, real_ratio=0.25)
    assert new is not cfg
    assert new.retrain_every == 5_000 and new.real_ratio == 0.25
    assert cfg.retrain_every == 10_000 and cfg.real_ratio == 0.5
    # Everything else carried over.
    for f in dataclasses.fields(cfg):
        if f.name not in ("retrain_every", "real_ratio"):
            assert getattr(new, f.name) == getattr(cfg, f.name), f.name


def test_config_is_frozen():
    cfg = SynthERConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.width = 3  # type: ignore[misc]


def test_replace_unknown_field_raises_naming_it():
    with pytest.raises(ValueError, match="no_such_field"):
        SynthERConfig.preset("paper").replace(no_such_field=1)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("field,value", [
    ("width", 0), ("depth", 0), ("train_steps", -1), ("sample_steps", 0), ("retrain_every", -5),
    ("rff_dim", 15), ("real_ratio", 1.5), ("real_ratio", -0.1), ("sampler", "euler"),
    ("lr", 0.0), ("sigma_min", -1.0), ("ema_decay", 1.0), ("batch_size", 0), ("s_churn", -1.0),
    ("width", 2.5), ("train_steps", True), ("real_ratio", float("nan")), ("device", ""),
    ("compile", 1), ("compile", "yes"), ("async_retrain", 0), ("precision", "fp16"), ("precision", None),
    ("precision", "BF16"), ("gradients", "fast"), ("gradients", None), ("gradients", True),
    ("param_layout", "packed"), ("param_layout", False), ("min_real", 0), ("seed", 1.5), ("outlier_std", 0.0),
])
def test_invalid_values_raise_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SynthERConfig.preset("paper").replace(**{field: value})
    with pytest.raises(ValueError, match=field):
        SynthERConfig(**{field: value})


def test_numpy_scalars_are_stored_as_plain_python():
    """Values read from numpy (e.g. a sweep's grid) are accepted and stored as int / float, so
    to_dict stays JSON- and weights_only-safe."""
    import numpy as np

    cfg = SynthERConfig.preset("tiny").replace(width=np.int64(64), lr=np.float64(1e-3), batch_size=np.int32(32),
                                               real_ratio=np.float32(0.25), seed=np.int16(3))
    d = cfg.to_dict()
    assert (d["width"], d["batch_size"], d["seed"]) == (64, 32, 3) and d["real_ratio"] == 0.25
    for name in ("width", "batch_size", "seed"):
        assert type(d[name]) is int, name
    for name in ("lr", "real_ratio"):
        assert type(d[name]) is float, name
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize("field,default,others", [("gradients", "auto", ("manual", "autograd")),
                                                  ("param_layout", "auto", ("flat", "per_tensor"))])
def test_training_step_fields(field, default, others):
    """The fields that choose fit's training step: "auto" in every preset, the other values accepted."""
    for name in ("paper", "fast", "tiny"):
        assert getattr(SynthERConfig.preset(name), field) == default
    for value in others:
        assert getattr(SynthERConfig.preset("tiny").replace(**{field: value}), field) == value


def test_sigma_min_must_be_below_sigma_max():
    with pytest.raises(ValueError, match="sigma_min"):
        SynthERConfig(sigma_min=10.0, sigma_max=1.0)


@FUZZ
@given(st.one_of(st.floats(max_value=-1e-9, allow_nan=False),
                 st.floats(min_value=1.0 + 1e-9, allow_nan=False),
                 st.just(float("nan"))))
def test_real_ratio_outside_unit_interval_raises(value):
    with pytest.raises(ValueError, match="real_ratio"):
        SynthERConfig.preset("tiny").replace(real_ratio=value)


@FUZZ
@given(st.floats(min_value=0.0, max_value=1.0))
def test_real_ratio_inside_unit_interval_ok(value):
    assert SynthERConfig.preset("tiny").replace(real_ratio=value).real_ratio == value


@FUZZ
@given(field=st.sampled_from(POSITIVE_INT_FIELDS), value=st.integers(max_value=0))
def test_non_positive_ints_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SynthERConfig.preset("tiny").replace(**{field: value})


# ---------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("name", ["paper", "fast", "tiny"])
def test_to_dict_from_dict_round_trip(name):
    cfg = SynthERConfig.preset(name).replace(seed=7, device="cpu")
    d = cfg.to_dict()
    assert isinstance(d, dict) and d["seed"] == 7
    assert SynthERConfig.from_dict(d) == cfg
    # JSON-safe, and survives a JSON round trip.
    assert SynthERConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_from_dict_rejects_unknown_and_invalid():
    d = SynthERConfig.preset("tiny").to_dict()
    with pytest.raises(ValueError, match="mystery"):
        SynthERConfig.from_dict({**d, "mystery": 1})
    with pytest.raises(ValueError, match="width"):
        SynthERConfig.from_dict({**d, "width": -3})


def test_to_dict_values_are_plain_python():
    for v in SynthERConfig.preset("paper").to_dict().values():
        assert v is None or isinstance(v, (bool, int, float, str))
        if isinstance(v, float):
            assert math.isfinite(v)


def test_for_device_picks_paper_on_cuda_and_fast_on_cpu_and_says_so_once(caplog, monkeypatch):
    import logging

    import synther_buffer.config as config_mod

    monkeypatch.setattr(config_mod, "_ANNOUNCED", set())
    with caplog.at_level(logging.INFO, logger="synther_buffer"):
        cpu = SynthERConfig.for_device("cpu")
        SynthERConfig.for_device("cpu")
        cuda = SynthERConfig.for_device("cuda:1")
    assert cpu == SynthERConfig.preset("fast").replace(device="cpu")
    assert cuda == SynthERConfig.preset("paper").replace(device="cuda:1")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "'fast' preset for CPU" in said[0] and "'paper' preset for CUDA" in said[1]
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert SynthERConfig.for_device("auto") == SynthERConfig.preset("fast")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert SynthERConfig.for_device("auto") == SynthERConfig.preset("paper")
