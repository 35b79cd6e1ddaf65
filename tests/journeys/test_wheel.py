"""The project installed as users install it (`pip install .`, what docker/Dockerfile does): a wheel in a
fresh virtual environment, run from a directory outside the repository. The shipped DeepSpeed configs
and the sbatch script must come with it, not from a source tree the wheel does not have.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers.guards import HANG_GUARD_S

SHIPPED = sorted(p.stem for p in (REPO / "configs" / "deepspeed").glob("*.json"))


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; its dependencies are this environment's installed packages,
    on the path after it (a path entry, not a site dir: this environment's editable finder stays out)."""
    work = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(work / "dist"), str(REPO)], cwd=work)
    assert built.returncode == 0, built.stderr[-3000:]
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' scratch folder in the source tree
    (wheel,) = (work / "dist").glob("bigmodel_dist-*.whl")
    venv = work / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=work).returncode == 0
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work)
    (Path(site.stdout.strip()) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=work)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


def test_the_wheel_validates_every_shipped_deepspeed_name_from_anywhere(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(REPO / "configs" / "gpt2-tiny.yaml", elsewhere / "my.yaml")
    where = _run([str(installed / "bin" / "python"), "-c",
                  "import bigmodel_dist, launcher.slurm.submit as s; print(bigmodel_dist.__file__); print(s.SCRIPT.is_file())"],
                 cwd=elsewhere)
    module_file, script_found = where.stdout.split()
    assert module_file.startswith(str(installed)), where  # the wheel's copy, not the source tree
    assert script_found == "True", "slurm/pretrain_gpt.sh ships in the wheel (bigmodel launch slurm)"
    assert SHIPPED == ["zero0", "zero1", "zero2", "zero2-offload", "zero3", "zero3-nvme", "zero3-offload"]
    for name in SHIPPED:
        result = _run([str(installed / "bin" / "bigmodel"), "validate", "my.yaml", f"--deepspeed.config={name}"],
                      cwd=elsewhere)
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
        stage = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())["zero_optimization"]["stage"]
        assert f"ZeRO-{stage} from " in result.stdout, result.stdout
        assert re.search(rf"^run dir\s+{re.escape(str(elsewhere / 'runs' / 'gpt2-tiny'))}$", result.stdout, re.M), \
            result.stdout  # `runs` relative to where the command ran
