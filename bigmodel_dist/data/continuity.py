"""A resumed run trains on the data its checkpoint was trained on, tokenized by the checkpoint's tokenizer.

Every checkpoint records its data (`checkpoint_data`): the tokenizer's fingerprint, the settings that
shape the corpus and every input file's size and modification time. On resume (`continue_data`):
- the tokenizer is the checkpoint's own (saved in it), never one trained again on a corpus that grew:
  its token ids are what the embeddings were trained on;
- files added, removed or modified since are refused in one line naming them, unless the run says
  `data.accept_corpus_change=true`: then the new corpus is tokenized with the checkpoint's tokenizer
  and the change becomes a `data` incident in the metrics (and W&B), as a mixture change does.
Launchers call it before any process starts; every rank calls it again before its process group.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from bigmodel_dist.config.inputs import file_stats, input_files, sources_here
from bigmodel_dist.core.errors import UserInputError

if TYPE_CHECKING:
    from bigmodel_dist.checkpoint.choice import ResumePoint
    from bigmodel_dist.config.schema import Config, DataConfig

SHAPING = ("max_bytes", "text_column", "dataset", "extensions")  # data settings that change the corpus read
SHOWN = 3  # file names a refusal shows per kind of change


def corpus_files(data: DataConfig) -> dict[str, list[int]]:
    """Every input file of the run (all sources of a mixture): path -> [size, mtime_ns]. None are listed
    for a hub dataset, or for data prepared elsewhere (`data.prepared_dir`) whose sources are not here:
    nothing local to compare."""
    configs = [dataclasses.replace(data, paths=list(s.paths), dataset=s.dataset) for s in data.sources] or [data]
    files: dict[str, list[int]] = {}
    for config in configs:
        if config.dataset or (data.prepared_dir and not sources_here(config)):
            continue
        for member, stat in file_stats(input_files(config)):
            files[str(member)] = [stat.st_size, stat.st_mtime_ns]
    return files


def checkpoint_data(data: DataConfig, tokenizer_fingerprint: str) -> dict[str, Any]:
    """What a checkpoint records about the data it was trained on."""
    return {"tokenizer_fingerprint": tokenizer_fingerprint, "files": corpus_files(data),
            "settings": {name: getattr(data, name) for name in SHAPING}}


@dataclasses.dataclass(frozen=True)
class CorpusChange:
    added: list[str]
    removed: list[str]
    modified: list[str]
    settings: dict[str, list[Any]]  # name -> [before, now]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.modified or self.settings)

    def summary(self) -> str:
        parts = [f"{len(names)} file(s) {kind} ({_some(names)})" for kind, names in
                 (("added", self.added), ("removed", self.removed), ("modified", self.modified)) if names]
        parts += [f"data.{name} {before!r} -> {now!r}" for name, (before, now) in self.settings.items()]
        return ", ".join(parts)

    def as_incident(self) -> dict[str, Any]:
        return {"added": len(self.added), "removed": len(self.removed), "modified": len(self.modified),
                "settings": self.settings, "files": (self.added + self.removed + self.modified)[:20]}


def _some(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f", ... {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def corpus_change(recorded: dict[str, Any], data: DataConfig) -> CorpusChange:
    before, now = recorded["files"], corpus_files(data)
    settings = {name: [recorded["settings"].get(name), getattr(data, name)] for name in SHAPING
                if name in recorded["settings"] and _plain(recorded["settings"][name]) != _plain(getattr(data, name))}
    return CorpusChange(added=sorted(now.keys() - before.keys()), removed=sorted(before.keys() - now.keys()),
                        modified=sorted(p for p in now.keys() & before.keys() if now[p] != before[p]),
                        settings=settings)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def continue_data(config: Config, resume: ResumePoint | None) -> tuple[Config, CorpusChange | None]:
    """The config a run resumed from `resume` trains with (its data tokenized by the checkpoint's
    tokenizer), and the corpus change the run accepted, if any; a change not accepted is refused."""
    from bigmodel_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    recorded = resume.meta.get("data") if resume is not None else None
    if recorded is None:  # a fresh run, or a checkpoint of a version that did not record its data
        return config, None
    assert resume is not None
    data = config.data
    change = corpus_change(recorded, data)
    if change and not data.accept_corpus_change:
        raise UserInputError(
            f"checkpoint {resume.path}: trained on other data: {change.summary()}. Resuming would change the data "
            "under it: restore the corpus, start a new run (--name), or pass --data.accept_corpus_change=true to "
            "tokenize the new corpus with the checkpoint's tokenizer")
    saved = resume.path / "tokenizer"
    if data.tokenizer is None:
        if not (saved / "tokenizer.json").is_file():
            raise UserInputError(f"checkpoint {resume.path}: its tokenizer/ folder is missing; the run cannot go on "
                                 "with the token ids it was trained on (set data.tokenizer to that tokenizer)")
        config = dataclasses.replace(config, data=dataclasses.replace(data, tokenizer=str(saved)))
    elif tokenizer_fingerprint(load_tokenizer(data.tokenizer)) != recorded["tokenizer_fingerprint"]:
        raise UserInputError(f"data.tokenizer {data.tokenizer}: not the tokenizer checkpoint {resume.path} was trained "
                             f"with (its copy is in {saved}); use that one or start a new run (--name)")
    return config, (change or None)
