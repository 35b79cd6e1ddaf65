"""The one way a process runs training: resolve the config, build the Trainer, train, close on every exit.

Every entry point (`bigmodel train` under torchrun/srun, the Ray Train worker, the test and benchmark
workers) calls `run_training`, or `open_trainer` when it needs the trainer after training (tests read
the final parameters). Logging is set up by the caller, before it loads the config.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from bigmodel_dist.config.schema import Config
from bigmodel_dist.config.validate import resolve_run
from bigmodel_dist.distributed import DistributedFacts

if TYPE_CHECKING:
    from bigmodel_dist.preemption import StopSignals
    from bigmodel_dist.startup import StartupClock
    from bigmodel_dist.train_state import TrainState
    from bigmodel_dist.trainer import StepReporter, Trainer


@contextmanager
def open_trainer(config: Config, facts: DistributedFacts, reporter: StepReporter | None = None,
                 signals: StopSignals | None = None, clock: StartupClock | None = None) -> Iterator[Trainer]:
    """A ready Trainer for `config` on this process group; closed (background writes joined, loader
    and W&B stopped, process group left) when the block ends, also by an exception."""
    from bigmodel_dist.faults import faults_from_env
    from bigmodel_dist.progress import ProgressRecorder
    from bigmodel_dist.trainer import Trainer

    faults = faults_from_env()  # test-only; refused unless explicitly allowed
    trainer = Trainer(resolve_run(config, facts.world_size), facts, reporter=reporter, stop_signals=signals,
                      clock=clock, faults=faults, progress=ProgressRecorder.from_env(facts.rank))
    try:
        yield trainer
    finally:
        trainer.close()


def run_training(config: Config, facts: DistributedFacts, reporter: StepReporter | None = None,
                 signals: StopSignals | None = None, clock: StartupClock | None = None) -> TrainState:
    """Train `config` to its end (or an agreed stop) and return the final training state."""
    with open_trainer(config, facts, reporter, signals, clock) as trainer:
        return trainer.train()
