"""Whole models: inject LoRA into any nn.Module (Hugging Face included), merge, unload.

``inject`` replaces matching ``nn.Linear`` layers (and Hugging Face ``Conv1D`` layers, whose
weight is stored (in, out)) in place by ``fastlora.Linear`` layers that share the original
weight and bias Parameters, so the model keeps its state-dict keys and still loads its base
checkpoint; the LoRA parameters are added as ``<module>.lora_A`` / ``<module>.lora_B``.
Modules in ``modules_to_save`` (e.g. a classifier head) stay where they are and train whole.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn as nn

from fastlora.layers import (
    DEFAULT_ADAPTER,
    ConvLoRA,
    Embedding,
    Linear,
    Linear4bit,
    LoRALayer,
    MergedLinear,
    adapters_changed,
    as_dropout,
    bitsandbytes_module,
    check_4bit_base,
    is_4bit_linear,
    is_quantized_linear,
    refuse_4bit_options,
    as_number,
    as_rank,
    mark_only_lora_as_trainable,
)
from fastlora.mixed_batch import accept_adapter_names

CONFIG_ATTRIBUTE = "fastlora_config"
ALL_LINEAR = "all-linear"
# PEFT's task types by the Hugging Face class name's ending, and the heads PEFT trains whole
# (modules_to_save) by default for each
TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
)
DEFAULT_MODULES_TO_SAVE = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
                           "QUESTION_ANS": ["qa_outputs"]}


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2 style): a linear layer with its weight stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a Hugging Face model, from its class name (None if unknown)."""
    name = type(model).__name__
    return next((task for ending, task in TASK_TYPES if name.endswith(ending)), None)


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
    raise TypeError(f"target_modules must be a regex string, 'all-linear' or a non-empty list of module names, got {target_modules!r}")


def _output_layer_names(model: nn.Module) -> set[str]:
    """The names of the model's output projection (lm_head), which 'all-linear' leaves out."""
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    return {n for n, m in model.named_modules() if output is not None and m is output}


def _dead_linear_names(model: nn.Module) -> set[str]:
    """Linear modules whose forward is never called: nn.MultiheadAttention reads its
    ``out_proj`` weight directly, so an adapter there would have no effect."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the modules ``inject`` would replace, checked: ValueError naming the targets
    if none match, a module that already has a LoRA adapter, or one whose forward never runs.

    ``"all-linear"`` (PEFT's idiom) selects every linear layer except the output layer.
    """
    target_modules = _check_targets(target_modules)
    dead = _dead_linear_names(model)
    if target_modules == ALL_LINEAR:
        skip = _output_layer_names(model) | dead
        names = [n for n, m in model.named_modules() if n and is_linear(m) and n not in skip]
    else:
        names = [n for n, m in model.named_modules() if n and name_matches(n, target_modules) and is_linear(m)]
    if not names:
        sample = [n for n, m in model.named_modules() if n and is_linear(m)][:8]
        raise ValueError(
            f"target_modules {target_modules!r} match no nn.Linear or Conv1D module of the model; "
            f"its linear modules include: {sample or 'none'}"
        )
    existing = [n for n in names if isinstance(model.get_submodule(n), LoRALayer)]
    if existing:
        raise ValueError(f"module {existing[0]!r} already has a LoRA adapter (of {len(existing)} matched); "
                         "inject each module once, or fastlora.load_adapter to replace its weights")
    never_called = [n for n in names if n in dead]
    if never_called:
        raise ValueError(f"module {never_called[0]!r} is nn.MultiheadAttention's out_proj, whose weight the "
                         "attention reads directly: an adapter there would never run; target other modules")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    adapters_changed()


