"""One universal-checkpoint layout whatever ZeRO stage wrote the checkpoint, and ZeRO-0's files in and out.

A universal checkpoint (DeepSpeed's format) holds, per parameter, `zero/<name>/{fp32,exp_avg,exp_avg_sq,
step}.pt` and, for the optimizer's shared state, `zero/optimizer_state.pt`. DeepSpeed's conversion writes
it differently per source stage, and each stage's loader reads only some of it:
- from ZeRO-3: flat tensors and no step files (the step is in optimizer_state.pt); ZeRO-1/2's loader
  wants `{"param": tensor}` of the parameter's shape, a step file and a `ds_version`;
- from ZeRO-1/2: no `optimizer_state_dict`, which ZeRO-3's loader reads the step from;
- ZeRO-0 (no ZeRO optimizer) has neither a conversion nor a universal loader: its one model-states
  file holds the weights and the optimizer's state dict (torch AdamW's, or with bf16 DeepSpeed's
  unfused wrapper around it with the fp32 master weights).
`normalize` makes a converted folder readable by every ZeRO stage; `stage0_to_universal` and
`universal_to_stage0` read and write ZeRO-0's files, whose parameters are named from `param_shapes`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from bigmodel_dist.core.errors import UserInputError

PARAM = "param"  # the key DeepSpeed's universal files keep a tensor under
STATES = ("fp32", "exp_avg", "exp_avg_sq")  # per parameter; Adam's moments beside the master weights
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2: one model-states file for all ranks
ParamShapes = list[dict[str, torch.Size]]  # per optimizer group, its parameters' names and shapes in order


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def param_shapes(tag_dir: Path) -> ParamShapes:
    """The optimizer groups' parameter names and shapes, as the model-states files record them."""
    for path in sorted(tag_dir.glob("*model_states.pt")):
        shapes = _load(path).get("param_shapes")
        if shapes:
            return [dict(group) for group in shapes]
    raise UserInputError(f"checkpoint {tag_dir}: no model-states file records the parameters' shapes; resume on the "
                         "ZeRO stage and world size it was written with")


def normalize(tag_dir: Path, shapes: ParamShapes) -> None:
    """Rewrite a converted folder so that ZeRO-1, -2 and -3 all load it (see the module doc)."""
    import deepspeed

    zero = tag_dir / "zero"
    optimizer_state = _load(zero / "optimizer_state.pt")
    step = _step_of(zero, shapes, optimizer_state)
    for group in shapes:
        for name, shape in group.items():
            for key in STATES:
                path = zero / name / f"{key}.pt"
                saved = _load(path)
                tensor = saved[PARAM] if isinstance(saved, dict) else saved
                if not isinstance(saved, dict) or tensor.shape != shape:
                    torch.save({PARAM: tensor.reshape(shape)}, path)
            if not (zero / name / "step.pt").exists():
                torch.save(step, zero / name / "step.pt")
    optimizer_state.setdefault("ds_version", deepspeed.__version__)
    optimizer_state.setdefault("optimizer_state_dict",
                               {"state": {0: {"step": step}}, "param_groups": optimizer_state["param_groups"]})
    torch.save(optimizer_state, zero / "optimizer_state.pt")


def _step_of(zero: Path, shapes: ParamShapes, optimizer_state: dict[str, Any]) -> torch.Tensor:
    """Adam's step count: in optimizer_state.pt (from ZeRO-3) or in any parameter's step file."""
    if "optimizer_state_dict" in optimizer_state:
        step = optimizer_state["optimizer_state_dict"]["state"][0]["step"]
    else:
        step = _load(zero / next(iter(shapes[0])) / "step.pt")
    return torch.as_tensor(step, dtype=torch.float32).clone()


