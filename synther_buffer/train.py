"""``synther train``: online SB3 SAC at UTD=20 with a SynthER replay buffer (the ``make demo`` job).

    synther train --out runs/demo                       # the CPU demo: DMC cheetah-run, ~5 min quiet
    synther train --env HalfCheetah-v5 --preset paper --total-steps 100000 --device cuda --out runs/hc

What it does: stable-baselines3 SAC (``MlpPolicy``, batch 256, ``train_freq=1``, ``gradient_steps=UTD``)
with :class:`synther_buffer.sb3.GenerativeReplayBuffer`; a tqdm bar over env steps (steps/s, retrains,
last eval) and the engine's own bars for each diffusion fit and sampling; an evaluation every
``--eval-every`` env steps on a separate env; at the end a table (final eval return, retrains, wall
time split into setup / RL / diffusion training / diffusion sampling / evaluation) and, under
``--out``: ``eval_returns.csv``, ``results.json`` (config, evals, retrains, timing split, buffer
stats) and ``learning_curve.png``.

The CPU demo budget (defaults). SB3 SAC does ~64-114 gradient steps/s on one core of these machines
(load-dependent), so UTD=20 is ~3-6 env steps/s; one ``fast``-preset retrain (15K steps + 100K
samples) is ~3 minutes or more. The defaults therefore run 1,750 env steps with learning from env
step 1,000 (15,000 SAC updates, ~2.5-4 min) and the ``demo`` preset: ``fast`` (256 x 4 denoiser,
40-step stochastic Heun) with 5K diffusion steps and 25K generated rows per retrain (~1-1.5 min
each), retraining every 750 env steps once ``min_real`` = 1,000 real transitions exist, i.e. at env
steps 1,000 and 1,500 (2 retrains). Total ~5-7 minutes on 2 cores; more on a busy machine.
The learning curve of so short a run is a smoke test, not a result: the paper's runs are 100K+ steps.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .config import COMPILE_HELP, PRECISION_HELP, PRECISIONS

DEFAULT_ENV = "dm_control/cheetah-run-v0"
PRESETS = ("demo", "fast", "paper", "tiny")
# "demo" = the fast preset trimmed so that two retrains fit a few CPU minutes (see the module docstring).
DEMO_OVERRIDES = dict(train_steps=5_000, num_generate=25_000, retrain_every=750)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` unless the help already explains the default or X is None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "default" in h or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return h
        return h + " (default: %(default)s)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``synther train``'s flags to ``p`` (called by ``synther_buffer.cli``)."""
    p.description = ("Online RL with a SynthER replay buffer: SB3 SAC at UTD=20 (default: the CPU demo on "
                     "DMC cheetah-run, 1,750 env steps, 2 retrains, ~5-7 min on 2 cores).")
    p.formatter_class = _DefaultsFormatter
    g = p.add_argument_group("run")
    g.add_argument("--env", default=DEFAULT_ENV,
                   help="env id for synther_buffer.envs.make_env: dm_control/<domain>-<task>-v0, "
                        "<domain>-<task>, or a gymnasium id (HalfCheetah-v5, Pendulum-v1)")
    g.add_argument("--total-steps", type=int, default=1_750, help="env steps to train for")
    g.add_argument("--seed", type=int, default=0, help="seed of the env, SAC and SynthER")
    g.add_argument("--out", default="runs/train", help="output directory (CSV, JSON, PNG)")
    g.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, where 2 threads on 2 shared cores can run "
                        "~100x slower; torch's default on CUDA)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("agent (SB3 SAC)")
    g.add_argument("--utd", type=int, default=20, help="update-to-data ratio: SAC gradient steps per env step")
    g.add_argument("--learning-starts", type=int, default=None,
                   help="random-action env steps before the first update (default: the preset's min_real, "
                        "i.e. when the first synthetic pool can exist; half of --total-steps if that is less)")
    g.add_argument("--batch-size", type=int, default=256, help="SAC minibatch size")
    g.add_argument("--buffer-size", type=int, default=None,
                   help="real transitions kept (default: --total-steps, at most 1M)")
    g.add_argument("--no-synther", action="store_true",
                   help="baseline: SB3's plain ReplayBuffer (no diffusion model), same UTD")
    g = p.add_argument_group("SynthER")
    g.add_argument("--preset", choices=PRESETS, default="demo",
                   help="SynthERConfig preset; 'demo' = fast with train_steps=5000, num_generate=25000, "
                        "retrain_every=750 (CPU demo budget)")
    g.add_argument("--retrain-every", type=int, default=None, help="env steps between retrains (default: preset's)")
    g.add_argument("--real-ratio", type=float, default=None,
                   help="fraction of real rows in each batch (default: preset's, 0.5)")
    g.add_argument("--train-steps", type=int, default=None, help="diffusion training steps per retrain "
                                                                 "(default: preset's)")
    g.add_argument("--num-generate", type=int, default=None,
                   help="synthetic rows generated per retrain (default: preset's)")
    g.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    g.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    g.add_argument("--async-retrain", action="store_true",
                   help="retrain in a background thread while SAC keeps training on the previous pool "
                        "(default: the paper's synchronous schedule)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=250, help="env steps between evaluations (0: only at the end)")
    g.add_argument("--eval-episodes", type=int, default=3, help="episodes per evaluation (deterministic policy)")


def synther_config(args: argparse.Namespace):
    """The ``SynthERConfig`` for ``args``: preset (``demo`` = fast + DEMO_OVERRIDES), then the flags."""
    from .config import SynthERConfig

    if args.preset == "demo":
        cfg = SynthERConfig.preset("fast").replace(**DEMO_OVERRIDES)
    else:
        cfg = SynthERConfig.preset(args.preset)
    changes = dict(device=args.device, seed=args.seed, progress=not args.quiet)
    for field in ("retrain_every", "real_ratio", "train_steps", "num_generate"):
        if getattr(args, field, None) is not None:
            changes[field] = getattr(args, field)
    if getattr(args, "compile", False):
        changes["compile"] = True
    if getattr(args, "precision", None) is not None:
        changes["precision"] = args.precision
    if getattr(args, "async_retrain", False):
        changes["async_retrain"] = True   # ValueError naming the field if this version lacks it
    return cfg.replace(**changes)


def _check(args: argparse.Namespace) -> None:
    for name in ("total_steps", "utd", "batch_size", "eval_episodes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_every",):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.learning_starts is not None and args.learning_starts < 0:
        raise ValueError(f"--learning-starts must be >= 0, got {args.learning_starts}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def run(args: argparse.Namespace) -> int:
    """Train, evaluate, write the results and print the table. Returns the exit status."""
    from .results import TimingSplit

    timing = TimingSplit()
    try:
        _check(args)
        setup = _setup(args)
    except ValueError as e:
        print(f"synther train: error: {e}", file=sys.stderr)
        return 2
    timing.mark("setup")
    if setup["cfg"] is not None and setup["cfg"].to_dict().get("async_retrain"):
        timing.concurrent.update({"diffusion_fit", "diffusion_sample"})
    return _train(args, setup, timing)


def _setup(args: argparse.Namespace) -> dict:
    """Threads, envs, SynthER config and the SAC model (raises ValueError on bad inputs)."""
    import torch

    from .diffusion import resolve_device
    from .envs import can_terminate, make_env

    device = resolve_device(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = None if args.no_synther else synther_config(args)
    min_real = cfg.min_real if cfg is not None else 1_000
    learning_starts = args.learning_starts
    if learning_starts is None:  # start updating when the first synthetic pool can exist
        learning_starts = min_real if min_real < args.total_steps else args.total_steps // 2
    env = make_env(args.env, seed=args.seed)
    eval_env = make_env(args.env, seed=args.seed + 10_000)

    from .extras import require
    SAC = require("stable_baselines3", "sb3", "synther train").SAC

    from .sb3 import GenerativeReplayBuffer

    buffer_kwargs = None
    if cfg is not None:
        buffer_kwargs = dict(config=cfg, model_terminals=can_terminate(args.env))
    model = SAC("MlpPolicy", env, learning_starts=learning_starts, batch_size=args.batch_size,
                buffer_size=args.buffer_size or min(args.total_steps, 1_000_000),
                train_freq=1, gradient_steps=args.utd,
                replay_buffer_class=GenerativeReplayBuffer if cfg is not None else None,
                replay_buffer_kwargs=buffer_kwargs, seed=args.seed, device=str(device), verbose=0)
    return dict(cfg=cfg, env=env, eval_env=eval_env, model=model, device=device, threads=threads,
                learning_starts=learning_starts, preset=None if cfg is None else args.preset)


def _train(args: argparse.Namespace, s: dict, timing) -> int:
    from stable_baselines3.common.callbacks import BaseCallback

    from .results import Results, TrainingMonitor, format_summary

    model, cfg = s["model"], s["cfg"]
    buffer = model.replay_buffer
    label = "SB3 SAC" + (" (plain replay, no SynthER)" if cfg is None else f" + SynthER ({args.preset} preset)")
    title = (f"{label} on {args.env}: UTD {args.utd}, {args.total_steps:,} env steps, "
             f"learning from {s['learning_starts']:,}, seed {args.seed}")
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    config.update(learning_starts=s["learning_starts"], threads=s["threads"], device=str(s["device"]),
                  agent="stable_baselines3.SAC", synther=None if cfg is None else cfg.to_dict())
    results = Results(args.out, config=config, title=title)
    print(title, flush=True)
    if cfg is not None:
        print(f"SynthER: retrain every {cfg.retrain_every:,} env steps (from {cfg.min_real:,} real transitions), "
              f"{cfg.train_steps:,} diffusion steps, {cfg.num_generate:,} rows per retrain, "
              f"real ratio {cfg.real_ratio}, device {s['device']}", flush=True)

    monitor = TrainingMonitor(results, args.total_steps, args.eval_every, args.eval_episodes, s["eval_env"],
                              policy_fn=lambda obs: model.predict(obs, deterministic=True)[0],
                              stats_fn=buffer.stats if cfg is not None else None,
                              timing=timing, progress=not args.quiet)

    class Monitor(BaseCallback):
        # SB3 calls on_step after each env step (before storing the transition); retrains that the
        # store triggers are picked up on the next call and by monitor.finish().
        def _on_step(self) -> bool:
            monitor.step(self.num_timesteps)
            return True

    rc = 0
    try:
        model.learn(args.total_steps, callback=Monitor())
    except KeyboardInterrupt:
        print("\ninterrupted: writing partial results", file=sys.stderr)
        rc = 130
    if cfg is not None and hasattr(buffer, "wait"):
        buffer.wait()   # a background retrain (--async-retrain) still running
    monitor.env_steps = model.num_timesteps
    summary = monitor.finish(final_stats=buffer.stats() if cfg is not None else None)
    print("\n" + format_summary(summary, title="Results"), flush=True)
    return rc


def main(argv: Optional[list] = None) -> int:
    """``python -m synther_buffer.train ...`` (same as ``synther train ...``)."""
    p = argparse.ArgumentParser(prog="synther train")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
