"""Config loading: precedence, strict keys and types, shipped presets, one-line errors with exit 2."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from bigmodel_dist.config import Config, load_config
from bigmodel_dist.core.errors import ConfigError, UserInputError
from bigmodel_dist.run.resolve import resolve_run
from tests.conftest import REPO
from tests.helpers.commands import TINY_CONFIG, assert_one_line_error, run_cli, run_command

SHIPPED_RUN_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_precedence_defaults_file_cli(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 7, "micro_batch_size": 2}}))
    cfg = load_config(path, ["--train.max_steps=9", "--optim.lr=3e-4"])
    assert cfg.train.max_steps == 9  # CLI beats file
    assert cfg.train.micro_batch_size == 2  # file beats default
    assert cfg.train.global_batch_size == 16  # default
    assert cfg.optim.lr == pytest.approx(3e-4)  # "3e-4" without a dot still parses as a float


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        (["--train.max_stepz=3"], "train.max_stepz"),
        (["--nonsense.x=1"], "nonsense"),
        (["--train.max_steps=ten"], "train.max_steps"),
        (["--train.max_steps=true"], "train.max_steps"),
        (["--optim.lr=fast"], "optim.lr"),
        (["--model.activation_checkpointing=maybe"], "model.activation_checkpointing"),
        (["--train=5"], "train"),
        (["--train.micro_batch_size=0"], "train.micro_batch_size"),
        (["--train.global_batch_size=-8"], "train.global_batch_size"),
        (["--train.precision=fp8"], "train.precision"),
        (["--deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
        (["--model.preset=gpt5"], "model.preset"),
        (["--optim.min_lr=1.0"], "optim.min_lr"),
        (["--logging.wandb_mode=loud"], "logging.wandb_mode"),
    ],
)
def test_bad_values_name_the_dotted_field(overrides, path):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.path == path
    assert path in str(info.value)


def test_resolved_config_round_trips(tmp_path):
    from bigmodel_dist.config import save_config

    cfg = load_config(None, ["--train.max_steps=3", "--data.paths=[a, b]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("path", SHIPPED_RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_config_validates(path):
    cfg = load_config(path)
    resolved = resolve_run(cfg, world_size=2 if cfg.train.global_batch_size % 2 == 0 else 1)
    assert resolved.num_parameters > 0
    assert resolved.layout.global_batch_size == (
        resolved.layout.micro_batch_size * resolved.layout.grad_accum_steps * resolved.layout.data_parallel_size
    )


def test_there_are_shipped_configs_for_every_family_and_size():
    names = {p.stem for p in SHIPPED_RUN_CONFIGS}
    assert {"gpt2-tiny", "gpt2-124m", "gpt2-350m", "gpt2-1.3b", "llama-tiny", "llama-7b"} <= names


BAD_INPUTS = [
    (["--train.bogus=1"], "train.bogus"),
    (["--train.max_steps=abc"], "train.max_steps"),
    (["--train.micro_batch_size=0"], "train.micro_batch_size"),
    (["--train.global_batch_size=10", "--train.micro_batch_size=4"], "train.global_batch_size"),
    (["--deepspeed.zero_stage=5"], "deepspeed.zero_stage"),
    (["--deepspeed.config=/nope/ds_config.json"], "deepspeed.config"),
    (["--data.paths=[/nope/corpus]"], "data.paths[0]"),
    (["--model.preset=gpt9-huge"], "model.preset"),
    (["--data.tokenizer=/nope/tok"], "data.tokenizer"),
    (["--checkpoint.resume=/nope/step_00000010"], "checkpoint.resume"),
    (["--model.vocab_size=10"], "model.vocab_size"),  # below the trained BPE's 256 bytes + end-of-text
]


# validate checks every case; train and launch (which would start process groups) a spread of them.
CASES = [("validate", *case) for case in BAD_INPUTS] + [
    (command, *BAD_INPUTS[i]) for command in ("train", "launch") for i in (0, 3, 5, 6)] + [
    ("launch", *BAD_INPUTS[i]) for i in (9, 10)]  # exit 2 before torchrun, not 1 from inside the workers


@pytest.mark.parametrize(("command", "overrides", "needle"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, cli_env, command, overrides, needle):
    out = tmp_path / "runs"
    argv = {"validate": ["validate"], "train": ["train"], "launch": ["launch", "local", "--nproc-per-node=2"]}[command]
    result = run_cli([*argv, TINY_CONFIG, f"--output_dir={out}", *overrides], cwd=tmp_path, env=cli_env)
    assert_one_line_error(result, needle)
    assert not out.exists()


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_by_validate(tmp_path, cli_env):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, vocab_size=300, special_tokens=["<|endoftext|>"])
    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(str(folder))
    tokens = bpe.get_vocab_size()
    small = run_cli(["validate", TINY_CONFIG, f"--data.tokenizer={folder}", f"--model.vocab_size={tokens - 1}",
                     "--model.vocab_multiple=1"],  # unpadded: padding would make it fit
                    cwd=tmp_path, env=cli_env)
    assert_one_line_error(small, f"config field model.vocab_size: {tokens - 1} is smaller than the {tokens} tokens "
                                 "of data.tokenizer", str(folder))
    fits = run_cli(["validate", TINY_CONFIG, f"--data.tokenizer={folder}", f"--model.vocab_size={tokens}",
                    "--model.vocab_multiple=1"],
                   cwd=tmp_path, env=cli_env)
    assert fits.returncode == 0, fits.stderr


def test_unwritable_nvme_offload_dir_is_rejected(tmp_path, cli_env):
    ds = tmp_path / "ds.json"
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    offload = {"device": "nvme", "nvme_path": f"{blocked}/sub"}
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": offload}}))
    result = run_cli(["validate", TINY_CONFIG, f"--deepspeed.config={ds}"], cwd=tmp_path, env=cli_env)
    assert_one_line_error(result, "nvme_path", "not writable")


def test_missing_config_file_and_bad_yaml(tmp_path, cli_env):
    assert_one_line_error(run_cli(["validate", str(tmp_path / "absent.yaml")], cwd=tmp_path, env=cli_env), "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert_one_line_error(run_cli(["validate", str(bad)], cwd=tmp_path, env=cli_env), "bad.yaml", "line")
    with pytest.raises(UserInputError):
        load_config(bad)


def test_validate_prints_derived_figures_fast(tmp_path, cli_env):
    result = run_cli(["validate", str(REPO / "configs" / "gpt2-124m.yaml"), "--world-size=8"], cwd=tmp_path, env=cli_env)
    assert result.returncode == 0, result.stderr
    for needle in ("parameters", "tokens per step", "grad accum", "ZeRO-", "model states per rank"):
        assert needle in result.stdout
    # heavy libraries stay unimported: validate must be instant
    probe = "import sys, launcher.cli as c; c.main(['validate', %r]); print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))"
    out = run_command([sys.executable, "-c", probe % TINY_CONFIG], cwd=tmp_path, env=cli_env)
    assert out.stdout.strip().endswith("[]"), out.stdout


def test_slurm_task_variables_become_torchrun_variables():
    from bigmodel_dist.core.distributed import facts_from_env, torchrun_env_from_slurm

    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_NODEID": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "23456"}
    facts = facts_from_env({**slurm, **torchrun_env_from_slurm(slurm)})
    assert (facts.rank, facts.local_rank, facts.world_size, facts.local_world_size, facts.node_rank) == (3, 1, 4, 2, 1)
    assert facts.num_nodes == 2 and facts.master_addr == "n1"
    assert torchrun_env_from_slurm({**slurm, "WORLD_SIZE": "4"}) == {}  # torchrun already decided


def test_launch_slurm_dry_run_prints_the_exact_sbatch_command(tmp_path, cli_env):
    result = run_cli(["launch", "slurm", TINY_CONFIG, "--nodes=2", "--nproc-per-node=2", "--time=00:10:00", "--dry-run",
                      f"--output_dir={tmp_path}", "--train.max_steps=5"], cwd=tmp_path, env=cli_env)
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip()
    assert command.startswith("sbatch --parsable --job-name=gpt2-tiny --nodes=2 ")
    assert "--time=00:10:00" in command and "BIGMODEL_NPROC_PER_NODE=2" in command
    assert command.endswith(f"{REPO / 'slurm' / 'pretrain_gpt.sh'} {REPO / 'configs' / 'gpt2-tiny.yaml'} "
                            f"--output_dir={tmp_path} --train.max_steps=5")
    assert not (tmp_path / "gpt2-tiny").exists()  # a dry run writes nothing


def _float_fields(cls: type, prefix: str = "") -> list[str]:
    """Every float setting of the schema, dotted (optional ones included)."""
    import dataclasses
    import types
    import typing

    found = []
    for name, annotation in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(annotation):
            found += _float_fields(annotation, f"{prefix}{name}.")
        elif annotation is float or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                     and float in typing.get_args(annotation)):
            found.append(f"{prefix}{name}")
    return found


FLOAT_FIELDS = _float_fields(Config)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_every_float_setting_must_be_finite(value):
    assert {"optim.lr", "resilience.hang_timeout_s", "resilience.spike_factor"} <= set(FLOAT_FIELDS)
    for field in FLOAT_FIELDS:
        with pytest.raises(ConfigError, match=rf"config field {re.escape(field)}: must be a finite number"):
            load_config(REPO / "configs" / "gpt2-tiny.yaml", [f"--{field}={value}"])
    with pytest.raises(ConfigError, match=r"config field data.weights.code: must be a finite number"):
        load_config(REPO / "configs" / "gpt2-tiny.yaml", [f"--data.weights.code={value}"])


def test_a_non_finite_setting_stops_launch_local_before_anything_starts(tmp_path, cli_env):
    result = run_cli(["launch", "local", TINY_CONFIG, f"--output_dir={tmp_path}", "--resilience.hang_timeout_s=nan"],
                     env=cli_env)
    assert_one_line_error(result, "config field resilience.hang_timeout_s: must be a finite number, got 'nan'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, bounds", [("4", (4, 4)), (3, (3, 3)), ("2..4", (2, 4)), ("2:4", (2, 4)),
                                          (" 1 .. 2 ", (1, 2))])
def test_size_ranges_read_both_spellings(text, bounds):
    """`--nnodes 2:4` (torchrun's spelling) and `ray.num_workers: 2..4` (Ray's) go through one parser."""
    from bigmodel_dist.config.ranges import parse_size_range

    assert parse_size_range(text, "--nnodes") == bounds


@pytest.mark.parametrize("text, needle", [("2-4", "give a number or MIN..MAX"), ("0..2", "needs 1 <= MIN <= MAX"),
                                          ("4:2", "needs 1 <= MIN <= MAX"), ("", "give a number")])
def test_bad_size_ranges_name_where_they_were_given(text, needle):
    from bigmodel_dist.config.ranges import parse_size_range

    with pytest.raises(UserInputError, match=needle) as raised:
        parse_size_range(text, "ray.num_workers")
    assert str(raised.value).startswith("ray.num_workers")
