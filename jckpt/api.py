"""The public functions: save, restore, info, metadata, verify, delete, all_steps, latest_step.

Orchestration only: validate the arguments, open the root, then call the
layers below (snapshot -> write, read -> place, gc) and, under
``jax.distributed``, coordinate the processes (``jckpt.multihost``).
"""

from __future__ import annotations

import contextlib
import gc as gc_module
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jckpt import format as fmt
from jckpt import gc, lease, multihost, place, saving, tree
from jckpt import read as read_lib
from jckpt import write as write_lib
from jckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StepTaggedError,
    TreeMismatchError,
)
from jckpt.root import Root
from jckpt.snapshots import Snapshot, snapshot
from jckpt.write import SaveOptions


@contextlib.contextmanager
def _gc_paused():
    """Pauses Python's cyclic garbage collector: saving or restoring thousands of leaves allocates
    many small objects, and collections triggered by them cost 30-40% of a 2,000-leaf restore."""
    enabled = gc_module.isenabled()
    gc_module.disable()
    try:
        yield
    finally:
        if enabled:
            gc_module.enable()


def _existing_root(directory: str | os.PathLike) -> Root | None:
    """The root at ``directory`` (version checked), or None when there is none."""
    root = Root(directory)
    if not root.exists():
        return None
    root.check_version()
    return root


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Committed steps at ``directory``, ascending ([] when there is nothing)."""
    root = _existing_root(directory)
    return root.committed_steps() if root else []


def latest_step(directory: str | os.PathLike) -> int | None:
    """The latest committed step, or None when there is none (never raises for a missing root)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def open_step(directory: str | os.PathLike, step: int | str | None) -> tuple[Root, fmt.Manifest]:
    """The root and the manifest of ``step`` (a number or a tag name; default: the latest)."""
    root = Root(directory)
    root.check_version()
    if step is None:
        steps = root.committed_steps()
        if not steps:
            raise CheckpointNotFoundError(f"no committed checkpoint at {root.directory!r}")
        step = steps[-1]
    return root, root.read_manifest(_step_of(root, step))


def _step_of(root: Root, step: int | str) -> int:
    """A step number, or the step a tag names."""
    if not isinstance(step, str):
        return fmt.check_step(step)
    tagged = root.tag(fmt.check_tag(step))
    if tagged is None:
        raise CheckpointNotFoundError(f"no tag {step!r} at {root.directory!r} (tags: {sorted(root.tags())})")
    return tagged


def tag(directory: str | os.PathLike, step: int | str, name: str, *, force: bool = False) -> None:
    """Tags committed ``step`` as ``name`` (e.g. "prod"); retention never deletes a tagged step.

    Args:
      directory: the checkpoint root.
      step: a committed step (or another tag's name).
      name: a letter, then up to 63 letters, digits, ``.``, ``_`` or ``-``.
      force: move the tag if it already names another step.

    Raises:
      CheckpointNotFoundError: ``step`` is not committed.
      ValueError: an invalid name, or the tag names another step and not ``force``.

    Example:
      >>> tag("/tmp/ckpt", 1000, "prod")  # doctest: +SKIP
      >>> state = restore("/tmp/ckpt", step="prod")  # doctest: +SKIP
    """
    root, manifest = open_step(directory, step)
    current = root.tag(fmt.check_tag(name))
    if current is not None and current != manifest.step and not force:
        raise ValueError(f"tag {name!r} already names step {current}; pass force=True to move it")
    root.write_tag(name, manifest.step, time.time())


def untag(directory: str | os.PathLike, name: str) -> None:
    """Removes tag ``name``.

    Raises:
      CheckpointNotFoundError: no such tag.
    """
    root = Root(directory)
    root.check_version()
    _step_of(root, fmt.check_tag(name))
    root.delete_tag(name)


def tags(directory: str | os.PathLike) -> dict[str, int]:
    """Every tag of the root at ``directory``, name -> step ({} when there is none)."""
    root = _existing_root(directory)
    return root.tags() if root else {}


