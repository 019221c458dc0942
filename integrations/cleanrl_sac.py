"""CleanRL's SAC (continuous actions) with SynthER's replay buffer and a ``--utd`` knob.

    python integrations/cleanrl_sac.py --env-id Pendulum-v1 --total-timesteps 20000 --utd 20
    python integrations/cleanrl_sac.py --env-id Pendulum-v1 --total-timesteps 500 --learning-starts 100 \\
        --utd 2 --batch-size 64 --synther-preset tiny --no-cuda          # a smoke run in seconds

The agent is CleanRL's ``sac_continuous_action.py`` written out again in its single-file style:
a tanh-Gaussian actor that maps to the env's action range, two Q networks with target copies,
automatic entropy tuning, delayed actor updates (``--policy-frequency``), Adam, gamma 0.99,
tau 0.005. One change to the algorithm: ``--utd`` gradient steps per env step (1 is CleanRL's).

The SynthER swap. CleanRL stores transitions in stable-baselines3's ``ReplayBuffer``; this script
uses ``GenerativeReplayBuffer``, a subclass of it, and everything else (``rb.add``, ``rb.sample``,
``data.observations``, ``data.rewards.flatten()``, ...) stays as CleanRL wrote it. Against the same
file built on SB3's buffer, ``diff`` shows 3 lines replaced by 5::

    < from stable_baselines3.common.buffers import ReplayBuffer
    > from synther_buffer import GenerativeReplayBuffer, SynthERConfig

    < rb = ReplayBuffer(args.buffer_size, env.observation_space, env.action_space, device,
    <                   handle_timeout_termination=False)
    > cfg = SynthERConfig.preset(args.synther_preset) if args.synther_preset else None  # None: by device
    > rb = GenerativeReplayBuffer(args.buffer_size, env.observation_space, env.action_space, device,
    >                             handle_timeout_termination=False, config=cfg,
    >                             action_bounds=(env.action_space.low, env.action_space.high))

besides the optional ``--synther-preset``, ``--relevance`` and ``--warm-start`` flags and the two
``synther/`` log lines. The ``action_bounds`` matter: CleanRL stores actions at the env's scale
(Pendulum: [-2, 2]), not SB3's rescaled [-1, 1], and without them synthetic actions would be clipped
to [-1, 1] (each retrain then warns that real actions lie outside the bounds).

Differences from CleanRL's file, none of which touch the buffer: argparse instead of tyro (not a
dependency here), stdout instead of TensorBoard / wandb, and a single ``gym.Env`` instead of a
one-env ``SyncVectorEnv`` (whose autoreset and ``final_observation`` API changed between gymnasium
0.29, CleanRL's pin, and 1.x; a plain env steps the same on both). As in CleanRL, ``terminated``
is stored as ``done`` (``handle_timeout_termination=False``) and a truncated episode stores its real
last observation, so a time-limit end still bootstraps.

Runs on gymnasium 0.29.1 with stable-baselines3 2.9.2 and on gymnasium 1.x
(``tests/test_cleanrl.py`` runs it in both).
"""

from __future__ import annotations

import argparse
import random
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from synther_buffer import GenerativeReplayBuffer, SynthERConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="CleanRL's SAC with a SynthER replay buffer",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--torch-deterministic", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True, help="use CUDA if available")
    p.add_argument("--env-id", default="Hopper-v4")
    p.add_argument("--total-timesteps", type=int, default=1_000_000)
    p.add_argument("--buffer-size", type=int, default=1_000_000)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--tau", type=float, default=0.005, help="target smoothing coefficient")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-starts", type=int, default=5_000)
    p.add_argument("--policy-lr", type=float, default=3e-4)
    p.add_argument("--q-lr", type=float, default=1e-3)
    p.add_argument("--policy-frequency", type=int, default=2,
                   help="delayed actor updates: every N gradient steps, N actor updates (TD3-style)")
    p.add_argument("--target-network-frequency", type=int, default=1, help="gradient steps between target updates")
    p.add_argument("--alpha", type=float, default=0.2, help="entropy coefficient (initial value with --autotune)")
    p.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--utd", type=int, default=1, help="gradient steps per env step (SynthER's paper: 20)")
    p.add_argument("--hidden", type=int, default=256, help="width of the hidden layers")
    p.add_argument("--synther-preset", choices=("paper", "fast", "tiny"), default=None,
                   help="SynthERConfig preset (default: paper on CUDA, fast on CPU)")
    p.add_argument("--relevance", choices=("curiosity", "reward"), default=None,
                   help="relevance-guided generation (Prioritized Generative Replay; SynthERConfig.relevance)")
    p.add_argument("--warm-start", action="store_true",
                   help="later retrains continue from the previous diffusion model (SynthERConfig.warm_start)")
    p.add_argument("--log-every", type=int, default=1_000, help="env steps between log lines")
    args = p.parse_args(argv)
    if args.utd < 1:
        p.error("--utd must be at least 1")
    return args


def make_env(env_id: str, seed: int) -> gym.Env:
    env = gym.make(env_id)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


class SoftQNetwork(nn.Module):
    def __init__(self, env: gym.Env, hidden: int):
        super().__init__()
        n_in = int(np.prod(env.observation_space.shape)) + int(np.prod(env.action_space.shape))
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, a], 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


