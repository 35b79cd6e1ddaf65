"""Weighted mixtures of sources: exact proportions over every window, each source in its own order,
resume exact on any world size, curricula recorded, a source that runs out repeats, bad weights refused."""

from __future__ import annotations

import math
import sysconfig
from collections import Counter

import pytest

from bigmodel_dist.checkpoint.integrity import read_checkpoint_meta, step_dir_name
from bigmodel_dist.core.quotas import apportion
from bigmodel_dist.data.mixture import MixtureReader, MixtureSchedule, Segment, budgets_in_sequences
from bigmodel_dist.data.sampler import ShuffledOrder
from bigmodel_dist.metrics.jsonl import read_metrics
from tests.conftest import TINY, tiny_run
from tests.helpers.commands import TINY_CONFIG, assert_one_line_error, run_cli
from tests.helpers.spawn import run_distributed
from tests.helpers.workers import train_and_collect

STDLIB = sysconfig.get_paths()["stdlib"]
GLOBAL_BATCH = 8  # TINY's


def test_apportion_is_exact_and_largest_remainder():
    assert apportion(1000, [0.5, 0.2, 0.3]) == [500, 200, 300]
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]  # the remainder goes to the earlier source on a tie
    assert apportion(7, [0.0, 2.0, 5.0]) == [0, 2, 5]


def test_every_window_holds_exactly_each_sources_share_in_its_own_order():
    schedule = MixtureSchedule([Segment(0, (0.5, 0.2, 0.3), (0, 0, 0), 10)], seed=3)
    located = [schedule.locate(g) for g in range(200)]
    for w in range(20):
        counts = Counter(source for source, _ in located[w * 10:(w + 1) * 10])
        assert counts == {0: 5, 1: 2, 2: 3}
    for source in range(3):  # each source reads its samples 0, 1, 2, ... once each, in schedule order
        assert [n for s, n in located if s == source] == list(range(sum(1 for s, _ in located if s == source)))
    assert schedule.consumed_at(137) == [sum(1 for s, _ in located[:137] if s == k) for k in range(3)]
    assert located[:10] != [schedule.locate(g) for g in range(10, 20)]  # windows are permuted differently


def test_new_weights_continue_each_source_where_it_stood():
    schedule = MixtureSchedule([Segment(0, (0.5, 0.5), (0, 0), 4)], seed=1)
    switched = schedule.switched((0.25, 0.75), 8, at=10)
    assert [switched.locate(g) for g in range(10)] == [schedule.locate(g) for g in range(10)]  # the past stays
    after = [switched.locate(g) for g in range(10, 50)]
    before = schedule.consumed_at(10)
    for source in range(2):
        assert [n for s, n in after if s == source][:3] == [before[source] + i for i in range(3)]
    assert Counter(s for s, _ in after) == {0: 10, 1: 30}


def test_a_source_with_a_budget_gives_exactly_it_then_leaves_and_the_others_share_its_slots():
    schedule = MixtureSchedule([Segment(0, (0.5, 0.2, 0.3), (0, 0, 0), 10, (-1, 7, -1))], seed=3)
    located = [schedule.locate(g) for g in range(300)]
    assert [n for s, n in located if s == 1] == list(range(7))  # its budget, each sample once
    leaves = max(g for g, (s, _) in enumerate(located) if s == 1) + 1
    assert schedule.segments[1].start == leaves and schedule.spent_at(leaves) == {1} and not schedule.spent_at(leaves - 1)
    after = located[leaves:leaves + 200]
    for w in range(20):  # the derived segment's windows: 6 + 4 of 10 (0.5 : 0.3 by largest remainder)
        assert Counter(s for s, _ in after[w * 10:(w + 1) * 10]) == {0: 6, 2: 4}
    for source in (0, 2):  # the others go on where they stood
        assert [n for s, n in located if s == source] == list(range(sum(1 for s, _ in located if s == source)))
    assert schedule.consumed_at(300) == [sum(1 for s, _ in located if s == k) for k in range(3)]


