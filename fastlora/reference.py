"""The reference LoRA math in plain PyTorch autograd: the single source of truth.

Every fast path (Triton, C++, the PyTorch backend's custom autograd) is tested against
this file. It follows PEFT's LoRA layer exactly and never gets clever:

    y = F.linear(x, W, b) + F.linear(F.linear(dropout(x), A), B) * scaling

with x (..., K), W (N, K) (or (K, N) with ``fan_in_fan_out``), b (N,), A (r, K), B (N, r).
The LoRA branch runs in the adapters' dtype (PEFT casts x to ``lora_A``'s dtype), and the
result is cast back to the base output's dtype (x's, or the autocast dtype under autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    *,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    Shapes: x (..., K); weight (N, K), or (K, N) when ``fan_in_fan_out``; bias (N,) or None;
    lora_A (r, K); lora_B (N, r). Returns (..., N) in x's dtype.

    ``dropout_mask`` (keyword only, boolean, x's shape) replaces ``F.dropout``'s random mask
    when ``training`` and ``dropout_p > 0``: kept elements are scaled by 1 / (1 - p). Tests
    use it to run the reference with the mask a fast backend drew.
    """
    w = weight.t() if fan_in_fan_out else weight
    result = F.linear(x, w, bias)
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            dropped = F.dropout(x, p=dropout_p, training=True)
        else:
            dropped = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    else:
        dropped = x
    lora = F.linear(F.linear(dropped.to(lora_A.dtype), lora_A), lora_B) * scaling
    return (result + lora).to(result.dtype)
