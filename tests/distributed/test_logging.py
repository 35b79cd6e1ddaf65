"""Logging that survives restarts and never stops training: W&B (offline, resumed, unreachable),
metrics.jsonl deduplication, secrets, plots. Real DeepSpeed training (CPU, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigmodel_dist.metrics.jsonl import read_metrics
from tests.conftest import tiny_run
from tests.helpers.commands import TINY_CONFIG, run_cli
from tests.helpers.spawn import run_distributed, run_until_a_rank_dies
from tests.helpers.workers import train_and_collect, train_and_crash

pytestmark = pytest.mark.distributed


def _overrides(tmp_path: Path, data_cache: Path, steps: int, *extra: str) -> list[str]:
    return [*tiny_run(tmp_path, data_cache), "--name=run", "--train.eval_every=4",
            "--checkpoint.every=3", f"--train.max_steps={steps}", "--logging.wandb_mode=offline", *extra]


def _wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_kill_and_resume_continue_one_wandb_run_and_one_metrics_history(tmp_path, data_cache, cli_env):
    run_dir = tmp_path / "run"
    codes = run_until_a_rank_dies(train_and_crash, 2, _overrides(tmp_path, data_cache, 8), "before_checksums", 1, 6,
                                  fresh_interpreters=True)  # W&B's writer as in a torchrun worker
    assert codes[1] == -9
    first_runs = _wandb_runs(run_dir)
    assert len(first_runs) == 1  # only rank 0 created a W&B run
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert first_runs[0].name.endswith(run_id)
    raw_before = (run_dir / "metrics.jsonl").read_text()
    logged = [json.loads(line) for line in raw_before.splitlines()]
    assert max(r["step"] for r in logged) == 6  # steps 4-6 were logged, then lost with the killed save

    run_distributed(train_and_collect, 2, _overrides(tmp_path, data_cache, 8))
    runs = _wandb_runs(run_dir)
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # the same W&B run, continued
    meta = json.loads((run_dir / "checkpoints" / "step_00000008" / "bigmodel_meta.json").read_text())
    assert meta["train_state"]["wandb_run_id"] == run_id

    history = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in history.restarts] == [3]
    assert history.series("loss")[0] == list(range(1, 9))  # every step once after deduplication
    raw = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    raw_steps = [r["step"] for r in raw if "loss" in r]
    assert sorted(raw_steps) == [1, 2, 3, 4, 4, 5, 5, 6, 6, 7, 8]  # the raw file keeps the redone steps
    assert history.series("eval/loss")[0] == [4, 8]
    last = [r for r in history.records if "loss" in r][-1]
    assert 0 < last["goodput"] < 1 and last["memory/peak_gb_max"] > 0
    # each offline W&B file holds the losses its process logged (values are stored as JSON text)
    first_losses = [r["loss"] for r in logged if "loss" in r]
    assert all(json.dumps(v).encode() in runs[0].joinpath(f"run-{run_id}.wandb").read_bytes() for v in first_losses)

    plot = run_cli(["plot", str(run_dir)], env=cli_env)
    assert plot.returncode == 0, plot.stderr
    png = run_dir / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_unreachable_wandb_server_falls_back_offline_under_the_runs_id_and_keeps_secrets(tmp_path, data_cache, cli_env):
    from launcher.ports import free_port

    secret = "secret-value-7f3a9c"
    env = {**cli_env, "WANDB_API_KEY": secret, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    result = run_cli(["train", TINY_CONFIG, *_overrides(tmp_path, data_cache, 3, "--logging.wandb_mode=online",
                                                       "--logging.wandb_init_timeout_s=5")], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B online start failed" in result.stderr
    run_dir = tmp_path / "run"
    assert (run_dir / "COMPLETED").is_file()
    # The fallback: offline files under the run's id, every logged loss in them, for `wandb sync` later.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert f"W&B offline for this run (the server did not answer); its files are under the run's id: " \
           f"`wandb sync --id {run_id}" in result.stderr, result.stderr[-3000:]
    assert "W&B offline start failed" not in result.stderr and "W&B disabled" not in result.stderr
    (offline,) = _wandb_runs(run_dir)
    assert offline.name.endswith(run_id)
    records = (offline / f"run-{run_id}.wandb").read_bytes()
    steps, values = read_metrics(run_dir / "metrics.jsonl").series("loss")
    assert steps == [1, 2, 3] and all(json.dumps(v).encode() in records for v in values)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret written to {path}"
    assert secret not in result.stderr + result.stdout


def test_broken_wandb_dir_and_corrupt_metrics_line_do_not_stop_training(tmp_path, data_cache, cli_env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb").write_text("a file where W&B wants its folder")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n{not json, a torn line\n')
    result = run_cli(["train", TINY_CONFIG, *_overrides(tmp_path, data_cache, 2)], cwd=tmp_path, env=cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B disabled for this run" in result.stderr
    history = read_metrics(run_dir / "metrics.jsonl")
    assert history.bad_lines == 1 and history.series("loss")[0] == [1, 2]
