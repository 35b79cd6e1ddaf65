"""`bigmodel launch local`: validate, then run torchrun on this machine with the trainer as its module.

The embedded default when there is no cluster. Multi-node works too: run it once per node with
--nnodes/--node-rank/--master-addr (c10d rendezvous).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bigmodel_dist.config import load_config
from bigmodel_dist.config.layout import sizes_keeping_batch
from bigmodel_dist.config.schema import Config
from bigmodel_dist.config.validate import resolve_run
from bigmodel_dist.distributed import STOP_FILE_ENV
from bigmodel_dist.errors import UserInputError
from bigmodel_dist.faults import faults_from_env
from bigmodel_dist.metrics_file import append_incident
from bigmodel_dist.precision import DeviceInfo, detect_device
from bigmodel_dist.preemption import StopSignals
from bigmodel_dist.progress import PROGRESS_DIR_ENV
from bigmodel_dist.run_dir import RunDir
from bigmodel_dist.suspects import record_suspect_nodes
from bigmodel_dist.watchdog import HangWatchdog, flight_recorder_env, write_diagnosis
from launcher.logs import setup_logging
from launcher.run_inputs import check_previous_run, prepare_for, resume_override

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.5  # how often the hang watchdog reads the ranks' progress


def default_nproc_per_node(device: DeviceInfo) -> int:
    """Every GPU of the machine, or 2 processes on CPU."""
    if not device.has_cuda:
        return 2
    import torch

    return torch.cuda.device_count()


def node_range(nnodes: str | int) -> tuple[int, int]:
    """`--nnodes` as (min, max): "4" -> (4, 4), "2:4" -> (2, 4)."""
    text = str(nnodes).strip()
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high)) if sep else (int(text), int(text))
    except ValueError:
        raise UserInputError(f"--nnodes {text!r}: give a number or MIN:MAX, e.g. 2:4") from None
    if bounds[0] < 1 or bounds[0] > bounds[1]:
        raise UserInputError(f"--nnodes {text}: needs 1 <= MIN <= MAX")
    return bounds


def world_sizes_keeping_batch(cfg: Config, nproc: int, nodes: tuple[int, int]) -> list[int]:
    """World sizes of the node range that keep train.global_batch_size; refuses a range with none (a fixed
    count is left to `resolve_run`, whose error names the batch fields)."""
    if nodes[0] == nodes[1]:
        return [nodes[0] * nproc]
    sizes = sizes_keeping_batch(cfg.train, [count * nproc for count in range(nodes[0], nodes[1] + 1)])
    if not sizes:
        raise UserInputError(f"--nnodes {nodes[0]}:{nodes[1]}: no node count keeps train.global_batch_size="
                             f"{cfg.train.global_batch_size} with {nproc} process(es) per node and micro batch "
                             f"{cfg.train.micro_batch_size}; change the range or the global batch")
    return sizes


def torchrun_command(args: argparse.Namespace, nproc_per_node: int, overrides: list[str],
                     run_name: str = "bigmodel") -> list[str]:
    command = [sys.executable, "-m", "launcher.torchrun", f"--nproc-per-node={nproc_per_node}"]
    low, high = node_range(args.nnodes)
    if high == 1:
        command += ["--standalone"]
    elif low == high:
        command += [
            f"--nnodes={high}",
            f"--node-rank={args.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.master_addr}:{args.master_port}",
        ]
    else:  # elastic: ranks are assigned at each rendezvous; the run name keeps other jobs' nodes out
        command += [
            f"--nnodes={low}:{high}",
            f"--max-restarts={args.max_restarts}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.master_addr}:{args.master_port}",
            f"--rdzv-id={run_name}",
        ]
    if getattr(args, "rdzv_conf", ""):
        command += [f"--rdzv-conf={args.rdzv_conf}"]
    return command + ["-m", "launcher.cli", "train", args.config, *overrides]


def launch_local(args: argparse.Namespace, overrides: list[str]) -> int:
    # A stop may come at any moment, also before torchrun exists: remember it, and pass it on to the
    # workers through a file they look at every step (a signal could reach a worker before its handler).
    stop_dir = Path(tempfile.mkdtemp(prefix="bigmodel-launch-"))
    stop_file = stop_dir / "stop"
    signals = StopSignals(on_signal=stop_file.touch)
    try:
        return _launch(args, overrides, signals, stop_file)
    finally:
        shutil.rmtree(stop_dir, ignore_errors=True)


def _launch(args: argparse.Namespace, overrides: list[str], signals: StopSignals, stop_file: Path) -> int:
    setup_logging()
    device = detect_device()  # imports torch only where there is a GPU
    nproc = args.nproc_per_node or default_nproc_per_node(device)
    nodes = node_range(args.nnodes)
    if nproc < 1 or (nodes[0] == nodes[1] and not 0 <= args.node_rank < nodes[1]):
        raise UserInputError("--nproc-per-node must be >= 1 and 0 <= --node-rank < --nnodes")
    overrides = [*overrides, *resume_override(args)]
    config = load_config(args.config, overrides)
    sizes = world_sizes_keeping_batch(config, nproc, nodes)
    if nodes[0] < nodes[1]:
        log.info("elastic: %d..%d node(s) of %d process(es); world sizes that keep the global batch %d: %s "
                 "(others stop with an error naming train.global_batch_size)", *nodes, nproc,
                 config.train.global_batch_size, sizes)
    resolved = resolve_run(config, max(sizes), device)
    faults_from_env()  # a malformed or unallowed fault injection is refused here, in one line
    requeue_code = resolved.config.checkpoint.requeue_exit_code
    signals.watch(resolved.config.checkpoint.stop_signals)
    log.info("config checked for %d process(es) on %s; checking the data", max(sizes), device.name)
    if device.has_cuda:
        import torch

        from bigmodel_dist.planner import fit_warning

        memory = torch.cuda.get_device_properties(0).total_memory
        warning = fit_warning(resolved, max(sizes), memory, nodes=max(sizes) // nproc)
        if warning:
            log.warning(warning)
    finished = check_previous_run(resolved)  # a checkpoint of another model or batch: one line, here
    if finished and nodes == (1, 1):  # (other nodes would wait in the rendezvous: there the trainer says it)
        log.info(finished)
        return 0
    prepare_for(resolved)  # here, not in the workers: a progress bar, and input errors before torchrun
    if signals.received:
        log.warning("%s before training started: nothing new to save; exit %d asks to requeue",
                    signals.received, requeue_code)
        return requeue_code
    command = torchrun_command(args, nproc, overrides, resolved.config.name)
    log.info("launching %d process(es) on this node: %s", nproc, " ".join(command))
    started = time.time()
    progress_dir = stop_file.parent / "progress"
    progress_dir.mkdir()
    env = {**os.environ, STOP_FILE_ENV: str(stop_file), PROGRESS_DIR_ENV: str(progress_dir)}
    if device.has_cuda:
        env.update(flight_recorder_env(progress_dir))
    child = _start_in_own_group(command, env)
    _forward_interrupts(child)
    if resolved.config.resilience.enabled:
        code = _supervise(child, HangWatchdog(progress_dir, resolved.config.resilience), resolved.run_dir)
    else:
        code = child.wait()
    if code is None and _marker_since(resolved.run_dir.completed, started):
        log.warning("the workers hung shutting down after the run had completed and saved; treating it as success")
        code = 0
    elif code is None:  # hung: diagnosed and ended
        return resolved.config.resilience.hang_exit_code
    if _marker_since(resolved.run_dir.stopped, started) or signals.received:
        code = requeue_code
        log.warning("training was asked to stop (%s) and saved what was new; exit %d asks to requeue",
                    signals.received or "on a worker", code)
    elif code != 0 and _marker_since(resolved.run_dir.completed, started):
        # Workers sometimes abort in interpreter teardown after all work is saved (seen with gloo).
        log.warning("torchrun exited %d after the run had completed and saved; treating it as success", code)
        code = 0
    log.info("run dir %s: config.yaml, metrics.jsonl, checkpoints/ (exit code %d)", resolved.run_dir, code)
    return code


def _supervise(child: subprocess.Popen, watchdog: HangWatchdog, run_dir: RunDir) -> int | None:
    """torchrun's exit code, or None after a hang: stacks dumped, processes ended, incident recorded."""
    while True:
        try:
            return child.wait(timeout=WATCH_INTERVAL_S)
        except subprocess.TimeoutExpired:
            pass
        hang = watchdog.check()
        if hang is None:
            continue
        try:
            folder = write_diagnosis(hang, watchdog.progress_dir, run_dir)
        finally:  # a full disk (a common cause of hangs) must not leave the hung processes behind
            _end_tree(child)
        step = max((p.step for p in hang.ranks), default=0)
        hosts = [socket.gethostname()] if hang.suspects else []
        append_incident(run_dir.metrics, "hang", step, host=socket.gethostname(), silent_s=hang.silent_s,
                        suspects=hang.suspects, diagnosis=str(folder))
        record_suspect_nodes(hosts)
        log.error("hang: %s; stacks and positions in %s; ended this node's processes", hang.summary(), folder)
        return None


