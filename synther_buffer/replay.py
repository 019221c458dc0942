"""The framework-free SynthER buffers, for custom training loops (CleanRL / REDQ style).

``GenerativeReplay`` keeps the real transitions itself (a ring buffer)::

    buf = GenerativeReplay(obs_dim, action_dim, capacity=1_000_000, config=cfg, device="cuda")
    buf.add(obs, action, reward, next_obs, terminated)   # one transition or a batch [B, ...]
    batch = buf.sample(256)                              # ReplaySamples of torch tensors on "cuda"
    data = batch.as_sb3()                                # SB3's names and [B, 1] shapes

``WrappedReplay`` (``synther_buffer.wrapped``, importable from here too) leaves them in a loop's own
buffer and reads them through two functions. Both are thin owners of a
``synther_buffer.mixing.MixingCore`` (pool, terminal column, batch split). No RL framework is
imported here.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Union

import numpy as np
import torch

from . import buffer_io
from .config import SynthERConfig
from .fields import check_fields, check_terminals, join_rows
from .mixing import HasBatchDevice, MixingCore, ReplaySamples, SB3Samples, UsesMixingCore
from .pool import LogFn
from .wrapped import WrappedReplay, log_to_logging

__all__ = ["GenerativeReplay", "WrappedReplay", "ReplaySamples", "SB3Samples"]

log = logging.getLogger(__name__)

ON_INVALID = ("raise", "drop")
CHECKPOINT_VERSION = buffer_io.CHECKPOINT_VERSION
CPU = torch.device("cpu")


class GenerativeReplay(HasBatchDevice, UsesMixingCore):
    """SynthER replay buffer without any RL framework.

    Args:
        obs_dim: flat observation size.
        action_dim: flat action size.
        capacity: real transitions kept (FIFO ring buffer, like SB3: the oldest are overwritten).
        config: ``SynthERConfig``; None means ``SynthERConfig.for_device("auto")`` (the ``paper``
            preset on CUDA, ``fast`` on CPU; the choice is logged once).
        model_terminals: model the terminal flag (seed A: only where the env can terminate).
            ``"auto"`` (default) decides at the first retrain: modelled iff some stored real
            transition has ``terminated`` 1 by then. Pass ``True`` / ``False`` when you know
            (``synther_buffer.envs.can_terminate(env_id)``), e.g. for an env that terminates rarely.
        on_invalid: ``"raise"`` rejects NaN/inf transitions with a ValueError; ``"drop"`` counts
            and drops them (``stats()["num_dropped"]``). Never stored either way.
        log_fn: ``log_fn(key, value)`` for retrain metrics (default: the ``logging`` module, debug level).
        action_bounds: optional ``(low, high)`` (scalars or ``action_dim`` values each): synthetic
            actions are clipped to them, and each retrain warns when real actions lie outside them.
            None (default): no clipping.
        device: where batches go (``"cpu"``, ``"cuda"``, ``"auto"``, a ``torch.device``); None
            (default): the CPU. Independent of ``config.device``, where the diffusion model and the
            synthetic pool live: synthetic rows are moved to ``device`` per batch.

    Raises:
        ValueError: a bad argument (named in the message).

    Every ``config.retrain_every`` env steps (transitions added) the diffusion model is retrained
    from scratch on all real transitions and the synthetic pool is regenerated. ``sample(B)`` draws
    ``floor(real_ratio * B + 0.5)`` real rows and the rest synthetic (all real before the first retrain).
    The SynthER half (pool, terminal column, batch split) is a ``synther_buffer.mixing.MixingCore``
    (``self.core``); this class adds the ring buffer, input validation and checkpoints.
    """

    def __init__(self, obs_dim: int, action_dim: int, capacity: int = 1_000_000,
                 config: Optional[SynthERConfig] = None, model_terminals: Union[bool, str] = "auto",
                 on_invalid: str = "raise", log_fn: Optional[LogFn] = None,
                 action_bounds: Optional[tuple] = None, device: Union[str, torch.device, None] = None):
        if on_invalid not in ON_INVALID:   # before the core, which may start a Ray actor
            raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
        self.core = MixingCore(obs_dim, action_dim, config, model_terminals, capacity=capacity,
                               log_fn=log_fn or log_to_logging, action_bounds=action_bounds)
        self.device = CPU if device is None else device
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.capacity = int(capacity)
        self.on_invalid = on_invalid
        self._rows = np.zeros((self.capacity, self.store_layout.dim), dtype=np.float32)
        self.pos = 0
        self.full = False
        self.num_dropped = 0
        self.rng = np.random.default_rng([self.config.seed, 1])   # real draws: not the pool's stream, nor run seed + 1's

    # ------------------------------------------------------------------ adding
    def __len__(self) -> int:
        return self.capacity if self.full else self.pos

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        """Store one transition (obs [obs_dim]) or a batch (obs [B, obs_dim]); retrain when due.

        The positional order is ``(obs, action, reward, next_obs, terminated)``, the order of the
        transition row, which is not stable-baselines3's ``add(obs, next_obs, action, reward, done,
        infos)``; keywords work in any order: ``add(obs=o, next_obs=o2, action=a, reward=r,
        terminated=d)``. SB3's order passed positionally is caught by the shapes (named in the
        error) unless ``obs_dim == action_dim == 1`` with [B, 1] rewards. Swapped ``obs`` and
        ``next_obs`` have the same shape and cannot be detected: use keywords.

        Args:
            obs, next_obs: [obs_dim] or [B, obs_dim] (numpy arrays, tensors on any device, lists).
            action: [action_dim] or [B, action_dim].
            reward: a scalar, [B] or [B, 1].
            terminated: the true terminal flag (not ``truncated``: time-limit ends are not
                terminals), 0/1 or bool; a scalar, [B] or [B, 1].

        Raises:
            ValueError: a field of the wrong shape or dtype (named), a non-binary ``terminated``,
                or NaN/inf with ``on_invalid="raise"``. A rejected batch changes nothing.
        """
        rows = self._validated_rows(obs, action, reward, next_obs, terminated)
        b = rows.shape[0]
        if b == 0:
            return
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            if self.on_invalid == "raise":  # rejected: no side effects
                bad = int(np.argmin(finite))
                raise ValueError(f"transition {bad} of the batch has NaN/inf values; pass "
                                 f"on_invalid='drop' to count and drop such transitions instead")
            rows = rows[finite]
        check_terminals(rows)
        self.num_dropped += b - rows.shape[0]
        self._write(rows)
        if self.core.step(b, len(self)):  # dropped transitions were still env steps
            self.retrain()

    def _write(self, rows: np.ndarray) -> None:
        b = rows.shape[0]
        if b == 0:
            return
        if b >= self.capacity:  # only the newest `capacity` rows survive
            rows, b = rows[-self.capacity:], self.capacity
        idx = (self.pos + np.arange(b)) % self.capacity
        self._rows[idx] = rows
        if self.pos + b >= self.capacity:
            self.full = True
        self.pos = (self.pos + b) % self.capacity

    def _validated_rows(self, obs, action, reward, next_obs, terminated) -> np.ndarray:
        fields, b = check_fields((obs, action, reward, next_obs, terminated), self.obs_dim, self.action_dim,
                                 single_ok=True)
        if b is None:  # one transition without the batch dimension
            fields = [f.reshape(1, *f.shape) for f in fields]
        return join_rows(fields, self.store_layout, CPU).numpy()

    # ------------------------------------------------------------------ retraining and sampling
    def real_rows(self) -> np.ndarray:
        """All stored real transitions as rows [num_real, D_store] (concat(obs, action, reward, next_obs, terminal))."""
        return self._rows[:len(self)]

    def retrain(self) -> bool:
        """Retrain the diffusion model on all real data now and regenerate the pool.

        Returns:
            True on success (or on submission of a background retrain).

        Raises:
            RuntimeError: fewer than 2 real transitions, or a background retrain is running.
        """
        return self.core.retrain(self.real_rows())

    def sample(self, batch_size: int) -> ReplaySamples:
        """A mixed batch of ``batch_size`` transitions: real rows first, then synthetic rows.

        Raises:
            ValueError: ``batch_size`` is not a positive int.
            RuntimeError: the buffer is empty.
        """
        n_real, n_syn = self.core.split(batch_size)
        if len(self) == 0:
            raise RuntimeError("cannot sample from an empty GenerativeReplay: add() transitions first")
        idx = self.rng.integers(0, len(self), size=n_real)
        real = torch.from_numpy(self._rows[idx]).to(self.device)
        return self.core.batch(real, n_syn)

    def stats(self) -> dict:
        """env_steps, num_real, num_synthetic, retrain_count, last_train_loss, last_fit_seconds,
        last_generate_seconds, real_ratio, plus failed_retrains, num_filtered, num_dropped, next_retrain,
        last_retrain_env_step, retraining, capacity."""
        s = self.core.stats(num_real=len(self))
        s.update(num_dropped=self.num_dropped, capacity=self.capacity)
        return s

    # ------------------------------------------------------------------ checkpoints
    def __setstate__(self, state: dict) -> None:
        """Unpickle; a buffer pickled before batches had their own device sends them to the model's, as then."""
        if "_device" not in state:
            state["_device"] = state["core"].pool.device
        self.__dict__.update(state)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write real data, synthetic pool, model, normalizer, schedule counters and the batch device
        to directory ``path``.

        Written to a temporary sibling directory first and swapped in, so a kill mid-save leaves the
        previous checkpoint intact. Everything loads with ``torch.load(weights_only=True)``. Waits for
        an in-flight background retrain first.

        Raises:
            FileExistsError: ``path`` holds files other than an earlier save's (nothing is deleted).
        """
        state = {**buffer_io.core_state(self, "GenerativeReplay"), "capacity": self.capacity,
                 "on_invalid": self.on_invalid, "pos": self.pos, "full": self.full, "num_dropped": self.num_dropped,
                 "rng": json.dumps(self.rng.bit_generator.state)}
        buffer_io.write(path, state, {"real": self._rows[:len(self)] if not self.full else self._rows})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], log_fn: Optional[LogFn] = None,
             device: Optional[str] = None) -> "GenerativeReplay":
        """Restore a buffer saved with ``save``; the schedule continues where it stopped.

        Args:
            path: the checkpoint directory (``path.old`` is used after a kill between save's renames).
            log_fn: as in the constructor (callbacks are not saved).
            device: put the model and pool there instead of the saved config's device. Batches go
                where they went when saved (set ``buf.device`` to change that); a checkpoint written
                before batches had their own device sends them to the model's device, as then.

        Returns:
            The restored buffer.

        Raises:
            FileNotFoundError: no checkpoint at ``path``.
            ValueError: the files are not a readable checkpoint of this version.
        """
        path, state, arrays = buffer_io.read(path, "GenerativeReplay", ("real",))
        real = arrays["real"]
        with buffer_io.restoring("GenerativeReplay", path):
            buf = cls(state["obs_dim"], state["action_dim"], state["capacity"], buffer_io.saved_config(state, device),
                      state["model_terminals"], state["on_invalid"], log_fn)
            pos, full = int(state["pos"]), bool(state["full"])
            expected_rows = buf.capacity if full else pos
            if not 0 <= pos < buf.capacity or real.ndim != 2 or real.shape != (expected_rows, buf.store_layout.dim):
                raise ValueError(f"real.npy has shape {real.shape}, expected ({expected_rows}, {buf.store_layout.dim})")
            buf._rows[:real.shape[0]] = real
            buf.pos, buf.full, buf.num_dropped = pos, full, int(state["num_dropped"])
            buf.rng.bit_generator.state = json.loads(state["rng"])
            buffer_io.restore_core(buf, state)
        return buf


