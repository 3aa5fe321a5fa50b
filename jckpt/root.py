"""A checkpoint root: its keys, its marker, its committed steps and the commit itself.

::

    ROOT/
      jckpt.json                        root marker: format, version, checksum
      manifests/step_00000100.json      the manifest of step 100: its commit marker, written last
      step_00000100/d5f3a2b1c/          data of the save that wrote step 100
        packed-p0/                      small leaves of process 0, packed into one uint8 zarr3 array
        <array id>/zarr.json, c/...     one zarr3 array per large leaf, one file per chunk

A step is committed exactly when its manifest exists.  Data directories carry
a random save id, so a step number can be reused after a delete while older
data under it is still referenced by an incremental save.  Everything is
relative to ROOT: a root can be moved or copied.

Version-1 roots (manifests at ``step_<N>/manifest.json``) are read as they
are; the first save into one upgrades it (:meth:`Root.ensure`).
"""

from __future__ import annotations

import errno
import os
import secrets
from typing import Protocol

import tensorstore as ts

from jckpt import format as fmt
from jckpt import storage
from jckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointRootError,
    StepExistsError,
)


class Fence(Protocol):
    """What a commit asks of its writer (``jckpt.lease.Writer``)."""

    def check(self, what: str) -> None: ...

    def confirm(self, what: str) -> None: ...


