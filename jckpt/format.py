"""The single owner of the on-disk format: constants, typed records, JSON, checksums, versions.

Every other module works with the records defined here (:class:`Manifest`,
:class:`LeafRecord`, :class:`Piece`, :class:`BlobRecord`, :class:`Fragment`);
only this module knows their JSON, and it validates what it reads, so a
damaged document is a :class:`CorruptCheckpointError` naming the step and the
file, never a ``KeyError`` or wrong data.

Version 4 (written now) adds a leaf storage kind ``host``: the state of a
host-side object (a data iterator's ``get_state()``, a numpy ``Generator``'s
bit-generator state, a ``random.Random``'s ``getstate()``), one per process,
each stored as bytes in that process's packed blob with its own hash
(:class:`StateRecord`).

Version 3 adds to version 2 a manifest field ``codecs``: the
chunk codec of every data directory the manifest reads from, so a reader opens
each array with its metadata taken from the manifest (no request) and a writer
on an object store skips the per-array ``zarr.json`` (one request per chunk).
Version-2 manifests (no ``codecs``) are still read: their arrays' ``zarr.json``
are opened, as are those of any data directory ``codecs`` does not name.

Version 2 against version 1 (both still read):

* every JSON document (manifests, the root marker) carries an ``xxh3_128``
  checksum of its canonical encoding;
* manifests live at ``manifests/step_<N>.json`` (listing steps costs one
  request per thousand steps on an object store) rather than
  ``step_<N>/manifest.json``;
* each leaf names its storage kind explicitly: ``none``, ``chunked`` (a zarr3
  array of its own) or ``packed`` (pieces inside per-process blobs, each piece
  with its own hash, so an incremental save rewrites only the small leaves
  that changed).

See docs/format.md for the full description.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import xxhash

from jckpt.errors import CorruptCheckpointError, UnsupportedFormatError

FORMAT = "jckpt"
VERSION = 4
HASH = "xxh3_128"

ROOT_MARKER = "jckpt.json"
MANIFESTS = "manifests"  # version 2: manifests/step_<N>.json
TAGS = "tags"  # tags/<name>.json
V1_MANIFEST = "manifest.json"  # version 1: step_<N>/manifest.json

# Storage kinds of a leaf.
NONE = "none"
CHUNKED = "chunked"
PACKED = "packed"
HOST = "host"  # version 4: per-process states of host objects (see StateRecord)
STORAGE_KINDS = (NONE, CHUNKED, PACKED, HOST)
ORIGINS = ("jax", "numpy", "python", "none", "host")
# What a host-state leaf was (LeafRecord.extra["host_type"]): an object with get_state()/set_state(),
# a numpy.random.Generator (its bit_generator.state) or a random.Random (getstate()/setstate()).
HOST_TYPES = ("object", "numpy.random.Generator", "random.Random")
STATE_ENCODINGS = ("json", "bytes")  # how a state's bytes encode it
KINDS = ("full", "incremental")

PACK_LIMIT_BYTES = 256 * 2**10  # leaves (or shards) of at most this many bytes are packed into blobs
PACK_ALIGN = 64  # packed pieces start at multiples of this (jax adopts 64-byte-aligned host buffers)
BLOB_PREFIX = "packed-p"  # blob array names: packed-p<process index>
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


# ------------------------------------------------------------------ step numbers


def check_step(step: Any) -> int:
    """A step number as an int: ints, numpy integers and 0-d integer arrays, >= 0.

    Raises:
      TypeError: ``step`` is not an integer (floats, strings and bools are refused).
      ValueError: ``step`` is negative.

    Example:
      >>> check_step(np.int64(3))
      3
    """
    value = step
    if hasattr(value, "ndim") and getattr(value, "ndim", None) == 0 and hasattr(value, "dtype"):
        if np.issubdtype(np.dtype(value.dtype), np.integer):
            value = int(np.asarray(value))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"step must be an integer, got {step!r} ({type(step).__name__})")
    value = int(value)
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return value


def step_name(step: int) -> str:
    """``step_00000100`` for step 100: the step's data directory and manifest name."""
    return f"step_{check_step(step):08d}"


