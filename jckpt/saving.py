"""A save in three named phases: prepare (process 0), write (every process), commit (process 0).

``jckpt.api.save_snapshot`` runs them, through ``jckpt.multihost.Operation``
under ``jax.distributed`` and in place otherwise; a copy of a committed step to
another root (a tier) reuses :func:`commit`.  The writer (``jckpt.lease.Writer``)
is given explicitly: :func:`prepare` records the save in its lease and returns
the epoch that :func:`commit`'s fence checks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from jckpt import format as fmt
from jckpt import gc, lease, storage
from jckpt import write as write_lib
from jckpt.errors import CheckpointNotFoundError, StepExistsError
from jckpt.root import Root, new_data_dir
from jckpt.snapshots import Snapshot
from jckpt.write import SaveOptions

# A test-only hook, called with the step right before a commit writes its manifest (None: nothing).
before_commit: Any = None


class Prepared(NamedTuple):
    """What process 0 decided for a save, shared with every process (JSON-able but for ``epoch``).

    Attributes:
      data_dir: the fresh data directory of the save.
      base_step: the step an incremental save compares against (None: full).
      epoch: the writer's epoch the save began in (process 0 only; -1 elsewhere).
    """

    data_dir: str
    base_step: int | None
    epoch: int = -1


def resolve_base(root: Root, kind: str, base: int | None) -> fmt.Manifest | None:
    """The manifest an incremental save compares against (None for a full save or an empty root).

    Raises:
      ValueError: an unknown ``kind``, or ``base`` given for a full save.
      CheckpointNotFoundError: ``base`` is not committed.
    """
    if kind not in fmt.KINDS:
        raise ValueError(f"kind must be one of {fmt.KINDS}, got {kind!r}")
    if kind == "full":
        if base is not None:
            raise ValueError("base= is only meaningful with kind='incremental'")
        return None
    if base is None:
        steps = root.committed_steps()
        return root.read_manifest(steps[-1]) if steps else None
    return root.read_manifest(fmt.check_step(base))


def prepare(
    root: Root, writer: lease.Writer, step: int, kind: str, base: int | None
) -> tuple[Prepared, fmt.Manifest | None]:
    """Makes the root ready, records the save in the lease, pins its base and cleans up leftovers.

    Returns:
      The :class:`Prepared` decision and the base manifest (or None).

    Raises:
      RootLockedError: another live writer holds the root.
      StepExistsError: ``step`` is committed already (checked under the lease).
      CheckpointNotFoundError: the base keeps being deleted by others.
    """
    root.ensure()
    data_dir = new_data_dir(step)
    for _ in range(3):  # the base is pinned in the lease before it is relied on, then re-checked
        base_manifest = resolve_base(root, kind, base)
        pins = tuple(sorted(base_manifest.data_dirs())) if base_manifest is not None else ()
        epoch = writer.begin(data_dir, pins)
        if base_manifest is None or root.read(root.manifest_key(base_manifest.step)) is not None:
            break
    else:
        raise CheckpointNotFoundError(f"step {step}: its base steps keep being deleted by others")
    if step in root.committed_steps():
        raise StepExistsError(f"step {step} is already committed at {root.directory!r}")
    abandoned, writer.abandoned = writer.abandoned, ""
    if root.caps.cheap_listing:
        gc.remove_uncommitted(root)  # a directory scan
    elif abandoned:  # object stores: no listing of every key; the dead writer's lease names it
        gc.remove_abandoned(root, abandoned)
    base_step = base_manifest.step if base_manifest is not None else None
    return Prepared(data_dir, base_step, epoch), base_manifest


def write(
    root: Root,
    step: int,
    prepared: Prepared,
    snap: Snapshot,
    records: list[fmt.LeafRecord],
    options: SaveOptions,
    base_manifest: fmt.Manifest | None,
) -> fmt.Fragment:
    """Writes this process's fragment of the save (its shards, hashed; what the base holds is skipped)."""
    with storage.named_errors(root.where(prepared.data_dir), step):
        if prepared.base_step is not None and base_manifest is None:
            base_manifest = root.read_manifest(prepared.base_step)
        return write_lib.write_fragment(root, prepared.data_dir, snap, records, options, base_manifest)


def commit(root: Root, manifest: fmt.Manifest, fence: lease.Fence) -> fmt.CheckpointInfo:
    """Commits ``manifest`` through its writer's fence (see ``Root.commit``).

    Raises:
      LeaseLostError: the writer lost its lease before the commit was confirmed.
      StepExistsError: another writer committed the step first.
    """
    if before_commit is not None:
        before_commit(manifest.step)
    root.commit(manifest, fence=fence)
    return manifest.info()
