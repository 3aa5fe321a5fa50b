"""Bad input: a clear error naming the leaf path / step / file, and nothing lost or half-visible."""

import contextlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import jckpt
from jckpt import format as fmt
from jckpt.root import Root


def _state(value=1.0):
    return {"params": {"w": np.full((256, 300), value, np.float32), "b": np.full(4, value)}, "step": 1}


def test_unsupported_leaf_names_its_path_and_leaves_nothing(tmp_path):
    jckpt.save(tmp_path, _state(), step=0)
    bad = {"params": {"w": np.ones(3), "name": "resnet"}}
    with pytest.raises(jckpt.UnsupportedLeafError, match="params/name"):
        jckpt.save(tmp_path, bad, step=1)
    with pytest.raises(TypeError):  # also a TypeError
        jckpt.save(tmp_path, {"obj": np.array([object()])}, step=1)
    assert jckpt.all_steps(tmp_path) == [0]
    assert not (tmp_path / fmt.step_name(1)).exists()
    jckpt.save(tmp_path, _state(2.0), step=1)  # the step number is free
    assert jckpt.restore(tmp_path, step=1)["params"]["b"].tolist() == [2.0] * 4


def test_metrics_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="metrics"):
        jckpt.save(tmp_path, _state(), step=0, metrics={"loss": object()})
    assert jckpt.all_steps(tmp_path) == []


def test_existing_step_is_refused_and_untouched(tmp_path):
    jckpt.save(tmp_path, _state(1.0), step=5)
    before = (tmp_path / fmt.manifest_key(5)).read_bytes()
    with pytest.raises(jckpt.StepExistsError, match="step 5"):
        jckpt.save(tmp_path, _state(2.0), step=5)
    with pytest.raises(FileExistsError):
        jckpt.save(tmp_path, _state(2.0), step=5)
    assert (tmp_path / fmt.manifest_key(5)).read_bytes() == before
    assert jckpt.restore(tmp_path)["params"]["b"].tolist() == [1.0] * 4
    jckpt.verify(tmp_path)


def test_missing_or_empty_root_and_missing_step(tmp_path):
    for directory in (tmp_path / "missing", tmp_path):
        assert jckpt.latest_step(directory) is None
        assert jckpt.all_steps(directory) == []
        with pytest.raises(jckpt.CheckpointNotFoundError):
            jckpt.restore(directory)
        with pytest.raises(FileNotFoundError):
            jckpt.info(directory)
    jckpt.save(tmp_path, _state(), step=3)
    with pytest.raises(jckpt.CheckpointNotFoundError, match="step 4"):
        jckpt.restore(tmp_path, step=4)
    with pytest.raises(jckpt.CheckpointNotFoundError, match="step 4"):
        jckpt.delete(tmp_path, 4)


def test_refuses_a_non_jckpt_non_empty_directory(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(jckpt.NotACheckpointRootError, match="not empty"):
        jckpt.save(tmp_path, _state(), step=0)
    assert sorted(os.listdir(tmp_path)) == ["thesis.tex"]


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _chunk_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and "/c/" in str(p))


@pytest.mark.parametrize("target", ["large", "packed"])
def test_flipped_byte_is_caught_naming_step_leaf_and_chunk(tmp_path, target):
    jckpt.save(tmp_path, _state(), step=7)
    manifest = Root(tmp_path).read_manifest(7)
    leaf = next(x for x in manifest.leaves if x.path == "params/w")
    array = leaf.array if target == "large" else fmt.BLOB_PREFIX + "0"
    (path,) = [p for p in _chunk_files(tmp_path) if f"/{array}/" in str(p)][:1]
    _flip_a_byte(path)
    expected = "params/w" if target == "large" else "packed"
    for call in (lambda: jckpt.restore(tmp_path), lambda: jckpt.verify(tmp_path)):
        with pytest.raises(jckpt.CorruptCheckpointError, match=f"step 7, leaf .*{expected}.*chunk"):
            call()


