"""Helpers of the adversarial suite (issue 9): states, file finders, subprocesses, the trial tally.

Nothing here knows jckpt's internal modules.  Files are located generically so the
tests hold for the version-1 layout (``step_XXXXXXXX/manifest.json``) and for a
version-2 one (``manifests/step_XXXXXXXX.json``): a *manifest* of step N is a
``.json`` file (not ``zarr.json``) whose path under the root names ``step_<N>``; the
*root marker* is a ``.json`` file directly in the root; *data files* are the
chunk files of zarr arrays (under a ``c/`` directory).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "advworker.py"

# ---------------------------------------------------------------- deterministic states

CHUNK_ELEMS = 16384  # float32: 64 KiB chunks
N_CHUNKS = 8  # "big" is 512 KiB: a chunked array of its own (leaves <= 256 KiB are packed together)
OPTIONS = {"chunk_bytes": CHUNK_ELEMS * 4}


def expected_state(step: int, n_chunks: int = N_CHUNKS) -> dict:
    """The state saved as ``step``: from ``step - 1`` to ``step`` exactly one chunk of ``big`` changes.

    Chunk ``j`` of ``big`` holds the last step ``t <= step`` with ``t % n_chunks == j``
    (or -1), so incremental saves share most chunks with their base.
    """
    big = np.empty(n_chunks * CHUNK_ELEMS, np.float32)
    for j in range(n_chunks):
        last = step - ((step - j) % n_chunks) if step >= j else -1
        big[j * CHUNK_ELEMS : (j + 1) * CHUNK_ELEMS] = last + np.arange(CHUNK_ELEMS, dtype=np.float32) / 2**15
    return {
        "big": big,
        "small": [np.full(8, step * 10 + i, np.int64) for i in range(4)],
        "rng": np.arange(6, dtype=np.uint32) * np.uint32(step + 1),
        "step": step,
    }


def state_problem(restored, step: int, n_chunks: int = N_CHUNKS) -> str | None:
    """None when ``restored`` (restored without ``like``) is bit-exact ``expected_state(step)``."""
    want = expected_state(step, n_chunks)
    try:
        if restored["step"] != step or type(restored["step"]) is not int:
            return f"step leaf is {restored['step']!r}, want {step}"
        for name in ("big", "rng"):
            got = np.asarray(restored[name])
            if got.dtype != want[name].dtype or got.tobytes() != want[name].tobytes():
                return f"leaf {name!r} differs"
        if len(restored["small"]) != 4:
            return "leaf 'small' has the wrong length"
        for got, exp in zip(restored["small"], want["small"]):
            got = np.asarray(got)
            if got.dtype != exp.dtype or got.tobytes() != exp.tobytes():
                return "leaf 'small' differs"
    except Exception as e:  # a wrong tree shape is wrong data too
        return f"wrong tree: {type(e).__name__}: {e}"
    return None


def tree_problem(restored, expected, where: str = "") -> str | None:
    """None when ``restored`` (restored without ``like``: dicts, lists, numpy, Python scalars) is
    bit-exact ``expected`` (dicts, lists/tuples, numpy arrays, Python scalars); else what differs."""
    stack = [(where or "/", restored, expected)]
    while stack:
        path, got, want = stack.pop()
        if isinstance(want, dict):
            if not isinstance(got, dict) or set(got) != set(want):
                return f"{path}: keys differ"
            stack.extend((f"{path}{k}/", got[k], want[k]) for k in want)
        elif isinstance(want, (list, tuple)):
            if not isinstance(got, list) or len(got) != len(want):
                return f"{path}: lengths differ"
            stack.extend((f"{path}{i}/", g, w) for i, (g, w) in enumerate(zip(got, want)))
        elif isinstance(want, np.ndarray):
            got = np.asarray(got)
            if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
                return f"{path}: array differs"
        elif type(got) is not type(want) or got != want:
            return f"{path}: {got!r} != {want!r}"
    return None


# ---------------------------------------------------------------- files under a root

_STEP_IN_PATH = re.compile(r"step_0*(\d+)")


def files(root) -> list[Path]:
    """Every regular file under ``root`` (symlinks not followed), sorted."""
    out = []
    for current, _dirs, names in os.walk(root):
        out.extend(Path(current, n) for n in names if os.path.isfile(os.path.join(current, n)))
    return sorted(out)


def manifest_files(root, step: int | None = None) -> list[Path]:
    """The manifest file(s) of ``step`` (or of every step), located generically."""
    root = Path(root)
    out = []
    for path in files(root):
        rel = path.relative_to(root)
        if path.suffix != ".json" or path.name == "zarr.json" or len(rel.parts) == 1:
            continue
        match = _STEP_IN_PATH.search(str(rel))
        if match and (step is None or int(match.group(1)) == step):
            out.append(path)
    return out


def marker_file(root) -> Path:
    """The root marker: ``jckpt.json``, else the only ``.json`` file directly in the root."""
    if (Path(root) / "jckpt.json").is_file():
        return Path(root) / "jckpt.json"
    found = [p for p in Path(root).iterdir() if p.is_file() and p.suffix == ".json"]
    assert len(found) == 1, f"expected one root marker in {root}, found {found}"
    return found[0]


def data_files(root) -> list[Path]:
    """Chunk files: regular files under a zarr ``c/`` directory (chunk key encoding ``c/i/j``)."""
    root = Path(root)
    return [
        p
        for p in files(root)
        if p.suffix != ".json" and "lock" not in p.name and "c" in p.relative_to(root).parts[:-1]
    ]


def data_dirs_of(root, step: int) -> list[Path]:
    """The directories written by the save of ``step``: the topmost directories under the root
    that hold chunk files and whose path names ``step_<step>`` (version 1: ``step_N/d<id>``)."""
    root = Path(root)
    out: set[Path] = set()
    for path in data_files(root):
        rel = path.relative_to(root)
        match = _STEP_IN_PATH.search(str(rel.parent))
        if not match or int(match.group(1)) != step:
            continue
        # the topmost ancestor below the directory holding this step's manifest
        manifest_dirs = {m.parent for m in manifest_files(root, step)}
        parent = path.parent
        while parent.parent != root and parent.parent not in manifest_dirs:
            parent = parent.parent
        out.add(parent)
    return sorted(out)


def fingerprint(path) -> dict[str, tuple]:
    """relative path -> (kind, size, sha256) of everything under ``path`` (symlinks as links).

    Files that vanish while it walks (a writer still at work) are left out.
    """
    path = Path(path)
    out = {}
    for current, dirs, names in os.walk(path):
        for name in dirs + names:
            full = Path(current, name)
            rel = str(full.relative_to(path))
            try:
                if full.is_symlink():
                    out[rel] = ("link", os.readlink(full), None)
                elif full.is_dir():
                    out[rel] = ("dir", None, None)
                else:
                    out[rel] = ("file", full.stat().st_size, hashlib.sha256(full.read_bytes()).hexdigest())
            except FileNotFoundError:
                continue
    return out


def flip_bit(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def json_tokens(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every scalar token of a JSON text: keys, strings, numbers, literals."""
    token = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null|NaN|-?Infinity')
    out = []
    for match in token.finditer(text):
        end = match.end()
        rest = text[end:].lstrip()
        kind = "key" if rest.startswith(":") else "value"
        out.append((match.start(), end, kind))
    return out


