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

``--checkpoint-every N`` writes ``<out>/checkpoint/`` every N env steps and at the end (SB3's
``model.save`` + ``model.save_replay_buffer``, which for SynthER holds the diffusion model, the
synthetic pool and the schedule; the evaluations so far; the RNG states). ``--resume`` continues
from it: after a kill, or with a larger ``--total-steps`` to extend a finished run. The resumed run
starts a fresh episode and reseeds its envs from the step count, so it is deterministic but not
bit-identical to a run that was never interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback

from synther_buffer import SynthERConfig
from synther_buffer.config import PRECISIONS
from synther_buffer.checkpoint import RunCheckpoint, check_resume_settings, set_rng_state
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
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="diffusion matmul precision (default: preset's, fp32; bf16 pays on GPUs and AVX512-BF16 CPUs)")
    p.add_argument("--async-retrain", action="store_true",
                   help="retrain in a background thread; SAC keeps training on the previous pool meanwhile")
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
    if args.checkpoint_every < 0:
        p.error("--checkpoint-every must be >= 0")
    return args


# Flags a resumed run may change; every other flag must equal the checkpointed run's.
RESUMABLE_FLAGS = {"total_steps", "out", "device", "threads", "quiet", "checkpoint_every", "resume"}


class MonitorCallback(BaseCallback):
    """Hands every env step to the TrainingMonitor (progress bar, evaluations, retrain timings) and
    writes the checkpoint when due (deferred while a background retrain runs: saving would wait for it)."""

    def __init__(self, monitor: TrainingMonitor, checkpoint: RunCheckpoint, save_checkpoint, busy=lambda: False):
        super().__init__()
        self.monitor, self.checkpoint, self.save_checkpoint, self.busy = monitor, checkpoint, save_checkpoint, busy

    def _on_step(self) -> bool:
        self.monitor.step(self.num_timesteps)
        return True

    def _on_rollout_start(self) -> None:
        # Between env steps: the last step's transition is stored and its UTD updates are done.
        if self.checkpoint.due(self.num_timesteps) and not self.busy():
            self.save_checkpoint()


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
                     train_steps=args.train_steps, num_generate=args.num_generate, precision=args.precision)
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None}, async_retrain=args.async_retrain)
    if args.async_retrain:  # the diffusion work overlaps the RL loop: report it, don't subtract it
        timing.concurrent.update({"diffusion_fit", "diffusion_sample"})

    # A checkpoint to continue from (--resume), if there is one.
    checkpoint = RunCheckpoint(Path(args.out) / "checkpoint", every=args.checkpoint_every)
    loaded = checkpoint.load() if args.resume else None
    if loaded:
        try:
            check_resume_settings(loaded[1]["extra"]["args"], vars(args), may_change=RESUMABLE_FLAGS)
        except ValueError as e:
            raise SystemExit(f"--resume from {checkpoint.path}: {e}") from None

    # The agent. SynthER = replay_buffer_class + replay_buffer_kwargs; everything else is stock SAC.
    synther = not args.no_synther
    model = None if loaded else SAC(
        "MlpPolicy", env,
        learning_starts=args.learning_starts, batch_size=args.batch_size,
        buffer_size=min(args.total_steps, 1_000_000),
        train_freq=1, gradient_steps=args.utd,  # UTD = gradient steps per env step
        policy_kwargs=dict(net_arch=[args.hidden, args.hidden]),
        replay_buffer_class=GenerativeReplayBuffer if synther else None,
        replay_buffer_kwargs=dict(config=cfg, model_terminals=can_terminate(args.env)) if synther else None,
        seed=args.seed, device=args.device, verbose=0,
    )
    if loaded:  # the agent with its optimizers and counters, the buffer with SynthER's model and pool
        ckpt_dir, run = loaded
        model = SAC.load(ckpt_dir / "agent.zip", env=env, device=args.device)
        model.load_replay_buffer(ckpt_dir / "replay_buffer.pkl")
        capacity = model.replay_buffer.buffer_size * model.replay_buffer.n_envs
        if capacity < min(args.total_steps, 1_000_000):
            raise SystemExit(f"--resume: the checkpoint's replay buffer holds {capacity:,} transitions; "
                             f"--total-steps {args.total_steps:,} would overwrite the oldest real data. "
                             f"Start a new run with the larger --total-steps instead.")
        set_rng_state(run["rng"])
        model.env.seed(args.seed + run["env_steps"])  # a fresh episode, seeded from the step count
        eval_env.reset(seed=args.seed + 10_000 + run["env_steps"])

    def save_agent(directory: Path) -> None:
        model.save(directory / "agent.zip")
        model.save_replay_buffer(directory / "replay_buffer.pkl")
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
        timing=timing, progress=not args.quiet, eval_at_start=not loaded)
    if loaded:
        monitor.load_state_dict(run["monitor"])
        title += f" (resumed at env step {run['env_steps']:,})"
    print(title, flush=True)

    # Train (the rest of the steps, when resuming), then a last checkpoint.
    def save_checkpoint() -> None:
        checkpoint.save(model.num_timesteps, monitor, save_agent, extra={"args": vars(args)})

    def retraining() -> bool:  # a background retrain (--async-retrain) in flight
        return synther and args.async_retrain and model.replay_buffer.stats()["retraining"]

    remaining = args.total_steps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=MonitorCallback(monitor, checkpoint, save_checkpoint, retraining),
                    reset_num_timesteps=not loaded)
    if checkpoint.every and checkpoint.last_saved != model.num_timesteps:
        save_checkpoint()

    # Final evaluation, CSV / JSON / PNG, summary table.
    if synther:
        model.replay_buffer.wait()  # a background retrain (--async-retrain) still running
    summary = monitor.finish(final_stats=model.replay_buffer.stats() if synther else None)
    print("\n" + format_summary(summary, title=title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
