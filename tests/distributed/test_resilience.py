"""Dirty failures end in a defined state: a hung rank is diagnosed and ended (exit 86) and a restart
finishes the run; a poisoned batch is skipped, then rolled back past, exactly and deterministically; a
slow rank is named as a straggler. Faults are injected into real 2-rank ZeRO-2 runs (gloo) through the
test-only `BIGMODEL_FAULTS`."""

from __future__ import annotations

import json
import math
import re

import pytest

from bigmodel_dist.checkpoint.integrity import read_checkpoint_meta, step_dir_name
from bigmodel_dist.config.schema import ResilienceConfig
from bigmodel_dist.core.env import ALLOW_FAULTS, FAULTS
from bigmodel_dist.metrics.jsonl import read_metrics
from tests.conftest import tiny_run
from tests.helpers.commands import TINY_CONFIG, assert_one_line_error, run_cli, run_command
from tests.helpers.launching import launch_local_command, losses
from tests.helpers.spawn import exit_codes, run_distributed
from tests.helpers.workers import skip_one_step, train_and_collect, train_watching_self

GLOBAL_BATCH = 8  # TINY's: step s reads samples [8 (s - 1), 8 s)
HANG_TIMEOUT_S = 5
DETECTION_SLACK_S = 5  # the watchdog polls twice a second; this only guards against a missed hang


def _faulty(env: dict[str, str], faults: str) -> dict[str, str]:
    return {**env, FAULTS: faults, ALLOW_FAULTS: "1"}


def _launch(tmp_path, data_cache, env, *overrides: str):
    return run_command(launch_local_command(*tiny_run(tmp_path, data_cache),
                                            "--train.eval_every=0", *overrides), env=env)


def test_a_hung_rank_is_diagnosed_ended_and_the_restart_finishes(tmp_path, data_cache, cli_env):
    run_dir = tmp_path / "gpt2-tiny"
    hung = _launch(tmp_path, data_cache, _faulty(cli_env, "hang:rank=1,step=5"), "--train.max_steps=8",
                   "--checkpoint.every=4", f"--resilience.hang_timeout_s={HANG_TIMEOUT_S}")
    output = hung.stdout + hung.stderr
    assert hung.returncode == ResilienceConfig().hang_exit_code, output[-4000:]
    assert "Traceback" not in output
    (folder,) = (run_dir / "logs").glob("hang-*")
    report = json.loads((folder / "ranks.json").read_text())
    assert HANG_TIMEOUT_S <= report["silent_s"] < HANG_TIMEOUT_S + DETECTION_SLACK_S
    assert report["suspects"] == [1]  # behind rank 0, which waits in the gradient all-reduce
    positions = {r["rank"]: (r["step"], r["phase"]) for r in report["ranks"]}
    assert positions[1] == (5, "forward")
    stuck = _current_thread(folder / "rank-1.stacks.txt")
    waiting = _current_thread(folder / "rank-0.stacks.txt")
    assert "_sleep_for_ever" in stuck and "in_forward" in stuck
    assert re.search(r"all_reduce|reduce_scatter|all_gather|broadcast", waiting), waiting
    (incident,) = read_metrics(run_dir / "metrics.jsonl").incidents
    assert incident["event"] == "hang" and incident["suspects"] == [1] and incident["diagnosis"] == str(folder)

    restarted = _launch(tmp_path, data_cache, cli_env, "--train.max_steps=8", "--checkpoint.every=4",
                        "--logging.wandb_mode=offline")
    assert restarted.returncode == 0, (restarted.stdout + restarted.stderr)[-4000:]
    assert "resumed from" in restarted.stderr and "at step 4" in restarted.stderr
    assert json.loads((run_dir / "COMPLETED").read_text())["step"] == 8
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # the launcher's record reached W&B
    assert b"incident/hang" in wandb_file.read_bytes()


