"""The ``triton`` backend's 4-bit dequantizer: the launcher of kernels/dequant_4bit.py."""

from __future__ import annotations

import torch
import triton

from fastlora.kernels.configs import dequant_configs
from fastlora.kernels.dequant_4bit import dequant_4bit_kernel
from fastlora.ops.launcher import launch
from fastlora.ops.weight4bit import Weight4bit, absmax_fp32


def dequantize(weight: Weight4bit, out: torch.Tensor) -> torch.Tensor:
    """Dequantize ``weight`` into ``out`` (out_features, in_features), contiguous; returns out."""
    n_bytes = weight.packed.numel()
    if n_bytes == 0:
        return out
    launch(
        dequant_4bit_kernel, lambda c: (triton.cdiv(n_bytes, c["BLOCK_BYTES"]),),
        (weight.packed, absmax_fp32(weight), weight.code, out, n_bytes, weight.numel),
        {"QUANT_BLOCK": weight.blocksize},
        ("dequant_4bit_kernel", out.device, out.dtype, weight.blocksize),
        dequant_configs,
        lambda: f"{weight.out_features} x {weight.in_features} {weight.quant_type} weight into {out.dtype}",
        tunable=True,
        like=out,
    )
    return out
