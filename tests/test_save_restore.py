"""Round trips: every supported leaf type, dtype and container comes back bit-exact."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from helpers import assert_trees_equal

import jckpt
from jckpt.root import Root

DTYPES = [
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "complex64",
    "bool",
    "int4",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e4m3b11fnuz",
    "uint4",  # not a zarr3 type: stored as a uint8 view
]


def _np_dtype(name):
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def _values(dtype, shape):
    raw = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % 7
    return (raw % 2).astype(dtype) if dtype == np.bool_ else raw.astype(dtype)


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5, 3), (300, 300)])
def test_numpy_dtypes_round_trip(tmp_path, name, shape):
    value = _values(_np_dtype(name), shape)
    jckpt.save(tmp_path, {"x": value}, step=0)
    assert_trees_equal(jckpt.restore(tmp_path), {"x": value})


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16", "int8", "uint32", "bool", "complex64"])
def test_jax_dtypes_round_trip(tmp_path, name):
    value = jnp.asarray(_values(_np_dtype(name), (64, 33)))
    jckpt.save(tmp_path, {"x": value, "s": value[0, 0]}, step=0)
    assert_trees_equal(jckpt.restore(tmp_path), {"x": value, "s": value[0, 0]})


def test_float64_jax_arrays_with_x64(tmp_path):
    jax.config.update("jax_enable_x64", True)
    try:
        value = jnp.linspace(0, 1, 1000, dtype=jnp.float64) / 3
        jckpt.save(tmp_path, {"x": value}, step=0)
        restored = jckpt.restore(tmp_path, like={"x": value})
        assert restored["x"].dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(restored["x"]), np.asarray(value))
    finally:
        jax.config.update("jax_enable_x64", False)


def test_python_scalars_none_and_containers(tmp_path):
    state = {"step": 7, "lr": 0.1, "done": True, "z": 1 + 2j, "nothing": None, "pair": (1, [2.5, None])}
    jckpt.save(tmp_path, state, step=0)
    assert jckpt.restore(tmp_path, like=state) == state
    # without like: tuples come back as lists, values keep their Python types
    assert jckpt.restore(tmp_path) == {**state, "pair": [1, [2.5, None]]}


def test_prng_keys_typed_and_raw(tmp_path):
    state = {
        "typed": jax.random.key(42),
        "many": jax.random.split(jax.random.key(1), 4),
        "raw": jax.random.PRNGKey(3),
    }
    jckpt.save(tmp_path, state, step=0)
    restored = jckpt.restore(tmp_path, like=state)
    assert_trees_equal(restored, state)
    assert jax.dtypes.issubdtype(restored["typed"].dtype, jax.dtypes.prng_key)
    # the restored key produces the same random numbers
    np.testing.assert_array_equal(
        jax.random.normal(restored["typed"], (3,)), jax.random.normal(state["typed"], (3,))
    )
    assert jax.dtypes.issubdtype(jckpt.restore(tmp_path)["typed"].dtype, jax.dtypes.prng_key)


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "dense": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jnp.zeros(8)},
        "out": {"kernel": jax.random.normal(k2, (8, 2))},
    }


def test_optax_state_keeps_namedtuple_classes(tmp_path):
    params = _params()
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-3),
        optax.masked(optax.sgd(0.1), {"dense": {"kernel": True, "bias": False}, "out": {"kernel": True}}),
    )
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    for _ in range(3):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    adam = opt_state[1][0]  # ScaleByAdamState
    assert int(adam.count) == 3 and bool((adam.mu["dense"]["kernel"] != 0).all())  # really updated
    state = {"params": params, "opt_state": opt_state, "step": 3}
    jckpt.save(tmp_path, state, step=3)
    # Restore into a fresh optimizer state: every value must come from the checkpoint.
    restored = jckpt.restore(tmp_path, like={"params": params, "opt_state": tx.init(params), "step": 0})
    assert_trees_equal(restored, state)
    assert type(restored["opt_state"][1][0]) is type(adam)


def test_flax_linen_train_state(tmp_path):
    from flax.training import train_state

    params = _params()
    state = train_state.TrainState.create(apply_fn=lambda *a: None, params=params, tx=optax.adam(1e-3))
    jckpt.save(tmp_path, state, step=0)
    restored = jckpt.restore(tmp_path, like=state)
    assert isinstance(restored, train_state.TrainState)
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, state.opt_state)


def test_flax_nnx_state(tmp_path):
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(model)
    jckpt.save(tmp_path, state, step=0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = jckpt.restore(tmp_path, like=abstract)
    assert isinstance(restored, nnx.State)
    assert_trees_equal(restored, state)
    x = jnp.ones((1, 4))
    np.testing.assert_array_equal(nnx.merge(graphdef, restored)(x), model(x))


def test_like_casts_dtypes(tmp_path):
    value = jnp.linspace(-3, 3, 4096, dtype=jnp.float32).reshape(64, 64)
    jckpt.save(tmp_path, {"w": value}, step=0)
    restored = jckpt.restore(tmp_path, like={"w": jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)})
    assert restored["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["w"], value.astype(jnp.bfloat16))


def test_like_subset_reads_only_what_is_asked(tmp_path):
    params = {"w": jnp.ones((512, 512))}
    state = {"params": params, "opt": {"mu": jnp.full((512, 512), 2.0), "nu": jnp.full((512, 512), 3.0)}}
    jckpt.save(tmp_path, state, step=0)
    # remove the optimizer's data files: restoring params must not touch them
    manifest = Root(tmp_path).read_manifest(0)
    import shutil

    for leaf in manifest.leaves:
        if leaf.path.startswith("opt/"):
            source = next(iter(leaf.chunks.values()))[1]
            shutil.rmtree(tmp_path / source / leaf.array)
    restored = jckpt.restore(tmp_path, like={"params": params})
    assert_trees_equal(restored, {"params": params})
    with pytest.raises(jckpt.CorruptCheckpointError):
        jckpt.restore(tmp_path)


def test_restore_numpy_and_python_likes(tmp_path):
    jckpt.save(tmp_path, {"a": jnp.arange(6.0), "n": jnp.asarray(5)}, step=0)
    restored = jckpt.restore(tmp_path, like={"a": np.zeros(6, np.float32), "n": 0})
    assert isinstance(restored["a"], np.ndarray) and restored["a"].dtype == np.float32
    assert restored["n"] == 5 and type(restored["n"]) is int


def test_multiple_steps_latest_and_by_step(tmp_path):
    for step in (0, 10, 5):
        jckpt.save(tmp_path, {"v": np.full(3, step)}, step=step, metrics={"loss": 1.0 / (step + 1)})
    assert jckpt.all_steps(tmp_path) == [0, 5, 10]
    assert jckpt.latest_step(tmp_path) == 10
    assert jckpt.restore(tmp_path)["v"].tolist() == [10] * 3
    assert jckpt.restore(tmp_path, step=5)["v"].tolist() == [5] * 3
    info = jckpt.info(tmp_path, step=5)
    assert (info.step, info.kind, info.metrics) == (5, "full", {"loss": 1.0 / 6})


@pytest.mark.slow
def test_leaf_larger_than_2gib(tmp_path):
    big = np.arange(2**31 + 2**20, dtype=np.uint8)  # 2 GiB + 1 MiB, chunked
    jckpt.save(tmp_path, {"big": big}, step=0)
    manifest = Root(tmp_path).read_manifest(0)
    assert len(manifest.leaves[0].chunks) > 100
    restored = jckpt.restore(tmp_path)["big"]
    assert restored.shape == big.shape and np.array_equal(restored, big)
