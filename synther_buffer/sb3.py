"""GenerativeReplayBuffer: SynthER as a stable-baselines3 ReplayBuffer (one argument to SAC/TD3).

    SAC("MlpPolicy", env, train_freq=1, gradient_steps=20,                 # UTD = 20
        replay_buffer_class=GenerativeReplayBuffer,
        replay_buffer_kwargs=dict(config=SynthERConfig.preset("paper")))

Real transitions live in SB3's own storage ([buffer_size, n_envs, ...]); the diffusion model, the
retrain schedule, the synthetic pool and the batch split live in a ``synther_buffer.mixing.MixingCore``.
Pass ``SynthERLogCallback()`` to ``learn`` to see the diffusion metrics in SB3's logger (TensorBoard included).
Works under every SB3 off-policy algorithm with Box actions (SAC, TD3, DDPG) and sb3-contrib's (TQC,
CrossQ); n-step returns as SB3's ``NStepReplayBuffer`` (``n_steps``, ``gamma``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from .extras import require

require("stable_baselines3", "sb3", "synther_buffer.sb3 (GenerativeReplayBuffer)")  # brings gymnasium too
from gymnasium import spaces
from stable_baselines3.common.buffers import NStepReplayBuffer, ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.vec_env import VecNormalize

from .config import SynthERConfig
from .layout import _positive_int
from .mixing import MixingCore, UsesMixingCore

log = logging.getLogger(__name__)

SB3_ACTION_BOUNDS = (-1.0, 1.0)   # where SB3's off-policy algorithms store Box actions (policy.scale_action)
HER_KWARGS = ("n_sampled_goal", "goal_selection_strategy", "copy_info_dict", "env")
GOAL_KEYS = ("achieved_goal", "desired_goal")
HER_UNSUPPORTED = (
    "GenerativeReplayBuffer does not compose with HerReplayBuffer: HER relabels goals at sampling time "
    "from the stored episodes (a future achieved goal of the same episode), and synthetic transitions "
    "belong to no episode, so only the real half of each batch could be relabelled and the synthetic "
    "half would silently train on unrelabelled goals. Use HerReplayBuffer without SynthER; flattening "
    "a goal-conditioned observation (FlattenObservation) into this buffer trains without any goal relabelling.")


class GenerativeReplayBuffer(UsesMixingCore, ReplayBuffer):
    """A stable-baselines3 ``ReplayBuffer`` whose batches mix real and SynthER-generated transitions.

    Args:
        buffer_size: max number of real transitions (split across ``n_envs`` as in SB3).
        observation_space: a flat ``Box`` (Dict spaces: flatten first, e.g. ``synther_buffer.envs.make_env``).
        action_space: a ``Box``.
        device: where sampled tensors go (SB3 passes the policy's device).
        n_envs: number of parallel envs.
        optimize_memory_usage: SB3's memory-saving variant (obs and next_obs share one array).
        handle_timeout_termination: time-limit truncations are not terminals (SB3 default True).
        config: ``SynthERConfig``; None (default) means ``SynthERConfig.for_device(device)``: the
            ``paper`` preset where the policy is on CUDA, ``fast`` on CPU (logged once).
            ``retrain_every`` counts transitions added (a vector step adds ``n_envs``), like SB3's
            ``num_timesteps``.
        model_terminals: model the terminal flag. ``"auto"`` (default): decided at the first
            retrain, True iff a real terminal (not a timeout) has been stored by then.
        action_bounds: ``(low, high)`` (scalars or ``action_dim`` values each) that synthetic
            actions are clipped to; default ``(-1, 1)``, where SB3's off-policy algorithms store Box
            actions (rescaled by ``policy.scale_action``, whatever the env's bounds). A loop that
            stores env-scale actions in this class (CleanRL) passes
            ``(env.action_space.low, env.action_space.high)``; None: no clipping. Each retrain warns
            when real actions lie outside these bounds.
        n_steps: n-step returns for the real rows, exactly as SB3's ``NStepReplayBuffer``: the
            discounted sum of up to ``n_steps`` rewards (cut at a terminal or timeout), the
            ``next_observations`` / ``dones`` of the last step, and ``discounts = gamma ** k`` for
            the ``k`` steps summed. Synthetic rows are 1-step transitions with ``discounts =
            gamma``. 1 (default): plain 1-step batches with ``discounts`` None, as SB3's
            ``ReplayBuffer``. Not with ``optimize_memory_usage``.
        gamma: the discount of the n-step returns; pass the algorithm's ``gamma`` (SB3 does the
            same for its own n-step buffer). Unused when ``n_steps`` is 1.

    Raises:
        ValueError: a Dict / non-flat observation space (a goal-conditioned one is named as HER's),
            a non-Box action space, HerReplayBuffer's arguments, or a bad ``config`` /
            ``model_terminals`` / ``action_bounds`` / ``n_steps`` / ``gamma``.
        TypeError: another unexpected keyword argument.

    HerReplayBuffer does not compose with this buffer (HER relabels goals from stored episodes and
    synthetic transitions belong to none): its arguments, or a goal-conditioned Dict observation
    space, raise a ``ValueError`` saying so; Dict observation spaces are not flattened here.
    Batches hold ``floor(real_ratio * B + 0.5)`` real rows first, then synthetic rows (all real
    before the first retrain). VecNormalize (``env`` argument of ``sample``) is applied to both.
    Real transitions stay in SB3's arrays; the SynthER half is a ``synther_buffer.mixing.MixingCore``
    (``self.core``). Pickling (``save_replay_buffer``) keeps the real data, the diffusion weights,
    the normaliser, the synthetic pool and the schedule counters; they load back onto this
    buffer's config device.
    """

    def __init__(self, buffer_size: int, observation_space: spaces.Space, action_space: spaces.Space,
                 device: Union[torch.device, str] = "auto", n_envs: int = 1,
                 optimize_memory_usage: bool = False, handle_timeout_termination: bool = True,
                 config: Optional[SynthERConfig] = None, model_terminals: Union[bool, str] = "auto",
                 action_bounds: Optional[tuple] = SB3_ACTION_BOUNDS, n_steps: int = 1, gamma: float = 0.99,
                 **unexpected: Any):
        _reject_her(observation_space, unexpected)
        self.n_steps, self.gamma = _n_step_settings(n_steps, gamma, optimize_memory_usage)
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
            raise ValueError(
                f"GenerativeReplayBuffer needs a flat Box observation space, got {observation_space}. "
                "Flatten Dict observations first: gymnasium.wrappers.FlattenObservation, or "
                "synther_buffer.envs.make_env(env_id) which returns flat float32 observations.")
        if not isinstance(action_space, spaces.Box):
            raise ValueError(f"GenerativeReplayBuffer needs a Box action space, got {action_space}")
        super().__init__(buffer_size, observation_space, action_space, device, n_envs=n_envs,
                         optimize_memory_usage=optimize_memory_usage,
                         handle_timeout_termination=handle_timeout_termination)
        self.obs_size = int(observation_space.shape[0])
        self.core = MixingCore(self.obs_size, self.action_dim, config, model_terminals, device=str(self.device),
                               capacity=self.buffer_size * self.n_envs, action_bounds=action_bounds)

    # ------------------------------------------------------------------ adding
    def add(self, obs: np.ndarray, next_obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
            done: np.ndarray, infos: List[Dict[str, Any]]) -> None:
        """SB3's add (one vector step: ``n_envs`` transitions), then retrain when due.

        The order is SB3's, ``(obs, next_obs, action, reward, done, infos)``, not ``GenerativeReplay``'s.

        Raises:
            ValueError: a field whose size is not ``n_envs`` times its width (named; SB3 itself would
                fail in a reshape or store it wrongly).
        """
        self._check_sizes(obs, next_obs, action, reward, done)
        super().add(obs, next_obs, action, reward, done, infos)
        if self.core.step(self.n_envs, self.size() * self.n_envs):
            self.retrain()

    def _check_sizes(self, obs, next_obs, action, reward, done) -> None:
        widths = {"obs": self.obs_size, "next_obs": self.obs_size, "action": self.action_dim, "reward": 1, "done": 1}
        # np.shape, not np.size: a torch tensor's .size is a method
        sizes = {name: int(np.prod(np.shape(v))) for name, v in zip(widths, (obs, next_obs, action, reward, done))}
        for name, width in widths.items():
            if sizes[name] != self.n_envs * width:
                ours = (sizes["next_obs"], sizes["action"], sizes["reward"]) == (
                    self.n_envs * self.action_dim, self.n_envs, self.n_envs * self.obs_size)
                hint = ("; the arguments look like GenerativeReplay's order (obs, action, reward, next_obs, "
                        "terminated): this buffer takes SB3's add(obs, next_obs, action, reward, done, infos)"
                        if ours else "")
                raise ValueError(f"{name} has {sizes[name]} values, expected n_envs * {width} = "
                                 f"{self.n_envs * width} (obs_dim={self.obs_size}, action_dim={self.action_dim})"
                                 f"{hint}")

    def real_rows(self) -> np.ndarray:
        """All stored real transitions as rows concat(obs, action, reward, next_obs, terminal) [N, D].

        The terminal is ``done * (1 - timeout)`` (truncations are not terminals).
        """
        upper = self.buffer_size if self.full else self.pos
        idx = np.arange(upper)
        if self.optimize_memory_usage and self.full:
            idx = idx[idx != self.pos]  # SB3 never samples it: its next_obs slot was overwritten
        obs = self.observations[idx]
        if self.optimize_memory_usage:
            next_obs = self.observations[(idx + 1) % self.buffer_size]
        else:
            next_obs = self.next_observations[idx]
        term = self.dones[idx] * (1 - self.timeouts[idx])
        flat = lambda a: a.reshape(len(idx) * self.n_envs, -1)  # noqa: E731
        return self.store_layout.join(flat(obs), flat(self.actions[idx]), flat(self.rewards[idx]), flat(next_obs),
                                      flat(term))

    def retrain(self) -> bool:
        """Retrain the diffusion model on all real data now and regenerate the pool. True on success.

        The new pool's observations and next observations are clipped to the observation space's
        finite bounds (``stats()["num_obs_clipped"]`` counts the rows clipped).

        Raises:
            RuntimeError: fewer than 2 real transitions, or a background retrain is running.
        """
        # read from the space at each retrain, so a buffer unpickled from an older file gets them too
        self.core.pool.set_obs_bounds(self.observation_space.low, self.observation_space.high)
        return self.core.retrain(self.real_rows())

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, env: Optional[VecNormalize] = None) -> ReplayBufferSamples:
        """``floor(real_ratio * B + 0.5)`` real transitions (SB3's sampling) then synthetic ones.

        With ``n_steps > 1`` the real rows are n-step transitions (``NStepReplayBuffer``) and every
        row carries ``discounts`` [B, 1] (``gamma`` for the synthetic ones); else ``discounts`` is None.
        """
        n_real, n_syn = self.core.split(batch_size)
        real = super().sample(n_real, env=env) if n_real else None
        if not n_syn:
            return real
        syn = self._synthetic_samples(n_syn, env)
        if real is None:
            return syn
        return ReplayBufferSamples(*(None if r is None else torch.cat([r, s], dim=0) for r, s in zip(real, syn)))

    def _get_samples(self, batch_inds: np.ndarray, env: Optional[VecNormalize] = None) -> ReplayBufferSamples:
        """SB3's real-row gathering: ``NStepReplayBuffer``'s own with ``n_steps > 1``, else ``ReplayBuffer``'s."""
        if self.n_steps > 1:
            return NStepReplayBuffer._get_samples(self, batch_inds, env)
        return super()._get_samples(batch_inds, env)

    def _synthetic_samples(self, n: int, env: Optional[VecNormalize]) -> ReplayBufferSamples:
        obs, action, reward, next_obs, terminated = self.store_layout.split(self.core.synthetic_rows(n))
        reward, terminated = reward.reshape(-1, 1), terminated.reshape(-1, 1)
        if env is not None:  # VecNormalize works on numpy, as in SB3's own _get_samples
            obs = self.to_torch(self._normalize_obs(obs.cpu().numpy(), env))
            next_obs = self.to_torch(self._normalize_obs(next_obs.cpu().numpy(), env))
            reward = self.to_torch(self._normalize_reward(reward.cpu().numpy(), env))
        dev = self.device
        discounts = torch.full((n, 1), self.gamma, dtype=torch.float32, device=dev) if self.n_steps > 1 else None
        return ReplayBufferSamples(obs.to(dev), action.to(dev), next_obs.to(dev), terminated.to(dev),
                                   reward.to(dev), discounts)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> Dict[str, float]:
        """env_steps, num_real, num_synthetic, retrain_count, last_train_loss, last_fit_seconds,
        last_generate_seconds, real_ratio (and failed_retrains, num_filtered, num_obs_clipped, next_retrain)."""
        return self.core.stats(num_real=self.size() * self.n_envs)

    # ------------------------------------------------------------------ pickling
    def __setstate__(self, state: dict) -> None:
        """Unpickle (``load_replay_buffer``). A buffer pickled by version 0.1.0 kept its pool and
        config as attributes; it is rebuilt around a ``MixingCore`` holding that pool. Pickles made
        before ``n_steps`` existed load as 1-step buffers."""
        state.setdefault("n_steps", 1)
        state.setdefault("gamma", 0.99)
        if "core" not in state:
            pool = state.pop("pool")
            core = MixingCore(pool.layout.obs_dim, pool.layout.action_dim, state.pop("config"),
                              state.pop("model_terminals"), capacity=state["buffer_size"] * state["n_envs"])
            pool.min_real, core.pool = core.min_real, pool
            state["core"] = core
        self.__dict__.update(state)

    # ------------------------------------------------------------------ weights-only files
    SYNTHER_FILES_VERSION = 1   # of the files save_synther writes

    def _real_arrays(self) -> Dict[str, np.ndarray]:
        """SB3's arrays of the real transitions (``next_observations`` unless ``optimize_memory_usage``)."""
        names = ["observations", "actions", "rewards", "dones", "timeouts"]
        if not self.optimize_memory_usage:
            names.insert(1, "next_observations")
        return {name: getattr(self, name) for name in names}

    def save_synther(self, path: Union[str, "os.PathLike"]) -> None:
        """Write the buffer to directory ``path`` as files that load with ``torch.load(weights_only=True)``.

        The SynthER state (config, diffusion model, normaliser, synthetic pool, schedule counters,
        bounds: what ``GenerativeReplay.save`` holds) goes to ``state.pt``, SB3's arrays of the real
        transitions with ``pos`` / ``full`` to ``real.pt``, swapped in whole
        (``synther_buffer.checkpoint.write_weights_only``). Unlike SB3's ``save_replay_buffer``, a
        pickle that runs code on load, :meth:`load_synther` runs none. Waits for an in-flight
        background retrain first.

        Args:
            path: the directory (created; a previous save there is replaced atomically).

        Raises:
            FileExistsError: ``path`` holds files other than an earlier save's (nothing is deleted).
        """
        from .checkpoint import write_weights_only

        state = {"version": self.SYNTHER_FILES_VERSION, "kind": "GenerativeReplayBuffer", "obs_dim": self.obs_size,
                 "action_dim": self.action_dim, "buffer_size": self.buffer_size, "n_envs": self.n_envs,
                 "optimize_memory_usage": self.optimize_memory_usage, "model_terminals": self.model_terminals,
                 "config": self.config.to_dict(), **self.core.state_dict()}
        real = {"pos": int(self.pos), "full": bool(self.full),
                **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self._real_arrays().items()}}
        write_weights_only(path, {"state.pt": state, "real.pt": real})

    def load_synther(self, path: Union[str, "os.PathLike"], device: Optional[str] = None) -> None:
        """Restore what :meth:`save_synther` wrote into this buffer, through ``torch.load(weights_only=True)``.

        The buffer must have the saved spaces' widths, ``buffer_size``, ``n_envs`` and
        ``optimize_memory_usage`` (build the agent as before, then load). Its SynthER half (config,
        model, pool, schedule) becomes the saved one; nothing changes if loading fails.

        Args:
            path: the directory (``path.old`` after a kill between the save's renames).
            device: put the diffusion model and pool there instead of the saved config's device (a
                CUDA checkpoint loads on the CPU, with a warning, where CUDA is missing).

        Raises:
            FileNotFoundError: no checkpoint at ``path``.
            ValueError: a file that is not weights-only (code-carrying), truncated or foreign, or a
                checkpoint of another buffer shape (named).
        """
        from .checkpoint import read_weights_only
        from .diffusion import available_device

        what = "GenerativeReplayBuffer SynthER checkpoint"
        d, files = read_weights_only(path, ("state.pt", "real.pt"), what)
        state, real = files["state.pt"], files["real.pt"]
        if not isinstance(state, dict) or state.get("kind") != "GenerativeReplayBuffer" \
                or state.get("version") != self.SYNTHER_FILES_VERSION or not isinstance(real, dict):
            raise ValueError(f"{d} is not a {what} of version {self.SYNTHER_FILES_VERSION}")
        try:
            saved = {k: state[k] for k in ("obs_dim", "action_dim", "buffer_size", "n_envs", "optimize_memory_usage")}
            ours = {"obs_dim": self.obs_size, "action_dim": self.action_dim, "buffer_size": self.buffer_size,
                    "n_envs": self.n_envs, "optimize_memory_usage": self.optimize_memory_usage}
            if saved != ours:
                diff = ", ".join(f"{k} {saved[k]!r} (this buffer: {ours[k]!r})" for k in ours if saved[k] != ours[k])
                raise ValueError(f"saved from another buffer: {diff}")
            cfg = SynthERConfig.from_dict(state["config"])
            cfg = cfg.replace(device=available_device(cfg.device, what) if device is None else device)
            core = MixingCore(self.obs_size, self.action_dim, cfg, state["model_terminals"],
                              capacity=self.buffer_size * self.n_envs, log_fn=self.core.pool.log_fn)
            core.load_state_dict(state["pool"], state.get("terminal_column"))
            arrays = {}
            for name, ours_arr in self._real_arrays().items():
                arr = real[name].numpy()
                if arr.shape != ours_arr.shape:
                    raise ValueError(f"{name} has shape {arr.shape}, this buffer {ours_arr.shape}")
                arrays[name] = arr
            pos, full = int(real["pos"]), bool(real["full"])
            if not 0 <= pos < self.buffer_size:
                raise ValueError(f"pos {pos} outside [0, {self.buffer_size})")
        except (KeyError, TypeError, IndexError, AttributeError, RuntimeError, ValueError) as e:
            raise ValueError(f"cannot load {what} {d}: {type(e).__name__}: {e}") from None
        for name, arr in arrays.items():
            getattr(self, name)[...] = arr
        self.pos, self.full, self.core = pos, full, core


def _reject_her(observation_space: spaces.Space, unexpected: Dict[str, Any]) -> None:
    """Raise for HerReplayBuffer's arguments or a goal-conditioned Dict space (with why); TypeError for others."""
    her = sorted(set(unexpected) & set(HER_KWARGS))
    if her:
        raise ValueError(f"{HER_UNSUPPORTED} (got HerReplayBuffer's argument(s) {her})")
    if unexpected:
        raise TypeError(f"GenerativeReplayBuffer got unexpected keyword argument(s) {sorted(unexpected)}")
    if isinstance(observation_space, spaces.Dict) and set(GOAL_KEYS) <= set(observation_space.spaces):
        raise ValueError(f"{HER_UNSUPPORTED} (the observation space is goal-conditioned: {observation_space})")


def _n_step_settings(n_steps, gamma, optimize_memory_usage: bool) -> tuple:
    """``(n_steps, gamma)`` checked: a positive int, a discount in (0, 1], and no n-step with shared obs arrays."""
    n_steps = _positive_int("n_steps", n_steps)
    try:
        ok = 0.0 < float(gamma) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
    if n_steps > 1 and optimize_memory_usage:
        raise ValueError("n_steps > 1 does not work with optimize_memory_usage=True (nor does SB3's NStepReplayBuffer)")
    return int(n_steps), float(gamma)


class SynthERLogCallback(BaseCallback):
    """Sends SynthER metrics to SB3's logger (stdout / CSV / TensorBoard) and prints one line per retrain.

    Retrain metrics (``synther/diffusion_loss``, ``synther/fit_seconds``, ``synther/generate_seconds``,
    ``synther/num_synthetic``, ...) are recorded when a retrain happens; pool sizes at each rollout end.

    Args:
        verbose: 1 (default) prints a line when a new pool arrives (env step, loss, fit and generation
            seconds, pool size), so a run shows its retrains with no logging setup; 0 is silent.
    """

    def __init__(self, verbose: int = 1):
        super().__init__(verbose)
        self._retrains_seen = 0

    def _on_training_start(self) -> None:
        buf = self.model.replay_buffer
        if not isinstance(buf, GenerativeReplayBuffer):
            raise ValueError("SynthERLogCallback needs a model using GenerativeReplayBuffer")
        buf.pool.log_fn = self.logger.record
        self._retrains_seen = buf.stats()["retrain_count"]

    def _on_rollout_end(self) -> None:
        s = self.model.replay_buffer.stats()
        self.logger.record("synther/num_real", s["num_real"])
        self.logger.record("synther/num_synthetic", s["num_synthetic"])
        self.logger.record("synther/retrain_count", s["retrain_count"])
        for key in ("relevance_mean_real", "relevance_mean_synthetic"):   # relevance-guided pools only
            if key in s:
                self.logger.record(f"synther/{key}", s[key])
        if self.verbose >= 1 and s["retrain_count"] > self._retrains_seen:
            print(f"SynthER retrain {s['retrain_count']} (data up to env step {s['last_retrain_env_step']:,}): "
                  f"loss {s['last_train_loss']:.4f}, fit {s['last_fit_seconds']:.1f}s, "
                  f"generate {s['last_generate_seconds']:.1f}s, {s['num_synthetic']:,} synthetic rows", flush=True)
        self._retrains_seen = s["retrain_count"]

    def _on_step(self) -> bool:
        return True
