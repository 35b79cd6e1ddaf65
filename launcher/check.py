"""`bigmodel check`: the node health check (bigmodel_dist/ft/health.py) on this node's processes under
torchrun; exit 0 when healthy, `resilience.bad_node_exit_code` when a node (or rank) is bad.

`python -m launcher.check CONFIG [overrides]` is what each torchrun worker runs. Multi-node: run
`bigmodel check` once per node with --nnodes/--node-rank/--master-addr/--master-port, as the Slurm
script does before training. The workers tell this process the verdict through a file, not their exit
status (torchrun would call any non-zero status a failure); a check whose workers failed outright names
this node bad.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from bigmodel_dist.config import load_config
from bigmodel_dist.core.distributed import DistributedFacts, facts_from_env
from bigmodel_dist.core.env import HEALTH_RESULT_FILE
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.ft.faults import faults_from_env
from bigmodel_dist.ft.suspects import record_suspect_nodes
from bigmodel_dist.run.precision import detect_device
from bigmodel_dist.run.resolve import run_dir_of
from launcher.logs import setup_logging
from launcher.user_errors import report_user_errors

log = logging.getLogger(__name__)
PROCESS_GROUP_TIMEOUT_S = 300  # a rank that never joins a collective ends the check instead of hanging it


def check_command(args: argparse.Namespace, nproc_per_node: int, overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "launcher.local.torchrun", f"--nproc-per-node={nproc_per_node}"]
    if args.nnodes == 1:
        command += ["--standalone"]
    else:
        command += [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={args.master_addr}:{args.master_port}"]
    return command + ["-m", "launcher.check", args.config, *overrides]


def check_nodes(args: argparse.Namespace, overrides: list[str]) -> int:
    """`bigmodel check`: validate, run the workers, print the report (first node), exit with the verdict."""
    from launcher.local.launch import default_nproc_per_node

    setup_logging()
    cfg = load_config(args.config, overrides)  # bad resilience values and the like: one line, exit 2
    faults_from_env()  # a malformed or unallowed BIGMODEL_FAULTS: one line, exit 2, before any worker
    nproc = args.nproc_per_node or default_nproc_per_node(detect_device())
    if nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UserInputError("--nproc-per-node and --nnodes must be >= 1 and 0 <= --node-rank < --nnodes")
    bad_code = cfg.resilience.bad_node_exit_code
    command = check_command(args, nproc, overrides)
    log.info("health check: %d process(es) on this node (%d node(s))", nproc, args.nnodes)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bigmodel-check-") as tmp:
        result_file = Path(tmp) / "result.json"
        code = subprocess.run(command, env={**os.environ, HEALTH_RESULT_FILE: str(result_file)}).returncode
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if result is None:
        host = socket.gethostname()
        suspects = record_suspect_nodes([host])
        log.error("health check failed on %s (torchrun exit %d, the workers' errors are above): naming this "
                  "node bad%s; exit %d", host, code, f" in {suspects}" if suspects else "", bad_code)
        return bad_code
    if "report" in result:  # the node of global rank 0 (c10d may give it to any node) prints the report
        print("\n".join(result["lines"]), flush=True)
        log.info("report: %s (%.1fs)", result["report"], time.monotonic() - started)
    elif not result["healthy"]:
        log.warning("health check: bad %s", ", ".join(result["bad"]))
    return 0 if result["healthy"] else bad_code


# ---- the workers ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    facts = facts_from_env()
    setup_logging(facts.rank, facts.world_size)
    return report_user_errors(lambda: _worker(facts, argv[0], argv[1:]))


def _worker(facts: DistributedFacts, config: str, overrides: list[str]) -> int:
    import torch
    import torch.distributed as dist

    from bigmodel_dist.ft.health import record_bad_nodes, run_health_check, write_report

    cfg = load_config(config, overrides)
    faults = faults_from_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(facts.local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    try:
        report = run_health_check(facts, cfg.resilience, cfg.logging, faults)
    finally:
        dist.destroy_process_group()
    result = report.as_dict()
    if facts.is_main:
        result["report"] = str(write_report(report, run_dir_of(cfg)))
        suspects = record_suspect_nodes(report.bad_hosts)
        if suspects:
            log.warning("suspect node(s) %s recorded in %s", ", ".join(report.bad_hosts), suspects)
        record_bad_nodes(report, run_dir_of(cfg), result["report"])
    if facts.local_rank == 0 and os.environ.get(HEALTH_RESULT_FILE):
        Path(os.environ[HEALTH_RESULT_FILE]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
