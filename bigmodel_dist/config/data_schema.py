"""The `data` section of the run configuration and its mixture sources (`data.sources`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bigmodel_dist.config.fields import require_positive
from bigmodel_dist.core.errors import ConfigError

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
        require_positive("data", seq_len=self.seq_len, shard_bytes=self.shard_bytes, prefetch=self.prefetch)
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
        require_positive("data", mixture_window=self.mixture_window)
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
