"""One registry of the project's environment variables (`bigmodel_dist/core/env.py`): every `BIGMODEL_*` name
the repository mentions is in it, each is really read where it says and set where it says, Python code names
them only through it, and the README's table is the registry's."""

from __future__ import annotations

import re
import subprocess

import bigmodel_dist.core.env as registry
from bigmodel_dist.core.env import VARIABLES, table
from tests.conftest import REPO

NAME = re.compile(r"\bBIGMODEL_[A-Z][A-Z0-9_]*[A-Z0-9]\b")


def _tracked_text_files() -> dict[str, str]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    texts = {}
    for name in listed:
        path = REPO / name
        if path.is_file() and not path.is_symlink() and path.suffix not in (".png", ".parquet", ".arrow"):
            try:
                texts[name] = path.read_text()
            except UnicodeDecodeError:
                continue
    return texts


def test_every_variable_the_repository_names_is_registered():
    registered = {v.name for v in VARIABLES}
    named = {(match, file) for file, text in _tracked_text_files().items() for match in NAME.findall(text)}
    unregistered = sorted(f"{name} ({file})" for name, file in named if name not in registered)
    assert not unregistered, "add these to bigmodel_dist/core/env.py:\n  " + "\n  ".join(unregistered)


def _mentions(text: str, name: str) -> bool:
    """The variable's name, or (Python) the registry constant that holds it."""
    constants = [c for c, value in vars(registry).items() if value == name and c.isupper()]
    return name in text or any(re.search(rf"\b{constant}\b", text) for constant in constants)


def test_each_variable_is_read_and_set_where_the_registry_says():
    texts = _tracked_text_files()
    for variable in VARIABLES:
        for reader in variable.read_by:
            assert reader in texts, f"{variable.name}: read_by names {reader}, which is not in the repository"
            assert _mentions(texts[reader], variable.name), f"{variable.name}: {reader} does not read it"
        for setter in (part.strip() for part in variable.set_by.split(",")):
            if "/" in setter and not setter.startswith("you"):
                assert setter in texts and _mentions(texts[setter], variable.name), \
                    f"{variable.name}: set_by names {setter}, which does not set it"


def test_python_code_names_the_variables_only_through_the_registry():
    """A name typed as a string in two modules drifts; the constants of core/env.py cannot."""
    offenders = [f"{file}: {line.strip()}" for file, text in _tracked_text_files().items()
                 if file.endswith(".py") and file.startswith(("bigmodel_dist/", "launcher/"))
                 and file != "bigmodel_dist/core/env.py"
                 for line in text.splitlines() if re.search(r"[\"']BIGMODEL_", line)]
    assert not offenders, "use the constants of bigmodel_dist/core/env.py:\n  " + "\n  ".join(offenders)


def test_the_readme_table_is_the_registry():
    readme = (REPO / "README.md").read_text()
    assert table() in readme, ("README.md's environment-variable table differs from the registry; paste the output "
                               "of `python -m bigmodel_dist.core.env` into it")
