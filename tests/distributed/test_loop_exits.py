"""Every way out of the training loop keeps what the steps did: a stop between two log points still logs
those steps' loss and counts their time as productive (goodput)."""

from __future__ import annotations

import json

from bigmodel_dist.checkpoint.integrity import read_checkpoint_meta, step_dir_name
from bigmodel_dist.core.env import STOP_FILE
from bigmodel_dist.metrics.jsonl import read_metrics
from tests.conftest import TINY
from tests.helpers.commands import TINY_CONFIG, cli_command
from tests.helpers.launching import Launch
from tests.helpers.waiting import wait_until


def test_a_stop_between_log_points_logs_and_times_the_steps_since_the_last_one(tmp_path, data_cache, cli_env):
    stop_file = tmp_path / "stop"
    run_dir = tmp_path / "run"
    first_save = run_dir / "checkpoints" / step_dir_name(2)
    # log_every is far beyond the run: the only loss record can come from the stop itself.
    launch = Launch(cli_command(["train", TINY_CONFIG, *TINY, f"--output_dir={tmp_path}", "--name=run",
                                 f"--data.cache_dir={data_cache}", "--train.log_every=1000", "--train.max_steps=200",
                                 "--checkpoint.every=2", "--train.eval_every=0"]),
                    env={**cli_env, STOP_FILE: str(stop_file)})
    wait_until(first_save.is_dir, "its step-2 checkpoint", alive=[launch])
    stop_file.touch()  # what `launch local` does when the job is told to stop
    assert launch.finish() == 0, launch.output[-4000:]  # under a launcher's stop file: 0, the launcher requeues

    stopped = json.loads((run_dir / "STOPPED").read_text())
    stop_step = stopped["step"]
    assert stopped["stop_reason"] == "signal" and 2 < stop_step < 200
    records = [r for r in read_metrics(run_dir / "metrics.jsonl").records if "loss" in r]
    assert [r["step"] for r in records] == [stop_step]  # one flush at the stop, none lost
    assert records[0]["goodput"] > 0 and records[0]["tokens_seen"] == stop_step * 8 * 128
    # The productive time of those steps is in the checkpoint, so goodput after a resume counts them.
    meta, problem = read_checkpoint_meta(run_dir / "checkpoints" / step_dir_name(stop_step))
    assert problem is None
    train_state = meta["train_state"]
    assert train_state["step"] == stop_step and train_state["samples_seen"] == stop_step * 8
    assert train_state["productive_s"] > 0