# ---------------------------------------------------------------- subprocesses


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = ""  # one CPU device is enough in the children, and starts faster
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``jckpt ARGS`` as a user runs it (a real process)."""
    return subprocess.run(
        [sys.executable, "-m", "jckpt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=timeout,
        cwd=str(REPO),
    )


def cli(*args) -> subprocess.CompletedProcess:
    """``jckpt ARGS`` in this process (``jckpt.cli.main``): the same code path, without a jax import.

    The suite keeps a few real-process runs (``run_cli``) for what only a process shows.
    """
    import contextlib
    import io

    from jckpt import cli as cli_module

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_module.main([str(a) for a in args])
        except SystemExit as e:  # --help
            code = e.code
    return subprocess.CompletedProcess(["jckpt", *map(str, args)], code, out.getvalue(), err.getvalue())


def one_line_error(result: subprocess.CompletedProcess, code: int = 1) -> str:
    """Asserts that a CLI run failed with ``code`` and exactly one line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, f"{result.args}: exit {result.returncode}, stderr {result.stderr!r}"
    assert len(lines) == 1 and "Traceback" not in result.stderr, f"{result.args}: {result.stderr!r}"
    return lines[0]


def start_worker(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """Starts ``advworker.py ARGS`` (see that file for the roles)."""
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=child_env(),
        cwd=str(REPO),
    )


def wait_for_lines(proc: subprocess.Popen, prefix: str, count: int, timeout: float = 120) -> list[str]:
    """Reads ``proc``'s stdout until ``count`` lines starting with ``prefix`` have appeared."""
    seen, lines = 0, []
    deadline = time.monotonic() + timeout
    while seen < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker did not print {count} x {prefix!r} in time: {lines[-5:]}")
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=60)  # stdout closed: the worker is exiting
            err = proc.stderr.read()
            why = f"worker exited ({proc.poll()}) before {count} x {prefix!r}: {lines[-5:]}\n{err}"
            raise RuntimeError(why)
        lines.append(line.rstrip("\n"))
        seen += line.startswith(prefix)
    return lines


def wait_for_log(path, first_field: str, timeout: float = 120) -> None:
    """Waits until the log at ``path`` has a record starting with ``first_field`` (a worker is ready)."""
    deadline = time.monotonic() + timeout
    while not any(r and r[0] == first_field for r in read_log(path)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {first_field!r} in {path} after {timeout} s")
        time.sleep(0.05)


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL one worker we started (by its pid) and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


def read_log(path) -> list[list[str]]:
    """A worker's log: one record per line, fields separated by a tab."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.endswith("\n")]


# ---------------------------------------------------------------- small file systems


@contextlib.contextmanager
def tmpfs(path, size: str = "4m"):
    """A fresh tmpfs of ``size`` mounted at ``path`` (a new directory, inside a tmp dir) for the block.

    Skips the test when mounting is not permitted (not root, no CAP_SYS_ADMIN).
    """
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---------------------------------------------------------------- the tally


class Tally:
    """Trials and failures per scenario, printed at the end of the run (the issue's closing note).

    Set ``JCKPT_ADV_REPORT=path.json`` to also write them to a file.
    """

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def record(self, scenario: str, ok: bool, outcome: str = "") -> None:
        row = self.rows.setdefault(scenario, {"trials": 0, "failures": 0, "outcomes": collections.Counter()})
        row["trials"] += 1
        row["failures"] += not ok
        if outcome:
            row["outcomes"][outcome] += 1

    def add(self, scenario: str, passed: int, failures: list[str]) -> None:
        """Records ``passed`` good trials and one failed trial per entry of ``failures`` (its outcome)."""
        for _ in range(passed):
            self.record(scenario, True)
        for outcome in failures:
            self.record(scenario, False, outcome)
        self.rows.setdefault(scenario, {"trials": 0, "failures": 0, "outcomes": collections.Counter()})


TALLY = Tally()
