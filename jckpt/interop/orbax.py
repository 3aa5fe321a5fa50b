"""Orbax checkpoints, written and read leaf by leaf with tensorstore (Orbax itself is not needed).

The layout Orbax's ``PyTreeCheckpointHandler`` (behind ``StandardCheckpointer``,
``PyTreeCheckpointer`` and ``CheckpointManager`` items) uses, as found on disk
with orbax-checkpoint 0.12::

    ITEM/
      _METADATA               JSON: tree_metadata {"('params', 'w')": {key_metadata: [{key, key_type}],
                              value_metadata: {value_type, skip_deserialize}}}, use_ocdbt, use_zarr3
      _CHECKPOINT_METADATA    JSON: item_handlers, metrics (left empty by 0.12), timestamps (newer Orbax)
      _sharding               jax.Array shardings, by base64 parameter name
      _strings.json           string leaves
      manifest.ocdbt, d/      OCDBT (the default): every array's zarr files in one key-value database,
      ocdbt.process_N/        ... written per process, then merged into the root manifest
      params.w/.zarray, 0.0   without OCDBT: one zarr directory per array

Each array is a zarr (v2, or v3 with ``use_zarr3``) array named by its key
path joined with ``"."``, with ``key_type`` 1 for a sequence index and 2 for
a dict key.  A CheckpointManager step directory (``STEP/_CHECKPOINT_METADATA``
naming ``item_handlers``) holds one such ITEM per item name (``default/``,
``state/``, ...); items of other handlers (JSON, ...) hold no arrays.  A
manager with ``best_fn`` stores each step's metrics as one more JSON item,
``STEP/metrics/metrics``.

Export writes ITEM with OCDBT and zarr v2 arrays, every array typed
``np.ndarray``, so ``ocp.StandardCheckpointer().restore(path)`` returns the
nested tree (lists where jckpt had sequences) of numpy arrays.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorstore as ts

from jckpt import progress as _progress
from jckpt.errors import UnsupportedLeafError, UnsupportedSourceError
from jckpt.interop import _names
from jckpt.interop._files import atomic_directory
from jckpt.interop._spool import Spool

METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
OCDBT_MANIFEST = "manifest.ocdbt"
METRICS_ITEM = "metrics"
SEQUENCE, DICT = 1, 2  # orbax's KeyType
STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
ARRAY_TYPES = ("np.ndarray", "jax.Array", "scalar")
CHUNK_BYTES = 32 * 2**20  # zarr chunks of exported arrays: at most this, split along axis 0
TRANSACTION_BYTES = 16 * 2**20  # exported bytes buffered per OCDBT commit
SLAB_BYTES = 64 * 2**20  # bytes read at once when importing an array
_CACHE_BYTES = 32 * 2**20
_PROCESS_DIR = re.compile(r"^ocdbt\.process_\d+$")
_GRAIN_STATE = re.compile(r"^process_(\d+)-of-(\d+)\.json$")  # Grain's checkpoint handler, per process
# dtypes tensorstore's zarr driver cannot store (so Orbax cannot either)
_NO_ZARR = frozenset({"uint2", "uint4", "float8_e4m3", "float6_e2m3fn", "float6_e3m2fn"})


class Leaf(NamedTuple):
    """One array of an Orbax item: its key path and whether each key is a sequence index."""

    keys: tuple[str, ...]
    sequence: tuple[bool, ...]
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def name(self) -> str:
        return _names.join(self.keys)


def _context() -> ts.Context:
    return ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})


def _chunks(shape: tuple[int, ...], dtype: np.dtype) -> list[int]:
    if not shape:
        return []
    row = dtype.itemsize * int(np.prod(shape[1:]))
    rows = max(1, CHUNK_BYTES // max(row, 1))
    return [max(1, min(shape[0], rows)), *(max(1, n) for n in shape[1:])]


def _tree_metadata(leaves: Sequence[Leaf]) -> dict[str, Any]:
    entries = {}
    for leaf in leaves:
        entries[str(tuple(leaf.keys))] = {
            "key_metadata": [
                {"key": key, "key_type": SEQUENCE if seq else DICT}
                for key, seq in zip(leaf.keys, leaf.sequence)
            ],
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
        }
    return {
        "tree_metadata": entries,
        "use_ocdbt": True,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


def write(
    destination: str | os.PathLike,
    leaves: Sequence[Leaf],
    arrays: Iterable[tuple[str, np.ndarray]],
    *,
    progress: _progress.Progress | None = None,
) -> list[str]:
    """Writes an Orbax PyTree checkpoint directory (OCDBT, zarr v2), one array at a time.

    Arrays are committed to the OCDBT database in transactions of at most
    ``TRANSACTION_BYTES`` (a larger array alone), so that is what is buffered.

    Args:
      destination: the directory to create (it must not exist, or be empty).
      leaves: every array, in the order ``arrays`` yields them.
      arrays: ``(name, array)`` pairs matching ``leaves``.
      progress: advanced by each array's bytes.

    Returns:
      ``[destination]``.

    Raises:
      FileExistsError: ``destination`` exists and is not an empty directory.
      UnsupportedLeafError: a dtype zarr cannot store (uint2, uint4, float8_e4m3, float6_*).
    """
    for leaf in leaves:
        if leaf.dtype.name in _NO_ZARR:
            raise UnsupportedLeafError(f"leaf {leaf.name!r}: Orbax (zarr) cannot store dtype {leaf.dtype}")
    progress = progress or _progress._Silent()
    started = time.time_ns()
    source = iter(arrays)
    with atomic_directory(destination) as tmp:
        ctx = _context()
        kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": tmp + "/"}}
        txn, pending = ts.Transaction(), 0
        for leaf in leaves:
            name, array = next(source)
            if name != leaf.name or tuple(array.shape) != leaf.shape or array.dtype != leaf.dtype:
                raise ValueError(f"expected {leaf.name!r}, got {name!r} {array.dtype}{list(array.shape)}")
            spec = {
                "driver": "zarr",
                "kvstore": {**kvstore, "path": leaf.name + "/"},
                "dtype": leaf.dtype.name,
                "metadata": {
                    "shape": list(leaf.shape),
                    "chunks": _chunks(leaf.shape, leaf.dtype),
                    "compressor": {"id": "zstd", "level": 1},
                },
            }
            store = ts.open(spec, create=True, context=ctx, transaction=txn).result()
            store.write(np.asarray(array, order="C")).result()
            pending += array.nbytes
            progress.advance(array.nbytes)
            del array, store
            if pending >= TRANSACTION_BYTES:
                txn.commit_async().result()
                txn, pending = ts.Transaction(), 0
        txn.commit_async().result()
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump(_tree_metadata(leaves), f)
        with open(os.path.join(tmp, CHECKPOINT_METADATA), "w") as f:
            json.dump(
                {
                    "item_handlers": STANDARD_HANDLER,
                    "metrics": {},
                    "performance_metrics": {},
                    "init_timestamp_nsecs": started,
                    "commit_timestamp_nsecs": time.time_ns(),
                    "custom_metadata": {},
                },
                f,
            )
    return [os.path.abspath(os.fspath(destination))]


# -- finding items -------------------------------------------------------------------------------


def _json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_item(directory: str) -> bool:
    """True when ``directory`` looks like an Orbax PyTree item (metadata, OCDBT or zarr arrays)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    if METADATA in names or OCDBT_MANIFEST in names or any(_PROCESS_DIR.match(n) for n in names):
        return True
    return any(
        os.path.isfile(os.path.join(directory, n, ".zarray"))
        or os.path.isfile(os.path.join(directory, n, "zarr.json"))
        for n in names
    )


