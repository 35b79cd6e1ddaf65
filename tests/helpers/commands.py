"""`bigmodel` as the tests run it: one bounded subprocess runner, and the check that a refusal is one line.

Every command ends or fails within HANG_GUARD_S (a guard against a hang, not a speed requirement).
Long-running launches that a test watches line by line are tests/helpers/launching.py's `Launch`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bigmodel_dist.core.errors import EXIT_USAGE
from tests.conftest import REPO
from tests.helpers.guards import HANG_GUARD_S

TINY_CONFIG = str(REPO / "configs" / "gpt2-tiny.yaml")
ERROR_PREFIX = "bigmodel: error:"


def cli_command(args: Sequence[str]) -> list[str]:
    """`bigmodel ARGS` with this interpreter (no reliance on the script being on PATH)."""
    return [sys.executable, "-m", "launcher.cli", *args]


def run_command(command: Sequence[str], cwd: Path | str = REPO, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    """Run to the end with text output captured; `env` None inherits this process's environment."""
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def run_cli(args: Sequence[str], cwd: Path | str = REPO, env: dict[str, str] | None = None,
            prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """`bigmodel ARGS`, e.g. `run_cli(["train", TINY_CONFIG, *overrides], cwd=tmp_path, env=cli_env)`.
    `prefix`: what runs it, e.g. `ip netns exec NAME` for the Ray test cluster's namespace."""
    return run_command([*prefix, *cli_command(args)], cwd=cwd, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str, after_logs: bool = False) -> str:
    """The CLI refused: exit 2 (EXIT_USAGE), no traceback, one `bigmodel: error: ...` line naming every
    needle. Returns that line.

    By default that line is all the output (a refusal before any work: stderr is the line, stdout is
    empty). `after_logs=True` for a refusal that comes after the command logged its progress (`train`
    opens the process group and the data first, and DeepSpeed prints to stdout): the error is then the
    last line of stderr and its only error line.
    """
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == EXIT_USAGE, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1 and lines[-1] == errors[0], shown
    assert after_logs or (lines == errors and result.stdout == ""), shown
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in: {errors[0]}"
    return errors[0]
