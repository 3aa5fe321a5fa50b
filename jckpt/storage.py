"""Tensorstore specs and key-value stores, one pure function per spec.

Every byte jckpt reads or writes goes through a tensorstore kvstore built
here, so a new backend (``s3://``, ``gs://``) is a new branch in
:func:`kvstore_spec`, not a rewrite.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import tensorstore as ts

# Tensorstore's own lossless codecs offered for chunk compression (see docs/format.md).
COMPRESSION_CODECS = {
    None: [],
    "zstd": [{"name": "zstd", "configuration": {"level": 1}}],
    "blosc": [{"name": "blosc", "configuration": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"}}],
}


def kvstore_spec(root: str | os.PathLike) -> dict[str, Any]:
    """The tensorstore kvstore spec of a checkpoint root (a path or URL).

    Example:
      >>> kvstore_spec("/ckpt")
      {'driver': 'file', 'path': '/ckpt/'}
      >>> kvstore_spec("memory://scratch")["driver"]
      'memory'
    """
    text = os.fspath(root)
    if text.startswith("memory://"):
        return {"driver": "memory", "path": _dir(text[len("memory://") :])}
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" in text:
        raise ValueError(f"unsupported checkpoint location {text!r}: only local paths for now")
    return {"driver": "file", "path": _dir(os.path.abspath(text))}


def _dir(path: str) -> str:
    return path if path.endswith("/") else path + "/"


def join(spec: dict[str, Any], key: str) -> dict[str, Any]:
    """``spec`` moved down to the sub-directory ``key``."""
    return {**spec, "path": _dir(spec["path"] + key)}


def local_path(spec: dict[str, Any]) -> str | None:
    """The filesystem directory of a ``file`` spec, else None."""
    return spec["path"] if spec["driver"] == "file" else None


def context(io_concurrency: int = 32) -> ts.Context:
    """A tensorstore context without a chunk cache (checkpoints are written once)."""
    return ts.Context(
        {
            "cache_pool": {"total_bytes_limit": 0},
            "file_io_concurrency": {"limit": io_concurrency},
        }
    )


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


def chunk_key(chunk_index: Sequence[int]) -> str:
    """The key of a chunk inside its zarr3 array (default key encoding)."""
    return "/".join(["c", *map(str, chunk_index)])


def open_kvstore(spec: dict[str, Any], ctx: ts.Context | None = None) -> ts.KvStore:
    return ts.KvStore.open(spec, context=ctx).result()


# The file kvstore writes each key to ``<key>.__lock`` and then renames it into place.
LOCK_SUFFIX = ".__lock"

_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def as_os_error(error: BaseException) -> BaseException:
    """Tensorstore reports I/O failures as ValueError; give those back as OSError (same errno)."""
    match = _OS_ERROR_CODE.search(str(error)) if isinstance(error, ValueError) else None
    if match is None:
        return error
    errno = int(match.group(1))
    return OSError(errno, f"{os.strerror(errno)}: {error}")


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


def remove_tree(spec: dict[str, Any], kv: ts.KvStore, prefix: str) -> None:
    """Deletes every key under ``prefix`` (a directory), and the directory itself when local."""
    path = local_path(spec)
    if path is not None:
        shutil.rmtree(os.path.join(path, prefix), ignore_errors=True)
        return
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    kv.delete_range(ts.KvStore.KeyRange(prefix, end)).result()
