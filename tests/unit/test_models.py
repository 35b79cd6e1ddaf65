"""Presets build real transformers models; analytic parameter counts match them."""

from __future__ import annotations

import math

import pytest
import torch

from bigmodel_dist.config.presets import MODEL_PRESETS, count_parameters, flops_per_token, model_shape
from bigmodel_dist.config.schema import ModelConfig
from bigmodel_dist.model.build import build_model, build_transformers_config, weight_decay_groups


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_parameter_count_matches_the_built_model(preset):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no memory, no init: shapes only
        model = AutoModelForCausalLM.from_config(build_transformers_config(ModelConfig(preset=preset)))
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model_shape(preset))


def test_preset_sizes_are_what_their_names_say():
    expected = {"gpt2-124m": 124e6, "gpt2-350m": 355e6, "gpt2-1.3b": 1.3e9, "llama-7b": 6.74e9}
    for preset, size in expected.items():
        assert count_parameters(model_shape(preset)) == pytest.approx(size, rel=0.03)


def test_init_is_seeded_per_parameter_and_gives_uniform_initial_loss():
    cfg = ModelConfig(preset="llama-tiny", dropout=0.0)
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(next(build_model(cfg, seed=4).parameters()), next(a.parameters()))
    tokens = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = a(input_ids=tokens, labels=tokens).loss.item()
    assert abs(loss - math.log(512)) < 0.3


def test_weight_decay_skips_biases_and_norms():
    model = build_model(ModelConfig(preset="gpt2-tiny"), seed=0)
    decay, no_decay = weight_decay_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_flops_per_token_is_six_n_plus_attention():
    shape = model_shape("gpt2-124m")
    assert flops_per_token(shape, 1024) == 6 * count_parameters(shape) + 12 * 12 * 768 * 1024
