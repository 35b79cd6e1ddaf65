"""The one training loop every launcher runs: lr -> micro-steps -> step -> log -> eval -> save -> stop.

Runs inside an already-started set of processes (torchrun, srun, accelerate launch, Ray): the
Accelerator joins the process group; rank and world size come in as `DistributedFacts`.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from bigmodel_dist.checkpoint.async_writer import SnapshotCheckpointEngine
from bigmodel_dist.checkpoint.manager import CheckpointManager, ResumePoint, check_resumable
from bigmodel_dist.checkpoint.reshard import convert_to_universal
from bigmodel_dist.config.loader import save_config, to_dict
from bigmodel_dist.config.schema import OptimConfig
from bigmodel_dist.config.validate import ResolvedRun
from bigmodel_dist.data.dataset import PackedDataset
from bigmodel_dist.data.loader import BatchLoader
from bigmodel_dist.data.prepare import prepare_data
from bigmodel_dist.distributed import DistributedFacts, on_rank0_then_shared
from bigmodel_dist.metrics import MetricsLogger, device_peak_tflops
from bigmodel_dist.model_presets import flops_per_token
from bigmodel_dist.models import build_model, weight_decay_groups
from bigmodel_dist.preemption import StopController, StopSignals
from bigmodel_dist.runtime import (
    Runtime,
    create_accelerator,
    prepare,
    set_learning_rate,
    unshare_optimizer_steps,
)
from bigmodel_dist.startup import StartupClock, slowest_rank_note

log = logging.getLogger(__name__)


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps` (step counts from 0)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


@dataclass
class TrainState:
    """What the loop has done; goes into every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)  # per logged step, averaged over ranks
    stop_reason: str | None = None  # set when a signal or the time limit ended this run early