def info(directory: str | os.PathLike, step: int | str | None = None) -> fmt.CheckpointInfo:
    """The CheckpointInfo of ``step`` (default: latest), read from its manifest alone.

    Raises:
      CheckpointNotFoundError: no checkpoint / no such step.
      CorruptCheckpointError: a damaged manifest.
    """
    return open_step(directory, step)[1].info()


def metadata(directory: str | os.PathLike, step: int | str | None = None) -> Any:
    """The saved tree of ``step`` (default: latest) as ``jax.ShapeDtypeStruct`` leaves.

    Read from the manifest alone.  The tree is nested dicts and lists (as
    :func:`restore` without ``like`` builds it); None leaves stay None, Python
    scalars are ``ShapeDtypeStruct((), dtype)``, host-state leaves (data
    iterators, host RNGs) are :class:`jckpt.HostState` records.  It can be
    passed as ``like``.

    Example:
      >>> like = metadata("/tmp/ckpt")  # doctest: +SKIP
      >>> state = restore("/tmp/ckpt", like=like)  # doctest: +SKIP
    """
    manifest = open_step(directory, step)[1]

    def struct(leaf: fmt.LeafRecord) -> Any:
        if leaf.storage == fmt.NONE:
            return None
        if leaf.storage == fmt.HOST:
            return fmt.HostState(leaf.extra["host_type"], leaf.extra["class"], len(leaf.states), leaf.nbytes)
        if "prng_impl" in leaf.extra:
            impl = leaf.extra["prng_impl"]
            data = jax.ShapeDtypeStruct(leaf.shape, np.dtype(leaf.dtype))
            return jax.eval_shape(lambda d: jax.random.wrap_key_data(d, impl=impl), data)
        return jax.ShapeDtypeStruct(leaf.shape, np.dtype(leaf.dtype))

    return tree.nest([(leaf.keys, struct(leaf)) for leaf in manifest.leaves])


def verify(
    directory: str | os.PathLike, step: int | str | None = None, *, progress: bool | None = False
) -> fmt.CheckpointInfo:
    """Re-reads every chunk of ``step`` (default: latest) and checks its hash.

    Args:
      directory: the checkpoint root.
      step: a step or tag name (default: the latest).
      progress: a progress bar on stderr (None: only when stderr is a terminal).

    Returns:
      The step's CheckpointInfo when everything matches.

    Raises:
      CorruptCheckpointError: names the step, leaf path and chunk that fail.
      CheckpointNotFoundError: no checkpoint / no such step.
    """
    root, manifest = open_step(directory, step)
    bar = _bar(f"verify step {manifest.step}", manifest, progress)
    with _deleted_meanwhile(root, manifest.step), bar as shown:
        read_lib.read_to_host(root, manifest, manifest.leaves, shown.advance)
    return manifest.info()


def _bar(what: str, manifest: fmt.Manifest, enabled: bool | None):
    """A progress bar over the bytes of ``manifest`` (see jckpt.progress)."""
    from jckpt import progress

    return progress.bar(what, manifest.bytes_total, enabled)


@contextlib.contextmanager
def _deleted_meanwhile(root: Root, step: int):
    """A read that fails because its step was deleted meanwhile raises CheckpointNotFoundError."""
    try:
        yield
    except CorruptCheckpointError as e:
        if root.read(root.manifest_key(step)) is None:
            raise CheckpointNotFoundError(
                f"step {step} at {root.directory!r} was deleted while it was being read"
            ) from e
        raise


