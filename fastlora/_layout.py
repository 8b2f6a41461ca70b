"""Where fastlora's non-Python-package folders live: in an installed wheel or the repository.

The repository keeps the Triton kernels in ``kernels/`` and the C++ sources in ``csrc/`` at its
root; setup.py installs them as ``fastlora/kernels`` and ``fastlora/csrc``. ``kernels/`` has no
``__init__.py`` on purpose: a regular package named ``kernels`` at the repository root would
shadow Hugging Face's ``kernels`` distribution (which ``transformers`` imports) for anything run
from the root, while a folder without one is only a namespace portion, and an installed regular
package wins over it.

In a source tree (an editable install, or code run from the repository root) there is no
``fastlora/kernels`` folder, and setuptools' editable finder does not resolve a namespace
subpackage, so ``register_kernels_package`` makes ``fastlora.kernels`` the root's ``kernels/``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parent
REPOSITORY_ROOT = PACKAGE_DIR.parent


def shipped_dir(name: str) -> Path:
    """``fastlora/<name>`` of an installed wheel if it is there, else the repository's ``<name>/``."""
    packaged = PACKAGE_DIR / name
    return packaged if packaged.is_dir() else REPOSITORY_ROOT / name


def register_kernels_package() -> ModuleType | None:
    """Make ``fastlora.kernels`` importable in a source tree; return the module it made, if any.

    An installed wheel has ``fastlora/kernels`` and needs nothing (None). Otherwise the
    repository's ``kernels/`` becomes the namespace package ``fastlora.kernels`` (its modules
    import as ``fastlora.kernels.<name>``); the top-level name ``kernels`` is left alone.
    """
    name = f"{__package__}.kernels"
    if name in sys.modules or (PACKAGE_DIR / "kernels").is_dir():
        return None
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(shipped_dir("kernels"))]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    setattr(sys.modules[__package__], "kernels", module)
    return module