def test_budgets_follow_from_the_saved_segments_and_a_new_budget_keeps_the_past():
    first = Segment(0, (0.5, 0.5), (0, 0), 4, (5, -1))
    schedule = MixtureSchedule([first], seed=2)
    assert [s.as_dict() for s in schedule.saved] == [first.as_dict()]  # derived segments are not saved
    again = MixtureSchedule([Segment.from_dict(first.as_dict())], seed=2)  # what a resume rebuilds
    assert [again.locate(g) for g in range(40)] == [schedule.locate(g) for g in range(40)]
    raised = schedule.switched((0.5, 0.5), 4, at=30, budgets=(9, -1))  # a larger budget on resume
    assert [raised.locate(g) for g in range(30)] == [schedule.locate(g) for g in range(30)]
    assert [n for s, n in (raised.locate(g) for g in range(80)) if s == 0] == list(range(9))


def test_when_every_budget_is_spent_the_schedule_ends():
    schedule = MixtureSchedule([Segment(0, (0.5, 0.5), (0, 0), 4, (3, 5))], seed=1)
    assert schedule.end == 8 and schedule.consumed_at(8) == schedule.consumed_at(20) == [3, 5]
    assert Counter(schedule.locate(g)[0] for g in range(8)) == {0: 3, 1: 5}
    with pytest.raises(IndexError):
        schedule.locate(8)
    assert budgets_in_sequences([0, 256, 0], [0.0, 0.0, 1.5], [10, 10, 10], 128) == (-1, 2, 15)
    assert budgets_in_sequences([0, 0], [0.0, 0.0], [10, 10], 128) == ()
    assert budgets_in_sequences([128 * 30], [2.0], [10], 128) == (20,)  # the smaller budget wins


def test_a_one_source_mixture_reads_what_the_single_pool_reads():
    rows = [[i] for i in range(17)]
    reader = MixtureReader([rows], MixtureSchedule([Segment(0, (1.0,), (0,), 10)], seed=5), seed=5)
    order = ShuffledOrder(17, 5)
    assert [reader(g)[0] for g in range(60)] == [rows[order[g]][0] for g in range(60)]


def _mixture(*weights: float, small: bool = False, budgets: tuple[str, ...] = ("", "", "")) -> str:
    names = ("email", "json", "tiny" if small else "asyncio")
    paths = (f"{STDLIB}/email", f"{STDLIB}/json", f"{STDLIB}/json/tool.py" if small else f"{STDLIB}/asyncio")
    items = ", ".join(f"{{name: {n}, paths: [{p}], weight: {w}{', ' + b if b else ''}}}"
                      for n, p, w, b in zip(names, paths, weights, budgets))
    return f"--data.sources=[{items}]"


def _run(tmp_path, data_cache, *extra: str) -> list[str]:
    return [*tiny_run(tmp_path, data_cache), "--name=mix", "--train.eval_every=0",
            "--data.mixture_window=8", "--train.max_steps=6", "--logging.wandb_mode=disabled", "--model.dropout=0.0",
            "--train.precision=fp32", *extra]


def _state(tmp_path, step: int) -> dict:
    meta, problem = read_checkpoint_meta(tmp_path / "mix" / "checkpoints" / step_dir_name(step))
    assert problem is None, problem
    return meta["train_state"]


def _tokens(tmp_path) -> dict[str, list[float]]:
    history = read_metrics(tmp_path / "mix" / "metrics.jsonl")
    return {name: history.series(f"data/{name}/tokens_seen")[1] for name in ("email", "json", "asyncio")}