def delete(directory: str | os.PathLike, step: int) -> None:
    """Deletes a committed step; bytes still referenced by other steps survive.

    Under ``jax.distributed`` every process calls it; process 0 deletes, the
    others wait for it (see docs/multihost.md).

    Raises:
      TypeError: ``step`` is not an integer.
      CheckpointNotFoundError: the step is not committed.
      StepTaggedError: the step is tagged (a PermissionError).
      jckpt.multihost.CoordinationTimeoutError: a peer did not take part in time.
    """
    step = fmt.check_step(step)

    def run() -> None:
        root = _existing_root(directory)
        if root is None:
            raise CheckpointNotFoundError(f"no jckpt checkpoints at {os.fspath(directory)!r}")
        names = sorted(name for name, tagged in root.tags().items() if tagged == step)
        if names:
            raise StepTaggedError(f"step {step} at {root.directory!r} is tagged {names}: untag it first")
        gc.delete_step(root, step)

    # Under jax.distributed only process 0 deletes; the others wait for it and share its errors.
    op = multihost.Operation("delete", os.fspath(directory), step)
    op.all_then_primary("delete", lambda: None, lambda _: run(), lambda: None)


def save_snapshot(
    directory: str | os.PathLike | Root,
    snap: Snapshot,
    *,
    step: int,
    metrics: dict | None = None,
    metadata: Any = None,
    kind: str = "full",
    base: int | None = None,
    options: SaveOptions | None = None,
    created: float | None = None,
    lineage: dict | None = None,
    writer: lease.Writer | None = None,
) -> fmt.CheckpointInfo:
    """Writes a snapshot as committed step ``step``.  Safe to call from a background thread.

    See :func:`save` for the arguments.  ``created`` overrides the commit time
    recorded in the manifest (the manager passes its injected clock);
    ``writer`` is a ``jckpt.lease.Writer`` the caller holds (a manager's), else
    the save takes the root's lease for its duration.

    Under ``jax.distributed`` (docs/multihost.md) process 0 validates, cleans
    up and picks the data directory and the base step; every process writes
    its fragment; process 0 checks the fragments, assembles and commits.  In a
    single process the same phases (``jckpt.saving``) run in place.

    Raises:
      LeaseLostError: the writer lost the root's lease before the commit (nothing is committed).
    """
    started = time.perf_counter()
    options = options or SaveOptions()
    if not isinstance(options, SaveOptions):
        raise TypeError(f"options must be a jckpt.SaveOptions, got {type(options).__name__}")
    step = fmt.check_step(step)
    metrics = fmt.json_value(metrics, "metrics")
    metadata = fmt.json_value(metadata, "metadata")
    if metrics is not None and not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    root = directory if isinstance(directory, Root) else Root(directory)
    op = multihost.Operation("save", root.directory, step)
    held = contextlib.nullcontext(None) if not multihost.is_primary() else lease.writing(root, writer)
    with held as own:
        base_manifest: fmt.Manifest | None = None  # read by process 0 in prepare, by the others in write
        epoch = -1

        def prepare() -> list:
            nonlocal base_manifest, epoch
            prepared, base_manifest = saving.prepare(root, own, step, kind, base)
            epoch = prepared.epoch
            return [prepared.data_dir, prepared.base_step]

        def commit(fragments: list[fmt.Fragment]) -> fmt.CheckpointInfo:
            write_lib.check_fragments(step, fragments)
            manifest = write_lib.assemble(
                records,
                fragments,
                step=step,
                base_step=prepared.base_step,
                data_dir=prepared.data_dir,
                options=options,
                metrics=metrics,
                metadata=metadata,
                created=time.time() if created is None else created,
                save_seconds=time.perf_counter() - started,
                lineage={**snap.lineage, "base_step": prepared.base_step, **(lineage or {})},
                base_codecs=base_manifest.codecs if base_manifest is not None else None,
            )
            return saving.commit(root, manifest, own.fence(epoch))

        prepared = saving.Prepared(*op.on_primary("prepare", prepare))
        records = write_lib.plan(snap, options)  # the same on every process (checked at commit)
        return op.all_then_primary(
            "write",
            lambda: saving.write(root, step, prepared, snap, records, options, base_manifest),
            commit,
            lambda: gc.discard(root, prepared.data_dir),
            work_codec=(fmt.Fragment.to_json, fmt.Fragment.from_json),
            result_codec=(fmt.info_to_json, fmt.info_from_json),
        )


