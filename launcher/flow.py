"""How every launch ends: the markers this launch's workers wrote (read once, here) and the launch's one exit
code, derived by one function for every launcher (`launch local` under torchrun or the sbatch script, the
Ray job's driver). The exit codes are the config's: 0 done, `checkpoint.requeue_exit_code` stopped and saved
(resubmit to resume), `resilience.hang_exit_code` hung (diagnosed and ended), the interrupt's own code after a
user's Ctrl-C or closed terminal, 1 failed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bigmodel_dist.config.schema import Config
from bigmodel_dist.core.errors import EXIT_RUN_FAILED
from bigmodel_dist.core.run_dir import RunDir, marker_of_launch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Markers:
    """COMPLETED and STOPPED, when *this* launch wrote them (an earlier or concurrent launch of the same run
    never makes this one look finished)."""

    completed: dict[str, Any] | None
    stopped: dict[str, Any] | None

    @classmethod
    def of_launch(cls, run_dir: RunDir, launch: str) -> Markers:
        return cls(marker_of_launch(run_dir.completed, launch), marker_of_launch(run_dir.stopped, launch))


@dataclass(frozen=True)
class LaunchEnd:
    """What a launcher knows when its workers are gone."""

    run_dir: RunDir
    workers_code: int | None  # the workers' exit code (torchrun's; 0 when Ray's fit returned); None: hung, ended
    markers: Markers
    stop_asked: str | None = None  # a stop the launcher was asked for (a signal, `ray job stop`), or None
    stop_took_s: float | None = None  # from that request to the workers' end
    interrupted: str | None = None  # SIGINT or SIGHUP from the user's terminal, or None
    interrupt_exit_code: int = 130
    ended_at_once: bool = False  # a second Ctrl-C: the workers were ended without saving
    grow_request: str | None = None  # the run stopped to restart larger (elastic): what was asked
    workers_write_markers: bool = True  # False where the workers never ran the trainer (nothing to expect)
    resume_hint: str = "the same command resumes from there"


def exit_code(end: LaunchEnd, cfg: Config) -> int:
    """The launch's one exit code, said in one log line where it is not plain success or plain failure."""
    completed, stopped = end.markers.completed, end.markers.stopped
    if end.ended_at_once:
        newest = _newest_checkpoint(end.run_dir)
        log.warning("ended at once by a second Ctrl-C: nothing saved since %s; %s (exit %d)",
                    newest.path if newest else "the start (no checkpoint yet)", end.resume_hint, end.interrupt_exit_code)
        return end.interrupt_exit_code
    if end.workers_code is None and completed:
        log.warning("the workers hung shutting down after the run had completed and saved; treating it as success")
        return 0
    if end.workers_code is None:  # hung: the watchdog diagnosed it and ended the workers
        return cfg.resilience.hang_exit_code
    saved = stopped or completed
    if end.interrupted and saved:
        log.warning("%s (%s): stopped at step %d and saved; %s (exit %d)",
                    "Ctrl-C" if end.interrupted == "SIGINT" else "terminal closed", end.interrupted, saved["step"],
                    end.resume_hint, end.interrupt_exit_code)
        return end.interrupt_exit_code
    if end.grow_request and stopped and not end.stop_asked:  # a run that completed first has nothing to grow
        log.info("stopped %s to %s: the next worker group resumes there", stopped_at(end.run_dir, stopped),
                 end.grow_request)
        return cfg.checkpoint.requeue_exit_code
    if stopped or end.stop_asked:  # also after the end: the requeued job finds the run complete
        why = end.stop_asked or end.interrupted or (stopped or {}).get("stop_reason") or "on a worker"
        took = f", {end.stop_took_s:.1f} s after the signal" if end.stop_took_s is not None else ""
        log.warning("stopped %s (%s)%s; exit %d asks to requeue: %s", stopped_at(end.run_dir, stopped or completed),
                    why, took, cfg.checkpoint.requeue_exit_code, end.resume_hint)
        return cfg.checkpoint.requeue_exit_code
    if end.workers_code != 0 and completed:
        # Workers sometimes abort in interpreter teardown after all work is saved (seen with gloo).
        log.warning("the workers exited %d after the run had completed and saved; treating it as success",
                    end.workers_code)
        return 0
    if end.workers_code == 0 and end.workers_write_markers and not completed:
        log.error("the workers exited without finishing or saving a stop; see their errors above")
        return EXIT_RUN_FAILED
    return end.workers_code


def stopped_at(run_dir: RunDir, marker: dict[str, Any] | None) -> str:
    """Where a stopped run stands, for the line that says so."""
    if marker is None:
        return "before a first step"
    newest = _newest_checkpoint(run_dir)
    if newest is not None and newest.meta["step"] == marker["step"]:
        return f"at step {marker['step']} with its checkpoint"
    return f"at step {marker['step']}, before a first step: nothing new to save"


def _newest_checkpoint(run_dir: RunDir):
    from bigmodel_dist.checkpoint.manager import newest_committed

    return newest_committed(run_dir)
