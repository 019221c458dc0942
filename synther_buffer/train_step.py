"""The training step of ``TransitionDiffusion.fit``, chosen once per fit from the config.

A step takes one batch (and its two noise draws) to a loss, writes the gradients, and takes the
clipped Adam step and the cosine schedule's step. Two strategies compute the gradients:

* :class:`ManualGradStep`: by hand (``synther_buffer/manual_grad.py``), written straight into the
  parameters' gradient buffers; only for a denoiser whose structure ``manual_grad`` verifies;
* :class:`AutogradStep`: ``loss.backward()``, for any network (under ``torch.autocast`` for bf16).

Either one's loss function can run through ``torch.compile`` (``SynthERConfig.compile``), falling back
to eager with a warning if compilation fails on the first step. Either one keeps the parameters as
views of one flat buffer (``synther_buffer/flat.py``: clipping, Adam and the EMA each one op) or one
tensor per layer (``SynthERConfig.param_layout``). :func:`choose_train_step` makes these choices.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, List, Tuple

import torch
from torch import nn

from .config import SynthERConfig
from .denoiser import count_parameters
from .flat import clipped_adam_step, flatten_parameters
from .manual_grad import structure_mismatch

log = logging.getLogger(__name__)

# On CPU, "auto" flattens autograd's parameters only up to this size: above it, backward's in-place
# accumulation into the flat gradient costs more memory traffic than the per-layer clip / Adam calls
# it saves (benchmarks/THROUGHPUT.md). The hand-written gradients are written, not accumulated, and
# CUDA pays per kernel launch: both always use the flat buffer under "auto".
FLAT_MAX_PARAMS_CPU = 1_000_000

_COMPILED: dict = {}
_WARNED: set = set()   # fallback reasons already logged (once per process each)

LossFn = Callable[..., torch.Tensor]


def compiled(fn: LossFn) -> LossFn:
    """``fn`` through ``torch.compile``, built once per process.

    Every fit trains a fresh network of the same shapes: it reuses the compiled code instead of
    recompiling. Shapes are static (one fit has one batch shape; a new shape recompiles rather than
    running a slower dynamic kernel).
    """
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def fused_adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam with one fused kernel for all parameters where torch has one, else the foreach version."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True)


def matmul_autocast(device: torch.device, precision: str):
    """The context the denoiser's forward passes run in.

    Returns:
        ``torch.autocast`` to bfloat16 for ``precision == "bf16"``, a no-op context for ``"fp32"``.
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainStep:
    """One optimisation step of the EDM loss: loss and gradients, clipped Adam, schedule.

    Subclasses say how the gradients are computed (``_loss_and_grads``). Call the step with a batch;
    call ``close`` after the last one.

    Args:
        model: the ``EDMPrecond`` network to train (its parameters are re-seated when ``flat``).
        config: ``lr``, ``grad_clip``, ``p_mean``, ``p_std``, ``compile`` and ``precision`` are read.
        device: where ``model`` lives.
        total_steps: the length of the cosine schedule.
        loss_fn: the eager loss function the strategy calls (see the subclass).
        flat: parameters and gradients as views of one buffer.

    Attributes:
        gradients: ``"manual"`` or ``"autograd"``: the strategy's name (``fit``'s report).
        params: what Adam steps and the EMA follows: ``[flat buffer]`` or the parameters in order.
        flat: whether ``params`` is one flat buffer.
        compiled: whether the loss runs compiled (``False`` again after a failed compilation).
    """

    gradients = ""
    first_loss = float("nan")   # the fit records its first step's loss here

    def __init__(self, model: nn.Module, config: SynthERConfig, device: torch.device, total_steps: int, *,
                 loss_fn: LossFn, flat: bool):
        self.model = model
        self.flat = flat
        self.params: List[torch.Tensor] = ([flatten_parameters(model, with_grads=True)] if flat
                                           else list(model.parameters()))
        self.opt = fused_adam(self.params, config.lr)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total_steps)
        self.grad_clip = config.grad_clip
        self.p_mean, self.p_std = config.p_mean, config.p_std
        self.eager_fn = loss_fn
        self.compiled = config.compile
        # the first call decides between the compiled and the eager function
        self.loss_fn: LossFn = self._first_call if config.compile else loss_fn

    def __call__(self, batch: torch.Tensor, rnd_normal: torch.Tensor, unit_noise: torch.Tensor) -> torch.Tensor:
        """Train on one batch.

        Args:
            batch: normalised rows [B, dim].
            rnd_normal: standard normal draws [B, 1] (the noise level's).
            unit_noise: standard normal noise [B, dim].

        Returns:
            The batch's loss (a detached scalar tensor; no host sync).
        """
        loss = self._loss_and_grads(batch, rnd_normal, unit_noise)
        clipped_adam_step(self.opt, self.params, self.grad_clip)  # clip_grad_norm_ + Adam, one pass less
        self.sched.step()
        return loss

    def close(self) -> None:
        """Drop the gradient buffers (the trained weights stay)."""
        self.model.zero_grad(set_to_none=True)

    def _loss_and_grads(self, batch, rnd_normal, unit_noise) -> torch.Tensor:
        raise NotImplementedError

    def _first_call(self, *args, **kwargs) -> torch.Tensor:
        """Compile on the first step; if that fails, warn and keep training eagerly (same draws)."""
        fn = compiled(self.eager_fn)
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            log.warning("torch.compile failed (%s: %s); this fit trains eagerly", type(e).__name__, e)
            self.compiled, self.loss_fn = False, self.eager_fn
            return self.eager_fn(*args, **kwargs)
        self.loss_fn = fn
        return out