def manifest_key(step: int) -> str:
    """The key of a step's manifest under the root (version 2 and later)."""
    return f"{MANIFESTS}/{step_name(step)}.json"


def v1_manifest_key(step: int) -> str:
    return f"{step_name(step)}/{V1_MANIFEST}"


def parse_step_name(name: str) -> int | None:
    """The step of ``step_00000100`` (the name exactly as :func:`step_name` writes it), else None."""
    if len(name) >= 13 and name.startswith("step_") and name[5:].isdigit():
        step = int(name[5:])
        return step if step_name(step) == name else None
    return None


def check_tag(name: Any) -> str:
    """A valid tag name: a letter, then up to 63 letters, digits, ``.``, ``_`` or ``-``.

    Raises:
      ValueError: anything else (so a tag can never be mistaken for a step number or a path).
    """
    if not isinstance(name, str) or not _TAG.fullmatch(name):
        raise ValueError(
            f"invalid tag name {name!r}: a letter, then up to 63 letters, digits, '.', '_' or '-'"
        )
    return name


def tag_key(name: str) -> str:
    return f"{TAGS}/{check_tag(name)}.json"


def tag_to_json(name: str, step: int, created: float) -> bytes:
    doc = {"format": FORMAT, "version": VERSION, "tag": name, "step": step, "created": created}
    return encode_document(doc)


def tag_from_json(raw: bytes, *, name: str, where: str) -> int:
    """The step a tag document names."""
    doc = decode_document(raw, where)
    try:
        if doc["tag"] != name:
            raise ValueError(f"it is the tag {doc['tag']!r}")
        return check_step(doc["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"tag {name!r}: {where} is malformed: {e}") from e


# ------------------------------------------------------------------ JSON + checksums


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=True).encode()


def encode_document(doc: Mapping[str, Any]) -> bytes:
    """``doc`` as JSON with a ``checksum`` of its canonical encoding (appended as the last key)."""
    body = _canonical({k: v for k, v in doc.items() if k != "checksum"})
    return body[:-1] + b',"checksum":"' + f"{HASH}:{xxhash.xxh3_128_hexdigest(body)}".encode() + b'"}'


def decode_document(raw: bytes, where: str) -> dict[str, Any]:
    """Parses and checks a jckpt JSON document (any readable version).

    Raises:
      CorruptCheckpointError: not JSON, not a jckpt document, a damaged version
        field or a checksum mismatch.
      UnsupportedFormatError: a newer version (with an intact checksum).
    """
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where} is not a JSON object")
    if doc.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{where} is not a jckpt document (format={doc.get('format')!r})")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpointError(f"{where}: invalid format version {version!r}")
    if version < 2:
        if "checksum" in doc:  # version 1 had none: the version field was damaged
            raise CorruptCheckpointError(f"{where}: a version-1 document with a checksum (damaged)")
        return doc
    checksum = doc.pop("checksum", None)
    intact = checksum == f"{HASH}:{xxhash.xxh3_128_hexdigest(_canonical(doc))}"
    if version > VERSION and intact:
        raise UnsupportedFormatError(
            f"{where} has format version {version}; this jckpt reads versions <= {VERSION}. "
            "Upgrade jckpt to read it."
        )
    if not intact:
        newer = f" (or written by a jckpt newer than format {VERSION})" if version > VERSION else ""
        raise CorruptCheckpointError(f"{where}: checksum mismatch: the file was damaged{newer}")
    return doc


def root_marker() -> bytes:
    """The root marker document of this version."""
    return encode_document({"format": FORMAT, "version": VERSION})


def read_root_marker(raw: bytes, where: str) -> int:
    """The format version of a root, from its marker's bytes."""
    return decode_document(raw, where)["version"]


def json_value(value: Any, what: str) -> Any:
    """``value`` as plain JSON data (numpy and 0-d jax scalars become Python ones).

    Raises:
      TypeError: ``value`` is not JSON-serialisable (names ``what``).
    """
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


