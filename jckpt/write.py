"""Writing a snapshot: hash chunks and pieces, skip what the base holds, write the rest with bounded memory.

A process writes its *fragment* of a save: the chunks of its replica-0 shards
of chunked leaves, and one blob packing the small leaves (or shards) it
holds, with this process's state of every host-state leaf.  Incremental
saves compare hashes with the base manifest, per chunk for chunked leaves,
per piece for packed ones and per process for host states, and refer to the
base's bytes wherever they are equal.  :func:`assemble` merges the fragments of
every process into the step's manifest.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import numpy as np
import tensorstore as ts
import xxhash

from jckpt import chunking, hashing, storage
from jckpt import format as fmt
from jckpt.errors import TreeMismatchError
from jckpt.root import Root
from jckpt.snapshots import LeafSnapshot, Snapshot

MIN_CHUNK_BYTES = 64  # one cache line (the packing alignment); smaller only multiplies files


@dataclasses.dataclass(frozen=True)
class SaveOptions:
    """Tuning knobs of a save (see docs/format.md for the defaults' measurements).

    Attributes:
      chunk_bytes: target chunk size (>= 64 bytes); chunks never straddle shards.
      compression: None, "zstd", "blosc" or "bytegroup" (tensorstore codecs, lossless).
      max_inflight_bytes: bound on bytes handed to tensorstore and not yet durable.

    Raises:
      TypeError / ValueError: on construction, for a value out of range.
    """

    chunk_bytes: int = chunking.DEFAULT_CHUNK_BYTES
    compression: str | None = None
    max_inflight_bytes: int = 512 * 2**20

    def __post_init__(self) -> None:
        for name, low in (("chunk_bytes", MIN_CHUNK_BYTES), ("max_inflight_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"SaveOptions.{name} must be an integer, got {value!r}")
            if value < low:
                raise ValueError(f"SaveOptions.{name} must be >= {low}, got {value}")
        if self.compression not in storage.COMPRESSION_CODECS:
            raise ValueError(
                f"SaveOptions.compression must be one of {sorted(map(str, storage.COMPRESSION_CODECS))}, "
                f"got {self.compression!r}"
            )


def array_id(path: str) -> str:
    """A stable, filesystem-safe directory name for a leaf's array."""
    return "a" + xxhash.xxh3_64_hexdigest(path.encode())


def plan(snap: Snapshot, options: SaveOptions) -> list[fmt.LeafRecord]:
    """The leaf records of a save, without chunks or pieces (the same on every process)."""
    records = []
    for leaf in snap.leaves:
        record = fmt.LeafRecord(leaf.path, tuple(tuple(p) for p in leaf.parts), leaf.origin, leaf.storage)
        if leaf.storage != fmt.NONE:
            record = record._replace(
                dtype=leaf.dtype, stored_dtype=leaf.stored_dtype, shape=tuple(leaf.shape), extra=leaf.extra
            )
        if leaf.storage == fmt.CHUNKED:
            itemsize = np.dtype(leaf.stored_dtype).itemsize
            shape = chunking.chunk_shape(leaf.shape, itemsize, leaf.steps, options.chunk_bytes)
            record = record._replace(array=array_id(leaf.path), chunk_shape=tuple(shape))
        records.append(record)
    return records


class _Writer:
    """Hashes chunks, skips those the base already holds, writes the rest with bounded memory.

    An array's writes are issued as soon as it is hashed, so hashing overlaps
    the I/O of earlier arrays.  Arrays are opened with their metadata assumed
    (no request); readers take it from the manifest (its ``codecs``).  In a
    local directory each array's ``zarr.json`` is written too, so that plain
    tensorstore opens it; on an object store it is not: one PUT per chunk.
    """

    def __init__(self, root: Root, data_dir: str, options: SaveOptions):
        self.root, self.data_dir, self.options = root, data_dir, options
        self.self_describing = root.caps.local_path is not None
        self.inflight: collections.deque = collections.deque()  # (write future, nbytes)
        self.inflight_bytes = 0
        self.bytes_written = 0

    def add_array(self, name: str, shape, dtype: str, chunk_shape, pieces, base_chunks) -> dict:
        """Hashes ``pieces`` ([(chunk id, global region, data)]) and writes those the base lacks.

        Args:
          base_chunks: {chunk name: (digest, data dir)} of the same array in the
            base (with the same dtype, shape and chunk shape), or {}.

        Returns:
          The chunk table {chunk name: (digest, data dir)}.
        """
        table, writes = {}, []
        for chunk_id, region, data in pieces:
            chunk = chunking.chunk_name(chunk_id)
            digest = hashing.chunk_hash(data)
            held = base_chunks.get(chunk)
            if held is not None and held[0] == digest:
                table[chunk] = held
            else:
                table[chunk] = (digest, self.data_dir)
                writes.append((region, data))
        if writes:
            self._write_array(f"{self.data_dir}/{name}", shape, dtype, chunk_shape, writes)
        return table

    def _write_array(self, prefix: str, shape, dtype: str, chunk_shape, writes) -> None:
        kv = storage.join(self.root.spec, prefix)
        spec = storage.zarr3_spec(kv, shape, dtype, chunk_shape, self.options.compression)
        store = ts.open(spec, open=True, assume_metadata=True, context=self.root.ctx).result()  # no I/O
        if self.self_describing:
            metadata = json.dumps(store.spec(minimal_spec=False).to_json()["metadata"]).encode()
            self._track(self.root.kv.write(f"{prefix}/zarr.json", metadata), 0)
        for region, data in writes:
            self._track(store[region].write(data, can_reference_source_data_indefinitely=True), data.nbytes)
            self.bytes_written += data.nbytes

    def _track(self, future, nbytes: int) -> None:
        self.inflight.append((future, nbytes))
        self.inflight_bytes += nbytes
        while self.inflight_bytes > self.options.max_inflight_bytes:
            done, size = self.inflight.popleft()
            done.result()
            self.inflight_bytes -= size

    def flush(self) -> None:
        """Waits until every write is durable."""
        while self.inflight:
            self.inflight.popleft()[0].result()
        self.inflight_bytes = 0

    def drain(self) -> None:
        """After a failure: waits for every write already issued, ignoring their errors.

        So that no chunk lands in the data directory after the failed save removed it.
        """
        while self.inflight:
            try:
                self.inflight.popleft()[0].result()
            except Exception:
                pass


def _shard_pieces(leaf: LeafSnapshot, chunk_shape):
    for shard in leaf.shards:
        for chunk_id in chunking.chunk_ids_in(shard.region, chunk_shape):
            region = chunking.chunk_region(chunk_id, chunk_shape, leaf.shape)
            yield chunk_id, region, shard.data[chunking.relative(region, shard.region)]


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the packing alignment."""
    return -(-nbytes // fmt.PACK_ALIGN) * fmt.PACK_ALIGN


def _pack(parts: list[tuple[int, np.ndarray]], size: int) -> np.ndarray:
    """One uint8 blob of ``size`` bytes holding each (offset, array)'s C-order bytes."""
    blob = np.zeros(size, np.uint8)
    for offset, data in parts:
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        blob[offset : offset + flat.size] = flat
    return blob


def _write_blob(writer: _Writer, name: str, blob: np.ndarray, chunk_bytes: int) -> fmt.BlobRecord:
    """Writes a packed blob as a chunked uint8 array; returns its record."""
    size = blob.size
    chunk = min(chunk_bytes, size)
    pieces = (
        ((i,), (slice(i * chunk, min((i + 1) * chunk, size)),), blob[i * chunk : (i + 1) * chunk])
        for i in range(-(-size // chunk))
    )
    chunks = writer.add_array(name, [size], "uint8", [chunk], pieces, {})
    return fmt.BlobRecord(name, size, chunk, chunks)


class _Base:
    """What a base manifest holds, indexed for reuse checks."""

    def __init__(self, base: fmt.Manifest | None):
        self.arrays: dict[str, tuple[dict, tuple]] = {}
        self.pieces: dict[tuple[str, tuple], tuple[fmt.Piece, tuple]] = {}
        self.states: dict[tuple[str, int], fmt.StateRecord] = {}
        self.blobs = base.blobs if base is not None else {}
        for leaf in base.leaves if base is not None else ():
            for state in leaf.states:
                self.states[(leaf.path, state.process)] = state
            compat = (leaf.stored_dtype, leaf.shape)
            if leaf.storage == fmt.CHUNKED:
                self.arrays[leaf.array] = (leaf.chunks, (*compat, leaf.chunk_shape))
            for piece in leaf.pieces:
                if piece.digest is not None:
                    self.pieces[(leaf.path, piece.region)] = (piece, compat)

    def chunks(self, record: fmt.LeafRecord) -> dict:
        chunks, compat = self.arrays.get(record.array, ({}, None))
        return chunks if compat == (record.stored_dtype, record.shape, record.chunk_shape) else {}

    def piece(self, record: fmt.LeafRecord, region: tuple, digest: str) -> fmt.Piece | None:
        piece, compat = self.pieces.get((record.path, region), (None, None))
        if piece is None or piece.nbytes == 0:  # zero-size: in no blob, nothing to reuse
            return None
        if compat != (record.stored_dtype, record.shape) or piece.digest != digest:
            return None
        return piece

    def state(self, path: str, process: int, digest: str, encoding: str) -> fmt.StateRecord | None:
        state = self.states.get((path, process))
        if state is None or state.nbytes == 0 or (state.digest, state.encoding) != (digest, encoding):
            return None
        return state


def write_fragment(
    root: Root,
    data_dir: str,
    snap: Snapshot,
    records: list[fmt.LeafRecord],
    options: SaveOptions,
    base: fmt.Manifest | None = None,
) -> fmt.Fragment:
    """Writes this process's chunks and its blob of packed pieces; returns its fragment.

    Args:
      root: the checkpoint root.
      data_dir: this save's data directory.
      snap: this process's snapshot.
      records: the plan (``plan(snap, options)``).
      options: the save's options.
      base: the manifest an incremental save compares against.
    """
    writer = _Writer(root, data_dir, options)
    base_index = _Base(base)
    try:
        return _write(writer, base_index, data_dir, snap, records, options)
    except BaseException:
        writer.drain()
        raise


def _write(
    writer: _Writer,
    base_index: _Base,
    data_dir: str,
    snap: Snapshot,
    records: list[fmt.LeafRecord],
    options: SaveOptions,
) -> fmt.Fragment:
    blob_name = f"{fmt.BLOB_PREFIX}{snap.process_index}"
    blob_id = f"{data_dir}/{blob_name}"
    chunks: dict[str, dict] = {}
    pieces: dict[str, list[fmt.Piece]] = {}
    blobs: dict[str, fmt.BlobRecord] = {}
    states: dict[str, list[fmt.StateRecord]] = {}
    parts, size = [], 0  # the bytes of this process's new pieces and states
    for leaf, record in zip(snap.leaves, records):
        if record.storage == fmt.CHUNKED and leaf.shards:
            chunks[leaf.path] = writer.add_array(
                record.array, leaf.shape, leaf.stored_dtype, record.chunk_shape,
                _shard_pieces(leaf, record.chunk_shape), base_index.chunks(record),
            )
        elif record.storage == fmt.PACKED:
            for shard in leaf.shards:
                region = chunking.region_key(shard.region)
                digest = hashing.chunk_hash(shard.data)
                piece = base_index.piece(record, region, digest)
                if piece is not None:
                    blobs[piece.blob] = base_index.blobs[piece.blob]
                else:
                    nbytes = shard.data.nbytes
                    piece = fmt.Piece(region, blob_id if nbytes else "", size, nbytes, digest)
                    parts.append((size, shard.data))
                    size += aligned(nbytes)
                pieces.setdefault(leaf.path, []).append(piece)
        elif record.storage == fmt.HOST:  # this process's state: reused when the base holds the same
            (shard,) = leaf.shards
            process, digest = shard.region[0].start, hashing.chunk_hash(shard.data)
            state = base_index.state(leaf.path, process, digest, leaf.encoding)
            if state is not None:
                blobs[state.blob] = base_index.blobs[state.blob]
            else:
                nbytes = shard.data.nbytes
                blob = blob_id if nbytes else ""
                state = fmt.StateRecord(process, blob, size, nbytes, digest, leaf.encoding)
                parts.append((size, shard.data))
                size += aligned(nbytes)
            states[leaf.path] = [state]
    if size:
        blobs[blob_id] = _write_blob(writer, blob_name, _pack(parts, size), options.chunk_bytes)
    writer.flush()
    plan_digest = fmt.plan_digest(records, options.compression)
    return fmt.Fragment(plan_digest, chunks, pieces, blobs, writer.bytes_written, states)


def check_fragments(step: int, fragments: list[fmt.Fragment]) -> None:
    """Raises unless every process planned the same tree and no two wrote different bytes for a chunk.

    Different bytes happen only with a process-local (fully addressable) jax
    array whose value differs between processes: each process holds it whole
    and writes it.

    Raises:
      TreeMismatchError: processes saved different trees.
      ValueError: conflicting chunks.
    """
    differ = [i for i, f in enumerate(fragments) if f.plan != fragments[0].plan]
    if differ:
        raise TreeMismatchError(
            f"step {step}: process(es) {differ} saved a different tree than process 0 (leaf paths, "
            "shapes, dtypes or shardings differ, or SaveOptions.compression); every process must save "
            "the same global state with the same options"
        )
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    for process, fragment in enumerate(fragments):
        for path, table in fragment.chunks.items():
            for name, (digest, _) in table.items():
                first = seen.setdefault((path, name), (digest, process))
                if first[0] != digest:
                    raise ValueError(
                        f"step {step}, leaf {path!r}: processes {first[1]} and {process} hold different "
                        f"values for chunk {name} (a process-local jax.Array?). Under jax.distributed save "
                        "global arrays (jax.make_array_from_process_local_data) or numpy arrays (process "
                        "0's value is saved)"
                    )


def assemble(
    records: list[fmt.LeafRecord],
    fragments: list[fmt.Fragment],
    *,
    step: int,
    base_step: int | None,
    data_dir: str,
    options: SaveOptions,
    metrics: Any,
    metadata: Any,
    created: float,
    save_seconds: float,
    lineage: dict | None = None,
    base_codecs: dict[str, str | None] | None = None,
) -> fmt.Manifest:
    """Merges per-process fragments into the step's manifest.

    ``base_codecs`` is the base manifest's ``codecs``: the codecs of the data
    directories whose chunks this save reuses.
    """
    chunks: dict[str, dict] = {}
    pieces: dict[str, list[fmt.Piece]] = {}
    states: dict[str, list[fmt.StateRecord]] = {}
    blobs: dict[str, fmt.BlobRecord] = {}
    for fragment in fragments:
        for path, table in fragment.chunks.items():
            chunks.setdefault(path, {}).update(table)
        for path, leaf_pieces in fragment.pieces.items():
            pieces.setdefault(path, []).extend(leaf_pieces)
        for path, leaf_states in fragment.states.items():
            states.setdefault(path, []).extend(leaf_states)
        blobs.update(fragment.blobs)
    leaves = tuple(
        record._replace(chunks=chunks.get(record.path, {})) if record.storage == fmt.CHUNKED
        else record._replace(pieces=tuple(pieces.get(record.path, ()))) if record.storage == fmt.PACKED
        else record._replace(states=tuple(sorted(states[record.path]))) if record.storage == fmt.HOST
        else record
        for record in records
    )
    manifest = fmt.Manifest(
        step=step,
        kind="incremental" if base_step is not None else "full",
        base_step=base_step,
        data_dir=data_dir,
        compression=options.compression,
        metrics=metrics,
        metadata=metadata,
        bytes_written=sum(f.bytes_written for f in fragments),
        bytes_total=sum(leaf.nbytes for leaf in leaves),
        created=created,
        save_seconds=save_seconds,
        leaves=leaves,
        blobs=blobs,
        lineage=lineage,
    )
    read_from = manifest.data_dirs()  # walks every chunk: once, not per base directory
    codecs = {d: c for d, c in (base_codecs or {}).items() if d in read_from}
    return manifest._replace(codecs={**codecs, data_dir: options.compression})
