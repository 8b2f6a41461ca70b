"""The ``cpp`` backend: the C++ CPU kernels of csrc/, compiled just-in-time with ninja.

The first use compiles csrc/ with ``torch.utils.cpp_extension.load`` (about 20-60 s, once; a
message says so) into ``$XDG_CACHE_HOME/fastlora`` (``~/.cache/fastlora``), one folder per
torch version, Python version, platform and source hash; later uses load the cached library
directly and write nothing (a read-only cache holding a finished build works). A build runs
in a fresh temporary folder beside the final one and is renamed into place when complete, so
a build killed halfway leaves no lock that later processes would wait on, and two processes
building at once never share a folder. An unwritable cache gives the warning below. The
library registers the CPU kernels of ``fastlora::lora_fwd_cpp`` / ``lora_bwd_cpp``, whose
schema and fake kernels are defined here from ``schema.py``, so ``torch.compile`` sees the
same op as for the other backends, of ``fastlora::dequant_4bit_cpp`` (QLoRA's 4-bit
dequantizer, writing into its ``out``) and of ``fastlora::mixed_lora_fwd_cpp`` /
``mixed_lora_bwd_cpp`` (mixed batches: one adapter per row).

``FASTLORA_DISABLE_EXT=1`` turns the extension off. Without a C++ compiler or ninja, or when
the build fails, a one-line warning is issued and the backend reports itself unavailable:
``auto`` then runs the PyTorch path, and a forced ``cpp`` raises saying why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch
import torch.utils.cpp_extension

from fastlora._layout import shipped_dir
from fastlora.ops.schema import define_mixed_ops, define_ops

define_ops("cpp")
# the 4-bit dequantizer of csrc/dequant_4bit.cpp (fastlora/ops/weight4bit.py has the layout)
torch.library.define(
    "fastlora::dequant_4bit_cpp",
    "(Tensor packed, Tensor absmax, Tensor code, int blocksize, Tensor(a!) out) -> ()",
)

define_mixed_ops("cpp")  # mixed batches (csrc/mixed_lora_cpu.cpp): one adapter per row


SOURCES = ("lora_cpu.cpp", "philox.cpp", "dequant_4bit.cpp", "mixed_lora_cpu.cpp")
HEADERS = ("philox.h",)
LIBRARY = "fastlora_cpu.so"
_NOT_TRIED = "not tried yet"
# the build's outcome, kept in a plain dict rather than functools.cache: torch.compile traces
# through a cache wrapper into the build itself, but reads a dict entry as a constant
_state = {"reason": _NOT_TRIED}


def source_dir() -> Path:
    """csrc/: shipped inside the package as fastlora/csrc, or the repository's csrc/."""
    return shipped_dir("csrc")


def source_hash() -> str:
    """12 hex digits of the sources' SHA-256: a changed source gets a new build folder."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((source_dir() / name).read_bytes())
    return digest.hexdigest()[:12]


def build_dir() -> Path:
    """The cache folder of a finished build for this torch, Python, platform and source."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlora"
    tag = f"torch{torch.__version__}-{sys.implementation.cache_tag}-{sysconfig.get_platform()}-{source_hash()}"
    return cache / tag.replace("+", "_")


def _missing_tool() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH)"
    try:
        torch.utils.cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    return None


def _build_and_load() -> str | None:
    """Compile (or find cached) and load the library; the reason it failed (after one
    warning), or None."""
    reason = _missing_tool() or _compile_and_load()
    if reason is not None:
        warnings.warn(f"fastlora: {reason}; using the PyTorch path on CPU", RuntimeWarning, stacklevel=3)
    return reason


def _compile_and_load() -> str | None:
    """Load build_dir()'s finished library, or build one in a temporary folder, load it and
    rename the folder into place; why that failed, or None."""
    final = build_dir()
    if (final / LIBRARY).is_file():
        torch.ops.load_library(str(final / LIBRARY))
        return None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as error:
        return f"the cache folder {final.parent} is not writable ({error}); set XDG_CACHE_HOME to a writable folder"
    print(f"fastlora: compiling the C++ CPU kernels into {final} (first use only, 20-60 s)", file=sys.stderr)
    try:
        torch.utils.cpp_extension.load(
            name="fastlora_cpu",
            sources=[str(source_dir() / name) for name in SOURCES],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(staging),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # a failed build raises various types; report its key line
        shutil.rmtree(staging, ignore_errors=True)
        lines = str(error).strip().splitlines() or [type(error).__name__]
        key_line = next((line for line in lines if "error:" in line), lines[0])
        return f"the C++ extension failed to build ({key_line.strip()})"
    _move_into_place(staging, final)
    return None


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename a finished build folder to ``final``; a folder there without the library (left by
    something else) is replaced, a complete one (another process was faster) is kept."""
    if final.exists() and not (final / LIBRARY).is_file():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """Why the C++ backend cannot run, or None when its library is loaded (builds it once).

    torch.compile calls this outside tracing and keeps the answer as a constant, so a graph
    compiled before any eager call never traces into the build (file checks, the compiler)."""
    if _state["reason"] is None:  # loaded: a library once loaded stays loaded
        return None
    if os.environ.get("FASTLORA_DISABLE_EXT", "0") == "1":
        return "the C++ extension is disabled by FASTLORA_DISABLE_EXT=1"
    if _state["reason"] == _NOT_TRIED:
        _state["reason"] = _build_and_load()
    return _state["reason"]


def load() -> None:
    """Make sure the library is loaded, or raise RuntimeError saying why it cannot be."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastlora backend 'cpp' cannot run: {reason}")