def encode_state(value: Any, what: str) -> tuple[str, bytes]:
    """A host object's state as ``(encoding, bytes)``: ``bytes`` as they are, JSON-like values as JSON.

    JSON-like: dicts with string keys, lists and tuples (read back as lists), strings,
    numbers, bools and None, nested; dict order is kept.

    Raises:
      TypeError: anything else (names ``what``).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes", bytes(value)
    stack, seen = [value], set()
    while stack:
        node = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            if id(node) in seen:
                continue  # shared (or cyclic: json.dumps refuses that below)
            seen.add(id(node))
            if isinstance(node, dict):
                key = next((k for k in node if not isinstance(k, str)), "")
                if key != "":
                    raise TypeError(f"{what}: state dict keys must be strings, got {key!r}")
                stack.extend(node.values())
            else:
                stack.extend(node)
        elif not (node is None or isinstance(node, (str, int, float))):
            raise TypeError(
                f"{what}: a state must be bytes or JSON-like (dicts with string keys, lists, strings, "
                f"numbers, bools, None); it holds a {type(node).__name__}: {node!r:.80}"
            )
    try:
        return "json", json.dumps(value, separators=(",", ":"), allow_nan=True).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"{what}: the state cannot be encoded as JSON: {e}") from e


def decode_state(encoding: str, raw: bytes) -> Any:
    """The state :func:`encode_state` encoded."""
    return bytes(raw) if encoding == "bytes" else json.loads(bytes(raw))


# ------------------------------------------------------------------ records


class Piece(NamedTuple):
    """A region of a packed leaf, stored as bytes inside a blob.

    Attributes:
      region: ((start, stop), ...) of the leaf this piece holds.
      blob: the id of the blob (a key of ``Manifest.blobs``).
      offset: byte offset in the blob.
      nbytes: byte length.
      digest: xxh3-128 of the piece's bytes (None in version-1 manifests).
    """

    region: tuple[tuple[int, int], ...]
    blob: str
    offset: int
    nbytes: int
    digest: str | None


class BlobRecord(NamedTuple):
    """A uint8 zarr3 array holding packed pieces, chunked like any array.

    Attributes:
      name: the array's directory name inside a data directory.
      nbytes: its length.
      chunk_bytes: its chunk length.
      chunks: chunk index (as a string) -> (xxh3-128 digest, data directory holding it).
    """

    name: str
    nbytes: int
    chunk_bytes: int
    chunks: dict[str, tuple[str, str]]


class StateRecord(NamedTuple):
    """One process's state of a host-state leaf, stored as bytes in that process's blob.

    Attributes:
      process: the index of the process that saved it.
      blob: the id of the blob holding the bytes (a key of ``Manifest.blobs``).
      offset: byte offset in the blob.
      nbytes: byte length.
      digest: xxh3-128 of the bytes.
      encoding: "json" (a JSON-like state, as UTF-8 JSON) or "bytes" (as returned).
    """

    process: int
    blob: str
    offset: int
    nbytes: int
    digest: str
    encoding: str


@dataclasses.dataclass(frozen=True)
class HostState:
    """A host-state leaf as :func:`jckpt.metadata` describes it (it is not an array).

    Restoring such a leaf sets the live object passed at its place in ``like``
    (``set_state``, the generator's state) and returns that object.  A pytree
    leaf (a dataclass, not a NamedTuple, so that trees keep it whole).

    Attributes:
      kind: "object" (an object with ``get_state``/``set_state``, e.g. a Grain
        iterator), "numpy.random.Generator" or "random.Random".
      type_name: the saved object's class, e.g. ``"grain._src...DataLoaderIterator"``.
      process_count: how many processes saved a state (one each).
      nbytes: the states' size in bytes, all processes together.
    """

    kind: str
    type_name: str
    process_count: int
    nbytes: int


class LeafRecord(NamedTuple):
    """One leaf of a checkpoint.

    Attributes:
      path: the key path string (see ``jckpt.tree``).
      keys: the key-path parts, ``[(kind, key), ...]``, to rebuild the tree without ``like``.
      origin: "jax", "numpy", "python", "none" (a None leaf) or "host" (a host-state leaf).
      storage: "none", "chunked", "packed" or "host".
      dtype: the logical dtype name ("" for None leaves).
      stored_dtype: the dtype written (an unsigned view for dtypes zarr3 lacks).
      shape: the (key-data) shape.
      extra: ``prng_impl`` (typed PRNG keys), ``py_type`` (Python scalars), ``numpy_scalar``;
        host states: ``host_type`` (one of HOST_TYPES) and ``class`` (the object's class).
      array: chunked: the array's directory name in its data directories.
      chunk_shape: chunked: the chunk shape.
      chunks: chunked: chunk name ("1.0") -> (digest, data directory holding it).
      pieces: packed: where each region of the leaf lives.
      states: host: one state per process of the save, in process order.
    """

    path: str
    keys: tuple[tuple[str, Any], ...]
    origin: str
    storage: str
    dtype: str = ""
    stored_dtype: str = ""
    shape: tuple[int, ...] = ()
    extra: dict[str, Any] = {}
    array: str = ""
    chunk_shape: tuple[int, ...] = ()
    chunks: dict[str, tuple[str, str]] = {}
    pieces: tuple[Piece, ...] = ()
    states: tuple[StateRecord, ...] = ()

    @property
    def nbytes(self) -> int:
        """The leaf's logical size in bytes (0 for None leaves; host states: their bytes)."""
        if self.storage == NONE:
            return 0
        if self.storage == HOST:
            return sum(state.nbytes for state in self.states)
        return np.dtype(self.stored_dtype).itemsize * math.prod(self.shape)


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
      base_step: the step an incremental save compared against (None for a full save).
      lineage: where it came from: versions, processes and devices, host, command,
        git commit, the origin of an import (see ``jckpt.lineage``).
      host_states: how many leaves are host states (data iterators, host RNGs), each
        saved once per process.
    """

    step: int
    kind: str
    metrics: dict | None
    metadata: dict | None
    bytes_written: int
    bytes_total: int
    created: float
    save_seconds: float
    base_step: int | None = None
    lineage: dict | None = None
    host_states: int = 0


class Manifest(NamedTuple):
    """The manifest of one committed step: its tree, where every byte lives, and its info.

    Attributes:
      step, kind, base_step, metrics, metadata, bytes_written, bytes_total,
      created, save_seconds: as in :class:`CheckpointInfo`.
      data_dir: the data directory this save wrote (``step_<N>/d<id>``).
      compression: the chunk codec of this save (None, "zstd", "blosc", "bytegroup").
      leaves: every leaf, in tree order.
      blobs: blob id -> BlobRecord, for every blob a packed piece lives in.
      codecs: data directory -> chunk codec, for the directories whose arrays
        are opened without reading their ``zarr.json`` (version 3; empty in older
        manifests, whose arrays all have one).
      version: the format version it was read as (written as :data:`VERSION`).
    """

    step: int
    kind: str
    base_step: int | None
    data_dir: str
    compression: str | None
    metrics: dict | None
    metadata: dict | None
    bytes_written: int
    bytes_total: int
    created: float
    save_seconds: float
    leaves: tuple[LeafRecord, ...]
    blobs: dict[str, BlobRecord]
    lineage: dict | None = None
    codecs: dict[str, str | None] = {}
    version: int = VERSION

    def info(self) -> CheckpointInfo:
        return CheckpointInfo(
            step=self.step,
            kind=self.kind,
            metrics=self.metrics,
            metadata=self.metadata,
            bytes_written=self.bytes_written,
            bytes_total=self.bytes_total,
            created=self.created,
            save_seconds=self.save_seconds,
            base_step=self.base_step,
            lineage=self.lineage,
            host_states=sum(leaf.storage == HOST for leaf in self.leaves),
        )

    def to_json(self) -> bytes:
        """The manifest document (always written as the current version, with its checksum)."""
        return encode_document(
            {
                "format": FORMAT,
                "version": VERSION,
                "hash": HASH,
                "step": self.step,
                "kind": self.kind,
                "base_step": self.base_step,
                "data_dir": self.data_dir,
                "compression": self.compression,
                "metrics": self.metrics,
                "metadata": self.metadata,
                "bytes_written": self.bytes_written,
                "bytes_total": self.bytes_total,
                "created": self.created,
                "save_seconds": self.save_seconds,
                "lineage": self.lineage,
                "leaves": [_leaf_to_json(leaf) for leaf in self.leaves],
                "blobs": {k: _blob_to_json(b) for k, b in self.blobs.items()},
                "codecs": self.codecs,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes, *, step: int, where: str) -> Manifest:
        """Parses and validates a manifest of version 1, 2, 3 or 4.

        Raises:
          CorruptCheckpointError: damaged (bad JSON, checksum, missing or mistyped
            fields, a different step); names the step and the file.
          UnsupportedFormatError: written by a newer jckpt.
        """
        try:
            doc = decode_document(raw, where)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"step {step}: manifest {e}") from e
        try:
            manifest = _manifest_from_doc(doc)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise CorruptCheckpointError(f"step {step}: manifest {where} is malformed: {e!r}") from e
        if manifest.step != step:
            raise CorruptCheckpointError(
                f"step {step}: manifest {where} is the manifest of step {manifest.step} (a copied file?)"
            )
        return manifest

    def chunked_leaves(self) -> list[LeafRecord]:
        return [leaf for leaf in self.leaves if leaf.storage == CHUNKED]

    def referenced_keys(self) -> set[str]:
        """Every data key under the root this manifest needs (its own manifest excluded)."""
        keys = set()
        arrays = [(leaf.array, leaf.chunks) for leaf in self.chunked_leaves()]
        arrays += [(blob.name, blob.chunks) for blob in self.blobs.values()]
        for array, chunks in arrays:
            for name, (_, source) in chunks.items():
                keys.add(f"{source}/{array}/zarr.json")
                keys.add(f"{source}/{array}/{chunk_key(name)}")
        return keys

    def data_dirs(self) -> set[str]:
        """The data directories this manifest reads from."""
        return {"/".join(key.split("/")[:2]) for key in self.referenced_keys()}


def chunk_key(name: str) -> str:
    """The key of a chunk inside its zarr3 array (default key encoding): ``"1.0"`` -> ``"c/1/0"``."""
    return "/".join(["c", *name.split(".")]) if name else "c"


class Fragment(NamedTuple):
    """What one process wrote during a save (merged by process 0 into the manifest).

    Attributes:
      plan: a digest of the planned leaves (every process must plan the same tree).
      chunks: leaf path -> {chunk name: (digest, data directory)} of chunked leaves.
      pieces: leaf path -> pieces of packed leaves this process holds.
      blobs: blob id -> record, for the blobs its pieces and states live in (new and reused).
      bytes_written: array bytes this process wrote.
      states: leaf path -> [this process's state] of host-state leaves.
    """

    plan: str
    chunks: dict[str, dict[str, tuple[str, str]]]
    pieces: dict[str, list[Piece]]
    blobs: dict[str, BlobRecord]
    bytes_written: int
    states: dict[str, list[StateRecord]] = {}

    def to_json(self) -> dict[str, Any]:
        """JSON data for the multi-host coordination service."""
        return {
            "plan": self.plan,
            "chunks": self.chunks,
            "pieces": {path: [_piece_to_json(p) for p in ps] for path, ps in self.pieces.items()},
            "blobs": {k: _blob_to_json(b) for k, b in self.blobs.items()},
            "bytes_written": self.bytes_written,
            "states": {path: [list(s) for s in ss] for path, ss in self.states.items()},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Fragment:
        return cls(
            plan=doc["plan"],
            chunks={p: _chunk_table(t) for p, t in doc["chunks"].items()},
            pieces={p: [_piece_from_json(x) for x in ps] for p, ps in doc["pieces"].items()},
            blobs={k: _blob_from_json(b) for k, b in doc["blobs"].items()},
            bytes_written=int(doc["bytes_written"]),
            states={p: [_state_from_json(x) for x in ss] for p, ss in doc["states"].items()},
        )


def plan_digest(leaves: Iterable[LeafRecord], compression: str | None = None) -> str:
    """A digest of planned leaves (no chunks or pieces yet) and their codec, compared across processes.

    Over the ``repr`` of plain tuples (strings, numbers): 2-4x faster than their JSON (2,000
    leaves: 4-6 ms against 9-17 ms), and never stored: only processes of one run compare it.
    """
    digest = xxhash.xxh3_64(repr(compression).encode())
    for leaf in leaves:
        fields = (leaf.path, leaf.keys, leaf.origin, leaf.storage, leaf.dtype, leaf.stored_dtype, leaf.shape,
                  sorted(leaf.extra.items()), leaf.array, leaf.chunk_shape)  # fmt: skip
        digest.update(repr(fields).encode())
    return digest.hexdigest()


def info_to_json(info: CheckpointInfo) -> dict[str, Any]:
    return info._asdict()


def info_from_json(doc: Mapping[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(**doc)


# ------------------------------------------------------------------ JSON of records


def _leaf_to_json(leaf: LeafRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "path": leaf.path,
        "keys": [list(part) for part in leaf.keys],
        "origin": leaf.origin,
        "storage": leaf.storage,
    }
    if leaf.storage == NONE:
        return doc
    if leaf.storage == HOST:
        doc.update(extra=leaf.extra, states=[list(state) for state in leaf.states])
        return doc
    doc.update(dtype=leaf.dtype, stored_dtype=leaf.stored_dtype, shape=list(leaf.shape), extra=leaf.extra)
    if leaf.storage == CHUNKED:
        doc.update(array=leaf.array, chunk_shape=list(leaf.chunk_shape), chunks=leaf.chunks)
    else:
        doc["pieces"] = [_piece_to_json(p) for p in leaf.pieces]
    return doc


def _piece_to_json(piece: Piece) -> list[Any]:
    return [[list(r) for r in piece.region], piece.blob, piece.offset, piece.nbytes, piece.digest]


def _piece_from_json(doc: list[Any]) -> Piece:
    region, blob, offset, nbytes, digest = doc
    return Piece(
        tuple((_int(a), _int(b)) for a, b in region), _str(blob), _int(offset), _int(nbytes), _opt_str(digest)
    )


def _state_from_json(doc: list[Any]) -> StateRecord:
    process, blob, offset, nbytes, digest, encoding = doc
    encoding = _one_of(encoding, STATE_ENCODINGS)
    return StateRecord(_int(process), _str(blob), _int(offset), _int(nbytes), _str(digest), encoding)


def _blob_to_json(blob: BlobRecord) -> dict[str, Any]:
    return {"name": blob.name, "nbytes": blob.nbytes, "chunk_bytes": blob.chunk_bytes, "chunks": blob.chunks}


def _blob_from_json(doc: Mapping[str, Any], name: str | None = None) -> BlobRecord:
    return BlobRecord(
        _str(doc["name"] if name is None else name),
        _int(doc["nbytes"]),
        _int(doc["chunk_bytes"]),
        _chunk_table(doc["chunks"]),
    )


def _chunk_table(doc: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    return {_str(name): (_str(digest), _str(source)) for name, (digest, source) in doc.items()}


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def _opt_dict(value: Any) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"expected an object or null, got {value!r}")
    return value


def _one_of(value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"expected one of {choices}, got {value!r}")
    return value


def _keys(doc: Any) -> tuple[tuple[str, Any], ...]:
    parts = []
    for kind, key in doc:
        _one_of(kind, ("d", "a", "i"))
        parts.append((kind, _int(key) if kind == "i" else key))
    return tuple(parts)


def _leaf_from_json(doc: Mapping[str, Any], version: int) -> LeafRecord:
    origin = _one_of(doc["origin"], ORIGINS)
    head = {"path": _str(doc["path"]), "keys": _keys(doc["keys"]), "origin": origin}
    if version == 1:
        storage = NONE if origin == "none" else CHUNKED if "array" in doc else PACKED
    else:
        storage = _one_of(doc["storage"], STORAGE_KINDS)
    if storage == NONE:
        return LeafRecord(**head, storage=NONE)
    if storage == HOST or origin == "host":
        if version < 4 or storage != HOST or origin != "host":
            raise ValueError(f"leaf {head['path']!r}: storage {storage!r} with origin {origin!r}")
        extra = dict(doc["extra"])
        _one_of(extra.get("host_type"), HOST_TYPES)
        states = tuple(_state_from_json(s) for s in doc["states"])
        if not states or [s.process for s in states] != list(range(len(states))):
            raise ValueError(f"leaf {head['path']!r}: states of processes {[s.process for s in states]}")
        return LeafRecord(**head, storage=HOST, extra=extra, states=states)
    extra = dict(doc["extra"]) if version >= 2 else {
        k: doc[k] for k in ("prng_impl", "py_type", "numpy_scalar") if k in doc
    }
    stored_dtype = _str(doc["stored_dtype"])
    np.dtype(stored_dtype)  # a dtype this numpy knows
    body = dict(
        head,
        storage=storage,
        dtype=_str(doc["dtype"]),
        stored_dtype=stored_dtype,
        shape=tuple(_int(n) for n in doc["shape"]),
        extra=extra,
    )
    if any(n < 0 for n in body["shape"]):
        raise ValueError(f"negative shape {body['shape']}")
    if storage == CHUNKED:
        chunk_shape = tuple(_int(n) for n in doc["chunk_shape"])
        if len(chunk_shape) != len(body["shape"]) or any(n < 1 for n in chunk_shape):
            raise ValueError(f"leaf {body['path']!r}: bad chunk shape {chunk_shape}")
        return LeafRecord(**body, array=_str(doc["array"]), chunk_shape=chunk_shape,
                          chunks=_chunk_table(doc["chunks"]))
    if version >= 2:
        pieces = tuple(_piece_from_json(p) for p in doc["pieces"])
    elif "packed" in doc:  # version 1: a whole leaf in process 0's blob
        offset, nbytes = doc["packed"]
        full = tuple((0, n) for n in body["shape"])
        pieces = (Piece(full, "packed", _int(offset), _int(nbytes), None),)
    else:  # version 1: shards in per-process blobs
        pieces = tuple(
            Piece(tuple((_int(a), _int(b)) for a, b in s["region"]), _str(s["blob"]), _int(s["at"][0]),
                  _int(s["at"][1]), None)
            for s in doc["shards"]
        )
    return LeafRecord(**body, pieces=pieces)


def _manifest_from_doc(doc: Mapping[str, Any]) -> Manifest:
    version = doc["version"]
    if version == 1:
        blobs = {name: _blob_from_json(b, name) for name, b in (doc.get("blobs") or {}).items()}
        if doc.get("packed"):
            blobs["packed"] = _blob_from_json(doc["packed"], "packed")
    else:
        blobs = {_str(k): _blob_from_json(b) for k, b in doc["blobs"].items()}
    leaves = tuple(_leaf_from_json(leaf, version) for leaf in doc["leaves"])
    for leaf in leaves:
        for piece in (*leaf.pieces, *leaf.states):
            if piece.nbytes == 0:  # a zero-size leaf: nothing stored
                continue
            if piece.blob not in blobs:
                raise ValueError(f"leaf {leaf.path!r}: piece in unknown blob {piece.blob!r}")
            if piece.offset < 0 or piece.offset + piece.nbytes > blobs[piece.blob].nbytes:
                raise ValueError(f"leaf {leaf.path!r}: piece outside blob {piece.blob!r}")
    base_step = doc["base_step"]
    return Manifest(
        step=_int(doc["step"]),
        kind=_one_of(doc["kind"], KINDS),
        base_step=None if base_step is None else _int(base_step),
        data_dir=_str(doc["data_dir"]),
        compression=_opt_str(doc["compression"]),
        metrics=_opt_dict(doc["metrics"]),
        metadata=doc["metadata"],
        bytes_written=_int(doc["bytes_written"]),
        bytes_total=_int(doc["bytes_total"]),
        created=_number(doc["created"]),
        save_seconds=_number(doc["save_seconds"]),
        leaves=leaves,
        blobs=blobs,
        lineage=_opt_dict(doc.get("lineage")) if version == 1 else _opt_dict(doc["lineage"]),
        codecs={_str(k): _opt_str(v) for k, v in doc["codecs"].items()} if version >= 3 else {},
        version=version,
    )
