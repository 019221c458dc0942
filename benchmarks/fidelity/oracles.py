"""The simulator side of the fidelity benchmark: scoring, and real transitions from the same simulators.

The scorer (:func:`score_transitions`, :func:`make_oracle` and the oracle classes) lives in the
package, :mod:`synther_buffer.oracle` (``synther report --env-id`` uses it), and is re-exported
here. What stays here is benchmark-only: the behaviour policies that collect the real data.

Real data (:func:`collect_transitions`) mixes three behaviour policies, chosen per episode (5
simulated seconds each): uniform random actions; a random open-loop sinusoidal gait (random
amplitude, phase, bias and frequency per episode) plus N(0, 0.3) action noise; and a cheap
"partially trained" policy (``tuned``). For the locomotion tasks (HalfCheetah, cheetah-run,
walker-walk) that is an open-loop gait tuned by random search on return (:func:`tune_gait`),
executed with N(0, 0.2) noise: it moves the cheetahs forward and gets the walker off the floor
more often, so the data covers still, flailing and moving states. For reacher, where random
actions almost never touch the small target, it is a closed-loop reaching controller
(:func:`reach_action`: Jacobian-transpose pull of the finger towards the target plus velocity
damping, gains drawn per episode) with N(0, 0.3) noise, so the data holds rewarding rows too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

from synther_buffer.oracle import (KEYS, SUPPORTED_ENVS, DMCCheetahOracle, DMCOracle, DMCReacherOracle,
                                   DMCWalkerOracle, HalfCheetahOracle, SimulatorOracle, make_oracle, safe_std,
                                   score_transitions)

__all__ = ["KEYS", "SUPPORTED_ENVS", "DMCCheetahOracle", "DMCOracle", "DMCReacherOracle", "DMCWalkerOracle",
           "HalfCheetahOracle", "SimulatorOracle", "make_oracle", "safe_std", "score_transitions", "GaitParams",
           "POLICIES", "REACH_NOISE", "TUNED_NOISE", "collect_transitions", "reach_action", "tune_gait"]


@dataclass
class GaitParams:
    """Open-loop sinusoidal gait: ``a_j(t) = clip(bias_j + amp_j sin(2 pi freq t + phase_j))``."""

    amp: np.ndarray
    phase: np.ndarray
    bias: np.ndarray
    freq: float  # Hz

    def action(self, t: float) -> np.ndarray:
        """The (unclipped) action at time ``t`` seconds."""
        return self.bias + self.amp * np.sin(2 * np.pi * self.freq * t + self.phase)


def _random_gait(rng: np.random.Generator, k: int) -> GaitParams:
    return GaitParams(amp=rng.uniform(0.2, 1.0, k), phase=rng.uniform(0, 2 * np.pi, k),
                      bias=rng.uniform(-0.3, 0.3, k), freq=float(rng.uniform(0.5, 4.0)))


def _control_dt(env) -> float:
    u = env.unwrapped
    dm = getattr(u, "_env", None)
    if dm is not None and hasattr(dm, "control_timestep"):
        return float(dm.control_timestep())
    return float(getattr(u, "dt", 0.05))


def _rollout_return(env, gait: GaitParams, steps: int, dt: float, rng: np.random.Generator, noise: float) -> float:
    env.reset(seed=int(rng.integers(2 ** 31)))
    k = gait.amp.shape[0]
    t0 = float(rng.uniform(0, 10))
    total = 0.0
    for t in range(steps):
        a = gait.action(t0 + t * dt) + rng.normal(0, noise, k)
        _, r, term, trunc, _ = env.step(np.clip(a, -1, 1).astype(np.float32))
        total += float(r)
        if term or trunc:
            break
    return total


_TUNED_GAITS: Dict[Tuple[str, int], GaitParams] = {}
TUNED_NOISE = 0.2


def tune_gait(env_id: str, seed: int = 0, candidates: int = 16, rounds: int = 6, seconds: float = 5.0,
              repeats: int = 1) -> GaitParams:
    """A cheap "partially trained" policy: random search over open-loop gaits, maximising return.

    Round 1 draws ``candidates`` random gaits; each later round perturbs the best so far. A gait's
    score is its mean return over ``repeats`` rollouts of ``seconds`` simulated time, run as in
    :func:`collect_transitions` (random phase offset, N(0, 0.2) action noise). Cached per
    (env_id, seed). ~1-6 s of CPU. Noisy (open-loop gaits sometimes flip the cheetah): with seed 0
    the tuned gait averages ~1.25 reward/step on HalfCheetah-v5 and ~0.13 on cheetah-run.
    """
    from synther_buffer.envs import make_env

    key = (env_id, seed)
    if key in _TUNED_GAITS:
        return _TUNED_GAITS[key]
    rng = np.random.default_rng(10_000 + seed)
    env = make_env(env_id, seed=seed)
    try:
        k = int(env.action_space.shape[0])
        dt = _control_dt(env)
        steps = max(20, int(round(seconds / dt)))
        best, best_ret = None, -np.inf
        for rnd in range(rounds):
            for _ in range(candidates):
                if best is None or rnd == 0:
                    g = _random_gait(rng, k)
                else:
                    g = GaitParams(amp=np.clip(best.amp + rng.normal(0, 0.15, k), 0.0, 1.0),
                                   phase=best.phase + rng.normal(0, 0.4, k),
                                   bias=np.clip(best.bias + rng.normal(0, 0.1, k), -0.5, 0.5),
                                   freq=float(np.clip(best.freq * np.exp(rng.normal(0, 0.15)), 0.3, 6.0)))
                ret = np.mean([_rollout_return(env, g, steps, dt, rng, TUNED_NOISE) for _ in range(repeats)])
                if ret > best_ret:
                    best, best_ret = g, ret
    finally:
        env.close()
    _TUNED_GAITS[key] = best
    return best


POLICIES = ("random", "gait", "tuned")
REACH_NOISE = 0.3
_REACHER_LINKS = (0.12, 0.12)  # shoulder-to-wrist and wrist-to-finger lengths in dm_control's reacher.xml


def reach_action(obs: np.ndarray, kp: float, kd: float) -> np.ndarray:
    """A reaching controller for DMC reacher: pull the finger towards the target, damp the joints.

    ``a = J(q)^T (kp * to_target) - kd * qvel``, with ``J`` the finger's planar Jacobian, before
    any noise or clipping.

    Args:
        obs: a flat ``make_env("reacher-...")`` observation: ``(shoulder, wrist, to_target_x,
            to_target_y, shoulder_vel, wrist_vel)``.
        kp: gain on the finger-to-target vector.
        kd: damping on the joint velocities.

    Returns:
        The (unclipped) action [2].
    """
    q1, q2 = float(obs[0]), float(obs[1])
    l1, l2 = _REACHER_LINKS
    s1, c1, s12, c12 = np.sin(q1), np.cos(q1), np.sin(q1 + q2), np.cos(q1 + q2)
    jac = np.array([[-l1 * s1 - l2 * s12, -l2 * s12], [l1 * c1 + l2 * c12, l2 * c12]])
    return jac.T @ (kp * np.asarray(obs[2:4], dtype=np.float64)) - kd * np.asarray(obs[4:6], dtype=np.float64)


def _is_reacher(env_id: str) -> bool:
    from synther_buffer.envs import resolve_env_id

    return resolve_env_id(env_id).startswith("dm_control/reacher-")


def collect_transitions(env_id: str, n: int, seed: int = 0, *, episode_seconds: float = 5.0,
                        policy_probs: Sequence[float] = (1 / 3, 1 / 3, 1 / 3)) -> Dict[str, np.ndarray]:
    """``n`` real transitions from ``make_env(env_id)`` under a mixture of behaviour policies.

    Each episode (``episode_seconds`` of simulated time; the env's own limit still applies) draws
    one of :data:`POLICIES` with ``policy_probs``: uniform random actions; a random sinusoidal gait
    + N(0, 0.3) noise; ``tuned``: the :func:`tune_gait` gait + N(0, 0.2) noise, or for DMC reacher
    :func:`reach_action` with gains drawn per episode (``kp`` log-uniform in [30, 400], ``kd``
    uniform in [0.05, 0.5]) + N(0, 0.3) noise.

    Args:
        env_id: any id :func:`synther_buffer.envs.make_env` takes.
        n: transitions to collect.
        seed: seeds the policies and the episode resets.
        episode_seconds: simulated seconds per episode.
        policy_probs: weights of (random, gait, tuned).

    Returns:
        The transition keys (float32; ``terminals`` bool) plus ``policy`` (index into
        :data:`POLICIES`) and ``episode``.

    Raises:
        ValueError: ``n < 1``.
    """
    from synther_buffer.envs import make_env

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    reacher = _is_reacher(env_id)
    tuned = tune_gait(env_id, seed=0) if policy_probs[2] > 0 and not reacher else None
    env = make_env(env_id, seed=seed)
    k = int(env.action_space.shape[0])
    dt = _control_dt(env)
    ep_steps = max(10, int(round(episode_seconds / dt)))
    obs_dim = int(env.observation_space.shape[0])
    out = {"observations": np.empty((n, obs_dim), np.float32), "actions": np.empty((n, k), np.float32),
           "rewards": np.empty(n, np.float32), "next_observations": np.empty((n, obs_dim), np.float32),
           "terminals": np.zeros(n, bool), "policy": np.empty(n, np.int8), "episode": np.empty(n, np.int32)}
    probs = np.asarray(policy_probs, dtype=np.float64)
    probs = probs / probs.sum()
    i, ep = 0, 0
    try:
        while i < n:
            pol = int(rng.choice(3, p=probs))
            gait = _random_gait(rng, k) if pol == 1 else tuned
            noise = 0.3 if pol == 1 else TUNED_NOISE
            reach = pol == 2 and reacher
            if reach:
                kp = float(np.exp(rng.uniform(np.log(30), np.log(400))))
                kd, noise = float(rng.uniform(0.05, 0.5)), REACH_NOISE
            obs, _ = env.reset(seed=int(rng.integers(2 ** 31)))
            t0 = float(rng.uniform(0, 10))  # random gait phase offset
            for t in range(ep_steps):
                if i >= n:
                    break
                if pol == 0:
                    a = rng.uniform(-1, 1, k)
                elif reach:
                    a = reach_action(obs, kp, kd) + rng.normal(0, noise, k)
                else:
                    a = gait.action(t0 + t * dt) + rng.normal(0, noise, k)
                a = np.clip(a, -1, 1).astype(np.float32)
                nxt, r, term, trunc, _ = env.step(a)
                out["observations"][i], out["actions"][i], out["rewards"][i] = obs, a, r
                out["next_observations"][i], out["terminals"][i] = nxt, term
                out["policy"][i], out["episode"][i] = pol, ep
                i += 1
                obs = nxt
                if term or trunc:
                    break
            ep += 1
    finally:
        env.close()
    return out
