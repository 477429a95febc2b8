"""The small checks every layer makes of its arguments."""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An integer, and not a bool (``True`` is an ``int`` to Python, never a size to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite int or float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
