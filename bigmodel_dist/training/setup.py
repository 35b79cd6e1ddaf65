"""Set-up of a training run, as named build steps, in the order the run needs them: the stop signals first
(a stop asked for during start-up is honoured), the resumed run's data pinned before the process group, W&B
before the first collective (it may take seconds), the checkpoint's files checked while the engine is
built, the checkpoint loaded, then the loader from the cursor on.

What a step opens (threads, W&B, the process group) is closed by `Trainer.close()`, or here when the set-up
fails half-way.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import ExitStack

import torch

from bigmodel_dist.checkpoint.choice import ResumePoint
from bigmodel_dist.checkpoint.manager import CheckpointManager, check_resumable, requested_resume
from bigmodel_dist.checkpoint.reshard import LoadableCopy
from bigmodel_dist.checkpoint.train_state import TrainState
from bigmodel_dist.config.loader import save_config, to_dict
from bigmodel_dist.core.distributed import DistributedFacts, on_rank0_then_shared
from bigmodel_dist.core.fileio import write_json_atomically
from bigmodel_dist.data.continuity import checkpoint_data, continue_data
from bigmodel_dist.data.dataset import MixedDataset, PackedDataset
from bigmodel_dist.data.ledger import SampleLedger
from bigmodel_dist.data.mixture_sources import prepare_run_sources
from bigmodel_dist.data.tokenizer import tokenizer_fingerprint
from bigmodel_dist.ft.faults import Faults
from bigmodel_dist.ft.preemption import StopController, StopSignals
from bigmodel_dist.ft.progress import ProgressRecorder
from bigmodel_dist.metrics.jsonl import read_metrics
from bigmodel_dist.metrics.logger import MetricsLogger
from bigmodel_dist.metrics.startup import StartupClock
from bigmodel_dist.model.build import build_model, param_group_names, weight_decay_groups
from bigmodel_dist.model.engine import Runtime, create_accelerator, deepspeed_config_as_run, prepare
from bigmodel_dist.run.resolve import ResolvedRun
from bigmodel_dist.training.evaluation import Evaluator
from bigmodel_dist.training.hooks import LoopHooks
from bigmodel_dist.training.loop import Trainer
from bigmodel_dist.training.mixture_state import open_loader, sync_mixture
from bigmodel_dist.training.parts import TrainingParts
from bigmodel_dist.training.reporting import StepLog, StepReporter
from bigmodel_dist.training.resume import (
    converts,
    load_checkpoint,
    loadable_copy,
    record_resume,
    run_identity,
)
from bigmodel_dist.training.step_guard import StepGuard
from bigmodel_dist.training.window_metrics import WindowMetrics

log = logging.getLogger(__name__)


def build_trainer(resolved: ResolvedRun, facts: DistributedFacts, reporter: StepReporter | None = None,
                  stop_signals: StopSignals | None = None, clock: StartupClock | None = None,
                  faults: Faults | None = None, progress: ProgressRecorder | None = None) -> Trainer:
    """`stop_signals`: the ones installed at process start, so a stop asked for during imports or this set-up
    is honoured; without them the run watches from here on. `clock`: this process's start-up clock, reported
    with the first step. `faults`: test-only injected faults. `progress`: where this rank publishes its step
    and phase for its node's hang watchdog."""
    resources = ExitStack()
    try:
        return Trainer(_build_parts(resolved, facts, reporter, stop_signals, clock, faults, progress, resources))
    except BaseException:
        resources.close()
        raise


