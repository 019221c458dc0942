"""The framework-free SynthER buffers, for custom training loops (CleanRL / REDQ style).

``GenerativeReplay`` keeps the real transitions itself (a ring buffer)::

    buf = GenerativeReplay(obs_dim, action_dim, capacity=1_000_000, config=cfg)
    buf.add(obs, action, reward, next_obs, terminated)   # one transition or a batch [B, ...]
    batch = buf.sample(256)                              # ReplaySamples of torch tensors

``WrappedReplay`` leaves them in a loop's own buffer and reads them through two functions. Both are
thin owners of a ``synther_buffer.mixing.MixingCore`` (pool, terminal column, batch split). No RL
framework is imported here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .checkpoint import atomic_directory, resolve_directory
from .config import SynthERConfig
from .mixing import MixingCore, ReplaySamples, UsesMixingCore
from .pool import LogFn

__all__ = ["GenerativeReplay", "WrappedReplay", "ReplaySamples"]

log = logging.getLogger(__name__)

ON_INVALID = ("raise", "drop")
CHECKPOINT_VERSION = 1


def _log_to_logging(key: str, value: float) -> None:
    log.debug("%s = %s", key, value)


class GenerativeReplay(UsesMixingCore):
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
        action_bounds: optional ``(low, high)``; synthetic actions are clipped to them.

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
                 action_bounds: Optional[tuple] = None):
        self.core = MixingCore(obs_dim, action_dim, config, model_terminals, capacity=capacity,
                               log_fn=log_fn or _log_to_logging, action_bounds=action_bounds)
        if on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.capacity = int(capacity)
        self.on_invalid = on_invalid
        self._rows = np.zeros((self.capacity, self.store_layout.dim), dtype=np.float32)
        self.pos = 0
        self.full = False
        self.num_dropped = 0
        self.rng = np.random.default_rng(self.config.seed + 1)

    @property
    def device(self) -> torch.device:
        """Where batches, the model and the pool live (``config.device``)."""
        return self.core.pool.device

    # ------------------------------------------------------------------ adding
    def __len__(self) -> int:
        return self.capacity if self.full else self.pos

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        """Store one transition (obs [obs_dim]) or a batch (obs [B, obs_dim]); retrain when due.

        Args:
            obs, next_obs: [obs_dim] or [B, obs_dim].
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
        if not np.isin(rows[:, -1], (0.0, 1.0)).all():
            raise ValueError("terminated must hold 0/1 (or bool) values: the true terminal flag, not a probability")
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
        obs = _as_array("obs", obs)
        single = obs.ndim == 1
        b = 1 if single else (obs.shape[0] if obs.ndim >= 1 else -1)
        fields = (("obs", obs, (self.obs_dim,)), ("action", action, (self.action_dim,)),
                  ("reward", reward, ()), ("next_obs", next_obs, (self.obs_dim,)),
                  ("terminated", terminated, ()))
        out = []
        for name, value, shape in fields:
            arr = _as_array(name, value)
            expected = shape if single else (b,) + shape
            ok = arr.shape == expected or (not single and not shape and arr.shape == (b, 1))
            if not ok:
                raise ValueError(f"{name} has shape {arr.shape}, expected {expected}"
                                 f"{' or (B, 1)' if not shape and not single else ''} "
                                 f"(obs_dim={self.obs_dim}, action_dim={self.action_dim})")
            out.append(arr)
        if single:
            out = [a.reshape(1, *a.shape) for a in out]
        return self.store_layout.join(*out)

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
        real = torch.from_numpy(self._rows[idx]).to(self.device, non_blocking=True)
        return self.core.batch(real, n_syn)

    def stats(self) -> dict:
        """env_steps, num_real, num_synthetic, retrain_count, last_train_loss, last_fit_seconds,
        last_generate_seconds, real_ratio, plus failed_retrains, num_filtered, num_dropped, next_retrain,
        last_retrain_env_step, retraining, capacity."""
        s = self.core.stats(num_real=len(self))
        s.update(num_dropped=self.num_dropped, capacity=self.capacity)
        return s

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write real data, synthetic pool, model, normalizer and schedule counters to directory ``path``.

        Written to a temporary sibling directory first and swapped in, so a kill mid-save leaves the
        previous checkpoint intact. Everything loads with ``torch.load(weights_only=True)``. Waits for
        an in-flight background retrain first.
        """
        with atomic_directory(path) as tmp:
            np.save(tmp / "real.npy", self._rows[:len(self)] if not self.full else self._rows)
            state = {"version": CHECKPOINT_VERSION, "obs_dim": self.obs_dim, "action_dim": self.action_dim,
                     "capacity": self.capacity, "model_terminals": self.model_terminals,
                     "on_invalid": self.on_invalid, "pos": self.pos, "full": self.full,
                     "num_dropped": self.num_dropped, "config": self.config.to_dict(),
                     "rng": json.dumps(self.rng.bit_generator.state), **self.core.state_dict()}
            torch.save(state, tmp / "state.pt")

    @classmethod
    def load(cls, path: Union[str, os.PathLike], log_fn: Optional[LogFn] = None,
             device: Optional[str] = None) -> "GenerativeReplay":
        """Restore a buffer saved with ``save``; the schedule continues where it stopped.

        Args:
            path: the checkpoint directory (``path.old`` is used after a kill between save's renames).
            log_fn: as in the constructor (callbacks are not saved).
            device: put the model and pool there instead of the saved config's device.

        Returns:
            The restored buffer.

        Raises:
            FileNotFoundError: no checkpoint at ``path``.
            ValueError: the files are not a readable checkpoint of this version.
        """
        path = resolve_directory(path) or Path(path)  # path.old after a kill between save()'s renames
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            real = np.load(path / "real.npy", allow_pickle=False)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"could not load GenerativeReplay checkpoint {path}: {type(e).__name__}: {e}") from None
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path} is not a GenerativeReplay checkpoint of version {CHECKPOINT_VERSION}")
        try:
            cfg = SynthERConfig.from_dict(state["config"])
            if device is not None:
                cfg = cfg.replace(device=device)
            buf = cls(state["obs_dim"], state["action_dim"], state["capacity"], cfg, state["model_terminals"],
                      state["on_invalid"], log_fn)
            pos, full = int(state["pos"]), bool(state["full"])
            expected_rows = buf.capacity if full else pos
            if not 0 <= pos < buf.capacity or real.ndim != 2 or real.shape != (expected_rows, buf.store_layout.dim):
                raise ValueError(f"real.npy has shape {real.shape}, expected ({expected_rows}, {buf.store_layout.dim})")
            buf._rows[:real.shape[0]] = real
            buf.pos, buf.full, buf.num_dropped = pos, full, int(state["num_dropped"])
            buf.rng.bit_generator.state = json.loads(state["rng"])
            buf.core.load_state_dict(state["pool"], state.get("terminal_column"))
        except (KeyError, TypeError, IndexError, AttributeError, RuntimeError, ValueError) as e:
            raise ValueError(f"corrupt GenerativeReplay checkpoint {path}: {type(e).__name__}: {e}") from None
        return buf


class WrappedReplay(UsesMixingCore):
    """SynthER for a training loop that already owns its replay buffer (no rewrite of the loop).

    Your buffer keeps storing and sampling real data; this object counts env steps, retrains on
    your buffer's contents when due, and mixes synthetic rows into each batch.

    Args:
        sample_real: ``sample_real(n)`` -> (obs, action, reward, next_obs, terminated) for ``n`` real
            transitions (numpy arrays or tensors; reward/terminated [n] or [n, 1]).
        real_data: ``real_data()`` -> the same five fields for *all* stored real transitions;
            ``terminated`` is the true terminal flag (for an SB3-style buffer ``dones * (1 - timeouts)``).
        obs_dim, action_dim, config, model_terminals, log_fn, action_bounds: as in ``GenerativeReplay``
            (``"auto"`` decides from the terminals ``real_data()`` returns at the first retrain).

    Raises:
        ValueError: a bad argument (named in the message).

    Loop::

        synth = WrappedReplay(my_buf.sample_fields, my_buf.all_fields, obs_dim, act_dim, cfg)
        ... my_buf.store(...); synth.step()            # after each env step
        batch = synth.sample(256)                       # ReplaySamples, real_ratio real
    """

    def __init__(self, sample_real: Callable[[int], Sequence], real_data: Callable[[], Sequence],
                 obs_dim: int, action_dim: int, config: Optional[SynthERConfig] = None,
                 model_terminals: Union[bool, str] = "auto", log_fn: Optional[LogFn] = None,
                 action_bounds: Optional[tuple] = None):
        self.core = MixingCore(obs_dim, action_dim, config, model_terminals, log_fn=log_fn or _log_to_logging,
                               action_bounds=action_bounds)
        self.sample_real, self.real_data = sample_real, real_data

    @property
    def device(self) -> torch.device:
        """Where batches, the model and the pool live (``config.device``)."""
        return self.core.pool.device

    def _rows(self, fields: Sequence) -> np.ndarray:
        if len(fields) != 5:
            raise ValueError(f"expected 5 fields (obs, action, reward, next_obs, terminated), got {len(fields)}")
        arrays = [f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f) for f in fields]
        return self.store_layout.join(*arrays)

    def step(self, n: int = 1) -> bool:
        """Count ``n`` env steps; retrain on ``real_data()`` when due. True if a retrain ran.

        The real count is known only from ``real_data()``, which is called only when the schedule
        is due; with fewer than ``min_real`` rows the retrain waits (retried at the next step).
        """
        if not self.core.step(n, self.core.min_real):
            return False
        rows = self._rows(self.real_data())
        return rows.shape[0] >= self.core.min_real and self.core.retrain(rows)

    def retrain(self) -> bool:
        """Retrain now on ``real_data()``; as ``GenerativeReplay.retrain``."""
        return self.core.retrain(self._rows(self.real_data()))

    def sample(self, batch_size: int) -> ReplaySamples:
        """``floor(real_ratio * B + 0.5)`` rows from your buffer, the rest synthetic.

        Raises:
            ValueError: ``batch_size`` is not a positive int, or ``sample_real`` returned other than 5 fields.
        """
        n_real, n_syn = self.core.split(batch_size)
        if n_real:
            real = torch.from_numpy(self._rows(self.sample_real(n_real))).to(self.device)
        else:
            real = torch.empty(0, self.store_layout.dim, device=self.device)
        return self.core.batch(real, n_syn)

    def stats(self) -> dict:
        """As ``GenerativeReplay.stats()`` (num_real is not known here)."""
        return self.core.stats()


def _as_array(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real-valued, got dtype {arr.dtype}")
    return arr
