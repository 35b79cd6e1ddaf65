"""`python -m benchmarks.run_all --quick`: every benchmark runs (tiny inputs) and one table comes out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.distributed


def test_run_all_quick_prints_one_table_of_every_benchmark(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=900, env={**os.environ, "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("(QUICK MODE)"):]
    for name in ("trainer_overhead", "data_pipeline", "checkpoint", "planner_accuracy"):
        assert name in table
    rows = json.loads((REPO / "benchmarks" / "results" / "quick" / "all.json").read_text())
    assert {row["benchmark"] for row in rows} == {"trainer_overhead", "data_pipeline", "checkpoint", "planner_accuracy"}
    assert all(row["ratio"] > 0 for row in rows)
    planner = [row for row in rows if row["benchmark"] == "planner_accuracy"]
    assert len(planner) == 4  # ZeRO 0-3 of the tiny model
