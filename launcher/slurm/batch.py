"""What slurm/pretrain_gpt.sh runs on the batch node: `python -m launcher.slurm preflight` first (it prints
the run's exit codes, whether to run the node health check, and the run directory), and `python -m
launcher.slurm exclude SUSPECTS_FILE` before requeueing a hung job or one with a bad node (it prints the nodes the next attempt
must avoid). The sbatch script stays thin; the logic lives here.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

from bigmodel_dist.config import load_config
from bigmodel_dist.core.env import NPROC_PER_NODE
from bigmodel_dist.core.errors import EXIT_USAGE, UserInputError
from bigmodel_dist.run.resolve import ResolvedRun, resolve_run
from launcher.logs import setup_logging
from launcher.preflight import check_previous_run
from launcher.user_errors import report_user_errors

log = logging.getLogger(__name__)


def preflight(config: str, overrides: list[str]) -> ResolvedRun:
    """On the batch node, before any srun: log versions and nodes, check config, GPUs and run name."""
    import torch

    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    expanded = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True).stdout
    nodes = ",".join(expanded.split()) or nodelist or "?"
    nnodes = int(os.environ.get("SLURM_NNODES", "1"))
    per_node = int(os.environ.get("NPROC_PER_NODE", "1"))
    log.info("job %s (restart %s) on %s: %d node(s) x %d process(es); python %s, torch %s, %s",
             os.environ.get("SLURM_JOB_ID", "?"), os.environ.get("SLURM_RESTART_COUNT", "0"), nodes, nnodes, per_node,
             platform.python_version(), torch.__version__, _versions())
    gpus_here = torch.cuda.device_count()
    if gpus_here and per_node > gpus_here:
        raise UserInputError(f"{per_node} processes per node but this node has {gpus_here} GPU(s); "
                             f"lower --gpus-per-node / {NPROC_PER_NODE}")
    resolved = resolve_run(load_config(config, overrides), nnodes * per_node)
    # The run name is the resume key: it must name the same run, on the same corpus (one line, exit 2).
    resolved, _ = check_previous_run(resolved)
    return resolved


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("deepspeed", "accelerate", "transformers"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


# Node states (sinfo %T, a power-saving suffix stripped) in which a node can run the requeued job.
USABLE_NODE_STATES = {"idle", "allocated", "mixed", "completing", "planned"}


def choose_exclusion(suspects: list[str], excluded: list[str], job_nodes: list[str], partition: dict[str, str],
                     needed: int) -> tuple[list[str], str]:
    """(the ExcNodeList for the requeued job, or [] to leave it as it is; why), from the suspect nodes,
    the job's current exclusions, its nodes, its partition's node states and the node count it needs."""
    if not suspects:
        return [], "no suspect node recorded: requeueing without excluding one"
    if len(job_nodes) > 1 and set(job_nodes) <= set(suspects):
        return [], (f"every node of the job is suspect ({', '.join(suspects)}): a fault of the job, not of a "
                    "node; requeueing without excluding one")
    wanted = sorted(set(excluded) | set(suspects))
    usable = [node for node, state in partition.items()
              if node not in wanted and state.rstrip("~#%") in USABLE_NODE_STATES]
    if len(usable) < needed:
        return [], (f"suspect node(s) {', '.join(suspects)}, but the partition has {len(usable)} usable node(s) "
                    f"besides them and the job needs {needed}: requeueing without excluding them")
    return wanted, f"suspect node(s) {', '.join(suspects)}: the requeued job excludes {','.join(wanted)}"


def _exclusion_for_script(suspects_file: str) -> int:
    """`exclude`: the job's new ExcNodeList on stdout (empty: leave it), the reason in the job log."""
    from bigmodel_dist.ft.suspects import read_suspect_nodes

    job = os.environ.get("SLURM_JOB_ID", "")
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    current = next((field.split("=", 1)[1] for field in shown.split() if field.startswith("ExcNodeList=")), "")
    part = os.environ.get("SLURM_JOB_PARTITION")
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T", *(["-p", part] if part else [])],
                           capture_output=True, text=True).stdout
    partition = dict(line.split(None, 1) for line in sinfo.splitlines() if len(line.split()) == 2)
    needed = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or "1")
    job_nodes = _hostnames(os.environ.get("SLURM_JOB_NODELIST", ""))
    exclude, why = choose_exclusion(read_suspect_nodes(Path(suspects_file)), _hostnames(current), job_nodes,
                                    partition, needed)
    log.warning("job %s: %s", job, why)
    print(",".join(exclude))
    return 0


def _hostnames(hostlist: str) -> list[str]:
    if not hostlist or hostlist == "(null)":
        return []
    return subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True).stdout.split()


USAGE = "usage: python -m launcher.slurm preflight CONFIG [overrides] | exclude SUSPECTS_FILE"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("preflight", "exclude") or (argv[0] == "exclude" and len(argv) != 2):
        print(USAGE, file=sys.stderr)
        return EXIT_USAGE
    setup_logging()
    if argv[0] == "exclude":
        return _exclusion_for_script(argv[1])
    return report_user_errors(lambda: _preflight_for_script(argv[1], argv[2:]))


def _preflight_for_script(config: str, overrides: list[str]) -> int:
    """The pre-flight, with one line on stdout for the sbatch script: the run's exit codes that ask for a
    requeue (`checkpoint.requeue_exit_code`, `resilience.hang_exit_code`, `resilience.bad_node_exit_code`),
    1 or 0 for `resilience.health_check`, and the absolute run directory (last: it may hold spaces).
    The config is the script's one source of them."""
    sys.stdout.flush()
    for_script = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what else prints (a library) goes to the job log
    resolved = preflight(config, overrides)
    resilience = resolved.config.resilience
    print(resolved.config.checkpoint.requeue_exit_code, resilience.hang_exit_code, resilience.bad_node_exit_code,
          int(resilience.health_check), resolved.run_dir, file=for_script, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