def test_a_rank_watching_itself_ends_with_the_hang_code_and_its_stacks(tmp_path, data_cache, monkeypatch):
    """The Ray worker's watchdog (no launcher of ours above it): every rank of the hung group dumps its
    own stacks and exits 86, which Ray answers by restarting the group from the last checkpoint."""
    monkeypatch.setenv(FAULTS, "hang:rank=1,step=3")
    monkeypatch.setenv(ALLOW_FAULTS, "1")
    codes = exit_codes(train_watching_self, 2, [*tiny_run(tmp_path, data_cache),
                                                "--train.max_steps=6", "--train.eval_every=0", "--name=run",
                                                f"--resilience.hang_timeout_s={HANG_TIMEOUT_S}"])
    assert codes == [ResilienceConfig().hang_exit_code] * 2
    # Dumped by the watchdog thread itself: the loop's frames are in another thread of the dump.
    stacks = {p.name: p.read_text() for p in (tmp_path / "run" / "logs").glob("hang-*-rank*/rank-*.stacks.txt")}
    assert "_sleep_for_ever" in stacks["rank-1.stacks.txt"]
    assert re.search(r"all_reduce|reduce_scatter|all_gather|broadcast", stacks["rank-0.stacks.txt"])
    (incident,) = read_metrics(tmp_path / "run" / "metrics.jsonl").incidents
    assert incident["event"] == "hang" and incident["step"] == 3


def _current_thread(stacks) -> str:
    """The main thread's frames in a faulthandler dump (the thread that was running the loop)."""
    text = stacks.read_text()
    return text.split("Current thread")[1].split("\n\n")[0] if "Current thread" in text else text


POISON = f"nan:samples={4 * GLOBAL_BATCH}-{7 * GLOBAL_BATCH}"  # steps 5, 6 and 7 read it
POISONED_RUN = ["--train.max_steps=10", "--checkpoint.every=4", "--resilience.max_bad_steps=3",
                "--logging.wandb_mode=offline"]


def _train(out, data_cache, monkeypatch, faults: str | None, *overrides: str, world_size: int = 2) -> None:
    """A run on forked ranks (tests/helpers/spawn.py), with `faults` injected or none."""
    if faults:
        monkeypatch.setenv(FAULTS, faults)
        monkeypatch.setenv(ALLOW_FAULTS, "1")
    else:
        monkeypatch.delenv(FAULTS, raising=False)
    run_distributed(train_and_collect, world_size, [*tiny_run(out, data_cache),
                                                    "--train.eval_every=0", *overrides])


