"""SynthERConfig: presets (seed Tables 8/9, D.2), replace semantics, validation, serialisation."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synther_buffer import SynthERConfig, TransitionDiffusion
from synther_buffer.edm import sigma_schedule

SHARED = Path(__file__).resolve().parents[1].parent / "shared"   # the project's shared folder, beside the repo
DESIGN = SHARED / "DESIGN.md"
SEED = SHARED / "seed" / "synther-supplementary.txt"
DESIGN_STATS = ("env_steps", "num_real", "num_synthetic", "retrain_count", "last_train_loss", "last_fit_seconds",
                "last_generate_seconds", "real_ratio")

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
def _backticked_names(paragraph: str) -> list:
    """Identifiers in backticks (``width``), not quoted values (``"auto"``) or class names."""
    return re.findall(r"`([a-z_][a-z0-9_]*)`", paragraph)


def _design_paragraph(start: str) -> str:
    """The paragraph of ../shared/DESIGN.md (beside the repository) that begins with ``start``."""
    text = DESIGN.read_text()
    i = text.index(start)
    return text[i:text.find("\n\n", i)]


def test_design_field_names_exist():
    """Every SynthERConfig field name DESIGN.md fixes is a field (read from DESIGN.md where it is beside
    the repository, else the list as it was copied here), and so is every stats() key it names."""
    if DESIGN.is_file():
        fields = _backticked_names(_design_paragraph("`SynthERConfig` field names are fixed"))
        assert set(FIXED_FIELDS) <= set(fields), "the copy here lags DESIGN.md"
        stats = _backticked_names(_design_paragraph("`stats()` returns at least"))
    else:
        fields, stats = list(FIXED_FIELDS), list(DESIGN_STATS)
    assert len(fields) >= 22 and len(stats) >= 8
    names = {f.name for f in dataclasses.fields(SynthERConfig)}
    assert sorted(set(fields) - names) == []
    from synther_buffer import GenerativeReplay

    got = GenerativeReplay(2, 1, capacity=10, config=SynthERConfig.preset("tiny").replace(device="cpu")).stats()
    assert sorted(set(stats) - set(got)) == []


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


def _seed_number(text: str) -> float:
    """``3×10^{-4}`` -> 3e-4, ``100K`` -> 100000, ``1.003`` -> 1.003."""
    text = text.strip()
    m = re.fullmatch(r"([\d.]+)\s*×\s*10\^\{(-?\d+)\}", text)
    if m:
        return float(m.group(1)) * 10.0 ** int(m.group(2))
    scale = {"K": 1e3, "M": 1e6}.get(text[-1], 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


def _seed_table(number: int) -> dict:
    """Rows ``parameter<TAB>value`` of the seed's Table ``number``."""
    text = SEED.read_text()
    start = text.index(f"Table {number}:")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if "\t" not in line:
            if rows:
                break
            continue
        name, value = line.split("\t", 1)
        if name != "Parameter":
            rows[name.strip()] = value.strip()
    return rows


def test_paper_preset_equals_the_seed_tables():
    """The paper preset against Tables 8 and 9 and D.2 as the seed states them (parsed from
    ../shared/seed/synther-supplementary.txt beside the repository, else the values copied here)."""
    paper = SynthERConfig.preset("paper")
    if SEED.is_file():
        t8, t9 = _seed_table(8), _seed_table(9)
        seed = {"depth": _seed_number(t8["no. layers"]), "width": _seed_number(t8["width"]),
                "rff_dim": _seed_number(t8["RFF dimension"]), "lr": _seed_number(t8["learning rate"]),
                "train_steps": _seed_number(t8["model training steps"]),
                "sample_steps": _seed_number(t9["no. diffusion steps"]),
                "sigma_min": _seed_number(t9["σ_{\\min}"]), "sigma_max": _seed_number(t9["σ_{\\max}"]),
                "s_churn": _seed_number(t9["S_{churn}"]), "s_tmin": _seed_number(t9["$S_{t\\min}$"]),
                "s_tmax": _seed_number(t9["$S_{t\\max}$"]), "s_noise": _seed_number(t9["S_{noise}"])}
        batch = re.fullmatch(r"\{\s*(\d+) for online.*?,\s*(\d+) otherwise\s*\}", t8["batch size"])
        small_batch, large_batch = int(batch.group(1)), int(batch.group(2))
        online = re.search(r"every ([\d.]+[KM]) online steps, and generates ([\d.]+[KM]) transitions",
                           SEED.read_text())
        seed["retrain_every"], seed["num_generate"] = (_seed_number(g) for g in online.groups())
        assert t8["activation"] == "relu" and t8["optimizer"] == "Adam"
    else:
        seed = {k: PAPER_VALUES[k] for k in ("depth", "width", "rff_dim", "lr", "train_steps", "sample_steps",
                                             "sigma_min", "sigma_max", "s_churn", "s_tmin", "s_tmax", "s_noise",
                                             "retrain_every")}
        seed["num_generate"], small_batch, large_batch = 1_000_000, 256, 1024
    assert {k: getattr(paper, k) for k in seed} == pytest.approx(seed, rel=1e-12)
    assert (paper.batch_size_for(999_999), paper.batch_size_for(1_000_000)) == (small_batch, large_batch)
    assert paper.sampler == "stochastic"              # B.3: the stochastic SDE sampler


