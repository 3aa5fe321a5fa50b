"""save(): snapshot to host, hash chunks, write the chunks that changed, write the manifest last."""

from __future__ import annotations

import collections
import os
import time
from typing import Any, NamedTuple

import numpy as np
import tensorstore as ts
import xxhash

from jckpt import chunking, gc, hashing, layout, multihost, storage
from jckpt import manifest as manifest_lib
from jckpt.errors import StepExistsError, TreeMismatchError
from jckpt.snapshots import LeafSnapshot, Snapshot, snapshot

KINDS = ("full", "incremental")
PACK_ALIGN = 64


class SaveOptions(NamedTuple):
    """Tuning knobs of a save (see docs/format.md for the defaults' measurements).

    Attributes:
      chunk_bytes: target chunk size; chunks never straddle shards.
      compression: None, "zstd" or "blosc" (tensorstore codecs, lossless).
      max_inflight_bytes: bound on bytes handed to tensorstore and not yet durable.
    """

    chunk_bytes: int = chunking.DEFAULT_CHUNK_BYTES
    compression: str | None = None
    max_inflight_bytes: int = 512 * 2**20


def array_id(path: str) -> str:
    """A stable, filesystem-safe directory name for a leaf's array."""
    return "a" + xxhash.xxh3_64_hexdigest(path.encode())


def _leaf_entry(leaf: LeafSnapshot, options: SaveOptions) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": leaf.path, "keys": leaf.parts, "origin": leaf.origin}
    if leaf.origin == "none":
        return entry
    entry.update(dtype=leaf.dtype, stored_dtype=leaf.stored_dtype, shape=list(leaf.shape), **leaf.extra)
    if leaf.packing == "shards":
        entry["shards"] = []  # [{"region", "blob", "at": [offset, nbytes]}], from the fragments
    elif not leaf.packing:
        itemsize = np.dtype(leaf.stored_dtype).itemsize
        entry["array"] = array_id(leaf.path)
        entry["chunk_shape"] = chunking.chunk_shape(leaf.shape, itemsize, leaf.steps, options.chunk_bytes)
        entry["chunks"] = {}
    return entry


def plan(snap: Snapshot, options: SaveOptions) -> tuple[list[dict[str, Any]], int]:
    """The manifest's leaf entries (chunks still empty) and the packed blob's size.

    Every process computes the same plan from its own snapshot.
    """
    entries, offset = [], 0
    for leaf in snap.leaves:
        entry = _leaf_entry(leaf, options)
        if leaf.packing == "whole":
            nbytes = manifest_lib.leaf_nbytes(entry)
            entry["packed"] = [offset, nbytes]
            offset += _aligned(nbytes)
        entries.append(entry)
    return entries, offset


def _base_chunks(base: dict[str, Any] | None) -> dict[str, tuple[dict, tuple]]:
    """array id -> (chunks, compatibility key) of the base manifest's arrays (and the packed blob)."""
    if base is None:
        return {}
    out = {
        leaf["array"]: (leaf["chunks"], (leaf["stored_dtype"], leaf["shape"], leaf["chunk_shape"]))
        for leaf in manifest_lib.array_leaves(base)
    }
    for name, blob in manifest_lib.blobs(base).items():
        out[name] = (blob["chunks"], blob["chunk_bytes"])
    return out