def test_a_poisoned_batch_is_skipped_then_rolled_back_past_exactly(tmp_path, data_cache, cli_env, monkeypatch):
    _train(tmp_path / "a", data_cache, monkeypatch, POISON, *POISONED_RUN)
    run_a = tmp_path / "a" / "gpt2-tiny"
    history = read_metrics(run_a / "metrics.jsonl")
    assert [i["event"] for i in history.incidents] == ["skip", "skip", "skip", "rollback"]
    rollback = history.incidents[-1]
    assert (rollback["step"], rollback["to_step"], rollback["lost_steps"]) == (7, 4, 3)
    assert rollback["skipped_samples"] == [4 * GLOBAL_BATCH, 7 * GLOBAL_BATCH]
    finals = losses(run_a)
    assert sorted(finals) == list(range(1, 11)) and all(math.isfinite(v) for v in finals.values())
    state = _final_train_state(run_a, 10)
    assert state["rollbacks"] == 1 and state["skipped_ranges"] == [[32, 56]] and state["skipped_steps"] == 3
    assert state["samples_seen"] == 10 * GLOBAL_BATCH + 24  # the cursor passed over the poisoned window
    (wandb_file,) = (run_a / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"incident/rollback" in wandb_file.read_bytes() and b"incident/skip" in wandb_file.read_bytes()
    plot = run_cli(["plot", str(run_a)], env=cli_env)
    assert plot.returncode == 0 and (run_a / "metrics.png").stat().st_size > 20_000, plot.stderr

    # The same poisoned data, stopped after step 8 (a token budget) and resumed: the same recovery,
    # and the resume after the rollback continues bit-exactly.
    _train(tmp_path / "b", data_cache, monkeypatch, POISON, *POISONED_RUN, f"--train.max_tokens={8 * GLOBAL_BATCH * 128}")
    _train(tmp_path / "b", data_cache, monkeypatch, None, *POISONED_RUN)
    run_b = tmp_path / "b" / "gpt2-tiny"
    assert losses(run_b) == finals
    assert _comparable(_final_train_state(run_b, 10)) == _comparable(state)


@pytest.mark.parametrize("precision", ["bf16"])
def test_a_loss_spike_is_skipped_and_rolled_back_in_bf16(tmp_path, data_cache, monkeypatch, precision):
    spike = f"spike:samples={5 * GLOBAL_BATCH}-{7 * GLOBAL_BATCH},scale=50"  # steps 6 and 7
    _train(tmp_path, data_cache, monkeypatch, spike, "--train.max_steps=9", "--checkpoint.every=4",
           f"--train.precision={precision}", "--resilience.max_bad_steps=2", "--resilience.spike_window=10")
    run_dir = tmp_path / "gpt2-tiny"
    incidents = read_metrics(run_dir / "metrics.jsonl").incidents
    assert [i["event"] for i in incidents] == ["skip", "skip", "rollback"]
    assert "loss spike" in incidents[0]["reason"]
    # back to the step-4 checkpoint; step 5 is redone on its own data, steps 6-7's samples are passed over
    assert incidents[-1]["to_step"] == 4 and incidents[-1]["skipped_samples"] == [5 * GLOBAL_BATCH, 7 * GLOBAL_BATCH]
    assert all(math.isfinite(v) and v < 20 for v in losses(run_dir).values())
    assert _final_train_state(run_dir, 9)["rollbacks"] == 1


def test_a_slow_rank_is_reported_as_a_straggler_by_rank_and_host(tmp_path, data_cache, monkeypatch):
    _train(tmp_path, data_cache, monkeypatch, "slow:rank=1,seconds=0.5", "--train.max_steps=4", "--checkpoint.every=0",
           "--resilience.straggler_intervals=2", "--resilience.straggler_factor=1.5")
    (incident,) = read_metrics(tmp_path / "gpt2-tiny" / "metrics.jsonl").incidents
    assert incident["event"] == "straggler" and incident["rank"] == 1 and incident["host"]
    assert incident["step"] == 2 and incident["compute_s"] > 1.5 * incident["others_median_s"]


@pytest.mark.parametrize("env, needle", [
    ({FAULTS: "hang:rank=1,step=3"}, ALLOW_FAULTS),  # never active by accident
    ({FAULTS: "explode:rank=1", ALLOW_FAULTS: "1"}, "unknown fault 'explode'"),
    ({FAULTS: "hang:rank=1", ALLOW_FAULTS: "1"}, "hang takes"),
])
def test_fault_injection_is_refused_unless_well_formed_and_allowed(tmp_path, cli_env, env, needle):
    result = run_cli(["launch", "local", TINY_CONFIG, f"--output_dir={tmp_path}"], env={**cli_env, **env})
    assert_one_line_error(result, FAULTS, needle)


@pytest.mark.parametrize("override, field", [
    ("--resilience.hang_timeout_s=0", "resilience.hang_timeout_s"),
    ("--resilience.startup_timeout_s=-1", "resilience.startup_timeout_s"),
    ("--resilience.max_bad_steps=0", "resilience.max_bad_steps"),
    ("--resilience.spike_factor=0.5", "resilience.spike_factor"),
    ("--resilience.hang_exit_code=85", "resilience.hang_exit_code"),
    ("--resilience.save_timeout_s=1", "resilience.save_timeout_s"),  # a gpt2-124m save takes longer
])
def test_bad_resilience_settings_are_one_line_errors(tmp_path, cli_env, override, field):
    result = run_cli(["validate", TINY_CONFIG, "--model.preset=gpt2-124m", f"--output_dir={tmp_path}",
                      override], env=cli_env)
    assert_one_line_error(result, field)


def _final_train_state(run_dir, step: int) -> dict:
    meta, problem = read_checkpoint_meta(run_dir / "checkpoints" / step_dir_name(step))
    assert problem is None, problem
    return meta["train_state"]


def _comparable(state: dict) -> dict:
    """A train state without its clocks (wall times differ between runs)."""
    return {k: v for k, v in state.items() if k not in ("run_started_at", "productive_s", "wandb_run_id")}



@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"),
                                              (2, "bf16")])
