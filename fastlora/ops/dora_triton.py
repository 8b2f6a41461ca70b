"""The ``triton`` backend's DoRA piece: the launcher of kernels/dora_norm.py.

Registered with ``torch.library.triton_op`` as ``fastlora::dora_norm_triton`` so that
``torch.compile`` traces into the kernel; eager calls run the same function directly.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op

from fastlora.kernels.configs import norm_configs
from fastlora.kernels.dora_norm import dora_norm_kernel
from fastlora.ops.launcher import launch
from fastlora.ops.triton_ops import dot_precision, shape_key, weight_strides


def _weight_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """n (N,) float32 = ||W + s B A|| per output row; weight (N, K) or (K, N) with fan_in_fan_out."""
    N, R = lora_B.shape
    K = lora_A.shape[1]
    norm = torch.empty((N,), dtype=torch.float32, device=weight.device)
    if N == 0:
        return norm
    stride_wn, stride_wk = weight_strides(weight, fan_in_fan_out)
    meta = dict(INPUT_PRECISION="ieee" if lora_A.dtype == torch.float32 else dot_precision(lora_A.dtype))
    launch(
        dora_norm_kernel, lambda c: (triton.cdiv(N, c["BLOCK_N"]),),
        (weight, lora_A, lora_B, norm,
         N, K, R,
         stride_wn, stride_wk,
         lora_A.stride(0), lora_A.stride(1),
         lora_B.stride(0), lora_B.stride(1),
         scaling),
        meta, shape_key("dora_norm_kernel", 0, N, K, 0, weight, lora_A, fan_in_fan_out=fan_in_fan_out, **meta),
        lambda: norm_configs(N),
        lambda: f"N={N}, K={K}, r={R}, weight {weight.dtype}, adapters {lora_A.dtype}",
        like=weight,
    )
    return norm


dora_norm_triton = triton_op("fastlora::dora_norm_triton", mutates_args=())(_weight_norm)


def weight_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """The registered op while torch.compile traces, the plain launcher in eager mode."""
    if torch.compiler.is_compiling():
        return dora_norm_triton(weight, lora_A.detach(), lora_B.detach(), scaling, fan_in_fan_out)
    return _weight_norm(weight, lora_A.detach(), lora_B.detach(), scaling, fan_in_fan_out)