def _step_dirs(directory: str) -> list[int]:
    steps = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(path):
            if os.path.exists(os.path.join(path, CHECKPOINT_METADATA)) or is_item(path):
                steps.append(int(name))
            elif any(is_item(os.path.join(path, sub)) for sub in os.listdir(path)):
                steps.append(int(name))
    return sorted(steps)


class Found(NamedTuple):
    """What an Orbax path holds: its PyTree items and the step's metadata."""

    items: list[tuple[str | None, str]]  # (item name or None for a bare item, directory)
    skipped: list[str]  # item directories that hold no arrays (e.g. JSON items)
    metrics: dict | None


def find(directory: str | os.PathLike) -> Found | None:
    """The Orbax items at ``directory``, or None when it is not an Orbax checkpoint.

    Raises:
      UnsupportedSourceError: an Orbax path jckpt cannot import as it is (a
        CheckpointManager root, an unfinished save), with what to pass instead.
    """
    directory = os.path.abspath(os.fspath(directory))
    if ".orbax-checkpoint-tmp" in os.path.basename(directory):
        raise UnsupportedSourceError(f"{directory!r} is an unfinished Orbax save (a temporary directory)")
    step_meta = _json(os.path.join(directory, CHECKPOINT_METADATA)) or {}
    metrics = step_meta.get("metrics") or None
    if is_item(directory):
        return Found([(None, directory)], [], metrics)
    handlers = step_meta.get("item_handlers")
    subdirs = sorted(n for n in os.listdir(directory) if os.path.isdir(os.path.join(directory, n)))
    items = [(n, os.path.join(directory, n)) for n in subdirs if is_item(os.path.join(directory, n))]
    if items or isinstance(handlers, dict):
        # A manager with best_fn keeps a step's metrics as a JSON item: STEP/metrics/metrics.
        saved_metrics = _json(os.path.join(directory, METRICS_ITEM, METRICS_ITEM))
        if isinstance(saved_metrics, dict):
            metrics = saved_metrics
            subdirs.remove(METRICS_ITEM)
        skipped = [n for n in subdirs if n not in dict(items) and not n.startswith(".")]
        if not items:
            raise UnsupportedSourceError(
                f"{directory!r} is an Orbax step whose items ({', '.join(subdirs)}) hold no arrays"
            )
        return Found(items, skipped, metrics)
    steps = _step_dirs(directory)
    if steps:
        raise UnsupportedSourceError(
            f"{directory!r} is an Orbax CheckpointManager root with steps {steps}: pass one step "
            f"directory, e.g. {os.path.join(directory, str(steps[-1]))!r}"
        )
    return None


