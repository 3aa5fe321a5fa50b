"""Chunk hashes: xxh3-128 over the chunk's little-endian C-order bytes."""

from __future__ import annotations

import numpy as np
import xxhash

ALGORITHM = "xxh3_128"


def chunk_hash(chunk: np.ndarray) -> str:
    """The hex xxh3-128 digest of an array's C-order bytes.

    Example:
      >>> chunk_hash(np.zeros(4, np.float32)) == chunk_hash(np.zeros((2, 2), np.float32))
      True
    """
    flat = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
    return xxhash.xxh3_128_hexdigest(flat.data)
