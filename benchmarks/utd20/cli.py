"""``python -m benchmarks.utd20``: its flags, the campaign loop (plan, resume, run, report) and the docs'
generated blocks."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import __doc__ as _PACKAGE_DOC
from .docs import render_block, update_docs
from .report import PAPER_100K, write_report
from .runner import CHILDREN, check_shared_path, log, out_lock, ray_connect, run_unit, run_units_on_ray
from .units import (ARMS, PRESETS, REPO, Preset, Unit, plan, repo_relative, resume_first, unit_args,
                    unit_settings, unit_status)


def build_parser() -> argparse.ArgumentParser:
    from synther_buffer.config import PRECISIONS  # here: the package imports torch

    p = argparse.ArgumentParser(prog="python -m benchmarks.utd20", description=_PACKAGE_DOC.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--envs", nargs="+", default=None, help="env ids (default: the preset's)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="arms (default: the preset's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the preset's)")
    p.add_argument("--out", default=None,
                   help="results root (default: the preset's, benchmarks/results/cpu for cpu)")
    p.add_argument("--work", default=None,
                   help="where units run: checkpoints, logs (default: the preset's, "
                        "~/.cache/synther_buffer/utd20/cpu for cpu, else --out)")
    p.add_argument("--total-steps", type=int, default=None,
                   help="override the preset's env steps per run; without --out / --work the units run under "
                        "roots of their own (the preset's + _<N>steps), never beside the preset's")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 on shared CPUs)")
    p.add_argument("--device", default=None, help="'cpu', 'cuda', 'auto' (default: the preset's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the SynthER arms' diffusion matmul precision (default: the preset's, fp32; "
                        "bf16 pays on GPUs and AVX512-BF16 CPUs). Part of a unit's settings: a finished "
                        "unit run in the other precision counts as stale and is re-run")
    p.add_argument("--jobs", type=int, default=1, help="units run at once (without --ray)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run each unit as a Ray task: no ADDRESS starts a local Ray instance, 'auto' joins the "
                        "cluster in RAY_ADDRESS, else the cluster at ADDRESS. --out must be visible on every node")
    p.add_argument("--cpus-per-unit", type=float, default=1.0, help="Ray: CPUs a unit reserves")
    p.add_argument("--gpus-per-unit", type=float, default=0.0,
                   help="Ray: GPUs a unit reserves (fractions let several units share one GPU)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="Ray: times a unit whose worker died is retried (from its checkpoint)")
    p.add_argument("--dump-pool", action="store_true",
                   help="SynthER units write their final synthetic pool (final_pool.npz, with its real "
                        "transitions) into their work dir and score it with the simulator oracle into "
                        "pool_fidelity.json beside their results (not part of a unit's settings)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished unit's checkpoint/ (its final agent and buffer; default: delete)")
    p.add_argument("--report-only", action="store_true", help="only write the report from finished units")
    p.add_argument("--no-docs", action="store_true",
                   help="leave README.md / benchmarks/UTD20.md alone (by default the report rewrites their "
                        "generated block when --out is the preset's own results root)")
    p.add_argument("--dry-run", action="store_true", help="print the units, their status and commands")
    p.add_argument("--heartbeat", type=float, default=300.0, help="seconds between progress lines per unit")
    p.add_argument("--bootstrap-reps", type=int, default=2000, help="stratified bootstrap resamples")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    if args.total_steps is not None:
        if args.total_steps <= preset.learning_starts:
            raise SystemExit(f"--total-steps must exceed the preset's learning starts ({preset.learning_starts})")
        if args.total_steps != preset.total_steps:   # own default roots: never stale-move the preset's units
            suffix = f"_{args.total_steps}steps"
            preset = dataclasses.replace(preset, default_out=preset.default_out + suffix, default_work=(
                None if preset.default_work is None else preset.default_work + suffix))
        preset = dataclasses.replace(preset, total_steps=args.total_steps)
    if args.precision is not None:  # the SynthER arms only: unit_args passes it as --precision
        preset = dataclasses.replace(preset, synther_overrides={**preset.synther_overrides,
                                                                "precision": args.precision})
    out = _root(args.out, preset.default_out)
    work = _root(args.work, preset.default_work) if (args.work or (preset.default_work and not args.out)) else out
    if args.report_only:
        s = write_report(out, reps=args.bootstrap_reps, work=work, preset=preset)
        print((out / "summary.md").read_text())
        if not args.no_docs:
            _update_docs(preset, out, s, total_steps=args.total_steps)
        return 0 if s["units"] else 1
    envs = list(args.envs or preset.envs)
    arms = list(args.arms or preset.arms)
    units = plan(preset, envs, arms, args.seeds)
    units = resume_first(units, [unit_status(preset, u, out, work) for u in units])
    seeds = max((u.seed for u in units), default=-1) + 1
    device = args.device or preset.device
    if {"synther_utd20", "synther_utd20_fixed"} <= set(arms) and envs:
        same = [unit_settings(preset, Unit(envs[0], a, 0))["synther_config"]
                for a in ("synther_utd20", "synther_utd20_fixed")]
        if same[0] == same[1]:   # on stderr: --dry-run's stdout is one line per unit
            print(f"note: the {preset.synther_preset!r} SynthER preset has no data-size budget rule "
                  "(train_steps_rows=None): synther_utd20 and synther_utd20_fixed train the same diffusion "
                  "budget, so they are the same run", file=sys.stderr, flush=True)
    if args.dry_run:
        print(f"out {out}\nwork {work}", file=sys.stderr, flush=True)
        for u in units:
            print(f"{unit_status(preset, u, out, work):8s} {u.key}: {ARMS[u.arm].script} "
                  f"{' '.join(unit_args(preset, u))}")
        return 0
    failed = 0
    with out_lock(out):
        log(f"utd20 preset {preset.name}: {len(units)} units ({len(envs)} envs x {len(arms)} arms, up to {seeds} seeds), "
             f"{preset.total_steps:,} env steps each, out {out}, work {work}, pid {os.getpid()}")
        statuses = [unit_status(preset, u, out, work) for u in units]
        todo, resumed = sum(s != "done" for s in statuses), statuses.count("partial")
        log(f"{len(units) - todo} done already, {todo} to run"
             + (f" ({resumed} interrupted earlier: they run first)" if resumed else ""))
        t0 = time.time()
        CHILDREN.open()
        try:
            run = lambda u: run_unit(preset, u, out, args.threads, device, args.heartbeat,  # noqa: E731
                                     args.keep_checkpoints, work, args.dump_pool)
            if args.ray is not None:
                ray_connect(args.ray)
                check_shared_path(out)
                results = run_units_on_ray(preset, units, out, work, args.threads, device, args.heartbeat,
                                           args.keep_checkpoints, args.cpus_per_unit, args.gpus_per_unit,
                                           args.max_retries, args.dump_pool)
            elif args.jobs <= 1:
                results = [run(u) for u in units]
            else:
                with ThreadPoolExecutor(args.jobs) as pool:
                    try:
                        results = list(pool.map(run, units))
                    except BaseException:   # Ctrl-C / SIGTERM: stop the children now, or leaving this
                        CHILDREN.stop_all()  # block waits for their threads, i.e. for whole units
                        raise
            failed = results.count("failed")
            log(f"all units processed in {time.time() - t0:.0f} s: {results.count('done')} run, "
                 f"{results.count('skipped')} skipped, {failed} failed")
        finally:
            CHILDREN.stop_all()
            try:
                s = write_report(out, reps=args.bootstrap_reps, work=work, preset=preset)
                log(f"report: {out / 'summary.md'}")
                if not args.no_docs:
                    _update_docs(preset, out, s, total_steps=args.total_steps)
            except Exception as e:  # never mask the run's own error
                log(f"report failed: {e!r}")
    return 1 if failed else 0


DOCS = (REPO / "README.md", REPO / "benchmarks" / "UTD20.md")


def _update_docs(preset: Preset, out: Path, summary: Dict[str, Any], total_steps: Optional[int] = None,
                 docs: Sequence[Path] = DOCS) -> List[Path]:
    """Rewrites the docs' generated block for ``preset`` (``<!-- utd20:<root name> begin -->`` ...) from
    ``summary``, when ``out`` is the preset's own results root in this checkout (a campaign writing
    elsewhere leaves the docs alone). Returns the files changed."""
    own = _root(None, preset.default_out)
    if out.resolve() != own.resolve():
        return []
    steps = "" if total_steps in (None, PRESETS[preset.name].total_steps) else f" --total-steps {total_steps}"
    command = f"python -m benchmarks.utd20 --preset {preset.name}{steps} --report-only"
    planned: Dict[Tuple[str, str], int] = {}
    if not steps:
        for u in plan(preset, preset.envs, preset.arms):
            planned[(u.env, u.arm)] = planned.get((u.env, u.arm), 0) + 1
    labels = {name: arm.label for name, arm in ARMS.items()}
    changed = update_docs(docs, f"utd20:{own.name}", lambda doc: render_block(
        summary, planned, labels, PAPER_100K, out, doc, command))
    for doc in changed:
        log(f"updated the generated block in {repo_relative(doc)}")
    return changed


def _root(given: Optional[str], default: Optional[str]) -> Path:
    """A results/work root: ``given`` relative to the current directory, else the preset's ``default``
    (``~`` expanded, relative to the repository)."""
    if given:
        return Path(given).expanduser().absolute()
    p = Path(default).expanduser()
    return p if p.is_absolute() else REPO / p
