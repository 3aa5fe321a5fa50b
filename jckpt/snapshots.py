"""Snapshot: a pytree copied to host memory as the data a save will write.

Taking a snapshot is the only blocking part of an async save: it copies each
replica-0 shard this process writes to host memory (starting every
device-to-host copy before waiting on any).  After it returns, the caller may
mutate or donate its buffers; the snapshot keeps the values of the call.

Each leaf is planned here as ``chunked`` (a zarr3 array of its own) or
``packed`` (small: its bytes go into a per-process blob), and holds exactly
the shards this process writes: every replica-0 shard it owns of a sharded
jax array, and on process 0 alone the whole of everything else.

Host objects (an object with ``get_state()``/``set_state()`` such as a Grain
iterator, a ``numpy.random.Generator``, a ``random.Random``) are *host-state*
leaves: their state is taken here, at the call, and every process holds its
own (it goes into that process's blob).
"""

from __future__ import annotations

import math
import random
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from jckpt import chunking, lineage, tree
from jckpt import format as fmt
from jckpt.errors import UnsupportedLeafError

# Data types tensorstore's zarr3 driver stores natively; others are stored as an
# unsigned integer view of the same width (the manifest keeps the real dtype).
ZARR3_DTYPES = frozenset(
    "bool int2 int4 int8 int16 int32 int64 uint8 uint16 uint32 uint64 "
    "float16 bfloat16 float32 float64 complex64 complex128 float4_e2m1fn float8_e3m4 "
    "float8_e4m3fn float8_e4m3fnuz float8_e4m3b11fnuz float8_e5m2 float8_e5m2fnuz "
    "float8_e8m0fnu".split()
)


class Shard(NamedTuple):
    region: chunking.Region  # global index of this shard
    data: np.ndarray  # host copy, in the stored dtype


class LeafSnapshot(NamedTuple):
    """One leaf: its description (the same on every process) and the shards this process writes."""

    path: str
    parts: list  # key-path parts (see tree.flatten)
    origin: str  # "jax" | "numpy" | "python" | "none"
    storage: str  # format.NONE | format.CHUNKED | format.PACKED
    dtype: str  # logical dtype name ("" for None)
    stored_dtype: str
    shape: tuple[int, ...]
    steps: tuple[int, ...]  # chunk-grid strides imposed by the sharding
    shards: list[Shard]  # the shards this process writes (may be empty)
    extra: dict  # prng_impl, py_type, numpy_scalar; host_type, class
    encoding: str = ""  # host states: how the bytes in shards encode this process's state


class Snapshot(NamedTuple):
    leaves: list[LeafSnapshot]
    process_index: int
    lineage: dict = {}  # where it came from (see jckpt.lineage)