LOG_STD_MAX = 2
LOG_STD_MIN = -5


class Actor(nn.Module):
    def __init__(self, env: gym.Env, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(int(np.prod(env.observation_space.shape)), hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc_mean = nn.Linear(hidden, int(np.prod(env.action_space.shape)))
        self.fc_logstd = nn.Linear(hidden, int(np.prod(env.action_space.shape)))
        # the tanh output in [-1, 1] is mapped to the env's [low, high]: actions are stored at env scale
        high, low = env.action_space.high, env.action_space.low
        self.register_buffer("action_scale", torch.tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        mean = self.fc_mean(x)
        log_std = torch.tanh(self.fc_logstd(x))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)  # squash into [MIN, MAX]
        return mean, log_std

    def get_action(self, x: torch.Tensor):
        mean, log_std = self(x)
        std = log_std.exp()
        normal = torch.distributions.Normal(mean, std)
        x_t = normal.rsample()  # differentiable sample
        y_t = torch.tanh(x_t)
        action = y_t * self.action_scale + self.action_bias
        log_prob = normal.log_prob(x_t)
        log_prob -= torch.log(self.action_scale * (1 - y_t.pow(2)) + 1e-6)  # the tanh squashing
        log_prob = log_prob.sum(1, keepdim=True)
        mean = torch.tanh(mean) * self.action_scale + self.action_bias
        return action, log_prob, mean


def main(argv=None) -> dict:
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    env = make_env(args.env_id, args.seed)
    assert isinstance(env.action_space, gym.spaces.Box), "only continuous action space is supported"

    actor = Actor(env, args.hidden).to(device)
    qf1 = SoftQNetwork(env, args.hidden).to(device)
    qf2 = SoftQNetwork(env, args.hidden).to(device)
    qf1_target = SoftQNetwork(env, args.hidden).to(device)
    qf2_target = SoftQNetwork(env, args.hidden).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    q_optimizer = optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr)
    actor_optimizer = optim.Adam(list(actor.parameters()), lr=args.policy_lr)

    if args.autotune:  # automatic entropy tuning
        target_entropy = -torch.prod(torch.Tensor(env.action_space.shape).to(device)).item()
        log_alpha = torch.zeros(1, requires_grad=True, device=device)
        alpha = log_alpha.exp().item()
        a_optimizer = optim.Adam([log_alpha], lr=args.q_lr)
    else:
        alpha = args.alpha

    env.observation_space.dtype = np.float32
    # The SynthER swap (see the module docstring): SB3's ReplayBuffer -> GenerativeReplayBuffer, plus the
    # config and the env-scale action bounds, since CleanRL stores actions as the env takes them.
    cfg = SynthERConfig.preset(args.synther_preset) if args.synther_preset else None  # None: by device
    if args.relevance:  # Prioritized Generative Replay: generate at high relevance
        cfg = (cfg or SynthERConfig.for_device(str(device))).replace(relevance=args.relevance)
    if args.warm_start:  # retrains after the first continue the previous model for fewer steps
        cfg = (cfg or SynthERConfig.for_device(str(device))).replace(warm_start=True)
    rb = GenerativeReplayBuffer(args.buffer_size, env.observation_space, env.action_space, device,
                                handle_timeout_termination=False, config=cfg,
                                action_bounds=(env.action_space.low, env.action_space.high))
    start_time = time.time()
    episodic_returns, log = [], {}
    grad_step = 0

    obs, _ = env.reset(seed=args.seed)
    for global_step in range(args.total_timesteps):
        # act: uniform random until learning starts, then the stochastic policy
        if global_step < args.learning_starts:
            actions = env.action_space.sample()
        else:
            actions, _, _ = actor.get_action(torch.Tensor(obs).unsqueeze(0).to(device))
            actions = actions.detach().cpu().numpy()[0]

        # step the env; RecordEpisodeStatistics reports the return at an episode's end
        next_obs, rewards, terminations, truncations, infos = env.step(actions)
        if "episode" in infos:
            episodic_returns.append(float(np.asarray(infos["episode"]["r"]).reshape(-1)[0]))

        # store the transition; next_obs is the true last observation even at a truncation (the env
        # is reset only below), and terminations (not truncations) are the stored dones
        rb.add(obs, next_obs, actions, rewards, terminations, [infos])

        # move on to the next observation, or a fresh episode
        obs = next_obs
        if terminations or truncations:
            obs, _ = env.reset()

        # learn: --utd gradient steps per env step
        if global_step >= args.learning_starts:
            for _ in range(args.utd):
                grad_step += 1
                data = rb.sample(args.batch_size)
                with torch.no_grad():
                    next_state_actions, next_state_log_pi, _ = actor.get_action(data.next_observations)
                    qf1_next_target = qf1_target(data.next_observations, next_state_actions)
                    qf2_next_target = qf2_target(data.next_observations, next_state_actions)
                    min_qf_next_target = torch.min(qf1_next_target, qf2_next_target) - alpha * next_state_log_pi
                    next_q_value = data.rewards.flatten() + (1 - data.dones.flatten()) * args.gamma * (
                        min_qf_next_target).view(-1)

                qf1_a_values = qf1(data.observations, data.actions).view(-1)
                qf2_a_values = qf2(data.observations, data.actions).view(-1)
                qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
                qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
                qf_loss = qf1_loss + qf2_loss

                q_optimizer.zero_grad()
                qf_loss.backward()
                q_optimizer.step()

                if grad_step % args.policy_frequency == 0:  # delayed actor updates
                    for _ in range(args.policy_frequency):  # as many as were skipped
                        pi, log_pi, _ = actor.get_action(data.observations)
                        qf1_pi = qf1(data.observations, pi)
                        qf2_pi = qf2(data.observations, pi)
                        min_qf_pi = torch.min(qf1_pi, qf2_pi)
                        actor_loss = ((alpha * log_pi) - min_qf_pi).mean()

                        actor_optimizer.zero_grad()
                        actor_loss.backward()
                        actor_optimizer.step()

                        if args.autotune:
                            with torch.no_grad():
                                _, log_pi, _ = actor.get_action(data.observations)
                            alpha_loss = (-log_alpha.exp() * (log_pi + target_entropy)).mean()

                            a_optimizer.zero_grad()
                            alpha_loss.backward()
                            a_optimizer.step()
                            alpha = log_alpha.exp().item()

                # Polyak-average the target critics
                if grad_step % args.target_network_frequency == 0:
                    for param, target_param in zip(qf1.parameters(), qf1_target.parameters()):
                        target_param.data.copy_(args.tau * param.data + (1 - args.tau) * target_param.data)
                    for param, target_param in zip(qf2.parameters(), qf2_target.parameters()):
                        target_param.data.copy_(args.tau * param.data + (1 - args.tau) * target_param.data)

            log["losses/qf_loss"] = qf_loss.item() / 2.0
            log["losses/alpha"] = alpha

        if (global_step + 1) % args.log_every == 0 or global_step + 1 == args.total_timesteps:
            log["global_step"] = global_step + 1
            log["charts/episodic_return"] = episodic_returns[-1] if episodic_returns else float("nan")
            log["charts/SPS"] = int((global_step + 1) / (time.time() - start_time))
            # SynthER's counters; the share of each batch drawn from the synthetic pool
            log.update({f"synther/{k}": v for k, v in rb.stats().items()})
            log["synther/batch_synthetic_share"] = rb.core.split(args.batch_size)[1] / args.batch_size
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in log.items()),
                  flush=True)

    env.close()
    return log


if __name__ == "__main__":
    main()
