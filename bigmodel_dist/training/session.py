"""The one way a process runs training: resolve the config, build the Trainer, train, close on every exit.

Every entry point (`bigmodel train` under torchrun/srun, the Ray Train worker, the test and benchmark
workers) calls `run_training`, or `open_trainer` when it needs the trainer after training (tests read
the final parameters). Logging is set up by the caller, before it loads the config.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bigmodel_dist.config.schema import Config
from bigmodel_dist.core.distributed import DistributedFacts
from bigmodel_dist.run.resolve import resolve_run

if TYPE_CHECKING:
    from bigmodel_dist.checkpoint.train_state import TrainState
    from bigmodel_dist.ft.preemption import StopSignals
    from bigmodel_dist.metrics.startup import StartupClock
    from bigmodel_dist.training.loop import Trainer
    from bigmodel_dist.training.reporting import StepReporter


@contextmanager
def open_trainer(config: Config, facts: DistributedFacts, reporter: StepReporter | None = None,
                 signals: StopSignals | None = None, clock: StartupClock | None = None,
                 watch_self: bool = False) -> Iterator[Trainer]:
    """A ready Trainer for `config` on this process group; closed (background writes joined, loader
    and W&B stopped, process group left) when the block ends, also by an exception.

    Its progress goes to the node's hang watchdog (`BIGMODEL_PROGRESS_DIR`, set by `launch local`), or,
    with `watch_self` (a Ray worker: no launcher of ours watches it), to a watchdog thread of its own."""
    from bigmodel_dist.ft.faults import faults_from_env
    from bigmodel_dist.ft.progress import ProgressRecorder
    from bigmodel_dist.training.setup import build_trainer

    faults = faults_from_env()  # test-only; refused unless explicitly allowed
    resolved = resolve_run(config, facts.world_size)
    with ExitStack() as watching:
        progress = ProgressRecorder.from_env(facts.rank)
        if watch_self and config.resilience.enabled:
            from bigmodel_dist.ft.watchdog import SelfWatchdog

            folder = Path(watching.enter_context(tempfile.TemporaryDirectory(prefix="bigmodel-progress-")))
            progress = ProgressRecorder(folder, facts.rank)
            watchdog = SelfWatchdog(folder, config.resilience, facts.rank, resolved.run_dir, facts.is_main).start()
            watching.callback(watchdog.stop)
        trainer = build_trainer(resolved, facts, reporter=reporter, stop_signals=signals, clock=clock, faults=faults,
                                progress=progress)
        try:
            yield trainer
        finally:
            trainer.close()


def run_training(config: Config, facts: DistributedFacts, reporter: StepReporter | None = None,
                 signals: StopSignals | None = None, clock: StartupClock | None = None,
                 watch_self: bool = False) -> TrainState:
    """Train `config` to its end (or an agreed stop) and return the final training state."""
    with open_trainer(config, facts, reporter, signals, clock, watch_self) as trainer:
        return trainer.train()
