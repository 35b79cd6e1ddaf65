"""`bigmodel launch local`: validate, then run torchrun on this machine with the trainer as its module.

The embedded default when there is no cluster. Multi-node works too: run it once per node with
--nnodes/--node-rank/--master-addr (c10d rendezvous).
"""

from __future__ import annotations

import argparse
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
from bigmodel_dist.config.ranges import parse_size_range
from bigmodel_dist.core.env import LAUNCH_ID, PROGRESS_DIR, STOP_FILE
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.ft.faults import faults_from_env
from bigmodel_dist.ft.preemption import StopSignals
from bigmodel_dist.ft.suspects import record_suspect_nodes
from bigmodel_dist.ft.watchdog import HangWatchdog, flight_recorder_env, record_hang, write_diagnosis
from bigmodel_dist.run.precision import DeviceInfo, detect_device
from bigmodel_dist.run.resolve import ResolvedRun, resolve_run
from launcher.flow import LaunchEnd, Markers, exit_code
from launcher.lease import Lease
from launcher.logs import log_to_file, setup_logging
from launcher.preflight import check_previous_run, prepare_for, resume_override

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.5  # how often the hang watchdog reads the ranks' progress
SECOND_INTERRUPT_S = 5.0  # a second Ctrl-C within this ends the run at once


def default_nproc_per_node(device: DeviceInfo) -> int:
    """Every GPU of the machine, or 2 processes on CPU."""
    if not device.has_cuda:
        return 2
    import torch

    return torch.cuda.device_count()


def node_range(nnodes: str | int) -> tuple[int, int]:
    """`--nnodes` as (min, max): "4" -> (4, 4), "2:4" or "2..4" -> (2, 4)."""
    return parse_size_range(nnodes, "--nnodes")


def torchrun_command(args: argparse.Namespace, nproc_per_node: int, overrides: list[str],
                     run_name: str = "bigmodel") -> list[str]:
    command = [sys.executable, "-m", "launcher.local.torchrun", f"--nproc-per-node={nproc_per_node}"]
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


