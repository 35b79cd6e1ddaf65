"""Save, choose and load checkpoints: atomic commits, verified resume with fallback, retention.

Every method is collective: all ranks call it in the same order. Rank 0 takes each decision (which
checkpoint, what went wrong) and broadcasts it, so no rank ever waits in a collective the others skipped.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bigmodel_dist.checkpoint.async_writer import BackgroundWriter, wait_for_reports
from bigmodel_dist.checkpoint.choice import ResumeChoice, ResumePoint
from bigmodel_dist.checkpoint.durable_file import write_threads
from bigmodel_dist.checkpoint.integrity import (
    CHECKPOINT_FORMAT_VERSION,
    META_NAME,
    PARTIAL_PREFIX,
    describe_files,
    list_files,
    name_in,
    read_checkpoint_meta,
    step_dir_name,
    step_dirs,
)
from bigmodel_dist.config.schema import CheckpointConfig
from bigmodel_dist.core.distributed import DistributedFacts, broadcast_from_rank0
from bigmodel_dist.core.errors import RunFailedError, UserInputError
from bigmodel_dist.core.fileio import fsync_path, write_error, write_json_atomically, write_text_atomically
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.run.resolve import ResolvedRun

log = logging.getLogger(__name__)

# DeepSpeed's ds_to_universal refuses checkpoints without this client state (see NOTES).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
FAILURE_ADVICE = "free space in (or fix) {dir}, then run again: it resumes from the last committed checkpoint"


class CheckpointManager:
    def __init__(self, run_dir: RunDir, cfg: CheckpointConfig, facts: DistributedFacts):
        self.dir = run_dir.checkpoints
        self.cfg = cfg
        self.facts = facts
        self._writer = BackgroundWriter(facts.rank)
        self.write_threads = write_threads(cfg.write_threads, facts.local_world_size)
        self._pool = ThreadPoolExecutor(self.write_threads, thread_name_prefix="checkpoint-write")
        self._staging_bytes = 0  # host memory of the async staging buffers, as last logged

    def install_engine(self, engine) -> None:
        """Make the DeepSpeed `engine` write through this manager: durable files checksummed as written
        (synchronous saves) or staging buffers written in the background (`checkpoint.async_save`).
        Call it after any load: loading stays DeepSpeed's."""
        from bigmodel_dist.model.engine import replace_checkpoint_engine

        if self.cfg.async_save:
            from bigmodel_dist.checkpoint.snapshot_engine import SnapshotCheckpointEngine

            replace_checkpoint_engine(engine, SnapshotCheckpointEngine)
        else:
            from bigmodel_dist.checkpoint.durable_engine import DurableCheckpointEngine

            replace_checkpoint_engine(engine, lambda config: DurableCheckpointEngine(config, self._pool))

    def due(self, step: int) -> bool:
        """An interval save at this step (`checkpoint.every`); the loop forces one at its last step."""
        return bool(self.cfg.every) and step % self.cfg.every == 0

    # ---- save -------------------------------------------------------------------------------------
    def save(self, accelerator, step: int, train_state: dict[str, Any], run_identity: dict[str, Any],
             write_extra: Callable[[Path], None] | None = None, engine=None) -> Path:
        """Write step `step` into a partial dir, checksum it (ranks share the work), commit by rename.

        The metadata holds `run_identity` (what a resume must match: model, batch shape, ...) at its top
        level and `train_state` as one block. `write_extra(dir)` runs on rank 0 to add small files (the
        tokenizer) before checksumming. `engine` is the DeepSpeed engine (see `install_engine`): files its
        checkpoint engine already checksummed are not read again. With `checkpoint.async_save` the state
        is staged here and written, checksummed and committed by a background thread.
        """
        self.settle()  # never two writes at once: the previous snapshot leaves memory first
        final = self.dir / step_dir_name(step)
        if broadcast_from_rank0(final.is_dir() if self.facts.is_main else None):
            return final  # already committed at this step (e.g. an interval save right before the end)
        partial = self.dir / f"{PARTIAL_PREFIX}{final.name}"
        if self.facts.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(partial), client_state=UNIVERSAL_INFO)
            if self.facts.is_main and write_extra is not None:
                write_extra(partial)
        except (OSError, RuntimeError) as exc:  # torch.save on a full disk raises RuntimeError ("unexpected pos")
            raise self._write_failed(partial, exc) from exc  # one clear error; the others' collectives fail
        accelerator.wait_for_everyone()
        header = {"format_version": CHECKPOINT_FORMAT_VERSION, "step": step, "saved_at": time.time(), **run_identity,
                  "train_state": train_state}
        if self.cfg.async_save:
            self._finish_in_background(engine, partial, final, header)
            return final
        shares = self._describe(partial, self._written_by(engine, partial))
        if self.facts.is_main:
            try:
                self._commit(partial, final, header, {name: info for share in shares for name, info in share.items()})
            except OSError as exc:
                raise self._write_failed(partial, exc) from exc
        accelerator.wait_for_everyone()  # no rank runs ahead of the commit
        return final

    @staticmethod
    def _written_by(engine, partial: Path) -> dict[str, dict]:
        """The files `engine`'s checkpoint engine wrote durably, with their digests, by relative name."""
        take = getattr(getattr(engine, "checkpoint_engine", None), "take_written", None)
        if take is None:  # another engine (DeepSpeed's own, as the benchmark swaps in): checksummed after
            return {}
        return {name_in(partial, path): digest.as_meta() for path, digest in take().items()}

    def _describe(self, partial: Path, written: dict[str, dict]) -> list[dict[str, dict]]:
        """Every rank's share of the checkpoint's file descriptions: the files it wrote durably, and a
        round-robin share of the others (small ones: RNG states, tokenizer), fsynced and checksummed now."""
        written_names: list[list[str]] = [[] for _ in range(self.facts.world_size)]
        dist.all_gather_object(written_names, sorted(written))
        done = {name for names in written_names for name in names}
        rest = broadcast_from_rank0([f for f in list_files(partial) if f not in done] if self.facts.is_main else None)
        mine = {**written, **describe_files(partial, rest[self.facts.rank :: self.facts.world_size])}
        shares: list[dict] = [{} for _ in range(self.facts.world_size)]
        dist.all_gather_object(shares, mine)
        return shares

    def _finish_in_background(self, engine, partial: Path, final: Path, header: dict[str, Any]) -> None:
        rank, world = self.facts.rank, self.facts.world_size
        # Files written synchronously (RNG states, tokenizer, DeepSpeed's scripts): rank 0 reports
        # everything already there, other ranks their own RNG state.
        present = list_files(partial)
        sync_files = present if self.facts.is_main else [f for f in present if f == f"random_states_{rank}.pkl"]
        staging = engine.checkpoint_engine.staging_bytes
        if staging != self._staging_bytes:  # the first async save, or the state's shapes changed
            log.info("async checkpoints: %.2f GB of host memory stage this rank's state (reused by every save)",
                     staging / 1e9)
            self._staging_bytes = staging

        def commit(abort: threading.Event) -> None:
            described = wait_for_reports(partial, world, abort)
            if described is None:
                log.warning("checkpoint %s: left uncommitted (a rank's write failed or the run ended)", partial.name)
                return
            self._commit(partial, final, header, described)

        self._writer.write_in_background(engine.checkpoint_engine.take_pending(), partial, sync_files, self._pool,
                                         then=commit if self.facts.is_main else None)

    def _commit(self, partial: Path, final: Path, header: dict[str, Any], described: dict[str, dict]) -> None:
        """Rank 0: metadata last, then the atomic rename, then the `latest` pointer, then retention."""
        write_json_atomically(partial / META_NAME, {**header, "files": dict(sorted(described.items()))})
        for folder in sorted({(partial / name).parent for name in described}, reverse=True):
            fsync_path(folder)  # the entries of files in sub-folders (DeepSpeed's tag folder) are durable too
        fsync_path(partial)
        os.rename(partial, final)
        fsync_path(self.dir)
        write_text_atomically(self.dir / "latest", final.name + "\n")
        self._apply_retention()
        log.info("committed checkpoint %s", final)

    def _write_failed(self, partial: Path, exc: Exception) -> RunFailedError:
        return RunFailedError(f"rank {self.facts.rank}: writing checkpoint {partial} failed: "
                              f"{write_error(partial, exc)}; {FAILURE_ADVICE.format(dir=self.dir)}")

    def local_failure(self) -> bool:
        """Whether this rank's background write (or rank 0's commit) has failed: cheap, no collective."""
        return self._writer.failure is not None

    def settle(self) -> None:
        """Collective: every rank's background write finished and rank 0's commit done, or, if any rank's
        write failed, `RunFailedError` on every rank naming it. A no-op for synchronous saves."""
        if not self.cfg.async_save:
            return
        self._writer.wait_written()
        failures: list[str | None] = [None] * self.facts.world_size
        dist.all_gather_object(failures, self._writer.failure)
        failure = next((f for f in failures if f), None)
        if failure is None:
            self._writer.join()  # every report is there: rank 0's commit ends
            failure = broadcast_from_rank0(self._writer.failure if self.facts.is_main else None)
        if failure is not None:
            self.close()
            raise RunFailedError(f"{failure}; {FAILURE_ADVICE.format(dir=self.dir)}", on_every_rank=True)

    def discard_from(self, step: int) -> None:
        """Collective: delete every committed checkpoint of step >= `step` (a rollback abandons them: they
        must never win a later resume) and point `latest` at the newest one left."""
        if self.facts.is_main:
            for path in step_dirs(self.dir):
                if int(path.name.split("_")[-1]) >= step:
                    shutil.rmtree(path)
                    log.warning("rollback: deleted %s, saved after the checkpoint rolled back to", path.name)
            remaining = step_dirs(self.dir)
            if remaining:
                write_text_atomically(self.dir / "latest", remaining[0].name + "\n")
        dist.barrier()

    def close(self) -> None:
        """Leave no thread behind (not collective: also on an error path); an unfinished commit is
        abandoned and its partial directory never chosen."""
        self._writer.abort()
        self._writer.join()
        self._pool.shutdown(wait=True)

    def _apply_retention(self) -> None:
        keep_every = self.cfg.keep_every
        for index, path in enumerate(step_dirs(self.dir)):
            step = int(path.name.split("_")[-1])
            if index >= self.cfg.keep_last and not (keep_every and step % keep_every == 0):
                shutil.rmtree(path)
                log.info("retention: deleted %s (keep_last=%d, keep_every=%d)", path.name, self.cfg.keep_last, keep_every)
        for stale in self.dir.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ---- choose -----------------------------------------------------------------------------------
    def choose_resume(self, resume: str, before_step: int | None = None) -> ResumePoint | None:
        """The checkpoint to resume from, verified by all ranks; newest good one for `latest` (of those
        saved before `before_step` when given: a rollback's target)."""
        return self.start_choosing(resume, before_step).result()

    def start_choosing(self, resume: str, before_step: int | None = None) -> ResumeChoice:
        """Collective: the choice of `choose_resume`, its checksums still being checked in the background
        (see `checkpoint/choice.py`): `.candidate` at once, `.result()` verified."""
        if resume == "none":
            existing = broadcast_from_rank0([p.name for p in step_dirs(self.dir)] if self.facts.is_main else None)
            if existing:
                raise UserInputError(f"checkpoint.resume=none but {self.dir} holds {existing[0]}; use a new run name "
                                     "or resume (checkpoint.resume=latest) - existing checkpoints are never overwritten")
            return ResumeChoice([], False, self.facts, self._pool)
        explicit = resume != "latest"
        candidates = [Path(resume)] if explicit else step_dirs(self.dir)
        if before_step is not None:
            candidates = [p for p in candidates if int(p.name.split("_")[-1]) < before_step]
        names = broadcast_from_rank0([str(p) for p in candidates] if self.facts.is_main else None)
        return ResumeChoice([Path(name) for name in names], explicit, self.facts, self._pool)


