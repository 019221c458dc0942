"""Simulator oracle: replay transitions in the real simulator and measure how wrong they are.

Each transition ``(s, a, r, s')`` is replayed: the simulator is put in state ``s`` (the observation
maps back to the physics state), the action ``a`` (clipped to the action bounds) is applied, and the
simulator's next observation and reward are compared with ``s'`` and ``r``. Errors are divided per
dimension by the real data's std, so 1.0 means "as wrong as a random draw of the marginal".

Supported environments are those whose observation determines the physics state up to the x
position (which neither their dynamics nor their reward depend on), so that a transition can be
replayed exactly:

* gymnasium MuJoCo ``HalfCheetah-v5`` (and ``-v4``): ``obs = concat(qpos[1:], qvel)``; ``qpos[0]``
  (the x position) is unobserved and set to 0. The dynamics do not depend on it and the reward uses
  only the x displacement during the step.
* DMC ``cheetah-run`` (``dm_control/cheetah-run-v0`` via shimmy): the flattened observation is
  ``concat(position, velocity)`` = ``concat(qpos[1:], qvel)``.
* DMC ``walker-walk`` (and the other walker tasks): ``concat(height, orientations, velocity)``;
  the body pitches give the hinge angles, the torso height the root z, ``velocity`` is ``qvel``,
  and the unobserved x position is replayed as 0 (:class:`DMCWalkerOracle`).
* DMC ``reacher-hard`` (and ``reacher-easy``): ``concat(position, to_target, velocity)``; the
  target position (part of the model, not of the physics state) is ``to_target`` plus the finger
  position (:class:`DMCReacherOracle`).

The DMC observations are flattened in the key order of :func:`synther_buffer.envs.make_env`
(gymnasium's ``FlattenObservation`` over shimmy's ``Dict`` space, whose keys are sorted).

Needs the ``envs`` extra (gymnasium, MuJoCo, dm_control, shimmy); a missing one raises
:class:`synther_buffer.extras.MissingExtraError` when an oracle is built, not at import.
``synther report --env-id`` scores synthetic datasets with :func:`score_transitions`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .extras import require

__all__ = ["KEYS", "SUPPORTED_ENVS", "SimulatorOracle", "HalfCheetahOracle", "DMCOracle", "DMCCheetahOracle",
           "DMCWalkerOracle", "DMCReacherOracle", "make_oracle", "score_transitions"]

KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")
"""The transition keys a rows dict carries (``terminals`` optional for scoring)."""

SUPPORTED_ENVS = ("HalfCheetah-v5", "HalfCheetah-v4", "cheetah-run (dm_control/cheetah-run-v0)",
                  "walker-walk / -stand / -run (dm_control/walker-walk-v0, ...)",
                  "reacher-hard / -easy (dm_control/reacher-hard-v0, ...)")
"""Environments :func:`make_oracle` can replay, as shown in error messages."""

_PURPOSE = "simulator-oracle fidelity scoring"


class SimulatorOracle:
    """Replays transitions in the simulator; subclasses map a flat observation to the physics state.

    Use as a context manager (or call :meth:`close`) to release the simulator.

    Attributes:
        env_id: the resolved gymnasium id.
        obs_dim: width of the flat observation.
        action_dim: width of the action.
        action_low: lower action bounds; actions are clipped to them before replay.
        action_high: upper action bounds.
        dim_groups: named column groups of the observation (e.g. ``{"position": slice(0, 8)}``).
        dt: simulated seconds per step.
    """

    env_id: str
    obs_dim: int
    action_dim: int
    action_low: np.ndarray
    action_high: np.ndarray
    dim_groups: Dict[str, slice]
    dt: float

    def step(self, obs: np.ndarray, action: np.ndarray) -> Tuple[np.ndarray, float]:
        """Put the simulator in the state of ``obs`` and apply ``action``.

        Args:
            obs: a flat observation [obs_dim].
            action: an action [action_dim], within the bounds.

        Returns:
            ``(next_obs, reward)`` as the simulator computes them.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the simulator."""

    def __enter__(self) -> "SimulatorOracle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class HalfCheetahOracle(SimulatorOracle):
    """gymnasium MuJoCo HalfCheetah (v4/v5): ``obs = concat(qpos[1:], qvel)``, replayed with ``qpos[0] = 0``."""

    def __init__(self, env_id: str):
        """Build the environment.

        Args:
            env_id: ``"HalfCheetah-v5"`` or ``"HalfCheetah-v4"``.

        Raises:
            MissingExtraError: MuJoCo or gymnasium is not installed (the ``envs`` extra).
            ValueError: the env's observation is not ``qpos[1:] + qvel`` (a non-default observation).
        """
        gym = require("gymnasium", "envs", _PURPOSE)
        self._mujoco = require("mujoco", "envs", _PURPOSE)
        self.env_id = env_id
        self._env = gym.make(env_id)
        self._u = self._env.unwrapped
        self._u.reset(seed=0)
        nq, nv = self._u.model.nq, self._u.model.nv
        self.obs_dim = (nq - 1) + nv
        if self._env.observation_space.shape != (self.obs_dim,):
            self._env.close()
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
        """See :meth:`SimulatorOracle.step`; the data is reset first, so rows replay in any order."""
        u = self._u
        self._mujoco.mj_resetData(u.model, u.data)  # clears warm start and the previous row's state
        qpos = np.empty(self._nq)
        qpos[0] = 0.0
        qpos[1:] = obs[: self._nq - 1]
        u.set_state(qpos, np.asarray(obs[self._nq - 1:], dtype=np.float64))
        next_obs, reward, *_ = u.step(action)
        return np.asarray(next_obs, dtype=np.float64), float(reward)

    def close(self) -> None:
        """Close the environment."""
        self._env.close()


class DMCOracle(SimulatorOracle):
    """Base of the dm_control suite oracles (shimmy envs): one ``control.Environment`` step per row.

    Steps the way ``dm_control.rl.control.Environment.step`` does (``task.before_step``,
    ``physics.step(n_sub_steps)``, ``task.after_step``, ``task.get_reward``,
    ``task.get_observation``) without its episode step counter, so rows can be replayed in any
    order. The next observation is the task's own observation, flattened in the order gymnasium's
    ``FlattenObservation`` uses (the keys of shimmy's ``Dict`` space, i.e. sorted), as
    :func:`synther_buffer.envs.make_env` sees it. Subclasses implement :meth:`_set_state`: the
    physics state that a flat observation describes. The DMC suite's action bounds are [-1, 1],
    the same as ``make_env``'s, so actions are replayed unscaled.

    Attributes:
        obs_keys: the observation keys in flat order; ``dim_groups`` maps each to its columns.
    """

    domain: str = ""

    def __init__(self, env_id: str):
        """Build the environment and read its flat observation layout.

        Args:
            env_id: a resolved shimmy id of the subclass's domain, e.g. ``"dm_control/walker-walk-v0"``.

        Raises:
            MissingExtraError: dm_control, shimmy or gymnasium is not installed (the ``envs`` extra).
            ValueError: the id is not of the subclass's domain, or its observation is not the
                layout the subclass maps back to a physics state.
        """
        from .envs import resolve_env_id

        gym = require("gymnasium", "envs", _PURPOSE)
        self._mujoco = require("mujoco", "envs", _PURPOSE)
        self.env_id = resolve_env_id(env_id)  # registers the dm_control ids
        if not self.env_id.startswith(f"dm_control/{self.domain}-"):
            raise ValueError(f"{type(self).__name__} replays dm_control {self.domain} tasks, not {env_id!r}")
        self._env = gym.make(self.env_id)
        try:
            self._env.reset(seed=0)  # runs the task's initialize_episode (e.g. reacher's target size)
            self._dm = self._env.unwrapped._env
            self._physics = self._dm.physics
            self._task = self._dm._task
            self._n_sub_steps = int(self._dm._n_sub_steps)
            space = self._env.unwrapped.observation_space
            spec = self._dm.observation_spec()
            self.obs_keys = tuple(space.spaces) if hasattr(space, "spaces") else tuple(spec)
            if sorted(self.obs_keys) != sorted(spec):
                raise ValueError(f"{env_id}: gym observation keys {self.obs_keys} differ from the task's {list(spec)}")
            self.dim_groups, start = {}, 0
            for k in self.obs_keys:
                width = int(np.prod(spec[k].shape))
                self.dim_groups[k] = slice(start, start + width)
                start += width
            self.obs_dim = start
            aspec = self._dm.action_spec()
            self.action_dim = int(aspec.shape[0])
            self.action_low = np.asarray(aspec.minimum, dtype=np.float64)
            self.action_high = np.asarray(aspec.maximum, dtype=np.float64)
            self.dt = float(self._dm.control_timestep())
            self._check_layout({k: tuple(spec[k].shape) for k in spec})
        except Exception:
            self._env.close()
            raise

    def _check_layout(self, shapes: Mapping[str, Tuple[int, ...]]) -> None:
        """Raise ``ValueError`` unless the observation is the layout :meth:`_set_state` reads.

        Args:
            shapes: the task's observation shapes by key.
        """
        raise NotImplementedError

    def _group(self, obs: np.ndarray, key: str) -> np.ndarray:
        """The columns of ``obs`` that hold observation ``key``, as float64."""
        return np.asarray(obs[self.dim_groups[key]], dtype=np.float64)

    def _set_state(self, obs: np.ndarray) -> None:
        """Write the physics state of ``obs`` into ``self._physics`` (called inside ``reset_context``).

        Args:
            obs: a flat observation [obs_dim].
        """
        raise NotImplementedError

    def observe(self) -> np.ndarray:
        """The task's observation of the current physics state, flattened as ``make_env`` does.

        Returns:
            A float64 array [obs_dim].
        """
        ob = self._task.get_observation(self._physics)
        return np.concatenate([np.asarray(ob[k], dtype=np.float64).reshape(-1) for k in self.obs_keys])

    def step(self, obs: np.ndarray, action: np.ndarray) -> Tuple[np.ndarray, float]:
        """See :meth:`SimulatorOracle.step`; the physics is reset first, so rows replay in any order."""
        p = self._physics
        with p.reset_context():  # resets data (warm start, time), then mj_forward on exit
            self._set_state(np.asarray(obs, dtype=np.float64))
        self._task.before_step(action, p)
        p.step(self._n_sub_steps)
        self._task.after_step(p)
        reward = float(self._task.get_reward(p))
        return self.observe(), reward

    def close(self) -> None:
        """Close the environment."""
        self._env.close()


class DMCCheetahOracle(DMCOracle):
    """dm_control cheetah (shimmy): flat obs = ``concat(position, velocity)`` = ``concat(qpos[1:], qvel)``.

    ``qpos[0]`` (the x position) is unobserved and replayed as 0: the dynamics are translation
    invariant and the reward (run speed) reads a velocity sensor.
    """

    domain = "cheetah"

    def _check_layout(self, shapes: Mapping[str, Tuple[int, ...]]) -> None:
        """See :meth:`DMCOracle._check_layout`: ``position`` = ``qpos[1:]``, ``velocity`` = ``qvel``."""
        nq, nv = self._physics.model.nq, self._physics.model.nv
        if list(self.obs_keys) != ["position", "velocity"]:
            raise ValueError(f"{self.env_id}: unexpected observation keys {list(self.obs_keys)}; "
                             f"expected position, velocity")
        if shapes["position"] != (nq - 1,) or shapes["velocity"] != (nv,):
            raise ValueError(f"{self.env_id}: position/velocity shapes do not match qpos[1:]/qvel")

    def _set_state(self, obs: np.ndarray) -> None:
        """See :meth:`DMCOracle._set_state`."""
        d = self._physics.data
        d.qpos[0] = 0.0
        d.qpos[1:] = self._group(obs, "position")
        d.qvel[:] = self._group(obs, "velocity")


def _wrap(angle: float, center: float) -> float:
    """``angle`` shifted by a multiple of 2 pi into ``[center - pi, center + pi)``."""
    return center + (angle - center + math.pi) % (2 * math.pi) - math.pi


class DMCWalkerOracle(DMCOracle):
    """dm_control planar walker (shimmy): flat obs = ``concat(height, orientations, velocity)`` (1 + 14 + 9).

    The physics state is ``qpos = (rootz, rootx, rooty, 6 leg hinges)`` and ``qvel`` (9 each):

    * ``velocity`` is ``qvel``;
    * ``orientations`` holds each body's ``(xx, xz)`` rotation-matrix entries; every joint axis is
      the world y axis (up to sign) and the bodies have no rest rotation, so a body's pitch is
      ``atan2(xz, xx)`` and a hinge angle is ``sign * (pitch(body) - pitch(parent))``, taken in
      the 2 pi window centred on the joint range (limits act on the unwrapped angle; ``rooty`` is
      unlimited and only its value mod 2 pi matters);
    * ``height`` is the torso's world z, so ``rootz = height - torso_body_pos_z``;
    * ``rootx`` (the x position) is unobserved and replayed as 0: the floor is a plane (infinite
      for collisions), and the reward reads the torso height, its upright-ness and the
      centre-of-mass velocity, none of which depend on x.

    The observation is over-complete (14 numbers for 7 angles): a synthetic ``(xx, xz)`` pair off
    the unit circle is read by its angle only, so such an error in ``s`` is not charged, while the
    same error in ``s'`` is (the simulator's next pairs are on the circle).
    """

    domain = "walker"

    def _check_layout(self, shapes: Mapping[str, Tuple[int, ...]]) -> None:
        """See :meth:`DMCOracle._check_layout`: the walker's joints, bodies and observation shapes."""
        mj = self._mujoco
        m = self._physics.model
        nb = m.nbody
        if sorted(shapes) != ["height", "orientations", "velocity"] or shapes["orientations"] != (2 * (nb - 1),) \
                or shapes["velocity"] != (m.nv,) or int(np.prod(shapes["height"])) != 1 or m.nq != m.nv:
            raise ValueError(f"{self.env_id}: unexpected walker observation {dict(shapes)}")
        names = [m.joint(j).name for j in range(m.njnt)]
        if names[:3] != ["rootz", "rootx", "rooty"] or m.body(1).name != "torso":
            raise ValueError(f"{self.env_id}: unexpected walker joints {names}")
        if not np.allclose(m.body_quat[1:], [1.0, 0.0, 0.0, 0.0]):
            raise ValueError(f"{self.env_id}: walker bodies with a rest rotation are not supported")
        self._torso_z0 = float(m.body_pos[1, 2])
        self._hinges = []  # (qpos index, body, parent body, axis sign, wrap centre)
        for j in range(2, m.njnt):
            axis = m.jnt_axis[j]
            if m.jnt_type[j] != mj.mjtJoint.mjJNT_HINGE or not np.allclose(np.abs(axis), [0.0, 1.0, 0.0]):
                raise ValueError(f"{self.env_id}: joint {names[j]} is not a hinge about the y axis")
            body = int(m.jnt_bodyid[j])
            centre = float(np.mean(m.jnt_range[j])) if m.jnt_limited[j] else 0.0
            self._hinges.append((int(m.jnt_qposadr[j]), body, int(m.body_parentid[body]), float(axis[1]), centre))

    def _set_state(self, obs: np.ndarray) -> None:
        """See :meth:`DMCOracle._set_state`."""
        d = self._physics.data
        ori = self._group(obs, "orientations").reshape(-1, 2)
        pitch = np.concatenate([[0.0], np.arctan2(ori[:, 1], ori[:, 0])])  # by body id; world = 0
        d.qpos[0] = self._group(obs, "height")[0] - self._torso_z0
        d.qpos[1] = 0.0
        for adr, body, parent, sign, centre in self._hinges:
            d.qpos[adr] = _wrap(sign * (pitch[body] - pitch[parent]), centre)
        d.qvel[:] = self._group(obs, "velocity")


