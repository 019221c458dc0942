"""Command line of the fidelity benchmark: ``python -m benchmarks.fidelity ...`` (see the package docstring).

:func:`run` collects the real data, runs every generator, scores each one (simulator oracle,
distribution metrics, SDMetrics) and writes ``fidelity.json``, ``fidelity.csv``,
``fidelity_sweep.csv`` (with ``--sampler-sweep``) and ``marginals.png``; :func:`main` parses the
flags and prints the tables as markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from synther_buffer.config import PRECISIONS
from synther_buffer.offline import json_default

from .baselines import augment, ctgan_generate, gmm_generate
from .metrics import distribution_metrics, plot_marginals, sdmetrics_scores
from .oracles import KEYS, POLICIES, SUPPORTED_ENVS, collect_transitions, make_oracle, safe_std, score_transitions

# Sampler settings of --sampler-sweep: (sampler, steps, SynthERConfig sampler fields). Unlisted fields
# are the paper's Table 9 (sigma_max 80, S_churn 80, S_tmin 0.05, S_tmax 50, S_noise 1.003), whatever
# the trained model's preset says; the first setting is the paper's sampler.
WIDE = {"s_tmin": 0.01, "s_tmax": 80.0}   # churn over (almost) the whole schedule
SWEEP_SETTINGS: Tuple[Tuple[str, int, Dict[str, float]], ...] = (
    ("stochastic", 128, {}), ("stochastic", 64, {}),
    ("stochastic", 48, {"sigma_max": 10.0, **WIDE}),
    ("stochastic", 40, {"sigma_max": 5.0, **WIDE}),       # the fast preset's sampler
    ("stochastic", 40, {"sigma_max": 10.0, **WIDE}),
    ("stochastic", 32, {"sigma_max": 5.0, **WIDE}),
    ("stochastic", 32, {}), ("deterministic", 32, {}), ("deterministic", 16, {}),
)


def sweep_label(sampler: str, steps: int, extra: Mapping[str, float]) -> str:
    """``"32-step stochastic, sigma_max 10"``."""
    return f"{steps}-step {sampler}" + "".join(f", {k} {v:g}" for k, v in extra.items())

ALL_GENERATORS = ("real", "additive", "multiplicative", "dynamics", "gmm", "tvae", "ctgan", "synther")
GENERATOR_LABELS = {
    "real": "real (held-out)",
    "additive": "additive noise N(0,0.1) (D.1)",
    "multiplicative": "multiplicative noise U(0.8,1.2) (D.1)",
    "dynamics": "dynamics noise U(0.5,1.5) (D.1)",
    "gmm": "GMM",
    "tvae": "TVAE",
    "ctgan": "CTGAN",
    "synther": "SynthER",
}


# ============================================================================================ benchmark
def _log(msg: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    if not np.isfinite(v):
        return "nan"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) < 10 ** -nd:
        return f"{v:.1e}"
    return f"{v:.{nd}f}" if abs(v) < 100 else f"{v:.1f}"


TABLE_COLUMNS = (
    ("generator", "generator"), ("dynamics_mse", "dyn MSE"), ("dynamics_mse_se", "+- se"),
    ("dynamics_mse_median", "dyn MSE (median)"),
    ("reward_mse", "rew MSE"), ("wasserstein", "W1"), ("corr_error", "corr err"), ("nn_dist", "NN dist"),
    ("ks_complement", "KSComp"), ("corr_similarity", "CorrSim"), ("fit_s", "fit s"),
    ("samples_per_s", "samples/s"), ("status", "status"),
)
# with --relevance: each generator's mean relevance score (the same relevance model scores every set)
RELEVANCE_COLUMN = ("relevance_mean", "mean relevance")
SWEEP_COLUMNS = (
    ("setting", "sampler"), ("nfe", "NFE"), ("dynamics_mse", "dyn MSE"), ("dynamics_mse_se", "+- se"),
    ("dynamics_mse_median", "dyn MSE (median)"),
    ("reward_mse", "rew MSE"), ("wasserstein", "W1"), ("corr_error", "corr err"), ("sample_s", "sample s"),
    ("samples_per_s", "samples/s"),
)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns=TABLE_COLUMNS) -> str:
    """Render rows (dicts) as a markdown table with the given (key, header) columns."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})




