"""Many hands on one root, as real processes (issue 9 defect 2).

A trainer (a loop of incremental ``jckpt.save``, or an async CheckpointManager) runs while
other processes run ``jckpt gc`` and ``jckpt rm`` / ``jckpt.delete`` in loops and an
evaluator restores the latest step in a loop.  Afterwards:

* every save that reported success is still committed, or was deleted by an explicit rm of it;
* every committed step verifies and restores bit-exact;
* every read of the evaluator was bit-exact or CheckpointNotFoundError.

A second writer on the same root is refused with an error naming the holder (host, pid), or
works; it never causes silent damage.
"""

import os
import socket
import subprocess

import pytest
from advutil import read_log, start_worker, state_problem, wait_for_log

import jckpt

pytestmark = pytest.mark.slow

SAVES = 60  # per trainer run


def _start(tmp_path, name, *args):
    err = open(tmp_path / f"{name}.stderr", "w")  # noqa: SIM115 - closed by the OS with the process
    return start_worker(*args, stdout=subprocess.DEVNULL, stderr=err)


def _stop(procs, stop_file, timeout=120):
    stop_file.write_text("stop")
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _records(log, kind):
    return [r for r in read_log(log) if r and r[0] == kind]


def _mix(tmp_path, trainer_args, *, gc=True, rm=True, evaluator=True, seed=0):
    """Runs one mix; returns a report dict (the logs parsed, the final state checked)."""
    root = tmp_path / "root"
    stop = tmp_path / "stop"
    others = []
    if gc:
        others.append(("gc", _start(tmp_path, "gc", "gc-loop", root, tmp_path / "gc.log", stop)))
    if rm:
        others.append(("rm", _start(tmp_path, "rm", "rm-loop", root, tmp_path / "rm.log", stop, seed)))
    if evaluator:
        others.append(("eval", _start(tmp_path, "eval", "evaluate", root, tmp_path / "eval.log", stop)))
    for name, _ in others:
        wait_for_log(tmp_path / f"{name}.log", "ready")
    trainer = _start(
        tmp_path, "trainer", *trainer_args[:1], root, *trainer_args[1:], tmp_path / "trainer.log"
    )
    try:
        trainer.wait(timeout=400)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        _stop([p for _, p in others], stop)
    assert trainer.returncode == 0, (tmp_path / "trainer.stderr").read_text()[-3000:]

    reported = {int(r[1]) for r in _records(tmp_path / "trainer.log", "ok")}
    removed = {int(r[1]) for r in _records(tmp_path / "rm.log", "rm-done")}
    final = set(jckpt.all_steps(root))
    unverified = {}
    for step in sorted(final):
        try:
            jckpt.verify(root, step)
            problem = state_problem(jckpt.restore(root, step=step), step)
        except Exception as e:  # noqa: BLE001 - reported
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        if problem:
            unverified[step] = problem
    reads = read_log(tmp_path / "eval.log")
    return {
        "reported": reported,
        "final": final,
        "lost": sorted(reported - final - removed),
        "unverified": unverified,
        "save_errors": [r[1:] for r in _records(tmp_path / "trainer.log", "err")],
        "reads": len([r for r in reads if r and r[0] in ("ok", "gone")]),
        "bad_reads": [r for r in reads if r and r[0] in ("BAD", "ERR")],
        "removed": sorted(removed),
        "gc_runs": len(_records(tmp_path / "gc.log", "gc")),
        "gc_errors": [r for r in _records(tmp_path / "gc.log", "gc") if r[1] != "0"],
    }


def _account(tally, scenario, report):
    lost, unverified, bad = report["lost"], report["unverified"], report["bad_reads"]
    tally.add(f"{scenario}: reported saves kept", len(report["reported"]) - len(lost), ["lost"] * len(lost))
    tally.add(
        f"{scenario}: committed steps verify",
        len(report["final"]) - len(unverified),
        [problem.split(":")[0] for problem in unverified.values()],
    )
    if report["reads"] or bad:
        tally.add(
            f"{scenario}: evaluator reads exact or NotFound",
            report["reads"],
            [f"{r[0]} {r[-1].split(':')[0]}" for r in bad],
        )


