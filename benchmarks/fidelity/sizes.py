"""Fidelity as the real data grows: ``python -m benchmarks.fidelity.sizes --sizes 10000 50000 ...``.

An online run's buffer grows retrain by retrain, and a preset that trains a fixed number of steps
sees each row fewer times the bigger the buffer gets. This mode measures that curve: it collects
the largest real dataset once (the fidelity benchmark's behaviour-policy mixture), takes nested
prefixes of it as the smaller datasets (as an online buffer holds its first rows), and for every
(size, variant) fits SynthER, samples, and replays the samples in the simulator.

A *variant* is a named set of :class:`~synther_buffer.SynthERConfig` overrides on the preset, e.g.
``steps45k:train_steps=45000`` or ``w512@50000:width=512`` (``@`` limits it to the listed sizes).
The preset itself is always the variant ``preset``. Beside each size: additive noise (seed D.1,
``N(0, 0.1)`` on s and s') of that size's rows and held-out real rows, so every error has its
yardsticks.

Errors are in units of one fixed reference: the std of a separate 10K-row real set (seed + 1), the
same for every size, so rows of the table compare across sizes (``benchmarks.fidelity`` divides by
the training set's own std instead; at 10K rows the two differ by a few percent).

Each finished cell is one JSON under ``OUT/cells/`` and is not re-run (same env, size, variant and
config): a long sweep can be stopped and resumed, and variants added later. ``OUT/sizes.json``,
``OUT/sizes.csv`` and the printed markdown table are rebuilt from the cells on every run
(``--report-only`` rebuilds without fitting).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .cli import _fmt, _loadavg, _log, _set_threads, markdown_table

DEFAULT_SIZES = (10_000, 25_000, 50_000, 100_000)
REFERENCE_ROWS = 10_000
SCORE_KEYS = ("dynamics_mse", "dynamics_mse_se", "dynamics_mse_median", "reward_mse", "reward_mse_se",
              "n_scored", "n_nonfinite", "action_clip_fraction")


# ============================================================================================ variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """A named set of config overrides, optionally limited to some dataset sizes."""

    name: str
    overrides: Mapping[str, Any]
    sizes: Optional[Tuple[int, ...]] = None   # None: every size

    def applies_to(self, size: int) -> bool:
        return self.sizes is None or size in self.sizes


def _coerce(text: str) -> Any:
    """A CLI string as a config value: ``None``, ``true`` / ``false``, an int, a float, else the string."""
    if text.lower() == "none":
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_variant(text: str) -> Variant:
    """``name[@size,size]:field=value[,field=value]`` -> :class:`Variant` (its values are validated
    against the preset by :func:`main`).

    Raises:
        ValueError: a malformed spec or an unknown field.
    """
    from synther_buffer import SynthERConfig

    head, sep, body = text.partition(":")
    name, _, size_text = head.partition("@")
    if not sep or not name or not body:
        raise ValueError(f"variant {text!r}: expected name[@size,...]:field=value[,field=value]")
    fields = {f.name for f in dataclasses.fields(SynthERConfig)}
    overrides: Dict[str, Any] = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in fields:
            raise ValueError(f"variant {text!r}: {item!r} is not field=value with a SynthERConfig field")
        overrides[key.strip()] = _coerce(value.strip())
    sizes = tuple(int(s) for s in size_text.split(",")) if size_text else None
    return Variant(name, overrides, sizes)


# ============================================================================================ data
def load_or_collect(env: str, n: int, n_ref: int, seed: int, out_dir: Path,
                    policy_mix: Sequence[float]) -> Dict[str, Dict[str, np.ndarray]]:
    """The training rows (``n``), the reference set and the held-out set (``n_ref`` each).

    Cached in ``OUT/data_<env>_<n>_r<n_ref>_m<policy mix>_s<seed>.npz`` (ignored by git) so a resumed
    sweep scores against the same data; every setting the collection depends on is in the name.
    """
    from .oracles import KEYS, collect_transitions

    mix = "-".join(f"{p:g}" for p in policy_mix)
    path = out_dir / f"data_{env.replace('/', '_')}_{n}_r{n_ref}_m{mix}_s{seed}.npz"
    if path.exists():
        z = np.load(path)
        return {part: {k: z[f"{part}/{k}"] for k in KEYS} for part in ("train", "ref", "hold")}
    t0 = time.perf_counter()
    _log(f"collecting {n:,} + 2 x {n_ref:,} real transitions from {env} (cached in {path.name})")
    sets = {"train": collect_transitions(env, n, seed=seed, policy_probs=policy_mix),
            "ref": collect_transitions(env, n_ref, seed=seed + 1, policy_probs=policy_mix),
            "hold": collect_transitions(env, n_ref, seed=seed + 2, policy_probs=policy_mix)}
    sets = {part: {k: np.asarray(d[k]) for k in KEYS} for part, d in sets.items()}
    np.savez(path, **{f"{part}/{k}": v for part, d in sets.items() for k, v in d.items()})
    _log(f"collected in {time.perf_counter() - t0:.0f}s")
    return sets


def _prefix(d: Mapping[str, np.ndarray], n: int) -> Dict[str, np.ndarray]:
    return {k: v[:n] for k, v in d.items()}


# ============================================================================================ cells
def _cell_path(out_dir: Path, env: str, variant: str, size: int) -> Path:
    return out_dir / "cells" / env.replace("/", "_") / variant / f"{size}.json"


def _read_cell(path: Path, key: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The stored cell if it was measured with the same settings ``key``, else None."""
    from synther_buffer import SynthERConfig

    if not path.exists():
        return None
    cell = json.loads(path.read_text())
    stored, key = dict(cell.get("key", {})), json.loads(json.dumps(key))
    config = key.pop("config", None)
    if config is not None and not SynthERConfig.from_dict(config).matches_record(stored.pop("config", None)):
        return None   # fields added to SynthERConfig since a cell was stored match at their defaults
    return cell if stored == key else None