def _parse_mix(text: str) -> Tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 0 or sum(vals) <= 0:
        raise ValueError(f"--policy-mix needs three non-negative weights (random,gait,tuned), got {text!r}")
    return vals  # type: ignore[return-value]


def _set_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    try:  # numpy BLAS too (nearest-neighbour distances, GMM)
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except Exception:
        pass


@dataclass
class RealData:
    """The real transitions of one fidelity run: what the generators fit, what they are compared with,
    and the normalisers of the oracle's errors (the training rows' next-observation and reward stds)."""

    train_rows: np.ndarray       # [N, D] rows the generators fit
    eval_rows: np.ndarray        # held-out rows the distribution metrics compare with
    hold_rows: np.ndarray        # another held-out set: the "real (held-out)" generator
    layout: Any                  # their RowLayout
    obs_std: np.ndarray
    rew_std: float
    policy_counts: Dict[str, int]
    mix: Tuple[float, float, float]
    collect_seconds: float

    @property
    def names(self) -> List[str]:
        return self.layout.column_names()


def collect_real(args: argparse.Namespace, num_eval: int) -> RealData:
    """Training, evaluation and held-out transitions from ``args.env`` (three seeds of the same policies)."""
    from synther_buffer.datasets import to_rows

    t0 = time.perf_counter()
    _log(f"collecting real transitions from {args.env}: train {args.num_real}, eval {num_eval}, holdout {num_eval}")
    mix = _parse_mix(args.policy_mix)
    train_d, eval_d, hold_d = (collect_transitions(args.env, n, seed=args.seed + k, policy_probs=mix,
                                                   episode_seconds=args.episode_seconds)
                               for k, n in enumerate((args.num_real, num_eval, num_eval)))
    collect_s = time.perf_counter() - t0
    strip = lambda d: {k: d[k] for k in KEYS}  # noqa: E731
    train_rows, layout = to_rows(strip(train_d), model_terminals=None)
    eval_rows, _ = to_rows(strip(eval_d), model_terminals=layout.terminal)
    hold_rows, _ = to_rows(strip(hold_d), model_terminals=layout.terminal)
    real = RealData(train_rows, eval_rows, hold_rows, layout, obs_std=safe_std(train_d["next_observations"]),
                    rew_std=float(safe_std(train_d["rewards"])), mix=mix, collect_seconds=collect_s,
                    policy_counts={p: int((train_d["policy"] == i).sum()) for i, p in enumerate(POLICIES)})
    _log(f"collected in {collect_s:.1f}s; train policy mix {real.policy_counts}; mean reward "
         f"{float(train_d['rewards'].mean()):.3f}")
    return real


SCORE_KEYS = ("dynamics_mse", "dynamics_mse_se", "dynamics_mse_median", "reward_mse", "reward_mse_se",
              "dynamics_mse_position", "dynamics_mse_velocity", "reward_mse_median", "n_scored", "n_nonfinite",
              "action_clip_fraction")


