"""TransitionDiffusion: fit an EDM on flat float rows [N, D] and sample new rows (the SynthER engine)."""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import SynthERConfig
from .denoiser import build_denoiser, count_parameters
from .edm import EDMPrecond, edm_loss_from_noise, heun_sample, sigma_schedule
from .ema import EMA, EMA_WARMUP, ema_decay_at  # noqa: F401  (ema_decay_at, EMA_WARMUP: their old home)
from .guidance import (ConditionalEDMPrecond, GuidedDenoiser, build_conditional_denoiser, cond_edm_loss_from_noise,
                       dropout_keep)
from .manual_grad import edm_loss_and_grads_unchecked
from .normalizer import Normalizer, constant_columns
from .relevance import ScoreStats, check_scores, draw_conditions, top_fraction
from .train_step import choose_train_step, compiled, matmul_autocast  # noqa: F401  (compiled: old home)
from .validation import positive_int, non_negative_int

log = logging.getLogger(__name__)

FORMAT = "synther_buffer.TransitionDiffusion"
FORMAT_VERSION = 1


class DiffusionTrainingError(RuntimeError):
    """A fit diverged (non-finite loss) or produced non-finite samples; the previous model is kept."""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Raises:
        ValueError: ``device`` is not a device string, or names CUDA where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use 'auto' or 'cpu')")
    return dev


def available_device(device: str, what: str = "checkpoint") -> str:
    """``device``, or ``"cpu"`` (with a warning) when it names CUDA and CUDA is not available here.

    What a saved model or buffer does with the device its config names: a file written on a GPU
    machine still loads on a CPU-only one.

    Args:
        device: a device string from a saved config (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        what: names the thing being loaded, for the warning.

    Returns:
        The device string to use.
    """
    if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("%s was saved for %s; CUDA is not available, loading on CPU", what, device)
        return "cpu"
    return device


