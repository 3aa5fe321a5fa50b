"""The manifest: one JSON document per committed step (see docs/format.md).

It holds the tree (key paths), each leaf's shape, dtypes and chunk grid, and
for every chunk its hash and the data directory holding its bytes, which may
belong to an earlier step (incremental saves).  Metrics and user metadata
live here too, so ``info`` never touches array data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from jckpt import layout, storage

PACKED_ARRAY = "packed"


class CheckpointInfo(NamedTuple):
    """What ``jckpt.info`` reports about a committed step.

    Attributes:
      step: the step number.
      kind: "full" or "incremental".
      metrics: the metrics saved with it (or None).
      metadata: the user metadata saved with it (or None).
      bytes_written: bytes of array data this save wrote (uncompressed; small leaves are
        packed with 64-byte alignment, so a full save may write a little over bytes_total).
      bytes_total: logical size of every array in the checkpoint.
      created: commit time, seconds since the epoch.
      save_seconds: wall time of the save (hash, write, commit).
    """

    step: int
    kind: str
    metrics: dict | None
    metadata: dict | None
    bytes_written: int
    bytes_total: int
    created: float
    save_seconds: float


def info_of(manifest: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(
        step=manifest["step"],
        kind=manifest["kind"],
        metrics=manifest.get("metrics"),
        metadata=manifest.get("metadata"),
        bytes_written=manifest["bytes_written"],
        bytes_total=manifest["bytes_total"],
        created=manifest["created"],
        save_seconds=manifest["save_seconds"],
    )


def to_json(value: Any, what: str) -> Any:
    """Checks that ``value`` is JSON-serialisable (numpy scalars become Python ones)."""
    if value is None:
        return None

    def default(obj):
        if isinstance(obj, np.generic) or (isinstance(obj, np.ndarray) and obj.ndim == 0):
            return obj.item()
        if hasattr(obj, "shape") and getattr(obj, "ndim", None) == 0:  # 0-d jax arrays
            return np.asarray(obj).item()
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(value, default=default, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e


def encode(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, separators=(",", ":")).encode()


def array_leaves(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (leaf for leaf in manifest["leaves"] if "array" in leaf)


def leaf_nbytes(leaf: dict[str, Any]) -> int:
    if leaf["origin"] == "none":
        return 0
    return np.dtype(leaf["stored_dtype"]).itemsize * math.prod(leaf["shape"])


def blobs(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every packed blob of a manifest by array name: process 0's ``packed`` and per-process ones."""
    out = dict(manifest.get("blobs") or {})
    if manifest.get("packed"):
        out[PACKED_ARRAY] = manifest["packed"]
    return out


def referenced_keys(manifest: dict[str, Any]) -> set[str]:
    """Every key under the root this manifest needs (its own manifest included)."""
    keys = {layout.manifest_key(manifest["step"])}
    arrays = [(leaf["array"], leaf["chunks"]) for leaf in array_leaves(manifest)]
    arrays += [(name, blob["chunks"]) for name, blob in blobs(manifest).items()]
    for array, chunks in arrays:
        for name, (_, source) in chunks.items():
            keys.add(f"{source}/{array}/zarr.json")
            keys.add(f"{source}/{array}/{storage.chunk_key(name.split('.') if name else [])}")
    return keys


def data_dirs(manifest: dict[str, Any]) -> set[str]:
    """The data directories this manifest reads from."""
    return {"/".join(key.split("/")[:2]) for key in referenced_keys(manifest) if key.count("/") >= 2}
