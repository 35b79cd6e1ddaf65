"""What the run says about itself: the figures announced at the start, the start-up report after the first
step, each step's metrics (to metrics.jsonl/W&B at once, to a step reporter such as Ray Train's with the
step's checkpoint), and the marker a launcher reads at the end."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from bigmodel_dist.checkpoint.train_state import TrainState
from bigmodel_dist.core.distributed import DistributedFacts
from bigmodel_dist.core.fileio import write_text_atomically
from bigmodel_dist.metrics.logger import MetricsLogger
from bigmodel_dist.metrics.startup import StartupClock, slowest_rank_note
from bigmodel_dist.run.resolve import ResolvedRun

log = logging.getLogger(__name__)


class StepReporter(Protocol):
    """Hears of every logged step and checkpoint (e.g. Ray Train's `report`). Called on all ranks alike."""

    def report(self, step: int, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...


class StepLog:
    def __init__(self, metrics: MetricsLogger, reporter: StepReporter | None):
        self.metrics, self.reporter = metrics, reporter
        self._unreported: dict[str, Any] = {}  # this step's metrics, for the reporter

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.metrics.log(step, values)
        self._unreported.update(values)

    def report(self, step: int, saved: Path | None) -> None:
        """The end of a step: what it logged and saved, to the reporter (once)."""
        if self.reporter is not None and (self._unreported or saved):
            self.reporter.report(step, self._unreported, saved)
        self._unreported = {}


def announce(resolved: ResolvedRun, num_train_sequences: int, tokenizer_size: int) -> None:
    """The run's derived figures, once, before the first step."""
    cfg, layout = resolved.config, resolved.layout
    for note in resolved.deepspeed_notes:
        log.warning(note)
    log.info(
        "model %s: %.1fM parameters | ZeRO-%d %s (%s) | global batch %d = micro %d x accum %d x dp %d | "
        "%d tokens/step | %d train sequences of %d tokens | run dir %s",
        cfg.model.preset, resolved.num_parameters / 1e6, resolved.zero_stage, cfg.train.precision,
        resolved.precision_reason, layout.global_batch_size, layout.micro_batch_size, layout.grad_accum_steps,
        layout.data_parallel_size, resolved.tokens_per_step, num_train_sequences, cfg.data.seq_len, resolved.run_dir,
    )
    log.info("vocabulary: tokenizer %d tokens, model %d rows (a multiple of model.vocab_multiple=%d)",
             tokenizer_size, resolved.shape.vocab_size, cfg.model.vocab_multiple)


def startup_report(clock: StartupClock, facts: DistributedFacts) -> dict[str, float]:
    """Collective (once, after the first step): every rank's start-up phases to rank 0, which logs them."""
    clock.mark("first step")
    clock.done()
    all_phases: list[dict[str, float]] = [{} for _ in range(facts.world_size)]
    torch.distributed.all_gather_object(all_phases, clock.phases)
    if facts.is_main:
        log.info(clock.summary())
        note = slowest_rank_note(all_phases)
        if note:
            log.info(note)
    return clock.as_metrics()


def write_end_marker(resolved: ResolvedRun, facts: DistributedFacts, state: TrainState, metrics: MetricsLogger) -> None:
    """Rank 0: COMPLETED or STOPPED, the marker launchers read (workers' exit codes do not survive torchrun)."""
    run_dir = resolved.run_dir
    marker = run_dir.stopped if state.stop_reason else run_dir.completed
    done = {"step": state.step, "tokens_seen": state.tokens_seen, "finished_at": time.time(),
            "stop_reason": state.stop_reason, "stop_request": _request_in(facts.stop_file),
            "launch": facts.launch_id}  # which launch's markers these are (run_dir.marker_of_launch)
    write_text_atomically(marker, json.dumps(done) + "\n")
    if not state.stop_reason:
        log.info("done: checkpoints in %s, metrics in %s%s", run_dir.checkpoints, run_dir.metrics,
                 f", W&B files in {metrics.wandb_dir}" if metrics.wandb_dir else "")


def _request_in(stop_file: str | None) -> str | None:
    """What a launcher wrote into the stop file it asked for a stop with (e.g. "grow from 1 to 2 workers")."""
    try:
        return (Path(stop_file).read_text().strip() or None) if stop_file else None
    except OSError:
        return None
