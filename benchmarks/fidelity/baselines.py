"""Baseline generators of the fidelity benchmark, fitted or applied on the same training rows as SynthER.

* seed D.1 augmentations of the training rows (:func:`augment`): additive noise ``s, s' + N(0, 0.1)``
  (std 0.1, raw units), multiplicative noise ``s, s' * eps`` with one ``eps ~ U(0.8, 1.2)`` per
  transition, and dynamics noise ``s' = s + eps (s' - s)``, ``eps ~ U(0.5, 1.5)``;
* a full-covariance Gaussian mixture on standardised rows (:func:`gmm_generate`: scikit-learn if
  installed, else a small numpy EM);
* TVAE / CTGAN from the ``ctgan`` package with the seed's Table 6 / 7 defaults (the package defaults),
  each in a subprocess killed after a time budget (:func:`ctgan_generate`).
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Dict, List, Tuple

import numpy as np

from synther_buffer.oracle import safe_std

def augment(train_rows: np.ndarray, layout, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Seed D.1 augmentations of ``n`` training rows drawn with replacement.

    ``additive``: s, s' + eps, eps ~ N(0, 0.1) (std 0.1, each entry, raw units);
    ``multiplicative``: s, s' * eps, one eps ~ U(0.8, 1.2) per transition;
    ``dynamics``: s' = s + eps (s' - s), one eps ~ U(0.5, 1.5) per transition.
    Actions and rewards are unchanged.
    """
    x = train_rows[rng.integers(0, len(train_rows), n)].astype(np.float64)
    sl = layout.slices()
    s, s2 = x[:, sl["observations"]], x[:, sl["next_observations"]]
    if kind == "additive":
        s = s + rng.normal(0.0, 0.1, s.shape)
        s2 = s2 + rng.normal(0.0, 0.1, s2.shape)
    elif kind == "multiplicative":
        eps = rng.uniform(0.8, 1.2, (n, 1))
        s, s2 = s * eps, s2 * eps
    elif kind == "dynamics":
        eps = rng.uniform(0.5, 1.5, (n, 1))
        s2 = s + eps * (s2 - s)
    else:
        raise ValueError(f"unknown augmentation {kind!r}")
    x[:, sl["observations"]], x[:, sl["next_observations"]] = s, s2
    return x.astype(np.float32)


def _gmm_numpy(z: np.ndarray, k: int, rng: np.random.Generator, iters: int = 100, reg: float = 1e-4,
               tol: float = 1e-4) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-covariance Gaussian mixture by EM (k-means++ init). Returns (weights, means, chol factors)."""
    n, d = z.shape
    k = max(1, min(k, n // max(2, d // 4)))
    centers = [z[rng.integers(n)]]
    for _ in range(1, k):  # k-means++ seeding
        d2 = np.min(((z[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(z[rng.choice(n, p=d2 / d2.sum())])
    mu = np.asarray(centers)
    resp = np.eye(k)[np.argmin(((z[:, None, :] - mu[None]) ** 2).sum(-1), axis=1)]
    prev = -np.inf
    for _ in range(iters):
        nk = resp.sum(0) + 1e-10
        w = nk / n
        mu = (resp.T @ z) / nk[:, None]
        chol = np.empty((k, d, d))
        logp = np.empty((n, k))
        for j in range(k):
            zc = z - mu[j]
            cov = (resp[:, j, None] * zc).T @ zc / nk[j] + reg * np.eye(d)
            L = np.linalg.cholesky(cov)
            chol[j] = L
            sol = np.linalg.solve(L, zc.T)
            logp[:, j] = (np.log(w[j]) - 0.5 * (sol ** 2).sum(0) - np.log(np.diag(L)).sum()
                          - 0.5 * d * np.log(2 * np.pi))
        mx = logp.max(1, keepdims=True)
        ll = mx[:, 0] + np.log(np.exp(logp - mx).sum(1))
        resp = np.exp(logp - ll[:, None])
        if ll.mean() - prev < tol:
            break
        prev = ll.mean()
    return w, mu, chol


def gmm_generate(train_rows: np.ndarray, n: int, components: int, seed: int) -> Tuple[np.ndarray, str]:
    """Fit a full-covariance GMM on standardised rows and sample ``n``; returns (rows, backend)."""
    rows64 = train_rows.astype(np.float64)
    mean, std = rows64.mean(0), safe_std(rows64)
    z = (train_rows - mean) / std
    rng = np.random.default_rng(seed)
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:
        w, mu, chol = _gmm_numpy(z, components, rng)
        comp = rng.choice(len(w), size=n, p=w / w.sum())
        eps = rng.standard_normal((n, z.shape[1]))
        s = mu[comp] + np.einsum("nij,nj->ni", chol[comp], eps)
        backend = f"numpy EM, k={len(w)}"
    else:
        gm = GaussianMixture(n_components=components, covariance_type="full", reg_covar=1e-4,
                             max_iter=200, random_state=seed).fit(z)
        s, _ = gm.sample(n)
        s = s[rng.permutation(n)]
        backend = f"sklearn GaussianMixture, k={components}"
    return (s * std + mean).astype(np.float32), backend


def _ctgan_worker(conn, kind: str, rows: np.ndarray, names: List[str], epochs: int, n: int, seed: int,
                  threads: int) -> None:
    try:
        import torch
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        np.random.seed(seed)
        import pandas as pd
        from ctgan import CTGAN, TVAE

        df = pd.DataFrame(rows.astype(np.float64), columns=names)
        # The seed's Table 6 / 7 bold defaults are the package defaults; only epochs is set.
        model = TVAE(epochs=epochs) if kind == "tvae" else CTGAN(epochs=epochs)
        if hasattr(model, "set_random_state"):
            model.set_random_state(seed)
        t0 = time.perf_counter()
        model.fit(df)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.sample(n)[names].to_numpy(dtype=np.float32)
        conn.send(("ok", out, fit_s, time.perf_counter() - t0))
    except BaseException as e:  # report anything to the parent
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc(), 0.0))
    finally:
        conn.close()


def ctgan_generate(kind: str, train_rows: np.ndarray, names: List[str], n: int, *, epochs: int, seed: int,
                   threads: int, budget_s: float) -> Dict[str, Any]:
    """TVAE / CTGAN (``ctgan`` package) in a subprocess killed after ``budget_s``.

    Returns ``{"rows": ... or None, "status": "ok" | "skipped: <reason>", "fit_s", "sample_s"}``.
    """
    try:
        import ctgan  # noqa: F401
        import pandas  # noqa: F401
    except Exception as e:
        return {"rows": None, "status": f"skipped: ctgan not importable ({type(e).__name__}: {e})"}
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_ctgan_worker, args=(child, kind, train_rows, names, epochs, n, seed, threads),
                       daemon=True)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    try:
        if not parent.poll(budget_s):
            proc.kill()
            proc.join(5)
            return {"rows": None, "status": f"skipped: exceeded time budget {budget_s:.0f}s ({epochs} epochs)",
                    "wall_s": time.perf_counter() - t0}
        msg = parent.recv()
    except EOFError:
        proc.join(5)
        return {"rows": None, "status": f"skipped: worker died (exit code {proc.exitcode})"}
    finally:
        parent.close()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
    if msg[0] != "ok":
        return {"rows": None, "status": f"skipped: {msg[1]}", "traceback": msg[2]}
    return {"rows": msg[1], "status": "ok", "fit_s": float(msg[2]), "sample_s": float(msg[3]),
            "wall_s": time.perf_counter() - t0}