def find_modules_to_save(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """Module names matching ``modules_to_save`` (PEFT's list rule); the names of the entries
    that match none are ignored, as PEFT does for its per-task defaults."""
    if not modules_to_save:
        return []
    if isinstance(modules_to_save, str) or not all(isinstance(m, str) for m in modules_to_save):
        raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    return [n for n, m in model.named_modules() if n and name_matches(n, list(modules_to_save)) and not isinstance(m, LoRALayer)]


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
    modules_to_save: list[str] | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Add LoRA adapters to ``model`` in place and return it.

    Every ``nn.Linear`` / ``Conv1D`` whose name matches ``target_modules`` (PEFT's rule: a
    regex string, ``"all-linear"`` for every linear layer but the output layer, or a list of
    names or dotted name suffixes) becomes a ``fastlora.Linear`` with ``merge_weights=False``
    sharing the original weight and bias; then every parameter but the LoRA ones (and the
    biases ``bias`` asks for: "none" | "all" | "lora_only", and the modules of
    ``modules_to_save``) is frozen. ``modules_to_save`` defaults to PEFT's heads for the
    model's task (``classifier`` / ``score`` for sequence and token classification,
    ``qa_outputs`` for question answering); those modules train whole and are saved with the
    adapter. ``fan_in_fan_out`` defaults to what each layer is (True for Conv1D).
    ``adapter_dtype`` (e.g. torch.float32) keeps A and B in another dtype than the base weight.
    ``use_dora=True`` makes every new layer a DoRA layer (PEFT's ``use_dora``: a trainable
    magnitude per output feature, initialised to the weight's row norms).
    Nothing changes when an argument or target is wrong.
    """
    r = as_rank(r, minimum=1)
    lora_alpha = as_number("lora_alpha", lora_alpha)
    lora_dropout = as_dropout(lora_dropout)
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    if adapter_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"adapter_dtype must be None, float32, float16 or bfloat16, got {adapter_dtype}")
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
    names = find_targets(model, target_modules)
    task = task_type(model)
    if modules_to_save is None:
        modules_to_save = DEFAULT_MODULES_TO_SAVE.get(task)
    heads = find_modules_to_save(model, modules_to_save)
    clash = sorted(set(heads) & set(names))
    if clash:
        raise ValueError(f"module {clash[0]!r} is both a LoRA target and in modules_to_save")
    layout = {}
    for name in names:
        detected = is_conv1d(model.get_submodule(name))
        if fan_in_fan_out is not None and fan_in_fan_out != detected:
            kind = "Conv1D (weight stored (in, out))" if detected else "nn.Linear (weight stored (out, in))"
            raise ValueError(f"fan_in_fan_out={fan_in_fan_out} does not fit module {name!r}, a {kind}")
        layout[name] = detected
        check_quantized_target(model.get_submodule(name), name, use_dora)
    for name in names:
        base = model.get_submodule(name)
        layer = wrap_linear(base, r, lora_alpha, lora_dropout, layout[name], use_rslora, adapter_dtype, use_dora)
        layer.train(base.training)
        _set_submodule(model, name, layer)
    mark_only_lora_as_trainable(model, bias=bias)
    record_adapter_settings(model, bias, heads, task)
    return model


def wrap_linear(base: nn.Module, r: int, lora_alpha: float, lora_dropout: float, fan_in_fan_out: bool,
                use_rslora: bool, adapter_dtype: torch.dtype | None, use_dora: bool) -> Linear:
    """The LoRA layer (``merge_weights=False``) around a linear ``base``: a Linear4bit on a
    bitsandbytes 4-bit layer (after ``check_quantized_target``), else ``Linear.from_linear``."""
    if is_4bit_linear(base):
        return Linear4bit(base, r, lora_alpha, lora_dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype)
    return Linear.from_linear(base, r, lora_alpha, lora_dropout, fan_in_fan_out=fan_in_fan_out, merge_weights=False,
                              use_rslora=use_rslora, adapter_dtype=adapter_dtype, use_dora=use_dora)


def check_quantized_target(base: nn.Module, name: str, use_dora: bool) -> None:
    """For a bitsandbytes target (or a fastlora Linear4bit): ValueError / TypeError naming
    module ``name`` unless it is a 4-bit layer fastlora reads and ``use_dora`` is off; nothing
    for a dense target."""
    if is_quantized_linear(base) or isinstance(base, Linear4bit):
        if not isinstance(base, Linear4bit):
            check_4bit_base(base, name)
        try:
            refuse_4bit_options(use_dora)
        except ValueError as error:
            raise ValueError(f"module {name!r}: {error}") from None


def record_adapter_settings(model: nn.Module, bias: str, heads: list[str], task: str | None) -> None:
    """Keep on the model what ``save_adapter`` writes beyond its LoRA layers: the bias setting,
    the modules_to_save (added to those of earlier calls), made trainable, and the task type."""
    accept_adapter_names(model)
    saved = getattr(model, CONFIG_ATTRIBUTE, {})
    heads = sorted(set(saved.get("modules_to_save", [])) | set(heads))
    for head in heads:
        model.get_submodule(head).requires_grad_(True)
    setattr(model, CONFIG_ATTRIBUTE, {"bias": bias, "modules_to_save": heads, "task_type": task})


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer) and getattr(m, "r", 0) > 0]


def _tied_names(model: nn.Module, weight: torch.Tensor, own: str) -> list[str]:
    """Other parameter names of ``model`` that share ``weight``'s storage (tied weights)."""
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if n != own and p.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()]


