"""The ``synther`` command.

    synther upsample DATASET --num-samples 5000000 --out OUT.npz [--preset paper|fast|tiny] [--mix 0.5]
                     [--seed S] [--device D] [--train-steps N] [--save-model PATH] [--load-model PATH]
                     [--chunk-size ROWS] [--action-bounds LOW HIGH] [--threads N] [--quiet]
                     [--workers N [--ray ADDRESS] [--cpus-per-worker C] [--max-retries R]]
    synther report DATASET SYNTHETIC [--out report.png] [--env-id ID] [--max-rows N]
    synther train ...   (delegates to synther_buffer.train: add_arguments(parser) / run(args))

``upsample`` and ``report`` are implemented in ``synther_buffer.offline`` (see its docstring for the
file formats, the streaming writers and the exact meaning of ``--mix``; ``--workers`` shards the
generation over Ray tasks, ``synther_buffer.distributed``). ``train`` imports its
module only when that subcommand is used, so ``upsample`` never pays for an RL stack. The
benchmarks (``python -m benchmarks.fidelity`` etc.) run from a source checkout, not through here.

``main(argv)`` returns the exit status: 0 on success, 2 for bad arguments or inputs (the message
goes to stderr), 1 if a delegate module or an optional dependency is missing (the message names
the extra to install, e.g. ``pip install "synther-buffer[sb3]"``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .config import COMPILE_HELP, PRECISION_HELP, PRECISIONS
from .extras import MissingExtraError

# subcommand -> candidate modules providing ``add_arguments(parser)`` and ``run(args)``
DELEGATES: Dict[str, Tuple[str, ...]] = {
    "train": ("synther_buffer.train",),
}
_HELP = {
    "upsample": "fit SynthER on an offline dataset and write millions of synthetic transitions",
    "report": "compare a synthetic dataset with the real one (histograms, mean/std, terminal rate)",
    "train": "online RL training with a SynthER replay buffer (SB3 SAC; the sb3 extra)",
}


def _add_upsample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upsample", help=_HELP["upsample"], description=_HELP["upsample"] + (
        ". DATASET: .npz / D4RL .hdf5 / Minari directory (transition keys), or a plain [N, D] .npy array."))
    p.add_argument("dataset", help="input: .npz, .hdf5/.h5 (D4RL or Minari), Minari dataset dir, or .npy array")
    p.add_argument("--out", required=True, help="output .npz, .hdf5/.h5 (transition keys) or .npy (raw rows)")
    p.add_argument("--num-samples", type=int, default=5_000_000,
                   help="rows in the output (default 5M, seed C.1)")
    p.add_argument("--preset", choices=("paper", "fast", "tiny"), default=None,
                   help="SynthERConfig preset (default: paper on CUDA, fast on CPU)")
    p.add_argument("--mix", type=float, default=0.0,
                   help="fraction of real rows in the output, in [0, 1): round(mix * num_samples) real rows, "
                        "the rest synthetic (seed E.2 uses 0.5); default 0 = purely synthetic")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the preset's, 0)")
    p.add_argument("--device", default=None, help="'auto' (default), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--train-steps", type=int, default=None, help="override the preset's training steps")
    p.add_argument("--save-model", default=None, help="save the fitted model here (.pt)")
    p.add_argument("--load-model", default=None,
                   help="sample from this saved model instead of fitting one (its width must match the data)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="rows generated and written per chunk (default: the sampler batch, 16K on CPU, 100K on CUDA)")
    p.add_argument("--action-bounds", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="clip the synthetic actions to [LOW, HIGH] (e.g. -1 1 for D4RL / Minari MuJoCo); "
                        "default: as generated (the paper)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 avoids thread oversubscription on a "
                        "busy machine, where 2 threads on 2 shared cores can run >10x slower")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="fit here, then generate in N Ray tasks (the distributed extra), one GPU each when the "
                        "cluster has GPUs; the output is the same for every N. Default: generate in this process")
    p.add_argument("--ray", default=None, metavar="ADDRESS", dest="ray_address",
                   help="with --workers: the Ray cluster ('auto' = RAY_ADDRESS / `ray start`, host:port, "
                        "ray://...); default: start a local Ray instance. The output's directory must be on a "
                        "filesystem every node mounts")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="with --workers: CPUs (and torch threads) each generation task takes (default 1)")
    p.add_argument("--max-retries", type=int, default=None,
                   help="with --workers: reruns of a task whose worker or node died (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help=_HELP["report"], description=_HELP["report"] + " (seed Figure 8).")
    p.add_argument("dataset", help="the real dataset (any format `upsample` reads)")
    p.add_argument("synthetic", help="the synthetic dataset (e.g. the output of `synther upsample`)")
    p.add_argument("--out", default=None,
                   help="histogram PNG (default: SYNTHETIC's name + '.report.png'); the stats JSON goes "
                        "beside it with suffix .json")
    p.add_argument("--env-id", default=None,
                   help="score dynamics fidelity by replaying the synthetic transitions in this environment "
                        "(HalfCheetah-v5, cheetah-run; needs the envs extra)")
    p.add_argument("--max-rows", type=int, default=200_000, help="rows of each set used for the histograms")


def _add_delegate(sub: argparse._SubParsersAction, name: str, load: bool) -> None:
    """Register ``name``; import its module and let it add its arguments only when ``load``."""
    helptext = _HELP.get(name, f"`synther {name}`")
    if not load:
        sub.add_parser(name, help=helptext, add_help=False)
        return
    errors: List[str] = []
    for modname in DELEGATES[name]:
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:
            missing = getattr(e, "name", None)
            if missing and (modname == missing or modname.startswith(missing + ".")):
                errors.append(f"{modname} is not available")
            else:
                errors.append(f"{modname} needs a missing dependency ({type(e).__name__}: {e})")
            continue
        p = sub.add_parser(name, help=helptext)
        mod.add_arguments(p)
        p.set_defaults(_delegate=mod.run)
        return
    p = sub.add_parser(name, help=helptext, add_help=False)  # any arguments: see main()
    p.set_defaults(_missing=f"`synther {name}` is not available: " + "; ".join(errors))


def _command(argv: Sequence[str]) -> Optional[str]:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argparse parser; a delegate's module (``train``) is imported only if ``argv`` selects it."""
    parser = argparse.ArgumentParser(prog="synther", description="SynthER: diffusion-upsampled experience replay")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(["upsample", "report", *DELEGATES]) + "}")
    sub.required = True
    _add_upsample(sub)
    _add_report(sub)
    cmd = _command(argv)
    for name in DELEGATES:
        _add_delegate(sub, name, load=(cmd == name))
    return parser


