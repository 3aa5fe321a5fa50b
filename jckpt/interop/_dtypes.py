"""Data types by name, including the ml_dtypes ones (bfloat16, float8_*, int4, ...)."""

from __future__ import annotations

import ml_dtypes
import numpy as np


def by_name(name: str) -> np.dtype:
    """``np.dtype`` for a name such as ``"float32"``, ``"bfloat16"`` or ``"int4"``.

    Raises:
      TypeError: neither numpy nor ml_dtypes knows the name.
    """
    if hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def is_numpy_native(dtype: np.dtype) -> bool:
    """True for dtypes numpy itself can name in a ``.npy`` header (bool, ints, floats, complex)."""
    return dtype.kind in "biufc" and not hasattr(ml_dtypes, dtype.name)


def raw_view(dtype: np.dtype) -> np.dtype:
    """The unsigned integer dtype of the same width, for storing raw bits (e.g. bfloat16 -> uint16).

    Raises:
      TypeError: no unsigned integer has that width (e.g. a 16-byte complex).
    """
    if dtype.itemsize not in (1, 2, 4, 8):
        raise TypeError(f"no unsigned integer dtype is {dtype.itemsize} bytes wide (for {dtype})")
    return np.dtype(f"<u{dtype.itemsize}")


def little_endian(array: np.ndarray) -> np.ndarray:
    """``array`` in little-endian byte order and C order (copied only when it is not already)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.asarray(array, order="C")
