"""Errors raised by jckpt.

Each subclasses a standard exception, so callers may catch either::

    try:
        jckpt.restore(directory)
    except FileNotFoundError:   # also catches jckpt.CheckpointNotFoundError
        state = init()
"""

import errno


class CheckpointNotFoundError(FileNotFoundError):
    """No committed checkpoint (or not the requested step) exists at a root."""


class StepExistsError(FileExistsError):
    """A committed checkpoint already exists for this step; it is left untouched."""


class NotACheckpointRootError(FileExistsError):
    """A non-empty directory without a jckpt root marker was given as a root."""


class CorruptCheckpointError(OSError):
    """Stored bytes do not match their recorded hash, or a data file is missing.

    Subclasses ``OSError`` like ``gzip.BadGzipFile``: the files on disk are bad,
    not the caller's arguments.
    """


class TreeMismatchError(ValueError):
    """The requested tree (``like``) does not match what the checkpoint holds."""


class UnsupportedFormatError(ValueError):
    """A checkpoint was written in a format version this jckpt cannot read."""


class UnsupportedLeafError(TypeError):
    """A leaf of a type jckpt cannot save; the message names its key path."""


class CheckpointSaveError(RuntimeError):
    """A background save (or the retention after it) failed.

    Raised by the next ``maybe_save``/``save``/``wait``/``close`` of the manager;
    the original exception is the ``__cause__``. A failed save never becomes a
    visible step.

    Attributes:
      step: the step whose save failed.
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class RootLockedError(OSError):
    """Another live process is writing to this checkpoint root (one writer per root).

    An ``OSError`` with ``errno.EBUSY``.

    Attributes:
      holder: the lease of the process holding the root (host, pid, since, expires).
    """

    def __init__(self, message: str, holder=None):
        super().__init__(errno.EBUSY, message)
        self.holder = holder

    def __str__(self) -> str:
        return self.strerror


class LeaseLostError(RootLockedError):
    """A writer lost its lease before it could commit (paused past its ttl, renewals failing, taken over).

    The save it was making is not committed (a manifest it had written is
    removed again); other writers may hold the root now.
    """


class StepTaggedError(PermissionError):
    """A tagged step cannot be deleted until its tags are removed (``jckpt.untag``)."""


class UnsupportedSourceError(ValueError):
    """``jckpt.import_from`` cannot read a source; the message says what it found there."""
