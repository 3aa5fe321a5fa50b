"""restore(): read the manifest, plan reads for the target shardings, verify every chunk, place arrays."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import tensorstore as ts

from jckpt import chunking, hashing, layout, storage, tree
from jckpt import manifest as manifest_lib
from jckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, TreeMismatchError

MAX_INFLIGHT_BYTES = 128 * 2**20  # measured: 128 MiB restores as fast as 512 with ~15% less memory


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
    if like_leaf is None:
        return
    stored = tuple(leaf.get("shape", ()))
    wanted = () if isinstance(like_leaf, (bool, int, float, complex)) else tuple(like_leaf.shape)
    dtype = getattr(like_leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        stored = stored[: len(wanted)]  # stored as key data: trailing key dimensions
    if stored != wanted:
        problems.append(f"{leaf['path']!r}: checkpoint has shape {stored}, like has {wanted}")


class _ChunkRead(NamedTuple):
    """One stored chunk to read and verify."""

    array: str  # array directory name (leaf array id or "packed")
    path: str  # leaf path, for error messages
    name: str  # chunk name in the manifest
    region: chunking.Region  # region of the stored array
    digest: str
    source: str  # data directory holding the bytes
    dest: np.ndarray | None  # C-contiguous view to read into directly, or None
    on_chunk: Callable[[np.ndarray], None] | None  # where the chunk goes when dest is None


def aligned_empty(shape: Sequence[int], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised C-order array whose data is ``alignment``-byte aligned.

    jax adopts 64-byte-aligned host buffers on CPU instead of copying them.
    """
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


class LeafPlan:
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
        """The host buffer a region is read into (allocated, aligned, on first use)."""
        key = chunking.region_key(region)
        if key not in self.buffers:
            self.buffers[key] = aligned_empty([s.stop - s.start for s in region], self.stored)
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

    def _stored_shards(self) -> list[tuple[chunking.Region, str, int, int]]:
        """(region, blob, offset, nbytes) of each stored shard of a leaf packed per process."""
        return [
            (tuple(slice(a, b) for a, b in shard["region"]), shard["blob"], *shard["at"])
            for shard in self.leaf["shards"]
        ]

    def blob_ranges(self) -> list[tuple[str, int, int]]:
        """The (blob, offset, nbytes) byte ranges this leaf needs from packed blobs."""
        if "packed" in self.leaf:
            offset, nbytes = self.leaf["packed"]
            return [(manifest_lib.PACKED_ARRAY, offset, nbytes)] if nbytes else []  # zero-size: nothing
        if "shards" in self.leaf:
            return [
                (blob, offset, nbytes)
                for region, blob, offset, nbytes in self._stored_shards()
                if any(chunking.intersect(region, target) for target in self.regions)
            ]
        return []

    def take_from_blobs(self, buffers: dict[str, np.ndarray]) -> None:
        """Fills the target buffers from packed blobs (after their chunks were read)."""
        if "packed" in self.leaf:
            offset, nbytes = self.leaf["packed"]
            blob = buffers.get(manifest_lib.PACKED_ARRAY, np.empty(0, np.uint8))
            data = blob[offset : offset + nbytes]
            self.buffers[tuple((0, n) for n in self.shape)] = data.view(self.stored).reshape(self.shape)
            return
        for region, blob, offset, nbytes in self._stored_shards():
            overlaps = [(t, o) for t in self.regions if (o := chunking.intersect(t, region)) is not None]
            if not overlaps:
                continue  # not needed here, so not read (see blob_ranges)
            data = buffers[blob][offset : offset + nbytes].view(self.stored)
            data = data.reshape([r.stop - r.start for r in region])
            for target, overlap in overlaps:
                self.buffer(target)[chunking.relative(overlap, target)] = data[
                    chunking.relative(overlap, region)
                ]

    def chunk_reads(self) -> list[_ChunkRead]:
        """The reads of every stored chunk overlapping a target region, each chunk once."""
        leaf, chunk_shape = self.leaf, self.leaf["chunk_shape"]
        wanted: dict[tuple[int, ...], list[chunking.Region]] = {}
        for region in self.regions:
            for chunk_id in chunking.chunk_ids_in(region, chunk_shape):
                wanted.setdefault(chunk_id, []).append(region)
        reads = []
        for chunk_id, regions in wanted.items():
            name = chunking.chunk_name(chunk_id)
            if name not in leaf["chunks"]:
                raise CorruptCheckpointError(f"leaf {leaf['path']!r}: chunk {name} missing from the manifest")
            digest, source = leaf["chunks"][name]
            chunk_region = chunking.chunk_region(chunk_id, chunk_shape, self.shape)
            dest = None
            if len(regions) == 1 and chunking.intersect(regions[0], chunk_region) == chunk_region:
                view = self.buffer(regions[0])[chunking.relative(chunk_region, regions[0])]
                dest = view if view.flags.c_contiguous else None
            on_chunk = None if dest is not None else self._copier(chunk_region, regions)
            reads.append(
                _ChunkRead(leaf["array"], leaf["path"], name, chunk_region, digest, source, dest, on_chunk)
            )
        return reads

    def _copier(self, chunk_region: chunking.Region, regions: list[chunking.Region]):
        def copy(data: np.ndarray) -> None:
            for region in regions:
                overlap = chunking.intersect(region, chunk_region)
                self.buffer(region)[chunking.relative(overlap, region)] = data[
                    chunking.relative(overlap, chunk_region)
                ]

        return copy


