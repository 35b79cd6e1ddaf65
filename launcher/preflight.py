"""What every launcher does with a run's inputs before it starts processes: `--resume` as an override,
and the run's data prepared in this process.

`bigmodel` (launcher/cli.py), `launch local` and the Ray job share these, so no launcher imports
another's command module. Light to import: `bigmodel --help` loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bigmodel_dist.run.resolve import ResolvedRun


def resume_override(args: argparse.Namespace) -> list[str]:
    """`--resume X` is shorthand for `--checkpoint.resume=X`."""
    return [f"--checkpoint.resume={args.resume}"] if getattr(args, "resume", None) else []


def prepare_for(resolved: ResolvedRun) -> list[tuple[str, Path]]:
    """Prepare the run's data in this process (progress bar here, errors before any process group), and
    check its shards: a damaged shard of a derived folder is rebuilt here, one of an explicit
    `data.prepared_dir` refused in one line. (source name, prepared folder) of every source."""
    from bigmodel_dist.data.mixture_sources import prepare_run_sources

    cfg = resolved.config
    prepared = prepare_run_sources(cfg, resolved.shape.vocab_size)
    if _remove_damaged_shards(prepared, cfg.data.verify, explicit=cfg.data.prepared_dir):
        prepared = prepare_run_sources(cfg, resolved.shape.vocab_size)  # writes the removed shards again
    return prepared


def _remove_damaged_shards(prepared: list[tuple[str, Path]], verify: str, explicit: str | None) -> bool:
    import logging

    from bigmodel_dist.core.errors import UserInputError
    from bigmodel_dist.data.dataset import damaged_shards

    removed = False
    for _, folder in prepared:
        damaged = damaged_shards(folder, verify)
        if damaged and explicit:  # prepared elsewhere, perhaps from sources this machine lacks: not ours to redo
            raise UserInputError(damaged[0][1])
        for info, problem in damaged:
            logging.getLogger(__name__).warning("%s: rebuilding it", problem.split("; ")[0])
            for name in (info["file"], Path(info["file"]).with_suffix(".json").name):
                (folder / name).unlink(missing_ok=True)
            (folder / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until the shard is back
            removed = True
    return removed


def check_previous_run(resolved: ResolvedRun) -> tuple[ResolvedRun, str | None]:
    """Before any process starts, against the checkpoint the run resumes from: it must be of this model
    and sequence length, and of this corpus unless the run accepts a change (one line otherwise); the data is then
    the checkpoint's tokenizer's (the returned run). A run that already reached its end says so (the
    returned line) instead of starting processes that would only find nothing to do."""
    import dataclasses

    from bigmodel_dist.checkpoint.manager import check_resumable, requested_resume
    from bigmodel_dist.data.continuity import continue_data

    cfg = resolved.config
    previous = requested_resume(cfg.checkpoint.resume, resolved.run_dir)
    if previous is None:
        return resolved, None
    check_resumable(previous, resolved)
    pinned, _ = continue_data(cfg, previous)
    resolved = dataclasses.replace(resolved, config=pinned)
    if cfg.checkpoint.resume != "latest":
        return resolved, None  # a path names its own checkpoint, of another run
    state = previous.train_state
    step, tokens = int(state.get("step", 0)), int(state.get("tokens_seen", 0))
    max_tokens = cfg.train.max_tokens
    if step < cfg.train.max_steps and not (max_tokens and tokens >= max_tokens):
        return resolved, None
    reached = f"train.max_steps={cfg.train.max_steps}" if step >= cfg.train.max_steps else \
        f"train.max_tokens={max_tokens}"
    return resolved, (f"run {cfg.name} is already complete: {previous.path} is at step {step} ({reached}); nothing "
                      "to do. Raise --train.max_steps to train on from there, or start a new run with --name or "
                      "--output_dir")
