"""Reading: plan the reads each target sharding needs, read every chunk once, verify its hash.

A :class:`LeafPlan` maps one stored leaf onto the host buffers of its target
regions, a :class:`StatePlan` picks the per-process states of a host-state
leaf out of their blobs; :class:`Reader` reads the chunks of all plans pipelined across
leaves (every array opened up front, a bounded number of bytes in flight)
and checks every chunk's hash before its bytes are used.
"""

from __future__ import annotations

import collections
import mmap
import random
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import tensorstore as ts

from jckpt import chunking, hashing, storage
from jckpt import format as fmt
from jckpt.errors import CorruptCheckpointError
from jckpt.root import Root

MAX_INFLIGHT_BYTES = 128 * 2**20  # measured: 128 MiB restores as fast as 512 with ~15% less memory
MMAP_MIN_BYTES = 2**20  # host buffers this large are anonymous memory maps (see aligned_empty)


class Target(NamedTuple):
    """What one leaf is restored as."""

    kind: str  # "jax" | "numpy" | "python" | "none" | "host"
    dtype: np.dtype | None  # None: the stored logical dtype
    sharding: jax.sharding.Sharding | None  # jax targets; None: default device
    py_type: type | None = None
    key: bool = False  # a typed PRNG key
    scalar: bool = False  # a numpy scalar (np.generic) rather than an array
    live: Any = None  # host states: the object to set (None: a new generator, or the state itself)


def host_kind(like_leaf: Any) -> str | None:
    """The host type (``format.HOST_TYPES``) a ``like`` leaf restores, or None for arrays and scalars."""
    if isinstance(like_leaf, fmt.HostState):
        return like_leaf.kind
    if isinstance(like_leaf, np.random.Generator):
        return "numpy.random.Generator"
    if isinstance(like_leaf, random.Random):
        return "random.Random"
    if callable(getattr(like_leaf, "set_state", None)):
        return "object"
    return None


def target_of(like_leaf: Any) -> Target:
    """The target a ``like`` leaf asks for."""
    if like_leaf is None:
        return Target("none", None, None)
    if host_kind(like_leaf) is not None:
        return Target("host", None, None, live=None if isinstance(like_leaf, fmt.HostState) else like_leaf)
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
        f"like leaves must be arrays, jax.ShapeDtypeStruct, Python scalars, None or host objects "
        f"(get_state/set_state, numpy.random.Generator, random.Random), got {type(like_leaf).__name__}"
    )


def default_target(leaf: fmt.LeafRecord) -> Target:
    """The target of a leaf restored without ``like``: as it was saved."""
    if leaf.storage == fmt.HOST:
        return Target("host", None, None)
    py_type = {"int": int, "float": float, "bool": bool, "complex": complex}.get(leaf.extra.get("py_type"))
    key, scalar = "prng_impl" in leaf.extra, bool(leaf.extra.get("numpy_scalar"))
    return Target(leaf.origin, None, None, py_type, key=key, scalar=scalar)


