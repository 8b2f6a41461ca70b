"""loralib-compatible LoRA layers: same constructors, attributes, parameters and state-dict keys.

``Linear`` and ``MergedLinear`` run through ``fastlora.lora_linear`` (the fused op); the
``Embedding`` and ``Conv*d`` layers compute loralib's math directly. Parameters:
lora_A (r, in_features) and lora_B (out_features, r) beside the wrapped layer's own
``weight``/``bias``; ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora=True``). With ``merge_weights=True`` a layer merges B A into its weight on
``eval()`` and takes it out again on ``train()``, as loralib does. ``Linear(...,
use_dora=True)`` is PEFT's DoRA: a trainable ``lora_magnitude_vector`` (out_features,) and
``fastlora.dora_linear`` in place of ``lora_linear``.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlora.ops.dora_linear import dora_linear
from fastlora.ops.dequant import dequantize
from fastlora.mixed_batch import current_adapter_names, sample_adapter_index
from fastlora.ops.dora_norm import weight_norm_torch
from fastlora.ops.lora_linear import lora_linear
from fastlora.ops.multi_lora import add_mixed_lora
from fastlora.ops.qlora_linear import linear_4bit, qlora_linear
from fastlora.ops.weight4bit import Weight4bit, from_params4bit


def as_rank(r: object, minimum: int = 0) -> int:
    """``r`` as a Python int (numpy and 0-d integer tensor scalars included), else ValueError."""
    try:
        value = operator.index(r)
    except TypeError:
        value = None
    if value is None or isinstance(r, bool) or value < minimum:
        raise ValueError(f"r must be an integer >= {minimum}, got {r!r}")
    return value


def as_number(name: str, value: object) -> int | float:
    """A real ``value`` (Python, numpy or a one-element tensor) as a Python int or float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def as_dropout(value: object) -> float:
    """A dropout rate in [0, 1) as a Python float, else ValueError naming lora_dropout."""
    try:
        p = float(as_number("lora_dropout", value))
    except TypeError:
        p = None
    if p is None or not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {value!r}")
    return p


class LoRALayer:
    """The state every LoRA layer shares (loralib's mixin): r, lora_alpha, scaling, dropout, merge flags."""

    def __init__(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        merge_weights: bool,
        use_rslora: bool = False,
    ) -> None:
        r = as_rank(r)
        lora_alpha = as_number("lora_alpha", lora_alpha)
        lora_dropout = as_dropout(lora_dropout)
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        self.active_adapter = "default"  # the adapter the forward runs (Linear: add_adapter / fastlora.set_adapter)
        adapters_changed()
        if r > 0:
            self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r

    @property
    def lora_dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def _set_merged(self, merge: bool) -> None:
        """Add (merge) or subtract (unmerge) the LoRA product to the frozen weight, once."""
        if self.r > 0 and merge != self.merged and self._has_lora():
            with torch.no_grad():
                delta = self.delta_weight()
                weight = self._base_weight()
                merged = weight.float() + delta.float() if merge else weight.float() - delta.float()
                weight.copy_(merged)
        self.merged = merge

    def _has_lora(self) -> bool:
        return hasattr(self, "lora_A")

    def _train_merge(self, mode: bool) -> None:
        """loralib's rule: unmerge on train(), merge on eval(), when merge_weights is set."""
        if self.merge_weights:
            self._set_merged(not mode)


