"""Fenced commits: a save that reports success is never lost, whatever pauses, other writers or collectors do.

Every scenario runs real writer processes (``fenceworker.py``) with a lease ttl of a few
seconds, pauses them with SIGSTOP at a chosen moment (the test-only hook right before the
commit) or at random moments, and lets another writer, ``jckpt gc`` or a failing lease
store act meanwhile.  Each trial checks the property: every save that reported success is
committed, verifies and restores the values its writer saved; nothing else is committed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from advutil import child_env, data_files, run_cli
from faultproxy import FaultProxy
from servers import gcs_root, gcs_server, s3_root, s3_server, server_logs  # noqa: F401  (fixtures)

import jckpt
from jckpt import lease, saving
from jckpt.root import Root

HERE = Path(__file__).resolve().parent
WORKER = HERE / "fenceworker.py"
sys.path.insert(0, str(HERE))
from fenceworker import OPTIONS, state  # noqa: E402

TTL = 2.0
EXPIRED = TTL * (1 + lease.GRACE_FRACTION) + 1.0  # past the ttl and the others' grace, with a margin
TRIALS = int(os.environ.get("JCKPT_ADV_FENCE_TRIALS", "6"))

pytestmark = pytest.mark.slow


def _env(**extra) -> dict[str, str]:
    return {**child_env(), lease.TTL_ENV: str(TTL), **extra}


def _start(*args, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env),
    )


def _line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited ({proc.wait()}) before {prefix!r}: {proc.stderr.read()}")
        if line.startswith(prefix):
            return line.strip()
    raise TimeoutError(f"no {prefix!r} from the worker")


def _outcome(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, ...]:
    """The worker's last report: ("ok", step, value) or ("error", step, message)."""
    out, err = proc.communicate(timeout=timeout)
    reports = [line.split(" ", 2) for line in out.splitlines() if line.startswith(("ok ", "error "))]
    assert reports, f"no report from the worker (exit {proc.returncode}): {out!r} {err[-2000:]!r}"
    return tuple(reports[-1])


def _run(*args, **env) -> tuple[str, ...]:
    return _outcome(_start(*args, **env))


def _check_property(root, reported: dict[int, int]) -> None:
    """Each reported save is committed, verifies and holds its values; nothing else is committed."""
    assert jckpt.all_steps(root) == sorted(reported), (jckpt.all_steps(root), reported)
    for step, value in reported.items():
        jckpt.verify(root, step)
        restored = jckpt.restore(root, step=step)
        np.testing.assert_array_equal(restored["w"], state(value)["w"])


def _paused(root, step: int, value: int, role: str = "save") -> subprocess.Popen:
    """A writer stopped (SIGSTOP) right before its commit, its lease left to expire."""
    proc = _start(role, root, step, value, "pause")
    _line(proc, "paused")
    time.sleep(0.2)
    with open(f"/proc/{proc.pid}/stat") as f:
        assert f.read().split(")")[1].split()[0] == "T", "the writer did not stop itself"
    time.sleep(EXPIRED)
    return proc


def _resume(proc: subprocess.Popen) -> tuple[str, ...]:
    os.kill(proc.pid, signal.SIGCONT)
    return _outcome(proc)


ROOTS = ["local", "s3", "gcs"]


@pytest.fixture(params=ROOTS)
def any_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue(f"{request.param}_root")


def test_a_writer_paused_past_its_ttl_loses_to_a_second_writer_of_the_same_step(any_root, tally):
    first = _paused(any_root, 1, 1)
    assert _run("save", any_root, 1, 2)[0] == "ok"
    outcome = _resume(first)
    tally.record("fence: paused writer, same step", outcome[0] == "error", outcome[2].split(":")[0])
    assert outcome[0] == "error" and "LeaseLostError" in outcome[2], outcome
    _check_property(any_root, {1: 2})