def test_a_skipped_step_changes_no_parameter_at_any_zero_stage(tiny_overrides, monkeypatch, stage, precision):
    monkeypatch.setenv(FAULTS, f"nan:samples={GLOBAL_BATCH}-{2 * GLOBAL_BATCH}")  # step 2's samples
    monkeypatch.setenv(ALLOW_FAULTS, "1")
    rank0, _ = run_distributed(skip_one_step, 2, [*tiny_overrides, "--train.eval_every=0", "--checkpoint.every=0",
                                                  "--name=skip", f"--deepspeed.zero_stage={stage}",
                                                  f"--train.precision={precision}"])
    assert rank0["skipped"] == 1
    before, after = rank0["before"], rank0["after"]
    assert before["params"].keys() == after["params"].keys()
    assert all((before["params"][k] == after["params"][k]).all() for k in before["params"])
    assert before["optimizer_steps"] == after["optimizer_steps"]


def test_a_rollback_after_a_world_size_change_loads_the_native_checkpoint(tmp_path, data_cache, monkeypatch):
    """Started on 2 ranks from a 1-rank checkpoint (a universal load), then rolled back to a checkpoint
    the 2 ranks wrote themselves (a native load): the engine is told which kind each load is."""
    run = [*tiny_run(tmp_path, data_cache), "--train.eval_every=0", "--name=run",
           "--train.max_steps=9", "--resilience.max_bad_steps=2"]
    run_distributed(train_and_collect, 1, [*run, "--checkpoint.every=4", f"--train.max_tokens={4 * GLOBAL_BATCH * 128}"])
    monkeypatch.setenv(FAULTS, f"nan:samples={6 * GLOBAL_BATCH}-{8 * GLOBAL_BATCH}")  # steps 7 and 8
    monkeypatch.setenv(ALLOW_FAULTS, "1")
    rank0, _ = run_distributed(train_and_collect, 2, [*run, "--checkpoint.every=2"])
    assert len(rank0["losses"]) == 5 and all(math.isfinite(v) for v in rank0["losses"])  # steps 5-9, once each
    (rollback,) = [i for i in read_metrics(tmp_path / "run" / "metrics.jsonl").incidents if i["event"] == "rollback"]
    assert rollback["to_step"] == 6 and rollback["skipped_samples"] == [6 * GLOBAL_BATCH, 8 * GLOBAL_BATCH]
    state = _final_train_state(tmp_path / "run", 9)
    assert state["rollbacks"] == 1 and state["samples_seen"] == 9 * GLOBAL_BATCH + 2 * GLOBAL_BATCH


def test_skipped_ranges_map_logical_samples_past_them():
    from bigmodel_dist.config.layout import BatchLayout
    from bigmodel_dist.data.sampler import global_index, micro_batch_indices

    skipped = [[8, 12], [20, 24]]
    assert [global_index(i, skipped) for i in (0, 7, 8, 11, 15, 16)] == [0, 7, 12, 15, 19, 24]
    layout = BatchLayout(global_batch_size=8, micro_batch_size=2, grad_accum_steps=2, data_parallel_size=2)
    # step 1 reads logical 8..15 = global 12..19; rank 1's second micro-batch is logical 14, 15
    assert micro_batch_indices(layout, 1, 1, 1, skipped) == [18, 19]
    assert micro_batch_indices(layout, 1, 0, 0) == [8, 9]
