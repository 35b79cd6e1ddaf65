"""What every launcher does with a run's inputs before it starts processes: `--resume` as an override,
and the run's data prepared in this process.

`bigmodel` (launcher/cli.py), `launch local` and the Ray job share these, so no launcher imports
another's command module. Light to import: `bigmodel --help` loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bigmodel_dist.config.validate import ResolvedRun


def resume_override(args: argparse.Namespace) -> list[str]:
    """`--resume X` is shorthand for `--checkpoint.resume=X`."""
    return [f"--checkpoint.resume={args.resume}"] if getattr(args, "resume", None) else []


def prepare_for(resolved: ResolvedRun) -> list[tuple[str, Path]]:
    """Prepare the run's data in this process (progress bar here, errors before any process group):
    (source name, prepared folder) of every source."""
    from bigmodel_dist.data.mixture_sources import prepare_run_sources

    return prepare_run_sources(resolved.config, resolved.shape.vocab_size)
