"""The writer lease: one writer per root at a time, proven still held at every commit.

A :class:`Writer` holds ``leases/writer.json`` while it writes (a plain save
for its duration; a ``CheckpointManager`` from its start until ``close``): who
holds it (host, boot id, PID namespace, pid, a per-process token), its ttl,
since when and until when, the data directory of the save in flight and the
data directories that save reuses (an incremental save's base).  A daemon
thread renews it every ``ttl / 4`` seconds, retrying failed renewals until the
lease would expire.

* **Fenced.**  A writer is *valid* only while its lease has been continuously
  unexpired since it was taken: every renewal succeeded before the previous
  expiry, nobody replaced it, and the present is before its expiry.  A commit
  checks this before and after writing its manifest (:meth:`Writer.check`,
  :meth:`Writer.confirm`); a writer that lost its lease (paused past its ttl,
  renewals failing, taken over) is told so with :class:`LeaseLostError` and
  never reports success.  docs/format.md argues why this is enough.
* **Others wait out a grace.**  Another writer takes a lease, and collectors
  stop sparing its data, only ``ttl / 4`` seconds after it expired (the clocks
  of two hosts may differ by that much), or at once when its holder is a dead
  process that provably shares this host's boot and PID namespace.
* **One writer per root per process.**  A second writer of the same root in
  the same process (a second manager, a plain save beside a manager) is
  refused with :class:`RootLockedError`.

Acquisition and renewal are conditional writes (an flock-guarded compare and
rename on local roots, storage generations on object stores), so two writers
racing for a free root cannot both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from typing import Any, NamedTuple

from jckpt import format as fmt
from jckpt import storage
from jckpt.errors import CorruptCheckpointError, LeaseLostError, RootLockedError, UnsupportedFormatError
from jckpt.root import Root

KEY = "leases/writer.json"
LOCK_FILE = "writer.lock"  # beside KEY on local roots: flocked while the lease is read and replaced
LOCK_WAIT_SECONDS = 10.0  # a flock held longer than this is a stopped process's: fail, never hang
DEFAULT_TTL_SECONDS = 120.0
TTL_ENV = "JCKPT_LEASE_TTL_SECONDS"
GRACE_FRACTION = 0.25  # others wait this fraction of the ttl past expiry (clock skew between hosts)

logger = logging.getLogger("jckpt")


def _new_token() -> str:
    return secrets.token_hex(8)


_TOKEN = _new_token()  # this process's identity (pids are reused)


def _renew_token_in_child() -> None:
    global _TOKEN
    _TOKEN = _new_token()  # a forked child is another process: it holds none of its parent's leases
    with _writers_lock:
        _writers.clear()


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def default_ttl() -> float:
    """The lease ttl: ``$JCKPT_LEASE_TTL_SECONDS``, else 120 s.

    Raises:
      ValueError: the variable is not a positive number.
    """
    raw = os.environ.get(TTL_ENV)
    if raw is None:
        return DEFAULT_TTL_SECONDS
    return check_ttl(raw, TTL_ENV)


def check_ttl(value: Any, name: str = "lease_ttl") -> float:
    """``value`` as a ttl in seconds (a positive, finite number).

    Raises:
      ValueError: anything else, naming ``name``.
    """
    try:
        ttl = float(value)
    except (TypeError, ValueError):
        ttl = float("nan")
    if isinstance(value, bool) or not 0 < ttl < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return ttl


class Lease(NamedTuple):
    """The content of a writer lease."""

    host: str
    pid: int
    token: str
    since: float
    expires: float
    data_dir: str  # the save in flight ("" between saves)
    pins: tuple[str, ...]  # data directories it reuses
    ttl: float = DEFAULT_TTL_SECONDS
    boot_id: str = ""  # "" where unknown: then the holder's pid is never judged from here
    pid_ns: str = ""

    def mine(self) -> bool:
        return self.token == _TOKEN

    def live(self, now: float | None = None) -> bool:
        """Whether the lease still binds others: not past its expiry plus the grace, holder not known dead.

        A dead pid counts only when the holder provably shares this host's
        boot and PID namespace (a pid in another container means nothing here).
        """
        if (time.time() if now is None else now) >= self.expires + GRACE_FRACTION * self.ttl:
            return False
        if not self.mine() and self._same_pid_namespace():
            return _alive(self.pid)
        return True

    def _same_pid_namespace(self) -> bool:
        return (
            self.host == socket.gethostname()
            and bool(self.boot_id) and self.boot_id == _boot_id()
            and bool(self.pid_ns) and self.pid_ns == _pid_namespace()
        )

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
    path = root.caps.local_path
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
    finds it replaced at its next renewal or commit and fails).
    """
    raw, generation = _read_raw(root)
    if raw is None:
        return None, generation
    try:
        doc = fmt.decode_document(raw, root.where(KEY))
        lease = Lease(
            str(doc["host"]), int(doc["pid"]), str(doc["token"]), float(doc["since"]), float(doc["expires"]),
            str(doc["data_dir"]), tuple(str(p) for p in doc["pins"]),
            float(doc.get("ttl", DEFAULT_TTL_SECONDS)), str(doc.get("boot_id", "")),
            str(doc.get("pid_ns", "")),
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
    path = root.caps.local_path
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


def _flock(lock: Any, path: str) -> None:
    """An exclusive flock of ``lock`` within :data:`LOCK_WAIT_SECONDS`: a stopped holder never hangs us.

    Raises:
      RootLockedError: another process has held it that long (it is stopped, or its disk hangs).
    """
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file is closed
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RootLockedError(
                    f"{path} has been locked by another process for {LOCK_WAIT_SECONDS:g} s while it "
                    "changes the writer lease (a stopped process?); try again later"
                ) from None
            time.sleep(0.01)


def _local_conditional_write(target: str, value: bytes | None, expected: bytes | None) -> bool:
    directory = os.path.dirname(target)
    try:
        os.makedirs(directory, exist_ok=True)
        lock_path = os.path.join(directory, LOCK_FILE)
        with open(lock_path, "a+b") as lock:
            _flock(lock, lock_path)
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


# Root location -> this process's live writer of it.  Weak: a manager dropped without close()
# frees its root for the next writer of this process (its lease, being this process's, is taken over).
_writers: weakref.WeakValueDictionary[str, Writer] = weakref.WeakValueDictionary()
_writers_lock = threading.Lock()
os.register_at_fork(after_in_child=_renew_token_in_child)


class Writer:
    """This process's writer of a root: the lease, renewed by a daemon thread, and the fence of its commits.

    Args:
      root: the checkpoint root.
      ttl: seconds a lease binds others after its last renewal (default
        :func:`default_ttl`).

    Example::

        writer = Writer(Root("/tmp/run")).acquire()   # RootLockedError if another writer holds it
        epoch = writer.begin("step_00000001/dabc", pins=())
        ...                                            # write the data
        writer.check("commit of step 1", epoch)        # LeaseLostError if the lease lapsed meanwhile
        writer.release()
    """

    def __init__(self, root: Root, ttl: float | None = None):
        self.root = root
        self.ttl = default_ttl() if ttl is None else check_ttl(ttl)
        self.lease: Lease | None = None
        self.epoch = 0  # counts the times this writer took the lease anew (a save must end in its own)
        self.abandoned = ""  # the data directory of a save whose writer died (taken over from its lease)
        self.lost = ""  # why the lease was lost ("" while held or never taken)
        self._generation: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._key = storage.url(root.spec)

    # -- holding ----------------------------------------------------------------------------------
    def acquire(self) -> Writer:
        """Takes the lease (idempotent while held) and registers this writer as the root's in this process.

        Raises:
          RootLockedError: another live writer holds it (names host, pid,
            since), in this process or another.
        """
        try:
            self.begin("", ())
        except BaseException:
            self._unregister()
            raise
        return self

    def begin(self, data_dir: str, pins: tuple[str, ...] = ()) -> int:
        """Records the save in flight in the lease (taking the lease anew if it was lost).

        Args:
          data_dir: the data directory of the save about to write ("" between saves).
          pins: the data directories that save reuses (its base's).

        Returns:
          The epoch to pass to :meth:`check` at the commit.

        Raises:
          RootLockedError: another live writer holds the lease.
        """
        if self._stop.is_set():
            raise RuntimeError(f"the writer of {self.root.directory!r} was released")
        self._register()
        with self._lock:
            # Held: first the guess that the lease is as this writer last wrote it (one request
            # less); else read it and decide.  Not held: always read first, as some stores (the
            # GCS emulator) ignore the condition "create only if absent".
            held = None if self.lost else self.lease
            renewed = held is not None and time.time() < held.expires and self._write(
                self._lease(held.since, data_dir, pins), self._generation, or_read_first=True
            )
            if not renewed:
                self._take(data_dir, pins)
            elif time.time() >= held.expires:  # renewed, but only after it expired: a gap, a new epoch
                self.epoch += 1
        if self._thread is None:
            self._thread = threading.Thread(
                target=_renew_loop, args=(weakref.ref(self), self._stop), name="jckpt-lease", daemon=True
            )
            self._thread.start()
        return self.epoch

    def _lease(self, since: float, data_dir: str, pins: tuple[str, ...]) -> Lease:
        return Lease(
            socket.gethostname(), os.getpid(), _TOKEN, since, time.time() + self.ttl, data_dir, tuple(pins),
            self.ttl, _boot_id(), _pid_namespace(),
        )

    def _take(self, data_dir: str, pins: tuple[str, ...]) -> None:
        """Reads the lease and takes it unless another live writer holds it."""
        current, generation = read(self.root)
        if current is not None and not current.mine() and current.live():
            raise RootLockedError(
                f"{self.root.directory!r} is being written by another process ({current.describe()}); "
                "one writer per root: stop it, or wait for its lease to expire",
                holder=current,
            )
        if current is not None and not current.mine() and current.data_dir:
            self.abandoned = current.data_dir  # the save in flight of a writer that is gone
        self._write(self._lease(time.time(), data_dir, pins), generation)
        self.epoch += 1
        self.lost = ""

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

    # -- the fence ----------------------------------------------------------------------------------
    def check(self, what: str, epoch: int | None = None) -> None:
        """Raises unless the lease has been held without a gap since ``epoch`` began, and still is.

        Args:
          what: the operation, for the message ("commit of step 100").
          epoch: what :meth:`begin` returned for this save (None: any).

        Raises:
          LeaseLostError: the lease lapsed, was taken over, or was taken anew
            since ``epoch`` (the save's data may have been collected).
        """
        lease = self.lease
        why = self.lost
        if not why and lease is None:
            why = "this writer holds no lease"
        if not why and epoch is not None and epoch != self.epoch:
            why = "it was lost and taken again since this save began (its data may have been collected)"
        if not why and lease is not None and time.time() >= lease.expires:
            why = (
                f"it expired at {time.strftime('%H:%M:%S', time.localtime(lease.expires))} before it was "
                f"renewed (ttl {self.ttl:g} s: the process was paused or stalled)"
            )
        if why:
            raise LeaseLostError(f"{self.root.directory!r}: {what} refused: the writer lease was lost: {why}")

    def confirm(self, what: str, epoch: int | None = None) -> None:
        """:meth:`check`, and the stored lease is still exactly the one this writer last wrote.

        Raises:
          LeaseLostError: as :meth:`check`, or the stored lease was replaced or removed.
        """
        self.check(what, epoch)
        with self._lock:  # not while a renewal replaces it
            current, _ = read(self.root)
            if current != self.lease:  # content, not generations: the GCS emulator's are all 0 on reads
                holder = current.describe() if current is not None else "none"
                self._lose(f"the stored lease was replaced or removed (now held by: {holder})")
        self.check(what, epoch)

    def fence(self, epoch: int) -> Fence:
        """The fence of one save: :meth:`check` and :meth:`confirm` bound to its ``epoch``."""
        return Fence(self, epoch)

    def _lose(self, why: str) -> None:
        self.lost = why
        logger.error("jckpt: the writer lease of %r was lost: %s", self.root.directory, why)

    def _renew(self) -> float:
        """One renewal (the renewal thread's step); returns the seconds until the next one."""
        with self._lock:
            lease = self.lease
            if lease is None or self.lost:
                return self.ttl / 4
            if time.time() >= lease.expires:
                self._lose(f"not renewed before it expired (ttl {self.ttl:g} s: paused or stalled)")
                return self.ttl / 4
            try:
                self._write(lease._replace(expires=time.time() + self.ttl), self._generation)
            except RootLockedError as e:
                self._lose(f"taken over by another writer: {e}")
                return self.ttl / 4
            except Exception as e:  # transient: retry soon, until the lease would expire
                logger.warning("jckpt: renewing the writer lease of %r failed (retrying): %s",
                               self.root.directory, e)
                return min(1.0, self.ttl / 16)
            if time.time() >= lease.expires:  # the renewal itself ended after the expiry: a gap
                self._lose("renewed only after it had expired (a slow or stalled lease write)")
            return self.ttl / 4

    def release(self) -> None:
        """Stops renewing, deletes the lease (if it is still ours) and unregisters this writer."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            with self._lock:
                if self.lease is not None and not self.lost:
                    _conditional_write(self.root, None, self._generation)
                self.lease = None
        finally:
            self._unregister()

    def __enter__(self) -> Writer:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    # -- one writer per root per process ----------------------------------------------------------
    def _register(self) -> None:
        with _writers_lock:
            other = _writers.get(self._key)
            if other is not None and other is not self:
                raise RootLockedError(
                    f"{self.root.directory!r} is already being written by another writer in this process "
                    "(a CheckpointManager, or a save in flight): one writer per root; save through it, "
                    "or close it first",
                    holder=other.lease,
                )
            _writers[self._key] = self

    def _unregister(self) -> None:
        with _writers_lock:
            if _writers.get(self._key) is self:
                del _writers[self._key]


class Fence(NamedTuple):
    """One save's fence: its writer and the epoch its save began in (see ``Root.commit``)."""

    writer: Writer
    epoch: int

    def check(self, what: str) -> None:
        self.writer.check(what, self.epoch)

    def confirm(self, what: str) -> None:
        self.writer.confirm(what, self.epoch)


def _renew_loop(writer_ref: weakref.ref[Writer], stop: threading.Event) -> None:
    """Renews the writer's lease until it is released or dropped (holds it only while renewing)."""
    writer = writer_ref()
    wait = writer.ttl / 4 if writer is not None else 0.0
    del writer
    while True:
        if stop.wait(wait):
            return
        writer = writer_ref()
        if writer is None:
            return
        wait = writer._renew()
        del writer


@contextlib.contextmanager
def writing(root: Root, writer: Writer | None, ttl: float | None = None):
    """``writer`` if given (the caller holds it), else a new writer of ``root`` held for the block."""
    if writer is not None:
        if storage.url(writer.root.spec) != storage.url(root.spec):
            raise ValueError(f"the writer given holds {writer.root.directory!r}, not {root.directory!r}")
        yield writer
        return
    own = Writer(root, ttl)  # takes the lease at its first begin()
    try:
        yield own
    finally:
        with contextlib.suppress(Exception):  # never mask the save's own error; it expires anyway
            own.release()