def _config(args: argparse.Namespace):
    from .config import SynthERConfig
    from .diffusion import resolve_device

    preset = args.preset
    if preset is None:
        dev = resolve_device(args.device or "auto")
        preset = "paper" if dev.type == "cuda" else "fast"
    cfg = SynthERConfig.preset(preset)
    if args.device is not None:
        cfg = cfg.replace(device=args.device)
    if getattr(args, "compile", False):
        cfg = cfg.replace(compile=True)
    if getattr(args, "precision", None) is not None:
        cfg = cfg.replace(precision=args.precision)
    return cfg, preset


def cmd_upsample(args: argparse.Namespace) -> int:
    """``synther upsample``: fit, stream the output, print and save the compression report."""
    from . import offline
    from .diffusion import TransitionDiffusion

    offline.output_kind(args.out)  # fail before loading or training
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1 (omit it to generate in this process), got {args.workers}")
    for flag, value in (("--ray", args.ray_address), ("--cpus-per-worker", args.cpus_per_worker),
                        ("--max-retries", args.max_retries)):
        if value is not None and args.workers is None:
            raise ValueError(f"{flag} needs --workers N (the number of generation tasks)")
    if args.cpus_per_worker is not None and not args.cpus_per_worker > 0:
        raise ValueError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if args.max_retries is not None and args.max_retries < 0:
        raise ValueError(f"--max-retries must be >= 0, got {args.max_retries}")
    if args.load_model:   # the saved model's own config fits and samples: flags that set another one would be ignored
        ignored = [flag for flag, given in (("--preset", args.preset is not None), ("--train-steps", args.train_steps),
                                            ("--compile", args.compile), ("--precision", args.precision)) if given]
        if ignored:
            raise ValueError(f"--load-model samples with the saved model's own config; {', '.join(ignored)} would "
                             f"be ignored: drop {'it' if len(ignored) == 1 else 'them'}")
    cfg, preset = _config(args)
    model = None
    if args.load_model:
        model = TransitionDiffusion.load(args.load_model, device=args.device)
    print(f"synther upsample: {args.dataset} -> {args.out}  ({args.num_samples:,} rows, mix {args.mix}, "
          + (f"model {args.load_model}" if model else f"preset {preset}")
          + (f", {args.workers} Ray workers" if args.workers else "") + ")", flush=True)
    s = offline.upsample(args.dataset, args.out, num_samples=args.num_samples, config=cfg, mix=args.mix,
                         seed=args.seed, train_steps=args.train_steps, save_model=args.save_model, model=model,
                         chunk_size=args.chunk_size, progress=not args.quiet,
                         action_bounds=tuple(args.action_bounds) if args.action_bounds else None,
                         workers=args.workers, ray_address=args.ray_address,
                         **{k: v for k, v in (("cpus_per_worker", args.cpus_per_worker),
                                              ("max_retries", args.max_retries)) if v is not None})
    fit = s["fit"]
    print(f"data: {s['dataset_rows']:,} rows x {s['dim']} dims"
          + (" (terminals modelled)" if s["model_terminals"] else ""))
    if not fit.get("reused"):
        print(f"fit: {fit['steps']:,} steps, batch {fit['batch_size']}, loss {fit['loss']:.4f}, "
              f"{s['fit_seconds']:.1f}s on {s['device']}")
    rate = s["wall_synthetic_rows_per_second"] if s.get("workers") else s["synthetic_rows_per_second"]
    tasks = f" over {len(s['shards'])} Ray tasks" if s.get("workers") else ""
    print(f"wrote {s['num_samples']:,} rows ({s['num_real']:,} real, {s['num_synthetic']:,} synthetic) in "
          f"{s['chunks']} chunks, {s['generate_seconds']:.1f}s"
          + (f" ({rate:,.0f} synthetic rows/s{tasks})" if rate else "") + f" -> {s['out']} "
          f"({s['output_bytes'] / 1024 ** 2:.1f} MiB; {s['writer']})")
    for sh in s.get("shards") or ():
        print(f"  shard {sh['shard']}: chunks {sh['chunks'][0]}-{sh['chunks'][1] - 1}, {sh['rows']:,} synthetic rows, "
              f"{sh['seconds']:.1f}s ({sh['sample_seconds']:.1f}s sampling) on {sh['host']} {sh['device']}"
              + (f", attempt {sh['attempt']}" if sh["attempt"] > 1 else ""))
    if s["synthetic_actions_outside_real_range"] is not None and s["num_synthetic"]:
        line = (f"synthetic rows with an action outside the real data's range: "
                f"{s['synthetic_actions_outside_real_range']:,} of {s['num_synthetic']:,}")
        if s["synthetic_actions_clipped"] is not None:
            line += f"; clipped to --action-bounds: {s['synthetic_actions_clipped']:,}"
        print(line)
    print(offline.format_compression(s["compression"]))
    print(f"total {s['total_seconds']:.1f}s; summary JSON: {s.get('json')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``synther report``: histograms PNG, mean/std table (printed + JSON), terminal rate, optional fidelity."""
    from pathlib import Path

    from . import report

    if args.max_rows < 1:
        raise ValueError(f"--max-rows must be >= 1, got {args.max_rows}")
    out = args.out
    if out is None:
        syn = Path(args.synthetic)
        out = syn.parent / ((syn.stem if syn.is_file() else syn.name) + ".report.png")
    r = report.report(args.dataset, args.synthetic, out_png=out, env_id=args.env_id, max_hist_rows=args.max_rows)
    print(report.format_stats(r))
    if args.env_id is not None:
        if r.get("fidelity") is not None:
            print(f"fidelity ({args.env_id}): {r['fidelity']}")
        else:
            print(r.get("fidelity_note", "fidelity scoring unavailable"))
    print(f"histograms: {r['png']}\nstats JSON: {r['json']}")
    return 0


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {"upsample": cmd_upsample, "report": cmd_report}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``synther`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "_missing", None):
        print(f"synther: {args._missing}", file=sys.stderr)
        return 1
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "_delegate", None) is not None:
            rc = args._delegate(args)
            return int(rc) if isinstance(rc, int) else 0
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"synther {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MissingExtraError as e:
        print(f"synther {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
