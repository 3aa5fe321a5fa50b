"""The one adapter between interop and a jckpt checkpoint root.

Everything interop needs from the core goes through here, and this is the
only interop module that imports the ``jckpt`` package (its public names are
looked up at call time, so ``jckpt/__init__.py`` may import ``jckpt.interop``):

* ``leaf_specs``: the saved tree's leaves (key paths, shapes and dtypes),
  read from the manifest alone;
* ``read_leaves``: the values of those leaves, restored a bounded group at a
  time with ``jckpt.restore(directory, like=subset)``;
* ``save_imported``: one ``jckpt.save`` of an imported tree, recording where it
  came from.

The origin of an import is recorded in the step's lineage
(``info().lineage["origin"]``, e.g. ``"imported from orbax:/ckpts/run/1000"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

import jckpt
from jckpt import format as fmt
from jckpt.interop import _dtypes
from jckpt.root import Root

if TYPE_CHECKING:
    from jckpt import CheckpointInfo

# Restore at most this many bytes per jckpt.restore call (one leaf above it is read alone).
GROUP_BYTES = 64 * 2**20


KeyEntry = Any  # jax.tree_util.DictKey | GetAttrKey | SequenceKey | FlattenedIndexKey


class LeafSpec(NamedTuple):
    """One saved leaf: its key path (jax key entries) and its shape and dtype."""

    path: tuple[KeyEntry, ...]
    struct: jax.ShapeDtypeStruct


def key_name(entry: KeyEntry) -> str | int:
    """The name of one key entry: a dict key, attribute name or sequence index."""
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return getattr(entry, attribute)
    raise TypeError(f"unsupported pytree key entry {entry!r}")


def is_sequence_index(entry: KeyEntry) -> bool:
    """True for a list/tuple position (``SequenceKey``)."""
    return isinstance(entry, jax.tree_util.SequenceKey)


def names(spec: LeafSpec) -> tuple[str, ...]:
    """The key path as strings, e.g. ``("params", "layers", "0", "kernel")``."""
    return tuple(str(key_name(entry)) for entry in spec.path)


_KEY_ENTRY = {"d": jax.tree_util.DictKey, "a": jax.tree_util.GetAttrKey, "i": jax.tree_util.SequenceKey}


def is_jckpt_root(path: str | os.PathLike) -> bool:
    """True when ``path`` is a local directory holding a jckpt root marker."""
    return os.path.isfile(os.path.join(os.fspath(path), fmt.ROOT_MARKER))


def check_step_free(directory: str | os.PathLike, step: int) -> None:
    """Raises StepExistsError when ``step`` is already committed at ``directory``."""
    if int(step) in jckpt.all_steps(directory):
        raise jckpt.StepExistsError(f"step {step} is already committed at {os.fspath(directory)!r}")


def resolve_step(directory: str | os.PathLike, step: int | str | None) -> int:
    """The committed step ``step`` names (a number or a tag), or the latest when it is None.

    Raises:
      CheckpointNotFoundError: there is no such committed step at ``directory``.
    """
    return jckpt.info(directory, step).step


def leaf_specs(directory: str | os.PathLike, step: int) -> tuple[list[LeafSpec], list[str]]:
    """The array leaves of a committed step (``None`` leaves left out), in key-path order, and the
    paths of its host-state leaves (data iterators, host RNGs: not tensors, so not exported).

    PRNG keys are described by their key data (uint32), Python scalars as 0-d arrays.

    Raises:
      CheckpointNotFoundError: no such step.
      UnsupportedFormatError: written by a newer jckpt.
    """
    root = Root(directory)
    root.check_version()
    manifest = root.read_manifest(fmt.check_step(step))
    specs = [
        LeafSpec(
            tuple(_KEY_ENTRY[kind](value) for kind, value in leaf.keys),
            jax.ShapeDtypeStruct(tuple(leaf.shape), _dtypes.by_name(leaf.dtype)),
        )
        for leaf in manifest.leaves
        if leaf.storage not in (fmt.NONE, fmt.HOST)
    ]
    return specs, [leaf.path for leaf in manifest.leaves if leaf.storage == fmt.HOST]


def _host_like(struct: jax.ShapeDtypeStruct) -> np.ndarray:
    """A numpy ``like`` leaf of ``struct``'s shape and dtype that allocates nothing.

    A numpy target makes restore return host arrays: no device copy, and 64-bit
    dtypes survive with ``jax_enable_x64`` off.
    """
    return np.broadcast_to(np.zeros((), struct.dtype), struct.shape)


def _groups(specs: Sequence[LeafSpec], budget: int) -> Iterator[list[LeafSpec]]:
    group: list[LeafSpec] = []
    size = 0
    for spec in specs:
        nbytes = spec.struct.dtype.itemsize * int(np.prod(spec.struct.shape))
        if group and size + nbytes > budget:
            yield group
            group, size = [], 0
        group.append(spec)
        size += nbytes
    if group:
        yield group


def read_leaves(
    directory: str | os.PathLike, step: int, specs: Sequence[LeafSpec], group_bytes: int | None = None
) -> Iterator[tuple[LeafSpec, np.ndarray]]:
    """Yields ``(spec, host array)`` for each of ``specs``, in order.

    Leaves are restored (and hash-checked) in groups of at most ``group_bytes``
    (default ``GROUP_BYTES``; a larger leaf alone); a group's arrays are released as they are handed
    out, so host memory holds about one group plus what the caller keeps.

    Raises:
      CorruptCheckpointError: a chunk fails its hash check.
    """
    for group in _groups(specs, GROUP_BYTES if group_bytes is None else group_bytes):
        like: dict = {}
        for spec in group:
            node = like
            *parents, last = names(spec)
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = _host_like(spec.struct)
        restored = jckpt.restore(directory, like=like, step=step)
        for spec in group:
            node = restored
            *parents, last = names(spec)
            for part in parents:
                node = node[part]
            yield spec, np.asarray(node.pop(last))
        del restored


class ImportedState:
    """A data iterator's state read from another checkpoint (an Orbax item written by Grain's handler):
    saved as a host state, it restores into the live iterator (``like``) with ``set_state``.

    A Grain ``DataLoader`` iterator takes its state as JSON bytes, a ``DatasetIterator`` as the parsed
    value: the text is kept as bytes when it is a DataLoader's (it names a sampler), else parsed.
    """

    def __init__(self, text: str):
        doc = json.loads(text)
        loader = isinstance(doc, dict) and {"last_seen_indices", "sampler"} <= doc.keys()
        self.state = text.encode() if loader else doc

    def get_state(self) -> Any:
        return self.state

    def set_state(self, state: Any) -> None:
        self.state = state


def save_imported(
    directory: str | os.PathLike,
    tree: Any,
    *,
    step: int,
    origin: str,
    metadata: dict | None = None,
    metrics: dict | None = None,
) -> CheckpointInfo:
    """Saves an imported tree as one jckpt step, recording its origin.

    Args:
      directory: the jckpt root.
      tree: nested dicts/lists of numpy arrays (memory-mapped where possible).
      step: the step to write.
      origin: where it came from, e.g. ``"orbax:/ckpts/run1/1000"``.
      metadata: user metadata for the step.
      metrics: metrics to store with the step, e.g. those of the Orbax step.

    Returns:
      The CheckpointInfo of the new step.
    """
    lineage = {"origin": f"imported from {origin}"}
    return jckpt.save(directory, tree, step=step, metadata=metadata, metrics=metrics, lineage=lineage)
