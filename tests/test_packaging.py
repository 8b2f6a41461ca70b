"""setup.py's declared torch / Triton ranges hold for what is installed, and the package
installs without the network once its build backend is present."""

import ast
import importlib.metadata
import importlib.util
import pathlib
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]


def declared(name: str) -> Requirement:
    """The requirement for ``name`` declared in setup.py (read without running setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and node.targets[0].id == name.upper():
            return Requirement(ast.literal_eval(node.value))
    raise AssertionError(f"setup.py declares no {name.upper()} requirement")


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_installed_versions_are_in_the_declared_range(name):
    requirement = declared(name)
    if requirement.marker is not None and not requirement.marker.evaluate():
        pytest.skip(f"{name} is not required on this platform")
    version = importlib.metadata.version(name)
    assert requirement.specifier.contains(version, prereleases=True), f"{name} {version} not in {requirement}"


def test_editable_install_works_offline(tmp_path):
    """No build step needs the network: pip without an index, without build isolation."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed")
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps",
         "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "fastlora" / "kernels" / "lora_forward.py").exists()
    assert (target / "fastlora" / "csrc" / "lora_cpu.cpp").exists()
