"""The README's commands exactly as printed, in a fresh clone: relative config paths, the default output
dir (`runs/`), from the repository root and from another directory. Only step counts are added (and,
where the README shows `[overrides]`, a run name that keeps two rows' runs apart).

A suite where every test passed an absolute temporary --output_dir once stayed green while `make train`
crashed at its first checkpoint on every fresh clone: these tests are the user's first minutes.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bigmodel_dist.metrics.jsonl import read_metrics
from tests.conftest import REPO
from tests.helpers.guards import HANG_GUARD_S
from tests.journeys.fresh_clone import fresh_clone, make_command, user_env

pytestmark = pytest.mark.distributed
RUN = Path("runs") / "gpt2-tiny"  # the default output dir and the main job's run name, relative


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """One command as a user's shell runs it, stdout and stderr together (what the terminal shows)."""
    return subprocess.run(command, cwd=cwd, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=HANG_GUARD_S)


def ok(result: subprocess.CompletedProcess) -> str:
    """The output of a command that succeeded cleanly: exit 0 and no traceback."""
    shown = f"exit {result.returncode}: {' '.join(map(str, result.args))}\n{result.stdout[-5000:]}"
    assert result.returncode == 0, shown
    assert "Traceback" not in result.stdout, shown
    return result.stdout