def adapter_layers(model: nn.Module) -> list[tuple[str, Linear]]:
    """The (name, layer) pairs of ``model``'s LoRA layers that can hold named adapters."""
    return [(n, m) for n, m in lora_layers(model) if isinstance(m, Linear)]


def all_adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name any LoRA layer of ``model`` holds, in first-seen order."""
    return list(dict.fromkeys(name for _, layer in adapter_layers(model) for name in layer.adapter_names()))


def _known_adapter(model: nn.Module, name: object) -> str:
    names = all_adapter_names(model)
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"unknown adapter {name!r}: the model's adapters are {names}")
    return name


def set_adapter(model: nn.Module, name: str | list[str]) -> nn.Module:
    """Make adapter ``name`` the one every LoRA layer runs (a layer without it runs its base
    alone), as PEFT's ``set_adapter``: its A and B train, every other adapter's are frozen.
    A list of names makes them all active, as PEFT's: each layer adds up the terms of those it
    holds (each with its own scaling and dropout), they all train, and merging is refused
    until one is set. ValueError for an unknown or repeated name or a merged layer (unmerge
    first); nothing changes then."""
    names = [name] if isinstance(name, str) else name
    if not isinstance(names, (list, tuple)) or not names or len(set(names)) != len(names):
        raise ValueError(f"set_adapter takes an adapter name or a list of distinct names, got {name!r}")
    for each in names:
        _known_adapter(model, each)
    merged = [n for n, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"layer {merged[0]!r} is merged: fastlora.unmerge(model) before switching adapters")
    for _, layer in adapter_layers(model):
        held = [each for each in names if each in layer.adapter_names()]
        layer.active_adapter = None if not held else held[0] if len(held) == 1 else held
        for adapter in layer.adapter_names():
            lora_A, lora_B, _, _ = layer.adapter(adapter)
            lora_A.requires_grad_(adapter in names)
            lora_B.requires_grad_(adapter in names)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove named adapter ``name`` from every layer (PEFT's ``delete_adapter``); layers that
    ran it run "default" again. The default adapter (the layers' own lora_A / lora_B) cannot
    be deleted. ValueError for an unknown name, "default" or a layer with it merged."""
    _known_adapter(model, name)
    if name == DEFAULT_ADAPTER:
        raise ValueError("the default adapter is the layers' own lora_A / lora_B and cannot be deleted; "
                         "delete the named ones, or fastlora.merge_and_unload the model")
    holders = [(n, layer) for n, layer in adapter_layers(model) if name in layer.adapter_names()]
    merged = [n for n, layer in holders if layer.merged and name in layer.active_names()]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into layer {merged[0]!r}: fastlora.unmerge(model) first")
    for _, layer in holders:
        layer.delete_adapter(name)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Add scaling * B A of each LoRA layer's active adapter into its weight (in float32,
    rounded once; a 4-bit weight is dequantized, merged and quantized again, as PEFT does).

    Warns when a merged weight is tied to another module's (e.g. lm_head to embed_tokens):
    merging changes both, as in PEFT.
    """
    _merge_layers(model, lora_layers(model))
    return model


def _merge_layers(model: nn.Module, layers: list[tuple[str, LoRALayer]]) -> None:
    """merge() for the given (name, layer) pairs of ``model``; ValueError, before any layer
    changes, where several adapters are active."""
    several = [(n, layer.active_names()) for n, layer in layers if isinstance(layer, Linear) and len(layer.active_names()) > 1]
    if several:
        raise ValueError(f"layer {several[0][0]!r} has several active adapters {several[0][1]}; merging folds in one: "
                         "fastlora.set_adapter(model, name) first")
    for name, layer in layers:
        if not layer.merged:
            weight = layer._base_weight()
            own = (f"{name}." if name else "") + ("conv.weight" if isinstance(layer, ConvLoRA) else "weight")
            tied = _tied_names(model, weight, own)
            if tied:
                warnings.warn(f"fastlora.merge: the weight of {name!r} is tied to {tied}; merging its adapter "
                              "changes those too (untie the weights first to merge only this layer)", UserWarning,
                              stacklevel=3)
        layer._set_merged(True)


def unmerge(model: nn.Module) -> nn.Module:
    """Take the LoRA product out of every merged layer's weight again."""
    for _, layer in lora_layers(model):
        layer._set_merged(False)
    return model


