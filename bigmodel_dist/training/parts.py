"""What a training run is made of once set up: the components the loop drives, built by `setup.py`."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from bigmodel_dist.checkpoint.manager import CheckpointManager
from bigmodel_dist.checkpoint.train_state import TrainState
from bigmodel_dist.core.distributed import DistributedFacts
from bigmodel_dist.data.batch_loader import BatchLoader
from bigmodel_dist.data.dataset import MixedDataset, PackedDataset
from bigmodel_dist.data.ledger import SampleLedger
from bigmodel_dist.ft.preemption import StopController
from bigmodel_dist.metrics.logger import MetricsLogger
from bigmodel_dist.metrics.startup import StartupClock
from bigmodel_dist.model.engine import Runtime
from bigmodel_dist.run.resolve import ResolvedRun
from bigmodel_dist.training.evaluation import Evaluator
from bigmodel_dist.training.hooks import LoopHooks
from bigmodel_dist.training.reporting import StepLog
from bigmodel_dist.training.step_guard import StepGuard
from bigmodel_dist.training.window_metrics import WindowMetrics


@dataclass
class TrainingParts:
    resolved: ResolvedRun  # its config: the resumed run's data pinned (`data/continuity.py`)
    facts: DistributedFacts
    hooks: LoopHooks
    clock: StartupClock
    state: TrainState
    metrics: MetricsLogger
    step_log: StepLog
    ledger: SampleLedger
    dataset: PackedDataset | MixedDataset
    tokenizer: Any
    checkpoints: CheckpointManager
    runtime: Runtime
    guard: StepGuard
    stopper: StopController
    window_metrics: WindowMetrics
    evaluator: Evaluator
    loader: BatchLoader  # replaced by a rollback
    identity: dict[str, Any]  # what every checkpoint records about the run (`resume.run_identity`)
    resources: ExitStack = field(default_factory=ExitStack)  # closed by `Trainer.close`
