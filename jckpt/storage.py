"""Tensorstore kvstores for every backend: specs, context, keys, listing, deletes, errors.

Every byte jckpt reads or writes goes through a tensorstore kvstore built
here.  A checkpoint location is a local path, ``file://PATH``,
``memory://NAME``, ``s3://BUCKET/PREFIX`` or ``gs://BUCKET/PREFIX``
(docs/storage.md).  Configuration follows each ecosystem's conventions, read
from the environment and nothing else:

- S3: ``AWS_ENDPOINT_URL_S3`` (wins) or ``AWS_ENDPOINT_URL`` for an
  S3-compatible server, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and
  tensorstore's default AWS credential chain (environment, profile, ECS, IMDS).
- GCS: application default credentials, and ``STORAGE_EMULATOR_HOST``
  (``host:port`` or ``http://host:port``) for an emulator.  Tensorstore
  0.1.86 has no endpoint member in its ``gcs`` spec; it reads
  ``TENSORSTORE_GCS_HTTP_URL`` when a store is *opened*, so
  :func:`open_kvstore` sets that variable from ``STORAGE_EMULATOR_HOST``.

Object stores have no rename and no directories.  The helpers here therefore
never delete a range or a prefix: :func:`list_keys` lists (robustly, see
below) and :func:`delete_keys` deletes exactly the keys it is given, one
DELETE each, in parallel batches.  Tensorstore's own ``delete_range`` lists
and deletes whatever the server answered, and the GCS emulator ignores
``startOffset``/``endOffset``, so there a range delete empties the bucket.
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import tensorstore as ts

# Tensorstore's own lossless codecs offered for chunk compression (see docs/incremental.md).
# "bytegroup" is blosc's byte shuffle (one stream per byte plane, so a float's exponent bytes
# sit together) with zstd level 1 entropy-coding each plane: with 1 MiB blosc blocks every
# 128 KiB zstd block lies inside one byte plane (4 planes x 256 KiB for float32), so each
# plane gets its own Huffman table.  blosc's default block at level 1 is far smaller, and
# zstd's blocks then mix planes ("blosc" below): 1.10x instead of 1.20x on float32.
COMPRESSION_CODECS = {
    None: [],
    "zstd": [{"name": "zstd", "configuration": {"level": 1}}],
    "blosc": [{"name": "blosc", "configuration": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"}}],
    "bytegroup": [
        {
            "name": "blosc",
            "configuration": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle", "blocksize": 2**20},
        }
    ],
}

# The file kvstore writes each key to ``<key>.__lock`` and then renames it into place.
LOCK_SUFFIX = ".__lock"

REMOTE_DRIVERS = ("s3", "gcs")

# Curl stall and connect limits, set (unless already set) before the first remote store is opened:
# without them a server that accepts a connection and never answers, or a link that trickles,
# holds a request forever.  A transfer slower than 16 KiB/s for 30 s is aborted (then retried, see
# Retries); a healthy bucket moves megabytes a second, and 30 s covers a server's pause before it
# answers a large PUT.  Tensorstore reads them once, when its HTTP transport starts.
CURL_DEFAULTS = {
    "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "30",
    "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES": "16384",
    "TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS": "30",
}
RETRIES_ENV = "JCKPT_STORAGE_MAX_RETRIES"  # overrides Retries.max_retries


class Retries(NamedTuple):
    """Bounded exponential backoff for transient HTTP errors (5xx, 429, resets, timeouts).

    Tensorstore retries a request up to ``max_retries`` times, waiting
    ``initial_delay * 2**attempt`` (at most ``max_delay``, plus jitter) between
    attempts, then fails with the last error.  The defaults give up after
    about 40 s of backoff in total, plus the requests' own time.
    """

    max_retries: int = 8
    initial_delay: str = "500ms"
    max_delay: str = "10s"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Retries:
        """The defaults, with ``max_retries`` from ``$JCKPT_STORAGE_MAX_RETRIES`` where set.

        Raises:
          ValueError: the variable is not an integer >= 0.
        """
        raw = (os.environ if environ is None else environ).get(RETRIES_ENV)
        if raw is None:
            return cls()
        if not raw.strip().isdigit():
            raise ValueError(f"{RETRIES_ENV} must be an integer >= 0, got {raw!r}")
        return cls(max_retries=int(raw))


# -- locations and specs -------------------------------------------------------------------


def kvstore_spec(location: str | os.PathLike, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The tensorstore kvstore spec of a checkpoint location (a path or URL).

    Args:
      location: a local path, ``file://PATH``, ``memory://NAME``, ``s3://BUCKET[/PREFIX]``
        or ``gs://BUCKET[/PREFIX]``.
      environ: the environment to read S3 settings from (default ``os.environ``).

    Returns:
      The spec; its ``path`` ends in "/" (or is "" for a bucket's top).

    Raises:
      ValueError: for an unsupported scheme, a missing bucket name or a "." / ".." prefix segment.

    Example:
      >>> kvstore_spec("/ckpt")
      {'driver': 'file', 'path': '/ckpt/'}
      >>> kvstore_spec("memory://scratch")["driver"]
      'memory'
      >>> kvstore_spec("gs://bkt/runs/a")
      {'driver': 'gcs', 'bucket': 'bkt', 'path': 'runs/a/'}
      >>> env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}
      >>> kvstore_spec("s3://bkt/run", env)  # doctest: +NORMALIZE_WHITESPACE
      {'driver': 's3', 'bucket': 'bkt', 'path': 'run/',
       'endpoint': 'http://127.0.0.1:9000', 'aws_region': 'eu-west-1'}
    """
    text = os.fspath(location)
    if text.startswith("memory://"):
        return {"driver": "memory", "path": _dir(text[len("memory://") :])}
    if text.startswith("file://"):
        text = text[len("file://") :]
    scheme, sep, rest = text.partition("://")
    if not sep:
        return {"driver": "file", "path": _dir(os.path.abspath(text))}
    if scheme not in ("s3", "gs"):
        raise ValueError(
            f"unsupported checkpoint location {text!r}: give a local path, file://, memory://, s3:// or gs://"
        )
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"checkpoint location {text!r} names no bucket ({scheme}://BUCKET/PREFIX)")
    segments = [s for s in prefix.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ValueError(f"checkpoint location {text!r}: '.' and '..' are not allowed in an object prefix")
    path = "".join(s + "/" for s in segments)
    if scheme == "gs":
        return {"driver": "gcs", "bucket": bucket, "path": path}
    settings = s3_settings(os.environ if environ is None else environ)
    return {"driver": "s3", "bucket": bucket, "path": path, **settings}


def s3_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The endpoint and region members of an s3 spec, from the AWS environment variables.

    ``AWS_ENDPOINT_URL_S3`` wins over ``AWS_ENDPOINT_URL``; ``AWS_REGION`` over
    ``AWS_DEFAULT_REGION``.  Unset ones are left out: tensorstore then uses the
    public AWS endpoints and discovers the bucket's region itself.

    Example:
      >>> s3_settings({"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2/"})
      {'endpoint': 'http://b:2'}
      >>> s3_settings({"AWS_DEFAULT_REGION": "us-west-2"})
      {'aws_region': 'us-west-2'}
    """
    settings = {}
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        settings["endpoint"] = endpoint.rstrip("/")
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region:
        settings["aws_region"] = region
    return settings


def gcs_endpoint(environ: Mapping[str, str]) -> str | None:
    """The GCS endpoint URL named by ``STORAGE_EMULATOR_HOST``, or None when unset.

    Example:
      >>> gcs_endpoint({"STORAGE_EMULATOR_HOST": "127.0.0.1:9023"})
      'http://127.0.0.1:9023'
      >>> gcs_endpoint({"STORAGE_EMULATOR_HOST": "https://gcs.internal/"})
      'https://gcs.internal'
      >>> gcs_endpoint({}) is None
      True
    """
    host = environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host:
        return None
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/")


def _dir(path: str) -> str:
    return path if path.endswith("/") or not path else path + "/"


def join(spec: dict[str, Any], key: str) -> dict[str, Any]:
    """``spec`` moved down to the sub-directory ``key``.

    Example:
      >>> join({"driver": "s3", "bucket": "b", "path": "run/"}, "step_1/d0")["path"]
      'run/step_1/d0/'
    """
    return {**spec, "path": _dir(spec["path"] + key)}


def local_path(spec: dict[str, Any]) -> str | None:
    """The filesystem directory of a ``file`` spec, else None."""
    return spec["path"] if spec["driver"] == "file" else None


class Capabilities(NamedTuple):
    """What a root's store can do cheaply, so that callers ask this instead of the driver's name.

    Attributes:
      local_path: the filesystem directory of a local root, else None.
      rename: keys can be renamed atomically (a temporary name, then the real one).
      cheap_listing: listing a whole root is one directory scan, not paid per request.
      conditional_writes: writes honour "only if unchanged" (storage generations).  False
        only for the GCS emulator, which ignores "create only if absent".
    """

    local_path: str | None
    rename: bool
    cheap_listing: bool
    conditional_writes: bool


def capabilities(spec: dict[str, Any], environ: Mapping[str, str] | None = None) -> Capabilities:
    """The :class:`Capabilities` of the store of ``spec``."""
    path = local_path(spec)
    emulated_gcs = spec["driver"] == "gcs" and gcs_endpoint(os.environ if environ is None else environ)
    return Capabilities(path, path is not None, path is not None, not emulated_gcs)


def is_remote(spec: dict[str, Any]) -> bool:
    """Whether ``spec`` is an object store (no rename, no directories, requests cost money)."""
    return spec["driver"] in REMOTE_DRIVERS


def url(spec: dict[str, Any], key: str = "") -> str:
    """A readable URL of ``key`` in ``spec``, for messages and as a root's identity.

    Example:
      >>> url({"driver": "s3", "bucket": "b", "path": "run/"}, "jckpt.json")
      's3://b/run/jckpt.json'
      >>> url({"driver": "gcs", "bucket": "b", "path": ""})
      'gs://b/'
      >>> url({"driver": "file", "path": "/ckpt/"}, "step_00000001")
      '/ckpt/step_00000001'
    """
    driver = spec["driver"]
    if driver == "s3":
        return f"s3://{spec['bucket']}/{spec['path']}{key}"
    if driver == "gcs":
        return f"gs://{spec['bucket']}/{spec['path']}{key}"
    if driver == "memory":
        return f"memory://{spec['path']}{key}"
    return spec["path"] + key


# -- context and opening ---------------------------------------------------------------------


def context(
    io_concurrency: int = 32, request_concurrency: int = 32, retries: Retries | None = None
) -> ts.Context:
    """A tensorstore context for one checkpoint root.

    No chunk cache (checkpoints are written once and read once); bounded
    concurrency of local file I/O and of S3 / GCS requests; bounded
    exponential backoff of transient S3 / GCS errors (:class:`Retries`).

    Args:
      io_concurrency: local file operations in flight.
      request_concurrency: HTTP requests in flight per object-store driver.
      retries: the backoff of transient HTTP errors (default :meth:`Retries.from_environment`).

    Returns:
      A new context; stores opened with it share its limits.
    """
    backoff = (Retries.from_environment() if retries is None else retries)._asdict()
    return ts.Context(
        {
            "cache_pool": {"total_bytes_limit": 0},
            "file_io_concurrency": {"limit": io_concurrency},
            "s3_request_concurrency": {"limit": request_concurrency},
            "gcs_request_concurrency": {"limit": request_concurrency},
            "s3_request_retries": backoff,
            "gcs_request_retries": backoff,
        }
    )


# Which TENSORSTORE_GCS_HTTP_URL value this module set, so it can be withdrawn with its source.
_gcs_url_set_here: str | None = None


def prepare_environment(spec: dict[str, Any], environ: Any = None) -> None:
    """Sets the process-wide tensorstore variables a store of ``spec`` needs, before it is opened.

    For s3 and gcs: the curl stall/connect limits of :data:`CURL_DEFAULTS`
    (only where unset).  For gcs: ``TENSORSTORE_GCS_HTTP_URL`` from
    ``STORAGE_EMULATOR_HOST`` (withdrawn again once that is unset).  Both are
    read by tensorstore at open time (the curl ones once per process), never
    in between, so this is called by :func:`open_kvstore`.

    Args:
      spec: the kvstore spec about to be opened.
      environ: the environment to change (default ``os.environ``).
    """
    global _gcs_url_set_here
    environ = os.environ if environ is None else environ
    if not is_remote(spec):
        return
    for name, value in CURL_DEFAULTS.items():
        environ.setdefault(name, value)
    if spec["driver"] != "gcs":
        return
    endpoint = gcs_endpoint(environ)
    if endpoint is not None:
        environ["TENSORSTORE_GCS_HTTP_URL"] = _gcs_url_set_here = endpoint
    elif _gcs_url_set_here is not None and environ.get("TENSORSTORE_GCS_HTTP_URL") == _gcs_url_set_here:
        del environ["TENSORSTORE_GCS_HTTP_URL"]
        _gcs_url_set_here = None


def open_kvstore(spec: dict[str, Any], ctx: ts.Context | None = None) -> ts.KvStore:
    """Opens the kvstore of ``spec`` (see :func:`prepare_environment` for s3 / gcs).

    Raises:
      ValueError: for a spec tensorstore rejects (e.g. an invalid bucket name).
    """
    prepare_environment(spec)
    return ts.KvStore.open(spec, context=ctx).result()


# -- errors ----------------------------------------------------------------------------------

_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")
_HTTP_CODE = re.compile(r"http_response_code='(\d+)'")
_CURL_CODE = re.compile(r"curl_code='(\d+)'")
_STATUS = re.compile(r"^([A-Z_]+): ")

# curl codes: 6 host unresolved, 7 connect failed, 28 timeout, 52 empty reply, 55/56 send/recv failure.
_CURL_TIMEOUT = {"28"}
_CURL_REFUSED = {"6", "7"}


def as_os_error(error: BaseException) -> BaseException:
    """Tensorstore reports local I/O failures as ValueError; give those back as OSError (same errno).

    Example:
      >>> as_os_error(ValueError("Error writing local file: [os_error_code='28'] x")).errno
      28
      >>> isinstance(as_os_error(KeyError("k")), KeyError)
      True
    """
    match = _OS_ERROR_CODE.search(str(error)) if isinstance(error, ValueError) else None
    if match is None:
        return error
    code = int(match.group(1))
    return OSError(code, f"{os.strerror(code)}: {error}")


def translate_error(error: BaseException, where: str = "", step: int | None = None) -> BaseException:
    """A standard exception for a tensorstore error, naming the bucket/key (``where``) and the step.

    Tensorstore raises ``ValueError("CODE: text [http_response_code='404'] ...")``.

    ==========================================================  =========================
    tensorstore says                                             raised as
    ==========================================================  =========================
    ``os_error_code='N'`` (local I/O)                            ``OSError(N)``
    NOT_FOUND (missing bucket: NoSuchBucket / 404 on write)      ``FileNotFoundError``
    PERMISSION_DENIED / UNAUTHENTICATED / HTTP 401, 403          ``PermissionError``
    curl timeout (28), DEADLINE_EXCEEDED                         ``TimeoutError``
    curl connect failure (6, 7)                                  ``ConnectionRefusedError``
    other curl failures (resets), UNAVAILABLE, retries used up   ``ConnectionError``
    ==========================================================  =========================

    Anything else (not a ValueError, or an unknown status) is returned unchanged.

    Args:
      error: what tensorstore raised.
      where: the URL of the key or root concerned (:func:`url`).
      step: the checkpoint step concerned, when there is one.

    Returns:
      The exception to raise (``raise translate_error(e, ...) from e``).

    Example:
      >>> e = translate_error(ValueError("NOT_FOUND: NoSuchBucket: gone [http_response_code='404']"),
      ...                     "s3://nope/run/jckpt.json", step=3)
      >>> type(e).__name__, e.errno, e.strerror.split(":")[0]
      ('FileNotFoundError', 2, 'step 3, s3')
    """
    if not isinstance(error, ValueError):
        return error
    text = str(error)
    local = as_os_error(error)
    if local is not error:
        code = local.errno
        return OSError(code, f"{_context(where, step)}: {os.strerror(code)} ({text})")
    status = _STATUS.match(text)
    code = status.group(1) if status else ""
    http = _HTTP_CODE.search(text)
    http_code = int(http.group(1)) if http else None
    curl = _CURL_CODE.search(text)
    curl_code = curl.group(1) if curl else None
    prefix = _context(where, step)
    if code == "PERMISSION_DENIED" or code == "UNAUTHENTICATED" or http_code in (401, 403):
        return PermissionError(errno_lib.EACCES, f"{prefix}: access denied (check the credentials): {text}")
    if code == "NOT_FOUND" or http_code == 404:
        return FileNotFoundError(errno_lib.ENOENT, f"{prefix}: not found (does the bucket exist?): {text}")
    if curl_code in _CURL_TIMEOUT or code == "DEADLINE_EXCEEDED":
        return TimeoutError(errno_lib.ETIMEDOUT, f"{prefix}: the storage server timed out: {text}")
    if curl_code in _CURL_REFUSED:
        return ConnectionRefusedError(
            errno_lib.ECONNREFUSED, f"{prefix}: cannot reach the storage endpoint (is it up?): {text}"
        )
    transient = code in ("UNAVAILABLE", "ABORTED") or (http_code or 0) >= 500 or http_code == 429
    if curl_code is not None or transient:
        return ConnectionError(f"{prefix}: the storage server kept failing (retries used up): {text}")
    return error


def _context(where: str, step: int | None) -> str:
    parts = ([f"step {step}"] if step is not None else []) + ([where] if where else [])
    return ", ".join(parts) or "storage"


def _kv_url(kv: ts.KvStore, key: str = "") -> str:
    try:
        spec = kv.spec().to_json()
    except Exception:  # pragma: no cover - describing an error must not raise another
        return key
    spec.setdefault("path", "")
    return url(spec, key) if "driver" in spec else key


@contextlib.contextmanager
def named_errors(where: str | Callable[[], str], step: int | None = None) -> Iterator[None]:
    """Within the block, tensorstore errors are raised as :func:`translate_error` gives them.

    Args:
      where: the URL named in messages, or a function computing it (called only on error).
      step: the step named in messages.

    Example::

        with storage.named_errors(storage.url(spec, key), step=step):
            ts.open(array_spec).result()
    """
    try:
        yield
    except ValueError as error:
        translated = translate_error(error, where() if callable(where) else where, step)
        if translated is error:
            raise
        raise translated from error


# -- keys ------------------------------------------------------------------------------------


def read(kv: ts.KvStore, key: str, step: int | None = None) -> bytes | None:
    """The value of ``key``, or None when it does not exist.

    On S3 and GCS a missing *bucket* also reads as None (both answer 404, the
    same as for a missing key); writing or listing tells them apart.

    Raises:
      OSError: (a subclass, see :func:`translate_error`) when the read fails.
    """
    with named_errors(_lazy_url(kv, key), step):
        result = kv.read(key).result()
    return result.value if result.state == "value" else None


def write(kv: ts.KvStore, key: str, value: bytes, step: int | None = None) -> None:
    """Writes one key, atomically: readers see the old value or the new one, never a part.

    Local files: tensorstore writes ``<key>.__lock``, fsyncs and renames it into
    place; a stale lock file left by a killed writer is removed first, because
    tensorstore reuses it without truncating it.  S3 / GCS: one PUT (an object
    appears whole or not at all).

    Raises:
      OSError: (a subclass, see :func:`translate_error`) when the write fails.
    """
    clear_stale_lock(kv, key)
    with named_errors(_lazy_url(kv, key), step):
        kv.write(key, value).result()


NO_VALUE = b"\x02"  # tensorstore's storage generation of a key that does not exist


def create(kv: ts.KvStore, key: str, value: bytes, step: int | None = None) -> bytes | None:
    """Writes ``key`` only if it does not exist yet (atomically and durably, as :func:`write`).

    Returns:
      The new storage generation (for a later conditional delete), or None
      when ``key`` already existed (nothing was written).  A store that cannot
      condition writes (the GCS emulator) is written unconditionally.

    Raises:
      OSError: (a subclass, see :func:`translate_error`) when the write fails.
    """
    clear_stale_lock(kv, key)
    with named_errors(_lazy_url(kv, key), step):
        try:
            generation = kv.write(key, value, if_equal=NO_VALUE).result().generation
        except ValueError as e:
            if "Malformed StorageGeneration" not in str(e):
                raise
            kv.write(key, value).result()
            return b""
    return generation or None


def delete_if_unchanged(kv: ts.KvStore, key: str, generation: bytes, step: int | None = None) -> bool:
    """Deletes ``key`` if it is still at ``generation`` (what :func:`create` returned).

    Returns:
      Whether it was deleted (False: it was replaced or removed meanwhile).
    """
    with named_errors(_lazy_url(kv, key), step):
        if not generation:  # a store without conditions: compare nothing, delete
            kv.write(key, None).result()
            return True
        return kv.write(key, None, if_equal=generation).result().generation == NO_VALUE


def clear_stale_lock(kv: ts.KvStore, key: str) -> None:
    """Removes ``<key>.__lock`` of a local store before ``key`` is written.

    Tensorstore's file kvstore reuses a lock file left by a killed writer
    without truncating it, so its old tail would end up in the new value.
    """
    path = kv_local_path(kv)
    if path is not None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(os.path.join(path, key + LOCK_SUFFIX))


def list_keys(kv: ts.KvStore, prefix: str = "", step: int | None = None) -> list[str]:
    """The keys under ``prefix`` (a plain string prefix, not only a directory), sorted.

    Listing costs one request per 1000 keys on S3 and GCS.  The request asks
    the server for exactly the key range of ``prefix``, and the answer is
    filtered again here: the GCS emulator ignores the range and answers the
    whole bucket (tensorstore then even crashes the process when a name is
    shorter than the store's path), so object stores are listed from the
    bucket's top and every key outside ``prefix`` is dropped.  The local file
    kvstore's ``.__lock`` files are left out.

    Raises:
      OSError: (a subclass, see :func:`translate_error`) when the listing fails.

    Example:
      >>> kv = ts.KvStore.open({"driver": "memory", "path": "r/"}).result()
      >>> for k in ["a/b", "a/b2", "a/b/c", "b"]: _ = kv.write(k, b"").result()
      >>> list_keys(kv, "a/b/"), list_keys(kv, "a/b")
      (['a/b/c'], ['a/b', 'a/b/c', 'a/b2'])
    """
    base, full = kv, prefix
    if kv_driver(kv) in REMOTE_DRIVERS:
        base = kv.copy()
        base.path = ""
        full = kv.path + prefix
    key_range = ts.KvStore.KeyRange(full, _successor(full)) if full else ts.KvStore.KeyRange()
    with named_errors(_lazy_url(kv, prefix), step):
        found = base.list(key_range).result()
    strip = len(full) - len(prefix)
    keys = (k.decode() for k in found)
    return sorted(k[strip:] for k in keys if k.startswith(full) and not k.endswith(LOCK_SUFFIX))


def delete_keys(kv: ts.KvStore, keys: Iterable[str], batch: int = 256, step: int | None = None) -> int:
    """Deletes exactly ``keys`` (missing ones are fine), ``batch`` requests in flight at a time.

    One DELETE per key on S3 / GCS (tensorstore's ``write(key, None)``); never
    a range or prefix delete.  Local files: ``unlink``, refusing a key reached
    through a symlinked directory (it would delete outside the root).

    Args:
      kv: the store; ``keys`` are relative to its path.
      keys: the exact keys to delete.
      batch: deletes in flight at once.
      step: named in error messages.

    Returns:
      How many keys were asked to be deleted.

    Raises:
      OSError: (a subclass) for the first delete that failed, after the whole batch finished.
    """
    keys = list(keys)
    path = kv_local_path(kv)
    if path is not None:
        for key in keys:
            _unlink_inside(path, key)
        return len(keys)
    for start in range(0, len(keys), batch):
        chunk = keys[start : start + batch]
        futures = [kv.write(key, None) for key in chunk]
        failed = None
        for key, future in zip(chunk, futures):
            try:
                future.result()
            except ValueError as error:
                failed = failed or (key, error)
        if failed is not None:
            key, error = failed
            raise translate_error(error, _kv_url(kv, key), step) from error
    return len(keys)


def remove_tree(spec: dict[str, Any], kv: ts.KvStore, prefix: str, step: int | None = None) -> int:
    """Deletes every key under the directory ``prefix`` (ending in "/"), and the directory when local.

    Object stores: :func:`list_keys` then :func:`delete_keys`, so only keys
    that were listed under ``prefix`` are deleted.  Local: a walk that never
    follows a symlink (a symlink is unlinked, not followed) and never leaves
    the root; a ``prefix`` reached through a symlinked directory is left alone.

    Returns:
      The number of keys (files, links) deleted.

    Raises:
      ValueError: when ``prefix`` does not end in "/" (it would match sibling keys).
      OSError: (a subclass) when listing or deleting fails.
    """
    if not prefix.endswith("/"):
        raise ValueError(f"remove_tree needs a directory prefix ending in '/', got {prefix!r}")
    path = local_path(spec)
    if path is None:
        return delete_keys(kv, list_keys(kv, prefix, step=step), step=step)
    top = os.path.join(path, prefix.rstrip("/"))
    if not _inside(path, os.path.dirname(top)):
        return 0
    if os.path.islink(top) or os.path.isfile(top):
        os.unlink(top)
        return 1
    if not os.path.isdir(top):
        return 0
    removed = 0
    for current, dirs, files in os.walk(top, topdown=False, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(current, d))]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(current, name))
                removed += 1
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(current)
    return removed


def prune_empty_dirs(spec: dict[str, Any], prefix: str) -> None:
    """Removes empty directories at and below ``prefix``, then its empty parents.

    Local roots only (object stores have no directories).
    """
    path = local_path(spec)
    if path is None:
        return
    top = os.path.join(path, prefix.strip("/"))
    dirs = [current for current, _, _ in os.walk(top)][::-1]  # children before parents
    parent = os.path.dirname(top)
    while os.path.normpath(parent) != os.path.normpath(path) and parent.startswith(path):
        dirs.append(parent)
        parent = os.path.dirname(parent)
    for directory in dirs:
        try:
            os.rmdir(directory)  # fails (harmlessly) unless empty
        except OSError:
            pass


def kv_driver(kv: ts.KvStore) -> str:
    """The driver name of an open kvstore ("file", "memory", "s3", "gcs", ...)."""
    return kv.spec().to_json()["driver"]


def kv_local_path(kv: ts.KvStore) -> str | None:
    """The filesystem directory of an open ``file`` kvstore, else None."""
    return kv.path if kv_driver(kv) == "file" else None


def _successor(prefix: str) -> str:
    """The smallest string after every string starting with ``prefix`` (a non-empty prefix).

    Example:
      >>> _successor("step_"), _successor("a/b/")
      ('step`', 'a/b0')
    """
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _lazy_url(kv: ts.KvStore, key: str) -> Callable[[], str]:
    """The URL of a key, computed only if an error message needs it."""
    return lambda: _kv_url(kv, key)


def _inside(root: str, directory: str) -> bool:
    """Whether ``directory`` resolves (symlinks followed) to ``root`` or below it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(directory)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def _unlink_inside(root: str, key: str) -> None:
    full = os.path.join(root, key)
    expected = os.path.normpath(os.path.join(os.path.realpath(root), os.path.dirname(key)))
    if os.path.realpath(os.path.dirname(full)) != expected:
        raise PermissionError(errno_lib.EPERM, f"refusing to delete {full!r}: it lies behind a symlink")
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
        os.unlink(full)  # a directory is not a key: left alone


def zarr3_spec(
    kvstore: dict[str, Any],
    shape: Sequence[int],
    dtype: str,
    chunk_shape: Sequence[int],
    compression: str | None = None,
) -> dict[str, Any]:
    """The spec of one zarr3 array with a regular chunk grid, one file per chunk.

    Example:
      >>> zarr3_spec({"driver": "memory"}, [8, 4], "float32", [2, 4])["metadata"]["chunk_grid"]
      {'name': 'regular', 'configuration': {'chunk_shape': [2, 4]}}
    """
    if compression not in COMPRESSION_CODECS:
        raise ValueError(
            f"unknown compression {compression!r}; choose one of {sorted(map(str, COMPRESSION_CODECS))}"
        )
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]
            + COMPRESSION_CODECS[compression],
        },
    }