def test_missing_data_file_is_corruption(tmp_path):
    jckpt.save(tmp_path, _state(), step=0)
    for path in _chunk_files(tmp_path):
        path.unlink()
    with pytest.raises(jckpt.CorruptCheckpointError):
        jckpt.verify(tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    jckpt.save(tmp_path, _state(), step=0)
    path = tmp_path / fmt.manifest_key(0)
    manifest = json.loads(path.read_bytes())
    manifest["version"] = fmt.VERSION + 1
    path.write_bytes(fmt.encode_document(manifest))  # as a newer jckpt would write it
    with pytest.raises(jckpt.UnsupportedFormatError, match="Upgrade jckpt"):
        jckpt.restore(tmp_path)
    marker = tmp_path / fmt.ROOT_MARKER
    marker.write_bytes(fmt.encode_document({"format": "jckpt", "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        jckpt.latest_step(tmp_path)
    marker.write_text(json.dumps({"format": "jckpt", "version": 99}))  # no checksum: damaged, or newer
    with pytest.raises(jckpt.CorruptCheckpointError, match=f"newer than format {fmt.VERSION}"):
        jckpt.latest_step(tmp_path)


def test_like_mismatch_names_every_bad_path(tmp_path):
    jckpt.save(tmp_path, _state(), step=0)
    like = {"params": {"w": np.zeros((300, 256), np.float32), "extra": np.zeros(2), "b": np.zeros(4)}}
    with pytest.raises(jckpt.TreeMismatchError) as error:
        jckpt.restore(tmp_path, like=like)
    assert "'params/extra': not in the checkpoint" in str(error.value)
    assert "'params/w': checkpoint has shape (256, 300), like has (300, 256)" in str(error.value)
    assert isinstance(error.value, ValueError)
    with pytest.raises(
        jckpt.TreeMismatchError, match="'params/b': checkpoint has shape \\(4,\\), like has \\(\\)"
    ):
        jckpt.restore(tmp_path, like={"params": {"b": 0.0}})  # a scalar where an array is stored


@contextlib.contextmanager
def _small_filesystem(path, size):
    """A real tmpfs of ``size`` (root only); skips where mounting is not allowed."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_raises_oserror_and_keeps_earlier_checkpoints(tmp_path):
    with _small_filesystem(tmp_path / "small", "4m") as root:
        jckpt.save(root, _state(1.0), step=0)
        with pytest.raises(OSError) as error:
            jckpt.save(root, {"big": np.ones(2_000_000)}, step=1)  # 16 MB on a 4 MB disk
        assert error.value.errno == 28  # ENOSPC
        assert jckpt.all_steps(root) == [0]
        assert not (root / fmt.step_name(1)).exists()  # temporary data removed
        assert jckpt.restore(root)["params"]["b"].tolist() == [1.0] * 4
        jckpt.verify(root)
        jckpt.save(root, _state(3.0), step=1)  # space is back
        assert jckpt.restore(root)["params"]["b"].tolist() == [3.0] * 4


def test_leftovers_of_a_failed_save_are_invisible_and_cleaned(tmp_path):
    jckpt.save(tmp_path, _state(1.0), step=0)
    # what a killed save leaves: a data directory and no manifest
    shutil.copytree(tmp_path / fmt.step_name(0), tmp_path / fmt.step_name(1))
    assert jckpt.all_steps(tmp_path) == [0]
    jckpt.save(tmp_path, _state(2.0), step=2)
    assert not (tmp_path / fmt.step_name(1)).exists()
    assert jckpt.all_steps(tmp_path) == [0, 2]


def test_a_stale_lock_file_from_a_killed_commit_does_not_corrupt_the_next(tmp_path):
    """A writer killed while writing the manifest leaves manifests/step_<N>.json.__lock behind.

    Tensorstore reuses such a file without truncating it; the commit must not inherit its tail.
    """
    stale = tmp_path / (fmt.manifest_key(3) + ".__lock")
    jckpt.save(tmp_path, _state(), step=0)
    stale.write_bytes(b"x" * 100_000)  # longer than the real manifest
    jckpt.save(tmp_path, _state(2.0), step=3)
    assert jckpt.restore(tmp_path, step=3)["params"]["b"].tolist() == [2.0] * 4
    assert not stale.exists()
    # a killed commit of a step that is never saved again: the next save removes its leftovers
    other = tmp_path / (fmt.manifest_key(5) + ".__lock")
    other.write_bytes(b"{")
    jckpt.save(tmp_path, _state(), step=6)
    assert not other.exists()
    assert jckpt.all_steps(tmp_path) == [0, 3, 6]


def test_an_unparsable_manifest_is_corruption(tmp_path):
    jckpt.save(tmp_path, _state(), step=0)
    with open(tmp_path / fmt.manifest_key(0), "ab") as f:
        f.write(b"}9}")
    with pytest.raises(jckpt.CorruptCheckpointError, match="step 0: manifest .* not valid JSON"):
        jckpt.restore(tmp_path)


def test_an_empty_step_directory_left_by_a_killed_save_is_removed(tmp_path):
    jckpt.save(tmp_path, _state(), step=0)
    (tmp_path / fmt.step_name(7)).mkdir()  # killed right after creating its step directory
    jckpt.save(tmp_path, _state(), step=1)
    assert not (tmp_path / fmt.step_name(7)).exists()
    assert (tmp_path / fmt.step_name(0)).exists() and jckpt.all_steps(tmp_path) == [0, 1]
