"""On-disk format: relative, batched, inspectable without array data, deletable."""

import shutil

import numpy as np
import pytest

import jckpt
from jckpt import layout


def _files(root):
    return [p for p in root.rglob("*") if p.is_file()]


def test_thousands_of_small_leaves_cost_a_handful_of_files(tmp_path):
    state = {f"layer_{i}": np.full(256, i, np.float32) for i in range(2000)}  # 1 KiB each
    jckpt.save(tmp_path, state, step=0)
    assert len(_files(tmp_path)) <= 5  # marker, manifest, packed zarr.json + 1 chunk
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
        if path.name not in ("manifest.json", layout.ROOT_MARKER):
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
    assert not (tmp_path / layout.step_dir(1)).exists()
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
    manifest = layout.Root(tmp_path).read_manifest(0)
    assert (manifest["format"], manifest["version"], manifest["hash"]) == ("jckpt", 1, "xxh3_128")
    (leaf,) = manifest["leaves"]
    assert leaf["chunk_shape"] == [32, 1024]
    assert sorted(leaf["chunks"]) == ["0.0", "1.0", "2.0", "3.0"]
    for digest, holder in leaf["chunks"].values():
        assert len(digest) == 32 and holder.startswith(layout.step_dir(0) + "/d")
        assert (tmp_path / holder / leaf["array"] / "zarr.json").exists()


@pytest.mark.parametrize("compression", ["zstd", "blosc"])
def test_compressed_chunks_round_trip(tmp_path, compression):
    state = {"w": np.zeros((512, 512), np.float32), "b": np.arange(10.0)}
    info = jckpt.save(tmp_path, state, step=0, options=jckpt.SaveOptions(compression=compression))
    on_disk = sum(p.stat().st_size for p in _files(tmp_path))
    assert on_disk < info.bytes_total / 10
    np.testing.assert_array_equal(jckpt.restore(tmp_path)["w"], state["w"])
    jckpt.verify(tmp_path)
