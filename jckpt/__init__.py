"""jckpt: fast, atomic, checksummed checkpoints of JAX training state on tensorstore.

The modules, in layers (each imports only from the layers above it in this list):

- ``errors``: every exception (subclasses of the standard ones).
- ``format``: the on-disk format: constants, typed records, JSON, checksums, versions.
- ``storage``: tensorstore kvstore specs for paths and URLs; retries; key operations.
- ``root``: a checkpoint root: marker, committed steps, manifests, the commit.
- ``tree``, ``chunking``, ``hashing``: pytree paths, chunk grids, chunk hashes.
- ``snapshot``: a pytree copied to host, planned into chunked and packed leaves.
- ``write`` / ``read`` / ``place``: writing fragments; reading and verifying chunks; placing arrays.
- ``gc``: reclaiming what no manifest references.
- ``multihost``: coordination under ``jax.distributed``.
- ``api``: save / restore / info / metadata / verify / delete / tags (orchestration only).
- ``diff``: comparing two steps leaf by leaf.
- ``interop``: export to and import from safetensors, npz and Orbax.
- ``policy``: when to save, which kind, what to keep (optax-style rules).
- ``manager``: ``CheckpointManager``, the stateful shell over api + policy.
- ``cli``: the ``jckpt`` command.
"""
# ruff: noqa: I001  (the public API: one name per line)

from jckpt import policy
from jckpt.api import all_steps
from jckpt.api import delete
from jckpt.api import info
from jckpt.api import latest_step
from jckpt.api import metadata
from jckpt.api import restore
from jckpt.api import save
from jckpt.api import save_snapshot
from jckpt.api import tag
from jckpt.api import tags
from jckpt.api import untag
from jckpt.api import verify
from jckpt.diff import LeafDiff
from jckpt.diff import diff
from jckpt.errors import CheckpointNotFoundError
from jckpt.errors import CheckpointSaveError
from jckpt.errors import CorruptCheckpointError
from jckpt.errors import NotACheckpointRootError
from jckpt.errors import RootLockedError
from jckpt.errors import StepExistsError
from jckpt.errors import StepTaggedError
from jckpt.errors import TreeMismatchError
from jckpt.errors import UnsupportedFormatError
from jckpt.errors import UnsupportedLeafError
from jckpt.errors import UnsupportedSourceError
from jckpt.format import CheckpointInfo
from jckpt.interop import export
from jckpt.interop import import_from
from jckpt.manager import CheckpointManager
from jckpt.snapshot import Snapshot
from jckpt.snapshot import snapshot
from jckpt.write import SaveOptions

__version__ = "0.1.0"

__all__ = (
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "LeafDiff",
    "NotACheckpointRootError",
    "RootLockedError",
    "SaveOptions",
    "Snapshot",
    "StepExistsError",
    "StepTaggedError",
    "TreeMismatchError",
    "UnsupportedFormatError",
    "UnsupportedLeafError",
    "UnsupportedSourceError",
    "all_steps",
    "delete",
    "diff",
    "export",
    "import_from",
    "info",
    "latest_step",
    "metadata",
    "policy",
    "restore",
    "save",
    "save_snapshot",
    "snapshot",
    "tag",
    "tags",
    "untag",
    "verify",
)
