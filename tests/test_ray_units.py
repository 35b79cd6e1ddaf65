"""Ray launcher logic that needs no cluster: resume choice, upload size, cluster fit, W&B backfill."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bigmodel_dist.config import load_config
from bigmodel_dist.errors import UserInputError
from launcher.ray_job import check_cluster_fits, check_output_dir
from launcher.ray_submit import check_upload_size, upload_size
from launcher.ray_worker import BACKFILL_KEY, resume_choice

from .conftest import REPO


def _committed(run_dir: Path, step: int) -> Path:
    """A step directory with readable metadata (what `newest_committed` looks for)."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "bigmodel_meta.json").write_text(json.dumps({"format_version": 1, "step": step, "files": {}}))
    return path


def test_resume_choice_prefers_the_newest_and_respects_an_explicit_choice(tmp_path):
    run_dir = tmp_path / "run"
    step4 = _committed(run_dir, 4)
    assert resume_choice(None, run_dir, "latest") == "latest"  # Ray knows nothing: the run dir decides
    assert resume_choice({"step": 4, "path": str(step4)}, run_dir, "latest") == "latest"
    _committed(run_dir, 8)  # saved, but the crash came before Ray registered it
    assert resume_choice({"step": 4, "path": str(step4)}, run_dir, "latest") == "latest"
    assert resume_choice({"step": 4, "path": str(step4)}, run_dir, "none") == "none"
    assert resume_choice({"step": 4, "path": str(step4)}, run_dir, str(step4)) == str(step4)
    # a run dir without checkpoints (e.g. a new output_dir) but Ray's record points at a real one
    assert resume_choice({"step": 4, "path": str(step4)}, tmp_path / "elsewhere", "latest") == str(step4)


def test_upload_size_applies_rayignore_and_refuses_over_the_limit(tmp_path):
    (tmp_path / ".rayignore").write_text("runs/\n*.bin\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "ckpt.pt").write_bytes(b"0" * 1000)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "shard.bin").write_bytes(b"0" * 1000)
    total, _ = upload_size(tmp_path)
    assert total == len("x = 1\n") + len("runs/\n*.bin\n")
    with open(tmp_path / "big.txt", "wb") as f:  # sparse: counts by size, costs no disk
        f.truncate(101 * 2**20)
    with pytest.raises(UserInputError, match=r"101 MiB to upload, over Ray's 100 MiB limit \(largest: big.txt"):
        check_upload_size(tmp_path)


def test_repository_upload_is_small():
    total, largest = upload_size(REPO)
    assert total < 5 * 2**20, largest  # .rayignore keeps .venv, runs, data and caches out


def test_cluster_fit_and_output_dir_errors_name_the_field():
    cfg = load_config(REPO / "configs" / "gpt2-tiny.yaml", ["--ray.num_workers=4", "--ray.use_gpu=true",
                                                            "--output_dir=/abs/runs"])
    check_output_dir(cfg)
    check_cluster_fits(cfg, {"CPU": 64, "GPU": 4})
    with pytest.raises(UserInputError, match=r"ray.num_workers: 4 workers x 1 GPU need 4 GPU, the Ray cluster has 2"):
        check_cluster_fits(cfg, {"CPU": 64, "GPU": 2})
    relative = load_config(REPO / "configs" / "gpt2-tiny.yaml")
    with pytest.raises(UserInputError, match="config field output_dir: 'runs' is relative"):
        check_output_dir(relative)


def test_controller_logs_backfilled_steps_once(tmp_path, monkeypatch):
    from launcher import ray_wandb

    logged: list[tuple[int, dict]] = []

    class FakeRun:  # the W&B run object; the callback's bookkeeping is what is under test
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append((-1, {}))

    monkeypatch.setattr(ray_wandb, "start_wandb", lambda *args: FakeRun())
    cfg = load_config(REPO / "configs" / "gpt2-tiny.yaml")
    callback = ray_wandb.WandbOnController(tmp_path, cfg.logging, {}, "abc", already_logged_step=0)
    callback.after_report(None, [{"step": 1, "loss": 6.0}, {"step": 1, "loss": 6.0}])
    callback.after_report(None, [{"step": 2, "loss": 5.9}, {}])
    # a worker died with steps 3-4 in flight; the restart resumes at 4 and re-sends 1-4 once
    backfill = [{"step": s, "loss": 6.0 - s / 10} for s in (1, 2, 3, 4)] + [{"step": 4, "checkpoint/save_s": 0.1}]
    callback.after_report(None, [{"step": 5, "loss": 5.5, BACKFILL_KEY: backfill}, {}])
    callback.after_report(None, [{"step": 5, "loss": 5.5}, {}])  # nothing new
    callback.after_controller_finish(None)
    assert [step for step, _ in logged] == [1, 2, 3, 4, 4, 5, -1]
    assert logged[4][1] == {"checkpoint/save_s": 0.1}
    assert os.listdir(tmp_path) == []  # the callback itself writes nothing; W&B does
