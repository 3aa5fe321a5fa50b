"""Incremental saves: only changed chunks are written; restore reads each chunk once; deletes are safe."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import assert_trees_equal

import jckpt
from jckpt import format as fmt
from jckpt import gc
from jckpt import read as read_lib
from jckpt.root import Root

SMALL_CHUNKS = jckpt.SaveOptions(chunk_bytes=64 * 1024)


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "frozen": rng.standard_normal((512, 256)).astype(np.float32),  # 512 KiB, 8 chunks
        "head": rng.standard_normal((640, 128)).astype(np.float32),  # 320 KiB, 5 chunks
        "bias": np.zeros(16, np.float32),  # packed
        "step": 0,
    }


def _manifest(root, step):
    return Root(root).read_manifest(step)


def test_unchanged_chunks_are_not_written(tmp_path):
    state = _state()
    full = jckpt.save(tmp_path, state, step=0, options=SMALL_CHUNKS)
    state["head"] = state["head"] + 1  # 5 of 13 large chunks change
    state["step"] = 1
    info = jckpt.save(tmp_path, state, step=1, kind="incremental", options=SMALL_CHUNKS)
    assert (info.kind, full.kind) == ("incremental", "full")
    assert info.bytes_total == full.bytes_total
    assert state["head"].nbytes <= info.bytes_written <= state["head"].nbytes + 4096  # + packed blob
    manifest = _manifest(tmp_path, 1)
    frozen = next(x for x in manifest.leaves if x.path == "frozen")
    assert {holder for _, holder in frozen.chunks.values()} == {_manifest(tmp_path, 0).data_dir}
    assert_trees_equal(jckpt.restore(tmp_path, like=state), state)


def test_nothing_changed_writes_almost_nothing(tmp_path):
    state = _state()
    jckpt.save(tmp_path, state, step=0, options=SMALL_CHUNKS)
    info = jckpt.save(tmp_path, state, step=1, kind="incremental", options=SMALL_CHUNKS)
    assert info.bytes_written == 0
    assert not (tmp_path / fmt.step_name(1) / _manifest(tmp_path, 1).data_dir.split("/")[1]).exists()
    assert_trees_equal(jckpt.restore(tmp_path), jckpt.restore(tmp_path, step=0))


def test_without_a_base_an_incremental_save_is_full(tmp_path):
    info = jckpt.save(tmp_path, _state(), step=0, kind="incremental")
    assert info.kind == "full" and info.bytes_written >= info.bytes_total


def test_explicit_base(tmp_path):
    a, b = _state(0), _state(1)
    jckpt.save(tmp_path, a, step=0, options=SMALL_CHUNKS)
    jckpt.save(tmp_path, b, step=1, options=SMALL_CHUNKS)
    info = jckpt.save(tmp_path, a, step=2, kind="incremental", base=0, options=SMALL_CHUNKS)
    assert info.bytes_written == 0
    assert _manifest(tmp_path, 2).base_step == 0
    with pytest.raises(jckpt.CheckpointNotFoundError):
        jckpt.save(tmp_path, a, step=3, kind="incremental", base=7)
    with pytest.raises(ValueError, match="kind"):
        jckpt.save(tmp_path, a, step=3, kind="delta")


def test_new_removed_and_reshaped_leaves(tmp_path):
    state = _state()
    jckpt.save(tmp_path, state, step=0, options=SMALL_CHUNKS)
    changed = {
        "frozen": state["frozen"],  # same
        "head": np.ones((128, 640), np.float32),  # reshaped: written whole
        "bias": state["bias"].astype(np.float16),  # new dtype
        "new": np.arange(70_000, dtype=np.int32),  # new leaf
    }  # "step" removed
    info = jckpt.save(tmp_path, changed, step=1, kind="incremental", options=SMALL_CHUNKS)
    assert info.bytes_written >= changed["head"].nbytes + changed["new"].nbytes
    assert info.bytes_written < changed["head"].nbytes + changed["new"].nbytes + state["frozen"].nbytes
    assert_trees_equal(jckpt.restore(tmp_path), changed)
    assert_trees_equal(jckpt.restore(tmp_path, step=0), state)


def test_a_chain_restores_in_one_pass_after_deleting_the_middle(tmp_path):
    state = _state()
    jckpt.save(tmp_path, state, step=0, options=SMALL_CHUNKS)
    for step in range(1, 6):  # each step changes one different chunk of "frozen"
        state["frozen"][step * 64] += step
        state["step"] = step
        jckpt.save(tmp_path, state, step=step, kind="incremental", options=SMALL_CHUNKS)
    holders = {
        h
        for _, h in next(x for x in _manifest(tmp_path, 5).leaves if x.path == "frozen").chunks.values()
    }
    assert len(holders) == 6  # chunks of "frozen" live in six saves
    for step in (0, 1, 2, 3, 4):
        jckpt.delete(tmp_path, step)
    assert jckpt.all_steps(tmp_path) == [5]
    manifest = _manifest(tmp_path, 5)
    plans = [read_lib.LeafPlan(leaf, read_lib.Target("numpy", None, None)) for leaf in manifest.leaves]
    reader = read_lib.read_plans(Root(tmp_path), manifest, plans)
    blobs = sum(blob.nbytes for blob in manifest.blobs.values())
    assert reader.bytes_read == state["frozen"].nbytes + state["head"].nbytes + blobs  # each chunk once
    assert_trees_equal(jckpt.restore(tmp_path, like=state), state)
    jckpt.verify(tmp_path)


def _all_keys(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_random_saves_and_deletes_keep_every_remaining_step_exact(tmp_path):
    """Property test: random full/incremental saves and deletions, then every step is exact."""
    rng = random.Random(7)
    nprng = np.random.default_rng(7)
    expected = {}
    state = _state()
    for step in range(40):
        action = rng.random()
        if action < 0.25 and expected:
            victim = rng.choice(sorted(expected))
            jckpt.delete(tmp_path, victim)
            del expected[victim]
            continue
        for key in ("frozen", "head"):  # sparse updates of random rows
            for _ in range(rng.randint(0, 3)):
                row = rng.randrange(state[key].shape[0])
                state[key][row] = nprng.standard_normal(state[key].shape[1])
        if rng.random() < 0.1:
            state["extra"] = nprng.standard_normal(rng.choice([10, 40_000])).astype(np.float32)
        state["step"] = step
        kind = "incremental" if rng.random() < 0.75 else "full"
        jckpt.save(tmp_path, state, step=step, kind=kind, options=SMALL_CHUNKS)
        expected[step] = {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}
    assert jckpt.all_steps(tmp_path) == sorted(expected)
    for step, value in expected.items():
        assert_trees_equal(jckpt.restore(tmp_path, step=step, like=value), value)
        jckpt.verify(tmp_path, step=step)
    root = Root(tmp_path)
    assert gc.collect(root) == []  # deletes already reclaimed everything unreferenced
    referenced = set().union(*(_manifest(tmp_path, s).referenced_keys() for s in expected))
    referenced |= {fmt.manifest_key(s) for s in expected} | {fmt.ROOT_MARKER}
    assert {k for k in _all_keys(tmp_path) if not k.startswith("leases/")} == referenced


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jckpt

    root, start = sys.argv[1], int(sys.argv[2])
    options = jckpt.SaveOptions(chunk_bytes=2**18)
    state = {"w": np.zeros((1024, 1024), np.float32), "step": 0}
    if jckpt.latest_step(root) is not None:
        state = jckpt.restore(root, like=state)
    for step in range(start, start + 1000):
        state["w"][(step * 37) % 1024] = step  # one row changes: one chunk
        state["step"] = step
        print("saving", step, flush=True)
        jckpt.save(root, state, step=step, kind="incremental", options=options)
        steps = jckpt.all_steps(root)
        if len(steps) > 3:
            print("deleting", steps[0], flush=True)
            jckpt.delete(root, steps[0])
    """
)


