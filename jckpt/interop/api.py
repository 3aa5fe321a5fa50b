"""export and import_from: jckpt steps to and from safetensors, npz and Orbax checkpoints."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from jckpt import progress as _progress
from jckpt.errors import UnsupportedSourceError
from jckpt.interop import _names, _source
from jckpt.interop import npz as npz_lib
from jckpt.interop import orbax as orbax_lib
from jckpt.interop import safetensors as safetensors_lib
from jckpt.interop._spool import Spool

if TYPE_CHECKING:
    from jckpt import CheckpointInfo

FORMATS = ("safetensors", "npz", "orbax")


class ExportInfo(NamedTuple):
    """What ``export`` wrote.

    Attributes:
      format: "safetensors", "npz" or "orbax".
      step: the jckpt step exported.
      destination: the directory (safetensors, orbax) or file (npz) written.
      files: every file written (safetensors: the shards and the index; npz: the
        file; orbax: the directory).
      names: the tensor names exported, in order.
      nbytes: bytes of tensor data exported.
    """

    format: str
    step: int
    destination: str
    files: list[str]
    names: list[str]
    nbytes: int


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


def export(
    directory: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    step: int | str | None = None,
    format: str = "safetensors",
    select: str | list[str] | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool | None = None,
) -> ExportInfo:
    """Exports one step of a jckpt root as safetensors, npz or an Orbax checkpoint.

    Tensors are named by their key path joined with ``"."`` (``params.layers.0.kernel``);
    dtypes are kept (bf16 and fp8 natively in safetensors; see the format
    modules for the others).  ``None`` leaves are left out, and so are host
    states (data iterators, host RNGs: they are not tensors; a warning names
    them); PRNG keys are exported as their key data (uint32) and Python scalars
    as 0-d arrays.

    Leaves are restored (hash-checked) and written a group of at most
    ``jckpt.interop._source.GROUP_BYTES`` (64 MiB) at a time, a larger leaf
    alone, so host memory stays about max(64 MiB, the largest leaf) plus what
    restore itself keeps in flight, whatever the size of the checkpoint.  The
    destination appears only when complete (written under a temporary name,
    then renamed).

    Args:
      directory: the jckpt root (any location jckpt reads, object stores included).
      destination: a local path. safetensors: a directory in the Hugging Face
        layout (``model.safetensors``, or above ``max_shard_size``
        ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``);
        npz: the ``.npz`` file; orbax: a directory that
        ``ocp.StandardCheckpointer().restore(path)`` reads (as numpy arrays).
      step: the step to export; None for the latest.
      format: "safetensors", "npz" or "orbax".
      select: an fnmatch pattern over tensor names (e.g. ``"params.*"``), or a
        list of them (a name matching any is exported); None for everything.
      max_shard_size: safetensors only: bytes per shard, an int or a string
        such as ``"100KB"`` or ``"5GB"`` (decimal, as Hugging Face) or ``"2GiB"``.
      progress: show a progress bar on stderr; None: only when stderr is a terminal.

    Returns:
      An ExportInfo naming what was written.

    Raises:
      CheckpointNotFoundError: no such step.
      FileExistsError: the destination exists (and is not an empty directory).
      ValueError: an unknown format, a bad ``max_shard_size``, ``select``
        matching nothing, or two leaves with the same name.
      UnsupportedLeafError: orbax only: a dtype zarr cannot store.
      CorruptCheckpointError: a chunk fails its hash check (nothing is left at the destination).
    """
    _check_format(format)
    if format == "safetensors":
        safetensors_lib.parse_size(max_shard_size)  # fail before reading anything
    step = _source.resolve_step(directory, step)
    specs, host_states = _source.leaf_specs(directory, step)
    if host_states:
        warnings.warn(
            f"export of step {step}: host states are not tensors and are not exported: "
            + ", ".join(host_states),
            stacklevel=2,
        )
    names = [_names.join(_source.names(spec)) for spec in specs]
    _names.check_unique((name, "/".join(_source.names(spec))) for name, spec in zip(names, specs))
    chosen = set(_names.select(names, select))
    pairs = [(name, spec) for name, spec in zip(names, specs) if name in chosen]
    if format == "safetensors":
        # Widest dtypes first: with the 8-aligned data start, every tensor's offset is then a
        # multiple of its itemsize, so readers can map it without copying (the index keeps names).
        pairs.sort(key=lambda pair: -pair[1].struct.dtype.itemsize)
    names, specs = [n for n, _ in pairs], [s for _, s in pairs]
    total = sum(s.struct.dtype.itemsize * _size(s.struct.shape) for s in specs)
    destination = os.path.abspath(os.fspath(destination))
    with _progress.bar(f"export {format}", total, progress) as bar:
        arrays = _named(names, _source.read_leaves(directory, step, specs))
        if format == "safetensors":  # specs were ordered by itemsize: every tensor starts aligned
            entries = [
                safetensors_lib.Entry(n, tuple(s.struct.shape), s.struct.dtype) for n, s in zip(names, specs)
            ]
            files = safetensors_lib.write(
                destination, entries, arrays, max_shard_size=max_shard_size, progress=bar
            )
        elif format == "npz":
            files = npz_lib.write(destination, arrays, progress=bar)
        else:
            leaves = [
                orbax_lib.Leaf(
                    _source.names(s),
                    tuple(_source.is_sequence_index(e) for e in s.path),
                    tuple(s.struct.shape),
                    s.struct.dtype,
                )
                for s in specs
            ]
            files = orbax_lib.write(destination, leaves, arrays, progress=bar)
    return ExportInfo(format, step, destination, files, names, total)


def _named(names: list[str], leaves: Iterator[tuple[Any, Any]]) -> Iterator[tuple[str, Any]]:
    """``(name, array)`` pairs, keeping no reference to an array once the writer asks for the next."""
    names_iter = iter(names)
    for _, array in leaves:
        yield next(names_iter), array
        del array


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for n in shape:
        size *= n
    return size


def _listing(directory: str) -> str:
    names = sorted(os.listdir(directory))
    if not names:
        return "an empty directory"
    shown = [n + "/" if os.path.isdir(os.path.join(directory, n)) else n for n in names[:8]]
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return "a directory holding " + ", ".join(shown) + more


def _describe_file(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    return f"a file of {os.path.getsize(path)} bytes starting with {head!r}"


def detect_format(source: str | os.PathLike) -> str:
    """The format of an import source: "orbax", "safetensors" or "npz".

    Recognises an Orbax checkpoint directory (StandardCheckpointer or
    PyTreeCheckpointer, OCDBT or not, or a CheckpointManager step directory
    with its items), a ``.safetensors`` file, a ``*.safetensors.index.json``
    file or a directory holding them (Hugging Face layout), and an ``.npz``
    file.  Contents decide, not file name extensions.

    Raises:
      FileNotFoundError: nothing at ``source``.
      UnsupportedSourceError: none of these; the message says what is there.
    """
    source = os.path.abspath(os.fspath(source))
    if not os.path.exists(source):
        raise FileNotFoundError(f"import source {source!r} does not exist")
    if os.path.isfile(source):
        if source.endswith(".safetensors.index.json") or safetensors_lib.looks_like_safetensors(source):
            return "safetensors"
        if npz_lib.looks_like_npz(source):
            return "npz"
        raise UnsupportedSourceError(
            f"{source!r} is {_describe_file(source)}; not a safetensors or npz file "
            "(an Orbax checkpoint is a directory)"
        )
    if _source.is_jckpt_root(source):
        raise UnsupportedSourceError(
            f"{source!r} is a jckpt checkpoint root already; read it with jckpt.restore "
            "(or copy steps with jckpt.restore and jckpt.save)"
        )
    if orbax_lib.find(source) is not None:
        return "orbax"
    if safetensors_lib.files_of(source) is not None:
        return "safetensors"
    raise UnsupportedSourceError(
        f"{source!r} is {_listing(source)}; not an Orbax checkpoint, safetensors or npz"
    )


def _nest_names(tensors: list[tuple[str, Any]], source: str) -> dict:
    try:
        return _names.nest((name.split(_names.SEPARATOR), array) for name, array in tensors)
    except ValueError as e:
        raise UnsupportedSourceError(f"{source!r}: tensor names do not form a tree: {e}") from e


def _grain_items(source: str, skipped: list[str], tree: dict) -> list[str]:
    """Puts the Grain iterator items among ``skipped`` into ``tree`` as host states; returns the rest."""
    left = []
    for name in skipped:
        directory = os.path.join(source, name)
        texts = orbax_lib.grain_states(directory) if os.path.isdir(directory) else None
        why = ""
        if texts is not None and len(texts) > 1:
            why = f" (Grain iterator states of {len(texts)} processes: only a single process's are imported)"
        elif texts is not None and name in tree:
            why = f" (a Grain iterator state, but {name!r} is taken by the arrays)"
        if texts is None or why:
            left.append(name + why)
            continue
        try:
            tree[name] = _source.ImportedState(texts[0])
        except ValueError:
            left.append(f"{name} (not JSON)")
    return left


def import_from(
    source: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    step: int,
    format: str | None = None,
    metadata: dict | None = None,
    scratch_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> CheckpointInfo:
    """Imports a safetensors, npz or Orbax checkpoint as one step of a jckpt root.

    The tree written: for safetensors and npz, tensor names split on ``"."``
    into nested dicts with string keys (``params.layers.0.kernel`` ->
    ``{"params": {"layers": {"0": {"kernel": ...}}}}``; the jckpt key path is
    the same as for a list, so ``jckpt.restore(like=...)`` with lists works).
    For Orbax, the saved tree with lists where Orbax recorded sequences, numpy
    arrays, Orbax scalars as numpy scalars; with several PyTree items (a
    CheckpointManager step), ``{item name: tree}``.  Dtypes are kept exactly.
    An Orbax item written by Grain's checkpoint handler (a data iterator's state)
    of a single-process run becomes a host state under its item name: restore it
    into the live iterator (``like={..., name: iterator}``).  String leaves and
    other non-PyTree items cannot be stored and are skipped with a warning
    (listed in the step's metadata under ``"skipped"``).

    Memory: safetensors files and uncompressed npz members are memory-mapped
    and handed to ``jckpt.save`` as they are (their pages are page cache, not
    process memory); Orbax arrays and compressed npz members are decoded into
    temporary files under ``scratch_dir`` (64 MiB slabs at a time) and
    memory-mapped the same way; so the import holds about one slab plus what
    ``jckpt.save`` keeps in flight, and needs scratch disk space for the
    Orbax/compressed data.

    Args:
      source: a local path (see ``detect_format``).
      directory: the jckpt root to write (created if missing).
      step: the step number to write; it must not be committed already.
      format: "orbax", "safetensors" or "npz"; None detects it.
      metadata: user metadata for the step.
      scratch_dir: where temporary decoded arrays go (default: the system temp dir;
        give a disk path where that is a RAM-backed tmpfs).
      progress: show progress on stderr; None: only when stderr is a terminal.

    Returns:
      The CheckpointInfo of the new step; ``lineage["origin"]`` names the source
      (``"imported from <format>:<absolute source path>"``).

    Raises:
      FileNotFoundError: nothing at ``source``.
      UnsupportedSourceError: a source jckpt cannot read, saying what is there.
      StepExistsError: ``step`` is already committed at ``directory``.
    """
    source = os.path.abspath(os.fspath(source))
    if format is None:
        format = detect_format(source)
    _check_format(format)
    if not os.path.exists(source):
        raise FileNotFoundError(f"import source {source!r} does not exist")
    _source.check_step_free(directory, step)  # before decoding anything (the save checks again)
    extra: dict[str, Any] = {}
    metrics = None
    with Spool(scratch_dir) as spool:
        if format == "safetensors":
            tree = _nest_names(safetensors_lib.read(source), source)
        elif format == "npz":
            if os.path.isdir(source):
                raise UnsupportedSourceError(f"{source!r} is {_listing(source)}, not an .npz file")
            tree = _nest_names(npz_lib.read(source, spool), source)
        else:
            if not os.path.isdir(source):
                raise UnsupportedSourceError(
                    f"{source!r} is {_describe_file(source)}, not an Orbax directory"
                )
            found = orbax_lib.find(source)
            if found is None:
                raise UnsupportedSourceError(f"{source!r} is {_listing(source)}; not an Orbax checkpoint")
            plan = orbax_lib.plan(found)
            with _progress.bar("import orbax", plan.nbytes, progress) as bar:
                tree = orbax_lib.read(plan, spool, bar)
            metrics = found.metrics
            skipped = _grain_items(source, plan.skipped, tree)
            if skipped:
                extra["skipped"] = skipped
                warnings.warn(
                    f"import_from({source!r}): not imported (jckpt stores arrays, scalars and None only): "
                    + ", ".join(skipped),
                    stacklevel=2,
                )
        with _progress.bar(f"import {format}: saving step {step}", None, progress):
            return _source.save_imported(
                directory,
                tree,
                step=step,
                origin=f"{format}:{source}",
                metadata={**(metadata or {}), **extra},
                metrics=metrics,
            )
