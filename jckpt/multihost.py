"""Multi-host coordination over the ``jax.distributed`` coordination service.

Every helper here talks to the coordination service's key-value store and
barriers (``jax._src.distributed.global_state.client``), never to devices: no
collective runs on an accelerator or in a background thread, so the helpers are
safe in the manager's save thread and cannot deadlock with the train step.

Each wait is bounded.  A peer that does not show up in time makes the waiting
process raise :class:`CoordinationTimeoutError` (a ``TimeoutError``) naming the
step, the operation and the missing processes; it never hangs.  The bound is,
in order of precedence, :func:`set_timeout`, the environment variable
``JCKPT_MULTIHOST_TIMEOUT`` (seconds), or :data:`DEFAULT_TIMEOUT_S` (5 minutes).

Without ``jax.distributed.initialize()`` (or with a single process) every
helper is a local no-op: ``broadcast`` returns its value, ``gather`` a
one-element list, and :class:`Operation` runs everything in place.
"""

from __future__ import annotations

import builtins
import itertools
import json
import os
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from jckpt import errors as errors_lib
from jckpt import storage

ENV_TIMEOUT = "JCKPT_MULTIHOST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
_PREFIX = "jckpt"
_PART_BYTES = 1 << 20  # values are split into parts of at most this many bytes

_timeout_override: float | None = None
_counters: dict[tuple, itertools.count] = {}
_counters_lock = threading.Lock()


class CoordinationTimeoutError(TimeoutError):
    """A peer process did not reach a coordination point within the timeout.

    Attributes:
      step: the step of the operation (None outside a save or delete).
      barrier: the name of the coordination point (barrier or key).
      missing: the process indices that did not show up, where known.
    """

    def __init__(self, message: str, *, step: int | None, barrier: str, missing: tuple[int, ...] = ()):
        super().__init__(message)
        self.step, self.barrier, self.missing = step, barrier, missing


class PeerError(RuntimeError):
    """An operation failed on another process with an error of a non-standard type.

    Errors of jckpt's and Python's built-in types are re-raised with their own
    type on every process instead (e.g. ``StepExistsError`` from process 0).

    Attributes:
      step: the step of the operation.
      process: the index of the process where it failed.
      error_type: the name of the original exception's class.
    """

    def __init__(self, message: str, *, step: int | None, process: int, error_type: str):
        super().__init__(message)
        self.step, self.process, self.error_type = step, process, error_type


# ------------------------------------------------------------------ the group


def client() -> Any | None:
    """The coordination service client of ``jax.distributed``, or None when not initialized."""
    from jax._src.distributed import global_state

    return global_state.client


def process_count() -> int:
    """The number of processes of ``jax.distributed`` (1 when not initialized)."""
    from jax._src.distributed import global_state

    return global_state.num_processes if global_state.client is not None else 1


def process_index() -> int:
    """This process's index (0 when not initialized)."""
    from jax._src.distributed import global_state

    return global_state.process_id if global_state.client is not None else 0


def is_multihost() -> bool:
    """True when ``jax.distributed`` runs more than one process."""
    return process_count() > 1


def is_primary() -> bool:
    """True on process 0, the one that validates, commits and deletes (also without multi-host)."""
    return process_index() == 0


def set_timeout(seconds: float | None) -> None:
    """Sets the bound on each wait for peers; None restores the environment / default."""
    global _timeout_override
    if seconds is not None and not seconds > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {seconds}")
    _timeout_override = None if seconds is None else float(seconds)


def timeout() -> float:
    """The bound, in seconds, on each wait for peers (see the module docstring)."""
    if _timeout_override is not None:
        return _timeout_override
    raw = os.environ.get(ENV_TIMEOUT)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds") from None
        if value > 0:
            return value
    return DEFAULT_TIMEOUT_S


# ---------------------------------------------------------------- primitives


