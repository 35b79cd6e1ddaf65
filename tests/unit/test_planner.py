"""`bigmodel plan`: the memory model on hand-computed cases, DeepSpeed's estimators, the CLI and its errors."""

from __future__ import annotations

import json

import pytest

from bigmodel_dist.config import load_config
from bigmodel_dist.config.presets import count_parameters, model_shape
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.run.planner import (
    GIB,
    Hardware,
    Variant,
    async_staging_bytes,
    model_states,
    parse_bytes,
    plan_run,
)
from bigmodel_dist.run.resolve import resolve_run
from tests.conftest import REPO
from tests.helpers.commands import assert_one_line_error, run_cli

PSI = 1_000_000


@pytest.mark.parametrize(
    ("stage", "precision", "dp", "expected"),
    [  # bytes per parameter (params, grads, optimizer), the ZeRO paper's table with DeepSpeed's real choices
        (0, "bf16", 8, (2, 2, 12)),  # 16 Psi
        (1, "bf16", 8, (2, 2 / 8, 12 / 8)),  # paper: 4 Psi + 12 Psi / N; DeepSpeed partitions grads too
        (2, "bf16", 8, (2, 2 / 8, 12 / 8)),  # 2 Psi + 14 Psi / N
        (3, "bf16", 8, (2 / 8, 2 / 8, 12 / 8)),  # 16 Psi / N
        (0, "fp32", 2, (4, 4, 8)),  # fp32 Adam, no master copy at stage 0
        (2, "fp32", 2, (4, 4 / 2, 12 / 2)),  # + the fp32 master copy DeepSpeed keeps at ZeRO >= 1
        (3, "fp32", 4, (4 / 4, 4 / 4, 12 / 4)),
    ],
)
def test_model_states_follow_the_zero_formulas(stage, precision, dp, expected):
    gpu, cpu = model_states(PSI, Variant(stage), precision, dp)
    assert [gpu["params"], gpu["grads"], gpu["optimizer"]] == pytest.approx([PSI * b for b in expected])
    assert cpu == 0


def test_offload_moves_optimizer_and_params_to_the_host():
    gpu, cpu = model_states(PSI, Variant(2, "cpu"), "bf16", 4)
    assert gpu == {"params": 2 * PSI, "grads": 0.0, "optimizer": 0.0} and cpu == pytest.approx(12 * PSI / 4)
    gpu, cpu = model_states(PSI, Variant(3, "cpu", "cpu"), "bf16", 4)
    assert sum(gpu.values()) == 0 and cpu == pytest.approx((12 + 2) * PSI / 4)
    gpu, cpu = model_states(PSI, Variant(3, "nvme", "nvme"), "bf16", 4)
    assert sum(gpu.values()) == 0 and cpu == 0


