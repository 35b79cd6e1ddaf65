"""DeepSpeed JSON resolution and the batch identity (no process group)."""

from __future__ import annotations

import json

import pytest

from bigmodel_dist.config import load_config
from bigmodel_dist.config.deepspeed import SHIPPED_DEEPSPEED_DIR, resolve_deepspeed_config
from bigmodel_dist.config.layout import derive_batch_layout
from bigmodel_dist.core.errors import ConfigError, UserInputError
from bigmodel_dist.run.precision import DeviceInfo
from bigmodel_dist.run.resolve import resolve_run

SHIPPED = sorted(SHIPPED_DEEPSPEED_DIR.glob("*.json"))


@pytest.mark.parametrize(("global_bs", "micro", "world", "accum"), [(16, 4, 2, 2), (16, 4, 4, 1), (96, 2, 3, 16)])
def test_batch_identity(global_bs, micro, world, accum):
    cfg = load_config(None, [f"--train.global_batch_size={global_bs}", f"--train.micro_batch_size={micro}"])
    layout = derive_batch_layout(cfg.train, world)
    assert layout.grad_accum_steps == accum
    assert layout.global_batch_size == layout.micro_batch_size * layout.grad_accum_steps * layout.data_parallel_size


def test_batch_identity_violations_name_the_field():
    cfg = load_config(None, ["--train.global_batch_size=16", "--train.micro_batch_size=4", "--train.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match="train.grad_accum_steps"):
        derive_batch_layout(cfg.train, 2)
    cfg = load_config(None, ["--train.global_batch_size=16", "--train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="multiple of 12"):
        derive_batch_layout(cfg.train, 3)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_deepspeed_json_resolves_without_auto(path):
    cfg = load_config(None, [f"--deepspeed.config={path.stem}"])
    resolved = resolve_run(cfg, world_size=2, device=DeviceInfo.gpu_target())  # precision auto -> bf16 there
    ds = resolved.deepspeed_config
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]


def test_shipped_set_covers_every_stage_and_offload():
    stems = {p.stem for p in SHIPPED}
    assert {"zero0", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload", "zero3-nvme"} <= stems
    for stage in range(4):
        assert json.loads((SHIPPED_DEEPSPEED_DIR / f"zero{stage}.json").read_text())["zero_optimization"]["stage"] == stage


def _user_json(tmp_path, body: dict):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(body))
    return path


def test_user_hf_style_json_with_auto_works_unchanged(tmp_path):
    # The shape of a typical Hugging Face Trainer ds_config.json, scheduler included.
    body = {
        "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    }
    cfg = load_config(None, [f"--deepspeed.config={_user_json(tmp_path, body)}"])
    resolved = resolve_run(cfg, world_size=2)
    ds = resolved.deepspeed_config
    assert "scheduler" not in ds and any("scheduler" in n for n in resolved.deepspeed_notes)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 128 * 128  # hidden_size^2 of gpt2-tiny
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 1280
    assert resolved.zero_stage == 3


def test_concrete_values_that_agree_pass_and_conflicts_name_both(tmp_path):
    agree = _user_json(tmp_path, {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0})
    resolve_run(load_config(None, [f"--deepspeed.config={agree}"]), world_size=2)
    clash = _user_json(tmp_path, {"train_micro_batch_size_per_gpu": 8})
    with pytest.raises(UserInputError, match="train_micro_batch_size_per_gpu=8 conflicts with train.micro_batch_size=4"):
        resolve_run(load_config(None, [f"--deepspeed.config={clash}"]), world_size=2)


def test_leftover_auto_and_bad_stage_are_errors(tmp_path):
    leftover = _user_json(tmp_path, {"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}})
    with pytest.raises(UserInputError, match="zero_optimization.allgather_bucket_size"):
        resolve_run(load_config(None, [f"--deepspeed.config={leftover}"]), world_size=1)
    bad_stage = _user_json(tmp_path, {"zero_optimization": {"stage": 7}})
    with pytest.raises(UserInputError, match="stage must be 0-3"):
        resolve_run(load_config(None, [f"--deepspeed.config={bad_stage}"]), world_size=1)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserInputError, match="broken.json: invalid JSON"):
        resolve_run(load_config(None, [f"--deepspeed.config={broken}"]), world_size=1)


def test_a_deepspeed_checkpoint_writer_block_is_refused_naming_it(tmp_path):
    for writer in ({"type": "python", "data_parallel": "replica"}, {"decoupled": True}):
        fast = _user_json(tmp_path, {"checkpoint": {"writer": writer}})
        with pytest.raises(UserInputError, match="checkpoint.writer is not supported .* drop the block"):
            resolve_run(load_config(None, [f"--deepspeed.config={fast}"]), world_size=2)


def test_zero_stage_override_beats_the_json():
    cfg = load_config(None, ["--deepspeed.config=zero1", "--deepspeed.zero_stage=3"])
    assert resolve_run(cfg, world_size=2).zero_stage == 3


def test_precision_is_decided_by_the_run_config(tmp_path):
    cfg = load_config(None, ["--train.precision=fp32"])
    ds = resolve_run(cfg, world_size=1).deepspeed_config
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    forced = _user_json(tmp_path, {"bf16": {"enabled": True}})
    with pytest.raises(UserInputError, match="bf16.enabled=true conflicts with train.precision"):
        resolve_deepspeed_config(cfg, derive_batch_layout(cfg.train, 1), 128, forced)


CPU_AVX2 = DeviceInfo(has_cuda=False, native_bf16=False, name="CPU (AVX2)")
CPU_AMX = DeviceInfo(has_cuda=False, native_bf16=True, name="CPU (AMX)")


@pytest.mark.parametrize(("requested", "device", "expected"), [
    ("auto", CPU_AVX2, "fp32"), ("auto", CPU_AMX, "bf16"), ("auto", DeviceInfo.gpu_target(), "bf16"),
    ("auto", DeviceInfo(has_cuda=True, native_bf16=False, name="V100"), "fp32"),
    ("bf16", CPU_AVX2, "bf16"), ("fp16", DeviceInfo.gpu_target(), "fp16"), ("fp32", CPU_AMX, "fp32"),
])
def test_precision_auto_follows_the_device_and_an_explicit_choice_wins(requested, device, expected):
    resolved = resolve_run(load_config(None, [f"--train.precision={requested}"]), world_size=1, device=device)
    assert resolved.config.train.precision == expected  # never "auto" past resolution
    assert resolved.deepspeed_config["bf16"]["enabled"] is (expected == "bf16")
    assert (requested == "auto") == resolved.precision_reason.startswith("auto:")
    assert device.name in resolved.precision_reason or requested != "auto"


def test_this_machine_gets_the_precision_its_cpu_runs_fast():
    import torch

    from bigmodel_dist.run.precision import cpu_name_and_flags

    resolved = resolve_run(load_config(None, []), world_size=1)  # the default: auto, on this machine
    capabilities = torch.cpu.get_capabilities()  # torch's own CPUID reading, against our /proc/cpuinfo one
    native = torch.cuda.is_available() or capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    assert resolved.config.train.precision == ("bf16" if native else "fp32")
    assert resolved.precision_reason.startswith("auto:")
    assert ("avx512_bf16" in cpu_name_and_flags()[1]) == capabilities.get("avx512_bf16")


def test_cpu_flags_are_read_for_x86_and_arm():
    from bigmodel_dist.run.precision import cpu_name_and_flags

    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: fpu avx2\n"
    assert cpu_name_and_flags(x86) == ("AMD EPYC", {"fpu", "avx2", "fma"})
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd4f\n"
    assert "bf16" in cpu_name_and_flags(arm)[1]


def test_cpu_runs_use_torch_adamw_and_gpu_or_offload_runs_deepspeeds():
    cfg = load_config(None, ["--deepspeed.config=zero2"])
    cpu = resolve_run(cfg, world_size=2, device=CPU_AVX2).deepspeed_config["optimizer"]["params"]
    assert cpu["torch_adam"] is True and cpu["fused"] is True  # no JIT-built DeepSpeed op on CPU
    gpu = resolve_run(cfg, world_size=2, device=DeviceInfo.gpu_target()).deepspeed_config["optimizer"]["params"]
    assert "torch_adam" not in gpu
    offload = resolve_run(load_config(None, ["--deepspeed.config=zero2-offload"]), world_size=2, device=CPU_AVX2)
    assert "torch_adam" not in offload.deepspeed_config["optimizer"]["params"]  # CPU Adam is the offload path
