"""Preparing a mixture: one tokenizer for every source, then each source into its own prepared folder.

Each source's folder is keyed by its files and the tokenizer (not by its weight), so runs that mix the
same sources differently share it. The tokenizer, unless `data.tokenizer` names one, is a byte-level
BPE trained on a sample drawn from every source by weight (`TOKENIZER_SAMPLE_BYTES` in all, or
`data.max_bytes` when smaller).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from bigmodel_dist.config.inputs import check_input_files, input_files, source_data_config
from bigmodel_dist.config.schema import Config, DataConfig
from bigmodel_dist.data.prepare import (
    DOCS_PER_BATCH,
    Plan,
    cache_dir_of,
    plan_data,
    plans_for_run,
    prepare_data,
    prepare_for_run,
)
from bigmodel_dist.data.sources import load_text_dataset, source_fingerprint
from bigmodel_dist.data.tokenizer import train_bpe_tokenizer

log = logging.getLogger(__name__)
SINGLE_POOL = "default"  # the one source of a config without `data.sources`
TOKENIZER_SAMPLE_BYTES = 256 * 2**20


def prepare_run_sources(config: Config, vocab_size: int, progress: bool = True) -> list[tuple[str, Path]]:
    """(name, prepared folder) of every source of the run, prepared if needed; idempotent."""
    data = config.data
    if not data.sources:
        return [(SINGLE_POOL, prepare_for_run(config, vocab_size, progress=progress))]
    cache = cache_dir_of(data, config.output_dir)
    tokenizer = data.tokenizer or str(mixture_tokenizer(data, vocab_size, cache))
    prepared = []
    for source in data.sources:
        if progress:
            log.info("source %s: preparing", source.name)
        prepared.append((source.name, prepare_data(source_data_config(data, source, tokenizer), vocab_size, cache,
                                                   progress=progress)))
    return prepared


def run_plans(config: Config, vocab_size: int) -> list[Plan]:
    """What is left to prepare for the run, as plans for a cluster engine: the one pool's, or each
    mixture source's (after training or loading the shared tokenizer here)."""
    data = config.data
    if not data.sources:
        return plans_for_run(config, vocab_size)
    cache = cache_dir_of(data, config.output_dir)
    tokenizer = data.tokenizer or str(mixture_tokenizer(data, vocab_size, cache))
    plans = [plan_data(source_data_config(data, source, tokenizer), vocab_size, cache) for source in data.sources]
    return [plan for plan in plans if plan is not None]


def mixture_tokenizer(data: DataConfig, vocab_size: int, cache_dir: Path) -> Path:
    """The BPE trained on a by-weight sample of every source (cached by sources, weights and size)."""
    weights = data.source_weights()
    budget = min(TOKENIZER_SAMPLE_BYTES, data.max_bytes or TOKENIZER_SAMPLE_BYTES)
    configs = {s.name: source_data_config(data, s, None) for s in data.sources}
    files = {name: ([] if cfg.dataset else input_files(cfg)) for name, cfg in configs.items()}
    fingerprints = {name: source_fingerprint(files[name], cfg) for name, cfg in configs.items()}
    key = hashlib.sha256(json.dumps([fingerprints, weights, budget, vocab_size], sort_keys=True).encode()).hexdigest()
    folder = cache_dir / f"tokenizer-bpe{vocab_size}-mix-{key[:16]}"
    if (folder / "tokenizer.json").is_file():
        return folder
    total = sum(weights.values())
    log.info("training a byte-level BPE tokenizer (vocab %d) on %d MB drawn from %d sources by weight", vocab_size,
             budget // 2**20, len(configs))
    samples = []
    for name, cfg in configs.items():
        check_input_files(files[name], cfg)
        share = int(budget * weights[name] / total)
        if share:
            dataset = load_text_dataset(cfg, files[name], cache_dir, fingerprints[name])
            samples.append(_first_bytes(dataset, share))
    train_bpe_tokenizer(itertools.chain(*samples), vocab_size, folder)
    return folder


def _first_bytes(dataset, budget: int) -> Iterator[str]:
    taken = 0
    for batch in dataset.iter(batch_size=DOCS_PER_BATCH):
        for text in batch["text"]:
            if taken >= budget:
                return
            yield text
            taken += len(text.encode())
