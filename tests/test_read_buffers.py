"""Host buffers of the read path: aligned, writable, memory-mapped when large."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jckpt
from jckpt import read as read_lib


@pytest.mark.parametrize("shape", [(0,), (3, 5), (1024, 1024), (3, 700, 129)])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.float64])
def test_aligned_empty_is_aligned_writable_c_order(shape, dtype):
    buffer = read_lib.aligned_empty(shape, np.dtype(dtype))
    assert buffer.shape == shape and buffer.dtype == dtype
    assert buffer.flags.c_contiguous and buffer.flags.writeable
    assert buffer.size == 0 or buffer.ctypes.data % 64 == 0
    buffer[...] = 7
    assert (buffer == 7).all()


def test_large_leaves_restore_into_cpu_arrays_intact(tmp_path):
    rng = np.random.default_rng(0)
    state = {"big": rng.standard_normal((1024, 768), np.float32), "small": np.arange(10, dtype=np.int32)}
    jckpt.save(tmp_path, state, step=1)
    like = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in state.items()}
    restored = jckpt.restore(tmp_path, like=like)
    for key, value in state.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), value)
    plain = jckpt.restore(tmp_path)  # numpy targets keep jckpt's own buffers
    np.testing.assert_array_equal(plain["big"], state["big"])
    plain["big"][0, 0] = 5.0  # writable