def _write_cell(path: Path, cell: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cell, indent=2, default=float) + "\n")
    tmp.replace(path)


def epochs_seen(steps: int, batch: int, rows: int) -> float:
    """Passes over the data a fit makes: ``steps * batch / rows``."""
    return steps * batch / rows


def run_cells(args: argparse.Namespace, variants: Sequence[Variant]) -> None:
    """Measure every missing (env, size, variant) cell and every baseline cell."""
    from synther_buffer import SynthERConfig
    from synther_buffer.datasets import from_rows, to_rows
    from synther_buffer.offline import make_model

    from .baselines import augment
    from .oracles import make_oracle, safe_std, score_transitions

    out_dir = Path(args.out)
    sizes = sorted(args.sizes)
    data = load_or_collect(args.env, max(sizes), REFERENCE_ROWS, args.seed, out_dir, args.policy_mix)
    obs_std = safe_std(data["ref"]["next_observations"])
    rew_std = float(safe_std(data["ref"]["rewards"]))
    oracle = make_oracle(args.env)
    common = {"env": args.env, "seed": args.seed, "num_synthetic": args.num_synthetic,
              "score_rows": args.score_rows, "data": f"{max(sizes)}/{REFERENCE_ROWS}", "policy_mix": list(args.policy_mix)}

    def score(rows: np.ndarray, layout) -> Dict[str, Any]:
        s = score_transitions(args.env, from_rows(rows, layout), obs_std=obs_std, reward_std=rew_std,
                              max_rows=args.score_rows, seed=args.seed, oracle=oracle)
        return {k: s.get(k) for k in SCORE_KEYS}

    rows_of = {size: to_rows(_prefix(data["train"], size), model_terminals=None) for size in sizes}
    try:
        for size in sizes:
            train_rows, layout = rows_of[size]
            for base in ("real", "additive"):
                path = _cell_path(out_dir, args.env, base, size)
                key = {**common, "size": size, "variant": base}
                if _read_cell(path, key):
                    continue
                if args.dry_run:
                    print(f"to measure: {args.env} {size:,} rows, {base}")
                    continue
                if base == "real":
                    rows, _ = to_rows(_prefix(data["hold"], args.num_synthetic), model_terminals=layout.terminal)
                else:
                    rows = augment(train_rows, layout, "additive", args.num_synthetic, np.random.default_rng(args.seed))
                cell = {"key": key, **score(rows, layout)}
                _write_cell(path, cell)
                _log(f"{args.env} {size:,} rows, {base}: dyn MSE {_fmt(cell['dynamics_mse'])}, "
                     f"rew MSE {_fmt(cell['reward_mse'])}")
        # variant-major: the preset's whole curve first, then the sweeps
        for v in variants:
            for size in sizes:
                if not v.applies_to(size):
                    continue
                cfg = SynthERConfig.preset(args.preset).replace(device=args.device, seed=args.seed,
                                                                progress=args.progress, **v.overrides)
                path = _cell_path(out_dir, args.env, v.name, size)
                key = {**common, "size": size, "variant": v.name, "preset": args.preset,
                       "config": cfg.replace(progress=False, device="auto").to_dict()}
                if _read_cell(path, key):
                    continue
                if args.dry_run:
                    print(f"to measure: {args.env} {size:,} rows, {v.name} ({cfg.train_steps_for(size):,} steps)")
                    continue
                train_rows, layout = rows_of[size]
                model = make_model(layout, layout.dim, cfg)
                _log(f"{args.env} {size:,} rows, {v.name} ({dict(v.overrides) or 'preset'}): fitting ...")
                load = _loadavg()
                fit = model.fit(train_rows)
                t = time.perf_counter()
                rows = model.sample(args.num_synthetic, seed=args.seed + 1)
                sample_s = time.perf_counter() - t
                steps = int(fit.get("steps", cfg.train_steps))
                batch = cfg.batch_size_for(size)
                cell = {"key": key, "fit_s": fit["seconds"], "sample_s": sample_s, "loss": fit["loss"],
                        "train_steps": steps, "batch_size": batch, "epochs": epochs_seen(steps, batch, size),
                        "params": model.num_params, "loadavg_before": load, "loadavg_after": _loadavg(),
                        **score(rows, layout)}
                _write_cell(path, cell)
                _log(f"{args.env} {size:,} rows, {v.name}: fit {fit['seconds']:.0f}s ({steps:,} steps, "
                     f"{cell['epochs']:.0f} epochs), dyn MSE {_fmt(cell['dynamics_mse'])} +- "
                     f"{_fmt(cell['dynamics_mse_se'])}, rew MSE {_fmt(cell['reward_mse'])}")
    finally:
        oracle.close()


