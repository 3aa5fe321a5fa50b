"""benchmarks/delta_encoding.py: XOR + byte grouping + entropy coding round-trips bit-exactly."""

import importlib.util
import os

import ml_dtypes
import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "delta_encoding.py")
_SPEC = importlib.util.spec_from_file_location("_bench_delta_encoding", _PATH)
delta_encoding = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(delta_encoding)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float64, np.int32])
def test_roundtrip_bit_exact(dtype):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 70)).astype(dtype)
    new = (base.astype(np.float64) * (1 + 1e-3 * rng.standard_normal(base.shape))).astype(dtype)
    if np.issubdtype(np.dtype(dtype), np.floating):
        new[0, :4] = [np.nan, -0.0, np.inf, -np.inf]  # bit patterns a float comparison would miss
    new[1] = base[1]  # unchanged values XOR to zero
    # 4 KiB chunks: several chunks, the last one partial
    decoded, stored = delta_encoding.roundtrip(new, base, chunk_bytes=4096)
    assert decoded.dtype == new.dtype and decoded.shape == new.shape
    assert delta_encoding.same_bits(decoded, new)
    assert 0 < stored


def test_unchanged_delta_is_zero_and_small():
    base = np.random.default_rng(1).standard_normal(2**16).astype(np.float32)
    delta = delta_encoding.xor_delta(base.copy(), base)
    assert delta.dtype == np.uint32 and not delta.any()
    decoded, stored = delta_encoding.roundtrip(base.copy(), base)
    assert delta_encoding.same_bits(decoded, base)
    assert stored < base.nbytes // 50


def test_mismatch_rejected():
    with pytest.raises(ValueError):
        delta_encoding.xor_delta(np.zeros(3, np.float32), np.zeros(3, np.float64))
