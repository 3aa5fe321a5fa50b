"""Multi-host saves and restores with real processes under jax.distributed (2 fake CPU devices each).

Each test spawns groups of tests/multihost_worker.py on 127.0.0.1; the worker
does the jckpt calls and checks, and reports JSON that the test asserts on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import jckpt
from jckpt.root import Root

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 4.0  # jckpt.multihost.set_timeout for the save during which a process is killed
RELAXED_S = 60.0  # JCKPT_MULTIHOST_TIMEOUT otherwise (a loaded CI machine must not fail a test)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(timeout_s: float = RELAXED_S) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JCKPT_MULTIHOST_TIMEOUT=str(timeout_s),
        PYTHONUNBUFFERED="1",
    )
    return env


def _spawn(mode: str, n: int, out: Path, timeout_s: float = RELAXED_S, **args) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for pid in range(n):
        spec = {"mode": mode, "pid": pid, "n": n, "port": port, "out": str(out), **args}
        log = open(out / f"{mode}_{pid}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(spec)], env=_env(timeout_s), stdout=log, stderr=log
            )
        )
    return procs


def _results(mode: str, n: int, out: Path) -> list[dict]:
    return [json.loads((out / f"{mode}_{pid}.json").read_text()) for pid in range(n)]


def _wait(procs: list[subprocess.Popen], mode: str, out: Path, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    try:
        for pid, p in enumerate(procs):
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            if rc != 0:
                log = (out / f"{mode}_{pid}.log").read_text()[-4000:]
                raise AssertionError(f"{mode} process {pid} exited with {rc}:\n{log}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def run(mode: str, n: int, out: Path, **args) -> list[dict]:
    """Runs a group of ``n`` worker processes (n == 1: a plain process) and returns their results."""
    procs = _spawn(mode, n, out, **args)
    _wait(procs, mode, out)
    return _results(mode, n, out)


def test_two_processes_save_restores_on_one_two_and_four(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved = run("save_restore", 2, tmp_path / "g2", dir=ckpt, step=10, mesh=[2, 2], targets=[[[4, 1], "t"]])
    assert [r["info"]["step"] for r in saved] == [10, 10]
    assert saved[0]["info"] == saved[1]["info"]  # every process reports the committed step
    assert jckpt.all_steps(ckpt) == [10]
    # small leaves sharded across the processes go into one packed blob per process, not an array each
    manifest = Root(ckpt).read_manifest(10)
    assert sorted(blob.name for blob in manifest.blobs.values()) == ["packed-p0", "packed-p1"]
    shard_packed = [leaf for leaf in manifest.leaves if len(leaf.pieces) > 1]
    assert shard_packed and all(
        {piece.blob for piece in leaf.pieces} == set(manifest.blobs) for leaf in shard_packed
    )
    four = run("restore", 4, tmp_path / "g4", dir=ckpt, step=10, targets=[[[4, 2], ""], [[2, 4], "t"]])
    assert all(r["checked"]["[4, 2]"] > 0 and r["checked"]["[2, 4]t"] > 0 for r in four)
    one = run("restore", 1, tmp_path / "g1", dir=ckpt, step=10, targets=[[[2, 1], "t"]], no_like=True)
    assert one[0]["checked"]["no_like"] == 7


def test_four_processes_save_restores_on_two_and_one(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved = run("save", 4, tmp_path / "g4", dir=ckpt, step=3, mesh=[2, 4], layout="t")
    assert {r["info"]["bytes_total"] for r in saved} == {saved[0]["info"]["bytes_total"]}
    # Replicated data is written once: the group wrote the state's size (+ alignment of packed leaves).
    total = saved[0]["info"]["bytes_total"]
    assert total <= saved[0]["info"]["bytes_written"] < total + 4096
    run("restore", 2, tmp_path / "g2", dir=ckpt, step=3, targets=[[[2, 2], ""], [[1, 4], "t"]])
    run("restore", 1, tmp_path / "g1", dir=ckpt, step=3, targets=[[[1, 2], ""]], no_like=True)
    jckpt.verify(ckpt, 3)


def test_errors_on_one_process_surface_on_every_process(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    results = run("errors", 2, tmp_path / "g", dir=ckpt, mesh=[2, 2])
    for r in results:
        assert "step 1" in r["exists"]
        assert "step 2" in r["mismatch"] and "[1]" in r["mismatch"]
        assert "99" in r["delete"]
        assert "step 3" in r["local"] and "'w'" in r["local"] and "process-local" in r["local"]
        assert r["steps"] == [1, 2, 4]


def test_typed_prng_keys_restore_into_global_shardings(tmp_path):
    run("keys", 2, tmp_path / "g", dir=str(tmp_path / "ckpt"), mesh=[2, 2])


def test_sigkill_mid_save_times_out_everywhere_and_commits_nothing(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    out = tmp_path / "crash"
    victim = 2
    procs = _spawn("crash", 4, out, dir=ckpt, mesh=[2, 4], victim=victim, heartbeat=60, short=TIMEOUT_S)
    try:
        deadline = time.monotonic() + 120
        while not (out / "victim_wrote").exists():
            assert time.monotonic() < deadline, "the victim never reached its write"
            assert all(p.poll() is None for p in procs), "a process exited early"
            time.sleep(0.05)
        procs[victim].send_signal(signal.SIGKILL)
        for pid, p in enumerate(procs):
            if pid != victim:  # the survivors stop on their own (the wait only guards against a hang)
                assert p.wait(timeout=180) == 0, (out / f"crash_{pid}.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    survivors = [json.loads((out / f"crash_{pid}.json").read_text()) for pid in range(4) if pid != victim]
    for r in survivors:
        assert r["error"] == "CoordinationTimeoutError" and r["is_timeout"], r
        assert r["step"] == 2 and "step 2" in r["message"] and str(victim) in r["message"], r
        assert r["steps"] == [1], r  # nothing committed
    assert jckpt.all_steps(ckpt) == [1]
    # A restarted group restores the previous step bit-exactly and can save step 2 again.
    restarted = run("save_restore", 2, tmp_path / "again", dir=ckpt, step=2, mesh=[2, 2], targets=[])
    assert restarted[0]["info"]["step"] == 2
    run("restore", 2, tmp_path / "prev", dir=ckpt, step=1, targets=[[[2, 2], "t"]])
    assert jckpt.all_steps(ckpt) == [1, 2]
    leftovers = [p.name for p in (Path(ckpt) / "step_00000002").iterdir() if p.is_dir()]
    assert len(leftovers) == 1  # the killed save's data directory was cleaned up


def test_incremental_saves_across_two_processes(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    results = run("incremental", 2, tmp_path / "g", dir=ckpt, mesh=[2, 2])
    for r in results:
        assert r["info"]["kind"] == "incremental"
        assert 0 < r["info"]["bytes_written"] < r["info"]["bytes_total"] / 4
        assert r["steps"] == [1]
    assert results[0]["info"] == results[1]["info"]
    jckpt.verify(ckpt, 1)


def test_manager_async_keep_last_across_two_processes(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    results = run("manager", 2, tmp_path / "g", dir=ckpt, mesh=[2, 2])
    for r in results:
        assert r["saved"] == [0, 2, 4, 6, 8]
        assert r["kept"] == [6, 8] and r["on_disk"] == [6, 8]
    assert jckpt.all_steps(ckpt) == [6, 8]
    names = sorted(p.name for p in Path(ckpt).iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000006", "step_00000008"]  # deleted once, nothing left behind


def test_manager_decisions_are_made_once_on_process_zero(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    results = run("manager_skewed_clocks", 2, tmp_path / "g", dir=ckpt, mesh=[2, 2])
    for r in results:  # process 0's clock (4 s a step) decides: saves every 3 steps
        assert r["saved"] == [0, 3, 6, 9] and r["on_disk"] == [0, 3, 6, 9]


def test_agree_gives_every_process_the_decision_of_process_zero(tmp_path):
    results = run("agree", 3, tmp_path / "g")
    expected = [{"save": step % 3 == 0, "from": 0} for step in range(50)]
    assert all(r["decisions"] == expected for r in results)
    assert results[0]["left"] == 0


def test_example_launcher_runs_the_trainer_on_two_processes_and_resumes(tmp_path):
    launcher = Path(__file__).parents[1] / "examples" / "multihost_cpu.py"
    args = ["--config", "configs/digits.yaml", "--set", f"checkpoint.directory={tmp_path / 'ckpt'}"]

    def launch(steps: int) -> str:
        command = [sys.executable, str(launcher), "--processes", "2", "--", *args, f"train.steps={steps}"]
        done = subprocess.run(
            command, cwd=launcher.parents[1], capture_output=True, text=True, timeout=300, env=_env()
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    first = launch(100)
    assert "[p0] no checkpoint" in first and "[p1] no checkpoint" in first
    second = launch(200)
    assert "[p0] resumed from step 100" in second and "[p1] resumed from step 100" in second
    assert jckpt.all_steps(tmp_path / "ckpt")[-1] == 200