def _assert_clean(report):
    summary = (
        f"{len(report['reported'])} saves reported, lost {report['lost']}, "
        f"removed by rm {report['removed']}; failing verify/restore: {report['unverified']}; "
        f"bad reads {report['bad_reads'][:5]}; save errors {report['save_errors'][:5]}; "
        f"gc runs {report['gc_runs']}, errors {report['gc_errors'][:3]}"
    )
    assert not report["lost"] and not report["unverified"] and not report["bad_reads"], summary
    assert report["reported"], "the trainer saved nothing: " + summary


def test_incremental_trainer_with_gc_rm_and_an_evaluator(tmp_path, tally):
    report = _mix(tmp_path, ["save-loop", 0, SAVES, "mixed"], seed=1)
    _account(tally, "trainer (save loop) + gc + rm + evaluator", report)
    _assert_clean(report)


def test_async_manager_with_gc_rm_and_an_evaluator(tmp_path, tally):
    report = _mix(tmp_path, ["manager-loop", 0, SAVES], seed=2)
    _account(tally, "trainer (async manager) + gc + rm + evaluator", report)
    _assert_clean(report)


def test_incremental_trainer_with_gc_only(tmp_path, tally):
    report = _mix(tmp_path, ["save-loop", 0, SAVES, "incremental"], rm=False, evaluator=False)
    _account(tally, "trainer (save loop) + gc", report)
    _assert_clean(report)


def test_readers_racing_deletes_see_exact_data_or_not_found(tmp_path, tally):
    report = _mix(tmp_path, ["save-loop", 0, SAVES, "mixed"], gc=False, seed=3)
    _account(tally, "trainer (save loop) + rm + evaluator", report)
    _assert_clean(report)


def test_a_second_writer_is_refused_naming_the_holder_or_works(tmp_path, tally):
    root = tmp_path / "root"
    stop = tmp_path / "stop"
    evaluator = _start(tmp_path, "eval", "evaluate", root, tmp_path / "eval.log", stop)
    wait_for_log(tmp_path / "eval.log", "ready")
    writers = [
        _start(tmp_path, f"w{i}", "save-loop", root, start, SAVES, "mixed", tmp_path / f"w{i}.log")
        for i, start in enumerate((0, 10_000))
    ]
    for w in writers:
        w.wait(timeout=400)
    _stop([evaluator], stop)
    host = socket.gethostname()
    final = set(jckpt.all_steps(root))
    problems = []
    for i in range(2):
        other = writers[1 - i].pid
        log = tmp_path / f"w{i}.log"
        for r in _records(log, "ok"):
            step = int(r[1])
            try:
                jckpt.verify(root, step)
                problem = state_problem(jckpt.restore(root, step=step), step)
            except Exception as e:  # noqa: BLE001
                problem = f"{type(e).__name__}: {str(e)[:150]}"
            if step not in final:
                problem = "reported saved, then lost"
            tally.record(
                "two writers: reported saves intact", not problem, problem.split(":")[0] if problem else ""
            )
            if problem:
                problems.append(f"writer {i} step {step}: {problem}")
        for r in _records(log, "err"):
            names_holder = str(other) in r[2] and host in r[2]
            tally.record("two writers: refusals name the holder", names_holder, r[2].split(":")[0])
            if not names_holder:
                problems.append(f"writer {i} step {r[1]} refused without naming the holder: {r[2][:200]}")
    bad_reads = [r for r in read_log(tmp_path / "eval.log") if r and r[0] in ("BAD", "ERR")]
    problems += [f"evaluator: {r}" for r in bad_reads[:5]]
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:20])


def test_the_workers_run(tmp_path):
    """A check of the harness itself, without concurrency: a trainer alone loses nothing."""
    report = _mix(tmp_path, ["save-loop", 0, 8, "mixed"], gc=False, rm=False, evaluator=False)
    assert report["reported"] == set(range(8)) and not report["lost"] and not report["unverified"]
    assert os.path.exists(tmp_path / "trainer.log")
