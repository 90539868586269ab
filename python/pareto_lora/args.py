"""Validation of scalar arguments, shared by every layer: one meaning of "a flag" and "a number".

A flag accepts exactly ``bool``: ``"False"``, ``[False]``, ``0`` or ``None`` are refused (each is
truthy or falsy by accident, not by intent). A number accepts a real number that is not a bool
(``int``, ``float``, NumPy scalars); strings, lists, ``None`` and ``True`` are refused. A bad value
raises ``ValueError("<argument>: expected ..., got <value>")`` naming the argument, before the
caller has changed anything.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["shown", "flag", "number", "integer", "positive", "unit_interval", "choice"]


def shown(value) -> str:
    """repr(value), cut to 60 characters (an int such as 10**400 has 401 digits)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def flag(name: str, value) -> bool:
    """`value` if it is a bool, else ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {shown(value)}")
    return value


def _real(value) -> float | None:
    """float(value) for a real number that is not a bool (an int beyond float's range is +-inf), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int such as 10**400
        return math.inf if value > 0 else -math.inf


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def number(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, finite: bool = True, none: bool = False) -> float | None:
    """`value` as a float if it is a real number (not a bool) within the bounds, else ValueError.

    ``low``/``high``: inclusive bounds (``low_open``/``high_open``: exclusive); ``finite``: refuse
    +-inf; ``none``: None is allowed (and returned). NaN is never accepted.
    """
    if none and value is None:
        return None
    x = _real(value)
    ok = x is not None and not math.isnan(x) and (not finite or math.isfinite(x))
    if ok and low is not None:
        ok = x > low if low_open else x >= low
    if ok and high is not None:
        ok = x < high if high_open else x <= high
    if not ok:
        bound = _bounds(low, high, low_open, high_open)
        what = f"a {'finite ' if finite and high is None else ''}number{' ' + bound if bound else ''}"
        raise ValueError(f"{name}: expected {'None or ' if none else ''}{what}, got {shown(value)}")
    return x + 0.0  # -0.0 -> 0.0 (a bound test such as ab < -margin*|a||b| is then exactly ab < 0)


def positive(name: str, value) -> float:
    """A finite number > 0."""
    return number(name, value, 0.0, low_open=True)


def unit_interval(name: str, value, *, high_open: bool = False, none: bool = False) -> float | None:
    """A number in [0, 1] (``high_open``: [0, 1))."""
    return number(name, value, 0.0, 1.0, high_open=high_open, none=none)


def integer(name: str, value, low: int | None = None, high: int | None = None, *, none: bool = False) -> int | None:
    """An integer (Python or NumPy, not a bool) in [low, high], else ValueError."""
    if none and value is None:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bound = _bounds(low, high, False, False)
        raise ValueError(f"{name}: expected {'None or ' if none else ''}an int{' ' + bound if bound else ''}, "
                         f"got {shown(value)}")
    return int(value)


def choice(name: str, value, options) -> str:
    """`value` if it is one of the strings `options`, else ValueError listing them."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(options)}, got {shown(value)}")
    return value
