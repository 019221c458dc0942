"""Fidelity benchmark: is SynthER's synthetic data physically right? (simulator oracle)

Every synthetic transition ``(s, a, r, s')`` is replayed in the real simulator: the simulator is put
in state ``s`` (the observation maps back to the physics state), the action ``a`` (clipped to the
action bounds) is applied, and the simulator's next observation and reward are compared with the
synthetic ``s'`` and ``r``. Errors are divided per dimension by the real data's std, so 1.0 means
"as wrong as a random draw of the marginal". Beside it, distribution metrics against held-out real
data: per-dimension Wasserstein-1 distance (normalised by the real std, averaged over columns),
correlation-matrix error (mean |corr_real - corr_synth| over column pairs), nearest-neighbour
distance to the training rows (memorisation / diversity, cf. seed Figure 1a), and SDMetrics'
KSComplement / CorrelationSimilarity (seed Section 3.1) when ``sdmetrics`` is installed.

Environments whose observation is the full physics state (position without the x coordinate, and
velocity), so a transition can be replayed exactly:

* gymnasium MuJoCo ``HalfCheetah-v5`` (and ``-v4``): ``obs = concat(qpos[1:], qvel)`` (8 + 9);
  ``qpos[0]`` (the x position) is unobserved and set to 0 -- the dynamics are translation invariant
  and the reward uses only the x displacement during the step.
* DMC ``cheetah-run`` (``dm_control/cheetah-run-v0`` via shimmy): the flat observation is
  ``concat(position, velocity)`` = ``concat(qpos[1:], qvel)`` (gymnasium flattens the Dict in key
  order); verified by round trip (max error ~2e-6, float32 rounding).

Real data (``collect_transitions``) mixes three behaviour policies, chosen per episode (5 simulated
seconds each): uniform random actions; a random open-loop sinusoidal gait (random amplitude, phase,
bias and frequency per episode) plus N(0, 0.3) action noise; and a cheap "partially trained" policy:
an open-loop gait whose parameters were tuned by random search on return (``tune_gait``: 6 rounds of
16 noisy 5 s rollouts, 1-6 s of CPU), executed with N(0, 0.2) noise. The tuned gait moves forward
(~1.25 reward/step on HalfCheetah-v5, ~0.13 on cheetah-run, where random actions give ~-0.35 and
~0.00), so the data covers still, flailing and running states. (No SAC is trained: too slow for a
benchmark on 2 shared cores.)

Baselines on the same table (all fitted / applied on the same training rows):

* ``real (held-out)`` -- fresh real transitions: the floor (dynamics error ~0).
* seed D.1 augmentations of the training rows: additive noise ``s, s' + N(0, 0.1)`` (std 0.1, raw
  units), multiplicative noise ``s, s' * eps``, one ``eps ~ U(0.8, 1.2)`` per transition, and
  dynamics noise ``s' = s + eps (s' - s)``, ``eps ~ U(0.5, 1.5)``.
* ``GMM``: a full-covariance Gaussian mixture on standardised rows (scikit-learn if installed,
  else a small numpy EM).
* ``TVAE`` / ``CTGAN`` (``ctgan`` package) with the seed's Table 6 / 7 defaults (the package
  defaults: TVAE 2x128 layers, embedding 128, batch 500, loss factor 2; CTGAN 2x256, embedding
  128, batch 500, 1 discriminator step), ``--ctgan-epochs`` epochs, each in a subprocess killed
  after ``--ctgan-budget-s`` seconds. Skipped with a reason when unavailable.
* ``SynthER``: ``TransitionDiffusion`` at ``--preset`` with the preset's sampler.

``--sampler-sweep`` re-samples the one trained SynthER model with several samplers (128/64/32-step
stochastic, 32/16-step deterministic) and reports dynamics error and samples/s for each.

CLI::

    python -m benchmarks.fidelity --env HalfCheetah-v5 --preset fast --num-real 10000 \
        --num-synthetic 10000 --out results/fidelity [--sampler-sweep]

writes ``fidelity.json``, ``fidelity.csv`` (main table), ``fidelity_sweep.csv`` (with
``--sampler-sweep``) and ``marginals.png`` (seed Figure 8 style: SynthER vs real) into ``--out``
and prints the tables as markdown.

``score_transitions(env_id, rows_dict)`` is the public scorer (used by ``synther report --env-id``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from synther_buffer.config import PRECISIONS
from synther_buffer.offline import json_default

KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")
SUPPORTED_ENVS = ("HalfCheetah-v5", "HalfCheetah-v4", "cheetah-run (dm_control/cheetah-run-v0)")

# Sampler settings of --sampler-sweep: (sampler, steps, SynthERConfig sampler fields). Unlisted fields
# are the paper's Table 9 (sigma_max 80, S_churn 80, S_tmin 0.05, S_tmax 50, S_noise 1.003), whatever
# the trained model's preset says; the first setting is the paper's sampler.
WIDE = {"s_tmin": 0.01, "s_tmax": 80.0}   # churn over (almost) the whole schedule
SWEEP_SETTINGS: Tuple[Tuple[str, int, Dict[str, float]], ...] = (
    ("stochastic", 128, {}), ("stochastic", 64, {}),
    ("stochastic", 48, {"sigma_max": 10.0, **WIDE}),
    ("stochastic", 40, {"sigma_max": 5.0, **WIDE}),       # the fast preset's sampler
    ("stochastic", 40, {"sigma_max": 10.0, **WIDE}),
    ("stochastic", 32, {"sigma_max": 5.0, **WIDE}),
    ("stochastic", 32, {}), ("deterministic", 32, {}), ("deterministic", 16, {}),
)


def sweep_label(sampler: str, steps: int, extra: Mapping[str, float]) -> str:
    """``"32-step stochastic, sigma_max 10"``."""
    return f"{steps}-step {sampler}" + "".join(f", {k} {v:g}" for k, v in extra.items())

ALL_GENERATORS = ("real", "additive", "multiplicative", "dynamics", "gmm", "tvae", "ctgan", "synther")
GENERATOR_LABELS = {
    "real": "real (held-out)",
    "additive": "additive noise N(0,0.1) (D.1)",
    "multiplicative": "multiplicative noise U(0.8,1.2) (D.1)",
    "dynamics": "dynamics noise U(0.5,1.5) (D.1)",
    "gmm": "GMM",
    "tvae": "TVAE",
    "ctgan": "CTGAN",
    "synther": "SynthER",
}


# ============================================================================================ oracle
class SimulatorOracle:
    """Replays transitions in the simulator. Subclasses map a flat observation to the physics state.

    Attributes:
        env_id: the resolved gymnasium id.
        obs_dim, action_dim: widths of the flat observation and the action.
        action_low, action_high: the action bounds actions are clipped to (``[-1, 1]`` here, as in
            :func:`synther_buffer.envs.make_env`).
        dim_groups: named column groups of the observation (e.g. ``{"position": slice(0, 8)}``).
        dt: simulated seconds per (agent) step.
    """

    env_id: str
    obs_dim: int
    action_dim: int
    action_low: np.ndarray
    action_high: np.ndarray
    dim_groups: Dict[str, slice]
    dt: float

    def step(self, obs: np.ndarray, action: np.ndarray) -> Tuple[np.ndarray, float]:
        """Put the simulator in the state of ``obs``, apply ``action``; return (next_obs, reward)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the simulator."""

    def __enter__(self) -> "SimulatorOracle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class HalfCheetahOracle(SimulatorOracle):
    """gymnasium MuJoCo HalfCheetah (v4/v5): ``obs = concat(qpos[1:], qvel)``; ``qpos[0] := 0``."""

    def __init__(self, env_id: str):
        import gymnasium as gym
        import mujoco

        self._mujoco = mujoco
        self.env_id = env_id
        self._env = gym.make(env_id)
        self._u = self._env.unwrapped
        self._u.reset(seed=0)
        nq, nv = self._u.model.nq, self._u.model.nv
        self.obs_dim = (nq - 1) + nv
        if self._env.observation_space.shape != (self.obs_dim,):
            raise ValueError(f"{env_id}: observation shape {self._env.observation_space.shape} is not "
                             f"qpos[1:] + qvel = {self.obs_dim}; only the default observation is supported")
        self._nq = nq
        space = self._env.action_space
        self.action_dim = int(space.shape[0])
        self.action_low = np.asarray(space.low, dtype=np.float64)
        self.action_high = np.asarray(space.high, dtype=np.float64)
        self.dim_groups = {"position": slice(0, nq - 1), "velocity": slice(nq - 1, self.obs_dim)}
        self.dt = float(self._u.dt)

    def step(self, obs: np.ndarray, action: np.ndarray) -> Tuple[np.ndarray, float]:
        u = self._u
        # Reset first: clears warm-start and any state from the previous row (order independence).
        self._mujoco.mj_resetData(u.model, u.data)
        qpos = np.empty(self._nq)
        qpos[0] = 0.0
        qpos[1:] = obs[: self._nq - 1]
        u.set_state(qpos, np.asarray(obs[self._nq - 1:], dtype=np.float64))
        next_obs, reward, *_ = u.step(action)
        return np.asarray(next_obs, dtype=np.float64), float(reward)

    def close(self) -> None:
        self._env.close()


class DMCCheetahOracle(SimulatorOracle):
    """dm_control cheetah (shimmy): flat obs = ``concat(position, velocity)`` = ``concat(qpos[1:], qvel)``.

    Steps the way ``dm_control.rl.control.Environment.step`` does (``task.before_step``,
    ``physics.step(n_sub_steps)``, ``task.after_step``, ``task.get_reward``) without its episode
    step counter, so rows can be replayed in any order.
    """

    def __init__(self, env_id: str):
        import gymnasium as gym

        self.env_id = env_id
        self._env = gym.make(env_id)
        self._env.reset(seed=0)
        self._dm = self._env.unwrapped._env
        self._physics = self._dm.physics
        self._task = self._dm._task
        self._n_sub_steps = int(self._dm._n_sub_steps)
        spec = self._dm.observation_spec()
        if list(spec) != ["position", "velocity"]:
            raise ValueError(f"{env_id}: unexpected observation keys {list(spec)}; expected position, velocity")
        nq, nv = self._physics.model.nq, self._physics.model.nv
        if spec["position"].shape != (nq - 1,) or spec["velocity"].shape != (nv,):
            raise ValueError(f"{env_id}: position/velocity shapes do not match qpos[1:]/qvel")
        self._nq = nq
        self.obs_dim = (nq - 1) + nv
        aspec = self._dm.action_spec()
        self.action_dim = int(aspec.shape[0])
        self.action_low = np.asarray(aspec.minimum, dtype=np.float64)
        self.action_high = np.asarray(aspec.maximum, dtype=np.float64)
        self.dim_groups = {"position": slice(0, nq - 1), "velocity": slice(nq - 1, self.obs_dim)}
        self.dt = float(self._dm.control_timestep())

    def step(self, obs: np.ndarray, action: np.ndarray) -> Tuple[np.ndarray, float]:
        p = self._physics
        with p.reset_context():  # resets data (warm start, time), then mj_forward on exit
            p.data.qpos[0] = 0.0
            p.data.qpos[1:] = obs[: self._nq - 1]
            p.data.qvel[:] = obs[self._nq - 1:]
        self._task.before_step(action, p)
        p.step(self._n_sub_steps)
        self._task.after_step(p)
        reward = float(self._task.get_reward(p))
        next_obs = np.concatenate([p.data.qpos[1:], p.data.qvel])
        return next_obs, reward

    def close(self) -> None:
        self._env.close()


def make_oracle(env_id: str) -> SimulatorOracle:
    """A :class:`SimulatorOracle` for ``env_id`` (any form :func:`synther_buffer.envs.resolve_env_id` takes).

    Raises:
        ValueError: the environment's observation cannot be mapped back to the physics state
            (supported: ``HalfCheetah-v5``/``-v4`` and DMC ``cheetah-run``).
    """
    from synther_buffer.envs import resolve_env_id

    resolved = resolve_env_id(env_id)
    name = resolved.rsplit("/", 1)[-1]
    if resolved.startswith("dm_control/cheetah-"):
        return DMCCheetahOracle(resolved)
    if name in ("HalfCheetah-v5", "HalfCheetah-v4"):
        return HalfCheetahOracle(resolved)
    raise ValueError(f"fidelity scoring is not available for {env_id!r} ({resolved}): its observation does not "
                     f"determine the simulator state; supported: {', '.join(SUPPORTED_ENVS)}")


# ============================================================================================ scoring
def _as_rows_dict(rows: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    missing = [k for k in KEYS[:4] if k not in rows]
    if missing:
        raise ValueError(f"rows_dict is missing key(s) {missing}; need {list(KEYS)}")
    obs = np.asarray(rows["observations"], dtype=np.float64)
    n = obs.shape[0]
    out = {
        "observations": obs.reshape(n, -1),
        "actions": np.asarray(rows["actions"], dtype=np.float64).reshape(n, -1),
        "rewards": np.asarray(rows["rewards"], dtype=np.float64).reshape(n),
        "next_observations": np.asarray(rows["next_observations"], dtype=np.float64).reshape(n, -1),
    }
    if "terminals" in rows:
        out["terminals"] = np.asarray(rows["terminals"]).reshape(n).astype(np.float64)
    for k, v in out.items():
        if v.shape[0] != n:
            raise ValueError(f"rows_dict[{k!r}] has {v.shape[0]} rows, observations have {n}")
    return out


def _safe_std(x: np.ndarray) -> np.ndarray:
    s = np.asarray(x, dtype=np.float64).std(axis=0)
    return np.where(s > 1e-8, s, 1.0)


def score_transitions(env_id: str, rows: Mapping[str, Any], *, reference: Optional[Mapping[str, Any]] = None,
                      obs_std: Optional[np.ndarray] = None, reward_std: Optional[float] = None,
                      max_rows: Optional[int] = 10_000, seed: int = 0, action_repeat: int = 1,
                      oracle: Optional[SimulatorOracle] = None) -> Dict[str, Any]:
    """Replay transitions in the simulator and measure how wrong their next states and rewards are.

    Args:
        env_id: ``"HalfCheetah-v5"``, ``"cheetah-run"`` / ``"dm_control/cheetah-run-v0"`` (see
            :func:`make_oracle`).
        rows: dict with ``observations`` [N, obs_dim], ``actions`` [N, act_dim], ``rewards`` [N],
            ``next_observations`` [N, obs_dim] (and optionally ``terminals``), e.g. a synthetic
            dataset from ``synther upsample``.
        reference: real transitions (same keys) whose ``next_observations`` / ``rewards`` std
            normalises the errors. Without it (and without ``obs_std`` / ``reward_std``) the
            scored rows' own std is used (``"normalization": "self"`` in the result).
        obs_std, reward_std: explicit normalisers (win over ``reference``).
        max_rows: score a random subset of at most this many rows (None: all). Replaying costs
            ~60-100 us per row.
        seed: picks that subset.
        action_repeat: simulator steps per transition (rewards summed), as in ``make_env``.
        oracle: reuse an existing :class:`SimulatorOracle` (it is not closed).

    Returns a JSON-friendly dict: ``dynamics_mse`` (mean over scored rows and observation dims of
    ((sim_next - next) / std)^2) and its standard error over rows ``dynamics_mse_se``,
    ``dynamics_mse_median`` (median over rows of the per-row mean),
    ``dynamics_mse_<group>`` (position / velocity columns), ``reward_mse`` (((sim_r - r) /
    reward_std)^2, mean) and ``reward_mse_median``, the raw (unnormalised) versions,
    ``per_dim_dynamics_mse``, ``n_rows``, ``n_scored``, ``n_nonfinite`` (rows skipped because
    the row or the simulator's result was not finite), ``action_clip_fraction`` (fraction of
    action entries outside the bounds, clipped before replay), ``terminal_rate`` (these envs never
    terminate, so it should be 0), ``normalization``, ``seconds``.
    """
    t0 = time.perf_counter()
    d = _as_rows_dict(rows)
    n_rows = d["observations"].shape[0]
    if n_rows < 1:
        raise ValueError("rows_dict has no transitions")
    idx = np.arange(n_rows)
    if max_rows is not None and n_rows > max_rows:
        idx = np.sort(np.random.default_rng(seed).choice(n_rows, size=int(max_rows), replace=False))
    own = oracle is None
    orc = make_oracle(env_id) if own else oracle
    try:
        if d["observations"].shape[1] != orc.obs_dim or d["actions"].shape[1] != orc.action_dim:
            raise ValueError(f"{env_id}: rows have obs/action widths {d['observations'].shape[1]}/"
                             f"{d['actions'].shape[1]}, the environment has {orc.obs_dim}/{orc.action_dim}")
        obs, act = d["observations"][idx], d["actions"][idx]
        nxt, rew = d["next_observations"][idx], d["rewards"][idx]
        clipped = np.clip(act, orc.action_low, orc.action_high)
        clip_frac = float(np.mean(np.abs(clipped - act) > 1e-7)) if act.size else 0.0
        sim_next = np.full_like(nxt, np.nan)
        sim_rew = np.full(len(idx), np.nan)
        row_ok = np.isfinite(obs).all(1) & np.isfinite(clipped).all(1) & np.isfinite(nxt).all(1) & np.isfinite(rew)
        for i in np.flatnonzero(row_ok):
            o, r_sum = obs[i], 0.0
            for _ in range(int(action_repeat)):
                o, r = orc.step(o, clipped[i])
                r_sum += r
            sim_next[i], sim_rew[i] = o, r_sum
        ok = row_ok & np.isfinite(sim_next).all(1) & np.isfinite(sim_rew)
        groups = dict(orc.dim_groups)
    finally:
        if own:
            orc.close()

    if obs_std is not None:
        s_std, norm = np.asarray(obs_std, dtype=np.float64).reshape(-1), "given"
    elif reference is not None:
        s_std, norm = _safe_std(_as_rows_dict(reference)["next_observations"]), "reference"
    else:
        s_std, norm = _safe_std(nxt[ok] if ok.any() else nxt), "self"
    if reward_std is not None:
        r_std = float(reward_std)
    elif reference is not None:
        r_std = float(_safe_std(_as_rows_dict(reference)["rewards"]))
    else:
        r_std = float(_safe_std(rew[ok] if ok.any() else rew))

    out: Dict[str, Any] = {"env_id": env_id, "n_rows": int(n_rows), "n_scored": int(ok.sum()),
                           "n_nonfinite": int((~ok).sum()), "action_clip_fraction": clip_frac,
                           "normalization": norm}
    if ok.any():
        e_raw = sim_next[ok] - nxt[ok]
        e = e_raw / s_std
        row_mse = np.mean(e ** 2, axis=1)
        r_raw = sim_rew[ok] - rew[ok]
        r_err = (r_raw / r_std) ** 2
        out.update({
            "dynamics_mse": float(row_mse.mean()),
            "dynamics_mse_se": float(row_mse.std() / math.sqrt(len(row_mse))),
            "dynamics_mse_median": float(np.median(row_mse)),
            **{f"dynamics_mse_{g}": float(np.mean(e[:, sl] ** 2)) for g, sl in groups.items()},
            "reward_mse": float(r_err.mean()),
            "reward_mse_se": float(r_err.std() / math.sqrt(len(r_err))),
            "reward_mse_median": float(np.median(r_err)),
            "dynamics_mse_raw": float(np.mean(e_raw ** 2)),
            "reward_mse_raw": float(np.mean(r_raw ** 2)),
            "per_dim_dynamics_mse": [float(v) for v in np.mean(e ** 2, axis=0)],
        })
    else:
        out.update({"dynamics_mse": float("nan"), "reward_mse": float("nan")})
    if "terminals" in d:
        out["terminal_rate"] = float(np.mean(d["terminals"][idx] > 0.5))
    out["seconds"] = time.perf_counter() - t0
    return out


# ============================================================================================ real data
@dataclass
class GaitParams:
    """Open-loop sinusoidal gait: ``a_j(t) = clip(bias_j + amp_j sin(2 pi freq t + phase_j))``."""

    amp: np.ndarray
    phase: np.ndarray
    bias: np.ndarray
    freq: float  # Hz

    def action(self, t: float) -> np.ndarray:
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


def collect_transitions(env_id: str, n: int, seed: int = 0, *, episode_seconds: float = 5.0,
                        policy_probs: Sequence[float] = (1 / 3, 1 / 3, 1 / 3)) -> Dict[str, np.ndarray]:
    """``n`` real transitions from ``make_env(env_id)`` under a mixture of behaviour policies.

    Each episode (``episode_seconds`` of simulated time; the env's own limit still applies) draws
    one of :data:`POLICIES` with ``policy_probs``: uniform random actions; a random sinusoidal gait
    + N(0, 0.3) noise; the :func:`tune_gait` gait + N(0, 0.2) noise. Returns the transition keys
    (float32; ``terminals`` bool) plus ``policy`` (index into :data:`POLICIES`) and ``episode``.
    """
    from synther_buffer.envs import make_env

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    tuned = tune_gait(env_id, seed=0) if policy_probs[2] > 0 else None
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
            obs, _ = env.reset(seed=int(rng.integers(2 ** 31)))
            t0 = float(rng.uniform(0, 10))  # random gait phase offset
            for t in range(ep_steps):
                if i >= n:
                    break
                if pol == 0:
                    a = rng.uniform(-1, 1, k)
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


# ============================================================================================ generators
def _standardize(train: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return train.mean(0), _safe_std(train)


def augment(train_rows: np.ndarray, layout, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Seed D.1 augmentations of ``n`` training rows drawn with replacement.

    ``additive``: s, s' + eps, eps ~ N(0, 0.1) (std 0.1, each entry, raw units);
    ``multiplicative``: s, s' * eps, one eps ~ U(0.8, 1.2) per transition;
    ``dynamics``: s' = s + eps (s' - s), one eps ~ U(0.5, 1.5) per transition.
    Actions and rewards are unchanged.
    """
    x = train_rows[rng.integers(0, len(train_rows), n)].astype(np.float64)
    sl = layout.slices()
    s, s2 = x[:, sl["observations"]], x[:, sl["next_observations"]]
    if kind == "additive":
        s = s + rng.normal(0.0, 0.1, s.shape)
        s2 = s2 + rng.normal(0.0, 0.1, s2.shape)
    elif kind == "multiplicative":
        eps = rng.uniform(0.8, 1.2, (n, 1))
        s, s2 = s * eps, s2 * eps
    elif kind == "dynamics":
        eps = rng.uniform(0.5, 1.5, (n, 1))
        s2 = s + eps * (s2 - s)
    else:
        raise ValueError(f"unknown augmentation {kind!r}")
    x[:, sl["observations"]], x[:, sl["next_observations"]] = s, s2
    return x.astype(np.float32)


def _gmm_numpy(z: np.ndarray, k: int, rng: np.random.Generator, iters: int = 100, reg: float = 1e-4,
               tol: float = 1e-4) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-covariance Gaussian mixture by EM (k-means++ init). Returns (weights, means, chol factors)."""
    n, d = z.shape
    k = max(1, min(k, n // max(2, d // 4)))
    centers = [z[rng.integers(n)]]
    for _ in range(1, k):  # k-means++ seeding
        d2 = np.min(((z[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(z[rng.choice(n, p=d2 / d2.sum())])
    mu = np.asarray(centers)
    resp = np.eye(k)[np.argmin(((z[:, None, :] - mu[None]) ** 2).sum(-1), axis=1)]
    prev = -np.inf
    for _ in range(iters):
        nk = resp.sum(0) + 1e-10
        w = nk / n
        mu = (resp.T @ z) / nk[:, None]
        chol = np.empty((k, d, d))
        logp = np.empty((n, k))
        for j in range(k):
            zc = z - mu[j]
            cov = (resp[:, j, None] * zc).T @ zc / nk[j] + reg * np.eye(d)
            L = np.linalg.cholesky(cov)
            chol[j] = L
            sol = np.linalg.solve(L, zc.T)
            logp[:, j] = (np.log(w[j]) - 0.5 * (sol ** 2).sum(0) - np.log(np.diag(L)).sum()
                          - 0.5 * d * np.log(2 * np.pi))
        mx = logp.max(1, keepdims=True)
        ll = mx[:, 0] + np.log(np.exp(logp - mx).sum(1))
        resp = np.exp(logp - ll[:, None])
        if ll.mean() - prev < tol:
            break
        prev = ll.mean()
    return w, mu, chol


def gmm_generate(train_rows: np.ndarray, n: int, components: int, seed: int) -> Tuple[np.ndarray, str]:
    """Fit a full-covariance GMM on standardised rows and sample ``n``; returns (rows, backend)."""
    mean, std = _standardize(train_rows.astype(np.float64))
    z = (train_rows - mean) / std
    rng = np.random.default_rng(seed)
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:
        w, mu, chol = _gmm_numpy(z, components, rng)
        comp = rng.choice(len(w), size=n, p=w / w.sum())
        eps = rng.standard_normal((n, z.shape[1]))
        s = mu[comp] + np.einsum("nij,nj->ni", chol[comp], eps)
        backend = f"numpy EM, k={len(w)}"
    else:
        gm = GaussianMixture(n_components=components, covariance_type="full", reg_covar=1e-4,
                             max_iter=200, random_state=seed).fit(z)
        s, _ = gm.sample(n)
        s = s[rng.permutation(n)]
        backend = f"sklearn GaussianMixture, k={components}"
    return (s * std + mean).astype(np.float32), backend


def _ctgan_worker(conn, kind: str, rows: np.ndarray, names: List[str], epochs: int, n: int, seed: int,
                  threads: int) -> None:
    try:
        import torch
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        np.random.seed(seed)
        import pandas as pd
        from ctgan import CTGAN, TVAE

        df = pd.DataFrame(rows.astype(np.float64), columns=names)
        # The seed's Table 6 / 7 bold defaults are the package defaults; only epochs is set.
        model = TVAE(epochs=epochs) if kind == "tvae" else CTGAN(epochs=epochs)
        if hasattr(model, "set_random_state"):
            model.set_random_state(seed)
        t0 = time.perf_counter()
        model.fit(df)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.sample(n)[names].to_numpy(dtype=np.float32)
        conn.send(("ok", out, fit_s, time.perf_counter() - t0))
    except BaseException as e:  # report anything to the parent
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc(), 0.0))
    finally:
        conn.close()


def ctgan_generate(kind: str, train_rows: np.ndarray, names: List[str], n: int, *, epochs: int, seed: int,
                   threads: int, budget_s: float) -> Dict[str, Any]:
    """TVAE / CTGAN (``ctgan`` package) in a subprocess killed after ``budget_s``.

    Returns ``{"rows": ... or None, "status": "ok" | "skipped: <reason>", "fit_s", "sample_s"}``.
    """
    try:
        import ctgan  # noqa: F401
        import pandas  # noqa: F401
    except Exception as e:
        return {"rows": None, "status": f"skipped: ctgan not importable ({type(e).__name__}: {e})"}
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_ctgan_worker, args=(child, kind, train_rows, names, epochs, n, seed, threads),
                       daemon=True)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    try:
        if not parent.poll(budget_s):
            proc.kill()
            proc.join(5)
            return {"rows": None, "status": f"skipped: exceeded time budget {budget_s:.0f}s ({epochs} epochs)",
                    "wall_s": time.perf_counter() - t0}
        msg = parent.recv()
    except EOFError:
        proc.join(5)
        return {"rows": None, "status": f"skipped: worker died (exit code {proc.exitcode})"}
    finally:
        parent.close()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
    if msg[0] != "ok":
        return {"rows": None, "status": f"skipped: {msg[1]}", "traceback": msg[2]}
    return {"rows": msg[1], "status": "ok", "fit_s": float(msg[2]), "sample_s": float(msg[3]),
            "wall_s": time.perf_counter() - t0}


# ============================================================================================ metrics
def distribution_metrics(synth: np.ndarray, ref: np.ndarray, train: np.ndarray, *,
                         max_nn_rows: int = 2000, seed: int = 0) -> Dict[str, float]:
    """Distribution metrics of synthetic rows against held-out real rows ``ref``.

    ``wasserstein``: mean over columns of W1(synth_j, ref_j) / std_train_j (scipy if installed, else
    the equal-quantile formula). ``corr_error``: mean over column pairs (i < j) of
    |corr_ref_ij - corr_synth_ij|. ``nn_dist``: mean Euclidean distance (standardised units) from up
    to ``max_nn_rows`` synthetic rows to their nearest training row.
    """
    synth = np.asarray(synth, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    train = np.asarray(train, dtype=np.float64)
    mean, std = _standardize(train)
    try:
        from scipy.stats import wasserstein_distance as w1
    except ImportError:  # pragma: no cover - scipy is normally present
        def w1(a, b):
            q = np.linspace(0, 1, 1001)
            return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))
    ws = [w1(synth[:, j], ref[:, j]) / std[j] for j in range(synth.shape[1])]
    with np.errstate(invalid="ignore", divide="ignore"):
        cs = np.nan_to_num(np.corrcoef(synth, rowvar=False))
        cr = np.nan_to_num(np.corrcoef(ref, rowvar=False))
    iu = np.triu_indices(synth.shape[1], 1)
    rng = np.random.default_rng(seed)
    sub = synth if len(synth) <= max_nn_rows else synth[rng.choice(len(synth), max_nn_rows, replace=False)]
    a = (sub - mean) / std
    b = (train - mean) / std
    b2 = (b ** 2).sum(1)
    nn = np.empty(len(a))
    for s in range(0, len(a), 512):
        blk = a[s:s + 512]
        d2 = (blk ** 2).sum(1)[:, None] + b2[None] - 2 * blk @ b.T
        nn[s:s + 512] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return {"wasserstein": float(np.mean(ws)), "wasserstein_max": float(np.max(ws)),
            "corr_error": float(np.mean(np.abs(cs[iu] - cr[iu]))), "nn_dist": float(nn.mean())}


def sdmetrics_scores(synth: np.ndarray, ref: np.ndarray, names: List[str], *, max_rows: int = 5000,
                     seed: int = 0, discrete: Sequence[str] = ()) -> Dict[str, Any]:
    """SDMetrics column shapes (KSComplement; TVComplement on discrete columns) and column pair trends
    (CorrelationSimilarity, Pearson), averaged, on at most ``max_rows`` rows of each set."""
    try:
        import pandas as pd
        from sdmetrics.column_pairs import CorrelationSimilarity
        from sdmetrics.single_column import KSComplement, TVComplement
    except Exception as e:
        return {"status": f"skipped: sdmetrics not importable ({type(e).__name__}: {e})"}
    rng = np.random.default_rng(seed)
    pick = lambda x: x if len(x) <= max_rows else x[rng.choice(len(x), max_rows, replace=False)]
    s = pd.DataFrame(pick(np.asarray(synth, np.float64)), columns=names)
    r = pd.DataFrame(pick(np.asarray(ref, np.float64)), columns=names)
    cont = [c for c in names if c not in discrete]
    ks = [KSComplement.compute(r[c], s[c]) for c in cont]
    tv = [TVComplement.compute(r[c], s[c]) for c in discrete]
    import warnings
    pairs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(cont)):
            for j in range(i + 1, len(cont)):
                v = CorrelationSimilarity.compute(r[[cont[i], cont[j]]], s[[cont[i], cont[j]]])
                if np.isfinite(v):
                    pairs.append(v)
    return {"status": "ok", "ks_complement": float(np.mean(ks)),
            "tv_complement": float(np.mean(tv)) if tv else None,
            "corr_similarity": float(np.mean(pairs)) if pairs else None}


# ============================================================================================ plot
def plot_marginals(path: Path, real: np.ndarray, synth: np.ndarray, names: Sequence[str], *, label: str = "SynthER",
                   bins: int = 50, title: str = "") -> None:
    """Seed Figure 8 style: per-column histograms, synthetic (blue) vs real (orange), dashed real mean +- std."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    k = len(names)
    ncols = min(6, k)
    nrows = math.ceil(k / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.5 * ncols, 1.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.axis("off")
            continue
        r, s = real[:, i], synth[:, i]
        lo = float(min(np.percentile(r, 0.5), np.percentile(s, 0.5)))
        hi = float(max(np.percentile(r, 99.5), np.percentile(s, 99.5)))
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        ax.hist(s, bins=edges, density=True, alpha=0.6, color="tab:blue", label=label)
        ax.hist(r, bins=edges, density=True, alpha=0.6, color="tab:orange", label="real")
        m, sd = float(r.mean()), float(r.std())
        for v in (m - sd, m + sd):
            ax.axvline(v, color="k", linestyle="--", linewidth=0.8)
        ax.set_title(names[i], fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=6, loc="upper right")
    fig.suptitle(title or f"marginals: {label} (blue) vs held-out real (orange); dashed: real mean +- std",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ============================================================================================ benchmark
def _log(msg: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    if not np.isfinite(v):
        return "nan"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) < 10 ** -nd:
        return f"{v:.1e}"
    return f"{v:.{nd}f}" if abs(v) < 100 else f"{v:.1f}"


TABLE_COLUMNS = (
    ("generator", "generator"), ("dynamics_mse", "dyn MSE"), ("dynamics_mse_se", "+- se"),
    ("dynamics_mse_median", "dyn MSE (median)"),
    ("reward_mse", "rew MSE"), ("wasserstein", "W1"), ("corr_error", "corr err"), ("nn_dist", "NN dist"),
    ("ks_complement", "KSComp"), ("corr_similarity", "CorrSim"), ("fit_s", "fit s"),
    ("samples_per_s", "samples/s"), ("status", "status"),
)
SWEEP_COLUMNS = (
    ("setting", "sampler"), ("nfe", "NFE"), ("dynamics_mse", "dyn MSE"), ("dynamics_mse_se", "+- se"),
    ("dynamics_mse_median", "dyn MSE (median)"),
    ("reward_mse", "rew MSE"), ("wasserstein", "W1"), ("corr_error", "corr err"), ("sample_s", "sample s"),
    ("samples_per_s", "samples/s"),
)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns=TABLE_COLUMNS) -> str:
    """Render rows (dicts) as a markdown table with the given (key, header) columns."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})




def _parse_mix(text: str) -> Tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 0 or sum(vals) <= 0:
        raise ValueError(f"--policy-mix needs three non-negative weights (random,gait,tuned), got {text!r}")
    return vals  # type: ignore[return-value]


def _set_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    try:  # numpy BLAS too (nearest-neighbour distances, GMM)
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except Exception:
        pass


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the benchmark described by parsed CLI ``args``; writes the outputs and returns the result dict."""
    from synther_buffer import SynthERConfig
    from synther_buffer.edm import num_function_evals
    from synther_buffer.datasets import from_rows, to_rows
    from synther_buffer.offline import make_model

    _set_threads(args.threads)
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_start = _loadavg()
    gens = [g.strip() for g in args.generators.split(",") if g.strip()] if args.generators else list(ALL_GENERATORS)
    bad = sorted(set(gens) - set(ALL_GENERATORS))
    if bad:
        raise ValueError(f"unknown generator(s) {bad}; choose from {ALL_GENERATORS}")
    if args.skip_ctgan:
        gens = [g for g in gens if g not in ("tvae", "ctgan")]
    if "synther" not in gens and args.sampler_sweep:
        raise ValueError("--sampler-sweep needs the synther generator")
    num_eval = args.num_eval or min(args.num_synthetic, 10_000)

    # ---------------------------------------------------------------- real data
    t0 = time.perf_counter()
    _log(f"collecting real transitions from {args.env}: train {args.num_real}, eval {num_eval}, holdout {num_eval}")
    mix = _parse_mix(args.policy_mix)
    train_d = collect_transitions(args.env, args.num_real, seed=args.seed, episode_seconds=args.episode_seconds,
                                  policy_probs=mix)
    eval_d = collect_transitions(args.env, num_eval, seed=args.seed + 1, episode_seconds=args.episode_seconds,
                                 policy_probs=mix)
    hold_d = collect_transitions(args.env, num_eval, seed=args.seed + 2, episode_seconds=args.episode_seconds,
                                 policy_probs=mix)
    collect_s = time.perf_counter() - t0
    strip = lambda d: {k: d[k] for k in KEYS}
    train_rows, layout = to_rows(strip(train_d), model_terminals=None)
    eval_rows, _ = to_rows(strip(eval_d), model_terminals=layout.terminal)
    hold_rows, _ = to_rows(strip(hold_d), model_terminals=layout.terminal)
    names = layout.column_names()
    discrete = ["terminal"] if layout.terminal else []
    obs_std = _safe_std(train_d["next_observations"])
    rew_std = float(_safe_std(train_d["rewards"]))
    policy_counts = {p: int((train_d["policy"] == i).sum()) for i, p in enumerate(POLICIES)}
    _log(f"collected in {collect_s:.1f}s; train policy mix {policy_counts}; mean reward "
         f"{float(train_d['rewards'].mean()):.3f}")
    oracle = make_oracle(args.env)

    saved_rows: Dict[str, np.ndarray] = {}

    def evaluate(label: str, rows: np.ndarray, extra: Dict[str, Any]) -> Dict[str, Any]:
        if args.save_rows:
            saved_rows[label] = np.asarray(rows, dtype=np.float32)
        t = time.perf_counter()
        score = score_transitions(args.env, from_rows(rows, layout), obs_std=obs_std, reward_std=rew_std,
                                  max_rows=args.score_rows, seed=args.seed, oracle=oracle)
        dist = distribution_metrics(rows, eval_rows, train_rows, seed=args.seed)
        sdm = (sdmetrics_scores(rows, eval_rows, names, max_rows=args.sdmetrics_rows, seed=args.seed,
                                discrete=discrete) if not args.no_sdmetrics else {"status": "skipped: --no-sdmetrics"})
        row = {"generator": label, **{k: score.get(k) for k in ("dynamics_mse", "dynamics_mse_se",
                                                                 "dynamics_mse_median", "reward_mse", "reward_mse_se",
                                                                 "dynamics_mse_position", "dynamics_mse_velocity",
                                                                 "reward_mse_median", "n_scored", "n_nonfinite",
                                                                 "action_clip_fraction")},
               **dist, "ks_complement": sdm.get("ks_complement"), "tv_complement": sdm.get("tv_complement"),
               "corr_similarity": sdm.get("corr_similarity"), "sdmetrics_status": sdm["status"],
               "status": "ok", **extra}
        row["score_s"] = time.perf_counter() - t
        row["per_dim_dynamics_mse"] = score.get("per_dim_dynamics_mse")
        _log(f"{label}: dyn MSE {_fmt(row['dynamics_mse'])}, rew MSE {_fmt(row['reward_mse'])}, "
             f"W1 {_fmt(row['wasserstein'])}, corr err {_fmt(row['corr_error'])} (scored in {row['score_s']:.1f}s)")
        return row

    table: List[Dict[str, Any]] = []
    sweep: List[Dict[str, Any]] = []
    details: Dict[str, Any] = {}
    synther_rows = None
    rng = np.random.default_rng(args.seed)
    n = args.num_synthetic
    try:
        for g in gens:
            label = GENERATOR_LABELS[g]
            _log(f"generator {label} ...")
            if g == "real":
                rows = hold_rows[:n]
                table.append(evaluate(label, rows, {"fit_s": 0.0, "n_rows": len(rows)}))
            elif g in ("additive", "multiplicative", "dynamics"):
                t = time.perf_counter()
                rows = augment(train_rows, layout, g, n, rng)
                dt = time.perf_counter() - t
                table.append(evaluate(label, rows, {"fit_s": 0.0, "sample_s": dt, "samples_per_s": n / max(dt, 1e-9)}))
            elif g == "gmm":
                t = time.perf_counter()
                rows, backend = gmm_generate(train_rows, n, args.gmm_components, args.seed)
                dt = time.perf_counter() - t
                table.append(evaluate(label, rows, {"fit_s": dt, "backend": backend}))
            elif g in ("tvae", "ctgan"):
                res = ctgan_generate(g, train_rows, names, n, epochs=args.ctgan_epochs, seed=args.seed,
                                     threads=args.threads, budget_s=args.ctgan_budget_s)
                if res["rows"] is None:
                    _log(f"{label}: {res['status']}")
                    table.append({"generator": label, "status": res["status"]})
                    details[g] = {k: v for k, v in res.items() if k != "rows"}
                else:
                    table.append(evaluate(label, res["rows"], {
                        "fit_s": res["fit_s"], "sample_s": res["sample_s"],
                        "samples_per_s": n / max(res["sample_s"], 1e-9), "epochs": args.ctgan_epochs}))
            elif g == "synther":
                cfg = SynthERConfig.preset(args.preset).replace(device=args.device, seed=args.seed,
                                                                progress=args.progress)
                if args.train_steps:
                    cfg = cfg.replace(train_steps=args.train_steps)
                if args.precision:
                    cfg = cfg.replace(precision=args.precision)
                model = make_model(layout, layout.dim, cfg)
                _log(f"SynthER: preset {args.preset}, {model!r}, {cfg.train_steps} steps, "
                     f"sampler {cfg.sample_steps}-step {cfg.sampler}, precision {cfg.precision}")
                fit = model.fit(train_rows)
                _log(f"SynthER fit: {fit['seconds']:.1f}s, loss {fit['loss']:.4f}")
                t = time.perf_counter()
                rows = model.sample(n, seed=args.seed + 1)
                dt = time.perf_counter() - t
                synther_rows = rows
                details["synther"] = {"config": cfg.to_dict(), "fit": fit, "params": model.num_params}
                table.append(evaluate(f"{label} ({cfg.sample_steps}-step {cfg.sampler})", rows, {
                    "fit_s": fit["seconds"], "sample_s": dt, "samples_per_s": n / max(dt, 1e-9),
                    "train_steps": cfg.train_steps, "loss": fit["loss"]}))
                if args.sampler_sweep:
                    base_cfg = model.config
                    table9 = {f: getattr(SynthERConfig.preset("paper"), f)
                              for f in ("sigma_max", "s_churn", "s_tmin", "s_tmax", "s_noise", "rho")}
                    for k, (sampler, steps, extra) in enumerate(SWEEP_SETTINGS):
                        model.config = base_cfg.replace(sampler=sampler, sample_steps=steps, **{**table9, **extra})
                        t = time.perf_counter()
                        try:
                            rows_k = model.sample(n, seed=args.seed + 100 + k)
                        finally:
                            model.config = base_cfg
                        dt = time.perf_counter() - t
                        label_k = sweep_label(sampler, steps, extra)
                        r = evaluate(f"SynthER {label_k}", rows_k, {})
                        sweep.append({"setting": label_k, "sampler": sampler, "steps": steps, **extra,
                                      "nfe": num_function_evals(steps), "sample_s": dt,
                                      "samples_per_s": n / max(dt, 1e-9),
                                      **{key: r[key] for key in ("dynamics_mse", "dynamics_mse_se",
                                                                 "dynamics_mse_median", "reward_mse",
                                                                 "wasserstein", "corr_error", "nn_dist",
                                                                 "ks_complement", "corr_similarity")}})
                if args.save_model:
                    model.save(out_dir / "synther_model.pt")
    finally:
        oracle.close()

    # ---------------------------------------------------------------- outputs
    png = out_dir / "marginals.png"
    hist_cols = list(range(layout.obs_dim + layout.action_dim + 1))  # Figure 8: state, action, reward
    plot_src = synther_rows if synther_rows is not None else (hold_rows[:n])
    plot_marginals(png, eval_rows[:, hist_cols], plot_src[:, hist_cols], [names[i] for i in hist_cols],
                   label="SynthER" if synther_rows is not None else "held-out real",
                   title=f"{args.env}: {'SynthER' if synther_rows is not None else 'held-out real'} (blue) vs "
                         f"held-out real (orange), {len(eval_rows):,} rows; dashed: real mean +- std")
    if args.save_rows:  # every generator's rows + the real sets, to re-score later
        keyname = lambda lab: "".join(c if c.isalnum() else "_" for c in lab).strip("_")
        np.savez(out_dir / "rows.npz", train=train_rows, eval=eval_rows, holdout=hold_rows,
                 columns=np.asarray(names), **{keyname(k): v for k, v in saved_rows.items()})
    load_end = _loadavg()
    import torch
    result = {
        "command": "python -m benchmarks.fidelity " + " ".join(args.argv) if getattr(args, "argv", None) is not None
        else None,
        "env": args.env, "preset": args.preset, "num_real": args.num_real, "num_synthetic": n, "num_eval": num_eval,
        "seed": args.seed, "threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "loadavg_start": load_start, "loadavg_end": load_end,
        "collect_seconds": collect_s, "total_seconds": time.perf_counter() - t_start,
        "policy_mix": list(mix), "train_policy_mix": policy_counts, "obs_std": obs_std.tolist(), "reward_std": rew_std,
        "columns": names, "table": table, "sampler_sweep": sweep, "details": details,
        "png": str(png), "json": str(out_dir / "fidelity.json"), "csv": str(out_dir / "fidelity.csv"),
    }
    csv_keys = [k for k, _ in TABLE_COLUMNS] + ["dynamics_mse_position", "dynamics_mse_velocity", "reward_mse_se",
                                                "reward_mse_median",
                                                "wasserstein_max", "tv_complement", "sample_s", "n_scored",
                                                "n_nonfinite", "action_clip_fraction"]
    _write_csv(out_dir / "fidelity.csv", table, csv_keys)
    if sweep:
        _write_csv(out_dir / "fidelity_sweep.csv", sweep, [k for k, _ in SWEEP_COLUMNS] +
                   ["sampler", "steps", "sigma_max", "s_tmin", "s_tmax", "nn_dist", "ks_complement", "corr_similarity"])
        result["sweep_csv"] = str(out_dir / "fidelity_sweep.csv")
    with open(out_dir / "fidelity.json", "w") as f:
        json.dump(result, f, indent=2, default=json_default)
        f.write("\n")
    return result


def format_result(result: Mapping[str, Any]) -> str:
    """Markdown rendering of a :func:`run` result (main table, then the sampler sweep if any)."""
    lines = [f"### Fidelity: {result['env']}, preset {result['preset']}, {result['num_real']:,} real / "
             f"{result['num_synthetic']:,} synthetic rows (eval {result['num_eval']:,})", "",
             markdown_table(result["table"])]
    if result.get("sampler_sweep"):
        lines += ["", "Sampler sweep (one trained SynthER model):", "", markdown_table(result["sampler_sweep"], SWEEP_COLUMNS)]
    lines += ["", f"load average start {result['loadavg_start']}, end {result['loadavg_end']}; "
                  f"torch threads {result['threads']}; total {result['total_seconds']:.0f}s"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity",
                                description="Simulator-oracle fidelity of SynthER's synthetic transitions vs baselines.")
    p.add_argument("--env", default="HalfCheetah-v5", help=f"environment ({', '.join(SUPPORTED_ENVS)})")
    p.add_argument("--preset", default="fast", choices=("paper", "fast", "tiny"), help="SynthERConfig preset")
    p.add_argument("--train-steps", type=int, default=None, help="override the preset's train_steps")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="SynthERConfig.precision of the SynthER model (default: the preset's, fp32)")
    p.add_argument("--num-real", type=int, default=10_000, help="real training transitions")
    p.add_argument("--num-synthetic", type=int, default=10_000, help="rows generated (and scored) per generator")
    p.add_argument("--num-eval", type=int, default=None,
                   help="held-out real rows for the distribution metrics (and the held-out baseline); "
                        "default min(num_synthetic, 10000)")
    p.add_argument("--score-rows", type=int, default=None, help="replay at most this many rows per generator (default all)")
    p.add_argument("--out", default="results/fidelity", help="output directory")
    p.add_argument("--sampler-sweep", action="store_true", help="score several samplers on the trained SynthER model")
    p.add_argument("--generators", default=None, help=f"comma list from {','.join(ALL_GENERATORS)} (default all)")
    p.add_argument("--skip-ctgan", action="store_true", help="skip TVAE and CTGAN")
    p.add_argument("--ctgan-epochs", type=int, default=50,
                   help="TVAE/CTGAN epochs (package default 300: ~26 min each on 1 loaded CPU thread for 10K rows)")
    p.add_argument("--ctgan-budget-s", type=float, default=600.0, help="wall-clock budget per TVAE/CTGAN run")
    p.add_argument("--gmm-components", type=int, default=16, help="GMM components")
    p.add_argument("--no-sdmetrics", action="store_true", help="skip the SDMetrics scores")
    p.add_argument("--sdmetrics-rows", type=int, default=5000, help="rows per set for SDMetrics")
    p.add_argument("--policy-mix", default="1,1,1",
                   help="weights of the behaviour policies random,gait,tuned (per episode); 1,1,0 skips the gait search")
    p.add_argument("--episode-seconds", type=float, default=5.0, help="simulated seconds per collection episode")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (1 on shared 2-core machines)")
    p.add_argument("--device", default="auto", help="torch device for SynthER")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-model", action="store_true", help="also save the SynthER model to OUT/synther_model.pt")
    p.add_argument("--save-rows", action="store_true", help="save every generator's rows to OUT/rows.npz")
    p.add_argument("--progress", action="store_true", help="show tqdm bars for the diffusion fit/sample")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    result = run(args)
    print(format_result(result))
    print(f"\nwrote {result['json']}, {result['csv']}" + (f", {result['sweep_csv']}" if result.get("sweep_csv") else "")
          + f", {result['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
