"""`bigmodel launch local`: validate, then run torchrun on this machine with the trainer as its module.

The embedded default when there is no cluster. Multi-node works too: run it once per node with
--nnodes/--node-rank/--master-addr (c10d rendezvous).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bigmodel_dist.config import load_config
from bigmodel_dist.config.validate import resolve_run
from bigmodel_dist.errors import UserInputError
from launcher.logs import setup_logging

log = logging.getLogger(__name__)


def default_nproc_per_node() -> int:
    import torch

    return torch.cuda.device_count() or 2


def torchrun_command(args: argparse.Namespace, nproc_per_node: int, overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if args.nnodes == 1:
        command += ["--standalone"]
    else:
        command += [
            f"--nnodes={args.nnodes}",
            f"--node-rank={args.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.master_addr}:{args.master_port}",
        ]
    return command + ["-m", "launcher.cli", "train", args.config, *overrides]


def launch_local(args: argparse.Namespace, overrides: list[str]) -> int:
    setup_logging()
    nproc = args.nproc_per_node or default_nproc_per_node()
    if nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UserInputError("--nproc-per-node and --nnodes must be >= 1 and 0 <= --node-rank < --nnodes")
    import torch

    from launcher.cli import prepare_for, resume_override

    overrides = [*overrides, *resume_override(args)]
    resolved = resolve_run(load_config(args.config, overrides), nproc * args.nnodes, has_cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
        from bigmodel_dist.planner import Hardware, fit_warning

        memory = torch.cuda.get_device_properties(0).total_memory
        warning = fit_warning(resolved, Hardware(gpus=nproc * args.nnodes, nodes=args.nnodes, gpu_memory=memory))
        if warning:
            log.warning(warning)
    prepare_for(resolved)  # here, not in the workers: a progress bar, and input errors before torchrun
    command = torchrun_command(args, nproc, overrides)
    log.info("launching %d process(es) on this node: %s", nproc, " ".join(command))
    started = time.time()
    child = _start_in_own_group(command)
    _forward_signals(child)
    code = child.wait()
    if _marker_since(resolved.run_dir / "STOPPED", started):
        code = resolved.config.checkpoint.requeue_exit_code
        log.warning("training stopped early and saved a checkpoint; exit %d asks to requeue", code)
    elif code != 0 and _marker_since(resolved.run_dir / "COMPLETED", started):
        # Workers sometimes abort in interpreter teardown after all work is saved (seen with gloo).
        log.warning("torchrun exited %d after the run had completed and saved; treating it as success", code)
        code = 0
    log.info("run dir %s: config.yaml, metrics.jsonl, checkpoints/ (exit code %d)", resolved.run_dir, code)
    return code


def _start_in_own_group(command: list[str]) -> subprocess.Popen:
    """torchrun in a session of its own (terminal Ctrl-C reaches only us), deaf to SIGUSR1.

    torchrun dies of SIGUSR1 (it handles only TERM/INT/HUP/QUIT); ignoring it here is inherited by
    torchrun, and the workers install their own handler over it.
    """
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        return subprocess.Popen(command, start_new_session=True)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun's workers live in sessions of their own, so no killpg)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _forward_signals(child: subprocess.Popen) -> None:
    def forward(signum, _frame):
        for pid in [child.pid, *child_pids(child.pid)]:  # workers at once; torchrun for its own shutdown
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, forward)


def _marker_since(marker: Path, started: float) -> bool:
    try:
        return json.loads(marker.read_text())["finished_at"] >= started
    except (OSError, ValueError, KeyError):
        return False
