"""When a run ends and at what learning rate: the lr schedule, `train.max_tokens`, the job's time limit.

The schedule is checked as a function and as a real two-rank run logs it (the same run checks the token
budget); the time limit through `bigmodel train` (a process group of one), whose clock the test moves
past the end time once training is under way: an event, not a wait tuned to the machine.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from bigmodel_dist.checkpoint.integrity import DS_TAG
from bigmodel_dist.config.schema import OptimConfig
from bigmodel_dist.metrics.jsonl import read_metrics
from bigmodel_dist.training.lr_schedule import lr_at
from tests.conftest import tiny_run
from tests.helpers.commands import TINY_CONFIG, cli_command
from tests.helpers.launching import Launch, losses, wait_for_step

TOKENS_PER_STEP = 8 * 128  # TINY: global batch 8 x seq_len 128, on any number of ranks
OPTIM = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4)
MAX_STEPS = 20


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def _optimizer_lrs(checkpoint: Path) -> list[float]:
    """The lr of every parameter group in every rank's ZeRO optimizer shard (DeepSpeed's layout)."""
    import torch

    lrs = []
    for shard in sorted((checkpoint / DS_TAG).glob("*optim_states.pt")):
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        lrs += [group["lr"] for group in state["base_optimizer_state"]["param_groups"]]
    return lrs


def test_warmup_rises_linearly_from_the_first_step_to_the_peak():
    warmup = [lr_at(step, OPTIM, MAX_STEPS) for step in range(OPTIM.warmup_steps)]
    assert warmup == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # step 0 already trains (lr / warmup_steps)
    assert lr_at(OPTIM.warmup_steps, OPTIM, MAX_STEPS) == pytest.approx(OPTIM.lr)  # the cosine starts at the peak


def test_cosine_decays_monotonically_to_min_lr_at_max_steps():
    decay = [lr_at(step, OPTIM, MAX_STEPS) for step in range(OPTIM.warmup_steps, MAX_STEPS + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:])), decay
    halfway = OPTIM.warmup_steps + (MAX_STEPS - OPTIM.warmup_steps) // 2
    assert lr_at(halfway, OPTIM, MAX_STEPS) == pytest.approx((OPTIM.lr + OPTIM.min_lr) / 2)
    assert lr_at(MAX_STEPS, OPTIM, MAX_STEPS) == pytest.approx(OPTIM.min_lr)
    assert lr_at(MAX_STEPS + 7, OPTIM, MAX_STEPS) == pytest.approx(OPTIM.min_lr)  # held past the end
    assert min(decay) >= OPTIM.min_lr and max(decay) <= OPTIM.lr


def test_no_warmup_starts_at_the_peak_and_min_lr_equal_to_lr_is_constant():
    assert lr_at(0, OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0), MAX_STEPS) == pytest.approx(1e-3)
    flat = OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=2)
    assert [lr_at(step, flat, MAX_STEPS) for step in range(2, MAX_STEPS + 1)] == pytest.approx([1e-3] * (MAX_STEPS - 1))


@pytest.mark.distributed
def test_max_tokens_ends_the_run_at_the_first_step_past_it_with_the_scheduled_lr(tmp_path, data_cache):
    """Two ranks, 10 steps allowed but a budget of 5 steps' tokens + 1: step 6 is the first to reach it,
    and is the run's last step, final checkpoint and COMPLETED step. Every step logs the lr of lr_at, and
    the optimizer itself holds it (the saved shards of both ranks)."""
    from tests.helpers.spawn import run_distributed
    from tests.helpers.workers import train_and_collect

    max_steps, warmup = 10, 3
    overrides = [*tiny_run(tmp_path, data_cache), "--name=budget",
                 "--deepspeed.config=zero2", "--train.eval_every=0", "--checkpoint.every=0",
                 f"--train.max_steps={max_steps}", f"--train.max_tokens={5 * TOKENS_PER_STEP + 1}",
                 "--optim.lr=1e-3", "--optim.min_lr=1e-4", f"--optim.warmup_steps={warmup}"]
    run_distributed(train_and_collect, 2, overrides)
    run_dir = tmp_path / "budget"
    history = read_metrics(run_dir / "metrics.jsonl")
    steps, tokens = history.series("tokens_seen")
    assert steps == [1, 2, 3, 4, 5, 6] and tokens == [step * TOKENS_PER_STEP for step in steps]
    assert history.series("loss")[0] == steps
    completed = json.loads((run_dir / "COMPLETED").read_text())
    assert (completed["step"], completed["tokens_seen"], completed["stop_reason"]) == (6, 6 * TOKENS_PER_STEP, None)
    assert not (run_dir / "STOPPED").exists()
    assert _checkpoints(run_dir) == ["step_00000006"]  # checkpoint.every=0: the final save only
    assert json.loads((run_dir / "checkpoints" / "step_00000006" / "bigmodel_meta.json").read_text())["step"] == 6

    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warmup)
    lr_steps, logged = history.series("lr")
    assert lr_steps == steps  # train.log_every=1: the lr of every step
    assert logged == pytest.approx([lr_at(step - 1, optim, max_steps) for step in steps], rel=1e-12)
    assert logged[:warmup] == sorted(logged[:warmup]) and logged[warmup - 1:] == sorted(logged[warmup - 1:], reverse=True)
    applied = _optimizer_lrs(run_dir / "checkpoints" / "step_00000006")
    assert len(applied) == 4 and applied == pytest.approx([lr_at(5, optim, max_steps)] * 4)  # 2 ranks x 2 groups


# Loaded by every interpreter started with this folder on PYTHONPATH: time.time() runs a day ahead once
# the test creates the file, as if the job's wall clock had reached its end time.
CLOCK = '''
import os
import time

_real_time = time.time


def _time():
    return _real_time() + (86400.0 if os.path.exists({jump!r}) else 0.0)


time.time = _time
'''


def _with_clock(tmp_path: Path, env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """An environment whose processes' clocks jump a day ahead when the returned path is created."""
    folder = tmp_path / "clock"
    folder.mkdir()
    jump = tmp_path / "clock-jumped"
    (folder / "sitecustomize.py").write_text(CLOCK.format(jump=str(jump)))
    path = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path}, jump


