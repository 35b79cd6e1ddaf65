"""`bigmodel plot RUN_DIR`: loss, eval loss, tokens/s and lr over steps from metrics.jsonl, as one PNG.

Restarts are drawn as vertical lines at the step each resumed from; incidents (hangs, bad nodes,
stragglers, skipped steps, rollbacks) as markers at their step on the loss panel, one colour per kind.
The curves are the deduplicated history (steps redone after a resume appear once, from the run that
counted).
"""

from __future__ import annotations

import logging
from pathlib import Path

from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.metrics.jsonl import read_metrics

log = logging.getLogger(__name__)

PANELS = (("loss", "eval/loss", "loss"), ("tokens_per_s", None, "tokens/s"), ("lr", None, "learning rate"))
INCIDENT_STYLE = {"hang": ("X", "black"), "bad_node": ("s", "purple"), "straggler": ("v", "orange"),
                  "skip": ("x", "red"), "rollback": ("<", "darkred"), "mixture": ("d", "teal"),
                  "resize": ("^", "green")}


def plot_run(run_dir: RunDir, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    history = read_metrics(run_dir.metrics)
    if history.bad_lines:
        log.warning("%s: skipped %d unreadable line(s)", run_dir.metrics, history.bad_lines)
    if not history.series("loss")[0]:
        raise UserInputError(f"{run_dir.metrics}: no training steps logged yet; plot a run that has trained")
    out = out or run_dir.plot
    figure, axes = plt.subplots(len(PANELS), 1, figsize=(9, 8), sharex=True)
    for axis, (key, second, label) in zip(axes, PANELS):
        steps, values = history.series(key)
        axis.plot(steps, values, label=key, linewidth=1.2)
        if second:
            eval_steps, eval_values = history.series(second)
            axis.plot(eval_steps, eval_values, "o-", label=second, markersize=4)
        for restart in history.restarts:
            axis.axvline(restart["step"], color="red", linestyle="--", linewidth=0.8)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    if history.restarts:
        axes[0].plot([], [], "r--", label="restart (resumed from)")
    _mark_incidents(axes[0], history.incidents)
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("step")
    figure.suptitle(f"{run_dir.name}: {history.last_step()} steps, {len(history.restarts)} restart(s), "
                    f"{len(history.incidents)} incident(s)")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _mark_incidents(axis, incidents: list[dict]) -> None:
    """One marker per incident at the bottom of the panel, labelled once per kind."""
    bottom = axis.get_ylim()[0]
    for kind, (marker, colour) in INCIDENT_STYLE.items():
        steps = [i["step"] for i in incidents if i["event"] == kind]
        if steps:
            axis.plot(steps, [bottom] * len(steps), marker, color=colour, markersize=8, linestyle="none",
                      label=f"{kind} ({len(steps)})", clip_on=False)
