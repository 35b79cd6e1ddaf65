"""Functions the spawned ranks run (importable by module path, as spawn requires)."""

from __future__ import annotations


def train_and_collect(overrides: list[str]) -> dict:
    """Train with the real Trainer; return per-step losses and (rank 0) the full fp32 parameters."""
    from bigmodel_dist.config import load_config
    from bigmodel_dist.config.validate import resolve_run
    from bigmodel_dist.distributed import facts_from_env
    from bigmodel_dist.runtime import full_parameters
    from bigmodel_dist.trainer import Trainer

    facts = facts_from_env()
    cfg = load_config(None, overrides)
    trainer = Trainer(resolve_run(cfg, facts.world_size), facts)
    state = trainer.train()
    params = {name: tensor.float().numpy().copy() for name, tensor in full_parameters(trainer.runtime.engine).items()}
    trainer.close()
    return {"losses": state.losses, "params": params if facts.is_main else None}