def steps_saved(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return fresh_clone(tmp_path_factory.mktemp("fresh-clone"))


@pytest.fixture(scope="module")
def first_train(clone) -> str:
    """`make train` in the clone (step count added): the README's first command."""
    return ok(run(make_command("train", "--train.max_steps=4"), clone))


def test_make_train_saves_under_runs_and_the_same_command_again_resumes(clone, first_train):
    run_dir = clone / RUN
    assert steps_saved(run_dir) == [4]
    assert f"done: checkpoints in {run_dir / 'checkpoints'}" in first_train, first_train[-3000:]
    assert re.search(rf"run dir {re.escape(str(run_dir))}: config.yaml, metrics.jsonl, checkpoints/, this launch's "
                     rf"log {re.escape(str(run_dir / 'logs'))}/launch-\S+\.log \(exit code 0\)", first_train), first_train[-2000:]
    meta = json.loads((run_dir / "checkpoints" / "step_00000004" / "bigmodel_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline files under the run dir"

    again = ok(run(make_command("train", "--train.max_steps=4"), clone))  # the same command twice
    assert f"run gpt2-tiny is already complete: {run_dir / 'checkpoints' / 'step_00000004'} is at step 4" in again
    assert "launching" not in again and steps_saved(run_dir) == [4]
    # the same run name with another model: one line before any process starts, nothing touched (another
    # global batch size is a recorded ramp-up: tests/distributed/test_batch_change.py)
    refused = run(["bigmodel", "launch", "local", "configs/gpt2-tiny.yaml", "--train.max_steps=6",
                   "--model.preset=gpt2-mini"], clone)
    assert refused.returncode == 2 and "written with model={'preset': 'gpt2-tiny'" in refused.stdout, refused.stdout[-3000:]
    assert "Traceback" not in refused.stdout and "launching" not in refused.stdout, refused.stdout[-3000:]
    assert steps_saved(run_dir) == [4]

    longer = ok(run(make_command("train", "--train.max_steps=6"), clone))
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in longer, longer[-3000:]
    assert steps_saved(run_dir) == [4, 6]
    history = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in history.restarts] == [4]  # one resume, at the checkpoint: no step trained twice
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 6, logged


def test_the_readme_table_from_the_repository_root(clone, first_train):
    run_dir = clone / RUN
    newest = steps_saved(run_dir)[-1]
    checkpoint = RUN / "checkpoints" / f"step_{newest:08d}"

    validate = ok(run(["bigmodel", "validate", "configs/gpt2-tiny.yaml"], clone))
    assert re.search(rf"^run dir\s+{re.escape(str(run_dir))}$", validate, re.M), validate
    plan = ok(run(["bigmodel", "plan", "configs/gpt2-tiny.yaml", "--gpus", "8", "--model.preset=gpt2-7b",
                   "--data.seq_len=2048", "--train.global_batch_size=64", "--train.micro_batch_size=1"], clone))
    assert "recommended: ZeRO-" in plan, plan
    prepare = ok(run(["bigmodel", "prepare", "configs/gpt2-tiny.yaml"], clone))
    assert re.search(rf"^{re.escape(str(clone / 'runs' / '.cache'))}/prepared-\w+: \d+ train", prepare, re.M), prepare
    check = ok(run(["bigmodel", "check", "configs/gpt2-tiny.yaml"], clone))
    assert "healthy" in check and list((run_dir / "logs").glob("health-*.json")), check
    dry = ok(run(["bigmodel", "launch", "slurm", "configs/gpt2-tiny.yaml", "--nodes", "2", "--gpus-per-node", "1",
                  "--dry-run"], clone))
    assert f"--output={run_dir / 'logs'}" in dry, dry

    ok(run(["bigmodel", "export", str(checkpoint), "exported"], clone))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(clone / "exported")
    tokenizer = AutoTokenizer.from_pretrained(clone / "exported")
    assert model.config.vocab_size >= len(tokenizer)

    ok(run(["bigmodel", "plot", str(RUN)], clone))
    assert (run_dir / "metrics.png").stat().st_size > 0


def test_from_another_directory_with_a_relative_config_and_async_saves(clone):
    """`runs` means the directory the command ran in, also for the async writer and its markers."""
    elsewhere = clone / "elsewhere"
    elsewhere.mkdir()
    ok(run(["bigmodel", "launch", "local", "../configs/gpt2-tiny.yaml", "--train.max_steps=3",
            "--checkpoint.every=1", "--checkpoint.async_save=true"], elsewhere))
    run_dir = elsewhere / RUN
    assert steps_saved(run_dir) == [1, 2, 3]
    assert json.loads((run_dir / "COMPLETED").read_text())["step"] == 3
    assert list((elsewhere / "runs" / ".cache").glob("prepared-*/meta.json"))


def test_torchrun_and_accelerate_rows(clone, first_train):
    ok(run(["torchrun", "--nproc-per-node=2", "-m", "launcher.cli", "train", "configs/gpt2-tiny.yaml",
            "--name=torchrun-row", "--train.max_steps=2"], clone))
    assert steps_saved(clone / "runs" / "torchrun-row") == [2]
    ok(run(["accelerate", "launch", "--config_file", "configs/accelerate/zero3.yaml", "-m", "launcher.cli", "train",
            "configs/gpt2-tiny.yaml", "--name=accelerate-row", "--train.max_steps=2"], clone))
    meta = json.loads((clone / "runs" / "accelerate-row" / "checkpoints" / "step_00000002" /
                       "bigmodel_meta.json").read_text())
    assert meta["zero_stage"] == 3  # the DeepSpeed JSON named, relatively, in the Accelerate config


# Every row of the README's command table, by the command it starts with, and the test that runs it as
# printed. A new row without a test here fails `test_every_readme_row_has_a_test`.
README_ROWS = {
    "bigmodel launch local": "tests/journeys/test_readme.py::test_from_another_directory_with_a_relative_config_and_async_saves",
    "sbatch slurm/pretrain_gpt.sh": "tests/journeys/test_slurm_readme.py::test_sbatch_as_printed_saves_is_preempted_requeued_and_finishes",
    "ray job submit": "tests/cluster/test_ray_readme.py::test_ray_job_submit_as_printed_succeeds_cleanly",
    "sbatch slurm/ray_cluster.sh":
        "tests/cluster/test_ray_readme.py::test_ray_cluster_script_starts_ray_and_runs_the_job_from_the_submit_dir",
    "torchrun": "tests/journeys/test_readme.py::test_torchrun_and_accelerate_rows",
    "accelerate launch": "tests/journeys/test_readme.py::test_torchrun_and_accelerate_rows",
    "bigmodel plan": "tests/journeys/test_readme.py::test_the_readme_table_from_the_repository_root",
    "bigmodel validate": "tests/journeys/test_readme.py::test_the_readme_table_from_the_repository_root",
    "bigmodel check": "tests/journeys/test_readme.py::test_the_readme_table_from_the_repository_root",
    "bigmodel prepare": "tests/journeys/test_readme.py::test_the_readme_table_from_the_repository_root",
    "bigmodel export": "tests/journeys/test_readme.py::test_the_readme_table_from_the_repository_root",
    "bigmodel plot": "tests/journeys/test_readme.py::test_the_readme_table_from_the_repository_root",
}
# slurm/README.md's commands (its ```bash blocks), by how they start, and the test that runs each.
SLURM_README = {
    "sbatch --nodes=4 --gpus-per-node=8 --time=24:00:00 slurm/pretrain_gpt.sh": README_ROWS["sbatch slurm/pretrain_gpt.sh"],
    "bigmodel launch slurm": "tests/journeys/test_readme.py::test_the_readme_table_from_the_repository_root",
    "BIGMODEL_PREPARE_TASKS=64 sbatch --partition=cpu --cpus-per-task=4 slurm/prepare.sh":
        "tests/journeys/test_slurm_readme.py::test_sbatch_as_printed_saves_is_preempted_requeued_and_finishes",
    "sbatch --nodes=4 --gpus-per-node=8 slurm/ray_cluster.sh": README_ROWS["sbatch slurm/ray_cluster.sh"],
}
# Commands a row holds after " or " (a second way to start the same thing).
ALSO = {"bigmodel launch slurm": "tests/journeys/test_readme.py::test_the_readme_table_from_the_repository_root",
        "bigmodel launch ray": "tests/cluster/test_ray.py::test_ray_job_succeeds_with_checkpoints_w_and_b_and_a_small_upload"}


def readme_table_commands() -> list[str]:
    """The commands of the README's `| how you start it | command |` table, in backticks."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| how you start it | command |"):].split("\n\n", 1)[0]
    return [cmd for line in table.splitlines()[2:] for cmd in re.findall(r"`([^`]+)`", line.split("|")[2])
            if " " in cmd]  # not a file named in passing (`slurm/README.md`)


def test_every_readme_row_has_a_test():
    covered = {**README_ROWS, **ALSO}
    for command in readme_table_commands():
        owner = next((prefix for prefix in covered if command.startswith(prefix)), None)
        assert owner is not None, f"README command {command!r} has no test in README_ROWS"
        path, name = covered[owner].split("::")
        assert f"def {name}(" in (REPO / path).read_text(), f"{covered[owner]} (for {command!r}) does not exist"
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "slurm" / "README.md").read_text(), re.S)
    for command in (line for block in blocks for line in block.splitlines() if line.strip()):
        owner = next((prefix for prefix in SLURM_README if command.startswith(prefix)), None)
        assert owner is not None, f"slurm/README.md command {command!r} has no test in SLURM_README"
        path, name = SLURM_README[owner].split("::")
        assert f"def {name}(" in (REPO / path).read_text(), f"{SLURM_README[owner]} does not exist"
    assert (REPO / "README.md").read_text().startswith("# bigmodel-dist\n\n```bash\nmake train"), \
        "the README opens with its two commands"
