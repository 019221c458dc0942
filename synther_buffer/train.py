"""``synther train``: online SB3 SAC at UTD=20 with a SynthER replay buffer (the ``make demo`` job).

    synther train --out runs/demo                       # the CPU demo: DMC cheetah-run, a few minutes
    synther train --env HalfCheetah-v5 --preset paper --total-steps 100000 --device cuda --out runs/hc

What it does: stable-baselines3 SAC (``MlpPolicy``, batch 256, ``train_freq=1``, ``gradient_steps=UTD``)
with :class:`synther_buffer.sb3.GenerativeReplayBuffer`, run by :class:`synther_buffer.sb3_run.SB3Run`
(the driver ``integrations/sb3_sac.py`` uses too): a tqdm bar over env steps (steps/s, retrains, last
eval) and the engine's own bars for each diffusion fit and sampling; an evaluation every
``--eval-every`` env steps on a separate env; at the end a table (final eval return, retrains, wall
time split into setup / RL / diffusion training / diffusion sampling / evaluation) and, under
``--out``: ``eval_returns.csv``, ``results.json`` (config, evals, retrains, timing split, buffer
stats) and ``learning_curve.png``. This module holds the flags, the ``demo`` preset and the agent.

The defaults are the CPU demo, sized so that a 2-core machine finishes in minutes while still
showing two retrains: 1,750 env steps with learning from env step 1,000 (``min_real``, when the first
synthetic pool can exist), and the ``demo`` preset, i.e. ``fast`` (256 x 4 denoiser, 40-step
stochastic Heun) with 5K diffusion steps and 25K generated rows per retrain, retraining every 750 env
steps from 1,000 real transitions on: at env steps 1,000 and 1,500. The learning curve of so short a
run is a smoke test, not a result: the paper's runs are 100K+ steps.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .config import COMPILE_HELP, PRECISION_HELP, PRECISIONS, WARM_START_HELP, WARM_START_STEPS_HELP
from .validation import check_run_flags

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
                     "DMC cheetah-run, 1,750 env steps, 2 retrains: minutes on a laptop CPU).")
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
                   help="torch CPU threads (default: 1 on CPU, where threads competing with other processes "
                        "for a few shared cores slow small networks down badly; torch's default on CUDA)")
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
    add_relevance_arguments(g)
    add_warm_start_arguments(g)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=250, help="env steps between evaluations (0: only at the end)")
    g.add_argument("--eval-episodes", type=int, default=3, help="episodes per evaluation (deterministic policy)")


def add_relevance_arguments(g) -> None:
    """``--relevance`` and ``--guidance-scale`` (Prioritized Generative Replay) on parser / group ``g``."""
    g.add_argument("--relevance", choices=("curiosity", "reward"), default=None,
                   help="relevance-guided generation (Prioritized Generative Replay): condition the diffusion "
                        "model on this score of each real transition and generate at high scores "
                        "(SynthERConfig.relevance; default: plain SynthER)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance weight with --relevance (SynthERConfig.guidance_scale, default 2.0)")


def add_warm_start_arguments(g) -> None:
    """``--warm-start`` and ``--warm-start-steps`` (warm-started retraining) on parser / group ``g``."""
    g.add_argument("--warm-start", action="store_true", help=WARM_START_HELP)
    g.add_argument("--warm-start-steps", type=int, default=None, help=WARM_START_STEPS_HELP)


def preset_config(args: argparse.Namespace):
    """``--preset``'s ``SynthERConfig`` (``demo`` = fast + DEMO_OVERRIDES), before the other flags."""
    from .config import SynthERConfig

    if args.preset == "demo":
        return SynthERConfig.preset("fast").replace(**DEMO_OVERRIDES)
    return SynthERConfig.preset(args.preset)


def synther_config(args: argparse.Namespace):
    """The ``SynthERConfig`` for ``args``: ``preset_config(args)``, then the flags."""
    from .sb3_run import synther_config as apply_flags

    return apply_flags(preset_config(args), args)


def run(args: argparse.Namespace) -> int:
    """Train, evaluate, write the results and print the table. Returns the exit status (2: bad inputs)."""
    try:
        check_run_flags(args)
        setup = _setup(args)
    except ValueError as e:
        print(f"synther train: error: {e}", file=sys.stderr)
        return 2
    return setup.train()


def _setup(args: argparse.Namespace):
    """The SynthER config, the SAC agent and the run around it (``SB3Run``); ValueError on bad inputs."""
    from .extras import require

    SAC = require("stable_baselines3", "sb3", "synther train").SAC   # first: name the missing extra
    from .diffusion import resolve_device
    from .envs import can_terminate
    from .sb3 import GenerativeReplayBuffer
    from .sb3_run import SB3Run

    device = resolve_device(args.device)
    cfg = None if args.no_synther else synther_config(args)
    min_real = (cfg or preset_config(args)).min_real   # the baseline starts where the SynthER run would
    learning_starts = args.learning_starts
    if learning_starts is None:  # start updating when the first synthetic pool can exist
        learning_starts = min_real if min_real < args.total_steps else args.total_steps // 2
    buffer_size = args.buffer_size or min(args.total_steps, 1_000_000)

    buffer_kwargs = None if cfg is None else dict(config=cfg, model_terminals=can_terminate(args.env))

    def make_agent(env) -> SAC:
        return SAC("MlpPolicy", env, learning_starts=learning_starts, batch_size=args.batch_size,
                   buffer_size=buffer_size, train_freq=1, gradient_steps=args.utd,
                   replay_buffer_class=None if cfg is None else GenerativeReplayBuffer,
                   replay_buffer_kwargs=buffer_kwargs, seed=args.seed, device=str(device), verbose=0)

    label = "SB3 SAC" + (" (plain replay, no SynthER)" if cfg is None else f" + SynthER ({args.preset} preset)")
    title = (f"{label} on {args.env}: UTD {args.utd}, {args.total_steps:,} env steps, "
             f"learning from {learning_starts:,}, seed {args.seed}")
    return SB3Run(args, make_agent, synther=cfg, title=title, buffer_size=buffer_size,
                  extra_config=dict(learning_starts=learning_starts, device=str(device),
                                    agent="stable_baselines3.SAC"))


def main(argv: Optional[list] = None) -> int:
    """``python -m synther_buffer.train ...`` (same as ``synther train ...``)."""
    p = argparse.ArgumentParser(prog="synther train")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