@pytest.mark.parametrize("gpus", [2, 8, 64])
def test_agrees_with_deepspeeds_estimators(gpus):
    """DeepSpeed's estimators count 4 more bytes per parameter and rank at ZeRO-2 (an fp32 gradient
    partition that, measured, is not kept) and 2 more plus 4 x the largest layer at ZeRO-3."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from bigmodel_dist.run.planner import largest_layer_params

    shape = model_shape("gpt2-1.3b")
    n = count_parameters(shape)
    ours2 = sum(model_states(n, Variant(2), "bf16", gpus)[0].values())
    _, theirs2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=gpus, cpu_offload=False)
    assert theirs2 - ours2 == pytest.approx(4 * n / gpus, rel=1e-6)
    assert 0.75 <= ours2 / theirs2 <= 1.0
    ours3 = sum(model_states(n, Variant(3), "bf16", gpus)[0].values())
    _, theirs3, largest = estimate_zero3_model_states_mem_needs(n, largest_layer_params(shape), num_gpus_per_node=gpus,
                                                                cpu_offload=False)
    assert theirs3 - ours3 == pytest.approx(2 * n / gpus + largest, rel=1e-6)
    _, theirs_offload = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=gpus, cpu_offload=True)
    assert sum(model_states(n, Variant(2, "cpu"), "bf16", gpus)[0].values()) == theirs_offload  # 2 Psi on the GPU


def test_memory_strings():
    assert parse_bytes("80GiB", "x") == 80 * GIB
    assert parse_bytes("141GB", "x") == 141e9
    assert parse_bytes("512G", "x") == 512 * GIB
    assert parse_bytes("1.5 TiB", "x") == 1.5 * 1024 * GIB
    for bad in ("80XB", "", "-1GiB", "0GiB", "lots"):
        with pytest.raises(UserInputError, match="--gpu-memory: cannot read"):
            parse_bytes(bad, "--gpu-memory")


PLAN = ["plan", "configs/gpt2-tiny.yaml"]  # relative: run_cli runs in the repository


def test_plan_cli_recommends_and_prints_json():
    seven_b = ["--model.preset=gpt2-7b", "--data.seq_len=2048", "--train.global_batch_size=64",
               "--train.micro_batch_size=1"]
    table = run_cli([*PLAN, "--gpus", "8", *seven_b])
    assert table.returncode == 0, table.stderr
    assert "recommended: ZeRO-" in table.stdout and "ZeRO-0" in table.stdout
    result = json.loads(run_cli([*PLAN, "--gpus", "8", "--json", *seven_b]).stdout)
    by_name = {p["variant"]: p for p in result["plans"]}
    assert not by_name["ZeRO-0"]["fits"]  # 16 x 6.7B bytes is far over 80 GiB
    assert by_name["ZeRO-3"]["fits"] and by_name["ZeRO-3"]["max_micro_batch"] >= 1
    assert result["recommended"] in by_name and by_name[result["recommended"]]["fits"]
    # fits nowhere: a 7B model on one 8 GiB GPU at micro-batch 8, whatever is offloaded
    nowhere = run_cli([*PLAN, "--gpus", "1", "--gpu-memory", "8GiB", *seven_b[:1], "--data.seq_len=2048",
                       "--train.global_batch_size=8", "--train.micro_batch_size=8"])
    assert nowhere.returncode == 0 and "recommended: none fits" in nowhere.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "0"], "--gpus must be >= 1, got 0"),
    (["--gpus", "4", "--nodes", "3"], "--nodes 3 must be >= 1 and divide --gpus 4"),
    (["--gpus", "2", "--gpu-memory", "eighty"], "--gpu-memory: cannot read 'eighty'"),
    (["--gpus", "3"], "config field train.global_batch_size"),
])
def test_plan_cli_errors_are_one_line(args, message):
    assert_one_line_error(run_cli([*PLAN, *args]), message)


def _measured_over_planned(preset: str, precision: str) -> dict[int, float]:
    from benchmarks.planner_accuracy import STAGES, measure, planned_bytes

    measured = measure(preset, precision)
    return {stage: max(measured[stage].values()) / planned_bytes(preset, precision, stage, 2) for stage in STAGES}


@pytest.mark.slow
def test_measured_model_states_match_the_plan_tiny():
    """2 CPU ranks, real DeepSpeed engines at ZeRO 0-3: live tensor bytes ÷ planned (measured 1.00-1.02).
    Slow-marked because CI runs the same check in `benchmarks.run_all --quick`, which fails outside 0.85-1.15."""
    ratios = _measured_over_planned("gpt2-tiny", "fp32")
    assert all(0.85 <= r <= 1.15 for r in ratios.values()), ratios


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_measured_model_states_match_the_plan_24m(precision):
    """The ~24M model (measured 1.000-1.005 at both precisions); slow: `pytest -m slow`."""
    ratios = _measured_over_planned("gpt2-24m", precision)
    assert all(0.85 <= r <= 1.15 for r in ratios.values()), ratios


def test_plan_never_crashes_on_valid_configs():
    """Every preset, shipped DeepSpeed JSONs of each kind, 1 to 1024 GPUs: a plan for each."""
    from bigmodel_dist.config import load_config
    from bigmodel_dist.config.presets import MODEL_PRESETS
    from bigmodel_dist.run.planner import Hardware, format_table, plan_run, recommend
    from bigmodel_dist.run.precision import DeviceInfo
    from bigmodel_dist.run.resolve import resolve_run

    for preset in MODEL_PRESETS:
        for ds in ("zero0", "zero3", "zero3-offload"):
            for precision in ("bf16",):
                cfg = load_config(REPO / "configs" / "gpt2-tiny.yaml", [
                    f"--model.preset={preset}", f"--deepspeed.config={ds}", f"--train.precision={precision}",
                    "--train.global_batch_size=1024", "--train.micro_batch_size=1", "--data.seq_len=1024"])
                for gpus, nodes in ((1, 1), (8, 1), (64, 8), (1024, 128)):
                    hw = Hardware(gpus=gpus, nodes=nodes, gpu_memory=24 * GIB)
                    plans = plan_run(resolve_run(cfg, gpus, DeviceInfo.gpu_target()), hw)
                    assert len(plans) == 8 and all(p.gpu["total"] > 0 and p.step_time_s > 0 for p in plans)
                    rows = format_table(plans, hw, recommend(plans)).splitlines()
                    assert [row.split("  ")[0] for row in rows[3:11]] == [p.variant for p in plans]  # a row each
                    assert rows[11].startswith("recommended: ")


def test_fit_warning_names_a_variant_that_fits_or_says_none_does():
    """What validate and the launchers print before a start: nothing when the run's variant fits."""
    from bigmodel_dist.config import load_config
    from bigmodel_dist.run.planner import fit_warning
    from bigmodel_dist.run.precision import DeviceInfo
    from bigmodel_dist.run.resolve import resolve_run

    seven_b = load_config(REPO / "configs" / "gpt2-tiny.yaml", [
        "--model.preset=gpt2-7b", "--deepspeed.config=zero0", "--data.seq_len=2048",
        "--train.global_batch_size=64", "--train.micro_batch_size=1"])
    resolved = resolve_run(seven_b, 8, DeviceInfo.gpu_target())
    warning = fit_warning(resolved, 8, 80 * GIB)
    assert warning is not None and warning.startswith("plan: ZeRO-0 needs ") and "try ZeRO-" in warning
    assert "no ZeRO variant fits" in fit_warning(resolved, 8, 1 * GIB)
    tiny = resolve_run(load_config(REPO / "configs" / "gpt2-tiny.yaml"), 2, DeviceInfo.gpu_target())
    assert fit_warning(tiny, 2, 80 * GIB, nodes=2) is None


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_async_staging_on_one_node_is_the_whole_checkpoint_and_shrinks_with_nodes(stage, precision):
    """One staged copy of every local rank's checkpoint files: on a single node, the whole checkpoint
    (model file + every optimizer partition); on 4 nodes rank 0's node keeps the model file and its own
    ranks' partitions. The benchmark (`benchmarks.checkpoint`) compares it with the bytes really staged."""
    n, variant = 10**9, Variant(stage, "none", "none")
    param_b, optim_b = (2, 12) if precision == "bf16" else (4, 12 if stage else 8)
    whole = n * (param_b + optim_b)
    assert async_staging_bytes(n, variant, precision, dp=8, gpus_per_node=8) == pytest.approx(whole)
    if stage in (1, 2):
        assert async_staging_bytes(n, variant, precision, dp=32, gpus_per_node=8) == pytest.approx(
            n * param_b + n * optim_b / 4)


def test_async_save_adds_its_staging_to_the_host_memory_plan():
    resolved = resolve_run(load_config(None, ["--model.preset=gpt2-124m", "--train.micro_batch_size=2"]), world_size=8)
    hw = Hardware(gpus=8, nodes=1, gpu_memory=80 * 2**30)
    plain = {p.variant: p.cpu_per_node for p in plan_run(resolved, hw)}
    resolved.config.checkpoint.async_save = True
    staged = {p.variant: p.cpu_per_node for p in plan_run(resolved, hw)}
    assert all(staged[name] > plain[name] for name in plain)
