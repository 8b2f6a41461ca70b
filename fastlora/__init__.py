"""fastlora: fast, exact LoRA layers for PyTorch.

``import fastlora as lora`` runs loralib code unchanged; the layers run on one fused op,
``fastlora.lora_linear``, whose backend (Triton on CUDA, C++ or PyTorch on CPU) is picked by
``fastlora.use_backend`` / FASTLORA_BACKEND.
"""

from fastlora import _layout

_layout.register_kernels_package()  # in a source tree, the repository's kernels/ as fastlora.kernels

from fastlora import reference
from fastlora._backend import current_backend, use_backend
from fastlora.layers import (
    Conv1d,
    Conv2d,
    Conv3d,
    Embedding,
    Linear,
    Linear4bit,
    LoRALayer,
    LoRALinear,
    MergedLinear,
    lora_state_dict,
    mark_only_lora_as_trainable,
)
from fastlora.model import delete_adapter, inject, merge, merge_and_unload, set_adapter, unmerge
from fastlora.ops import dora_linear, lora_linear, multi_lora_linear
from fastlora.peft import from_peft, load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "Linear",
    "Linear4bit",
    "LoRALayer",
    "LoRALinear",
    "MergedLinear",
    "current_backend",
    "delete_adapter",
    "dora_linear",
    "from_peft",
    "inject",
    "load_adapter",
    "lora_linear",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge",
    "merge_and_unload",
    "multi_lora_linear",
    "reference",
    "save_adapter",
    "set_adapter",
    "unmerge",
    "use_backend",
]
