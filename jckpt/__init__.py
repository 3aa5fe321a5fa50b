"""jckpt: fast, atomic, checksummed checkpoints of JAX training state on tensorstore."""

from jckpt.api import all_steps, delete, info, latest_step, verify
from jckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointRootError,
    StepExistsError,
    TreeMismatchError,
    UnsupportedFormatError,
    UnsupportedLeafError,
)
from jckpt.manifest import CheckpointInfo
from jckpt.restoring import restore
from jckpt.saving import SaveOptions, save, save_snapshot
from jckpt.snapshots import Snapshot, snapshot

__version__ = "0.1.0"

__all__ = (
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "NotACheckpointRootError",
    "SaveOptions",
    "Snapshot",
    "StepExistsError",
    "TreeMismatchError",
    "UnsupportedFormatError",
    "UnsupportedLeafError",
    "all_steps",
    "delete",
    "info",
    "latest_step",
    "restore",
    "save",
    "save_snapshot",
    "snapshot",
    "verify",
)