def _frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor.detach(), requires_grad=False)


def _plain_linear(layer: nn.Linear) -> nn.Module:
    """The plain layer a merged Linear / MergedLinear becomes: the Conv1D it came from (same
    (in, out) weight, so ``save_pretrained`` / ``from_pretrained`` round-trip), else nn.Linear."""
    weight = layer.weight.detach()
    base_class = getattr(layer, "base_class", nn.Linear)
    with torch.device("meta"):
        if layer.fan_in_fan_out and base_class.__name__ == "Conv1D":
            plain = base_class(layer.out_features, layer.in_features)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=weight.dtype)
            weight = weight.t().contiguous() if layer.fan_in_fan_out else weight
    plain.weight = _frozen(weight)
    plain.bias = layer.bias
    return plain


def _plain_embedding(layer: Embedding) -> nn.Embedding:
    with torch.device("meta"):
        plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx,
                             max_norm=layer.max_norm, norm_type=layer.norm_type,
                             scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse)
    plain.weight = _frozen(layer.weight)
    return plain


def _plain_4bit(layer: Linear4bit, dequantize: bool) -> nn.Module:
    """A merged 4-bit layer as a bitsandbytes Linear4bit holding its (re-quantized) weight, or
    with ``dequantize`` as an nn.Linear with the dense weight in the quant state's dtype."""
    if dequantize:
        dense = layer.dense_weight().float()
        if not layer.merged:
            dense += layer.delta_weight().float()
        with torch.device("meta"):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        plain.weight = _frozen(dense.to(layer.weight.quant_state.dtype))
        plain.bias = layer.bias
        return plain
    state = layer.weight.quant_state
    with torch.device("meta"):
        plain = bitsandbytes_module("nn").Linear4bit(
            layer.in_features, layer.out_features, bias=layer.bias is not None, compute_dtype=layer.compute_dtype,
            compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=layer.weight.quant_storage,
        )
    plain.weight = layer.weight
    plain.weight.module = plain
    plain.bias = layer.bias
    plain.compute_type_is_set = layer.compute_type_is_set
    return plain


def _plain_module(layer: LoRALayer, dequantize: bool = False) -> nn.Module:
    if isinstance(layer, Linear4bit):
        return _plain_4bit(layer, dequantize)
    if isinstance(layer, (Linear, MergedLinear)):
        return _plain_linear(layer)
    if isinstance(layer, Embedding):
        return _plain_embedding(layer)
    if isinstance(layer, ConvLoRA):
        return layer.conv
    raise TypeError(f"merge_and_unload does not know how to unload a {type(layer).__name__}")


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge, then replace every LoRA layer by the plain layer it wraps (in place).

    ``Linear`` / ``MergedLinear`` become ``nn.Linear`` (an injected Conv1D stays a Conv1D, as
    in PEFT), ``Embedding`` an ``nn.Embedding``, ``Conv*d`` their inner convolution. A 4-bit
    ``Linear4bit`` becomes a bitsandbytes ``Linear4bit`` whose weight is dequantized, merged
    and quantized again (PEFT's rule; the re-quantization rounds every value to its block's
    4-bit grid once more), or with ``dequantize=True`` an ``nn.Linear`` holding the dense merged
    weight (dequantized and merged in float32, rounded once to the quant state's dtype: no
    re-quantization). Every layer is checked before any changes.
    """
    layers = lora_layers(model)
    for name, layer in layers:
        if not isinstance(layer, (Linear, MergedLinear, Embedding, ConvLoRA)):
            raise TypeError(f"merge_and_unload does not know how to unload {name!r}, a {type(layer).__name__}")
    _merge_layers(model, [(n, m) for n, m in layers if not (dequantize and isinstance(m, Linear4bit))])
    for name, layer in layers:
        plain = _plain_module(layer, dequantize)
        plain.train(layer.training)
        _set_submodule(model, name, plain)
    if hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
    return model
