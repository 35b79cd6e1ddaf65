"""End to end: `bigmodel launch local` and `accelerate launch` run the one trainer with 2 processes."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from bigmodel_dist.checkpoint.integrity import DS_TAG
from tests.conftest import REPO
from tests.helpers.commands import TINY_CONFIG, run_cli, run_command

pytestmark = pytest.mark.distributed

def _check_run_dir(run_dir, steps: int, stage: int) -> list[dict]:
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == steps
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 8
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
    meta = json.loads((ckpt / "bigmodel_meta.json").read_text())
    assert meta["step"] == steps and meta["train_state"]["samples_seen"] == steps * 8 and meta["zero_stage"] == stage
    assert meta["world_size"] == 2 and {"random_states_0.pkl", "random_states_1.pkl"} <= set(meta["files"])
    assert set(meta["files"]) == {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {"bigmodel_meta.json"}
    assert len(list((ckpt / DS_TAG).glob("*model_states.pt"))) == (2 if stage == 3 else 1)  # ZeRO-3: one per rank
    assert len(list((ckpt / DS_TAG).glob("*optim_states.pt"))) == (2 if stage > 0 else 1)
    assert json.loads((run_dir / "COMPLETED").read_text())["step"] == steps
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records


def test_launch_local_two_processes(tmp_path, tiny_overrides, cli_env):
    result = run_cli(["launch", "local", TINY_CONFIG, "--nproc-per-node=2", *tiny_overrides, "--train.max_steps=6",
                      "--train.eval_every=3", "--checkpoint.every=3", "--logging.wandb_mode=offline", "--name=local"],
                     env=cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "local"
    records = _check_run_dir(run_dir, steps=6, stage=2)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train)
    assert [r["step"] for r in records if "eval/loss" in r] == [3, 6]
    assert (run_dir / "checkpoints" / "step_00000003").is_dir()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"
    # two processes, one process group: torchrun started 2, both joined; rank 0 reports, rank 1 only warns
    log = result.stderr.splitlines()
    assert any("launching 2 process(es) on this node" in line for line in log)
    for news in ("process group ready: 2 rank(s)", "done: checkpoints in"):
        assert any("[rank 0/2] INFO " in line and news in line for line in log), news
    rank1_progress = [line for line in log if "[rank 1/2] INFO " in line]
    assert not rank1_progress, rank1_progress[:5]


def test_accelerate_launch_runs_the_same_trainer(tmp_path, tiny_overrides, cli_env):
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs" / "accelerate" / "zero3.yaml"), "-m", "launcher.cli", "train", TINY_CONFIG]
    result = run_command([*accelerate, *tiny_overrides, "--train.max_steps=3", "--train.eval_every=0", "--name=acc"],
                         env=cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run_dir(tmp_path / "acc", steps=3, stage=3)
