"""Errors for bad input data: one paragraph naming the file, the row, the field and the fix."""
from __future__ import annotations


class DataError(ValueError):
    """The input data cannot be used as given. The message names where the problem is and how to fix it."""


class RowError(DataError):
    """A problem found while processing one row inside `datasets.map`.

    `index` is the row's position in the dataset being mapped; `load_task_data` turns it into a file and row
    number (that needs the split's file list, which map workers do not have) and re-raises a `DataError`.
    """

    def __init__(self, index: int, field: str, problem: str):
        super().__init__(f"row index {index}, field {field!r}: {problem}")
        self.index = index
        self.field = field
        self.problem = problem

    def __reduce__(self):  # map workers send the exception back to the parent process pickled
        return (RowError, (self.index, self.field, self.problem))