class StepReporter(Protocol):
    """Hears of every logged step and checkpoint (e.g. Ray Train's `report`). Called on all ranks alike."""

    def report(self, step: int, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...


class Trainer:
    def __init__(self, resolved: ResolvedRun, facts: DistributedFacts, reporter: StepReporter | None = None,
                 stop_signals: StopSignals | None = None, clock: StartupClock | None = None):
        """`stop_signals`: pass the ones installed at process start, so a stop asked for during imports or
        this set-up is honoured; without them the Trainer watches from here on. `clock`: the start-up
        clock of this process, reported with the first step."""
        self._owns_signals = stop_signals is None
        self.clock = clock or StartupClock()
        self.clock.dump_stacks_after(resolved.config.logging.startup_stacks_after_s)
        self.signals = stop_signals or StopSignals(resolved.config.checkpoint.stop_signals, facts.stop_file)
        self.resolved = resolved
        self.reporter = reporter
        self._unreported: dict[str, Any] = {}  # this step's metrics, for the reporter
        self.cfg = resolved.config
        self.facts = facts
        self.run_dir = resolved.run_dir
        self.state = TrainState()
        self._run_started_at = time.time()  # wall clock of the whole run, restarts included (goodput)
        self._productive_s = 0.0  # time in steps that count: work redone after a resume is not included
        # Before the first collective: W&B may take seconds to start and no rank may wait on it.
        self.metrics = MetricsLogger(self.run_dir, self.cfg.logging, to_dict(self.cfg), facts.is_main,
                                     self.cfg.train.max_steps)
        self.clock.mark("logging")
        accelerator = create_accelerator(resolved.deepspeed_config, self.cfg.train.precision)
        self._write_run_files(accelerator)
        self.clock.mark("process group")
        if facts.is_main:
            log.info("process group ready: %d rank(s), %s; opening data, building the model and engine",
                     facts.world_size, "nccl" if torch.cuda.is_available() else "gloo")
        self.dataset = self._open_data(accelerator)
        self.tokenizer = self.dataset.tokenizer()
        self.clock.mark("data")
        self.checkpoints = CheckpointManager(self.run_dir, self.cfg.checkpoint, facts)
        resume = self.checkpoints.choose_resume(self.cfg.checkpoint.resume)
        load_from = None
        if resume is not None:
            check_resumable(resume, resolved)
            load_from = self._loadable_copy(resume, accelerator)
        self.clock.mark("checkpoint choice")
        model = build_model(self.cfg.model, self.cfg.seed, eos_token_id=self.tokenizer.eos_token_id)
        self.runtime: Runtime = prepare(accelerator, model, weight_decay_groups(model, self.cfg.optim.weight_decay),
                                        self.cfg.optim.lr)
        torch.manual_seed(self.cfg.seed + 1000 * facts.rank)  # dropout differs per rank, same on every run
        self.clock.mark("model + engine")
        if resume is not None:
            self._load(resume, load_from)
            self.clock.mark("checkpoint load")
        if self.cfg.checkpoint.async_save:  # DeepSpeed hands its state to us instead of writing it
            engine = self.runtime.engine
            engine.checkpoint_engine = SnapshotCheckpointEngine(engine._config)
        self.stopper = StopController(self.signals, self.cfg.checkpoint.end_time or facts.job_end_time,
                                      self.cfg.checkpoint.time_limit_margin_s, facts.is_main, self.runtime.device)
        self.loader = BatchLoader(self.dataset.train, resolved.layout, facts.rank, self.cfg.seed,
                                  start_step=self.state.step, prefetch=self.cfg.data.prefetch,
                                  pin_memory=torch.cuda.is_available())
        self.metrics.mark_restart(self.state.step)
        self._flops_per_step = flops_per_token(resolved.shape, self.cfg.data.seq_len) * resolved.tokens_per_step
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self._peak_flops = (device_peak_tflops(self.cfg.logging, device_name) or 0.0) * 1e12

    def train(self) -> TrainState:
        cfg, train = self.cfg, self.cfg.train
        self._announce()
        last_log_time, last_log_step = time.perf_counter(), self.state.step
        step_losses: list[torch.Tensor] = []
        # A stop asked for during start-up ends the run before its first step: nothing new to save.
        self.state.stop_reason = self.stopper.agreed_stop()
        while not self.state.stop_reason and not self._should_stop():
            lr = lr_at(self.state.step, cfg.optim, train.max_steps)
            set_learning_rate(self.runtime, lr)
            step_losses.append(self._train_step())
            self.state.step += 1
            if "first step" not in self.clock.phases:
                self._report_startup()
            self.state.tokens_seen += self.resolved.tokens_per_step

            logged = self.state.step % train.log_every == 0 or self._should_stop()
            if logged:
                elapsed = time.perf_counter() - last_log_time
                self._productive_s += elapsed
                self._log_step(step_losses, lr, elapsed, self.state.step - last_log_step)
                step_losses.clear()
            if train.eval_every and (self.state.step % train.eval_every == 0 or self._should_stop()):
                self._log({"eval/loss": (loss := self.evaluate()), "eval/ppl": math.exp(loss)})
            self.state.stop_reason = self.stopper.agreed_stop()  # every rank, every step
            every = cfg.checkpoint.every
            saved = None
            if self.state.stop_reason or self._should_stop() or (every and self.state.step % every == 0):
                saved = self.save_checkpoint()
            if self.reporter is not None and (self._unreported or saved):
                self.reporter.report(self.state.step, self._unreported, saved)
            self._unreported = {}
            if self.state.stop_reason:
                break
            if logged:  # the next interval times training steps only, not eval or checkpoint stalls
                last_log_time, last_log_step = time.perf_counter(), self.state.step
        self._finish()
        return self.state

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

    def _train_step(self) -> torch.Tensor:
        """One optimizer step: grad_accum micro-steps; DeepSpeed clips and steps at the boundary."""
        engine, accelerator = self.runtime.engine, self.runtime.accelerator
        engine.train()
        total = torch.zeros((), device=self.runtime.device)
        for micro_step in range(self.resolved.layout.grad_accum_steps):
            batch = self._batch(self.state.step, micro_step)
            with accelerator.accumulate(engine):  # sync (and step) only on the last micro-step
                loss = engine(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
            total += loss.detach().float()
        return total / self.resolved.layout.grad_accum_steps

    def _batch(self, step: int, micro_step: int) -> torch.Tensor:
        return self.loader.next(step, micro_step).to(self.runtime.device, non_blocking=True)

    def _open_data(self, accelerator) -> PackedDataset:
        """Rank 0 prepares (or finds) the data first and shares any input error; then every rank opens it.

        Others prepare too if they do not see rank 0's files (no shared file system): writes are atomic.
        """
        cache_dir = Path(self.cfg.data.cache_dir or Path(self.cfg.output_dir) / ".cache")
        vocab = self.resolved.shape.vocab_size
        on_rank0_then_shared(self.facts.is_main, lambda: prepare_data(self.cfg.data, vocab, cache_dir))
        prepared = prepare_data(self.cfg.data, vocab, cache_dir, progress=False)
        # One checksum pass per node is enough: ranks of a node read the same files.
        return PackedDataset(prepared, verify=self.cfg.data.verify if self.facts.local_rank == 0 else "size")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over `eval_batches` micro-batches per rank of the held-out split, averaged over ranks."""
        engine, layout = self.runtime.engine, self.resolved.layout
        engine.eval()
        total = torch.zeros((), device=self.runtime.device)
        for batch_index in range(self.cfg.train.eval_batches):
            start = (batch_index * layout.data_parallel_size + self.facts.rank) * layout.micro_batch_size
            rows = [self.dataset.val[(start + i) % len(self.dataset.val)] for i in range(layout.micro_batch_size)]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(self.runtime.device)
            total += engine(input_ids=batch, labels=batch).loss.float()
        mean = self.runtime.accelerator.reduce(total / self.cfg.train.eval_batches, reduction="mean")
        return float(mean)

    def save_checkpoint(self) -> Path:
        """One verified, atomically committed checkpoint of every rank's state plus the data cursor."""
        r = self.resolved
        started = time.perf_counter()
        path = self.checkpoints.save(self.runtime.accelerator, self.state.step, {
            "tokens_seen": self.state.tokens_seen,
            "samples_seen": self.state.step * r.layout.global_batch_size,  # the data cursor
            "global_batch_size": r.layout.global_batch_size,
            "seq_len": self.cfg.data.seq_len,
            "world_size": self.facts.world_size,
            "zero_stage": r.zero_stage,
            "precision": self.cfg.train.precision,
            "model": {"preset": self.cfg.model.preset, "vocab_size": r.shape.vocab_size,
                      "num_parameters": r.num_parameters},
            "stop_reason": self.state.stop_reason,
            "wandb_run_id": self.metrics.run_id,  # rank 0's; resumed runs continue this W&B run
            "run_started_at": self._run_started_at,
            "productive_s": self._productive_s,
            "config": to_dict(self.cfg),
        }, write_extra=lambda d: self.tokenizer.save_pretrained(str(d / "tokenizer")),  # self-contained for export
           engine=self.runtime.engine)
        elapsed = time.perf_counter() - started  # with async_save: the stall only, writing goes on
        log.info("%s checkpoint %s in %.2fs", "snapshotted" if self.cfg.checkpoint.async_save else "saved", path, elapsed)
        self._log({"checkpoint/save_s": elapsed})
        return path

    def _loadable_copy(self, resume: ResumePoint, accelerator) -> Path:
        """The checkpoint itself, or (other world size or ZeRO stage) its universal conversion."""
        world, stage = self.facts.world_size, self.resolved.zero_stage
        if (resume.meta["world_size"], resume.meta["zero_stage"]) == (world, stage):
            return resume.path
        if self.facts.is_main:
            log.warning("checkpoint %s was written by %d rank(s) at ZeRO-%d; resuming on %d at ZeRO-%d through a "
                        "universal checkpoint", resume.path.name, resume.meta["world_size"], resume.meta["zero_stage"],
                        world, stage)
        path = on_rank0_then_shared(self.facts.is_main, lambda: convert_to_universal(resume.path, world, stage))
        # Must be set before the engine exists: DeepSpeed reads it when it builds the optimizer.
        accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
        return path

    def _load(self, resume: ResumePoint, load_from: Path) -> None:
        """Model, optimizer and RNG states through Accelerate; step and data cursor from the metadata."""
        self.runtime.accelerator.load_state(str(load_from))
        if load_from != resume.path:  # loaded through a universal checkpoint
            unshare_optimizer_steps(self.runtime.engine)
        # load_state restores Accelerate's micro-step counter, which places accumulation boundaries;
        # we resume at a boundary, and with another world size the old count would misplace them.
        self.runtime.accelerator.step = 0
        self.state.step = resume.meta["step"]
        self.state.tokens_seen = resume.meta["tokens_seen"]
        self._run_started_at = resume.meta.get("run_started_at", self._run_started_at)
        self._productive_s = resume.meta.get("productive_s", 0.0)
        log.info("resumed from %s at step %d (%d samples consumed)", resume.path, self.state.step,
                 resume.meta["samples_seen"])

    def _log(self, metrics: dict[str, Any]) -> None:
        self.metrics.log(self.state.step, metrics)
        self._unreported.update(metrics)

    def _should_stop(self) -> bool:
        max_tokens = self.cfg.train.max_tokens
        return self.state.step >= self.cfg.train.max_steps or bool(max_tokens and self.state.tokens_seen >= max_tokens)

    def _log_step(self, step_losses: list[torch.Tensor], lr: float, elapsed: float, num_steps: int) -> None:
        accelerator = self.runtime.accelerator
        losses = accelerator.reduce(torch.stack(step_losses), reduction="mean")  # every rank joins
        self.state.losses.extend(float(x) for x in losses)
        step_time = elapsed / max(1, num_steps)
        tokens_per_s = self.resolved.tokens_per_step / step_time
        metrics = {
            "loss": float(losses.mean()),  # mean over the steps since the last log
            "lr": lr,
            "grad_norm": _grad_norm(self.runtime.engine),
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.facts.world_size,
            "tokens_seen": self.state.tokens_seen,
            "goodput": self._productive_s / max(1e-9, time.time() - self._run_started_at),
            **self._peak_memory_gb(),
        }
        if self._peak_flops:
            metrics["mfu"] = self._flops_per_step / step_time / (self._peak_flops * self.facts.world_size)
        self._log(metrics)

    def _peak_memory_gb(self) -> dict[str, object]:
        """Peak memory of every rank (GPU allocator, or the process's peak RSS on CPU): collective."""
        if torch.cuda.is_available():
            local = torch.cuda.max_memory_allocated() / 1e9
        else:
            local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
        gathered = self.runtime.accelerator.gather(torch.tensor([local], device=self.runtime.device)).tolist()
        return {"memory/peak_gb_max": max(gathered), "memory/peak_gb_min": min(gathered),
                "memory/peak_gb_per_rank": gathered}

    def _write_run_files(self, accelerator) -> None:
        if self.facts.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.resolved.deepspeed_config, indent=2))
        accelerator.wait_for_everyone()

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

    def _finish(self) -> None:
        self.clock.done()  # also when stopped before a first step
        self.checkpoints.wait()  # the last checkpoint is committed before anyone calls the run done
        self.runtime.accelerator.wait_for_everyone()
        if self.facts.is_main:
            # A marker the launcher reads: workers' exit codes do not survive torchrun (it exits 1).
            marker = "STOPPED" if self.state.stop_reason else "COMPLETED"
            done = {"step": self.state.step, "tokens_seen": self.state.tokens_seen, "finished_at": time.time(),
                    "stop_reason": self.state.stop_reason}
            (self.run_dir / marker).write_text(json.dumps(done) + "\n")
            if self.state.stop_reason:
                return
            log.info("done: checkpoints in %s, metrics in %s%s", self.run_dir / "checkpoints",
                     self.run_dir / "metrics.jsonl",
                     f", W&B files in {self.metrics.wandb_dir}" if self.metrics.wandb_dir else "")

    def close(self) -> None:
        self.clock.done()
        self.checkpoints.wait()
        if self._owns_signals:
            self.signals.close()
        self.loader.close()
        self.metrics.close()
        self.runtime.accelerator.end_training()


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