def test_a_writer_paused_past_its_ttl_loses_to_a_second_writer_of_another_step(any_root, tally):
    jckpt.save(any_root, state(0), step=0, options=jckpt.SaveOptions(**OPTIONS))
    first = _paused(any_root, 1, 1)
    assert _run("save", any_root, 2, 2)[0] == "ok"
    outcome = _resume(first)
    tally.record("fence: paused writer, other step", outcome[0] == "error", outcome[2].split(":")[0])
    assert outcome[0] == "error" and "LeaseLostError" in outcome[2], outcome
    _check_property(any_root, {0: 0, 2: 2})


def test_an_async_manager_paused_in_flight_reports_the_lost_save(tmp_path, tally):
    root = str(tmp_path / "root")
    first = _paused(root, 1, 1, role="manager")
    assert _run("save", root, 2, 2)[0] == "ok"
    outcome = _resume(first)
    tally.record("fence: paused async manager", outcome[0] == "error", outcome[2].split(":")[0])
    assert outcome[0] == "error" and "LeaseLostError" in outcome[2], outcome
    _check_property(root, {2: 2})


@pytest.mark.parametrize("collector", [["gc"], ["rm", "0"]], ids=["gc", "rm"])
def test_a_collector_removes_a_paused_writers_data_and_the_writer_then_fails(collector, tmp_path, tally):
    root = str(tmp_path / "root")
    options = jckpt.SaveOptions(**OPTIONS)
    jckpt.save(root, state(0), step=0, options=options)
    jckpt.save(root, state(5), step=5, options=options)
    remaining = {0: 0, 5: 5} if collector == ["gc"] else {5: 5}
    kept = {f for f in data_files(root) if any(f"step_0000000{s}" in str(f) for s in remaining)}
    first = _paused(root, 1, 1)
    assert any("step_00000001" in str(f) for f in data_files(root))  # the paused save's data is there
    result = run_cli(*collector[:1], root, *collector[1:])
    assert result.returncode == 0, result.stderr
    assert set(data_files(root)) == kept  # ... and the collector removed it once the lease expired
    outcome = _resume(first)
    tally.record(f"fence: {collector[0]} during a pause", outcome[0] == "error", outcome[2].split(":")[0])
    assert outcome[0] == "error" and "LeaseLostError" in outcome[2], outcome
    _check_property(root, remaining)


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_a_lease_store_that_keeps_failing_fails_the_save_and_a_short_failure_does_not(
    backend, request, tally
):
    root = request.getfixturevalue(f"{backend}_root")
    server = request.getfixturevalue(f"{backend}_server")
    env_name = "AWS_ENDPOINT_URL" if backend == "s3" else "STORAGE_EMULATOR_HOST"
    with FaultProxy(server.url, seed=1) as proxy:
        endpoint = proxy.url if backend == "s3" else f"127.0.0.1:{proxy.port}"
        extra = {env_name: endpoint, "JCKPT_STORAGE_MAX_RETRIES": "0"}
        outcomes = {}
        for case, failing in (("short", 0.5), ("long", EXPIRED + TTL)):
            step = len(outcomes) + 1
            proc = _start("save", root, step, step, f"sleep:{2 * TTL + failing}", **extra)
            _line(proc, "paused")  # data written, the commit waits: the renewals must carry the lease
            proxy.configure(fail_rate=1.0, only="leases/")
            time.sleep(failing)
            proxy.configure(fail_rate=0.0, only="")
            outcomes[case] = _outcome(proc)
        tally.record(f"fence: lease writes failing ({backend})", outcomes["long"][0] == "error")
    assert outcomes["short"][0] == "ok", outcomes  # retried renewals carried it
    assert outcomes["long"][0] == "error" and "LeaseLostError" in outcomes["long"][2], outcomes
    _check_property(root, {1: 1})


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


def _free_pid_range(width: int = 40) -> int:
    """A pid above which ``width`` pids are unused in this namespace."""
    used = {int(n) for n in os.listdir("/proc") if n.isdigit()}
    start = 300
    while any(p in used for p in range(start, start + width)):
        start += width
    return start


