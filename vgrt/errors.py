"""One root exception for everything vgrt raises on purpose.

Messages say what was seen, what was expected and how to fix it, so a caller embedding vgrt in a
service can show them to a user unchanged.
"""


class VgrtError(Exception):
    """Root of every error vgrt raises for bad input, bad files or a missing dependency."""


class InvalidInputError(VgrtError, ValueError):
    """A tensor, file or argument given by the caller does not fit what the model or command expects."""


class MissingDependencyError(VgrtError, ImportError):
    """An optional package is not installed; the message names the extra that provides it."""


class WeightsError(VgrtError):
    """Model weights are missing, unreadable, corrupt or do not match the model."""


class ArtifactError(VgrtError):
    """An exported directory or engine is missing, incomplete or was made for something else."""


class NumericalError(VgrtError):
    """A computation produced NaN or infinite values; the message names the stage and the first bad step."""
