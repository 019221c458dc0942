"""Distribution metrics of the fidelity benchmark (synthetic rows against held-out real rows), and the plot.

* :func:`distribution_metrics`: per-dimension Wasserstein-1 distance (normalised by the real std,
  averaged over columns), correlation-matrix error (mean |corr_real - corr_synth| over column pairs)
  and the nearest-neighbour distance to the training rows (memorisation / diversity, cf. seed
  Figure 1a);
* :func:`sdmetrics_scores`: SDMetrics' KSComplement / CorrelationSimilarity (seed Section 3.1) when
  ``sdmetrics`` is installed;
* :func:`plot_marginals`: seed Figure 8 style histograms.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from synther_buffer.oracle import safe_std

def distribution_metrics(synth: np.ndarray, ref: np.ndarray, train: np.ndarray, *,
                         max_nn_rows: int = 2000, seed: int = 0) -> Dict[str, float]:
    """Distribution metrics of synthetic rows against held-out real rows ``ref``.

    ``wasserstein``: mean over columns of W1(synth_j, ref_j) / std_train_j (scipy if installed, else
    the equal-quantile formula). ``corr_error``: mean over column pairs (i < j) of
    |corr_ref_ij - corr_synth_ij|. ``nn_dist``: mean Euclidean distance (standardised units) from up
    to ``max_nn_rows`` synthetic rows to their nearest training row.
    """
    synth = np.asarray(synth, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    train = np.asarray(train, dtype=np.float64)
    mean, std = train.mean(0), safe_std(train)
    try:
        from scipy.stats import wasserstein_distance as w1
    except ImportError:  # pragma: no cover - scipy is normally present
        def w1(a, b):
            q = np.linspace(0, 1, 1001)
            return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))
    ws = [w1(synth[:, j], ref[:, j]) / std[j] for j in range(synth.shape[1])]
    with np.errstate(invalid="ignore", divide="ignore"):
        cs = np.nan_to_num(np.corrcoef(synth, rowvar=False))
        cr = np.nan_to_num(np.corrcoef(ref, rowvar=False))
    iu = np.triu_indices(synth.shape[1], 1)
    rng = np.random.default_rng(seed)
    sub = synth if len(synth) <= max_nn_rows else synth[rng.choice(len(synth), max_nn_rows, replace=False)]
    a = (sub - mean) / std
    b = (train - mean) / std
    b2 = (b ** 2).sum(1)
    nn = np.empty(len(a))
    for s in range(0, len(a), 512):
        blk = a[s:s + 512]
        d2 = (blk ** 2).sum(1)[:, None] + b2[None] - 2 * blk @ b.T
        nn[s:s + 512] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return {"wasserstein": float(np.mean(ws)), "wasserstein_max": float(np.max(ws)),
            "corr_error": float(np.mean(np.abs(cs[iu] - cr[iu]))), "nn_dist": float(nn.mean())}


def sdmetrics_scores(synth: np.ndarray, ref: np.ndarray, names: List[str], *, max_rows: int = 5000,
                     seed: int = 0, discrete: Sequence[str] = ()) -> Dict[str, Any]:
    """SDMetrics column shapes (KSComplement; TVComplement on discrete columns) and column pair trends
    (CorrelationSimilarity, Pearson), averaged, on at most ``max_rows`` rows of each set."""
    try:
        import pandas as pd
        from sdmetrics.column_pairs import CorrelationSimilarity
        from sdmetrics.single_column import KSComplement, TVComplement
    except Exception as e:
        return {"status": f"skipped: sdmetrics not importable ({type(e).__name__}: {e})"}
    rng = np.random.default_rng(seed)
    pick = lambda x: x if len(x) <= max_rows else x[rng.choice(len(x), max_rows, replace=False)]
    s = pd.DataFrame(pick(np.asarray(synth, np.float64)), columns=names)
    r = pd.DataFrame(pick(np.asarray(ref, np.float64)), columns=names)
    cont = [c for c in names if c not in discrete]
    ks = [KSComplement.compute(r[c], s[c]) for c in cont]
    tv = [TVComplement.compute(r[c], s[c]) for c in discrete]
    import warnings
    pairs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(cont)):
            for j in range(i + 1, len(cont)):
                v = CorrelationSimilarity.compute(r[[cont[i], cont[j]]], s[[cont[i], cont[j]]])
                if np.isfinite(v):
                    pairs.append(v)
    return {"status": "ok", "ks_complement": float(np.mean(ks)),
            "tv_complement": float(np.mean(tv)) if tv else None,
            "corr_similarity": float(np.mean(pairs)) if pairs else None}


# ============================================================================================ plot
def plot_marginals(path: Path, real: np.ndarray, synth: np.ndarray, names: Sequence[str], *, label: str = "SynthER",
                   bins: int = 50, title: str = "") -> None:
    """Seed Figure 8 style: per-column histograms, synthetic (blue) vs real (orange), dashed real mean +- std."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    k = len(names)
    ncols = min(6, k)
    nrows = math.ceil(k / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.5 * ncols, 1.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.axis("off")
            continue
        r, s = real[:, i], synth[:, i]
        lo = float(min(np.percentile(r, 0.5), np.percentile(s, 0.5)))
        hi = float(max(np.percentile(r, 99.5), np.percentile(s, 99.5)))
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        ax.hist(s, bins=edges, density=True, alpha=0.6, color="tab:blue", label=label)
        ax.hist(r, bins=edges, density=True, alpha=0.6, color="tab:orange", label="real")
        m, sd = float(r.mean()), float(r.std())
        for v in (m - sd, m + sd):
            ax.axvline(v, color="k", linestyle="--", linewidth=0.8)
        ax.set_title(names[i], fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=6, loc="upper right")
    fig.suptitle(title or f"marginals: {label} (blue) vs held-out real (orange); dashed: real mean +- std",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
