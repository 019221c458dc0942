"""A single-file SAC / REDQ loop in plain torch with SynthER's ``GenerativeReplay`` as its buffer.

    python integrations/custom_sac.py --env dm_control/cheetah-run-v0 --total-steps 100000          # SAC, UTD 20
    python integrations/custom_sac.py --env dm_control/cheetah-run-v0 --num-q 10 --num-min 2       # REDQ + SynthER
    python integrations/custom_sac.py --env Hopper-v5 --no-synther                                 # the baseline

CleanRL-style (one file, read top to bottom). The only SynthER-specific lines are building the buffer,
``buf.add(obs, action, reward, next_obs, terminated)`` after each env step (``terminated``, never
``truncated``: a time-limit end still bootstraps) and ``buf.sample(batch_size)``; the buffer retrains
its diffusion model every ``retrain_every`` env steps and mixes ``real_ratio`` real rows with
synthetic ones in every batch.

The agent:
* SAC with automatic entropy tuning (target entropy -|A|), tanh-Gaussian actor, ``--num-q`` critics
  held in one vectorized ensemble, Polyak-averaged targets (tau 0.005), gamma 0.99, Adam 3e-4.
* ``--utd`` critic updates per env step (default 20, seed D.2); the actor and temperature are updated
  ``--policy-updates`` times per env step (default 1, as in REDQ's code; ``--policy-updates`` = ``--utd``
  updates them after every critic step).
* REDQ (Chen et al. 2021): the TD target takes the min over a random subset of ``--num-min`` of the
  ``--num-q`` target critics, and the actor maximizes the mean of all critics. With the defaults
  ``--num-q 2 --num-min 2`` this is exactly SAC's clipped double-Q (and the actor uses the min of both).

``--no-synther`` keeps the same ``GenerativeReplay`` (same storage, same sampling code) but sets
``retrain_every`` beyond the run and ``real_ratio`` 1, so no diffusion model is ever trained and every
batch is real: the UTD baseline without SynthER, everything else identical.

Outputs under ``--out``: ``eval_returns.csv``, ``results.json`` (config, evals, retrains, timing split),
``learning_curve.png``, and a summary table on stdout.

``--checkpoint-every N`` writes ``<out>/checkpoint/`` every N env steps and at the end (networks,
optimizers, temperature, the buffer via ``buf.save`` with its model, pool and schedule, the
evaluations so far, the RNG states); ``--resume`` continues from it after a kill. The resumed run
starts a fresh episode seeded from the step count: deterministic, not bit-identical to an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from synther_buffer import GenerativeReplay, SynthERConfig
from synther_buffer.config import PRECISIONS
from synther_buffer.train import add_warm_start_arguments
from synther_buffer.checkpoint import RunCheckpoint, check_resume_settings, set_rng_state
from synther_buffer.envs import can_terminate, make_env
from synther_buffer.results import Results, TimingSplit, TrainingMonitor, format_summary
from synther_buffer.validation import check_run_flags

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="dm_control/cheetah-run-v0", help="any id synther_buffer.envs.make_env takes")
    p.add_argument("--total-steps", type=int, default=100_000, help="env steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--utd", type=int, default=20, help="critic updates per env step")
    p.add_argument("--policy-updates", type=int, default=1, help="actor/temperature updates per env step")
    p.add_argument("--num-q", type=int, default=2, help="critics in the ensemble (REDQ: 10)")
    p.add_argument("--num-min", type=int, default=2, help="target critics the TD target mins over (REDQ: 2)")
    p.add_argument("--learning-starts", type=int, default=5_000, help="random-action env steps before updates")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--tau", type=float, default=0.005)
    p.add_argument("--no-synther", action="store_true",
                   help="same GenerativeReplay, but never retrained and real_ratio 1 (the baseline)")
    p.add_argument("--preset", choices=("paper", "fast", "tiny"), default=None,
                   help="SynthERConfig preset (default: paper on CUDA, fast on CPU)")
    p.add_argument("--retrain-every", type=int, default=None, help="env steps between retrains (default: preset's)")
    p.add_argument("--real-ratio", type=float, default=None, help="real fraction of each batch (default: preset's)")
    p.add_argument("--train-steps", type=int, default=None, help="diffusion steps per retrain (default: preset's)")
    p.add_argument("--num-generate", type=int, default=None, help="synthetic rows per retrain (default: preset's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="diffusion matmul precision (default: preset's, fp32; bf16 pays on GPUs and AVX512-BF16 CPUs)")
    p.add_argument("--relevance", choices=("curiosity", "reward", "td"), default=None,
                   help="relevance-guided generation (Prioritized Generative Replay): condition the diffusion model "
                        "on this score of each real transition and generate at high scores; 'td' is the TD error "
                        "under this loop's critics (buf.set_relevance_fn). Default: plain SynthER")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance weight with --relevance (default: SynthERConfig's, 2.0)")
    add_warm_start_arguments(p)   # --warm-start, --warm-start-steps
    p.add_argument("--eval-every", type=int, default=5_000, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", default="runs/custom_sac", help="output directory")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="env steps between checkpoints in <out>/checkpoint (0 = none); one is also written at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint if there is one (else start from scratch)")
    args = p.parse_args(argv)
    if not 1 <= args.num_min <= args.num_q:
        p.error(f"--num-min must be in [1, --num-q], got {args.num_min} with --num-q {args.num_q}")
    try:
        check_run_flags(args)   # ranges of the run flags (--utd >= 1, --tau in (0, 1], ...)
    except ValueError as e:
        p.error(str(e))
    return args


# Flags a resumed run may change (the buffer's capacity is fixed by the first run's --total-steps,
# so a resumed run may stop earlier but not later); every other flag must equal the checkpointed run's.
RESUMABLE_FLAGS = {"total_steps", "out", "device", "threads", "quiet", "checkpoint_every", "resume"}


class EnsembleLinear(nn.Module):
    """``n`` independent linear layers applied at once: x [n, B, in] -> [n, B, out]."""

    def __init__(self, n: int, d_in: int, d_out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class QEnsemble(nn.Module):
    """``num_q`` critics Q(s, a), each an MLP with two hidden layers; returns [num_q, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, num_q: int):
        super().__init__()
        self.num_q = num_q
        self.net = nn.Sequential(EnsembleLinear(num_q, obs_dim + act_dim, hidden), nn.ReLU(),
                                 EnsembleLinear(num_q, hidden, hidden), nn.ReLU(),
                                 EnsembleLinear(num_q, hidden, 1))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1).unsqueeze(0).expand(self.num_q, -1, -1)
        return self.net(x).squeeze(-1)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy on [-1, 1]^act_dim (make_env rescales actions to that box)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

    def forward(self, obs: torch.Tensor):
        h = self.trunk(obs)
        log_std = torch.tanh(self.log_std(h))  # CleanRL's soft clamp to [LOG_STD_MIN, LOG_STD_MAX]
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)
        return self.mean(h), log_std

    def get_action(self, obs: torch.Tensor):
        """(sampled action, its log-prob [B], deterministic action)."""
        mean, log_std = self(obs)
        normal = torch.distributions.Normal(mean, log_std.exp())
        x = normal.rsample()
        action = torch.tanh(x)
        log_prob = (normal.log_prob(x) - torch.log(1 - action.pow(2) + 1e-6)).sum(-1)
        return action, log_prob, torch.tanh(mean)


