"""One setup per provider: a LoRA layer (or the frozen base) with the same weights for all.

Every provider gets W (N, K), b (N,), A (r, K), B (N, r) and DoRA's magnitude m (N,) drawn
from one seed, and returns a module whose forward takes x (M, K). ``base`` is the frozen
nn.Linear without LoRA. The DoRA providers (``DORA_PROVIDERS``: PEFT's ``use_dora=True``
layer, fastlora's DoRA layer per backend, the reference) are checked against
``dora-reference`` and compared with ``peft-dora``; the QLoRA providers (``QLORA_PROVIDERS``:
PEFT's layer for bitsandbytes 4-bit bases, fastlora.Linear4bit per backend, the reference on
the dequantized weight; NF4, nested absmax, blocks of 64, float32 adapters, the compute dtype
the benchmark's) against ``qlora-reference`` and ``peft-qlora``.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch
import torch.nn as nn

import fastlora
import fastlora.reference as reference


@dataclasses.dataclass(frozen=True)
class Shape:
    M: int
    K: int
    N: int
    r: int
    dropout: float
    bias: bool


@dataclasses.dataclass
class Weights:
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor


def make_weights(shape: Shape, dtype: torch.dtype, device: str) -> Weights:
    g = torch.Generator().manual_seed(0)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    weight = rand(shape.N, shape.K, scale=shape.K**-0.5)
    return Weights(
        weight=weight,
        bias=rand(shape.N) if shape.bias else None,
        lora_A=rand(shape.r, shape.K, scale=shape.K**-0.5),
        lora_B=rand(shape.N, shape.r, scale=shape.r**-0.5),
        scaling=2.0,
        magnitude=(weight.float().norm(dim=1) * (1 + 0.1 * rand(shape.N).float())).to(dtype),
    )


class ReferenceLoRA(nn.Module):
    """fastlora.reference.lora_linear as a module (PEFT's math in plain autograd)."""

    def __init__(self, w: Weights, dropout: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(w.weight, requires_grad=False)
        self.bias = None if w.bias is None else nn.Parameter(w.bias)
        self.lora_A = nn.Parameter(w.lora_A)
        self.lora_B = nn.Parameter(w.lora_B)
        self.scaling = w.scaling
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.dropout, self.training
        )


class ReferenceDoRA(ReferenceLoRA):
    """fastlora.reference.dora_linear as a module (PEFT's DoRA math in plain autograd)."""

    def __init__(self, w: Weights, dropout: float) -> None:
        super().__init__(w, dropout)
        self.magnitude = nn.Parameter(w.magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.dora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude, self.scaling, self.dropout,
            self.training,
        )


class FastLoRA(nn.Module):
    """fastlora.Linear on a fixed backend (``auto`` picks Triton on CUDA, C++ or torch on CPU);
    with ``use_dora`` its DoRA layer."""

    def __init__(self, w: Weights, dropout: float, backend: str, use_dora: bool = False) -> None:
        super().__init__()
        N, K = w.weight.shape
        self.layer = fastlora.Linear(
            K, N, r=w.lora_A.shape[0], lora_alpha=w.scaling * w.lora_A.shape[0], lora_dropout=dropout,
            bias=w.bias is not None, merge_weights=False, device=w.weight.device, dtype=w.weight.dtype,
            use_dora=use_dora,
        )
        load_linear(self.layer, w)
        self.layer.lora_A.data.copy_(w.lora_A)
        self.layer.lora_B.data.copy_(w.lora_B)
        if use_dora:
            self.layer.lora_magnitude_vector.data.copy_(w.magnitude)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fastlora.use_backend(self.backend):
            return self.layer(x)


def load_linear(layer: nn.Linear, w: Weights) -> None:
    with torch.no_grad():
        layer.weight.copy_(w.weight)
        if w.bias is not None:
            layer.bias.copy_(w.bias)
    layer.weight.requires_grad_(False)


def base_layer(w: Weights) -> nn.Linear:
    N, K = w.weight.shape
    layer = nn.Linear(K, N, bias=w.bias is not None, device=w.weight.device, dtype=w.weight.dtype)
    load_linear(layer, w)
    return layer


def peft_layer(w: Weights, dropout: float, use_dora: bool = False) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    r = w.lora_A.shape[0]
    alpha = w.scaling * r
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora)
    layer = PeftLinear(base_layer(w), "default", config=config, r=r, lora_alpha=alpha, lora_dropout=dropout,
                       use_dora=use_dora)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(w.lora_A)
        layer.lora_B["default"].weight.copy_(w.lora_B)
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(w.magnitude)
    layer.base_layer.weight.requires_grad_(False)
    return layer


