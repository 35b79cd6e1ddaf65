"""torchrun, as `launch local` runs it: the same launcher, with a failed worker summed up in one line.

torchrun answers a worker's non-zero exit with its own traceback and a failure table; the worker has
already printed its error (`bigmodel: error: ...`), so here that becomes one line naming the ranks.
A TERM that reaches torchrun itself (Slurm signals every process of a step on `scancel`, a preemption
or a requeue) makes it stop its workers, which save; its traceback for that becomes one line too.
"""

from __future__ import annotations

import sys

from bigmodel_dist.core.errors import EXIT_RUN_FAILED


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        exits = ", ".join(f"rank {rank} exited {failure.exitcode}" for rank, failure in sorted(exc.failures.items()))
        print(f"torchrun: workers failed: {exits} (their errors are above)", file=sys.stderr)
        return EXIT_RUN_FAILED
    except SignalException as exc:  # the workers were sent the same signal on the way out, and saved
        print(f"torchrun: got {exc.sigval.name}; its workers were asked to stop", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