def blob_reads(
    manifest: dict[str, Any], ranges: dict[str, list[tuple[int, int]]]
) -> tuple[list[_ChunkRead], dict[str, np.ndarray]]:
    """Reads of the blob chunks covering byte ``ranges`` ({blob: [(offset, nbytes)]}).

    Returns the reads and one aligned buffer per blob they fill.
    """
    blobs = manifest_lib.blobs(manifest)
    reads, buffers = [], {}
    for name, spans in ranges.items():
        blob = blobs[name]
        chunk, nbytes = blob["chunk_bytes"], blob["nbytes"]
        buffers[name] = aligned_empty([nbytes], np.dtype(np.uint8))
        needed = {i for offset, size in spans for i in range(offset // chunk, -(-(offset + size) // chunk))}
        for i in sorted(needed):
            digest, source = blob["chunks"][str(i)]
            region = (slice(i * chunk, min((i + 1) * chunk, nbytes)),)
            what = f"(small leaves packed in {name})"
            reads.append(_ChunkRead(name, what, str(i), region, digest, source, buffers[name][region], None))
    return reads, buffers


def _corrupt(step: int, read: _ChunkRead, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"step {step}, leaf {read.path!r}, chunk {read.name or '(scalar)'} (in {read.source}): {why}"
    )


class Reader:
    """Reads and verifies chunks of one manifest: every array opened up front, reads pipelined.

    At most MAX_INFLIGHT_BYTES are read ahead of verification, across all leaves.
    """

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

    def _start(self, read: _ChunkRead) -> tuple[ts.Future, int]:
        """Starts one read; returns its future and its size in bytes."""
        try:
            store = self._store(read.source, read.array).result()
        except Exception as e:
            raise _corrupt(self.step, read, f"cannot open its array: {e}") from e
        source = store[read.region]
        nbytes = store.dtype.numpy_dtype.itemsize * chunking.size(read.region)
        if read.dest is not None:
            return ts.array(read.dest, copy=False, write=True).write(source).commit, nbytes
        return source.read(), nbytes

    def _finish(self, read: _ChunkRead, future: ts.Future) -> None:
        try:
            result = future.result()
        except Exception as e:  # a missing or unreadable data file
            raise _corrupt(self.step, read, f"unreadable: {e}") from e
        data = read.dest if read.dest is not None else result
        if hashing.chunk_hash(data) != read.digest:
            raise _corrupt(self.step, read, "hash mismatch")
        self.bytes_read += data.nbytes
        if read.on_chunk is not None:
            read.on_chunk(data)

    def run(self, reads: list[_ChunkRead]) -> None:
        for read in reads:  # open every array before the first read
            self._store(read.source, read.array)
        inflight: collections.deque = collections.deque()
        inflight_bytes = 0
        for read in reads:
            future, nbytes = self._start(read)
            inflight.append((read, future, nbytes))
            inflight_bytes += nbytes
            while inflight_bytes > MAX_INFLIGHT_BYTES:
                done, future, size = inflight.popleft()
                self._finish(done, future)
                inflight_bytes -= size
        for done, future, _ in inflight:
            self._finish(done, future)


def _placements(plan: LeafPlan) -> list[tuple[np.ndarray, Any]]:
    """(host data, device or sharding) pairs that make up a jax target."""
    target = plan.target

    def host(region):
        data = plan.host(region)
        return data if target.dtype is None or target.dtype == data.dtype else data.astype(target.dtype)

    if target.sharding is None:
        return [(host(tuple(slice(0, n) for n in plan.shape)), None)]
    index_map = target.sharding.addressable_devices_indices_map(plan.shape)
    return [(host(chunking.normalize(index, plan.shape)), device) for device, index in index_map.items()]


def _finish_host(plan: LeafPlan) -> Any:
    """A non-jax target's value: Python scalar, numpy array or scalar, or PRNG key array."""
    target = plan.target
    whole = tuple(slice(0, n) for n in plan.shape)
    data = plan.host(whole)
    if target.dtype is not None and target.dtype != data.dtype:
        data = data.astype(target.dtype)
    if target.kind == "python":
        return target.py_type(data.item()) if target.py_type else data.item()
    if target.kind == "numpy":
        return data[()] if target.scalar else data
    impl = plan.leaf["prng_impl"]
    if target.sharding is None:
        return jax.random.wrap_key_data(data, impl=impl)
    key_shape = jax.eval_shape(lambda: jax.random.wrap_key_data(data, impl=impl)).shape
    return jax.make_array_from_callback(  # works for shardings that span processes
        key_shape, target.sharding, lambda index: jax.random.wrap_key_data(data[index], impl=impl)
    )


def finish(plans: list[LeafPlan]) -> list[Any]:
    """Every plan's value; all jax placements go through one batched ``jax.device_put`` per kind."""
    values: list[Any] = [None] * len(plans)
    on_default, placed = [], []  # (plan index, host) / (plan index, [(host, device)])
    for i, plan in enumerate(plans):
        if plan.target.kind != "jax" or plan.target.key:
            values[i] = _finish_host(plan)
        elif plan.target.sharding is None:
            on_default.append((i, _placements(plan)[0][0]))
        else:
            placed.append((i, _placements(plan)))
    if on_default:
        for (i, _), array in zip(on_default, jax.device_put([h for _, h in on_default])):
            values[i] = array
    pairs = [pair for _, leaf_pairs in placed for pair in leaf_pairs]
    arrays = iter(jax.device_put([h for h, _ in pairs], [d for _, d in pairs]))
    for i, leaf_pairs in placed:
        shards = [next(arrays) for _ in leaf_pairs]
        plan = plans[i]
        values[i] = jax.make_array_from_single_device_arrays(plan.shape, plan.target.sharding, shards)
    return values


def resolve_step(root: layout.Root, step: int | None) -> int:
    root.check_version()
    if step is not None:
        return int(step)
    steps = root.committed_steps()
    if not steps:
        raise CheckpointNotFoundError(f"no committed checkpoint at {root.directory!r}")
    return steps[-1]


def read_plans(root: layout.Root, manifest: dict[str, Any], plans: list[LeafPlan]) -> Reader:
    """Reads (and verifies) every chunk the plans need; returns the reader for its counters."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for p in plans:
        for blob, offset, nbytes in p.blob_ranges():
            ranges.setdefault(blob, []).append((offset, nbytes))
    reads, buffers = blob_reads(manifest, ranges)
    for p in plans:
        if "array" in p.leaf:
            reads.extend(p.chunk_reads())
    reader = Reader(root, manifest)
    reader.run(reads)
    for p in plans:
        if "packed" in p.leaf or "shards" in p.leaf:
            p.take_from_blobs(buffers)
    return reader


def read_to_host(root: layout.Root, manifest: dict[str, Any], leaves: list[dict[str, Any]]) -> list[LeafPlan]:
    """Reads and verifies whole ``leaves`` of a manifest into host memory (their stored bytes)."""
    plans = [LeafPlan(leaf, Target("numpy", None, None)) for leaf in leaves]
    read_plans(root, manifest, plans)
    return plans


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
        LeafPlan(leaf, target)
        for leaf, target in targets
        if leaf is not None and leaf["origin"] != "none" and target.kind != "none"
    ]
    read_plans(root, manifest, plans)
    values = iter(finish(plans))
    results = [
        next(values) if leaf is not None and leaf["origin"] != "none" and target.kind != "none" else None
        for leaf, target in targets
    ]
    if treedef is None:
        return tree.nest([(leaf["keys"], value) for (leaf, _), value in zip(targets, results)])
    return jax.tree_util.tree_unflatten(treedef, results)
