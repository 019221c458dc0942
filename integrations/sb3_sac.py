"""Stable-Baselines3 SAC with a SynthER replay buffer at UTD=20, on any env id.

    python integrations/sb3_sac.py --env dm_control/cheetah-run-v0 --total-steps 100000 --out runs/sac_synther
    python integrations/sb3_sac.py --env dm_control/cheetah-run-v0 --total-steps 100000 --no-synther --out runs/sac_utd20
    python integrations/sb3_sac.py --env HalfCheetah-v5 --preset paper --device cuda --out runs/hc

SynthER is one argument to SAC: ``replay_buffer_class=GenerativeReplayBuffer`` with a
``SynthERConfig``. Every ``retrain_every`` env steps the buffer fits a diffusion model on all real
transitions and regenerates a pool of synthetic ones; every batch is ``real_ratio`` real, the rest
synthetic, which is what lets SAC run 20 gradient steps per env step (seed D.2). ``--no-synther``
runs the same agent with SB3's plain ReplayBuffer: the UTD=20 baseline without SynthER.

Writes ``eval_returns.csv`` (env step, mean / std of the eval episode returns), ``results.json``
(config, evals, retrains, timing split) and ``learning_curve.png`` under ``--out``, and prints a
summary table. Copy this file into your project; it needs ``synther_buffer`` and stable-baselines3.
This file holds what is yours to change (flags, SynthER config, the agent); the run around the agent
(envs, evaluation, checkpoints, result files) is ``synther_buffer.sb3_run.SB3Run``, which
``synther train`` drives too.

``--checkpoint-every N`` writes ``<out>/checkpoint/`` every N env steps and at the end (SB3's
``model.save`` + ``model.save_replay_buffer``, which for SynthER holds the diffusion model, the
synthetic pool and the schedule; the evaluations so far; the RNG states). ``--resume`` continues
from it after a kill (the run's settings unchanged; ``--total-steps`` may only shrink: the buffer was sized for
it, and a larger one is refused rather than overwriting the oldest real data). The resumed run
starts a fresh episode and reseeds its envs from the step count, so it is deterministic but not
bit-identical to a run that was never interrupted.

``--save-pool runs/x/final_pool.npz`` writes the last synthetic pool (and ``final_pool.real.npz``, the
real transitions) at the end, to score its fidelity:
``synther report runs/x/final_pool.real.npz runs/x/final_pool.npz --env-id cheetah-run``.
``--fixed-budget`` trains every diffusion fit for the same number of steps however much real data there
is (the paper's rule), instead of the preset's data-size rule.
"""

from __future__ import annotations

import argparse
import sys

import torch
from stable_baselines3 import SAC

from synther_buffer import SynthERConfig
from synther_buffer.config import PRECISIONS
from synther_buffer.envs import can_terminate
from synther_buffer.sb3 import GenerativeReplayBuffer
from synther_buffer.sb3_run import SB3Run, synther_config
from synther_buffer.train import add_relevance_arguments, add_warm_start_arguments
from synther_buffer.validation import check_run_flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="dm_control/cheetah-run-v0", help="any id synther_buffer.envs.make_env takes")
    p.add_argument("--total-steps", type=int, default=100_000, help="env steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--utd", type=int, default=20, help="SAC gradient steps per env step")
    p.add_argument("--learning-starts", type=int, default=5_000, help="random-action env steps before updates")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256, help="width of SAC's two hidden layers (actor and critics)")
    p.add_argument("--no-synther", action="store_true", help="plain SB3 ReplayBuffer (the baseline)")
    p.add_argument("--preset", choices=("paper", "fast", "tiny"), default=None,
                   help="SynthERConfig preset (default: paper on CUDA, fast on CPU)")
    p.add_argument("--retrain-every", type=int, default=None, help="env steps between retrains (default: preset's)")
    p.add_argument("--real-ratio", type=float, default=None, help="real fraction of each batch (default: preset's)")
    p.add_argument("--train-steps", type=int, default=None, help="diffusion steps per retrain (default: preset's)")
    p.add_argument("--num-generate", type=int, default=None, help="synthetic rows per retrain (default: preset's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="diffusion matmul precision (default: preset's, fp32; bf16 pays on GPUs and AVX512-BF16 CPUs)")
    p.add_argument("--async-retrain", action="store_true",
                   help="retrain in a background thread; SAC keeps training on the previous pool meanwhile")
    add_relevance_arguments(p)   # --relevance, --guidance-scale (Prioritized Generative Replay)
    add_warm_start_arguments(p)   # --warm-start, --warm-start-steps
    p.add_argument("--fixed-budget", action="store_true",
                   help="train every retrain's diffusion model for --train-steps (the preset's) whatever the "
                        "data size: the paper's fixed budget, no data-size rule (SynthERConfig.train_steps_rows=None)")
    p.add_argument("--save-pool", default=None, metavar="PATH",
                   help="at the end, write the final synthetic pool to PATH (.npz transitions: observations, "
                        "actions, rewards, next_observations, terminals) and the real transitions beside it "
                        "(PATH's stem + .real.npz), e.g. for `synther report STEM.real.npz PATH --env-id ENV`")
    p.add_argument("--eval-every", type=int, default=5_000, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", default="runs/sb3_sac", help="output directory")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="env steps between checkpoints in <out>/checkpoint (0 = none); one is also written at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint if there is one (else start from scratch)")
    args = p.parse_args(argv)
    try:
        check_run_flags(args)   # ranges of the run flags (--utd >= 1, --tau in (0, 1], ...)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    # SynthER config: a preset, then the flags. The diffusion model runs on the same device as SAC.
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    preset = args.preset or ("paper" if cuda else "fast")
    synther = not args.no_synther
    cfg = synther_config(SynthERConfig.preset(preset), args) if synther else None
    buffer_size = min(args.total_steps, 1_000_000)  # every real transition of the run is kept

    # The agent. SynthER = replay_buffer_class + replay_buffer_kwargs; everything else is stock SAC.
    # Terminals are modelled only where the env can terminate (seed A).
    def make_agent(env) -> SAC:
        return SAC(
            "MlpPolicy", env,
            learning_starts=args.learning_starts, batch_size=args.batch_size, buffer_size=buffer_size,
            train_freq=1, gradient_steps=args.utd,  # UTD = gradient steps per env step
            policy_kwargs=dict(net_arch=[args.hidden, args.hidden]),
            replay_buffer_class=GenerativeReplayBuffer if synther else None,
            replay_buffer_kwargs=dict(config=cfg, model_terminals=can_terminate(args.env)) if synther else None,
            seed=args.seed, device=args.device, verbose=0,
        )

    # The run (synther_buffer.sb3_run): threads, envs, the agent (or the checkpoint it resumes from),
    # an evaluation every --eval-every env steps, checkpoints, CSV / JSON / PNG and the summary table.
    name = f"SB3 SAC + SynthER ({preset})" if synther else "SB3 SAC (no SynthER)"
    title = f"{name} on {args.env}: UTD {args.utd}, {args.total_steps:,} env steps, seed {args.seed}"
    try:
        run = SB3Run(args, make_agent, synther=cfg, title=title, buffer_size=buffer_size,
                     extra_config=dict(script="integrations/sb3_sac.py"))
    except ValueError as e:
        raise SystemExit(f"sb3_sac.py: {e}") from None
    return run.train()


if __name__ == "__main__":
    sys.exit(main())
