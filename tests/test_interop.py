"""Export and import: safetensors (checked by the safetensors package), npz, Orbax (written by Orbax)."""

import json
import os
import pathlib
import re
import struct
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jckpt
from jckpt import interop
from jckpt.interop import _source, _spool
from jckpt.interop import safetensors as st_lib

safetensors = pytest.importorskip("safetensors")
ocp = pytest.importorskip("orbax.checkpoint")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402


def _dtype(name):
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def _bits(name, n=64, seed=0):
    """``n`` values of dtype ``name`` from random bit patterns (NaNs and infinities included)."""
    dtype = _dtype(name)
    if name in ("int4", "uint4", "int2", "uint2"):
        info = ml_dtypes.iinfo(dtype)
        return np.arange(n).astype(np.int64) % (info.max - info.min + 1) + info.min
    raw = np.random.default_rng(seed).integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype)


def _value(name, n=64):
    values = _bits(name, n)
    return values.astype(_dtype(name)) if values.dtype != _dtype(name) else values


def _key_name(entry):
    return str(_source.key_name(entry))


def flat(tree):
    """{"a.b.0": numpy value} of a tree's leaves (None leaves skipped)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): np.asarray(leaf) for path, leaf in leaves}


def assert_same(actual: dict, expected: dict):
    """Same names, dtypes, shapes and bytes (NaN payloads included)."""
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        got = np.asarray(actual[name])
        assert got.dtype == value.dtype, (name, got.dtype, value.dtype)
        assert got.shape == value.shape, (name, got.shape, value.shape)
        assert got.tobytes() == value.tobytes(), name


@pytest.fixture
def state():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "layers": [
                {
                    "kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16),
                    "bias": np.zeros(4, np.float32),
                },
                {
                    "kernel": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
                    "bias": np.ones(2, np.float16),
                },
            ],
            "scale": _value("float8_e4m3fn", 16),
        },
        "opt": {"count": np.int64(7), "mask": np.array([True, False])},
        "step": 3,
        "nothing": None,
    }


def _expected(state):
    """What an export of ``state`` holds: every non-None leaf by dotted name, as numpy."""
    return flat(state)


@pytest.fixture
def root(tmp_path, state):
    jckpt.save(tmp_path / "root", state, step=5)
    return tmp_path / "root"


# -- safetensors ----------------------------------------------------------------------------------


def test_safetensors_export_reads_back_with_the_safetensors_loader(root, state, tmp_path):
    info = interop.export(root, tmp_path / "hf")
    assert os.listdir(tmp_path / "hf") == ["model.safetensors"]
    assert info.files == [str(tmp_path / "hf" / "model.safetensors")] and info.step == 5
    expected = {k: v for k, v in _expected(state).items() if k != "params.scale"}  # fp8: next test
    with safe_open(tmp_path / "hf" / "model.safetensors", "np") as f:  # its numpy loader has no fp8
        loaded = {k: f.get_tensor(k) for k in f.keys() if k != "params.scale"}
    assert_same(loaded, expected)


def test_safetensors_keeps_bf16_and_fp8_dtypes(tmp_path):
    values = {name: _value(name) for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float16")}
    jckpt.save(tmp_path / "root", values, step=0)
    interop.export(tmp_path / "root", tmp_path / "hf")
    raw = dict(safetensors.deserialize((tmp_path / "hf" / "model.safetensors").read_bytes()))
    codes = {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float16": "F16"}
    for name, value in values.items():
        assert raw[name]["dtype"] == codes[name]
        assert bytes(raw[name]["data"]) == value.tobytes()  # bit-exact, NaN patterns included


@pytest.mark.parametrize(
    "name, code",
    [
        ("int4", "U8"),
        ("uint4", "U8"),
        ("float8_e4m3b11fnuz", "U8"),
        ("float8_e3m4", "U8"),
        ("complex128", "U64"),
    ],
)
def test_safetensors_stores_unnamed_dtypes_as_raw_bits_and_imports_them_exactly(tmp_path, name, code):
    value = _value(name, 12).reshape(3, 4)
    jckpt.save(tmp_path / "root", {"w": value}, step=0)
    interop.export(tmp_path / "root", tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "np") as f:
        assert f.get_slice("w").get_dtype() == code
        assert json.loads(f.metadata()["jckpt.dtypes"]) == {"w": name}
    interop.import_from(tmp_path / "hf", tmp_path / "back", step=0)
    assert_same(flat(jckpt.restore(tmp_path / "back")), {"w": value})


def test_sharded_export_writes_hf_shards_and_an_index(tmp_path):
    tensors = {f"w{i}": np.full((100,), i, np.float32) for i in range(10)}  # 400 bytes each
    jckpt.save(tmp_path / "root", tensors, step=0)
    interop.export(tmp_path / "root", tmp_path / "hf", max_shard_size="1KB")  # 2 tensors per shard
    names = [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert sorted(os.listdir(tmp_path / "hf")) == sorted([*names, "model.safetensors.index.json"])
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4000
    assert sorted(index["weight_map"]) == sorted(tensors)
    for file_name in names:
        with safe_open(tmp_path / "hf" / file_name, "np") as f:
            assert len(f.keys()) == 2
            for key in f.keys():
                assert index["weight_map"][key] == file_name
                assert (f.get_tensor(key) == tensors[key]).all()


def test_a_tensor_above_max_shard_size_gets_a_shard_of_its_own(tmp_path):
    jckpt.save(tmp_path / "root", {"a": np.zeros(10, np.uint8), "b": np.zeros(5000, np.uint8)}, step=0)
    interop.export(tmp_path / "root", tmp_path / "hf", max_shard_size=1000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }


@pytest.mark.parametrize(
    "size, expected",
    [(100, 100), ("100", 100), ("100B", 100), ("100KB", 100_000), ("100kb", 100_000), ("1.5MB", 1_500_000),
     ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("64KiB", 65536), ("1TB", 10**12)],
)  # fmt: skip
def test_max_shard_size_units_are_decimal_like_hugging_face(size, expected):
    assert st_lib.parse_size(size) == expected


@pytest.mark.parametrize("size", [0, -1, "", "5 GBs", "GB", "1e9", True, "-5GB"])
def test_a_bad_max_shard_size_is_a_value_error(root, tmp_path, size):
    with pytest.raises(ValueError):
        interop.export(root, tmp_path / "hf", max_shard_size=size)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "select, names",
    [
        ("params.*", ["params.layers.0.bias", "params.layers.0.kernel", "params.layers.1.bias",
                      "params.layers.1.kernel", "params.scale"]),
        ("*.kernel", ["params.layers.0.kernel", "params.layers.1.kernel"]),
        (["step", "opt.c*"], ["opt.count", "step"]),
        ("params.layers.[1]*", ["params.layers.1.bias", "params.layers.1.kernel"]),
    ],
)  # fmt: skip
def test_select_exports_the_names_matching_a_pattern(root, tmp_path, select, names):
    info = interop.export(root, tmp_path / "hf", select=select)
    assert sorted(info.names) == names
    with safe_open(tmp_path / "hf" / "model.safetensors", "np") as f:
        assert sorted(f.keys()) == names


def test_select_matching_nothing_is_an_error(root, tmp_path):
    with pytest.raises(ValueError, match="matches none"):
        interop.export(root, tmp_path / "hf", select="nope.*")


def test_import_reads_a_file_written_by_the_safetensors_package(tmp_path):
    tensors = {
        "model.embed.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "model.layers.0.b": np.ones(3),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    info = interop.import_from(tmp_path / "x.safetensors", tmp_path / "root", step=1)
    assert not info.metadata
    assert info.lineage["origin"] == f"imported from safetensors:{tmp_path / 'x.safetensors'}"
    restored = jckpt.restore(tmp_path / "root")
    assert restored["model"]["layers"]["0"]["b"].dtype == np.float64  # numeric parts are dict keys
    assert_same(flat(restored), tensors)


def test_import_of_a_sharded_hf_directory_uses_its_index(tmp_path):
    tensors = {f"layer.{i}.w": np.full((50,), i, np.int32) for i in range(6)}
    jckpt.save(tmp_path / "root", tensors, step=0)
    interop.export(tmp_path / "root", tmp_path / "hf", max_shard_size=400)
    (tmp_path / "hf" / "README.md").write_text("not a tensor")
    interop.import_from(tmp_path / "hf", tmp_path / "back", step=0)
    assert_same(flat(jckpt.restore(tmp_path / "back")), tensors)
    interop.import_from(tmp_path / "hf" / "model.safetensors.index.json", tmp_path / "back", step=1)
    assert_same(flat(jckpt.restore(tmp_path / "back", step=1)), tensors)


def test_an_index_naming_a_missing_shard_is_unsupported(tmp_path):
    jckpt.save(tmp_path / "root", {f"w{i}": np.zeros(100, np.uint8) for i in range(3)}, step=0)
    interop.export(tmp_path / "root", tmp_path / "hf", max_shard_size=100)
    os.remove(tmp_path / "hf" / "model-00002-of-00003.safetensors")
    with pytest.raises(interop.UnsupportedSourceError, match="model-00002-of-00003.safetensors"):
        interop.import_from(tmp_path / "hf", tmp_path / "back", step=0)


def test_import_restores_with_a_like_that_uses_lists(root, tmp_path, state):
    interop.export(root, tmp_path / "hf")
    interop.import_from(tmp_path / "hf", tmp_path / "back", step=0)
    like = {"params": {"layers": [{"kernel": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16)}]}}
    restored = jckpt.restore(tmp_path / "back", like=like)
    np.testing.assert_array_equal(
        restored["params"]["layers"][0]["kernel"], state["params"]["layers"][0]["kernel"]
    )


def test_import_memory_maps_safetensors_instead_of_loading_them(tmp_path):
    save_file({"w": np.ones((256, 256), np.float32)}, tmp_path / "x.safetensors")
    [(name, array)] = st_lib.read(tmp_path / "x.safetensors")
    assert isinstance(array.base, np.memmap) or isinstance(array, np.memmap)


# -- npz ------------------------------------------------------------------------------------------


def test_npz_export_reads_back_with_numpy(root, state, tmp_path):
    interop.export(root, tmp_path / "x.npz", format="npz")
    with np.load(tmp_path / "x.npz") as npz:
        assert sorted(npz.files) == sorted([*_expected(state), "__jckpt_dtypes__"])
        assert json.loads(str(npz["__jckpt_dtypes__"])) == {
            "params.layers.0.kernel": "bfloat16",
            "params.scale": "float8_e4m3fn",
        }
        kernel = npz["params.layers.0.kernel"]
        assert kernel.dtype == np.uint16  # raw bits; .view(ml_dtypes.bfloat16) gives the values
        assert (
            kernel.view(ml_dtypes.bfloat16).tobytes()
            == np.asarray(state["params"]["layers"][0]["kernel"]).tobytes()
        )
        np.testing.assert_array_equal(npz["opt.mask"], state["opt"]["mask"])
        assert npz["step"].shape == () and npz["step"] == 3


DTYPES = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
          "float8_e4m3b11fnuz", "float8_e8m0fnu", "float4_e2m1fn", "int4", "uint4", "int2", "float16",
          "complex64", "int64", "bool"]  # fmt: skip


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_low_precision_dtypes_round_trip_bit_exact(tmp_path, fmt):
    values = {name.replace("_", "-"): _value(name).reshape(8, 8) for name in DTYPES if name != "bool"}
    values["bool"] = np.arange(64).reshape(8, 8) % 3 == 0
    jckpt.save(tmp_path / "root", values, step=0)
    dest = tmp_path / ("x.npz" if fmt == "npz" else "hf")
    interop.export(tmp_path / "root", dest, format=fmt)
    interop.import_from(dest, tmp_path / "back", step=0)
    assert_same(flat(jckpt.restore(tmp_path / "back")), values)


@pytest.mark.parametrize("compressed", [False, True])
def test_import_reads_npz_written_by_numpy(tmp_path, compressed):
    arrays = {
        "a.b": np.arange(10.0),
        "a.c": np.asfortranarray(np.arange(12).reshape(3, 4)),
        "d": np.float32(2),
    }
    (np.savez_compressed if compressed else np.savez)(tmp_path / "x.npz", **arrays)
    interop.import_from(tmp_path / "x.npz", tmp_path / "root", step=0)
    restored = jckpt.restore(tmp_path / "root")
    assert_same(flat(restored), {k: np.asarray(v) for k, v in arrays.items()})


def test_npz_with_python_objects_is_unsupported(tmp_path):
    np.savez(tmp_path / "x.npz", ok=np.ones(2), bad=np.array([{"a": 1}], dtype=object))
    with pytest.raises(interop.UnsupportedSourceError, match="Python objects"):
        interop.import_from(tmp_path / "x.npz", tmp_path / "root", step=0)


# -- Orbax ----------------------------------------------------------------------------------------


def _orbax_state():
    return {
        "params": {
            "layers": [
                {"kernel": jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4)},
                {"kernel": np.arange(6, dtype=np.float32)},
            ],
            "f8": np.arange(5).astype(ml_dtypes.float8_e5m2),
            "i4": np.arange(-4, 4).astype(ml_dtypes.int4),
        },
        "step": 12,
        "lr": np.float32(0.5),
        "empty": None,
    }


def _restored_by_orbax(path):
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(path)


def _check_import(source, tmp_path, saved):
    """Imports ``source``: the tree Orbax restores, with the dtypes and bytes of what was ``saved``."""
    info = interop.import_from(source, tmp_path / "root", step=3)
    assert info.lineage["origin"] == f"imported from orbax:{source}"
    restored = jckpt.restore(tmp_path / "root", step=3)
    by_orbax = _restored_by_orbax(source)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(by_orbax)
    assert_same(flat(restored), flat(saved))  # Orbax itself gives Python floats for float32 scalars
    return restored


def test_import_of_a_standard_checkpointer_directory(tmp_path):
    state = _orbax_state()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "orbax", state)
    restored = _check_import(tmp_path / "orbax", tmp_path, state)
    assert isinstance(restored["params"]["layers"], list)  # Orbax recorded a sequence
    assert restored["empty"] is None
    assert restored["lr"].dtype == np.float32 and restored["step"].dtype == np.int64


@pytest.mark.parametrize("use_ocdbt", [True, False])
@pytest.mark.parametrize("use_zarr3", [False, True])
def test_import_of_a_pytree_checkpointer_directory(tmp_path, use_ocdbt, use_zarr3):
    state = _orbax_state()
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(tmp_path / "orbax", state)
    assert (tmp_path / "orbax" / "manifest.ocdbt").exists() == use_ocdbt
    _check_import(tmp_path / "orbax", tmp_path, state)


def test_import_of_a_sharded_jax_array_saved_by_orbax(tmp_path):
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y"))
    value = jax.device_put(jnp.arange(64 * 6, dtype=jnp.float32).reshape(64, 6), sharding)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "orbax", {"w": value})
    interop.import_from(tmp_path / "orbax", tmp_path / "root", step=0)
    np.testing.assert_array_equal(jckpt.restore(tmp_path / "root")["w"], np.asarray(value))


def test_import_of_a_checkpoint_manager_step_directory(tmp_path):
    state = _orbax_state()
    options = ocp.CheckpointManagerOptions(best_fn=lambda metrics: metrics["loss"])  # keeps metrics
    with ocp.CheckpointManager(tmp_path / "run", item_names=("state", "extra"), options=options) as manager:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave({"note": "hi"}))
        manager.save(100, args=args, metrics={"loss": 0.5})
        manager.wait_until_finished()
    with pytest.raises(interop.UnsupportedSourceError, match=r"CheckpointManager root with steps \[100\]"):
        interop.import_from(tmp_path / "run", tmp_path / "root", step=3)
    with pytest.warns(UserWarning, match="extra"):
        info = interop.import_from(tmp_path / "run" / "100", tmp_path / "root", step=3)
    assert info.metadata["skipped"] == ["extra"]
    assert jckpt.info(tmp_path / "root", 3).metrics == {"loss": 0.5}
    assert_same(flat(jckpt.restore(tmp_path / "root", step=3)), flat(state))
    # The item subdirectory itself imports the same tree.
    interop.import_from(tmp_path / "run" / "100" / "state", tmp_path / "root", step=4)
    assert_same(flat(jckpt.restore(tmp_path / "root", step=4)), flat(state))


def test_import_of_a_manager_step_with_several_pytree_items_nests_them_by_item(tmp_path):
    with ocp.CheckpointManager(tmp_path / "run", item_names=("params", "opt")) as manager:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave({"w": np.ones(3)}), opt=ocp.args.StandardSave({"mu": np.zeros(3)})
        )
        manager.save(1, args=args)
        manager.wait_until_finished()
    interop.import_from(tmp_path / "run" / "1", tmp_path / "root", step=1)
    assert_same(flat(jckpt.restore(tmp_path / "root")), {"params.w": np.ones(3), "opt.mu": np.zeros(3)})


def test_orbax_string_leaves_are_skipped_with_a_warning(tmp_path):
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "orbax", {"w": np.ones(2), "name": "run-1"})
    with pytest.warns(UserWarning, match="name"):
        info = interop.import_from(tmp_path / "orbax", tmp_path / "root", step=0)
    assert info.metadata["skipped"] == ["name (string)"]
    assert_same(flat(jckpt.restore(tmp_path / "root")), {"w": np.ones(2)})


@pytest.mark.parametrize("checkpointer", ["StandardCheckpointer", "PyTreeCheckpointer"])
def test_orbax_export_restores_with_orbax_as_the_same_tree(root, tmp_path, checkpointer):
    interop.export(root, tmp_path / "orbax", format="orbax")
    with getattr(ocp, checkpointer)() as reader:
        restored = reader.restore(tmp_path / "orbax")
    ours = jckpt.restore(root)
    del ours["nothing"]  # None leaves are not exported
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(ours)
    assert_same(flat(restored), flat(ours))


def test_orbax_export_imports_back(root, tmp_path):
    interop.export(root, tmp_path / "orbax", format="orbax")
    interop.import_from(tmp_path / "orbax", tmp_path / "back", step=0)
    ours = jckpt.restore(root)
    del ours["nothing"]
    assert_same(flat(jckpt.restore(tmp_path / "back")), flat(ours))


def test_orbax_export_refuses_a_dtype_zarr_cannot_store(tmp_path):
    jckpt.save(tmp_path / "root", {"w": np.arange(4).astype(ml_dtypes.uint4)}, step=0)
    with pytest.raises(jckpt.UnsupportedLeafError, match="'w'.*uint4"):
        interop.export(tmp_path / "root", tmp_path / "orbax", format="orbax")
    assert not (tmp_path / "orbax").exists()


# -- errors, atomicity, streaming -----------------------------------------------------------------


def test_a_directory_of_other_things_is_an_unsupported_source_saying_what_is_there(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    (tmp_path / "src" / "runs").mkdir()
    with pytest.raises(interop.UnsupportedSourceError) as error:
        interop.import_from(tmp_path / "src", tmp_path / "root", step=0)
    message = str(error.value)
    assert "a directory holding notes.txt, runs/" in message
    assert "not an Orbax checkpoint, safetensors or npz" in message
    assert isinstance(error.value, ValueError)
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize(
    "content, found",
    [(b"", "a file of 0 bytes"), (b"hello world", "a file of 11 bytes starting with b'hello wo'"),
     (b"PK\x05\x06" + bytes(18), "a file of 22 bytes")],
)  # fmt: skip
def test_an_unreadable_file_is_an_unsupported_source(tmp_path, content, found):
    (tmp_path / "x.bin").write_bytes(content)
    with pytest.raises(interop.UnsupportedSourceError, match=f"{found}.*not a safetensors or npz file"):
        interop.import_from(tmp_path / "x.bin", tmp_path / "root", step=0)


def test_a_jckpt_root_is_not_an_import_source(root, tmp_path):
    with pytest.raises(interop.UnsupportedSourceError, match="jckpt checkpoint root"):
        interop.import_from(root, tmp_path / "other", step=0)


def test_a_missing_source_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        interop.import_from(tmp_path / "nope", tmp_path / "root", step=0)


def test_a_format_that_does_not_match_the_source_is_unsupported(tmp_path):
    save_file({"w": np.ones(2)}, tmp_path / "x.safetensors")
    with pytest.raises(interop.UnsupportedSourceError, match="not an Orbax directory"):
        interop.import_from(tmp_path / "x.safetensors", tmp_path / "root", step=0, format="orbax")
    with pytest.raises(interop.UnsupportedSourceError, match="not an .npz"):
        interop.import_from(tmp_path / "x.safetensors", tmp_path / "root", step=0, format="npz")


def test_a_truncated_safetensors_file_is_unsupported(tmp_path):
    save_file({"w": np.ones(100)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-8])
    with pytest.raises(interop.UnsupportedSourceError, match="data_offsets"):
        interop.import_from(tmp_path / "x.safetensors", tmp_path / "root", step=0)


@pytest.mark.parametrize(
    "path, fmt",
    [("hf", "safetensors"), ("x.npz", "npz"), ("orbax", "orbax")],
)
def test_detect_format(root, tmp_path, path, fmt):
    interop.export(root, tmp_path / path, format=fmt)
    assert interop.detect_format(tmp_path / path) == fmt
    if fmt == "safetensors":
        assert interop.detect_format(tmp_path / path / "model.safetensors") == fmt


def test_export_refuses_an_existing_destination(root, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        interop.export(root, tmp_path / "hf")
    assert os.listdir(tmp_path / "hf") == ["keep.txt"]
    interop.export(root, tmp_path / "empty_dir_is_fine")
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(FileExistsError):
        interop.export(root, tmp_path / "x.npz", format="npz")


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    jckpt.save(tmp_path / "root", {"a": np.ones(10), "b": np.ones((1000, 100))}, step=0)
    chunks = [p for p in (tmp_path / "root").rglob("*") if p.is_file() and "/c/" in str(p)]
    chunks[0].write_bytes(b"\0" * chunks[0].stat().st_size)  # corrupt b's data
    for fmt, dest in [("safetensors", "hf"), ("npz", "x.npz"), ("orbax", "orbax")]:
        with pytest.raises(jckpt.CorruptCheckpointError):
            interop.export(tmp_path / "root", tmp_path / dest, format=fmt)
    assert sorted(os.listdir(tmp_path)) == ["root"]


def test_export_restores_in_bounded_groups(tmp_path, monkeypatch):
    tensors = {f"w{i}": np.full((1000,), i, np.float32) for i in range(10)}  # 4000 bytes each
    tensors["big"] = np.zeros(5000, np.float64)  # 40000 bytes: over the budget, alone
    jckpt.save(tmp_path / "root", tensors, step=0)
    calls = []
    restore = jckpt.restore

    def recording_restore(directory, like=None, *, step=None):
        calls.append(sorted(flat(like)))
        return restore(directory, like=like, step=step)

    monkeypatch.setattr(jckpt, "restore", recording_restore)
    monkeypatch.setattr(_source, "GROUP_BYTES", 10_000)
    interop.export(tmp_path / "root", tmp_path / "hf")
    assert sorted(name for call in calls for name in call) == sorted(tensors)
    assert ["big"] in calls
    assert all(len(call) <= 2 for call in calls if call != ["big"])  # 2 x 4000 bytes <= 10000
    assert_same(load_file(tmp_path / "hf" / "model.safetensors"), tensors)


def test_names_that_collide_are_an_export_error(tmp_path):
    jckpt.save(tmp_path / "root", {"a.b": np.ones(1), "a": {"b": np.zeros(1)}}, step=0)
    with pytest.raises(ValueError, match="both export as 'a.b'"):
        interop.export(tmp_path / "root", tmp_path / "hf")


def test_export_of_an_explicit_step_and_of_the_latest(tmp_path):
    jckpt.save(tmp_path / "root", {"w": np.zeros(2)}, step=1)
    jckpt.save(tmp_path / "root", {"w": np.ones(2)}, step=2)
    assert interop.export(tmp_path / "root", tmp_path / "latest").step == 2
    interop.export(tmp_path / "root", tmp_path / "first", step=1)
    assert (load_file(tmp_path / "latest" / "model.safetensors")["w"] == 1).all()
    assert (load_file(tmp_path / "first" / "model.safetensors")["w"] == 0).all()
    with pytest.raises(jckpt.CheckpointNotFoundError):
        interop.export(tmp_path / "nothing", tmp_path / "x")


def test_import_keeps_user_metadata_next_to_the_origin(tmp_path):
    save_file({"w": np.ones(2)}, tmp_path / "x.safetensors")
    info = interop.import_from(tmp_path / "x.safetensors", tmp_path / "root", step=0, metadata={"run": "a"})
    assert info.metadata == {"run": "a"}
    assert info.lineage["origin"] == f"imported from safetensors:{tmp_path / 'x.safetensors'}"


def test_safetensors_header_is_8_byte_aligned_and_covers_the_file(root, tmp_path):
    interop.export(root, tmp_path / "hf")
    data = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    assert (
        max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__") == len(data) - 8 - length
    )


def _traced_peak(fn):
    """Peak bytes of Python and numpy allocations while ``fn`` runs (tensorstore's own buffers excluded)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt, dest", [("safetensors", "hf"), ("npz", "x.npz"), ("orbax", "orbax")])
def test_export_and_import_hold_a_bounded_amount_of_host_memory(tmp_path, monkeypatch, fmt, dest):
    leaf = 512 * 2**10
    tensors = {f"w{i}": np.full(leaf // 4, i, np.float32) for i in range(32)}  # 16 MiB in all
    jckpt.save(tmp_path / "root", tensors, step=0)
    monkeypatch.setattr(_source, "GROUP_BYTES", 2 * leaf)
    monkeypatch.setattr(interop.orbax, "SLAB_BYTES", leaf // 2)
    monkeypatch.setattr(_spool, "IN_MEMORY_BYTES", leaf)  # small Orbax leaves stay in RAM up to this
    export_peak = _traced_peak(lambda: interop.export(tmp_path / "root", tmp_path / dest, format=fmt))
    assert export_peak < 4 * leaf  # one group (2 leaves) and some slack, not 32 leaves
    import_peak = _traced_peak(lambda: interop.import_from(tmp_path / dest, tmp_path / "back", step=0))
    assert import_peak < 4 * leaf  # memory-mapped or spooled to files, not loaded
    assert_same(flat(jckpt.restore(tmp_path / "back")), tensors)


def test_exported_tensors_start_aligned_so_readers_map_them_without_copies(tmp_path):
    tensors = {
        "flag": np.ones(3, bool),
        "half": np.ones(5, np.float16),
        "w": np.ones(7),
        "i": np.ones(3, np.int32),
    }
    jckpt.save(tmp_path / "root", tensors, step=0)
    interop.export(tmp_path / "root", tmp_path / "hf")
    header, start = st_lib.read_header(tmp_path / "hf" / "model.safetensors")
    assert start % 8 == 0
    for name, value in tensors.items():
        assert header[name]["data_offsets"][0] % value.dtype.itemsize == 0, name
    interop.export(tmp_path / "root", tmp_path / "x.npz", format="npz")
    for name, array in interop.npz.read(tmp_path / "x.npz", _spool.Spool(tmp_path)):
        assert isinstance(array, np.memmap) and array.ctypes.data % 64 == 0, name


@pytest.mark.parametrize("doc", ["docs/deploying.md", "docs/migrating-from-orbax.md"])
def test_documented_python_runs(doc, tmp_path, monkeypatch):
    """Every ```python block of the page, in order, as one session."""
    monkeypatch.chdir(tmp_path)
    page = pathlib.Path(__file__).resolve().parents[1] / doc
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert blocks
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{doc} block {i}", "exec", dont_inherit=True), namespace)


@pytest.mark.parametrize("fmt, dest", [("safetensors", "hf"), ("npz", "x.npz"), ("orbax", "orbax")])
def test_empty_and_scalar_arrays_round_trip(tmp_path, fmt, dest):
    tensors = {
        "empty": np.zeros((0, 3), np.float32),
        "none": np.zeros(0, ml_dtypes.bfloat16),
        "s": np.float16(2),
    }
    jckpt.save(tmp_path / "root", tensors, step=0)
    interop.export(tmp_path / "root", tmp_path / dest, format=fmt)
    interop.import_from(tmp_path / dest, tmp_path / "back", step=0)
    assert_same(flat(jckpt.restore(tmp_path / "back")), {k: np.asarray(v) for k, v in tensors.items()})


def test_progress_bars_go_to_stderr_only(root, tmp_path, capsys):
    interop.export(root, tmp_path / "hf", progress=True)
    interop.import_from(tmp_path / "hf", tmp_path / "back", step=0, progress=True)
    assert capsys.readouterr().out == ""


def test_import_into_a_committed_step_is_refused_before_reading(tmp_path, monkeypatch):
    save_file({"w": np.ones(2)}, tmp_path / "x.safetensors")
    jckpt.save(tmp_path / "root", {"w": np.zeros(2)}, step=0)
    monkeypatch.setattr(st_lib, "read", lambda source: pytest.fail("read the source"))
    with pytest.raises(jckpt.StepExistsError):
        interop.import_from(tmp_path / "x.safetensors", tmp_path / "root", step=0)


def test_a_tree_that_is_one_array_has_no_name_to_export(tmp_path):
    jckpt.save(tmp_path / "root", np.ones(3), step=0)
    with pytest.raises(ValueError, match="no key path"):
        interop.export(tmp_path / "root", tmp_path / "hf")


def test_a_bad_index_is_an_unsupported_source(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(interop.UnsupportedSourceError, match="not a safetensors index"):
        interop.import_from(tmp_path / "hf", tmp_path / "root", step=0)
