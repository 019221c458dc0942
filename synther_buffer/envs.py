"""Make RL environments with flat float32 observations and ``[-1, 1]`` actions.

One entry point, :func:`make_env`, builds both DeepMind Control Suite tasks (real dm_control with
MuJoCo physics, through shimmy) and gymnasium environments (MuJoCo ``HalfCheetah-v5`` etc.) behind
the same interface, so replay buffers and agents see one kind of environment:

* observations: a flat 1-D ``Box`` of dtype ``float32`` (DMC's ``Dict`` observations are flattened
  with gymnasium's ``FlattenObservation``, in the sorted key order that gymnasium uses);
* actions: a ``float32`` ``Box`` on ``[-1, 1]`` (rescaled to the env's own bounds and clipped);
* ``action_repeat``: each agent step repeats the action, summing rewards;
* a ``TimeLimit`` at ``raw_limit // action_repeat`` agent steps, so ``env.spec.max_episode_steps``
  is known for every env (shimmy's DMC specs leave it ``None``);
* the outermost wrapper, :class:`EnvInfo`, exposes ``can_terminate``, ``max_episode_steps``,
  ``env_id`` and ``action_repeat``, readable through any further wrappers with
  ``env.get_wrapper_attr("can_terminate")`` (and through SB3 with ``vec_env.get_attr(...)``).

Environment ids:

* DMC, shimmy form: ``"dm_control/cheetah-run-v0"``, ``"dm_control/finger-turn_hard-v0"``;
* DMC, short form ``"<domain>-<task>"``: ``"cheetah-run"``, ``"finger-turn_hard"`` or
  ``"finger-turn-hard"`` (dashes after the domain become underscores);
* any registered gymnasium id: ``"HalfCheetah-v5"``, ``"Walker2d-v5"``, ``"Pendulum-v1"``.

Dependencies: this module needs gymnasium (the ``envs`` or the ``sb3`` extra: classic-control ids
such as ``"Pendulum-v1"`` need nothing more). ``shimmy``, ``dm_control`` and ``imageio`` are
imported only when a dm_control id is requested and ``mujoco`` only for a gymnasium MuJoCo id (all
from the ``envs`` extra), ``stable_baselines3`` only inside :func:`make_vec_env`. A missing one
raises :class:`synther_buffer.extras.MissingExtraError` (an ``ImportError``) that names the extra.
"""

from __future__ import annotations

import functools
import math
import re
from typing import TYPE_CHECKING, Any, SupportsFloat

import numpy as np

from .extras import require
from .validation import positive_int

gym = require("gymnasium", "envs", "synther_buffer.envs")
from gymnasium import spaces  # noqa: E402
from gymnasium.wrappers import FlattenObservation, RescaleAction, TimeLimit  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from stable_baselines3.common.vec_env import VecEnv

__all__ = [
    "ActionRepeat",
    "EnvInfo",
    "Float32Action",
    "Float32Observation",
    "can_terminate",
    "make_env",
    "make_vec_env",
    "resolve_env_id",
]

DMC_PREFIX = "dm_control/"
"""Namespace under which shimmy registers dm_control environments in gymnasium."""

DMC_EPISODE_STEPS = 1000
"""Raw (control-step) episode length of the DMC suite tasks, and the fallback limit elsewhere."""

# Domains of the dm_control suite (shimmy's DM_CONTROL_SUITE_ENVS). Other dm_control ids are
# composer tasks (locomotion, manipulation), whose episodes can end early.
_DMC_SUITE_DOMAINS = frozenset(
    {
        "acrobot", "ball_in_cup", "cartpole", "cheetah", "dog", "finger", "fish", "hopper",
        "humanoid", "humanoid_CMU", "lqr", "manipulator", "pendulum", "point_mass", "quadruped",
        "reacher", "stacker", "swimmer", "walker",
    }
)  # fmt: skip
# The only suite domain whose task reports termination (state norm below a tolerance).
_DMC_TERMINATING_DOMAINS = frozenset({"lqr"})

# gymnasium environments (name without namespace and version) whose episodes never terminate,
# only truncate. Anything not listed here is treated as able to terminate (the safe default:
# modelling a terminal flag that is always 0 costs little, missing a real one biases bootstraps).
_GYM_NEVER_TERMINATE = frozenset(
    {"HalfCheetah", "Swimmer", "Reacher", "Pusher", "Pendulum", "HumanoidStandup"}
)