class Interrupts:
    """Ctrl-C and a closed terminal, as a person means them.

    The first Ctrl-C (SIGINT) or a hang-up (SIGHUP: the terminal or SSH session closed) stops the run the
    way SIGTERM does: the workers agree on a step, save what is new and exit; the launcher keeps
    supervising them (its log also goes to RUN_DIR/logs/, which outlives the terminal). A second Ctrl-C
    within SECOND_INTERRUPT_S ends the run's processes at once with SIGKILL: no tracebacks, nothing
    saved since the newest checkpoint. The handler only records and signals; the loop reports.
    """

    def __init__(self, stop_file: Path):
        self._stop_file = stop_file
        self.first: str | None = None  # "SIGINT" or "SIGHUP"
        self._first_at = 0.0
        self.ended_at_once = False
        self.child: subprocess.Popen | None = None
        for signum in (signal.SIGINT, signal.SIGHUP):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup`: a hang-up is to be ignored
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first, self._first_at = signal.Signals(signum).name, now
            self._stop_file.touch()
        elif signum == signal.SIGINT and now - self._first_at <= SECOND_INTERRUPT_S:
            self.ended_at_once = True
            if self.child is not None:
                _kill_tree(self.child)
            else:  # still checking or preparing (its writes are atomic): leave through the finally blocks
                os.write(2, b"bigmodel: ended at once by a second Ctrl-C, before training started\n")
                raise SystemExit(self.exit_code)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a run ended by it."""
        return 128 + getattr(signal, self.first or "SIGINT")


def launch_local(args: argparse.Namespace, overrides: list[str]) -> int:
    # A stop may come at any moment, also before torchrun exists: remember it, and pass it on to the
    # workers through a file they look at every step (a signal could reach a worker before its handler).
    stop_dir = Path(tempfile.mkdtemp(prefix="bigmodel-launch-"))
    stop_file = stop_dir / "stop"
    signals = StopSignals(on_signal=stop_file.touch)
    interrupts = Interrupts(stop_file)
    try:
        return _launch(args, overrides, signals, interrupts, stop_file)
    finally:
        shutil.rmtree(stop_dir, ignore_errors=True)


def _launch(args: argparse.Namespace, overrides: list[str], signals: StopSignals, interrupts: Interrupts,
            stop_file: Path) -> int:
    setup_logging()
    device = detect_device()  # imports torch only where there is a GPU
    nproc = args.nproc_per_node or default_nproc_per_node(device)
    nodes = node_range(args.nnodes)
    if nproc < 1 or (nodes[0] == nodes[1] and not 0 <= args.node_rank < nodes[1]):
        raise UserInputError("--nproc-per-node must be >= 1 and 0 <= --node-rank < --nnodes")
    overrides = [*overrides, *resume_override(args)]
    config = load_config(args.config, overrides)
    sizes = sizes_keeping_batch(config.train, nodes, nproc, "--nnodes")
    if nodes[0] < nodes[1]:
        log.info("elastic: %d..%d node(s) of %d process(es); world sizes that keep the global batch %d: %s "
                 "(others stop with an error naming train.global_batch_size)", *nodes, nproc,
                 config.train.global_batch_size, sizes)
    resolved = resolve_run(config, max(sizes), device)
    faults_from_env()  # a malformed or unallowed fault injection is refused here, in one line
    # One launch id on every node when a script above set one (the Slurm script); else this launch's own.
    shared_id = os.environ.get(LAUNCH_ID)
    launch_id = shared_id or f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
    # The lease: one live launch per run, taken before anything in the run dir is touched. Its holder is
    # the launcher of node 0 (an elastic node's rank is known only at the rendezvous: no lease there).
    lease = Lease.take(resolved.run_dir, launch_id) if nodes[0] == nodes[1] and args.node_rank == 0 else None
    try:
        signals.watch(resolved.config.checkpoint.stop_signals)
        log.info("config checked for %d process(es) on %s; checking the data", max(sizes), device.name)
        if device.has_cuda:
            _warn_if_it_will_not_fit(resolved, max(sizes), nproc)
        return _train(args, overrides, resolved, nproc, nodes, device, signals, interrupts, stop_file, launch_id,
                      markers_here=bool(shared_id) or nodes == (1, 1))
    finally:
        if lease is not None:
            lease.release()


def _warn_if_it_will_not_fit(resolved: ResolvedRun, world_size: int, nproc: int) -> None:
    import torch

    from bigmodel_dist.run.planner import fit_warning

    memory = torch.cuda.get_device_properties(0).total_memory
    warning = fit_warning(resolved, world_size, memory, nodes=world_size // nproc)
    if warning:
        log.warning(warning)


def _train(args: argparse.Namespace, overrides: list[str], resolved: ResolvedRun, nproc: int,
           nodes: tuple[int, int], device: DeviceInfo, signals: StopSignals, interrupts: Interrupts,
           stop_file: Path, launch_id: str, markers_here: bool) -> int:
    """Under the lease: a finished run says so; the data is prepared here; torchrun starts and is
    supervised; one exit code. `markers_here`: rank 0, which writes the run's markers, is of this launch
    (one node, or a launch id every node shares)."""
    resolved, finished = check_previous_run(resolved)  # another model or corpus: one line, here
    if finished and nodes == (1, 1):  # (other nodes would wait in the rendezvous: there the trainer says it)
        log.info(finished)
        return 0
    prepare_for(resolved)  # here, not in the workers: a progress bar, and input errors before torchrun
    if signals.received or interrupts.first:
        code = interrupts.exit_code if interrupts.first else resolved.config.checkpoint.requeue_exit_code
        log.warning("%s before training started: nothing new to save; exit %d%s", interrupts.first or signals.received,
                    code, "" if interrupts.first else " asks to requeue")
        return code
    command = torchrun_command(args, nproc, overrides, resolved.config.name)
    log.info("launching %d process(es) on this node: %s", nproc, " ".join(command))
    launch_log = log_to_file(resolved.run_dir.logs / f"launch-{socket.gethostname()}-{os.getpid()}.log")
    progress_dir = stop_file.parent / "progress"
    progress_dir.mkdir()
    env = {**os.environ, STOP_FILE: str(stop_file), PROGRESS_DIR: str(progress_dir), LAUNCH_ID: launch_id}
    if device.has_cuda:
        env.update(flight_recorder_env(progress_dir))
    interrupts.child = child = _start_in_own_group(command, env)
    watchdog = HangWatchdog(progress_dir, resolved.config.resilience) if resolved.config.resilience.enabled else None
    torchrun_code = _supervise(child, watchdog, interrupts, resolved.run_dir)
    code = exit_code(LaunchEnd(resolved.run_dir, torchrun_code, Markers.of_launch(resolved.run_dir, launch_id),
                               stop_asked=signals.received, interrupted=interrupts.first,
                               interrupt_exit_code=interrupts.exit_code, ended_at_once=interrupts.ended_at_once,
                               workers_write_markers=markers_here), resolved.config)
    log.info("run dir %s: config.yaml, metrics.jsonl, checkpoints/, this launch's log %s (exit code %d)",
             resolved.run_dir, launch_log, code)
    return code


def _supervise(child: subprocess.Popen, watchdog: HangWatchdog | None, interrupts: Interrupts,
               run_dir: RunDir) -> int | None:
    """torchrun's exit code, or None after a hang: stacks dumped, processes ended, incident recorded."""
    told = False
    while True:
        try:
            return child.wait(timeout=WATCH_INTERVAL_S)
        except subprocess.TimeoutExpired:
            pass
        if interrupts.first and not told:  # said here, not in the signal handler (logging takes locks)
            told = True
            log.warning("%s: stopping at the next step and saving what is new%s", interrupts.first,
                        f" (Ctrl-C again within {SECOND_INTERRUPT_S:g} s ends it at once)"
                        if interrupts.first == "SIGINT" else "")
        hang = watchdog.check() if watchdog is not None else None
        if watchdog is None or hang is None:
            continue
        try:
            folder = write_diagnosis(hang, watchdog.progress_dir, run_dir)
        finally:  # a full disk (a common cause of hangs) must not leave the hung processes behind
            _end_tree(child)
        record_hang(run_dir, hang, folder)
        record_suspect_nodes([socket.gethostname()] if hang.suspects else [])
        log.error("hang: %s; stacks and positions in %s; ended this node's processes", hang.summary(), folder)
        return None


def _end_tree(child: subprocess.Popen) -> None:
    """SIGKILL the workers with everything they started, then torchrun (a hung collective answers
    nothing gentler), and reap torchrun."""
    _kill_tree(child)
    child.wait()


def _kill_tree(child: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (each leads a process group of its own: torchrun starts them in new
    sessions) and torchrun's own group. Safe in a signal handler: no waiting, no locks."""
    for pid in child_pids(child.pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(child.pid, signal.SIGKILL)  # torchrun leads its own session too
    except ProcessLookupError:
        pass


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
