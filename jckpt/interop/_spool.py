"""Host arrays backed by temporary files, so an import holds its leaves without holding RAM.

``jckpt.save`` takes the whole tree at once.  When a source cannot be
memory-mapped in place (Orbax's compressed zarr chunks, compressed npz
members), each leaf is decoded into a file-backed ``np.memmap`` here; the
kernel can write those pages back and drop them, so the anonymous memory of
an import stays about one read slab, not the state.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np

# Leaves up to this size stay in ordinary memory, as long as they add up to at most IN_MEMORY_BYTES.
SMALL_BYTES = 1 * 2**20
IN_MEMORY_BYTES = 64 * 2**20


class Spool:
    """A temporary directory of memory-mapped arrays; use as a context manager.

    Args:
      directory: where the temporary directory goes (default: ``tempfile.gettempdir()``).
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="jckpt-import-", dir=directory)
        self._count = 0
        self._in_memory = 0

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def empty(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """A writable C-order array of ``shape`` and ``dtype``: file-backed unless small."""
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize * int(np.prod(shape))
        if nbytes == 0 or (nbytes <= SMALL_BYTES and self._in_memory + nbytes <= IN_MEMORY_BYTES):
            self._in_memory += nbytes
            return np.empty(shape, dtype)
        self._count += 1
        path = os.path.join(self._tmp.name, f"{self._count:08d}.bin")
        return np.memmap(path, dtype=dtype, mode="w+", shape=tuple(shape))
