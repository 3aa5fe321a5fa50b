"""Bad inputs (issue 9 defects 4, 5, 6 and the API items of 7): each is refused with a clear
jckpt error, a subclass of the matching standard exception, or round-trips exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jckpt


def _committed(root):
    return jckpt.all_steps(root)


# ------------------------------------------------------------------ defect 4: byte order

BIG_ENDIAN = [">i2", ">u2", ">i4", ">f4", ">i8", ">f8", ">c8", ">c16"]


def _byte_order_outcome(root, array, tally, scenario):
    """Either UnsupportedLeafError at save with nothing committed, or an exact round trip that verifies."""
    try:
        jckpt.save(root, {"x": array}, step=0)
    except jckpt.UnsupportedLeafError as e:
        ok = "'x'" in str(e) and _committed(root) == []
        tally.record(scenario, ok, "refused at save")
        assert ok, f"refusal must name the leaf and commit nothing: {e}"
        return
    try:
        jckpt.verify(root, 0)
        restored = jckpt.restore(root)["x"]
        ok = restored.shape == array.shape and np.array_equal(restored, array)
        outcome = "round trip exact" if ok else "WRONG VALUES"
    except jckpt.CorruptCheckpointError:
        ok, outcome = False, "committed but fails verify"
    tally.record(scenario, ok, outcome)
    assert ok, f"{array.dtype}: {outcome}"


@pytest.mark.parametrize("dtype", BIG_ENDIAN)
def test_big_endian_small_leaf_round_trips_or_is_refused(tmp_path, tally, dtype):
    _byte_order_outcome(tmp_path / "r", np.arange(8).astype(dtype), tally, "byte order: small leaf")


@pytest.mark.parametrize("dtype", [">i4", ">f8", ">c8"])
def test_big_endian_large_leaf_round_trips_or_is_refused(tmp_path, tally, dtype):
    array = np.arange(70_000).astype(dtype)  # > 256 KiB: a chunked array, not packed
    _byte_order_outcome(tmp_path / "r", array, tally, "byte order: large leaf")


def test_native_and_single_byte_orders_round_trip(tmp_path):
    for step, dtype in enumerate(["<i4", "=f8", "|u1", "|i1", "|b1"]):
        array = np.arange(8).astype(dtype)
        jckpt.save(tmp_path, {"x": array}, step=step)
        restored = jckpt.restore(tmp_path, step=step)["x"]
        assert restored.tobytes() == array.tobytes() and restored.dtype == array.dtype.newbyteorder("=")


# ------------------------------------------------------------------ defect 5: steps are integers

NOT_STEPS = [
    pytest.param(1.5, id="float"),
    pytest.param(2.0, id="integral-float"),
    pytest.param("3", id="str"),
    pytest.param(True, id="bool"),
    pytest.param(np.float64(4.0), id="np-float"),
    pytest.param(np.array([5]), id="1d-array"),
    pytest.param(np.array(6.0), id="0d-float-array"),
    pytest.param(np.bool_(True), id="np-bool"),
]


def _names(error: BaseException, value) -> bool:
    return repr(value) in str(error) or str(value) in str(error)


@pytest.mark.parametrize("value", NOT_STEPS)
def test_save_refuses_a_step_that_is_not_an_integer(tmp_path, tally, value):
    jckpt.save(tmp_path, {"x": 1}, step=100)
    try:
        jckpt.save(tmp_path, {"x": 2}, step=value)
    except TypeError as e:
        ok = _names(e, value)
        tally.record("steps: save(step=<not an int>)", ok, "TypeError" + ("" if ok else " not naming it"))
        assert ok, f"the TypeError must name the value {value!r}: {e}"
    else:
        tally.record("steps: save(step=<not an int>)", False, "accepted")
        pytest.fail(f"save(step={value!r}) was accepted (committed: {_committed(tmp_path)})")
    assert _committed(tmp_path) == [100]


@pytest.mark.parametrize(
    "op",
    [
        pytest.param("delete"),
        pytest.param("restore"),
        pytest.param("info"),
        pytest.param("verify"),
    ],
)
def test_step_arguments_refuse_floats(tmp_path, tally, op):
    jckpt.save(tmp_path, {"x": 7}, step=0)
    calls = {
        "delete": lambda: jckpt.delete(tmp_path, 0.9),
        "restore": lambda: jckpt.restore(tmp_path, step=0.9),
        "info": lambda: jckpt.info(tmp_path, 0.9),
        "verify": lambda: jckpt.verify(tmp_path, 0.9),
    }
    try:
        calls[op]()
    except TypeError as e:
        ok = "0.9" in str(e)
        outcome = "TypeError"
    except Exception as e:  # noqa: BLE001 - any other outcome is a failure, reported below
        ok, outcome = False, type(e).__name__
    else:
        ok, outcome = False, "accepted"
    tally.record("steps: delete/restore/info/verify(0.9)", ok, outcome)
    assert _committed(tmp_path) == [0], "step 0 must survive"
    assert ok, f"{op}(0.9): {outcome}"


@pytest.mark.parametrize(
    "value", [7, np.int32(7), np.int64(7), np.uint16(7), np.array(7), np.array(7, np.uint8), jnp.array(7)]
)
def test_integer_steps_are_accepted(tmp_path, value):
    info = jckpt.save(tmp_path, {"x": 1}, step=value)
    assert info.step == 7 and type(info.step) is int
    assert jckpt.all_steps(tmp_path) == [7]
    assert jckpt.restore(tmp_path, step=value) == {"x": 1}
    jckpt.delete(tmp_path, value)
    assert jckpt.all_steps(tmp_path) == []


def test_negative_step_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="-1"):
        jckpt.save(tmp_path, {"x": 1}, step=-1)
    assert jckpt.all_steps(tmp_path) == []


# ------------------------------------------------------------------ defect 6: deep trees


def _deep(kind: str, depth: int):
    tree = np.arange(3, dtype=np.int32)
    for i in range(depth):
        tree = {"k": tree} if kind == "dict" or (kind == "mixed" and i % 2) else [tree]
    return tree


def _walk_down(tree, depth):
    for _ in range(depth):
        tree = tree["k"] if isinstance(tree, dict) else tree[0]
    return tree


@pytest.mark.parametrize("kind", ["dict", "list", "mixed"])
def test_a_500_level_tree_restores_without_like(tmp_path, kind):
    jckpt.save(tmp_path, _deep(kind, 500), step=0)
    restored = jckpt.restore(tmp_path)
    leaf = _walk_down(restored, 500)
    assert isinstance(leaf, np.ndarray) and leaf.tolist() == [0, 1, 2]
    jckpt.verify(tmp_path)


def test_a_500_level_tree_restores_with_like(tmp_path):
    tree = _deep("mixed", 500)
    jckpt.save(tmp_path, tree, step=0)
    restored = jckpt.restore(tmp_path, like=tree)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(tree)
    assert _walk_down(restored, 500).tolist() == [0, 1, 2]


# ------------------------------------------------------------------ defect 7: clear errors (API)


@pytest.mark.parametrize(
    "chunk_bytes",
    [
        pytest.param(0),
        pytest.param(-5),
        pytest.param(2.5),
    ],
)
def test_save_options_refuse_a_bad_chunk_size(tmp_path, tally, chunk_bytes):
    state = {"x": np.arange(64, dtype=np.float32)}
    try:
        jckpt.save(tmp_path, state, step=0, options=jckpt.SaveOptions(chunk_bytes=chunk_bytes))
    except (ValueError, TypeError) as e:
        ok, outcome = "chunk_bytes" in str(e), "refused"
    except Exception as e:  # noqa: BLE001
        ok, outcome = False, type(e).__name__
    else:
        ok, outcome = False, "accepted"
    tally.record("SaveOptions(chunk_bytes=<bad>)", ok, outcome)
    assert jckpt.all_steps(tmp_path) == [] or np.array_equal(jckpt.restore(tmp_path)["x"], state["x"]), (
        "a step was committed that restores wrong values"
    )
    assert ok, outcome


def test_prng_key_like_for_a_plain_leaf_is_a_tree_mismatch(tmp_path):
    jckpt.save(tmp_path, {"u": np.zeros(2, np.uint32)}, step=0)
    with pytest.raises(jckpt.TreeMismatchError, match="'u'"):
        jckpt.restore(tmp_path, like={"u": jax.random.key(0)})


def test_saving_a_tracer_is_an_unsupported_leaf(tmp_path):
    @jax.jit
    def step(x):
        jckpt.save(tmp_path, {"params": {"w": x}}, step=0)
        return x

    with pytest.raises(jckpt.UnsupportedLeafError, match="params/w"):
        step(jnp.ones(3))
    assert jckpt.all_steps(tmp_path) == []


def test_saving_into_a_file_names_the_path(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_bytes(b"precious")
    with pytest.raises((NotADirectoryError, FileExistsError)) as caught:
        jckpt.save(path, {"x": 1}, step=0)
    assert str(path) in str(caught.value) and "lock" not in str(caught.value)
    assert path.read_bytes() == b"precious"


def test_restoring_from_a_file_is_not_found(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_bytes(b"precious")
    with pytest.raises((FileNotFoundError, NotADirectoryError)):
        jckpt.restore(path)
    assert path.read_bytes() == b"precious"


def test_a_top_level_list_restores_as_a_list_without_like(tmp_path):
    jckpt.save(tmp_path, [np.arange(2), (3, [4.5])], step=0)
    restored = jckpt.restore(tmp_path)
    assert isinstance(restored, list) and len(restored) == 2
    assert restored[0].tolist() == [0, 1] and restored[1] == [3, [4.5]]
