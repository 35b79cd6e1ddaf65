"""What the cluster preparation tests share: a small real corpus, the single-machine reference, and
folder snapshots to compare (every file's bytes) or to prove untouched (inode and mtime of every file)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from bigmodel_dist.config import load_config
from bigmodel_dist.data.prepare import prepare_for_run
from bigmodel_dist.run.resolve import resolve_run
from tests.helpers.commands import TINY_CONFIG

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ("json/decoder.py", "json/encoder.py", "csv.py", "textwrap.py", "shlex.py", "fnmatch.py", "argparse.py",
           "string.py", "glob.py", "difflib.py", "calendar.py", "heapq.py")
SHARD_BYTES = 40_000  # ~8 shards of this corpus


def make_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in MODULES:
        (root / name.replace("/", "_")).write_text((STDLIB / name).read_text())
    return root


def overrides(corpus: Path, cache: Path, out: Path) -> list[str]:
    """The tiny model's config on this corpus; the tokenizer (trained once) and `datasets` cache in `cache`."""
    return [f"--data.paths=[{corpus}]", "--data.seq_len=64", f"--data.shard_bytes={SHARD_BYTES}",
            f"--data.cache_dir={cache}", f"--data.prepared_dir={out}", f"--output_dir={out.parent}",
            "--logging.wandb_mode=disabled"]


def prepare_locally(corpus: Path, cache: Path, out: Path) -> Path:
    """What `bigmodel prepare` does on one machine (the same vocabulary, hence the same tokenizer)."""
    cfg = load_config(TINY_CONFIG, overrides(corpus, cache, out))
    return prepare_for_run(cfg, resolve_run(cfg, world_size=1).shape.vocab_size, progress=False)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stamps_of(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: equal before and after means nothing was rewritten or replaced."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}
