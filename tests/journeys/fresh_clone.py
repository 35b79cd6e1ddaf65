"""A fresh clone's point of view: the repository's files (what `git clone` would give, plus uncommitted
work) copied to a new folder, with this session's installed `.venv` linked in, so the README's commands
run exactly as a user types them there: relative paths, the default output dir, `make train`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

VENV_STAMP = ".venv/.installed"  # `make setup`'s stamp: present, so `make train` starts at once


def fresh_clone(dest: Path) -> Path:
    """Copy the tracked and not-ignored files of the repository into `dest` (links stay links), and link
    `.venv` to the environment running the tests (the project is installed there, editable or not)."""
    assert sys.prefix != sys.base_prefix, "the journeys run from the project's virtual environment (make test)"
    copy_repository(dest)
    os.symlink(sys.prefix, dest / ".venv")
    return dest


def copy_repository(dest: Path) -> Path:
    """What `git clone` gives (plus uncommitted work): the tracked and not-ignored files, links as links
    (the package links to configs/deepspeed and slurm/, which a wheel ships)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = REPO / name, dest / name
        if not os.path.lexists(source):
            continue  # deleted in the working tree, not yet in the index
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)
    return dest


def make_command(target: str, args: str = "") -> list[str]:
    """`make TARGET [ARGS=...]` as the README prints it; `-o` tells make the set-up is done (the venv is
    this session's: its stamp may be older than the copied pyproject.toml)."""
    return ["make", "--no-print-directory", "-o", VENV_STAMP, target, *([f"ARGS={args}"] if args else [])]


def user_env() -> dict[str, str]:
    """A user's shell after `make setup`: the venv's scripts first on PATH (`bigmodel`, `torchrun`,
    `accelerate`), quiet W&B."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["WANDB_SILENT"] = "true"
    for name in ("SLURM_JOB_ID", "SLURM_NNODES", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a launch from a shell, not from inside an allocation or a process group
    return env
