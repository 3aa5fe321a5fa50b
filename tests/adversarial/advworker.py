"""Worker processes of the adversarial suite: ``python advworker.py ROLE ARGS...``.

Each role acts on a checkpoint root through the public API or the CLI and reports what
happened in a log file (one tab-separated record per line, flushed at once, so a SIGKILL
loses nothing that was reported) and on stdout (for the parent to time its kills).

Roles:
  save-loop ROOT START COUNT KIND LOG          jckpt.save of steps START.. (kind full/incremental/mixed)
  manager-loop ROOT START COUNT LOG            CheckpointManager, async, incremental(full_every=3)
  evaluate ROOT LOG STOP                       restore the latest step in a loop, check it bit-exact
  gc-loop ROOT LOG STOP                        `jckpt gc` in a loop
  rm-loop ROOT LOG STOP SEED                   delete random committed steps (API and `jckpt rm`)
  delete-steps ROOT LOG STEP...                delete the given steps, one after the other
  churn ROOT START COUNT LOG                   save a full step, delete the previous one, gc; repeat
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import sys
import time

from advutil import OPTIONS, expected_state, state_problem


class Log:
    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def __call__(self, *fields) -> None:
        self.file.write("\t".join(str(f).replace("\t", " ").replace("\n", " | ") for f in fields) + "\n")
        self.file.flush()


def say(*words) -> None:
    print(*words, flush=True)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _stopped(stop: str) -> bool:
    return os.path.exists(stop)


def save_loop(root, start, count, kind, log_path):
    import jckpt

    log = Log(log_path)
    log("pid", os.getpid())
    options = jckpt.SaveOptions(**OPTIONS)
    for step in range(int(start), int(start) + int(count)):
        this_kind = kind if kind != "mixed" else ("full" if step % 4 == 0 else "incremental")
        say("saving", step)
        log("saving", step, this_kind)
        try:
            info = jckpt.save(root, expected_state(step), step=step, kind=this_kind, options=options)
        except Exception as e:  # noqa: BLE001 - reported
            log("err", step, _error(e))
            say("failed", step)
        else:
            log("ok", step, info.kind)
            say("saved", step)
    say("done")


def manager_loop(root, start, count, log_path):
    import jckpt
    from jckpt import policy as P

    log = Log(log_path)
    log("pid", os.getpid())
    manager = jckpt.CheckpointManager(
        root,
        policy=P.combine(P.every_n_steps(1), P.incremental(full_every=3)),
        async_save=True,
        options=jckpt.SaveOptions(**OPTIONS),
    )
    pending = None  # the step whose background save has not been confirmed yet
    for step in range(int(start), int(start) + int(count)):
        say("saving", step)
        log("saving", step)
        try:
            manager.maybe_save(step, expected_state(step))
        except jckpt.CheckpointSaveError as e:
            log("err", e.step, _error(e.__cause__ or e))
            pending = None
            with contextlib.suppress(jckpt.CheckpointSaveError):
                manager.maybe_save(step, expected_state(step))
        # maybe_save waits for the previous save and raises if it failed: it succeeded
        if pending is not None and pending != step:
            log("ok", pending)
            say("saved", pending)
        pending = step
    try:
        manager.close()
    except jckpt.CheckpointSaveError as e:
        log("err", e.step, _error(e.__cause__ or e))
    else:
        if pending is not None:
            log("ok", pending)
            say("saved", pending)
    say("done")


def evaluate(root, log_path, stop):
    import jckpt

    log = Log(log_path)
    log("ready", os.getpid())
    while not _stopped(stop):
        try:
            step = jckpt.latest_step(root)
        except Exception as e:  # noqa: BLE001
            log("ERR", "latest_step", _error(e))
            continue
        if step is None:
            time.sleep(0.02)
            continue
        try:
            problem = state_problem(jckpt.restore(root, step=step), step)
        except jckpt.CheckpointNotFoundError:
            log("gone", step)
        except Exception as e:  # noqa: BLE001 - a reader racing a delete may only see NotFound
            log("ERR", step, _error(e))
        else:
            log("BAD", step, problem) if problem else log("ok", step)
        time.sleep(0.01)


def _cli(*args) -> tuple[int, str]:
    from jckpt import cli

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, err.getvalue().strip()


def gc_loop(root, log_path, stop):
    from jckpt import cli  # noqa: F401 - import before reporting ready

    log = Log(log_path)
    log("ready", os.getpid())
    while not _stopped(stop):
        if os.path.exists(os.path.join(root)):
            code, err = _cli("gc", root)
            log("gc", code, err)
        time.sleep(0.05)


def rm_loop(root, log_path, stop, seed):
    import jckpt

    log = Log(log_path)
    log("ready", os.getpid())
    rng = random.Random(int(seed))
    i = 0
    while not _stopped(stop):
        time.sleep(0.1)
        try:
            steps = jckpt.all_steps(root)
        except Exception as e:  # noqa: BLE001
            log("ERR", "all_steps", _error(e))
            continue
        if len(steps) < 3:
            continue
        step = rng.choice(steps)
        log("rm-intent", step)
        i += 1
        if i % 2:
            try:
                jckpt.delete(root, step)
            except Exception as e:  # noqa: BLE001
                log("rm-err", step, _error(e))
            else:
                log("rm-done", step)
        else:
            code, err = _cli("rm", root, step)
            log("rm-done", step) if code == 0 else log("rm-err", step, err)


def delete_steps(root, log_path, *steps):
    import jckpt

    log = Log(log_path)
    for step in steps:
        say("deleting", step)
        log("deleting", step)
        jckpt.delete(root, int(step))
        log("deleted", step)
        say("deleted", step)
    say("done")


def churn(root, start, count, log_path):
    import jckpt

    log = Log(log_path)
    options = jckpt.SaveOptions(**OPTIONS)
    for step in range(int(start), int(start) + int(count)):
        say("saving", step)
        jckpt.save(root, expected_state(step), step=step, options=options)
        log("ok", step)
        say("saved", step)
        if step > int(start):
            say("deleting", step - 1)
            log("deleting", step - 1)
            jckpt.delete(root, step - 1)
            log("deleted", step - 1)
            say("deleted", step - 1)
        say("gc")
        code, err = _cli("gc", root)
        log("gc", code, err)
    say("done")


ROLES = {
    "save-loop": save_loop,
    "manager-loop": manager_loop,
    "evaluate": evaluate,
    "gc-loop": gc_loop,
    "rm-loop": rm_loop,
    "delete-steps": delete_steps,
    "churn": churn,
}

if __name__ == "__main__":
    ROLES[sys.argv[1]](*sys.argv[2:])
