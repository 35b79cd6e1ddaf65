"""Files added to a corpus between a save and a resume never change the tokenizer under the run.

A run on a folder of 60 files trains and saves; 20 files are added; the same command is refused before
any process starts, naming what changed. With `data.accept_corpus_change=true` it resumes: the new
corpus is tokenized with the checkpoint's tokenizer (not a BPE trained again) and the change is a
`data` incident in the metrics.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from bigmodel_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from tests.conftest import TINY
from tests.helpers.commands import TINY_CONFIG, run_cli
from tests.helpers.spawn import run_distributed
from tests.helpers.workers import train_and_collect

pytestmark = pytest.mark.distributed


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[Path]]:
    """corpus/ with 60 of the standard library's modules; 20 more kept aside to add later."""
    modules = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if 2_000 < p.stat().st_size < 40_000)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for module in modules[:60]:
        shutil.copy(module, folder / module.name)
    return folder, modules[60:80]


def _overrides(tmp_path: Path, folder: Path, steps: int) -> list[str]:
    return [*TINY, f"--output_dir={tmp_path / 'runs'}", "--name=grow", f"--data.paths=[{folder}]",
            "--data.max_bytes=0", "--train.eval_every=0", "--checkpoint.every=2", f"--train.max_steps={steps}",
            "--train.precision=fp32"]


def _prepared_sequences(run_dir: Path) -> dict[str, int]:
    return {p.parent.name: json.loads(p.read_text())["num_train_sequences"]
            for p in (run_dir.parent / ".cache").glob("prepared-*/meta.json")}


def test_added_files_are_refused_then_accepted_with_the_checkpoints_tokenizer(tmp_path, corpus, cli_env):
    folder, more = corpus
    run_distributed(train_and_collect, 2, _overrides(tmp_path, folder, 2))
    run_dir = tmp_path / "runs" / "grow"
    ckpt = run_dir / "checkpoints" / "step_00000002"
    trained_with = tokenizer_fingerprint(load_tokenizer(ckpt / "tokenizer"))
    before = _prepared_sequences(run_dir)
    for module in more:
        shutil.copy(module, folder / module.name)

    refused = run_cli(["launch", "local", TINY_CONFIG, "--nproc-per-node=2", *_overrides(tmp_path, folder, 4)],
                      env=cli_env)
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"checkpoint {ckpt}: trained on other data: 20 file(s) added (" in errors[0], errors
    assert str(folder / more[0].name) in errors[0] and "--data.accept_corpus_change=true" in errors[0]
    assert "Traceback" not in refused.stderr and "launching" not in refused.stderr
    assert _prepared_sequences(run_dir) == before, "nothing prepared for a refused run"

    accepted = run_distributed(train_and_collect, 2, [*_overrides(tmp_path, folder, 4),
                                                      "--data.accept_corpus_change=true"])[0]
    assert len(accepted["losses"]) == 2  # resumed at step 2
    newest = run_dir / "checkpoints" / "step_00000004"
    assert tokenizer_fingerprint(load_tokenizer(newest / "tokenizer")) == trained_with
    meta = json.loads((newest / "bigmodel_meta.json").read_text())
    assert meta["data"]["tokenizer_fingerprint"] == trained_with and len(meta["data"]["files"]) == 80
    after = _prepared_sequences(run_dir)
    grown = [n for name, n in after.items() if name not in before]
    assert len(grown) == 1 and grown[0] > max(before.values())  # the new corpus, tokenized once
    assert len(list((run_dir.parent / ".cache").glob("tokenizer-*"))) == 1  # no BPE trained on the grown corpus
    incidents = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if '"event": "data"' in line]
    assert [(i["step"], i["added"], i["removed"], i["modified"]) for i in incidents] == [(2, 20, 0, 0)]


def test_a_tokenizer_other_than_the_checkpoints_is_refused(tmp_path, corpus, cli_env):
    folder, _ = corpus
    run_distributed(train_and_collect, 1, _overrides(tmp_path, folder, 2))
    other = tmp_path / "other-tokenizer"
    shutil.copytree(next((tmp_path / "runs" / ".cache").glob("tokenizer-*")), other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["dropout"] = 0.5  # another definition, same vocabulary
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    refused = run_cli(["launch", "local", TINY_CONFIG, "--nproc-per-node=1", *_overrides(tmp_path, folder, 4),
                       f"--data.tokenizer={other}"], env=cli_env)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"data.tokenizer {other}: not the tokenizer checkpoint" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_data_prepared_elsewhere_without_its_sources_here_records_no_files(tmp_path, corpus):
    """`data.prepared_dir` may be used where its sources are not (prepared on another machine): the run
    neither fails on the missing paths nor calls a later resume's corpus changed."""
    from bigmodel_dist.config import load_config
    from bigmodel_dist.data.continuity import corpus_change, corpus_files

    folder, _ = corpus
    here = load_config(None, [f"--data.paths=[{folder}]", f"--data.prepared_dir={tmp_path / 'prep'}"]).data
    absent = load_config(None, [f"--data.paths=[{tmp_path / 'elsewhere'}]",
                                f"--data.prepared_dir={tmp_path / 'prep'}"]).data
    assert len(corpus_files(here)) == 60 and corpus_files(absent) == {}
    recorded = {"files": {}, "settings": {}}
    assert not corpus_change(recorded, absent)
