"""setup.py's declared torch / Triton ranges hold for what is installed, the package installs
without the network once its build backend is present, and nothing at the repository root
shadows an installed distribution."""

import ast
import importlib.metadata
import importlib.util
import os
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


def test_install_works_offline_and_imports_its_own_kernels(tmp_path):
    """No build step needs the network: pip without an index, without build isolation. The
    (non-editable) install ships fastlora/kernels and imports the kernels from there."""
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
    imported = import_in_subprocess(tmp_path, extra_path=str(target))
    assert imported.returncode == 0, imported.stderr
    origins = dict(line.split(" ", 1) for line in imported.stdout.splitlines())
    assert origins["fastlora.kernels.lora_forward"] == str(target / "fastlora" / "kernels" / "lora_forward.py")


def importable_from_root() -> list[str]:
    """The names ``import NAME`` finds at the repository root: packages (folders with an
    ``__init__.py``) and modules. A folder without ``__init__.py`` is only a namespace portion,
    which an installed regular package of the same name wins over."""
    names = [path.name for path in ROOT.iterdir() if path.is_dir() and (path / "__init__.py").is_file()]
    names += [path.stem for path in ROOT.glob("*.py")]
    return sorted(names)


def test_no_root_folder_shadows_an_installed_distribution():
    """``python -m ...`` and pytest put the repository root first on sys.path: a package there
    named like an installed distribution's import name (Hugging Face's ``kernels``, which
    transformers imports) would hide it from everything run from the root."""
    installed = importlib.metadata.packages_distributions()
    shadowing = {name: installed[name] for name in importable_from_root()
                 if name in installed and set(installed[name]) != {"fastlora"}}
    assert not shadowing, f"repository root folders shadow installed distributions: {shadowing}"


IMPORTS = ["fastlora", "fastlora.kernels.lora_forward", "fastlora.ops.triton_ops"]
THIRD_PARTY = ["transformers.modeling_utils", "peft", "kernels"]


def import_in_subprocess(cwd: pathlib.Path, extra_path: str | None = None) -> subprocess.CompletedProcess:
    """Import fastlora, its kernels and the third-party packages that must not be shadowed
    (those installed here), run from ``cwd``; print where each module came from."""
    installed = importlib.metadata.packages_distributions()  # not find_spec: the root's kernels/ would answer it
    names = IMPORTS + [name for name in THIRD_PARTY if name.split(".")[0] in installed]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    print(name, importlib.import_module(name).__file__)\n")
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_imports_work_from_any_folder(where, tmp_path):
    cwd = ROOT if where == "repository root" else tmp_path
    result = import_in_subprocess(cwd)
    assert result.returncode == 0, result.stderr
    origins = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    if "kernels" in origins:
        assert pathlib.Path(origins["kernels"]).parent != ROOT / "kernels", "the repository's kernels/ shadowed HF's"
