"""Argument checks shared by the package: one place for "a positive int", "a finite number", "one of".

Each check returns the value as a plain Python ``int`` / ``float`` (numpy scalars accepted) or raises
``ValueError`` naming the argument, e.g. ``width must be a positive int, got 2.5``. ``bool`` is never
taken for a number.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Collection, Optional


def check_int(name: str, value: Any, *, minimum: Optional[int] = None, optional: bool = False) -> Optional[int]:
    """An integer (Python or numpy, not ``bool``), at least ``minimum`` when given.

    Args:
        name: the argument's name, as the error message should show it.
        value: what was passed.
        minimum: smallest accepted value; ``None`` accepts any integer.
        optional: accept ``None`` (returned as is).

    Returns:
        ``int(value)``, or ``None`` when ``optional`` and ``value`` is ``None``.

    Raises:
        ValueError: ``value`` is not such an integer.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        what = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {'None or ' if optional else ''}{what}, got {value!r}")
    return int(value)


def positive_int(name: str, value: Any, *, optional: bool = False) -> Optional[int]:
    """``check_int(name, value, minimum=1, optional=optional)``: an int >= 1."""
    return check_int(name, value, minimum=1, optional=optional)


def non_negative_int(name: str, value: Any, *, optional: bool = False) -> Optional[int]:
    """``check_int(name, value, minimum=0, optional=optional)``: an int >= 0."""
    return check_int(name, value, minimum=0, optional=optional)


def finite_float(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> Optional[float]:
    """A finite real number (int, float or numpy scalar; not ``bool``), inside the given bounds.

    Args:
        name: the argument's name, as the error message should show it.
        value: what was passed.
        low, high: bounds, inclusive unless ``low_open`` / ``high_open``; ``None`` = unbounded.
        low_open, high_open: exclude the bound itself (``low=0, low_open=True``: strictly positive).
        optional: accept ``None`` (returned as is).

    Returns:
        ``float(value)``, or ``None`` when ``optional`` and ``value`` is ``None``.

    Raises:
        ValueError: ``value`` is not a finite number inside the bounds.
    """
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}"
                         f"{_describe_range(low, high, low_open, high_open)}, got {value!r}")
    return float(value)


def positive_float(name: str, value: Any, *, optional: bool = False) -> Optional[float]:
    """``finite_float(name, value, low=0, low_open=True)``: a finite number > 0."""
    return finite_float(name, value, low=0.0, low_open=True, optional=optional)


def check_bool(name: str, value: Any) -> bool:
    """Exactly ``True`` or ``False`` (not 0 / 1 / "yes").

    Raises:
        ValueError: ``value`` is not a ``bool``.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """One of ``choices``, of the same type too (``1`` is not ``True``, ``"BF16"`` is not ``"bf16"``).

    Raises:
        ValueError: ``value`` is not one of ``choices``.
    """
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _describe_range(low, high, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        if low == 0 and low_open:
            return "a positive number"
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


# Training-run flags (``synther train``, integrations/*.py): flag name -> (lowest, highest, whether the
# lowest is excluded); ``None`` = unbounded. Only the flags a parser defines are checked.
RUN_FLAG_RANGES = {
    "total_steps": (1, None, False), "utd": (1, None, False), "policy_updates": (1, None, False),
    "batch_size": (1, None, False), "hidden": (1, None, False), "eval_episodes": (1, None, False),
    "threads": (1, None, False), "buffer_size": (1, None, False), "eval_every": (0, None, False),
    "learning_starts": (0, None, False), "checkpoint_every": (0, None, False), "seed": (0, None, False),
    "real_ratio": (0.0, 1.0, False), "gamma": (0.0, 1.0, False), "tau": (0.0, 1.0, True), "lr": (0.0, None, True),
}


# Flags that shape only the SynthER buffer: a ``--no-synther`` baseline trains no diffusion model.
SYNTHER_ONLY_FLAGS = ("retrain_every", "real_ratio", "train_steps", "num_generate", "precision", "compile",
                      "async_retrain", "fixed_budget", "warm_start", "warm_start_steps", "relevance",
                      "guidance_scale", "save_pool")
# flag -> the flag without which it does nothing (no preset turns the latter on)
RUN_FLAG_NEEDS = {"warm_start_steps": "warm_start", "guidance_scale": "relevance"}


def check_run_flags(args: Any) -> None:
    """Check a training script's parsed flags before anything is built: ranges (``RUN_FLAG_RANGES``),
    and no flag that the run would take and then ignore.

    Args:
        args: an ``argparse.Namespace``; flags it lacks, or that are ``None`` (a preset's default),
            are skipped.

    Raises:
        ValueError: the first flag out of range, or one given without the flag it needs
            (``RUN_FLAG_NEEDS``: ``--warm-start-steps`` without ``--warm-start``), named as on the
            command line (``--total-steps``).

    Warns:
        UserWarning: ``--no-synther`` with flags only the SynthER buffer reads (``SYNTHER_ONLY_FLAGS``).
    """
    if getattr(args, "no_synther", False):
        ignored = [_flag(n) for n in SYNTHER_ONLY_FLAGS if getattr(args, n, None) not in (None, False)]
        if ignored:
            warnings.warn(f"--no-synther trains no diffusion model: {', '.join(ignored)} ignored", UserWarning,
                          stacklevel=2)
    else:
        for name, needed in RUN_FLAG_NEEDS.items():
            if getattr(args, name, None) is not None and not getattr(args, needed, None):
                raise ValueError(f"{_flag(name)} does nothing without {_flag(needed)}")
    for name, (low, high, low_open) in RUN_FLAG_RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = _flag(name)
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise ValueError(f"{flag} must be {_describe_range(low, high, low_open, False)}, got {value}")


def _flag(name: str) -> str:
    """``total_steps`` -> ``--total-steps``."""
    return "--" + name.replace("_", "-")
