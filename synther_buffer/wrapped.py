"""WrappedReplay: SynthER around a training loop's own replay buffer, read through two functions.

The loop keeps storing and sampling its real transitions as it always did (CleanRL's SB3
``ReplayBuffer``, a REDQ-style numpy buffer, a GPU tensor buffer); this object counts env steps,
retrains on the buffer's contents when due and mixes synthetic rows into each batch. It imports no
RL framework.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import buffer_io
from .config import SynthERConfig
from .fields import check_fields, check_terminals, join_rows
from .mixing import HasBatchDevice, MixingCore, ReplaySamples, UsesMixingCore
from .pool import LogFn

__all__ = ["WrappedReplay"]

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
ZERO_ROWS_WARN = 0.5   # warn when more than this share of real_data()'s rows are all zeros


def log_to_logging(key: str, value: float) -> None:
    """The default ``log_fn``: retrain metrics to the ``logging`` module at debug level."""
    log.debug("%s = %s", key, value)


class WrappedReplay(HasBatchDevice, UsesMixingCore):
    """SynthER for a training loop that already owns its replay buffer (no rewrite of the loop).

    Args:
        sample_real: ``sample_real(n)`` -> ``(obs, action, reward, next_obs, terminated)`` for ``n``
            real transitions drawn by your buffer: obs/next_obs [n, obs_dim], action [n, action_dim],
            reward and terminated [n] or [n, 1]; numpy arrays or tensors (on any device).
        real_data: ``real_data()`` -> the same five fields for *all* stored real transitions, and
            only those: ``[:size]`` of a preallocated buffer, not its zero tail. ``terminated`` is the
            true terminal flag, 0/1: for an SB3-style buffer ``dones * (1 - timeouts)`` (a
            time-limit end is not a terminal; CleanRL stores ``terminations`` as ``dones`` with
            ``handle_timeout_termination=False``, where the timeouts are all 0 and the product is
            the same). Called only when a retrain is due.
        obs_dim: flat observation size.
        action_dim: flat action size.
        config, model_terminals, log_fn: as in ``GenerativeReplay`` (``"auto"`` decides from the
            terminals ``real_data()`` returns at the first retrain).
        action_bounds: ``(low, high)`` synthetic actions are clipped to, at the scale your buffer
            stores actions (CleanRL: the env's, ``(env.action_space.low, env.action_space.high)``);
            each retrain warns when real actions lie outside them. None (default): no clipping.
        device: where batches go; None (default): where ``sample_real``'s tensors are (the CPU for
            numpy arrays), so tensors already there are never copied through the host.
        capacity: the most transitions your buffer holds; ``min_real`` is clamped to it so that a
            buffer smaller than ``config.min_real`` still retrains once full. None (default): no clamp,
            and a buffer that stops growing below ``min_real`` gets a warning instead of retrains.

    Raises:
        ValueError: a bad argument (named in the message).

    What is checked: every ``sample_real(n)`` result for five fields of the right shapes and
    numeric dtypes (a ``ValueError`` names the field; no host sync, so values are not inspected);
    every ``real_data()`` result for shapes, dtypes, finite values and 0/1 terminals, with a
    warning when most of its rows are all zeros.

    With an SB3 ``ReplayBuffer`` (as CleanRL uses it)::

        rb = ReplayBuffer(100_000, env.observation_space, env.action_space, "cpu",
                          handle_timeout_termination=False)

        def sample_real(n):                    # SB3's own draw; its dones are already terminals
            d = rb.sample(n)
            return d.observations, d.actions, d.rewards, d.next_observations, d.dones

        def real_data():                       # every stored transition, not the preallocated tail
            n = rb.buffer_size if rb.full else rb.pos
            flat = lambda a: a[:n].reshape(n * rb.n_envs, -1)
            return (flat(rb.observations), flat(rb.actions), flat(rb.rewards), flat(rb.next_observations),
                    flat(rb.dones * (1 - rb.timeouts)))

        synth = WrappedReplay(sample_real, real_data, obs_dim, act_dim, config=cfg,
                              action_bounds=(env.action_space.low, env.action_space.high))
        ...
        rb.add(obs, next_obs, action, reward, terminations, infos); synth.step(n_envs)
        data = synth.sample(256).as_sb3()      # observations, actions, ..., rewards [256, 1]
    """

    def __init__(self, sample_real: Callable[[int], Sequence], real_data: Callable[[], Sequence],
                 obs_dim: int, action_dim: int, config: Optional[SynthERConfig] = None,
                 model_terminals: Union[bool, str] = "auto", log_fn: Optional[LogFn] = None,
                 action_bounds: Optional[tuple] = None, device: Union[str, torch.device, None] = None,
                 capacity: Optional[int] = None):
        self.core = MixingCore(obs_dim, action_dim, config, model_terminals, log_fn=log_fn or log_to_logging,
                               action_bounds=action_bounds, capacity=capacity)
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.sample_real, self.real_data = sample_real, real_data
        self.device = device
        self.capacity = None if capacity is None else int(capacity)
        # a due check that finds fewer than min_real rows waits until the gap can have filled
        self._retry_at, self._short_rows, self._warned_short = 0, None, False

    # ------------------------------------------------------------------ real data
    def real_rows(self) -> np.ndarray:
        """``real_data()`` checked and joined into store rows [N, D_store] (numpy, float32).

        Raises:
            ValueError: a field of the wrong shape or dtype (named), NaN/inf values, or a
                ``terminated`` other than 0/1.
        """
        fields, _ = check_fields(self.real_data(), self.obs_dim, self.action_dim, source="real_data()")
        rows = join_rows(fields, self.store_layout, CPU).numpy()
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            raise ValueError(f"real_data() returned {int((~finite).sum())} of {len(rows)} transitions with NaN/inf "
                             f"values (the first is row {int(np.argmin(finite))})")
        check_terminals(rows, "real_data()")
        zero = ~rows[:, :-1].any(axis=1)
        if len(rows) and zero.mean() > ZERO_ROWS_WARN:
            warnings.warn(f"{int(zero.sum())} of the {len(rows)} transitions real_data() returned are all zeros: "
                          "a preallocated buffer returned whole? Return only the stored rows ([:size]); the "
                          "diffusion model is fitted on whatever real_data() returns.", UserWarning, stacklevel=3)
        return rows

    # ------------------------------------------------------------------ schedule
    def step(self, n: int = 1) -> bool:
        """Count ``n`` env steps; retrain on ``real_data()`` when due. True if a retrain ran.

        The real count is known only from ``real_data()``, which is called only when the schedule
        is due. With fewer than ``min_real`` rows the retrain waits, and ``real_data()`` is asked again
        only once enough env steps have passed to fill the gap (each adds at most one row); a buffer
        that has stopped growing below ``min_real`` gets one warning (pass ``capacity``).

        Raises:
            ValueError: ``real_data()`` returned bad fields (see ``real_rows``).
        """
        min_real = self.core.min_real
        if not self.core.step(n, min_real) or self.core.pool.env_steps < self._retry_at:
            return False
        rows = self.real_rows()
        if rows.shape[0] >= min_real:
            self._short_rows = None
            return self.core.retrain(rows)
        stalled = self._short_rows is not None and rows.shape[0] <= self._short_rows
        if stalled and not self._warned_short:
            self._warned_short = True
            warnings.warn(f"real_data() still returns {rows.shape[0]} transitions, fewer than min_real={min_real}, "
                          f"and has stopped growing: SynthER does not retrain. If your buffer holds at most "
                          f"{rows.shape[0]}, pass capacity={rows.shape[0]} (or lower SynthERConfig.min_real).",
                          UserWarning, stacklevel=2)
        self._short_rows = rows.shape[0]
        wait = self.core.config.retrain_every if stalled else min_real - rows.shape[0]
        self._retry_at = self.core.pool.env_steps + wait
        return False

    def retrain(self) -> bool:
        """Retrain now on ``real_data()``; as ``GenerativeReplay.retrain``."""
        return self.core.retrain(self.real_rows())

    # ------------------------------------------------------------------ batches
    def sample(self, batch_size: int) -> ReplaySamples:
        """``floor(real_ratio * B + 0.5)`` rows from your buffer (``sample_real``), the rest synthetic.

        Returns:
            A ``ReplaySamples`` on ``device`` (None: the device of ``sample_real``'s tensors, and the
            CPU for a batch with no real rows); ``.as_sb3()`` gives SB3's names and shapes.

        Raises:
            ValueError: ``batch_size`` is not a positive int, or ``sample_real`` returned other than
                five fields of the right shapes and numeric dtypes (the field is named).
        """
        n_real, n_syn = self.core.split(batch_size)
        if n_real:
            fields, _ = check_fields(self.sample_real(n_real), self.obs_dim, self.action_dim, batch=n_real,
                                     source=f"sample_real({n_real})")
            real = join_rows(fields, self.store_layout, self.device)
        else:
            real = torch.empty(0, self.store_layout.dim, device=self.device or CPU)
        return self.core.batch(real, n_syn)

    def stats(self) -> dict:
        """As ``GenerativeReplay.stats()`` (num_real is not known here)."""
        return self.core.stats()

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the SynthER half to directory ``path``: synthetic pool, model, normaliser, schedule
        counters, config and batch device (atomically, as ``GenerativeReplay.save``).

        The real transitions are your buffer's and are not written: save and restore them as you
        do without SynthER.

        Raises:
            FileExistsError: ``path`` holds files other than an earlier save's (nothing is deleted).
        """
        buffer_io.write(path, {**buffer_io.core_state(self, "WrappedReplay"), "capacity": self.capacity})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], sample_real: Callable[[int], Sequence],
             real_data: Callable[[], Sequence], log_fn: Optional[LogFn] = None,
             device: Optional[str] = None) -> "WrappedReplay":
        """Restore what ``save`` wrote around your (restored) buffer; the schedule continues.

        Args:
            path: the checkpoint directory.
            sample_real, real_data: your buffer's two functions, as in the constructor.
            log_fn: as in the constructor (callbacks are not saved).
            device: put the model and pool there instead of the saved config's device (batches go
                where they went when saved; set ``buf.device`` to change that).

        Returns:
            The restored ``WrappedReplay``.

        Raises:
            FileNotFoundError: no checkpoint at ``path``.
            ValueError: the files are not a readable ``WrappedReplay`` checkpoint.
        """
        path, state, _ = buffer_io.read(path, "WrappedReplay")
        with buffer_io.restoring("WrappedReplay", path):
            buf = cls(sample_real, real_data, state["obs_dim"], state["action_dim"],
                      buffer_io.saved_config(state, device), state["model_terminals"], log_fn,
                      capacity=state.get("capacity"))
            buffer_io.restore_core(buf, state)
        return buf