def _is_deadline(error: Exception) -> bool:
    return "DEADLINE_EXCEEDED" in str(error)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _where(step: int | None) -> str:
    return "" if step is None else f" (step {step})"


def _put(key: str, value: Any) -> None:
    """Stores a JSON value under ``key`` (split into parts; the part count is written last)."""
    raw = zlib.compress(json.dumps(value, separators=(",", ":")).encode(), 1)
    parts = [raw[i : i + _PART_BYTES] for i in range(0, len(raw), _PART_BYTES)] or [b""]
    c = client()
    for i, part in enumerate(parts):
        c.key_value_set_bytes(f"{key}/part{i}", part)
    c.key_value_set(key, str(len(parts)))


def _get(key: str, seconds: float, *, step: int | None, what: str, missing: tuple[int, ...]) -> Any:
    """Waits up to ``seconds`` for the JSON value under ``key``."""
    c = client()
    try:
        count = int(c.blocking_key_value_get(key, _ms(seconds)))
    except Exception as e:
        if _is_deadline(e):
            who = ", ".join(map(str, missing))
            raise CoordinationTimeoutError(
                f"{what}: process(es) {who} did not reach {key!r} within {seconds:g} s "
                "(it died, is stuck, or never made this call: every process must; "
                f"bound: {ENV_TIMEOUT} / jckpt.multihost.set_timeout)",
                step=step,
                barrier=key,
                missing=missing,
            ) from e
        raise
    raw = b"".join(c.key_value_try_get_bytes(f"{key}/part{i}") for i in range(count))
    return json.loads(zlib.decompress(raw))


def _delete(key: str) -> None:
    """Deletes ``key`` and everything under ``key/`` (best effort)."""
    try:
        client().key_value_delete(key)
    except Exception:  # cleanup only; the service forgets everything at shutdown
        pass


def barrier(name: str, *, step: int | None = None, timeout_s: float | None = None) -> None:
    """Waits until every process reaches the barrier ``name`` (unique per use).

    Raises:
      CoordinationTimeoutError: some process did not arrive within the timeout.
    """
    if not is_multihost():
        return
    seconds = timeout() if timeout_s is None else timeout_s
    key = f"{_PREFIX}/{name}"
    try:
        client().wait_at_barrier(key, _ms(seconds))
    except Exception as e:
        if _is_deadline(e) or "Barrier failed" in str(e):
            raise CoordinationTimeoutError(
                f"barrier {key!r}{_where(step)}: not every process arrived within {seconds:g} s "
                f"({str(e).splitlines()[0][:300]})",
                step=step,
                barrier=key,
            ) from e
        raise


def broadcast(
    name: str,
    value: Any = None,
    *,
    step: int | None = None,
    timeout_s: float | None = None,
    what: str | None = None,
) -> Any:
    """Process 0's JSON ``value``, on every process (others' ``value`` is ignored).

    The key is deleted by :func:`Operation`'s cleanup only; give each use a unique ``name``.
    """
    if not is_multihost():
        return value
    key = f"{_PREFIX}/{name}"
    if is_primary():
        _put(key, value)
        return value
    seconds = timeout() if timeout_s is None else timeout_s
    what = what or f"broadcast {name!r}{_where(step)}"
    return _get(key, seconds, step=step, what=what, missing=(0,))


def gather(
    name: str,
    value: Any,
    *,
    step: int | None = None,
    timeout_s: float | None = None,
    what: str | None = None,
) -> list | None:
    """Every process's JSON ``value``, as a list by process index on process 0; None elsewhere."""
    if not is_multihost():
        return [value]
    key = f"{_PREFIX}/{name}"
    me = process_index()
    if not is_primary():
        _put(f"{key}/{me}", value)
        return None
    deadline = time.monotonic() + (timeout() if timeout_s is None else timeout_s)
    values = [value]
    for i in range(1, process_count()):
        left = max(0.001, deadline - time.monotonic())
        what = what or f"gather {name!r}{_where(step)}"
        values.append(_get(f"{key}/{i}", left, step=step, what=what, missing=(i,)))
    return values


