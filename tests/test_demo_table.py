"""The demo's verdict table is readable at 80 columns: full candidate names, the noise reference
marked, a failing metric shown as '>', error rate and latency ratio present."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_table_fits_80_columns(tmp_path):
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    done = subprocess.run([sys.executable, "-m", "streams.cli", "demo", "--requests", "1500",
                           "--data-dir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=600,
                          env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("candidate"))
    table = lines[start : start + 5]
    assert all(len(line) <= 80 for line in table), table
    header = table[0].split()
    assert header[:4] == ["candidate", "verdict", "flip", "rate"] and "errors" in header
    assert any(h.endswith("ratio") for h in header) or "ratio" in header  # the latency quantile ratio
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) == {"digits-v1-replay", "digits-v2", "digits-v2-degraded"}  # full names, never cut
    assert rows["digits-v1-replay"].split()[1] == "*"  # the noise reference is marked
    degraded = rows["digits-v2-degraded"].split()
    assert degraded[1] == "rollback" and ">" in degraded[2]  # failing: estimate > margin
    assert "≤" in rows["digits-v1-replay"].split()[3]  # the noise reference: confidently within
    assert any(line.startswith("* noise reference") for line in lines)
    assert any(line.startswith("digits-v2-degraded (1500 requests): Rollback") for line in lines)
