"""Snapshot: a pytree copied to host memory as the data a save will write.

Taking a snapshot is the only blocking part of an async save: it copies each
replica-0 shard this process owns to host memory (starting every
device-to-host copy before waiting on any).  After it returns, the caller may
mutate or donate its buffers; the snapshot keeps the values of the call.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from jckpt import chunking, tree
from jckpt.errors import UnsupportedLeafError

# Data types tensorstore's zarr3 driver stores natively; others are stored as an
# unsigned integer view of the same width (the manifest keeps the real dtype).
ZARR3_DTYPES = frozenset(
    "bool int2 int4 int8 int16 int32 int64 uint8 uint16 uint32 uint64 "
    "float16 bfloat16 float32 float64 complex64 complex128 float4_e2m1fn float8_e3m4 "
    "float8_e4m3fn float8_e4m3fnuz float8_e4m3b11fnuz float8_e5m2 float8_e5m2fnuz "
    "float8_e8m0fnu".split()
)

# Leaves of at most this many bytes that this process holds whole are packed together.
PACK_LIMIT_BYTES = 256 * 2**10


class Shard(NamedTuple):
    region: chunking.Region  # global index of this shard
    data: np.ndarray  # host copy, in the stored dtype


class LeafSnapshot(NamedTuple):
    path: str
    parts: list  # key-path parts (see tree.flatten)
    origin: str  # "jax" | "numpy" | "python" | "none"
    dtype: str  # logical dtype name ("" for None)
    stored_dtype: str
    shape: tuple[int, ...]
    steps: tuple[int, ...]  # chunk-grid strides imposed by the sharding
    shards: list[Shard]  # replica-0 shards held by this process (may be empty)
    packing: str  # "whole": small, held whole (process 0's blob); "shards": small, sharded
    #               across processes (each packs its own shards); "": a chunked array
    extra: dict  # prng_impl, py_type, numpy_scalar


class Snapshot(NamedTuple):
    leaves: list[LeafSnapshot]
    process_index: int

    @property
    def nbytes(self) -> int:
        return sum(s.data.nbytes for leaf in self.leaves for s in leaf.shards)


def stored_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype written to disk for an array of ``dtype``."""
    if dtype.name in ZARR3_DTYPES:
        return dtype
    return np.dtype(f"uint{dtype.itemsize * 8}")


def _to_stored(host: np.ndarray, dtype: np.dtype) -> np.ndarray:
    target = stored_dtype(dtype)
    return host if target == dtype else host.view(target)


def _numpy_leaf(path, parts, value, origin, copy, extra) -> LeafSnapshot:
    array = np.array(value, copy=True) if copy else np.asarray(value)
    if not (array.dtype.kind in "biufc" or hasattr(ml_dtypes, array.dtype.name)):
        raise UnsupportedLeafError(f"leaf {path!r}: arrays of dtype {array.dtype} cannot be checkpointed")
    stored = _to_stored(array, array.dtype)
    full = tuple(slice(0, n) for n in array.shape)
    return LeafSnapshot(
        path,
        parts,
        origin,
        array.dtype.name,
        stored.dtype.name,
        array.shape,
        array.shape,
        [Shard(full, stored)],
        "whole" if array.nbytes <= PACK_LIMIT_BYTES else "",
        extra,
    )


def _python_scalar(path, parts, value) -> LeafSnapshot:
    kind = type(value).__name__
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise UnsupportedLeafError(f"leaf {path!r}: int {value} does not fit in int64")
    return _numpy_leaf(path, parts, np.asarray(value), "python", False, {"py_type": kind})


def _jax_leaf(path, parts, array: jax.Array, copy: bool) -> LeafSnapshot:
    extra = {}
    if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
        extra["prng_impl"] = str(jax.random.key_impl(array))
        array = jax.random.key_data(array)
    dtype = np.dtype(array.dtype)
    shape = tuple(array.shape)
    indices = array.sharding.devices_indices_map(shape)
    starts = [[chunking.normalize(i, shape)[d].start for d in range(len(shape))] for i in indices.values()]
    steps = tuple(chunking.grid_steps(shape, starts))
    whole = array.is_fully_addressable or array.is_fully_replicated
    small = dtype.itemsize * math.prod(shape) <= PACK_LIMIT_BYTES
    if whole and small:
        source = array if array.is_fully_addressable else array.addressable_shards[0].data
        host = np.array(source) if copy else np.asarray(source)
        full = tuple(slice(0, n) for n in shape)
        shards = [Shard(full, _to_stored(host, dtype))]
    else:
        owned = [s for s in array.addressable_shards if s.replica_id == 0]
        for s in owned:  # start every device-to-host copy before waiting on one
            s.data.copy_to_host_async()
        shards = []
        for s in owned:
            host = np.asarray(s.data)
            if copy and s.data.devices().pop().platform == "cpu":
                host = host.copy()  # on CPU np.asarray aliases the device buffer
            shards.append(Shard(chunking.normalize(s.index, shape), _to_stored(host, dtype)))
    return LeafSnapshot(
        path,
        parts,
        "jax",
        dtype.name,
        stored_dtype(dtype).name,
        shape,
        steps,
        shards,
        ("whole" if whole else "shards") if small else "",
        extra,
    )


def snapshot(state: Any, *, copy: bool = True) -> Snapshot:
    """Copies ``state`` to host memory, ready to be written by a save.

    Args:
      state: any pytree of jax arrays, numpy arrays, Python scalars and None.
      copy: own the host memory even where the data already lives on the host
        (CPU jax arrays, numpy arrays), so the caller may mutate or donate its
        buffers after this returns.  ``jckpt.save`` passes False.

    Returns:
      A Snapshot holding this process's replica-0 shards.

    Raises:
      UnsupportedLeafError: a leaf of an unsupported type (names its key path).

    Example:
      >>> snap = snapshot({"w": np.ones(3)})
      >>> snap.leaves[0].path, snap.nbytes
      ('w', 24)
    """
    flat, _ = tree.flatten(state)
    leaves = []
    for path, parts, leaf in flat:
        if leaf is None:
            leaves.append(LeafSnapshot(path, parts, "none", "", "", (), (), [], "", {}))
        elif isinstance(leaf, jax.Array):
            leaves.append(_jax_leaf(path, parts, leaf, copy))
        elif isinstance(leaf, (np.ndarray, np.generic)):
            extra = {"numpy_scalar": True} if isinstance(leaf, np.generic) else {}
            leaves.append(_numpy_leaf(path, parts, leaf, "numpy", copy, extra))
        elif isinstance(leaf, (bool, int, float, complex)):
            leaves.append(_python_scalar(path, parts, leaf))
        else:
            raise UnsupportedLeafError(
                f"leaf {path!r} has unsupported type {type(leaf).__name__}; leaves must be "
                "jax arrays, numpy arrays, Python scalars or None"
            )
    return Snapshot(leaves, jax.process_index())