def main(argv=None) -> int:
    args = parse_args(argv)
    timing = TimingSplit()  # wall clock: setup / RL / diffusion fit / diffusion sampling / eval

    # Seeding, device, threads (on a shared 2-core machine torch's default of 2 threads can run ~100x slower).
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)

    # Environments: flat float32 observations, actions in [-1, 1]; a separate one for evaluation.
    env = make_env(args.env, seed=args.seed)
    eval_env = make_env(args.env, seed=args.seed + 10_000)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]

    # The SynthER buffer. Terminals are modelled only where the env can terminate (seed A).
    preset = args.preset or ("paper" if device.type == "cuda" else "fast")
    cfg = SynthERConfig.preset(preset).replace(device=str(device), seed=args.seed, progress=not args.quiet)
    overrides = dict(retrain_every=args.retrain_every, real_ratio=args.real_ratio,
                     train_steps=args.train_steps, num_generate=args.num_generate, precision=args.precision,
                     relevance=args.relevance if args.relevance in ("curiosity", "reward") else None,
                     guidance_scale=args.guidance_scale,
                     warm_start=args.warm_start or None, warm_start_steps=args.warm_start_steps)
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    if args.no_synther:  # never retrain, all-real batches: the same buffer without SynthER
        cfg = cfg.replace(retrain_every=args.total_steps + 1, real_ratio=1.0)
    buf = GenerativeReplay(obs_dim, act_dim, capacity=min(args.total_steps, 1_000_000), config=cfg,
                           model_terminals=can_terminate(args.env), action_bounds=(-1.0, 1.0), device=device)

    # The agent: actor, critic ensemble + target copy, learned temperature alpha.
    actor = Actor(obs_dim, act_dim, args.hidden).to(device)
    qf = QEnsemble(obs_dim, act_dim, args.hidden, args.num_q).to(device)
    qf_target = QEnsemble(obs_dim, act_dim, args.hidden, args.num_q).to(device)
    qf_target.load_state_dict(qf.state_dict())
    qf_target.requires_grad_(False)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=args.lr)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.lr)
    target_entropy = -float(act_dim)
    log_alpha = torch.zeros(1, requires_grad=True, device=device)
    alpha = log_alpha.exp().item()
    a_optimizer = torch.optim.Adam([log_alpha], lr=args.lr)
    agent_stats = {"alpha": alpha}  # recorded with each evaluation (+ the last actor batch's entropy estimate)

    def policy_fn(obs: np.ndarray) -> np.ndarray:  # deterministic, for evaluation: draws no random number
        with torch.no_grad():
            mean, _ = actor(torch.as_tensor(obs, device=device).unsqueeze(0))
        return torch.tanh(mean)[0].cpu().numpy()

    def td_error(batch) -> torch.Tensor:
        """|Q(s, a) - TD target| of each real transition (``--relevance td``), in chunks on the agent's device."""
        out = []
        with torch.no_grad():
            for i in range(0, len(batch.reward), 65_536):
                obs, act, rew, nxt, term = (v[i:i + 65_536].to(device) for v in batch)
                next_action, next_log_prob, _ = actor.get_action(nxt)
                v_next = qf_target(nxt, next_action).min(0).values - log_alpha.exp() * next_log_prob
                out.append((qf(obs, act).mean(0) - (rew + (1.0 - term) * args.gamma * v_next)).abs().cpu())
        return torch.cat(out)

    if args.relevance == "td":
        buf.set_relevance_fn(td_error)

    def update_critics(alpha: float) -> None:
        data = buf.sample(args.batch_size)  # real_ratio real rows, the rest synthetic
        with torch.no_grad():
            next_action, next_log_prob, _ = actor.get_action(data.next_obs)
            idx = torch.randperm(args.num_q, device=device)[:args.num_min]  # REDQ's random subset
            min_q_next = qf_target(data.next_obs, next_action)[idx].min(0).values - alpha * next_log_prob
            target = data.reward + (1.0 - data.terminated) * args.gamma * min_q_next
        q = qf(data.obs, data.action)  # [num_q, B]
        q_loss = F.mse_loss(q, target.expand_as(q)) * args.num_q  # sum over critics of each MSE
        q_optimizer.zero_grad()
        q_loss.backward()
        q_optimizer.step()
        with torch.no_grad():  # Polyak averaging of the targets
            for p, p_targ in zip(qf.parameters(), qf_target.parameters()):
                p_targ.lerp_(p, args.tau)

    # Checkpoints: everything the loop carries from one env step to the next, except the episode in progress.
    checkpoint = RunCheckpoint(Path(args.out) / "checkpoint", every=args.checkpoint_every)
    modules = dict(actor=actor, qf=qf, qf_target=qf_target, q_optimizer=q_optimizer,
                   actor_optimizer=actor_optimizer, a_optimizer=a_optimizer)

    def save_agent(directory: Path) -> None:
        torch.save({**{k: m.state_dict() for k, m in modules.items()}, "log_alpha": log_alpha.detach()},
                   directory / "agent.pt")
        buf.save(directory / "buffer")

    def update_actor_and_alpha(alpha: float) -> float:
        data = buf.sample(args.batch_size)
        action, log_prob, _ = actor.get_action(data.obs)
        q = qf(data.obs, action)
        q_pi = q.min(0).values if args.num_q == args.num_min else q.mean(0)  # SAC: min; REDQ: mean
        actor_loss = (alpha * log_prob - q_pi).mean()
        actor_optimizer.zero_grad()
        actor_loss.backward()
        actor_optimizer.step()
        alpha_loss = (-log_alpha.exp() * (log_prob.detach() + target_entropy)).mean()
        a_optimizer.zero_grad()
        alpha_loss.backward()
        a_optimizer.step()
        # the entropy estimate stays a tensor (no host sync per update): read only at an evaluation
        agent_stats.update(alpha=log_alpha.exp().item(), policy_entropy=-log_prob.detach().mean())
        return agent_stats["alpha"]

    start_step, loaded = 0, checkpoint.load() if args.resume else None
    if loaded:
        ckpt_dir, run = loaded
        try:
            check_resume_settings(run["extra"]["args"], vars(args), may_change=RESUMABLE_FLAGS)
            if args.total_steps > run["extra"]["args"]["total_steps"]:
                raise ValueError(f"--total-steps {args.total_steps} is beyond the checkpointed run's "
                                 f"{run['extra']['args']['total_steps']}: its buffer's capacity and (with "
                                 f"--no-synther) its never-retrain schedule were sized for that; a resumed "
                                 f"run may stop earlier, not later")
        except ValueError as e:
            raise SystemExit(f"--resume from {checkpoint.path}: {e}") from None
        state = torch.load(ckpt_dir / "agent.pt", map_location=device, weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state[k])
        with torch.no_grad():
            log_alpha.copy_(state["log_alpha"])
        alpha = agent_stats["alpha"] = log_alpha.exp().item()
        buf = GenerativeReplay.load(ckpt_dir / "buffer", device=str(device))
        buf.set_progress(not args.quiet)   # --quiet may differ from the saved run's
        if args.relevance == "td":   # a score function is not saved with the buffer
            buf.set_relevance_fn(td_error)
        start_step = run["env_steps"]
        set_rng_state(run["rng"])
        env.action_space.seed(args.seed + start_step)
        eval_env.reset(seed=args.seed + 10_000 + start_step)
    timing.mark("setup")

    # Logging: evaluations every --eval-every env steps, a progress bar, retrain timings.
    algo = "REDQ" if args.num_q > args.num_min else "SAC"
    name = f"{algo} (custom loop)" + (" + SynthER" if not args.no_synther else ", no SynthER")
    title = (f"{name} on {args.env}: UTD {args.utd}, {args.num_q} critics (min of {args.num_min}), "
             f"{args.total_steps:,} env steps, seed {args.seed}")
    config = dict(vars(args), threads=threads, device=str(device), preset=preset,
                  script="integrations/custom_sac.py", synther=cfg.to_dict())
    results = Results(args.out, config=config, title=title)
    monitor = TrainingMonitor(results, args.total_steps, args.eval_every, args.eval_episodes, eval_env,
                              policy_fn=policy_fn, stats_fn=None if args.no_synther else buf.stats,
                              agent_stats_fn=lambda: {k: float(v) for k, v in agent_stats.items()},
                              timing=timing, progress=not args.quiet, eval_at_start=not loaded)
    if loaded:
        monitor.load_state_dict(run["monitor"])
        title += f" (resumed at env step {start_step:,})"
    print(title, flush=True)

    def save_checkpoint(env_steps: int) -> None:
        checkpoint.save(env_steps, monitor, save_agent, extra={"args": vars(args)})

    # The loop: act, store (retrains happen inside buf.add when due), update UTD times.
    obs, _ = env.reset(seed=args.seed + start_step)
    for global_step in range(start_step + 1, args.total_steps + 1):
        if global_step <= args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action, _, _ = actor.get_action(torch.as_tensor(obs, device=device).unsqueeze(0))
            action = action[0].cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buf.add(obs, action, reward, next_obs, terminated)  # the true next_obs, even at a time limit
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()

        if global_step > args.learning_starts:
            for i in range(args.utd):
                update_critics(alpha)
                # spread the actor updates evenly over the critic updates (the last one always included)
                for _ in range((i + 1) * args.policy_updates // args.utd - i * args.policy_updates // args.utd):
                    alpha = update_actor_and_alpha(alpha)
        monitor.step(global_step)
        if checkpoint.due(global_step):
            save_checkpoint(global_step)
    if checkpoint.every and checkpoint.last_saved != max(start_step, args.total_steps):
        save_checkpoint(max(start_step, args.total_steps))

    # Final evaluation, CSV / JSON / PNG, summary table.
    summary = monitor.finish(final_stats=buf.stats())
    print("\n" + format_summary(summary, title=title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