# The messages of a failed CPU allocation: c10's DefaultCPUAllocator on Linux / macOS and on Windows.
_CPU_ALLOC_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure, on any device.

    ``torch.OutOfMemoryError`` (CUDA and other accelerators), Python's ``MemoryError`` (numpy), or
    the ``RuntimeError`` torch raises when a CPU allocation fails, recognised by the allocator's own
    message. Any other ``RuntimeError`` is not.

    Args:
        error: the exception to classify.

    Returns:
        True for an allocation failure.
    """
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _CPU_ALLOC_MESSAGES)


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively (CUDA: ``torch.cuda.is_bf16_supported``; CPU:
    oneDNN's check for AVX512-BF16 / AMX). Elsewhere bfloat16 is emulated: correct, but slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


# A warm fit keeps the previous normaliser only while the data still fits it: every modelled column's
# mean within WARM_MAX_MEAN of the old standardised units and its std within a factor WARM_MAX_STD_RATIO.
# Past that the fit is a full one (normaliser refitted). The limits are the range measured to work,
# rounded up, not a measured failure point: on policy-sorted HalfCheetah data (a drift like an improving
# agent's: normalised means up to 1.4, stds up to 5.1x) warm fits on the kept normaliser beat from-scratch
# fits at every retrain (benchmarks/WARM_START.md); beyond it, the known-safe full fit.
WARM_MAX_MEAN = 2.0
WARM_MAX_STD_RATIO = 6.0


def warm_normalizer(previous: Normalizer, x: np.ndarray) -> Normalizer:
    """The normaliser of a warm fit on ``x``: ``previous``'s mean and std, kept (so the network's inputs
    and outputs mean what they meant: the previous model's function, on any data, is where the fit
    starts), with the constant columns found again in ``x`` (``sample`` writes those back exactly).

    A column constant in ``x`` takes the mean and std a full fit gives it, so it trains on 0 as in a
    full fit: under the kept ones its one value could sit any number of old stds away, a target that
    would dominate the loss although ``sample`` overwrites the column anyway.

    Refitting the mean and std instead measured worse: the EMA, continued from the previous one, then
    averages weights that worked in two different coordinate systems (benchmarks/WARM_START.md).

    Args:
        previous: the fitted model's normaliser (not modified).
        x: the warm fit's rows [N, D].

    Returns:
        A new ``Normalizer``.
    """
    out = copy.deepcopy(previous)
    fresh = copy.deepcopy(previous).fit(x)
    out.constant, out.constant_value = fresh.constant, fresh.constant_value
    out.mean = np.where(fresh.constant, fresh.mean, out.mean).astype(np.float32)
    out.std = np.where(fresh.constant, fresh.std, out.std).astype(np.float32)
    return out


def normalizer_drift(normalizer: Normalizer, x: np.ndarray) -> Optional[str]:
    """Why ``normalizer`` (fitted on older data) no longer fits rows ``x``, or None when it does.

    Judged per modelled column (terminal and skip columns, and columns constant in ``x``, are not): the
    mean of ``x`` in the normaliser's units within ``WARM_MAX_MEAN``, its std within a factor
    ``WARM_MAX_STD_RATIO`` of 1.

    Args:
        normalizer: the fitted model's normaliser.
        x: the rows of the next fit [N, D].

    Returns:
        None when a warm fit may keep ``normalizer``, else the first column that moved too far, in words.
    """
    # x's mean and std in the normaliser's units, without a normalised copy of x
    mean = (x.mean(axis=0, dtype=np.float64) - normalizer.mean) / normalizer.std
    std = x.std(axis=0, dtype=np.float64) / normalizer.std
    judged = np.ones(normalizer.dim, dtype=bool)
    judged[list(normalizer.terminal_dims) + list(normalizer.skip_dims)] = False
    judged &= ~constant_columns(x)   # warm_normalizer gives these a full fit's mean and std
    for j in np.flatnonzero(judged):
        if abs(mean[j]) > WARM_MAX_MEAN:
            return f"column {j}'s mean moved {mean[j]:+.2f} stds (limit {WARM_MAX_MEAN:g})"
        if not 1 / WARM_MAX_STD_RATIO <= std[j] <= WARM_MAX_STD_RATIO:
            return f"column {j}'s std changed {std[j]:.2f}x (limit {WARM_MAX_STD_RATIO:g}x)"
    return None


def warm_network(previous: nn.Module) -> nn.Module:
    """A trainable copy of ``previous`` (a fitted ``EDMPrecond``): where a warm fit starts.

    The copy owns its tensors (``previous`` stays untouched, even if the fit fails) and is in
    training mode with gradients on.

    Args:
        previous: the network to copy.

    Returns:
        The copy.
    """
    model = copy.deepcopy(previous)   # parameters are cloned (views of a flat buffer become compact tensors)
    return model.requires_grad_(True).train()


class TransitionDiffusion:
    """A diffusion model over transition vectors: ``fit(x)`` on real rows, ``sample(n)`` new ones.

    Every ``fit`` trains a fresh network from scratch (seed D.2), keeping an EMA of the weights that
    ``sample`` uses; with ``config.warm_start`` a fit after the first continues from the current
    weights instead (see ``fit``). The previous network stays in place until the new fit succeeds.

    Args:
        dim: row width D, e.g. obs + action + reward + next_obs (+ terminal).
        config: hyperparameters. ``None`` means ``SynthERConfig.for_device("auto")``: the ``"paper"``
            preset where CUDA is available, ``"fast"`` on CPU (the choice is logged once per process).
        terminal_dims: columns holding 0/1 terminals (left raw, rounded at 0.5 on output).
        skip_dims: columns left un-normalised (e.g. the reward, as in the reference DMC setup).
        conditional: condition the model on a scalar relevance score per row (Prioritized Generative
            Replay, ``synther_buffer/guidance.py``): ``fit(x, cond=scores)`` trains with condition
            dropout ``config.cond_dropout``; ``sample(n)`` generates with classifier-free guidance
            ``config.guidance_scale`` at conditions drawn from the top ``config.relevance_top_frac``
            of the scores it was fitted on. ``False`` (default): plain SynthER.

    Raises:
        ValueError: ``dim`` is not a positive int, ``config`` is not a ``SynthERConfig``, its device
            is not available, or a terminal / skip column is out of range.
    """

    def __init__(self, dim: int, config: Optional[SynthERConfig] = None, *,
                 terminal_dims: Sequence[int] = (), skip_dims: Sequence[int] = (), conditional: bool = False):
        self.dim = positive_int("dim", dim)
        self.conditional = bool(conditional)
        self.score_stats: Optional[ScoreStats] = None   # conditional: normalisation of the fitted scores
        self.top_scores: Optional[np.ndarray] = None    # conditional: the top fraction of the fitted scores
        self.config = config if config is not None else SynthERConfig.for_device("auto")
        if not isinstance(self.config, SynthERConfig):
            raise ValueError(f"config must be a SynthERConfig, got {type(self.config).__name__}")
        self.device = resolve_device(self.config.device)
        if self.config.precision == "bf16" and not bf16_is_native(self.device):
            log.warning("precision='bf16' on %s, which has no native bfloat16 matmuls: it works, but "
                        "slower than 'fp32'", self.device)
        self.normalizer = Normalizer(self.dim, terminal_dims, skip_dims)
        self.model = self._build_network(self.config.seed)     # trained weights
        self.ema = copy.deepcopy(self.model).requires_grad_(False)  # weights used for sampling
        self.fitted = False
        self.fit_count = 0
        self.sample_calls = 0
        self.last_fit: dict = {}

    # ------------------------------------------------------------------ construction
    def _build_network(self, seed: int) -> EDMPrecond:
        c = self.config  # no global RNG: safe beside an agent drawing random numbers on another thread
        if self.conditional:
            net = build_conditional_denoiser(self.dim, c.width, c.depth, c.rff_dim, c.time_dim, seed=seed)
            return ConditionalEDMPrecond(net, c.sigma_data).to(self.device)
        net = build_denoiser(self.dim, c.width, c.depth, c.rff_dim, c.time_dim, seed=seed)
        return EDMPrecond(net, c.sigma_data).to(self.device)

    @property
    def num_params(self) -> int:
        """Trainable parameters of the denoiser (~6M at the paper preset for D ~ 40)."""
        return count_parameters(self.model)

    # ------------------------------------------------------------------ training
    def fit(self, x: np.ndarray, *, steps: Optional[int] = None, progress: Optional[bool] = None,
            cond=None, warm_start: Optional[bool] = None) -> dict:
        """Normalise ``x``, train a fresh denoiser on it, and keep it (with its EMA) for sampling.

        The training step is chosen once, from ``config.gradients``, ``param_layout`` and ``compile``
        (``synther_buffer/train_step.py``). The normaliser records the columns that are constant in
        ``x``; ``sample`` writes them back exactly.

        A warm fit (``warm_start``, default ``config.warm_start``, on a model that is already fitted or
        took a fitted model's weights with ``warm_start_from``) continues instead: training starts
        from the current weights, the EMA continues from the current EMA (its decay schedule where
        the last fit left it), the normaliser keeps its mean and std (``warm_normalizer``: the
        previous model's function is where training starts, on any data), and Adam starts fresh
        with a new cosine schedule over ``steps`` (default ``config.warm_steps(len(x))``). An unfitted
        model, or data that has moved too far from the normaliser (``normalizer_drift``), takes a
        full fit.

        Args:
            x: real rows [N, D], N >= 2, finite.
            steps: gradient steps (default ``config.train_steps_for(len(x))``: ``train_steps``, grown
                with the data when the config has a data-size rule; ``config.warm_steps(len(x))`` when warm).
            progress: show a progress bar (default ``config.progress``).
            cond: a conditional model's relevance scores, one per row (required there, refused
                otherwise); normalised here, and their top ``config.relevance_top_frac`` kept for
                ``sample``.
            warm_start: continue from the fitted model (``None``: ``config.warm_start``); ``False``
                trains from scratch whatever the config says.

        Returns:
            ``{"loss", "seconds", "steps", "batch_size", "compiled", "gradients", "warm", "warm_skipped",
            "first_loss", "ema_steps"}``: loss is the mean over the last logging window, first_loss the
            first step's; ema_steps the EMA schedule's step count after this fit (a warm fit continues
            the previous one's); compiled whether ``config.compile`` took effect; gradients ``"manual"``
            (``synther_buffer/manual_grad.py``) or ``"autograd"``; warm whether this fit continued
            from the previous model; warm_skipped, when a warm fit was asked for and the data had
            drifted from the normaliser, why (in words; else None).

        Raises:
            ValueError: ``x`` or ``steps`` is invalid (nothing changes).
            DiffusionTrainingError: the loss turned non-finite, or memory ran out (a CUDA out-of-memory
                error or a failed CPU allocation: the training batch is a hyperparameter, so a fit is
                not retried with a smaller one); the previous model is kept either way.
        """
        c = self.config
        x = self._check_rows(x)
        stats, cond_col = self._check_cond(cond, x.shape[0])
        warm = self.fitted and bool(c.warm_start if warm_start is None else warm_start)
        drift = normalizer_drift(self.normalizer, x) if warm else None
        if drift is not None:
            log.info("warm start skipped: the data has moved away from the normaliser (%s); a full fit", drift)
            warm = False
        if steps is None:
            steps = c.warm_steps(x.shape[0]) if warm else c.train_steps_for(x.shape[0])
        else:
            steps = positive_int("steps", steps)
        show = c.progress if progress is None else progress
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc="diffusion fit" + (" (warm)" if warm else ""), unit="step",
                   disable=not show, leave=False)
        failed = None
        try:
            model, ema, normalizer, last_loss, bs, train = self._train(x, steps, bar, cond_col, warm=warm)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            failed = f"{type(e).__name__}: {e}"  # raised below, once this frame's tensors are released
        finally:
            bar.close()
        if failed is not None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DiffusionTrainingError(f"out of memory while fitting {x.shape[0]} rows ({failed}); "
                                         "previous model kept")

        self.model, self.ema, self.normalizer = model.eval(), ema.module.eval(), normalizer
        if stats is not None:
            self.score_stats, self.top_scores = stats
        self.fitted = True
        self.fit_count += 1
        self.last_fit = {"loss": last_loss, "seconds": time.perf_counter() - t0, "steps": steps,
                         "batch_size": bs, "compiled": train.compiled, "gradients": train.gradients,
                         "warm": warm, "warm_skipped": drift, "first_loss": train.first_loss,
                         "ema_steps": (self._ema_steps() if warm else 0) + steps}
        log.info("diffusion fit%s: %d steps, batch %d, loss %.4f, %.1fs", " (warm)" if warm else "", steps, bs,
                 last_loss, self.last_fit["seconds"])
        return dict(self.last_fit)

    def _train(self, x: np.ndarray, steps: int, bar, cond: Optional[np.ndarray] = None, warm: bool = False) -> tuple:
        """The training run of ``fit``, touching nothing of ``self`` but its config, device and counters
        (a warm run copies the current weights, EMA and normaliser; it changes none of them).

        Returns:
            ``(model, ema, normalizer, last_loss, batch_size, train_step)``; ``train_step.first_loss``
            is the first step's loss.

        Raises:
            DiffusionTrainingError: the loss turned non-finite.
        """
        c = self.config
        normalizer = warm_normalizer(self.normalizer, x) if warm else copy.deepcopy(self.normalizer).fit(x)
        data = torch.as_tensor(normalizer.normalize(x.astype(np.float32)), device=self.device)
        if cond is not None:   # a conditional model: the normalised score rides along as one more column
            data = torch.cat([data, torch.as_tensor(cond, device=self.device)], dim=1)
        n, bs = data.shape[0], c.batch_size_for(x.shape[0])
        seed = c.seed + 7919 * self.fit_count
        model = warm_network(self.model) if warm else self._build_network(seed)
        train = choose_train_step(model, self._step_config(c), self.device, steps,
                                  losses=(edm_loss_and_grads_unchecked,
                                          cond_edm_loss_from_noise if self.conditional else edm_loss_from_noise))
        if warm:   # the average continues from the current one, its decay from where the last fit left it
            ema = EMA(self.ema, c.ema_decay, every=c.ema_every, flat=train.flat,
                      start_step=self._ema_steps())
        else:
            ema = EMA(model, c.ema_decay, every=c.ema_every, flat=train.flat)
        gen = torch.Generator(device=self.device).manual_seed(seed)

        log_every = max(1, min(200, steps // 20))
        loss_sum = torch.zeros((), device=self.device)
        window, last_loss = 0, float("nan")
        model.train()
        for step in range(1, steps + 1):
            idx = torch.randint(n, (bs,), device=self.device, generator=gen)
            # index_select, not data[idx]: fancy indexing opens a parallel region, which stalls on a
            # busy machine (benchmarks/THROUGHPUT.md)
            batch = data.index_select(0, idx)
            rnd_normal = torch.randn(bs, 1, device=self.device, generator=gen)   # edm_loss's draws,
            unit_noise = torch.randn(bs, self.dim, device=self.device, generator=gen)  # same order
            if cond is not None:   # condition dropout: the null condition with probability cond_dropout
                batch = torch.cat([batch, dropout_keep(bs, c.cond_dropout, gen, self.device)], dim=1)
            loss = train(batch, rnd_normal, unit_noise)
            if step == 1:
                train.first_loss = float(loss)   # one host sync per fit: where training started from
            loss_sum += loss
            window += 1
            ema.update(step, train.params, last=step == steps)
            if step % log_every == 0 or step == steps:
                last_loss = (loss_sum / window).item()  # the one host sync per logging window
                loss_sum.zero_()
                window = 0
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{last_loss:.4f}")
                if not np.isfinite(last_loss):
                    raise DiffusionTrainingError(
                        f"diffusion loss became {last_loss} by step {step}/{steps}; previous model kept")
        train.close()
        ema.copy_buffers(model)  # buffers (RFF frequencies) are not parameters: copy them too
        return model, ema, normalizer, last_loss, bs, train

    def _check_cond(self, cond, n: int):
        """``((ScoreStats, top scores), normalised scores [n, 1])`` for a conditional fit, ``(None, None)``
        for an unconditional one.

        Raises:
            ValueError: scores missing for a conditional model, given to an unconditional one, or
                unusable (``relevance.RelevanceError``: NaN / inf, the wrong count).
        """
        if not self.conditional:
            if cond is not None:
                raise ValueError("cond given to an unconditional TransitionDiffusion (build it with conditional=True)")
            return None, None
        if cond is None:
            raise ValueError("a conditional TransitionDiffusion needs cond: one relevance score per row of x")
        scores = check_scores(cond, n, "relevance scores (cond)")
        stats = ScoreStats.fit(scores)
        return (stats, top_fraction(scores, self.config.relevance_top_frac)), stats.normalize(scores)[:, None]

    def _step_config(self, c: SynthERConfig) -> SynthERConfig:
        """The config the training step is chosen from: a conditional model trains by autograd (the
        hand-written gradients do not cover the condition MLP; ``gradients="manual"`` still warns)."""
        if self.conditional and c.gradients == "auto":
            return c.replace(gradients="autograd")
        return c

    def sample_conditions(self, n: int, seed: int) -> np.ndarray:
        """``n`` conditioning values (raw scores) drawn uniformly from the top ``config.relevance_top_frac``
        of the scores the model was fitted on, as PGR draws them.

        Raises:
            RuntimeError: the model is not a fitted conditional one.
        """
        if not self.conditional or self.top_scores is None:
            raise RuntimeError("sample_conditions needs a conditional TransitionDiffusion fitted with scores")
        return draw_conditions(self.top_scores, n, seed)

    def _ema_steps(self) -> int:
        """Steps the current EMA has averaged over (its schedule's position); old files: the last fit's."""
        return int(self.last_fit.get("ema_steps", self.last_fit.get("steps", 0)))

    def warm_start_from(self, previous: Union["TransitionDiffusion", dict]) -> bool:
        """Take a fitted model's weights, EMA and normaliser, so that the next warm ``fit`` continues
        from them (``config.warm_start``; the benchmark and the online pool use this).

        Nothing changes unless ``previous`` is fitted and of this model's layout: same width ``dim``,
        terminal and skip columns, and parameter shapes (width, depth, RFF and time dims).

        Args:
            previous: a ``TransitionDiffusion`` or its ``state_dict()`` (e.g. from a checkpoint or a
                Ray object store), on any device.

        Returns:
            True when taken; False (logged at INFO, with the reason) when the next fit must be a full one.
        """
        state = previous.state_dict() if isinstance(previous, TransitionDiffusion) else previous
        reason = self._warm_mismatch(state)
        if reason is not None:
            log.info("warm start not possible (%s): the next fit trains from scratch", reason)
            return False
        model = self._build_network(self.config.seed)
        model.load_state_dict(state["model"])
        ema = copy.deepcopy(model).requires_grad_(False)
        ema.load_state_dict(state["ema"])
        self.model, self.ema = model.eval(), ema.eval()
        self.normalizer = Normalizer.from_state_dict(state["normalizer"])
        self._load_scores(state)   # a conditional model samples before its next fit as the previous one did
        self.fitted = True
        self.fit_count = int(state["fit_count"])
        self.last_fit = dict(state["last_fit"])
        return True

    def _load_scores(self, state: dict) -> None:
        """A conditional model's fitted score normalisation and top scores from ``state`` (a ``state_dict()``)."""
        if not self.conditional:
            return
        stats = state.get("score_stats")
        self.score_stats = None if stats is None else ScoreStats(stats["mean"], stats["std"])
        top = state.get("top_scores")
        self.top_scores = None if top is None else top.numpy().astype(np.float32)

    def _warm_mismatch(self, state: dict) -> Optional[str]:
        """Why ``state`` (a ``state_dict()``) cannot seed a warm fit of this model; None when it can."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            return "not a TransitionDiffusion state"
        if not state.get("fitted"):
            return "the previous model was never fitted"
        if state["dim"] != self.dim:
            return f"row width {state['dim']} != {self.dim}"
        norm = state["normalizer"]
        if (tuple(norm["terminal_dims"]), tuple(norm["skip_dims"])) != (self.normalizer.terminal_dims,
                                                                        self.normalizer.skip_dims):
            return "terminal or skip columns differ"
        mine = self.model.state_dict()
        theirs = state["model"]
        if set(mine) != set(theirs) or any(tuple(mine[k].shape) != tuple(theirs[k].shape) for k in mine):
            return "the network's shape differs (width, depth, rff_dim or time_dim)"
        return None

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, *, batch_size: Optional[int] = None, seed: Optional[int] = None,
               progress: Optional[bool] = None, sampler: Optional[str] = None,
               sample_steps: Optional[int] = None, cond=None,
               guidance_scale: Optional[float] = None) -> np.ndarray:
        """Draw ``n`` new rows with the EMA network.

        Sampling runs in batches, so only one batch of intermediate states is alive at a time. When
        memory runs out (a CUDA out-of-memory error, or a failed CPU allocation) the batch size is
        halved and sampling starts over from the first row with the same seed, so the rows returned
        are exactly those a call with the smaller ``batch_size`` gives (batches are equal-sized, so
        a batch that fits is almost always the first). Each fallback logs a warning.

        Columns that were constant in the data ``fit`` saw come back as exactly that constant.

        Args:
            n: rows to draw (0 allowed).
            batch_size: rows per batch (default ``config.sample_batch_size``, else 100K on CUDA and
                16K on CPU).
            seed: fixes the noise; by default each call uses ``config.seed`` and a call counter.
            progress: show a progress bar (default ``config.progress``).
            sampler: overrides ``config.sampler`` for this call (e.g. to trade fidelity for speed).
            sample_steps: overrides ``config.sample_steps`` for this call.
            cond: a conditional model's conditions: a score, or one per row (raw scale, as passed to
                ``fit``). Default: drawn from the top ``config.relevance_top_frac`` of the fitted
                scores (``sample_conditions``). Refused by an unconditional model.
            guidance_scale: a conditional model's guidance weight w (default ``config.guidance_scale``):
                D = D_uncond + w (D_cond - D_uncond); 0 is the unconditional model.

        Returns:
            float32 numpy [n, D], un-normalised, terminal columns in {0, 1}.

        Raises:
            RuntimeError: the model was never fitted (or loaded fitted).
            ValueError: an argument is invalid.
            DiffusionTrainingError: the samples are not finite.
            torch.OutOfMemoryError, MemoryError, RuntimeError: memory runs out even one row at a time.
        """
        if not self.fitted:
            raise RuntimeError("TransitionDiffusion.sample() called before fit() (or load())")
        n = non_negative_int("n", n)
        c = self.config
        if sampler is not None or sample_steps is not None:  # validated like any config change
            c = c.replace(**{k: v for k, v in (("sampler", sampler), ("sample_steps", sample_steps))
                             if v is not None})
        batch_size = positive_int("batch_size", batch_size, optional=True)
        bs = batch_size or c.sample_batch_size or (100_000 if self.device.type == "cuda" else 16_384)
        show = c.progress if progress is None else progress
        if seed is None:
            seed = c.seed + 1_000_003 * (self.sample_calls + 1)
        guided = self._guidance(n, cond, guidance_scale, int(seed))
        self.sample_calls += 1
        out = np.empty((n, self.dim), dtype=np.float32)  # outside the retry: its size does not shrink
        while True:
            failed = None
            try:
                self._sample_into(out, c, bs, int(seed), show, *guided)
                break
            except Exception as e:
                if bs == 1 or not is_out_of_memory(e):
                    raise
                failed = f"{type(e).__name__}: {str(e)[:300]}"
            # here, outside the handler, the failed batch's tensors are released
            bs = max(1, bs // 2)
            log.warning("out of memory while sampling (%s); starting over with batch size %d", failed, bs)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if not np.isfinite(out).all():
            raise DiffusionTrainingError("diffusion samples contain non-finite values")
        return out

    def _guidance(self, n: int, cond, guidance_scale, seed: int) -> tuple:
        """``(normalised conditions [n, 1] or None, w)`` for ``sample``; ``(None, 0.0)`` when unguided.

        Raises:
            ValueError: ``cond`` / ``guidance_scale`` given to an unconditional model, or invalid.
        """
        if not self.conditional:
            if cond is not None or guidance_scale is not None:
                raise ValueError("cond and guidance_scale need a conditional TransitionDiffusion")
            return None, 0.0
        w = self.config.guidance_scale if guidance_scale is None else \
            self.config.replace(guidance_scale=guidance_scale).guidance_scale
        if w == 0.0:
            return None, 0.0
        if self.score_stats is None:
            raise RuntimeError("this conditional TransitionDiffusion has no fitted scores to guide with")
        if cond is None:   # PGR: uniform over the top fraction of the real scores; not the torch stream
            raw = self.sample_conditions(n, seed + 17)
        else:
            raw = np.asarray(cond, dtype=np.float64)
            raw = check_scores(np.broadcast_to(raw, (n,)) if raw.ndim == 0 else raw, n, "cond")
        return self.score_stats.normalize(raw)[:, None], w

    def _sample_into(self, out: np.ndarray, c: SynthERConfig, bs: int, seed: int, show: bool,
                     cond: Optional[np.ndarray] = None, w: float = 0.0) -> None:
        """Fill ``out`` [n, D] with samples drawn ``bs`` rows at a time from a generator seeded ``seed``
        (guided by normalised conditions ``cond`` [n, 1] with weight ``w`` when given)."""
        n = out.shape[0]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        sigmas = sigma_schedule(c.sample_steps, c.sigma_min, c.sigma_max, c.rho)
        stochastic = c.sampler == "stochastic"
        bar = tqdm(total=-(-n // bs) * c.sample_steps, desc="diffusion sample", unit="step",
                   disable=not show, leave=False)
        try:
            with torch.inference_mode(), matmul_autocast(self.device, c.precision):
                net = self._sampling_network(c.precision)
                for start in range(0, n, bs):
                    b = min(bs, n - start)
                    noise = torch.randn(b, self.dim, device=self.device, generator=gen)
                    denoise = net if cond is None else \
                        GuidedDenoiser(net, torch.as_tensor(cond[start:start + b], device=self.device), w)
                    x = heun_sample(denoise, noise, sigmas,
                                    s_churn=c.s_churn if stochastic else 0.0,
                                    s_tmin=c.s_tmin, s_tmax=c.s_tmax, s_noise=c.s_noise,
                                    generator=gen, on_step=lambda _: bar.update(1))
                    out[start:start + b] = self.normalizer.unnormalize(x).cpu().numpy()
                    bar.set_postfix(rows=start + b)
        finally:
            bar.close()

    def _sampling_network(self, precision: str) -> nn.Module:
        """The EMA network, or for ``"bf16"`` a copy of it whose Linear weights and biases are cast to
        bfloat16 once (autocast would re-cast them on every network evaluation: its weight cache skips
        parameters that do not require grad). Under autocast that is the same computation.
        """
        if precision != "bf16":
            return self.ema
        net = copy.deepcopy(self.ema)
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.to(torch.bfloat16)
        return net

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything needed to sample again; tensors and plain python only (``weights_only`` safe)."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "dim": self.dim,
                "config": self.config.to_dict(), "normalizer": self.normalizer.state_dict(),
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "fitted": self.fitted, "fit_count": self.fit_count, "sample_calls": self.sample_calls,
                "last_fit": dict(self.last_fit), **self._conditional_state()}

    def _conditional_state(self) -> dict:
        """A conditional model's extra state (none for an unconditional one: its files are as before)."""
        if not self.conditional:
            return {}
        return {"conditional": True,
                "score_stats": None if self.score_stats is None else self.score_stats.state_dict(),
                "top_scores": None if self.top_scores is None else torch.from_numpy(self.top_scores.copy())}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``state_dict()`` to ``path`` atomically (temp file + rename): a kill mid-save keeps the
        old file. Parent directories are created."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    @classmethod
    def from_state_dict(cls, state: dict, device: Optional[str] = None) -> "TransitionDiffusion":
        """Rebuild from ``state_dict()``.

        Args:
            state: what ``state_dict()`` returned (files from earlier versions of the package too:
                config fields added since take their defaults).
            device: overrides the saved config's device; a CUDA checkpoint loads on the CPU (with a
                warning) when CUDA is not available.

        Raises:
            ValueError: ``state`` is not a TransitionDiffusion checkpoint of this format version.
        """
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not a synther_buffer TransitionDiffusion checkpoint")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported checkpoint version {state.get('version')!r}")
        cfg = SynthERConfig.from_dict(state["config"])
        cfg = cfg.replace(device=available_device(cfg.device) if device is None else device)
        norm = Normalizer.from_state_dict(state["normalizer"])
        if norm.dim != state["dim"]:
            raise ValueError(f"normalizer dim {norm.dim} != model dim {state['dim']}")
        obj = cls(state["dim"], cfg, terminal_dims=norm.terminal_dims, skip_dims=norm.skip_dims,
                  conditional=bool(state.get("conditional", False)))
        obj.normalizer = norm
        obj._load_scores(state)
        obj.model.load_state_dict(state["model"])
        obj.ema.load_state_dict(state["ema"])
        obj.model.eval()
        obj.ema.eval()
        obj.fitted = bool(state["fitted"])
        obj.fit_count = int(state["fit_count"])
        obj.sample_calls = int(state["sample_calls"])
        obj.last_fit = dict(state["last_fit"])
        return obj

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Optional[str] = None) -> "TransitionDiffusion":
        """Load a file written by ``save`` through ``torch.load(weights_only=True)``: no arbitrary code runs.

        Args:
            path: the file.
            device: as in ``from_state_dict``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: a truncated, tampered or foreign file (the message names the path).
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # pickle errors, zip errors, weights_only refusals
            raise ValueError(f"could not load TransitionDiffusion from {path}: {type(e).__name__}: {e}") from None
        try:
            return cls.from_state_dict(state, device=device)
        except (KeyError, TypeError, RuntimeError, AttributeError) as e:
            raise ValueError(f"corrupt TransitionDiffusion checkpoint {path}: {type(e).__name__}: {e}") from None

    # ------------------------------------------------------------------ helpers
    def _check_rows(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [N, {self.dim}], got {x.shape}")
        if x.shape[0] < 2:
            raise ValueError(f"x needs at least 2 rows to fit, got {x.shape[0]}")
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"x must be numeric, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(f"x has non-finite values (first at row {bad[0]}, column {bad[1]})")
        too_big = np.abs(x) > np.finfo(np.float32).max   # finite here, inf once cast for training
        if too_big.any():
            bad = np.argwhere(too_big)[0]
            raise ValueError(f"x has values beyond float32's range, which the model trains in (first at row "
                             f"{bad[0]}, column {bad[1]}: {x[bad[0], bad[1]]:g})")
        return x

    def __repr__(self) -> str:
        c = self.config
        return (f"TransitionDiffusion(dim={self.dim}, width={c.width}, depth={c.depth}, "
                f"params={self.num_params:,}, device={self.device}, fitted={self.fitted}"
                f"{', conditional=True' if self.conditional else ''})")


# ---------------------------------------------------------------------------- removed module switches
_REMOVED_SWITCHES = {
    "MANUAL_GRADIENTS": ("SynthERConfig(gradients='manual' | 'autograd' | 'auto')", True),
    "FLAT_MAX_PARAMS_CPU": ("SynthERConfig(param_layout='flat' | 'per_tensor' | 'auto')", 1_000_000),
}


def _removed_switch_warning(name: str) -> None:
    warnings.warn(f"synther_buffer.diffusion.{name} is no longer read: the training step is chosen per "
                  f"fit from the config, {_REMOVED_SWITCHES[name][0]}", DeprecationWarning, stacklevel=3)


def __getattr__(name: str):
    if name in _REMOVED_SWITCHES:
        _removed_switch_warning(name)
        return _REMOVED_SWITCHES[name][1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Module(types.ModuleType):
    """This module, warning when code assigns one of the removed switches (it would have no effect)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _REMOVED_SWITCHES:
            _removed_switch_warning(name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Module