def like_problems(leaf: fmt.LeafRecord, like_leaf: Any) -> list[str]:
    """Why ``like_leaf`` cannot be restored from ``leaf`` (empty when it can)."""
    if like_leaf is None:
        return []
    kind = host_kind(like_leaf)
    if leaf.storage == fmt.HOST or kind is not None:
        saved = leaf.extra.get("host_type")
        if saved == kind:
            return []
        held = f"the state of a {leaf.extra['class']}" if saved else f"a {leaf.dtype or 'None'} array"
        return [f"{leaf.path!r}: the checkpoint holds {held}, like has a {type(like_leaf).__name__}"]
    stored = tuple(leaf.shape)
    wanted = () if isinstance(like_leaf, (bool, int, float, complex)) else tuple(like_leaf.shape)
    dtype = getattr(like_leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if "prng_impl" not in leaf.extra:
            return [f"{leaf.path!r}: like is a PRNG key, the checkpoint holds a {leaf.dtype or 'None'} array"]
        stored = stored[: len(wanted)]  # stored as key data: trailing key dimensions
    if leaf.storage == fmt.NONE:
        return [f"{leaf.path!r}: the checkpoint holds None, like has an array"]
    if stored != wanted:
        return [f"{leaf.path!r}: checkpoint has shape {stored}, like has {wanted}"]
    return []


class _ChunkRead(NamedTuple):
    """One stored chunk to read and verify."""

    array: str  # array directory name (leaf array id or blob name)
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
    Buffers of at least MMAP_MIN_BYTES are anonymous memory maps (page
    aligned), not ``np.empty``: numpy marks large buffers for transparent huge
    pages, and where the kernel then compacts memory on first touch (THP
    ``defrag=madvise``, its default) filling fresh buffers took about twice
    the CPU (see docs/storage.md, Performance).  They are not faulted in
    ahead (``MADV_POPULATE_WRITE``): the pages fault in as tensorstore's
    threads write them, which measured faster in a process that has just built
    and saved a large state and no slower elsewhere (docs/benchmarks.md).
    """
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes >= MMAP_MIN_BYTES and alignment <= mmap.PAGESIZE and hasattr(mmap, "MAP_ANONYMOUS"):
        try:
            raw = np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)
        except OSError:  # e.g. out of memory maps (vm.max_map_count): numpy's allocator instead
            pass
        else:
            return raw.view(dtype).reshape(shape)
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _region(pairs: Sequence[Sequence[int]]) -> chunking.Region:
    return tuple(slice(a, b) for a, b in pairs)


class LeafPlan:
    """Target regions of one leaf and the host buffers they are read into."""

    def __init__(self, leaf: fmt.LeafRecord, target: Target):
        self.leaf, self.target = leaf, target
        self.shape = tuple(leaf.shape)
        self.stored = np.dtype(leaf.stored_dtype)
        self.whole = tuple(slice(0, n) for n in self.shape)
        self.regions = self._regions()
        self.buffers: dict[tuple, np.ndarray] = {}  # region_key -> host data (stored dtype)
        self._pieces: list | None = None

    def _regions(self) -> list[chunking.Region]:
        sharding = self.target.sharding
        if self.target.kind != "jax" or sharding is None or self.target.key:
            return [self.whole]
        indices = sharding.addressable_devices_indices_map(self.shape).values()
        regions = {chunking.region_key(r): r for r in (chunking.normalize(i, self.shape) for i in indices)}
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
            data = self.buffers[chunking.region_key(self.whole)][chunking.relative(region, self.whole)]
        logical = np.dtype(self.leaf.dtype)
        return data if logical == self.stored else data.view(logical)

    def _needed_pieces(self) -> list[tuple[fmt.Piece, list[tuple[chunking.Region, chunking.Region]]]]:
        """Each piece overlapping a target region, with its (target, overlap) pairs (computed once)."""
        if self._pieces is None:
            self._pieces = []
            for piece in self.leaf.pieces:
                region = _region(piece.region)
                if region == self.whole and self.regions == [self.whole]:  # the common case: one piece
                    overlaps = [(region, region)]
                else:
                    overlaps = [(t, o) for t in self.regions if (o := chunking.intersect(t, region))]
                if overlaps and piece.nbytes:
                    self._pieces.append((piece, overlaps))
        return self._pieces

    def blob_ranges(self) -> list[tuple[str, int, int]]:
        """The (blob id, offset, nbytes) byte ranges this leaf needs from packed blobs."""
        return [(p.blob, p.offset, p.nbytes) for p, _ in self._needed_pieces()]

    def take_from_blobs(self, blobs: dict[str, np.ndarray]) -> None:
        """Fills the target buffers from packed blobs (after their chunks were read)."""
        if not self.leaf.pieces or self.leaf.pieces[0].nbytes == 0:  # zero-size: nothing stored
            for region in self.regions:
                self.buffer(region)
            return
        for piece, overlaps in self._needed_pieces():
            region = _region(piece.region)
            data = blobs[piece.blob][piece.offset : piece.offset + piece.nbytes].view(self.stored)
            data = data.reshape([r.stop - r.start for r in region])
            if overlaps == [(region, region)] and region == self.whole:
                self.buffers[chunking.region_key(region)] = data  # the blob's bytes, no copy
                continue
            for target, overlap in overlaps:
                inside = data[chunking.relative(overlap, region)]
                self.buffer(target)[chunking.relative(overlap, target)] = inside

    def chunk_reads(self) -> list[_ChunkRead]:
        """The reads of every stored chunk overlapping a target region, each chunk once."""
        leaf, chunk_shape = self.leaf, self.leaf.chunk_shape
        wanted: dict[tuple[int, ...], list[chunking.Region]] = {}
        for region in self.regions:
            for chunk_id in chunking.chunk_ids_in(region, chunk_shape):
                wanted.setdefault(chunk_id, []).append(region)
        reads = []
        for chunk_id, regions in wanted.items():
            name = chunking.chunk_name(chunk_id)
            if name not in leaf.chunks:
                raise CorruptCheckpointError(f"leaf {leaf.path!r}: chunk {name} missing from the manifest")
            digest, source = leaf.chunks[name]
            chunk_region = chunking.chunk_region(chunk_id, chunk_shape, self.shape)
            dest = None
            if len(regions) == 1 and chunking.intersect(regions[0], chunk_region) == chunk_region:
                view = self.buffer(regions[0])[chunking.relative(chunk_region, regions[0])]
                dest = view if view.flags.c_contiguous else None
            on_chunk = None if dest is not None else self._copier(chunk_region, regions)
            read = _ChunkRead(leaf.array, leaf.path, name, chunk_region, digest, source, dest, on_chunk)
            reads.append(read)
        return reads

    def _copier(self, chunk_region: chunking.Region, regions: list[chunking.Region]):
        def copy(data: np.ndarray) -> None:
            for region in regions:
                overlap = chunking.intersect(region, chunk_region)
                self.buffer(region)[chunking.relative(overlap, region)] = data[
                    chunking.relative(overlap, chunk_region)
                ]

        return copy


class StatePlan:
    """The saved states of one host-state leaf that a restore needs (those of ``processes``)."""

    def __init__(self, leaf: fmt.LeafRecord, target: Target, processes: Sequence[int], step: int):
        self.leaf, self.target, self.step = leaf, target, step
        self.needed = [leaf.states[p] for p in processes]
        self.states: list[Any] = []  # decoded, one per process in ``processes``

    def blob_ranges(self) -> list[tuple[str, int, int]]:
        return [(s.blob, s.offset, s.nbytes) for s in self.needed if s.nbytes]

    def take_from_blobs(self, blobs: dict[str, np.ndarray]) -> None:
        """Decodes each needed state from its blob (its chunks read and verified), checking its hash."""
        for s in self.needed:
            raw = blobs[s.blob][s.offset : s.offset + s.nbytes].tobytes() if s.nbytes else b""
            where = f"step {self.step}, leaf {self.leaf.path!r}: the state of process {s.process} ({s.blob})"
            if hashing.chunk_hash(np.frombuffer(raw, np.uint8)) != s.digest:
                raise CorruptCheckpointError(f"{where}: hash mismatch")
            try:
                self.states.append(fmt.decode_state(s.encoding, raw))
            except ValueError as e:
                raise CorruptCheckpointError(f"{where}: not valid JSON: {e}") from e


def blob_reads(
    manifest: fmt.Manifest, ranges: dict[str, list[tuple[int, int]]]
) -> tuple[list[_ChunkRead], dict[str, np.ndarray]]:
    """Reads of the blob chunks covering byte ``ranges`` ({blob id: [(offset, nbytes)]}).

    Returns the reads and one aligned buffer per blob they fill.
    """
    reads, buffers = [], {}
    for blob_id, spans in ranges.items():
        blob = manifest.blobs[blob_id]
        chunk, nbytes = blob.chunk_bytes, blob.nbytes
        buffers[blob_id] = aligned_empty([nbytes], np.dtype(np.uint8))
        needed = {i for offset, size in spans for i in range(offset // chunk, -(-(offset + size) // chunk))}
        for i in sorted(needed):
            if str(i) not in blob.chunks:
                raise CorruptCheckpointError(f"blob {blob_id!r}: chunk {i} missing from the manifest")
            digest, source = blob.chunks[str(i)]
            region = (slice(i * chunk, min((i + 1) * chunk, nbytes)),)
            what = f"(small leaves packed in {blob.name})"
            reads.append(
                _ChunkRead(blob.name, what, str(i), region, digest, source, buffers[blob_id][region], None)
            )
    return reads, buffers


def _corrupt(step: int, read: _ChunkRead, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"step {step}, leaf {read.path!r}, chunk {read.name or '(scalar)'} (in {read.source}): {why}"
    )


class Reader:
    """Reads and verifies chunks of one manifest: every array opened up front, reads pipelined.

    At most MAX_INFLIGHT_BYTES are read ahead of verification, across all leaves.
    """

    def __init__(self, root: Root, manifest: fmt.Manifest, on_bytes: Callable[[int], None] | None = None):
        self.root, self.manifest = root, manifest
        self.step = manifest.step
        self.stores: dict[tuple[str, str], ts.Future] = {}
        self.bytes_read = 0
        self.on_bytes = on_bytes  # called with each verified chunk's size (progress bars)
        self.layouts = {}  # (data directory, array) -> (shape, dtype, chunk shape), as written there
        for leaf in manifest.chunked_leaves():  # chunks are reused only between equal layouts
            for _, source in leaf.chunks.values():
                self.layouts[(source, leaf.array)] = (leaf.shape, leaf.stored_dtype, leaf.chunk_shape)
        for blob in manifest.blobs.values():
            for _, source in blob.chunks.values():
                self.layouts[(source, blob.name)] = ([blob.nbytes], "uint8", [blob.chunk_bytes])

    def _store(self, source: str, array: str) -> ts.Future:
        """Opens one array of a data directory: with the manifest's metadata where it names the
        directory's codec (no request), else by reading the array's ``zarr.json``."""
        key = (source, array)
        if key not in self.stores:
            kv = storage.join(self.root.spec, f"{source}/{array}")
            if source in self.manifest.codecs:
                shape, dtype, chunk_shape = self.layouts[key]
                try:
                    spec = storage.zarr3_spec(kv, shape, dtype, chunk_shape, self.manifest.codecs[source])
                except ValueError as e:
                    raise CorruptCheckpointError(f"step {self.step}: the codec of {source}: {e}") from e
                self.stores[key] = ts.open(spec, open=True, assume_metadata=True, context=self.root.ctx)
            else:
                spec = {"driver": "zarr3", "kvstore": kv}
                self.stores[key] = ts.open(spec, open=True, context=self.root.ctx)
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
            if read.dest.shape != source.shape or read.dest.dtype != store.dtype.numpy_dtype:
                raise _corrupt(self.step, read, "stored array does not match its manifest")
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
        if self.on_bytes is not None:
            self.on_bytes(data.nbytes)
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


def read_plans(
    root: Root,
    manifest: fmt.Manifest,
    plans: Sequence[LeafPlan | StatePlan],
    on_bytes: Callable[[int], None] | None = None,
) -> Reader:
    """Reads (and verifies) every chunk the plans need; returns the reader for its counters.

    ``on_bytes`` is called with the size of each chunk once it is verified.
    """
    ranges: dict[str, list[tuple[int, int]]] = {}
    for p in plans:
        for blob, offset, nbytes in p.blob_ranges():
            ranges.setdefault(blob, []).append((offset, nbytes))
    reads, buffers = blob_reads(manifest, ranges)
    for p in plans:
        if p.leaf.storage == fmt.CHUNKED:
            reads.extend(p.chunk_reads())
    reader = Reader(root, manifest, on_bytes)
    reader.run(reads)
    for p in plans:
        if p.leaf.storage in (fmt.PACKED, fmt.HOST):
            p.take_from_blobs(buffers)
    return reader


def read_to_host(
    root: Root,
    manifest: fmt.Manifest,
    leaves: Sequence[fmt.LeafRecord],
    on_bytes: Callable[[int], None] | None = None,
) -> list[LeafPlan | StatePlan]:
    """Reads and verifies whole ``leaves`` of a manifest into host memory (their stored bytes;
    host states: every process's, decoded)."""
    plans = [
        StatePlan(leaf, Target("host", None, None), range(len(leaf.states)), manifest.step)
        if leaf.storage == fmt.HOST
        else LeafPlan(leaf, Target("numpy", None, None))
        for leaf in leaves
        if leaf.storage != fmt.NONE
    ]
    read_plans(root, manifest, plans, on_bytes)
    return plans
