"""Errors for bad input data: one paragraph naming the file, the row, the field and the fix."""
from __future__ import annotations


class DataError(ValueError):
    """The input data cannot be used as given. The message names where the problem is and how to fix it."""