_EXAMPLE_IDS = (
    "dm_control/cheetah-run-v0",
    "cheetah-run",
    "walker-walk",
    "quadruped-walk",
    "finger-turn_hard",
    "HalfCheetah-v5",
    "Walker2d-v5",
    "Hopper-v5",
    "Pendulum-v1",
)

_VERSION_RE = re.compile(r"-v\d+$")
_DMC_SHORT_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)-([A-Za-z0-9_][A-Za-z0-9_-]*)$")
_DMC_FULL_RE = re.compile(r"^dm_control/([A-Za-z][A-Za-z0-9_]*)-([A-Za-z0-9_-]+)-v(\d+)$")


def _unknown_id(env_id: str) -> ValueError:
    examples = ", ".join(repr(e) for e in _EXAMPLE_IDS)
    return ValueError(
        f"unknown environment id {env_id!r}; expected a gymnasium id or a DMC task in the shimmy "
        f"form 'dm_control/<domain>-<task>-v0' or short form '<domain>-<task>', e.g. {examples}"
    )


def _register_shimmy() -> None:
    """Import shimmy so that gymnasium knows the ``dm_control/...`` ids.

    Unless the user chose a GL backend, ``MUJOCO_GL=disable``: physics needs no OpenGL, and
    dm_control's automatic choice prints GLFW/DISPLAY warnings on headless machines. Set
    ``MUJOCO_GL=egl`` (or ``osmesa``) before the first ``make_env`` to render DMC frames.
    """
    import os

    os.environ.setdefault("MUJOCO_GL", "disable")
    purpose = "DeepMind Control Suite environments"
    require("dm_control", "envs", purpose)
    require("imageio", "envs", purpose)  # shimmy's dm_control module imports it
    shimmy = require("shimmy", "envs", purpose)
    gym.register_envs(shimmy)


def _require_simulator(resolved_id: str) -> None:
    """Raise :class:`~synther_buffer.extras.MissingExtraError` if a gymnasium MuJoCo env lacks ``mujoco``.

    gymnasium registers its MuJoCo tasks whether or not MuJoCo is installed, and ``gymnasium.make``
    then fails with a hint to install ``gymnasium[mujoco]``; this names the extra of this package.

    Args:
        resolved_id: a registered gymnasium id.

    Raises:
        MissingExtraError: the id's entry point is a gymnasium MuJoCo env and ``mujoco`` is missing.
    """
    entry = gym.spec(resolved_id).entry_point
    if isinstance(entry, str) and entry.startswith("gymnasium.envs.mujoco"):
        require("mujoco", "envs", f"the MuJoCo environment {resolved_id!r}")


def _is_dmc_id(env_id: str) -> bool:
    """Whether ``env_id`` names a dm_control env (shimmy or short form), by its spelling only."""
    if env_id.startswith(DMC_PREFIX):
        return True
    return (
        "/" not in env_id
        and _VERSION_RE.search(env_id) is None
        and env_id not in gym.registry
        and _DMC_SHORT_RE.match(env_id) is not None
    )


def _dmc_candidates(env_id: str) -> list[str]:
    """Shimmy ids that a DMC id may mean, most literal first."""
    if env_id.startswith(DMC_PREFIX):
        out = [env_id]
        m = _DMC_FULL_RE.match(env_id)
        if m is not None:
            domain, task, version = m.groups()
            out.append(f"{DMC_PREFIX}{domain}-{task.replace('-', '_')}-v{version}")
        return out
    m = _DMC_SHORT_RE.match(env_id)
    if m is None:
        return []
    domain, task = m.groups()
    return [f"{DMC_PREFIX}{domain}-{task}-v0", f"{DMC_PREFIX}{domain}-{task.replace('-', '_')}-v0"]


def resolve_env_id(env_id: str) -> str:
    """Return the registered gymnasium id that ``env_id`` stands for.

    DMC short forms map to shimmy ids (``"cheetah-run"`` -> ``"dm_control/cheetah-run-v0"``,
    ``"finger-turn-hard"`` -> ``"dm_control/finger-turn_hard-v0"``); registered gymnasium ids come
    back unchanged. Imports shimmy (registering the dm_control ids) only for DMC ids.

    Raises:
        ValueError: if no registered environment matches.
        MissingExtraError: a DMC id without the ``envs`` extra installed (an ``ImportError``).
    """
    if not isinstance(env_id, str) or not env_id:
        raise _unknown_id(str(env_id))
    if env_id in gym.registry:
        return env_id
    if _is_dmc_id(env_id):
        _register_shimmy()
        for candidate in _dmc_candidates(env_id):
            if candidate in gym.registry:
                return candidate
    raise _unknown_id(env_id)


