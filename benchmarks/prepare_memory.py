"""Peak memory of data preparation does not grow with the corpus: `bigmodel prepare` of a 1x and a 10x
JSON-lines corpus (same documents repeated, same tokenizer, same shard size), peak RSS of each run
(the process's own maximum resident set: anonymous memory plus the Arrow pages it has mapped in).

    python -m benchmarks.prepare_memory [--mbytes 10] [--factor 10] [--shard-mbytes 4]
Goal: peak RSS at 10x / at 1x <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from benchmarks.report import report

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.2
# Runs `bigmodel prepare` in this child and reports its peak RSS (the kernel's high-water mark, which
# counts the Arrow file pages it has mapped in) and its peak anonymous RSS (sampled every 20 ms: the
# memory that is really the process's; mapped file pages are page cache the kernel can take back).
PEAK_RSS_CODE = """
import re, resource, runpy, sys, threading, time
peak_anon = [0]
def sample():
    while True:
        status = open('/proc/self/status').read()
        peak_anon[0] = max(peak_anon[0], int(re.search(r'RssAnon:\\s+(\\d+)', status).group(1)))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
sys.argv = ['bigmodel'] + sys.argv[1:]
code = 0
try:
    runpy.run_module('launcher.cli', run_name='__main__')
except SystemExit as exc:
    code = exc.code or 0
print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peak_anon[0], file=sys.stderr)
sys.exit(code)
"""


def write_corpus(path: Path, mbytes: float) -> None:
    """JSON lines of standard-library source files, repeated until `mbytes` MB (each line numbered, so
    documents differ)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:200]]
    written, line = 0, 0
    with open(path, "w") as out:
        while written < mbytes * 1e6:
            row = json.dumps({"text": f"# {line}\n{texts[line % len(texts)]}"}) + "\n"
            out.write(row)
            written += len(row)
            line += 1


def peak_rss_mb(corpus: Path, tokenizer: Path, workdir: Path, shard_mbytes: float) -> tuple[float, float]:
    """(peak RSS, peak anonymous RSS) of one `bigmodel prepare`, in MB."""
    command = [sys.executable, "-c", PEAK_RSS_CODE, "prepare", str(REPO / "configs" / "gpt2-tiny.yaml"),
               f"--data.paths=[{corpus}]", f"--data.tokenizer={tokenizer}", "--data.max_bytes=0",
               f"--data.shard_bytes={int(shard_mbytes * 2**20)}", f"--data.cache_dir={workdir / 'cache'}",
               f"--output_dir={workdir}", "--data.num_proc=2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    if result.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{result.stderr[-3000:]}")
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("PEAK_KB")]
    return int(line.split()[1]) / 1024, int(line.split()[2]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbytes", type=float, default=10.0)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--shard-mbytes", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prepare-memory-") as tmp:
        work = Path(tmp)
        small, large = work / "small.jsonl", work / "large.jsonl"
        write_corpus(small, args.mbytes)
        write_corpus(large, args.mbytes * args.factor)
        from bigmodel_dist.data.tokenizer import train_bpe_tokenizer

        tokenizer = work / "tokenizer"
        texts = (json.loads(line)["text"] for line in small.read_text().splitlines()[:2000])
        train_bpe_tokenizer(texts, 512, tokenizer)
        small_mb, small_anon = peak_rss_mb(small, tokenizer, work / "s", args.shard_mbytes)
        large_mb, large_anon = peak_rss_mb(large, tokenizer, work / "l", args.shard_mbytes)
    report("prepare_memory", f"bigmodel prepare peak RSS, {args.mbytes:g} MB vs {args.mbytes * args.factor:g} MB corpus "
           f"({args.shard_mbytes:g} MB shards)",
           [{"figure": f"peak anonymous RSS {args.factor}x ÷ 1x", "ratio": large_anon / small_anon,
             "goal": f"<= {GOAL}", "detail": f"{large_anon:.0f} MB vs {small_anon:.0f} MB"},
            {"figure": f"peak RSS (with mapped files) {args.factor}x ÷ 1x", "ratio": large_mb / small_mb,
             "goal": "report", "detail": f"{large_mb:.0f} MB vs {small_mb:.0f} MB"}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
