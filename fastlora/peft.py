"""Adapters in PEFT's on-disk format, both ways, and conversion of PEFT models.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` (peft_type "LORA", r,
lora_alpha, target_modules, ...) and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r)
(plus ``<module path>.bias`` when biases are trained).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile

import torch
import torch.nn as nn

from fastlora.layers import Linear
from fastlora.model import CONFIG_ATTRIBUTE, _set_submodule, inject, is_conv1d, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def _atomic_write(path: pathlib.Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def adapter_config(model: nn.Module) -> dict:
    """PEFT's adapter_config.json for the LoRA layers of ``model``."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call fastlora.inject(model, ...) first")
    settings = {(m.r, m.lora_alpha, m.use_rslora, m.lora_dropout_p) for _, m in layers}
    if len(settings) > 1:
        raise ValueError(f"save_adapter needs one (r, lora_alpha, use_rslora, dropout) for all layers, found {sorted(settings)}")
    r, alpha, rslora, dropout = settings.pop()
    saved = getattr(model, CONFIG_ATTRIBUTE, {})
    targets = saved.get("target_modules") or sorted({name.rsplit(".", 1)[-1] for name, _ in layers})
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": saved.get("bias", "none"),
        "use_rslora": rslora,
        "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for _, m in layers),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def adapter_tensors(model: nn.Module, bias: str) -> dict[str, torch.Tensor]:
    """The tensors of the adapter file, under PEFT's key names."""
    tensors = {}
    for name, layer in lora_layers(model):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
        if bias == "lora_only" and getattr(layer, "bias", None) is not None:
            tensors[f"{PREFIX}{name}.bias"] = layer.bias.detach().contiguous()
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                tensors[f"{PREFIX}{name}"] = param.detach().contiguous()
    return tensors


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model``'s adapter to ``directory`` in PEFT's format (each file atomically)."""
    from safetensors.torch import save_file

    config = adapter_config(model)
    tensors = {k: v.cpu() for k, v in adapter_tensors(model, config["bias"]).items()}
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(config, indent=2)))


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a PEFT LoRA adapter directory, with clear errors for bad files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = pathlib.Path(directory)
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    legacy_path = directory / "adapter_model.bin"
    if not config_path.is_file():
        raise FileNotFoundError(f"no adapter config at {config_path}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path} is not a LoRA adapter config (peft_type {config.get('peft_type') if isinstance(config, dict) else None!r})")
    try:
        if weights_path.is_file():
            tensors = load_file(weights_path)
        elif legacy_path.is_file():
            tensors = torch.load(legacy_path, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"no adapter weights at {weights_path}")
    except (SafetensorError, RuntimeError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"could not read the adapter weights in {directory}: {e}") from e
    return config, tensors


def _unsupported(config: dict) -> list[str]:
    found = []
    if config.get("use_dora"):
        found.append("use_dora (DoRA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            found.append(key)
    for key in ("layers_to_transform", "modules_to_save", "megatron_config"):
        if config.get(key):
            found.append(key)
    return found


def _plan_load(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Check every key and shape against ``model`` before anything changes.

    Returns {module path: {"lora_A": t, "lora_B": t}} and {parameter name: bias tensor}.
    """
    unsupported = _unsupported(config)
    if unsupported:
        raise ValueError(f"the adapter uses features fastlora does not support: {', '.join(unsupported)}")
    r = config.get("r")
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    parameters = dict(model.named_parameters())
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match:
            adapters.setdefault(match["module"], {})[match["which"]] = tensor
            continue
        name = key.removeprefix(PREFIX)
        if name.endswith("bias") and name in parameters:
            if parameters[name].shape != tensor.shape:
                raise ValueError(f"adapter key {key!r}: shape {tuple(tensor.shape)} != the model's {tuple(parameters[name].shape)}")
            biases[name] = tensor
            continue
        raise ValueError(f"adapter key {key!r} is neither a LoRA weight nor a bias of the model")
    if not adapters:
        raise ValueError("the adapter file holds no lora_A / lora_B weights")
    modules = dict(model.named_modules())
    for path, pair in adapters.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter module {path!r} has {sorted(pair)} but needs both lora_A and lora_B")
        module = modules.get(path)
        if module is None:
            raise ValueError(f"adapter key {PREFIX}{path}.lora_A.weight names no module of the model")
        if isinstance(module, Linear) and getattr(module, "r", 0) > 0:
            in_features, out_features = module.lora_A.shape[1], module.lora_B.shape[0]
        elif isinstance(module, nn.Linear):
            in_features, out_features = module.in_features, module.out_features
        elif is_conv1d(module):
            in_features, out_features = module.weight.shape
        else:
            raise ValueError(f"adapter module {path!r} is a {type(module).__name__}, not a linear layer")
        expected = {"lora_A": (r, in_features), "lora_B": (out_features, r)}
        for which, tensor in pair.items():
            if tuple(tensor.shape) != expected[which]:
                raise ValueError(
                    f"adapter key {PREFIX}{path}.{which}.weight: shape {tuple(tensor.shape)} does not fit "
                    f"module {path!r} (expected {expected[which]} for r={r})"
                )
    return adapters, biases


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format LoRA adapter (saved by PEFT or fastlora) into ``model``; return it.

    Modules named in the file that are plain linear layers get LoRA layers injected first.
    Every key and shape is checked before anything changes: on any error the model is left
    exactly as it was.
    """
    config, tensors = read_adapter(directory)
    adapters, biases = _plan_load(model, config, tensors)
    missing = [p for p in adapters if not isinstance(model.get_submodule(p), Linear)]
    if missing:
        inject(
            model, [p for p in missing], r=config["r"], lora_alpha=config["lora_alpha"],
            lora_dropout=config.get("lora_dropout", 0.0), bias=config.get("bias", "none"),
            use_rslora=config.get("use_rslora", False),
        )
        getattr(model, CONFIG_ATTRIBUTE)["target_modules"] = config.get("target_modules") or missing
    with torch.no_grad():
        for path, pair in adapters.items():
            layer = model.get_submodule(path)
            was_merged = layer.merged
            layer._set_merged(False)
            layer.lora_A.copy_(pair["lora_A"])
            layer.lora_B.copy_(pair["lora_B"])
            layer._set_merged(was_merged)
        parameters = dict(model.named_parameters())
        for name, tensor in biases.items():
            parameters[name].copy_(tensor)
    return model


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Replace the LoRA layers of a PEFT model by fastlora layers, in place, same outputs.

    Returns the underlying base model (what ``peft_model.get_base_model()`` gives), now with
    ``fastlora.Linear`` layers sharing the base weights and holding the adapter's A and B.
    Supports one adapter on Linear / Conv1D targets; DoRA, several adapters, adapters on
    other layer types and per-layer rank patterns raise ValueError naming the feature.
    """
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    found = [(n, m) for n, m in base_model.named_modules() if isinstance(m, PeftLoraLayer)]
    if not found:
        raise ValueError("the model has no PEFT LoRA layers")
    plan = []
    for name, layer in found:
        adapters = list(layer.lora_A.keys())
        if len(adapters) != 1 or len(getattr(layer, "active_adapters", adapters)) != 1:
            raise ValueError(f"PEFT layer {name!r} has several adapters {adapters}: merge or delete all but one first")
        adapter = adapters[0]
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise ValueError(f"PEFT layer {name!r} uses DoRA, which fastlora does not support")
        base = layer.get_base_layer()
        if not (isinstance(base, nn.Linear) or is_conv1d(base)) or not isinstance(layer.lora_A[adapter], nn.Linear):
            raise ValueError(f"PEFT layer {name!r} wraps a {type(base).__name__}; fastlora converts Linear / Conv1D targets")
        if layer.lora_A[adapter].bias is not None:
            raise ValueError(f"PEFT layer {name!r} has a bias on lora_B (lora_bias), which fastlora does not support")
        plan.append((name, layer, adapter, base))
    for name, layer, adapter, base in plan:
        dropout = layer.lora_dropout[adapter]
        lora = Linear.from_linear(
            base, layer.r[adapter], layer.lora_alpha[adapter],
            lora_dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            fan_in_fan_out=is_conv1d(base), adapter_dtype=layer.lora_A[adapter].weight.dtype,
        )
        lora.scaling = layer.scaling[adapter]
        with torch.no_grad():
            lora.lora_A.copy_(layer.lora_A[adapter].weight)
            lora.lora_B.copy_(layer.lora_B[adapter].weight)
        lora.train(layer.training)
        _set_submodule(base_model, name, lora)
    return base_model
