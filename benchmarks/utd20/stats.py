"""Aggregate statistics over runs and tasks: IQM, stratified-bootstrap CIs and probability of improvement
(rliable's definitions; rliable itself when importable), and the per-env return normalisation."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

# D4RL's reference returns (random, expert) for its v2 MuJoCo tasks, used to normalise gymnasium scores.
GYM_REFERENCE = {"HalfCheetah": (-280.178953, 12135.0), "Walker2d": (1.629008, 4592.3),
                 "Hopper": (-20.272305, 3234.3)}


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle 50% of all values (scipy ``trim_mean(x, 0.25)``,
    rliable's ``aggregate_iqm``): drop ``int(0.25 n)`` values from each end of the sorted data."""
    v = np.sort(np.asarray(x, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("iqm of no values")
    cut = int(0.25 * v.size)
    return float(v[cut:v.size - cut].mean())


def stratified_bootstrap_ci(scores: np.ndarray, stat: Callable[[np.ndarray], float] = iqm, reps: int = 2000,
                            alpha: float = 0.05, seed: int = 0) -> Tuple[float, float]:
    """Percentile CI of ``stat`` over a ``[runs, tasks]`` score matrix, resampling runs with replacement
    within each task (column) independently (rliable's stratified bootstrap)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty [runs, tasks] matrix, got shape {scores.shape}")
    n, m = scores.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(reps, n, m))
    cols = np.arange(m)[None, None, :]
    stats = np.array([stat(scores[idx[r], cols[0]]) for r in range(reps)])
    return float(np.percentile(stats, 100 * alpha / 2)), float(np.percentile(stats, 100 * (1 - alpha / 2)))


def probability_of_improvement(x: Sequence[Sequence[float]], y: Sequence[Sequence[float]]) -> float:
    """P(X > Y) averaged over tasks (rliable's definition): for each task, the fraction of (x run, y run)
    pairs where x's score is higher, ties counting one half; then the mean over tasks.

    Args:
        x, y: per task, the runs' scores: ``x[t]`` and ``y[t]`` are sequences (their lengths may differ).
    """
    if len(x) != len(y) or not len(x):
        raise ValueError(f"x and y need the same non-zero number of tasks, got {len(x)} and {len(y)}")
    per_task = []
    for xt, yt in zip(x, y):
        a, b = np.asarray(xt, dtype=np.float64)[:, None], np.asarray(yt, dtype=np.float64)[None, :]
        if a.size == 0 or b.size == 0:
            raise ValueError("every task needs at least one run of each arm")
        per_task.append(float(np.mean((a > b) + 0.5 * (a == b))))
    return float(np.mean(per_task))


def probability_of_improvement_ci(x, y, reps: int = 2000, alpha: float = 0.05, seed: int = 0
                                  ) -> Tuple[float, float]:
    """Percentile CI of :func:`probability_of_improvement`, resampling each arm's runs with replacement
    within each task (stratified bootstrap)."""
    rng = np.random.default_rng(seed)
    xs = [np.asarray(t, dtype=np.float64) for t in x]
    ys = [np.asarray(t, dtype=np.float64) for t in y]
    stats = [probability_of_improvement([t[rng.integers(0, t.size, t.size)] for t in xs],
                                        [t[rng.integers(0, t.size, t.size)] for t in ys]) for _ in range(reps)]
    return float(np.percentile(stats, 100 * alpha / 2)), float(np.percentile(stats, 100 * (1 - alpha / 2)))


def _rliable():
    try:
        from rliable import library as rly
        from rliable import metrics
        return rly, metrics
    except Exception:  # not installed, or a broken dependency (arch / statsmodels)
        return None


def aggregate_scores(score_dict: Dict[str, np.ndarray], reps: int = 2000, use_rliable: Optional[bool] = None
                     ) -> Dict[str, Dict[str, Any]]:
    """IQM and mean with 95% stratified-bootstrap CIs per arm, from ``{arm: [runs, tasks]}`` normalised scores.

    Uses ``rliable`` when importable (``use_rliable=None``/True), else :func:`iqm` and
    :func:`stratified_bootstrap_ci`; the result names the backend.
    """
    lib = _rliable() if use_rliable in (None, True) else None
    if use_rliable and lib is None:
        raise ImportError("rliable is not importable")
    out: Dict[str, Dict[str, Any]] = {}
    if lib is not None:
        rly, metrics = lib
        fn = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])  # noqa: E731
        np.random.seed(0)
        point, ci = rly.get_interval_estimates({k: np.asarray(v, float) for k, v in score_dict.items()}, fn,
                                               reps=reps)
        for k in score_dict:
            out[k] = {"iqm": float(point[k][0]), "iqm_ci": [float(ci[k][0, 0]), float(ci[k][1, 0])],
                      "mean": float(point[k][1]), "mean_ci": [float(ci[k][0, 1]), float(ci[k][1, 1])],
                      "runs": int(np.shape(score_dict[k])[0]), "tasks": int(np.shape(score_dict[k])[1]),
                      "backend": "rliable"}
        return out
    for k, v in score_dict.items():
        v = np.asarray(v, dtype=np.float64)
        out[k] = {"iqm": iqm(v), "iqm_ci": list(stratified_bootstrap_ci(v, iqm, reps)),
                  "mean": float(v.mean()), "mean_ci": list(stratified_bootstrap_ci(v, lambda a: float(a.mean()), reps)),
                  "runs": int(v.shape[0]), "tasks": int(v.shape[1]), "backend": "numpy"}
    return out


def normaliser(env: str, all_returns: Sequence[float]) -> Tuple[Callable[[float], float], str]:
    """``(f, how)``: maps a raw return of ``env`` to a normalised score."""
    base = env.split("/")[-1]
    name = re.sub(r"-v\d+$", "", base)
    if env.startswith("dm_control/") or ("/" not in env and not re.search(r"-v\d+$", env)):
        return (lambda r: r / 1000.0), "DMC: return / 1000"
    if name in GYM_REFERENCE:
        lo, hi = GYM_REFERENCE[name]
        return (lambda r: (r - lo) / (hi - lo)), f"D4RL reference ({lo:g}, {hi:g})"
    lo, hi = float(np.min(all_returns)), float(np.max(all_returns))
    span = hi - lo if hi > lo else 1.0
    return (lambda r: (r - lo) / span), f"min-max over its runs ({lo:.1f}, {hi:.1f})"
