"""docker/Dockerfile without a Docker engine: it parses, what it copies exists, its pins match pyproject."""

from __future__ import annotations

import re

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "CMD", "ENTRYPOINT", "EXPOSE",
                "LABEL", "SHELL", "VOLUME", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dockerfile_parses_and_defines_what_it_uses():
    steps = instructions()
    names = [name for name, _ in steps]
    assert set(names) <= INSTRUCTIONS, set(names) - INSTRUCTIONS
    assert names[next(i for i, n in enumerate(names) if n != "ARG")] == "FROM"  # only ARGs before FROM
    defined = set()
    for name, args in steps:
        for used in re.findall(r"\$\{(\w+)\}", args):
            assert used in defined or used == "PATH", f"{used} used before ARG/ENV defines it"
        if name == "ARG":
            defined.add(args.split("=", 1)[0].strip())
        if name == "ENV":
            defined.update(re.findall(r"(\w+)=", args))
    assert ("USER", "bigmodel") in steps  # not root at run time
    assert any(name == "RUN" and "ds_report" in args for name, args in steps)  # ops built and reported


def test_every_copied_file_exists():
    for name, args in instructions():
        if name == "COPY":
            *sources, _destination = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_package_specifiers_match_pyproject():
    project = _pyproject()["project"]
    wanted = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    text = DOCKERFILE.read_text()
    pinned = [Requirement(spec) for spec in re.findall(r'pip install "([A-Za-z0-9_.\-]+[<>=!~][^"$]*)"', text)]
    assert pinned, "no quoted requirement found in the Dockerfile"
    for requirement in pinned:
        assert requirement.name in wanted, f"{requirement.name} is installed by the image but not a dependency"
        assert str(requirement.specifier) == str(wanted[requirement.name].specifier), requirement
    torch_version = re.search(r"ARG TORCH_VERSION=(\S+)", text)[1]
    assert Version(torch_version) in wanted["torch"].specifier  # the image's torch satisfies the project
    extras = re.findall(r'pip install "\.\[(\w+)\]"', text)
    assert extras and all(extra in project["optional-dependencies"] for extra in extras)


def test_what_the_package_links_to_is_copied_before_the_install():
    """The packages link to configs/deepspeed and slurm/ (shipped as package data); `pip install .` finds
    dangling links, and a wheel without the named DeepSpeed configs, unless those folders came first."""
    links = [path for package in ("bigmodel_dist", "launcher") for path in (REPO / package).rglob("*")
             if path.is_symlink()]
    assert links, "the package links to its shipped configs"
    steps = instructions()
    install = next(i for i, (name, args) in enumerate(steps) if name == "RUN" and re.search(r'pip install "?\.(\[|"|\s|$)', args))
    copied_before = {source.rstrip("/") for name, args in steps[:install] if name == "COPY" for source in args.split()[:-1]}
    for link in links:
        target = link.resolve().relative_to(REPO).parts[0]  # the top-level folder the link points into
        assert target in copied_before, f"{link.relative_to(REPO)} -> {target}/: COPY it before `pip install .`"
