"""Chunk compression: every codec round-trips bit-exactly, "bytegroup" stays a plain zarr3 array."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

import jckpt
from jckpt import storage
from jckpt.format import CHUNKED, PACKED
from jckpt.root import Root
from tests.helpers import assert_trees_equal

CODECS = [c for c in storage.COMPRESSION_CODECS if c is not None]
CHUNK = 256 * 2**10  # small chunks: the big leaves get several


def _weights(shape, seed, dtype):
    """Trained-weight-like floats: normal, so the exponent bytes are skewed and the mantissas random."""
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(dtype)


def _state(dtype):
    return {
        "big": _weights((1024, 512), 0, dtype),  # chunked: 2 MiB (float32), several chunks
        "mid": _weights((300, 700), 1, dtype),  # chunked, ragged last chunk
        "small": _weights((64, 33), 2, dtype),  # packed
        "bias": np.zeros(17, dtype),  # packed
        "special": np.array([np.nan, -np.inf, np.inf, -0.0, 1e-40, 3.0], dtype),  # packed, bits kept
        "count": np.int32(7),
    }


def _data_bytes(root: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.endswith(".json"))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_chunked_and_packed(tmp_path, codec, dtype):
    state = _state(dtype)
    options = jckpt.SaveOptions(compression=codec, chunk_bytes=CHUNK)
    info = jckpt.save(tmp_path, state, step=0, options=options)
    leaves = {leaf.path: leaf for leaf in Root(tmp_path).read_manifest(0).leaves}
    assert leaves["big"].storage == CHUNKED and len(leaves["big"].chunks) > 1
    assert leaves["small"].storage == PACKED
    assert Root(tmp_path).read_manifest(0).compression == codec
    assert _data_bytes(tmp_path) < info.bytes_total  # really compressed
    assert_trees_equal(jckpt.restore(tmp_path), state)
    assert jckpt.verify(tmp_path).step == 0


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_bytegroup_beats_blosc_on_float_weights(tmp_path, dtype):
    """Byte grouping with per-plane entropy coding: the exponent plane shrinks, the mantissa does not."""
    state = {"w": _weights((2048, 1024), 3, dtype)}
    ratio = {}
    for codec in ("blosc", "bytegroup"):
        root = tmp_path / codec
        info = jckpt.save(root, state, step=0, options=jckpt.SaveOptions(compression=codec))
        ratio[codec] = info.bytes_total / _data_bytes(root)
    # The order-0 entropy of this data's byte planes bounds any byte-grouping coder; bytegroup
    # must come within 4% of it (Huffman, table and block overheads), and blosc's small
    # default blocks stay well short of it.
    planes = state["w"].reshape(-1).view(np.uint8).reshape(-1, state["w"].dtype.itemsize)
    bits = 0.0
    for i in range(planes.shape[1]):
        p = np.bincount(planes[:, i], minlength=256) / len(planes)
        bits += -(p[p > 0] * np.log2(p[p > 0])).sum()
    bound = 8 * planes.shape[1] / bits
    assert ratio["bytegroup"] > 0.96 * bound, (ratio, bound)
    assert ratio["bytegroup"] > ratio["blosc"] + 0.03, ratio


def test_bytegroup_array_opens_with_plain_tensorstore(tmp_path):
    """No jckpt code needed to read a chunked leaf: its zarr.json names the standard blosc codec."""
    w = _weights((512, 512), 4, np.float32)
    jckpt.save(tmp_path, {"w": w}, step=0, options=jckpt.SaveOptions(compression="bytegroup"))
    (meta,) = [p for p in tmp_path.rglob("zarr.json") if json.loads(p.read_text())["data_type"] == "float32"]
    codecs = json.loads(meta.read_text())["codecs"]
    assert codecs[-1]["name"] == "blosc" and codecs[-1]["configuration"]["blocksize"] == 2**20
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(meta.parent)}}).result()
    np.testing.assert_array_equal(arr.read().result(), w)


def test_incremental_save_across_codecs_reuses_chunks(tmp_path):
    """Hashes cover the uncompressed bytes, so an unchanged state written with another codec is reused."""
    state = _state(np.float32)
    jckpt.save(tmp_path, state, step=0, options=jckpt.SaveOptions(compression="zstd", chunk_bytes=CHUNK))
    info = jckpt.save(
        tmp_path,
        state,
        step=1,
        kind="incremental",
        options=jckpt.SaveOptions(compression="bytegroup", chunk_bytes=CHUNK),
    )
    assert info.bytes_written == 0
    assert_trees_equal(jckpt.restore(tmp_path, step=1), state)
    jckpt.verify(tmp_path, step=1)


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="bytegroup"):
        jckpt.SaveOptions(compression="zipnn")