def _expected_params(d: int, c: SynthERConfig) -> int:
    """The residual MLP's trainable parameters by hand: proj, time MLP, linear_in, blocks, norm_out, linear_out."""
    t, w = c.time_dim, c.width
    return (d * t + t) + ((c.rff_dim + 1) * t + t + t * t + t) + (t * w + w) + c.depth * (2 * w + w * w + w) \
        + 2 * w + (w * d + d)


@pytest.mark.parametrize("name", ["paper", "fast", "tiny"])
def test_each_preset_builds_the_network_and_sampler_it_names(name):
    """A preset's fields reach the model: the denoiser's widths, depth and RFF size, and the sampler's
    noise levels, step count and churn."""
    cfg = SynthERConfig.preset(name).replace(device="cpu", progress=False)
    model = TransitionDiffusion(41, cfg)
    net = model.ema.net
    assert len(net.blocks) == cfg.depth and net.linear_in.out_features == cfg.width
    assert net.proj.out_features == cfg.time_dim and net.time_mlp[0].weights.numel() == cfg.rff_dim // 2
    assert model.num_params == _expected_params(41, cfg)
    sigmas = []
    model.ema.register_forward_pre_hook(lambda mod, args: sigmas.append(float(args[1].reshape(-1)[0])))
    model.fitted = True                                        # an untrained network samples as well
    model.sample(2, seed=0)
    assert len(sigmas) == 2 * cfg.sample_steps - 1            # Heun: no correction at the last step
    schedule = [float(s) for s in sigma_schedule(cfg.sample_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)]
    assert (schedule[0], schedule[-2], schedule[-1]) == pytest.approx((cfg.sigma_max, cfg.sigma_min, 0.0))
    gamma = min(cfg.s_churn / cfg.sample_steps, math.sqrt(2) - 1) if cfg.sampler == "stochastic" else 0.0
    churned = [t * (1 + (gamma if cfg.s_tmin <= t <= cfg.s_tmax else 0.0)) for t in schedule[:-1]]
    assert sigmas[0::2] == pytest.approx(churned, rel=1e-6)        # each step's Euler evaluation, at t_hat
    assert sigmas[1::2] == pytest.approx(schedule[1:-1], rel=1e-6)  # its correction, at t_next > 0
    assert (gamma > 0) == (cfg.sampler == "stochastic" and any(cfg.s_tmin <= t <= cfg.s_tmax for t in schedule))


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
    ("param_layout", "packed"), ("param_layout", False), ("min_real", 0), ("seed", 1.5), ("seed", -1), ("outlier_std", 0.0),
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


def test_churn_window_must_not_be_empty():
    with pytest.raises(ValueError, match="s_tmin"):
        SynthERConfig(s_tmin=60.0, s_tmax=50.0)
    assert SynthERConfig(s_tmin=50.0, s_tmax=50.0).s_tmin == 50.0   # one noise level is a window


def test_guidance_needs_a_trained_unconditional_branch():
    with pytest.raises(ValueError, match="cond_dropout=0"):
        SynthERConfig(cond_dropout=0.0, guidance_scale=2.0)
    with pytest.raises(ValueError, match="cond_dropout=0"):
        SynthERConfig(cond_dropout=0.0, guidance_scale=0.0)    # w = 0 is the unconditional model alone
    assert SynthERConfig(cond_dropout=0.0, guidance_scale=1.0).cond_dropout == 0.0   # conditional alone


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


