"""Launchers, op registration and the autograd Function behind ``fastlora.lora_linear``."""

from fastlora.ops import torch_ops  # noqa: F401  (registers the torch backend's ops)
from fastlora.ops.dora_linear import DoRALinearFunction, dora_linear
from fastlora.ops.lora_linear import LoRALinearFunction, lora_linear
from fastlora.ops.multi_lora import multi_lora_linear

__all__ = ["DoRALinearFunction", "LoRALinearFunction", "dora_linear", "lora_linear", "multi_lora_linear"]
