"""Disk full and read-only file systems on a small tmpfs (issue 9 defects 7 and 8).

A save that runs out of space, wherever it happens (a chunk, the packed blob, array
metadata, the manifest), raises ``OSError(errno.ENOSPC)``, commits nothing, leaves no
debris, and damages no committed step.  On a read-only root, readers work and writers
(delete, save, gc, rm) fail with an OSError.

The sweep: free space is set, every third page, from one page to what a save needs (and one
page short of it: the manifest) and just above, by a filler file next to the root; each trial
tries one save.
"""

import errno
import os
import subprocess

import numpy as np
import pytest
from advutil import (
    OPTIONS,
    cli,
    data_files,
    expected_state,
    fingerprint,
    one_line_error,
    state_problem,
    tmpfs,
    tree_problem,
)

import jckpt

PAGE = 4096
CHUNK = 8192  # many chunk writes in flight when the disk fills up
OPTIONS_HERE = {"chunk_bytes": CHUNK}
N_BIG = 100  # chunks of "big"


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(mount, leave_free: int):
    """(Re)writes the filler file so that ``leave_free`` bytes stay free; returns what is free."""
    filler = mount / "filler"
    if filler.exists():
        filler.unlink()
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, _free(mount) - leave_free))
    return _free(mount)


def _state(step: int) -> dict:
    """800 KiB in 100 chunks plus 20 small leaves; from step 0, half of the chunks change."""
    big = np.zeros(N_BIG * CHUNK // 4, np.float32)
    big[: big.size // 2] = step
    return {"big": big, "small": [np.full(10, step + i) for i in range(20)], "step": step}


def _sweep(mount, *, kind: str):
    """Runs the sweep; returns one record per trial.

    Debris is looked for right after the failed save and again before the next trial
    (a write still in flight when save raised lands later, and counts).
    """
    root = mount / "root"
    options = jckpt.SaveOptions(**OPTIONS_HERE)
    jckpt.save(root, _state(0), step=0, options=options)
    before = _free(mount)  # what one save takes: measured once, then undone
    jckpt.save(root, _state(1), step=1, kind=kind, options=options, base=base(kind))
    needed = before - _free(mount)
    jckpt.delete(root, 1)
    assert _free(mount) == before, "a delete must give back what the save took"
    room = sorted(set(range(needed - PAGE, PAGE - 1, -3 * PAGE)) | {needed, needed + PAGE, needed + 2 * PAGE})
    trials = []
    for step, free in enumerate(room, start=2):
        actual_free = _fill(mount, free)
        view = set(fingerprint(root).items())
        record = {"free": actual_free, "needed": needed}
        try:
            jckpt.save(root, _state(step), step=step, kind=kind, options=options, base=base(kind))
        except Exception as e:  # noqa: BLE001 - classified below
            record["error"] = e
            record["debris"] = set(fingerprint(root).items()) - view
            record["committed"] = step in jckpt.all_steps(root)
        else:
            record["error"] = None
            record["exact"] = tree_problem(jckpt.restore(root, step=step), _state(step)) is None
            jckpt.delete(root, step)
        (mount / "filler").unlink()
        record["step0"] = tree_problem(jckpt.restore(root, step=0), _state(0)) is None
        if record["error"] is not None:
            record["debris"] = sorted(record["debris"] | (set(fingerprint(root).items()) - view))
        trials.append(record)
    return root, trials


@pytest.fixture(scope="module", params=["full", "incremental"])
def sweep(request, tmp_path_factory):
    with tmpfs(tmp_path_factory.mktemp("disk") / "tmpfs") as mount:
        root, trials = _sweep(mount, kind=request.param)
        yield request.param, mount, root, trials


def base(kind):
    return 0 if kind == "incremental" else None


def _failed(trials):
    return [t for t in trials if t["error"] is not None]


def test_the_sweep_hits_disk_full(sweep):
    _, _, _, trials = sweep
    assert len(_failed(trials)) >= len(trials) - 3, "all but the last trials must run out of space"
    assert any(t["error"] is None for t in trials), "the last trials have room for the save"


def test_a_save_that_runs_out_of_space_commits_nothing_and_damages_nothing(sweep, tally):
    kind, _, root, trials = sweep
    bad = [t for t in _failed(trials) if t["committed"]] + [t for t in trials if not t["step0"]]
    bad += [t for t in trials if t["error"] is None and not t["exact"]]
    for t in trials:
        tally.record(f"disk full ({kind} save): nothing lost", t not in bad)
    assert not bad, bad[:3]
    for step in jckpt.all_steps(root):
        jckpt.verify(root, step)


def test_a_save_that_runs_out_of_space_raises_enospc(sweep, tally):
    kind, _, _, trials = sweep
    wrong = []
    for t in _failed(trials):
        e = t["error"]
        ok = isinstance(e, OSError) and e.errno == errno.ENOSPC
        tally.record(f"disk full ({kind} save): OSError(ENOSPC)", ok, "ENOSPC" if ok else type(e).__name__)
        if not ok:
            wrong.append(f"{t['free']} bytes free: {type(e).__name__}: {str(e)[:200]}")
    assert not wrong, f"{len(wrong)} of {len(_failed(trials))} failed saves:\n" + "\n".join(wrong[:5])


def test_a_save_that_runs_out_of_space_leaves_no_debris(sweep, tally):
    kind, _, _, trials = sweep
    littered = []
    for t in _failed(trials):
        tally.record(
            f"disk full ({kind} save): no debris", not t["debris"], "debris" if t["debris"] else "clean"
        )
        if t["debris"]:
            littered.append(f"{t['free']} bytes free: {[path for path, _ in t['debris']][:4]}")
    assert not littered, f"{len(littered)} of {len(_failed(trials))} failed saves left debris:\n" + "\n".join(
        littered[:5]
    )


def test_after_the_sweep_gc_and_deletes_reclaim_everything(sweep):
    _, mount, root, _ = sweep
    assert cli("gc", root).returncode == 0
    for step in jckpt.all_steps(root):
        jckpt.delete(root, step)
    assert cli("gc", root).returncode == 0
    assert data_files(root) == [], "chunk files survived deleting every step and gc"


# ------------------------------------------------------------------ read-only


def _remount(mount, mode):
    result = subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot remount {mode}: {result.stderr.strip()}")


@pytest.fixture
def read_only_root(small_tmpfs):
    root = small_tmpfs / "root"
    for step in (0, 1):
        jckpt.save(
            root, expected_state(step), step=step, kind="incremental", options=jckpt.SaveOptions(**OPTIONS)
        )
    _remount(small_tmpfs, "ro")
    yield root
    _remount(small_tmpfs, "rw")


def test_a_read_only_root_can_be_read(read_only_root):
    for step in (0, 1):
        assert state_problem(jckpt.restore(read_only_root, step=step), step) is None
        jckpt.verify(read_only_root, step)
    assert jckpt.all_steps(read_only_root) == [0, 1] and jckpt.info(read_only_root).step == 1
    assert cli("verify", read_only_root, "--all").returncode == 0
    assert cli("ls", read_only_root).returncode == 0


def _read_only_outcome(run) -> str:
    try:
        run()
    except OSError as e:
        return "OSError(EROFS)" if e.errno == errno.EROFS else f"OSError({e.errno})"
    except Exception as e:  # noqa: BLE001
        return type(e).__name__
    return "no error"


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(
            "delete"
        ),
        "save",
    ],
)
def test_writing_to_a_read_only_root_is_an_os_error(read_only_root, tally, op):
    run = {
        "delete": lambda: jckpt.delete(read_only_root, 0),
        "save": lambda: jckpt.save(read_only_root, expected_state(2), step=2),
    }[op]
    outcome = _read_only_outcome(run)
    tally.record(
        "read-only root: writers get OSError(EROFS)", outcome == "OSError(EROFS)", f"{op}: {outcome}"
    )
    assert jckpt.all_steps(read_only_root) == [0, 1]
    assert outcome == "OSError(EROFS)", outcome


def test_the_cli_on_a_read_only_root_fails_in_one_line(read_only_root):
    one_line_error(cli("rm", read_only_root, "0"))
    assert jckpt.all_steps(read_only_root) == [0, 1]
    result = cli("gc", read_only_root)  # nothing to collect: may succeed, or fail in one line
    if result.returncode != 0:
        one_line_error(result)


def test_filling_the_disk_with_many_small_leaves(small_tmpfs, tally):
    """Disk full while the packed blob of 4,000 small leaves is written: nothing committed, no debris."""
    root = small_tmpfs / "root"
    jckpt.save(root, {"x": 0}, step=0)
    state = {f"leaf{i}": np.full(300, i, np.float32) for i in range(4000)}  # ~4.8 MB packed: cannot fit
    view = fingerprint(root)
    with pytest.raises(OSError) as caught:
        jckpt.save(root, state, step=1)
    assert caught.value.errno == errno.ENOSPC
    debris = sorted(set(fingerprint(root).items()) - set(view.items()))
    tally.record("disk full: many small leaves", not debris, "debris" if debris else "clean")
    assert jckpt.all_steps(root) == [0]
    assert not debris, debris[:5]
