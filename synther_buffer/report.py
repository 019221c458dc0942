"""``synther report``: compare a synthetic dataset with the real one (seed Figure 8).

Marginal histograms per column (one PNG grid), a mean/std table, terminal rates and, given an env
id, the physical fidelity of the synthetic transitions (:func:`synther_buffer.oracle.score_transitions`).
The histograms need matplotlib and the fidelity scoring MuJoCo (the ``offline`` and ``envs`` extras).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .datasets import PathLike, Transitions, _coerce, to_rows
from .extras import MissingExtraError, require
from .offline import _write_json

# ---------------------------------------------------------------------------------------------- report
def _columns(data: Union[Transitions, np.ndarray]) -> Tuple[np.ndarray, List[str], Optional[np.ndarray], List[str]]:
    """(rows without terminal, column names, terminals or None, names of the columns to histogram)."""
    if isinstance(data, np.ndarray):
        names = [f"dim_{i}" for i in range(data.shape[1])]
        return np.asarray(data, dtype=np.float32), names, None, names
    rows, layout = to_rows(data, model_terminals=False)
    names = layout.column_names()
    hist = names[:layout.obs_dim + layout.action_dim + 1]  # Figure 8: state, action, reward
    return rows, names, (np.asarray(data["terminals"]).astype(np.float32) > 0.5), hist


def _col_stats(x: np.ndarray, block: int = 262_144) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and std per column in float64, in row blocks (no full float64 copy)."""
    n = x.shape[0]
    shift = x[: min(n, 1024)].astype(np.float64).mean(axis=0)
    s = np.zeros(x.shape[1]); s2 = np.zeros(x.shape[1])
    for i in range(0, n, block):
        d = x[i:i + block].astype(np.float64) - shift
        s += d.sum(axis=0)
        s2 += np.square(d).sum(axis=0)
    m = s / n
    return shift + m, np.sqrt(np.maximum(s2 / n - m * m, 0.0))


def report(real: Union[PathLike, Mapping[str, Any], np.ndarray], synthetic: Union[PathLike, Mapping[str, Any], np.ndarray],
           *, out_png: Optional[PathLike] = None, out_json: Optional[PathLike] = None,
           env_id: Optional[str] = None, max_hist_rows: int = 200_000, bins: int = 50,
           max_panels: int = 120, seed: int = 0) -> dict:
    """Compare a synthetic dataset with the real one: marginal histograms, mean/std table, terminal rate.

    Args:
        real, synthetic: paths (see ``load_source``), transition dicts or plain arrays, of the same width.
        out_png: histogram grid (seed Figure 8 style: synthetic blue, real orange, dashed real mean
            +- std) over the observation, action and reward columns (all columns for plain arrays),
            at most ``max_panels`` panels, from at most ``max_hist_rows`` random rows of each set.
        out_json: where to write the returned dict (default: ``out_png`` with suffix ``.json``).
        env_id: if given, :func:`synther_buffer.oracle.score_transitions` replays the synthetic
            transitions in this environment and its result is stored under ``"fidelity"``. If that
            cannot be done (the ``envs`` extra is missing, the environment is not supported, the
            widths differ), ``"fidelity"`` is None and ``"fidelity_note"`` says why; the rest of the
            report is still made.

    Returns:
        ``{"num_real", "num_synthetic", "columns": [{name, real_mean, real_std, synthetic_mean,
        synthetic_std, mean_diff_in_std, std_ratio}], "terminal_rate": {...}, "summary": {...}, ...}``.

    Raises:
        ValueError: the two sets have different widths.
        MissingExtraError: ``out_png`` is given and matplotlib (the ``offline`` extra) is missing.
    """
    if out_png is not None:  # fail before the work, not after it
        require("matplotlib", "offline", "synther report's histograms")
    r_data, r_name = _coerce(real)
    s_data, s_name = _coerce(synthetic)
    r_rows, names, r_term, hist_names = _columns(r_data)
    s_rows, s_names, s_term, _ = _columns(s_data)
    if r_rows.shape[1] != s_rows.shape[1]:
        raise ValueError(f"real rows have {r_rows.shape[1]} columns but synthetic rows have {s_rows.shape[1]}")
    if isinstance(r_data, np.ndarray) and not isinstance(s_data, np.ndarray):
        names, hist_names = s_names, _columns(s_data)[3]

    rm, rs = _col_stats(r_rows)
    sm, ss = _col_stats(s_rows)
    safe = np.where(rs > 1e-12, rs, 1.0)
    columns = [{"name": n, "real_mean": float(rm[i]), "real_std": float(rs[i]), "synthetic_mean": float(sm[i]),
                "synthetic_std": float(ss[i]), "mean_diff_in_std": float(abs(sm[i] - rm[i]) / safe[i]),
                "std_ratio": float(ss[i] / rs[i]) if rs[i] > 1e-12 else None} for i, n in enumerate(names)]
    diffs = np.array([c["mean_diff_in_std"] for c in columns])
    ratios = np.array([c["std_ratio"] for c in columns if c["std_ratio"] is not None])
    result: Dict[str, Any] = {
        "real": r_name, "synthetic": s_name, "num_real": int(r_rows.shape[0]), "num_synthetic": int(s_rows.shape[0]),
        "columns": columns,
        "terminal_rate": {"real": float(r_term.mean()) if r_term is not None else None,
                          "synthetic": float(s_term.mean()) if s_term is not None else None},
        "summary": {"max_mean_diff_in_std": float(diffs.max()), "mean_mean_diff_in_std": float(diffs.mean()),
                    "median_std_ratio": float(np.median(ratios)) if ratios.size else None},
        "fidelity": None,
    }

    if env_id is not None:
        result["env_id"] = env_id
        if isinstance(s_data, np.ndarray):
            result["fidelity_note"] = "fidelity scoring needs a transition dataset, not a plain array"
        else:
            from .oracle import score_transitions

            reference = None if isinstance(r_data, np.ndarray) else dict(r_data)
            try:  # normalise errors by the real data's stds where we have them
                result["fidelity"] = score_transitions(env_id, dict(s_data), reference=reference)
            except MissingExtraError as e:  # no simulator here: keep the rest of the report
                result["fidelity_note"] = f"fidelity scoring for --env-id skipped: {e}"
            except ValueError as e:  # unsupported env, width mismatch: keep the rest of the report
                result["fidelity_note"] = f"fidelity scoring skipped: {e}"

    if out_png is not None:
        out_png = Path(out_png)
        rng = np.random.default_rng(seed)
        cols = [names.index(n) for n in hist_names][:max_panels]
        result["histogram_columns"] = [names[i] for i in cols]
        if len(hist_names) > max_panels:
            result["histogram_note"] = f"plotted the first {max_panels} of {len(hist_names)} columns"
        _plot_histograms(out_png, _subsample(r_rows, max_hist_rows, rng)[:, cols],
                         _subsample(s_rows, max_hist_rows, rng)[:, cols], [names[i] for i in cols],
                         rm[cols], rs[cols], bins)
        result["png"] = str(out_png)
        if out_json is None:
            out_json = out_png.with_suffix(".json")
    if out_json is not None:
        result["json"] = str(out_json)
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        _write_json(Path(out_json), result)
    return result