class ManualGradStep(TrainStep):
    """Gradients by hand: ``loss_fn`` is ``manual_grad.edm_loss_and_grads_unchecked`` (or a function
    of its signature) and writes every gradient into ``p.grad``. bf16 is its ``matmul_dtype``."""

    gradients = "manual"

    def __init__(self, model: nn.Module, config: SynthERConfig, device: torch.device, total_steps: int, *,
                 loss_fn: LossFn, flat: bool):
        super().__init__(model, config, device, total_steps, loss_fn=loss_fn, flat=flat)
        if not flat:  # the unchecked function writes into existing gradient tensors
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        self.matmul_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32

    def _loss_and_grads(self, batch, rnd_normal, unit_noise) -> torch.Tensor:
        return self.loss_fn(self.model, batch, rnd_normal, unit_noise, self.p_mean, self.p_std,
                            matmul_dtype=self.matmul_dtype)


class AutogradStep(TrainStep):
    """Gradients by autograd: ``loss_fn`` is ``edm.edm_loss_from_noise`` (or a function of its
    signature), run under ``matmul_autocast`` for bf16, then ``backward``."""

    gradients = "autograd"

    def __init__(self, model: nn.Module, config: SynthERConfig, device: torch.device, total_steps: int, *,
                 loss_fn: LossFn, flat: bool):
        super().__init__(model, config, device, total_steps, loss_fn=loss_fn, flat=flat)
        self.autocast = matmul_autocast(device, config.precision)

    def _loss_and_grads(self, batch, rnd_normal, unit_noise) -> torch.Tensor:
        with self.autocast:
            loss = self.loss_fn(self.model, batch, rnd_normal, unit_noise, self.p_mean, self.p_std)
        if self.flat:
            self.params[0].grad.zero_()  # backward accumulates into the views of this buffer
        else:
            self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()


def resolve_gradients(model: nn.Module, requested: str) -> str:
    """``"manual"`` or ``"autograd"`` for ``SynthERConfig.gradients == requested`` on ``model``.

    ``"auto"`` and ``"manual"`` mean the hand-written gradients when ``manual_grad.structure_mismatch``
    finds nothing; otherwise autograd, logged once per process and reason at WARNING.

    Raises:
        ValueError: ``requested`` is not one of ``config.GRADIENTS``.
    """
    if requested == "autograd":
        return "autograd"
    if requested not in ("auto", "manual"):
        raise ValueError(f"gradients must be 'auto', 'manual' or 'autograd', got {requested!r}")
    reason = structure_mismatch(model)
    if reason is None:
        return "manual"
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("hand-written gradients do not fit this denoiser (%s); training with autograd", reason)
    return "autograd"


def resolve_flat(layout: str, gradients: str, device: torch.device, num_params: int) -> bool:
    """Whether ``SynthERConfig.param_layout == layout`` means one flat parameter buffer.

    Raises:
        ValueError: ``layout`` is not one of ``config.PARAM_LAYOUTS``.
    """
    if layout == "auto":
        return gradients == "manual" or device.type == "cuda" or num_params <= FLAT_MAX_PARAMS_CPU
    if layout not in ("flat", "per_tensor"):
        raise ValueError(f"param_layout must be 'auto', 'flat' or 'per_tensor', got {layout!r}")
    return layout == "flat"


def choose_train_step(model: nn.Module, config: SynthERConfig, device: torch.device, total_steps: int, *,
                      losses: Tuple[LossFn, LossFn]) -> TrainStep:
    """The step a fit of ``model`` uses, from ``config.gradients``, ``param_layout`` and ``compile``.

    Args:
        model: the freshly built ``EDMPrecond`` network.
        config: the fit's configuration.
        device: where ``model`` lives.
        total_steps: the fit's number of steps (the cosine schedule's length).
        losses: ``(hand-written loss-and-gradients function, autograd loss function)``:
            ``manual_grad.edm_loss_and_grads_unchecked`` and ``edm.edm_loss_from_noise``.

    Returns:
        A :class:`ManualGradStep` or :class:`AutogradStep`, ready to call.
    """
    gradients = resolve_gradients(model, config.gradients)
    flat = resolve_flat(config.param_layout, gradients, device, count_parameters(model))
    manual_loss, autograd_loss = losses
    cls, fn = (ManualGradStep, manual_loss) if gradients == "manual" else (AutogradStep, autograd_loss)
    return cls(model, config, device, total_steps, loss_fn=fn, flat=flat)
