"""jckpt on s3:// and gs:// roots, end to end, against real local servers (moto, gcp-storage-emulator).

Everything a local root does: incremental saves and safe deletion (the bytes really leave
the bucket), restoring onto another mesh, the manager with retention, tags, the writer
lease, the CLI, SIGKILL during saves, and a fault-injecting proxy in front of the server.
"""

import dataclasses
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from faultproxy import FaultProxy
from helpers import assert_trees_equal
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from servers import gcs_root, gcs_server, s3_root, s3_server, server_logs  # noqa: F401  (fixtures)

import jckpt
from jckpt import cli, gc, storage
from jckpt import format as fmt
from jckpt import policy as Pol
from jckpt.root import Root

BACKENDS = ["s3", "gcs"]


@pytest.fixture(params=BACKENDS)
def bucket_root(request) -> str:
    return request.getfixturevalue(f"{request.param}_root")


def _keys(root: str) -> set[str]:
    r = Root(root)
    return set(storage.list_keys(r.kv))


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((256, 300)).astype(np.float32),  # 300 KiB: chunked
        "small": [np.full(64, i, np.int32) for i in range(5)],  # packed
        "step": seed,
    }


def test_round_trip_info_verify_metadata_and_tags(bucket_root):
    state = _state()
    info = jckpt.save(bucket_root, state, step=1, metrics={"loss": 0.5})
    assert jckpt.all_steps(bucket_root) == [1] and jckpt.latest_step(bucket_root) == 1
    assert_trees_equal(jckpt.restore(bucket_root, like=state), state)
    assert jckpt.verify(bucket_root) == info and jckpt.info(bucket_root).metrics == {"loss": 0.5}
    assert jckpt.metadata(bucket_root)["w"].shape == (256, 300)
    jckpt.tag(bucket_root, 1, "prod")
    assert jckpt.tags(bucket_root) == {"prod": 1}
    with pytest.raises(jckpt.StepTaggedError):
        jckpt.delete(bucket_root, 1)
    assert _keys(bucket_root) >= {fmt.ROOT_MARKER, fmt.manifest_key(1), fmt.tag_key("prod")}


def test_incremental_saves_then_deleting_the_base_removes_exactly_the_unreferenced_bytes(bucket_root):
    options = jckpt.SaveOptions(chunk_bytes=64 * 1024)
    state = _state()
    jckpt.save(bucket_root, state, step=0, options=dataclasses.replace(options, compression="zstd"))
    state["w"] = state["w"].copy()
    state["w"][:10] += 1  # one of five chunks
    state["small"][2] = state["small"][2] + 1  # one of five small leaves
    info = jckpt.save(bucket_root, state, step=1, kind="incremental", options=options)  # reuses zstd chunks
    assert info.bytes_written < info.bytes_total / 3
    jckpt.delete(bucket_root, 0)
    assert_trees_equal(jckpt.restore(bucket_root, like=state), state)
    jckpt.verify(bucket_root)
    manifest = Root(bucket_root).read_manifest(1)
    expected = manifest.referenced_keys() | {fmt.ROOT_MARKER, fmt.manifest_key(1)}
    expected = {key for key in expected if not key.endswith("/zarr.json")}  # none on object stores
    assert _keys(bucket_root) == expected  # nothing unreferenced is left in the bucket
    assert any(key.startswith(fmt.step_name(0)) for key in expected)  # step 1 still reads step 0's chunks