def _build_parts(resolved: ResolvedRun, facts: DistributedFacts, reporter: StepReporter | None,
                 stop_signals: StopSignals | None, clock: StartupClock | None, faults: Faults | None,
                 progress: ProgressRecorder | None, resources: ExitStack) -> TrainingParts:
    hooks, clock, signals = _build_watchers(resolved, facts, stop_signals, clock, faults, progress, resources)
    # Before the process group: a resumed run keeps its checkpoint's tokenizer; a changed corpus is refused
    # (or, accepted, recorded below).
    pinned, corpus_change = continue_data(resolved.config, requested_resume(resolved.config.checkpoint.resume,
                                                                            resolved.run_dir))
    resolved = dataclasses.replace(resolved, config=pinned)
    cfg = resolved.config
    ledger = SampleLedger.from_env(facts.rank, facts.world_size)  # opt-in audit of the samples read
    resources.callback(ledger.close)
    state = TrainState()
    metrics = _build_metrics(resolved, facts, state, resources)
    clock.mark("logging")
    accelerator = create_accelerator(resolved.deepspeed_config, cfg.train.precision)
    resources.callback(accelerator.end_training)
    if facts.is_main:
        save_config(cfg, resolved.run_dir.config)
        log.info("process group ready: %d rank(s), %s; opening data, building the model and engine",
                 facts.world_size, "nccl" if torch.cuda.is_available() else "gloo")
    clock.mark("process group")
    with hooks.during("startup", 0):  # preparing and checksumming data can take long
        dataset = open_data(resolved, facts)
    tokenizer = dataset.tokenizer()
    clock.mark("data")
    checkpoints = CheckpointManager(resolved.run_dir, cfg.checkpoint, facts)
    resources.callback(checkpoints.close)
    # The newest checkpoint's files are checked in the background while the engine is built; a conversion
    # reads them, so it waits for the verdict (`checkpoint/choice.py`).
    choice = checkpoints.start_choosing(cfg.checkpoint.resume)
    resume = choice.candidate
    if resume is not None and converts(resume, resolved, facts):
        resume = choice.result()
    load_from, conversion_s = _prepare_load(resume, resolved, facts, accelerator, hooks)
    clock.mark("checkpoint choice")
    runtime, param_groups = build_engine(resolved, facts, accelerator, tokenizer)
    clock.mark("model + engine")
    verified = choice.result()  # collective: the checksums read while the engine was built
    if verified is not resume:  # it failed its checks: an older one, or none
        resume = verified
        load_from, conversion_s = _prepare_load(resume, resolved, facts, accelerator, hooks)
    clock.mark("checkpoint checks")
    batch_change = None
    if resume is not None and load_from is not None:
        batch_change = load_checkpoint(resume, load_from, runtime, state, metrics, resolved)
        clock.mark("checkpoint load")
    checkpoints.install_engine(runtime.engine)  # saves are ours; loading stays DeepSpeed's
    stopper = StopController(signals, cfg.checkpoint.end_time or facts.job_end_time, cfg.checkpoint.time_limit_margin_s,
                             facts.is_main, runtime.device)
    window_metrics = WindowMetrics(resolved, facts, runtime, metrics)
    sync_mixture(dataset, resolved, state, metrics)
    parts = TrainingParts(
        resolved=resolved, facts=facts, hooks=hooks, clock=clock, state=state, metrics=metrics,
        step_log=StepLog(metrics, reporter), ledger=ledger, dataset=dataset, tokenizer=tokenizer,
        checkpoints=checkpoints, runtime=runtime, guard=StepGuard(cfg, state, runtime, metrics, hooks, facts.world_size),
        stopper=stopper, window_metrics=window_metrics,
        evaluator=Evaluator(dataset.val, resolved.layout, facts.rank, cfg.train.eval_every, cfg.train.eval_batches),
        loader=open_loader(dataset, resolved, facts, state, ledger, window_metrics),
        identity=run_identity(resolved, facts, len(tokenizer), param_groups,
                              checkpoint_data(cfg.data, tokenizer_fingerprint(tokenizer))),
        resources=resources)
    resources.callback(lambda: parts.loader.close())  # the loader of the moment (rollbacks renew it)
    resized = resume is not None and resume.meta["world_size"] != facts.world_size and facts.is_main
    # Read before the restart marker below: the last line the previous rank group wrote.
    history_before = read_metrics(resolved.run_dir.metrics) if resized else None
    metrics.mark_restart(state.step)
    record_resume(metrics, resume, facts, resolved, state.step, history_before, conversion_s, corpus_change,
                  batch_change)
    return parts