class DMCReacherOracle(DMCOracle):
    """dm_control reacher (shimmy): flat obs = ``concat(position, to_target, velocity)`` (2 + 2 + 2).

    ``position`` / ``velocity`` are ``qpos`` / ``qvel`` (shoulder, wrist). The target is not in
    the physics state but in the model (the ``target`` geom's position, drawn per episode); it is
    ``to_target`` plus the finger's position, which forward kinematics of ``qpos`` gives. The
    target's radius (easy / hard) is the task's, set when the oracle's env is reset.
    """

    domain = "reacher"

    def _check_layout(self, shapes: Mapping[str, Tuple[int, ...]]) -> None:
        """See :meth:`DMCOracle._check_layout`: ``position`` / ``velocity`` = ``qpos`` / ``qvel``, xy ``to_target``."""
        m = self._physics.model
        if dict(shapes) != {"position": (m.nq,), "to_target": (2,), "velocity": (m.nv,)}:
            raise ValueError(f"{self.env_id}: unexpected reacher observation {dict(shapes)}")
        mj = self._mujoco
        self._target = mj.mj_name2id(m.ptr, mj.mjtObj.mjOBJ_GEOM, "target")
        self._finger = mj.mj_name2id(m.ptr, mj.mjtObj.mjOBJ_GEOM, "finger")
        if self._target < 0 or self._finger < 0 or m.geom_bodyid[self._target] != 0:
            raise ValueError(f"{self.env_id}: expected a world 'target' geom and a 'finger' geom")

    def _set_state(self, obs: np.ndarray) -> None:
        """See :meth:`DMCOracle._set_state`."""
        p = self._physics
        p.data.qpos[:] = self._group(obs, "position")
        p.data.qvel[:] = self._group(obs, "velocity")
        self._mujoco.mj_kinematics(p.model.ptr, p.data.ptr)
        p.model.geom_pos[self._target, :2] = self._group(obs, "to_target") + p.data.geom_xpos[self._finger, :2]


