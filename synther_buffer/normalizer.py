"""Per-dimension standardisation of transition vectors (seed A), with raw terminal and skip dimensions,
and the columns that cannot vary."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .validation import positive_int

_MIN_STD = 1e-6
# A column is constant when its range is within this many float32 ulps of its magnitude: max - min <=
# CONSTANT_RTOL * max(|x|). Relative, so a constant 1e-3 reward counts as one as a constant 1e3 does,
# and an all-zero column (range 0) always does.
CONSTANT_RTOL = 4 * float(np.finfo(np.float32).eps)


class Normalizer:
    """Maps rows to mean 0 / std 1 per dimension, fitted on real data at each retrain.

    ``fit`` also records the columns that are constant in the data (within float32 rounding of
    their magnitude; terminal and skip columns included) and their value: ``unnormalize`` writes
    that value into them exactly, so a model's output never scatters around a value every real row
    shares (a sparse reward before the first success, a sensor that never fires). Constant columns
    get std 1 so they never divide by zero.

    Args:
        dim: row width D.
        terminal_dims: columns holding 0/1 terminals: left raw, thresholded at 0.5 after sampling (seed A).
        skip_dims: columns left un-normalised (the reference DMC setup skips the reward).

    Raises:
        ValueError: ``dim`` is not a positive int, or a terminal / skip column is out of range or repeated.
    """

    def __init__(self, dim: int, terminal_dims: Sequence[int] = (), skip_dims: Sequence[int] = ()):
        self.dim = dim = positive_int("dim", dim)
        self.terminal_dims = _check_dims("terminal_dims", terminal_dims, dim)
        self.skip_dims = _check_dims("skip_dims", skip_dims, dim)
        self.mean = np.zeros(dim, dtype=np.float32)
        self.std = np.ones(dim, dtype=np.float32)
        self.constant = np.zeros(dim, dtype=bool)            # columns every fitted row shares ...
        self.constant_value = np.zeros(dim, dtype=np.float32)  # ... and their value (0 elsewhere)
        self.fitted = False

    def fit(self, x: np.ndarray) -> "Normalizer":
        """Fit mean/std on rows ``x`` [N, D] (float64 accumulation) and find the constant columns.

        Args:
            x: the real rows.

        Returns:
            ``self``.

        Raises:
            ValueError: ``x`` is not [N, D] with N >= 2.
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape [N, {self.dim}], got {x.shape}")
        if x.shape[0] < 2:
            raise ValueError(f"need at least 2 rows to fit a normalizer, got {x.shape[0]}")
        mean = x.mean(axis=0, dtype=np.float64)
        std = x.std(axis=0, dtype=np.float64)
        lo, hi = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
        constant = _constant(lo, hi)
        # the mean is the value itself for an exact constant; kept inside [min, max] otherwise
        self.constant_value = np.where(constant, np.clip(mean, lo, hi), 0.0).astype(np.float32)
        self.constant = constant
        std = np.where(std < _MIN_STD, 1.0, std)
        raw = list(self.terminal_dims) + list(self.skip_dims)
        mean[raw] = 0.0
        std[raw] = 1.0
        self.mean = mean.astype(np.float32)
        self.std = std.astype(np.float32)
        self.fitted = True
        return self

    def normalize(self, x):
        """(x - mean) / std; numpy or torch in, same type out."""
        mean, std = self._like(x)
        return (x - mean) / std

    def unnormalize(self, x):
        """x * std + mean, terminal columns rounded to {0, 1} at 0.5, constant columns set to their value.

        Args:
            x: normalised rows [..., D], numpy or torch.

        Returns:
            The rows in data units, of the same type (a new array / tensor).
        """
        mean, std = self._like(x)
        y = x * std + mean
        if self.terminal_dims:
            idx = list(self.terminal_dims)
            y[..., idx] = (y[..., idx] > 0.5).astype(y.dtype) if isinstance(y, np.ndarray) \
                else (y[..., idx] > 0.5).to(y.dtype)
        if self.constant.any():
            idx = np.flatnonzero(self.constant).tolist()
            value = self.constant_value[idx]
            y[..., idx] = value.astype(y.dtype) if isinstance(y, np.ndarray) \
                else torch.as_tensor(value, device=y.device, dtype=y.dtype)
        return y

    def _like(self, x):
        if isinstance(x, torch.Tensor):
            return (torch.as_tensor(self.mean, device=x.device, dtype=x.dtype),
                    torch.as_tensor(self.std, device=x.device, dtype=x.dtype))
        return self.mean, self.std

    def state_dict(self) -> dict:
        """Tensors and plain lists only: loads with ``torch.load(weights_only=True)``."""
        return {"dim": self.dim, "terminal_dims": list(self.terminal_dims), "skip_dims": list(self.skip_dims),
                "mean": torch.from_numpy(self.mean.copy()), "std": torch.from_numpy(self.std.copy()),
                "constant": torch.from_numpy(self.constant.copy()),
                "constant_value": torch.from_numpy(self.constant_value.copy()), "fitted": self.fitted}

    @classmethod
    def from_state_dict(cls, d: dict) -> "Normalizer":
        """Rebuild from ``state_dict()``; states saved before constant columns were recorded have none.

        Args:
            d: what ``state_dict()`` returned.

        Returns:
            The normaliser.

        Raises:
            ValueError: mean / std / constants of the wrong shape, not finite, or std <= 0.
        """
        n = cls(d["dim"], d["terminal_dims"], d["skip_dims"])
        mean, std = d["mean"].numpy().astype(np.float32), d["std"].numpy().astype(np.float32)
        if mean.shape != (n.dim,) or std.shape != (n.dim,):
            raise ValueError(f"normalizer mean/std shapes {mean.shape}/{std.shape} != ({n.dim},)")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError("normalizer mean/std must be finite with std > 0")
        if "constant" in d:
            constant = d["constant"].numpy().astype(bool)
            value = d["constant_value"].numpy().astype(np.float32)
            if constant.shape != (n.dim,) or value.shape != (n.dim,) or not np.isfinite(value).all():
                raise ValueError(f"normalizer constants of shapes {constant.shape}/{value.shape} (need ({n.dim},), "
                                 "finite)")
            n.constant, n.constant_value = constant, value
        n.mean, n.std = mean, std
        n.fitted = bool(d["fitted"])
        return n


def constant_columns(x: np.ndarray) -> np.ndarray:
    """Which columns of rows ``x`` [N, D] are constant: range within ``CONSTANT_RTOL`` of their magnitude."""
    return _constant(x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64))


def _constant(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``constant_columns`` from the columns' float64 minima and maxima."""
    return hi - lo <= CONSTANT_RTOL * np.maximum(np.abs(lo), np.abs(hi))


def _check_dims(name: str, dims: Sequence[int], dim: int) -> tuple:
    out = tuple(int(d) for d in dims)
    for d in out:
        if not 0 <= d < dim:
            raise ValueError(f"{name} entry {d} out of range for dim={dim}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {out}")
    return out