# ============================================================================================ report
TABLE_COLUMNS = (
    ("env", "env"), ("size", "real rows"), ("variant", "variant"), ("train_steps", "steps"),
    ("epochs", "epochs"), ("fit_s", "fit s"), ("dynamics_mse", "dyn MSE"), ("dynamics_mse_se", "+- se"),
    ("dyn_x_additive", "x additive"), ("reward_mse", "rew MSE"), ("reward_mse_se", "+- se "),
    ("rew_x_additive", "x additive "),
)


def collect_table(out_dir: Path) -> List[Dict[str, Any]]:
    """One row per stored cell (variants and baselines), with the ratios to additive noise of the same
    env and size."""
    cells = [json.loads(p.read_text()) for p in sorted((out_dir / "cells").glob("*/*/*.json"))]
    additive = {(c["key"]["env"], c["key"]["size"]): c for c in cells if c["key"]["variant"] == "additive"}
    rows = []
    for c in cells:
        k = c["key"]
        row = {"env": k["env"], "size": k["size"], "variant": k["variant"],
               **{name: c.get(name) for name in ("fit_s", "sample_s", "train_steps", "batch_size", "epochs",
                                                  "loss", "params", *SCORE_KEYS)}}
        add = additive.get((k["env"], k["size"]))
        if add:
            for ours, theirs, name in (("dynamics_mse", "dynamics_mse", "dyn_x_additive"),
                                       ("reward_mse", "reward_mse", "rew_x_additive")):
                if row.get(ours) is not None and add.get(theirs):
                    row[name] = row[ours] / add[theirs]
        rows.append(row)
    order = {"real": 0, "additive": 1, "preset": 2}
    rows.sort(key=lambda r: (r["env"], r["size"], order.get(r["variant"], 3), r["variant"]))
    return rows


