"""Functions the spawned ranks run (importable by module path, as spawn requires)."""

from __future__ import annotations


def train_and_collect(overrides: list[str]) -> dict:
    """Train with the real Trainer; return the losses of the steps this process ran (from metrics.jsonl:
    run with `--train.log_every=1` for one per step) and (rank 0) the full fp32 parameters."""
    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.metrics.jsonl import read_metrics
    from bigmodel_dist.model.engine import full_parameters
    from bigmodel_dist.training.session import open_trainer

    facts = facts_from_env()
    with open_trainer(load_config(None, overrides), facts) as trainer:
        first_step = trainer.state.step
        trainer.train()
        params = {name: tensor.float().numpy().copy() for name, tensor in full_parameters(trainer.runtime.engine).items()}
        run_dir = trainer.run_dir
    if not facts.is_main:
        return {"losses": None, "params": None}
    steps, losses = read_metrics(run_dir.metrics).series("loss")
    return {"losses": [loss for step, loss in zip(steps, losses) if step > first_step], "params": params}


def train_watching_self(overrides: list[str]) -> None:
    """Train as a Ray worker does: each rank its own hang watchdog (no launcher of ours above it)."""
    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.training.session import run_training

    run_training(load_config(None, overrides), facts_from_env(), watch_self=True)


def skip_one_step(overrides: list[str]) -> dict:
    """Train one step, then a second step whose loss is non-finite (BIGMODEL_FAULTS poisons its samples):
    the parameters and optimizer state after it, and after the first, on rank 0."""
    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.model.engine import full_parameters
    from bigmodel_dist.training.session import open_trainer

    def snapshot(trainer) -> dict:
        params = {name: t.numpy().copy() for name, t in full_parameters(trainer.runtime.engine).items()}
        optimizer_steps = [state.get("step") for state in trainer.runtime.engine.optimizer.state_dict().get(
            "state", {}).values() if isinstance(state, dict)]
        return {"params": params, "optimizer_steps": [float(s) for s in optimizer_steps if s is not None]}

    with open_trainer(load_config(None, overrides), facts_from_env()) as trainer:
        trainer.cfg.train.max_steps = 1
        trainer.train()
        before = snapshot(trainer)
        trainer.cfg.train.max_steps = 2
        trainer.train()
        after = snapshot(trainer)
        skipped = trainer.state.skipped_steps
    return {"before": before, "after": after, "skipped": skipped}


def train_and_crash(overrides: list[str], crash_point: str, crash_rank: int, crash_step: int) -> None:
    """Train, and SIGKILL rank `crash_rank` at `crash_point` of the save of step `crash_step`.

    Points, in save order: "shard_write" (half of one tensor file written), "before_checksums" (all
    shards written), "before_commit" (rank 0, metadata about to be written), "before_pointer" (rank 0,
    committed by rename, `latest` not yet updated).
    """
    import os
    import signal

    import bigmodel_dist.checkpoint.manager as manager
    from bigmodel_dist.core.distributed import facts_from_env

    partial = f".partial-step_{crash_step:08d}"

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if facts_from_env().rank == crash_rank:
        if crash_point == "shard_write":
            from bigmodel_dist.checkpoint import durable_file

            original_write = durable_file.DurableFile.write

            def write_then_die(self, data):  # a tensor's bytes reach the file, then the rank dies
                written = original_write(self, data)
                if partial in str(self.path) and len(memoryview(data)) >= durable_file.SMALL_WRITE_BYTES:
                    die()
                return written

            durable_file.DurableFile.write = write_then_die
        elif crash_point == "before_checksums":
            original = manager.describe_files
            manager.describe_files = lambda d, r: die() if partial in str(d) else original(d, r)
        elif crash_point == "before_commit":
            original_json = manager.write_json_atomically
            manager.write_json_atomically = lambda p, v: die() if partial in str(p) else original_json(p, v)
        elif crash_point == "before_pointer":
            original_text = manager.write_text_atomically
            committed = f"step_{crash_step:08d}"
            manager.write_text_atomically = lambda p, t: die() if t.strip() == committed else original_text(p, t)
    train_and_collect(overrides)


