"""The exceptions gmpq raises for bad input.

Every user-facing mistake (a bad recipe key, an unknown layer in a policy, an infeasible BOPs budget, a missing
dataset, a corrupted checkpoint) raises a subclass of :class:`GmpqError` whose message names the thing and the fix.
The CLI turns any :class:`GmpqError` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class GmpqError(Exception):
    """Base class of all gmpq errors caused by user input."""


class PolicyError(GmpqError, ValueError):
    """A quantization policy is malformed or does not fit the model it is applied to."""


class ModelError(GmpqError, ValueError):
    """An unknown architecture or an invalid model argument."""


class BudgetError(GmpqError, ValueError):
    """A BOPs budget that no policy over the candidate bits can meet."""


class RecipeError(GmpqError, ValueError):
    """A recipe with an unknown key, a wrong type or a missing required value."""


class DatasetError(GmpqError, FileNotFoundError):
    """A dataset that is neither reachable nor cached, or has an unexpected layout."""


class RunError(GmpqError, ValueError):
    """A run directory or one of its records (metrics.json, search_log.jsonl) that is missing or malformed."""


class BusyError(RunError):
    """A run directory held by another running gmpq process."""


class CheckpointError(GmpqError, ValueError):
    """A checkpoint or exported model that is missing, truncated, tampered with or of an unknown format."""


class StorageError(GmpqError, OSError):
    """A file could not be written because its device is full (or the user's disk quota is exhausted), or a directory
    could not be created because a file is in its place."""
