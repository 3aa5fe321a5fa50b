"""The adversarial suite of issue 9: real files, real processes, real SIGKILLs.

Every test works in its own tmp directory (and tmpfs mounts under it); nothing
outside is touched.  Scenarios record their trials in ``advutil.TALLY``; the
counts are printed at the end of the run (and written to ``$JCKPT_ADV_REPORT``).
"""

import json
import os

import pytest
from advutil import TALLY, tmpfs


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
    """A 4 MiB tmpfs under tmp_path (skips where mounting is not permitted)."""
    with tmpfs(tmp_path / "tmpfs") as path:
        yield path
