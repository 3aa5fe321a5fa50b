"""The on-disk layout of a checkpoint root and its commit protocol.

::

    ROOT/
      jckpt.json                      root marker: {"format": "jckpt", "version": 1}
      step_00000100/
        manifest.json                 the commit marker, written last
        d5f3a2b1c/                    data of the save that wrote step 100
          packed/                     small leaves batched into one uint8 zarr3 array
          <array id>/zarr.json, c/..  one zarr3 array per large leaf, one file per chunk

A step is committed exactly when ``step_<N>/manifest.json`` exists.  Data
directories carry a random save id, so a step number can be reused after a
delete while older data under it is still referenced by an incremental save.
Everything here is relative to ROOT: a root can be moved or copied.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from typing import Any

import tensorstore as ts

from jckpt import storage
from jckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointRootError,
    UnsupportedFormatError,
)

FORMAT = "jckpt"
VERSION = 1
ROOT_MARKER = "jckpt.json"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(step: int) -> str:
    """``step_00000100`` for step 100."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


def manifest_key(step: int) -> str:
    return f"{step_dir(step)}/{MANIFEST}"


def new_data_dir(step: int) -> str:
    """A fresh, unique data directory for one save of ``step``."""
    return f"{step_dir(step)}/d{secrets.token_hex(4)}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


class Root:
    """A checkpoint root: its kvstore plus the small operations on it."""

    def __init__(self, directory: str | os.PathLike, ctx: ts.Context | None = None):
        self.directory = os.fspath(directory)
        self.spec = storage.kvstore_spec(directory)
        self.ctx = ctx or storage.context()
        self.kv = storage.open_kvstore(self.spec, self.ctx)

    # -- raw keys -------------------------------------------------------------
    def read(self, key: str) -> bytes | None:
        result = self.kv.read(key).result()
        return result.value if result.state == "value" else None

    def write(self, key: str, value: bytes) -> None:
        """Atomically and durably writes one key (file: temp file, fsync, rename, fsync dir).

        Tensorstore's file kvstore writes ``<key>.__lock`` and renames it into
        place, but reuses a stale lock file left by a killed writer without
        truncating it, so its old tail would end up in the new value.  Such a
        leftover is removed first (one writer per root, see docs/format.md).
        """
        path = storage.local_path(self.spec)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, key + storage.LOCK_SUFFIX))
        self.kv.write(key, value).result()

    def delete(self, *keys: str) -> None:
        """Deletes the given keys (concurrently); missing keys are ignored."""
        futures = [self.kv.delete_range(ts.KvStore.KeyRange(k, k + "\x00")) for k in keys]
        for future in futures:
            future.result()

    def remove_tree(self, prefix: str) -> None:
        """Deletes the directory ``prefix`` (ending in "/") and everything under it."""
        storage.remove_tree(self.spec, self.kv, prefix)

    def list(self, prefix: str = "") -> list[str]:
        if prefix:
            end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            keys = self.kv.list(ts.KvStore.KeyRange(prefix, end)).result()
        else:
            keys = self.kv.list().result()
        return [k.decode() for k in keys if not k.decode().endswith(storage.LOCK_SUFFIX)]

    # -- the root marker ------------------------------------------------------
    def exists(self) -> bool:
        return self.read(ROOT_MARKER) is not None

    def check_version(self) -> None:
        raw = self.read(ROOT_MARKER)
        if raw is None:
            raise CheckpointNotFoundError(f"no jckpt checkpoints at {self.directory!r}")
        check_format(json.loads(raw), where=os.path.join(self.directory, ROOT_MARKER))

    def ensure(self) -> None:
        """Creates the root marker, refusing a non-empty directory that is not a jckpt root."""
        if self.exists():
            self.check_version()
            return
        if not self._is_empty():
            raise NotACheckpointRootError(
                f"{self.directory!r} is not empty and holds no {ROOT_MARKER}: refusing to write "
                "checkpoints into it (give an empty or new directory)"
            )
        self.write(ROOT_MARKER, json.dumps({"format": FORMAT, "version": VERSION}).encode())

    def _is_empty(self) -> bool:
        path = storage.local_path(self.spec)
        if path is not None:
            if not os.path.exists(path):
                return True
            if not os.path.isdir(path):
                raise NotADirectoryError(f"checkpoint root {self.directory!r} is a file")
            with os.scandir(path) as entries:
                return next(entries, None) is None
        return not self.list()

    # -- steps ----------------------------------------------------------------
    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists, ascending."""
        path = storage.local_path(self.spec)
        if path is not None:
            if not os.path.isdir(path):
                return []
            steps = (parse_step_dir(e.name) for e in os.scandir(path) if e.is_dir())
            return sorted(
                s for s in steps if s is not None and os.path.exists(os.path.join(path, manifest_key(s)))
            )
        steps = set()
        for key in self.list("step_"):
            head, _, tail = key.partition("/")
            if tail == MANIFEST and parse_step_dir(head) is not None:
                steps.add(parse_step_dir(head))
        return sorted(steps)

    def read_manifest(self, step: int) -> dict[str, Any]:
        raw = self.read(manifest_key(step))
        if raw is None:
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step} at {self.directory!r}"
                f" (committed: {self.committed_steps()})"
            )
        where = os.path.join(self.directory, manifest_key(step))
        try:
            manifest = json.loads(raw)
        except ValueError as e:
            raise CorruptCheckpointError(f"step {step}: manifest {where} is not valid JSON: {e}") from e
        check_format(manifest, where=where)
        return manifest


def check_format(doc: dict[str, Any], where: str) -> None:
    """Raises UnsupportedFormatError unless ``doc`` is a jckpt document this version reads."""
    if doc.get("format") != FORMAT:
        raise UnsupportedFormatError(f"{where} is not a jckpt file (format={doc.get('format')!r})")
    version = doc.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise UnsupportedFormatError(
            f"{where} has format version {version!r}; this jckpt reads versions <= {VERSION}. "
            "Upgrade jckpt to read it."
        )
