"""Data pipeline throughput, side by side on one corpus, tokenizer and core count.

1. `bigmodel prepare` (read files -> tokenise -> pack -> write shards) tokens/s ÷ the limit: raw
   `tokenizers` `encode_batch` on the same texts in memory, all cores, nothing else. Goal >= 0.85.
2. The same ÷ the transformers `run_clm` recipe (`datasets.map(tokenize, num_proc)` + `group_texts`).
   Goal >= 1.5.
3. Loader supply (samples/s for one rank, prefetch thread) ÷ the trainer's consumption per rank on the
   tiny model (from a real 2-rank run). Goal >= 50.
4. `bigmodel prepare --on ray` tokens/s ÷ `bigmodel prepare` here, both whole commands on the same
   corpus (stdlib source copied to --cluster-mbytes, default 6 x --mbytes, in --cluster-shards shards),
   tokenizer and cores: a local Ray head of 2 CPUs (the test suite's, loopback only; needs root, and no
   test suite running, whose Ray head it would replace) runs one 1-CPU task per shard. Goal >= 0.9.
   The serial part (start-up, planning, which reads the corpus once into the `datasets` cache, and
   finalize) and the parallel part (the shard tasks) are timed apart, so the row also says what N
   machines would give: serial + tasks / N (Amdahl), as long as the shared storage keeps up.

    python -m benchmarks.data_pipeline [--mbytes 11] [--vocab 8192] [--cluster-mbytes 66 (0: skip)]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import report

REPO = Path(__file__).resolve().parents[1]


def _texts(max_bytes: int) -> list[str]:
    from bigmodel_dist.config import load_config
    from bigmodel_dist.config.inputs import input_files

    texts, total = [], 0
    for path in input_files(load_config(None, []).data):
        text = path.read_bytes().decode("utf-8", errors="replace")
        texts.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return texts


def _tokenizer_dir(texts: list[str], vocab: int, cache: Path) -> Path:
    from bigmodel_dist.data.tokenizer import train_bpe_tokenizer

    folder = cache / f"bench-tokenizer-{vocab}-{len(texts)}"
    if not (folder / "tokenizer.json").is_file():
        train_bpe_tokenizer(iter(texts), vocab, folder)
    return folder


def _best_of(repeats: int, fn) -> tuple[float, int]:
    """Fastest of `repeats` runs (seconds, tokens): the least disturbed by the shared machine."""
    runs = [fn() for _ in range(repeats)]
    return min(r[0] for r in runs), runs[0][1]


def _raw_limit(texts, tokenizer_dir: Path) -> tuple[float, int]:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    started = time.perf_counter()
    num_tokens = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
    return time.perf_counter() - started, num_tokens + len(texts)


def _ours(mbytes: int, tokenizer_dir: Path, seq_len: int) -> tuple[float, int]:
    from bigmodel_dist.config import load_config
    from bigmodel_dist.data.prepare import prepare_data

    with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp:
        cfg = load_config(None, [f"--data.max_bytes={mbytes * 10**6}", f"--data.tokenizer={tokenizer_dir}",
                                 f"--data.seq_len={seq_len}", f"--data.prepared_dir={tmp}/prep"])
        started = time.perf_counter()
        prepared = prepare_data(cfg.data, 2**20, Path(tmp) / "cache", progress=False)
        elapsed = time.perf_counter() - started
        return elapsed, json.loads((prepared / "meta.json").read_text())["num_tokens"]


def _run_clm(texts, tokenizer_dir: Path, seq_len: int, num_proc: int) -> tuple[float, int]:
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))

    def tokenize(batch):
        return tokenizer(batch["text"])

    def group_texts(examples):  # as in transformers/examples/pytorch/language-modeling/run_clm.py
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = (len(concatenated["input_ids"]) // seq_len) * seq_len
        return {k: [t[i: i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}

    with tempfile.TemporaryDirectory(prefix="bench-clm-") as tmp:
        raw = datasets.Dataset.from_dict({"text": texts})
        started = time.perf_counter()
        tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"],
                            cache_file_name=f"{tmp}/tok.arrow")
        grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc, cache_file_name=f"{tmp}/grp.arrow")
        elapsed = time.perf_counter() - started
        return elapsed, len(grouped) * seq_len


def _loader_supply(cache: Path, seconds: float = 3.0) -> float:
    """Samples/s one rank's BatchLoader delivers for the tiny model's layout (global 16, micro 4, 2 ranks)."""
    from bigmodel_dist.config import load_config
    from bigmodel_dist.config.layout import BatchLayout
    from bigmodel_dist.data.batch_loader import BatchLoader
    from bigmodel_dist.data.dataset import PackedDataset
    from bigmodel_dist.data.prepare import prepare_data

    cfg = load_config(REPO / "configs" / "gpt2-tiny.yaml")
    data = PackedDataset(prepare_data(cfg.data, 512, cache, progress=False))
    loader = BatchLoader(data.train, BatchLayout(16, 4, 2, 2), rank=0, seed=1)
    count, step, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for micro in range(2):
            count += len(loader.next(step, micro))
        step += 1
    rate = count / (time.perf_counter() - started)
    loader.close()
    return rate


def _trainer_consumption(workdir: Path, cache: Path) -> float:
    """Samples/s one rank consumes in a real 2-rank run of configs/gpt2-tiny.yaml (median step)."""
    subprocess.run([sys.executable, "-m", "launcher.cli", "launch", "local", str(REPO / "configs" / "gpt2-tiny.yaml"),
                    "--nproc-per-node=2", f"--output_dir={workdir}", f"--data.cache_dir={cache}", "--train.max_steps=20",
                    "--train.log_every=1", "--train.eval_every=0", "--logging.wandb_mode=disabled"],
                   check=True, cwd=REPO, capture_output=True)
    records = [json.loads(line) for line in (workdir / "gpt2-tiny" / "metrics.jsonl").read_text().splitlines()]
    step_time = statistics.median([r["step_time_s"] for r in records if "step_time_s" in r][5:])
    return 16 / 2 / step_time


def _copies_of_stdlib(folder: Path, mbytes: int) -> Path:
    """Stdlib source copied until it holds `mbytes` MB: a corpus big enough to time start-up against."""
    texts, total = _texts(32 * 10**6), 0
    folder.mkdir(parents=True, exist_ok=True)
    for copy in range(10**6):
        for i, text in enumerate(texts):
            (folder / f"c{copy:03d}-{i:05d}.py").write_text(text)
            total += len(text.encode())
            if total >= mbytes * 10**6:
                return folder
    return folder


def _timed_prepare(command: list[str], marks: tuple[str, str] = ("", "")) -> tuple[float, float, float]:
    """Wall time of a `bigmodel prepare` command, and when (seconds from its start) the first line holding
    marks[0] and the last holding marks[1] reached its log: there the parallel part starts and ends."""
    started = time.perf_counter()
    job = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    first = last = 0.0
    lines = []
    for line in job.stderr:
        lines.append(line)
        if marks[0] in line and not first:
            first = time.perf_counter() - started
        if marks[1] in line:
            last = time.perf_counter() - started
    if job.wait() != 0:
        raise RuntimeError(f"{command[:6]}... failed:\n{''.join(lines[-30:])}")
    return time.perf_counter() - started, first, last


def _cluster_ratio(mbytes: int, num_shards: int, tokenizer_dir: Path, vocab: int, seq_len: int, repeats: int,
                   work: Path) -> dict:
    """`prepare --on ray` on a 2-CPU Ray head ÷ `prepare` here: the same corpus, tokenizer and cores.
    Runs alternate (here, Ray, here, ...), each into a fresh folder and cache; the fastest of each counts."""
    from tests.cluster import ray_cluster

    corpus = _copies_of_stdlib(work / "corpus", mbytes)
    shard_bytes = mbytes * 10**6 // num_shards
    base = [sys.executable, "-m", "launcher.cli", "prepare", str(REPO / "configs" / "gpt2-tiny.yaml"),
            f"--data.paths=[{corpus}]", f"--data.tokenizer={tokenizer_dir}", f"--data.seq_len={seq_len}",
            f"--data.shard_bytes={shard_bytes}", "--data.max_bytes=0", f"--model.vocab_size={vocab}",
            f"--output_dir={work}"]
    ray_base = [*base, "--on=ray", f"--address=127.0.0.1:{ray_cluster.GCS_PORT}"]
    local_runs, ray_runs = [], []
    ray_cluster.NUM_CPUS = 2  # the same 2 cores as the local run, not the suite's 6 logical CPUs
    ray_cluster.start()
    try:
        for i in range(repeats):
            local_runs.append(_timed_prepare([*base, f"--data.cache_dir={work}/cache-local{i}",
                                              f"--out={work}/local{i}"]))
            ray_runs.append(_timed_prepare([*ray_cluster.netns_prefix(), *ray_base,
                                            f"--data.cache_dir={work}/cache-ray{i}", f"--out={work}/ray{i}"],
                                           ("Ray task(s)", "shards written")))
    finally:
        ray_cluster.stop()
    local_t = min(run[0] for run in local_runs)
    ray_t, first, last = min(ray_runs)
    same = files_equal(work / "local0", work / "ray0")
    meta = json.loads((work / "ray0" / "meta.json").read_text())
    num_tokens = meta["num_tokens"]
    serial, parallel = ray_t - (last - first), last - first
    projection = ", ".join(f"{n} machines ~{(serial + parallel) / (serial + parallel / n):.1f}x" for n in (4, 16))
    return {"figure": "prepare on Ray ÷ here (2 cores)", "ratio": local_t / ray_t, "goal": ">= 0.9",
            "detail": f"{num_tokens / ray_t / 1e6:.2f} vs {num_tokens / local_t / 1e6:.2f} M tokens/s, {mbytes} MB "
                      f"in {len(meta['shards'])} shards, every file the same: {same}; serial {serial:.1f} s + "
                      f"tasks {parallel:.1f} s: {projection} (serial + tasks / N)"}


def files_equal(a: Path, b: Path) -> bool:
    """Every file of two prepared folders, byte for byte."""
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    return files(a) == files(b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbytes", type=int, default=11, help="MB of stdlib Python source")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", default=str(REPO / "runs" / ".cache"))
    parser.add_argument("--cluster-mbytes", type=int, help="corpus of the Ray row (default 6 x --mbytes; 0: skip; "
                        "needs root for the cluster's network namespace)")
    parser.add_argument("--cluster-shards", type=int, default=48,
                        help="shards of that corpus: many more than the 2 task slots, as in real preparations")
    args = parser.parse_args()
    cache = Path(args.cache)
    cores = os.cpu_count() or 1
    texts = _texts(args.mbytes * 10**6)
    tokenizer_dir = _tokenizer_dir(texts, args.vocab, cache)
    # Interleave the three tokenisers so machine noise hits them alike; keep the best of each.
    raw_t, raw_n = _best_of(args.repeats, lambda: _raw_limit(texts, tokenizer_dir))
    ours_t, ours_n = _best_of(args.repeats, lambda: _ours(args.mbytes, tokenizer_dir, args.seq_len))
    clm_t, clm_n = _best_of(args.repeats, lambda: _run_clm(texts, tokenizer_dir, args.seq_len, cores))
    raw, ours, clm = raw_n / raw_t, ours_n / ours_t, clm_n / clm_t
    supply = _loader_supply(cache)
    with tempfile.TemporaryDirectory(prefix="bench-consume-") as tmp:
        consumption = _trainer_consumption(Path(tmp), cache)
    rows = [
        {"figure": "prepare ÷ raw encode_batch", "ratio": ours / raw, "goal": ">= 0.85",
         "detail": f"{ours / 1e6:.2f} vs {raw / 1e6:.2f} M tokens/s"},
        {"figure": "prepare ÷ run_clm recipe", "ratio": ours / clm, "goal": ">= 1.5",
         "detail": f"{ours / 1e6:.2f} vs {clm / 1e6:.2f} M tokens/s"},
        {"figure": "loader supply ÷ trainer use", "ratio": supply / consumption, "goal": ">= 50",
         "detail": f"{supply:.0f} vs {consumption:.1f} samples/s per rank"},
    ]
    cluster_mbytes = 6 * args.mbytes if args.cluster_mbytes is None else args.cluster_mbytes
    if cluster_mbytes and os.geteuid() == 0:
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
            rows.append(_cluster_ratio(cluster_mbytes, args.cluster_shards, tokenizer_dir, args.vocab, args.seq_len,
                                       args.repeats, Path(tmp)))
    report("data_pipeline", f"data pipeline ({len(texts)} files, {args.mbytes} MB stdlib source, vocab {args.vocab}, "
           f"{cores} cores)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
