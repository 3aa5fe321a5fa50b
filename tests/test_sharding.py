"""Sharded saves: chunks tile shards, replicas are written once, any target layout restores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jckpt
from jckpt import format as fmt
from jckpt import read as read_lib
from jckpt.root import Root


def _mesh(shape):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("x", "y"))


def _state():
    mesh = _mesh((4, 2))
    w = jnp.arange(64 * 48, dtype=jnp.float32).reshape(64, 48)
    return {
        "sharded": jax.device_put(w, NamedSharding(mesh, P("x", "y"))),
        "rows": jax.device_put(w * 2, NamedSharding(mesh, P("x", None))),
        "replicated": jax.device_put(jnp.arange(1000.0), NamedSharding(mesh, P())),
        "uneven": jax.device_put(
            jnp.arange(10 * 3, dtype=jnp.int32).reshape(10, 3), NamedSharding(mesh, P("y", None))
        ),
    }


def test_eight_fake_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("chunk_bytes", [64, 1024, 16 * 2**20])
def test_chunks_tile_the_shards(tmp_path, chunk_bytes):
    state = _state()
    jckpt.save(tmp_path, state, step=0, options=jckpt.SaveOptions(chunk_bytes=chunk_bytes))
    manifest = Root(tmp_path).read_manifest(0)
    for leaf in manifest.leaves:
        if leaf.storage != fmt.CHUNKED:
            continue
        array = state[leaf.path]
        chunk = leaf.chunk_shape
        for index in array.sharding.devices_indices_map(array.shape).values():
            for dim, sl in enumerate(index):
                start = sl.start or 0
                assert start % chunk[dim] == 0, (leaf.path, index, chunk)
        assert len(leaf.chunks) == np.prod([-(-n // c) for n, c in zip(leaf.shape, chunk)])


def test_replicated_data_is_written_once(tmp_path):
    state = _state()
    info = jckpt.save(tmp_path, state, step=0)
    logical = sum(np.asarray(x).nbytes for x in state.values())
    assert info.bytes_total == logical
    assert info.bytes_written <= logical + 64 * len(state)  # packing alignment only


@pytest.mark.parametrize(
    "target",
    [
        lambda: NamedSharding(_mesh((2, 4)), P("x", "y")),
        lambda: NamedSharding(_mesh((2, 4)), P("y", "x")),
        lambda: NamedSharding(_mesh((2, 4)), P(None, "y")),
        lambda: SingleDeviceSharding(jax.devices()[3]),
    ],
    ids=["2x4", "2x4-transposed", "columns", "one-device"],
)
def test_restore_into_other_shardings(tmp_path, target):
    state = _state()
    jckpt.save(tmp_path, state, step=0, options=jckpt.SaveOptions(chunk_bytes=256))
    sharding = target()
    like = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
        for k, v in state.items()
        if isinstance(sharding, SingleDeviceSharding) or (v.ndim == 2 and v.shape[0] % 4 == 0)
    }
    assert len(like) >= 2
    restored = jckpt.restore(tmp_path, like=like)
    for key, value in restored.items():
        assert value.sharding == sharding
        np.testing.assert_array_equal(np.asarray(value), np.asarray(state[key]))


def test_restore_without_like_goes_to_default_device(tmp_path):
    state = _state()
    jckpt.save(tmp_path, state, step=0)
    restored = jckpt.restore(tmp_path)
    for key, value in restored.items():
        assert value.devices() == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(value), np.asarray(state[key]))


def test_each_device_reads_only_its_region(tmp_path):
    """A target replicated over one mesh axis still reads each stored chunk once."""
    w = jnp.arange(512 * 256, dtype=jnp.float32).reshape(512, 256)  # 512 KiB: not packed
    mesh = _mesh((8, 1))
    jckpt.save(tmp_path, {"w": jax.device_put(w, NamedSharding(mesh, P("x")))}, step=0)
    leaf = Root(tmp_path).read_manifest(0).leaves[0]
    assert leaf.chunk_shape == (64, 256)  # one chunk per shard

    target = read_lib.Target("jax", None, NamedSharding(_mesh((2, 4)), P("x", None)))
    plan = read_lib.LeafPlan(leaf, target)
    assert len(plan.regions) == 2  # two distinct row blocks (replicated over "y")
    root = Root(tmp_path)
    reader = read_lib.read_plans(root, root.read_manifest(0), [plan])
    assert reader.bytes_read == w.nbytes
