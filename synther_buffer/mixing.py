"""MixingCore: the SynthER half of a replay buffer, shared by every buffer in the package.

A replay buffer that serves SynthER batches has two halves. The owner keeps the real transitions
(a ring buffer in ``GenerativeReplay``, the user's own buffer behind ``WrappedReplay``, SB3's arrays in
``GenerativeReplayBuffer``). The core keeps the rest and is the one place that decides it:

* the ``SyntheticPool`` (retrain schedule, diffusion model, synthetic rows) and ``min_real``;
* the terminal column: real rows always carry it, the model sees it only where terminals are
  modelled (``model_terminals``; ``"auto"`` decides at the first retrain);
* how a batch of B rows splits: ``floor(real_ratio * B + 0.5)`` real rows first, the rest synthetic,
  all real before the first retrain;
* ``wait`` / ``model`` / ``stats``, and the state that checkpoints carry.

The contract with an owner is narrow. Real transitions cross it as *store rows*
``concat(obs, action, reward, next_obs, terminal)`` [N, D_store] float32 (``core.store_layout``)::

    core = MixingCore(obs_dim, action_dim, config, model_terminals="auto", capacity=capacity)
    if core.step(n_added, num_real):          # after storing n_added transitions
        core.retrain(all_real_rows)           # store rows of every real transition
    n_real, n_syn = core.split(batch_size)
    batch = core.batch(real_rows_on_device, n_syn)      # ReplaySamples, real rows first
"""

from __future__ import annotations

import logging
import operator
import warnings
from typing import Dict, NamedTuple, Optional, Union

import numpy as np
import torch

from .config import SynthERConfig
from .diffusion import resolve_device
from .layout import RowLayout, _positive_int
from .pool import LogFn, SyntheticPool

log = logging.getLogger(__name__)

# Real actions this far (relative, at least absolute) past a clip bound count as outside it (float32 noise).
ACTION_BOUND_TOL = 1e-5

class SB3Samples(NamedTuple):
    """A batch under stable-baselines3's field names, order and shapes (``ReplayBufferSamples``).

    Made by ``ReplaySamples.as_sb3()``; a loop written against SB3's buffer (CleanRL's, say) reads it
    unchanged, and ``r + (1 - d) * gamma * q`` cannot broadcast to [B, B] since rewards and dones
    are [B, 1] as there.
    """

    observations: torch.Tensor       # [B, obs_dim]
    actions: torch.Tensor            # [B, action_dim]
    next_observations: torch.Tensor  # [B, obs_dim]
    dones: torch.Tensor              # [B, 1] the true terminal flag (SB3: done * (1 - timeout))
    rewards: torch.Tensor            # [B, 1]
    discounts: Optional[torch.Tensor] = None   # [B, 1] for n-step returns; None: the algorithm's gamma


class ReplaySamples(NamedTuple):
    """A mixed batch: the first ``n_real`` rows are real, the rest synthetic, all on the buffer's ``device``."""

    obs: torch.Tensor          # [B, obs_dim] float32
    action: torch.Tensor       # [B, action_dim] float32
    reward: torch.Tensor       # [B] float32
    next_obs: torch.Tensor     # [B, obs_dim] float32
    terminated: torch.Tensor   # [B] float32 in {0, 1}; truncations are not terminals

    def as_sb3(self) -> SB3Samples:
        """The same batch as stable-baselines3 names and shapes it (views, no copy).

        Returns:
            ``SB3Samples(observations, actions, next_observations, dones, rewards, discounts=None)``
            with ``rewards`` and ``dones`` (= ``terminated``) of shape [B, 1], field for field
            what SB3's ``ReplayBuffer.sample`` returns.
        """
        return SB3Samples(self.obs, self.action, self.next_obs, self.terminated.unsqueeze(1),
                          self.reward.unsqueeze(1))