def save(
    directory: str | os.PathLike,
    state: Any,
    *,
    step: int,
    metrics: dict | None = None,
    metadata: Any = None,
    kind: str = "full",
    base: int | None = None,
    options: SaveOptions | None = None,
    lineage: dict | None = None,
) -> fmt.CheckpointInfo:
    """Saves a pytree as committed step ``step`` of the checkpoint root ``directory``.

    The step becomes visible only once everything is durable: data first, the
    manifest last (atomically).  A failed save leaves no trace but an
    invisible data directory that the next save removes.

    Args:
      directory: checkpoint root (created if missing; must be empty or a jckpt root).
      state: pytree of jax arrays (sharded or not), numpy arrays, Python scalars, None.
      step: the step number (an integer >= 0); must not be committed already.
      metrics: JSON-serialisable dict stored in the manifest (used by policies).
      metadata: JSON-serialisable user data stored in the manifest.
      kind: "full", or "incremental" to write only chunks (and small leaves) that
        differ from ``base`` (default: the latest committed step).  Without a
        base the save is full, and ``info().kind`` says so.
      base: the step an incremental save compares against.
      options: chunk size, compression, in-flight bound (SaveOptions).
      lineage: JSON entries added to the recorded lineage (e.g. ``{"origin": ...}``).

    Returns:
      The CheckpointInfo of the committed step.

    Raises:
      StepExistsError: ``step`` is already committed (it is left untouched).
      NotACheckpointRootError: ``directory`` is non-empty and not a jckpt root.
      UnsupportedLeafError: a leaf cannot be saved (names its key path).
      TypeError: ``step`` is not an integer; metrics or metadata are not JSON-serialisable.
      OSError: writing failed (e.g. disk full); nothing becomes visible.

    Example:
      >>> info = save("/tmp/ckpt", {"w": np.ones(3)}, step=0)  # doctest: +SKIP
    """
    fmt.check_step(step)
    with _gc_paused():
        return save_snapshot(
            directory,
            snapshot(state, copy=False),
            step=step,
            metrics=metrics,
            metadata=metadata,
            kind=kind,
            base=base,
            options=options,
            lineage=fmt.json_value(lineage, "lineage"),
        )


def restore(
    directory: str | os.PathLike,
    like: Any = None,
    *,
    step: int | str | None = None,
    progress: bool | None = False,
    map_states: Callable[[str, list[Any]], Sequence[Any]] | None = None,
) -> Any:
    """Restores a committed step (default: the latest), verifying every chunk's hash.

    Host-state leaves (saved from objects with ``get_state()``/``set_state()``,
    ``numpy.random.Generator`` and ``random.Random``) were saved once per
    process: each process gets its own.  The live object at that place in
    ``like`` is set (``set_state(state)``, the generator's state) and returned
    in the tree; without one, a generator comes back as a new generator and any
    other object as its saved state (what ``get_state()`` returned; tuples as lists).

    Args:
      directory: the checkpoint root.
      like: optional pytree of arrays / ``jax.ShapeDtypeStruct`` (with or without
        ``.sharding``) / Python scalars / None / host objects giving the
        result's structure, dtypes (cast if they differ) and shardings (each
        device reads only its regions).  It may name a subset of the saved
        leaves by key path.  Without it, the saved tree comes back as nested
        dicts and lists (NamedTuples and dataclasses become dicts of their
        fields, tuples become lists), jax arrays on the default device, numpy
        arrays as numpy, Python scalars as Python scalars.
      step: the step (or tag name) to restore; None for the latest committed one.
      progress: a progress bar on stderr (None: only when stderr is a terminal).
      map_states: needed only to restore host states with another number of
        processes than saved them: ``map_states(path, saved)`` gets a leaf's
        path and its saved states (one per saving process, in process order)
        and returns one state per process of this run (``jax.process_count()``
        of them); each process takes its own (docs/quickstart.md shows one for
        Grain's sharding).  It is called on every process, with the same
        arguments.

    Returns:
      The restored pytree.

    Raises:
      CheckpointNotFoundError: no checkpoint / no such step.
      TreeMismatchError: ``like`` names paths the checkpoint lacks, shapes differ,
        or a host object in ``like`` is not of the kind saved there.
      ValueError: host states saved by another number of processes than this
        run's, without ``map_states`` (names both counts and the leaf), or a
        ``set_state`` that failed (names the leaf).
      CorruptCheckpointError: a chunk fails its hash (names step, leaf and chunk).
      UnsupportedFormatError: written by a newer jckpt format version.

    Example:
      >>> state = restore("/tmp/ckpt", like={"w": jax.ShapeDtypeStruct((3,), np.float32)})  # doctest: +SKIP
    """
    with _gc_paused():
        return _restore(directory, like, step, progress, map_states)