def agree(topic: str, value: Any, *, timeout_s: float | None = None) -> Any:
    """Process 0's JSON ``value`` on every process: a decision made once for the whole group.

    For choices that must not differ between hosts (save now? which kind? which
    steps to delete?), which clock skew or local signals could otherwise split.
    Every process must call it equally often per ``topic``; the last reader
    deletes the key, so a call per train step does not grow the service's store.

    Example::

        save_now = multihost.agree("save-decision", policy_says_save)
    """
    if not is_multihost():
        return value
    with _counters_lock:
        n = next(_counters.setdefault(("agree", topic), itertools.count()))
    name = f"agree/{_slug(topic)}/{n}"
    if is_primary():
        return broadcast(name, value)
    got = broadcast(name, timeout_s=timeout_s, what=f"agreeing on {topic!r} (call {n})")
    key = f"{_PREFIX}/{name}"
    if client().key_value_increment(f"{key}/readers", 1) == process_count() - 1:
        _delete(key)  # everyone has read it
    return got


# ------------------------------------------------------------- errors on the wire


def _error_record(error: BaseException) -> dict[str, Any]:
    return {
        "process": process_index(),
        "type": type(error).__name__,
        "module": type(error).__module__,
        "message": str(error),
        "step": getattr(error, "step", None),
        "barrier": getattr(error, "barrier", None),
        "missing": list(getattr(error, "missing", ()) or ()),
    }


