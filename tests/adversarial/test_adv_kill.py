"""SIGKILL at random moments during every mutating operation (issue 9): save, incremental save,
delete, gc and async manager saves, each in a real process killed with kill -9.

After every kill: every step reported saved (and not being deleted) is still committed; every
committed step verifies and restores bit-exact; the next operation works.  After all trials of
a scenario: ``jckpt gc`` then deleting every step leaves no chunk file behind (no debris that
gc cannot reclaim).

``JCKPT_ADV_KILL_TRIALS`` (default 8) sets the trials per scenario.
"""

import os
import random
import signal
import time

import pytest
from advutil import (
    OPTIONS,
    cli,
    data_files,
    expected_state,
    kill9,
    read_log,
    start_worker,
    state_problem,
    wait_for_lines,
)

import jckpt

TRIALS = int(os.environ.get("JCKPT_ADV_KILL_TRIALS", "8"))


def _kill_after(proc, prefix, count, rng, max_delay=0.15):
    """Lets ``count`` lines starting with ``prefix`` appear, waits a random moment, SIGKILLs.

    Returns every line the worker printed (those after the kill point included).
    """
    lines = wait_for_lines(proc, prefix, count)
    time.sleep(rng.uniform(0.0, max_delay))  # a random moment, so kills land in every phase
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines += proc.stdout.read().splitlines()
    kill9(proc)  # reaps and closes the pipes
    return lines


def _phase(lines) -> str:
    """Where the kill landed: "in <operation>" when the last line announced one that did not finish."""
    last = lines[-1].split()[0] if lines else ""
    return f"killed in {last}" if last in ("saving", "deleting", "gc") else "killed between operations"


def _steps_with(lines, word):
    return {int(line.split()[1]) for line in lines if line.startswith(word + " ")}


def _problems(root, must_have, maybe=()):
    """What is wrong with the root: missing steps, steps that fail verify or restore wrong."""
    problems = []
    committed = set(jckpt.all_steps(root))
    for step in sorted(set(must_have) - committed - set(maybe)):
        problems.append(f"step {step} was reported saved and is gone")
    for step in sorted(committed):
        try:
            jckpt.verify(root, step)
            problem = state_problem(jckpt.restore(root, step=step), step)
        except Exception as e:  # noqa: BLE001
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        if problem:
            problems.append(f"committed step {step}: {problem}")
    return problems


def _no_debris_after_gc(root):
    """gc, then deleting every step and gc again, must leave no chunk file."""
    assert cli("gc", root).returncode == 0
    assert not _problems(root, [])
    for step in jckpt.all_steps(root):
        jckpt.delete(root, step)
    assert cli("gc", root).returncode == 0
    left = data_files(root)
    assert not left, f"{len(left)} chunk files survived gc and deleting every step: {left[:5]}"


def _save_trials(tmp_path, tally, kind, scenario, seed, trials=TRIALS):
    rng = random.Random(seed)
    root = tmp_path / "root"
    saved: set[int] = set()
    failures = []
    for trial in range(trials):
        start = (jckpt.latest_step(root) or 0) + 1 if trial else 0
        proc = start_worker("save-loop", root, start, 10_000, kind, tmp_path / f"log{trial}")
        lines = _kill_after(proc, "saved", rng.randint(1, 3), rng)
        saved |= _steps_with(lines, "saved")
        problems = _problems(root, saved)
        tally.record(scenario, not problems, _phase(lines) if not problems else problems[0].split(":")[0])
        failures += [f"trial {trial}: {p}" for p in problems]
    assert not failures, "\n".join(failures[:10])
    _no_debris_after_gc(root)


def test_one_sigkill_during_incremental_saves(tmp_path, tally):
    """The default run's smoke trial (the slow tests run many)."""
    _save_trials(tmp_path, tally, "incremental", "SIGKILL during incremental save", seed=10, trials=1)


@pytest.mark.slow
def test_sigkill_during_full_saves(tmp_path, tally):
    _save_trials(tmp_path, tally, "full", "SIGKILL during save", seed=11)