def _state_plan(manifest: fmt.Manifest, leaf: fmt.LeafRecord, target: read_lib.Target, mapped: bool):
    """The plan of a host-state leaf: this process's state, or every saved one when they are mapped."""
    saved, count = len(leaf.states), jax.process_count()
    if saved == count:
        return read_lib.StatePlan(leaf, target, [jax.process_index()], manifest.step)
    if not mapped:
        raise ValueError(
            f"step {manifest.step}, leaf {leaf.path!r}: its host state was saved by {saved} process(es), "
            f"this run has {count}; pass map_states= to jckpt.restore to map the saved per-process "
            "states to this run's processes"
        )
    return read_lib.StatePlan(leaf, target, range(saved), manifest.step)


def _own_state(plan: read_lib.StatePlan, map_states) -> Any:
    """This process's state of a host-state leaf (mapped by ``map_states`` from every saved one)."""
    if len(plan.states) == 1 and len(plan.leaf.states) == jax.process_count():
        return plan.states[0]
    mapped = list(map_states(plan.leaf.path, list(plan.states)))
    if len(mapped) != jax.process_count():
        raise ValueError(
            f"leaf {plan.leaf.path!r}: map_states returned {len(mapped)} states for "
            f"{jax.process_count()} process(es)"
        )
    return mapped[jax.process_index()]


def _restore(directory, like, step, progress, map_states=None) -> Any:
    root, manifest = open_step(directory, step)
    if like is None:
        targets = [(leaf, read_lib.default_target(leaf)) for leaf in manifest.leaves]
        treedef = None
    else:
        stored = {leaf.path: leaf for leaf in manifest.leaves}
        flat, treedef = tree.flatten(like)
        problems = []
        for path, _, like_leaf in flat:
            if path in stored:
                problems += read_lib.like_problems(stored[path], like_leaf)
            elif like_leaf is not None:
                problems.append(f"{path!r}: not in the checkpoint")
        if problems:
            raise TreeMismatchError(
                f"like does not match step {manifest.step} at {root.directory!r}:\n  " + "\n  ".join(problems)
            )
        targets = [
            (stored[path], read_lib.target_of(like_leaf)) if like_leaf is not None else (None, None)
            for path, _, like_leaf in flat
        ]
    wanted = [
        leaf is not None and leaf.storage != fmt.NONE and target.kind != "none" for leaf, target in targets
    ]
    chosen = [(leaf, target) for (leaf, target), w in zip(targets, wanted) if w]
    plans = [read_lib.LeafPlan(leaf, target) for leaf, target in chosen if target.kind != "host"]
    host_plans = [
        _state_plan(manifest, leaf, target, map_states is not None) for leaf, target in chosen
        if target.kind == "host"
    ]
    bar = _bar(f"restore step {manifest.step}", manifest, progress)
    with _deleted_meanwhile(root, manifest.step), bar as shown:
        read_lib.read_plans(root, manifest, [*plans, *host_plans], shown.advance)
    arrays = iter(place.finish(plans))
    objects = iter(place.set_states(host_plans, [_own_state(p, map_states) for p in host_plans]))
    results = [
        (next(objects) if target.kind == "host" else next(arrays)) if w else None
        for (_, target), w in zip(targets, wanted)
    ]
    if treedef is None:
        return tree.nest([(leaf.keys, value) for (leaf, _), value in zip(targets, results)])
    return jax.tree_util.tree_unflatten(treedef, results)
