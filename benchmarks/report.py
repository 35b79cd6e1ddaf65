"""One way to show and keep a benchmark's rows: {figure, ratio, goal, detail} printed and saved as JSON."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def report(name: str, title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    for row in rows:
        print(f"{row['figure']:<34}{row['ratio']:>9.3f}   goal {row['goal']:<8} {row['detail']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))
