"""The run configuration: one dataclass per concern, a docstring per field.

Precedence is defaults < YAML file < dotted CLI overrides (see `loader.py`). Checks that need only the
values live in each section's `check()`; checks that touch the file system live in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bigmodel_dist.core.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WANDB_MODES = ("offline", "online", "disabled")


def _require_positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{section}.{name}", f"must be > 0, got {value}")


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
        _require_positive("model", vocab_multiple=self.vocab_multiple)
        if self.vocab_size is not None:
            _require_positive("model", vocab_size=self.vocab_size)
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}")


VERIFY_MODES = ("checksum", "size")
TOKEN_DTYPES = ("auto", "uint16", "uint32")


@dataclass
class SourceConfig:
    """One source of a data mixture (`data.sources`): its own files, weight and preparation."""

    name: str = ""
    """Unique name, used in logs, metrics (`data/<name>/...`) and `data.weights.<name>` overrides."""
    paths: list[str] = field(default_factory=list)
    """Files or folders of this source, as `data.paths` (python-stdlib, text, .jsonl, .parquet, .arrow,
    or a `datasets` folder written by `save_to_disk`)."""
    dataset: str | None = None
    """A `datasets` hub name instead of `paths` (needs network or a local HF cache)."""
    text_column: str = "text"
    """Field holding the document text in tables and hub datasets."""
    weight: float = 1.0
    """Share of training samples drawn from this source, relative to the other sources' weights."""
    max_tokens: int = 0
    """Token budget: after this many training tokens (whole sequences) the source leaves the mixture and
    the others share its slots by weight; 0: no budget."""
    max_epochs: float = 0.0
    """Passes over the source's training sequences after which it leaves the mixture (fractions allowed;
    the smaller budget wins with `max_tokens`); 0: no limit, a source that runs out repeats."""

    def check(self, path: str) -> None:
        if not self.name or "/" in self.name or "." in self.name:
            raise ConfigError(f"{path}.name", f"must be a plain name (no '/' or '.'), got {self.name!r}")
        if not self.paths and not self.dataset:
            raise ConfigError(f"{path}.paths", "is empty; give files or folders (or python-stdlib), or a dataset")
        if self.weight < 0:
            raise ConfigError(f"{path}.weight", f"must be >= 0, got {self.weight}")
        for name in ("max_tokens", "max_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}", f"must be >= 0 (0: no budget), got {getattr(self, name)}")


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=lambda: ["python-stdlib"])
    """Input files or folders: text-like files (one document each), .jsonl / .parquet (one per row).
    "python-stdlib" is this interpreter's standard-library source, a real corpus on every machine."""
    dataset: str | None = None
    """A `datasets` hub name to read instead of `paths` (needs network or a local HF cache)."""
    text_column: str = "text"
    """Field holding the document text in .jsonl / .parquet rows and hub datasets."""
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".rst", ".py", ".jsonl", ".parquet",
                                                           ".arrow"])
    """Suffixes of files read from folders: text-like ones are one document each, .jsonl/.json/.parquet
    one per row. The python-stdlib corpus reads only text-like files."""
    max_bytes: int = 0
    """Read at most this many bytes of text (documents in sorted order); 0 reads everything."""
    tokenizer: str | None = None
    """Local folder of a Hugging Face fast tokenizer. None trains a byte-level BPE on the corpus. A resumed
    run always uses its checkpoint's tokenizer (saved in it)."""
    accept_corpus_change: bool = False
    """Resume even though files were added to, removed from or modified in the corpus since the
    checkpoint: the new corpus is tokenized with the checkpoint's tokenizer and the change is recorded
    as a `data` incident. Off: such a resume is refused, naming the files."""
    seq_len: int = 256
    """Tokens per packed training sequence."""
    val_fraction: float = 0.02
    """Share of packed sequences held out for evaluation (the tail of each shard)."""
    prepared_dir: str | None = None
    """Folder of prepared shards (`bigmodel prepare` writes it); default: derived under cache_dir."""
    cache_dir: str | None = None
    """Where trained tokenizers, prepared data and `datasets` caches go; default `<output_dir>/.cache`."""
    num_proc: int = 0
    """Tokeniser threads for preparation; 0 uses every core."""
    shard_bytes: int = 256 * 2**20
    """Text bytes per prepared shard: the unit of parallel work and of skip-on-rerun."""
    token_dtype: str = "auto"
    """Token storage: auto (uint16 when the vocabulary fits, else uint32), uint16 or uint32."""
    verify: str = "checksum"
    """At start-up each node checks shard checksums (checksum) or only their sizes (size, faster)."""
    prefetch: int = 4
    """Micro-batches the loader thread prepares ahead of the trainer."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture of sources; when given, `paths`, `dataset` and `text_column` are not used."""
    weights: dict[str, float] = field(default_factory=dict)
    """Weights by source name that override `sources[].weight` (e.g. `--data.weights.code=0.5`). A run
    resumed with other weights continues with them from its cursor: a recorded curriculum."""
    mixture_window: int = 1000
    """Proportions are exact over every window of this many consecutive training sequences (each
    source gets weight x window of them, rounded by largest remainder when not whole)."""

    def check(self) -> None:
        if not self.paths and not self.dataset and not self.sources:
            raise ConfigError("data.paths", "is empty; give at least one file or folder (or python-stdlib)")
        self._check_mixture()
        _require_positive("data", seq_len=self.seq_len, shard_bytes=self.shard_bytes, prefetch=self.prefetch)
        for name in ("max_bytes", "num_proc"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}", f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError("data.val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        if self.verify not in VERIFY_MODES:
            raise ConfigError("data.verify", f"must be one of {list(VERIFY_MODES)}, got {self.verify!r}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ConfigError("data.token_dtype", f"must be one of {list(TOKEN_DTYPES)}, got {self.token_dtype!r}")

    def _check_mixture(self) -> None:
        _require_positive("data", mixture_window=self.mixture_window)
        names = [s.name for s in self.sources]
        for i, source in enumerate(self.sources):
            source.check(f"data.sources[{i}]")
            if names.index(source.name) != i:
                raise ConfigError(f"data.sources[{i}].name", f"{source.name!r} is used twice; names must be unique")
        for name, weight in self.weights.items():
            if name not in names:
                raise ConfigError(f"data.weights.{name}", f"unknown source; the sources are {names}")
            if weight < 0:
                raise ConfigError(f"data.weights.{name}", f"must be >= 0, got {weight}")
        weights = self.source_weights()
        if self.sources and not any(weights.values()):
            raise ConfigError("data.sources", "every weight is 0; give at least one source a positive weight")
        for name, share in self.mixture_quotas().items():
            if weights[name] > 0 and share == 0:
                raise ConfigError("data.mixture_window", f"{self.mixture_window} sequences give source {name!r} "
                                  "no place in a window at its weight; raise data.mixture_window")

    def source_weights(self) -> dict[str, float]:
        """Every source's weight, `data.weights` overrides applied."""
        return {s.name: self.weights.get(s.name, s.weight) for s in self.sources}

    def mixture_quotas(self) -> dict[str, int]:
        """Sequences per window by source (largest remainder; ties to the earlier source)."""
        from bigmodel_dist.core.quotas import apportion

        weights = self.source_weights()
        return dict(zip(weights, apportion(self.mixture_window, list(weights.values())))) if any(weights.values()) \
            else dict.fromkeys(weights, 0)


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
        _require_positive("optim", lr=self.lr, eps=self.eps)
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
        _require_positive(
            "train",
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            max_steps=self.max_steps,
            log_every=self.log_every,
            eval_batches=self.eval_batches,
        )
        if self.grad_accum_steps is not None:
            _require_positive("train", grad_accum_steps=self.grad_accum_steps)
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
        _require_positive("checkpoint", keep_last=self.keep_last)
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
            _require_positive("logging", peak_tflops_per_device=self.peak_tflops_per_device)
        _require_positive("logging", wandb_init_timeout_s=self.wandb_init_timeout_s)
        if self.startup_stacks_after_s < 0:
            raise ConfigError("logging.startup_stacks_after_s", f"must be >= 0, got {self.startup_stacks_after_s}")


@dataclass
class RayConfig:
    """Read by `python -m launcher.ray_job` only: the Ray Train scaling, failure and storage settings."""

    num_workers: int | str = 2
    """Ray Train workers (= data-parallel ranks), one per GPU on GPU clusters; `MIN..MAX` (e.g. "8..16")
    trains elastically: on as many workers as the cluster can place, between the two, shrinking when a
    worker or node is lost and growing back at a checkpoint (docs: README, Elastic training)."""
    use_gpu: bool = False
    """Give each worker `gpus_per_worker` GPUs (NCCL); False runs on CPUs (gloo)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs Ray reserves per worker (also sets the worker's thread count)."""
    gpus_per_worker: float = 1.0
    """GPUs Ray reserves per worker when use_gpu is set."""
    max_failures: int = 3
    """Worker-group restarts after a failure (FailureConfig); -1 retries forever."""
    storage_path: str | None = None
    """Ray's storage_path; None uses output_dir, so Ray's run folder is the run directory itself."""
    checkpoints_to_keep: int | None = None
    """CheckpointConfig(num_to_keep) for Ray's checkpoint records; None follows checkpoint.keep_last."""
    address: str | None = None
    """Ray cluster to join; None means RAY_ADDRESS (set by `ray job submit`) or a running local cluster."""
    connect_timeout_s: float = 60.0
    """Seconds to wait for the cluster before giving up with an error."""
    stop_wait_s: int = 300
    """Seconds Ray waits after `ray job stop`'s SIGTERM before it SIGKILLs the job (RAY_JOB_STOP_WAIT_TIME_S,
    Ray's default 3; `bigmodel launch ray` sets it for the job): must cover one step and one checkpoint save."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker also needs (e.g. `{trainer_slot: 1}` to keep workers on the
    nodes that advertise it)."""
    grow_every_s: float = 600.0
    """Elastic runs grow back (when the cluster can place more workers) at most once per this many
    seconds, by saving a checkpoint and restarting the group larger from it."""
    elastic_wait_s: float = 600.0
    """An elastic run that cannot place even its minimum of workers waits this long for them, then exits
    with checkpoint.requeue_exit_code (resubmitting resumes)."""

    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers: both `num_workers` when it is a number."""
        from bigmodel_dist.config.ranges import parse_size_range

        return parse_size_range(self.num_workers, "ray.num_workers", lambda message: ConfigError("ray.num_workers",
                                                                                               message))

    @property
    def elastic(self) -> bool:
        low, high = self.worker_range()
        return low < high

    def check(self) -> None:
        self.worker_range()
        _require_positive("ray", cpus_per_worker=self.cpus_per_worker, connect_timeout_s=self.connect_timeout_s,
                          stop_wait_s=self.stop_wait_s, grow_every_s=self.grow_every_s,
                          elastic_wait_s=self.elastic_wait_s)
        for name, amount in self.resources_per_worker.items():
            if amount <= 0:
                raise ConfigError(f"ray.resources_per_worker.{name}", f"must be > 0, got {amount}")
        if self.use_gpu:
            _require_positive("ray", gpus_per_worker=self.gpus_per_worker)
        if self.max_failures < -1:
            raise ConfigError("ray.max_failures", f"must be >= -1 (-1: retry forever), got {self.max_failures}")
        if self.checkpoints_to_keep is not None:
            _require_positive("ray", checkpoints_to_keep=self.checkpoints_to_keep)


@dataclass
class ResilienceConfig:
    """Hangs, bad nodes, stragglers and loss spikes: detected, diagnosed and recovered from without a person."""

    enabled: bool = True
    """The in-loop guards: progress records for the hang watchdog, loss/gradient checks, straggler timing."""
    hang_timeout_s: float = 600.0
    """A node whose ranks all make no progress within a step for this long is declared hung: every local
    rank's stacks go to RUN_DIR/logs/hang-<time>/, the job's processes end, and it exits `hang_exit_code`."""
    startup_timeout_s: float = 1800.0
    """The same limit from process start to the first step (data, model, engine, checkpoint load)."""
    save_timeout_s: float = 1800.0
    """The same limit while a checkpoint is being saved."""
    hang_exit_code: int = 86
    """Exit code of a job that hung: the Slurm script requeues it avoiding the suspect node."""
    health_check: bool = True
    """Check every node (matmul, memory, all-reduce bus bandwidth) before training on Slurm and Ray."""
    health_slow_factor: float = 2.0
    """A node whose matmul throughput (or, on GPU, free memory) is this many times below the other nodes'
    median is bad; on one node, ranks are compared."""
    bad_node_exit_code: int = 87
    """Exit code of a failed health check: the Slurm script requeues it avoiding the named node."""
    straggler_factor: float = 1.5
    """A rank whose compute time per step exceeds the median rank's by this factor is a straggler..."""
    straggler_intervals: int = 3
    """...when it does so for this many log intervals in a row (then it is reported once per streak)."""
    spike_window: int = 50
    """Recent good steps whose mean loss is the reference for spike detection."""
    spike_factor: float = 3.0
    """A step whose loss exceeds this many times the recent mean (window at least a fifth full) is bad."""
    max_bad_steps: int = 3
    """Bad steps (non-finite or spiking loss or gradient norm; each one skipped) in a row before rolling
    back to the last good checkpoint and skipping the data those steps read."""
    rollback_lr_factor: float = 1.0
    """Multiply the learning rate by this after each rollback (1.0 keeps it)."""
    max_rollbacks: int = 5
    """Rollbacks in one run before it stops with an error: a run that keeps diverging needs a person."""

    def check(self) -> None:
        _require_positive("resilience", hang_timeout_s=self.hang_timeout_s, startup_timeout_s=self.startup_timeout_s,
                          save_timeout_s=self.save_timeout_s, health_slow_factor=self.health_slow_factor,
                          straggler_factor=self.straggler_factor, straggler_intervals=self.straggler_intervals,
                          spike_window=self.spike_window, spike_factor=self.spike_factor,
                          max_bad_steps=self.max_bad_steps, max_rollbacks=self.max_rollbacks)
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise ConfigError("resilience.rollback_lr_factor", f"must be in (0, 1], got {self.rollback_lr_factor}")
        for name in ("hang_exit_code", "bad_node_exit_code"):
            if not 1 <= getattr(self, name) <= 255:
                raise ConfigError(f"resilience.{name}", f"must be in 1..255, got {getattr(self, name)}")
        if self.health_slow_factor <= 1.0 or self.straggler_factor <= 1.0 or self.spike_factor <= 1.0:
            bad = next(n for n in ("health_slow_factor", "straggler_factor", "spike_factor") if getattr(self, n) <= 1.0)
            raise ConfigError(f"resilience.{bad}", f"must be > 1 (a ratio to the median or mean), got {getattr(self, bad)}")


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
