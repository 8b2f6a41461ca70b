"""The ``torch`` backend: fastlora's forward and backward in plain PyTorch ops, any device.

Registered as ``fastlora::lora_fwd_torch`` / ``fastlora::lora_bwd_torch`` (schema in
``schema.py``). Dropout: the forward draws the keep-mask once from torch's default generator,
as ``nn.Dropout`` does (no host-device sync, safe under CUDA-graph capture, reproducible with
``torch.manual_seed``, replayed by activation checkpointing), and returns it packed eight
elements a byte (``keep_bits``, M x K / 8 bytes) for the backward. This backend takes no seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlora.ops.schema import define_ops, empty_gradient, no_keep_bits

define_ops("torch")


def pack_keep_bits(keep: torch.Tensor) -> torch.Tensor:
    """Boolean keep (M, K) -> uint8 (M, ceil(K / 8)): bit k % 8 of byte [m, k // 8] is keep[m, k]."""
    rows, cols = keep.shape
    as_bytes = keep.to(torch.uint8)
    if cols % 8:
        as_bytes = F.pad(as_bytes, (0, -cols % 8))
    shifts = torch.arange(8, dtype=torch.uint8, device=keep.device)
    return (as_bytes.view(rows, (cols + 7) // 8, 8) << shifts).sum(-1, dtype=torch.uint8)


def unpack_keep_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of ``pack_keep_bits``: uint8 (M, ceil(K / 8)) -> boolean keep (M, K), each
    byte shifted by 0..7 (one uint8 pass, about 2x faster on a CPU than a 256-entry table lookup)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    keep = ((bits.unsqueeze(-1) >> shifts) & 1).view(bits.shape[0], bits.shape[1] * 8)
    return (keep if keep.shape[1] == cols else keep[:, :cols]).bool()


def _masked_input(x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x * mask in ``dtype``, not yet scaled by 1 / (1 - p) (x itself, cast, without a mask)."""
    return x.to(dtype) if mask is None else x.mul(mask).to(dtype)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = x W^T + b + s * S B^T with S = drop(x) A^T; shapes as in ``schema.py``."""
    w = weight.t() if fan_in_fan_out else weight
    y = F.linear(x, w, bias)
    mask = torch.rand(x.shape, device=x.device) >= dropout_p if dropout_p > 0.0 else None
    S = _masked_input(x, mask, lora_A.dtype) @ lora_A.t()
    if mask is not None:
        S.mul_(1.0 / (1.0 - dropout_p))
    if lora_B.dtype == y.dtype:
        y.addmm_(S, lora_B.t(), alpha=scaling)
    else:
        y = y.to(lora_B.dtype).addmm_(S, lora_B.t(), alpha=scaling).to(x.dtype)
    return y, S.float(), no_keep_bits(x) if mask is None else pack_keep_bits(mask)


def recompute_S(x: torch.Tensor, lora_A: torch.Tensor, keep_bits: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """S = drop(x) A^T (M, r) in float32 from x, A and the forward's keep_bits, as
    differentiable ops (double backward needs S's dependence on x and A)."""
    mask = unpack_keep_bits(keep_bits, x.shape[1]) if dropout_p > 0.0 else None
    S = _masked_input(x, mask, lora_A.dtype) @ lora_A.t()
    return S.float() if mask is None else S.float() / (1.0 - dropout_p)


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    S: torch.Tensor,
    keep_bits: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    fan_in_fan_out: bool,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    needs_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx = dy W + s (G A) * mask / (1 - p), dA = s G^T drop(x), dB = s dy^T S, G = dy B.

    keep_bits holds the forward's keep-mask (empty without dropout).
    """
    adapter_dtype = lora_A.dtype
    dy_adapter = dy.to(adapter_dtype)
    dx = empty_gradient(x, False)
    dA = empty_gradient(lora_A, False)
    dB = empty_gradient(lora_B, False)
    dbias = empty_gradient(dy, False)
    if needs_dB:
        dB = (dy_adapter.t() @ S.to(adapter_dtype)) * scaling
    if needs_dx or needs_dA:
        G = dy_adapter @ lora_B
        mask = unpack_keep_bits(keep_bits, x.shape[1]) if dropout_p > 0.0 else None
        lora_scale = scaling if mask is None else scaling / (1.0 - dropout_p)
        if needs_dA:
            dA = (G.t() @ _masked_input(x, mask, adapter_dtype)).mul_(lora_scale)
        if needs_dx:
            dx = dy @ (weight.t() if fan_in_fan_out else weight)
            lora_dx = G @ lora_A
            if mask is not None:
                lora_dx.mul_(mask)
            if lora_dx.dtype == dx.dtype:
                dx.add_(lora_dx, alpha=lora_scale)
            else:
                dx = dx.to(lora_dx.dtype).add_(lora_dx, alpha=lora_scale).to(x.dtype)
    if needs_dbias:
        dbias = dy.sum(0)
    return dx, dA, dB, dbias


torch.library.impl("fastlora::lora_fwd_torch", "CompositeExplicitAutograd")(forward)
torch.library.impl("fastlora::lora_bwd_torch", "CompositeExplicitAutograd")(backward)
