"""A global batch size changed on resume (a ramp-up, as many pretraining recipes do) is a recorded change:
the run goes on from the very sample it stopped at with the new batch, none repeated or skipped, and
the change is a `batch` incident in the metrics (and W&B)."""

from __future__ import annotations

import json

import pytest

from bigmodel_dist.core.env import SAMPLE_LEDGER
from bigmodel_dist.data.ledger import samples_by_step
from bigmodel_dist.metrics.jsonl import read_metrics
from tests.conftest import tiny_run
from tests.helpers.spawn import run_distributed
from tests.helpers.workers import train_and_collect

pytestmark = pytest.mark.distributed


def test_a_larger_batch_on_resume_goes_on_from_the_same_sample(tmp_path, data_cache, monkeypatch):
    monkeypatch.setenv(SAMPLE_LEDGER, str(tmp_path / "ledger"))  # every rank's samples, per step
    base = [*tiny_run(tmp_path, data_cache), "--name=ramp",
            "--train.eval_every=0", "--checkpoint.every=3", "--train.precision=fp32"]
    run_distributed(train_and_collect, 2, [*base, "--train.max_steps=3"])  # 8 sequences a step
    second = run_distributed(train_and_collect, 2, [*base, "--train.max_steps=5", "--train.global_batch_size=16"])[0]
    assert len(second["losses"]) == 2  # resumed at step 3

    counted = samples_by_step(tmp_path / "ledger")
    assert [counted[step] for step in sorted(counted)] == [
        list(range(0, 8)), list(range(8, 16)), list(range(16, 24)), list(range(24, 40)), list(range(40, 56))]
    run_dir = tmp_path / "ramp"
    meta = json.loads((run_dir / "checkpoints" / "step_00000005" / "bigmodel_meta.json").read_text())
    assert meta["global_batch_size"] == 16 and meta["train_state"]["samples_seen"] == 56
    assert meta["train_state"]["batch_origin"] == [3, 24]
    changes = [i for i in read_metrics(run_dir / "metrics.jsonl").incidents if i["event"] == "batch"]
    assert [(c["step"], c["old_batch"], c["new_batch"], c["at_sample"]) for c in changes] == [(3, 8, 16, 24)]
