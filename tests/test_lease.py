"""The writer lease: one writer per root; collectors spare what a live writer uses."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import jckpt
from jckpt import format as fmt
from jckpt import gc, lease
from jckpt.root import Root

HOLDER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jckpt

    with jckpt.CheckpointManager(sys.argv[1], async_save=False) as mngr:
        mngr.save(0, {"w": np.ones(3)})
        print("holding", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


def _holder(root):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "holding"
    return child


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    child = _holder(tmp_path)
    try:
        holder = f"host {socket.gethostname()}, pid {child.pid}, since"
        with pytest.raises(jckpt.RootLockedError, match=holder):
            jckpt.save(tmp_path, {"w": np.zeros(3)}, step=1)
        with pytest.raises(OSError):  # also an OSError (EBUSY)
            jckpt.save(tmp_path, {"w": np.zeros(3)}, step=1)
        assert jckpt.all_steps(tmp_path) == [0]
        assert jckpt.restore(tmp_path)["w"].tolist() == [1, 1, 1]  # readers are never refused
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        assert child.stdout.readline().strip() == "released"
        child.wait()
    jckpt.save(tmp_path, {"w": np.zeros(3)}, step=1)  # released on close
    assert jckpt.all_steps(tmp_path) == [0, 1]


def test_the_lease_of_a_killed_writer_is_taken_over_at_once(tmp_path):
    child = _holder(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    held, _ = lease.read(Root(tmp_path))
    assert held is not None and held.pid == child.pid and not held.live()
    jckpt.save(tmp_path, {"w": np.zeros(3)}, step=1)
    assert jckpt.all_steps(tmp_path) == [0, 1]


def _foreign_lease(root, data_dir, pins=()):
    """A live lease of another process on this host (this test process's pid, another token)."""
    record = lease.Lease(socket.gethostname(), os.getpid(), "another-process", time.time(), time.time() + 60,
                         data_dir, tuple(pins))
    Root(root).write(lease.KEY, lease._encode(record))


def test_collectors_spare_the_save_in_flight_and_its_base(tmp_path):
    jckpt.save(tmp_path, {"w": np.arange(100_000.0)}, step=0)
    base_dir = Root(tmp_path).read_manifest(0).data_dir
    in_flight, stray = tmp_path / fmt.step_name(1) / "dinflight", tmp_path / fmt.step_name(2) / "dstray"
    for directory in (in_flight, stray):
        (directory / "a" / "c").mkdir(parents=True)
        (directory / "a" / "c" / "0").write_bytes(b"chunk")
    _foreign_lease(tmp_path, f"{fmt.step_name(1)}/dinflight", pins=[base_dir])
    root = Root(tmp_path)
    Root(tmp_path).uncommit(0)  # an `rm 0` racing an incremental save based on step 0
    assert gc.remove_uncommitted(root) == [f"{fmt.step_name(2)}/dstray"]
    gc.collect(root)
    assert (in_flight / "a" / "c" / "0").exists() and not stray.exists()
    assert (tmp_path / base_dir).exists()  # pinned by the writer: its save reuses these chunks
    with pytest.raises(jckpt.RootLockedError, match="another process"):
        jckpt.save(tmp_path, {"w": np.ones(3)}, step=3)
    Root(tmp_path).delete(lease.KEY)  # the writer is gone: everything unreferenced goes
    gc.collect(root)
    assert not (tmp_path / base_dir).exists() and not in_flight.exists()


def test_a_reader_racing_a_delete_gets_not_found_never_corruption(tmp_path, monkeypatch):
    jckpt.save(tmp_path, {"w": np.arange(200_000.0)}, step=0)
    real = Root.read_manifest
    racing = []

    def read_then_deleted(self, step):  # `jckpt rm 0` lands between the manifest and the chunks
        manifest = real(self, step)
        if not racing:
            racing.append(step)
            jckpt.delete(tmp_path, step)
        return manifest

    monkeypatch.setattr(Root, "read_manifest", read_then_deleted)
    with pytest.raises(jckpt.CheckpointNotFoundError, match="deleted while it was being read"):
        jckpt.restore(tmp_path, step=0)
    assert racing == [0]


def test_a_stale_lease_lock_file_from_a_killed_writer_does_not_corrupt_the_lease(tmp_path):
    """A writer killed while renewing leaves leases/writer.json.__lock; tensorstore would reuse its tail."""
    jckpt.save(tmp_path, {"w": np.ones(3)}, step=0)
    (tmp_path / (lease.KEY + ".__lock")).write_bytes(b"x" * 10_000)
    with jckpt.CheckpointManager(tmp_path, async_save=False) as mngr:
        mngr.save(1, {"w": np.zeros(3)})
        held, _ = lease.read(Root(tmp_path))
        assert held is not None and held.mine()
    assert jckpt.all_steps(tmp_path) == [0, 1]


def test_a_damaged_lease_binds_nobody(tmp_path):
    jckpt.save(tmp_path, {"w": np.ones(3)}, step=0)
    Root(tmp_path).write(lease.KEY, b'{"format": "jckpt", "vers')
    jckpt.save(tmp_path, {"w": np.ones(3)}, step=1)
    assert jckpt.all_steps(tmp_path) == [0, 1]


def test_a_base_deleted_while_a_save_cleans_up_survives_for_that_save(tmp_path, monkeypatch):
    """Regression (found by the adversarial trainer + rm trials): `rm BASE` landing between a save's
    base check and its removal of leftovers made the save delete the very chunks it reuses."""
    big = np.arange(300_000, dtype=np.float32)
    jckpt.save(tmp_path, {"big": big, "step": 0}, step=0)
    real = gc.remove_uncommitted

    def base_deleted_first(root, **kwargs):
        Root(tmp_path).uncommit(0)  # another process's `jckpt rm 0`, before its collection
        return real(root, **kwargs)

    monkeypatch.setattr(gc, "remove_uncommitted", base_deleted_first)
    info = jckpt.save(tmp_path, {"big": big, "step": 1}, step=1, kind="incremental")
    assert info.base_step == 0 and info.bytes_written < big.nbytes  # it reuses step 0's chunks
    monkeypatch.setattr(gc, "remove_uncommitted", real)
    assert jckpt.all_steps(tmp_path) == [1]
    np.testing.assert_array_equal(jckpt.restore(tmp_path)["big"], big)
    jckpt.verify(tmp_path)
