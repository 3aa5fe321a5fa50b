"""restore(): read the manifest, plan reads for the target shardings, verify every chunk, place arrays."""

from __future__ import annotations

import collections
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import tensorstore as ts

from jckpt import chunking, hashing, layout, storage, tree
from jckpt import manifest as manifest_lib
from jckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, TreeMismatchError

MAX_INFLIGHT_BYTES = 512 * 2**20


class Target(NamedTuple):
    """What one leaf is restored as."""

    kind: str  # "jax" | "numpy" | "python" | "none"
    dtype: np.dtype | None  # None: the stored logical dtype
    sharding: jax.sharding.Sharding | None  # jax targets; None: default device
    py_type: type | None = None
    key: bool = False  # a typed PRNG key
    scalar: bool = False  # a numpy scalar (np.generic) rather than an array


def _target_of(like_leaf: Any) -> Target:
    if like_leaf is None:
        return Target("none", None, None)
    if isinstance(like_leaf, (bool, int, float, complex)):
        return Target("python", None, None, type(like_leaf))
    if isinstance(like_leaf, (np.ndarray, np.generic)):
        return Target("numpy", np.dtype(like_leaf.dtype), None, scalar=isinstance(like_leaf, np.generic))
    if isinstance(like_leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(like_leaf, "sharding", None)
        if jax.dtypes.issubdtype(like_leaf.dtype, jax.dtypes.prng_key):
            return Target("jax", None, sharding, key=True)
        return Target("jax", np.dtype(like_leaf.dtype), sharding)
    raise TypeError(
        f"like leaves must be arrays, jax.ShapeDtypeStruct, Python scalars or None, "
        f"got {type(like_leaf).__name__}"
    )


def _default_target(leaf: dict[str, Any]) -> Target:
    kind = leaf["origin"]
    py_type = {"int": int, "float": float, "bool": bool, "complex": complex}.get(leaf.get("py_type"))
    return Target(kind, None, None, py_type, key="prng_impl" in leaf, scalar=bool(leaf.get("numpy_scalar")))


def _check_shape(leaf: dict[str, Any], like_leaf: Any, problems: list[str]) -> None:
    if like_leaf is None or isinstance(like_leaf, (bool, int, float, complex)):
        return
    stored = tuple(leaf["shape"])
    wanted = tuple(like_leaf.shape)
    if jax.dtypes.issubdtype(like_leaf.dtype, jax.dtypes.prng_key):
        stored = stored[: len(wanted)]  # stored as key data: trailing key dimensions
    if stored != wanted:
        problems.append(f"{leaf['path']!r}: checkpoint has shape {stored}, like has {wanted}")


class _ChunkRead(NamedTuple):
    tag: Any  # handed back to the caller's on_chunk
    name: str  # chunk name in the manifest
    region: chunking.Region  # region of the stored array
    digest: str
    source: str  # data directory holding the bytes


class _LeafPlan:
    """Target regions of one leaf and the host buffers they are read into."""

    def __init__(self, leaf: dict[str, Any], target: Target):
        self.leaf, self.target = leaf, target
        self.shape = tuple(leaf["shape"])
        self.stored = np.dtype(leaf["stored_dtype"])
        self.regions = self._regions()
        self.buffers: dict[tuple, np.ndarray] = {}  # region_key -> host data (stored dtype)

    def _regions(self) -> list[chunking.Region]:
        whole = tuple(slice(0, n) for n in self.shape)
        sharding = self.target.sharding
        if self.target.kind != "jax" or sharding is None or self.target.key or "packed" in self.leaf:
            return [whole]
        logical = self.shape
        indices = sharding.addressable_devices_indices_map(logical).values()
        regions = {chunking.region_key(r): r for r in (chunking.normalize(i, logical) for i in indices)}
        return list(regions.values())

    def buffer(self, region: chunking.Region) -> np.ndarray:
        """The (new) host buffer a region is read into."""
        key = chunking.region_key(region)
        if key not in self.buffers:
            self.buffers[key] = np.empty([s.stop - s.start for s in region], self.stored)
        return self.buffers[key]

    def host(self, region: chunking.Region) -> np.ndarray:
        """The data of ``region``, in the logical dtype (from its own buffer or the whole array's)."""
        key = chunking.region_key(region)
        if key in self.buffers:
            data = self.buffers[key]
        else:
            whole = tuple(slice(0, n) for n in self.shape)
            data = self.buffers[chunking.region_key(whole)][chunking.relative(region, whole)]
        logical = np.dtype(self.leaf["dtype"])
        return data if logical == self.stored else data.view(logical)


def _corrupt(step: int, path: str, chunk: str, source: str, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"step {step}, leaf {path!r}, chunk {chunk or '(scalar)'} (in {source}): {why}"
    )


class Reader:
    """Reads and verifies the chunks of one manifest."""

    def __init__(self, root: layout.Root, manifest: dict[str, Any]):
        self.root, self.manifest = root, manifest
        self.step = manifest["step"]
        self.stores: dict[tuple[str, str], ts.Future] = {}
        self.bytes_read = 0

    def _store(self, source: str, array: str) -> ts.Future:
        key = (source, array)
        if key not in self.stores:
            kv = storage.join(self.root.spec, f"{source}/{array}")
            self.stores[key] = ts.open({"driver": "zarr3", "kvstore": kv}, open=True, context=self.root.ctx)
        return self.stores[key]

    def read_chunks(self, array: str, path: str, reads: list[_ChunkRead], on_chunk) -> None:
        """Reads chunks of ``array`` (in any data directory), verifies each, calls ``on_chunk(tag, data)``.

        At most MAX_INFLIGHT_BYTES are read ahead of the verification.
        """
        for read in reads:
            self._store(read.source, array)
        inflight: collections.deque = collections.deque()
        inflight_bytes = 0

        def finish() -> None:
            nonlocal inflight_bytes
            read, future, nbytes = inflight.popleft()
            inflight_bytes -= nbytes
            try:
                data = future.result()
            except Exception as e:  # a missing or unreadable data file
                raise _corrupt(self.step, path, read.name, read.source, f"unreadable: {e}") from e
            if hashing.chunk_hash(data) != read.digest:
                raise _corrupt(self.step, path, read.name, read.source, "hash mismatch")
            self.bytes_read += data.nbytes
            on_chunk(read.tag, data)

        for read in reads:
            try:
                store = self._store(read.source, array).result()
            except Exception as e:
                raise _corrupt(self.step, path, read.name, read.source, f"cannot open: {e}") from e
            nbytes = store.dtype.numpy_dtype.itemsize * int(np.prod([s.stop - s.start for s in read.region]))
            inflight.append((read, store[read.region].read(), nbytes))
            inflight_bytes += nbytes
            while inflight_bytes > MAX_INFLIGHT_BYTES:
                finish()
        while inflight:
            finish()

    def read_leaf(self, plan: _LeafPlan) -> None:
        leaf = plan.leaf
        chunk_shape = leaf["chunk_shape"]
        wanted: dict[tuple[int, ...], list[chunking.Region]] = {}
        for region in plan.regions:
            for chunk_id in chunking.chunk_ids_in(region, chunk_shape):
                wanted.setdefault(chunk_id, []).append(region)
        reads = []
        for chunk_id in wanted:
            name = chunking.chunk_name(chunk_id)
            if name not in leaf["chunks"]:
                raise _corrupt(self.step, leaf["path"], name, "manifest", "chunk missing from manifest")
            digest, source = leaf["chunks"][name]
            region = chunking.chunk_region(chunk_id, chunk_shape, plan.shape)
            reads.append(_ChunkRead(chunk_id, name, region, digest, source))

        def place(chunk_id, data):
            chunk_region = chunking.chunk_region(chunk_id, chunk_shape, plan.shape)
            for region in wanted[chunk_id]:
                key = chunking.region_key(region)
                if key == chunking.region_key(chunk_region) and key not in plan.buffers:
                    plan.buffers[key] = data  # aligned: adopt the chunk, no copy
                    continue
                overlap = chunking.intersect(region, chunk_region)
                plan.buffer(region)[chunking.relative(overlap, region)] = data[
                    chunking.relative(overlap, chunk_region)
                ]

        self.read_chunks(leaf["array"], leaf["path"], reads, place)

    def read_packed(self, plans: list[_LeafPlan]) -> None:
        packed = self.manifest["packed"] or {"nbytes": 0, "chunk_bytes": 1, "chunks": {}}
        chunk = packed["chunk_bytes"]
        needed = sorted(
            {
                i
                for p in plans
                for i in range(p.leaf["packed"][0] // chunk, -(-sum(p.leaf["packed"]) // chunk))
            }
        )
        blob = np.empty(packed["nbytes"], np.uint8)
        reads = []
        for i in needed:
            digest, source = packed["chunks"][str(i)]
            region = (slice(i * chunk, min((i + 1) * chunk, packed["nbytes"])),)
            reads.append(_ChunkRead(region, str(i), region, digest, source))

        def place(region, data):
            blob[region] = data

        self.read_chunks(manifest_lib.PACKED_ARRAY, "(packed small leaves)", reads, place)
        for p in plans:
            offset, nbytes = p.leaf["packed"]
            p.buffers[tuple((0, n) for n in p.shape)] = (
                blob[offset : offset + nbytes].view(p.stored).reshape(p.shape)
            )


def _finish(plan: _LeafPlan) -> Any:
    """Turns a leaf's host buffers into the target value (dtype cast, device placement)."""
    target = plan.target

    def host(region):
        data = plan.host(region)
        return data if target.dtype is None or target.dtype == data.dtype else data.astype(target.dtype)

    whole = tuple(slice(0, n) for n in plan.shape)
    if target.kind == "python":
        value = host(whole).item()
        return target.py_type(value) if target.py_type else value
    if target.kind == "numpy":
        return host(whole)[()] if target.scalar else host(whole)
    if target.key:
        keys = jax.random.wrap_key_data(host(whole), impl=plan.leaf["prng_impl"])
        return keys if target.sharding is None else jax.device_put(keys, target.sharding)
    if target.sharding is None:
        return jax.device_put(host(whole))
    index_map = target.sharding.addressable_devices_indices_map(plan.shape)
    arrays = [
        jax.device_put(host(chunking.normalize(index, plan.shape)), device)
        for device, index in index_map.items()
    ]
    return jax.make_array_from_single_device_arrays(plan.shape, target.sharding, arrays)


def resolve_step(root: layout.Root, step: int | None) -> int:
    root.check_version()
    if step is not None:
        return int(step)
    steps = root.committed_steps()
    if not steps:
        raise CheckpointNotFoundError(f"no committed checkpoint at {root.directory!r}")
    return steps[-1]


def read_plans(root: layout.Root, manifest: dict[str, Any], plans: list[_LeafPlan]) -> Reader:
    """Reads (and verifies) every chunk the plans need; returns the reader for its counters."""
    reader = Reader(root, manifest)
    packed = [p for p in plans if "packed" in p.leaf]
    if packed:
        reader.read_packed(packed)
    for p in plans:
        if "array" in p.leaf:
            reader.read_leaf(p)
    return reader


def restore(directory: str | os.PathLike, like: Any = None, *, step: int | None = None) -> Any:
    """Restores a committed step (default: the latest), verifying every chunk's hash.

    Args:
      directory: the checkpoint root.
      like: optional pytree of arrays / ``jax.ShapeDtypeStruct`` (with or without
        ``.sharding``) / Python scalars / None giving the result's structure,
        dtypes (cast if they differ) and shardings (each device reads only its
        regions).  It may name a subset of the saved leaves by key path.
        Without it, the saved tree comes back as nested dicts and lists
        (NamedTuples and dataclasses become dicts of their fields, tuples
        become lists), jax arrays on the default device, numpy arrays as numpy,
        Python scalars as Python scalars.
      step: the step to restore; None for the latest committed one.

    Returns:
      The restored pytree.

    Raises:
      CheckpointNotFoundError: no checkpoint / no such step.
      TreeMismatchError: ``like`` names paths the checkpoint lacks, or shapes differ.
      CorruptCheckpointError: a chunk fails its hash (names step, leaf and chunk).
      UnsupportedFormatError: written by a newer jckpt format version.

    Example:
      >>> state = restore("/tmp/ckpt", like={"w": jax.ShapeDtypeStruct((3,), np.float32)})  # doctest: +SKIP
    """
    root = layout.Root(directory)
    step = resolve_step(root, step)
    manifest = root.read_manifest(step)
    stored = {leaf["path"]: leaf for leaf in manifest["leaves"]}
    if like is None:
        targets = [(leaf, _default_target(leaf)) for leaf in manifest["leaves"]]
        treedef = None
    else:
        flat, treedef = tree.flatten(like)
        missing = [path for path, _, leaf in flat if leaf is not None and path not in stored]
        problems = [f"{p!r}: not in the checkpoint" for p in missing]
        for path, _, like_leaf in flat:
            if path in stored:
                _check_shape(stored[path], like_leaf, problems)
        if problems:
            raise TreeMismatchError(
                f"like does not match step {step} at {root.directory!r}:\n  " + "\n  ".join(problems)
            )
        targets = [
            (stored[path], _target_of(like_leaf)) if like_leaf is not None else (None, None)
            for path, _, like_leaf in flat
        ]
    plans = [
        _LeafPlan(leaf, target)
        for leaf, target in targets
        if leaf is not None and leaf["origin"] != "none" and target.kind != "none"
    ]
    read_plans(root, manifest, plans)
    values = iter(_finish(p) for p in plans)
    results = [
        next(values) if leaf is not None and leaf["origin"] != "none" and target.kind != "none" else None
        for leaf, target in targets
    ]
    if treedef is None:
        return tree.nest([(leaf["keys"], value) for (leaf, _), value in zip(targets, results)])
    return jax.tree_util.tree_unflatten(treedef, results)
