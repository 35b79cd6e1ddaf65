"""`bigmodel export`: real ZeRO checkpoints load in a fresh `transformers` process with the training logits."""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from bigmodel_dist.checkpoint.integrity import DS_TAG
from tests.conftest import TINY
from tests.helpers.commands import assert_one_line_error, run_cli, run_command
from tests.helpers.spawn import run_distributed
from tests.helpers.workers import train_and_collect

pytestmark = pytest.mark.distributed
STEPS = 2
# One stdlib package as the corpus: listing the whole standard library costs each rank seconds at every start.
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"

# Runs in its own interpreter: nothing of bigmodel_dist is imported, as for a user of the exported folder.
LOAD_AND_RUN = r"""
import sys
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, dest = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(folder)
model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
ids = tokenizer("def add(a, b):\n    return a + b\n" * 8)["input_ids"][:48]
batch = torch.tensor([ids, ids[::-1]])
with torch.no_grad():
    logits = model.eval()(batch).logits.float()
np.savez(dest, ids=batch.numpy(), logits=logits.numpy(), dtype=str(model.dtype))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """`trained(stage, precision)` -> (checkpoint dir, rank 0's full fp32 parameters); each trained once."""
    done: dict[tuple[int, str], tuple[Path, dict]] = {}

    def get(stage: int, precision: str) -> tuple[Path, dict]:
        if (stage, precision) not in done:
            root = tmp_path_factory.mktemp(f"zero{stage}-{precision}")
            overrides = [*TINY, f"--data.paths={CORPUS}", f"--data.cache_dir={data_cache}", f"--output_dir={root}",
                         "--name=run", f"--deepspeed.config=zero{stage}", f"--train.precision={precision}",
                         f"--train.max_steps={STEPS}", "--train.eval_every=0"]
            params = run_distributed(train_and_collect, 2, overrides)[0]["params"]
            done[stage, precision] = (root / "run" / "checkpoints" / f"step_{STEPS:08d}", params)
        return done[stage, precision]

    return get


def _load_and_run(folder: Path, env) -> dict:
    dest = folder.parent / f"{folder.name}-logits.npz"
    result = run_command([sys.executable, "-c", LOAD_AND_RUN, str(folder), str(dest)], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(dest))


def _reference_logits(checkpoint: Path, params: dict, ids: np.ndarray) -> np.ndarray:
    """Logits of a plain model holding the trained fp32 parameters (as the engine reported them)."""
    import torch
    from transformers import AutoModelForCausalLM

    from bigmodel_dist.config.schema import ModelConfig
    from bigmodel_dist.model.build import build_transformers_config

    meta = json.loads((checkpoint / "bigmodel_meta.json").read_text())
    model = AutoModelForCausalLM.from_config(build_transformers_config(ModelConfig(**meta["config"]["model"])))
    loaded = model.load_state_dict({name: torch.from_numpy(p) for name, p in params.items()}, strict=False)
    assert set(loaded.missing_keys) <= {"lm_head.weight"} and not loaded.unexpected_keys  # lm_head is wte
    with torch.no_grad():
        return model.eval()(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize(("stage", "precision", "atol"), [(3, "fp32", 1e-5), (2, "bf16", 1e-4)])
def test_export_loads_in_transformers_with_the_training_logits(trained, tmp_path, cli_env, stage, precision, atol):
    checkpoint, params = trained(stage, precision)
    out = tmp_path / "hf"
    result = run_cli(["export", str(checkpoint), str(out)], env=cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out)  # stdout carries the folder only; DeepSpeed's chatter goes to stderr
    assert "writing weights" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the partial folder was renamed, nothing left over
    got = _load_and_run(out, cli_env)
    assert str(got["dtype"]) == "torch.float32"
    # bf16 training: the export holds the fp32 masters, which are what the engine reports as parameters.
    np.testing.assert_allclose(got["logits"], _reference_logits(checkpoint, params, got["ids"]), rtol=0, atol=atol)


def test_bf16_export_in_several_shards(trained, tmp_path, cli_env, monkeypatch):
    from bigmodel_dist.checkpoint import export

    checkpoint, params = trained(3, "fp32")
    monkeypatch.setattr(export, "SHARD_BYTES", 300_000)  # the tiny model's 1.2 MB of bf16 in ~5 files
    out = export.export_checkpoint(checkpoint, tmp_path / "hf", dtype="bf16", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    got = _load_and_run(out, cli_env)
    assert str(got["dtype"]) == "torch.bfloat16"
    reference = _reference_logits(checkpoint, params, got["ids"])
    tolerance = 0.02 * np.abs(reference).max()  # bf16 weights and arithmetic: ~0.5% off here
    np.testing.assert_allclose(got["logits"], reference, rtol=0, atol=tolerance)


def test_bad_inputs_are_refused_in_one_line(trained, tmp_path, cli_env):
    checkpoint, _ = trained(3, "fp32")

    def refused(source: Path, out: Path, *needles: str) -> None:
        assert_one_line_error(run_cli(["export", str(source), str(out)], env=cli_env), *needles)

    notes = tmp_path / "notes"
    notes.mkdir()
    refused(notes, tmp_path / "a", str(notes), "not a bigmodel checkpoint")
    refused(tmp_path / "nowhere", tmp_path / "a", str(tmp_path / "nowhere"), "not a bigmodel")

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep me")
    refused(checkpoint, occupied, str(occupied), "pick a new output folder")
    assert [p.name for p in occupied.iterdir()] == ["mine.txt"] and (occupied / "mine.txt").read_text() == "keep me"

    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    victim = max((truncated / DS_TAG).glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:-100])
    refused(truncated, tmp_path / "a", str(truncated), victim.name, "truncated")

    untokenized = tmp_path / "untokenized"  # saved before checkpoints carried their tokenizer
    shutil.copytree(checkpoint, untokenized, ignore=shutil.ignore_patterns("tokenizer"))
    meta = json.loads((untokenized / "bigmodel_meta.json").read_text())
    meta["files"] = {rel: info for rel, info in meta["files"].items() if not rel.startswith("tokenizer/")}
    (untokenized / "bigmodel_meta.json").write_text(json.dumps(meta))
    refused(untokenized, tmp_path / "a", str(untokenized), "no tokenizer/", "data.cache_dir")

    newer = tmp_path / "newer"
    newer.mkdir()
    meta = json.loads((checkpoint / "bigmodel_meta.json").read_text())
    (newer / "bigmodel_meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    refused(newer, tmp_path / "a", str(newer), "format 99", "upgrade")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.partial*"))
