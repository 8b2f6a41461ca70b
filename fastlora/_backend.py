"""Which implementation of ``fastlora.lora_linear`` runs: the one place that decides.

Backends:
  ``torch``  plain PyTorch ops with fastlora's custom backward; runs on every device.
  ``triton`` the fused Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
  ``cpp``    the C++ CPU kernels in csrc/, built just-in-time on first use.
  ``auto``   on CUDA, per shape class, the faster of triton and torch as measured
             (``AUTO_ON_CUDA``; torch everywhere until the current kernels are measured), and
             torch for a class whose Triton path cannot run on this device (one warning);
             cpp on CPU when the extension builds; torch otherwise.

The default comes from the environment variable FASTLORA_BACKEND (``auto`` if unset or
empty; names are case-insensitive, checked once per value); ``use_backend`` overrides it for
a block, in the calling thread only. A forced backend never falls back silently: it runs or
raises ``RuntimeError`` saying why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch", "cpp")

# use_backend's nesting, per thread: a tuple of names, innermost last. threading.local rather
# than a ContextVar because torch.compile(fullgraph=True) traces (and guards on) the former and
# cannot trace ContextVar.get.
_local = threading.local()
# FASTLORA_BACKEND's last raw value and its checked name, so a value is checked once
_env = {"raw": None, "name": "auto"}

# Looked up once, at import: ``importlib.util.find_spec`` in the per-call path breaks a
# torch.compile(fullgraph=True) graph on torch 2.11.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _check_name(name: object, source: str) -> str:
    """``name`` lower-cased and stripped if it is one of BACKENDS, else ValueError naming ``source``."""
    normal = name.strip().lower() if isinstance(name, str) else None
    if normal not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} (any case), got {name!r}")
    return normal


def _env_backend() -> str:
    """FASTLORA_BACKEND's backend (``auto`` when unset or empty), checked once per value."""
    raw = os.environ.get("FASTLORA_BACKEND", "")
    if raw != _env["raw"]:
        name = _check_name(raw, "FASTLORA_BACKEND") if raw.strip() else "auto"
        _env["raw"], _env["name"] = raw, name
    return _env["name"]


def current_backend() -> str:
    """The backend name in force: this thread's innermost ``use_backend``, else FASTLORA_BACKEND."""
    stack = getattr(_local, "stack", ())
    if stack:
        return stack[-1]
    return _env_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run ``fastlora.lora_linear`` (and the layers built on it) with backend ``name``.

    >>> with fastlora.use_backend("torch"):
    ...     y = layer(x)
    """
    outer = getattr(_local, "stack", ())
    _local.stack = outer + (_check_name(name, "backend"),)
    try:
        yield
    finally:
        _local.stack = outer


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    if not TRITON_INSTALLED:
        return "the triton package is not installed"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return None
    if device.type == "cpu":
        return "tensors are on the CPU; Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU"
    return f"Triton kernels do not run on device {device}"


def _cpp_reason(device: torch.device) -> str | None:
    """Why the C++ backend cannot run on ``device``, or None when it can."""
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only; tensors are on {device}"
    from fastlora.ops import cpp_ops

    return cpp_ops.unavailable_reason()


# What ``auto`` runs on CUDA, per shape class (rows of M, columns of r): the faster of the
# fused Triton path and the cuBLAS-composed torch path in GPU time, from measurements of the
# kernels as they are, only. A class moves to "triton" when a GPU report
# (python -m benchmarks.gpu_report, whose closing table lists the classes to move) shows the
# fused path faster there, never on a prediction. Until the kernels of the TMA redesign have
# been measured, every class runs the torch path: the one GPU measurement so far
# (../shared/gpu/H100-2026-11-23.md) timed the kernels that were replaced since.
AUTO_ON_CUDA = {
    ("decode", "r<=16"): "torch",
    ("decode", "r>16"): "torch",
    ("large", "r<=16"): "torch",
    ("large", "r>16"): "torch",
}
# device type -> the shape-class table ``auto`` follows there (CUDA's; tests add the interpreter)
AUTO_TABLES = {"cuda": AUTO_ON_CUDA}


class TritonPieceError(RuntimeError):
    """A Triton piece cannot run on this device (no launch configuration of a kernel compiles
    or launches). Under ``auto`` the op's shape class then moves to the torch path
    (``triton_failed``); a forced ``triton`` backend raises it."""


# (op, shape class) -> the first error, for the classes ``auto`` moved off Triton in this process
_triton_unusable: dict[tuple[str, tuple[str, str]], str] = {}


def triton_failed(op: str, device: torch.device, M: int, r: int, error: BaseException) -> None:
    """Move ``op``'s shape class of (M, r) to the torch path under ``auto`` for the rest of this
    process, with one warning naming the op, the class, the device, Triton's version and the
    first error (which names the kernel)."""
    key = (op, shape_class(M, r))
    if key in _triton_unusable:
        return
    lines = [line.strip() for line in str(error).strip().splitlines()] or [""]
    # the launcher's error: a first line naming the kernel and shape, then one line per config tried
    first_error = f"{type(error).__name__}: {lines[0]}" + (f" First error: {lines[1]}" if len(lines) > 1 else "")
    _triton_unusable[key] = first_error
    try:
        import triton

        version = triton.__version__
    except Exception as import_error:  # the failure may be Triton's own import
        version = f"not importable ({type(import_error).__name__})"
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    warnings.warn(
        f"fastlora: the Triton path of {op} cannot run on {where} with Triton {version} for shape class "
        f"{key[1]}: {first_error}. The 'auto' backend runs the torch path for this op and class from now on in "
        "this process (the same numbers); FASTLORA_BACKEND=triton would raise instead.",
        RuntimeWarning, stacklevel=3,
    )


def auto_chose_triton(backend: str) -> bool:
    """Whether ``backend`` (resolved) is Triton chosen by ``auto``, which may then fall back."""
    return backend == "triton" and current_backend() == "auto"


def triton_unusable() -> dict[tuple[str, tuple[str, str]], str]:
    """The (op, shape class) pairs ``auto`` moved off Triton in this process, with their errors."""
    return dict(_triton_unusable)


def shape_class(M: int, r: int) -> tuple[str, str]:
    """The row of AUTO_ON_CUDA for M rows of rank-r LoRA."""
    return ("decode" if M <= 64 else "large", "r<=16" if r <= 16 else "r>16")


def resolve(device: torch.device, M: int = 0, r: int = 0, op: str = "lora_linear") -> str:
    """The concrete backend (``triton`` | ``torch`` | ``cpp``) for tensors on ``device``; ``auto``
    on CUDA picks by the shape class of (M rows, rank r), and runs torch for an ``op`` and class
    whose Triton path could not run here (``triton_failed``)."""
    name = current_backend()
    if name == "torch":
        return name
    if name == "triton":
        reason = _triton_reason(device)
        if reason is not None:
            raise RuntimeError(f"fastlora backend 'triton' cannot run: {reason}")
        return name
    if name == "cpp":
        reason = _cpp_reason(device)
        if reason is not None:
            raise RuntimeError(f"fastlora backend 'cpp' cannot run: {reason}")
        return name
    table = AUTO_TABLES.get(device.type)
    if table is not None and _triton_reason(device) is None:
        shape = shape_class(M, r)
        choice = table[shape]
        return "torch" if choice == "triton" and (op, shape) in _triton_unusable else choice
    if device.type == "cpu" and _cpp_reason(device) is None:
        return "cpp"
    return "torch"