def resolve_config(config: Optional[SynthERConfig], device: str = "auto") -> SynthERConfig:
    """``config``, or the preset for ``device`` when it is None (``SynthERConfig.for_device``).

    Args:
        config: a ``SynthERConfig`` or None.
        device: where the diffusion model would run (``"auto"``, ``"cpu"``, ``"cuda"``, ...).

    Returns:
        The config to use: ``paper`` on CUDA, ``fast`` on CPU when ``config`` is None.

    Raises:
        ValueError: ``config`` is neither None nor a ``SynthERConfig`` (a dict or a preset name, say).
    """
    if config is None:
        return SynthERConfig.for_device(device)
    if not isinstance(config, SynthERConfig):
        raise ValueError(f"config must be a SynthERConfig (or None), got {type(config).__name__}")
    return config


class MixingCore:
    """The pool, the terminal column, the batch split and the schedule's gate for one replay buffer.

    Args:
        obs_dim: flat observation size.
        action_dim: flat action size.
        config: ``SynthERConfig``; None means ``SynthERConfig.for_device(device)``.
        model_terminals: ``True`` / ``False`` model the terminal flag or not. ``"auto"`` decides at
            the first retrain: the terminal column is modelled iff some real row handed to that
            retrain has terminal 1. Until then (and for good, if no terminal was seen by then)
            synthetic rows are never terminal; pass ``True`` for an env that can terminate but
            rarely does early on.
        device: the device a None ``config`` is chosen for.
        capacity: real transitions the owner can hold at most (>= 2); ``min_real`` is clamped to it so
            that a full buffer can always retrain. None: no clamp.
        log_fn: ``log_fn(key, value)`` for retrain metrics.
        action_bounds: optional ``(low, high)``; synthetic actions are clipped to them.

    Raises:
        ValueError: a bad ``config``, ``model_terminals``, dimension, capacity or bound.
    """

    def __init__(self, obs_dim: int, action_dim: int, config: Optional[SynthERConfig] = None,
                 model_terminals: Union[bool, str] = "auto", *, device: str = "auto",
                 capacity: Optional[int] = None, log_fn: Optional[LogFn] = None,
                 action_bounds: Optional[tuple] = None):
        if not (isinstance(model_terminals, str) and model_terminals == "auto"):
            if isinstance(model_terminals, str) or model_terminals not in (True, False):
                raise ValueError(f"model_terminals must be True, False or 'auto', got {model_terminals!r}")
            model_terminals = bool(model_terminals)
        self.config = resolve_config(config, device)
        self.model_terminals = model_terminals
        # Real rows always store the terminal; the model sees it only where terminals are modelled.
        self.store_layout = RowLayout(obs_dim, action_dim, terminal=True)
        self.pool = SyntheticPool(self.store_layout.with_terminal(model_terminals is True), self.config, log_fn)
        if capacity is not None:  # a full buffer may always retrain
            if _positive_int("capacity", capacity) < 2:
                raise ValueError(f"capacity must be at least 2 (a retrain fits on two or more transitions), "
                                 f"got {capacity!r}")
            self.pool.min_real = min(self.config.min_real, int(capacity))
        if action_bounds is not None:
            self.pool.set_action_bounds(*action_bounds)

    # ------------------------------------------------------------------ state
    @property
    def model_layout(self) -> RowLayout:
        """The layout of the rows the model is fitted on and the pool holds (terminal column or not)."""
        return self.pool.layout

    @property
    def min_real(self) -> int:
        """Real transitions needed before the first retrain (``config.min_real``, clamped to the capacity)."""
        return self.pool.min_real

    def stats(self, num_real: Optional[int] = None) -> Dict[str, float]:
        """The pool's counters and last-retrain metrics, plus ``num_real`` when the owner knows it."""
        s = self.pool.stats()
        if num_real is not None:
            s["num_real"] = int(num_real)
        return s

    # ------------------------------------------------------------------ schedule
    def step(self, n: int, num_real: int) -> bool:
        """Count ``n`` env steps (transitions added, invalid ones included).

        Args:
            n: transitions just added.
            num_real: real transitions now stored.

        Returns:
            True when a retrain is due now: ``retrain_every`` reached, at least ``min_real`` real
            transitions stored and no background retrain in flight. The owner then calls ``retrain``.
        """
        self.pool.step(n)
        return self.pool.due(num_real)

    def retrain(self, rows: np.ndarray) -> bool:
        """Fit a fresh model on all real data and regenerate the pool.

        Args:
            rows: store rows [N, D_store] of every real transition (terminal in the last column).

        Returns:
            True on success (or on submission, for a background retrain); False when the fit
            diverged and the previous model and pool were kept.

        Raises:
            RuntimeError: fewer than 2 rows, or a background retrain is already running.
        """
        if rows.shape[0] < 2:
            raise RuntimeError(f"need at least 2 real transitions to retrain, have {rows.shape[0]}")
        self.pool.poll()
        if self.model_terminals == "auto" and self.pool.model is None and not self.pool.retraining:
            terminal = bool(rows[:, -1].any())
            if terminal != self.model_layout.terminal:
                self.pool.set_layout(self.model_layout.with_terminal(terminal))
            log.info("model_terminals='auto': %s (%s real terminal in %d rows)", "modelled" if terminal
                     else "not modelled", "a" if terminal else "no", rows.shape[0])
        self._warn_on_actions_out_of_bounds(rows)
        if not self.model_layout.terminal:
            rows = rows[:, :-1]
        return self.pool.retrain(np.ascontiguousarray(rows))

    def _warn_on_actions_out_of_bounds(self, rows: np.ndarray) -> None:
        """Warn when real actions lie outside the bounds synthetic actions are clipped to.

        Synthetic actions would then be clamped where real ones are not: the CleanRL case, a loop
        that stores env-scale actions (Pendulum: [-2, 2]) in a buffer that clips to SB3's [-1, 1].
        """
        low, high = self.pool.action_low, self.pool.action_high
        if low is None:
            return
        act = rows[:, self.store_layout.action_cols]
        tol = ACTION_BOUND_TOL * np.maximum(1.0, np.maximum(np.abs(low), np.abs(high)))
        outside = ((act < low - tol) | (act > high + tol)).any(axis=1)
        n = int(outside.sum())
        if n:
            warnings.warn(
                f"SynthER retrain at env step {self.pool.env_steps}: {n} of {len(rows)} real transitions have "
                f"actions outside the bounds synthetic actions are clipped to (low {_fmt(low)}, high {_fmt(high)}; "
                f"real actions span {_fmt(act.min(axis=0))} to {_fmt(act.max(axis=0))}). "
                "Where the loop stores actions at the env's scale (CleanRL, a custom loop) rather than SB3's "
                "rescaled [-1, 1], pass action_bounds=(env.action_space.low, env.action_space.high), or "
                "action_bounds=None for no clipping.", UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ batches
    def split(self, batch_size: int) -> tuple:
        """``(n_real, n_synthetic)`` for a batch of ``batch_size`` (a positive int).

        ``n_real = floor(real_ratio * batch_size + 0.5)``; all real while the pool is empty.
        """
        return self.pool.split_batch(_positive_int("batch_size", batch_size))

    def synthetic_rows(self, n: int) -> torch.Tensor:
        """``n`` synthetic rows as store rows [n, D_store] on ``device`` (terminal 0 where not modelled)."""
        rows = self.pool.sample(n)
        if not self.model_layout.terminal:
            rows = torch.cat([rows, rows.new_zeros(n, 1)], dim=1)
        return rows

    def pool_rows(self) -> np.ndarray:
        """Every row of the synthetic pool as store rows [num_synthetic, D_store] float32 on the CPU, in
        pool order (terminal 0 where not modelled); [0, D_store] before the first retrain. A finished
        background retrain is swapped in first; one still running is not waited for."""
        self.pool.poll()
        pool = self.pool.pool
        if pool is None:
            return np.zeros((0, self.store_layout.dim), dtype=np.float32)
        rows = pool.detach().to("cpu", torch.float32).numpy()
        if not self.model_layout.terminal:
            rows = np.concatenate([rows, np.zeros((rows.shape[0], 1), dtype=np.float32)], axis=1)
        return np.ascontiguousarray(rows)

    def batch(self, real: torch.Tensor, n_synthetic: int) -> ReplaySamples:
        """``real`` store rows [n_real, D_store] followed by ``n_synthetic`` synthetic rows, as fields.

        The batch is on ``real``'s device (synthetic rows are moved there from the pool's).
        """
        if n_synthetic:
            rows = torch.cat([real, self.synthetic_rows(n_synthetic).to(real.device)], dim=0)
        else:
            rows = real
        return ReplaySamples(*self.store_layout.split(rows))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The pool's state (``weights_only`` safe) and whether the model has the terminal column."""
        return {"pool": self.pool.state_dict(), "terminal_column": self.model_layout.terminal}

    def load_state_dict(self, pool_state: dict, terminal_column: Optional[bool] = None) -> None:
        """Restore the pool from ``state_dict()["pool"]``.

        Args:
            pool_state: the pool's state.
            terminal_column: whether the saved model has the terminal column (None: as
                ``model_terminals`` says; checkpoints of version 0.1.0 never say).

        Raises:
            ValueError: the saved model's width does not match the layout, or its terminal column
                differs from a model this core already has (load into a fresh buffer).
        """
        if terminal_column is not None and bool(terminal_column) != self.model_layout.terminal:
            if self.pool.model is not None or self.pool.retraining:
                raise ValueError(f"the checkpoint's model {'has' if terminal_column else 'lacks'} the terminal column "
                                 f"and this buffer's trained model does not: load into a fresh buffer")
            self.pool.set_layout(self.model_layout.with_terminal(terminal_column))
        self.pool.load_state_dict(pool_state)
        model = self.pool.model
        if model is not None and model.dim != self.model_layout.dim:
            raise ValueError(f"the saved model has width {model.dim}, the layout {self.model_layout.dim}")

    def to_device(self, device: str) -> None:
        """Move the diffusion model and the synthetic pool to ``device``; later retrains run there.

        For a run resumed on another machine (a checkpoint made on CUDA, resumed with ``--device cpu``).

        Args:
            device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...

        Raises:
            ValueError: ``device`` is not a device, or names CUDA where there is none.
        """
        self.pool.to_device(device)
        self.config = self.pool.config

    def set_progress(self, show: bool) -> None:
        """Show or hide the progress bars of later retrains (``SyntheticPool.set_progress``)."""
        self.pool.set_progress(show)
        self.config = self.pool.config

    def __setstate__(self, state: dict) -> None:
        """Unpickle; the config follows the pool's, which moves to the CPU where CUDA is missing."""
        self.__dict__.update(state)
        if self.config.device != self.pool.config.device:
            self.config = self.pool.config


def _core_attr(path: str, doc: str) -> property:
    """A read-only property of a ``UsesMixingCore`` that reads ``self.core.<path>`` (dotted)."""
    get = operator.attrgetter(path)
    return property(lambda self: get(self.core), doc=doc)


class UsesMixingCore:
    """What a buffer built on ``self.core`` (a ``MixingCore``) exposes of it, read-only."""

    core: MixingCore

    config = _core_attr("config", "The ``SynthERConfig`` in use.")
    pool = _core_attr("pool", "The ``SyntheticPool``: schedule, diffusion model, synthetic rows.")
    model = _core_attr("pool.model", "The current ``TransitionDiffusion`` (None before the first retrain).")
    env_steps = _core_attr("pool.env_steps", "Transitions added so far (as SB3's ``num_timesteps``).")
    layout = _core_attr("model_layout", "The rows the model sees (``layout.terminal``: terminals modelled).")
    store_layout = _core_attr("store_layout", "Real rows as stored and mixed: concat(obs, action, reward, "
                                              "next_obs, terminal).")
    model_terminals = _core_attr("model_terminals", "The ``model_terminals`` setting (True, False or "
                                                    "\"auto\"); the decision is ``layout.terminal``.")

    def wait(self) -> bool:
        """Block until a background retrain (``config.async_retrain``) finishes; True if a pool was swapped in."""
        return self.core.pool.wait()

    def set_progress(self, show: bool) -> None:
        """Show or hide the diffusion progress bars of later retrains (``config.progress``), e.g. after
        a ``load`` or unpickle, which restores the saved setting."""
        self.core.set_progress(show)

    def synthetic_transitions(self) -> Dict[str, np.ndarray]:
        """The whole synthetic pool as a transition dataset: ``observations``, ``actions``, ``rewards``,
        ``next_observations``, ``terminals`` (float32; terminals 0 where not modelled), the keys
        ``synther_buffer.datasets.load_transitions`` reads once saved with ``np.savez``; scored by
        ``synther report`` / ``synther_buffer.oracle.score_transitions``. Empty arrays before the first
        retrain. Call ``wait()`` first to include a background retrain that is still running."""
        from .datasets import from_rows

        return from_rows(self.core.pool_rows(), self.core.store_layout)

    def real_transitions(self) -> Dict[str, np.ndarray]:
        """All stored real transitions (the owner's ``real_rows()``) as a transition dataset, as
        ``synthetic_transitions`` (terminals are true terminations, never timeouts)."""
        from .datasets import from_rows

        return from_rows(self.real_rows(), self.core.store_layout)

    def set_relevance_fn(self, fn) -> None:
        """Relevance-guided generation (Prioritized Generative Replay) by a score function of yours.

        From the next retrain on, the diffusion model is conditioned on ``fn``'s score of each real
        transition and generates at high scores (classifier-free guidance, ``config.guidance_scale``;
        conditions drawn from the top ``config.relevance_top_frac`` of the real scores). Works with
        any ``config.relevance``, which it overrides; ``None`` goes back to it. Not saved with the
        buffer: call it again after a load.

        Args:
            fn: ``fn(batch) -> scores``, ``batch`` a ``ReplaySamples`` of CPU float32 tensors (``obs``,
                ``action``, ``reward`` [N], ``next_obs``, ``terminated`` [N]) holding every real
                transition (``terminated`` is all zeros where terminals are not modelled); one finite
                score per row back (numpy, tensor or list), e.g. the TD error under your critic::

                    def td_error(b):
                        with torch.no_grad():
                            o, a, o2 = b.obs.to(dev), b.action.to(dev), b.next_obs.to(dev)
                            target = b.reward.to(dev) + gamma * (1 - b.terminated.to(dev)) * v(o2)
                            return (q(o, a) - target).abs().cpu()

                It runs on the thread that adds transitions, when a retrain starts. An exception in it,
                or NaN/inf / a wrong number of scores, raises ``synther_buffer.relevance.RelevanceError``
                (a ``ValueError``) from that retrain and keeps the previous model and pool.

        Raises:
            ValueError: ``fn`` is not callable, or ``config.retrain_backend`` is ``"ray"``.
        """
        self.core.pool.set_relevance_fn(fn)


def _fmt(values: np.ndarray) -> str:
    """A short list of numbers for a message: ``[-2, 2.5]``."""
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"


def batch_device(device) -> Optional[torch.device]:
    """``device`` as a ``torch.device`` (``"auto"``: CUDA when available), or None for None.

    Raises:
        ValueError: not a device name, or CUDA asked for where there is none.
    """
    if device is None or isinstance(device, torch.device):
        return device
    return resolve_device(str(device))


class HasBatchDevice:
    """A buffer's ``device``: where its batches go, apart from where the diffusion model runs."""

    _device: Optional[torch.device] = None

    @property
    def device(self) -> Optional[torch.device]:
        """Where batches go (settable: a ``torch.device``, a name such as ``"cuda"``, or ``"auto"``)."""
        return self._device

    @device.setter
    def device(self, value) -> None:
        self._device = batch_device(value)
