"""Reclaiming space: uncommitted leftovers, deleted steps, unreferenced chunks.

The rule is one: a key under ``step_*`` survives iff a committed manifest
references it (see ``Manifest.referenced_keys``) or it lies in a data
directory that a live writer protects (the save in flight and the data
directories it reuses, see ``jckpt.lease``).  Deleting a step removes its
manifest first (the step disappears atomically), then whatever nothing
references, so a crash at any point loses nothing that is kept.

Collectors may run beside a live writer in other processes.  They list the
keys first, then read the lease, then the manifests.  A key listed was
written by a save that already held the lease; if that save still holds it
when the lease is read, its data directory (and the base it reuses) is
spared; if it has let go, it committed before, so its manifest is read and
its keys are referenced.
"""

from __future__ import annotations

import logging
import os

from jckpt import format as fmt
from jckpt import lease, storage
from jckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from jckpt.root import Root

logger = logging.getLogger("jckpt")


def _manifests(root: Root) -> list[fmt.Manifest]:
    """The committed manifests (those deleted meanwhile by another process are skipped).

    Raises:
      CorruptCheckpointError: a manifest cannot be read: nothing may be collected
        while it is unknown what that step references.
    """
    manifests = []
    for step in root.committed_steps():
        try:
            manifests.append(root.read_manifest(step))
        except CheckpointNotFoundError:
            continue
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(
                f"{e}; nothing is collected while a manifest cannot be read "
                f"(remove step {step} with `jckpt rm` if it is beyond repair)"
            ) from e
    return manifests


def _local_step_dirs(path: str) -> list[os.DirEntry]:
    """The ``step_*`` directories of a local root (symbolic links are not directories here)."""
    if not os.path.isdir(path):
        return []
    with os.scandir(path) as entries:
        return [
            e for e in entries if e.is_dir(follow_symlinks=False) and fmt.parse_step_name(e.name) is not None
        ]


def _data_dirs_on_disk(root: Root) -> set[str]:
    path = root.caps.local_path
    if path is None:
        return {"/".join(k.split("/")[:2]) for k in root.list("step_") if k.count("/") >= 2}
    out = set()
    for step_dir in _local_step_dirs(path):
        with os.scandir(step_dir.path) as entries:
            out.update(f"{step_dir.name}/{d.name}" for d in entries if d.is_dir(follow_symlinks=False))
    return out


def discard(root: Root, data_dir: str) -> None:
    """Best-effort removal of a failed save's data directory."""
    try:
        root.remove_tree(data_dir + "/")
        storage.prune_empty_dirs(root.spec, data_dir)
    except Exception as e:  # the next save's clean-up (or jckpt gc) retries
        logger.warning("jckpt: could not remove the failed save's data %s: %s", root.where(data_dir), e)


def _remove_stale_manifest_locks(root: Root) -> None:
    """Deletes the half-written manifests of killed commits (local roots)."""
    path = root.caps.local_path
    if path is None:
        return
    directory = os.path.join(path, fmt.MANIFESTS)
    if not os.path.isdir(directory):
        return
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(storage.LOCK_SUFFIX) and entry.is_file(follow_symlinks=False):
                if not os.path.exists(entry.path[: -len(storage.LOCK_SUFFIX)]):
                    os.unlink(entry.path)


def _protected(root: Root) -> set[str]:
    """Data directories a live writer is using: its save in flight and the data directories it reuses.

    This process's own lease counts too: a save removes leftovers after pinning
    its base, and a base deleted by another process in between must survive.
    """
    held, _ = lease.read(root)
    if held is None or not (held.mine() or held.live()):
        return set()
    return {held.data_dir, *held.pins} - {""}


def remove_uncommitted(root: Root, *, dry_run: bool = False) -> list[str]:
    """Deletes leftover data directories of saves that never committed.

    Candidates are data directories under a step without a manifest, or under
    a step holding more than one; each is deleted unless a committed manifest
    references it or another live writer protects it.  In the common case (no
    crash, no deletes) no manifest is read.

    Returns:
      The data directories removed (with ``dry_run``: that would be removed).
    """
    by_step: dict[str, list[str]] = {}
    for data_dir in _data_dirs_on_disk(root):
        by_step.setdefault(data_dir.split("/")[0], []).append(data_dir)
    protected = _protected(root)  # after listing, before the manifests (see the module docstring)
    committed = {fmt.step_name(s) for s in root.committed_steps()}
    _remove_stale_manifest_locks(root)
    candidates = {d for step, dirs in by_step.items() if step not in committed or len(dirs) > 1 for d in dirs}
    if not candidates - protected:
        if not dry_run:
            _remove_empty_step_dirs(root, committed)
        return []
    referenced = set().union(set(), *(m.data_dirs() for m in _manifests(root)))
    removed = sorted(candidates - referenced - protected)
    for data_dir in [] if dry_run else removed:
        root.remove_tree(data_dir + "/")
        storage.prune_empty_dirs(root.spec, data_dir)
    if not dry_run:
        _remove_empty_step_dirs(root, committed)
    return removed


def _remove_empty_step_dirs(root: Root, committed: set[str]) -> None:
    """Removes empty ``step_*`` directories of uncommitted steps (a save killed right after its mkdir)."""
    path = root.caps.local_path
    if path is None:
        return
    for entry in _local_step_dirs(path):
        if entry.name not in committed:
            try:
                os.rmdir(entry.path)  # fails, harmlessly, unless empty
            except OSError:
                pass


def remove_abandoned(root: Root, data_dir: str) -> bool:
    """Removes the data directory of a save whose writer died, unless a committed manifest references it.

    A writer that takes over a dead writer's lease learns that save's data
    directory from it: on an object store this replaces listing every key of
    the root at each save.

    Returns:
      Whether it was removed.
    """
    if not data_dir or any(data_dir in m.data_dirs() for m in _manifests(root)):
        return False
    root.remove_tree(data_dir + "/")
    storage.prune_empty_dirs(root.spec, data_dir)
    return True


def collect(root: Root, *, dry_run: bool = False) -> list[str]:
    """Deletes every key under ``step_*`` that no committed manifest references.

    Returns:
      The keys (files) deleted (with ``dry_run``: that would be deleted).
    """
    keys = root.list("step_")  # first the keys, then the lease, then the manifests (module docstring)
    protected = _protected(root)
    referenced = {root.manifest_key(s) for s in root.committed_steps()}  # v1 manifests live under step_*
    for manifest in _manifests(root):
        referenced |= manifest.referenced_keys()
    garbage = [k for k in keys if k not in referenced and "/".join(k.split("/")[:2]) not in protected]
    if dry_run:
        return garbage
    root.delete(*garbage)
    for data_dir in {"/".join(key.split("/")[:2]) for key in garbage}:
        storage.prune_empty_dirs(root.spec, data_dir)
    return garbage


def freed_by(root: Root, steps: list[int]) -> list[str]:
    """The data keys that deleting ``steps`` would reclaim (none another step still needs)."""
    doomed = set(steps)
    kept, freed = set(), set()
    for manifest in _manifests(root):
        (freed if manifest.step in doomed else kept).update(manifest.referenced_keys())
    return sorted(freed - kept)


def delete_step(root: Root, step: int) -> None:
    """Uncommits ``step`` (its manifest goes first), then reclaims what it alone held.

    A step whose manifest is damaged can be deleted too (its data is then
    reclaimed as whatever no other manifest references).
    """
    if root.read(root.manifest_key(step)) is None:
        root.read_manifest(step)  # raises CheckpointNotFoundError naming the committed steps
    root.uncommit(step)
    collect(root)
