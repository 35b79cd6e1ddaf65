"""Per-GPU memory and step-time plan of a run, for every ZeRO stage and offload choice, before any GPU.

Model states follow the ZeRO paper (16Psi at stage 0; partitions of optimizer, then gradients, then
parameters over N ranks) adjusted to what DeepSpeed really allocates (measured by
benchmarks/planner_accuracy.py):
- ZeRO-1 already keeps only the rank's gradient partition, as ZeRO-2 does;
- mixed precision (bf16/fp16): 2-byte params and grads, 12 bytes of fp32 master + Adam moments (no
  persistent fp32 gradient partition, which DeepSpeed's own estimator counts);
- fp32: 4-byte params and grads, 8 bytes of Adam moments, and at ZeRO 1-3 one more fp32 master copy of
  the rank's partition (+4 Psi/N);
- buckets: the reduce bucket (`reduce_bucket_size` elements), and at ZeRO-3 the prefetch bucket and the
  gathered working set (about two of the largest layers).
Activations follow Korthikanti et al. 2022 (34*s*b*h bytes per layer with 16-bit activations and fused
attention; only layer inputs with activation checkpointing) plus the logits and the loss' fp32 copies.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from bigmodel_dist.config.presets import ModelShape, count_parameters, flops_per_token
from bigmodel_dist.core.errors import UserInputError

if TYPE_CHECKING:  # validate imports this module (model-state figures) when it runs
    from bigmodel_dist.run.resolve import ResolvedRun

GIB = 2**30
CUDA_CONTEXT_BYTES = 1.0 * GIB  # CUDA context + NCCL communicators + cuBLAS workspaces, per GPU (typical)
ALLOCATOR_SLACK = 1.10  # PyTorch caching-allocator fragmentation on the tensors' total
ASSUMED_COMPUTE_EFFICIENCY = 0.55  # achieved ÷ peak FLOP/s of the matmuls of a well-sized GPT step
NVME_STAGING_BYTES = 4 * GIB  # pinned CPU buffers of DeepSpeed's NVMe swapper per node (order of magnitude)


@dataclass(frozen=True)
class Hardware:
    gpus: int
    nodes: int = 1
    gpu_memory: float = 80 * GIB
    cpu_memory: float = 1024 * GIB  # per node
    peak_tflops: float = 989.0  # dense bf16 per GPU (H100/H200)
    intra_node_gbps: float = 450.0  # GB/s per GPU (NVLink)
    inter_node_gbps: float = 50.0  # GB/s per GPU (400 Gb/s InfiniBand)

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes


@dataclass(frozen=True)
class Variant:
    stage: int
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_params: str = "none"  # none | cpu | nvme (ZeRO-3 only)

    @property
    def name(self) -> str:
        parts = [f"ZeRO-{self.stage}"]
        if self.offload_optimizer != "none":
            parts.append(f"optimizer->{self.offload_optimizer}")
        if self.offload_params != "none":
            parts.append(f"params->{self.offload_params}")
        return " ".join(parts)


VARIANTS = (
    Variant(0), Variant(1), Variant(2), Variant(2, "cpu"), Variant(3), Variant(3, "cpu"), Variant(3, "cpu", "cpu"),
    Variant(3, "nvme", "nvme"),
)


@dataclass(frozen=True)
class Buckets:
    """DeepSpeed's bucket sizes in elements (from the resolved ds_config)."""

    reduce: float
    prefetch: float = 0.0
    max_live: float = 1e9


@dataclass
class MemoryPlan:
    variant: str
    gpu: dict[str, float] = field(default_factory=dict)  # bytes per GPU by component, "total" included
    cpu_per_node: float = 0.0
    fits: bool = False
    max_micro_batch: int = 0
    step_time_s: float = 0.0
    mfu: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mixed(precision: str) -> bool:
    """bf16/fp16: 2-byte params, grads and activations with an fp32 master copy."""
    return precision in ("bf16", "fp16")


