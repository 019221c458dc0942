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
"""

from __future__ import annotations

import argparse
import sys

import torch
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback

from synther_buffer import SynthERConfig
from synther_buffer.envs import can_terminate, make_env
from synther_buffer.results import Results, TimingSplit, TrainingMonitor, format_summary
from synther_buffer.sb3 import GenerativeReplayBuffer


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
    p.add_argument("--eval-every", type=int, default=5_000, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", default="runs/sb3_sac", help="output directory")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


class MonitorCallback(BaseCallback):
    """Hands every env step to the TrainingMonitor (progress bar, evaluations, retrain timings)."""

    def __init__(self, monitor: TrainingMonitor):
        super().__init__()
        self.monitor = monitor

    def _on_step(self) -> bool:
        self.monitor.step(self.num_timesteps)
        return True


def main(argv=None) -> int:
    args = parse_args(argv)
    timing = TimingSplit()  # wall clock: setup / RL / diffusion fit / diffusion sampling / eval

    # Threads: on a shared 2-core machine torch's default of 2 threads can run ~100x slower.
    use_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    threads = args.threads or (None if use_cuda else 1)
    if threads:
        torch.set_num_threads(threads)

    # Environments: flat float32 observations, actions in [-1, 1]; a separate one for evaluation.
    env = make_env(args.env, seed=args.seed)
    eval_env = make_env(args.env, seed=args.seed + 10_000)

    # SynthER config: a preset, then the flags. The diffusion model runs on the same device as SAC.
    preset = args.preset or ("paper" if use_cuda else "fast")
    cfg = SynthERConfig.preset(preset).replace(device=args.device, seed=args.seed, progress=not args.quiet)
    overrides = dict(retrain_every=args.retrain_every, real_ratio=args.real_ratio,
                     train_steps=args.train_steps, num_generate=args.num_generate)
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})

    # The agent. SynthER = replay_buffer_class + replay_buffer_kwargs; everything else is stock SAC.
    synther = not args.no_synther
    model = SAC(
        "MlpPolicy", env,
        learning_starts=args.learning_starts, batch_size=args.batch_size,
        buffer_size=min(args.total_steps, 1_000_000),
        train_freq=1, gradient_steps=args.utd,  # UTD = gradient steps per env step
        policy_kwargs=dict(net_arch=[args.hidden, args.hidden]),
        replay_buffer_class=GenerativeReplayBuffer if synther else None,
        replay_buffer_kwargs=dict(config=cfg, model_terminals=can_terminate(args.env)) if synther else None,
        seed=args.seed, device=args.device, verbose=0,
    )
    timing.mark("setup")

    # Logging: evaluations every --eval-every env steps, a progress bar, retrain timings.
    name = f"SB3 SAC + SynthER ({preset})" if synther else "SB3 SAC (no SynthER)"
    title = f"{name} on {args.env}: UTD {args.utd}, {args.total_steps:,} env steps, seed {args.seed}"
    config = dict(vars(args), threads=threads, script="integrations/sb3_sac.py",
                  synther=cfg.to_dict() if synther else None)
    results = Results(args.out, config=config, title=title)
    monitor = TrainingMonitor(
        results, args.total_steps, args.eval_every, args.eval_episodes, eval_env,
        policy_fn=lambda obs: model.predict(obs, deterministic=True)[0],
        stats_fn=model.replay_buffer.stats if synther else None,
        timing=timing, progress=not args.quiet)
    print(title, flush=True)

    # Train.
    model.learn(args.total_steps, callback=MonitorCallback(monitor))

    # Final evaluation, CSV / JSON / PNG, summary table.
    summary = monitor.finish(final_stats=model.replay_buffer.stats() if synther else None)
    print("\n" + format_summary(summary, title=title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