_DMC_ORACLES = {cls.domain: cls for cls in (DMCCheetahOracle, DMCWalkerOracle, DMCReacherOracle)}


def make_oracle(env_id: str) -> SimulatorOracle:
    """A :class:`SimulatorOracle` for ``env_id``.

    Args:
        env_id: any form :func:`synther_buffer.envs.resolve_env_id` takes, e.g. ``"HalfCheetah-v5"``,
            ``"cheetah-run"``, ``"dm_control/cheetah-run-v0"``, ``"walker-walk"`` or ``"reacher-hard"``.
            DMC ids route by domain (cheetah, walker, reacher), so every task of those domains is
            replayed with its own reward.

    Returns:
        The oracle; close it (or use it as a context manager) when done.

    Raises:
        ValueError: the environment's observation does not determine the physics state (supported:
            :data:`SUPPORTED_ENVS`), or the id is unknown.
        MissingExtraError: the ``envs`` extra is not installed.
    """
    from .envs import resolve_env_id  # needs gymnasium: a MissingExtraError naming the extra otherwise

    resolved = resolve_env_id(env_id)
    name = resolved.rsplit("/", 1)[-1]
    if resolved.startswith("dm_control/"):
        domain = name.split("-", 1)[0]
        if domain in _DMC_ORACLES:
            return _DMC_ORACLES[domain](resolved)
    if name in ("HalfCheetah-v5", "HalfCheetah-v4"):
        return HalfCheetahOracle(resolved)
    raise ValueError(f"fidelity scoring is not available for {env_id!r} ({resolved}): its observation does not "
                     f"determine the simulator state; supported: {', '.join(SUPPORTED_ENVS)}")