def _dmc_parts(resolved_id: str) -> tuple[str, str] | None:
    """``(domain, task)`` of a dm_control suite id, or None for composer / non-DMC ids."""
    m = _DMC_FULL_RE.match(resolved_id)
    if m is None or m.group(1) not in _DMC_SUITE_DOMAINS:
        return None
    return m.group(1), m.group(2)


def _can_terminate_resolved(resolved_id: str) -> bool:
    if resolved_id.startswith(DMC_PREFIX):
        parts = _dmc_parts(resolved_id)
        if parts is None:  # composer tasks (locomotion, manipulation) may end episodes early
            return True
        return parts[0] in _DMC_TERMINATING_DOMAINS
    name = _VERSION_RE.sub("", resolved_id.rsplit("/", 1)[-1])
    return name not in _GYM_NEVER_TERMINATE


def can_terminate(env_id: str) -> bool:
    """Whether episodes of ``env_id`` can end with ``terminated=True`` (not only truncation).

    DMC suite tasks never terminate (they truncate at 1000 steps), except the ``lqr`` domain;
    dm_control composer tasks (locomotion, manipulation) are assumed able to. Among gymnasium
    envs, HalfCheetah, Swimmer, Reacher, Pusher, HumanoidStandup and Pendulum never terminate;
    every other id (Hopper, Walker2d, Ant, Humanoid, InvertedPendulum, InvertedDoublePendulum,
    and unknown ones, conservatively) can.

    Raises:
        ValueError: if ``env_id`` names no registered environment.
    """
    return _can_terminate_resolved(resolve_env_id(env_id))


