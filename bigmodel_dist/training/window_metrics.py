"""What one log line says about the steps since the last: loss, speed, memory, MFU, stragglers.

Collective: every rank calls `WindowMetrics.figures` at the same log step (the losses and per-rank
figures are reduced or gathered); rank 0's `MetricsLogger` writes the result.
"""

from __future__ import annotations

import logging
import resource
import socket
import statistics
import time
from typing import Any

import torch

from bigmodel_dist.checkpoint.train_state import TrainState
from bigmodel_dist.config.presets import flops_per_token
from bigmodel_dist.core.distributed import DistributedFacts
from bigmodel_dist.data.mixture import MixtureProgress
from bigmodel_dist.ft.guards import ComputeTimer, StragglerTracker
from bigmodel_dist.metrics.logger import MetricsLogger, device_peak_tflops
from bigmodel_dist.model.engine import Runtime
from bigmodel_dist.run.resolve import ResolvedRun

log = logging.getLogger(__name__)


class LogWindow:
    """The steps since the last log line: their (all-rank mean) losses, how many were skipped, the
    training time they took, and this rank's compute time in them."""

    def __init__(self, step: int, device):
        self.losses: list[float] = []
        self.skipped = 0
        self.compute = ComputeTimer(device)
        self.restart(step)

    def count(self, loss: float, bad: bool) -> None:
        """One step more: its loss, or (a bad step, skipped) one skip."""
        if bad:
            self.skipped += 1
        else:
            self.losses.append(loss)

    def restart(self, step: int) -> None:
        """Start timing here: eval and checkpoint stalls between windows do not count as step time."""
        self.losses.clear()
        self.skipped = 0
        self.compute.reset()
        self.first_step, self.started = step, time.perf_counter()


class WindowMetrics:
    def __init__(self, resolved: ResolvedRun, facts: DistributedFacts, runtime: Runtime, metrics: MetricsLogger):
        self.resolved, self.facts, self.runtime, self.metrics = resolved, facts, runtime, metrics
        self.resilience = resolved.config.resilience
        self.stragglers = StragglerTracker(self.resilience)
        self._hosts: list[str] = []  # every rank's host, gathered at the first log
        self.mixture: MixtureProgress | None = None  # per-source figures of a data mixture
        self._flops_per_step = flops_per_token(resolved.shape, resolved.config.data.seq_len) * resolved.tokens_per_step
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self._peak_flops = (device_peak_tflops(resolved.config.logging, device_name) or 0.0) * 1e12

    def figures(self, window: LogWindow, state: TrainState, lr: float, grad_norm: float) -> dict[str, Any]:
        """Collective: the mean loss (of the steps not skipped) and speed of the window's steps. Their time
        counts as productive (goodput): it is added to `state.productive_s` here."""
        elapsed = time.perf_counter() - window.started
        state.productive_s += elapsed
        steps = max(1, state.step - window.first_step)
        step_time = elapsed / steps
        tokens_per_s = self.resolved.tokens_per_step / step_time
        metrics: dict[str, Any] = {}
        if window.losses:  # the same count on every rank: verdicts are agreed
            losses = torch.tensor(window.losses, device=self.runtime.device)
            metrics["loss"] = float(self.runtime.accelerator.reduce(losses, reduction="mean").mean())
        if window.skipped:
            metrics["skipped_steps"] = window.skipped
        metrics.update({
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.facts.world_size,
            "tokens_seen": state.tokens_seen,
            "goodput": state.goodput(),
            **self._per_rank_figures(window.compute.seconds() / steps, state.step),
        })
        if self._peak_flops:
            metrics["mfu"] = self._flops_per_step / step_time / (self._peak_flops * self.facts.world_size)
        if self.mixture is not None:
            per_source, news = self.mixture.figures(state.samples_seen)
            metrics.update(per_source)
            for line in news if self.facts.is_main else []:
                log.info("%s", line)
        return metrics

    def _per_rank_figures(self, compute_s: float, step: int) -> dict[str, object]:
        """Collective: every rank's peak memory (GPU allocator, or the process's peak RSS on CPU) and
        compute time per step; a rank that computes slower than the others for several log intervals in
        a row is reported as a straggler, by rank and host."""
        if torch.cuda.is_available():
            memory = torch.cuda.max_memory_allocated() / 1e9
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
        local = torch.tensor([[memory, compute_s]], device=self.runtime.device, dtype=torch.float64)
        gathered = self.runtime.accelerator.gather(local).tolist()
        memories, computes = [row[0] for row in gathered], [row[1] for row in gathered]
        figures: dict[str, object] = {"memory/peak_gb_max": max(memories), "memory/peak_gb_min": min(memories),
                                      "memory/peak_gb_per_rank": memories}
        if not self.resilience.enabled:
            return figures
        if not self._hosts:
            self._hosts = [""] * self.facts.world_size
            torch.distributed.all_gather_object(self._hosts, socket.gethostname())
        ratio, stragglers = self.stragglers.update(computes)
        figures.update({"compute_s_per_rank": computes, "straggler/slowest_to_median": ratio})
        for rank in stragglers:
            self.metrics.incident(step, "straggler", rank=rank, host=self._hosts[rank], compute_s=computes[rank],
                                  others_median_s=statistics.median(computes[:rank] + computes[rank + 1:]),
                                  intervals=self.resilience.straggler_intervals)
        return figures