def grain_states(directory: str) -> list[str] | None:
    """The per-process iterator states (JSON text, in process order) of an item that Grain's
    checkpoint handler wrote (``process_<i>-of-<n>.json``), or None for any other directory."""
    found = {}
    for name in os.listdir(directory):
        match = _GRAIN_STATE.match(name)
        if match:
            found[(int(match[1]), int(match[2]))] = os.path.join(directory, name)
    counts = {n for _, n in found}
    if len(counts) != 1 or sorted(found) != [(i, n) for n in counts for i in range(n)]:
        return None
    texts = []
    for key in sorted(found):
        with open(found[key], encoding="utf-8") as f:
            texts.append(f.read())
    return texts


# -- reading -------------------------------------------------------------------------------------


class _Item:
    """One PyTree item: its kvstore, its array names and their key metadata."""

    def __init__(self, directory: str):
        self.directory = directory
        self.meta = _json(os.path.join(directory, METADATA))
        names = os.listdir(directory)
        has_manifest = OCDBT_MANIFEST in names
        if self.meta is not None and "use_ocdbt" in self.meta:
            self.ocdbt = bool(self.meta["use_ocdbt"])
        else:
            self.ocdbt = has_manifest
        if self.ocdbt and not has_manifest:
            processes = [n for n in names if _PROCESS_DIR.match(n)]
            raise UnsupportedSourceError(
                f"{directory!r} holds per-process OCDBT databases ({', '.join(processes) or 'none'}) but no "
                f"merged {OCDBT_MANIFEST}: an unfinished or unmerged Orbax save"
            )
        base = {"driver": "file", "path": directory + "/"}
        self.kvstore = {"driver": "ocdbt", "base": base} if self.ocdbt else None
        self.ctx = _context()
        self.keys = self._list_keys()

    def _list_keys(self) -> set[str]:
        if self.ocdbt:
            kv = ts.KvStore.open(self.kvstore, context=self.ctx).result()
            return {k.decode() for k in kv.list().result()}
        found = set()
        for name in os.listdir(self.directory):
            for marker in (".zarray", "zarr.json"):
                if os.path.isfile(os.path.join(self.directory, name, marker)):
                    found.add(f"{name}/{marker}")
        return found

    def driver(self, name: str) -> str | None:
        """``"zarr"`` / ``"zarr3"`` for the array ``name``, None when there is no such array."""
        if f"{name}/.zarray" in self.keys:
            return "zarr"
        if f"{name}/zarr.json" in self.keys:
            return "zarr3"
        return None

    def entries(self) -> tuple[list[tuple[tuple[str, ...], tuple[bool, ...], str]], list[str]]:
        """([(keys, sequence flags, value type)], [names of leaves that are not imported])."""
        if self.meta is None or "tree_metadata" not in self.meta:  # older Orbax: arrays only
            names = sorted(k.rsplit("/", 1)[0] for k in self.keys if k.endswith(("/.zarray", "/zarr.json")))
            return [(tuple(n.split(".")), (False,) * len(n.split(".")), "np.ndarray") for n in names], []
        out, skipped = [], []
        for entry in self.meta["tree_metadata"].values():
            keys = tuple(str(k["key"]) for k in entry["key_metadata"])
            sequence = tuple(k.get("key_type") == SEQUENCE for k in entry["key_metadata"])
            value = entry.get("value_metadata") or {}
            kind = value.get("value_type")
            if kind == "None":
                out.append((keys, sequence, "None"))
            elif kind in ("Dict", "List", "Tuple", "NamedTuple"):
                continue  # an empty container: no leaves to keep
            elif kind in ARRAY_TYPES or (
                not value.get("skip_deserialize") and self.driver(_names.join(keys))
            ):
                out.append((keys, sequence, kind))
            else:
                skipped.append(f"{_names.join(keys)} ({kind})")
        return out, skipped

    def open(self, name: str) -> ts.TensorStore:
        driver = self.driver(name)
        if driver is None:
            raise UnsupportedSourceError(f"{self.directory!r}: no array data for leaf {name!r}")
        if self.kvstore is not None:
            kvstore = {**self.kvstore, "path": name + "/"}
        else:
            kvstore = {"driver": "file", "path": os.path.join(self.directory, name) + "/"}
        spec = {"driver": driver, "kvstore": kvstore}
        return ts.open(spec, open=True, read=True, context=self.ctx).result()


