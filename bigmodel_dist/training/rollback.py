"""A rollback: after a streak of bad steps, back to the newest checkpoint saved before it. The good steps after
that checkpoint are redone on the same data; the samples the bad steps read are passed over; the learning
rate is scaled down. Collective: every rank rolls back alike (the verdict comes from all-rank figures)."""

from __future__ import annotations

from bigmodel_dist.core.errors import RunFailedError
from bigmodel_dist.data.sampler import global_index
from bigmodel_dist.training.mixture_state import open_loader, sync_mixture
from bigmodel_dist.training.parts import TrainingParts
from bigmodel_dist.training.resume import load_checkpoint, loadable_copy


def roll_back(parts: TrainingParts) -> None:
    state, cfg = parts.state, parts.resolved.config.resilience
    if state.rollbacks >= cfg.max_rollbacks:
        raise RunFailedError(f"{state.bad_streak} bad steps in a row from step {state.first_bad_step} after "
                             f"{state.rollbacks} rollback(s) (resilience.max_rollbacks): the run keeps diverging; "
                             "lower optim.lr or check the data", on_every_rank=True)
    parts.hooks.before_save(state.step)  # a checkpoint load: the save limit applies
    parts.checkpoints.settle()
    before = state.first_bad_step
    if state.last_rollback_to >= 0 and before <= state.last_rollback_to + 2:
        before = state.last_rollback_to  # diverged again right after the last rollback: go further back
    target = parts.checkpoints.choose_resume("latest", before_step=before)
    if target is None:
        raise RunFailedError(
            f"{state.bad_streak} bad steps in a row from step {state.first_bad_step} and no checkpoint saved "
            f"before step {before} to roll back to; save earlier (checkpoint.every) or check the data and the "
            "learning rate", on_every_rank=True)
    parts.checkpoints.discard_from(target.train_state["step"] + 1)  # the abandoned timeline's saves
    batch = parts.resolved.layout.global_batch_size
    bad = [global_index(state.logical_samples(state.first_bad_step - 1, batch), state.skipped_ranges),
           state.samples_seen]
    bad_step = state.step
    kept = {"run_started_at": state.run_started_at, "skipped_steps": state.skipped_steps,
            "rollbacks": state.rollbacks + 1, "lr_scale": state.lr_scale * cfg.rollback_lr_factor,
            "skipped_ranges": sorted([*state.skipped_ranges, bad]),
            "skipped_samples": state.skipped_samples + bad[1] - bad[0]}
    parts.loader.close()
    batch_change = load_into(parts, target)
    state.load_state_dict(kept)
    state.samples_seen = global_index(state.logical_samples(state.step, batch), state.skipped_ranges)
    state.last_rollback_to = state.step
    sync_mixture(parts.dataset, parts.resolved, state, parts.metrics)
    parts.loader = open_loader(parts.dataset, parts.resolved, parts.facts, state, parts.ledger, parts.window_metrics)
    parts.metrics.incident(bad_step, "rollback", to_step=state.step, lost_steps=bad_step - state.step,
                           skipped_samples=bad, checkpoint=str(target.path), lr_scale=state.lr_scale)
    parts.metrics.mark_restart(state.step, redone_through=bad_step)
    if batch_change:
        parts.metrics.incident(state.step, "batch", **batch_change)


def load_into(parts: TrainingParts, target) -> dict[str, int] | None:
    """Collective: `target` (converted when this layout needs it) into the running engine and state."""
    copy, _ = loadable_copy(target, parts.resolved, parts.facts, parts.runtime.accelerator, parts.hooks,
                            parts.state.step)
    return load_checkpoint(target, copy, parts.runtime, parts.state, parts.metrics, parts.resolved)
