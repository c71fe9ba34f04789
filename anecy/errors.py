"""Exceptions anecy raises for bad input.

Every error a user can cause (a bad flag, a corrupt file, a config that cannot
exist) is one of these, with a one-line message; the CLIs print that line and
exit with status 2 instead of showing a traceback.
"""

import errno


class AnecyError(Exception):
    """Base class of all user-facing anecy errors."""


class ConfigError(AnecyError, ValueError):
    """A model or training configuration that cannot work."""


class DataError(AnecyError, ValueError):
    """A token file that is missing, short, corrupt or out of vocabulary."""


class CheckpointError(AnecyError, ValueError):
    """A checkpoint that is missing, truncated, corrupt or of another model."""


class BackendUnavailable(AnecyError, RuntimeError):
    """A backend that this machine (or this build) cannot run."""


class OutputError(AnecyError):
    """An output file (checkpoint, metrics, export) that cannot be written."""


class TrainingDiverged(AnecyError):
    """The loss, the gradient, a parameter or an Adam moment became NaN or infinite."""


def cannot_read(path, error: Exception, what: str = "", kind=AnecyError) -> AnecyError:
    """The one-line error for a file that is there but cannot be read: ``{path}: cannot read
    [what] ({why})``, as a ``kind`` (an AnecyError subclass) to raise ``from None``."""
    if getattr(error, "errno", None) == errno.ELOOP:
        why = "a symlink loop"
    else:
        why = getattr(error, "strerror", None) or error
    return kind(f"{path}: cannot read{' ' + what if what else ''} ({why})")
