"""Inspection and deletion: latest_step, all_steps, info, verify, delete."""

from __future__ import annotations

import os

from jckpt import gc, layout, multihost
from jckpt import manifest as manifest_lib
from jckpt import restoring as restore_lib
from jckpt.errors import CheckpointNotFoundError


def _root(directory: str | os.PathLike) -> layout.Root | None:
    root = layout.Root(directory)
    if not root.exists():
        return None
    root.check_version()
    return root


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Committed steps at ``directory``, ascending ([] when there is nothing)."""
    root = _root(directory)
    return root.committed_steps() if root else []


def latest_step(directory: str | os.PathLike) -> int | None:
    """The latest committed step, or None when there is none (never raises for a missing root)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def _manifest(directory: str | os.PathLike, step: int | None) -> tuple[layout.Root, dict]:
    root = layout.Root(directory)
    step = restore_lib.resolve_step(root, step)
    return root, root.read_manifest(step)


def info(directory: str | os.PathLike, step: int | None = None) -> manifest_lib.CheckpointInfo:
    """The CheckpointInfo of ``step`` (default: latest), read from its manifest alone.

    Raises:
      CheckpointNotFoundError: no checkpoint / no such step.
    """
    return manifest_lib.info_of(_manifest(directory, step)[1])


def verify(directory: str | os.PathLike, step: int | None = None) -> manifest_lib.CheckpointInfo:
    """Re-reads every chunk of ``step`` (default: latest) and checks its hash.

    Returns:
      The step's CheckpointInfo when everything matches.

    Raises:
      CorruptCheckpointError: names the step, leaf path and chunk that fail.
      CheckpointNotFoundError: no checkpoint / no such step.
    """
    root, manifest = _manifest(directory, step)
    restore_lib.read_to_host(
        root, manifest, [leaf for leaf in manifest["leaves"] if leaf["origin"] != "none"]
    )
    return manifest_lib.info_of(manifest)


def delete(directory: str | os.PathLike, step: int) -> None:
    """Deletes a committed step; bytes still referenced by other steps survive.

    Under ``jax.distributed`` every process calls it; process 0 deletes, the
    others wait for it (see docs/multihost.md).

    Raises:
      CheckpointNotFoundError: the step is not committed.
      jckpt.multihost.CoordinationTimeoutError: a peer did not take part in time.
    """
    step = int(step)

    def run() -> None:
        root = _root(directory)
        if root is None:
            raise CheckpointNotFoundError(f"no jckpt checkpoints at {os.fspath(directory)!r}")
        gc.delete_step(root, step)

    # Under jax.distributed only process 0 deletes; the others wait for it and share its errors.
    op = multihost.Operation("delete", os.fspath(directory), step)
    op.all_then_primary("delete", lambda: None, lambda _: run(), lambda: None)