def _end_tree(child: subprocess.Popen) -> None:
    """SIGKILL the workers with everything they started (each leads a process group of its own: torchrun
    starts them in new sessions), then torchrun: a hung collective answers nothing gentler."""
    for pid in child_pids(child.pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(child.pid, signal.SIGKILL)  # torchrun leads its own session too
    except ProcessLookupError:
        pass
    child.wait()


def _start_in_own_group(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """torchrun in a session of its own (terminal Ctrl-C reaches only us), with SIGUSR1 blocked.

    torchrun dies of SIGUSR1 (it handles only TERM/INT/HUP/QUIT), and Slurm may send it to every process
    of the step. The blocked mask is inherited by torchrun and its workers; the workers unblock it once
    their handler is in place, so a SIGUSR1 sent during their start-up waits for them. Blocking it here
    (instead of ignoring it) leaves no moment in which our own handler is not there.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        return subprocess.Popen(command, start_new_session=True, env=env)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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


def _forward_interrupts(child: subprocess.Popen) -> None:
    """Ctrl-C aborts: it reaches the workers at once and torchrun for its own shutdown. (Stop signals do
    not: they go through the stop file, and torchrun would answer TERM by killing the workers.)"""
    def forward(signum, _frame):
        for pid in [child.pid, *child_pids(child.pid)]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, forward)


def _marker_since(marker: Path, started: float) -> bool:
    try:
        return json.loads(marker.read_text())["finished_at"] >= started
    except (OSError, ValueError, KeyError):
        return False