class Scorer:
    """One generator's rows -> its table row: the oracle's dynamics / reward errors, the distribution
    metrics against the evaluation rows, SDMetrics when asked; keeps the rows for ``--save-rows``."""

    def __init__(self, args: argparse.Namespace, real: RealData, oracle):
        self.args, self.real, self.oracle = args, real, oracle
        self.saved_rows: Dict[str, np.ndarray] = {}

    def __call__(self, label: str, rows: np.ndarray, extra: Dict[str, Any]) -> Dict[str, Any]:
        from synther_buffer.datasets import from_rows

        args, real = self.args, self.real
        if args.save_rows:
            self.saved_rows[label] = np.asarray(rows, dtype=np.float32)
        t = time.perf_counter()
        score = score_transitions(args.env, from_rows(rows, real.layout), obs_std=real.obs_std,
                                  reward_std=real.rew_std, max_rows=args.score_rows, seed=args.seed,
                                  oracle=self.oracle)
        dist = distribution_metrics(rows, real.eval_rows, real.train_rows, seed=args.seed)
        sdm = (sdmetrics_scores(rows, real.eval_rows, real.names, max_rows=args.sdmetrics_rows, seed=args.seed,
                                discrete=["terminal"] if real.layout.terminal else [])
               if not args.no_sdmetrics else {"status": "skipped: --no-sdmetrics"})
        row = {"generator": label, **{k: score.get(k) for k in SCORE_KEYS},
               **dist, "ks_complement": sdm.get("ks_complement"), "tv_complement": sdm.get("tv_complement"),
               "corr_similarity": sdm.get("corr_similarity"), "sdmetrics_status": sdm["status"],
               "status": "ok", **extra}
        row["score_s"] = time.perf_counter() - t
        row["per_dim_dynamics_mse"] = score.get("per_dim_dynamics_mse")
        _log(f"{label}: dyn MSE {_fmt(row['dynamics_mse'])}, rew MSE {_fmt(row['reward_mse'])}, "
             f"W1 {_fmt(row['wasserstein'])}, corr err {_fmt(row['corr_error'])} (scored in {row['score_s']:.1f}s)")
        return row


def _generators(args: argparse.Namespace) -> List[str]:
    """``--generators`` (default all) less TVAE / CTGAN with ``--skip-ctgan``; unknown names refused."""
    gens = [g.strip() for g in args.generators.split(",") if g.strip()] if args.generators else list(ALL_GENERATORS)
    bad = sorted(set(gens) - set(ALL_GENERATORS))
    if bad:
        raise ValueError(f"unknown generator(s) {bad}; choose from {ALL_GENERATORS}")
    if args.skip_ctgan:
        gens = [g for g in gens if g not in ("tvae", "ctgan")]
    if "synther" not in gens and args.sampler_sweep:
        raise ValueError("--sampler-sweep needs the synther generator")
    return gens


def baseline_row(g: str, args: argparse.Namespace, real: RealData, n: int, rng: np.random.Generator,
                 score: Scorer, details: Dict[str, Any]) -> Dict[str, Any]:
    """The table row of a non-SynthER generator: held-out real rows, an augmentation (seed D.1), a GMM,
    TVAE or CTGAN (a failed or over-budget TVAE / CTGAN gives a row with its status, details in ``details``)."""
    label = GENERATOR_LABELS[g]
    if g == "real":
        rows = real.hold_rows[:n]
        return score(label, rows, {"fit_s": 0.0, "n_rows": len(rows)})
    if g in ("additive", "multiplicative", "dynamics"):
        t = time.perf_counter()
        rows = augment(real.train_rows, real.layout, g, n, rng)
        dt = time.perf_counter() - t
        return score(label, rows, {"fit_s": 0.0, "sample_s": dt, "samples_per_s": n / max(dt, 1e-9)})
    if g == "gmm":
        t = time.perf_counter()
        rows, backend = gmm_generate(real.train_rows, n, args.gmm_components, args.seed)
        return score(label, rows, {"fit_s": time.perf_counter() - t, "backend": backend})
    res = ctgan_generate(g, real.train_rows, real.names, n, epochs=args.ctgan_epochs, seed=args.seed,
                         threads=args.threads, budget_s=args.ctgan_budget_s)
    if res["rows"] is None:
        _log(f"{label}: {res['status']}")
        details[g] = {k: v for k, v in res.items() if k != "rows"}
        return {"generator": label, "status": res["status"]}
    return score(label, res["rows"], {"fit_s": res["fit_s"], "sample_s": res["sample_s"],
                                      "samples_per_s": n / max(res["sample_s"], 1e-9), "epochs": args.ctgan_epochs})