@pytest.mark.distributed
def test_the_time_limit_stops_with_a_checkpoint_and_the_requeue_code(tmp_path, data_cache, cli_env):
    """Training until the end time minus the margin: one checkpoint at the stop step, the STOPPED marker
    naming the time limit, the configured requeue code. Requeued with less than the margin left, the
    run stops before its first step and saves nothing new."""
    requeue = 75  # not the default 85: the configured code is the one used
    max_steps = 200  # far more than the steps between the clock's jump and the stop
    run_dir = tmp_path / "late"
    base = ["train", TINY_CONFIG, *tiny_run(tmp_path, data_cache), "--name=late",
            "--train.eval_every=0", "--checkpoint.every=0", f"--train.max_steps={max_steps}",
            "--checkpoint.time_limit_margin_s=600", f"--checkpoint.requeue_exit_code={requeue}"]
    env, jump = _with_clock(tmp_path, cli_env)
    launch = Launch(cli_command([*base, f"--checkpoint.end_time={time.time() + 3600}"]), env)
    wait_for_step(launch, run_dir / "metrics.jsonl", 2)
    jump.touch()  # the job's clock passes end_time - margin
    assert launch.finish() == requeue, launch.output[-4000:]
    assert "stopping for time limit" in launch.output and "Traceback" not in launch.output
    stopped = json.loads((run_dir / "STOPPED").read_text())
    stop_step = stopped["step"]
    assert stopped["stop_reason"] == "time limit" and 2 <= stop_step < max_steps, stopped
    assert stopped["tokens_seen"] == stop_step * TOKENS_PER_STEP and not (run_dir / "COMPLETED").exists()
    stop_checkpoint = run_dir / "checkpoints" / f"step_{stop_step:08d}"
    assert _checkpoints(run_dir) == [stop_checkpoint.name]  # checkpoint.every=0: the stop's save only
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == stop_checkpoint.name
    assert json.loads((stop_checkpoint / "bigmodel_meta.json").read_text())["step"] == stop_step
    assert sorted(losses(run_dir)) == list(range(1, stop_step + 1))

    # Requeued with 540 s left, under the 600 s margin (the real clock, no jump): due before any step.
    again = Launch(cli_command([*base, f"--checkpoint.end_time={time.time() + 540}"]), cli_env)
    assert again.finish() == requeue, again.output[-4000:]
    assert f"resumed from {stop_checkpoint} at step {stop_step}" in again.output and "Traceback" not in again.output
    restopped = json.loads((run_dir / "STOPPED").read_text())
    assert (restopped["step"], restopped["stop_reason"]) == (stop_step, "time limit")
    assert _checkpoints(run_dir) == [stop_checkpoint.name]  # nothing new to save
    assert sorted(losses(run_dir)) == list(range(1, stop_step + 1))
