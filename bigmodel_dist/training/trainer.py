"""The one training loop every launcher runs: lr -> micro-steps -> step -> log -> eval -> save -> stop.

Runs inside an already-started set of processes (torchrun, srun, accelerate launch, Ray): the
Accelerator joins the process group; rank and world size come in as `DistributedFacts`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch

from bigmodel_dist.checkpoint.choice import ResumePoint
from bigmodel_dist.checkpoint.manager import CheckpointManager, check_resumable, requested_resume
from bigmodel_dist.checkpoint.reshard import LoadableCopy, convert_for, needs_conversion
from bigmodel_dist.checkpoint.train_state import TrainState
from bigmodel_dist.config.loader import save_config, to_dict
from bigmodel_dist.config.schema import OptimConfig
from bigmodel_dist.core.distributed import DistributedFacts, on_rank0_then_shared
from bigmodel_dist.core.errors import RunFailedError
from bigmodel_dist.core.fileio import write_json_atomically, write_text_atomically
from bigmodel_dist.data.continuity import checkpoint_data, continue_data
from bigmodel_dist.data.dataset import MixedDataset, PackedDataset
from bigmodel_dist.data.ledger import SampleLedger
from bigmodel_dist.data.loader import BatchLoader
from bigmodel_dist.data.mixture import (
    MixtureProgress,
    MixtureReader,
    MixtureSchedule,
    Segment,
    budgets_in_sequences,
    refuse_short_budgets,
)
from bigmodel_dist.data.mixture_sources import prepare_run_sources
from bigmodel_dist.data.sampler import global_index
from bigmodel_dist.data.tokenizer import tokenizer_fingerprint
from bigmodel_dist.ft.faults import Faults
from bigmodel_dist.ft.guards import GOOD_STEP, LossGuard, Verdict
from bigmodel_dist.ft.preemption import FAILED_WRITE, StopController, StopSignals
from bigmodel_dist.ft.progress import ProgressRecorder
from bigmodel_dist.ft.resize import resize_details, stop_reason_at
from bigmodel_dist.metrics.jsonl import read_metrics
from bigmodel_dist.metrics.logger import MetricsLogger
from bigmodel_dist.metrics.startup import StartupClock, slowest_rank_note
from bigmodel_dist.model.build import build_model, param_group_names, weight_decay_groups
from bigmodel_dist.model.engine import (
    Runtime,
    backward_without_step,
    create_accelerator,
    deepspeed_config_as_run,
    load_universal_checkpoints,
    prepare,
    restart_accumulation_count,
    set_learning_rate,
    set_universal_loading,
    skips_non_finite_steps,
    unshare_optimizer_steps,
)
from bigmodel_dist.run.resolve import ResolvedRun
from bigmodel_dist.training.evaluation import Evaluator
from bigmodel_dist.training.window_metrics import LogWindow, WindowMetrics

log = logging.getLogger(__name__)


def _request_in(stop_file: str | None) -> str | None:
    """What a launcher wrote into the stop file it asked for a stop with (e.g. "grow from 1 to 2 workers")."""
    try:
        return (Path(stop_file).read_text().strip() or None) if stop_file else None
    except OSError:
        return None


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps` (step counts from 0)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


class StepReporter(Protocol):
    """Hears of every logged step and checkpoint (e.g. Ray Train's `report`). Called on all ranks alike."""

    def report(self, step: int, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...


class Trainer:
    def __init__(self, resolved: ResolvedRun, facts: DistributedFacts, reporter: StepReporter | None = None,
                 stop_signals: StopSignals | None = None, clock: StartupClock | None = None,
                 faults: Faults | None = None, progress: ProgressRecorder | None = None):
        """`stop_signals`: pass the ones installed at process start, so a stop asked for during imports or
        this set-up is honoured; without them the Trainer watches from here on. `clock`: the start-up
        clock of this process, reported with the first step. `faults`: test-only injected faults.
        `progress`: where this rank publishes its step and phase for its node's hang watchdog (the
        Trainer closes it).

        What the set-up opens (threads, W&B, the process group) is closed by `close()`, and by the
        constructor itself when it fails half-way.
        """
        self._resources = ExitStack()
        try:
            self._set_up(resolved, facts, reporter, stop_signals, clock, faults, progress)
        except BaseException:
            self._resources.close()
            raise

    def _set_up(self, resolved: ResolvedRun, facts: DistributedFacts, reporter: StepReporter | None,
                stop_signals: StopSignals | None, clock: StartupClock | None, faults: Faults | None,
                progress: ProgressRecorder | None) -> None:
        self.progress = progress or ProgressRecorder(None, facts.rank)
        self._resources.callback(self.progress.close)
        self.faults = faults or Faults()
        self.clock = clock or StartupClock()
        self._resources.callback(self.clock.done)
        self.clock.dump_stacks_after(resolved.config.logging.startup_stacks_after_s)
        if stop_signals is None:
            stop_signals = StopSignals(resolved.config.checkpoint.stop_signals, facts.stop_file)
            self._resources.callback(stop_signals.close)
        self.signals = stop_signals
        # Before the process group: a resumed run keeps its checkpoint's tokenizer, and a changed corpus is refused
        # (or, accepted, recorded below).
        pinned, self._corpus_change = continue_data(resolved.config, requested_resume(resolved.config.checkpoint.resume,
                                                                                      resolved.run_dir))
        resolved = dataclasses.replace(resolved, config=pinned)
        self.resolved, self.cfg, self.facts, self.run_dir = resolved, resolved.config, facts, resolved.run_dir
        self.reporter = reporter
        self._unreported: dict[str, Any] = {}  # this step's metrics, for the reporter
        self._conversion_s = 0.0  # universal-checkpoint conversion at start-up (a resume on another size)
        self._ledger = SampleLedger.from_env(facts.rank, facts.world_size)  # opt-in audit of the samples read
        self._resources.callback(self._ledger.close)
        self.state = TrainState()
        self.guard = LossGuard(resolved.config.resilience, self.state)
        # Before the first collective: W&B may take seconds to start and no rank may wait on it.
        self.metrics = MetricsLogger(self.run_dir, self.cfg.logging, to_dict(self.cfg), facts.is_main,
                                     self.cfg.train.max_steps)
        self._resources.callback(self.metrics.close)
        self.state.wandb_run_id = self.metrics.run_id
        self.clock.mark("logging")
        accelerator = create_accelerator(resolved.deepspeed_config, self.cfg.train.precision)
        self._resources.callback(accelerator.end_training)
        if facts.is_main:
            save_config(self.cfg, self.run_dir.config)
        self.clock.mark("process group")
        if facts.is_main:
            log.info("process group ready: %d rank(s), %s; opening data, building the model and engine",
                     facts.world_size, "nccl" if torch.cuda.is_available() else "gloo")
        with self.progress.heartbeat("startup", 0):  # preparing and checksumming data can take long
            self.dataset = self._open_data()
        self.tokenizer = self.dataset.tokenizer()
        self._data_record = checkpoint_data(self.cfg.data, tokenizer_fingerprint(self.tokenizer))
        self.clock.mark("data")
        self.checkpoints = CheckpointManager(self.run_dir, self.cfg.checkpoint, facts)
        self._resources.callback(self.checkpoints.close)
        # The newest checkpoint's files are checked in the background while the engine is built; a
        # conversion reads them, so it waits for the verdict (`checkpoint/choice.py`).
        choice = self.checkpoints.start_choosing(self.cfg.checkpoint.resume)
        resume = choice.candidate
        if resume is not None and self._needs_conversion(resume):
            resume = choice.result()
        if resume is not None:
            check_resumable(resume, resolved)
            load_from = self._loadable_copy(resume, accelerator)
        self.clock.mark("checkpoint choice")
        model = build_model(self.cfg.model, self.cfg.seed, eos_token_id=self.tokenizer.eos_token_id)
        groups = weight_decay_groups(model, self.cfg.optim.weight_decay)
        self._param_group_names = param_group_names(model, groups)  # recorded in checkpoints (ZeRO-0 resharding)
        self.runtime: Runtime = prepare(accelerator, model, groups, self.cfg.optim.lr)
        torch.manual_seed(self.cfg.seed + 1000 * facts.rank)  # dropout differs per rank, same on every run
        if facts.is_main:  # as DeepSpeed got it, Accelerate's fill-ins and the universal-load flag included
            write_json_atomically(self.run_dir.deepspeed_config, deepspeed_config_as_run(self.runtime.engine))
        self.clock.mark("model + engine")
        verified = choice.result()  # collective: the checksums read while the engine was built
        if verified is not resume:  # it failed its checks: an older one, or none
            resume = verified
            if resume is not None:
                check_resumable(resume, resolved)
                load_from = self._loadable_copy(resume, accelerator)
        self.clock.mark("checkpoint checks")
        batch_change = None
        if resume is not None:
            batch_change = self._load(resume, load_from)
            self.clock.mark("checkpoint load")
        self.checkpoints.install_engine(self.runtime.engine)  # saves are ours; loading stays DeepSpeed's
        self.stopper = StopController(self.signals, self.cfg.checkpoint.end_time or facts.job_end_time,
                                      self.cfg.checkpoint.time_limit_margin_s, facts.is_main, self.runtime.device)
        self.window_metrics = WindowMetrics(resolved, facts, self.runtime, self.metrics)
        self._sync_mixture()
        self.loader = self._open_loader()
        self._resources.callback(lambda: self.loader.close())  # the loader of the moment (rollbacks renew it)
        self.evaluator = Evaluator(self.dataset.val, resolved.layout, facts.rank, self.cfg.train.eval_every,
                                   self.cfg.train.eval_batches)
        resized = resume is not None and resume.meta["world_size"] != facts.world_size and facts.is_main
        # Read before the restart marker below: the last line the previous rank group wrote.
        history_before = read_metrics(self.run_dir.metrics) if resized else None
        self.metrics.mark_restart(self.state.step)
        if resume is not None and history_before is not None:
            details = resize_details(resume.meta["world_size"], facts.world_size, self.state.step,
                                     stop_reason_at(self.run_dir, self.state.step), history_before, self._conversion_s)
            log.warning("resized from %d to %d rank(s) at step %d (%s): %d step(s) redone, %.1f s since the last "
                        "rank group's last line, %.1f s converting the checkpoint", details["old_size"],
                        details["new_size"], self.state.step, details["reason"], details["lost_steps"],
                        details["lost_s"], details["conversion_s"])
            self.metrics.incident(self.state.step, "resize", **details)
        if resume is not None and self._corpus_change:
            self.metrics.incident(self.state.step, "data", **self._corpus_change.as_incident())
        if batch_change:
            self.metrics.incident(self.state.step, "batch", **batch_change)

    # ---- the loop -----------------------------------------------------------------------------------
    def train(self) -> TrainState:
        """Steps until the budget is spent or every rank agrees to stop; the last step is always logged
        and saved, so an early stop loses no step's loss, time or state."""
        state, every_log = self.state, self.cfg.train.log_every
        self._announce()
        window = LogWindow(state.step, self.runtime.device)
        # A stop asked for during start-up ends the run before its first step: nothing new to save.
        state.stop_reason = self._agreed_stop()
        while not state.stop_reason and not self._budget_spent():
            lr = lr_at(state.step, self.cfg.optim, self.cfg.train.max_steps) * state.lr_scale
            set_learning_rate(self.runtime, lr)
            loss, verdict = self._train_step(window)
            state.advance(self.resolved.tokens_per_step, self.resolved.layout.global_batch_size)
            verdict = self._settle_step(loss, verdict)
            if verdict.bad:
                window.skipped += 1
            else:
                window.losses.append(loss)
            if "first step" not in self.clock.phases:
                self._report_startup()
            if verdict.rollback:  # every rank alike: the verdict comes from all-rank figures
                self._roll_back()
                window.restart(state.step)
                continue
            state.stop_reason = self._agreed_stop()  # every rank, every step
            last_step = bool(state.stop_reason) or self._budget_spent()
            logged = last_step or state.step % every_log == 0
            if logged:
                self._log_window(window, lr)
            if self.evaluator.due(state.step, last_step=self._budget_spent()):  # not when stopped early
                loss = self.evaluator.mean_loss(self.runtime.engine, self.runtime.accelerator, self.runtime.device,
                                                on_batch=lambda: self.progress.mark("eval", state.step))
                self._log({"eval/loss": loss, "eval/ppl": math.exp(loss)})
            # Never an interval save inside a streak of bad steps: a rollback must land before its start.
            due = self.checkpoints.due(state.step) and not state.bad_streak
            saved = self.save_checkpoint() if last_step or due else None
            self._report(saved)
            if logged:
                window.restart(state.step)
        self._finish()
        return state

    def _budget_spent(self) -> bool:
        """`train.max_steps` reached, or `train.max_tokens` when set."""
        max_tokens = self.cfg.train.max_tokens
        return self.state.step >= self.cfg.train.max_steps or bool(max_tokens and self.state.tokens_seen >= max_tokens)

    def _agreed_stop(self) -> str | None:
        """Collective: why every rank stops after this step (a signal, the time limit), or None. A failed
        background checkpoint write on any rank ends the run here, on every rank, with its error."""
        self.progress.mark("collective", self.state.step)
        reason = self.stopper.agreed_stop(write_failed=self.checkpoints.local_failure())
        if reason == FAILED_WRITE:
            self.checkpoints.settle()  # raises RunFailedError naming the rank, path and cause
            raise RunFailedError("a checkpoint write failed on another rank; see its log")
        return reason

    def _report_startup(self) -> None:
        """Collective (once): every rank's start-up phases to rank 0, which logs them."""
        self.clock.mark("first step")
        self.clock.done()
        all_phases: list[dict[str, float]] = [{} for _ in range(self.facts.world_size)]
        torch.distributed.all_gather_object(all_phases, self.clock.phases)
        if self.facts.is_main:
            log.info(self.clock.summary())
            note = slowest_rank_note(all_phases)
            if note:
                log.info(note)
        self._log(self.clock.as_metrics())

    def _train_step(self, window: LogWindow) -> tuple[float, Verdict]:
        """One optimizer step: grad_accum micro-steps; DeepSpeed clips and steps at the boundary.

        Returns the step's loss (mean over micro-steps and ranks) and the loss guard's verdict, given
        before the step is applied: a bad step's last backward is made non-finite, which DeepSpeed
        answers by skipping the step and clearing the gradients (its overflow path); where the optimizer
        has no such path (ZeRO-0 in fp32) the step is left out and the gradients dropped here."""
        engine, accelerator = self.runtime.engine, self.runtime.accelerator
        engine.train()
        step, accum = self.state.step, self.resolved.layout.grad_accum_steps
        total = torch.zeros((), device=self.runtime.device)
        verdict, mean = GOOD_STEP, 0.0
        for micro_step in range(accum):
            self.progress.mark("data", step + 1)
            batch = self.loader.next(step, micro_step).to(self.runtime.device, non_blocking=True)
            self.progress.mark("forward", step + 1)
            with accelerator.accumulate(engine):  # sync (and step) only on the last micro-step
                with window.compute:
                    if self.faults:
                        self.faults.in_forward(self.facts.rank, step + 1)
                    loss = engine(input_ids=batch, labels=batch).loss
                if self.faults:
                    loss = loss * self.faults.loss_scale(self.loader.indices(step, micro_step))
                total += loss.detach().float()
                if micro_step == accum - 1 and self.cfg.resilience.enabled:
                    mean = self._all_rank_mean(total / accum)
                    verdict = self.guard.judge(mean)
                    if verdict.bad:
                        loss = loss * float("nan")
                self.progress.mark("backward", step + 1)
                if verdict.bad and not skips_non_finite_steps(engine):
                    backward_without_step(engine, loss)
                else:
                    accelerator.backward(loss)
        if not self.cfg.resilience.enabled:  # this rank's mean; the log window averages over ranks
            return float(total / accum), verdict
        return mean, verdict

    def _all_rank_mean(self, local: torch.Tensor) -> float:
        """Collective: the mean of `local` over every rank (NaN anywhere makes it NaN everywhere)."""
        self.progress.mark("collective", self.state.step + 1)
        total = local.detach().clone()
        torch.distributed.all_reduce(total)
        return float(total) / self.facts.world_size

    def _settle_step(self, loss: float, verdict: Verdict) -> Verdict:
        """After the step: a finite loss whose gradient norm was not (DeepSpeed skipped it) is bad too;
        each bad step is one incident; the guard's memory moves on."""
        if not self.cfg.resilience.enabled:
            return verdict
        step = self.state.step
        norm = self.runtime.engine.get_global_grad_norm()  # None where DeepSpeed does not compute it (ZeRO-0)
        # fp16's loss scaler overflows (and skips) now and then by design: only its losses are judged.
        judged = norm is not None and self.cfg.train.precision != "fp16"
        if not verdict.bad and judged and not math.isfinite(float(norm)):
            verdict = self.guard.verdict_for("non-finite gradient norm")
        self.guard.record(step, loss, verdict.bad)
        if verdict.bad:
            self.state.skipped_steps += 1
            self.metrics.incident(step, "skip", reason=verdict.reason, loss=loss, bad_streak=self.state.bad_streak)
        return verdict

    def _open_loader(self) -> BatchLoader:
        """The loader from the cursor on (and, for a mixture, the schedule the training state holds)."""
        read = None
        if isinstance(self.dataset, MixedDataset):
            segments = [Segment.from_dict(s) for s in self.state.mixture]
            read = MixtureReader(self.dataset.sources, MixtureSchedule(segments, self.cfg.seed), self.cfg.seed)
            self.window_metrics.mixture = MixtureProgress(self.dataset.names, [len(s) for s in self.dataset.sources],
                                                          segments, self.cfg.seed, self.dataset.seq_len)
        return BatchLoader(self.dataset.train, self.resolved.layout, self.facts.rank, self.cfg.seed,
                           start_step=self.state.step, prefetch=self.cfg.data.prefetch,
                           pin_memory=torch.cuda.is_available(), skipped=self.state.skipped_ranges, read=read,
                           ledger=self._ledger, origin=self.state.batch_origin)

    def _sync_mixture(self) -> None:
        """The mixture's segments in the training state: the checkpoint's, switched to the config's
        weights, window and budgets at the cursor when they changed: a curriculum, recorded, never silent."""
        data = self.cfg.data
        if not isinstance(self.dataset, MixedDataset):
            return
        weights = tuple(data.source_weights().values())
        budgets = budgets_in_sequences([s.max_tokens for s in data.sources], [s.max_epochs for s in data.sources],
                                       [len(rows) for rows in self.dataset.sources], self.dataset.seq_len)
        segments = [Segment.from_dict(s) for s in self.state.mixture] or \
            [Segment(0, weights, (0,) * len(weights), data.mixture_window, budgets)]
        schedule = MixtureSchedule(segments, self.cfg.seed)
        if (segments[-1].weights, segments[-1].window, segments[-1].budgets) != (weights, data.mixture_window, budgets):
            at = self.state.samples_seen
            schedule = schedule.switched(weights, data.mixture_window, at, budgets)
            self.metrics.incident(self.state.step, "mixture", at_sample=at, window=data.mixture_window,
                                  weights=dict(zip(data.source_weights(), weights)),
                                  budgets=dict(zip(data.source_weights(), budgets)))
        self.state.mixture = [s.as_dict() for s in schedule.saved]
        self._check_budgets_last(schedule)

    def _check_budgets_last(self, schedule: MixtureSchedule) -> None:
        """Every budget spent before the run's last step would leave steps without data: refuse now."""
        batch = self.resolved.layout.global_batch_size
        last = self.state.logical_samples(self.cfg.train.max_steps, batch)
        refuse_short_budgets(schedule.end, global_index(last, self.state.skipped_ranges),
                             self.cfg.train.max_steps, batch)

    def _roll_back(self) -> None:
        """Collective: back to the newest checkpoint saved before this streak of bad steps; the good steps
        after it are redone on the same data, the samples the bad steps read are passed over. The lost
        steps' time does not count as productive."""
        state, cfg = self.state, self.cfg.resilience
        if state.rollbacks >= cfg.max_rollbacks:
            raise RunFailedError(f"{state.bad_streak} bad steps in a row from step {state.first_bad_step} after "
                                 f"{state.rollbacks} rollback(s) (resilience.max_rollbacks): the run keeps diverging; "
                                 "lower optim.lr or check the data", on_every_rank=True)
        self.progress.mark("save", state.step)  # a checkpoint load: the save limit applies
        self.checkpoints.settle()
        before = state.first_bad_step
        if state.last_rollback_to >= 0 and before <= state.last_rollback_to + 2:
            before = state.last_rollback_to  # diverged again right after the last rollback: go further back
        target = self.checkpoints.choose_resume("latest", before_step=before)
        if target is None:
            raise RunFailedError(
                f"{state.bad_streak} bad steps in a row from step {state.first_bad_step} and no checkpoint saved "
                f"before step {before} to roll back to; save earlier (checkpoint.every) or check the data and the "
                "learning rate", on_every_rank=True)
        self.checkpoints.discard_from(target.train_state["step"] + 1)  # the abandoned timeline's saves
        batch = self.resolved.layout.global_batch_size
        bad = [global_index(state.logical_samples(state.first_bad_step - 1, batch), state.skipped_ranges),
               state.samples_seen]
        bad_step = state.step
        kept = {"run_started_at": state.run_started_at, "skipped_steps": state.skipped_steps,
                "rollbacks": state.rollbacks + 1, "lr_scale": state.lr_scale * cfg.rollback_lr_factor,
                "skipped_ranges": sorted([*state.skipped_ranges, bad]),
                "skipped_samples": state.skipped_samples + bad[1] - bad[0]}
        self.loader.close()
        batch_change = self._load(target, self._loadable_copy(target, self.runtime.accelerator))
        state.load_state_dict(kept)
        state.samples_seen = global_index(state.logical_samples(state.step, batch), state.skipped_ranges)
        state.last_rollback_to = state.step
        self._sync_mixture()
        self.loader = self._open_loader()
        self.metrics.incident(bad_step, "rollback", to_step=state.step, lost_steps=bad_step - state.step,
                              skipped_samples=bad, checkpoint=str(target.path), lr_scale=state.lr_scale)
        self.metrics.mark_restart(state.step, redone_through=bad_step)
        if batch_change:
            self.metrics.incident(state.step, "batch", **batch_change)

    def _open_data(self) -> PackedDataset | MixedDataset:
        """Rank 0 prepares (or finds) the data first and shares any input error; then every rank opens it.

        Others prepare too if they do not see rank 0's files (no shared file system): writes are atomic.
        """
        vocab = self.resolved.shape.vocab_size
        on_rank0_then_shared(self.facts.is_main, lambda: prepare_run_sources(self.cfg, vocab))
        prepared = prepare_run_sources(self.cfg, vocab, progress=False)
        # One checksum pass per node is enough: ranks of a node read the same files.
        verify = self.cfg.data.verify if self.facts.local_rank == 0 else "size"
        return MixedDataset(prepared, verify) if self.cfg.data.sources else PackedDataset(prepared[0][1], verify)

    # ---- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """One verified, atomically committed checkpoint of every rank's state plus the training state."""
        self.progress.mark("save", self.state.step)
        started = time.perf_counter()
        path = self.checkpoints.save(
            self.runtime.accelerator, self.state.step, self.state.state_dict(), self._run_identity(),
            write_extra=lambda d: self.tokenizer.save_pretrained(str(d / "tokenizer")),  # self-contained for export
            engine=self.runtime.engine)
        elapsed = time.perf_counter() - started  # with async_save: the stall only, writing goes on
        log.info("%s checkpoint %s in %.2fs", "snapshotted" if self.cfg.checkpoint.async_save else "saved", path, elapsed)
        self._log({"checkpoint/save_s": elapsed})
        return path

    def _run_identity(self) -> dict[str, Any]:
        """What a checkpoint records about the run that wrote it; `check_resumable` compares some of it."""
        r = self.resolved
        return {
            "global_batch_size": r.layout.global_batch_size,
            "seq_len": self.cfg.data.seq_len,
            "world_size": self.facts.world_size,
            "zero_stage": r.zero_stage,
            "precision": self.cfg.train.precision,
            "tokenizer_vocab_size": len(self.tokenizer),
            "model": {"preset": self.cfg.model.preset, "vocab_size": r.shape.vocab_size,
                      "num_parameters": r.num_parameters},
            "config": to_dict(self.cfg),
            "param_groups": self._param_group_names,
            "data": self._data_record,
        }

    def _needs_conversion(self, resume: ResumePoint) -> bool:
        """Written by another world size or at another ZeRO stage: loaded through a universal checkpoint."""
        return needs_conversion(resume.meta, self.facts.world_size, self.resolved.zero_stage)

    def _loadable_copy(self, resume: ResumePoint, accelerator) -> LoadableCopy:
        """The checkpoint itself, or (other world size or ZeRO stage) the copy converted for this one."""
        world, stage = self.facts.world_size, self.resolved.zero_stage
        if not self._needs_conversion(resume):
            return LoadableCopy(resume.path, universal=False)
        if self.facts.is_main:
            log.warning("checkpoint %s was written by %d rank(s) at ZeRO-%d; resuming on %d at ZeRO-%d through a "
                        "universal checkpoint", resume.path.name, resume.meta["world_size"], resume.meta["zero_stage"],
                        world, stage)
        started = time.perf_counter()
        precision = self.cfg.train.precision
        with self.progress.heartbeat("save", self.state.step):  # a conversion in a subprocess: minutes for big models
            copy = on_rank0_then_shared(self.facts.is_main,
                                        lambda: convert_for(resume.path, resume.meta, world, stage, precision))
        self._conversion_s = time.perf_counter() - started
        if self.facts.is_main:
            log.info("universal checkpoint ready in %.1f s (%s)", self._conversion_s, copy.path)
        if copy.universal:
            load_universal_checkpoints(accelerator)
        return copy

    def _load(self, resume: ResumePoint, copy: LoadableCopy) -> dict[str, int] | None:
        """Model, optimizer and RNG states through Accelerate; the training state from the metadata. A
        checkpoint of another global batch size: the run goes on from its sample with this one (a batch
        ramp-up), and the change is returned for a `batch` incident."""
        accelerator = self.runtime.accelerator
        set_universal_loading(self.runtime.engine, copy.universal)
        accelerator.load_state(str(copy.path))
        if copy.universal:
            unshare_optimizer_steps(self.runtime.engine)
        restart_accumulation_count(accelerator)
        self.state.load_state_dict(resume.train_state)
        self.state.wandb_run_id = self.metrics.run_id
        log.info("resumed from %s at step %d (%d samples consumed)", resume.path, self.state.step,
                 self.state.samples_seen)
        written, batch = resume.meta.get("global_batch_size"), self.resolved.layout.global_batch_size
        if not written or written == batch:
            return None
        self.state.change_batch(written)
        return {"old_batch": written, "new_batch": batch, "at_sample": self.state.samples_seen}

    # ---- metrics ------------------------------------------------------------------------------------
    def _log(self, metrics: dict[str, Any]) -> None:
        self.metrics.log(self.state.step, metrics)
        self._unreported.update(metrics)

    def _report(self, saved: Path | None) -> None:
        if self.reporter is not None and (self._unreported or saved):
            self.reporter.report(self.state.step, self._unreported, saved)
        self._unreported = {}

    def _log_window(self, window: LogWindow, lr: float) -> None:
        """Collective: the window's loss, speed and per-rank figures; its time counts as productive."""
        self.progress.mark("collective", self.state.step)
        self._log(self.window_metrics.figures(window, self.state, lr, _grad_norm(self.runtime.engine)))

    def _announce(self) -> None:
        r, layout = self.resolved, self.resolved.layout
        for note in r.deepspeed_notes:
            log.warning(note)
        log.info(
            "model %s: %.1fM parameters | ZeRO-%d %s (%s) | global batch %d = micro %d x accum %d x dp %d | "
            "%d tokens/step | %d train sequences of %d tokens | run dir %s",
            self.cfg.model.preset, r.num_parameters / 1e6, r.zero_stage, self.cfg.train.precision, r.precision_reason,
            layout.global_batch_size, layout.micro_batch_size, layout.grad_accum_steps, layout.data_parallel_size,
            r.tokens_per_step, len(self.dataset.train), self.cfg.data.seq_len, self.run_dir,
        )
        log.info("vocabulary: tokenizer %d tokens, model %d rows (a multiple of model.vocab_multiple=%d)",
                 len(self.tokenizer), r.shape.vocab_size, self.cfg.model.vocab_multiple)

    # ---- the end ------------------------------------------------------------------------------------
    def _finish(self) -> None:
        self.progress.mark("shutdown", self.state.step)  # settling writes, W&B: the save limit applies
        self.clock.done()  # also when stopped before a first step
        self.checkpoints.settle()  # the last checkpoint is committed before anyone calls the run done
        self.runtime.accelerator.wait_for_everyone()
        if self.facts.is_main:
            # A marker the launcher reads: workers' exit codes do not survive torchrun (it exits 1).
            marker = self.run_dir.stopped if self.state.stop_reason else self.run_dir.completed
            done = {"step": self.state.step, "tokens_seen": self.state.tokens_seen, "finished_at": time.time(),
                    "stop_reason": self.state.stop_reason, "stop_request": _request_in(self.facts.stop_file),
                    "launch": self.facts.launch_id}  # which launch's markers these are (run_dir.marker_of_launch)
            write_text_atomically(marker, json.dumps(done) + "\n")
            if self.state.stop_reason:
                return
            log.info("done: checkpoints in %s, metrics in %s%s", self.run_dir.checkpoints,
                     self.run_dir.metrics,
                     f", W&B files in {self.metrics.wandb_dir}" if self.metrics.wandb_dir else "")

    def close(self) -> None:
        """Stop the loader, background writes, W&B and the process group; safe to call on any exit path."""
        self.progress.mark("shutdown", self.state.step)
        self._resources.close()


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
