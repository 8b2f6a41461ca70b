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


def dora_weight_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """PEFT's DoRA norm, densely: ``||W + scaling * B A||`` of each output row, detached.

    weight (N, K) (or (K, N) with ``fan_in_fan_out``) is cast to the adapters' dtype, as PEFT
    casts it to the (adapter-dtype) input; returns (N,) in that dtype.
    """
    w = (weight.t() if fan_in_fan_out else weight).to(lora_A.dtype)
    lora_weight = (lora_B @ lora_A).detach()
    return torch.linalg.norm(w + scaling * lora_weight, dim=1).to(w.dtype).detach()


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    *,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference DoRA (PEFT's ``use_dora=True`` Linear, peft/tuners/lora/dora.py), step by step.

    With g = magnitude / ||W + s B A||_row (N,), the norm detached (DoRA paper, section 4.3):
      dropout active:  y = x W^T + b + (g - 1) * drop(x) W^T + g * s * drop(x) A^T B^T
      otherwise:       y = x W^T + b + (g - 1) * (x W^T) + g * s * x A^T B^T
                         = g * (x W^T + s x A^T B^T) + b
    Shapes as ``lora_linear``, magnitude (N,) in the adapters' dtype. The DoRA branch runs in
    the adapters' dtype (PEFT casts x to ``lora_A``'s dtype); the result has x's dtype.
    ``dropout_mask`` as in ``lora_linear``.
    """
    w = weight.t() if fan_in_fan_out else weight
    result = F.linear(x, w, bias)
    dropping = training and dropout_p > 0.0
    xa = x.to(lora_A.dtype)
    if dropping:
        if dropout_mask is None:
            xa = F.dropout(xa, p=dropout_p, training=True)
        else:
            xa = xa * dropout_mask.to(xa.dtype) / (1.0 - dropout_p)
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    g = (magnitude / norm).view(1, -1)
    lora = F.linear(F.linear(xa, lora_A), lora_B)
    if dropping:
        base = F.linear(xa, w.to(xa.dtype))
    else:
        base = result if bias is None else result - bias
    dora = (g - 1) * base + g * lora * scaling
    return (result + dora).to(result.dtype)
