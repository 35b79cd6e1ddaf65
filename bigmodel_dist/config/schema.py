"""The run configuration: one dataclass per concern, a docstring per field.

Precedence is defaults < YAML file < dotted CLI overrides (see `loader.py`). Checks that need only the
values live in each section's `check()`; checks that touch the file system live in `run/resolve.py`.
The data sections are in `data_schema.py`, the Ray and resilience sections in `operations_schema.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bigmodel_dist.config.data_schema import DataConfig, SourceConfig
from bigmodel_dist.config.fields import require_positive
from bigmodel_dist.config.operations_schema import RayConfig, ResilienceConfig
from bigmodel_dist.core.errors import ConfigError

__all__ = ["CheckpointConfig", "Config", "DataConfig", "DeepSpeedSection", "LoggingConfig", "ModelConfig",
           "OptimConfig", "RayConfig", "ResilienceConfig", "SourceConfig", "TrainConfig"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class ModelConfig:
    preset: str = "gpt2-tiny"
    """Architecture preset (see `bigmodel_dist/config/presets.py`): gpt2-tiny, gpt2-124m, ..., llama-7b."""
    vocab_size: int | None = None
    """Overrides the preset's vocabulary size; must hold every id the tokenizer produces. Rounded up to a
    multiple of `vocab_multiple` (the presets' sizes already are)."""
    vocab_multiple: int = 64
    """The model's vocabulary (embedding rows) is padded to a multiple of this for tensor-core-friendly
    matmuls (64 or 128); 1 keeps `vocab_size` as given. The padded size is what checkpoints record."""
    dropout: float | None = None
    """Overrides the preset's dropout (attention, residual, embedding) when set."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""

    def check(self) -> None:
        from bigmodel_dist.config.presets import MODEL_PRESETS

        if self.preset not in MODEL_PRESETS:
            raise ConfigError("model.preset", f"unknown preset {self.preset!r}; choose one of {sorted(MODEL_PRESETS)}")
        require_positive("model", vocab_multiple=self.vocab_multiple)
        if self.vocab_size is not None:
            require_positive("model", vocab_size=self.vocab_size)
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class OptimConfig:
    lr: float = 6e-4
    """Peak learning rate of AdamW."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from 0 to `lr`."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not biases, norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""

    def check(self) -> None:
        require_positive("optim", lr=self.lr, eps=self.eps)
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("optim.min_lr", f"must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ConfigError("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}", f"must be in [0, 1), got {getattr(self, name)}")


@dataclass
class TrainConfig:
    global_batch_size: int = 16
    """Sequences per optimizer step over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank."""
    grad_accum_steps: int | None = None
    """Micro-steps per optimizer step; derived from the batch identity when None."""
    max_steps: int = 100
    """Stop after this many optimizer steps."""
    max_tokens: int = 0
    """Also stop once this many training tokens were seen; 0 means no token limit."""
    precision: str = "auto"
    """auto, fp32, bf16 or fp16 (DeepSpeed mixed precision). auto: bf16 where the device computes it
    natively (CUDA GPUs with bf16, CPUs with AVX512-BF16/AMX), else fp32; the choice is logged once."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    eval_every: int = 50
    """Evaluate every N optimizer steps (and at the end); 0 disables evaluation."""
    eval_batches: int = 4
    """Micro-batches per rank in one evaluation."""

    def check(self) -> None:
        require_positive(
            "train",
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            max_steps=self.max_steps,
            log_every=self.log_every,
            eval_batches=self.eval_batches,
        )
        if self.grad_accum_steps is not None:
            require_positive("train", grad_accum_steps=self.grad_accum_steps)
        for name in ("max_tokens", "eval_every", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ConfigError("train.precision", f"must be one of {list(PRECISIONS)}, got {self.precision!r}")


@dataclass
class CheckpointConfig:
    every: int = 50
    """Save every N optimizer steps (and at the end); 0 saves only at the end and on preemption."""
    keep_last: int = 3
    """Keep the newest N checkpoints; older ones are deleted after a newer one is committed."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, for good; 0 keeps none extra."""
    async_save: bool = False
    """Snapshot to host memory and write in a background thread; the loop stalls only for the copy."""
    write_threads: int = 0
    """Threads per rank writing checkpoint files; 0: this rank's share of the machine's cores, 2 to 4."""
    resume: str = "latest"
    """latest (newest good checkpoint of this run, if any), none (refuse a run dir that has some), or a path."""
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that stop training at the next step with one checkpoint and the requeue exit code."""
    requeue_exit_code: int = 85
    """Exit code after a preemption save: tells the launcher (Slurm script, Ray) to requeue."""
    time_limit_margin_s: float = 300.0
    """Stop and save this long before the job's end time (Slurm's, or `end_time`)."""
    end_time: float | None = None
    """Unix time the allocation ends; None reads it from Slurm when present."""

    def check(self) -> None:
        for name in ("every", "keep_every", "time_limit_margin_s", "write_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"checkpoint.{name}", f"must be >= 0, got {getattr(self, name)}")
        require_positive("checkpoint", keep_last=self.keep_last)
        if not 1 <= self.requeue_exit_code <= 255:
            raise ConfigError("checkpoint.requeue_exit_code", f"must be in 1..255, got {self.requeue_exit_code}")
        import signal

        for i, name in enumerate(self.stop_signals):
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ConfigError(f"checkpoint.stop_signals[{i}]", f"{name!r} is not a signal name like SIGTERM")
            if name == "SIGUSR2":
                raise ConfigError(f"checkpoint.stop_signals[{i}]", "SIGUSR2 is reserved: it asks a rank for its stacks "
                                  "(the hang watchdog); use SIGTERM or SIGUSR1")


@dataclass
class DeepSpeedSection:
    config: str = "zero2"
    """DeepSpeed JSON: a shipped name (zero0, zero1, zero2, zero3, zero2-offload, zero3-offload,
    zero3-nvme -> configs/deepspeed/<name>.json) or a path to your own ds_config.json ("auto" allowed)."""
    zero_stage: int | None = None
    """Overrides zero_optimization.stage of that JSON when set."""

    def check(self) -> None:
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"
    """W&B mode on rank 0: offline (default, no network), online, or disabled."""
    wandb_project: str = "bigmodel-dist"
    """W&B project name."""
    wandb_init_timeout_s: float = 30.0
    """Seconds W&B may take to start online before we fall back to offline (then to disabled)."""
    peak_tflops_per_device: float | None = None
    """Device peak for MFU; None looks the device up in a table (GPUs) and reports no MFU if unknown."""
    startup_stacks_after_s: float = 180.0
    """A rank still short of its first step after this many seconds prints every thread's Python stack
    to its stderr, and again each as many seconds after: where a stuck start-up waits. 0 disables."""

    def check(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError("logging.wandb_mode", f"must be one of {list(WANDB_MODES)}, got {self.wandb_mode!r}")
        if self.peak_tflops_per_device is not None:
            require_positive("logging", peak_tflops_per_device=self.peak_tflops_per_device)
        require_positive("logging", wandb_init_timeout_s=self.wandb_init_timeout_s)
        if self.startup_stacks_after_s < 0:
            raise ConfigError("logging.startup_stacks_after_s", f"must be >= 0, got {self.startup_stacks_after_s}")


@dataclass
class Config:
    name: str = "gpt2-tiny"
    """Stable run name: the run directory is `<output_dir>/<name>`, so restarts and requeues find it."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 1234
    """Seed for model initialisation, data order and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)

    def check(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError("name", f"must be a plain folder name (no '/', not starting with '.'), got {self.name!r}")
        for section in (self.model, self.data, self.optim, self.train, self.checkpoint, self.deepspeed, self.logging,
                        self.ray, self.resilience):
            section.check()
        codes = {"checkpoint.requeue_exit_code": self.checkpoint.requeue_exit_code,
                 "resilience.hang_exit_code": self.resilience.hang_exit_code,
                 "resilience.bad_node_exit_code": self.resilience.bad_node_exit_code}
        if len(set(codes.values())) < len(codes) or set(codes.values()) & {1, 2}:
            raise ConfigError("resilience.hang_exit_code", f"exit codes must differ from each other and from 1 and 2 "
                              f"(run failed, bad input); got {codes}")
