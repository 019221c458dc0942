"""Normalizer: per-dimension standardisation with raw terminal and skip dimensions (seed A)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from synther_buffer.normalizer import Normalizer


def _rows(rng, n=5000):
    """[n, 5]: two scaled/shifted gaussians, a constant, a 0/1 terminal, a reward-like column."""
    a = 3.0 + 4.0 * rng.standard_normal(n)
    b = -7.0 + 0.01 * rng.standard_normal(n)
    const = np.full(n, 3.7)
    term = (rng.random(n) < 0.2).astype(np.float64)
    reward = 10.0 + 5.0 * rng.standard_normal(n)
    return np.stack([a, b, const, term, reward], axis=1).astype(np.float32)


def test_normalized_rows_have_zero_mean_unit_std(rng):
    x = _rows(rng)
    z = Normalizer(5).fit(x).normalize(x)
    for d in (0, 1, 4):
        assert abs(z[:, d].mean()) < 1e-4
        assert abs(z[:, d].std() - 1.0) < 1e-4


def test_round_trip_numpy_and_torch(rng):
    x = _rows(rng)
    norm = Normalizer(5).fit(x)
    z = norm.normalize(x)
    assert isinstance(z, np.ndarray) and z.dtype == np.float32
    np.testing.assert_allclose(norm.unnormalize(z), x, rtol=1e-5, atol=1e-4)

    xt = torch.from_numpy(x)
    zt = norm.normalize(xt)
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    np.testing.assert_allclose(zt.numpy(), z, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(norm.unnormalize(zt).numpy(), x, rtol=1e-5, atol=1e-4)


def test_constant_dimension_no_division_by_zero_exact_round_trip(rng):
    x = _rows(rng)
    norm = Normalizer(5).fit(x)
    assert norm.std[2] == 1.0  # constant column: std replaced by 1
    z = norm.normalize(x)
    assert np.isfinite(z).all()
    assert (z[:, 2] == 0.0).all()
    assert (norm.unnormalize(z)[:, 2] == x[:, 2]).all()  # exact
    # A model output of exactly 0 in normalized space maps back to the constant, exactly.
    assert (norm.unnormalize(np.zeros((3, 5), np.float32))[:, 2] == np.float32(3.7)).all()


def test_all_constant_input(rng):
    x = np.full((10, 3), -2.5, dtype=np.float32)
    norm = Normalizer(3).fit(x)
    z = norm.normalize(x)
    assert np.isfinite(z).all() and (z == 0).all()
    assert (norm.unnormalize(z) == x).all()


def test_terminal_dims_left_raw_and_thresholded_numpy(rng):
    x = _rows(rng)
    norm = Normalizer(5, terminal_dims=[3]).fit(x)
    assert norm.mean[3] == 0.0 and norm.std[3] == 1.0
    z = norm.normalize(x)
    np.testing.assert_array_equal(z[:, 3], x[:, 3])  # raw
    noisy = np.zeros((6, 5), np.float32)
    noisy[:, 3] = [-0.3, 0.2, 0.49, 0.51, 0.9, 1.7]
    out = norm.unnormalize(noisy)
    np.testing.assert_array_equal(out[:, 3], [0, 0, 0, 1, 1, 1])
    assert out.dtype == np.float32
    assert set(np.unique(norm.unnormalize(z)[:, 3])) <= {0.0, 1.0}


def test_terminal_dims_thresholded_torch(rng):
    x = _rows(rng)
    norm = Normalizer(5, terminal_dims=[3]).fit(x)
    noisy = torch.zeros(6, 5)
    noisy[:, 3] = torch.tensor([-0.3, 0.2, 0.49, 0.51, 0.9, 1.7])
    out = norm.unnormalize(noisy)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out[:, 3].tolist() == [0, 0, 0, 1, 1, 1]
    # The input tensor is not modified in place.
    assert noisy[:, 3].tolist() == pytest.approx([-0.3, 0.2, 0.49, 0.51, 0.9, 1.7])


def test_unnormalize_does_not_modify_numpy_input(rng):
    x = _rows(rng)
    norm = Normalizer(5, terminal_dims=[3]).fit(x)
    z = np.full((4, 5), 0.7, np.float32)
    before = z.copy()
    norm.unnormalize(z)
    np.testing.assert_array_equal(z, before)


def test_skip_dims_untouched(rng):
    x = _rows(rng)
    norm = Normalizer(5, skip_dims=[4]).fit(x)
    z = norm.normalize(x)
    np.testing.assert_array_equal(z[:, 4], x[:, 4])
    np.testing.assert_array_equal(norm.unnormalize(z)[:, 4], x[:, 4])
    # Skip dims are not rounded like terminals.
    assert len(np.unique(norm.unnormalize(z)[:, 4])) > 2
    # Other dims still normalized.
    assert abs(z[:, 0].std() - 1.0) < 1e-4


def test_terminal_and_skip_together(rng):
    x = _rows(rng)
    norm = Normalizer(5, terminal_dims=[3], skip_dims=[4]).fit(x)
    z = norm.normalize(x)
    np.testing.assert_array_equal(z[:, 3:], x[:, 3:])
    assert abs(z[:, 0].mean()) < 1e-4


def test_state_dict_round_trip_weights_only(rng):
    x = _rows(rng)
    norm = Normalizer(5, terminal_dims=[3], skip_dims=[4]).fit(x)
    buf = io.BytesIO()
    torch.save(norm.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    back = Normalizer.from_state_dict(state)
    assert back.dim == 5 and back.fitted
    assert back.terminal_dims == (3,) and back.skip_dims == (4,)
    np.testing.assert_array_equal(back.mean, norm.mean)
    np.testing.assert_array_equal(back.std, norm.std)
    z = rng.standard_normal((50, 5)).astype(np.float32)
    np.testing.assert_array_equal(back.unnormalize(z), norm.unnormalize(z))
    np.testing.assert_array_equal(back.normalize(x), norm.normalize(x))


def test_unfitted_normalizer_is_identity():
    norm = Normalizer(3)
    assert not norm.fitted
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(norm.normalize(x), x)


@pytest.mark.parametrize("kwargs", [
    dict(dim=0),
    dict(dim=3, terminal_dims=[3]),
    dict(dim=3, terminal_dims=[-1]),
    dict(dim=3, skip_dims=[7]),
    dict(dim=3, terminal_dims=[1, 1]),
])
def test_bad_dims_raise(kwargs):
    with pytest.raises(ValueError):
        Normalizer(**kwargs)


@pytest.mark.parametrize("x", [
    np.zeros((10, 4), np.float32),      # wrong width
    np.zeros(3, np.float32),            # 1-D
    np.zeros((1, 3), np.float32),       # a single row
])
def test_bad_fit_input_raises(x):
    with pytest.raises(ValueError):
        Normalizer(3).fit(x)