def _fan_in_fan_out_view(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.t() if fan_in_fan_out else weight


def refuse_dora(kind: str, kwargs: dict) -> None:
    """ValueError when a layer kind without DoRA is asked for it (``use_dora=True``)."""
    if kwargs.pop("use_dora", False):
        raise ValueError(f"use_dora=True: DoRA is supported on fastlora.Linear (and injected Linear / Conv1D "
                         f"layers) only, not on {kind}")


DEFAULT_ADAPTER = "default"
BASE_ONLY = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# bumped whenever a LoRA layer is built or replaced or gains / loses an adapter: what a cache of
# a model's adapter names (mixed_batch.known_adapter_names) is checked against
ADAPTER_CHANGES = [0]


def adapters_changed() -> None:
    ADAPTER_CHANGES[0] += 1


def check_adapter_name(name: object) -> str:
    """A new adapter's name: a non-empty str without dots, not "default" or "__base__"."""
    if not isinstance(name, str) or not name or "." in name or name in (DEFAULT_ADAPTER, BASE_ONLY):
        raise ValueError(f"adapter_name must be a non-empty string without '.', other than {DEFAULT_ADAPTER!r} "
                         f"and {BASE_ONLY!r}, got {name!r}")
    return name


class NamedAdapter(nn.Module):
    """One more adapter of a LoRA layer beside its default one: lora_A (r, in_features),
    lora_B (out_features, r), its own r, lora_alpha, scaling and dropout rate. Kept in the
    layer's ``lora_adapters`` (state-dict keys ``<layer>.lora_adapters.<name>.lora_A`` /
    ``.lora_B``); the default adapter keeps the layer's own ``lora_A`` / ``lora_B``."""

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool, in_features: int,
                 out_features: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.r = as_rank(r, minimum=1)
        self.lora_alpha = as_number("lora_alpha", lora_alpha)
        self.lora_dropout_p = as_dropout(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = self.lora_alpha / math.sqrt(self.r) if use_rslora else self.lora_alpha / self.r
        self.lora_A = nn.Parameter(torch.empty((self.r, in_features), device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros((out_features, self.r), device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class Linear(nn.Linear, LoRALayer):
    """nn.Linear with a LoRA adapter: y = x W^T + b + scaling * dropout(x) A^T B^T.

    x (..., in_features) -> (..., out_features). With ``fan_in_fan_out=True`` the weight is
    stored as (in_features, out_features), as GPT-2's Conv1D does.

    Several adapters: the layer's own lora_A / lora_B are the adapter "default"; ``add_adapter``
    keeps more in ``lora_adapters`` (``NamedAdapter``, each with its own rank and alpha), and
    ``active_adapter`` names the one the forward runs (None: the base layer alone), or lists
    several, whose terms the forward adds up (PEFT's ``set_adapter([...])``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        **kwargs,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.fan_in_fan_out = fan_in_fan_out
        self.use_dora = False
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.weight.requires_grad = False
        elif use_dora:
            raise ValueError("use_dora=True needs a LoRA adapter: r must be >= 1")
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
        if use_dora:
            self.add_dora_magnitude()

    @classmethod
    def from_linear(
        cls,
        base: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = False,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> "Linear":
        """A LoRA layer around ``base``'s own weight and bias Parameters (shared, not copied).

        ``base`` is an nn.Linear (weight (out, in)) or, with ``fan_in_fan_out=True``, a layer
        storing its weight as (in, out) such as Hugging Face's Conv1D. A and B are created on
        the weight's device in ``adapter_dtype`` (default: the weight's dtype). ``base_class``
        remembers ``type(base)``, the class ``fastlora.merge_and_unload`` gives back.
        ``use_dora`` adds DoRA's magnitude (``add_dora_magnitude``).
        """
        weight = base.weight
        in_features, out_features = weight.shape if fan_in_fan_out else weight.shape[::-1]
        layer = cls(
            in_features, out_features, r=0, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            fan_in_fan_out=False, merge_weights=merge_weights, use_rslora=use_rslora,
            bias=base.bias is not None, device="meta",
        )
        layer.weight = weight
        layer.bias = base.bias
        layer.fan_in_fan_out = fan_in_fan_out
        layer.base_class = type(base)
        layer.use_dora = False
        LoRALayer.__init__(layer, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        dtype = adapter_dtype or weight.dtype
        layer.lora_A = nn.Parameter(torch.empty((r, in_features), device=weight.device, dtype=dtype))
        layer.lora_B = nn.Parameter(torch.empty((out_features, r), device=weight.device, dtype=dtype))
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
        nn.init.zeros_(layer.lora_B)
        weight.requires_grad = False
        if use_dora:
            layer.add_dora_magnitude()
        return layer

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        if getattr(self, "use_dora", False):
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.dora_norm())

    def dora_norm(self) -> torch.Tensor:
        """||W + scaling * B A|| of each output row (out_features,), float32, detached."""
        return weight_norm_torch(self.weight, self.lora_A, self.lora_B, self.scaling, self.fan_in_fan_out)

    def add_dora_magnitude(self) -> None:
        """Make this a DoRA layer: ``lora_magnitude_vector`` (out_features,), trainable, in the
        adapters' dtype, initialised as PEFT does to the row norms of W + scaling * B A (of W
        while B = 0)."""
        if self.merged:
            raise ValueError("add_dora_magnitude needs an unmerged layer")
        self.lora_magnitude_vector = nn.Parameter(self.dora_norm().to(self.lora_A.dtype),
                                                  requires_grad=self.lora_A.requires_grad)
        self.use_dora = True

    def remove_dora_magnitude(self) -> None:
        """Back to plain LoRA: drop ``lora_magnitude_vector``."""
        if self.merged:
            raise ValueError("remove_dora_magnitude needs an unmerged layer")
        if self.use_dora:
            del self.lora_magnitude_vector
        self.use_dora = False

    def _set_merged(self, merge: bool) -> None:
        """LoRA: W +/- scaling B A. DoRA (PEFT's rule): merging makes W' = g * (W + scaling B A)
        with g = m / ||W + scaling B A||_row from the unmerged W, a scale per output feature;
        unmerging divides by the g kept from the merge and subtracts scaling B A. In float32,
        rounded once into W's dtype."""
        if not self.use_dora or merge == self.merged:
            LoRALayer._set_merged(self, merge)
            return
        with torch.no_grad():
            weight = self.weight
            delta = self.delta_weight().float()
            if merge:
                self._dora_merge_scale = self.lora_magnitude_vector.float() / self.dora_norm()
            scale = self._dora_merge_scale[None, :] if self.fan_in_fan_out else self._dora_merge_scale[:, None]
            merged = scale * (weight.float() + delta) if merge else weight.float() / scale - delta
            weight.copy_(merged)
        if not merge:
            del self._dora_merge_scale
        self.merged = merge

    def _base_weight(self) -> torch.Tensor:
        return self.weight

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds: "default" (its own lora_A / lora_B) and the named ones."""
        names = [DEFAULT_ADAPTER] if self.r > 0 else []
        return names + list(getattr(self, "lora_adapters", {}))

    def adapter(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(lora_A, lora_B, scaling, dropout rate) of adapter ``name``; KeyError if absent."""
        if name == DEFAULT_ADAPTER and self.r > 0:
            return self.lora_A, self.lora_B, self.scaling, self.lora_dropout_p
        named = getattr(self, "lora_adapters", {})
        if name not in named:
            raise KeyError(f"this layer has no adapter {name!r}; it has {self.adapter_names()}")
        adapter = named[name]
        return adapter.lora_A, adapter.lora_B, adapter.scaling, adapter.lora_dropout_p

    def active_names(self) -> list[str]:
        """The active adapters this layer holds: none, one, or several (their terms add up)."""
        active = self.active_adapter
        names = [] if active is None else [active] if isinstance(active, str) else list(active)
        return [name for name in names if name in self.adapter_names()]

    def active_lora(self) -> tuple[torch.Tensor, torch.Tensor, float, float] | None:
        """The active adapter's (lora_A, lora_B, scaling, dropout rate), or None (base only);
        ValueError when several are active (merging folds in one adapter)."""
        names = self.active_names()
        if len(names) > 1:
            raise ValueError(f"several adapters are active ({names}); merging folds in one: "
                             "fastlora.set_adapter(model, name) first")
        return self.adapter(names[0]) if names else None

    def add_several(self, base: torch.Tensor, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``base`` plus the terms of several active adapters, scaling_i * drop_i(x) A_i^T B_i^T
        each with its own dropout, in plain torch ops (in the adapters' dtype)."""
        y = base
        for name in names:
            lora_A, lora_B, scaling, dropout_p = self.adapter(name)
            dropped = F.dropout(x.to(lora_A.dtype), dropout_p, self.training)
            y = y + (F.linear(F.linear(dropped, lora_A), lora_B) * scaling).to(base.dtype)
        return y

    def _train_merge(self, mode: bool) -> None:
        """loralib's rule (merge on eval()), except with several adapters active: those stay unmerged."""
        if len(self.active_names()) <= 1:
            LoRALayer._train_merge(self, mode)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False,
                    dtype: torch.dtype | None = None) -> NamedAdapter:
        """Add adapter ``name`` (A kaiming-uniform, B zeros; in the default adapter's dtype unless
        ``dtype``), inactive. ValueError for a bad or taken name, a merged layer, a DoRA layer."""
        check_adapter_name(name)
        if name in self.adapter_names():
            raise ValueError(f"adapter {name!r} exists already on this layer")
        if self.r == 0:
            raise ValueError("add_adapter needs a layer with a default adapter (r >= 1)")
        if self.merged:
            raise ValueError("add_adapter needs an unmerged layer")
        if self.use_dora:
            raise ValueError("several adapters on a DoRA layer (use_dora=True) are not supported")
        if not hasattr(self, "lora_adapters"):
            self.lora_adapters = nn.ModuleDict()
        adapters_changed()
        self.lora_adapters[name] = NamedAdapter(r, lora_alpha, lora_dropout, use_rslora, self.in_features,
                                                self.out_features, self.lora_A.device, dtype or self.lora_A.dtype)
        return self.lora_adapters[name]

    def delete_adapter(self, name: str) -> None:
        """Remove named adapter ``name`` (the default one cannot be deleted); if it was active,
        "default" becomes active."""
        if name == DEFAULT_ADAPTER:
            raise ValueError("the default adapter is the layer's own lora_A / lora_B and cannot be deleted; "
                             "delete the named ones, or fastlora.merge_and_unload the model")
        if name not in getattr(self, "lora_adapters", {}):
            raise KeyError(f"this layer has no adapter {name!r}; it has {self.adapter_names()}")
        if self.merged and name in self.active_names():
            raise ValueError(f"adapter {name!r} is merged into the weight: unmerge first")
        del self.lora_adapters[name]
        adapters_changed()
        remaining = [n for n in self.active_names() if n != name]
        if name == self.active_adapter or not remaining:
            self.active_adapter = DEFAULT_ADAPTER
        elif not isinstance(self.active_adapter, str):
            self.active_adapter = remaining if len(remaining) > 1 else remaining[0]

    def mixed_batch_names(self) -> list[str] | None:
        """The adapter names of the mixed batch this forward runs, or None (a plain batch).

        Normally those of the model call in progress in this thread. Activation checkpointing
        (Hugging Face's ``gradient_checkpointing_enable``, ``torch.utils.checkpoint``) runs the
        forward again inside the backward, outside that call and perhaps on autograd's own
        thread: that recomputation takes the names of this layer's last forward in training
        mode, so each adapter's gradients still come from its own rows (eager mode; a compiled
        model recomputes inside its own graph)."""
        names = current_adapter_names()
        if self.training and not torch.compiler.is_compiling():
            if names is None and torch._C._current_graph_task_id() != -1:  # recomputed inside a backward
                return self.__dict__.get("_training_adapter_names")
            self.__dict__["_training_adapter_names"] = names
        return names

    def add_mixed(self, base: torch.Tensor, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``base`` (the layer's base output for x) plus the rank-r term of a mixed batch
        (``model(..., adapter_names=names)``, one name per sample: x's rows split evenly over the
        samples): each sample's rows through its adapter, none where this layer lacks it or the
        name is "__base__"."""
        if self.merged or self.use_dora:
            raise ValueError("adapter_names (a mixed batch) needs unmerged, non-DoRA LoRA layers"
                             + (": fastlora.unmerge(model) first" if self.merged else ""))
        rows = x.numel() // max(x.shape[-1], 1)
        if not names or rows % len(names):
            raise ValueError(f"adapter_names has {len(names)} names for {rows} rows of x {tuple(x.shape)}: give one "
                             "name per sample of the batch")
        lora_A, lora_B, scalings, rates = self.stacked_adapters()
        per_sample = sample_adapter_index(names, self.adapter_names(), x.device)
        per_row = per_sample[:, None].expand(-1, rows // len(names)).reshape(-1)  # sample s: rows s*T .. (s+1)*T-1
        return add_mixed_lora(base, x, lora_A, lora_B, scalings, per_row, rates, self.training, check_range=False)

    def stacked_adapters(self) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
        """Every adapter of the layer stacked, in ``adapter_names`` order: lora_A (n, r, in),
        lora_B (n, out, r) with smaller ranks zero-padded to the largest, scalings, dropout
        rates. Rebuilt while autograd must reach the adapters; otherwise kept until an adapter
        is added, removed or written to (tensor versions), so serving does not restack."""
        named = self._modules.get("lora_adapters")
        adapters = [(self.lora_A, self.lora_B, self.scaling, self.lora_dropout_p)] + [
            (a._parameters["lora_A"], a._parameters["lora_B"], a.scaling, a.lora_dropout_p)
            for a in (named._modules.values() if named is not None else ())]  # adapter_names order, without getattr
        trains = torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b, _, _ in adapters)
        key = tuple((id(a), a._version, id(b), b._version, s, p) for a, b, s, p in adapters)
        cached = self.__dict__.get("_stacked_adapters")
        if not trains and cached is not None and cached[0] == key:
            return cached[1]
        rank = max(a.shape[0] for a, _, _, _ in adapters)
        stacked = (torch.stack([F.pad(a, (0, 0, 0, rank - a.shape[0])) for a, _, _, _ in adapters]),
                   torch.stack([F.pad(b, (0, rank - b.shape[1])) for _, b, _, _ in adapters]),
                   [s for _, _, s, _ in adapters], [p for _, _, _, p in adapters])
        self.__dict__["_stacked_adapters"] = None if trains else (key, stacked)
        return stacked

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A of the active adapter in the stored weight's layout: (out, in), or
        (in, out) with fan_in_fan_out (zeros when no adapter is active)."""
        active = self.active_lora()
        if active is None:
            return torch.zeros_like(self.weight)
        lora_A, lora_B, scaling, _ = active
        return _fan_in_fan_out_view(lora_B @ lora_A, self.fan_in_fan_out) * scaling

    def train(self, mode: bool = True) -> "Linear":
        nn.Linear.train(self, mode)
        self._train_merge(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self.mixed_batch_names()
        if names is not None and self.r > 0:
            return self.add_mixed(F.linear(x, _fan_in_fan_out_view(self.weight, self.fan_in_fan_out), self.bias), x, names)
        if self.r > 0 and not self.merged and self.use_dora:
            return dora_linear(
                x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scaling,
                self.lora_dropout_p, self.training, self.fan_in_fan_out,
            )
        active = self.active_names() if not self.merged else []
        if len(active) > 1:
            return self.add_several(F.linear(x, _fan_in_fan_out_view(self.weight, self.fan_in_fan_out), self.bias),
                                    x, active)
        if active:
            lora_A, lora_B, scaling, dropout_p = self.adapter(active[0])
            return lora_linear(x, self.weight, self.bias, lora_A, lora_B, scaling, dropout_p, self.training,
                               self.fan_in_fan_out)
        return F.linear(x, _fan_in_fan_out_view(self.weight, self.fan_in_fan_out), self.bias)


LoRALinear = Linear


def is_4bit_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (``bitsandbytes.nn.Linear4bit`` and its NF4 / FP4
    subclasses), recognised without importing bitsandbytes."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def is_quantized_linear(module: nn.Module) -> bool:
    """Any bitsandbytes linear layer (4-bit, 8-bit): its weight is not a dense float matrix."""
    return isinstance(module, nn.Linear) and type(module).__module__.startswith("bitsandbytes")


class Linear4bit(Linear):
    """QLoRA: a LoRA adapter on a bitsandbytes 4-bit base layer (``bitsandbytes.nn.Linear4bit``).

    y = x dequant(W)^T + b + scaling * dropout(x) A^T B^T, x (..., in_features) ->
    (..., out_features). The layer takes over the base layer's packed ``weight``
    (``bitsandbytes.nn.Params4bit``, NF4 or FP4, nested or not) and ``bias`` as they are, so
    the state dict has the base layer's keys (``weight``, ``weight.absmax``,
    ``weight.quant_map``, ..., ``weight.quant_state.bitsandbytes__nf4``) plus ``lora_A`` /
    ``lora_B``, and ``load_state_dict`` reads those keys back. The compute dtype follows
    bitsandbytes' rule (the base layer's ``compute_dtype``, else that of the first float32 /
    bfloat16 input); x is cast to it, W dequantized into it (fastlora/ops/dequant.py), the
    output cast back to x's dtype. lora_A / lora_B default to float32, as PEFT creates them
    on a 4-bit base. DoRA is not available on 4-bit layers.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = False,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        check_4bit_base(base_layer)
        nn.Module.__init__(self)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        if self.r < 1:
            raise ValueError(f"r must be an integer >= 1 on a 4-bit layer, got {r!r}")
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.weight = base_layer.weight
        self.bias = base_layer.bias
        self.weight.requires_grad = False
        self.fan_in_fan_out = False
        self.use_dora = False
        self.base_class = type(base_layer)
        self.compute_dtype = getattr(base_layer, "compute_dtype", None)
        self.compute_type_is_set = getattr(base_layer, "compute_type_is_set", self.compute_dtype is not None)
        dtype = adapter_dtype or torch.float32
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty((self.r, self.in_features), device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty((self.out_features, self.r), device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the adapter (A kaiming-uniform, B zeros); the 4-bit weight is kept."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def weight_4bit(self) -> Weight4bit:
        """The packed weight as fastlora's dequantizers read it (checked on every call)."""
        return from_params4bit(self.weight)

    def compute_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """bitsandbytes' rule: the layer's compute_dtype; unset, the first float32 / bfloat16
        input's dtype becomes it; a float16 input with none set computes in float16."""
        if not self.compute_type_is_set:
            if x.dtype in (torch.float32, torch.bfloat16):
                self.compute_dtype = x.dtype
            self.compute_type_is_set = True
        return self.compute_dtype or x.dtype

    def add_dora_magnitude(self) -> None:
        refuse_4bit_options(True)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized base weight (out, in), a new tensor in ``dtype`` (default the
        quant state's dtype, that of the weight bitsandbytes quantized)."""
        weight = self.weight_4bit()
        dtype = dtype or self.weight.quant_state.dtype
        out = torch.empty((self.out_features, self.in_features), dtype=dtype, device=self.weight.device)
        return dequantize(weight, dtype, "torch", out=out)

    def _set_merged(self, merge: bool) -> None:
        """PEFT's rule on a 4-bit base: dequantize (into the quant state's dtype), add or
        subtract scaling * B A in float32, quantize again with the same quant type, block size,
        nesting and storage. Lossy: the re-quantization rounds each value to its block's
        4-bit grid again, so unmerging does not restore the original codes exactly."""
        if merge == self.merged:
            return
        with torch.no_grad():
            delta = self.delta_weight().float()
            dense = self.dense_weight().float()
            self._quantize_into_weight(dense + delta if merge else dense - delta)
        self.merged = merge

    def _quantize_into_weight(self, dense: torch.Tensor) -> None:
        """Quantize ``dense`` (out, in) float32 into ``self.weight`` (same Parameter, new codes
        and quant state) with the weight's own quant settings."""
        bnb_functional = bitsandbytes_module("functional")
        state = self.weight.quant_state
        packed, new_state = bnb_functional.quantize_4bit(
            dense, blocksize=state.blocksize, compress_statistics=state.nested, quant_type=state.quant_type,
            quant_storage=self.weight.quant_storage,
        )
        new_state.dtype = state.dtype
        self.weight.data = packed
        self.weight.quant_state = new_state

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """The base layer's keys, as bitsandbytes writes them: the packed weight, the bias and
        the quant state's tensors under ``weight.<name>``; then the adapter."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Read the quant state's keys (``weight.absmax``, ...) back with the packed weight."""
        QuantState = bitsandbytes_module("functional").QuantState
        quant_prefix = prefix + "weight."
        quant_keys = [k for k in state_dict if k.startswith(quant_prefix)]
        quant = {k[len(quant_prefix):]: state_dict.pop(k) for k in quant_keys}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if quant:
            self.weight.quant_state = QuantState.from_dict(quant, device=self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute_dtype_for(x)
        x_compute = x.to(compute)
        bias = self.bias.to(compute) if self.bias is not None else None
        names = self.mixed_batch_names()
        active = self.active_names() if not self.merged else []
        if names is not None:
            y = self.add_mixed(linear_4bit(x_compute, self.weight_4bit(), bias), x_compute, names)
        elif len(active) > 1:
            y = self.add_several(linear_4bit(x_compute, self.weight_4bit(), bias), x_compute, active)
        elif active:
            lora_A, lora_B, scaling, dropout_p = self.adapter(active[0])
            y = qlora_linear(x_compute, self.weight_4bit(), bias, lora_A, lora_B, scaling, dropout_p, self.training)
        else:
            y = linear_4bit(x_compute, self.weight_4bit(), bias)
        return y.to(x.dtype)


def bitsandbytes_module(name: str):
    """``bitsandbytes.<name>`` (an optional dependency), or ImportError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(f"bitsandbytes.{name}")
    except ImportError as error:
        raise ImportError("fastlora's 4-bit (QLoRA) layers need bitsandbytes: pip install 'fastlora[qlora]'") from error


def refuse_4bit_options(use_dora: bool) -> None:
    """ValueError for ``use_dora=True`` on a 4-bit layer."""
    if use_dora:
        raise ValueError("use_dora=True: DoRA on a bitsandbytes 4-bit base is not supported by fastlora "
                         "(inject DoRA into a dense model, or plain LoRA into the 4-bit one)")


def check_4bit_base(base: nn.Module, name: str = "base_layer") -> None:
    """ValueError / TypeError naming ``name`` unless ``base`` is a quantized bitsandbytes
    Linear4bit whose layout fastlora reads (weight4bit.from_params4bit's checks)."""
    if not is_4bit_linear(base):
        if is_quantized_linear(base):
            raise TypeError(f"{name} is a bitsandbytes {type(base).__name__}; fastlora's quantized layers take "
                            "4-bit bases (bitsandbytes.nn.Linear4bit) only")
        raise TypeError(f"{name} must be a bitsandbytes.nn.Linear4bit, got {type(base).__name__}")
    from_params4bit(base.weight, f"{name}.weight")


class MergedLinear(nn.Linear, LoRALayer):
    """A fused projection (e.g. GPT-2's qkv) whose output slots each may carry a LoRA adapter.

    ``enable_lora`` (length g, dividing out_features) says which of the g equal output slots
    get an adapter; with e of them enabled, lora_A is (r*e, in) and lora_B (out/g*e, r), and
    slot j's update is B_j A_j (loralib's grouped layout). The layer runs through the fused op
    with the block-diagonal (out, r*e) matrix that places each B_j beside its A_j. With no slot
    enabled (loralib's default ``[False]``, on which loralib crashes) it is a plain linear layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: list[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        use_rslora: bool = False,
        **kwargs,
    ) -> None:
        refuse_dora("MergedLinear", kwargs)
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        enable_lora = list(enable_lora)
        if not enable_lora or out_features % len(enable_lora) != 0:
            raise ValueError(
                f"enable_lora must be a non-empty list whose length divides out_features "
                f"({out_features}), got {enable_lora}"
            )
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(enable_lora):
            enabled = sum(bool(e) for e in enable_lora)
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * enabled, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features // len(enable_lora) * enabled, r)))
            self.weight.requires_grad = False
            lora_ind = torch.zeros((len(enable_lora), out_features // len(enable_lora)), dtype=torch.bool)
            lora_ind[torch.tensor([bool(e) for e in enable_lora])] = True
            self.lora_ind = lora_ind.view(-1).to(self.weight.device)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _base_weight(self) -> torch.Tensor:
        return self.weight

    def block_diagonal_B(self) -> torch.Tensor:
        """(out_features, r*e): slot j's rows hold B_j in columns j*r..(j+1)*r, zeros elsewhere."""
        enabled = self.lora_A.shape[0] // self.r
        slot = self.lora_B.shape[0] // enabled
        blocks = torch.block_diag(*self.lora_B.split(slot, dim=0))
        full = blocks.new_zeros((self.out_features, self.r * enabled))
        return full.index_put((self.lora_ind.to(blocks.device),), blocks)

    def delta_weight(self) -> torch.Tensor:
        return _fan_in_fan_out_view(self.block_diagonal_B() @ self.lora_A, self.fan_in_fan_out) * self.scaling

    def train(self, mode: bool = True) -> "MergedLinear":
        nn.Linear.train(self, mode)
        self._train_merge(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r > 0 and self._has_lora() and not self.merged:
            return lora_linear(
                x, self.weight, self.bias, self.lora_A, self.block_diagonal_B(), self.scaling,
                self.lora_dropout_p, self.training, self.fan_in_fan_out,
            )
        return F.linear(x, _fan_in_fan_out_view(self.weight, self.fan_in_fan_out), self.bias)


class Embedding(nn.Embedding, LoRALayer):
    """nn.Embedding with a LoRA adapter: E[x] + scaling * A^T[x] B^T.

    lora_A is (r, num_embeddings) initialised to zeros and lora_B (embedding_dim, r) normal,
    as in loralib.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        use_rslora: bool = False,
        **kwargs,
    ) -> None:
        refuse_dora("Embedding", kwargs)
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, 0.0, merge_weights, use_rslora)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _base_weight(self) -> torch.Tensor:
        return self.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).transpose(0, 1) * self.scaling

    def train(self, mode: bool = True) -> "Embedding":
        nn.Embedding.train(self, mode)
        self._train_merge(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)
        if self.r > 0 and not self.merged:
            after_A = F.embedding(
                x, self.lora_A.transpose(0, 1), self.padding_idx, self.max_norm,
                self.norm_type, self.scale_grad_by_freq, self.sparse,
            )
            result = result + (after_A @ self.lora_B.transpose(0, 1)) * self.scaling
        return result


def _square_kernel_size(kernel_size: int | tuple[int, ...]) -> int:
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        return kernel_size
    sizes = tuple(kernel_size)
    if not sizes or len(set(sizes)) != 1 or not isinstance(sizes[0], int):
        raise ValueError(f"kernel_size must be an int or a tuple of equal ints, got {kernel_size!r}")
    return sizes[0]


class ConvLoRA(nn.Module, LoRALayer):
    """A convolution with a LoRA update of its weight: conv(x, W + scaling * (B A).view(W.shape)).

    The wrapped convolution is ``self.conv`` (state-dict keys ``conv.weight``, ``conv.bias``,
    ``lora_A``, ``lora_B``, as loralib). For a kernel of size k, with g groups:
    Conv2d: A (r*k, in*k), B (out/g*k, r*k) (loralib's shapes); Conv1d: A (r, in*k), B (out/g, r);
    Conv3d: A (r*k, in*k*k), B (out/g*k, r*k). All three equal loralib's for k = 1 and give B A
    exactly as many elements as the weight for any k (loralib's Conv1d and Conv3d crash for k > 1).
    As in loralib, ``lora_dropout`` is accepted and not applied.
    """

    def __init__(
        self,
        conv_module: type[nn.Module],
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        use_rslora: bool = False,
        **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        k = _square_kernel_size(kernel_size)
        refuse_dora(conv_module.__name__, kwargs)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        if r > 0:
            a_shape, b_shape = self._adapter_shapes(in_channels, out_channels // self.conv.groups, k, r)
            self.lora_A = nn.Parameter(self.conv.weight.new_zeros(a_shape))
            self.lora_B = nn.Parameter(self.conv.weight.new_zeros(b_shape))
            self.conv.weight.requires_grad = False
        self.reset_parameters()

    @staticmethod
    def _adapter_shapes(in_channels: int, out_per_group: int, k: int, r: int):
        raise NotImplementedError

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _base_weight(self) -> torch.Tensor:
        return self.conv.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def train(self, mode: bool = True) -> "ConvLoRA":
        nn.Module.train(self, mode)
        self._train_merge(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r > 0 and not self.merged:
            return self.conv._conv_forward(x, self.conv.weight + self.delta_weight(), self.conv.bias)
        return self.conv(x)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(nn.Conv1d, *args, **kwargs)

    @staticmethod
    def _adapter_shapes(in_channels, out_per_group, k, r):
        return (r, in_channels * k), (out_per_group, r)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(nn.Conv2d, *args, **kwargs)

    @staticmethod
    def _adapter_shapes(in_channels, out_per_group, k, r):
        return (r * k, in_channels * k), (out_per_group * k, r * k)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(nn.Conv3d, *args, **kwargs)

    @staticmethod
    def _adapter_shapes(in_channels, out_per_group, k, r):
        return (r * k, in_channels * k * k), (out_per_group * k, r * k)


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter but the LoRA ones; ``bias`` in "none" | "all" | "lora_only"."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.requires_grad = False
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad = True
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoRALayer) and getattr(module, "bias", None) is not None:
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The LoRA parameters of ``model`` (and the biases ``bias`` asks for), as loralib returns them."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    selected = {}
    for k, v in state.items():
        if "lora_" in k:
            selected[k] = v
            bias_name = k.split("lora_")[0] + "bias"
            if bias_name in state:
                selected[bias_name] = state[bias_name]
    return selected