def _as_rows_dict(rows: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """The transition keys of ``rows`` as float64 arrays of matching length ([N, d] or [N])."""
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


def safe_std(x: np.ndarray) -> np.ndarray:
    """Per-column std of ``x`` (axis 0), with 1.0 where it is below 1e-8 (constant columns)."""
    s = np.asarray(x, dtype=np.float64).std(axis=0)
    return np.where(s > 1e-8, s, 1.0)


def score_transitions(env_id: str, rows: Mapping[str, Any], *, reference: Optional[Mapping[str, Any]] = None,
                      obs_std: Optional[np.ndarray] = None, reward_std: Optional[float] = None,
                      max_rows: Optional[int] = 10_000, seed: int = 0, action_repeat: int = 1,
                      oracle: Optional[SimulatorOracle] = None) -> Dict[str, Any]:
    """Replay transitions in the simulator and measure how wrong their next states and rewards are.

    Args:
        env_id: ``"HalfCheetah-v5"``, ``"cheetah-run"`` / ``"dm_control/cheetah-run-v0"``,
            ``"walker-walk"``, ``"reacher-hard"`` (see :func:`make_oracle`).
        rows: ``observations`` [N, obs_dim], ``actions`` [N, act_dim], ``rewards`` [N] (or [N, 1]),
            ``next_observations`` [N, obs_dim] and optionally ``terminals``, e.g. a synthetic dataset
            from ``synther upsample``.
        reference: real transitions (same keys) whose ``next_observations`` / ``rewards`` std
            normalises the errors. Without it (and without ``obs_std`` / ``reward_std``) the scored
            rows' own std is used (``"normalization": "self"`` in the result).
        obs_std: explicit per-dimension normaliser of the observation errors (wins over ``reference``).
        reward_std: explicit normaliser of the reward errors (wins over ``reference``).
        max_rows: score a random subset of at most this many rows (None: all); replaying costs tens
            of microseconds per row.
        seed: picks that subset.
        action_repeat: simulator steps per transition (rewards summed), as in ``make_env``.
        oracle: reuse an existing :class:`SimulatorOracle` (it is not closed).

    Returns:
        A JSON-friendly dict: ``dynamics_mse`` (mean over scored rows and observation dims of
        ((sim_next - next) / std)^2), its standard error over rows ``dynamics_mse_se``,
        ``dynamics_mse_median`` (median over rows of the per-row mean), ``dynamics_mse_<group>``
        (position / velocity columns), ``reward_mse`` (((sim_r - r) / reward_std)^2, mean),
        ``reward_mse_se``, ``reward_mse_median``, the unnormalised ``dynamics_mse_raw`` /
        ``reward_mse_raw``, ``per_dim_dynamics_mse``, ``n_rows``, ``n_scored``, ``n_nonfinite``
        (rows skipped because the row or the simulator's result was not finite),
        ``action_clip_fraction`` (fraction of action entries outside the bounds, clipped before
        replay), ``terminal_rate`` (if ``rows`` has terminals; these envs never terminate),
        ``normalization`` (``"given"``, ``"reference"`` or ``"self"``), ``env_id`` and ``seconds``.

    Raises:
        ValueError: missing keys, rows of different lengths, no rows, widths that do not match the
            environment, or an unsupported environment.
        MissingExtraError: the ``envs`` extra is not installed.
    """
    t0 = time.perf_counter()
    d = _as_rows_dict(rows)
    n_rows = d["observations"].shape[0]
    if n_rows < 1:
        raise ValueError("rows_dict has no transitions")
    idx = np.arange(n_rows)
    if max_rows is not None and n_rows > max_rows:
        idx = np.sort(np.random.default_rng(seed).choice(n_rows, size=int(max_rows), replace=False))
    obs, act = d["observations"][idx], d["actions"][idx]
    nxt, rew = d["next_observations"][idx], d["rewards"][idx]
    own = oracle is None
    orc = make_oracle(env_id) if own else oracle
    try:
        if d["observations"].shape[1] != orc.obs_dim or d["actions"].shape[1] != orc.action_dim:
            raise ValueError(f"{env_id}: rows have obs/action widths {d['observations'].shape[1]}/"
                             f"{d['actions'].shape[1]}, the environment has {orc.obs_dim}/{orc.action_dim}")
        sim_next, sim_rew, clip_frac = _replay(orc, obs, act, nxt, rew, int(action_repeat))
        groups = dict(orc.dim_groups)
    finally:
        if own:
            orc.close()
    ok = np.isfinite(sim_next).all(1) & np.isfinite(sim_rew)   # rows not replayed stay NaN
    s_std, r_std, norm = _error_scales(nxt[ok] if ok.any() else nxt, rew[ok] if ok.any() else rew,
                                       reference, obs_std, reward_std)
    out: Dict[str, Any] = {"env_id": env_id, "n_rows": int(n_rows), "n_scored": int(ok.sum()),
                           "n_nonfinite": int((~ok).sum()), "action_clip_fraction": clip_frac,
                           "normalization": norm}
    if ok.any():
        out.update(_replay_errors(sim_next[ok] - nxt[ok], sim_rew[ok] - rew[ok], s_std, r_std, groups))
    else:
        out.update({"dynamics_mse": float("nan"), "reward_mse": float("nan")})
    if "terminals" in d:
        out["terminal_rate"] = float(np.mean(d["terminals"][idx] > 0.5))
    out["seconds"] = time.perf_counter() - t0
    return out


def _replay(orc: "SimulatorOracle", obs: np.ndarray, act: np.ndarray, nxt: np.ndarray, rew: np.ndarray,
            action_repeat: int) -> Tuple[np.ndarray, np.ndarray, float]:
    """The simulator's next observation and reward for each row (NaN where the row is not finite), and
    the fraction of action entries outside the bounds (clipped before the replay)."""
    clipped = np.clip(act, orc.action_low, orc.action_high)
    clip_frac = float(np.mean(np.abs(clipped - act) > 1e-7)) if act.size else 0.0
    sim_next = np.full_like(nxt, np.nan)
    sim_rew = np.full(len(obs), np.nan)
    row_ok = np.isfinite(obs).all(1) & np.isfinite(clipped).all(1) & np.isfinite(nxt).all(1) & np.isfinite(rew)
    for i in np.flatnonzero(row_ok):
        o, r_sum = obs[i], 0.0
        for _ in range(action_repeat):
            o, r = orc.step(o, clipped[i])
            r_sum += r
        sim_next[i], sim_rew[i] = o, r_sum
    return sim_next, sim_rew, clip_frac


def _error_scales(nxt: np.ndarray, rew: np.ndarray, reference: Optional[Mapping[str, Any]],
                  obs_std: Optional[np.ndarray], reward_std: Optional[float]) -> Tuple[np.ndarray, float, str]:
    """The per-dimension observation std and the reward std the errors are divided by, and where the
    observation one came from: ``"given"``, ``"reference"`` (real rows) or ``"self"`` (the scored rows)."""
    if obs_std is not None:
        s_std, norm = np.asarray(obs_std, dtype=np.float64).reshape(-1), "given"
    elif reference is not None:
        s_std, norm = safe_std(_as_rows_dict(reference)["next_observations"]), "reference"
    else:
        s_std, norm = safe_std(nxt), "self"
    if reward_std is not None:
        r_std = float(reward_std)
    elif reference is not None:
        r_std = float(safe_std(_as_rows_dict(reference)["rewards"]))
    else:
        r_std = float(safe_std(rew))
    return s_std, r_std, norm


def _replay_errors(e_raw: np.ndarray, r_raw: np.ndarray, s_std: np.ndarray, r_std: float,
                   groups: Mapping[str, slice]) -> Dict[str, Any]:
    """Dynamics and reward MSE (normalised and raw) with standard errors, medians and per-dimension
    errors, from the replayed rows' errors ``e_raw`` [n, obs_dim] and ``r_raw`` [n]."""
    e = e_raw / s_std
    row_mse = np.mean(e ** 2, axis=1)
    r_err = (r_raw / r_std) ** 2
    return {
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
    }
