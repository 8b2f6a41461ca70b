"""Whole models: inject LoRA into any nn.Module (Hugging Face included), merge, unload.

``inject`` replaces matching ``nn.Linear`` layers (and Hugging Face ``Conv1D`` layers, whose
weight is stored (in, out)) in place by ``fastlora.Linear`` layers that share the original
weight and bias Parameters, so the model keeps its state-dict keys and still loads its base
checkpoint; the LoRA parameters are added as ``<module>.lora_A`` / ``<module>.lora_B``.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from fastlora.layers import Linear, LoRALayer, as_dropout, as_number, as_rank, mark_only_lora_as_trainable

CONFIG_ATTRIBUTE = "fastlora_config"


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2 style): a linear layer with its weight stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and hasattr(module, "nf")


def is_target_candidate(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not isinstance(module, LoRALayer)


def name_matches(name: str, target_modules: str | list[str]) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry matches the name or
    a dotted suffix of it."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _check_targets(target_modules) -> str | list[str]:
    if isinstance(target_modules, str):
        return target_modules
    if isinstance(target_modules, (list, tuple, set)) and target_modules and all(isinstance(t, str) for t in target_modules):
        return sorted(target_modules) if isinstance(target_modules, set) else list(target_modules)
    raise TypeError(f"target_modules must be a regex string or a non-empty list of module names, got {target_modules!r}")


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the modules ``inject`` would replace; ValueError naming the targets if none."""
    target_modules = _check_targets(target_modules)
    names = [n for n, m in model.named_modules() if n and name_matches(n, target_modules) and is_target_candidate(m)]
    if not names:
        sample = [n for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_conv1d(m))][:8]
        raise ValueError(
            f"target_modules {target_modules!r} match no nn.Linear or Conv1D module of the model; "
            f"its linear modules include: {sample or 'none'}"
        )
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(
    model: nn.Module,
    target_modules: str | list[str],
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    bias: str = "none",
    use_rslora: bool = False,
    fan_in_fan_out: bool | None = None,
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Add LoRA adapters to ``model`` in place and return it.

    Every ``nn.Linear`` / ``Conv1D`` whose name matches ``target_modules`` (PEFT's rule: a
    regex string, or a list of names or dotted name suffixes) becomes a ``fastlora.Linear``
    with ``merge_weights=False`` sharing the original weight and bias; then every parameter but
    the LoRA ones (and the biases ``bias`` asks for: "none" | "all" | "lora_only") is frozen.
    ``fan_in_fan_out`` defaults to what each layer is (True for Conv1D). ``adapter_dtype``
    (e.g. torch.float32) keeps A and B in another dtype than the base weight.
    """
    r = as_rank(r, minimum=1)
    lora_alpha = as_number("lora_alpha", lora_alpha)
    lora_dropout = as_dropout(lora_dropout)
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    if adapter_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"adapter_dtype must be None, float32, float16 or bfloat16, got {adapter_dtype}")
    names = find_targets(model, target_modules)
    layout = {}
    for name in names:
        detected = is_conv1d(model.get_submodule(name))
        if fan_in_fan_out is not None and fan_in_fan_out != detected:
            kind = "Conv1D (weight stored (in, out))" if detected else "nn.Linear (weight stored (out, in))"
            raise ValueError(f"fan_in_fan_out={fan_in_fan_out} does not fit module {name!r}, a {kind}")
        layout[name] = detected
    for name in names:
        base = model.get_submodule(name)
        layer = Linear.from_linear(
            base, r, lora_alpha, lora_dropout, fan_in_fan_out=layout[name], merge_weights=False,
            use_rslora=use_rslora, adapter_dtype=adapter_dtype,
        )
        layer.train(base.training)
        _set_submodule(model, name, layer)
    mark_only_lora_as_trainable(model, bias=bias)
    setattr(model, CONFIG_ATTRIBUTE, {
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "bias": bias,
        "use_rslora": use_rslora, "fan_in_fan_out": any(layout.values()),
        "target_modules": _check_targets(target_modules),
    })
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer) and getattr(m, "r", 0) > 0]


def merge(model: nn.Module) -> nn.Module:
    """Add scaling * B A into every LoRA layer's weight (in float32, rounded once)."""
    for _, layer in lora_layers(model):
        layer._set_merged(True)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take the LoRA product out of every merged layer's weight again."""
    for _, layer in lora_layers(model):
        layer._set_merged(False)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace each ``fastlora.Linear`` by a plain ``nn.Linear`` (in place).

    A fan_in_fan_out layer (from a Conv1D) becomes an nn.Linear holding the transposed weight.
    """
    merge(model)
    for name, layer in lora_layers(model):
        if not isinstance(layer, Linear):
            raise TypeError(f"merge_and_unload handles fastlora.Linear layers; {name!r} is a {type(layer).__name__}")
        weight = layer.weight.detach()
        if layer.fan_in_fan_out:
            weight = weight.t().contiguous()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device="meta", dtype=weight.dtype)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        plain.bias = layer.bias
        plain.train(layer.training)
        _set_submodule(model, name, plain)
    if hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
    return model
