"""Adapters in PEFT's on-disk format, both ways, and conversion of PEFT models.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` (peft_type "LORA", r,
lora_alpha, target_modules, ...) and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r),
plus, for DoRA (``use_dora: true``), ``...lora_magnitude_vector`` (out,); when biases are trained, ``<LoRA module path>.base_layer.bias`` and ``<other module
path>.bias``, and the whole modules of ``modules_to_save`` as ``<module path>.<parameter>``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
import warnings

import torch
import torch.nn as nn

from fastlora.layers import DEFAULT_ADAPTER, Linear, LoRALayer, check_adapter_name
from fastlora.mixed_batch import accept_adapter_names
from fastlora.model import (
    CONFIG_ATTRIBUTE,
    all_adapter_names,
    _set_submodule,
    check_quantized_target,
    find_modules_to_save,
    inject,
    is_conv1d,
    is_linear,
    lora_layers,
    name_matches,
    record_adapter_settings,
    task_type,
    wrap_linear,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
# DoRA's magnitude: PEFT writes ``<module>.lora_magnitude_vector`` (its module's ``.weight``
# and the adapter name stripped); the longer in-memory forms are read too
_MAGNITUDE_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_magnitude_vector(?:\.(?!weight$)[^.]+)?(?:\.weight)?$"
)
MAGNITUDE = "lora_magnitude_vector"
LORA_BIAS = ".base_layer.bias"  # PEFT's key for the bias of a layer that carries LoRA


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


def _saved_targets(model: nn.Module, names: list[str]) -> list[str]:
    """target_modules that select exactly the LoRA layers ``names``: their last name parts
    when those match no other linear module, else the full names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    matched = {n for n, m in model.named_modules() if n and is_linear(m) and name_matches(n, leaves)}
    return leaves if matched == set(names) else sorted(names)


def _saved_settings(model: nn.Module) -> dict:
    """What inject / load_adapter / from_peft recorded on the model: bias, modules_to_save, task."""
    saved = getattr(model, CONFIG_ATTRIBUTE, {})
    return {"bias": saved.get("bias", "none"), "modules_to_save": list(saved.get("modules_to_save", [])),
            "task_type": saved.get("task_type", task_type(model))}