class _Writer:
    """Hashes chunks, skips those the base already holds, writes the rest with bounded memory.

    Writes start while later arrays are still being hashed: after each array,
    every queued array whose tensorstore open has finished gets its writes
    issued, so hashing overlaps the I/O.
    """

    def __init__(self, root: layout.Root, data_dir: str, options: SaveOptions, base: dict | None):
        self.root, self.data_dir, self.options = root, data_dir, options
        self.base = _base_chunks(base)
        self.opening: collections.deque = collections.deque()  # (open future, [(region, data)])
        self.inflight: collections.deque = collections.deque()  # (write future, nbytes)
        self.inflight_bytes = 0
        self.bytes_written = 0

    def add_array(self, key: str, shape, dtype: str, chunk_shape, pieces, compat) -> dict:
        """Hashes ``pieces`` ([(chunk id, global region, data)]) and queues the new ones.

        Returns the chunk table {chunk name: [hash, data dir]}.
        """
        base_chunks, base_compat = self.base.get(key, ({}, None))
        reusable = base_compat == compat
        table, writes = {}, []
        for chunk_id, region, data in pieces:
            name = chunking.chunk_name(chunk_id)
            digest = hashing.chunk_hash(data)
            held = base_chunks.get(name) if reusable else None
            if held is not None and held[0] == digest:
                table[name] = [digest, held[1]]
            else:
                table[name] = [digest, self.data_dir]
                writes.append((region, data))
        if writes:
            kv = storage.join(self.root.spec, f"{self.data_dir}/{key}")
            spec = storage.zarr3_spec(kv, shape, dtype, chunk_shape, self.options.compression)
            self.opening.append((ts.open(spec, open=True, create=True, context=self.root.ctx), writes))
        self._issue(wait=False)
        return table

    def _issue(self, wait: bool) -> None:
        """Issues the writes of opened arrays (of all queued ones if ``wait``)."""
        while self.opening and (wait or self.opening[0][0].done()):
            opening, writes = self.opening.popleft()
            store = opening.result()
            for region, data in writes:
                future = store[region].write(data, can_reference_source_data_indefinitely=True)
                self.inflight.append((future, data.nbytes))
                self.inflight_bytes += data.nbytes
                self.bytes_written += data.nbytes
                while self.inflight_bytes > self.options.max_inflight_bytes:
                    done, nbytes = self.inflight.popleft()
                    done.result()
                    self.inflight_bytes -= nbytes

    def flush(self) -> None:
        """Writes every queued chunk and waits until all are durable."""
        self._issue(wait=True)
        while self.inflight:
            self.inflight.popleft()[0].result()
        self.inflight_bytes = 0


def _shard_pieces(leaf: LeafSnapshot, chunk_shape):
    for shard in leaf.shards:
        for chunk_id in chunking.chunk_ids_in(shard.region, chunk_shape):
            region = chunking.chunk_region(chunk_id, chunk_shape, leaf.shape)
            yield chunk_id, region, shard.data[chunking.relative(region, shard.region)]


def _pack(parts: list[tuple[int, np.ndarray]], size: int) -> np.ndarray:
    """One uint8 blob of ``size`` bytes holding each (offset, array)'s C-order bytes."""
    blob = np.zeros(size, np.uint8)
    for offset, data in parts:
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        blob[offset : offset + flat.size] = flat
    return blob