@pytest.mark.slow
def test_sigkill_during_incremental_saves(tmp_path, tally):
    _save_trials(tmp_path, tally, "mixed", "SIGKILL during incremental save", seed=12)


@pytest.mark.slow
def test_sigkill_during_deletes(tmp_path, tally):
    rng = random.Random(13)
    root = tmp_path / "root"
    n_steps = TRIALS * 4 + 4
    options = jckpt.SaveOptions(**OPTIONS)
    for step in range(n_steps):  # chunks shared between steps: deletes must keep what others need
        jckpt.save(
            root,
            expected_state(step),
            step=step,
            kind="full" if step % 4 == 0 else "incremental",
            options=options,
        )
    remaining = list(range(n_steps))
    failures = []
    for trial in range(TRIALS):
        targets = rng.sample(remaining, 4)
        proc = start_worker("delete-steps", root, tmp_path / f"log{trial}", *targets)
        lines = _kill_after(proc, "deleting", rng.randint(1, 3), rng, max_delay=0.05)
        started = _steps_with(lines, "deleting")
        done = _steps_with(lines, "deleted")
        maybe = started - done  # killed while deleting it: either still there (intact) or gone
        problems = _problems(root, set(remaining) - started, maybe)
        for step in done:
            if step in jckpt.all_steps(root):
                problems.append(f"step {step} was reported deleted and is still listed")
        remaining = [s for s in remaining if s in jckpt.all_steps(root)]
        tally.record(
            "SIGKILL during delete",
            not problems,
            _phase(lines) if not problems else problems[0].split(":")[0],
        )
        failures += [f"trial {trial}: {p}" for p in problems]
    assert not failures, "\n".join(failures[:10])
    _no_debris_after_gc(root)


@pytest.mark.slow
def test_sigkill_during_gc(tmp_path, tally):
    """The churn role saves a full step, deletes the previous one and runs `jckpt gc`, over and over."""
    rng = random.Random(14)
    root = tmp_path / "root"
    failures = []
    saved, deleting, deleted = set(), set(), set()
    for trial in range(TRIALS):
        start = (jckpt.latest_step(root) or 0) + 1 if trial else 0
        proc = start_worker("churn", root, start, 10_000, tmp_path / f"log{trial}")
        lines = _kill_after(proc, "gc", rng.randint(1, 3), rng, max_delay=0.1)
        saved |= _steps_with(lines, "saved")
        deleting |= _steps_with(lines, "deleting")
        deleted |= _steps_with(lines, "deleted")
        problems = _problems(root, saved - deleting, deleting - deleted)
        tally.record(
            "SIGKILL during gc (save/delete/gc churn)",
            not problems,
            _phase(lines) if not problems else problems[0].split(":")[0],
        )
        failures += [f"trial {trial}: {p}" for p in problems]
    assert not failures, "\n".join(failures[:10])
    _no_debris_after_gc(root)


@pytest.mark.slow
def test_sigkill_during_async_manager_saves(tmp_path, tally):
    rng = random.Random(15)
    root = tmp_path / "root"
    failures = []
    confirmed: set[int] = set()
    for trial in range(TRIALS):
        start = (jckpt.latest_step(root) or 0) + 1 if trial else 0
        log = tmp_path / f"log{trial}"
        proc = start_worker("manager-loop", root, start, 10_000, log)
        lines = _kill_after(proc, "saved", rng.randint(1, 3), rng)
        confirmed |= _steps_with(lines, "saved")
        errors = [r for r in read_log(log) if r and r[0] == "err"]
        problems = _problems(root, confirmed) + [f"save error: {r[1:]}" for r in errors]
        tally.record(
            "SIGKILL during async manager saves",
            not problems,
            _phase(lines) if not problems else problems[0].split(":")[0],
        )
        failures += [f"trial {trial}: {p}" for p in problems]
        # a new manager resumes on the killed root
        manager = jckpt.CheckpointManager(root, async_save=False, options=jckpt.SaveOptions(**OPTIONS))
        resumed = manager.latest_step()
        manager.close()
        assert resumed == jckpt.latest_step(root)
    assert not failures, "\n".join(failures[:10])
    _no_debris_after_gc(root)
