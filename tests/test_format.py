"""On-disk format: relative, batched, inspectable without array data, deletable."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal

import jckpt
from jckpt import format as fmt
from jckpt import write as write_lib
from jckpt.root import Root


def _files(root):
    return [p for p in root.rglob("*") if p.is_file()]


def test_thousands_of_small_leaves_cost_a_handful_of_files(tmp_path):
    state = {f"layer_{i}": np.full(256, i, np.float32) for i in range(2000)}  # 1 KiB each
    jckpt.save(tmp_path, state, step=0)
    assert len(_files(tmp_path)) <= 5  # marker, manifest, packed-p0 zarr.json + 1 chunk
    restored = jckpt.restore(tmp_path)
    assert all(restored[k][0] == i for i, k in enumerate(state))


def test_a_moved_root_still_restores(tmp_path):
    state = {"w": np.arange(100_000, dtype=np.float32), "b": np.ones(3)}
    jckpt.save(tmp_path / "a", state, step=0)
    shutil.move(tmp_path / "a", tmp_path / "b")
    np.testing.assert_array_equal(jckpt.restore(tmp_path / "b")["w"], state["w"])
    jckpt.verify(tmp_path / "b")


def test_info_reads_only_the_manifest(tmp_path):
    jckpt.save(
        tmp_path,
        {"w": np.ones(100_000)},
        step=4,
        metrics={"loss": 0.25},
        metadata={"config": {"lr": 0.1}, "git": "abc123"},
    )
    for path in _files(tmp_path):
        if path.parent.name != fmt.MANIFESTS and path.name != fmt.ROOT_MARKER:
            path.unlink()
    info = jckpt.info(tmp_path)
    assert (info.step, info.kind, info.metrics, info.metadata) == (
        4,
        "full",
        {"loss": 0.25},
        {"config": {"lr": 0.1}, "git": "abc123"},
    )
    assert info.bytes_total == 800_000 and info.bytes_written >= 800_000
    assert info.created > 0 and info.save_seconds > 0


def test_delete_removes_one_step_and_its_files(tmp_path):
    for step in range(3):
        jckpt.save(tmp_path, {"w": np.full(100_000, step)}, step=step)
    jckpt.delete(tmp_path, 1)
    assert jckpt.all_steps(tmp_path) == [0, 2]
    assert not (tmp_path / fmt.step_name(1)).exists()
    for step in (0, 2):
        assert jckpt.restore(tmp_path, step=step)["w"][0] == step
    jckpt.save(tmp_path, {"w": np.full(10, 9)}, step=1)  # the number can be reused
    assert jckpt.restore(tmp_path, step=1)["w"][0] == 9


def test_manifest_records_hash_and_holder_of_every_chunk(tmp_path):
    jckpt.save(
        tmp_path,
        {"w": np.ones((128, 1024), np.float32)},
        step=0,
        options=jckpt.SaveOptions(chunk_bytes=128 * 1024),
    )
    raw = json.loads((tmp_path / fmt.manifest_key(0)).read_bytes())
    assert (raw["format"], raw["version"], raw["hash"]) == ("jckpt", 4, "xxh3_128")
    assert raw["checksum"].startswith("xxh3_128:")
    manifest = Root(tmp_path).read_manifest(0)
    assert manifest.codecs == {manifest.data_dir: None}
    (leaf,) = manifest.leaves
    assert leaf.storage == fmt.CHUNKED and leaf.chunk_shape == (32, 1024)
    assert sorted(leaf.chunks) == ["0.0", "1.0", "2.0", "3.0"]
    for digest, holder in leaf.chunks.values():
        assert len(digest) == 32 and holder.startswith(fmt.step_name(0) + "/d")
        assert (tmp_path / holder / leaf.array / "zarr.json").exists()


def test_an_incremental_save_reads_reused_chunks_with_their_own_codec(tmp_path):
    """The manifest names each data directory's codec: arrays open without their zarr.json
    (written for other tools on local roots only; tests/test_object_store.py has buckets)."""
    root = str(tmp_path)
    options = {c: jckpt.SaveOptions(chunk_bytes=64 * 1024, compression=c) for c in ("zstd", None)}
    state = {"w": np.arange(80_000, dtype=np.float32), "small": [np.full(9, i) for i in range(3)]}
    jckpt.save(root, state, step=0, options=options["zstd"])
    state["w"][:10] += 1  # one chunk of five changes
    state["small"][1] = state["small"][1] + 1
    info = jckpt.save(root, state, step=1, kind="incremental", options=options[None])
    assert info.bytes_written < info.bytes_total / 3
    base, manifest = (Root(root).read_manifest(s) for s in (0, 1))
    assert manifest.codecs == {base.data_dir: "zstd", manifest.data_dir: None}
    metadata_files = list(tmp_path.rglob("zarr.json"))
    assert len(metadata_files) == 4  # w and the packed blob, in both data directories
    for path in metadata_files:
        path.unlink()  # jckpt itself never reads them
    jckpt.delete(root, 0)
    assert_trees_equal(jckpt.restore(root, like=state), state)
    jckpt.verify(root)


@pytest.mark.parametrize("codec", ["zstd", "no-such-codec"])
def test_a_manifest_naming_the_wrong_codec_is_corruption(tmp_path, codec):
    """A well-formed manifest (checksum intact) whose codecs lie: an error naming the step, never data."""
    jckpt.save(tmp_path, {"w": np.arange(70_000, dtype=np.float32)}, step=4)
    path = tmp_path / fmt.manifest_key(4)
    doc = json.loads(path.read_bytes())
    doc["codecs"] = {d: codec for d in doc["codecs"]}
    path.write_bytes(fmt.encode_document(doc))
    for call in (jckpt.restore, jckpt.verify):
        with pytest.raises(jckpt.CorruptCheckpointError, match="step 4"):
            call(tmp_path)


def test_processes_saving_with_different_codecs_are_refused():
    leaf = fmt.LeafRecord("w", (("d", "w"),), "numpy", fmt.CHUNKED, "float32", "float32", (8,))
    fragments = [fmt.Fragment(fmt.plan_digest([leaf], codec), {}, {}, {}, 0) for codec in (None, "zstd")]
    with pytest.raises(jckpt.TreeMismatchError, match="process\\(es\\) \\[1\\].*compression"):
        write_lib.check_fragments(3, fragments)


@pytest.mark.parametrize("compression", ["zstd", "blosc"])
def test_compressed_chunks_round_trip(tmp_path, compression):
    state = {"w": np.zeros((512, 512), np.float32), "b": np.arange(10.0)}
    info = jckpt.save(tmp_path, state, step=0, options=jckpt.SaveOptions(compression=compression))
    on_disk = sum(p.stat().st_size for p in _files(tmp_path))
    assert on_disk < info.bytes_total / 10
    np.testing.assert_array_equal(jckpt.restore(tmp_path)["w"], state["w"])
    jckpt.verify(tmp_path)


# --------------------------------------------------------------- version 1 and checksums

BF16 = jnp.bfloat16
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# Written by jckpt 825afb0 (make_v1.py), 2060f08 (make_v2.py: zstd, then none) and 00708b3 (make_v3.py:
# blosc, then none).
OLD_ROOTS = ["v1", "v2", "v3"]


def _old_state(step):
    """The values tests/fixtures/make_v1.py and make_v2.py saved as ``step``."""
    big = (np.arange(320 * 1024) % 251).astype(np.uint8).reshape(320, 1024) + 1
    w = np.arange(64 * 128, dtype=np.float32).reshape(64, 128) + 1
    if step == 2:
        w[:8] += 100
        big[:4] += 1
    return {
        "params": {"w": w, "b": np.linspace(0, 1, 16, dtype=np.float32), "h": np.arange(8, dtype=BF16)},
        "small": [np.full(32, i + 1, np.int32) for i in range(3)],
        "step": step,
        "lr": 0.5,
        "flag": True,
        "nothing": None,
        "scalar": np.float64(2.5),
        "big": big,
    }


@pytest.mark.parametrize("old", OLD_ROOTS)
def test_older_versions_still_restore(tmp_path, old):
    root = tmp_path / old
    shutil.copytree(FIXTURES / old, root)
    before = {p: p.read_bytes() for p in _files(root)}
    assert jckpt.all_steps(root) == [1, 2]
    assert jckpt.info(root, 2).kind == "incremental" and jckpt.info(root, 1).metrics == {"loss": 1.5}
    for step in (1, 2):
        restored = jckpt.restore(root, step=step)
        expected = _old_state(step)
        rng = restored.pop("rng"), restored.pop("old_rng")
        assert_trees_equal(restored, expected)
        assert jax.random.key_data(rng[0]).tolist() == jax.random.key_data(jax.random.key(1)).tolist()
        assert rng[1].tolist() == jax.random.PRNGKey(7).tolist()
        jckpt.verify(root, step=step)
    assert {p: p.read_bytes() for p in _files(root)} == before  # reading changes nothing


@pytest.mark.parametrize("old", OLD_ROOTS)
def test_saving_into_an_older_root_upgrades_it(tmp_path, old):
    root = tmp_path / old
    shutil.copytree(FIXTURES / old, root)
    state = _old_state(2)
    state["small"][0] = state["small"][0] + 5
    options = jckpt.SaveOptions(chunk_bytes=65536)  # as make_v1.py: the chunks of "big" are reused
    info = jckpt.save(root, state, step=3, kind="incremental", options=options)
    assert info.base_step == 2 and info.bytes_written < info.bytes_total / 2
    assert json.loads((root / fmt.ROOT_MARKER).read_bytes())["version"] == fmt.VERSION
    assert not list(root.glob("step_*/manifest.json"))
    assert jckpt.all_steps(root) == [1, 2, 3]
    assert_trees_equal(jckpt.restore(root, step=3, like=state), state)
    jckpt.delete(root, 1)
    jckpt.delete(root, 2)
    assert_trees_equal(jckpt.restore(root, step=3, like=state), state)
    jckpt.verify(root)


def _manifest_path(root, step):
    return root / fmt.manifest_key(step)


@pytest.mark.parametrize("seed", range(40))
def test_any_flipped_bit_in_a_manifest_is_corruption_never_wrong_data(tmp_path, seed):
    state = {"w": np.arange(70_000, dtype=np.float32), "small": [np.full(5, i) for i in range(4)]}
    jckpt.save(tmp_path, state, step=1, metrics={"loss": 0.5})
    path = _manifest_path(tmp_path, 1)
    data = bytearray(path.read_bytes())
    bit = np.random.default_rng(seed).integers(len(data) * 8)
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    for call in (jckpt.restore, jckpt.verify, jckpt.info):
        with pytest.raises((jckpt.CorruptCheckpointError, jckpt.UnsupportedFormatError), match="step 1"):
            call(tmp_path)


def test_a_damaged_root_marker_is_corruption(tmp_path):
    jckpt.save(tmp_path, {"w": np.ones(3)}, step=0)
    marker = tmp_path / fmt.ROOT_MARKER
    doc = json.loads(marker.read_bytes())
    marker.write_text(json.dumps({**doc, "version": 1}))  # the checksum no longer matches
    with pytest.raises(jckpt.CorruptCheckpointError, match="jckpt.json"):
        jckpt.restore(tmp_path)
    marker.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(jckpt.CorruptCheckpointError, match="not valid JSON"):
        jckpt.all_steps(tmp_path)


def test_a_manifest_copied_to_another_step_is_refused(tmp_path):
    jckpt.save(tmp_path, {"w": np.ones(3)}, step=2)
    shutil.copy(_manifest_path(tmp_path, 2), _manifest_path(tmp_path, 7))
    assert jckpt.all_steps(tmp_path) == [2, 7]
    with pytest.raises(jckpt.CorruptCheckpointError, match="step 7: .*manifest of step 2"):
        jckpt.restore(tmp_path, step=7)


def test_manifest_records_round_trip_through_json(tmp_path):
    jckpt.save(tmp_path, {"w": np.ones((300, 300)), "k": jax.random.key(3), "n": None, "s": 1}, step=0)
    manifest = Root(tmp_path).read_manifest(0)
    again = fmt.Manifest.from_json(manifest.to_json(), step=0, where="memory")
    assert again == manifest
    assert {leaf.storage for leaf in manifest.leaves} == {fmt.CHUNKED, fmt.PACKED, fmt.NONE}