def check_resumable(resume: ResumePoint, resolved: ResolvedRun) -> None:
    """The checkpoint must be of this model and sequence length (the data cursor counts sequences). The
    global batch size may change (a ramp-up): the run goes on from the same sample."""
    meta, cfg = resume.meta, resolved.config
    wanted = {"model": {"preset": cfg.model.preset, "vocab_size": resolved.shape.vocab_size,
                        "num_parameters": resolved.num_parameters},
              "seq_len": cfg.data.seq_len}
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise UserInputError(f"checkpoint {resume.path}: written with {key}={meta.get(key)}, the config has {value}; "
                                 "use the checkpoint's settings or a new run name")


def requested_resume(resume: str, run_dir: RunDir) -> ResumePoint | None:
    """A quick look (no checksums) at the checkpoint `checkpoint.resume` names: the newest of the run dir
    (`latest`), a path, or none."""
    if resume == "none":
        return None
    if resume == "latest":
        return newest_committed(run_dir)
    meta, _ = read_checkpoint_meta(Path(resume))
    return ResumePoint(Path(resume), meta) if meta is not None else None


def newest_committed(run_dir: RunDir) -> ResumePoint | None:
    """The newest step directory with readable metadata (no checksums: a quick look, e.g. pre-flight)."""
    for path in step_dirs(run_dir.checkpoints):
        meta, _ = read_checkpoint_meta(path)
        if meta is not None:
            return ResumePoint(path, meta)
    return None