def test_a_holder_in_another_pid_namespace_is_not_judged_dead_by_its_pid(tmp_path, tally):
    if not _unshare_works():
        pytest.skip("unshare --pid is not permitted here")
    root = str(tmp_path / "root")
    low = _free_pid_range()
    # Spend pids in the new namespace until the writer's pid is one that no process here has.
    script = (
        f'while [ "$(sh -c \'echo $$\')" -lt {low} ]; do :; done; '
        f'{sys.executable} {WORKER} hold {root}'  # a child of sh: not pid 1 there
    )
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        pid_there = int(_line(holder, "holding").split()[1])
        held, _ = lease.read(Root(root))
        assert held.pid == pid_there and not os.path.exists(f"/proc/{pid_there}")  # looks dead from here
        with pytest.raises(jckpt.RootLockedError, match="another process"):
            jckpt.CheckpointManager(root)
        tally.record("fence: holder in another PID namespace", True)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_plain_save_beside_a_managers_save_in_flight_is_refused(tmp_path):
    root = str(tmp_path / "root")
    entered = []
    saving.before_commit = lambda step: (entered.append(step), time.sleep(0.5))
    try:
        with jckpt.CheckpointManager(root) as mngr:
            mngr.save(1, state(1))
            with pytest.raises(jckpt.RootLockedError, match="another writer in this process"):
                jckpt.save(root, state(2), step=2)
            mngr.wait()
    finally:
        saving.before_commit = None
    assert entered == [1]
    _check_property(root, {1: 1})


def test_a_second_manager_on_a_root_in_the_same_process_is_refused(tmp_path):
    root = str(tmp_path / "root")
    with jckpt.CheckpointManager(root) as first:
        with pytest.raises(jckpt.RootLockedError):
            jckpt.CheckpointManager(root)
        first.save(1, state(1))
        reader = jckpt.CheckpointManager(root, read_only=True)  # readers are never refused
        first.wait()
        assert reader.restore(step=1)["b"].tolist() == [1] * 7
        with pytest.raises(PermissionError, match="read-only"):
            reader.save(2, state(2))
    with jckpt.CheckpointManager(root) as again:  # released by close
        again.save(2, state(2))
    _check_property(root, {1: 1, 2: 2})


def test_a_dropped_manager_frees_the_root_for_the_next_one(tmp_path):
    root = str(tmp_path / "root")
    jckpt.CheckpointManager(root, async_save=False).save(1, state(1))  # never closed, dropped
    import gc

    gc.collect()
    with jckpt.CheckpointManager(root, async_save=False) as mngr:
        mngr.save(2, state(2))
    _check_property(root, {1: 1, 2: 2})


def test_a_second_trainer_is_refused_before_it_trains(tmp_path):
    root = str(tmp_path / "root")
    holder = _start("hold", root)
    try:
        _line(holder, "holding")
        with pytest.raises(jckpt.RootLockedError, match="being written by another process"):
            jckpt.CheckpointManager(root)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_commit_whose_lease_was_replaced_is_removed_again(tmp_path):
    """The confirmation after the manifest write: another writer took the lease meanwhile."""
    root = str(tmp_path / "root")

    def steal(step):
        taken = lease.Lease("elsewhere", 1, "another-writer", time.time(), time.time() + 60, "", (), 60.0)
        Root(root).write(lease.KEY, lease._encode(taken))

    saving.before_commit = steal
    try:
        with pytest.raises(jckpt.LeaseLostError, match="replaced"):
            jckpt.save(root, state(1), step=1)
    finally:
        saving.before_commit = None
    assert jckpt.all_steps(root) == []


