"""A generated project installs into a fresh virtual environment (not this one) with
`pip install -e .[dev]` and passes its own tests there."""

from __future__ import annotations

import re
import subprocess
import sys
import venv

import pytest

from conftest import render


@pytest.mark.slow
@pytest.mark.parametrize("answers", [{}, {"dataset_format": "parquet", "num_stages": 2}], ids=["defaults", "parquet"])
def test_generated_project_installs_and_passes_its_tests(tmp_path, answers):
    project = render(tmp_path / "project", project_name="installable", **answers)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", ".[dev]"], cwd=project,
                             capture_output=True, text=True, check=False, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    # it is really a separate environment, and the package is importable from anywhere
    where = subprocess.run([str(python), "-c", "import sys, trainer; print(sys.prefix); print(trainer.__version__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(env_dir), "1.0.0"] and str(env_dir) != sys.prefix
    tests = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project,
                           capture_output=True, text=True, check=False, timeout=900)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert re.search(r"(\d+) passed", tests.stdout) and int(re.search(r"(\d+) passed", tests.stdout)[1]) >= 25
