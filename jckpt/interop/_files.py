"""Export destinations that appear whole or not at all: written under a temporary name, then renamed."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator


def _check_free(destination: str) -> None:
    if os.path.isdir(destination) and not os.path.islink(destination):
        if os.listdir(destination):
            raise FileExistsError(f"export destination {destination!r} is a non-empty directory")
    elif os.path.lexists(destination):
        raise FileExistsError(f"export destination {destination!r} already exists")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary directory next to ``destination``, renamed to it on success.

    On an error the temporary directory is removed and ``destination`` is untouched.

    Raises:
      FileExistsError: ``destination`` exists and is not an empty directory.
    """
    destination = os.path.abspath(os.fspath(destination))
    _check_free(destination)
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{destination}.jckpt-tmp-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    try:
        yield tmp
        _check_free(destination)
        if os.path.isdir(destination):
            os.rmdir(destination)  # an empty directory given as the destination
        os.rename(tmp, destination)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(destination: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary file path next to ``destination``, renamed to it on success.

    Raises:
      FileExistsError: ``destination`` already exists.
    """
    destination = os.path.abspath(os.fspath(destination))
    if os.path.lexists(destination):
        raise FileExistsError(f"export destination {destination!r} already exists")
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{destination}.jckpt-tmp-{secrets.token_hex(4)}"
    try:
        yield tmp
        if os.path.lexists(destination):
            raise FileExistsError(f"export destination {destination!r} appeared while exporting")
        os.rename(tmp, destination)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