def test_random_pauses_of_a_writer_while_another_writes_and_gc_runs(tmp_path, tally):
    """SIGSTOP at random moments (no hook) past the ttl; meanwhile another writer saves and gc runs."""
    root = str(tmp_path / "root")
    rng = random.Random(19)
    reported: dict[int, int] = {}
    failures = []
    for trial in range(TRIALS):
        base = 1000 * (trial + 1)
        writer = _start("loop", root, base, 40, 1)
        first = _line(writer, "ok").split(" ", 2)  # it holds the root and is saving
        reported[int(first[1])] = int(first[2])
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(writer.pid, signal.SIGSTOP)
        time.sleep(EXPIRED)
        other = _run("save", root, base + 500, 2)
        if other[0] == "ok":
            reported[base + 500] = 2
        run_cli("gc", root)
        os.kill(writer.pid, signal.SIGCONT)
        out, err = writer.communicate(timeout=300)
        for line in out.splitlines():
            words = line.split(" ", 2)
            if words[0] == "ok":
                reported[int(words[1])] = int(words[2])
        try:
            _check_property(root, reported)
        except AssertionError as e:
            failures.append(f"trial {trial}: {str(e)[:200]}")
            break
    tally.add("fence: random pauses + writer + gc", TRIALS - len(failures), failures)
    assert not failures, failures


def test_resume_skips_a_damaged_latest_step_with_a_warning(tmp_path, caplog):
    root = str(tmp_path / "root")
    options = jckpt.SaveOptions(**OPTIONS)
    jckpt.save(root, state(1), step=1, options=options)
    jckpt.save(root, state(2), step=2, options=options)
    chunk = max((f for f in data_files(root) if "step_00000002" in str(f)), key=lambda f: f.stat().st_size)
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with jckpt.CheckpointManager(root, read_only=True) as mngr, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        restored, step = mngr.restore_or_init(lambda: state(0))
    assert step == 1 and restored["w"][0, 0] == 1
    messages = [str(w.message) for w in seen]
    assert any("step 2" in m and chunk.parent.name in m for m in messages), messages
    assert any("skipped damaged step 2" in r.getMessage() for r in caplog.records)
    with pytest.raises(jckpt.CorruptCheckpointError, match="step 2"):
        jckpt.restore(root, step=2)  # an explicit step still raises


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_a_trickling_object_store_fails_a_restore_instead_of_hanging(backend, request, tally):
    """A server sending 400 B/s: the low-speed floor aborts each try, retries end, the restore fails."""
    root = request.getfixturevalue(f"{backend}_root")
    server = request.getfixturevalue(f"{backend}_server")
    jckpt.save(root, state(1), step=1, options=jckpt.SaveOptions(**OPTIONS))
    env_name = "AWS_ENDPOINT_URL" if backend == "s3" else "STORAGE_EMULATOR_HOST"
    script = (
        "import sys, jckpt\n"
        "try:\n"
        "    jckpt.restore(sys.argv[1])\n"
        "except OSError as e:\n"
        "    print('failed', type(e).__name__, e)\n"
        "else:\n"
        "    print('restored')\n"
    )
    with FaultProxy(server.url, trickle=400) as proxy:
        endpoint = proxy.url if backend == "s3" else f"127.0.0.1:{proxy.port}"
        env = _env(**{
            env_name: endpoint,
            "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "2",  # the floor's window, shortened for the test
            "JCKPT_STORAGE_MAX_RETRIES": "1",
        })
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", script, root], capture_output=True, text=True, env=env, timeout=300
        )
        seconds = time.monotonic() - started
        assert proxy.injected["trickle"] >= 1
    tally.record(f"no hang: trickling {backend}", done.stdout.startswith("failed"), f"{seconds:.0f} s")
    assert done.stdout.startswith("failed"), (done.stdout, done.stderr[-2000:])
    assert "timed out" in done.stdout or "kept failing" in done.stdout, done.stdout


def test_a_stopped_process_holding_the_lease_lock_fails_a_writer_instead_of_hanging(tmp_path):
    root = tmp_path / "root"
    jckpt.save(root, state(1), step=1, options=jckpt.SaveOptions(**OPTIONS))
    lock = root / "leases" / lease.LOCK_FILE
    script = (
        "import fcntl, os, signal, sys\n"
        "f = open(sys.argv[1], 'a+b'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); os.kill(os.getpid(), signal.SIGSTOP)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(jckpt.RootLockedError, match="stopped process"):
            jckpt.save(root, state(2), step=2)
    finally:
        holder.kill()
        holder.wait()
    jckpt.save(root, state(2), step=2)  # the lock went with its holder
    _check_property(root, {1: 1, 2: 2})
