"""Errors a user can cause. Each message says what went wrong and what to do.

Every layer of mergeyard raises subclasses of `MergeyardError`; the CLI prints
the message on one line and exits non-zero. Messages here never name CLI flags:
the CLI adds that hint for the error types it knows (flows.cli_common).
"""

from __future__ import annotations


class MergeyardError(Exception):
    """Base class of every error a user can cause (bad file, bad recipe, ...). Its message is one line by
    construction: a line break in what it quotes (a URI, a key, a file name) becomes a space."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(" ".join(str(message).splitlines()), *args)


class CheckpointError(MergeyardError):
    """A checkpoint cannot be read: missing, truncated, not safetensors, pickled."""


class PickleCheckpointError(CheckpointError):
    """A `.bin`/`.pt` pickle was offered where safetensors is required."""


class IncompatibleModelsError(MergeyardError):
    """Inputs to a merge disagree: missing tensor, shape or dtype-kind mismatch."""


class NonFiniteError(MergeyardError):
    """A tensor holds NaN or infinity (in an input or in a merge result)."""


class RecipeError(MergeyardError):
    """A recipe is malformed: unknown method, unknown or invalid parameter."""


class OutputExistsError(MergeyardError):
    """The output directory exists and overwriting was not asked for."""


class DeviceError(MergeyardError):
    """The compute device asked for is not there."""


class PreferenceError(MergeyardError):
    """A preference over a front's tasks that cannot be read."""
