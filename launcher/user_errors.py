"""How every entry point reports a user error: one `bigmodel: error: ...` line on stderr, exit 2.

`bigmodel`, `python -m launcher.slurm preflight` and `python -m launcher.ray_job` all run their command
through `report_user_errors`, so a refusal reads the same whichever launcher meets it, and no traceback
hides the one line that says what to fix.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from bigmodel_dist.core.errors import EXIT_USAGE, UserInputError

ERROR_PREFIX = "bigmodel: error:"


def print_error(exc: Exception) -> None:
    """The error as the one line users and tests look for (flushed: the process may end at once)."""
    print(f"{ERROR_PREFIX} {exc}", file=sys.stderr, flush=True)


def report_user_errors(command: Callable[[], int]) -> int:
    """`command()`'s exit code, or EXIT_USAGE after printing its UserInputError as one line."""
    try:
        return command()
    except UserInputError as exc:
        print_error(exc)
        return EXIT_USAGE
