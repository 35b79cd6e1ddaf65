"""Resuming: which copy of a checkpoint this layout loads (the checkpoint, or a universal copy converted for
another world size or ZeRO stage), loading it, and the incidents a resume records (resize, data, batch)."""

from __future__ import annotations

import logging
import time
from typing import Any

from bigmodel_dist.checkpoint.choice import ResumePoint
from bigmodel_dist.checkpoint.reshard import LoadableCopy, convert_for, needs_conversion
from bigmodel_dist.checkpoint.train_state import TrainState
from bigmodel_dist.config.loader import to_dict
from bigmodel_dist.core.distributed import DistributedFacts, on_rank0_then_shared
from bigmodel_dist.data.continuity import CorpusChange
from bigmodel_dist.ft.resize import resize_details, stop_reason_at
from bigmodel_dist.metrics.jsonl import MetricsHistory
from bigmodel_dist.metrics.logger import MetricsLogger
from bigmodel_dist.model.engine import (
    Runtime,
    load_universal_checkpoints,
    restart_accumulation_count,
    set_universal_loading,
    unshare_optimizer_steps,
)
from bigmodel_dist.run.resolve import ResolvedRun
from bigmodel_dist.training.hooks import LoopHooks

log = logging.getLogger(__name__)


def converts(resume: ResumePoint, resolved: ResolvedRun, facts: DistributedFacts) -> bool:
    """Written by another world size or at another ZeRO stage: loaded through a universal checkpoint."""
    return needs_conversion(resume.meta, facts.world_size, resolved.zero_stage)


def loadable_copy(resume: ResumePoint, resolved: ResolvedRun, facts: DistributedFacts, accelerator,
                  hooks: LoopHooks, step: int) -> tuple[LoadableCopy, float]:
    """Collective: the checkpoint itself, or (other world size or ZeRO stage) the copy converted for this
    layout by rank 0; with the seconds the conversion took (0 when none)."""
    world, stage = facts.world_size, resolved.zero_stage
    if not converts(resume, resolved, facts):
        return LoadableCopy(resume.path, universal=False), 0.0
    if facts.is_main:
        log.warning("checkpoint %s was written by %d rank(s) at ZeRO-%d; resuming on %d at ZeRO-%d through a "
                    "universal checkpoint", resume.path.name, resume.meta["world_size"], resume.meta["zero_stage"],
                    world, stage)
    started = time.perf_counter()
    precision = resolved.config.train.precision
    with hooks.during("save", step):  # a conversion in a subprocess: minutes for big models
        copy = on_rank0_then_shared(facts.is_main, lambda: convert_for(resume.path, resume.meta, world, stage, precision))
    conversion_s = time.perf_counter() - started
    if facts.is_main:
        log.info("universal checkpoint ready in %.1f s (%s)", conversion_s, copy.path)
    if copy.universal:
        load_universal_checkpoints(accelerator)
    return copy, conversion_s


def load_checkpoint(resume: ResumePoint, copy: LoadableCopy, runtime: Runtime, state: TrainState,
                    metrics: MetricsLogger, resolved: ResolvedRun) -> dict[str, int] | None:
    """Model, optimizer and RNG states through Accelerate; the training state from the metadata. A
    checkpoint of another global batch size: the run goes on from its sample with this one (a batch
    ramp-up), and the change is returned for a `batch` incident."""
    accelerator = runtime.accelerator
    set_universal_loading(runtime.engine, copy.universal)
    accelerator.load_state(str(copy.path))
    if copy.universal:
        unshare_optimizer_steps(runtime.engine)
    restart_accumulation_count(accelerator)
    state.load_state_dict(resume.train_state)
    state.wandb_run_id = metrics.run_id
    log.info("resumed from %s at step %d (%d samples consumed)", resume.path, state.step, state.samples_seen)
    written, batch = resume.meta.get("global_batch_size"), resolved.layout.global_batch_size
    if not written or written == batch:
        return None
    state.change_batch(written)
    return {"old_batch": written, "new_batch": batch, "at_sample": state.samples_seen}


def record_resume(metrics: MetricsLogger, resume: ResumePoint | None, facts: DistributedFacts, resolved: ResolvedRun,
                  step: int, history_before: MetricsHistory | None, conversion_s: float,
                  corpus_change: CorpusChange | None, batch_change: dict[str, int] | None) -> None:
    """The incidents of this start: a resize (another world size), an accepted corpus change, a batch change."""
    if resume is not None and history_before is not None:
        details = resize_details(resume.meta["world_size"], facts.world_size, step,
                                 stop_reason_at(resolved.run_dir, step), history_before, conversion_s)
        log.warning("resized from %d to %d rank(s) at step %d (%s): %d step(s) redone, %.1f s since the last "
                    "rank group's last line, %.1f s converting the checkpoint", details["old_size"],
                    details["new_size"], step, details["reason"], details["lost_steps"], details["lost_s"],
                    details["conversion_s"])
        metrics.incident(step, "resize", **details)
    if resume is not None and corpus_change:
        metrics.incident(step, "data", **corpus_change.as_incident())
    if batch_change:
        metrics.incident(step, "batch", **batch_change)


def run_identity(resolved: ResolvedRun, facts: DistributedFacts, tokenizer_size: int, param_groups: list[list[str]],
                 data_record: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it; `check_resumable` compares some of it."""
    cfg = resolved.config
    return {
        "global_batch_size": resolved.layout.global_batch_size,
        "seq_len": cfg.data.seq_len,
        "world_size": facts.world_size,
        "zero_stage": resolved.zero_stage,
        "precision": cfg.train.precision,
        "tokenizer_vocab_size": tokenizer_size,
        "model": {"preset": cfg.model.preset, "vocab_size": resolved.shape.vocab_size,
                  "num_parameters": resolved.num_parameters},
        "config": to_dict(cfg),
        "param_groups": param_groups,
        "data": data_record,
    }