def synther_rows(args: argparse.Namespace, real: RealData, n: int, score: Scorer, out_dir: Path,
                 table: List[Dict[str, Any]], sweep: List[Dict[str, Any]], details: Dict[str, Any]) -> np.ndarray:
    """Fit SynthER at ``--preset``, score its ``n`` rows (into ``table``), then the ``--sampler-sweep``
    settings (into ``sweep``) and ``--relevance`` (PGR) rows; returns the plain model's rows."""
    from synther_buffer import SynthERConfig
    from synther_buffer.offline import make_model

    cfg = SynthERConfig.preset(args.preset).replace(device=args.device, seed=args.seed, progress=args.progress)
    if args.train_steps:
        cfg = cfg.replace(train_steps=args.train_steps)
    if args.precision:
        cfg = cfg.replace(precision=args.precision)
    model = make_model(real.layout, real.layout.dim, cfg)
    _log(f"SynthER: preset {args.preset}, {model!r}, {cfg.train_steps} steps, "
         f"sampler {cfg.sample_steps}-step {cfg.sampler}, precision {cfg.precision}")
    fit = model.fit(real.train_rows)
    _log(f"SynthER fit: {fit['seconds']:.1f}s, loss {fit['loss']:.4f}")
    t = time.perf_counter()
    rows = model.sample(n, seed=args.seed + 1)
    dt = time.perf_counter() - t
    details["synther"] = {"config": cfg.to_dict(), "fit": fit, "params": model.num_params}
    table.append(score(f"{GENERATOR_LABELS['synther']} ({cfg.sample_steps}-step {cfg.sampler})", rows, {
        "fit_s": fit["seconds"], "sample_s": dt, "samples_per_s": n / max(dt, 1e-9),
        "train_steps": cfg.train_steps, "loss": fit["loss"]}))
    if args.sampler_sweep:
        sweep.extend(sampler_sweep(args, model, n, score))
    if args.save_model:
        model.save(out_dir / "synther_model.pt")
    if args.relevance:   # Prioritized Generative Replay: guided vs unguided at the same preset
        details["relevance"] = _relevance_rows(args, cfg, real.layout, real.train_rows, real.hold_rows[:n], rows,
                                               score, table)
    return rows