def stored_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype written to disk for an array of ``dtype``."""
    if dtype.name in ZARR3_DTYPES:
        return dtype
    return np.dtype(f"uint{dtype.itemsize * 8}")


def _storage(dtype: np.dtype, shape: tuple[int, ...]) -> str:
    return fmt.PACKED if dtype.itemsize * math.prod(shape) <= fmt.PACK_LIMIT_BYTES else fmt.CHUNKED


def _to_stored(host: np.ndarray, dtype: np.dtype) -> np.ndarray:
    target = stored_dtype(dtype)
    return host if target == dtype else host.view(target)


def _whole(shape: tuple[int, ...]) -> chunking.Region:
    return tuple(slice(0, n) for n in shape)


def _numpy_leaf(path, parts, value, origin, copy, extra, primary) -> LeafSnapshot:
    array = np.asarray(value)
    if not (array.dtype.kind in "biufc" or hasattr(ml_dtypes, array.dtype.name)):
        raise UnsupportedLeafError(f"leaf {path!r}: arrays of dtype {array.dtype} cannot be checkpointed")
    dtype = array.dtype.newbyteorder("=") if array.dtype.byteorder == ">" else array.dtype
    stored = stored_dtype(dtype)
    shards = []
    if primary:  # host values are written by process 0 alone
        if dtype != array.dtype:  # big-endian: stored as little-endian (a copy)
            array = array.astype(dtype)
        elif copy:
            array = np.array(array, copy=True)
        shards = [Shard(_whole(array.shape), _to_stored(array, dtype))]
    return LeafSnapshot(
        path, parts, origin, _storage(dtype, array.shape), dtype.name, stored.name, array.shape,
        array.shape, shards, extra,
    )


def _python_scalar(path, parts, value, primary) -> LeafSnapshot:
    kind = type(value).__name__
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise UnsupportedLeafError(f"leaf {path!r}: int {value} does not fit in int64")
    return _numpy_leaf(path, parts, np.asarray(value), "python", False, {"py_type": kind}, primary)


# How device-to-host copies are made off CPU: "pinned" (``device_put`` to the ``pinned_host``
# memory kind, whose buffer numpy then aliases) or "direct" (``copy_to_host_async``, then
# ``np.asarray`` into fresh pageable memory, paying a page fault per 4 KiB). Measured on an
# H200 with benchmarks/gpu_d2h.py: 1.875 GiB in 0.038 s (pinned) vs 1.255 s (direct); see
# docs/benchmarks.md. "direct" remains where a backend has no pinned_host memory.
D2H_VIA = "pinned"


def _owned(array: jax.Array) -> list:
    return [s for s in array.addressable_shards if s.replica_id == 0]


def _start_copies(leaves: list) -> dict[tuple, Any]:
    """Starts the device-to-host copy of every owned shard of every accelerator leaf, before any waits.

    Returns:
      (id(leaf), shard index) -> its pinned-host copy (with D2H_VIA == "pinned"; the
      leaves stay alive in the caller's list, so their ids are stable).
    """
    started: dict[tuple, Any] = {}
    if jax.default_backend() == "cpu":
        return started  # host memory already: nothing to copy ahead
    for leaf in leaves:
        if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
            continue
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            continue  # small; copied when its key data is taken
        small_and_whole = leaf.nbytes <= fmt.PACK_LIMIT_BYTES and (
            leaf.is_fully_addressable or leaf.is_fully_replicated
        )
        for s in _owned(leaf):
            if s.data.devices().pop().platform == "cpu":
                continue
            if D2H_VIA == "pinned" and not small_and_whole:
                try:
                    sharding = s.data.sharding.with_memory_kind("pinned_host")
                    started[(id(leaf), _index(s.index, leaf.shape))] = jax.device_put(s.data, sharding)
                    continue
                except (ValueError, NotImplementedError):  # no pinned_host memory here
                    pass
            s.data.copy_to_host_async()
    return started


def _index(index, shape) -> tuple:
    return chunking.region_key(chunking.normalize(index, shape))


def _jax_leaf(path, parts, array: jax.Array, copy: bool, primary: bool, started: dict) -> LeafSnapshot:
    leaf_id = id(array)
    if isinstance(array, jax.core.Tracer):
        raise UnsupportedLeafError(
            f"leaf {path!r} is a jax tracer: save concrete arrays, outside jit / grad / vmap"
        )
    extra = {}
    if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
        extra["prng_impl"] = str(jax.random.key_impl(array))
        array = jax.random.key_data(array)
    dtype = np.dtype(array.dtype)
    shape = tuple(array.shape)
    storage = _storage(dtype, shape)
    whole = array.is_fully_addressable or array.is_fully_replicated
    if storage == fmt.PACKED and whole:  # small and held whole: process 0 writes it
        steps = shape  # no chunk grid
        shards = []
        if primary:
            source = array if array.is_fully_addressable else array.addressable_shards[0].data
            host = np.array(source) if copy else np.asarray(source)
            shards = [Shard(_whole(shape), _to_stored(host, dtype))]
    else:
        indices = array.sharding.devices_indices_map(shape)
        starts = [[r.start for r in chunking.normalize(i, shape)] for i in indices.values()]
        steps = tuple(chunking.grid_steps(shape, starts))
        shards = []
        for s in _owned(array):
            host = np.asarray(started.pop((leaf_id, _index(s.index, shape)), s.data))
            if copy and s.data.devices().pop().platform == "cpu":
                host = host.copy()  # on CPU np.asarray aliases the device buffer
            shards.append(Shard(chunking.normalize(s.index, shape), _to_stored(host, dtype)))
    return LeafSnapshot(
        path, parts, "jax", storage, dtype.name, stored_dtype(dtype).name, shape, steps, shards, extra
    )


def _plain(value: Any) -> Any:
    """A bit generator's state with numpy arrays and scalars as lists and Python numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def host_state(value: Any) -> tuple[str, Any] | None:
    """``(host type, state)`` of a host-state leaf, taken now; None when ``value`` is not one."""
    if isinstance(value, np.random.Generator):
        return "numpy.random.Generator", _plain(value.bit_generator.state)
    if isinstance(value, random.Random):
        version, internal, gauss = value.getstate()
        return "random.Random", [version, list(internal), gauss]
    if callable(getattr(value, "get_state", None)) and callable(getattr(value, "set_state", None)):
        return "object", value.get_state()
    return None


def _host_leaf(path, parts, value: Any, kind: str, state: Any, process: int) -> LeafSnapshot:
    cls = type(value)
    encoding, raw = fmt.encode_state(state, f"leaf {path!r} ({cls.__name__})")
    shard = Shard((slice(process, process + 1),), np.frombuffer(raw, np.uint8))
    extra = {"host_type": kind, "class": f"{cls.__module__}.{cls.__qualname__}"}
    return LeafSnapshot(path, parts, "host", fmt.HOST, "", "", (), (), [shard], extra, encoding)


def _empty_tree_error(state: Any) -> ValueError:
    hint = ""
    if type(state).__name__ == "GraphDef" and type(state).__module__.startswith("flax"):
        hint = (
            " An nnx.GraphDef is the structure of a module, not its state: save the module itself, "
            "or nnx.state(module), and rebuild with the same code (like=nnx.eval_shape(...))."
        )
    return ValueError(
        f"nothing to save: {type(state).__name__} has no leaves (an empty tree would be stored).{hint}"
    )


def snapshot(state: Any, *, copy: bool = True) -> Snapshot:
    """Copies ``state`` to host memory, ready to be written by a save.

    Args:
      state: any pytree of jax arrays, numpy arrays, Python scalars, None, and
        host objects (see the module docstring), whose state is taken here.
      copy: own the host memory even where the data already lives on the host
        (CPU jax arrays, numpy arrays), so the caller may mutate or donate its
        buffers after this returns.  ``jckpt.save`` passes False.

    Returns:
      A Snapshot holding the shards this process writes.

    Raises:
      UnsupportedLeafError: a leaf of an unsupported type (names its key path).
      TypeError: a host object's state is neither bytes nor JSON-like (names its key path).
      ValueError: ``state`` has no leaves at all (e.g. an ``nnx.GraphDef``).

    Example:
      >>> snap = snapshot({"w": np.ones(3)})
      >>> snap.leaves[0].path, snap.leaves[0].storage
      ('w', 'packed')
    """
    flat, _ = tree.flatten(state)
    if not flat:
        raise _empty_tree_error(state)
    primary = jax.process_index() == 0
    started = _start_copies([leaf for _, _, leaf in flat])
    leaves = []
    for path, parts, leaf in flat:
        if leaf is None:
            leaves.append(LeafSnapshot(path, parts, "none", fmt.NONE, "", "", (), (), [], {}))
        elif isinstance(leaf, jax.Array):
            leaves.append(_jax_leaf(path, parts, leaf, copy, primary, started))
        elif isinstance(leaf, (np.ndarray, np.generic)):
            extra = {"numpy_scalar": True} if isinstance(leaf, np.generic) else {}
            leaves.append(_numpy_leaf(path, parts, leaf, "numpy", copy, extra, primary))
        elif isinstance(leaf, (bool, int, float, complex)):
            leaves.append(_python_scalar(path, parts, leaf, primary))
        elif (found := host_state(leaf)) is not None:
            leaves.append(_host_leaf(path, parts, leaf, *found, jax.process_index()))
        else:
            raise UnsupportedLeafError(
                f"leaf {path!r} has unsupported type {type(leaf).__name__}; leaves must be jax arrays, "
                "numpy arrays, Python scalars, None, objects with get_state()/set_state(), "
                "numpy.random.Generator or random.Random"
            )
    return Snapshot(leaves, jax.process_index(), lineage.of_state(state))