def _read_array(store: ts.TensorStore, spool: Spool, progress: _progress.Progress) -> np.ndarray:
    """The array, decoded into ``spool`` ``SLAB_BYTES`` at a time along axis 0."""
    shape = tuple(store.shape)
    dtype = np.dtype(store.dtype.numpy_dtype)
    out = spool.empty(shape, dtype)
    if not shape or out.size == 0:
        out[...] = store.read().result()
        progress.advance(out.nbytes)
        return out
    row = dtype.itemsize * int(np.prod(shape[1:]))
    rows = max(1, SLAB_BYTES // max(row, 1))
    for start in range(0, shape[0], rows):
        stop = min(shape[0], start + rows)
        # tensorstore decodes straight into the (file-backed) destination: no slab-sized temporary
        ts.array(out[start:stop], copy=False, write=True).write(store[start:stop]).result()
        progress.advance((stop - start) * row)
    if isinstance(out, np.memmap):
        out.flush()
    return out


class Plan(NamedTuple):
    """The arrays to import from an Orbax path, opened but not read."""

    leaves: list[tuple[tuple[str, ...], str, ts.TensorStore | None]]  # (keys, value type, array)
    sequences: set[tuple[str, ...]]  # key paths of nodes Orbax recorded as sequences
    skipped: list[str]  # what is not imported: string leaves, items without arrays
    nbytes: int


def plan(found: Found) -> Plan:
    """Opens every array of the items in ``found`` (metadata only).

    With several items, each item's tree goes under its item name.

    Raises:
      UnsupportedSourceError: an array named in the metadata is missing.
    """
    leaves: list[tuple[tuple[str, ...], str, ts.TensorStore | None]] = []
    sequences: set[tuple[str, ...]] = set()
    skipped = list(found.skipped)
    several = len(found.items) > 1
    nbytes = 0
    for item_name, directory in found.items:
        item = _Item(directory)
        prefix = (item_name,) if several else ()
        entries, item_skipped = item.entries()
        skipped += [f"{item_name}/{s}" if several else s for s in item_skipped]
        for keys, sequence, kind in entries:
            sequences.update(prefix + keys[:i] for i, is_index in enumerate(sequence) if is_index)
            store = None if kind == "None" else item.open(_names.join(keys))
            if store is not None:
                nbytes += store.dtype.numpy_dtype.itemsize * int(np.prod(store.shape))
            leaves.append((prefix + keys, kind, store))
    return Plan(leaves, sequences, skipped, nbytes)


def read(plan: Plan, spool: Spool, progress: _progress.Progress | None = None) -> Any:
    """Reads every array of ``plan`` into ``spool``.

    Returns:
      Nested dicts, with lists where Orbax recorded sequences; numpy arrays,
      Orbax scalars as numpy scalars of their stored dtype, None leaves kept.
    """
    progress = progress or _progress._Silent()
    values = []
    for keys, kind, store in plan.leaves:
        if store is None:
            values.append((keys, None))
            continue
        array = _read_array(store, spool, progress)
        values.append((keys, array[()] if kind == "scalar" else array))
    return _names.nest(values, plan.sequences)