# ============================================================================ data-size budget rule
def test_fast_budget_rule():
    """fast: 15K steps up to 10K rows, then sqrt growth, capped at 60K (benchmarks/FIDELITY.md)."""
    fast = SynthERConfig.preset("fast")
    assert [fast.train_steps_for(n) for n in (1_000, 10_000, 40_000, 100_000, 160_000, 10 ** 6)] == \
        [15_000, 15_000, 30_000, round(15_000 * 10 ** 0.5), 60_000, 60_000]


def test_paper_budget_is_fixed():
    """The paper trains 100K steps whatever the data size (Table 8): the rule is off in that preset."""
    paper = SynthERConfig.preset("paper")
    assert paper.train_steps_rows is None
    assert {paper.train_steps_for(n) for n in (2, 10_000, 1_000_000, 10 ** 9)} == {100_000}


def test_budget_rule_arithmetic():
    cfg = SynthERConfig(train_steps=15_000, train_steps_rows=10_000, train_steps_power=0.5)
    assert cfg.train_steps_for(5_000) == 15_000           # at or below n0: train_steps
    assert cfg.train_steps_for(10_000) == 15_000
    assert cfg.train_steps_for(40_000) == 30_000          # 15K * sqrt(4)
    assert cfg.train_steps_for(90_000) == 45_000
    linear = cfg.replace(train_steps_power=1.0)
    assert linear.train_steps_for(50_000) == 75_000       # constant epochs per fit
    assert cfg.replace(train_steps_power=0.0).train_steps_for(10 ** 7) == 15_000
    capped = cfg.replace(max_train_steps=40_000)
    assert capped.train_steps_for(90_000) == 40_000 and capped.train_steps_for(40_000) == 30_000
    assert cfg.train_steps_for(12_345) == round(15_000 * (12_345 / 10_000) ** 0.5)


@pytest.mark.parametrize("changes, field", [
    (dict(train_steps_rows=0), "train_steps_rows"), (dict(train_steps_rows=-5), "train_steps_rows"),
    (dict(train_steps_power=-0.1), "train_steps_power"), (dict(train_steps_power=float("nan")), "train_steps_power"),
    (dict(train_steps_power=3.0), "train_steps_power"), (dict(max_train_steps=0), "max_train_steps"),
    (dict(train_steps=20_000, max_train_steps=10_000), "max_train_steps"),
])
def test_budget_rule_validation(changes, field):
    with pytest.raises(ValueError, match=field):
        SynthERConfig.preset("fast").replace(**changes)


def test_fit_uses_the_budget_rule():
    """``fit`` without ``steps`` trains ``train_steps_for(len(x))`` steps; an explicit ``steps`` wins."""
    import numpy as np
    from synther_buffer import TransitionDiffusion

    cfg = SynthERConfig.preset("tiny").replace(width=16, depth=1, train_steps=4, train_steps_rows=100,
                                                train_steps_power=1.0, batch_size=32)
    x = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    model = TransitionDiffusion(3, cfg)
    assert model.fit(x[:100])["steps"] == 4
    assert model.fit(x)["steps"] == 12
    assert model.fit(x, steps=5)["steps"] == 5


def test_matches_record_accepts_fields_added_since_at_their_defaults():
    """A benchmark cell / unit recorded before a field existed still describes a config that leaves the
    new field at its default, and no other config."""
    cfg = SynthERConfig.preset("fast").replace(train_steps_rows=None)
    old = cfg.to_dict()
    del old["train_steps_rows"], old["warm_start"]          # written before these fields existed
    assert not SynthERConfig.preset("fast").matches_record(old)          # today's fast has a data-size rule
    assert cfg.matches_record(cfg.to_dict()) and cfg.matches_record(old)
    assert not cfg.replace(warm_start=True).matches_record(old)          # the new field is not at its default
    assert not cfg.replace(train_steps=1_000).matches_record(old)        # a recorded field differs
    assert not cfg.matches_record({**old, "no_such_field": 1})           # a field this version lacks
    assert not cfg.matches_record(None) and not cfg.matches_record("fast")