def _savable_layers(model: nn.Module) -> list[tuple[str, Linear]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call fastlora.inject(model, ...) first")
    other = [(n, type(m).__name__) for n, m in layers if not isinstance(m, Linear)]
    if other:
        raise ValueError(
            f"save_adapter writes PEFT's format, which has no place for fastlora's loralib-style "
            f"{other[0][1]} layer {other[0][0]!r}; save it with torch.save(fastlora.lora_state_dict(model))"
        )
    return layers


def _settings(layer: Linear, adapter_name: str) -> tuple:
    """(r, lora_alpha, use_rslora, dropout, use_dora) of one adapter of a layer."""
    if adapter_name == DEFAULT_ADAPTER:
        return layer.r, layer.lora_alpha, layer.use_rslora, layer.lora_dropout_p, layer.use_dora
    named = layer.lora_adapters[adapter_name]
    return named.r, named.lora_alpha, named.use_rslora, named.lora_dropout_p, False


def _holding(model: nn.Module, adapter_name: str) -> list[tuple[str, Linear]]:
    """The savable LoRA layers that hold adapter ``adapter_name``."""
    layers = [(n, m) for n, m in _savable_layers(model) if adapter_name in m.adapter_names()]
    if not layers:
        raise ValueError(f"no LoRA layer holds adapter {adapter_name!r}; the model's adapters are "
                         f"{all_adapter_names(model)}")
    return layers


def adapter_config(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict:
    """PEFT's adapter_config.json for adapter ``adapter_name`` of ``model``, derived from the
    layers holding it. The bias setting and modules_to_save go with the default adapter (a
    named adapter's file has bias "none" and no modules_to_save)."""
    layers = _holding(model, adapter_name)
    settings = {_settings(m, adapter_name) for _, m in layers}
    if len(settings) > 1:
        raise ValueError(f"save_adapter needs one (r, lora_alpha, use_rslora, dropout, use_dora) for all layers of "
                         f"adapter {adapter_name!r}, found {sorted(settings)}")
    r, alpha, rslora, dropout, dora = settings.pop()
    saved = _saved_settings(model)
    if adapter_name != DEFAULT_ADAPTER:
        saved = {**saved, "bias": "none", "modules_to_save": []}
    return {
        "peft_type": "LORA",
        "task_type": saved["task_type"],
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _saved_targets(model, [n for n, _ in layers]),
        "bias": saved["bias"],
        "use_rslora": rslora,
        "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for _, m in layers),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": saved["modules_to_save"] or None,
        "use_dora": dora,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def adapter_tensors(model: nn.Module, config: dict, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name``'s file, under PEFT's key names (without the prefix)."""
    tensors = {}
    layers = dict(_holding(model, adapter_name))
    for name, layer in layers.items():
        lora_A, lora_B, _, _ = layer.adapter(adapter_name)
        tensors[f"{name}.lora_A.weight"] = lora_A
        tensors[f"{name}.lora_B.weight"] = lora_B
        if adapter_name == DEFAULT_ADAPTER and layer.use_dora:
            tensors[f"{name}.{MAGNITUDE}"] = layer.lora_magnitude_vector
        if config["bias"] != "none" and layer.bias is not None:
            tensors[name + LORA_BIAS] = layer.bias
    if config["bias"] == "all":
        for name, param in model.named_parameters():
            module = name.rpartition(".")[0]
            if name.endswith("bias") and module not in layers:
                tensors[name] = param
    for head in config["modules_to_save"] or []:
        for name, param in model.get_submodule(head).named_parameters():
            tensors[f"{head}.{name}"] = param
    return tensors


def _warn_unsaved_trainables(model: nn.Module, saved_ids: set[int]) -> None:
    """Warn when a parameter trains but will not be in an adapter file (a new head, say)."""
    lost = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved_ids]
    if lost:
        warnings.warn(
            f"save_adapter: {len(lost)} parameters require grad but are not part of the adapter and are not "
            f"saved (first: {lost[:3]}); pass modules_to_save=[...] to fastlora.inject to save whole modules",
            UserWarning, stacklevel=3,
        )


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write ``model``'s adapters to ``directory`` in PEFT's format (each file atomically).

    PEFT's multi-adapter layout: the default adapter's files in ``directory``, each named
    adapter's in ``directory/<name>``. ``adapter_name`` writes that one only (default: all)."""
    names = all_adapter_names(model) if adapter_name is None else [adapter_name]
    if adapter_name is not None and adapter_name not in all_adapter_names(model):
        raise ValueError(f"unknown adapter {adapter_name!r}: the model's adapters are {all_adapter_names(model)}")
    written = [(name, adapter_config(model, name)) for name in names]  # every adapter checked before a file is written
    saved = {id(t) for name, config in written for t in adapter_tensors(model, config, name).values()}
    _warn_unsaved_trainables(model, saved)
    for name, config in written:
        folder = pathlib.Path(directory) / ("" if name == DEFAULT_ADAPTER else name)
        _write_adapter(folder, config, adapter_tensors(model, config, name))


def _write_adapter(directory: pathlib.Path, config: dict, params: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {PREFIX + k: v.detach().cpu().contiguous() for k, v in params.items()}
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
    if config.get("lora_bias"):
        found.append("lora_bias (a bias on lora_B)")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "megatron_config", "trainable_token_indices"):
        if config.get(key):
            found.append(key)
    return found


def _linear_features(path: str, module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a module an adapter may sit on, else ValueError."""
    if isinstance(module, Linear):
        return module.in_features, module.out_features
    if isinstance(module, LoRALayer):
        raise ValueError(f"adapter module {path!r} is a fastlora {type(module).__name__}, which PEFT's files do not describe")
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return tuple(module.weight.shape)
    raise ValueError(f"adapter module {path!r} is a {type(module).__name__}, not a linear layer")


def _plan_load(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """Check every key and shape against ``model`` before anything changes.

    Returns {module path: {"lora_A": t, "lora_B": t[, "lora_magnitude_vector": t]}} (the
    magnitude for DoRA adapters, ``use_dora: true``), {parameter name: tensor} for the
    biases and the modules_to_save parameters, and the names of the modules_to_save.
    """
    unsupported = _unsupported(config)
    if unsupported:
        raise ValueError(f"the adapter uses features fastlora does not support: {', '.join(unsupported)}")
    r = config.get("r")
    if not isinstance(r, int) or r < 1 or not isinstance(config.get("lora_alpha"), (int, float)):
        raise ValueError(f"the adapter config needs an integer r >= 1 and a number lora_alpha, got r={r!r}, "
                         f"lora_alpha={config.get('lora_alpha')!r}")
    dora = config.get("use_dora", False)
    if not isinstance(dora, bool):
        raise ValueError(f"the adapter config's use_dora must be true or false, got {dora!r}")
    heads = find_modules_to_save(model, config.get("modules_to_save"))
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    params: dict[str, torch.Tensor] = {}
    parameters = dict(model.named_parameters())
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match:
            adapters.setdefault(match["module"], {})[match["which"]] = tensor
            continue
        match = _MAGNITUDE_KEY.match(key)
        if match and dora:
            adapters.setdefault(match["module"], {})[MAGNITUDE] = tensor
            continue
        if match:
            raise ValueError(f"adapter key {key!r} is a DoRA magnitude, but the config does not set use_dora")
        name = key.removeprefix(PREFIX)
        if name.endswith(LORA_BIAS):
            name = name[: -len(LORA_BIAS)] + ".bias"
        in_head = any(name.startswith(head + ".") for head in heads)
        if name in parameters and (name.endswith("bias") or in_head):
            if parameters[name].shape != tensor.shape:
                raise ValueError(f"adapter key {key!r}: shape {tuple(tensor.shape)} != the model's {tuple(parameters[name].shape)}")
            params[name] = tensor
            continue
        raise ValueError(f"adapter key {key!r} is neither a LoRA weight, a bias nor a modules_to_save parameter of the model")
    if not adapters:
        raise ValueError("the adapter file holds no lora_A / lora_B weights")
    modules = dict(model.named_modules())
    needed = {"lora_A", "lora_B", MAGNITUDE} if dora else {"lora_A", "lora_B"}
    for path, pair in adapters.items():
        if set(pair) != needed:
            raise ValueError(f"adapter module {path!r} has {sorted(pair)} but needs {sorted(needed)}")
        module = modules.get(path)
        if module is None:
            raise ValueError(f"adapter key {PREFIX}{path}.lora_A.weight names no module of the model")
        in_features, out_features = _linear_features(path, module)
        check_quantized_target(module, path, dora)
        expected = {"lora_A": (r, in_features), "lora_B": (out_features, r), MAGNITUDE: (out_features,)}
        for which, tensor in pair.items():
            if tuple(tensor.shape) != expected[which]:
                raise ValueError(
                    f"adapter key {PREFIX}{path}.{which}: shape {tuple(tensor.shape)} does not fit "
                    f"module {path!r} (expected {expected[which]} for r={r})"
                )
    return adapters, params, heads


def _reconfigure(layer: Linear, config: dict) -> None:
    """Give an existing (unmerged) LoRA layer the file's r, lora_alpha, dropout, rsLoRA and
    DoRA setting, with new A and B Parameters (same dtype and device) where the rank changes."""
    r = config["r"]
    LoRALayer.__init__(layer, r, config["lora_alpha"], config.get("lora_dropout", 0.0), layer.merge_weights,
                       config.get("use_rslora", False))
    for which, shape in (("lora_A", (r, layer.in_features)), ("lora_B", (layer.out_features, r))):
        old = getattr(layer, which)
        if tuple(old.shape) != shape:
            setattr(layer, which, nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad))
    if config.get("use_dora", False) and not layer.use_dora:
        layer.add_dora_magnitude()
    elif not config.get("use_dora", False):
        layer.remove_dora_magnitude()


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load a PEFT-format LoRA adapter (saved by PEFT or fastlora) into ``model``; return it.

    As the default adapter: modules named in the file that are plain linear layers get LoRA
    layers injected first; layers that already have one take the file's r, lora_alpha,
    dropout and rsLoRA (new A and B where the rank differs). Biases and modules_to_save are
    read under PEFT's key names. With another ``adapter_name`` the file becomes one more named
    adapter (its own rank and alpha, frozen and inactive until ``set_adapter``) on layers that
    hold a default adapter; such a file may hold LoRA weights only. Every key and shape is
    checked before anything changes: on any error the model is left exactly as it was.
    """
    config, tensors = read_adapter(directory)
    adapters, params, heads = _plan_load(model, config, tensors)
    if adapter_name != DEFAULT_ADAPTER:
        _load_named(model, config, adapters, params, check_adapter_name(adapter_name))
        return model
    missing = [p for p in adapters if not isinstance(model.get_submodule(p), Linear)]
    if missing:
        inject(
            model, missing, r=config["r"], lora_alpha=config["lora_alpha"],
            lora_dropout=config.get("lora_dropout", 0.0), bias=config.get("bias", "none"),
            use_rslora=config.get("use_rslora", False), modules_to_save=heads, use_dora=config.get("use_dora", False),
        )
    record_adapter_settings(model, config.get("bias", "none"), heads, config.get("task_type") or task_type(model))
    with torch.no_grad():
        for path, pair in adapters.items():
            layer = model.get_submodule(path)
            was_merged = layer.merged
            layer._set_merged(False)
            _reconfigure(layer, config)
            layer.lora_A.copy_(pair["lora_A"])
            layer.lora_B.copy_(pair["lora_B"])
            if MAGNITUDE in pair:
                layer.lora_magnitude_vector.copy_(pair[MAGNITUDE])
            layer._set_merged(was_merged)
        parameters = dict(model.named_parameters())
        for name, tensor in params.items():
            parameters[name].copy_(tensor)
    return model


def _load_named(model: nn.Module, config: dict, adapters: dict, params: dict, adapter_name: str) -> None:
    """load_adapter's named-adapter case, after _plan_load: check every layer, then add or
    overwrite adapter ``adapter_name`` on each."""
    if params:
        raise ValueError(f"adapter {adapter_name!r}: the file holds biases or modules_to_save ({sorted(params)[0]!r}), "
                         "which fastlora keeps with the default adapter only")
    if config.get("use_dora", False):
        raise ValueError(f"adapter {adapter_name!r}: several adapters on DoRA layers are not supported")
    for path in adapters:
        layer = model.get_submodule(path)
        if not isinstance(layer, Linear) or DEFAULT_ADAPTER not in layer.adapter_names():
            raise ValueError(f"adapter {adapter_name!r} targets module {path!r}, which has no default adapter: "
                             "fastlora keeps further adapters on LoRA layers; load the default adapter first")
        if layer.merged or layer.use_dora:
            reason = "is merged (fastlora.unmerge first)" if layer.merged else "is a DoRA layer"
            raise ValueError(f"adapter {adapter_name!r}: module {path!r} {reason}")
    with torch.no_grad():
        for path, pair in adapters.items():
            layer = model.get_submodule(path)
            if adapter_name in layer.adapter_names():
                layer.delete_adapter(adapter_name)
            named = layer.add_adapter(adapter_name, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                                      config.get("use_rslora", False))
            named.lora_A.copy_(pair["lora_A"])
            named.lora_B.copy_(pair["lora_B"])
            named.requires_grad_(False)


def _unwrap_modules_to_save(base_model: nn.Module) -> list[str]:
    """Replace PEFT's ModulesToSaveWrapper modules by their trained copy; their names."""
    from peft.utils.other import ModulesToSaveWrapper

    wrapped = [(n, m) for n, m in base_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name, wrapper in wrapped:
        if len(wrapper.modules_to_save) != 1:
            raise ValueError(f"PEFT module {name!r} saves copies for several adapters {list(wrapper.modules_to_save)}")
    for name, wrapper in wrapped:
        _set_submodule(base_model, name, next(iter(wrapper.modules_to_save.values())))
    return [n for n, _ in wrapped]


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Replace the LoRA layers of a PEFT model by fastlora layers, in place, same outputs.

    Returns the underlying base model (what ``peft_model.get_base_model()`` gives), now with
    ``fastlora.Linear`` layers sharing the base weights and holding the adapter's A and B;
    modules_to_save become their trained copies, and the adapter's bias, rsLoRA and task type
    are kept for ``save_adapter``. Supports one adapter (LoRA or DoRA) on Linear / Conv1D
    targets; several adapters, lora_bias, adapters on other layer types and per-layer rank patterns
    raise ValueError naming the feature.
    """
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    peft_configs = getattr(peft_model, "peft_config", {})
    found = [(n, m) for n, m in base_model.named_modules() if isinstance(m, PeftLoraLayer)]
    if not found:
        raise ValueError("the model has no PEFT LoRA layers")
    plan = []
    for name, layer in found:
        adapters = list(layer.lora_A.keys())
        if len(adapters) != 1 or len(getattr(layer, "active_adapters", adapters)) != 1:
            raise ValueError(f"PEFT layer {name!r} has several adapters {adapters}: merge or delete all but one first")
        adapter = adapters[0]
        base = layer.get_base_layer()
        if not (isinstance(base, nn.Linear) or is_conv1d(base)) or not isinstance(layer.lora_A[adapter], nn.Linear):
            raise ValueError(f"PEFT layer {name!r} wraps a {type(base).__name__}; fastlora converts Linear / Conv1D targets")
        if layer.lora_B[adapter].bias is not None:
            raise ValueError(f"PEFT layer {name!r} has a bias on lora_B (lora_bias), which fastlora does not support")
        dora = bool(getattr(layer, "use_dora", {}).get(adapter, False))
        check_quantized_target(base, name, dora)
        plan.append((name, layer, adapter, base, dora))
    config = peft_configs.get(plan[0][2])
    rslora = bool(getattr(config, "use_rslora", False))
    heads = _unwrap_modules_to_save(base_model)
    for name, layer, adapter, base, dora in plan:
        dropout = layer.lora_dropout[adapter]
        lora = wrap_linear(base, layer.r[adapter], layer.lora_alpha[adapter],
                           dropout.p if isinstance(dropout, nn.Dropout) else 0.0, is_conv1d(base), rslora,
                           layer.lora_A[adapter].weight.dtype, dora)
        lora.scaling = layer.scaling[adapter]
        with torch.no_grad():
            lora.lora_A.copy_(layer.lora_A[adapter].weight)
            lora.lora_B.copy_(layer.lora_B[adapter].weight)
            if dora:
                magnitude = layer.lora_magnitude_vector[adapter].weight
                lora.lora_magnitude_vector.copy_(magnitude)
                lora.lora_magnitude_vector.requires_grad_(magnitude.requires_grad)
        lora.lora_A.requires_grad_(layer.lora_A[adapter].weight.requires_grad)
        lora.lora_B.requires_grad_(layer.lora_B[adapter].weight.requires_grad)
        lora.train(layer.training)
        _set_submodule(base_model, name, lora)
    task = getattr(config, "task_type", None)
    accept_adapter_names(base_model)
    setattr(base_model, CONFIG_ATTRIBUTE, {
        "bias": getattr(config, "bias", "none"), "modules_to_save": heads,
        "task_type": str(getattr(task, "value", task)) if task else task_type(base_model),
    })
    return base_model