def _rebuild(record: dict[str, Any], *, op: str, step: int | None) -> BaseException:
    """An exception for a peer's error: the same type where it is a standard or jckpt one."""
    where = f"process {record['process']}"
    message = f"{op} failed on {where}: {record['message']}"
    if record["type"] == "CoordinationTimeoutError":
        return CoordinationTimeoutError(
            message, step=step, barrier=record["barrier"] or "", missing=tuple(record["missing"])
        )
    kind = None
    if record["module"] == errors_lib.__name__:
        kind = getattr(errors_lib, record["type"], None)
    elif record["module"] == "builtins":
        kind = getattr(builtins, record["type"], None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # an exception type that needs other arguments
            pass
    return PeerError(
        f"{message} ({record['type']})", step=step, process=record["process"], error_type=record["type"]
    )


# ---------------------------------------------------------------- operations


def _root_id(directory: str) -> str:
    """The checkpoint root as an absolute location, so "ckpt" and "./ckpt/" name the same operations."""
    try:
        spec = storage.kvstore_spec(directory)
    except ValueError:
        return directory
    return storage.url(spec)


def _slug(text: str) -> str:
    return format(zlib.crc32(text.encode()), "08x")


def _same(value: Any) -> Any:
    return value


class Operation:
    """One coordinated operation (the save or delete of a step) in its own key namespace.

    Every process creates the same operations in the same order for a given
    (``op``, ``directory``, ``step``); a per-process counter makes the names of
    repeated operations (a retried save, a step saved again after a delete)
    unique.  Without multi-host every method runs its function in place.

    Args:
      op: what is done ("save", "delete").
      directory: the checkpoint root (every process must name the same location).
      step: the step (named in every error).
      timeout_s: bound on each wait for peers (default: :func:`timeout`).
    """

    def __init__(self, op: str, directory: str, step: int, timeout_s: float | None = None):
        self.op, self.step = op, step
        self.multi = is_multihost()
        self.primary = is_primary()
        self.timeout_s = timeout() if timeout_s is None else timeout_s
        family = (op, _root_id(directory), step)
        with _counters_lock:
            n = next(_counters.setdefault(family, itertools.count()))
        self.name = f"{op}/{_slug(family[1])}/{step}/{n}"
        self.what = f"{op} of step {step} in {directory!r}"

    def _fail(self, record: dict[str, Any]) -> BaseException:
        return _rebuild(record, op=self.what, step=self.step)

    def on_primary(self, phase: str, fn: Callable[[], Any]) -> Any:
        """Process 0 runs ``fn`` and every process gets its JSON result.

        An exception on process 0 is raised there as is and on the others
        rebuilt with the same type (see :class:`PeerError`).
        """
        if not self.multi:
            return fn()
        key = f"{self.name}/{phase}"
        if self.primary:
            try:
                value = fn()
            except BaseException as e:
                broadcast(key, {"error": _error_record(e)})
                raise
            broadcast(key, {"ok": value})
            return value
        reply = broadcast(key, step=self.step, timeout_s=self.timeout_s, what=self.what)
        if "error" in reply:
            raise self._fail(reply["error"])
        return reply["ok"]

    def all_then_primary(
        self,
        phase: str,
        work: Callable[[], Any],
        finish: Callable[[list[Any]], Any],
        abort: Callable[[], None],
        *,
        work_codec: tuple[Callable[[Any], Any], Callable[[Any], Any]] = (_same, _same),
        result_codec: tuple[Callable[[Any], Any], Callable[[Any], Any]] = (_same, _same),
    ) -> Any:
        """Every process runs ``work``; process 0 runs ``finish`` on all results and shares its result.

        ``work_codec`` and ``result_codec`` are (to JSON, from JSON) pairs for
        the results of ``work`` and ``finish``: this boundary is where records
        become JSON, and only under multi-host.

        If ``work`` fails anywhere or a peer times out, process 0 calls ``abort``
        instead of ``finish`` and every process raises: the failing process its
        own error, the others the first failure (rebuilt with the same type).
        On success a final barrier makes sure every process has seen the
        outcome before any returns, then the operation's keys are deleted.

        Returns:
          ``finish``'s result, on every process.
        """
        (work_to_json, work_from_json), (result_to_json, result_from_json) = work_codec, result_codec
        if not self.multi:
            try:
                return finish([work()])
            except BaseException:
                abort()
                raise
        own_error: BaseException | None = None
        try:
            record: dict[str, Any] = {"ok": work_to_json(work())}
        except BaseException as e:
            own_error = e
            record = {"error": _error_record(e)}
        key = f"{self.name}/{phase}"
        verdict_key = f"{key}/verdict"
        if not self.primary:
            gather(key, record, step=self.step, what=self.what)
            grace = max(1.0, 0.25 * self.timeout_s)  # process 0 may itself wait timeout_s for a peer
            verdict = broadcast(verdict_key, step=self.step, timeout_s=self.timeout_s + grace, what=self.what)
            if "error" in verdict:
                if own_error is not None:
                    raise own_error
                raise self._fail(verdict["error"])
            self._done()
            return result_from_json(verdict["ok"])
        failed: dict[str, Any] | None = None  # the first failure, as sent to the others
        try:
            if own_error is not None:
                raise own_error
            records = gather(key, record, step=self.step, timeout_s=self.timeout_s, what=self.what)
            failed = next((r["error"] for r in records if "error" in r), None)
            if failed is not None:
                raise self._fail(failed)
            result = finish([work_from_json(r["ok"]) for r in records])
        except BaseException as e:
            try:
                abort()
            finally:
                broadcast(verdict_key, {"error": failed or _error_record(e)})
            raise
        broadcast(verdict_key, {"ok": result_to_json(result)})
        self._done()
        return result

    def _done(self) -> None:
        try:
            barrier(f"{self.name}/done", step=self.step, timeout_s=self.timeout_s)
        except CoordinationTimeoutError as e:
            raise CoordinationTimeoutError(
                f"{self.what} completed on process 0, but not every process confirmed it: {e}",
                step=self.step,
                barrier=e.barrier,
            ) from e
        if self.primary:
            _delete(f"{_PREFIX}/{self.name}")
