"""jckpt: fast, atomic, checksummed checkpoints of JAX training state on tensorstore.

The modules, in layers (each imports only from the layers above it in this list):

- ``errors``: every exception (subclasses of the standard ones).
- ``format``: the on-disk format: constants, typed records, JSON, checksums, versions.
- ``storage``: tensorstore kvstore specs for paths and URLs; retries; key operations.
- ``root``: a checkpoint root: marker, committed steps, manifests, the commit.
- ``tree``, ``chunking``, ``hashing``: pytree paths, chunk grids, chunk hashes.
- ``snapshots``: a pytree copied to host, planned into chunked and packed leaves.
- ``write`` / ``read`` / ``place``: writing fragments; reading and verifying chunks; placing arrays.
- ``gc``: reclaiming what no manifest references.
- ``multihost``: coordination under ``jax.distributed``.
- ``api``: save / restore / info / metadata / verify / delete / tags (orchestration only).
- ``compare``: comparing two steps (``jckpt.diff``) leaf by leaf.
- ``interop``: export to and import from safetensors, npz and Orbax.
- ``policy``: when to save, which kind, what to keep (optax-style rules).
- ``manager``: ``CheckpointManager``, the stateful shell over api + policy.
- ``cli``: the ``jckpt`` command.
"""
# ruff: noqa: I001  (the public API: one name per line)

import importlib
from typing import Any

# Errors import nothing heavy, so they are loaded at once; everything else on first use
# (``import jckpt`` stays cheap, and ``jckpt --help`` answers without importing jax).
from jckpt.errors import CheckpointNotFoundError
from jckpt.errors import CheckpointSaveError
from jckpt.errors import CorruptCheckpointError
from jckpt.errors import LeaseLostError
from jckpt.errors import NotACheckpointRootError
from jckpt.errors import RootLockedError
from jckpt.errors import StepExistsError
from jckpt.errors import StepTaggedError
from jckpt.errors import TreeMismatchError
from jckpt.errors import UnsupportedFormatError
from jckpt.errors import UnsupportedLeafError
from jckpt.errors import UnsupportedSourceError

_API = {  # public name -> the module that defines it
    "policy": "jckpt.policy",
    "all_steps": "jckpt.api",
    "delete": "jckpt.api",
    "info": "jckpt.api",
    "latest_step": "jckpt.api",
    "metadata": "jckpt.api",
    "restore": "jckpt.api",
    "save": "jckpt.api",
    "save_snapshot": "jckpt.api",
    "tag": "jckpt.api",
    "tags": "jckpt.api",
    "untag": "jckpt.api",
    "verify": "jckpt.api",
    "LeafDiff": "jckpt.compare",
    "diff": "jckpt.compare",
    "CheckpointInfo": "jckpt.format",
    "HostState": "jckpt.format",
    "export": "jckpt.interop",
    "import_from": "jckpt.interop",
    "CheckpointManager": "jckpt.manager",
    "Snapshot": "jckpt.snapshots",
    "snapshot": "jckpt.snapshots",
    "SaveOptions": "jckpt.write",
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'jckpt' has no attribute {name!r}")
    module = importlib.import_module(_API[name])
    value = module if name == "policy" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


__version__ = "0.1.0"

__all__ = (
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "HostState",
    "LeafDiff",
    "LeaseLostError",
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
