"""CheckpointManager: the stateful shell around the pure core and the policies.

The manager owns what the pure parts must not: the clock, a background thread,
the set of committed checkpoints, signal handlers. Each ``maybe_save`` asks the
policy (``jckpt.policy``) whether to save and which kind; a save blocks only
for the device-to-host snapshot (``jckpt.snapshot``), then hashes, writes and
commits in the background (``jckpt.save_snapshot``); after the commit the
policy's retention rules decide what to delete (``jckpt.delete``).

Example::

    with jckpt.CheckpointManager("/tmp/run", policy=P.combine(
            P.every_n_steps(100), P.keep_last(3))) as mngr:
        state, step = mngr.restore_or_init(init_state)
        for step in range(0 if step is None else step + 1, num_steps):
            state = train_step(state)
            mngr.maybe_save(step, state, metrics={"loss": loss})
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jckpt import api, lease, multihost
from jckpt import policy as P
from jckpt.errors import CheckpointNotFoundError, CheckpointSaveError, CorruptCheckpointError, StepExistsError
from jckpt.read import host_kind
from jckpt.root import Root
from jckpt.snapshots import snapshot

__all__ = ["CheckpointManager", "CheckpointSaveError"]

logger = logging.getLogger("jckpt")


def _plain(value: Any) -> Any:
    """A metric value as a Python scalar where it is a 0-d array (jax or numpy)."""
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def _needs_copy(state: Any) -> bool:
    """Whether the snapshot must copy host memory the caller could still change.

    numpy arrays are mutable, so they are copied. jax arrays are immutable; the
    only way their memory changes is donation, and on CPU (where the snapshot
    would otherwise alias device memory) a buffer that a host view still
    references is not donated: XLA writes the result elsewhere and the view keeps
    the values of the call (``test_donated_jax_buffers_after_maybe_save``). So a
    state of jax arrays and Python scalars is snapshotted without a copy -- no
    blocking memcpy and no second copy of the state in host RAM. (Off CPU the
    device-to-host transfer is a copy anyway.)
    """
    return any(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(state))


def _like_of(init: Callable[[], Any]) -> Any:
    """What ``init()``'s state restores into: ``jax.eval_shape`` structs for its arrays (init not run)
    and, when it returns host objects (data iterators, generators), those of one real ``init()``
    call, which restore sets (the arrays it computed are dropped before the restore)."""
    traced = []

    def arrays_only():
        flat, treedef = jax.tree_util.tree_flatten(init())
        hosts = [host_kind(leaf) is not None for leaf in flat]
        traced.append((treedef, hosts))
        return [None if host else leaf for leaf, host in zip(flat, hosts)]

    shapes = jax.eval_shape(arrays_only)
    treedef, hosts = traced[0]
    if any(hosts):
        flat, live_treedef = jax.tree_util.tree_flatten(init())
        if live_treedef != treedef:
            raise ValueError("init() returned trees of different structures when called twice")
        shapes = [leaf if host else shape for leaf, shape, host in zip(flat, shapes, hosts)]
    return jax.tree_util.tree_unflatten(treedef, shapes)


class CheckpointManager:
    """Saves a train loop's state by a policy, asynchronously, and resumes it.

    Args:
      directory: the checkpoint root (created on the first save). Checkpoints
        already there are picked up: ``latest_step``, ``restore``, retention and
        the policy state continue where the previous run stopped.
      policy: a ``jckpt.policy.Policy``. Default: ``policy.combine()``, which
        saves at every ``maybe_save`` and keeps everything.
      async_save: write in a background thread (``maybe_save`` blocks only for
        the device-to-host copy). At most one save is in flight; the next one
        waits for it, so host memory holds at most one snapshot.
      clock: the time source (seconds) for policy decisions and recorded save
        times; inject a fake one in tests.
      handle_preemption: install handlers for SIGTERM and SIGINT (or for the
        given signals) that make the next ``maybe_save`` save regardless of the
        policy, after which ``should_stop()`` is True. A second SIGINT
        interrupts as usual. Must be created in the main thread.
      options: ``jckpt.SaveOptions`` for every save.
      lease_ttl: seconds the root's writer lease binds others after its last
        renewal (default ``$JCKPT_LEASE_TTL_SECONDS``, else 120). A manager
        paused for longer loses the lease: its save in flight then fails
        (never reported committed) and another writer may take the root.
      read_only: only restore and list: take no lease, refuse to save. A
        writing manager takes the root's writer lease when it is created (so a
        second trainer is refused before it trains) and holds it until ``close``.

    Raises:
      ValueError: ``handle_preemption`` outside the main thread; a bad ``lease_ttl``.
      jckpt.RootLockedError: another writer (another process, or another manager
        or save in this process) holds the root.
      jckpt.NotACheckpointRootError: ``directory`` is non-empty and not a jckpt root.

    Example::

        mngr = CheckpointManager("/tmp/run", policy=P.every_n_steps(10))
        for step in range(100):
            state = train_step(state)
            mngr.maybe_save(step, state)
        mngr.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        policy: P.Policy | None = None,
        async_save: bool = True,
        clock: Callable[[], float] = time.time,
        *,
        handle_preemption: bool | Sequence[int] = False,
        options: Any = None,
        lease_ttl: float | None = None,
        read_only: bool = False,
    ):
        if policy is not None and not isinstance(policy, P.Policy):
            raise TypeError(f"policy must be a jckpt.policy.Policy, got {type(policy).__name__}")
        self._directory = directory
        self._read_only = bool(read_only)
        ttl = lease.default_ttl() if lease_ttl is None else lease.check_ttl(lease_ttl)
        self._writer: lease.Writer | None = None  # process 0's hold on the root, from now to close()
        self._root = Root(directory)
        if not self._read_only and multihost.is_primary():
            self._root.ensure()
            self._writer = lease.Writer(self._root, ttl).acquire()
        try:
            self._policy = policy if policy is not None else P.combine()
            self._async = bool(async_save)
            self._clock = clock
            self._options = options
            self._lock = threading.Lock()
            self._history = [api.info(directory, s) for s in api.all_steps(directory)]
            self._state = P.resume(self._policy, self._history)
            self._shared_cpu = jax.default_backend() == "cpu"
            self._pinned: Counter[int] = Counter()
            self._pending: tuple[int, concurrent.futures.Future] | None = None
            self._error: tuple[int, BaseException, str] | None = None
            self._executor = (
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jckpt-save")
                if self._async
                else None
            )
            self._preempted = False
            self._stop = False
            self._closed = False
            self._handlers: dict[int, Any] = {}
            self._handler: Callable | None = None
            if handle_preemption:
                default = (signal.SIGTERM, signal.SIGINT)
                self._install_handlers(default if handle_preemption is True else tuple(handle_preemption))
        except BaseException:
            if self._writer is not None:
                self._writer.release()
            raise

    # ------------------------------------------------------------------ saving

    def maybe_save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Saves ``state`` as ``step`` if the policy says so (or a preemption was signalled).

        Blocks only to copy the state to host memory (and, with a save still in
        flight, to wait for it); the caller may mutate or donate its buffers as
        soon as this returns. A step that is already saved is not saved again.

        Args:
          step: the training step.
          state: the pytree to save.
          metrics: this step's metrics (JSON scalars or 0-d arrays), stored with
            the checkpoint and seen by the policy.
          metadata: JSON-serialisable user data stored with the checkpoint.

        Returns:
          True when a save started.

        Raises:
          CheckpointSaveError: an earlier background save failed.
          jckpt.UnsupportedLeafError: a leaf cannot be saved (nothing is saved).

        Example::

            if mngr.maybe_save(step, state, metrics={"loss": float(loss)}):
                print("saving", step)
        """
        self._check_open()
        self._surface_finished()
        step = int(step)
        preempted = self._preempted
        if self._is_taken(step):
            self._stop = self._stop or preempted
            self._preempted = False
            return False
        event = P.Event(step, float(self._clock()), metrics, preempted)
        decision = P.decide(self._policy, self._state, event)
        # Under jax.distributed, process 0 decides for everyone (clocks and signals differ per host).
        save_now, kind, preempted = multihost.agree(
            "manager/maybe_save", [bool(decision.save or preempted), decision.kind, preempted]
        )
        if not save_now:
            return False
        self._save(event._replace(preempted=preempted), state, kind, metadata)
        if preempted:
            self._preempted = False
            self._stop = True
        return True

    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Saves ``state`` as ``step`` now, whatever the policy says (the kind is the policy's).

        Args:
          step: the step number.
          state: the pytree to save.
          metrics: metrics to store with it.
          metadata: JSON-serialisable user data to store with it.

        Raises:
          jckpt.StepExistsError: the step is saved or being saved.
          CheckpointSaveError: an earlier background save failed.

        Example::

            mngr.save(final_step, state)
            mngr.wait()
        """
        self._check_open()
        self._surface_finished()
        step = int(step)
        if self._is_taken(step):
            raise StepExistsError(f"step {step} is already saved in {self._directory!r}")
        preempted = self._preempted
        event = P.Event(step, float(self._clock()), metrics, preempted)
        self._save(event, state, P.decide(self._policy, self._state, event).kind, metadata)
        if preempted:
            self._preempted = False
            self._stop = True

    def _save(self, event: P.Event, state: Any, kind: str, metadata: Mapping[str, Any] | None) -> None:
        if metadata and P.META_KEY in metadata:
            raise ValueError(f"metadata key {P.META_KEY!r} is reserved for the manager")
        if self._read_only:
            raise PermissionError(f"this CheckpointManager of {self._directory!r} is read-only")
        started = self._clock()
        self._collect(raise_error=True)  # back-pressure: one save in flight
        snap = snapshot(state, copy=_needs_copy(state))
        blocking = max(0.0, float(self._clock()) - float(started))
        if kind == "incremental" and not self._history:
            kind = "full"  # nothing to be incremental against; the store would write full
        metrics = {k: _plain(v) for k, v in event.metrics.items()} if event.metrics else None
        meta = dict(metadata or {})
        state_before = self._state
        meta.update(
            P.save_metadata(
                state_before,
                event,
                blocking_seconds=blocking,
                async_save=self._async,
                shared_cpu=self._shared_cpu,
            )
        )
        args = (event.step, snap, metrics, meta, kind, event.now)
        if self._executor is None:
            info = self._write(*args)
            self._state = self._policy.update(self._state, info)
            self._retain()
            return
        record = P.Saved(event.step, kind, metrics, meta, event.now, 0.0)
        self._state = self._policy.update(state_before, record)  # until the commit
        future = self._executor.submit(self._write_and_retain, state_before, *args)
        self._pending = (event.step, future)

    def _write(self, step, snap, metrics, meta, kind, now) -> Any:
        info = api.save_snapshot(
            self._root,
            snap,
            step=step,
            metrics=metrics,
            metadata=meta,
            kind=kind,
            options=self._options,
            created=now,
            writer=self._writer,
        )
        with self._lock:
            self._history.append(info)
            self._history.sort(key=lambda i: i.step)
        return info

    def _write_and_retain(self, state_before: Any, *args) -> Any:
        info = self._write(*args)  # an exception here fails the save
        with self._lock:
            # Replace the provisional record by the committed one (its kind and
            # duration are known now): the state a restarted run would rebuild.
            self._state = self._policy.update(state_before, info)
        try:
            self._retain()
        except Exception as e:  # the save is committed; report the deletion problem
            with self._lock:
                self._error = (info.step, e, "deleting old checkpoints after the save of")
        return info

    def _retain(self) -> None:
        """Deletes what the policy does not keep; never a pinned step or the last one."""
        with self._lock:
            if not self._history:
                return
            keep = set(P.retain(self._policy, self._state, self._history))
            keep |= set(self._pinned) | set(api.tags(self._directory).values())  # tagged: never deleted
            if not keep & {i.step for i in self._history}:
                keep.add(self._history[-1].step)  # never delete the only restorable one
            doomed = [i.step for i in self._history if i.step not in keep]
        doomed = multihost.agree("manager/retain", doomed)  # process 0's choice, outside the lock
        with self._lock:
            self._history = [i for i in self._history if i.step not in doomed]
        for step in doomed:
            api.delete(self._directory, step)

    # -------------------------------------------------------- waiting, errors

    def _is_taken(self, step: int) -> bool:
        with self._lock:
            committed = any(i.step == step for i in self._history)
        return committed or (self._pending is not None and self._pending[0] == step)

    def _surface_finished(self) -> None:
        """Raises the error of a finished background save, without waiting for one."""
        finished = self._pending is not None and self._pending[1].done()
        self._collect(raise_error=True, wait=finished)

    def _collect(self, raise_error: bool, wait: bool = True) -> None:
        """Waits for the save in flight (if ``wait``); raises (or keeps) the first error."""
        if wait and self._pending is not None:
            step, future = self._pending
            try:
                future.result()
            except Exception as e:
                with self._lock:
                    self._error = (step, e, "background save of")
                    # The failed save never happened: rewind the policy to the disk.
                    self._state = P.resume(self._policy, self._history)
            finally:
                self._pending = None
        if raise_error and self._error is not None:
            with self._lock:
                step, cause, what = self._error
                self._error = None
            raise CheckpointSaveError(
                f"{what} step {step} in {self._directory!r} failed: {type(cause).__name__}: {cause}",
                step,
            ) from cause

    def wait(self) -> None:
        """Blocks until the save in flight is committed (and its retention done).

        Raises:
          CheckpointSaveError: it (or an earlier one) failed.

        Example::

            mngr.save(step, state); mngr.wait(); assert mngr.latest_step() == step
        """
        self._collect(raise_error=True)

    def close(self) -> None:
        """Waits for the save in flight, stops the thread, removes signal handlers.

        Idempotent. Raises the error of a failed background save after cleaning up.

        Raises:
          CheckpointSaveError: the save in flight (or an earlier one) failed.

        Example::

            mngr.close()
        """
        if self._closed:
            return
        try:
            self._collect(raise_error=True)
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._uninstall_handlers()
            if self._writer is not None:
                self._writer.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"CheckpointManager for {self._directory!r} is closed")

    # -------------------------------------------------------------- restoring

    def restore(self, like: Any = None, step: int | None = None) -> Any:
        """Restores a committed step (default: the latest).

        Waits for a save in flight first (its error, if any, is raised by the
        next save/wait/close). The step is protected from retention while it is
        read. The policy state is not changed: it is the one of the newest
        checkpoint (a fresh manager starts from it), also after restoring an
        older step.

        Args:
          like: see ``jckpt.restore`` (structure, dtypes, shardings, subset).
          step: the step; None for the latest.

        Returns:
          The restored pytree.

        Raises:
          jckpt.CheckpointNotFoundError: nothing (or not that step) is saved.

        Example::

            state = mngr.restore(like=jax.eval_shape(init_state))
        """
        self._collect(raise_error=False)
        with self._lock:
            if step is None:
                if not self._history:
                    raise CheckpointNotFoundError(f"no committed checkpoint in {self._directory!r}")
                step = self._history[-1].step
            step = int(step)
            self._pinned[step] += 1
        try:
            restored = api.restore(self._directory, like, step=step)
        finally:
            with self._lock:
                self._pinned[step] -= 1
                if self._pinned[step] <= 0:
                    del self._pinned[step]
        return restored

    def restore_or_init(self, init: Callable[[], Any], like: Any = None) -> tuple[Any, int | None]:
        """Restores the newest intact checkpoint, or calls ``init()`` when there is none.

        A step that fails to restore because it is damaged (a chunk failing its
        hash, a missing file, a damaged manifest) is skipped with a warning
        (Python ``warnings`` and the ``jckpt`` logger) naming the step and the
        file, and the next older one is tried. Under ``jax.distributed`` the
        processes agree: a step damaged for any of them is skipped by all.

        Args:
          init: builds a fresh state; also gives the structure to restore into
            (``jax.eval_shape(init)``, so it is not run when restoring). When its
            state holds host objects (a data iterator, a ``numpy.random.Generator``,
            ``random.Random``), ``init()`` is called once to create them and the
            restored states are set into those objects (its arrays are dropped).
          like: the structure to restore into instead of ``jax.eval_shape(init)``
            (needed when ``init`` cannot be traced).

        Returns:
          ``(state, step)``: ``step`` is the restored step, or None after ``init()``.

        Raises:
          jckpt.CorruptCheckpointError: every committed step is damaged (each is named).

        Example::

            state, step = mngr.restore_or_init(lambda: create_state(rng))
            start = 0 if step is None else step + 1
        """
        self._collect(raise_error=False)
        skipped = []
        for step in reversed(self.all_steps()):
            if like is None:
                like = _like_of(init)
            restored, problems = self._restore_intact(like, step)
            if not problems:
                return restored, step
            message = f"resuming: skipped damaged step {step} of {self._directory!r}: " + "; ".join(problems)
            logger.warning("jckpt: %s", message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            skipped.append(message)
        if skipped:
            raise CorruptCheckpointError("no committed step restores intact:\n  " + "\n  ".join(skipped))
        return init(), None

    def _restore_intact(self, like: Any, step: int) -> tuple[Any, list[str]]:
        """Restores ``step``; a damaged step gives the problems of every process instead (agreed by all)."""
        result: list[Any] = [None]

        def attempt() -> str:
            try:
                result[0] = self.restore(like=like, step=step)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                return f"process {multihost.process_index()}: {e}" if multihost.is_multihost() else str(e)
            return ""

        op = multihost.Operation("resume", os.fspath(self._directory), step)
        problems = op.all_then_primary(
            "restore", attempt, lambda found: [p for p in found if p], lambda: None
        )
        return result[0], problems

    # ------------------------------------------------------------- inspection

    def latest_step(self) -> int | None:
        """The newest committed step, or None (a save in flight is not counted)."""
        with self._lock:
            return self._history[-1].step if self._history else None

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (a save in flight is not counted)."""
        with self._lock:
            return [i.step for i in self._history]

    def best_step(self) -> int | None:
        """The best committed step by the policy's metric (``keep_best``/``best_only``), or None."""
        with self._lock:
            return self._policy.best(self._state, list(self._history))

    @property
    def policy_state(self) -> Any:
        """The policy's current state (after the committed saves: what ``policy.resume`` rebuilds)."""
        return self._state

    @property
    def directory(self) -> str | os.PathLike:
        """The checkpoint root."""
        return self._directory

    # ------------------------------------------------------------- preemption

    def notify_preemption(self) -> None:
        """Makes the next ``maybe_save`` save regardless of the policy, then stop.

        The signal handlers call this; call it yourself for other preemption
        notices (e.g. a cloud metadata server).

        Example::

            mngr.notify_preemption(); mngr.maybe_save(step, state); assert mngr.should_stop()
        """
        self._preempted = True

    def should_stop(self) -> bool:
        """True once a preemption was signalled and the state has been saved for it."""
        return self._stop

    def _install_handlers(self, sigs: Sequence[int]) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("handle_preemption needs the manager to be created in the main thread")

        def handler(signum, frame):
            previous = self._handlers.get(signum)
            if signum == signal.SIGINT and (self._preempted or self._stop) and callable(previous):
                previous(signum, frame)  # Ctrl-C again after the first: interrupt as usual
                return
            self.notify_preemption()

        for sig in sigs:
            self._handlers[sig] = signal.signal(sig, handler)
        self._handler = handler

    def _uninstall_handlers(self) -> None:
        for sig, previous in self._handlers.items():
            if signal.getsignal(sig) is self._handler:
                signal.signal(sig, previous)
        self._handlers = {}
