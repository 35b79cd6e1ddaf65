"""`bigmodel`: train | launch local|slurm|ray | check | validate | prepare | export | plot. Heavy imports stay inside the commands that need them.

Every user error (config, file) prints one line and exits 2 before any process group starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from bigmodel_dist.core.env import PROGRESS_DIR
from bigmodel_dist.core.errors import EXIT_RUN_FAILED, RunFailedError, UserInputError
from launcher.preflight import prepare_for, resume_override
from launcher.user_errors import print_error, report_user_errors

if TYPE_CHECKING:
    from bigmodel_dist.run.planner import Hardware
    from bigmodel_dist.run.resolve import ResolvedRun

OVERRIDES_HELP = "dotted overrides after the config, e.g. --train.max_steps=20 --deepspeed.config=zero3"


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    return report_user_errors(lambda: args.handler(args, _split_overrides(extra)))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigmodel", description="GPT pretraining on DeepSpeed ZeRO, any launcher.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run the trainer inside an already-started process group",
                                epilog=OVERRIDES_HELP)
    train.add_argument("config", help="YAML run config, e.g. configs/gpt2-tiny.yaml")
    train.add_argument("--resume", help="latest (default), none, or a checkpoint directory")
    train.set_defaults(handler=_cmd_train)

    validate = commands.add_parser("validate", help="check a config and print its derived figures",
                                   epilog=OVERRIDES_HELP)
    validate.add_argument("config")
    validate.add_argument("--world-size", type=int, default=1, help="data-parallel ranks to plan for")
    validate.add_argument("--gpu-memory", default="80GiB", help="memory per GPU for the fit check (default 80GiB)")
    validate.set_defaults(handler=_cmd_validate)

    plan = commands.add_parser("plan", help="per-GPU memory, best ZeRO stage and step time for N GPUs",
                               epilog=OVERRIDES_HELP)
    plan.add_argument("config")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in total (= data-parallel ranks)")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpu-memory", default="80GiB", help="memory per GPU, e.g. 80GiB, 141GB (default 80GiB)")
    plan.add_argument("--cpu-memory", default="1TiB", help="host memory per node (default 1TiB)")
    plan.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (default H100: 989)")
    plan.add_argument("--activation-checkpointing", choices=["on", "off"], help="default: the config's setting")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(handler=_cmd_plan)

    prepare = commands.add_parser("prepare", help="tokenise and pack the config's corpus into token shards",
                                  epilog=OVERRIDES_HELP)
    prepare.add_argument("config")
    prepare.add_argument("--out", help="prepared folder (sets data.prepared_dir); default: derived in the cache")
    prepare.add_argument("--on", choices=["local", "ray"], default="local",
                         help="local: in this process (default); ray: shards written by Ray tasks on the cluster "
                         "this process joins as driver (see --address)")
    prepare.add_argument("--address", help="with --on ray: the cluster's GCS, HEAD:6379 (default: RAY_ADDRESS, or "
                         "the cluster of this node)")
    prepare.set_defaults(handler=_cmd_prepare)

    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face folder (safetensors)")
    export.add_argument("checkpoint", help="a step folder, e.g. runs/NAME/checkpoints/step_00000100")
    export.add_argument("out_dir", help="new (or empty) folder for config.json, weights and tokenizer")
    export.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype (default fp32)")
    export.set_defaults(handler=_cmd_export)

    plot = commands.add_parser("plot", help="PNG of loss, eval loss, tokens/s and lr from a run's metrics.jsonl")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="PNG path (default RUN_DIR/metrics.png)")
    plot.set_defaults(handler=_cmd_plot)

    check = commands.add_parser("check", help="node health check: matmul, memory, all-reduce bus bandwidth "
                                "(exit resilience.bad_node_exit_code for a bad node)", epilog=OVERRIDES_HELP)
    check.add_argument("config")
    check.add_argument("--nproc-per-node", type=int, default=None, help="processes here (default: GPUs, or 2 on CPU)")
    check.add_argument("--nnodes", type=int, default=1)
    check.add_argument("--node-rank", type=int, default=0)
    check.add_argument("--master-addr", default="127.0.0.1")
    check.add_argument("--master-port", type=int, default=29500)
    check.set_defaults(handler=_cmd_check)

    launch = commands.add_parser("launch", help="start processes on an allocation")
    backends = launch.add_subparsers(dest="backend", required=True)
    local = backends.add_parser("local", help="torchrun on this machine", epilog=OVERRIDES_HELP)
    local.add_argument("config")
    local.add_argument("--resume", help="latest (default), none, or a checkpoint directory")
    local.add_argument("--nproc-per-node", type=int, default=None, help="processes here (default: GPUs, or 2 on CPU)")
    local.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for elastic training (torchrun's "
                       "elastic rendezvous: a node that fails leaves, the rest go on; run this once per node)")
    local.add_argument("--node-rank", type=int, default=0, help="this node's rank (fixed --nnodes only)")
    local.add_argument("--master-addr", default="127.0.0.1")
    local.add_argument("--master-port", type=int, default=29500)
    local.add_argument("--max-restarts", type=int, default=3, help="worker-group restarts after a failure or a "
                       "membership change (elastic --nnodes)")
    local.add_argument("--rdzv-conf", default="", help="torchrun's --rdzv-conf, e.g. last_call_timeout=10")
    local.set_defaults(handler=_cmd_launch_local)

    slurm = backends.add_parser("slurm", help="sbatch slurm/pretrain_gpt.sh on this cluster", epilog=OVERRIDES_HELP)
    slurm.add_argument("config")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="GPUs (= processes) per node; 0 on CPU nodes")
    slurm.add_argument("--nproc-per-node", type=int, default=0, help="processes per node when it is not the GPU count")
    slurm.add_argument("--time", help="sbatch --time, e.g. 24:00:00")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--sbatch-arg", action="append", default=[], help="passed to sbatch as is (repeatable)")
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch command, submit nothing")
    slurm.add_argument("--gpu-memory", default="80GiB", help="memory per GPU, for the fit warning (default 80GiB)")
    slurm.set_defaults(handler=_cmd_launch_slurm)

    from launcher.ray.submit import add_parser as add_ray_parser

    add_ray_parser(backends)
    return parser


def _split_overrides(extra: list[str]) -> list[str]:
    for item in extra:
        if not (item.startswith("--") and "=" in item):
            raise UserInputError(f"unrecognised argument {item!r}; overrides look like --section.field=value")
    return extra


def _cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from bigmodel_dist.core.env import STOP_FILE
    from bigmodel_dist.ft.preemption import StopSignals

    # First, before the heavy imports: a stop signal from the first second on is remembered, not fatal.
    signals = StopSignals(stop_file=os.environ.get(STOP_FILE))
    from bigmodel_dist.metrics.startup import StartupClock

    clock = StartupClock()
    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env, first_line, lost_peers, torchrun_env_from_slurm
    from launcher.logs import setup_logging

    os.environ.update(torchrun_env_from_slurm(os.environ))  # srun's one-task-per-GPU mode
    if "WORLD_SIZE" not in os.environ:  # plain `bigmodel train`: a process group of one on loopback
        from launcher.ports import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    facts = facts_from_env()
    setup_logging(facts.rank, facts.world_size)
    # Under `accelerate launch --config_file configs/accelerate/zeroN.yaml` the DeepSpeed JSON comes from
    # the Accelerate config; explicit CLI overrides still win.
    accelerate_json = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if accelerate_json:
        overrides = [f"--deepspeed.config={accelerate_json}", *overrides]
    overrides = [*overrides, *resume_override(args)]
    cfg = load_config(args.config, overrides)
    signals.watch(cfg.checkpoint.stop_signals)
    clock.dump_stacks_after(cfg.logging.startup_stacks_after_s)  # a stuck import shows where it waits
    from bigmodel_dist.training.session import run_training

    clock.mark("imports + config")
    try:
        # No launcher of ours above (srun one task per GPU, accelerate launch): each rank watches itself.
        supervised = bool(os.environ.get(PROGRESS_DIR))
        state = run_training(cfg, facts, signals=signals, clock=clock, watch_self=not supervised)
    except RunFailedError as exc:  # e.g. a full disk: one line naming the rank, path and cause
        if facts.is_main or not exc.on_every_rank:
            print_error(exc)
        return EXIT_RUN_FAILED
    except Exception as exc:
        if facts.world_size == 1 or not lost_peers(exc):
            raise
        # Another rank died first (its own line says why) and this one's collective broke: one line, not a
        # page of gloo/NCCL frames that hides the cause.
        print_error(RunFailedError(f"rank {facts.rank}: lost contact with the other ranks ({first_line(exc)}); the "
                                   "first error above is the cause"))
        return EXIT_RUN_FAILED
    if not (state.stop_reason or signals.received):
        return 0
    # `launch local` reads the run's STOPPED marker and exits with the requeue code itself; a worker's
    # non-zero exit would only make torchrun print a failure report.
    return 0 if facts.stop_file else cfg.checkpoint.requeue_exit_code


def _cmd_validate(args: argparse.Namespace, overrides: list[str]) -> int:
    from bigmodel_dist.config import load_config
    from bigmodel_dist.run.planner import fit_warning, parse_bytes
    from bigmodel_dist.run.resolve import resolve_run

    resolved = resolve_run(load_config(args.config, overrides), args.world_size)
    print(format_summary(resolved))
    warning = fit_warning(resolved, args.world_size, parse_bytes(args.gpu_memory, "--gpu-memory"))
    print(f"warning: {warning}" if warning else f"plan: fits GPUs of {args.gpu_memory} (bigmodel plan for details)")
    return 0


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    from bigmodel_dist.run.planner import Hardware, parse_bytes

    if args.gpus < 1:
        raise UserInputError(f"--gpus must be >= 1, got {args.gpus}")
    if args.nodes < 1 or args.gpus % args.nodes:
        raise UserInputError(f"--nodes {args.nodes} must be >= 1 and divide --gpus {args.gpus}")
    if args.peak_tflops <= 0:
        raise UserInputError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    return Hardware(gpus=args.gpus, nodes=args.nodes, gpu_memory=parse_bytes(args.gpu_memory, "--gpu-memory"),
                    cpu_memory=parse_bytes(args.cpu_memory, "--cpu-memory"), peak_tflops=args.peak_tflops)


def _cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    import json

    from bigmodel_dist.config import load_config
    from bigmodel_dist.run.planner import GIB, format_table, plan_run, recommend, variant_of
    from bigmodel_dist.run.precision import DeviceInfo
    from bigmodel_dist.run.resolve import resolve_run

    hw = hardware_from_args(args)
    resolved = resolve_run(load_config(args.config, overrides), hw.gpus, DeviceInfo.gpu_target())
    checkpointing = None if args.activation_checkpointing is None else args.activation_checkpointing == "on"
    plans = plan_run(resolved, hw, checkpointing)
    best = recommend(plans)
    if args.json:
        print(json.dumps({"model": resolved.config.model.preset, "parameters": resolved.num_parameters,
                          "gpus": hw.gpus, "nodes": hw.nodes, "gpu_memory_gib": hw.gpu_memory / GIB,
                          "configured": variant_of(resolved.deepspeed_config).name,
                          "recommended": best.variant if best else None,
                          "plans": [p.as_dict() for p in plans]}, indent=2))
    else:
        print(f"{resolved.config.model.preset}: {resolved.num_parameters / 1e6:,.1f}M parameters, "
              f"{resolved.config.train.precision}, seq {resolved.config.data.seq_len}, micro-batch "
              f"{resolved.layout.micro_batch_size}; configured: {variant_of(resolved.deepspeed_config).name}")
        print(format_table(plans, hw, best))
    return 0


def _cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from bigmodel_dist.config import load_config
    from bigmodel_dist.run.resolve import resolve_run
    from launcher.logs import setup_logging

    setup_logging()
    if args.out:
        overrides = [*overrides, f"--data.prepared_dir={args.out}"]
    resolved = resolve_run(load_config(args.config, overrides), world_size=1)
    if args.address and args.on != "ray":
        raise UserInputError("prepare --address is the Ray cluster of --on ray; add --on ray or drop --address")
    if args.on == "ray":  # the shards on the cluster; below, only the folders' checks
        from launcher.ray.prepare import prepare_on_ray

        prepare_on_ray(resolved.config, resolved.shape.vocab_size, args.address)
    from bigmodel_dist.data.dataset import PackedDataset

    for name, prepared in prepare_for(resolved):
        data = PackedDataset(prepared, verify="checksum")  # prepare doubles as the check of existing data
        source = f"source {name}: " if resolved.config.data.sources else ""
        print(f"{source}{prepared}: {len(data.train)} train + {len(data.val)} val sequences of {data.seq_len} tokens")
    return 0


def format_summary(resolved: ResolvedRun) -> str:
    cfg, layout = resolved.config, resolved.layout
    memory = resolved.model_state_bytes_per_rank()
    gib = 2**30
    rows = [
        ("run dir", str(resolved.run_dir)),
        ("model", f"{cfg.model.preset} ({resolved.shape.family}), {resolved.num_parameters:,} parameters"),
        ("sequence length", cfg.data.seq_len),
        ("world size (data parallel)", layout.data_parallel_size),
        ("global batch", f"{layout.global_batch_size} sequences = micro {layout.micro_batch_size} x grad accum "
                         f"{layout.grad_accum_steps} x dp {layout.data_parallel_size}"),
        ("tokens per step", f"{resolved.tokens_per_step:,}"),
        ("max steps / tokens", f"{cfg.train.max_steps} / {cfg.train.max_steps * resolved.tokens_per_step:,}"),
        ("precision", f"{cfg.train.precision} ({resolved.precision_reason})"),
        ("DeepSpeed", f"ZeRO-{resolved.zero_stage} from {resolved.deepspeed_source}"),
        ("model states per rank", f"{memory['total'] / gib:.3f} GiB (params {memory['params'] / gib:.3f}, grads "
                                  f"{memory['grads'] / gib:.3f}, optimizer {memory['optimizer'] / gib:.3f})"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"note: {note}" for note in resolved.deepspeed_notes]
    return "\n".join(lines)


def _cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    from pathlib import Path

    from bigmodel_dist.checkpoint.export import export_checkpoint
    from launcher.logs import setup_logging

    if overrides:
        raise UserInputError(f"export takes no config overrides, got {overrides[0]!r}")
    setup_logging()
    # Relative folders mean where the command ran, like every path of a config (config/paths.py).
    print(export_checkpoint(Path(os.path.abspath(args.checkpoint)), Path(os.path.abspath(args.out_dir)),
                            dtype=args.dtype))
    return 0


def _cmd_plot(args: argparse.Namespace, overrides: list[str]) -> int:
    from pathlib import Path

    from bigmodel_dist.core.run_dir import RunDir
    from bigmodel_dist.metrics.plot import plot_run
    from launcher.logs import setup_logging

    setup_logging()
    run_dir = RunDir(Path(os.path.abspath(args.run_dir)))
    if not run_dir.metrics.is_file():
        raise UserInputError(f"{run_dir}: no metrics.jsonl; give a run directory such as runs/gpt2-tiny")
    print(plot_run(run_dir, Path(args.out) if args.out else None))
    return 0


def _cmd_check(args: argparse.Namespace, overrides: list[str]) -> int:
    from launcher.check import check_nodes

    return check_nodes(args, overrides)


def _cmd_launch_slurm(args: argparse.Namespace, overrides: list[str]) -> int:
    from launcher.slurm.submit import launch_slurm

    return launch_slurm(args, overrides)


def _cmd_launch_local(args: argparse.Namespace, overrides: list[str]) -> int:
    from launcher.local.launch import launch_local

    return launch_local(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
