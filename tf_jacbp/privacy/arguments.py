"""The checks DP-SGD's and the accountant's numeric arguments share."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def check_positive(name: str, value: Any, allow_zero: bool = False) -> float:
    """``value`` as a float, after checking it is a finite number ``> 0`` (``>= 0`` with
    ``allow_zero``); the TypeError or ValueError names ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {name}={value!r}.")
    return value


def check_sampling_rate(sampling_rate: Any) -> float:
    """``q``, the probability that a step includes a sample, checked to be in ``(0, 1]``."""
    q = check_positive("sampling_rate", sampling_rate)
    if q > 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got sampling_rate={q}.")
    return q
