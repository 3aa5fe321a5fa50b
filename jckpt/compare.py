"""Comparing two checkpoints leaf by leaf: what was added, removed, reshaped, and by how much values moved.

Leaves whose stored hashes are equal are equal without reading a byte; the
others are read one bounded group at a time (hash-checked, like any restore)
and compared in float64: the maximum absolute difference and the relative L2
difference ``||a - b|| / ||a||``.  Host states (data iterators, host RNGs) are
"same" or "changed", compared by the hashes of every process's state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from jckpt import api
from jckpt import format as fmt
from jckpt import read as read_lib

GROUP_BYTES = 64 * 2**20  # leaves read per group (a larger leaf alone)


class LeafDiff(NamedTuple):
    """How one leaf differs.

    Attributes:
      path: the leaf's key path.
      status: "same", "changed", "added" (only in B), "removed" (only in A),
        "shape" (shape differs), "dtype" (dtype differs).
      a: "dtype[shape]" in A ("" when absent; host states: "host state (<kind>) x<processes>");
        b: the same in B.
      max_abs: max |a - b| for "changed" leaves (None otherwise).
      rel_l2: ||a - b|| / ||a|| for "changed" leaves (inf when ||a|| is 0).
    """

    path: str
    status: str
    a: str
    b: str
    max_abs: float | None = None
    rel_l2: float | None = None


def _describe(leaf: fmt.LeafRecord | None) -> str:
    if leaf is None:
        return ""
    if leaf.storage == fmt.HOST:
        return f"host state ({leaf.extra['host_type']}) x{len(leaf.states)}"
    return "None" if leaf.storage == fmt.NONE else f"{leaf.dtype}{list(leaf.shape)}"


def _fingerprint(leaf: fmt.LeafRecord) -> tuple | None:
    """Something equal iff the stored bytes are (None where the manifest cannot tell)."""
    if leaf.storage == fmt.CHUNKED:
        return (leaf.chunk_shape, sorted((name, digest) for name, (digest, _) in leaf.chunks.items()))
    if leaf.storage == fmt.PACKED and all(p.digest for p in leaf.pieces):
        return tuple(sorted((p.region, p.digest) for p in leaf.pieces))
    return ("none",) if leaf.storage == fmt.NONE else None


def _states(leaf: fmt.LeafRecord) -> list[tuple[str, str]]:
    return [(s.digest, s.encoding) for s in leaf.states]


def _groups(pairs: list[tuple[fmt.LeafRecord, fmt.LeafRecord]]) -> Iterator[list]:
    group, size = [], 0
    for pair in pairs:
        if group and size + pair[0].nbytes > GROUP_BYTES:
            yield group
            group, size = [], 0
        group.append(pair)
        size += pair[0].nbytes
    if group:
        yield group


def _values(plan: read_lib.LeafPlan) -> np.ndarray:
    data = plan.host(plan.whole)
    if data.dtype.kind in "biufc":
        return data.astype(np.complex128 if data.dtype.kind == "c" else np.float64)
    return data.astype(np.float64)  # ml_dtypes (bf16, fp8, int4) convert to float


def diff(
    directory: str | os.PathLike,
    a: int | str,
    b: int | str,
    *,
    directory_b: str | os.PathLike | None = None,
) -> list[LeafDiff]:
    """Compares step ``a`` with step ``b`` (of ``directory_b`` if given), leaf by leaf.

    Args:
      directory: the root holding step ``a``.
      a, b: steps or tag names.
      directory_b: the root holding step ``b`` (default: ``directory``).

    Returns:
      One LeafDiff per leaf path in either step, in A's order then B's new ones.

    Raises:
      CheckpointNotFoundError: a step does not exist.
      CorruptCheckpointError: a chunk read for the comparison fails its hash.

    Example:
      >>> changed = [d for d in diff("/tmp/ckpt", 100, 200) if d.status != "same"]  # doctest: +SKIP
    """
    root_a, manifest_a = api.open_step(directory, a)
    root_b, manifest_b = api.open_step(directory if directory_b is None else directory_b, b)
    leaves_a = {leaf.path: leaf for leaf in manifest_a.leaves}
    leaves_b = {leaf.path: leaf for leaf in manifest_b.leaves}
    out: dict[str, LeafDiff] = {}
    to_read = []
    for path in [*leaves_a, *(p for p in leaves_b if p not in leaves_a)]:
        leaf_a, leaf_b = leaves_a.get(path), leaves_b.get(path)
        described = (_describe(leaf_a), _describe(leaf_b))
        if leaf_a is None or leaf_b is None:
            out[path] = LeafDiff(path, "added" if leaf_a is None else "removed", *described)
        elif fmt.NONE in (leaf_a.storage, leaf_b.storage) or fmt.HOST in (leaf_a.storage, leaf_b.storage):
            if leaf_a.storage != leaf_b.storage or leaf_a.extra != leaf_b.extra:
                out[path] = LeafDiff(path, "dtype", *described)
            else:  # both None, or host states of the same kind: equal iff every process's state hashes equal
                same = _states(leaf_a) == _states(leaf_b)
                out[path] = LeafDiff(path, "same" if same else "changed", *described)
        elif leaf_a.shape != leaf_b.shape:
            out[path] = LeafDiff(path, "shape", *described)
        elif leaf_a.dtype != leaf_b.dtype:
            out[path] = LeafDiff(path, "dtype", *described)
        elif _fingerprint(leaf_a) is not None and _fingerprint(leaf_a) == _fingerprint(leaf_b):
            out[path] = LeafDiff(path, "same", *described, 0.0, 0.0)
        else:
            out[path] = LeafDiff(path, "same", *described)  # filled in below
            to_read.append((leaf_a, leaf_b))
    for group in _groups(to_read):
        plans_a = read_lib.read_to_host(root_a, manifest_a, [pa for pa, _ in group])
        plans_b = read_lib.read_to_host(root_b, manifest_b, [pb for _, pb in group])
        for (leaf, _), plan_a, plan_b in zip(group, plans_a, plans_b):
            out[leaf.path] = _compare(out[leaf.path], _values(plan_a), _values(plan_b))
    return list(out.values())


def _compare(entry: LeafDiff, a: np.ndarray, b: np.ndarray) -> LeafDiff:
    if a.size == 0 or np.array_equal(a, b, equal_nan=True):
        return entry._replace(status="same", max_abs=0.0, rel_l2=0.0)
    delta = np.abs(a - b)
    norm = float(np.linalg.norm(a.ravel()))
    diff_norm = float(np.linalg.norm(np.nan_to_num(delta).ravel()))
    rel = diff_norm / norm if norm else float("inf")
    return entry._replace(status="changed", max_abs=float(np.nanmax(delta)), rel_l2=rel)