def _aligned(nbytes: int) -> int:
    return -(-nbytes // PACK_ALIGN) * PACK_ALIGN


def _write_blob(writer: _Writer, name: str, blob: np.ndarray, chunk_bytes: int) -> dict[str, Any]:
    """Writes a packed blob as a chunked uint8 array; returns its manifest record."""
    size = blob.size
    chunk = min(chunk_bytes, size)
    pieces = (
        ((i,), (slice(i * chunk, min((i + 1) * chunk, size)),), blob[i * chunk : (i + 1) * chunk])
        for i in range(-(-size // chunk))
    )
    chunks = writer.add_array(name, [size], "uint8", [chunk], pieces, chunk)
    return {"nbytes": size, "chunk_bytes": chunk, "chunks": chunks}


def write_fragment(
    root: layout.Root,
    data_dir: str,
    snap: Snapshot,
    entries: list[dict[str, Any]],
    packed_size: int,
    options: SaveOptions,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes this process's chunks; returns its manifest fragment.

    A fragment is ``{"chunks": {path: {chunk: [hash, data dir]}}, "blobs": {name: record},
    "shards": {path: [[region, blob, offset, nbytes]]}, "bytes_written": n}``.
    Process 0 writes the packed blob of small whole leaves and the host-side
    (numpy / Python) leaves; jax arrays are written by whoever holds replica 0,
    and small ones sharded across processes go into that process's own blob
    (``packed-p<i>``).
    """
    writer = _Writer(root, data_dir, options, base)
    primary = snap.process_index == 0
    chunks, blobs, shards = {}, {}, {}
    own_blob = f"{manifest_lib.PACKED_ARRAY}-p{snap.process_index}"
    own_parts, own_size = [], 0  # this process's shards of small sharded leaves
    for leaf, entry in zip(snap.leaves, entries):
        if "shards" in entry:
            for shard in leaf.shards:
                region = [[r.start, r.stop] for r in shard.region]
                shards.setdefault(leaf.path, []).append([region, own_blob, own_size, shard.data.nbytes])
                own_parts.append((own_size, shard.data))
                own_size += _aligned(shard.data.nbytes)
        if "array" not in entry or (leaf.origin != "jax" and not primary):
            continue
        compat = (entry["stored_dtype"], entry["shape"], entry["chunk_shape"])
        pieces = _shard_pieces(leaf, entry["chunk_shape"])
        chunks[leaf.path] = writer.add_array(
            entry["array"], leaf.shape, leaf.stored_dtype, entry["chunk_shape"], pieces, compat
        )
    if primary and packed_size:
        parts = [
            (e["packed"][0], leaf.shards[0].data) for leaf, e in zip(snap.leaves, entries) if "packed" in e
        ]
        blobs[manifest_lib.PACKED_ARRAY] = _write_blob(
            writer, manifest_lib.PACKED_ARRAY, _pack(parts, packed_size), options.chunk_bytes
        )
    if own_size:
        blobs[own_blob] = _write_blob(writer, own_blob, _pack(own_parts, own_size), options.chunk_bytes)
    writer.flush()
    return {"chunks": chunks, "blobs": blobs, "shards": shards, "bytes_written": writer.bytes_written}


def assemble(
    entries: list[dict[str, Any]],
    fragments: list[dict[str, Any]],
    *,
    step: int,
    kind: str,
    options: SaveOptions,
    metrics: Any = None,
    metadata: Any = None,
    base_step: int | None = None,
    data_dir: str = "",
) -> dict[str, Any]:
    """Merges per-process fragments into the step's manifest (without timings)."""
    merged: dict[str, dict] = {}
    shards: dict[str, list] = {}
    blobs: dict[str, dict] = {}
    for fragment in fragments:
        for path, table in fragment["chunks"].items():
            merged.setdefault(path, {}).update(table)
        for path, records in fragment["shards"].items():
            shards.setdefault(path, []).extend(
                {"region": region, "blob": blob, "at": [offset, nbytes]}
                for region, blob, offset, nbytes in records
            )
        blobs.update(fragment["blobs"])
    leaves = []
    for entry in entries:
        if "array" in entry:
            entry = {**entry, "chunks": merged.get(entry["path"], {})}
        elif "shards" in entry:
            entry = {**entry, "shards": shards.get(entry["path"], [])}
        leaves.append(entry)
    packed = blobs.pop(manifest_lib.PACKED_ARRAY, None)
    return {
        "format": layout.FORMAT,
        "version": layout.VERSION,
        "step": step,
        "kind": kind,
        "base_step": base_step,
        "data_dir": data_dir,
        "hash": hashing.ALGORITHM,
        "compression": options.compression,
        "metrics": metrics,
        "metadata": metadata,
        "bytes_written": sum(f["bytes_written"] for f in fragments),
        "bytes_total": sum(manifest_lib.leaf_nbytes(e) for e in entries),
        "packed": packed,
        "blobs": blobs,  # per-process blobs of small leaves sharded across processes
        "leaves": leaves,
    }


def _resolve_base(root: layout.Root, kind: str, base: int | None) -> dict[str, Any] | None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "full":
        if base is not None:
            raise ValueError("base= is only meaningful with kind='incremental'")
        return None
    if base is None:
        steps = root.committed_steps()
        return root.read_manifest(steps[-1]) if steps else None
    return root.read_manifest(base)


def _check_no_conflicts(step: int, fragments: list[dict[str, Any]]) -> None:
    """Raises if two processes wrote the same chunk with different bytes.

    That happens only with a process-local (fully addressable) jax array whose
    value differs between processes: each process holds it whole and writes it.
    """
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    for process, fragment in enumerate(fragments):
        for path, table in fragment["chunks"].items():
            for name, (digest, _) in table.items():
                first = seen.setdefault((path, name), (digest, process))
                if first[0] != digest:
                    raise ValueError(
                        f"step {step}, leaf {path!r}: processes {first[1]} and {process} hold different "
                        f"values for chunk {name} (a process-local jax.Array?). Under jax.distributed save "
                        "global arrays (jax.make_array_from_process_local_data) or numpy arrays (process "
                        "0's value is saved)"
                    )


def save_snapshot(
    directory: str | os.PathLike,
    snap: Snapshot,
    *,
    step: int,
    metrics: dict | None = None,
    metadata: dict | None = None,
    kind: str = "full",
    base: int | None = None,
    options: SaveOptions | None = None,
    created: float | None = None,
) -> manifest_lib.CheckpointInfo:
    """Writes a snapshot as committed step ``step``.  Safe to call from a background thread.

    See :func:`save` for the arguments.  ``created`` overrides the commit time
    recorded in the manifest (the manager passes its injected clock).

    Under ``jax.distributed`` (docs/multihost.md) process 0 validates, cleans
    up and picks the data directory and the base step; every process writes
    its fragment; process 0 checks the fragments, assembles and commits.  In a
    single process the same steps run in place.
    """
    started = time.perf_counter()
    options = options or SaveOptions()
    metrics = manifest_lib.to_json(metrics, "metrics")
    metadata = manifest_lib.to_json(metadata, "metadata")
    step = int(step)
    root = layout.Root(directory)
    op = multihost.Operation("save", root.directory, step)
    base_on_primary: dict[str, Any] = {}  # the base manifest process 0 already read

    def prepare() -> list:
        root.ensure()
        if step in root.committed_steps():
            raise StepExistsError(f"step {step} is already committed at {root.directory!r}")
        base_manifest = _resolve_base(root, kind, base)
        base_on_primary["manifest"] = base_manifest
        gc.remove_uncommitted(root)
        return [layout.new_data_dir(step), base_manifest["step"] if base_manifest is not None else None]

    data_dir, base_step = op.on_primary("prepare", prepare)
    entries, packed_size = plan(snap, options)  # the same on every process (checked below)

    def write() -> dict[str, Any]:
        try:
            if "manifest" in base_on_primary:
                base_manifest = base_on_primary["manifest"]
            else:
                base_manifest = root.read_manifest(base_step) if base_step is not None else None
            fragment = write_fragment(root, data_dir, snap, entries, packed_size, options, base_manifest)
            return {**fragment, "plan": xxhash.xxh3_64_hexdigest(manifest_lib.encode(entries))}
        except BaseException as e:
            error = storage.as_os_error(e)
            if error is e:
                raise
            raise error from e

    def commit(fragments: list[dict[str, Any]]) -> dict[str, Any]:
        differ = [i for i, f in enumerate(fragments) if f["plan"] != fragments[0]["plan"]]
        if differ:
            raise TreeMismatchError(
                f"step {step}: process(es) {differ} saved a different tree than process 0 (leaf paths, "
                "shapes, dtypes or shardings differ); every process must save the same global state"
            )
        _check_no_conflicts(step, fragments)
        manifest = assemble(
            entries,
            fragments,
            step=step,
            kind="incremental" if base_step is not None else "full",
            options=options,
            metrics=metrics,
            metadata=metadata,
            base_step=base_step,
            data_dir=data_dir,
        )
        manifest["created"] = time.time() if created is None else created
        manifest["save_seconds"] = time.perf_counter() - started
        root.write(layout.manifest_key(step), manifest_lib.encode(manifest))
        return manifest_lib.info_of(manifest)._asdict()

    info = op.all_then_primary("write", write, commit, lambda: gc.discard(root, data_dir))
    return manifest_lib.CheckpointInfo(**info)


def save(
    directory: str | os.PathLike,
    state: Any,
    *,
    step: int,
    metrics: dict | None = None,
    metadata: dict | None = None,
    kind: str = "full",
    base: int | None = None,
    options: SaveOptions | None = None,
) -> manifest_lib.CheckpointInfo:
    """Saves a pytree as committed step ``step`` of the checkpoint root ``directory``.

    The step becomes visible only once everything is durable: data first, the
    manifest last (atomically).  A failed save leaves no trace but an
    invisible data directory that the next save removes.

    Args:
      directory: checkpoint root (created if missing; must be empty or a jckpt root).
      state: pytree of jax arrays (sharded or not), numpy arrays, Python scalars, None.
      step: the step number (>= 0); must not be committed already.
      metrics: JSON-serialisable dict stored in the manifest (used by policies).
      metadata: JSON-serialisable user data stored in the manifest.
      kind: "full", or "incremental" to write only chunks that differ from
        ``base`` (default: the latest committed step).  Without a base the
        save is full, and ``info().kind`` says so.
      base: the step an incremental save compares against.
      options: chunk size, compression, in-flight bound (SaveOptions).

    Returns:
      The CheckpointInfo of the committed step.

    Raises:
      StepExistsError: ``step`` is already committed (it is left untouched).
      NotACheckpointRootError: ``directory`` is non-empty and not a jckpt root.
      UnsupportedLeafError: a leaf cannot be saved (names its key path).
      TypeError: metrics or metadata are not JSON-serialisable.
      OSError: writing failed (e.g. disk full); nothing becomes visible.

    Example:
      >>> info = save("/tmp/ckpt", {"w": np.ones(3)}, step=0)  # doctest: +SKIP
    """
    return save_snapshot(
        directory,
        snapshot(state, copy=False),
        step=step,
        metrics=metrics,
        metadata=metadata,
        kind=kind,
        base=base,
        options=options,
    )
