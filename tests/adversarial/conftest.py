"""The adversarial suite of issue 9: real files, real processes, real SIGKILLs.

Every test works in its own tmp directory (and tmpfs mounts under it); nothing
outside is touched.  Scenarios record their trials in ``advutil.TALLY``; the
counts are printed at the end of the run (and written to ``$JCKPT_ADV_REPORT``).
"""

import contextlib
import json
import os
import subprocess

import pytest
from advutil import TALLY


@pytest.fixture
def tally():
    return TALLY


def pytest_terminal_summary(terminalreporter):
    if not TALLY.rows:
        return
    terminalreporter.section("jckpt adversarial trials (issue 9)")
    for scenario, row in sorted(TALLY.rows.items()):
        outcomes = ", ".join(f"{k}: {v}" for k, v in row["outcomes"].most_common())
        terminalreporter.write_line(
            f"{scenario:<48} trials {row['trials']:>4}  failures {row['failures']:>4}  {outcomes}"
        )
    report = os.environ.get("JCKPT_ADV_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({k: {**v, "outcomes": dict(v["outcomes"])} for k, v in TALLY.rows.items()}, f, indent=1)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A mount function: ``small_tmpfs(size="4m") -> path`` of a fresh tmpfs under tmp_path.

    Skips the test when mounting is not permitted (not root, no CAP_SYS_ADMIN).
    """
    mounted = []

    def mount(size: str = "4m", name: str = "tmpfs"):
        path = tmp_path / f"{name}{len(mounted)}"
        path.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
