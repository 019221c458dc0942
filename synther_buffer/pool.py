"""SyntheticPool: the retrain schedule, the diffusion model and the pool of synthetic transitions.

Used through ``synther_buffer.mixing.MixingCore`` by every buffer: whoever owns the real data calls
``step(n)`` as transitions arrive and ``retrain(rows)`` when ``due``; ``sample(k)`` draws synthetic
rows. Rows follow ``synther_buffer.layout.RowLayout``: concat(obs, action, reward, next_obs[, terminal]).

A retrain's work is :func:`build_pool` (fit, generate, clip, filter). Where it runs is
``config.retrain_backend``: ``"thread"`` in this process, ``"ray"`` in a Ray actor
(``synther_buffer.distributed.RemoteRetrainer``). Whether the caller waits for it is
``config.async_retrain``, for either backend: synchronous, the caller blocks until the new pool is
installed; in the background, a thread runs the work (or, for Ray, waits for the actor's answer and
rebuilds the model here) and ``poll()`` swaps the result in at the next ``due`` / ``sample`` /
``stats``. ``state_dict()`` (checkpoints, pickling) waits for a retrain in flight, remote or not.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .config import SynthERConfig
from .diffusion import DiffusionTrainingError, TransitionDiffusion, available_device, resolve_device
from .layout import RowLayout, TransitionLayout  # TransitionLayout: deprecated, still importable from here
from .relevance import (SYNTHETIC_SCORE_ROWS, CallableRelevance, CuriosityRelevance, Relevance, RelevanceError,
                        make_relevance, relevance_from_state)

log = logging.getLogger(__name__)

LogFn = Callable[[str, float], None]
CHUNK_ROWS = 65_536  # rows per block when filtering / compacting a generated pool (no pool-sized temporaries)


def check_action_bounds(low, high, action_dim: int, name: str = "action") -> Tuple[np.ndarray, np.ndarray]:
    """Action (or observation) bounds as two float32 arrays of ``action_dim`` values; +-inf allowed.

    Args:
        low, high: scalars or ``action_dim`` values each.
        action_dim: the width of the bounded field.
        name: the field, for the messages (``"action"``, ``"observation"``).

    Returns:
        ``(low, high)`` broadcast to ``action_dim`` (copies).

    Raises:
        ValueError: they do not broadcast, or low <= high fails somewhere (NaN never satisfies it).
    """
    try:
        low, high = (np.broadcast_to(np.asarray(b, dtype=np.float32), (action_dim,)).copy() for b in (low, high))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} bounds must be scalars or {action_dim} values each, got {low!r}, {high!r}") from e
    if not (low <= high).all():
        raise ValueError(f"{name} bounds need low <= high (NaN is neither), got {low.tolist()} and {high.tolist()}")
    return low, high


def retrain_seed(seed: int, retrain_index: int) -> int:
    """The seed of retrain ``retrain_index`` of a run seeded ``seed`` (weights, batches, sampling noise).

    ``seed`` itself for the first retrain; after it, a number from numpy's ``SeedSequence((seed, index))``,
    so that no two (run seed, retrain) pairs share a stream (with ``seed + index``, run 1's first
    retrain would repeat run 0's second, and seeds of a benchmark would not be independent).
    """
    if retrain_index == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(retrain_index)]).generate_state(1)[0])


def model_for(layout: RowLayout, config: SynthERConfig, conditional: bool = False) -> TransitionDiffusion:
    """A fresh ``TransitionDiffusion`` for rows of ``layout``.

    The terminal column (if any) is left raw, and the reward column is not normalised unless
    ``config.normalize_reward``. Used by the online pool and by offline ``upsample``.

    Args:
        layout: the rows' layout.
        config: the diffusion hyperparameters (and ``normalize_reward``).
        conditional: a relevance-conditioned model (Prioritized Generative Replay).

    Returns:
        An untrained model of width ``layout.dim``.
    """
    skip = () if config.normalize_reward else (layout.reward_col,)
    return TransitionDiffusion(layout.dim, config, terminal_dims=layout.terminal_dims, skip_dims=skip,
                               conditional=conditional)


class SyntheticPool:
    """The online SynthER schedule (seed D.2) around a ``TransitionDiffusion`` and a synthetic pool.

    Args:
        layout: the layout of the rows the model is fitted on (and the pool holds).
        config: ``retrain_every``, ``synthetic_size``, ``num_generate``, ``min_real``,
            ``normalize_reward``, ``outlier_std``, ``async_retrain``, ``retrain_backend`` and the diffusion
            hyperparameters.
        log_fn: ``log_fn(key, value)`` called with the retrain metrics (SB3's logger.record, say).

    Raises:
        MissingExtraError: ``config.retrain_backend="ray"`` without Ray installed.
    """

    def __init__(self, layout: RowLayout, config: SynthERConfig, log_fn: Optional[LogFn] = None):
        self.layout = layout
        self.config = config
        self.device = resolve_device(config.device)
        self.log_fn = log_fn
        self.model: Optional[TransitionDiffusion] = None
        self.pool: Optional[torch.Tensor] = None   # [num_synthetic, D] on self.device
        self.env_steps = 0
        self.next_retrain = config.retrain_every
        self.retrain_count = 0
        self.last_retrain_env_step = -1   # env step whose data the current pool was trained on
        self.failed_retrains = 0
        self.num_filtered = 0
        self.last_train_loss = float("nan")
        self.last_fit_seconds = 0.0
        self.last_generate_seconds = 0.0
        self.rng = np.random.default_rng(config.seed)
        self.min_real = config.min_real   # owners clamp this to their capacity
        self.action_low: Optional[np.ndarray] = None    # synthetic actions are clipped to these
        self.action_high: Optional[np.ndarray] = None
        self.obs_low: Optional[np.ndarray] = None       # synthetic obs and next_obs are clipped to these
        self.obs_high: Optional[np.ndarray] = None      # (None: no finite bound)
        self.num_obs_clipped = 0                        # synthetic rows whose obs or next_obs was clipped
        # relevance-guided generation (PGR): the score function, and the mean scores of the last pool
        self.relevance: Optional[Relevance] = make_relevance(config, layout, str(self.device))
        self.relevance_mean_real = float("nan")
        self.relevance_mean_synthetic = float("nan")
        self._guide: dict = {}   # the relevance work of the retrain being built (captured at submission)
        self.last_fit_warm = False   # whether the installed model continued the previous one (warm_start)
        self.warm_retrains = 0       # installed retrains that were warm
        self.warm_skipped = 0        # installed retrains asked to be warm that took a full fit instead
        self.last_warm_skipped: Optional[str] = None   # why the last installed one did (None: it did not)
        self._worker: Optional[threading.Thread] = None
        self._job: Optional[dict] = None
        self.remote = None   # synther_buffer.distributed.RemoteRetrainer for retrain_backend="ray"
        if config.retrain_backend == "ray":   # without Ray: MissingExtraError naming the extra, here
            from .distributed import RemoteRetrainer
            self.remote = RemoteRetrainer()

    def set_ray_actor_options(self, **options) -> None:
        """Where the retrain actor runs (``retrain_backend="ray"``): Ray actor options.

        E.g. ``num_gpus=1``, ``num_cpus=4``, ``resources={"diffusion": 1}``, ``memory=...`` or a
        ``scheduling_strategy``. The default asks for 1 CPU, plus 1 GPU when the cluster has GPUs
        and ``config.device`` is not ``"cpu"``. Takes effect at the next retrain (a running actor
        with other options is replaced then).

        Args:
            **options: keyword arguments of Ray's ``ActorClass.options``.

        Raises:
            ValueError: the pool's ``config.retrain_backend`` is not ``"ray"``.
        """
        if self.remote is None:
            raise ValueError("set_ray_actor_options needs SynthERConfig.retrain_backend='ray'")
        self.remote.set_options(options)

    def set_action_bounds(self, low, high) -> None:
        """Clip the action columns of generated rows to [low, high] (e.g. the env's action space)."""
        self.action_low, self.action_high = check_action_bounds(low, high, self.layout.action_dim)

    def set_obs_bounds(self, low, high) -> None:
        """Clip the obs and next_obs columns of the pools installed from now on to [low, high].

        Infinite entries bound nothing; bounds with no finite entry turn clipping off. Rows clipped
        are counted in ``stats()["num_obs_clipped"]``.

        Args:
            low, high: scalars or ``obs_dim`` values each (e.g. a Box observation space's).

        Raises:
            ValueError: they do not broadcast, or low <= high fails somewhere.
        """
        low, high = check_action_bounds(low, high, self.layout.obs_dim, name="observation")
        finite = np.isfinite(low).any() or np.isfinite(high).any()
        self.obs_low, self.obs_high = (low, high) if finite else (None, None)

    def set_relevance_fn(self, fn) -> None:
        """Guide generation by ``fn``'s scores of the real transitions from the next retrain on (PGR).

        Args:
            fn: ``fn(batch) -> scores``: ``batch`` a ``ReplaySamples`` of CPU float32 tensors holding
                every real transition (``obs``, ``action``, ``reward`` [N], ``next_obs``,
                ``terminated`` [N]); one finite score per row back (numpy, tensor or list), e.g. the
                TD error under the agent's critic. It runs on the thread that adds transitions, when a
                retrain is submitted (and on up to 10K synthetic rows for ``relevance_mean_synthetic``).
                ``None`` goes back to ``config.relevance``.

        Raises:
            ValueError: ``fn`` is not callable, or ``config.retrain_backend`` is ``"ray"``.
        """
        if fn is None:
            self.relevance = make_relevance(self.config, self.layout, str(self.device))
            return
        if self.config.retrain_backend == "ray":
            raise ValueError("set_relevance_fn is not supported with retrain_backend='ray' yet")
        self.relevance = CallableRelevance(fn)

    def set_layout(self, layout: RowLayout) -> None:
        """Use ``layout`` for the next retrain (e.g. with the terminal column after all).

        Args:
            layout: the new layout, of the same observation and action widths.

        Raises:
            RuntimeError: a model is already installed or a background retrain is in flight (the
                pool's rows and the model's width follow the layout they were made with).
            ValueError: the widths differ.
        """
        if self.model is not None or self._worker is not None:
            raise RuntimeError("the row layout is fixed once a retrain has run or started")
        if (layout.obs_dim, layout.action_dim) != (self.layout.obs_dim, self.layout.action_dim):
            raise ValueError(f"layout {layout} does not match the pool's widths {self.layout}")
        self.layout = layout

    # ------------------------------------------------------------------ schedule
    @property
    def num_synthetic(self) -> int:
        """Rows in the synthetic pool (0 before the first retrain)."""
        return 0 if self.pool is None else int(self.pool.shape[0])

    def step(self, n: int) -> None:
        """Count ``n`` env steps (transitions added)."""
        self.env_steps += int(n)

    def due(self, num_real: int) -> bool:
        """Whether a retrain is due.

        Args:
            num_real: real transitions stored now.

        Returns:
            True when the env-step count has reached the next point of the schedule's grid
            (multiples of ``retrain_every``: with ``min_real`` above ``retrain_every`` the first retrain
            waits for the data and the second comes at the next multiple, not ``retrain_every`` after
            it) and ``num_real >= min_real`` (never while a background retrain is in flight).
        """
        self.poll()
        return (self._worker is None and self.env_steps >= self.next_retrain
                and num_real >= self.min_real)

    def retrain(self, rows: np.ndarray, background: Optional[bool] = None) -> bool:
        """Fit a fresh model on ``rows`` (all real data), then regenerate the pool (replacing it).

        With ``config.warm_start`` the fit continues from the installed model (its weights, EMA and
        normaliser, captured at submission; see ``TransitionDiffusion.fit``) for
        ``config.warm_steps(rows)`` steps; the first retrain, one after a layout change, and one whose
        data has moved far from the model's normaliser are full fits. The installed model is never
        modified: a failed warm retrain keeps it and its pool.

        Synchronous (the paper's schedule): a diverging fit or non-finite samples keeps the previous
        model and pool and logs a warning: the agent keeps training on the old pool. In the
        background the work runs in a thread on a copy of ``rows``; the new pool is swapped in by
        ``poll()`` (called from ``due`` / ``sample`` / ``stats``), and an unexpected error in the
        worker is raised by the next ``poll()``. The schedule moves on either way.

        With ``config.retrain_backend="ray"`` the same work (:func:`build_pool`) runs in a Ray actor
        (``synther_buffer.distributed.RemoteRetrainer``): ``rows`` go to the object store here, on
        the caller's thread, and the new model (its state dict) and pool come back the same way.
        Synchronous, the caller blocks until they are back; in the background a thread waits for
        them and ``poll()`` swaps them in as above. An actor that dies (killed, its node lost) is
        a failed retrain like a diverging fit: counted in ``failed_retrains``, the previous pool
        kept, and a fresh actor is started by the next retrain.

        Args:
            rows: [N, layout.dim] float32 rows of every real transition.
            background: run in the background (default ``config.async_retrain``).

        Returns:
            True on success (at once, for a background retrain); False when the fit failed.

        Raises:
            RuntimeError: a background retrain is already running.
        """
        self.poll()
        if self._worker is not None:
            raise RuntimeError("a background retrain is already running; call wait() first")
        # Schedule moves on whether or not this retrain succeeds (no retry storm on every add()).
        while self.next_retrain <= self.env_steps:
            self.next_retrain += self.config.retrain_every
        background = self.config.async_retrain if background is None else background
        # Everything the work needs is captured here, on the caller's thread: the worker reads no
        # counter the agent's thread moves on, and the recorded retrain step is the submission step.
        index, step, layout = self.retrain_count, self.env_steps, self.layout
        self._guide = self._relevance_job(rows, layout)   # a user's score function runs here, on this thread
        previous = self.model if self.config.warm_start else None   # a warm retrain starts from it
        if self.remote is not None:   # rows into the object store now; a thread only waits for the result
            call = self.remote.submit(self.config, rows, index, step, layout, self.action_low, self.action_high,
                                      device=self.device,
                                      previous=None if previous is None else _to_cpu(previous.state_dict()))
            if not background:
                return self._install(call.result())
            job = {"result": None, "error": None}

            def work():
                try:
                    job["result"] = call.result()
                except BaseException as e:  # re-raised in the caller by poll()
                    job["error"] = e
        else:
            if not background:
                return self._install(self._build(rows, index, step, layout, previous))
            job = {"rows": np.array(rows, copy=True), "result": None, "error": None}

            def work():
                try:
                    job["result"] = self._build(job.pop("rows"), index, step, layout, previous)
                except BaseException as e:  # re-raised in the caller by poll()
                    job["error"] = e

        self._job = job
        self._worker = threading.Thread(target=work, name="synther-retrain", daemon=True)
        self._worker.start()
        return True

    @property
    def retraining(self) -> bool:
        """True while a background retrain is running."""
        return self._worker is not None and self._worker.is_alive()

    def poll(self) -> bool:
        """Install a finished background retrain (atomic swap). True if a new pool was installed."""
        if self._worker is None or self._worker.is_alive():
            return False
        return self._finish()

    def wait(self) -> bool:
        """Block until an in-flight background retrain finishes and install it."""
        if self._worker is None:
            return False
        self._worker.join()
        return self._finish()

    def _finish(self) -> bool:
        self._worker.join()
        job, self._worker, self._job = self._job, None, None
        if job["error"] is not None:
            raise RuntimeError("SynthER background retrain crashed") from job["error"]
        return self._install(job["result"])

    def _build(self, rows: np.ndarray, retrain_index: int, env_step: int, lay: RowLayout,
               previous: Optional[TransitionDiffusion] = None) -> dict:
        """Fit + generate + filter, touching no shared state (safe in a worker thread): :func:`build_pool`."""
        return build_pool(self.config, rows, retrain_index, env_step, lay, self.action_low, self.action_high,
                          **self._guide, previous=previous)

    def _relevance_job(self, rows: np.ndarray, layout: RowLayout) -> dict:
        """What a retrain's build needs of the relevance function: ``{}`` for plain SynthER, else the
        function and, for a user's function (``on_caller``), the real rows' scores computed now.

        Raises:
            RelevanceError: the user's function raised or returned unusable scores (nothing changes
                but the schedule, which has moved on).
        """
        if self.relevance is None:
            return {}
        scores = self.relevance.score(rows, layout) if self.relevance.on_caller else None
        return {"relevance": self.relevance, "scores": scores}

    def _install(self, result: dict) -> bool:
        """Swap in a finished retrain's model and pool (or count a failed one); True if installed.

        A pool the outlier filter emptied counts as failed: the previous model and pool stay, rather
        than batches silently falling back to all real rows.
        """
        if result["error"] is None and len(result["pool"]) == 0:
            result = {**result, "error": f"the outlier filter removed all {result['filtered']} generated rows "
                                         f"(outlier_std={self.config.outlier_std})"}
        if result["error"] is not None:
            self.failed_retrains += 1
            log.warning("SynthER retrain at env step %d failed (%s); keeping the previous pool",
                        result["env_step"], result["error"])
            self._log("synther/failed_retrains", self.failed_retrains)
            return False
        fit, gen_seconds = result["fit"], result["gen_seconds"]
        self.num_filtered += result["filtered"]
        if self.obs_low is not None:   # here, not in the build: the owner's bounds, whatever built the pool
            self.num_obs_clipped += clip_observations(result["pool"], self.layout, self.obs_low, self.obs_high)
        # Atomic swap: readers see either the old pool or the complete new one.
        self.model, self.pool = result["model"], torch.from_numpy(result["pool"]).to(self.device)
        self.retrain_count += 1
        self.last_retrain_env_step = result["env_step"]
        self.last_train_loss = fit["loss"]
        self.last_fit_seconds = fit["seconds"]
        self.last_generate_seconds = gen_seconds
        self._install_relevance(result)
        self.last_fit_warm = bool(fit.get("warm", False))
        self.warm_retrains += int(self.last_fit_warm)
        self.last_warm_skipped = None
        if self.config.warm_start and self.retrain_count > 1 and not self.last_fit_warm:
            self.last_warm_skipped = fit.get("warm_skipped") or "the previous model could not be continued"
            self.warm_skipped += 1
            log.info("SynthER retrain %d: a full fit instead of a warm one (%s)", self.retrain_count,
                     self.last_warm_skipped)
        self._log("synther/fit_warm", float(self.last_fit_warm))
        for k, v in (("diffusion_loss", fit["loss"]), ("fit_seconds", fit["seconds"]),
                     ("generate_seconds", gen_seconds), ("num_synthetic", self.num_synthetic),
                     ("num_real", result["num_real"]), ("retrain_count", self.retrain_count),
                     ("num_filtered", self.num_filtered)):
            self._log(f"synther/{k}", v)
        log.info("SynthER retrain %d (data up to env step %d): loss %.4f, %sfit %.1fs, generate %.1fs, pool %d",
                 self.retrain_count, result["env_step"], fit["loss"], "warm " if self.last_fit_warm else "",
                 fit["seconds"], gen_seconds, self.num_synthetic)
        return True

    def _install_relevance(self, result: dict) -> None:
        """Keep a retrain's trained relevance model; score the new pool (up to ``SYNTHETIC_SCORE_ROWS``
        rows, with the same function) and log the mean scores of the real and the synthetic rows."""
        rel = result.get("relevance")
        if rel is None:
            self.relevance_mean_real = self.relevance_mean_synthetic = float("nan")
            return
        if isinstance(rel, CuriosityRelevance) and isinstance(self.relevance, CuriosityRelevance):
            self.relevance = rel   # the trained copy (a user's set_relevance_fn meanwhile wins)
        self.relevance_mean_real = result["relevance_mean_real"]
        pool = result["pool"][:SYNTHETIC_SCORE_ROWS]
        try:
            self.relevance_mean_synthetic = float(rel.score(pool, self.layout).mean()) if len(pool) else float("nan")
        except RelevanceError as e:
            log.warning("scoring the synthetic pool failed (%s)", e)
            self.relevance_mean_synthetic = float("nan")
        self._log("synther/relevance_mean_real", self.relevance_mean_real)
        self._log("synther/relevance_mean_synthetic", self.relevance_mean_synthetic)

    def _in_range(self, synth: np.ndarray, real: np.ndarray, terminal: bool, chunk: int = CHUNK_ROWS) -> np.ndarray:
        """:func:`in_range` with this pool's ``config.outlier_std``."""
        return in_range(self.config.outlier_std, synth, real, terminal, chunk)

    # ------------------------------------------------------------------ sampling
    def sample(self, k: int) -> torch.Tensor:
        """``k`` synthetic rows [k, D] on the pool's device (uniform with replacement).

        Raises:
            RuntimeError: the pool is empty (no retrain yet).
        """
        self.poll()
        if self.pool is None or self.num_synthetic == 0:
            raise RuntimeError("the synthetic pool is empty (no retrain yet)")
        idx = torch.from_numpy(self.rng.integers(0, self.num_synthetic, size=k)).to(self.device)
        return self.pool.index_select(0, idx)  # not pool[idx]: see diffusion.fit

    def split_batch(self, batch_size: int) -> tuple:
        """``(n_real, n_synthetic)`` for a batch of ``batch_size``.

        ``n_real = floor(real_ratio * batch_size + 0.5)``; all real while the pool is empty.
        """
        self.poll()
        if self.num_synthetic == 0:
            return batch_size, 0
        n_real = int(np.floor(self.config.real_ratio * batch_size + 0.5))
        return n_real, batch_size - n_real

    # ------------------------------------------------------------------ bookkeeping
    def stats(self) -> Dict[str, float]:
        """Schedule counters and the last retrain's metrics."""
        self.poll()
        return {"env_steps": self.env_steps, "num_synthetic": self.num_synthetic,
                "retrain_count": self.retrain_count, "last_retrain_env_step": self.last_retrain_env_step,
                "failed_retrains": self.failed_retrains,
                "num_filtered": self.num_filtered, "num_obs_clipped": self.num_obs_clipped,
                "next_retrain": self.next_retrain,
                "last_train_loss": self.last_train_loss, "last_fit_seconds": self.last_fit_seconds,
                "last_generate_seconds": self.last_generate_seconds, "real_ratio": self.config.real_ratio,
                "retraining": self.retraining, "last_fit_warm": self.last_fit_warm,
                "warm_retrains": self.warm_retrains, "warm_skipped": self.warm_skipped,
                "last_warm_skipped": self.last_warm_skipped, **self._relevance_stats()}

    def _relevance_stats(self) -> dict:
        """``relevance`` (the kind) and the mean scores of the last pool's real and synthetic rows, when
        generation is relevance-guided (none of it for plain SynthER)."""
        if self.relevance is None and not (self.model is not None and self.model.conditional):
            return {}
        return {"relevance": None if self.relevance is None else self.relevance.kind,
                "relevance_mean_real": self.relevance_mean_real,
                "relevance_mean_synthetic": self.relevance_mean_synthetic}

    def _log(self, key: str, value: float) -> None:
        if self.log_fn is not None:
            self.log_fn(key, value)

    _COUNTERS = ("env_steps", "next_retrain", "retrain_count", "last_retrain_env_step", "failed_retrains",
                 "num_filtered",
                 "last_train_loss", "last_fit_seconds", "last_generate_seconds")

    def state_dict(self) -> dict:
        """Counters, model weights and pool as CPU tensors / plain python (``weights_only`` safe).

        Waits for an in-flight background retrain first (a remote one too: ``retrain_backend="ray"``),
        so the checkpoint holds its pool and a resumed run does not redo it."""
        self.wait()
        state = {k: getattr(self, k) for k in self._COUNTERS}
        state["action_bounds"] = None if self.action_low is None else \
            [self.action_low.tolist(), self.action_high.tolist()]
        state["obs_bounds"] = None if self.obs_low is None else [self.obs_low.tolist(), self.obs_high.tolist()]
        state["num_obs_clipped"] = self.num_obs_clipped
        state["last_fit_warm"], state["warm_retrains"] = self.last_fit_warm, self.warm_retrains
        state["warm_skipped"], state["last_warm_skipped"] = self.warm_skipped, self.last_warm_skipped
        state["rng"] = json.dumps(self.rng.bit_generator.state)
        state["model"] = None if self.model is None else _to_cpu(self.model.state_dict())
        state["pool"] = None if self.pool is None else self.pool.cpu()
        if self.relevance is not None or (self.model is not None and self.model.conditional):
            state["relevance"] = None if self.relevance is None else self.relevance.state_dict()
            state["relevance_means"] = [self.relevance_mean_real, self.relevance_mean_synthetic]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; the model and pool move to this pool's device."""
        for k in self._COUNTERS:
            setattr(self, k, state[k])
        self.rng.bit_generator.state = json.loads(state["rng"])
        if state.get("action_bounds") is not None:
            self.set_action_bounds(*state["action_bounds"])
        if state.get("obs_bounds") is not None:   # absent in states saved before observation bounds
            self.set_obs_bounds(*state["obs_bounds"])
        self.num_obs_clipped = int(state.get("num_obs_clipped", 0))
        self.last_fit_warm = bool(state.get("last_fit_warm", False))   # absent in states saved before warm_start
        self.warm_retrains = int(state.get("warm_retrains", 0))
        self.warm_skipped = int(state.get("warm_skipped", 0))          # absent in states saved before it
        self.last_warm_skipped = state.get("last_warm_skipped")
        self.model = None if state["model"] is None else \
            TransitionDiffusion.from_state_dict(state["model"], device=str(self.device))
        self.pool = None if state["pool"] is None else state["pool"].to(self.device)
        self._load_relevance(state)

    def _load_relevance(self, state: dict) -> None:
        """Restore the relevance model and mean scores (a user's function is not saved: warn)."""
        saved = state.get("relevance")
        if saved is not None and saved.get("kind") == "custom":
            log.warning("this SynthER pool was guided by a custom relevance function, which is not saved: call "
                        "set_relevance_fn(fn) again, or later retrains follow config.relevance (%r)",
                        self.config.relevance)
        self.relevance = relevance_from_state(self.config, self.layout, saved, str(self.device))
        self.relevance_mean_real, self.relevance_mean_synthetic = (
            float(v) for v in state.get("relevance_means", [float("nan")] * 2))

    def __getstate__(self) -> dict:
        """Pickle-safe (SB3's save_replay_buffer): weights and pool on CPU, no callbacks."""
        return {"layout": self.layout, "config": self.config, "min_real": self.min_real, "state": self.state_dict()}

    def __setstate__(self, d: dict) -> None:
        layout = d["layout"]
        if isinstance(layout, TransitionLayout):  # pickled by version 0.1.0
            layout = layout.as_row_layout()
        config = d["config"]  # pickled on a CUDA machine, unpickled on one without: the CPU
        self.__init__(layout, config.replace(device=available_device(config.device, "the SynthER pool")))
        self.min_real = d.get("min_real", self.min_real)   # absent in pickles of version 0.1.0
        self.load_state_dict(d["state"])

    def set_progress(self, show: bool) -> None:
        """Show or hide the progress bars of later retrains (fit and generation): ``config.progress``
        for this pool and its current model. Waits for an in-flight background retrain first."""
        self.wait()
        self.config = self.config.replace(progress=bool(show))
        if self.model is not None:
            self.model.config = self.model.config.replace(progress=bool(show))

    def to_device(self, device: str) -> None:
        """Move the model and the pool to ``device`` and make it the config's (a run resumed elsewhere).

        Waits for an in-flight background retrain first. Later retrains fit on ``device``.

        Args:
            device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...

        Raises:
            ValueError: ``device`` is not a device, or names CUDA where there is none.
        """
        target = resolve_device(device)
        self.wait()
        self.config = self.config.replace(device=device)
        self.device = target
        if self.model is not None and self.model.device != target:
            self.model = TransitionDiffusion.from_state_dict(self.model.state_dict(), device=device)
        if isinstance(self.relevance, CuriosityRelevance):
            self.relevance = relevance_from_state(self.config, self.layout, self.relevance.state_dict(), device)
        if self.pool is not None:
            self.pool = self.pool.to(target)


def build_pool(config: SynthERConfig, rows: np.ndarray, retrain_index: int, env_step: int, layout: RowLayout,
               action_low: Optional[np.ndarray] = None, action_high: Optional[np.ndarray] = None,
               relevance: Optional[Relevance] = None, scores: Optional[np.ndarray] = None, *,
               previous: Union[TransitionDiffusion, dict, None] = None) -> dict:
    """One retrain's work: fit a fresh model on ``rows``, generate, clip and filter the new pool.

    With ``config.warm_start`` and a ``previous`` model of the same layout, the fit continues from a
    copy of it (``TransitionDiffusion.warm_start_from``; ``previous`` itself is not modified).

    Pure (no shared state, no global RNG), so it runs as well in a background thread as in a Ray
    actor (``synther_buffer.distributed``) given the same arguments.

    Args:
        config: the pool's config; the model is seeded with ``retrain_seed(config.seed, retrain_index)``.
        rows: [N, layout.dim] real rows (read only).
        retrain_index: how many retrains were installed before this one (picks the seed).
        env_step: the env step the retrain was submitted at (recorded with the result).
        layout: the rows' layout.
        action_low, action_high: clip the generated actions to these (None: no clipping).
        relevance: relevance-guided generation (PGR): the score function. A learning one (curiosity)
            is trained on a copy here (``Relevance.prepare``), returned as ``"relevance"``. None:
            plain SynthER.
        scores: the real rows' scores when already computed (a user's function), else computed here.
        previous: the installed model, or its ``state_dict()`` (what a Ray actor receives); None or
            ``config.warm_start`` off: a full fit.

    Returns:
        ``{"error": None, "env_step", "model", "pool", "filtered", "fit", "gen_seconds", "num_real"}``
        (plus ``"relevance"`` and ``"relevance_mean_real"`` when guided), or ``{"error": ..., "env_step"}``
        when the fit diverged, the samples were not finite or the relevance model failed (the caller
        keeps its previous pool).
    """
    cfg = config.replace(seed=retrain_seed(config.seed, retrain_index))
    model = model_for(layout, cfg, conditional=relevance is not None)
    if previous is not None and config.warm_start:
        model.warm_start_from(previous)   # False (a layout change): the fit below is a full one
    try:
        guided = {}
        if relevance is not None:   # PGR: train the relevance model, score the real rows, fit conditioned
            if scores is None:
                relevance = relevance.prepare(rows, layout, cfg.seed)
                scores = relevance.score(rows, layout)
            guided = {"relevance": relevance, "relevance_mean_real": float(np.mean(scores))}
        fit = model.fit(rows) if relevance is None else model.fit(rows, cond=scores)
        t0 = time.perf_counter()
        synth = model.sample(min(config.num_generate, config.synthetic_size))
        gen_seconds = time.perf_counter() - t0
    except (DiffusionTrainingError, RelevanceError) as e:
        return {"error": e, "env_step": env_step}
    if action_low is not None:
        cols = layout.action_cols
        np.clip(synth[:, cols], action_low, action_high, out=synth[:, cols])
    keep = in_range(config.outlier_std, synth, rows, layout.terminal)
    return {"error": None, "env_step": env_step, "model": model, "pool": _compact(synth, keep),
            "filtered": int((~keep).sum()), "fit": fit, "gen_seconds": gen_seconds, "num_real": rows.shape[0],
            **guided}


def in_range(outlier_std: Optional[float], synth: np.ndarray, real: np.ndarray, terminal: bool,
             chunk: int = CHUNK_ROWS) -> np.ndarray:
    """Mask of synthetic rows within ``outlier_std`` real stds of the real mean on every dim.

    Computed in chunks of ``chunk`` rows in float32, so a 1M-row pool needs no pool-sized temporaries.
    Constant real dimensions and the terminal column are not judged.

    Args:
        outlier_std: the bound in real standard deviations; None keeps every row.
        synth: [M, D] generated rows.
        real: [N, D] real rows.
        terminal: whether the last column is the terminal flag.
        chunk: rows judged at a time.

    Returns:
        A bool mask of length M (NaN rows are never kept).
    """
    if outlier_std is None:
        return np.ones(len(synth), dtype=bool)
    k = outlier_std
    mean = real.mean(axis=0, dtype=np.float64)
    std = real.std(axis=0, dtype=np.float64)
    judged = std >= 1e-6  # near-constant columns: a zero-width range would drop every row; not judged
    if terminal:
        judged[-1] = False
    lo = (mean - k * std)[judged].astype(np.float32)
    hi = (mean + k * std)[judged].astype(np.float32)
    keep = np.empty(len(synth), dtype=bool)
    for i in range(0, len(synth), chunk):
        block = synth[i:i + chunk][:, judged]
        keep[i:i + chunk] = ((block >= lo) & (block <= hi)).all(axis=1)
    return keep


def _compact(rows: np.ndarray, keep: np.ndarray, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """``rows[keep]`` in place: kept rows moved to the front chunk by chunk, a prefix view returned.

    No pool-sized copy (``rows[keep]`` would briefly hold the pool twice); the write position never
    passes the read position, so no unread row is overwritten.
    """
    if keep.all():
        return rows
    w = 0
    for i in range(0, len(rows), chunk):
        block = rows[i:i + chunk][keep[i:i + chunk]]  # a copy of at most one chunk
        rows[w:w + len(block)] = block
        w += len(block)
    return rows[:w]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def clip_observations(rows: np.ndarray, layout: RowLayout, low: np.ndarray, high: np.ndarray,
                      chunk: int = CHUNK_ROWS) -> int:
    """Clip the obs and next_obs columns of ``rows`` to [low, high] in place, ``chunk`` rows at a time.

    Args:
        rows: [M, layout.dim] generated rows.
        layout: their layout.
        low, high: ``obs_dim`` bounds each (+-inf: no bound there).
        chunk: rows clipped at a time (no pool-sized temporaries).

    Returns:
        How many rows had a value outside the bounds.
    """
    o, a = layout.obs_dim, layout.action_dim
    clipped = 0
    for i in range(0, len(rows), chunk):
        block = rows[i:i + chunk]
        outside = np.zeros(len(block), dtype=bool)
        for cols in (slice(0, o), slice(o + a + 1, 2 * o + a + 1)):
            part = block[:, cols]
            outside |= ((part < low) | (part > high)).any(axis=1)
            np.clip(part, low, high, out=part)
        clipped += int(outside.sum())
    return clipped
