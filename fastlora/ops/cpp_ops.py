"""The ``cpp`` backend: the C++ CPU kernels of csrc/, built just-in-time."""

from __future__ import annotations


def unavailable_reason() -> str | None:
    """Why the C++ extension cannot be used, or None when it is loaded."""
    return "the C++ extension is not built in this version"


def load() -> None:
    raise RuntimeError(f"fastlora backend 'cpp' cannot run: {unavailable_reason()}")
