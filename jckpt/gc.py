"""Reclaiming space: uncommitted leftovers, deleted steps, unreferenced chunks.

The rule is one: a key under the root survives iff a committed manifest
references it (see ``manifest.referenced_keys``).  Deleting a step removes its
manifest first (the step disappears atomically), then whatever no remaining
manifest references, so a crash at any point loses nothing that is kept.
"""

from __future__ import annotations

import os

from jckpt import layout, storage
from jckpt import manifest as manifest_lib


def _manifests(root: layout.Root) -> list[dict]:
    return [root.read_manifest(step) for step in root.committed_steps()]


def _local_step_dirs(path: str) -> list[os.DirEntry]:
    """The ``step_*`` directories of a local root."""
    if not os.path.isdir(path):
        return []
    return [e for e in os.scandir(path) if e.is_dir() and layout.parse_step_dir(e.name) is not None]


def _data_dirs_on_disk(root: layout.Root) -> set[str]:
    path = storage.local_path(root.spec)
    if path is None:
        return {"/".join(k.split("/")[:2]) for k in root.list("step_") if k.count("/") >= 2}
    return {f"{e.name}/{d.name}" for e in _local_step_dirs(path) for d in os.scandir(e.path) if d.is_dir()}


def discard(root: layout.Root, data_dir: str) -> None:
    """Best-effort removal of a failed save's data directory."""
    try:
        root.remove_tree(data_dir + "/")
        storage.prune_empty_dirs(root.spec, data_dir)
    except Exception:  # the next save's remove_uncommitted retries
        pass


def _remove_stale_manifest_locks(root: layout.Root, committed: set[str]) -> None:
    """Deletes the half-written manifests of killed commits (local roots) and their empty step dirs."""
    path = storage.local_path(root.spec)
    if path is None:
        return
    for entry in _local_step_dirs(path):
        if entry.name not in committed:
            lock = os.path.join(entry.path, layout.MANIFEST + storage.LOCK_SUFFIX)
            if os.path.exists(lock):
                os.unlink(lock)
                storage.prune_empty_dirs(root.spec, entry.name)


def remove_uncommitted(root: layout.Root) -> list[str]:
    """Deletes leftover data directories of saves that never committed.

    Candidates are data directories under a step without a manifest, or under
    a step holding more than one; each is deleted unless a committed manifest
    references it.  In the common case (no crash, no deletes) no manifest is read.

    Returns:
      The data directories removed.
    """
    by_step: dict[str, list[str]] = {}
    for data_dir in _data_dirs_on_disk(root):
        by_step.setdefault(data_dir.split("/")[0], []).append(data_dir)
    committed = {layout.step_dir(s) for s in root.committed_steps()}
    _remove_stale_manifest_locks(root, committed)
    candidates = {d for step, dirs in by_step.items() if step not in committed or len(dirs) > 1 for d in dirs}
    if not candidates:
        return []
    referenced = set().union(set(), *(manifest_lib.data_dirs(m) for m in _manifests(root)))
    removed = sorted(candidates - referenced)
    for data_dir in removed:
        root.remove_tree(data_dir + "/")
        storage.prune_empty_dirs(root.spec, data_dir)
    return removed


def collect(root: layout.Root) -> int:
    """Deletes every key under ``step_*`` that no committed manifest references.

    Returns:
      The number of keys (files) deleted.
    """
    manifests = _manifests(root)
    referenced = set().union(set(), *(manifest_lib.referenced_keys(m) for m in manifests))
    garbage = [k for k in root.list("step_") if k not in referenced]
    root.delete(*garbage)
    for data_dir in {"/".join(key.split("/")[:2]) for key in garbage}:
        storage.prune_empty_dirs(root.spec, data_dir)
    return len(garbage)


def delete_step(root: layout.Root, step: int) -> None:
    """Uncommits ``step`` (its manifest goes first), then reclaims what it alone held."""
    root.read_manifest(step)  # raises CheckpointNotFoundError if absent
    root.delete(layout.manifest_key(step))
    collect(root)