def sampler_sweep(args: argparse.Namespace, model, n: int, score: Scorer) -> List[Dict[str, Any]]:
    """The fitted ``model`` sampled with each of ``SWEEP_SETTINGS`` (Table 9's churn values unless the
    setting says otherwise), each scored like a generator; the model's config is restored after each."""
    from synther_buffer import SynthERConfig
    from synther_buffer.edm import num_function_evals

    base_cfg = model.config
    table9 = {f: getattr(SynthERConfig.preset("paper"), f) for f in ("sigma_max", "s_churn", "s_tmin", "s_tmax",
                                                                     "s_noise", "rho")}
    sweep = []
    for k, (sampler, steps, extra) in enumerate(SWEEP_SETTINGS):
        model.config = base_cfg.replace(sampler=sampler, sample_steps=steps, **{**table9, **extra})
        t = time.perf_counter()
        try:
            rows_k = model.sample(n, seed=args.seed + 100 + k)
        finally:
            model.config = base_cfg
        dt = time.perf_counter() - t
        label_k = sweep_label(sampler, steps, extra)
        r = score(f"SynthER {label_k}", rows_k, {})
        sweep.append({"setting": label_k, "sampler": sampler, "steps": steps, **extra,
                      "nfe": num_function_evals(steps), "sample_s": dt, "samples_per_s": n / max(dt, 1e-9),
                      **{key: r[key] for key in ("dynamics_mse", "dynamics_mse_se", "dynamics_mse_median",
                                                 "reward_mse", "wasserstein", "corr_error", "nn_dist",
                                                 "ks_complement", "corr_similarity")}})
    return sweep


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the benchmark described by parsed CLI ``args``; writes the outputs and returns the result dict."""
    _set_threads(args.threads)
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_start = _loadavg()
    gens = _generators(args)
    num_eval = args.num_eval or min(args.num_synthetic, 10_000)
    real = collect_real(args, num_eval)
    oracle = make_oracle(args.env)
    score = Scorer(args, real, oracle)
    table: List[Dict[str, Any]] = []
    sweep: List[Dict[str, Any]] = []
    details: Dict[str, Any] = {}
    synther = None
    rng = np.random.default_rng(args.seed)   # the augmentations' draws, in generator order
    n = args.num_synthetic
    try:
        for g in gens:
            _log(f"generator {GENERATOR_LABELS[g]} ...")
            if g == "synther":
                synther = synther_rows(args, real, n, score, out_dir, table, sweep, details)
            else:
                table.append(baseline_row(g, args, real, n, rng, score, details))
    finally:
        oracle.close()
    return _write_outputs(args, out_dir, real, table, sweep, details, synther, score.saved_rows,
                          num_eval=num_eval, t_start=t_start, load_start=load_start)


def _write_outputs(args: argparse.Namespace, out_dir: Path, real: RealData, table: List[Dict[str, Any]],
                   sweep: List[Dict[str, Any]], details: Dict[str, Any], synther: Optional[np.ndarray],
                   saved_rows: Dict[str, np.ndarray], *, num_eval: int, t_start: float,
                   load_start: Optional[List[float]]) -> Dict[str, Any]:
    """The marginals plot (Figure 8), ``--save-rows``' rows.npz, fidelity.csv / fidelity_sweep.csv and
    fidelity.json; returns the result dict that fidelity.json holds."""
    import torch

    n = args.num_synthetic
    names = real.names
    png = out_dir / "marginals.png"
    hist_cols = list(range(real.layout.obs_dim + real.layout.action_dim + 1))  # Figure 8: state, action, reward
    plot_src = synther if synther is not None else real.hold_rows[:n]
    what = "SynthER" if synther is not None else "held-out real"
    plot_marginals(png, real.eval_rows[:, hist_cols], plot_src[:, hist_cols], [names[i] for i in hist_cols],
                   label=what, title=f"{args.env}: {what} (blue) vs held-out real (orange), {len(real.eval_rows):,} "
                                     "rows; dashed: real mean +- std")
    if args.save_rows:  # every generator's rows + the real sets, to re-score later
        keyname = lambda lab: "".join(c if c.isalnum() else "_" for c in lab).strip("_")  # noqa: E731
        np.savez(out_dir / "rows.npz", train=real.train_rows, eval=real.eval_rows, holdout=real.hold_rows,
                 columns=np.asarray(names), **{keyname(k): v for k, v in saved_rows.items()})
    result = {
        "command": "python -m benchmarks.fidelity " + " ".join(args.argv) if getattr(args, "argv", None) is not None
        else None,
        "env": args.env, "preset": args.preset, "num_real": args.num_real, "num_synthetic": n, "num_eval": num_eval,
        "seed": args.seed, "threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "loadavg_start": load_start, "loadavg_end": _loadavg(),
        "collect_seconds": real.collect_seconds, "total_seconds": time.perf_counter() - t_start,
        "policy_mix": list(real.mix), "train_policy_mix": real.policy_counts, "obs_std": real.obs_std.tolist(),
        "reward_std": real.rew_std, "columns": names, "table": table, "sampler_sweep": sweep, "details": details,
        "png": str(png), "json": str(out_dir / "fidelity.json"), "csv": str(out_dir / "fidelity.csv"),
    }
    csv_keys = [k for k, _ in TABLE_COLUMNS] + ["dynamics_mse_position", "dynamics_mse_velocity", "reward_mse_se",
                                                "reward_mse_median", "wasserstein_max", "tv_complement", "sample_s",
                                                "n_scored", "n_nonfinite", "action_clip_fraction"]
    if args.relevance:
        csv_keys.append("relevance_mean")
    _write_csv(out_dir / "fidelity.csv", table, csv_keys)
    if sweep:
        _write_csv(out_dir / "fidelity_sweep.csv", sweep, [k for k, _ in SWEEP_COLUMNS] +
                   ["sampler", "steps", "sigma_max", "s_tmin", "s_tmax", "nn_dist", "ks_complement", "corr_similarity"])
        result["sweep_csv"] = str(out_dir / "fidelity_sweep.csv")
    with open(out_dir / "fidelity.json", "w") as f:
        json.dump(result, f, indent=2, default=json_default)
        f.write("\n")
    return result


def _relevance_rows(args: argparse.Namespace, cfg, layout, train_rows: np.ndarray, hold_rows: np.ndarray,
                    plain_rows: np.ndarray, evaluate, table: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``--relevance``: PGR's conditional SynthER at the plain row's preset, sampled guided (w =
    ``--guidance-scale``) and unguided (w = 0, the same model), each scored by the oracle like every
    generator; and the mechanism number: the mean relevance, by one relevance model trained on the
    real training rows, of the real rows, the plain SynthER rows, the unguided and the guided rows.

    Appends the two rows to ``table`` (and ``relevance_mean`` to the plain SynthER row, the last one
    there); returns the details for ``fidelity.json``.
    """
    from synther_buffer.diffusion import resolve_device
    from synther_buffer.pool import model_for
    from synther_buffer.relevance import make_relevance

    n = args.num_synthetic
    rcfg = cfg.replace(relevance=args.relevance, guidance_scale=args.guidance_scale,
                       relevance_train_steps=args.relevance_steps)
    t = time.perf_counter()
    rel = make_relevance(rcfg, layout, str(resolve_device(cfg.device)))
    rel = rel.prepare(train_rows, layout, seed=args.seed)
    scores = rel.score(train_rows, layout)
    rel_s = time.perf_counter() - t
    _log(f"relevance {args.relevance}: trained/scored in {rel_s:.1f}s; real mean {scores.mean():.4g}")
    table[-1]["relevance_mean"] = float(rel.score(plain_rows, layout).mean())
    model = model_for(layout, rcfg, conditional=True)
    fit = model.fit(train_rows, cond=scores)
    _log(f"PGR conditional fit: {fit['seconds']:.1f}s, loss {fit['loss']:.4f}")
    means = {"real (train)": float(scores.mean()), "real (held out)": float(rel.score(hold_rows, layout).mean()),
             "SynthER": table[-1]["relevance_mean"]}
    for w in (0.0, rcfg.guidance_scale):
        t = time.perf_counter()
        rows = model.sample(n, seed=args.seed + 1, guidance_scale=w)
        dt = time.perf_counter() - t
        label = f"SynthER PGR {args.relevance} w={w:g}" + (" (unguided)" if w == 0 else " (guided)")
        means[label] = float(rel.score(rows, layout).mean())
        table.append(evaluate(label, rows, {"fit_s": fit["seconds"], "sample_s": dt,
                                            "samples_per_s": n / max(dt, 1e-9), "loss": fit["loss"],
                                            "relevance_mean": means[label]}))
    _log("mean relevance: " + ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
    return {"relevance": args.relevance, "guidance_scale": rcfg.guidance_scale, "cond_dropout": rcfg.cond_dropout,
            "relevance_top_frac": rcfg.relevance_top_frac, "relevance_train_seconds": rel_s,
            "relevance_train_steps": getattr(rel, "steps", None), "mean_relevance": means, "fit": fit}


def format_result(result: Mapping[str, Any]) -> str:
    """Markdown rendering of a :func:`run` result (main table, then the sampler sweep if any)."""
    lines = [f"### Fidelity: {result['env']}, preset {result['preset']}, {result['num_real']:,} real / "
             f"{result['num_synthetic']:,} synthetic rows (eval {result['num_eval']:,})", "",
             markdown_table(result["table"], TABLE_COLUMNS + ((RELEVANCE_COLUMN,) if "relevance" in
                                                              result.get("details", {}) else ()))]
    if result.get("sampler_sweep"):
        lines += ["", "Sampler sweep (one trained SynthER model):", "", markdown_table(result["sampler_sweep"], SWEEP_COLUMNS)]
    lines += ["", f"load average start {result['loadavg_start']}, end {result['loadavg_end']}; "
                  f"torch threads {result['threads']}; total {result['total_seconds']:.0f}s"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity",
                                description="Simulator-oracle fidelity of SynthER's synthetic transitions vs baselines.")
    p.add_argument("--env", default="HalfCheetah-v5", help=f"environment ({', '.join(SUPPORTED_ENVS)})")
    p.add_argument("--preset", default="fast", choices=("paper", "fast", "tiny"), help="SynthERConfig preset")
    p.add_argument("--train-steps", type=int, default=None, help="override the preset's train_steps")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="SynthERConfig.precision of the SynthER model (default: the preset's, fp32)")
    p.add_argument("--num-real", type=int, default=10_000, help="real training transitions")
    p.add_argument("--num-synthetic", type=int, default=10_000, help="rows generated (and scored) per generator")
    p.add_argument("--num-eval", type=int, default=None,
                   help="held-out real rows for the distribution metrics (and the held-out baseline); "
                        "default min(num_synthetic, 10000)")
    p.add_argument("--score-rows", type=int, default=None, help="replay at most this many rows per generator (default all)")
    p.add_argument("--out", default="results/fidelity", help="output directory")
    p.add_argument("--sampler-sweep", action="store_true", help="score several samplers on the trained SynthER model")
    p.add_argument("--generators", default=None, help=f"comma list from {','.join(ALL_GENERATORS)} (default all)")
    p.add_argument("--skip-ctgan", action="store_true", help="skip TVAE and CTGAN")
    p.add_argument("--ctgan-epochs", type=int, default=50,
                   help="TVAE/CTGAN epochs (package default 300: ~26 min each on 1 loaded CPU thread for 10K rows)")
    p.add_argument("--ctgan-budget-s", type=float, default=600.0, help="wall-clock budget per TVAE/CTGAN run")
    p.add_argument("--gmm-components", type=int, default=16, help="GMM components")
    p.add_argument("--no-sdmetrics", action="store_true", help="skip the SDMetrics scores")
    p.add_argument("--sdmetrics-rows", type=int, default=5000, help="rows per set for SDMetrics")
    p.add_argument("--policy-mix", default="1,1,1",
                   help="weights of the behaviour policies random,gait,tuned (per episode); 1,1,0 skips the gait search")
    p.add_argument("--episode-seconds", type=float, default=5.0, help="simulated seconds per collection episode")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (1 on shared 2-core machines)")
    p.add_argument("--device", default="auto", help="torch device for SynthER")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--relevance", choices=("curiosity", "reward"), default=None,
                   help="also fit PGR's relevance-conditioned SynthER (same preset) and score it guided and "
                        "unguided, with the mean relevance of every SynthER set and of the real rows")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="guidance weight of the guided row (PGR: 2.0)")
    p.add_argument("--relevance-steps", type=int, default=None,
                   help="curiosity model training steps (default: the preset's retrain_every, PGR's online rate)")
    p.add_argument("--save-model", action="store_true", help="also save the SynthER model to OUT/synther_model.pt")
    p.add_argument("--save-rows", action="store_true", help="save every generator's rows to OUT/rows.npz")
    p.add_argument("--progress", action="store_true", help="show tqdm bars for the diffusion fit/sample")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    result = run(args)
    print(format_result(result))
    print(f"\nwrote {result['json']}, {result['csv']}" + (f", {result['sweep_csv']}" if result.get("sweep_csv") else "")
          + f", {result['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