def _build_watchers(resolved: ResolvedRun, facts: DistributedFacts, stop_signals: StopSignals | None,
                    clock: StartupClock | None, faults: Faults | None, progress: ProgressRecorder | None,
                    resources: ExitStack) -> tuple[LoopHooks, StartupClock, StopSignals]:
    """The loop's hooks (progress for the hang watchdog, injected faults), the start-up clock, the stop signals."""
    progress = progress or ProgressRecorder(None, facts.rank)
    resources.callback(progress.close)
    clock = clock or StartupClock()
    resources.callback(clock.done)
    clock.dump_stacks_after(resolved.config.logging.startup_stacks_after_s)
    if stop_signals is None:
        stop_signals = StopSignals(resolved.config.checkpoint.stop_signals, facts.stop_file)
        resources.callback(stop_signals.close)
    return LoopHooks(progress, faults or Faults(), facts.rank), clock, stop_signals


def _build_metrics(resolved: ResolvedRun, facts: DistributedFacts, state: TrainState,
                   resources: ExitStack) -> MetricsLogger:
    """metrics.jsonl, the progress line and W&B (rank 0), started before the first collective."""
    cfg = resolved.config
    metrics = MetricsLogger(resolved.run_dir, cfg.logging, to_dict(cfg), facts.is_main, cfg.train.max_steps)
    resources.callback(metrics.close)
    state.wandb_run_id = metrics.run_id
    return metrics


def open_data(resolved: ResolvedRun, facts: DistributedFacts) -> PackedDataset | MixedDataset:
    """Rank 0 prepares (or finds) the data first and shares any input error; then every rank opens it.

    Others prepare too if they do not see rank 0's files (no shared file system): writes are atomic."""
    cfg, vocab = resolved.config, resolved.shape.vocab_size
    on_rank0_then_shared(facts.is_main, lambda: prepare_run_sources(cfg, vocab))
    prepared = prepare_run_sources(cfg, vocab, progress=False)
    # One checksum pass per node is enough: ranks of a node read the same files.
    verify = cfg.data.verify if facts.local_rank == 0 else "size"
    return MixedDataset(prepared, verify) if cfg.data.sources else PackedDataset(prepared[0][1], verify)


def build_engine(resolved: ResolvedRun, facts: DistributedFacts, accelerator,
                 tokenizer) -> tuple[Runtime, list[list[str]]]:
    """The model (same initial weights on every layout) inside its DeepSpeed engine; with its optimizer
    groups' parameter names, which checkpoints record (ZeRO-0 resharding needs them)."""
    cfg = resolved.config
    model = build_model(cfg.model, cfg.seed, eos_token_id=tokenizer.eos_token_id)
    groups = weight_decay_groups(model, cfg.optim.weight_decay)
    names = param_group_names(model, groups)
    runtime = prepare(accelerator, model, groups, cfg.optim.lr)
    torch.manual_seed(cfg.seed + 1000 * facts.rank)  # dropout differs per rank, same on every run
    if facts.is_main:  # as DeepSpeed got it, Accelerate's fill-ins and the universal-load flag included
        write_json_atomically(resolved.run_dir.deepspeed_config, deepspeed_config_as_run(runtime.engine))
    return runtime, names


def _prepare_load(resume: ResumePoint | None, resolved: ResolvedRun, facts: DistributedFacts, accelerator,
                  hooks: LoopHooks) -> tuple[LoadableCopy | None, float]:
    """The checkpoint checked against this run, and the copy of it this layout loads (converted when needed)."""
    if resume is None:
        return None, 0.0
    check_resumable(resume, resolved)
    return loadable_copy(resume, resolved, facts, accelerator, hooks, 0)
