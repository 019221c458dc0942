"""The campaign report from finished units' files alone: per-env tables, curves, the wall-clock split,
aggregates across envs and the final pools' fidelity, into ``summary.md`` / ``summary.json`` and CSVs."""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .docs import md_table
from .stats import aggregate_scores, normaliser, probability_of_improvement, probability_of_improvement_ci
from .units import (ARMS, POOL_FIDELITY_FILE, RUNNING_FILE, UNIT_FILE, Preset, Unit, cmdline_mentions, env_dirname,
                    last_eval, pid_alive, read_json, repo_relative, settings_match, unit_settings, write_json)

# Published 100K-env-step DMC returns (5 seeds, the SynthER and PGR papers' tables), for orientation
# beside ours: a different budget (10x our cpu preset's), code and hardware. "SAC" is the papers' SAC row.
PAPER_100K = {"cheetah-run": {"sac_utd20": 347, "redq_utd20": 607, "synther_utd20": 729},
              "reacher-hard": {"sac_utd20": 654, "redq_utd20": 734, "synther_utd20": 839},
              "quadruped-walk": {"sac_utd20": 178, "redq_utd20": 497, "synther_utd20": 727}}

TIMING_KEYS = ("total", "rl", "diffusion_fit", "diffusion_sample", "eval", "setup")

# The report's steadier second statistic: the mean of a run's last LATE_EVALS evaluations (at the cpu
# preset 8K / 9K / 10K env steps, 15 episodes) beside the final evaluation's 5 episodes alone.
LATE_EVALS = 3


def late_return(evals: Sequence[Tuple[int, float]], k: int = LATE_EVALS) -> float:
    """Mean return of the last ``k`` evaluations (``(env_step, mean_return)`` in step order; all if fewer)."""
    if not evals:
        raise ValueError("a finished unit has at least its final evaluation")
    return float(np.mean([r for _, r in sorted(evals)[-k:]]))


def collect(out: Path, work: Optional[Path] = None) -> Dict[str, Any]:
    """Finished units under ``out`` and in-progress ones under ``out`` and ``work`` (whatever preset wrote them)."""
    done: List[Dict[str, Any]] = []
    partial: List[Dict[str, Any]] = []
    for marker in sorted(Path(out).glob(f"*/*/seed*/{UNIT_FILE}")):
        d = marker.parent
        if not re.fullmatch(r"seed\d+", d.name):
            continue
        m, res = read_json(marker), read_json(d / "results.json")
        if not m or m.get("status") != "done" or not res or "final_eval" not in res:
            continue
        done.append({"env": m["unit"]["env"], "arm": m["unit"]["arm"], "seed": m["unit"]["seed"],
                     "dir": str(d), "settings": m["settings"], "unit_wall_seconds": m.get("wall_seconds"),
                     "evals": [(r["env_step"], r["mean_return"]) for r in res.get("evals", [])],
                     "final_return": res["final_eval"]["mean_return"], "final_step": res["final_eval"]["env_step"],
                     "late_return": late_return([(r["env_step"], r["mean_return"]) for r in res.get("evals", [])]
                                                or [(res["final_eval"]["env_step"], res["final_eval"]["mean_return"])]),
                     "timing": res.get("timing_seconds", {}), "retrains": res.get("retrain_count", 0),
                     "utd": _flag(m["settings"].get("args", []), "--utd"),
                     "pool_fidelity": read_json(d / POOL_FIDELITY_FILE)})
    done_keys = {(Path(u["dir"]).parent.parent.name, u["arm"], u["seed"]) for u in done}
    roots = [Path(out)] + ([Path(work)] if work is not None and Path(work) != Path(out) else [])
    for d in sorted(d for root in roots for d in root.glob("*/*/seed*")):
        if (not d.is_dir() or not re.fullmatch(r"seed\d+", d.name)
                or (d.parent.parent.name, d.parent.name, int(d.name[4:])) in done_keys):
            continue
        row = last_eval(d)
        res = read_json(d / "results.json") or {}
        cfg = res.get("config", {})
        running = read_json(d / RUNNING_FILE) or {}
        partial.append({"dir": str(d), "env": cfg.get("env", d.parent.parent.name), "arm": d.parent.name,
                        "seed": int(d.name[4:]), "total_steps": cfg.get("total_steps"),
                        "alive": bool(running) and pid_alive(running.get("pid", -1))
                        and cmdline_mentions(running["pid"], str(d)),
                        "last_eval_step": int(row["env_step"]) if row else None,
                        "last_eval_return": float(row["mean_return"]) if row else None,
                        "evals": [(r["env_step"], r["mean_return"]) for r in res.get("evals", [])]})
    return {"done": done, "partial": partial}


