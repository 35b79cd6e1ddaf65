"""Accelerate + DeepSpeed: create the Accelerator (which starts the process group) and prepare the model.

Accelerate drives DeepSpeed; the backend follows the device (NCCL with CUDA, gloo on CPU, where
Accelerate alone would pick none and miscount the world size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

INT64_MAX = 2**63 - 1


@dataclass
class Runtime:
    accelerator: Any  # accelerate.Accelerator
    engine: Any  # deepspeed.DeepSpeedEngine (what accelerator.prepare returns for the model)
    optimizer: Any  # the prepared optimizer; its param_groups carry the learning rate

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def create_accelerator(ds_config: dict[str, Any], precision: str, timeout_s: int = 1800):
    """The Accelerator with its DeepSpeed plugin; creating it joins the process group."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    plugin = DeepSpeedPlugin(
        hf_ds_config=ds_config,
        zero3_init_flag=ds_config["zero_optimization"]["stage"] == 3,
    )
    mixed_precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=ds_config["gradient_accumulation_steps"],
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=timeout_s))],
    )
    if not torch.distributed.is_initialized():  # Accelerate skips it for one process; we always collect
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return accelerator


def prepare(accelerator, model: torch.nn.Module, param_groups: list[dict], lr: float) -> Runtime:
    """Wrap the model in a DeepSpeed engine; the optimizer comes from the DeepSpeed JSON's block."""
    from accelerate.utils import DummyOptim

    engine, optimizer = accelerator.prepare(model, DummyOptim(param_groups, lr=lr))
    return Runtime(accelerator=accelerator, engine=engine, optimizer=optimizer)


def load_universal_checkpoints(accelerator) -> None:
    """Make the engine about to be built load universal checkpoints (other world size or ZeRO stage).

    Must run before `prepare`: DeepSpeed reads the flag when it builds the optimizer.
    """
    accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True


def set_universal_loading(engine, universal: bool) -> None:
    """Whether the built engine's next load reads a universal checkpoint: a rollback may load a native
    checkpoint after a start-up that loaded a universal one, or the other way round."""
    engine._config.load_universal_checkpoint = universal


def restart_accumulation_count(accelerator) -> None:
    """Start Accelerate's micro-step counter, which places accumulation boundaries, from zero.

    `load_state` restores the saved count; a resume happens at a boundary, and with another world size
    the old count would misplace them.
    """
    accelerator.step = 0


def replace_checkpoint_engine(engine, make: Callable[[Any], Any]) -> None:
    """Give the engine another checkpoint engine, `make(deepspeed_config_object)` (e.g. async writes)."""
    engine.checkpoint_engine = make(engine._config)


def deepspeed_config_as_run(engine) -> dict[str, Any]:
    """The DeepSpeed JSON the engine was built from, after Accelerate filled in its values, as strict
    JSON (Accelerate sets `steps_per_print` to infinity, which JSON cannot hold: the largest int64)."""
    return _finite(engine.config)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return INT64_MAX if value > 0 else -INT64_MAX
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def set_learning_rate(runtime: Runtime, lr: float) -> None:
    for group in runtime.optimizer.param_groups:
        group["lr"] = lr


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """Every parameter as a full fp32 CPU tensor (the optimizer's master copy where there is one).

    Collective under ZeRO-3 (gathers partitions): call it on every rank.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    full = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param)
        full[name] = (master if master is not None else param.data).detach().float().cpu()
    return full


def unshare_optimizer_steps(engine) -> None:
    """Give every optimizer state its own `step` counter after a universal-checkpoint load.

    DeepSpeed's ZeRO-3 universal load assigns one `step` tensor object to every parameter group's state;
    torch's AdamW increments `step` in place per state, so with two groups (decay, no decay) it counted
    two per step and the bias correction drifted (2.6e-3 in loss after 2 steps, measured). Harmless for
    optimizers that keep the step in their param groups (DeepSpeed's fused Adam).
    """
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen: set[int] = set()
    for state in base.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def skips_non_finite_steps(engine) -> bool:
    """DeepSpeed's ZeRO and mixed-precision optimizers skip a step whose gradients are not finite (their
    `overflow` path clears the gradients too); a plain optimizer (ZeRO-0 in fp32) would apply it."""
    return hasattr(engine.optimizer, "overflow")


def backward_without_step(engine, loss) -> None:
    """The last micro-step of a step that must not be applied, for an optimizer without an overflow path:
    the backward runs (its collectives are every rank's), the gradients are dropped, no optimizer step."""
    engine.set_gradient_accumulation_boundary(is_boundary=True)
    engine.backward(loss)
    engine.zero_grad()
