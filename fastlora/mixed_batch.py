"""``model(**batch, adapter_names=[...])``: one adapter per sample, as PEFT's mixed batches.

Models that ``fastlora.inject`` / ``load_adapter`` / ``from_peft`` touched get a forward
pre-hook that takes ``adapter_names`` (one name per sample, ``"__base__"`` for none) out of
the call's keyword arguments, checks the names against the model's adapters, and keeps them
for the duration of the call, in the calling thread, where every fastlora LoRA layer reads
them (``current_adapter_names``): a layer then runs each sample's rows with that sample's
adapter (fastlora/ops/multi_lora.py), or its base alone where it lacks the adapter. A model
call inside another (``generate``'s steps) without names of its own keeps the outer call's.
A model with a ``generate`` method (Hugging Face) also takes ``generate(...,
adapter_names=[...])``: every step runs with those names; beams and returned sequences of one
sample, which Hugging Face lays out next to each other, run that sample's adapter.
"""

from __future__ import annotations

import threading
import types

import torch
import torch.nn as nn

from fastlora.ops.host_values import on_device

_local = threading.local()
HOOKED = "_fastlora_adapter_names_hooks"


def current_adapter_names() -> list[str] | None:
    """The adapter names of the model call in progress in this thread, or None."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def sample_adapter_index(names: list[str], local: list[str], device: torch.device) -> torch.Tensor:
    """(samples,) int64 on ``device``: each sample's position in a layer's adapters ``local``
    (-1 where the layer lacks it, or for "__base__"); layers with the same adapters and
    ``generate``'s steps share one tensor (ops/host_values.py: no host-device sync)."""
    positions = {name: i for i, name in enumerate(local)}
    return on_device(tuple(positions.get(name, -1) for name in names), torch.long, device)


def known_adapter_names(model: nn.Module) -> list[str]:
    """``fastlora.model.all_adapter_names(model)``, kept on the model until a LoRA layer is built or
    replaced or an adapter added or deleted (``layers.ADAPTER_CHANGES``): a model call then
    does not walk every module."""
    from fastlora.layers import ADAPTER_CHANGES
    from fastlora.model import all_adapter_names

    cached = model.__dict__.get("_fastlora_adapter_names")
    if cached is None or cached[0] != ADAPTER_CHANGES[0]:
        cached = (ADAPTER_CHANGES[0], all_adapter_names(model))
        model.__dict__["_fastlora_adapter_names"] = cached
    return cached[1]


def _take_adapter_names(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    from fastlora.layers import BASE_ONLY

    names = kwargs.pop("adapter_names", None)
    if names is not None:
        known = known_adapter_names(model)
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a list with one adapter name per sample, got {names!r:.100}")
        unknown = sorted({n for n in names if n != BASE_ONLY and n not in known})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapters {unknown}; the model's adapters are {known} "
                             f"({BASE_ONLY!r}: no adapter)")
        names = list(names)
    stack = getattr(_local, "stack", [])
    _local.stack = stack + [names if names is not None or not stack else stack[-1]]
    return args, kwargs


def _drop_adapter_names(model: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    _local.stack = _local.stack[:-1]


def accept_adapter_names(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` run a mixed batch (once per model)."""
    if getattr(model, HOOKED, False):
        return
    model.register_forward_pre_hook(_take_adapter_names, with_kwargs=True)
    model.register_forward_hook(_drop_adapter_names, with_kwargs=True, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(generate, model)  # a bound method: deepcopy rebinds it to the copy
    setattr(model, HOOKED, True)


def generate(model: nn.Module, *args, adapter_names: list[str] | None = None, **kwargs):
    """The model class's ``generate``, every step of it run with ``adapter_names`` (when given)."""
    class_generate = type(model).generate
    if adapter_names is None:
        return class_generate(model, *args, **kwargs)
    _take_adapter_names(model, (), {"adapter_names": adapter_names})
    try:
        return class_generate(model, *args, **kwargs)
    finally:
        _drop_adapter_names(model, (), {}, None)
