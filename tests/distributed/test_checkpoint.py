"""Checkpoints never lose work: crashes mid-save, corrupted files, retention, refusals (real DeepSpeed)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import tiny_run
from tests.helpers.commands import TINY_CONFIG, assert_one_line_error, run_cli
from tests.helpers.spawn import run_distributed, run_until_a_rank_dies
from tests.helpers.workers import train_and_collect, train_and_crash

pytestmark = pytest.mark.distributed


def _overrides(tmp_path: Path, data_cache: Path, steps: int, **extra) -> list[str]:
    return [*tiny_run(tmp_path, data_cache), "--name=run",
            "--deepspeed.config=zero2", "--train.eval_every=0", "--checkpoint.every=2", f"--train.max_steps={steps}",
            *[f"--{k}={v}" for k, v in extra.items()]]


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.mark.parametrize(("point", "rank", "resumes_at"), [
    ("shard_write", 1, 2),       # a rank dies writing its optimizer shard
    ("before_commit", 0, 2),     # verified, metadata never written
    ("before_pointer", 0, 4),    # committed by rename; only the `latest` pointer is stale
])
def test_kill_9_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, data_cache, point, rank, resumes_at):
    codes = run_until_a_rank_dies(train_and_crash, 2, _overrides(tmp_path, data_cache, 6), point, rank, 4)
    assert codes[rank] == -9, codes
    run_dir = tmp_path / "run"
    assert 2 in _steps(run_dir)
    result = run_distributed(train_and_collect, 2, _overrides(tmp_path, data_cache, 6))[0]
    assert len(result["losses"]) == 6 - resumes_at  # the steps this process ran after resuming
    assert _steps(run_dir)[-1] == 6
    assert not list((run_dir / "checkpoints").glob(".partial-*"))  # the killed save was cleaned, never used


def test_corrupted_and_truncated_newest_checkpoints_fall_back(tmp_path, data_cache):
    run_distributed(train_and_collect, 2, _overrides(tmp_path, data_cache, 6, **{"checkpoint.keep_last": 5}))
    ckpts = tmp_path / "run" / "checkpoints"
    assert _steps(tmp_path / "run") == [2, 4, 6]
    flipped = max((ckpts / "step_00000006").rglob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    payload = bytearray(flipped.read_bytes())
    payload[len(payload) // 2] ^= 0x01  # one flipped bit
    flipped.write_bytes(bytes(payload))
    truncated = next((ckpts / "step_00000004").rglob("*model_states.pt"))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    result = run_distributed(train_and_collect, 2, _overrides(tmp_path, data_cache, 8, **{"checkpoint.keep_last": 5}))[0]
    assert len(result["losses"]) == 6  # resumed at step 2: steps 3..8
    assert flipped.read_bytes() == bytes(payload)  # bad checkpoints are reported, never rewritten
    assert (ckpts / "step_00000004").is_dir() and (ckpts / "step_00000006").is_dir()


def test_retention_keeps_last_n_and_every_kth(tmp_path, data_cache):
    extra = {"checkpoint.keep_last": 2, "checkpoint.keep_every": 4, "checkpoint.every": 1}
    run_distributed(train_and_collect, 2, _overrides(tmp_path, data_cache, 7, **extra))
    assert _steps(tmp_path / "run") == [4, 6, 7]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000007"


def test_bad_checkpoints_and_mismatched_configs_are_refused(tmp_path, data_cache, cli_env):
    base = ["train", TINY_CONFIG, *tiny_run(tmp_path, data_cache), "--name=run",
            "--train.eval_every=0"]
    first = run_cli([*base, "--train.max_steps=2"], cwd=tmp_path, env=cli_env)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    meta = json.loads((ckpt / "bigmodel_meta.json").read_text())
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "bigmodel_meta.json").write_text(json.dumps({**meta, "format_version": 99}))

    refusals = {  # arguments: what the one error line names (after the start-up it logged)
        (f"--resume={tmp_path}",): (str(tmp_path), "bigmodel_meta.json"),
        ("--resume=none",): ("checkpoint.resume=none", "step_00000002"),
        ("--train.max_steps=4", "--model.vocab_size=1024"): ("step_00000002", "vocab_size"),
        (f"--resume={newer}",): ("format 99", "upgrade"),
    }
    # Independent refusals, each a fresh interpreter: started at once, their start-ups overlap.
    with ThreadPoolExecutor(len(refusals)) as pool:
        results = pool.map(lambda args: run_cli([*base, *args], cwd=tmp_path, env=cli_env), refusals)
        for needles, result in zip(refusals.values(), results):
            assert_one_line_error(result, *needles, after_logs=True)
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before  # nothing touched


def test_async_save_commits_verified_checkpoints_and_resumes_exactly(tmp_path, data_cache):
    straight = run_distributed(train_and_collect, 2, _overrides(tmp_path, data_cache, 8, name="straight"))[0]["losses"]
    extra = {"checkpoint.async_save": "true", "checkpoint.keep_last": 5}
    first = run_distributed(train_and_collect, 2, _overrides(tmp_path, data_cache, 6, **extra))[0]["losses"]
    run_dir = tmp_path / "run"
    assert _steps(run_dir) == [2, 4, 6]  # every background write was committed, the last one before exit
    for step in (2, 4, 6):
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        meta = json.loads((ckpt / "bigmodel_meta.json").read_text())
        assert meta["step"] == step and any(name.endswith("optim_states.pt") for name in meta["files"])
        assert {f"random_states_{r}.pkl" for r in range(2)} <= set(meta["files"])
        for name, info in meta["files"].items():
            assert (ckpt / name).stat().st_size == info["size"]
    second = run_distributed(train_and_collect, 2, _overrides(tmp_path, data_cache, 8, **extra))[0]["losses"]
    assert first + second == straight  # the snapshot held step 6's state, not a later one