def linear_4bit(linear: nn.Linear, compute_dtype: torch.dtype, quant_type: str = "nf4", nested: bool = True,
                blocksize: int = 64) -> nn.Module:
    """A bitsandbytes Linear4bit quantized from ``linear``'s weight on its device (QLoRA's
    recipe by default: NF4, nested absmax, blocks of 64), bias kept, everything frozen."""
    import bitsandbytes as bnb

    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=nested, quant_type=quant_type,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(weight.cpu().clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=nested, quant_type=quant_type).to(weight.device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # on AVX-512 BF16 CPUs bitsandbytes repacks the weight in its first eval-mode forward (and
    # fails on small layers): keep PEFT's layers on the layout they train in
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype, **quant) -> nn.Module:
    """``model`` (in place) with every nn.Linear but the output layer a bitsandbytes 4-bit
    layer (``linear_4bit``), marked ``is_loaded_in_4bit`` as transformers marks such models
    (PEFT reads it): what ``from_pretrained(..., load_in_4bit=True)`` gives, without a download."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not output:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    linear_4bit(module, compute_dtype, **quant))
    model.is_loaded_in_4bit = True
    return model


class ReferenceQLoRA(ReferenceLoRA):
    """fastlora.reference.lora_linear on bitsandbytes' dequantized 4-bit weight."""

    def __init__(self, w: Weights, dropout: float) -> None:
        import bitsandbytes.functional as bnb_functional

        quantized = linear_4bit(base_layer(w), w.weight.dtype).weight
        dense = bnb_functional.dequantize_4bit(quantized.data, quantized.quant_state)
        super().__init__(dataclasses.replace(w, weight=dense), dropout)


class FastQLoRA(nn.Module):
    """fastlora.Linear4bit (float32 adapters, as PEFT's) on a fixed backend."""

    def __init__(self, w: Weights, dropout: float, backend: str) -> None:
        super().__init__()
        r = w.lora_A.shape[0]
        self.layer = fastlora.Linear4bit(linear_4bit(base_layer(w), w.weight.dtype), r=r, lora_alpha=w.scaling * r,
                                         lora_dropout=dropout)
        self.layer.lora_A.data.copy_(w.lora_A)
        self.layer.lora_B.data.copy_(w.lora_B)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fastlora.use_backend(self.backend):
            return self.layer(x)


