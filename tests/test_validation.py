"""synther_buffer.validation: the package's argument checks accept what they promise, refuse the rest
with a ValueError naming the argument, and return plain Python numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from synther_buffer.validation import (check_bool, check_choice, check_int, finite_float, non_negative_int,
                                       positive_float, positive_int)


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.uint8(200), 10 ** 12])
def test_positive_int_accepts_and_returns_a_python_int(value):
    out = positive_int("width", value)
    assert out == value and type(out) is int


@pytest.mark.parametrize("value", [0, -1, 2.5, 3.0, True, False, "4", None, np.float64(2.0)])
def test_positive_int_refuses_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^width must be a positive int, got "):
        positive_int("width", value)


def test_optional_and_other_minimums():
    assert positive_int("batch_size", None, optional=True) is None
    with pytest.raises(ValueError, match="batch_size must be None or a positive int, got 0"):
        positive_int("batch_size", 0, optional=True)
    assert non_negative_int("n", 0) == 0
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        non_negative_int("n", -1)
    assert check_int("seed", -5) == -5
    with pytest.raises(ValueError, match="seed must be an int, got True"):
        check_int("seed", True)
    with pytest.raises(ValueError, match="k must be an int >= 3, got 2"):
        check_int("k", 2, minimum=3)


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.25), np.int32(2)])
def test_positive_float_accepts_and_returns_a_python_float(value):
    out = positive_float("lr", value)
    assert out == pytest.approx(float(value)) and type(out) is float


@pytest.mark.parametrize("value", [0.0, -1e-9, math.inf, math.nan, True, "0.1", None])
def test_positive_float_refuses(value):
    with pytest.raises(ValueError, match=r"^lr must be a positive number, got "):
        positive_float("lr", value)


def test_finite_float_bounds():
    assert finite_float("p", -3.5) == -3.5
    assert finite_float("ratio", 1.0, low=0.0, high=1.0) == 1.0
    assert finite_float("decay", 0.0, low=0.0, high=1.0, high_open=True) == 0.0
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\), got 1.0"):
        finite_float("decay", 1.0, low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\], got -0.1"):
        finite_float("ratio", -0.1, low=0.0, high=1.0)
    with pytest.raises(ValueError, match="churn must be a finite number >= 0"):
        finite_float("churn", -1.0, low=0.0)
    with pytest.raises(ValueError, match="x must be a finite number < 2"):
        finite_float("x", 2.0, high=2.0, high_open=True)
    with pytest.raises(ValueError, match="p must be a finite number, got nan"):
        finite_float("p", math.nan)
    assert finite_float("std", None, low=0.0, low_open=True, optional=True) is None


def test_bool_and_choice():
    assert check_bool("compile", False) is False
    for bad in (0, 1, "yes", None):
        with pytest.raises(ValueError, match="compile must be a bool"):
            check_bool("compile", bad)
    assert check_choice("precision", "bf16", ("fp32", "bf16")) == "bf16"
    for bad in ("BF16", None, 1):
        with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\)"):
            check_choice("precision", bad, ("fp32", "bf16"))
    with pytest.raises(ValueError, match="flag must be one of"):
        check_choice("flag", 1, (True, False))     # 1 == True, but not the same type
