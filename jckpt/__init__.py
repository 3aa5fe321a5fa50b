"""jckpt: fast, atomic, checksummed checkpoints of JAX training state on tensorstore."""
# ruff: noqa: I001  (the public API: one name per line)

from jckpt import policy
from jckpt.api import all_steps
from jckpt.api import delete
from jckpt.api import info
from jckpt.api import latest_step
from jckpt.api import verify
from jckpt.errors import CheckpointNotFoundError
from jckpt.errors import CheckpointSaveError
from jckpt.errors import CorruptCheckpointError
from jckpt.errors import NotACheckpointRootError
from jckpt.errors import StepExistsError
from jckpt.errors import TreeMismatchError
from jckpt.errors import UnsupportedFormatError
from jckpt.errors import UnsupportedLeafError
from jckpt.manager import CheckpointManager
from jckpt.manifest import CheckpointInfo
from jckpt.restoring import restore
from jckpt.saving import SaveOptions
from jckpt.saving import save
from jckpt.saving import save_snapshot
from jckpt.snapshots import Snapshot
from jckpt.snapshots import snapshot

__version__ = "0.1.0"

__all__ = (
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
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
    "policy",
    "restore",
    "save",
    "save_snapshot",
    "snapshot",
    "verify",
)
