"""Integer parameters as both protocols receive them: JSON numbers, or decimal text from
query strings and form bodies."""

from __future__ import annotations

import re

from engine.errors import InvalidParameterError

# ASCII digits only: str.isdigit and "\d" also accept other scripts' digits, which int()
# would then read. Twelve digits cover every limit with room to spare.
_INT_TEXT = re.compile(r"-?[0-9]{1,12}")


def as_int(value: object) -> int | None:
    """value as an integer (an int that is not a bool, or its decimal text), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)
    return None


def int_in_range(value: object, name: str, low: int, high: int) -> int | None:
    """An optional integer parameter within low..high; None when absent."""
    if value is None:
        return None
    number = as_int(value)
    if number is None or not low <= number <= high:
        raise InvalidParameterError(name, value, f"must be an integer in {low}..{high}")
    return number
