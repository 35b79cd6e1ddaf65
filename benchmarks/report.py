"""One way to show and keep a benchmark's rows: {figure, ratio, goal, detail} printed and saved as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

# BIGMODEL_BENCH_RESULTS moves them (run_all --quick does, so quick figures never replace real ones).
RESULTS = Path(os.environ.get("BIGMODEL_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def report(name: str, title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    for row in rows:
        print(f"{row['figure']:<34}{row['ratio']:>9.3f}   goal {row['goal']:<8} {row['detail']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))
