"""Chunk grids: chunks tile every shard exactly, so no chunk straddles two shards."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

Region = tuple[slice, ...]

DEFAULT_CHUNK_BYTES = 16 * 2**20


def _largest_divisor_at_most(n: int, limit: int) -> int:
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for candidate in (d, n // d):
                if best < candidate <= limit:
                    best = candidate
    return best


def grid_steps(shape: Sequence[int], shard_starts: Sequence[Sequence[int]]) -> list[int]:
    """Per dimension, the largest stride that every shard start is a multiple of.

    ``shard_starts`` lists each shard's start offsets.  An unsharded dimension
    gets the full extent.
    """
    steps = []
    for dim, extent in enumerate(shape):
        starts = {starts[dim] for starts in shard_starts} - {0}
        steps.append(math.gcd(*starts) if starts else extent)
    return steps


def chunk_shape(
    shape: Sequence[int], itemsize: int, steps: Sequence[int], target_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[int]:
    """A chunk shape of at most ``target_bytes`` that tiles every shard.

    Chunks are split along leading dimensions first, so each chunk is one
    contiguous run of the C-order array.  A sharded dimension (step < extent)
    gets a divisor of its step; an unsharded one any size (the last chunk may
    be partial).

    Example:
      >>> chunk_shape([4096, 4096], 4, [4096, 4096], 16 * 2**20)
      [1024, 4096]
      >>> chunk_shape([8, 6], 4, [2, 6], 24)   # shards of 2 rows; a row is 24 bytes
      [1, 6]
    """
    chunk = [max(1, s) for s in steps]
    for dim in range(len(chunk)):
        inner = itemsize * math.prod(chunk[dim + 1 :])
        if chunk[dim] * inner <= target_bytes:
            break
        rows = max(1, target_bytes // inner)
        sharded = steps[dim] < shape[dim]
        chunk[dim] = _largest_divisor_at_most(chunk[dim], rows) if sharded else rows
        if inner <= target_bytes:
            break
    return chunk


def chunk_ids_in(region: Region, chunk: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Indices of the chunks that overlap ``region`` (a tuple of slices with ints)."""
    ranges = [range(r.start // c, -(-r.stop // c)) for r, c in zip(region, chunk)]
    return itertools.product(*ranges)


def chunk_region(chunk_id: Sequence[int], chunk: Sequence[int], shape: Sequence[int]) -> Region:
    """The global region a chunk covers (clipped at the array's end)."""
    return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(chunk_id, chunk, shape))


def chunk_name(chunk_id: Sequence[int]) -> str:
    """``(1, 0)`` -> ``"1.0"``; the manifest's key for a chunk (``""`` for 0-d)."""
    return ".".join(map(str, chunk_id))


def normalize(region: Sequence[slice], shape: Sequence[int]) -> Region:
    """Replaces ``None`` bounds with integers."""
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, shape))


def size(region: Region) -> int:
    """The number of elements in a region."""
    return math.prod(s.stop - s.start for s in region)


def region_key(region: Region) -> tuple[tuple[int, int], ...]:
    """A hashable form of a region (slices are unhashable before Python 3.12)."""
    return tuple((s.start, s.stop) for s in region)


def intersect(a: Region, b: Region) -> Region | None:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(s.start >= s.stop for s in out) else out


def relative(inner: Region, outer: Region) -> Region:
    """``inner`` expressed in the coordinates of ``outer``'s start."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))
