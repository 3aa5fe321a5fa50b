"""The writer lease: one writer per root at a time, and what collectors must leave alone.

A save holds ``leases/writer.json`` while it runs (a ``CheckpointManager`` from
its first save until ``close``): who holds it (host, pid, a per-process
token), since when, until when, the data directory of the save in flight and
the data directories it reuses (an incremental save's base).  A background
thread renews it every ``ttl / 4`` seconds.

* A second writer finds a live lease and is refused with
  :class:`RootLockedError` naming the holder.  A lease expires ``ttl`` seconds
  after its last renewal; a lease whose holder is a dead process on this host
  is taken over at once (a trainer killed with ``kill -9`` resumes without
  waiting).
* ``delete``, ``jckpt gc`` and ``jckpt rm`` from other processes read the lease
  and never delete the in-flight data directory or a pinned one.

Acquisition is a conditional write (tensorstore ``if_equal`` generations), so
two writers racing for a free root cannot both win, on local disks and on
object stores alike.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import threading
import time
from typing import Any, NamedTuple

from jckpt import format as fmt
from jckpt import storage
from jckpt.errors import CorruptCheckpointError, RootLockedError, UnsupportedFormatError
from jckpt.root import Root

KEY = "leases/writer.json"
LOCK_FILE = "writer.lock"  # beside KEY on local roots: flocked while the lease is read and replaced
DEFAULT_TTL_SECONDS = 120.0
_TOKEN = secrets.token_hex(8)  # this process's identity (pids are reused)


class Lease(NamedTuple):
    """The content of a writer lease."""

    host: str
    pid: int
    token: str
    since: float
    expires: float
    data_dir: str  # the save in flight ("" between saves)
    pins: tuple[str, ...]  # data directories it reuses

    def mine(self) -> bool:
        return self.token == _TOKEN

    def live(self, now: float | None = None) -> bool:
        """Whether the lease still binds others (unexpired, and its holder not known dead)."""
        if (now or time.time()) >= self.expires:
            return False
        if self.host == socket.gethostname() and not self.mine():
            return _alive(self.pid)
        return True

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        until = time.strftime("%H:%M:%S", time.localtime(self.expires))
        return f"host {self.host}, pid {self.pid}, since {since} (expires {until} unless renewed)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_raw(root: Root) -> tuple[bytes | None, Any]:
    """The lease's bytes (None if absent) and what a conditional write compares against.

    Local roots: the bytes themselves (compared under an flock, see
    :func:`_conditional_write`).  Object stores: the storage generation.
    """
    path = storage.local_path(root.spec)
    if path is not None:
        try:
            with open(os.path.join(path, KEY), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = None
        return raw, raw
    with storage.named_errors(root.where(KEY)):
        result = root.kv.read(KEY).result()
    return (result.value if result.state == "value" else None), result.stamp.generation


def read(root: Root) -> tuple[Lease | None, Any]:
    """The current lease (or None) and what a conditional write of it compares against.

    A damaged lease counts as none: it binds nobody (its writer, if alive,
    finds it replaced at its next renewal and stops).
    """
    raw, generation = _read_raw(root)
    if raw is None:
        return None, generation
    try:
        doc = fmt.decode_document(raw, root.where(KEY))
        lease = Lease(
            str(doc["host"]), int(doc["pid"]), str(doc["token"]), float(doc["since"]), float(doc["expires"]),
            str(doc["data_dir"]), tuple(str(p) for p in doc["pins"]),
        )
    except (CorruptCheckpointError, UnsupportedFormatError, KeyError, TypeError, ValueError):
        return None, generation
    return lease, generation


def _encode(lease: Lease) -> bytes:
    return fmt.encode_document({"format": fmt.FORMAT, "version": fmt.VERSION, **lease._asdict()})


def _conditional_write(root: Root, value: bytes | None, generation: Any) -> tuple[bool, Any]:
    """Writes (or deletes) the lease if it is unchanged since ``generation``.

    Local roots: under an exclusive ``flock`` of ``leases/writer.lock`` (a file
    never replaced), compare the bytes, then write a uniquely named temporary
    file, fsync it and rename it into place.  Object stores: tensorstore's
    conditional write on the object's generation; a store whose generations
    cannot be used for conditions (the GCS emulator answers generation 0)
    gets a plain write.

    Returns:
      (written, the new generation), the generation None where the caller must
      read the lease back to see who won (the unconditional fallback).
    """
    path = storage.local_path(root.spec)
    if path is not None:
        return _local_conditional_write(os.path.join(path, KEY), value, generation), value
    with storage.named_errors(root.where(KEY)):
        try:
            new = root.kv.write(KEY, value, if_equal=generation).result().generation
            return (bool(new) or value is None), new
        except ValueError as e:
            if "Malformed StorageGeneration" not in str(e):
                raise
            root.kv.write(KEY, value).result()
            return True, None


def _new_lease(since: float, expires: float, data_dir: str, pins: tuple[str, ...]) -> Lease:
    """A lease held by this process."""
    return Lease(socket.gethostname(), os.getpid(), _TOKEN, since, expires, data_dir, tuple(pins))


def _local_conditional_write(target: str, value: bytes | None, expected: bytes | None) -> bool:
    directory = os.path.dirname(target)
    try:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, LOCK_FILE), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            for name in os.listdir(directory):  # temporaries are only made under the flock: stale
                if name.endswith(".tmp"):
                    os.unlink(os.path.join(directory, name))
            try:
                with open(target, "rb") as f:
                    current = f.read()
            except FileNotFoundError:
                current = None
            if current != expected:
                return False
            if value is None:
                os.unlink(target)
                return True
            temporary = f"{target}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            with open(temporary, "wb") as f:
                f.write(value)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
            descriptor = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            return True
    except FileNotFoundError:  # deleted meanwhile (unlink of an absent lease)
        return value is None


class Holder:
    """This process's hold on a root's lease, renewed by a daemon thread until :meth:`release`."""

    def __init__(self, root: Root, ttl: float = DEFAULT_TTL_SECONDS):
        self.root, self.ttl = root, ttl
        self.lease: Lease | None = None
        self.abandoned = ""  # the data directory of a save whose writer died (taken over from its lease)
        self._generation: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, *, data_dir: str = "", pins: tuple[str, ...] = ()) -> None:
        """Takes the lease, or renews it if this process holds it, recording the save in flight.

        Args:
          data_dir: the data directory of the save about to write ("" between saves).
          pins: the data directories that save reuses (its base's).

        Raises:
          RootLockedError: another live writer holds it (names host, pid, since).
        """
        with self._lock:
            # Held: first the guess that the lease is as this process last wrote it (one request
            # less); else read it and decide.  Not held: always read first, as some stores (the
            # GCS emulator) ignore the condition "create only if absent".
            held = self.lease
            if held is None or not self._write(
                _new_lease(held.since, time.time() + self.ttl, data_dir, pins),
                self._generation,
                or_read_first=True,
            ):
                self._take(data_dir, pins)
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_loop, name="jckpt-lease", daemon=True)
            self._thread.start()

    def _take(self, data_dir: str, pins: tuple[str, ...]) -> None:
        """Reads the lease and takes it unless another live writer holds it."""
        current, generation = read(self.root)
        now = time.time()
        if current is not None and not current.mine() and current.live(now):
            raise RootLockedError(
                f"{self.root.directory!r} is being written by another process ({current.describe()}); "
                "one writer per root: stop it, or wait for its lease to expire",
                holder=current,
            )
        if current is not None and not current.mine() and current.data_dir:
            self.abandoned = current.data_dir  # the save in flight of a writer that is gone
        since = current.since if current is not None and current.mine() else now
        self._write(_new_lease(since, now + self.ttl, data_dir, pins), generation)

    def _write(self, lease: Lease, generation: Any, *, or_read_first: bool = False) -> bool:
        """Writes ``lease`` if the stored one is unchanged since ``generation``.

        Returns:
          True once written; False if it changed and ``or_read_first`` (the caller
          reads it and decides).

        Raises:
          RootLockedError: it changed (another writer came first).
        """
        written, new_generation = _conditional_write(self.root, _encode(lease), generation)
        if written and new_generation is not None:
            self.lease, self._generation = lease, new_generation
            return True
        if not written and or_read_first:
            return False
        current, new_generation = read(self.root)  # lost the race, or a store that cannot condition writes
        if not written or current is None or current.token != _TOKEN:  # another writer came first
            holder = current.describe() if current is not None else "unknown"
            raise RootLockedError(
                f"{self.root.directory!r}: another writer took the lease first ({holder})", holder=current
            )
        self.lease, self._generation = lease, new_generation
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                with self._lock:
                    if self.lease is not None:
                        self._write(self.lease._replace(expires=time.time() + self.ttl), self._generation)
            except Exception:  # lost or unwritable: the next save's acquire reports it
                return

    def release(self) -> None:
        """Stops renewing and deletes the lease (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.lease is not None:
                _conditional_write(self.root, None, self._generation)
                self.lease = None


_held: dict[str, Holder] = {}  # root location -> this process's holder (a manager's, or a save's)
_held_lock = threading.Lock()


def hold(
    root: Root, ttl: float = DEFAULT_TTL_SECONDS, *, data_dir: str = "", pins: tuple[str, ...] = ()
) -> tuple[Holder, bool]:
    """This process's holder of ``root``'s lease, acquired (or renewed) now, naming the save in flight.

    Returns:
      The holder and whether this call created it (then the caller releases it).
    """
    key = storage_id(root)
    with _held_lock:
        holder = _held.get(key)
        created = holder is None
        if created:
            holder = _held[key] = Holder(root, ttl)
    try:
        holder.acquire(data_dir=data_dir, pins=pins)
    except BaseException:
        if created:
            with _held_lock:
                _held.pop(key, None)
        raise
    return holder, created


def let_go(root: Root) -> None:
    """Releases this process's lease on ``root`` (if it holds one)."""
    with _held_lock:
        holder = _held.pop(storage_id(root), None)
    if holder is not None:
        holder.release()


def storage_id(root: Root) -> str:
    return storage.url(root.spec)
