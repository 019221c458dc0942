"""EMA: the exponential moving average of a network's weights that ``TransitionDiffusion`` samples with.

The schedule is the reference trainer's (``ema_pytorch``): for the first ``warmup`` steps the average
copies the weights (decay 0), then its decay grows as 1 - (1 + epoch)^(-2/3) up to ``max_decay``, so
the average forgets the random initialisation quickly and smooths more as training settles.
"""

from __future__ import annotations

import copy
from typing import List, Sequence

import torch
from torch import nn

from .flat import flatten_parameters
from .validation import finite_float, non_negative_int, positive_int

EMA_WARMUP = 100  # ema_pytorch's update_after_step: the EMA copies the weights until this step


def ema_decay_at(step: int, max_decay: float, warmup: int = EMA_WARMUP) -> float:
    """The decay of the update at training step ``step`` (1-based).

    Args:
        step: the training step just taken.
        max_decay: the decay the schedule grows towards and never exceeds.
        warmup: steps during which the decay is 0 (the average copies the weights).

    Returns:
        0 while epoch = step - warmup - 1 <= 0, else min(max_decay, 1 - (1 + epoch)^(-2/3)).
    """
    epoch = step - warmup - 1
    if epoch <= 0:
        return 0.0
    return min(max_decay, 1.0 - (1.0 + epoch) ** (-2.0 / 3.0))


class EMA:
    """A frozen copy of a network whose weights follow the trained ones as an exponential average.

    Every ``every``-th step, and on a fit's last (``last=True``), ``update(step, source)`` moves each
    averaged tensor towards its source:
    ema <- decay * ema + (1 - decay) * source, with decay = ``ema_decay_at(step, max_decay, warmup)``.

    Args:
        model: the network being trained; the EMA starts as a deep copy of it (taken now).
        max_decay: the largest decay (``SynthERConfig.ema_decay``), in [0, 1).
        every: update on steps that are multiples of ``every`` (``SynthERConfig.ema_every``), and the last.
        warmup: steps during which the update copies the weights.
        flat: keep the copy's parameters in one flat buffer (``flat.flatten_parameters``), so that an
            update is one op against a flat ``source`` of the same layout.
        start_step: the schedule's step before the first update: an average that continues a previous
            one (a warm-started fit, ``model`` being the previous average) passes the steps it has
            already seen, so its decay continues from there instead of copying the weights again.

    Attributes:
        module: the averaged network (``requires_grad`` off).
        params: the tensors ``update`` writes: one flat tensor, or ``module``'s parameters in order.
    """

    def __init__(self, model: nn.Module, max_decay: float, *, every: int = 1, warmup: int = EMA_WARMUP,
                 flat: bool = False, start_step: int = 0):
        self.max_decay = finite_float("max_decay", max_decay, low=0.0, high=1.0, high_open=True)
        self.every = positive_int("every", every)
        self.warmup = non_negative_int("warmup", warmup)
        self.start_step = non_negative_int("start_step", start_step)
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.params: List[torch.Tensor] = ([flatten_parameters(self.module, with_grads=False)] if flat
                                           else list(self.module.parameters()))

    def decay_at(self, step: int) -> float:
        """``ema_decay_at(start_step + step, max_decay, warmup)``."""
        return ema_decay_at(self.start_step + step, self.max_decay, self.warmup)

    def update(self, step: int, source: Sequence[torch.Tensor], *, last: bool = False) -> None:
        """After training step ``step``: average ``source`` in (a no-op unless ``every`` divides ``step``
        or ``last``).

        Args:
            step: the training step just taken (1-based).
            source: the trained tensors, matching ``params`` one to one (same shapes and layout).
            last: the fit's final step, averaged in whatever ``every`` says: a fit shorter than
                ``every`` would otherwise sample with weights it never trained, and any fit would drop
                its last ``step % every`` steps.
        """
        if last or step % self.every == 0:
            with torch.no_grad():
                torch._foreach_lerp_(self.params, list(source), 1.0 - self.decay_at(step))

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        """Copy ``model``'s buffers (non-trained state, e.g. the random Fourier frequencies) into ``module``."""
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
