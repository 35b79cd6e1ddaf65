"""`bigmodel launch ray`: check, then `ray job submit --working-dir DIR -- python -m launcher.ray_job ...`.

Everything that can be checked before Ray sees the job is checked here, each with a one-line error:
the config, the cluster's dashboard answering, the working dir staying under Ray's upload limit. The job
gets `ray.stop_wait_s` as Ray's RAY_JOB_STOP_WAIT_TIME_S, so that `ray job stop` leaves its workers the
time to save their stop checkpoint (Ray's default is 3 s). Waiting for the job, it exits with the
driver's requeue code when the job was stopped (`ray job submit` itself says 0 or 1).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from bigmodel_dist.config import load_config
from bigmodel_dist.config.paths import output_paths
from bigmodel_dist.core.env import ALLOW_FAULTS, FAULTS, SAMPLE_LEDGER
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.run.resolve import resolve_run
from launcher.logs import setup_logging
from launcher.ray.elastic import worker_counts
from launcher.ray.job import ray_workers_device
from launcher.ray.stop import STOP_WAIT_ENV

log = logging.getLogger(__name__)

RAY_UPLOAD_LIMIT = 100 * 2**20  # Ray refuses larger working dirs (HTTP 413)
IGNORE_FILES = (".rayignore", ".gitignore")  # Ray honours both, in gitignore syntax


def ignore_patterns(working_dir: Path) -> list[str]:
    patterns = []
    for name in IGNORE_FILES:
        path = working_dir / name
        if path.is_file():
            patterns += [line.strip() for line in path.read_text().splitlines()
                         if line.strip() and not line.startswith(("#", "!"))]
    return patterns


def _ignored(relative: str, is_dir: bool, patterns: list[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    for pattern in patterns:
        if pattern.endswith("/"):
            if not is_dir:
                continue
            pattern = pattern[:-1]
        anchored = pattern.startswith("/")
        pattern = pattern.lstrip("/")
        if fnmatch.fnmatch(relative, pattern) or (not anchored and "/" not in pattern and fnmatch.fnmatch(name, pattern)):
            return True
    return False


def upload_size(working_dir: Path) -> tuple[int, list[tuple[int, str]]]:
    """Bytes Ray would upload (its ignore files applied, approximately) and the largest files."""
    patterns = ignore_patterns(working_dir)
    total, files = 0, []
    for root, dirs, names in os.walk(working_dir):
        base = Path(root).relative_to(working_dir).as_posix()
        prefix = "" if base == "." else base + "/"
        dirs[:] = [d for d in dirs if not _ignored(prefix + d, True, patterns)]
        for name in names:
            if _ignored(prefix + name, False, patterns):
                continue
            try:
                size = os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
            total += size
            files.append((size, prefix + name))
    return total, sorted(files, reverse=True)[:3]


def check_upload_size(working_dir: Path) -> int:
    total, largest = upload_size(working_dir)
    if total > RAY_UPLOAD_LIMIT:
        biggest = ", ".join(f"{name} ({size / 2**20:.0f} MiB)" for size, name in largest)
        raise UserInputError(f"working dir {working_dir}: {total / 2**20:.0f} MiB to upload, over Ray's 100 MiB limit "
                             f"(largest: {biggest}); add data and checkpoints to {working_dir / '.rayignore'}")
    return total


def check_dashboard(address: str, timeout_s: float = 10.0) -> None:
    url = address.rstrip("/") + "/api/version"
    try:
        urllib.request.urlopen(url, timeout=timeout_s).read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserInputError(f"no Ray cluster answers at {address} ({reason}); start one (ray start --head) or pass "
                             "--address / set RAY_ADDRESS to its dashboard, e.g. http://HEAD:8265") from None


# The project's own switches set where `launch ray` runs reach the job's driver and workers too.
PASSED_ENV = (SAMPLE_LEDGER, FAULTS, ALLOW_FAULTS)


def submit_command(args: argparse.Namespace, config: str, overrides: list[str], stop_wait_s: int) -> list[str]:
    passed = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    if SAMPLE_LEDGER in passed:  # a folder: resolved here, where the command ran (the job runs in Ray's copy)
        passed[SAMPLE_LEDGER] = os.path.abspath(passed[SAMPLE_LEDGER])
    runtime_env = {"env_vars": {STOP_WAIT_ENV: str(stop_wait_s), **passed}}  # read by the job's supervisor and driver
    command = ["ray", "job", "submit", "--address", args.address, "--working-dir", str(args.working_dir),
               "--runtime-env-json", json.dumps(runtime_env)]
    if args.no_wait:
        command.append("--no-wait")
    return [*command, "--submission-id", args.submission_id, "--", "python", "-m", "launcher.ray_job", config,
            *overrides]


def job_info(address: str, submission_id: str, timeout_s: float = 10.0) -> dict | None:
    """Ray's record of a job (`GET /api/jobs/ID`: status, driver_exit_code, ...), or None if unreadable."""
    url = f"{address.rstrip('/')}/api/jobs/{submission_id}"
    try:
        return json.loads(urllib.request.urlopen(url, timeout=timeout_s).read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def finished_job_exit_code(submit_code: int, info: dict | None, requeue_code: int) -> int:
    """`ray job submit` exits 0 for a stopped job and 1 for every failure. A stopped job (`ray job stop`:
    Ray keeps no exit code for it) or a driver that exited with the requeue code (a drained node) is
    unfinished work that a resubmission resumes: the requeue code says so."""
    if info is not None and (info.get("status") == "STOPPED" or info.get("driver_exit_code") == requeue_code):
        return requeue_code
    return submit_code


def launch_ray(args: argparse.Namespace, overrides: list[str]) -> int:
    setup_logging()
    args.address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    working_dir = Path(args.working_dir).resolve()
    config = Path(args.config).resolve()
    if not config.is_relative_to(working_dir):
        raise UserInputError(f"config {args.config} is outside the working dir {working_dir}; the job reads it from "
                             "there, so move it in or pass --working-dir")
    cfg = load_config(config, overrides)
    # The job runs in Ray's copy of the working dir: the folders the run writes are resolved here, where
    # the command ran (inputs inside the working dir travel with it and resolve in the copy).
    resolved_outputs = [f"--{field}={value}" for field, value in output_paths(cfg).items()]
    overrides = [*overrides, *resolved_outputs]
    resolve_run(cfg, max(worker_counts(cfg)), ray_workers_device(cfg))
    size = check_upload_size(working_dir)
    check_dashboard(args.address)
    args.working_dir = working_dir
    args.submission_id = args.submission_id or f"bigmodel-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = submit_command(args, str(config.relative_to(working_dir)), overrides, cfg.ray.stop_wait_s)
    log.info("output folders, resolved here: %s", " ".join(resolved_outputs))
    log.info("uploading %.1f MiB; %s", size / 2**20, shlex.join(command))
    code = subprocess.run(command).returncode
    if args.no_wait:
        return code
    code = finished_job_exit_code(code, job_info(args.address, args.submission_id), cfg.checkpoint.requeue_exit_code)
    if code == cfg.checkpoint.requeue_exit_code:
        log.warning("job %s stopped before the end of the run; exit %d: `bigmodel launch ray` again resumes it",
                    args.submission_id, code)
    return code


def add_parser(backends) -> None:
    ray = backends.add_parser("ray", help="ray job submit to a Ray cluster (Ray Train workers)",
                              epilog="dotted overrides after the config, e.g. --ray.num_workers=8 --ray.use_gpu=true")
    ray.add_argument("config")
    ray.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    ray.add_argument("--working-dir", default=".", help="folder sent with the job (default: here)")
    ray.add_argument("--no-wait", action="store_true", help="return after submitting")
    ray.add_argument("--submission-id", help="job id for `ray job status/stop/logs` (must be new; default: "
                     "bigmodel-<run name>-<time>)")
    ray.set_defaults(handler=lambda args, overrides: launch_ray(args, overrides))