def stage0_to_universal(source_tag_dir: Path, out_tag_dir: Path, shapes: ParamShapes) -> None:
    """A ZeRO-0 checkpoint (fp32 AdamW, or bf16 with DeepSpeed's fp32 master weights) as a universal folder."""
    states = _load(source_tag_dir / MODEL_STATES)
    saved = states["optimizer"]
    if saved is None or not ({"state", "param_groups"} <= saved.keys() or "fp32_groups" in saved):
        raise UserInputError(f"checkpoint {source_tag_dir}: a ZeRO-0 optimizer state of an unknown kind; resume on "
                             "the ZeRO stage it was written with")
    bf16 = "fp32_groups" in saved
    adam = saved["optimizer_state_dict"] if bf16 else saved
    if [len(group) for group in shapes] != [len(group["params"]) for group in adam["param_groups"]]:
        raise UserInputError(f"checkpoint {source_tag_dir}: its optimizer groups do not match the model's parameters")
    zero = out_tag_dir / "zero"
    index = 0
    step = torch.zeros(())
    for group_index, group in enumerate(shapes):
        for position, name in enumerate(group):
            master = saved["fp32_groups"][group_index][position] if bf16 else states["module"][name]
            state = adam["state"].get(index, {})
            step = torch.as_tensor(state.get("step", 0.0), dtype=torch.float32).clone()
            values = {"fp32": master, "exp_avg": state.get("exp_avg"), "exp_avg_sq": state.get("exp_avg_sq")}
            (zero / name).mkdir(parents=True)
            for key, value in values.items():
                value = torch.zeros_like(master) if value is None else value  # no step taken yet
                torch.save({PARAM: value.detach().float().reshape(group[name])}, zero / name / f"{key}.pt")
            torch.save(step, zero / name / "step.pt")
            index += 1
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [i]} for i, g in enumerate(adam["param_groups"])]
    torch.save({"ds_version": states.get("ds_version"), "param_groups": groups,
                "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}},
               zero / "optimizer_state.pt")
    states["param_shapes"] = shapes
    torch.save(states, out_tag_dir / MODEL_STATES)


def universal_to_stage0(universal_tag_dir: Path, out_tag_dir: Path, precision: str) -> None:
    """A native ZeRO-0 model-states file for `precision` from a normalized universal folder, which
    DeepSpeed then loads as its own (no universal loader exists for ZeRO-0)."""
    if precision not in ("fp32", "bf16"):
        raise UserInputError(f"checkpoint {universal_tag_dir}: resuming at ZeRO-0 from another stage works in fp32 and "
                             f"bf16, not {precision}; resume at the ZeRO stage it was written with")
    shapes = param_shapes(universal_tag_dir)
    zero = universal_tag_dir / "zero"
    source = _load(next(iter(sorted(universal_tag_dir.glob("*model_states.pt")))))
    saved_groups = _load(zero / "optimizer_state.pt")["param_groups"]
    module: dict[str, torch.Tensor] = {}
    masters: list[list[torch.Tensor]] = []
    adam_state: dict[int, dict[str, torch.Tensor]] = {}
    adam_groups = []
    index = 0
    for group, saved in zip(shapes, saved_groups, strict=True):
        masters.append([])
        adam_groups.append({k: v for k, v in saved.items() if k != "params"} | {"params": []})
        for name in group:
            values = {key: _load(zero / name / f"{key}.pt")[PARAM] for key in STATES}
            step = torch.as_tensor(_load(zero / name / "step.pt"), dtype=torch.float32).clone()
            masters[-1].append(values["fp32"])
            module[name] = values["fp32"].to(torch.bfloat16 if precision == "bf16" else torch.float32)
            adam_state[index] = {"step": step, "exp_avg": values["exp_avg"], "exp_avg_sq": values["exp_avg_sq"]}
            adam_groups[-1]["params"].append(index)
            index += 1
    for buffer in source.get("buffer_names") or []:  # buffers are in every stage's module state
        module[buffer] = source["module"][buffer]
    for tied, owner in (source.get("shared_params") or {}).items():
        module[tied] = module[owner]
    adam = {"state": adam_state, "param_groups": adam_groups}
    optimizer = adam if precision == "fp32" else {"dynamic_loss_scale": False, "cur_scale": 1.0, "cur_iter": 0,
                                                  "optimizer_state_dict": adam, "fp32_groups": masters}
    states = dict(source, module=module, optimizer=optimizer, param_shapes=None)
    torch.save(states, out_tag_dir / MODEL_STATES)


def copy_rng_states(source_dir: Path, out_dir: Path) -> None:
    """Ranks that existed before keep their RNG streams (Accelerate's per-process files)."""
    for rng in source_dir.glob("random_states_*.pkl"):
        shutil.copy2(rng, out_dir / rng.name)
