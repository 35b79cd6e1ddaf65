"""`train.precision: auto`: bf16 where the device computes it natively, else fp32, with the reason.

On CPUs without native bf16 (AVX2-only x86, measured: AMD EPYC) PyTorch emulates bf16 and a step is
~4x slower than fp32, so "auto" must look at the device rather than assume a GPU. An explicit
precision always wins. The decision is pure (`choose_precision`); `detect_device` looks at the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# CPU flags (as /proc/cpuinfo and torch.cpu.get_capabilities name them) of bf16 arithmetic in hardware.
CPU_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "sve_bf16", "bf16")
# Present when a GPU driver is loaded (NVIDIA, or AMD's ROCm, which torch also reports as CUDA).
GPU_DRIVER_PATHS = ("/proc/driver/nvidia/gpus", "/dev/nvidia0", "/dev/kfd")


@dataclass(frozen=True)
class DeviceInfo:
    """What the processes of a run will compute on, as far as configuration cares."""

    has_cuda: bool
    native_bf16: bool
    name: str

    @classmethod
    def gpu_target(cls) -> DeviceInfo:
        """The assumed device of planning commands, which size runs for recent GPUs (bf16 capable)."""
        return cls(has_cuda=True, native_bf16=True, name="a CUDA GPU with bf16")


def detect_device() -> DeviceInfo:
    """This process's device: the first CUDA GPU when there is one, else the CPU.

    Torch is imported only on machines with a GPU driver: on CPU machines `bigmodel validate` and the
    launchers stay free of the ~3 s torch import, and the CPU's flags come from /proc/cpuinfo.
    """
    if any(Path(p).exists() for p in GPU_DRIVER_PATHS):
        import torch

        if torch.cuda.is_available():
            return DeviceInfo(True, bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name())
    name, flags = cpu_name_and_flags()
    return DeviceInfo(False, bool(flags & set(CPU_NATIVE_BF16_FLAGS)), f"CPU ({name})")


def cpu_name_and_flags(cpuinfo: str | None = None) -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (x86 "flags", Arm "Features") from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return _cpu_from_torch()
    name, flags = "unknown", set[str]()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and name == "unknown":
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, flags


def _cpu_from_torch() -> tuple[str, set[str]]:
    import torch

    capabilities: dict[str, object] = getattr(torch.cpu, "get_capabilities", dict)()
    return str(capabilities.get("cpu_name", "unknown")), {k for k, v in capabilities.items() if v is True}


def choose_precision(requested: str, device: DeviceInfo) -> tuple[str, str]:
    """(precision, reason) for a requested `train.precision`; only "auto" looks at the device."""
    if requested != "auto":
        return requested, "set in the config"
    if device.native_bf16:
        return "bf16", f"auto: {device.name} computes bf16 natively"
    return "fp32", f"auto: {device.name} has no native bf16 (emulated bf16 is several times slower than fp32 there: 4-9x measured on AVX2)"
