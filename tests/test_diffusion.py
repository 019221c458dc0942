"""TransitionDiffusion: fidelity on known data (with negative controls), terminals, constant columns,
save/load, input validation, determinism. CPU, "tiny" preset, seconds per fit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from synther_buffer import DiffusionTrainingError, SynthERConfig, TransitionDiffusion

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MODES = (-2.0, 2.0)
MODE_STD = 0.3


def _tiny(**changes) -> SynthERConfig:
    return SynthERConfig.preset("tiny").replace(device="cpu", **changes)


# ============================================================================ fidelity checks
def mixture_stats(y: np.ndarray, data: np.ndarray) -> dict:
    near = np.abs(np.abs(y[:, 0]) - 2.0)           # distance of x to the nearest mode (+-2)
    in_mode = near < 0.75
    return {
        "mean": y.mean(0), "std": y.std(0), "data_mean": data.mean(0), "data_std": data.std(0),
        "mode_frac": float(in_mode.mean()),
        "pos_frac": float((y[:, 0] > 0).mean()),
        "mode_rms": float(np.sqrt((near[in_mode] ** 2).mean())) if in_mode.any() else float("nan"),
    }


def mixture_matches(y: np.ndarray, data: np.ndarray) -> bool:
    """Do samples ``y`` match the 2-D mixture ``data`` (x: modes at +-2, std 0.3; y: N(0, 0.5^2))?

    Tolerances (tiny preset, 4000 rows, 1000 steps; measured over seeds 0/1, both samplers:
    |dmean| <= 0.094 std, std ratio 0.975-1.06, mode fraction 0.94-0.97, positive-mode fraction
    0.46-0.55, within-mode rms 0.24-0.32), with margin:
      * |mean - data mean| <= 0.15 * data std, per dimension;
      * std / data std in [0.85, 1.15], per dimension;
      * fraction of samples with x within 0.75 of a mode > 0.8 (bimodality);
      * fraction in the positive mode in [0.35, 0.65] (both modes populated);
      * rms distance to the mode, among those near one, in [0.15, 0.45] (modes not collapsed).
    """
    s = mixture_stats(y, data)
    return bool(
        np.all(np.abs(s["mean"] - s["data_mean"]) <= 0.15 * s["data_std"])
        and np.all(np.abs(s["std"] / s["data_std"] - 1.0) <= 0.15)
        and s["mode_frac"] > 0.8
        and 0.35 <= s["pos_frac"] <= 0.65
        and 0.15 <= s["mode_rms"] <= 0.45
    )


def gaussian_stats(y: np.ndarray, data: np.ndarray) -> dict:
    sd = data.std(0)
    return {
        "mean_err": float(np.max(np.abs(y.mean(0) - data.mean(0)) / sd)),
        "std_err": float(np.max(np.abs(y.std(0) / sd - 1.0))),
        "corr_err": float(np.max(np.abs(np.corrcoef(y.T) - np.corrcoef(data.T)))),
    }


def gaussian_matches(y: np.ndarray, data: np.ndarray) -> bool:
    """Do samples ``y`` match the correlated Gaussian ``data`` in means, stds and correlations?

    Tolerances (tiny preset, 8-D, 4000 rows; measured over 3 random covariances x 2 samplers:
    max |dmean|/std 0.08-0.16, max |std ratio - 1| 0.04-0.13, max |dcorr| 0.10-0.12), with margin:
      * max |mean - data mean| / data std <= 0.25;
      * max |std / data std - 1| <= 0.25;
      * max |corr - data corr| <= 0.25 (the data's correlations reach ~0.77; noise scores ~0.76).
    """
    s = gaussian_stats(y, data)
    return s["mean_err"] <= 0.25 and s["std_err"] <= 0.25 and s["corr_err"] <= 0.25


def make_gaussian8(n: int = 4000, seed: int = 0) -> np.ndarray:
    """Correlated 8-D Gaussian: 2-factor correlation (max |corr| 0.77 at seed 0), stds in [0.5, 3],
    means in [-3, 3]."""
    r = np.random.default_rng(seed)
    d = 8
    w = r.standard_normal((d, 2))
    cov = w @ w.T + np.diag(r.uniform(0.3, 1.0, d))
    s = np.sqrt(np.diag(cov))
    corr = cov / np.outer(s, s)
    stds, means = r.uniform(0.5, 3.0, d), r.uniform(-3.0, 3.0, d)
    return r.multivariate_normal(means, corr * np.outer(stds, stds), size=n).astype(np.float32)


def noise_control(model: TransitionDiffusion, n: int, seed: int = 5) -> np.ndarray:
    """A "model that outputs noise": standard normal rows pushed through the fitted normalizer, so
    per-dimension means and stds are right but there is no structure."""
    z = np.random.default_rng(seed).standard_normal((n, model.dim)).astype(np.float32)
    return model.normalizer.unnormalize(z)


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def mixture_data(make_mixture_2d):
    return make_mixture_2d(4000, modes=MODES, mode_std=MODE_STD, y_std=0.5, seed=0)


@pytest.fixture(scope="module")
def mixture_model(torch_one_thread, mixture_data):
    model = TransitionDiffusion(2, _tiny())
    info = model.fit(mixture_data)
    assert np.isfinite(info["loss"]) and info["steps"] == model.config.train_steps
    return model


@pytest.fixture(scope="module")
def gaussian8_data():
    return make_gaussian8(4000, seed=0)


@pytest.fixture(scope="module")
def gaussian8_model(torch_one_thread, gaussian8_data):
    model = TransitionDiffusion(8, _tiny())
    model.fit(gaussian8_data)
    return model


@pytest.fixture(scope="module")
def mixed_columns_data():
    """[a, b, const 5.0, terminal] with terminal = (a > 0.524) (rate ~0.3), b correlated with a."""
    r = np.random.default_rng(1)
    n = 2000
    a = r.standard_normal(n)
    b = 0.5 * a + r.standard_normal(n)
    term = (a > 0.524).astype(np.float64)
    return np.stack([a, b, np.full(n, 5.0), term], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def mixed_columns_model(torch_one_thread, mixed_columns_data):
    model = TransitionDiffusion(4, _tiny(), terminal_dims=[3])
    model.fit(mixed_columns_data, steps=500)
    return model


# ============================================================================ fidelity
def test_mixture_fidelity(mixture_model, mixture_data):
    y = mixture_model.sample(4000, seed=123)
    assert y.shape == (4000, 2) and y.dtype == np.float32
    stats = mixture_stats(y, mixture_data)
    print("tiny 2-D mixture (deterministic):", stats)
    assert mixture_matches(y, mixture_data), stats


def test_mixture_fidelity_stochastic_sampler(mixture_model, mixture_data):
    state = mixture_model.state_dict()
    state["config"] = {**state["config"], "sampler": "stochastic"}
    model = TransitionDiffusion.from_state_dict(state)
    assert model.config.sampler == "stochastic"
    y = model.sample(4000, seed=123)
    stats = mixture_stats(y, mixture_data)
    print("tiny 2-D mixture (stochastic):", stats)
    assert mixture_matches(y, mixture_data), stats


def test_mixture_check_rejects_noise_control(mixture_model, mixture_data, make_mixture_2d):
    """Negative control: right means/stds, no modes. The check must fail (on bimodality)."""
    y = noise_control(mixture_model, 4000)
    stats = mixture_stats(y, mixture_data)
    assert mixture_matches(y, mixture_data) is False, stats
    assert stats["mode_frac"] < 0.5
    # The check is also sensitive to the real data itself (sanity of the check).
    assert mixture_matches(make_mixture_2d(4000, seed=9), mixture_data) is True


def test_mixture_check_rejects_untrained_model(mixture_data):
    """Negative control: same architecture, normalizer fitted, but 1 training step."""
    model = TransitionDiffusion(2, _tiny())
    model.fit(mixture_data, steps=1)
    y = model.sample(4000, seed=123)
    assert mixture_matches(y, mixture_data) is False, mixture_stats(y, mixture_data)


def test_gaussian8_fidelity_and_controls(gaussian8_model, gaussian8_data):
    data = gaussian8_data
    off = np.corrcoef(data.T)[~np.eye(8, dtype=bool)]
    assert 0.7 < np.abs(off).max() < 0.85  # the data really is strongly correlated

    y = gaussian8_model.sample(4000, seed=123)
    stats = gaussian_stats(y, data)
    print("tiny 8-D gaussian:", stats)
    assert gaussian_matches(y, data), stats

    noise = noise_control(gaussian8_model, 4000)
    noise_stats = gaussian_stats(noise, data)
    assert gaussian_matches(noise, data) is False, noise_stats
    assert noise_stats["corr_err"] > 0.5  # fails on the correlations, as intended

    untrained = TransitionDiffusion(8, _tiny())
    untrained.fit(data, steps=1)
    y0 = untrained.sample(4000, seed=123)
    assert gaussian_matches(y0, data) is False, gaussian_stats(y0, data)

    # Sanity of the check: an independent draw from the true distribution passes.
    assert gaussian_matches(make_gaussian8(4000, seed=0)[::-1].copy(), data)


# ============================================================================ terminals, constants
def test_terminal_column_comes_back_binary(mixed_columns_model, mixed_columns_data):
    y = mixed_columns_model.sample(2000, seed=1)
    term = y[:, 3]
    assert set(np.unique(term)) <= {0.0, 1.0}
    rate, data_rate = term.mean(), mixed_columns_data[:, 3].mean()
    assert abs(rate - data_rate) < 0.1, (rate, data_rate)  # measured 0.289 vs 0.292
    # The model learned that terminal follows a > 0.524 (measured P = 0.89 vs 0.03).
    hi = y[:, 0] > 0.524
    assert term[hi].mean() > 0.6 and term[~hi].mean() < 0.2


def test_constant_column_through_fit_and_sample(mixed_columns_model):
    y = mixed_columns_model.sample(2000, seed=2)
    assert np.isfinite(y).all()
    assert (y[:, 2] == 5.0).all()        # constant in the data: exactly the constant (normalizer.py)
    assert mixed_columns_model.normalizer.std[2] == 1.0 and mixed_columns_model.normalizer.constant[2]
    assert 0.8 < y[:, 0].std() < 1.2


def test_all_constant_data_fits():
    x = np.tile(np.array([[1.5, -3.0]], np.float32), (50, 1))
    model = TransitionDiffusion(2, _tiny())
    model.fit(x, steps=20)
    y = model.sample(10, seed=0)
    assert np.isfinite(y).all()


# ============================================================================ persistence
def test_save_load_round_trip_identical_samples(mixture_model, tmp_path):
    path = tmp_path / "sub" / "model.pt"
    mixture_model.save(path)
    assert path.exists() and not (tmp_path / "sub" / "model.pt.tmp").exists()
    loaded = TransitionDiffusion.load(path)
    assert loaded.fitted and loaded.dim == 2
    assert loaded.config == mixture_model.config
    a = mixture_model.sample(500, seed=123)
    b = loaded.sample(500, seed=123)
    np.testing.assert_array_equal(a, b)
    # Loaded with an explicit device override, too.
    c = TransitionDiffusion.load(str(path), device="cpu").sample(500, seed=123)
    np.testing.assert_array_equal(a, c)


def test_saved_file_loads_with_weights_only(mixed_columns_model, tmp_path):
    path = tmp_path / "m.pt"
    mixed_columns_model.save(path)
    state = torch.load(path, weights_only=True)
    assert state["format"] == "synther_buffer.TransitionDiffusion"
    assert state["dim"] == 4
    loaded = TransitionDiffusion.load(path)
    assert loaded.normalizer.terminal_dims == (3,)
    np.testing.assert_array_equal(loaded.sample(100, seed=3), mixed_columns_model.sample(100, seed=3))


def test_truncated_or_garbage_file_raises_value_error(mixture_model, tmp_path):
    good = tmp_path / "good.pt"
    mixture_model.save(good)
    raw = good.read_bytes()
    cases = {
        "truncated.pt": raw[: len(raw) // 2],
        "garbage.pt": b"this is not a checkpoint" * 10,
        "empty.pt": b"",
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError):
            TransitionDiffusion.load(p)
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError):
        TransitionDiffusion.load(foreign)
    wrong_version = tmp_path / "v99.pt"
    torch.save({**mixture_model.state_dict(), "version": 99}, wrong_version)
    with pytest.raises(ValueError):
        TransitionDiffusion.load(wrong_version)
    with pytest.raises(FileNotFoundError):
        TransitionDiffusion.load(tmp_path / "missing.pt")


# ============================================================================ errors
def test_sample_before_fit_raises(tmp_path):
    model = TransitionDiffusion(3, _tiny())
    with pytest.raises(RuntimeError):
        model.sample(10)
    # An unfitted model survives save/load as unfitted.
    model.save(tmp_path / "unfitted.pt")
    with pytest.raises(RuntimeError):
        TransitionDiffusion.load(tmp_path / "unfitted.pt").sample(10)


@pytest.mark.parametrize("x", [
    np.zeros(10, np.float32),                                  # 1-D
    np.zeros((10, 4), np.float32),                             # wrong width
    np.zeros((10, 3, 1), np.float32),                          # 3-D
    np.zeros((1, 3), np.float32),                              # a single row
    np.array([[0.0, 1.0, np.nan]] * 5, np.float32),            # NaN
    np.array([[0.0, np.inf, 1.0]] * 5, np.float32),            # inf
    np.array([["a", "b", "c"]] * 5),                           # not numeric
    np.array([[0.0, 1e39, 1.0]] * 5, np.float64),              # finite, but inf in float32
], ids=["1d", "width", "3d", "one-row", "nan", "inf", "strings", "beyond-float32"])
def test_fit_bad_input_raises(x):
    model = TransitionDiffusion(3, _tiny())
    with pytest.raises(ValueError):
        model.fit(x, steps=2)
    assert not model.fitted


def test_failed_fit_keeps_previous_model(rng):
    x = rng.standard_normal((200, 3)).astype(np.float32)
    model = TransitionDiffusion(3, _tiny())
    model.fit(x, steps=20)
    before = model.sample(50, seed=4)
    bad = x.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError):
        model.fit(bad, steps=20)
    assert model.fitted
    np.testing.assert_array_equal(model.sample(50, seed=4), before)


# ============================================================================ torch.compile (opt-in)
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("gradients", ["manual", "autograd"])
def test_compiled_fit_matches_eager(rng, gradients):
    """config.compile=True trains the same model as eager (same draws; fused kernels only reorder
    float sums), and says it compiled: on the hand-written gradients and on the autograd path."""
    x = rng.standard_normal((300, 3)).astype(np.float32)
    eager = TransitionDiffusion(3, _tiny(gradients=gradients))
    compiled = TransitionDiffusion(3, _tiny(compile=True, gradients=gradients))
    a, b = eager.fit(x, steps=60), compiled.fit(x, steps=60)
    assert a["compiled"] is False and b["compiled"] is True
    assert a["gradients"] == b["gradients"] == gradients
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    for (name, pa), pb in zip(eager.ema.state_dict().items(), compiled.ema.state_dict().values()):
        torch.testing.assert_close(pb, pa, rtol=1e-3, atol=1e-4, msg=name)
    np.testing.assert_allclose(compiled.sample(64, seed=1), eager.sample(64, seed=1), rtol=1e-3, atol=1e-3)


def test_compile_failure_falls_back_to_eager(rng, monkeypatch, caplog):
    """If compilation raises on the first step, the fit warns and trains eagerly: no lost retrain,
    and exactly the eager model (the step's noise was drawn before the failed call)."""
    import synther_buffer.train_step as train_step

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(train_step, "compiled", lambda fn: broken)   # fault injection
    x = rng.standard_normal((300, 3)).astype(np.float32)
    eager, fallback = TransitionDiffusion(3, _tiny()), TransitionDiffusion(3, _tiny(compile=True))
    eager.fit(x, steps=30)
    with caplog.at_level("WARNING", logger="synther_buffer.train_step"):
        info = fallback.fit(x, steps=30)
    assert info["compiled"] is False
    assert any("torch.compile failed" in r.getMessage() and "no C++ compiler" in r.getMessage()
               for r in caplog.records)
    for pa, pb in zip(eager.ema.state_dict().values(), fallback.ema.state_dict().values()):
        assert torch.equal(pa, pb)


# ============================================================================ the training step's choice
class GeluTimeMLP(TransitionDiffusion):
    """A maintainer's edit of the denoiser: GELU instead of SiLU in the time MLP, which the hand-written
    gradients (derived for SiLU) would get wrong."""

    def _build_network(self, seed: int):
        net = super()._build_network(seed)
        net.net.time_mlp[2] = nn.GELU()
        return net


def test_modified_denoiser_falls_back_to_autograd_and_learns(mixture_data, caplog, monkeypatch):
    """gradients="auto" (and "manual") on a network the structure check refuses: one warning, naming
    the change; the fit trains with autograd's gradients (bit-for-bit the model of an explicit
    gradients="autograd" fit) and still learns the 2-D mixture."""
    import synther_buffer.train_step as train_step

    monkeypatch.setattr(train_step, "_WARNED", set())   # warned once per process: start afresh
    with caplog.at_level("WARNING", logger="synther_buffer.train_step"):
        model = GeluTimeMLP(2, _tiny())
        info = model.fit(mixture_data)
        assert GeluTimeMLP(2, _tiny(gradients="manual")).fit(mixture_data, steps=5)["gradients"] == "autograd"
    assert info["gradients"] == "autograd"
    said = [r.getMessage() for r in caplog.records if "hand-written gradients" in r.getMessage()]
    assert len(said) == 1 and "GELU" in said[0] and "autograd" in said[0], said

    ref = GeluTimeMLP(2, _tiny(gradients="autograd"))
    ref.fit(mixture_data)
    for (name, a), b in zip(model.ema.state_dict().items(), ref.ema.state_dict().values()):
        assert torch.equal(a, b), name
    assert isinstance(model.ema.net.time_mlp[2], nn.GELU)
    y = model.sample(4000, seed=123)
    assert mixture_matches(y, mixture_data), mixture_stats(y, mixture_data)


def test_removed_module_switches_warn(rng):
    """MANUAL_GRADIENTS / FLAT_MAX_PARAMS_CPU no longer steer fit: reading or assigning one warns and
    names the config field that does; an assignment changes nothing."""
    import synther_buffer.diffusion as diffusion_mod

    with pytest.warns(DeprecationWarning, match="gradients="):
        assert diffusion_mod.MANUAL_GRADIENTS is True
    with pytest.warns(DeprecationWarning, match="param_layout="):
        assert diffusion_mod.FLAT_MAX_PARAMS_CPU == 1_000_000
    try:
        with pytest.warns(DeprecationWarning, match="no longer read"):
            diffusion_mod.MANUAL_GRADIENTS = False
        info = TransitionDiffusion(3, _tiny()).fit(rng.standard_normal((50, 3)).astype(np.float32), steps=2)
        assert info["gradients"] == "manual"
    finally:
        vars(diffusion_mod).pop("MANUAL_GRADIENTS", None)


def test_default_config_follows_the_device(monkeypatch, caplog):
    """config=None is SynthERConfig.for_device("auto"): the fast preset on a CPU-only machine, said
    once at INFO (the paper preset on CUDA: tests/test_config.py)."""
    import synther_buffer.config as config_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config_mod, "_ANNOUNCED", set())
    with caplog.at_level("INFO", logger="synther_buffer.config"):
        a, b = TransitionDiffusion(3), TransitionDiffusion(3, None)
    assert a.config == b.config == SynthERConfig.preset("fast")
    assert a.device.type == "cpu" and a.config.width == SynthERConfig.preset("fast").width
    said = [r.getMessage() for r in caplog.records if "preset" in r.getMessage()]
    assert len(said) == 1 and "'fast' preset for CPU" in said[0]


def test_files_saved_before_the_new_config_fields_load(mixture_model):
    """A state dict whose config has no gradients / param_layout (files saved before they existed)
    loads, the missing fields at their defaults, and samples as the model does."""
    state = mixture_model.state_dict()
    state["config"] = {k: v for k, v in state["config"].items() if k not in ("gradients", "param_layout")}
    loaded = TransitionDiffusion.from_state_dict(state)
    assert loaded.config.gradients == "auto" and loaded.config.param_layout == "auto"
    np.testing.assert_array_equal(loaded.sample(100, seed=2), mixture_model.sample(100, seed=2))


# ============================================================================ precision="bf16" (opt-in)
@pytest.mark.parametrize("gradients", ["manual", "autograd"])
def test_bf16_fit_and_sample_learn_the_mixture(mixture_data, mixture_model, gradients):
    """precision='bf16' (bfloat16 matmuls in training and sampling) still learns the 2-D mixture, on
    the hand-written gradients and on autograd under autocast, to about the fp32 model's loss."""
    model = TransitionDiffusion(2, _tiny(precision="bf16", gradients=gradients))
    info = model.fit(mixture_data)
    assert info["gradients"] == gradients
    assert info["loss"] == pytest.approx(mixture_model.last_fit["loss"], rel=0.05)
    y = model.sample(4000, seed=123)
    assert y.dtype == np.float32
    assert mixture_matches(y, mixture_data), mixture_stats(y, mixture_data)
    assert all(p.dtype == torch.float32 for p in model.ema.parameters())   # fp32 weights kept


def test_bf16_sampling_differs_from_fp32_by_rounding_only(mixture_model):
    """The same fitted weights sampled with the same noise in bf16 and fp32: not bit-equal (bf16
    really ran), close (rounding, not a different computation); the model's weights stay fp32."""
    state = mixture_model.state_dict()
    state["config"] = {**state["config"], "precision": "bf16"}
    bf16 = TransitionDiffusion.from_state_dict(state)
    assert bf16.config.precision == "bf16"
    a, b = mixture_model.sample(2000, seed=5), bf16.sample(2000, seed=5)
    assert not np.array_equal(a, b)
    assert np.abs(a - b).mean() < 0.02 and np.median(np.abs(a - b)) < 0.01, np.abs(a - b).mean()
    assert all(p.dtype == torch.float32 for p in bf16.ema.parameters())
    assert np.array_equal(bf16.sample(500, seed=6), bf16.sample(500, seed=6))  # still deterministic


def test_bf16_without_native_support_warns(monkeypatch, caplog):
    import synther_buffer.diffusion as diffusion_mod

    monkeypatch.setattr(diffusion_mod, "bf16_is_native", lambda device: False)
    with caplog.at_level("WARNING", logger="synther_buffer.diffusion"):
        TransitionDiffusion(2, _tiny(precision="bf16"))
        TransitionDiffusion(2, _tiny())                      # fp32: nothing to warn about
    msgs = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert len(msgs) == 1 and "slower" in msgs[0]


def test_bad_constructor_and_sample_args(rng):
    with pytest.raises(ValueError):
        TransitionDiffusion(0, _tiny())
    with pytest.raises(ValueError):
        TransitionDiffusion(3, {"width": 8})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TransitionDiffusion(3, _tiny(), terminal_dims=[3])
    model = TransitionDiffusion(3, _tiny())
    with pytest.raises(ValueError):
        model.fit(rng.standard_normal((20, 3)), steps=0)
    model.fit(rng.standard_normal((20, 3)), steps=2)
    for n in (-1, 2.5):
        with pytest.raises(ValueError):
            model.sample(n)  # type: ignore[arg-type]
    assert model.sample(0).shape == (0, 3)
    y = model.sample(25, batch_size=10, seed=0)  # batches not dividing n
    assert y.shape == (25, 3) and y.dtype == np.float32 and np.isfinite(y).all()


def test_training_error_is_runtime_error():
    assert issubclass(DiffusionTrainingError, RuntimeError)


# ============================================================================ determinism
def test_same_config_same_data_same_samples(rng):
    x = np.concatenate([rng.standard_normal((300, 3)), 3 + rng.standard_normal((300, 3))]).astype(np.float32)
    a = TransitionDiffusion(3, _tiny(seed=11))
    b = TransitionDiffusion(3, _tiny(seed=11))
    a.fit(x, steps=100)
    b.fit(x, steps=100)
    ya, yb = a.sample(200, seed=7), b.sample(200, seed=7)
    np.testing.assert_array_equal(ya, yb)
    # Different sampling seeds differ; repeated default-seeded calls differ too.
    assert not np.array_equal(a.sample(200, seed=8), ya)
    assert not np.array_equal(a.sample(200), a.sample(200))
    # A different config seed gives a different model.
    c = TransitionDiffusion(3, _tiny(seed=12))
    c.fit(x, steps=100)
    assert not np.array_equal(c.sample(200, seed=7), ya)


# ============================================================================ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_sample_returns_float32_numpy(tmp_path, make_mixture_2d):
    x = make_mixture_2d(1000, seed=0)
    model = TransitionDiffusion(2, SynthERConfig.preset("tiny").replace(device="cuda"))
    assert model.device.type == "cuda"
    model.fit(x, steps=200)
    y = model.sample(500, seed=0)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (500, 2)
    assert np.isfinite(y).all()
    # A CUDA checkpoint loads on the CPU and samples.
    model.save(tmp_path / "cuda.pt")
    cpu = TransitionDiffusion.load(tmp_path / "cuda.pt", device="cpu")
    y_cpu = cpu.sample(500, seed=0)
    assert y_cpu.dtype == np.float32 and np.isfinite(y_cpu).all()


def test_sample_sampler_override_per_call(tiny_cfg):
    """sampler / sample_steps override the config for one call, validated like config fields."""
    x = np.random.default_rng(0).standard_normal((400, 3)).astype(np.float32)
    model = TransitionDiffusion(3, tiny_cfg.replace(train_steps=50))
    model.fit(x)
    base = model.sample(64, seed=5)
    same = model.sample(64, seed=5, sampler=tiny_cfg.sampler, sample_steps=tiny_cfg.sample_steps)
    other = model.sample(64, seed=5, sampler="stochastic", sample_steps=8)
    np.testing.assert_array_equal(base, same)
    assert not np.allclose(base, other)
    assert model.config == tiny_cfg.replace(train_steps=50)   # the config itself is untouched
    with pytest.raises(ValueError, match="sampler"):
        model.sample(4, sampler="euler")
    with pytest.raises(ValueError, match="sample_steps"):
        model.sample(4, sample_steps=0)