def build_under_zero3(overrides: list[str]) -> dict:
    """Create the Accelerator (ZeRO-3 plugin) and build the model as the Trainer does; report how
    much of each parameter this rank holds right after construction, before deepspeed.initialize."""
    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.model.build import build_model
    from bigmodel_dist.model.engine import create_accelerator
    from bigmodel_dist.run.resolve import resolve_run

    facts = facts_from_env()
    cfg = load_config(None, overrides)
    resolved = resolve_run(cfg, facts.world_size)
    create_accelerator(resolved.deepspeed_config, resolved.config.train.precision)
    model = build_model(cfg.model, cfg.seed)
    params = list(model.parameters())
    return {
        "partitioned": all(hasattr(p, "ds_id") for p in params),
        "local_numel": sum(p.ds_tensor.numel() for p in params),
        "full_numel": sum(p.ds_numel for p in params),
        "placeholder_numel": sum(p.numel() for p in params),  # what the module itself holds
    }


def full_training_state(engine) -> dict:
    """Every parameter's fp32 master weight and Adam moments as full numpy arrays, and Adam's step:
    what a resume must restore exactly, read the same way whatever the ZeRO stage. Collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 and bf16 link each parameter to its Adam moments at the first step, before torch's AdamW
        # creates them (lazily, in that step): link again now that they exist.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    masters = {}  # ZeRO-0 with bf16: DeepSpeed's unfused wrapper keeps fp32 copies beside the bf16 weights
    if not engine.zero_optimization() and hasattr(optimizer, "fp32_groups"):
        for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            masters.update({id(lp): hp for lp, hp in zip(low, high)})
    params = {}
    for name, param in engine.module.named_parameters():
        fp32 = safe_get_full_fp32_param(param)
        if fp32 is not None:
            moments = {key: safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq")}
        else:  # ZeRO-0: the optimizer holds the tensor itself (or its fp32 master)
            fp32 = masters.get(id(param), param)
            moments = {key: base.state[fp32][key] for key in ("exp_avg", "exp_avg_sq")}
        params[name] = {"fp32": fp32, **moments}
    steps = {float(state["step"]) for state in base.state.values() if "step" in state}
    return {"params": {name: {key: value.detach().float().cpu().numpy().copy() for key, value in states.items()}
                       for name, states in params.items()},
            "steps": sorted(steps)}


def train_then_collect_state(overrides: list[str]) -> dict | None:
    """Train (a checkpoint at the end), then return rank 0's full training state as the checkpoint holds it."""
    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.training.session import open_trainer

    facts = facts_from_env()
    with open_trainer(load_config(None, overrides), facts) as trainer:
        trainer.train()
        state = full_training_state(trainer.runtime.engine)
    return state if facts.is_main else None


def load_each_then_train(overrides: list[str], others: list[str]) -> dict | None:
    """Start a run that resumes from one checkpoint of another topology (the config's `checkpoint.resume`),
    then load each of `others` into the same engine as a rollback does; the full state after each load
    (rank 0), and the losses of the steps trained after the last."""
    from pathlib import Path

    from bigmodel_dist.checkpoint.choice import ResumePoint
    from bigmodel_dist.checkpoint.integrity import read_checkpoint_meta
    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.metrics.jsonl import read_metrics
    from bigmodel_dist.training.rollback import load_into
    from bigmodel_dist.training.session import open_trainer

    facts = facts_from_env()
    cfg = load_config(None, overrides)
    with open_trainer(cfg, facts) as trainer:
        states = {cfg.checkpoint.resume: full_training_state(trainer.runtime.engine)}
        for path in others:
            meta, error = read_checkpoint_meta(Path(path))
            assert meta is not None, error
            resume = ResumePoint(Path(path), meta)
            load_into(trainer.parts, resume)  # as a rollback loads
            states[path] = full_training_state(trainer.runtime.engine)
        first_step = trainer.state.step
        trainer.train()
        run_dir = trainer.run_dir
    if not facts.is_main:
        return None
    steps, losses = read_metrics(run_dir.metrics).series("loss")
    return {"states": states, "losses": [loss for step, loss in zip(steps, losses) if step > first_step]}
