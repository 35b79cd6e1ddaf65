"""The loss guard at the step's two named points: judged before the step is applied (on the all-rank mean
loss), settled after it (a gradient norm DeepSpeed found non-finite). A bad step is skipped, never applied.

A bad step's last backward is made non-finite, which DeepSpeed answers by skipping the step and clearing the
gradients (its overflow path); where the optimizer has no such path (ZeRO-0 in fp32) the step is left out and
the gradients dropped here. With `resilience.enabled: false` every step is good and no collective runs.
"""

from __future__ import annotations

import math

import torch

from bigmodel_dist.checkpoint.train_state import TrainState
from bigmodel_dist.config.schema import Config
from bigmodel_dist.ft.guards import GOOD_STEP, LossGuard, Verdict
from bigmodel_dist.metrics.logger import MetricsLogger
from bigmodel_dist.model.engine import Runtime, backward_without_step, skips_non_finite_steps
from bigmodel_dist.training.hooks import LoopHooks


class StepGuard:
    def __init__(self, cfg: Config, state: TrainState, runtime: Runtime, metrics: MetricsLogger, hooks: LoopHooks,
                 world_size: int):
        self.cfg = cfg  # read at each step: a benchmark switches the guard on and off in one run
        self.state, self.runtime, self.metrics, self.hooks, self.world_size = state, runtime, metrics, hooks, world_size
        self.losses = LossGuard(cfg.resilience, state)
        self._mean = math.nan

    @property
    def enabled(self) -> bool:
        return self.cfg.resilience.enabled

    def judge(self, local_mean: torch.Tensor) -> Verdict:
        """Collective (when enabled): the verdict on the step's all-rank mean loss, before it is applied."""
        if not self.enabled:
            self._mean = float(local_mean)  # this rank's mean; the log window averages over ranks
            return GOOD_STEP
        self._mean = self._all_rank_mean(local_mean)
        return self.losses.judge(self._mean)

    @property
    def step_loss(self) -> float:
        """The judged step's loss: the mean over micro-steps, and over ranks when the guard is on."""
        return self._mean

    def backward(self, loss: torch.Tensor, verdict: Verdict) -> None:
        """The micro-step's backward; a bad step's last one poisoned so that the step is skipped."""
        engine, accelerator = self.runtime.engine, self.runtime.accelerator
        if not verdict.bad:
            accelerator.backward(loss)
        elif skips_non_finite_steps(engine):
            accelerator.backward(loss * float("nan"))
        else:
            backward_without_step(engine, loss * float("nan"))

    def settle(self, verdict: Verdict) -> Verdict:
        """After the step: a finite loss whose gradient norm was not (DeepSpeed skipped it) is bad too;
        each bad step is one incident; the guard's memory moves on."""
        if not self.enabled:
            return verdict
        step, loss = self.state.step, self._mean
        norm = self.runtime.engine.get_global_grad_norm()  # None where DeepSpeed does not compute it (ZeRO-0)
        # fp16's loss scaler overflows (and skips) now and then by design: only its losses are judged.
        judged = norm is not None and self.cfg.train.precision != "fp16"
        if not verdict.bad and judged and not math.isfinite(float(norm)):
            verdict = self.losses.verdict_for("non-finite gradient norm")
        self.losses.record(step, loss, verdict.bad)
        if verdict.bad:
            self.state.skipped_steps += 1
            self.metrics.incident(step, "skip", reason=verdict.reason, loss=loss, bad_streak=self.state.bad_streak)
        return verdict

    def _all_rank_mean(self, local: torch.Tensor) -> float:
        """Collective: the mean of `local` over every rank (NaN anywhere makes it NaN everywhere)."""
        self.hooks.before_collective(self.state.step + 1)
        total = local.detach().clone()
        torch.distributed.all_reduce(total)
        return float(total) / self.world_size