def _flag(args: Sequence[str], name: str) -> Optional[str]:
    args = list(args)
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def _label(arm: str, utd: Optional[str]) -> str:
    """The arm's display label with the UTD the units actually ran (the smoke preset scales it down)."""
    label = ARMS[arm].label if arm in ARMS else arm
    return re.sub(r"UTD=\d+", f"UTD={utd}", label) if utd else label


def _arm_order(arms) -> List[str]:
    order = list(ARMS)
    return sorted(set(arms), key=lambda a: (order.index(a) if a in order else len(order), a))


def _fmt(x: Optional[float], nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _plot_env(env: str, units: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for arm in _arm_order(u["arm"] for u in units):
        runs = [dict(u["evals"]) for u in units if u["arm"] == arm]
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        if not steps:
            continue
        y = np.array([[r[s] for s in steps] for r in runs])
        mean = y.mean(0)
        sd = y.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
        utds = {u["utd"] for u in units if u["arm"] == arm}
        label = f"{_label(arm, utds.pop() if len(utds) == 1 else None)} (n={len(runs)})"
        line, = ax.plot(steps, mean, marker="o", ms=3, label=label)
        if len(runs) > 1:
            ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return")
    ax.set_title(f"{env}: mean over seeds, shaded +- 1 std", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# A report section: its JSON records, then its table (header, rows) for summary.md and the CSVs.
Section = Tuple[Any, List[str], List[List[Any]]]


def _final_returns(done: List[Dict[str, Any]], envs: List[str], arms: List[str]) -> Section:
    """Final return (and the mean of the last evaluations) per env x arm: mean, std over seeds, each seed's."""
    records, rows = [], []
    for env in envs:
        for arm in arms:
            us = sorted((u for u in done if u["env"] == env and u["arm"] == arm), key=lambda u: u["seed"])
            if not us:
                continue
            v, late = (np.array([u[k] for u in us]) for k in ("final_return", "late_return"))
            sd, late_sd = (float(x.std(ddof=1)) if x.size > 1 else float("nan") for x in (v, late))
            steps = sorted({u["final_step"] for u in us})
            records.append({"env": env, "arm": arm, "mean": float(v.mean()), "std": sd, "n": int(v.size),
                            "env_steps": steps, "per_seed": {str(u["seed"]): u["final_return"] for u in us},
                            "late": {"mean": float(late.mean()), "std": late_sd, "n": int(late.size),
                                     "per_seed": {str(u["seed"]): u["late_return"] for u in us}}})
            paper = PAPER_100K.get(env.split("/")[-1].removesuffix("-v0"), {}).get(arm)
            rows.append([env, arm, f"{v.mean():.1f}", _fmt(sd), v.size, "/".join(map(str, steps)),
                         " ".join(f"{r:.1f}" for r in v), f"{late.mean():.1f}",
                         " ".join(f"{r:.1f}" for r in late), paper if paper else "-"])
    header = ["env", "arm", "final return (mean)", "std over seeds", "seeds", "env steps", "per seed",
              f"mean of last {LATE_EVALS} evals", "per seed (last evals)", "published, 100K steps"]
    return records, header, rows


def _timing_split(done: List[Dict[str, Any]], arms: List[str]) -> Section:
    """Wall-clock split per arm (means over its units), with the diffusion share and env steps per second."""
    records, rows = [], []
    for arm in arms:
        us = [u for u in done if u["arm"] == arm]
        t = {k: float(np.mean([u["timing"].get(k, 0.0) for u in us])) for k in TIMING_KEYS}
        steps = float(np.mean([u["final_step"] for u in us]))
        t["env_steps_per_s"] = steps / t["total"] if t["total"] > 0 else float("nan")
        t["diffusion_share"] = (t["diffusion_fit"] + t["diffusion_sample"]) / t["total"] if t["total"] else 0.0
        t["retrains"] = float(np.mean([u["retrains"] for u in us]))
        records.append({"arm": arm, "units": len(us), **t})
        rows.append([arm, len(us), f"{t['total']:.0f}", f"{t['rl']:.0f}", f"{t['diffusion_fit']:.0f}",
                     f"{t['diffusion_sample']:.0f}", f"{t['eval']:.0f}", f"{t['setup']:.0f}",
                     f"{100 * t['diffusion_share']:.1f}%", f"{t['retrains']:.1f}", f"{t['env_steps_per_s']:.2f}"])
    header = ["arm", "units", "total s", "RL s", "diffusion training s", "diffusion sampling s",
              "eval s", "setup s", "diffusion share", "retrains", "env steps/s"]
    return records, header, rows


def _aggregate(done: List[Dict[str, Any]], envs: List[str], arms: List[str], reps: int
               ) -> Tuple[Dict[str, Any], Dict[str, str], List[str], List[List[Any]]]:
    """IQM and mean of normalised final returns over envs with stratified-bootstrap CIs, for the arms with
    units on every env (2+ envs); also each env's normalisation in words."""
    records: Dict[str, Any] = {}
    rows: List[List[Any]] = []
    norms: Dict[str, str] = {}
    header = ["arm", "runs", "tasks", "IQM", "IQM 95% CI", "mean", "mean 95% CI", "backend"]
    if len(envs) < 2:
        return records, norms, header, rows
    score_dict = {}
    for arm in arms:
        cols = []
        for env in envs:
            f, how = normaliser(env, [u["final_return"] for u in done if u["env"] == env])
            norms[env] = how
            cols.append([f(u["final_return"]) for u in sorted(done, key=lambda u: u["seed"])
                         if u["env"] == env and u["arm"] == arm])
        if min(len(c) for c in cols) == 0:
            continue  # this arm lacks an env: no aggregate for it
        k = min(len(c) for c in cols)  # a rectangular [runs, tasks] matrix: the first k seeds of each env
        score_dict[arm] = np.array([c[:k] for c in cols]).T
    if score_dict:
        records = aggregate_scores(score_dict, reps=reps)
        for arm, a in records.items():
            rows.append([arm, a["runs"], a["tasks"], f"{a['iqm']:.3f}", f"[{a['iqm_ci'][0]:.3f}, {a['iqm_ci'][1]:.3f}]",
                         f"{a['mean']:.3f}", f"[{a['mean_ci'][0]:.3f}, {a['mean_ci'][1]:.3f}]", a["backend"]])
    return records, norms, header, rows


def _improvement(done: List[Dict[str, Any]], envs: List[str], reps: int) -> Section:
    """Probability of improvement of SynthER over each baseline, on the envs both arms finished."""
    records, rows = [], []
    for base in ("sac_utd20", "redq_utd20"):
        both = [e for e in envs if any(u["env"] == e and u["arm"] == "synther_utd20" for u in done)
                and any(u["env"] == e and u["arm"] == base for u in done)]
        if not both:
            continue
        runs = lambda arm: [[u["final_return"] for u in done if u["env"] == e and u["arm"] == arm]  # noqa: E731
                            for e in both]
        x, y = runs("synther_utd20"), runs(base)
        p_hat, ci = probability_of_improvement(x, y), probability_of_improvement_ci(x, y, reps=reps)
        records.append({"x": "synther_utd20", "y": base, "envs": both, "poi": p_hat, "ci": list(ci)})
        rows.append([f"synther_utd20 > {base}", ", ".join(both), f"{p_hat:.2f}", f"[{ci[0]:.2f}, {ci[1]:.2f}]"])
    return records, ["P(X > Y)", "envs", "estimate", "95% CI"], rows


def _pool_fidelity(done: List[Dict[str, Any]], arms: List[str]) -> Section:
    """The final synthetic pool's simulator fidelity of each unit run with --dump-pool."""
    records, rows = [], []
    for u in sorted(done, key=lambda u: (u["env"], arms.index(u["arm"]), u["seed"])):
        pf = u.get("pool_fidelity")
        if not isinstance(pf, dict):
            continue
        fid, floor = pf.get("fidelity") or {}, pf.get("real_floor") or {}
        records.append({"env": u["env"], "arm": u["arm"], "seed": u["seed"], "final_return": u["final_return"],
                        **{k: v for k, v in pf.items() if k not in ("env", "arm", "seed")}})
        rows.append([u["env"], u["arm"], u["seed"], f"{u['final_return']:.1f}",
                     pf.get("last_retrain_env_step", "-"), pf.get("last_fit_train_steps", "-"),
                     (f"{fid['dynamics_mse']:.4f} +- {fid.get('dynamics_mse_se', float('nan')):.4f}"
                      if fid else pf.get("note", "-")),
                     (f"{fid['reward_mse']:.4f} +- {fid.get('reward_mse_se', float('nan')):.4f}" if fid else "-"),
                     _fmt(floor.get("dynamics_mse"), 4), fid.get("n_scored", "-") if fid else "-"])
    header = ["env", "arm", "seed", "final return", "last retrain at", "its diffusion steps",
              "dynamics MSE (+- se)", "reward MSE (+- se)", "real rows' MSE (floor)", "rows scored"]
    return records, header, rows


def split_stale(done: List[Dict[str, Any]], preset: Preset) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """``(current, stale)``: finished units (``collect``'s) whose recorded settings do, or do not, equal
    what ``preset`` would run for them now (a changed library preset, flag or budget). An arm this
    version does not know is kept: there is nothing to compare it with."""
    current, stale = [], []
    for u in done:
        if u["arm"] in ARMS and not settings_match(u["settings"], unit_settings(preset, Unit(u["env"], u["arm"], u["seed"]))):
            stale.append(u)
        else:
            current.append(u)
    return current, stale


def write_report(out: Path, reps: int = 2000, work: Optional[Path] = None,
                 preset: Optional[Preset] = None) -> Dict[str, Any]:
    """Tables, plots and aggregates from the units under ``out``; returns the summary dict.

    Writes ``summary.md`` / ``summary.json``, ``final_returns.{md,csv}``, ``timing.csv``, ``aggregate.csv``
    and one ``curves_<env>.png`` per env into ``out``. With ``preset``, units finished under other
    settings than it gives now are left out of the tables and listed (a campaign run re-runs them).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = collect(out, work)
    done, stale = (data["done"], []) if preset is None else split_stale(data["done"], preset)
    envs = sorted({u["env"] for u in done})
    arms = _arm_order(u["arm"] for u in done)
    final_json, final_header, final_rows = _final_returns(done, envs, arms)
    timing_json, timing_header, timing_rows = _timing_split(done, arms)
    agg_json, norms, agg_header, agg_rows = _aggregate(done, envs, arms, reps)
    poi_json, poi_header, poi_rows = _improvement(done, envs, reps)
    pool_json, pool_header, pool_rows = _pool_fidelity(done, arms)

    # Plots.
    pngs = []
    for env in envs:
        p = out / f"curves_{env_dirname(env)}.png"
        _plot_env(env, [u for u in done if u["env"] == env], p)
        pngs.append(p.name)

    # Files.
    _write_csv(out / "final_returns.csv", final_header, final_rows)
    _write_csv(out / "timing.csv", timing_header, timing_rows)
    _write_csv(out / "aggregate.csv", agg_header, agg_rows)
    final_md = md_table(final_header, final_rows) if final_rows else "(no finished units yet)"
    (out / "final_returns.md").write_text("# Final eval return\n\n" + final_md + "\n")
    md = [f"# UTD=20 benchmark: {repo_relative(out)}", "", f"{len(done)} finished units, {len(data['partial'])} unfinished.", "",
          "## Final eval return (mean over seeds of each run's final evaluation)", "", final_md, "",
          "## Wall-clock split per arm (seconds, mean per unit)", "",
          md_table(timing_header, timing_rows) if timing_rows else "(none)", ""]
    if agg_rows:
        md += ["## Aggregate over envs (normalised final return; 95% stratified bootstrap CI)", "",
               md_table(agg_header, agg_rows), "",
               "Normalisation: " + "; ".join(f"{e}: {h}" for e, h in norms.items()), ""]
    else:
        md += ["## Aggregate over envs", "", "(needs finished units on 2+ envs)", ""]
    if poi_rows:
        md += ["## Probability of improvement (final return; per env over all run pairs, averaged over envs; "
               "95% stratified bootstrap CI)", "", md_table(poi_header, poi_rows), ""]
    md += ["How to read this: with 2-3 seeds per arm, only an effect several times the seed-to-seed spread "
           "is distinguishable, and a CI from 2-3 runs per task is itself rough. 10K env steps is the early, "
           "small-buffer regime where UTD=20 overfits most; it says nothing about 100K-step returns. The "
           "published 100K numbers are for orientation only (10x the budget, other code and hardware).", ""]
    if pool_rows:
        md += ["## Final synthetic pool fidelity (--dump-pool: the last pool replayed in the simulator; errors "
               "in units of the std of the unit's own real transitions, lower is better)", "",
               md_table(pool_header, pool_rows), ""]
    if stale:
        md += ["## Finished under other settings (not in the tables: the campaign re-runs them)", "",
               md_table(["env", "arm", "seed", "final return"],
                        [[u["env"], u["arm"], u["seed"], _fmt(u["final_return"])] for u in stale]), ""]
    if data["partial"]:
        prow = [[p["env"], p["arm"], p["seed"], "running" if p["alive"] else "interrupted",
                 p["last_eval_step"] if p["last_eval_step"] is not None else "-",
                 _fmt(p["last_eval_return"]), p["total_steps"] or "-"] for p in data["partial"]]
        md += ["## Unfinished units (not in the tables; an interrupted one resumes from its last checkpoint)", "",
               md_table(["env", "arm", "seed", "state", "last eval step", "last eval return", "of steps"], prow), ""]
    md += ["## Curves", ""] + [f"![{p}]({p})" for p in pngs]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    summary = {"out": str(out), "final_returns": final_json, "timing": timing_json, "aggregate": agg_json,
               "probability_of_improvement": poi_json, "pool_fidelity": pool_json,
               "stale": [{k: u[k] for k in ("env", "arm", "seed", "dir", "final_return")} for u in stale],
               "normalisation": norms, "pngs": pngs,
               "units": [{k: u[k] for k in ("env", "arm", "seed", "dir", "final_return", "final_step",
                                            "unit_wall_seconds", "timing", "retrains", "settings")} for u in done],
               "unfinished": [{k: v for k, v in p.items() if k != "evals"} | {"evals": p["evals"]}
                              for p in data["partial"]]}
    write_json(out / "summary.json", summary)
    return summary