def peft_qlora_layer(w: Weights, dropout: float) -> nn.Module:
    """PEFT's LoRA layer for bitsandbytes 4-bit bases (float32 adapters), on the same 4-bit base."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    r = w.lora_A.shape[0]
    alpha = w.scaling * r
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer = PeftLinear4bit(linear_4bit(base_layer(w), w.weight.dtype), "default", config=config, r=r,
                           lora_alpha=alpha, lora_dropout=dropout)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(w.lora_A)
        layer.lora_B["default"].weight.copy_(w.lora_B)
    return layer


BACKEND_PROVIDERS = ["fastlora-torch", "fastlora-triton", "fastlora-cpp"]
DORA_PROVIDERS = ["dora-reference", "peft-dora", "fastlora-dora", "fastlora-dora-torch", "fastlora-dora-triton",
                  "fastlora-dora-cpp"]
QLORA_PROVIDERS = ["qlora-reference", "peft-qlora", "fastlora-qlora", "fastlora-qlora-torch", "fastlora-qlora-triton",
                   "fastlora-qlora-cpp"]
ALL_PROVIDERS = ["base", "reference", "reference-compiled", "peft", "fastlora", *BACKEND_PROVIDERS, *DORA_PROVIDERS,
                 *QLORA_PROVIDERS]
# per variant: the provider a variant's rows are checked against, the one vs_peft divides by,
# and the one vs_reference divides by (DoRA's and QLoRA's targets compare with fastlora's LoRA)
VARIANT_PEERS = {
    "lora": {"check": "reference", "peft": "peft", "reference": "reference"},
    "dora": {"check": "dora-reference", "peft": "peft-dora", "reference": "fastlora"},
    "qlora": {"check": "qlora-reference", "peft": "peft-qlora", "reference": "fastlora"},
}


def backend_of(name: str) -> str | None:
    """The fastlora backend a provider forces (``fastlora-dora-cpp`` -> ``cpp``), or None."""
    for prefix in ("fastlora-dora-", "fastlora-qlora-", "fastlora-"):
        if name.startswith(prefix) and name not in ("fastlora-dora", "fastlora-qlora"):
            return name.removeprefix(prefix)
    return None


def variant(name: str) -> str:
    """``lora``, ``dora`` or ``qlora``: which op a provider runs."""
    if name in DORA_PROVIDERS:
        return "dora"
    if name in QLORA_PROVIDERS:
        return "qlora"
    return "lora"


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def provider_names(device: str) -> list[str]:
    """Providers measured on ``device`` (peft only when installed)."""
    names = ["base", "reference"]
    if importlib.util.find_spec("peft") is not None:
        names.append("peft")
    names += ["fastlora", "fastlora-torch"]
    if device == "cpu":
        from fastlora.ops import cpp_ops

        if cpp_ops.unavailable_reason() is None:
            names.append("fastlora-cpp")
    else:
        names.append("reference-compiled")
    if "peft" in names:
        names.append("peft-dora")
    names.append("fastlora-dora")
    if bitsandbytes_installed():
        names += ["peft-qlora"] if "peft" in names else []
        names.append("fastlora-qlora")
    return names


def unavailable_reason(name: str, device: str) -> str | None:
    """Why provider ``name`` cannot run on ``device`` here, or None when it can."""
    if name in ("peft", "peft-dora", "peft-qlora") and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    if variant(name) == "qlora" and not bitsandbytes_installed():
        return "bitsandbytes is not installed (pip install 'fastlora[qlora]')"
    if backend_of(name) is not None:
        from fastlora import _backend

        with fastlora.use_backend(backend_of(name)):
            try:
                _backend.resolve(torch.device(device))
            except RuntimeError as error:
                return str(error)
    return None


def build(name: str, w: Weights, dropout: float) -> nn.Module:
    """The module a provider times, in training mode."""
    if name == "base":
        module = base_layer(w)
    elif name == "reference":
        module = ReferenceLoRA(w, dropout)
    elif name == "reference-compiled":
        module = torch.compile(ReferenceLoRA(w, dropout))
    elif name == "peft":
        module = peft_layer(w, dropout)
    elif name == "dora-reference":
        module = ReferenceDoRA(w, dropout)
    elif name == "peft-dora":
        module = peft_layer(w, dropout, use_dora=True)
    elif name == "fastlora":
        module = FastLoRA(w, dropout, "auto")
    elif name == "fastlora-dora":
        module = FastLoRA(w, dropout, "auto", use_dora=True)
    elif name == "qlora-reference":
        module = ReferenceQLoRA(w, dropout)
    elif name == "peft-qlora":
        module = peft_qlora_layer(w, dropout)
    elif name == "fastlora-qlora":
        module = FastQLoRA(w, dropout, "auto")
    elif name in QLORA_PROVIDERS and backend_of(name) is not None:
        module = FastQLoRA(w, dropout, backend_of(name))
    elif name in ALL_PROVIDERS and backend_of(name) is not None:
        module = FastLoRA(w, dropout, backend_of(name), use_dora=variant(name) == "dora")
    else:
        raise ValueError(f"unknown provider {name!r}")
    return module.train()