def parse_bytes(text: str, what: str) -> float:
    """'80GiB', '80GB', '141 GiB', '512G' -> bytes; a clear error otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise UserInputError(f"{what}: cannot read {text!r} as a memory size; write e.g. 80GiB, 141GB or 512G")
    unit = match[2].upper()
    base = 1000 if match[3].upper() == "B" and unit else 1024  # "GB" is decimal; "GiB" and "G" binary
    return float(match[1]) * base ** " KMGT".index(unit or " ")


def _optimizer_bytes_per_param(precision: str, stage: int) -> int:
    """Adam m + v (8) and an fp32 master (mixed precision; for fp32, the extra copy DeepSpeed keeps at
    ZeRO >= 1). DeepSpeed's estimator also counts a 4-byte fp32 gradient partition at ZeRO 1-2;
    measured, it does not stay allocated."""
    return 8 + (4 if _mixed(precision) or stage >= 1 else 0)


def model_states(num_params: int, variant: Variant, precision: str, dp: int) -> tuple[dict[str, float], float]:
    """(GPU bytes by kind, CPU bytes) of params, grads and optimizer states for one rank."""
    n, s = float(num_params), variant.stage
    mixed = _mixed(precision)
    param_b, grad_b = (2, 2) if mixed else (4, 4)
    optim_b = _optimizer_bytes_per_param(precision, s)
    params = n * param_b / (dp if s >= 3 else 1)
    # DeepSpeed's ZeRO-1 reduces gradients bucket by bucket into the rank's partition, like ZeRO-2
    # (measured: ZeRO-1 and ZeRO-2 hold the same bytes), not the paper's full copy per rank.
    grads = n * grad_b / (dp if s >= 1 else 1)
    optim = n * optim_b / (dp if s >= 1 else 1)
    cpu = 0.0
    if variant.offload_optimizer != "none":  # master, moments and fp32 grads live on the host
        cpu += optim + (n * 4 / dp if s >= 2 and not mixed else 0.0)
        optim = 0.0
        grads = 0.0 if s >= 2 else grads
    if variant.offload_params != "none":
        cpu += params
        params = 0.0
    if variant.offload_optimizer == "nvme":
        cpu = 0.0  # on disk; staging buffers are counted per node
    return {"params": params, "grads": grads, "optimizer": optim}, cpu


def largest_layer_params(shape: ModelShape) -> int:
    """Parameters of the largest module ZeRO-3 gathers at once (the embedding or one block)."""
    d = shape.hidden_size
    block = count_parameters(ModelShape(**{**asdict(shape), "num_layers": 1})) - count_parameters(
        ModelShape(**{**asdict(shape), "num_layers": 0}))
    return max(block, shape.vocab_size * d)


def bucket_bytes(variant: Variant, buckets: Buckets, precision: str, shape: ModelShape) -> float:
    grad_b = 2 if _mixed(precision) else 4
    if variant.stage == 0:
        return 0.0
    total = buckets.reduce * grad_b
    if variant.stage == 3:
        working = min(buckets.max_live, 2 * largest_layer_params(shape))
        total += (buckets.prefetch + working) * grad_b
    return total


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, precision: str, checkpointing: bool) -> float:
    s, b, h, L, V = seq_len, micro_batch, shape.hidden_size, shape.num_layers, shape.vocab_size
    scale = 1.0 if _mixed(precision) else 2.0  # the 34sbh rule counts 16-bit activations
    per_layer = 34 * s * b * h * scale
    layers = L * 2 * s * b * h * scale + per_layer if checkpointing else L * per_layer
    logits = s * b * V * (2 * scale + 4 + 4)  # logits, their fp32 copy for the loss, and its gradient
    return layers + logits


def step_time(shape: ModelShape, num_params: int, seq_len: int, tokens_per_gpu_step: int, variant: Variant,
              precision: str, hw: Hardware, checkpointing: bool) -> tuple[float, float]:
    """(seconds, MFU): matmul time at an assumed efficiency plus non-overlapped gradient/param traffic."""
    flops = flops_per_token(shape, seq_len) * tokens_per_gpu_step
    compute = flops * (4 / 3 if checkpointing else 1.0) / (hw.peak_tflops * 1e12 * ASSUMED_COMPUTE_EFFICIENCY)
    bytes_per = 2 if _mixed(precision) else 4
    volume = 2.0 * num_params * bytes_per  # reduce-scatter + all-gather of gradients/params per step
    if variant.stage == 3:
        volume *= 1.5  # params gathered twice (forward, backward) + gradients reduced
    bandwidth = (hw.inter_node_gbps if hw.nodes > 1 else hw.intra_node_gbps) * 1e9
    comm = volume * (hw.gpus - 1) / hw.gpus / bandwidth if hw.gpus > 1 else 0.0
    offload = 0.0
    if variant.offload_optimizer != "none":  # host Adam over this rank's partition at ~2 GB/s of state
        offload = 16 * num_params / hw.gpus / 2e9
    seconds = compute + 0.3 * comm + offload  # most communication overlaps with compute
    achieved = flops / seconds / (hw.peak_tflops * 1e12)
    return seconds, achieved


def async_staging_bytes(num_params: int, variant: Variant, precision: str, dp: int, gpus_per_node: int) -> float:
    """Host memory `checkpoint.async_save` keeps on the busiest node (rank 0's): one staged copy of each
    local rank's checkpoint files. Rank 0 writes the model file below ZeRO-3; every rank its optimizer
    partition (ZeRO >= 1; at ZeRO-0 rank 0 writes the whole optimizer)."""
    n, stage = float(num_params), variant.stage
    param_b = 2 if _mixed(precision) else 4
    optim_b = _optimizer_bytes_per_param(precision, stage)
    if stage == 0:
        return n * (param_b + optim_b)
    model_file = n * param_b * (gpus_per_node / dp if stage >= 3 else 1)
    return model_file + n * optim_b / dp * gpus_per_node


def plan_variant(variant: Variant, shape: ModelShape, seq_len: int, micro_batch: int, grad_accum: int,
                 precision: str, checkpointing: bool, buckets: Buckets, hw: Hardware,
                 async_save: bool = False) -> MemoryPlan:
    num_params = count_parameters(shape)
    states, cpu_per_rank = model_states(num_params, variant, precision, hw.gpus)
    fixed = {**states, "buckets": bucket_bytes(variant, buckets, precision, shape)}

    def gpu_total(batch: int) -> float:
        tensors = sum(fixed.values()) + activation_bytes(shape, seq_len, batch, precision, checkpointing)
        return tensors * ALLOCATOR_SLACK + CUDA_CONTEXT_BYTES

    gpu = {**fixed, "activations": activation_bytes(shape, seq_len, micro_batch, precision, checkpointing)}
    gpu["total"] = gpu_total(micro_batch)
    gpu["framework"] = gpu["total"] - sum(v for k, v in gpu.items() if k != "total")  # context + slack
    nvme = "nvme" in (variant.offload_optimizer, variant.offload_params)
    cpu = cpu_per_rank * hw.gpus_per_node + (NVME_STAGING_BYTES if nvme else 0.0)
    if async_save:
        cpu += async_staging_bytes(num_params, variant, precision, hw.gpus, hw.gpus_per_node)
    largest = 0
    while gpu_total(largest + 1) <= hw.gpu_memory and largest < 4096:
        largest += 1
    seconds, mfu = step_time(shape, num_params, seq_len, seq_len * micro_batch * grad_accum, variant, precision, hw,
                             checkpointing)
    return MemoryPlan(variant.name, gpu, cpu, fits=gpu["total"] <= hw.gpu_memory and cpu <= hw.cpu_memory,
                      max_micro_batch=largest, step_time_s=seconds, mfu=mfu)


def recommend(plans: list[MemoryPlan]) -> MemoryPlan | None:
    """The fastest variant that fits; ties go to less sharding (fewer collectives, simpler restarts)."""
    fitting = [p for p in plans if p.fits]
    return min(fitting, key=lambda p: p.step_time_s) if fitting else None


def plan_run(resolved: ResolvedRun, hw: Hardware, activation_checkpointing: bool | None = None
             ) -> list[MemoryPlan]:
    """Plans of every variant for a resolved run (its model, precision, batch and buckets)."""
    cfg, ds = resolved.config, resolved.deepspeed_config
    zero = ds["zero_optimization"]
    buckets = Buckets(reduce=float(zero.get("reduce_bucket_size", 5e8)),
                      prefetch=float(zero.get("stage3_prefetch_bucket_size", 5e7)),
                      max_live=float(zero.get("stage3_max_live_parameters", 1e9)))
    checkpointing = cfg.model.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    return [plan_variant(v, resolved.shape, cfg.data.seq_len, resolved.layout.micro_batch_size,
                         resolved.layout.grad_accum_steps, cfg.train.precision, checkpointing, buckets, hw,
                         cfg.checkpoint.async_save)
            for v in VARIANTS]


def format_table(plans: list[MemoryPlan], hw: Hardware, best: MemoryPlan | None) -> str:
    header = (f"{'variant':<36} {'params':>8} {'grads':>8} {'optim':>8} {'buckets':>8} {'activ.':>8} "
              f"{'total':>8} {'CPU/node':>9} {'fits':>5} {'max mb':>6} {'step s':>8} {'MFU':>5}")
    lines = [f"per-GPU memory (GiB) on {hw.gpus} GPU(s) x {hw.gpu_memory / GIB:.0f} GiB, "
             f"{hw.nodes} node(s) x {hw.cpu_memory / GIB:.0f} GiB host memory", header, "-" * len(header)]
    for p in plans:
        g = p.gpu
        lines.append(f"{p.variant:<36} {g['params'] / GIB:8.2f} {g['grads'] / GIB:8.2f} {g['optimizer'] / GIB:8.2f} "
                     f"{g['buckets'] / GIB:8.2f} {g['activations'] / GIB:8.2f} {g['total'] / GIB:8.2f} "
                     f"{p.cpu_per_node / GIB:9.1f} {'yes' if p.fits else 'no':>5} {p.max_micro_batch:6d} "
                     f"{p.step_time_s:8.3f} {p.mfu:5.2f}")
    lines.append(f"recommended: {best.variant}" if best else
                 "recommended: none fits - more GPUs, activation checkpointing, a smaller micro-batch or model")
    lines.append(f"assumptions: {ASSUMED_COMPUTE_EFFICIENCY:.0%} of {hw.peak_tflops:g} TFLOP/s peak for matmuls, "
                 f"{CUDA_CONTEXT_BYTES / GIB:.0f} GiB CUDA context, {ALLOCATOR_SLACK - 1:.0%} allocator slack")
    return "\n".join(lines)


def variant_of(ds_config: dict[str, Any]) -> Variant:
    zero = ds_config.get("zero_optimization", {})
    optimizer = (zero.get("offload_optimizer") or {}).get("device", "none")
    params = (zero.get("offload_param") or {}).get("device", "none")
    return Variant(int(zero.get("stage", 0)), optimizer or "none", params or "none")


def fit_warning(resolved: ResolvedRun, gpus: int, gpu_memory: float, nodes: int = 1) -> str | None:
    """A one-line warning when the run's own ZeRO variant will not fit `gpus` GPUs of `gpu_memory` bytes
    on `nodes` nodes, naming one that would: what `validate` and the launchers say before starting."""
    hw = Hardware(gpus=gpus, nodes=nodes, gpu_memory=gpu_memory)
    plans = plan_run(resolved, hw)
    mine = next((p for p in plans if p.variant == variant_of(resolved.deepspeed_config).name), None)
    if mine is None or mine.fits:
        return None
    best = recommend(plans)
    fix = f"try {best.variant} (bigmodel plan shows all)" if best else "no ZeRO variant fits: more GPUs or a smaller model"
    return (f"plan: {mine.variant} needs {mine.gpu['total'] / GIB:.1f} GiB per GPU, the GPUs have "
            f"{hw.gpu_memory / GIB:.0f} GiB; {fix}")