@pytest.mark.slow
def test_sigkill_during_incremental_saves_and_deletes_loses_nothing(tmp_path):
    rng = random.Random(99)
    root = str(tmp_path / "ckpt")
    for _ in range(10):
        start = (jckpt.latest_step(root) or 0) + 1
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, root, str(start)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(rng.randint(3, 8)):
            assert child.stdout.readline().split()[0] in ("saving", "deleting")
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        steps = jckpt.all_steps(root)
        assert steps
        for step in steps:
            state = jckpt.restore(root, step=step)
            assert state["step"] == step
            jckpt.verify(root, step=step)
    gc.collect(Root(root))
    for step in jckpt.all_steps(root):
        jckpt.verify(root, step=step)


@pytest.mark.parametrize("leaf_shape", [(256,), (64, 64), (256, 256)])  # 1 KiB, 16 KiB, 256 KiB
def test_incremental_save_of_small_leaves_writes_only_the_changed_ones(tmp_path, leaf_shape):
    n, k = 40, 3
    state = {f"layer_{i}": np.full(leaf_shape, i, np.float32) for i in range(n)}
    full = jckpt.save(tmp_path, state, step=0)
    packed = sum(v.nbytes for v in state.values())
    assert all(leaf.storage == fmt.PACKED for leaf in _manifest(tmp_path, 0).leaves)
    for i in (3, 17, 31):  # scattered through the blob
        state[f"layer_{i}"] = state[f"layer_{i}"] + 1
    info = jckpt.save(tmp_path, state, step=1, kind="incremental")
    assert full.bytes_written >= packed
    assert info.bytes_written <= k / n * packed + 64 * 1024
    assert info.bytes_written >= k * state["layer_0"].nbytes
    assert_trees_equal(jckpt.restore(tmp_path, like=state), state)
    jckpt.delete(tmp_path, 0)  # the unchanged leaves still live in step 0's blob
    assert_trees_equal(jckpt.restore(tmp_path, like=state), state)
    jckpt.verify(tmp_path)


def test_an_incremental_save_of_a_zero_size_leaf(tmp_path):
    """A zero-size packed leaf has no bytes in any blob: nothing to reuse, nothing to look up."""
    state = {"empty": np.zeros((0, 3), np.float32), "w": np.ones(3)}
    jckpt.save(tmp_path, state, step=0)
    jckpt.save(tmp_path, state, step=1, kind="incremental")
    jckpt.delete(tmp_path, 0)
    assert jckpt.restore(tmp_path, like=state)["empty"].shape == (0, 3)
    jckpt.verify(tmp_path)