def _subsample(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[0] <= k:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=k, replace=False))]


def _plot_histograms(path: Path, real: np.ndarray, synth: np.ndarray, names: Sequence[str],
                     mean: np.ndarray, std: np.ndarray, bins: int) -> None:
    matplotlib = require("matplotlib", "offline", "synther report's histograms")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    k = len(names)
    ncols = min(8, max(1, math.ceil(math.sqrt(k))))
    nrows = max(1, math.ceil(k / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 1.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.axis("off")
            continue
        lo = float(min(np.percentile(real[:, i], 0.5), np.percentile(synth[:, i], 0.5)))
        hi = float(max(np.percentile(real[:, i], 99.5), np.percentile(synth[:, i], 99.5)))
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        ax.hist(synth[:, i], bins=edges, density=True, alpha=0.6, color="tab:blue", label="synthetic")
        ax.hist(real[:, i], bins=edges, density=True, alpha=0.6, color="tab:orange", label="real")
        for v in (mean[i] - std[i], mean[i] + std[i]):
            ax.axvline(v, color="k", linestyle="--", linewidth=0.8)
        ax.set_title(names[i], fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=6, loc="upper right")
    fig.suptitle("marginals: synthetic (blue) vs real (orange); dashed: real mean +- std", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def format_stats(result: Mapping[str, Any], max_rows: int = 60) -> str:
    """A printable mean/std table (and terminal rate) for a ``report`` result."""
    lines = [f"{'column':<14}{'real mean':>11}{'real std':>10}{'synth mean':>12}{'synth std':>11}{'|dmean|/std':>12}"]
    cols = result["columns"]
    for c in cols[:max_rows]:
        lines.append(f"{c['name']:<14}{c['real_mean']:>11.4g}{c['real_std']:>10.4g}{c['synthetic_mean']:>12.4g}"
                     f"{c['synthetic_std']:>11.4g}{c['mean_diff_in_std']:>12.3f}")
    if len(cols) > max_rows:
        lines.append(f"... {len(cols) - max_rows} more columns in the JSON")
    tr = result["terminal_rate"]
    if tr["real"] is not None or tr["synthetic"] is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:.6f}"
        lines.append(f"terminal rate: real {fmt(tr['real'])}, synthetic {fmt(tr['synthetic'])}")
    s = result["summary"]
    lines.append(f"rows: real {result['num_real']:,}, synthetic {result['num_synthetic']:,}; "
                 f"max |dmean|/std {s['max_mean_diff_in_std']:.3f}, mean {s['mean_mean_diff_in_std']:.3f}"
                 + (f", median std ratio {s['median_std_ratio']:.3f}" if s["median_std_ratio"] is not None else ""))
    return "\n".join(lines)