def test_a_three_source_mixture_resumes_exactly_and_on_another_world_size(tmp_path, data_cache):
    mixture = _mixture(0.5, 0.25, 0.25)
    straight_dir, resumed_dir, reshaped_dir = tmp_path / "straight", tmp_path / "resumed", tmp_path / "reshaped"
    straight, _ = run_distributed(train_and_collect, 2, _run(straight_dir, data_cache, mixture, "--checkpoint.every=3"))
    tokens = _tokens(straight_dir)
    # 6 steps x 8 sequences, windows of 8: 4 + 2 + 2 per window, exactly, at every log step
    assert [tokens[name][-1] for name in ("email", "json", "asyncio")] == [24 * 128, 12 * 128, 12 * 128]
    for name, share in (("email", 4), ("json", 2), ("asyncio", 2)):
        assert tokens[name] == [step * share * 128 for step in range(1, 7)], tokens

    budget = f"--train.max_tokens={3 * GLOBAL_BATCH * 128}"
    run_distributed(train_and_collect, 2, _run(resumed_dir, data_cache, mixture, "--checkpoint.every=0", budget))
    resumed, _ = run_distributed(train_and_collect, 2, _run(resumed_dir, data_cache, mixture, "--checkpoint.every=0"))
    assert resumed["losses"] == straight["losses"][3:]  # bit-exact
    run_distributed(train_and_collect, 2, _run(reshaped_dir, data_cache, mixture, "--checkpoint.every=0", budget))
    (reshaped,) = run_distributed(train_and_collect, 1, _run(reshaped_dir, data_cache, mixture, "--checkpoint.every=0"))
    # dropout off: only the order of floating-point reductions changes with the world size
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(reshaped["losses"], straight["losses"][3:]))
    assert _tokens(reshaped_dir) == _tokens(resumed_dir) == tokens  # the same samples of each source
    assert _state(reshaped_dir, 6)["mixture"] == _state(straight_dir, 6)["mixture"]


def test_changed_weights_on_resume_are_a_recorded_curriculum(tmp_path, data_cache):
    run_distributed(train_and_collect, 2, _run(tmp_path, data_cache, _mixture(0.5, 0.25, 0.25),
                                               f"--train.max_tokens={3 * GLOBAL_BATCH * 128}"))
    run_distributed(train_and_collect, 2, _run(tmp_path, data_cache, _mixture(0.5, 0.25, 0.25),
                                               "--data.weights.email=0", "--data.weights.json=1"))
    (incident,) = read_metrics(tmp_path / "mix" / "metrics.jsonl").incidents
    assert incident["event"] == "mixture" and incident["at_sample"] == 24 and incident["step"] == 3
    segments = _state(tmp_path, 6)["mixture"]
    assert [s["start"] for s in segments] == [0, 24] and segments[1]["consumed"] == [12, 6, 6]
    tokens = _tokens(tmp_path)
    assert tokens["email"][-1] == 12 * 128  # no more email after the switch
    assert tokens["json"][-1] + tokens["asyncio"][-1] == 36 * 128


