"""Build a GPT-style causal LM from a preset through `transformers` configs (no hub download).

Call `build_model` after the Accelerator exists: with ZeRO-3 the DeepSpeed plugin has registered its
config with transformers, so `from_config` partitions parameters as they are created and initialises
them correctly (a bare `deepspeed.zero.Init()` around the constructor does not: initial loss ~85 for a
512-token vocabulary).
"""

from __future__ import annotations

import math
import zlib
from contextlib import nullcontext

import torch

from bigmodel_dist.config.presets import preset_kwargs
from bigmodel_dist.config.schema import ModelConfig


def build_transformers_config(model_cfg: ModelConfig, eos_token_id: int | None = None):
    from transformers import GPT2Config, LlamaConfig

    family, kwargs = preset_kwargs(model_cfg.preset, model_cfg.vocab_size, model_cfg.dropout)
    config_cls = GPT2Config if family == "gpt2" else LlamaConfig
    # Our tokenizer's EOS doubles as BOS (GPT-2 convention), so generation and export agree with training.
    config = config_cls(**kwargs, bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    config.use_cache = False  # training only; the KV cache costs memory
    return config


def build_model(model_cfg: ModelConfig, seed: int, eos_token_id: int | None = None) -> torch.nn.Module:
    """The model, initialised from `seed` (same weights whatever the ZeRO stage)."""
    from transformers import AutoModelForCausalLM

    config = build_transformers_config(model_cfg, eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.loss_type = "ForCausalLM"  # transformers warns on every build when this is unset
    init_weights_per_parameter(model, seed, config)
    if model_cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def init_weights_per_parameter(model: torch.nn.Module, seed: int, config) -> None:
    """Re-initialise every parameter from a generator seeded by (seed, parameter name).

    The same weights come out whatever the ZeRO stage or world size (ZeRO-3 builds partitioned parameters
    and draws random numbers in a different order than a plain build), so runs compare across stages.
    Scheme as in transformers: N(0, initializer_range), biases 0, norm weights 1, GPT-2's residual
    projections scaled by 1/sqrt(2 * layers).
    """
    std = config.initializer_range
    residual_std = std / math.sqrt(2 * config.num_hidden_layers)
    for name, param in model.named_parameters():
        with _gathered_for_write(param):  # collective under ZeRO-3: every rank, same order
            generator = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            with torch.no_grad():
                if name.endswith("bias"):
                    param.zero_()
                elif param.dim() == 1:
                    param.fill_(1.0)  # LayerNorm / RMSNorm gains
                else:
                    scale = residual_std if config.model_type == "gpt2" and name.endswith("c_proj.weight") else std
                    param.normal_(0.0, scale, generator=generator)


def _gathered_for_write(param: torch.nn.Parameter):
    if not hasattr(param, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, norms (1-D tensors) are not decayed."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # Under ZeRO-3 a partitioned parameter's .dim() is 1; ds_shape keeps the real shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        (decay if ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def param_group_names(model: torch.nn.Module, groups: list[dict]) -> list[list[str]]:
    """The parameters' names, group by group, in the optimizer's order: a ZeRO-0 checkpoint's optimizer
    state counts parameters by position only, and resharding it needs their names."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names[id(param)] for param in group["params"]] for group in groups]
