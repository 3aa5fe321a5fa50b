"""Writers for the fenced-commit trials: ``python fenceworker.py ROLE ROOT ARGS...``.

The lease ttl comes from ``$JCKPT_LEASE_TTL_SECONDS`` (the tests use a few seconds).  Every
outcome is printed on stdout, one line each, flushed: ``ok STEP VALUE`` for a save that
reported success, ``error STEP TYPE: MESSAGE`` for one that failed.

Roles:
  save ROOT STEP VALUE [pause|sleep:S]      jckpt.save; ``pause``: SIGSTOP itself right before the
                                            commit (after printing ``paused``); ``sleep:S``: sleep S s there
  manager ROOT STEP VALUE [pause|sleep:S]   the same through an async CheckpointManager (save, then wait)
  hold ROOT                                 a CheckpointManager that holds the root until stdin closes
  loop ROOT START COUNT VALUE               a manager saving steps START.. one after the other
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np


def state(value: int) -> dict:
    """About 1 MiB in 4 chunks plus small leaves, every element ``value``."""
    return {
        "w": np.full((256, 1024), value, np.float32),
        "b": np.full(7, value, np.int32),
        "small": [np.full(3, value, np.float64) for _ in range(3)],
    }


OPTIONS = {"chunk_bytes": 256 * 1024}


def say(*words) -> None:
    print(*words, flush=True)


def _hook(how: str):
    """The test-only hook run right before a commit (``jckpt.saving.before_commit``)."""
    if how == "pause":

        def pause(step):
            say("paused", step)
            os.kill(os.getpid(), signal.SIGSTOP)

        return pause
    if how.startswith("sleep:"):
        seconds = float(how.split(":", 1)[1])

        def sleep(step):
            say("paused", step)
            time.sleep(seconds)

        return sleep
    return None


def _report(step, value, call) -> None:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        cause = e.__cause__ if type(e).__name__ == "CheckpointSaveError" and e.__cause__ else e
        say("error", step, f"{type(cause).__name__}: {cause}".replace("\n", " | "))
    else:
        say("ok", step, value)


def main(role: str, root: str, *args: str) -> None:
    import jckpt
    from jckpt import saving

    options = jckpt.SaveOptions(**OPTIONS)
    if role in ("save", "manager"):
        step, value = int(args[0]), int(args[1])
        saving.before_commit = _hook(args[2] if len(args) > 2 else "")
        if role == "save":
            _report(step, value, lambda: jckpt.save(root, state(value), step=step, options=options))
            return
        try:
            mngr = jckpt.CheckpointManager(root, options=options)
        except Exception as e:  # noqa: BLE001
            say("error", step, f"{type(e).__name__}: {e}")
            return

        def save_and_wait():
            mngr.save(step, state(value))
            say("started", step)
            mngr.wait()

        _report(step, value, save_and_wait)
        try:
            mngr.close()
        except Exception:  # noqa: BLE001 - its error was reported by wait()
            pass
        return
    if role == "hold":
        with jckpt.CheckpointManager(root, options=options, async_save=False):
            say("holding", os.getpid())
            sys.stdin.readline()
        say("released")
        return
    if role == "loop":
        start, count, value = int(args[0]), int(args[1]), int(args[2])
        mngr = None
        for step in range(start, start + count):
            if mngr is None:
                try:
                    mngr = jckpt.CheckpointManager(root, options=options, async_save=False)
                except Exception as e:  # noqa: BLE001 - another writer holds the root: try again later
                    say("error", step, f"{type(e).__name__}: {e}")
                    time.sleep(0.2)
                    continue
            _report(step, value, lambda: mngr.save(step, state(value)))  # noqa: B023 - called at once
        say("done")
        return
    raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