def test_a_source_that_runs_out_begins_a_new_epoch_and_one_with_a_budget_leaves(tmp_path, data_cache, cli_env):
    budget = "max_tokens: 1280"  # json: 10 sequences of 128 tokens, spent inside the 6 steps x 8
    result = run_cli(["train", TINY_CONFIG, *_run(tmp_path, data_cache, _mixture(
        0.25, 0.5, 0.25, small=True, budgets=("", budget, "")), "--data.val_fraction=0.4")], env=cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "source tiny ran out of sequences and began epoch 2" in result.stderr
    assert "source json used up its budget (1280 tokens) and leaves the mixture" in result.stderr
    history = read_metrics(tmp_path / "mix" / "metrics.jsonl")
    assert history.series("data/tiny/epoch")[1][-1] >= 1
    assert history.series("data/json/tokens_seen")[1][-1] == 1280
    assert history.series("data/email/tokens_seen")[1][-1] + history.series("data/tiny/tokens_seen")[1][-1] == \
        (48 - 10) * 128  # the other two took json's slots


def test_budgets_too_small_for_the_run_are_refused_at_start_up(tmp_path, data_cache, cli_env):
    budgets = ("max_tokens: 1280", "max_epochs: 0.01", "max_tokens: 640")
    result = run_cli(["train", TINY_CONFIG, *_run(tmp_path, data_cache, _mixture(0.25, 0.5, 0.25, budgets=budgets))],
                     env=cli_env)
    assert_one_line_error(result, "data.sources", "hold 16 training sequences", "train.max_steps", after_logs=True)


@pytest.mark.parametrize("override, field", [
    (_mixture(0.5, -1, 0.5), "data.sources[1].weight"),
    (_mixture(0, 0, 0), "data.sources"),
    (_mixture(0.5, 0.5, 0.5, budgets=("", "max_epochs: -1", "")), "data.sources[1].max_epochs"),
    ("--data.weights.nope=1", "data.weights.nope"),
])
def test_bad_weights_are_one_line_errors(tmp_path, cli_env, override, field):
    overrides = [override] if override.startswith("--data.sources") else [_mixture(0.5, 0.25, 0.25), override]
    result = run_cli(["validate", TINY_CONFIG, f"--output_dir={tmp_path}", *overrides], env=cli_env)
    assert_one_line_error(result, field)


@pytest.mark.parametrize("multiple, expected", [(64, 1024), (128, 1024), (1, 1000)])
def test_the_model_vocabulary_is_padded_to_the_configured_multiple(tmp_path, multiple, expected):
    from bigmodel_dist.config import load_config
    from bigmodel_dist.run.resolve import resolve_run

    cfg = load_config(TINY_CONFIG, [f"--output_dir={tmp_path}", "--model.vocab_size=1000",
                                    f"--model.vocab_multiple={multiple}"])
    resolved = resolve_run(cfg, 2)
    assert resolved.shape.vocab_size == resolved.config.model.vocab_size == expected


def test_local_datasets_sources_are_read_with_the_datasets_api(tmp_path, data_cache, cli_env):
    """A `save_to_disk` folder (load_from_disk), an .arrow file and a .jsonl file (load_dataset), each a
    source of one mixture, made here with `datasets` itself."""
    import datasets

    texts = [open(f"{STDLIB}/{name}").read() for name in ("json/decoder.py", "json/encoder.py", "email/utils.py",
                                                          "email/header.py", "email/message.py")]
    table = datasets.Dataset.from_dict({"content": texts * 4, "id": list(range(20))})
    table.save_to_disk(str(tmp_path / "saved"))
    (arrow_file,) = (tmp_path / "saved").glob("*.arrow")
    (tmp_path / "rows.jsonl").write_text("".join(f'{{"content": {json_text}}}\n' for json_text in
                                                 map(__import__("json").dumps, texts * 4)))
    items = ", ".join(f"{{name: {n}, paths: [{p}], weight: 1, text_column: content}}" for n, p in
                      (("saved", tmp_path / "saved"), ("arrow", arrow_file), ("rows", tmp_path / "rows.jsonl")))
    result = run_cli(["prepare", TINY_CONFIG, *tiny_run(tmp_path, data_cache),
                      f"--data.sources=[{items}]", "--data.val_fraction=0.1"], env=cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("source ")]
    assert [line.split(":")[0] for line in lines] == ["source saved", "source arrow", "source rows"]
    counts = [int(line.split(": ")[-1].split(" train")[0]) for line in lines]
    assert counts[0] == counts[1] > 0 and counts[2] > 0  # the folder and its own arrow file: the same rows


def test_a_missing_source_is_named_by_its_field(tmp_path, cli_env):
    items = f"{{name: code, paths: [{STDLIB}/json], weight: 1}}, {{name: gone, paths: [{tmp_path}/nothing], weight: 1}}"
    result = run_cli(["validate", TINY_CONFIG, f"--output_dir={tmp_path}", f"--data.sources=[{items}]"], env=cli_env)
    assert_one_line_error(result, "data.sources[1] (gone)", "does not exist")


def test_a_mixture_plans_one_folder_per_source_for_cluster_engines(tmp_path):
    from bigmodel_dist.config import load_config
    from bigmodel_dist.data.mixture_sources import prepare_run_sources, run_plans

    cfg = load_config(TINY_CONFIG, [*TINY, f"--output_dir={tmp_path}", f"--data.cache_dir={tmp_path / 'cache'}",
                                    _mixture(0.5, 0.25, 0.25)])
    plans = run_plans(cfg, 512)  # what `bigmodel prepare --on ray` and slurm/prepare.sh carry out
    assert len(plans) == 3
    prepared = prepare_run_sources(cfg, 512, progress=False)
    assert sorted(plan.out for plan in plans) == sorted(str(path.resolve()) for _, path in prepared)
    assert run_plans(cfg, 512) == []  # all complete: nothing left for a cluster
