"""The one training loop every launcher runs: lr -> micro-steps -> step -> log -> eval -> save -> stop.

Runs inside an already-started set of processes (torchrun, srun, accelerate launch, Ray); `setup.py` builds
its parts. What is not the step's arithmetic happens at named points: `hooks` (where this rank is, injected
faults), `guard` (the loss guard: judged before a step is applied, settled after), `rollback.py`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from bigmodel_dist.checkpoint.train_state import TrainState
from bigmodel_dist.core.errors import RunFailedError
from bigmodel_dist.ft.guards import GOOD_STEP, Verdict
from bigmodel_dist.ft.preemption import FAILED_WRITE
from bigmodel_dist.model.engine import set_learning_rate
from bigmodel_dist.training.lr_schedule import lr_at
from bigmodel_dist.training.parts import TrainingParts
from bigmodel_dist.training.reporting import announce, startup_report, write_end_marker
from bigmodel_dist.training.rollback import roll_back
from bigmodel_dist.training.window_metrics import LogWindow

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, parts: TrainingParts):
        self.parts = parts
        self.resolved, self.cfg, self.facts = parts.resolved, parts.resolved.config, parts.facts
        self.run_dir, self.state, self.runtime = parts.resolved.run_dir, parts.state, parts.runtime
        self.checkpoints, self.hooks, self.guard = parts.checkpoints, parts.hooks, parts.guard

    def train(self) -> TrainState:
        """Steps until the budget is spent or every rank agrees to stop; the last step is always logged
        and saved, so an early stop loses no step's loss, time or state."""
        state, parts, every_log = self.state, self.parts, self.cfg.train.log_every
        announce(self.resolved, len(parts.dataset.train), len(parts.tokenizer))
        window = LogWindow(state.step, self.runtime.device)
        # A stop asked for during start-up ends the run before its first step: nothing new to save.
        state.stop_reason = self._agreed_stop()
        while not state.stop_reason and not self._budget_spent():
            lr = lr_at(state.step, self.cfg.optim, self.cfg.train.max_steps) * state.lr_scale
            set_learning_rate(self.runtime, lr)
            verdict = self._train_step(window)
            state.advance(self.resolved.tokens_per_step, self.resolved.layout.global_batch_size)
            verdict = self.guard.settle(verdict)
            window.count(self.guard.step_loss, verdict.bad)
            if "first step" not in parts.clock.phases:
                self._log(startup_report(parts.clock, self.facts))
            if verdict.rollback:  # every rank alike: the verdict comes from all-rank figures
                roll_back(parts)
                window.restart(state.step)
                continue
            state.stop_reason = self._agreed_stop()  # every rank, every step
            last_step = bool(state.stop_reason) or self._budget_spent()
            logged = last_step or state.step % every_log == 0
            if logged:
                self._log_window(window, lr)
            if parts.evaluator.due(state.step, last_step=self._budget_spent()):  # not when stopped early
                self._evaluate()
            # Never an interval save inside a streak of bad steps: a rollback must land before its start.
            due = self.checkpoints.due(state.step) and not state.bad_streak
            saved = self.save_checkpoint() if last_step or due else None
            parts.step_log.report(state.step, saved)
            if logged:
                window.restart(state.step)
        self._finish()
        return state

    def _train_step(self, window: LogWindow) -> Verdict:
        """One optimizer step: grad_accum micro-steps; DeepSpeed clips and steps at the boundary. The
        guard judges the step's loss before the last backward, so a bad step is never applied."""
        engine, accelerator, hooks, loader = self.runtime.engine, self.runtime.accelerator, self.hooks, self.parts.loader
        engine.train()
        step, accum = self.state.step, self.resolved.layout.grad_accum_steps
        total = torch.zeros((), device=self.runtime.device)
        verdict = GOOD_STEP
        for micro_step in range(accum):
            hooks.before_data(step + 1)
            batch = loader.next(step, micro_step).to(self.runtime.device, non_blocking=True)
            hooks.before_forward(step + 1)
            with accelerator.accumulate(engine):  # sync (and step) only on the last micro-step
                with window.compute:
                    hooks.in_forward(step + 1)
                    loss = engine(input_ids=batch, labels=batch).loss
                loss = hooks.scale_loss(loss, lambda: loader.indices(step, micro_step))  # noqa: B023 (called now)
                total += loss.detach().float()
                if micro_step == accum - 1:
                    verdict = self.guard.judge(total / accum)
                hooks.before_backward(step + 1)
                self.guard.backward(loss, verdict)
        return verdict

    def _budget_spent(self) -> bool:
        """`train.max_steps` reached, or `train.max_tokens` when set."""
        max_tokens = self.cfg.train.max_tokens
        return self.state.step >= self.cfg.train.max_steps or bool(max_tokens and self.state.tokens_seen >= max_tokens)

    def _agreed_stop(self) -> str | None:
        """Collective: why every rank stops after this step (a signal, the time limit), or None. A failed
        background checkpoint write on any rank ends the run here, on every rank, with its error."""
        self.hooks.before_collective(self.state.step)
        reason = self.parts.stopper.agreed_stop(write_failed=self.checkpoints.local_failure())
        if reason == FAILED_WRITE:
            self.checkpoints.settle()  # raises RunFailedError naming the rank, path and cause
            raise RunFailedError("a checkpoint write failed on another rank; see its log")
        return reason

    def _evaluate(self) -> None:
        """Collective: the held-out loss."""
        step = self.state.step
        loss = self.parts.evaluator.mean_loss(self.runtime.engine, self.runtime.accelerator, self.runtime.device,
                                              on_batch=lambda: self.hooks.in_eval(step))
        self._log({"eval/loss": loss, "eval/ppl": math.exp(loss)})

    def save_checkpoint(self) -> Path:
        """One verified, atomically committed checkpoint of every rank's state plus the training state."""
        self.hooks.before_save(self.state.step)
        started = time.perf_counter()
        tokenizer = self.parts.tokenizer
        path = self.checkpoints.save(
            self.runtime.accelerator, self.state.step, self.state.state_dict(), self.parts.identity,
            write_extra=lambda d: tokenizer.save_pretrained(str(d / "tokenizer")),  # self-contained for export
            engine=self.runtime.engine)
        elapsed = time.perf_counter() - started  # with async_save: the stall only, writing goes on
        log.info("%s checkpoint %s in %.2fs", "snapshotted" if self.cfg.checkpoint.async_save else "saved", path, elapsed)
        self._log({"checkpoint/save_s": elapsed})
        return path

    def _log(self, values: dict) -> None:
        self.parts.step_log.log(self.state.step, values)

    def _log_window(self, window: LogWindow, lr: float) -> None:
        """Collective: the window's loss, speed and per-rank figures; its time counts as productive."""
        self.hooks.before_collective(self.state.step)
        norm = self.runtime.engine.get_global_grad_norm()
        self._log(self.parts.window_metrics.figures(window, self.state, lr,
                                                    float(norm) if norm is not None else float("nan")))

    def _finish(self) -> None:
        self.hooks.at_shutdown(self.state.step)  # settling writes, W&B: the save limit applies
        self.parts.clock.done()  # also when stopped before a first step
        self.checkpoints.settle()  # the last checkpoint is committed before anyone calls the run done
        self.runtime.accelerator.wait_for_everyone()
        if self.facts.is_main:
            write_end_marker(self.resolved, self.facts, self.state, self.parts.metrics)

    def close(self) -> None:
        """Stop the loader, background writes, W&B and the process group; safe to call on any exit path."""
        self.hooks.at_shutdown(self.state.step)
        self.parts.resources.close()