def write_report(out_dir: Path) -> str:
    """``sizes.json`` + ``sizes.csv`` from the cells; returns the markdown table."""
    import csv

    rows = collect_table(out_dir)
    (out_dir / "sizes.json").write_text(json.dumps({"rows": rows}, indent=2, default=float) + "\n")
    keys = [k for k, _ in TABLE_COLUMNS] + ["sample_s", "batch_size", "loss", "params", "dynamics_mse_median",
                                            "n_scored", "n_nonfinite"]
    with open(out_dir / "sizes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return markdown_table(rows, TABLE_COLUMNS)


# ============================================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity.sizes",
                                description="SynthER fidelity (simulator oracle) as the real dataset grows.")
    p.add_argument("--env", default="HalfCheetah-v5", help="environment (as benchmarks.fidelity --env)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="real-data sizes (rows)")
    p.add_argument("--preset", default="fast", choices=("paper", "fast", "tiny"), help="SynthERConfig preset")
    p.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME[@SIZES]:F=V,...",
                   help="config overrides to measure beside the preset, e.g. steps45k@50000:train_steps=45000 "
                        "(repeatable)")
    p.add_argument("--no-preset", action="store_true", help="measure only the --variant's, not the preset itself")
    p.add_argument("--num-synthetic", type=int, default=10_000, help="rows generated and scored per cell")
    p.add_argument("--score-rows", type=int, default=None, help="replay at most this many rows per cell")
    p.add_argument("--policy-mix", default="1,1,1", help="behaviour policy weights random,gait,tuned")
    p.add_argument("--out", default="results/fidelity_sizes", help="output directory (cells are kept here)")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads")
    p.add_argument("--device", default="auto", help="torch device for SynthER")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="tqdm bars for the fits")
    p.add_argument("--report-only", action="store_true", help="rebuild the table from the stored cells")
    p.add_argument("--dry-run", action="store_true", help="list the cells still to measure; fit nothing")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from synther_buffer import SynthERConfig

    from .cli import _parse_mix

    args = build_parser().parse_args(argv)
    args.policy_mix = _parse_mix(args.policy_mix)
    if min(args.sizes) < 2:
        raise SystemExit("--sizes must be positive row counts")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        _set_threads(args.threads)
        variants = ([] if args.no_preset else [Variant("preset", {})]) + list(args.variant)
        names = [v.name for v in variants]
        if len(set(names)) != len(names) or {"real", "additive"} & set(names):
            raise SystemExit(f"variant names must be unique and not 'real' / 'additive': {names}")
        for v in variants:   # every override valid on the preset, before anything runs
            try:
                SynthERConfig.preset(args.preset).replace(**v.overrides)
            except ValueError as e:
                raise SystemExit(f"variant {v.name!r}: {e}") from None
        run_cells(args, variants)
    print(write_report(out_dir))
    print(f"\nwrote {out_dir / 'sizes.json'}, {out_dir / 'sizes.csv'} ({len(list((out_dir / 'cells').glob('*/*/*.json')))} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