def test_restore_onto_another_mesh(bucket_root):
    devices = np.array(jax.devices()[:8])
    w = jnp.arange(512 * 256, dtype=jnp.float32).reshape(512, 256)
    saved = jax.device_put(w, NamedSharding(jax.sharding.Mesh(devices.reshape(8, 1), ("x", "y")), P("x")))
    jckpt.save(bucket_root, {"w": saved}, step=0)
    target = NamedSharding(jax.sharding.Mesh(devices.reshape(2, 4), ("x", "y")), P("y", "x"))
    restored = jckpt.restore(bucket_root, like={"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=target)})
    assert restored["w"].sharding == target
    np.testing.assert_array_equal(restored["w"], w)


def test_manager_async_saves_retention_and_resume(bucket_root):
    policy = Pol.combine(Pol.every_n_steps(2), Pol.keep_last(2), Pol.incremental(full_every=3))
    with jckpt.CheckpointManager(bucket_root, policy=policy) as mngr:
        for step in range(10):
            mngr.maybe_save(step, {"w": np.full((200, 300), step, np.float32), "step": step})
    assert jckpt.all_steps(bucket_root) == [6, 8]
    with jckpt.CheckpointManager(bucket_root, policy=policy) as mngr:
        state, step = mngr.restore_or_init(lambda: {"w": np.zeros((200, 300), np.float32), "step": 0})
    assert step == 8 and state["step"] == 8 and (state["w"] == 8).all()


def test_a_second_writer_on_a_bucket_is_refused(bucket_root):
    with jckpt.CheckpointManager(bucket_root, async_save=False) as mngr:
        mngr.save(0, {"w": np.ones(3)})
        code = f"import jckpt, numpy; jckpt.save({bucket_root!r}, {{'w': numpy.ones(3)}}, step=1)"
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert child.returncode != 0 and "RootLockedError" in child.stderr
        assert f"pid {os.getpid()}" in child.stderr
    jckpt.save(bucket_root, {"w": np.zeros(3)}, step=1)
    assert jckpt.all_steps(bucket_root) == [0, 1]


def test_the_cli_on_a_bucket(bucket_root, capsys):
    for step in range(3):
        jckpt.save(bucket_root, {"w": np.full(1000, step)}, step=step)
    assert cli.main(["ls", bucket_root]) == 0
    assert cli.main(["verify", bucket_root, "--all"]) == 0
    assert cli.main(["rm", bucket_root, "0"]) == 0
    assert cli.main(["gc", bucket_root]) == 0
    out = capsys.readouterr().out
    assert "step 2: ok" in out
    assert jckpt.all_steps(bucket_root) == [1, 2]
    assert not any(key.startswith(fmt.step_name(0)) for key in _keys(bucket_root))


KILLED = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jckpt

    root, start = sys.argv[1], int(sys.argv[2])
    options = jckpt.SaveOptions(chunk_bytes=64 * 1024)
    for step in range(start, start + 100):
        state = {"w": np.full((512, 256), step, np.float32), "small": np.full(10, step), "step": step}
        print("saving", step, flush=True)
        jckpt.save(root, state, step=step, kind="incremental" if step % 3 else "full", options=options)
        print("saved", step, flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_during_saves_to_a_bucket_never_loses_or_exposes_a_step(backend, request):
    root = request.getfixturevalue(f"{backend}_root")
    rng = random.Random(5)
    saved: set[int] = set()
    for _ in range(5):
        start = (jckpt.latest_step(root) or 0) + 1
        command = [sys.executable, "-c", KILLED, root, str(start)]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        lines = [child.stdout.readline().split() for _ in range(rng.randint(2, 6))]
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        saved |= {int(step) for word, step in lines if word == "saved"}
        steps = jckpt.all_steps(root)
        assert saved <= set(steps), "a save that reported success is gone"
        for step in steps:
            restored = jckpt.restore(root, step=step)
            assert restored["step"] == step and (restored["w"] == step).all()
    jckpt.save(root, {"w": np.ones(3)}, step=10_000)  # the next writer takes over at once ...
    assert gc.collect(Root(root), dry_run=True) == []  # ... and removed the killed save's data
    assert cli.main(["gc", root]) == 0
    for step in jckpt.all_steps(root):
        jckpt.verify(root, step)


@pytest.fixture(params=BACKENDS)
def flaky_root(request, monkeypatch):
    """A bucket root reached through a proxy that fails 10% of requests and resets 5% of connections."""
    root = request.getfixturevalue(f"{request.param}_root")
    server = request.getfixturevalue(f"{request.param}_server")
    with FaultProxy(server.url, seed=3) as proxy:
        variable = "AWS_ENDPOINT_URL" if request.param == "s3" else "STORAGE_EMULATOR_HOST"
        monkeypatch.setenv(variable, proxy.url)
        yield root, proxy


@pytest.mark.slow
def test_through_a_faulty_network_saves_succeed_or_fail_cleanly_and_restores_are_exact(flaky_root):
    root, proxy = flaky_root
    proxy.configure(fail_rate=0.10, fail_status=503, drop_rate=0.05)
    committed = {}
    for step in range(4):
        state = _state(step)
        try:
            jckpt.save(root, state, step=step, kind="incremental")
        except OSError:
            continue  # a clean failure: nothing may be visible
        committed[step] = state
    proxy.configure(fail_rate=0.0, drop_rate=0.0)
    assert jckpt.all_steps(root) == sorted(committed)
    for step, state in committed.items():
        assert_trees_equal(jckpt.restore(root, step=step, like=state), state)
    assert proxy.injected["fail"] + proxy.injected["drop"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_save_to_a_bucket_and_one_restores_on_another_mesh(backend, request, tmp_path):
    from test_multihost import run  # real jax.distributed processes (gloo on 127.0.0.1)

    root = request.getfixturevalue(f"{backend}_root")
    saved = run("save", 2, tmp_path / "g2", dir=root, step=4, mesh=[2, 2])
    assert [r["info"]["step"] for r in saved] == [4, 4]
    manifest = Root(root).read_manifest(4)
    assert sorted(blob.name for blob in manifest.blobs.values()) == ["packed-p0", "packed-p1"]  # each wrote
    one = run("restore", 1, tmp_path / "g1", dir=root, step=4, targets=[[[2, 1], "t"]])
    assert one[0]["checked"]["[2, 1]t"] > 0
    jckpt.verify(root, 4)


def test_export_from_a_bucket_streams_to_safetensors(bucket_root, tmp_path):
    from safetensors.numpy import load_file

    state = _state(3)
    jckpt.save(bucket_root, state, step=3)
    jckpt.tag(bucket_root, 3, "prod")
    exported = jckpt.export(bucket_root, tmp_path / "hf", step="prod")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.step == 3
    np.testing.assert_array_equal(tensors["w"], state["w"])
    np.testing.assert_array_equal(tensors["small.2"], state["small"][2])


@pytest.fixture
def counted_s3_root(request, monkeypatch):
    """An s3 root reached through a proxy that counts every request (no faults)."""
    root, server = request.getfixturevalue("s3_root"), request.getfixturevalue("s3_server")
    with FaultProxy(server.url, seed=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield root, proxy


def test_requests_per_save(counted_s3_root):
    """A few requests to save 2,000 small leaves; about one per chunk for large leaves."""
    root, proxy = counted_s3_root
    small = {f"g{g}": {f"l{i}": np.full(256, g * 50 + i, np.float32) for i in range(50)} for g in range(40)}
    jckpt.save(root, small, step=0)
    proxy.reset_counts()
    jckpt.save(root, small, step=1)
    # marker, lease GET + HEAD/PUT, list, packed PUT, manifest HEAD/PUT (create-only), lease check GET,
    # lease HEAD/DELETE: the fence costs the check and the manifest's HEAD
    assert proxy.total <= 11, dict(proxy.counts)
    options = jckpt.SaveOptions(chunk_bytes=2**20)
    proxy.reset_counts()
    jckpt.save(root, {"w": np.ones((64, 2**18), np.float32)}, step=2, options=options)  # 64 chunks of 1 MiB
    assert proxy.counts["PUT"] <= 64 + 2 and proxy.total <= 64 + 10, dict(proxy.counts)
    layers = {f"layer{i}": np.full((512, 512), i, np.float32) for i in range(24)}  # one chunk each
    proxy.reset_counts()
    jckpt.save(root, layers, step=3)
    assert proxy.counts["PUT"] <= 24 + 2 and proxy.total <= 24 + 10, dict(proxy.counts)  # no zarr.json
    proxy.reset_counts()
    assert_trees_equal(jckpt.restore(root, step=3), layers)
    assert proxy.total <= 24 + 4, dict(proxy.counts)


def test_a_managers_later_saves_renew_its_lease_without_reading_it(counted_s3_root):
    root, proxy = counted_s3_root
    small = {f"l{i}": np.full(256, i, np.float32) for i in range(100)}
    with jckpt.CheckpointManager(root, async_save=False) as mngr:
        mngr.save(0, small)
        proxy.reset_counts()
        # lists 2 (steps, tags), lease HEAD + PUT, chunk, manifest HEAD + PUT, lease check GET: no marker
        # read (the manager's root is known), no lease read before renewing it
        assert proxy.total <= 9, dict(proxy.counts)
