"""Warm-started retraining on an online sequence (issue 18): from scratch vs warm, retrain by retrain.

    python -m benchmarks.warm_start --env HalfCheetah-v5 --preset fast \
        --sizes 10000,20000,30000,40000,50000 --warm-steps 1500,3000,5000 --out results/warm_start

Replays the schedule of an online run: real transitions (``benchmarks.fidelity.collect_transitions``, one
collection whose prefixes are the data at each retrain) grow retrain by retrain, and at each retrain

* **cold**: a fresh model is fitted from scratch with the preset's budget for that many rows
  (``train_steps_for(rows)``: ``train_steps``, grown with the data where the preset has a rule), with the
  seed the online pool gives that retrain;
* **warm k** (one chain per swept ``k``): the model continues the chain's previous model
  (``TransitionDiffusion.warm_start_from`` + ``fit``, i.e. ``SynthERConfig.warm_start=True,
  warm_start_steps=k``) for ``k`` steps. Retrain 0 is the cold fit for every chain: the first retrain is
  always a full fit.

Each model draws ``--num-synthetic`` rows (the preset's sampler, the same sampling seed per retrain) and
every row is replayed in MuJoCo (``score_transitions``, as ``benchmarks/fidelity/cli.py`` does): dynamics
and reward MSE in real-std units (the std of the whole collection, so every retrain is in the same units),
with standard errors over rows. Fit seconds are wall-clock on this process's torch threads (``--threads``).

``--order policy`` sorts the collected episodes by behaviour policy (random, then random gaits, then the
tuned gait), so the data drifts the way an improving agent's does; the default keeps the collection order
(each retrain's new data is drawn like the old).

Writes ``warm_start.json`` (settings, every cell, the summary) and ``warm_start.csv`` (one line per cell)
into ``--out`` and prints the table (retrain x {cold, warm k}: fit seconds, dynamics MSE +- s.e., reward
MSE) and, per swept k, the issue's targets: >= 3x fewer fit seconds than cold at every retrain after the
first, dynamics MSE within 10% of cold at every retrain.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

SPEEDUP_TARGET = 3.0     # fit seconds: cold / warm, at every retrain after the first
DYN_TARGET = 1.10        # dynamics MSE: warm / cold, at every retrain
RETRAIN_SEEDING = "seedsequence"   # pool.retrain_seed; files of the older seed + i scheme lack this key
CSV_KEYS = ("retrain", "rows", "arm", "steps", "warm", "fit_s", "first_loss", "loss", "dynamics_mse",
            "dynamics_mse_se", "reward_mse", "reward_mse_se", "n_scored", "speedup", "dyn_ratio")


def _log(msg: str) -> None:
    print(f"[warm_start {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ints(text: str, name: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise ValueError(f"--{name} needs a comma list of positive integers, got {text!r}")
    return vals


def _sweep(text: str) -> List[Any]:
    """``--warm-steps``: positive integers (``warm_start_steps``) and ``default`` (``warm_start_steps=None``:
    the config's own rule, ``SynthERConfig.warm_steps``)."""
    vals: List[Any] = []
    for v in (t.strip() for t in text.split(",") if t.strip()):
        vals.append("default" if v == "default" else _ints(v, "warm-steps")[0])
    if not vals:
        raise ValueError(f"--warm-steps needs a comma list of positive integers or 'default', got {text!r}")
    return vals


def reused_cold(path: str, expect: Mapping[str, Any], config) -> Dict[int, Dict[str, Any]]:
    """The cold cells of retrains 1.. of an earlier run with the same env, data, sizes, seed and config.

    Cold fits are deterministic (one thread, fixed seeds), so another warm sweep can reuse them; retrain
    0 is always refitted, since every warm chain starts from that model.

    Raises:
        ValueError: the earlier run differs in one of those settings.
    """
    old = json.loads(Path(path).read_text())
    defaults = vars(build_parser().parse_args([]))   # settings an older file did not record had these
    for k, v in expect.items():
        if old.get(k, defaults.get(k)) != v:
            raise ValueError(f"--reuse-cold {path}: its {k} is {old.get(k)!r}, this run's {v!r}")
    if not config.matches_record(old.get("config")):
        raise ValueError(f"--reuse-cold {path}: recorded with another SynthERConfig")
    return {c["retrain"]: dict(c, reused=path) for c in old["cells"] if c["arm"] == "cold" and c["retrain"] > 0}


def policy_order(data: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``data`` with its episodes sorted by behaviour policy (random, gait, tuned), each kept in order."""
    idx = np.lexsort((np.arange(len(data["policy"])), data["policy"]))
    return {k: v[idx] for k, v in data.items()}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the sequence described by parsed CLI ``args``; writes the outputs and returns the result dict."""
    from synther_buffer import SynthERConfig
    from synther_buffer.datasets import from_rows, to_rows
    from synther_buffer.pool import model_for, retrain_seed

    from .fidelity.cli import _parse_mix, _set_threads
    from .fidelity.oracles import KEYS, collect_transitions, make_oracle, safe_std, score_transitions

    sizes, sweep = _ints(args.sizes, "sizes"), _sweep(args.warm_steps)
    if sizes != sorted(set(sizes)):
        raise ValueError(f"--sizes must increase, got {args.sizes!r}")
    _set_threads(args.threads)
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    _log(f"collecting {sizes[-1]:,} real transitions from {args.env} (order: {args.order})")
    data = collect_transitions(args.env, sizes[-1], seed=args.seed, episode_seconds=args.episode_seconds,
                               policy_probs=_parse_mix(args.policy_mix))
    if args.order == "policy":
        data = policy_order(data)
    rows, layout = to_rows({k: data[k] for k in KEYS}, model_terminals=None)
    obs_std, rew_std = safe_std(data["next_observations"]), float(safe_std(data["rewards"]))

    cfg = SynthERConfig.preset(args.preset).replace(device=args.device, seed=args.seed, progress=args.progress)
    if args.train_steps:
        cfg = cfg.replace(train_steps=args.train_steps)
    reuse = {} if not args.reuse_cold else reused_cold(args.reuse_cold, {
        "env": args.env, "sizes": sizes, "order": args.order, "seed": args.seed,
        "num_synthetic": args.num_synthetic, "policy_mix": args.policy_mix,
        "episode_seconds": args.episode_seconds, "retrain_seeding": RETRAIN_SEEDING}, cfg)
    oracle = make_oracle(args.env)
    cells: List[Dict[str, Any]] = []

    def fit_and_score(arm: str, i: int, model, steps: Optional[int], warm: bool) -> Dict[str, Any]:
        n = sizes[i]
        fit = model.fit(rows[:n], steps=steps, warm_start=warm)
        synth = model.sample(args.num_synthetic, seed=args.seed + 1000 + i)
        score = score_transitions(args.env, from_rows(synth, layout), obs_std=obs_std, reward_std=rew_std,
                                  max_rows=None, seed=args.seed, oracle=oracle)
        cell = {"retrain": i, "rows": n, "arm": arm, "steps": fit["steps"], "warm": fit["warm"],
                "fit_s": fit["seconds"], "first_loss": fit["first_loss"], "loss": fit["loss"],
                **{k: score.get(k) for k in ("dynamics_mse", "dynamics_mse_se", "reward_mse", "reward_mse_se",
                                             "n_scored", "n_nonfinite")}}
        _log(f"retrain {i} ({n:,} rows) {arm}: {fit['steps']} steps in {fit['seconds']:.1f}s, first loss "
             f"{fit['first_loss']:.3f} -> {fit['loss']:.3f}; dyn MSE {cell['dynamics_mse']:.4f} +- "
             f"{cell['dynamics_mse_se']:.4f}, rew MSE {cell['reward_mse']:.4f}")
        cells.append(cell)
        return cell

    try:
        chains: Dict[int, Any] = {}
        for i in range(len(sizes)):
            # the seed SyntheticPool gives retrain i
            if i in reuse:   # the same fit measured by an earlier run (--reuse-cold)
                cells.append(reuse[i])
                _log(f"retrain {i} ({sizes[i]:,} rows) cold: reused from {args.reuse_cold}")
            else:
                cold = model_for(layout, cfg.replace(seed=retrain_seed(args.seed, i)))
                fit_and_score("cold", i, cold, None, warm=False)
            for k in sweep:
                if i == 0:   # the first retrain is a full fit: every chain starts from the cold model
                    chains[k] = cold
                    continue
                warm = model_for(layout, cfg.replace(seed=retrain_seed(args.seed, i), warm_start=True,
                                                     warm_start_steps=None if k == "default" else k))
                if not warm.warm_start_from(chains[k]):
                    raise RuntimeError("warm start refused: the chain's previous model does not match")
                fit_and_score(f"warm {k}", i, warm, None, warm=True)
                chains[k] = warm
    finally:
        oracle.close()

    add_ratios(cells)
    import torch
    result = {
        "command": "python -m benchmarks.warm_start " + " ".join(args.argv) if getattr(args, "argv", None) else None,
        "env": args.env, "preset": args.preset, "config": cfg.to_dict(), "sizes": sizes, "warm_steps": sweep,
        "order": args.order, "num_synthetic": args.num_synthetic, "seed": args.seed, "threads": args.threads,
        "retrain_seeding": RETRAIN_SEEDING,
        "policy_mix": args.policy_mix, "episode_seconds": args.episode_seconds, "reuse_cold": args.reuse_cold,
        "torch": torch.__version__, "obs_std": obs_std.tolist(), "reward_std": rew_std,
        "cells": cells, "summary": summarize(cells, sweep), "total_seconds": time.perf_counter() - t_start,
        "json": str(out_dir / "warm_start.json"), "csv": str(out_dir / "warm_start.csv"),
    }
    with open(out_dir / "warm_start.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_KEYS), extrasaction="ignore")
        w.writeheader()
        for c in cells:
            w.writerow({k: c.get(k) for k in CSV_KEYS})
    with open(out_dir / "warm_start.json", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return result


def add_ratios(cells: List[Dict[str, Any]]) -> None:
    """Give every cell ``speedup`` (cold fit seconds / its own) and ``dyn_ratio`` (its dynamics MSE / cold's),
    against the cold cell of the same retrain."""
    cold = {c["retrain"]: c for c in cells if c["arm"] == "cold"}
    for c in cells:
        ref = cold[c["retrain"]]
        c["speedup"] = ref["fit_s"] / c["fit_s"] if c["fit_s"] > 0 else None
        c["dyn_ratio"] = c["dynamics_mse"] / ref["dynamics_mse"] if ref["dynamics_mse"] else None


def summarize(cells: Sequence[Mapping[str, Any]], sweep: Sequence[int]) -> List[Dict[str, Any]]:
    """Per swept k, over the retrains after the first: how many fits were warm (a fit whose data moved far
    from the normaliser is a full one), the smallest speedup, the largest dynamics ratio, and the targets."""
    out = []
    for k in sweep:
        mine = [c for c in cells if c["arm"] == f"warm {k}"]
        if not mine:
            continue
        speed = min(c["speedup"] for c in mine)
        dyn = max(c["dyn_ratio"] for c in mine)
        out.append({"arm": f"warm {k}", "retrains": len(mine), "warm_fits": sum(bool(c["warm"]) for c in mine),
                    "min_speedup": speed, "median_speedup": float(np.median([c["speedup"] for c in mine])),
                    "max_dyn_ratio": dyn,
                    "speedup_target_met": bool(speed >= SPEEDUP_TARGET),
                    "dynamics_target_met": bool(dyn <= DYN_TARGET)})
    return out


def format_result(result: Mapping[str, Any]) -> str:
    """The markdown tables of a :func:`run` result."""
    arms = ["cold"] + [f"warm {k}" for k in result["warm_steps"]]
    by = {(c["retrain"], c["arm"]): c for c in result["cells"]}
    cold_steps = [c["steps"] for c in result["cells"] if c["arm"] == "cold"]
    cold = f"{min(cold_steps):,}" + (f"-{max(cold_steps):,}" if max(cold_steps) != min(cold_steps) else "")
    lines = [f"### Warm start: {result['env']}, preset {result['preset']} ({cold} steps cold), "
             f"{result['num_synthetic']:,} synthetic rows per model, order {result['order']}", "",
             "Each cell: fit seconds / dynamics MSE +- s.e. / reward MSE (real-std units).", "",
             "| retrain (real rows) | " + " | ".join(arms) + " |", "| --- |" + " --- |" * len(arms)]
    for i, n in enumerate(result["sizes"]):
        cols = []
        for arm in arms:
            c = by.get((i, arm)) or (by.get((i, "cold")) if i == 0 else None)
            if c is None:
                cols.append("-")
            elif arm != "cold" and i == 0:
                cols.append("(= cold: first retrain)")
            else:
                full = " (full fit: data moved)" if arm != "cold" and not c["warm"] else ""
                cols.append(f"{c['fit_s']:.1f} s / {c['dynamics_mse']:.4f} +- {c['dynamics_mse_se']:.4f} / "
                            f"{c['reward_mse']:.4f}{full}")
        lines.append(f"| {i} ({n:,}) | " + " | ".join(cols) + " |")
    if result["summary"]:
        lines += ["", f"Targets: >= {SPEEDUP_TARGET:g}x fewer fit seconds than cold and dynamics MSE <= "
                      f"{DYN_TARGET:.2f}x cold at every warm retrain.", "",
                  "| arm | warm fits / retrains | min (median) speedup | max dyn MSE / cold | speed target | "
                  "fidelity target |", "| --- | --- | --- | --- | --- | --- |"]
        for s in result["summary"]:
            lines.append(f"| {s['arm']} | {s['warm_fits']} / {s['retrains']} | {s['min_speedup']:.2f}x "
                         f"({s['median_speedup']:.2f}x) | "
                         f"{s['max_dyn_ratio']:.3f} | "
                         f"{'met' if s['speedup_target_met'] else 'not met'} | "
                         f"{'met' if s['dynamics_target_met'] else 'not met'} |")
    lines += ["", f"total {result['total_seconds']:.0f} s, torch threads {result['threads']}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.warm_start",
                                description="Warm-started vs from-scratch retraining on an online sequence, "
                                            "scored by the simulator oracle.")
    p.add_argument("--env", default="HalfCheetah-v5", help="an environment the fidelity oracle replays")
    p.add_argument("--preset", default="fast", choices=("paper", "fast", "tiny"), help="SynthERConfig preset")
    p.add_argument("--train-steps", type=int, default=None, help="cold fits' steps (default: the preset's)")
    p.add_argument("--sizes", default="10000,20000,30000,40000,50000",
                   help="real rows at each retrain, increasing (comma list)")
    p.add_argument("--warm-steps", default="1500,3000,5000",
                   help="warm_start_steps values to sweep (comma list); 'default' = the config's rule "
                        "(warm_start_steps=None: a quarter of the cold fit's steps)")
    p.add_argument("--reuse-cold", default=None, metavar="JSON",
                   help="take the cold fits of retrains 1.. from an earlier run's warm_start.json (same env, "
                        "data, sizes, seed and config; cold fits are deterministic) instead of refitting them")
    p.add_argument("--num-synthetic", type=int, default=10_000, help="rows each model draws (all scored)")
    p.add_argument("--order", choices=("collected", "policy"), default="collected",
                   help="'policy': episodes sorted random -> gait -> tuned (drifting data, like an improving agent)")
    p.add_argument("--policy-mix", default="1,1,1", help="weights of the behaviour policies random,gait,tuned")
    p.add_argument("--episode-seconds", type=float, default=5.0, help="simulated seconds per collection episode")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (1 on shared 2-core machines)")
    p.add_argument("--device", default="auto", help="torch device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/warm_start", help="output directory")
    p.add_argument("--progress", action="store_true", help="tqdm bars for fits and sampling")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    result = run(args)
    print(format_result(result))
    print(f"\nwrote {result['json']}, {result['csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
