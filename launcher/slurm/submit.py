"""`bigmodel launch slurm`: check the config for the allocation, then submit slurm/pretrain_gpt.sh with sbatch
(resources from the options, logs in the run directory)."""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
from pathlib import Path

from bigmodel_dist.config import load_config
from bigmodel_dist.core.env import NPROC_PER_NODE
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.run.precision import DeviceInfo
from bigmodel_dist.run.resolve import resolve_run
from launcher.logs import setup_logging

log = logging.getLogger(__name__)
# slurm/pretrain_gpt.sh of the repository, through a link inside the package: a wheel ships it too.
SCRIPT = Path(__file__).parent.parent / "slurm_scripts" / "pretrain_gpt.sh"


def sbatch_command(args: argparse.Namespace, overrides: list[str], run_dir: RunDir) -> list[str]:
    """The exact sbatch call: resources from the options, logs in the run directory."""
    command = ["sbatch", "--parsable", f"--job-name={run_dir.name}", f"--nodes={args.nodes}",
               f"--output={run_dir.logs / '%x-%j.out'}"]
    if args.gpus_per_node:
        command.append(f"--gpus-per-node={args.gpus_per_node}")
    else:  # CPU nodes: processes per node come from --nproc-per-node
        command.append("--gpus-per-node=0")
    for flag, value in (("--time", args.time), ("--partition", args.partition), ("--account", args.account)):
        if value:
            command.append(f"{flag}={value}")
    if args.nproc_per_node:
        command.append(f"--export=ALL,{NPROC_PER_NODE}={args.nproc_per_node}")
    return [*command, *args.sbatch_arg, str(SCRIPT.resolve()), args.config, *overrides]  # the real file, not the link


def launch_slurm(args: argparse.Namespace, overrides: list[str]) -> int:
    setup_logging()
    per_node = args.nproc_per_node or args.gpus_per_node or 1
    # On a login node: the GPU nodes decide "auto" themselves; here we check for their kind of device.
    device = DeviceInfo.gpu_target() if args.gpus_per_node else None
    resolved = resolve_run(load_config(args.config, overrides), args.nodes * per_node, device)
    if args.gpus_per_node:
        from bigmodel_dist.run.planner import fit_warning, parse_bytes

        gpu_memory = parse_bytes(args.gpu_memory, "--gpu-memory")
        warning = fit_warning(resolved, args.nodes * per_node, gpu_memory, nodes=args.nodes)
        if warning:
            log.warning(warning)
    command = sbatch_command(args, overrides, resolved.run_dir)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    resolved.run_dir.logs.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserInputError(f"sbatch refused the job: {result.stderr.strip().splitlines()[-1]}")
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}; logs: {resolved.run_dir.logs / f'{resolved.run_dir.name}-{job_id}.out'}; "
          f"run dir: {resolved.run_dir}")
    return 0