class ActionRepeat(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Repeat each action ``repeat`` times, summing the rewards.

    Stops early when the inner env reports ``terminated`` or ``truncated``; returns the last
    observation and info. The reward is always a Python ``float``.
    """

    def __init__(self, env: gym.Env, repeat: int):
        """Wrap ``env``, repeating every action ``repeat`` (>= 1) times."""
        _check_action_repeat(repeat)
        gym.utils.RecordConstructorArgs.__init__(self, repeat=repeat)
        gym.Wrapper.__init__(self, env)
        self.repeat = int(repeat)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Step the inner env up to ``repeat`` times with ``action``."""
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, bool(terminated), bool(truncated), info


def _to_float32_bounds(bound: np.ndarray) -> np.ndarray:
    """Cast Box bounds to float32 without overflow warnings (finite values saturate)."""
    f32 = np.finfo(np.float32)
    b = np.asarray(bound, dtype=np.float64)
    return np.where(np.isfinite(b), np.clip(b, f32.min, f32.max), b).astype(np.float32)


def _float32_box(inner: Any, wrapper: str, what: str) -> spaces.Box:
    """``inner`` (which must be a ``Box``) as a float32 ``Box`` of the same shape and bounds."""
    if not isinstance(inner, spaces.Box):
        raise ValueError(f"{wrapper} needs a Box {what} space, got {inner}")
    return spaces.Box(low=_to_float32_bounds(inner.low), high=_to_float32_bounds(inner.high), shape=inner.shape,
                      dtype=np.float32)


class Float32Observation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Cast a ``Box`` observation (and its space) to ``float32``."""

    def __init__(self, env: gym.Env):
        """Wrap ``env``, whose observation space must be a ``Box``."""
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        self.observation_space = _float32_box(env.observation_space, "Float32Observation", "observation")

    def observation(self, observation: Any) -> np.ndarray:
        """Return ``observation`` as a float32 array."""
        return np.asarray(observation, dtype=np.float32)


class Float32Action(gym.ActionWrapper, gym.utils.RecordConstructorArgs):
    """Present the inner ``Box`` action space as ``float32``; clip actions to its bounds.

    Actions are converted to the inner space's dtype and clipped to its ``[low, high]`` before
    they are passed on.
    """

    def __init__(self, env: gym.Env):
        """Wrap ``env``, whose action space must be a bounded ``Box``."""
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ActionWrapper.__init__(self, env)
        self.action_space = _float32_box(env.action_space, "Float32Action", "action")
        inner = env.action_space
        self._low, self._high, self._inner_dtype = inner.low, inner.high, inner.dtype

    def action(self, action: Any) -> np.ndarray:
        """Cast ``action`` to the inner dtype and clip it to the inner bounds."""
        a = np.asarray(action, dtype=self._inner_dtype).reshape(self._low.shape)
        return np.clip(a, self._low, self._high)


class EnvInfo(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Outermost wrapper of :func:`make_env`: metadata for replay buffers, and first-reset seeding.

    Attributes (read them through other wrappers with ``env.get_wrapper_attr(name)``):
        can_terminate: whether episodes can end with ``terminated=True``
            (see :func:`can_terminate`).
        max_episode_steps: agent steps (after action repeat) before truncation.
        env_id: the resolved gymnasium id, e.g. ``"dm_control/cheetah-run-v0"``.
        action_repeat: how many env steps each agent step takes.

    If ``seed`` is given, the action and observation spaces are seeded with it at construction and
    the first ``reset()`` called without a seed uses it; later resets continue the env's RNG. An
    explicit ``reset(seed=...)`` always wins (and cancels the pending seed).
    """

    def __init__(
        self,
        env: gym.Env,
        env_id: str,
        can_terminate: bool,
        max_episode_steps: int,
        action_repeat: int = 1,
        seed: int | None = None,
    ):
        """Wrap ``env`` and record its metadata; see the class docstring."""
        gym.utils.RecordConstructorArgs.__init__(
            self,
            env_id=env_id,
            can_terminate=can_terminate,
            max_episode_steps=max_episode_steps,
            action_repeat=action_repeat,
            seed=seed,
        )
        gym.Wrapper.__init__(self, env)
        self.env_id = env_id
        self.can_terminate = bool(can_terminate)
        self.max_episode_steps = int(max_episode_steps)
        self.action_repeat = int(action_repeat)
        self._pending_seed = seed
        if seed is not None:
            self.action_space.seed(seed)
            self.observation_space.seed(seed)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Reset, using the construction seed on the first reset if none is passed."""
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step the inner env (unchanged)."""
        return self.env.step(action)


def _check_action_repeat(action_repeat: Any) -> None:
    positive_int("action_repeat", action_repeat)


def _dmc_raw_limit(env: gym.Env) -> int:
    """Raw episode length of a shimmy dm_control env (1000 where its own limit is infinite)."""
    dm_env = getattr(env.unwrapped, "_env", None)
    limit = getattr(dm_env, "_step_limit", None)  # control.Environment (suite)
    if limit is None and dm_env is not None:  # composer.Environment
        time_limit = getattr(dm_env, "_time_limit", None)
        try:
            limit = time_limit / dm_env.control_timestep() if time_limit is not None else None
        except Exception:  # pragma: no cover - defensive, unusual env
            limit = None
    if limit is None or not math.isfinite(limit):
        return DMC_EPISODE_STEPS
    # dm_control ends the episode once step_count >= limit (a float such as 1000.0000000001).
    return max(1, math.ceil(limit - 1e-6))


def make_env(
    env_id: str,
    seed: int | None = None,
    action_repeat: int = 1,
    render_mode: str | None = None,
) -> gym.Env:
    """Make an environment with flat float32 observations and float32 actions on ``[-1, 1]``.

    Args:
        env_id: ``"dm_control/<domain>-<task>-v0"``, short ``"<domain>-<task>"`` (DMC, via shimmy
            and real MuJoCo physics), or a gymnasium id such as ``"HalfCheetah-v5"``.
        seed: if given, seeds the action/observation spaces now and the first ``reset()``.
        action_repeat: env steps per agent step (rewards summed); the time limit becomes
            ``raw_limit // action_repeat`` (DMC raw limit 1000, gymnasium: the registered limit,
            1000 if none).
        render_mode: passed to ``gymnasium.make``.

    Returns:
        The wrapped env. Wrapper stack, inside out: ``gymnasium.make`` -> ``FlattenObservation``
        (unless already a 1-D Box) -> :class:`Float32Observation` (unless already float32) ->
        ``RescaleAction(-1, 1)`` (unless already on [-1, 1]) -> :class:`Float32Action` ->
        :class:`ActionRepeat` -> ``TimeLimit`` -> :class:`EnvInfo`. ``env.spec.max_episode_steps``
        and ``env.get_wrapper_attr("max_episode_steps")`` both give the agent-step limit; see
        :class:`EnvInfo` for the other attributes.

    Raises:
        ValueError: unknown ``env_id``, ``action_repeat`` not an integer >= 1 (or larger than the
            episode), or an action space that is not a bounded ``Box``.
        MissingExtraError: a DMC or MuJoCo id without the ``envs`` extra installed (an ``ImportError``).
    """
    _check_action_repeat(action_repeat)
    action_repeat = int(action_repeat)
    resolved = resolve_env_id(env_id)
    is_dmc = resolved.startswith(DMC_PREFIX)
    if not is_dmc:
        _require_simulator(resolved)

    env = gym.make(resolved, render_mode=render_mode)
    if is_dmc:
        raw_limit = _dmc_raw_limit(env)
    else:
        raw_limit = env.spec.max_episode_steps if env.spec is not None else None
        raw_limit = int(raw_limit) if raw_limit else DMC_EPISODE_STEPS
    max_steps = raw_limit // action_repeat
    if max_steps < 1:
        env.close()
        raise ValueError(
            f"action_repeat={action_repeat} exceeds the episode length {raw_limit} of {resolved!r}"
        )

    act = env.action_space
    if not isinstance(act, spaces.Box):
        env.close()
        raise ValueError(f"{resolved!r} has a non-Box action space {act}; only Box is supported")
    if not act.is_bounded("both"):
        env.close()
        raise ValueError(f"{resolved!r} has an unbounded action space {act}; cannot map to [-1, 1]")

    obs_space = env.observation_space
    if not (isinstance(obs_space, spaces.Box) and len(obs_space.shape) == 1):
        env = FlattenObservation(env)
    if env.observation_space.dtype != np.float32:
        env = Float32Observation(env)

    if not (np.all(act.low == -1.0) and np.all(act.high == 1.0)):
        env = RescaleAction(
            env, np.full(act.shape, -1.0, dtype=act.dtype), np.full(act.shape, 1.0, dtype=act.dtype)
        )
    env = Float32Action(env)
    env = ActionRepeat(env, action_repeat)
    env = TimeLimit(env, max_episode_steps=max_steps)
    return EnvInfo(
        env,
        env_id=resolved,
        can_terminate=_can_terminate_resolved(resolved),
        max_episode_steps=max_steps,
        action_repeat=action_repeat,
        seed=seed,
    )


def _make_monitored_env(env_id: str, seed: int | None, action_repeat: int) -> gym.Env:
    """Factory for :func:`make_vec_env` (module level so SubprocVecEnv can pickle it)."""
    Monitor = require("stable_baselines3.common.monitor", "sb3", "make_vec_env").Monitor
    return Monitor(make_env(env_id, seed=seed, action_repeat=action_repeat))


def make_vec_env(
    env_id: str,
    n_envs: int = 1,
    seed: int | None = 0,
    action_repeat: int = 1,
    subproc: bool = False,
) -> VecEnv:
    """Make a stable-baselines3 ``VecEnv`` of ``n_envs`` :func:`make_env` instances.

    Each env is wrapped in SB3's ``Monitor`` (episode return/length in ``info["episode"]``) and
    seeded with ``seed + i`` (unseeded if ``seed`` is None). ``subproc=True`` gives a
    ``SubprocVecEnv`` (one process per env), else a ``DummyVecEnv``. Metadata is readable with
    ``vec_env.get_attr("can_terminate")`` / ``"max_episode_steps"`` / ``"env_id"``.

    Raises:
        ValueError: ``n_envs < 1``, an unknown ``env_id`` or a bad ``action_repeat`` (checked
            here, before any worker process starts); a ``DummyVecEnv`` also raises whatever
            :func:`make_env` rejects.
        MissingExtraError: stable-baselines3 (the ``sb3`` extra) is not installed.
    """
    vec_env = require("stable_baselines3.common.vec_env", "sb3", "make_vec_env")
    positive_int("n_envs", n_envs)
    # Validate the id and action_repeat here, not inside a worker process.
    resolve_env_id(env_id)
    _check_action_repeat(action_repeat)
    fns = [
        functools.partial(
            _make_monitored_env,
            env_id,
            None if seed is None else int(seed) + i,
            int(action_repeat),
        )
        for i in range(int(n_envs))
    ]
    return vec_env.SubprocVecEnv(fns) if subproc else vec_env.DummyVecEnv(fns)
