"""SynthER for torchrl: a replay-buffer ``Transform`` that makes a ``TensorDictReplayBuffer`` return mixed batches.

    from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
    from synther_buffer.torchrl import SynthERTransform

    storage = LazyTensorStorage(1_000_000)
    synther = SynthERTransform(storage, obs_dim, action_dim, config=SynthERConfig.preset("fast"),
                               action_bounds=(low, high))          # the scale your actions are stored at
    rb = TensorDictReplayBuffer(storage=storage, batch_size=256, transform=synther)
    rb.extend(collector_batch)          # counts env steps toward the SynthER schedule
    batch = rb.sample()                 # first half real, second half synthetic; batch["synthetic"] marks them

The real transitions stay in the buffer's own storage. torchrl calls a replay-buffer transform's
inverse on ``extend`` / ``add`` (before the data is written) and its forward on each ``sample`` (on
the gathered batch); this transform counts the transitions on the way in and, on the way out,
overwrites the last ``B - floor(real_ratio * B + 0.5)`` rows of each batch with synthetic
transitions in torchrl's keys, shapes and dtypes. A retrain that falls due during ``extend`` runs at
the next ``sample`` (the newest transitions are in the storage only once ``extend`` has written
them), on every transition the storage holds. The retrain schedule, diffusion model, synthetic pool
and batch split are a ``synther_buffer.mixing.MixingCore`` (``transform.core``), as in every buffer
of the package. Needs the ``torchrl`` extra (``torchrl>=0.14,<0.15``, ``tensordict>=0.14.3,<0.15``).
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import numpy as np
import torch

from .extras import require

require("torchrl", "torchrl", "synther_buffer.torchrl (SynthERTransform)")
from tensordict import TensorDictBase  # noqa: E402  (tensordict comes with torchrl)
from torchrl.envs.transforms import Transform  # noqa: E402

from .config import SynthERConfig  # noqa: E402
from .mixing import MixingCore  # noqa: E402
from .pool import LogFn  # noqa: E402

__all__ = ["SynthERTransform"]

log = logging.getLogger(__name__)

READ_CHUNK = 4096   # storage entries read at once when collecting the real rows for a retrain


def _as_key(*parts) -> Union[str, tuple]:
    """A tensordict key from ``parts`` (strings or nested keys): ``"observation"`` or ``("next", "reward")``."""
    flat = tuple(p for part in parts for p in (part if isinstance(part, (list, tuple)) else (part,)))
    return flat[0] if len(flat) == 1 else flat


class SynthERTransform(Transform):
    """A torchrl replay-buffer transform: SynthER's schedule on ``extend``, mixed batches on ``sample``.

    Args:
        storage: the replay buffer's storage (the same object passed as ``storage=``), read at each
            retrain: every transition in it is real data for the diffusion model. A 1-D storage
            (``LazyTensorStorage(n)``, ``LazyMemmapStorage(n)``, ``ListStorage`` of tensordicts).
        obs_dim: flat observation size (``observation`` is [..., obs_dim]).
        action_dim: flat action size (``action`` is [..., action_dim]).
        config: ``SynthERConfig``; None: ``SynthERConfig.for_device("auto")`` (``paper`` on CUDA,
            ``fast`` on CPU).
        model_terminals: as in ``GenerativeReplay`` (``"auto"``: decided at the first retrain from
            the stored terminals).
        action_bounds: ``(low, high)`` synthetic actions are clipped to, at the scale the actions
            are stored (torchrl stores what the policy passed to the env: often the env's own
            bounds, ``(spec.low, spec.high)`` of its action spec). None (default): no clipping.
            Each retrain warns when real actions lie outside them.
        observation_key, action_key: root keys of the observation and action.
        reward_key, terminated_key, done_key, truncated_key: keys under ``"next"``. The terminal
            the model learns is ``("next", terminated_key)`` (``done_key`` where the data has no
            terminated entry): a truncation is not a terminal.
        synthetic_key: a bool [B] entry written into each sampled batch, True on synthetic rows.
        log_fn: ``log_fn(key, value)`` for the retrain metrics.

    Raises:
        ValueError: a bad dimension, ``config`` or ``model_terminals`` (named).

    Each sampled batch (1-D, ``B`` rows): the first ``floor(real_ratio * B + 0.5)`` rows are what
    the sampler drew; the rest are replaced by synthetic transitions (all rows real before the
    first retrain): ``observation``, ``action``, ``("next", "observation")``, ``("next",
    "reward")``, ``("next", "terminated")`` and ``("next", "done")`` (the modelled terminal),
    ``("next", "truncated")`` False, and the root ``done`` / ``terminated`` / ``truncated`` False
    where present, each in the stored entry's dtype and trailing shape. Other entries of a
    synthetic row (``index``, priorities, ``collector`` ids, pixels) still hold the replaced real
    row's values: a prioritized sampler's ``update_priority`` would credit them to that real row,
    so mask them with ``batch[synthetic_key]``. torchrl's ``rb.dumps`` / ``rb.loads`` and
    ``rb.state_dict`` / ``load_state_dict`` carry the SynthER state (model, pool, schedule) through
    ``get_extra_state``; the config is not saved (build the transform with the same one).
    """

    def __init__(self, storage, obs_dim: int, action_dim: int, config: Optional[SynthERConfig] = None, *,
                 model_terminals: Union[bool, str] = "auto", action_bounds: Optional[tuple] = None,
                 observation_key="observation", action_key="action", reward_key="reward",
                 terminated_key="terminated", done_key="done", truncated_key="truncated",
                 synthetic_key="synthetic", log_fn: Optional[LogFn] = None):
        super().__init__(in_keys=[], out_keys=[])
        if getattr(storage, "ndim", 1) != 1:
            raise ValueError(f"SynthERTransform needs a 1-D storage (one transition per index), got ndim="
                             f"{storage.ndim}; store flattened transitions (collector batches reshape(-1))")
        capacity = getattr(storage, "max_size", None)
        self.core = MixingCore(obs_dim, action_dim, config, model_terminals, capacity=capacity, log_fn=log_fn,
                               action_bounds=action_bounds)
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.__dict__["_storage"] = storage   # plain reference, not a submodule or buffer
        self.observation_key, self.action_key = _as_key(observation_key), _as_key(action_key)
        self.reward_key, self.synthetic_key = _as_key(reward_key), _as_key(synthetic_key)
        self.terminated_key, self.done_key, self.truncated_key = (
            _as_key(terminated_key), _as_key(done_key), _as_key(truncated_key))
        self._due = False

    @property
    def storage(self):
        """The replay buffer's storage that retrains read."""
        return self.__dict__["_storage"]

    # ------------------------------------------------------------------ extend: the schedule
    def _inv_call(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Count the transitions being written (``extend`` / ``add``); the data passes unchanged."""
        self._fields(tensordict, "extend")  # validate before the buffer stores it
        n = int(tensordict.numel())
        num_real = len(self.storage) + n
        if getattr(self.storage, "max_size", None) is not None:
            num_real = min(num_real, int(self.storage.max_size))
        self._due = self.core.step(n, num_real) or self._due
        return tensordict

    def retrain(self) -> bool:
        """Retrain the diffusion model now on every transition in the storage. True on success.

        Raises:
            RuntimeError: fewer than 2 stored transitions, or a background retrain is running.
        """
        self._due = False
        return self.core.retrain(self.real_rows())

    def real_rows(self) -> np.ndarray:
        """Every stored transition as store rows concat(obs, action, reward, next_obs, terminal) [N, D] float32."""
        n = len(self.storage)
        if n == 0:
            return np.zeros((0, self.core.store_layout.dim), dtype=np.float32)
        parts = []
        for start in range(0, n, READ_CHUNK):   # chunks: other entries (pixels, ...) are read a chunk at a time
            data = self.storage.get(torch.arange(start, min(n, start + READ_CHUNK)))
            if isinstance(data, (list, tuple)):  # a ListStorage returns its items
                data = torch.stack(list(data))
            fields = self._fields(data.reshape(-1), "storage")
            parts.append(torch.cat([f.detach().to("cpu", torch.float32) for f in fields], dim=1).numpy())
        return np.concatenate(parts)

    def _fields(self, td: TensorDictBase, where: str) -> list:
        """The five fields of ``td`` flattened to [N, width] (obs, action, reward, next_obs, terminal)."""
        n = int(td.numel())
        terminal_key = _as_key("next", self.terminated_key)
        if terminal_key not in td.keys(True):
            terminal_key = _as_key("next", self.done_key)
        spec = (("observation", self.observation_key, self.obs_dim), ("action", self.action_key, self.action_dim),
                ("reward", _as_key("next", self.reward_key), 1),
                ("next observation", _as_key("next", self.observation_key), self.obs_dim),
                ("terminal", terminal_key, 1))
        out = []
        for name, key, width in spec:
            value = td.get(key, None)
            if value is None:
                raise ValueError(f"SynthERTransform ({where}): the data has no {name} entry {key!r}; keys: "
                                 f"{sorted(map(str, td.keys(True, True)))}")
            if value.numel() != n * width:
                raise ValueError(f"SynthERTransform ({where}): {key!r} has shape {tuple(value.shape)} for "
                                 f"{n} transitions, expected {width} value(s) each")
            out.append(value.reshape(n, width))
        return out

    # ------------------------------------------------------------------ sample: the mix
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Replace the synthetic share of a sampled batch (running a retrain first when one is due)."""
        if self._due:
            if len(self.storage) >= self.core.min_real:
                self.retrain()
        if tensordict.ndim != 1:
            raise ValueError(f"SynthERTransform mixes 1-D batches, got batch size {tuple(tensordict.batch_size)}")
        batch = int(tensordict.batch_size[0])
        n_real, n_syn = self.core.split(batch)
        mark = torch.zeros(batch, dtype=torch.bool, device=tensordict.device)
        if n_syn:
            mark[n_real:] = True
            obs, action, reward, next_obs, term = self.core.store_layout.split(self.core.synthetic_rows(n_syn))
            false = torch.zeros(n_syn, dtype=torch.bool)
            nxt = lambda key: _as_key("next", key)  # noqa: E731
            required = {self.observation_key: obs, self.action_key: action, nxt(self.observation_key): next_obs,
                        nxt(self.reward_key): reward}
            optional = {nxt(self.terminated_key): term > 0.5, nxt(self.done_key): term > 0.5,
                        nxt(self.truncated_key): false, self.done_key: false, self.terminated_key: false,
                        self.truncated_key: false}
            for key, syn in [*required.items(), *optional.items()]:
                real = tensordict.get(key, None)
                if real is None:
                    if key in required:
                        raise ValueError(f"SynthERTransform: the sampled batch has no {key!r} entry")
                    continue
                syn = syn.to(device=real.device, dtype=real.dtype).reshape(n_syn, *real.shape[1:])
                tensordict.set(key, torch.cat([real[:n_real], syn], dim=0))
        tensordict.set(self.synthetic_key, mark)
        return tensordict

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict:
        """The SynthER state for torch's ``state_dict`` (so torchrl's ``rb.dumps`` / ``rb.state_dict`` keep it).

        Holds the diffusion model, the synthetic pool, the schedule counters and a retrain still
        due; ``weights_only``-safe (torchrl's ``rb.loads`` reads it with ``torch.load``). The config
        is not saved: build the transform with the same one before ``rb.loads`` / ``load_state_dict``.
        """
        return {"obs_dim": self.obs_dim, "action_dim": self.action_dim, "due": self._due, **self.core.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Restore what ``get_extra_state`` returned (called by ``load_state_dict``; ``rb.loads``).

        Raises:
            ValueError: the state is for other observation / action sizes.
        """
        if (state["obs_dim"], state["action_dim"]) != (self.obs_dim, self.action_dim):
            raise ValueError(f"the saved SynthER state is for obs_dim={state['obs_dim']}, action_dim="
                             f"{state['action_dim']}; this transform has {self.obs_dim}, {self.action_dim}")
        self.core.load_state_dict(state["pool"], state.get("terminal_column"))
        self._due = bool(state["due"])

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        """As ``GenerativeReplay.stats()``, with ``num_real`` the storage's length."""
        return self.core.stats(num_real=len(self.storage))

    def wait(self) -> bool:
        """Block until a background retrain finishes; True if a pool was swapped in."""
        return self.core.pool.wait()

    def __repr__(self) -> str:
        s = self.core.stats()
        return (f"{type(self).__name__}(obs_dim={self.obs_dim}, action_dim={self.action_dim}, "
                f"retrains={s['retrain_count']}, num_synthetic={s['num_synthetic']})")