class Root:
    """A checkpoint root: its kvstore plus the small operations on it.

    Args:
      directory: a local path or a URL (see ``jckpt.storage.kvstore_spec``).
      ctx: a tensorstore context to share (default: a new one).
    """

    def __init__(self, directory: str | os.PathLike, ctx: ts.Context | None = None):
        self.directory = os.fspath(directory)
        self.spec = storage.kvstore_spec(directory)
        self.caps = storage.capabilities(self.spec)
        path = self.caps.local_path
        if path is not None and os.path.lexists(path.rstrip("/")) and not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, f"checkpoint root {self.directory!r} is not a directory")
        self.ctx = ctx or storage.context()
        with storage.named_errors(storage.url(self.spec)):
            self.kv = storage.open_kvstore(self.spec, self.ctx)
        self._version: int | None = None

    def where(self, key: str) -> str:
        """A key's location for messages (a path or a URL)."""
        return storage.url(self.spec, key)

    # -- raw keys (storage's operations: exact keys, never a range; errors name the key) ---------
    def read(self, key: str) -> bytes | None:
        return storage.read(self.kv, key)

    def write(self, key: str, value: bytes) -> None:
        """Atomically and durably writes one key (see ``storage.write``)."""
        storage.write(self.kv, key, value)

    def delete(self, *keys: str) -> None:
        """Deletes exactly the given keys (in parallel batches); missing keys are ignored."""
        storage.delete_keys(self.kv, keys)

    def remove_tree(self, prefix: str) -> None:
        """Deletes the directory ``prefix`` (ending in "/") and everything under it."""
        storage.remove_tree(self.spec, self.kv, prefix)

    def list(self, prefix: str = "") -> list[str]:
        """The keys under ``prefix``, sorted."""
        return storage.list_keys(self.kv, prefix)

    # -- the root marker ------------------------------------------------------
    def exists(self) -> bool:
        """Whether the root marker exists (read once: its version is kept, see :attr:`version`)."""
        raw = self.read(fmt.ROOT_MARKER)
        if raw is None:
            return False
        self._version = fmt.read_root_marker(raw, self.where(fmt.ROOT_MARKER))
        return True

    @property
    def version(self) -> int:
        """The root's format version, from its marker.

        Raises:
          CheckpointNotFoundError: no root marker.
          CorruptCheckpointError: a damaged marker.
          UnsupportedFormatError: a newer format.
        """
        if self._version is None:
            raw = self.read(fmt.ROOT_MARKER)
            if raw is None:
                raise CheckpointNotFoundError(f"no jckpt checkpoints at {self.directory!r}")
            self._version = fmt.read_root_marker(raw, self.where(fmt.ROOT_MARKER))
        return self._version

    def check_version(self) -> None:
        """Raises unless this is a root of a readable version (see :attr:`version`)."""
        self.version  # noqa: B018

    def ensure(self) -> None:
        """Makes this a root of the current version, ready for a save.

        Creates the marker in an empty or new directory (refusing a non-empty
        one that is not a jckpt root) and upgrades a root of an older version.
        A root already seen at the current version is not read again.
        """
        if self._version == fmt.VERSION:
            return
        if self.exists():
            if self.version < fmt.VERSION:
                self._upgrade()
            return
        if not self._is_empty():
            raise NotACheckpointRootError(
                f"{self.directory!r} is not empty and holds no {fmt.ROOT_MARKER}: refusing to write "
                "checkpoints into it (give an empty or new directory)"
            )
        self.write(fmt.ROOT_MARKER, fmt.root_marker())
        self._version = fmt.VERSION

    def _upgrade(self) -> None:
        """Upgrades an older root to the current version: its marker, after its manifests' keys.

        Version-2 manifests are read as they are (they lack only ``codecs``);
        a version-1 root's manifests are first rewritten under ``manifests/``.
        Idempotent: a crash before the marker is rewritten leaves an old root
        that the next save upgrades again; the version-1 manifests left by a
        crash after it are unreferenced and collected by ``jckpt gc``.
        """
        steps = self.committed_steps() if self.version == 1 else []
        for step in steps:
            self.write(fmt.manifest_key(step), self.read_manifest(step).to_json())
        self.write(fmt.ROOT_MARKER, fmt.root_marker())
        self._version = fmt.VERSION
        self.delete(*(fmt.v1_manifest_key(step) for step in steps))

    def _is_empty(self) -> bool:
        path = self.caps.local_path
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
        if self.version >= 2:
            names = self._names(fmt.MANIFESTS + "/", files=True)
            steps = (fmt.parse_step_name(n[: -len(".json")]) for n in names if n.endswith(".json"))
            return sorted(s for s in steps if s is not None)
        steps = (fmt.parse_step_name(n) for n in self._names("", files=False))
        return sorted(s for s in steps if s is not None and self.read(fmt.v1_manifest_key(s)) is not None)

    def _names(self, prefix: str, *, files: bool) -> list[str]:
        """Names of files (or directories) directly under ``prefix`` (a directory or "")."""
        path = self.caps.local_path
        if path is not None:
            directory = os.path.join(path, prefix)
            if not os.path.isdir(directory):
                return []
            with os.scandir(directory) as entries:
                return [e.name for e in entries if (e.is_file() if files else e.is_dir())]
        names = set()
        for key in self.list(prefix or "step_"):
            head, _, tail = key[len(prefix) :].partition("/")
            if bool(tail) != files:
                names.add(head)
        return sorted(names)

    def manifest_key(self, step: int) -> str:
        """Where the manifest of ``step`` is in this root's version."""
        return fmt.manifest_key(step) if self.version >= 2 else fmt.v1_manifest_key(step)

    def read_manifest(self, step: int) -> fmt.Manifest:
        """The manifest of committed ``step``.

        Raises:
          CheckpointNotFoundError: ``step`` is not committed.
          CorruptCheckpointError: the manifest is damaged (names the step).
        """
        key = self.manifest_key(step)
        raw = self.read(key)
        if raw is None:
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step} at {self.directory!r}"
                f" (committed: {self.committed_steps()})"
            )
        return fmt.Manifest.from_json(raw, step=step, where=self.where(key))

    def commit(self, manifest: fmt.Manifest, *, fence: Fence | None = None) -> None:
        """Writes ``manifest`` (the step becomes visible, atomically), fenced by its writer.

        The manifest is created only if the step has none (a manifest is never
        replaced).  With ``fence`` (the save's writer, see ``jckpt.lease``) the
        writer's lease is checked before the write and confirmed after it; if
        the confirmation fails the manifest is removed again (only if it is
        still this one) and the error raised: a writer that lost its lease
        never reports a commit.

        Raises:
          StepExistsError: the step already has a manifest (another writer's).
          LeaseLostError: the writer lost its lease before the commit was confirmed.
        """
        step = manifest.step
        key = fmt.manifest_key(step)
        what = f"the commit of step {step}"
        if fence is not None:
            fence.check(what)
        generation = storage.create(self.kv, key, manifest.to_json(), step)
        if generation is None:
            raise StepExistsError(f"step {step} is already committed at {self.directory!r}")
        if fence is None:
            return
        try:
            fence.confirm(what)
        except BaseException:
            try:
                storage.delete_if_unchanged(
                    self.kv, key, generation if self.caps.conditional_writes else b"", step
                )
            except Exception as e:  # the step stays visible: say so
                raise CorruptCheckpointError(
                    f"{what} at {self.directory!r} happened after its writer lost the lease, and removing "
                    f"the manifest failed ({e}): verify or remove step {step}"
                ) from e
            raise

    # -- tags -----------------------------------------------------------------
    def tags(self) -> dict[str, int]:
        """Every tag of the root, name -> step."""
        names = [n[: -len(".json")] for n in self._names(fmt.TAGS + "/", files=True) if n.endswith(".json")]
        out = {}
        for name in sorted(names):
            step = self.tag(name)
            if step is not None:
                out[name] = step
        return out

    def tag(self, name: str) -> int | None:
        """The step tag ``name`` names, or None."""
        key = fmt.tag_key(name)
        raw = self.read(key)
        return None if raw is None else fmt.tag_from_json(raw, name=name, where=self.where(key))

    def write_tag(self, name: str, step: int, created: float) -> None:
        self.write(fmt.tag_key(name), fmt.tag_to_json(name, step, created))

    def delete_tag(self, name: str) -> None:
        self.delete(fmt.tag_key(name))

    def uncommit(self, step: int) -> None:
        """Deletes the manifest of ``step`` (the step disappears, atomically)."""
        self.delete(self.manifest_key(step))


def new_data_dir(step: int) -> str:
    """A fresh, unique data directory for one save of ``step``."""
    return f"{fmt.step_name(step)}/d{secrets.token_hex(4)}"
