"""The ``triton`` backend's mixed batches: the launcher of kernels/mixed_lora.py (inference:
forward only; a mixed batch that trains, or draws dropout, runs the torch path)."""

from __future__ import annotations

import torch
import triton

from fastlora.kernels.configs import mixed_configs
from fastlora.kernels.mixed_lora import mixed_expand_kernel, mixed_shrink_kernel
from fastlora.ops.launcher import launch
from fastlora.ops.multi_lora import tile_layout
from fastlora.ops.triton_ops import dot_precision, padded_rank

TILE = 16  # rows per tile: tl.dot's smallest dimension


def add_mixed_lora_triton(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scaling: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """y (M, N) += scaling[i] x[m] A[i]^T B[i]^T per row (i = index[m]; nothing for -1), in
    place; x (M, K); lora_A (n, r, K); lora_B (n, N, r); scaling (n,) float32. Returns y."""
    M, K = x.shape
    n, N, R = lora_B.shape
    if M == 0:
        return y
    position, tile_adapter, tiles = tile_layout(index, n, TILE)
    arange = torch.arange(M, device=x.device)
    source = torch.zeros(tiles * TILE, dtype=torch.long, device=x.device).index_copy_(0, position, arange)
    valid = torch.zeros(tiles * TILE, dtype=torch.uint8, device=x.device).index_fill_(0, position, 1)
    S = x.new_empty((tiles * TILE, R), dtype=torch.float32)
    r_pad = padded_rank(R)
    precision = dot_precision(lora_A.dtype)
    describe = lambda: f"mixed batch M={M}, K={K}, N={N}, r={R}, {n} adapters, x {x.dtype}, adapters {lora_A.dtype}"  # noqa: E731
    meta = dict(TILE=TILE, R_PAD=r_pad, INPUT_PRECISION=precision)
    launch(
        mixed_shrink_kernel, lambda c: (tiles,),
        (x, lora_A, scaling, source, tile_adapter, S,
         K, R, n,
         x.stride(0), x.stride(1),
         lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
         S.stride(0), S.stride(1)),
        meta, ("mixed_shrink_kernel", x.device, K, r_pad, x.dtype, lora_A.dtype), lambda: mixed_configs("BLOCK_K"),
        describe, tunable=True, like=x,
    )
    launch(
        mixed_expand_kernel, lambda c: (tiles, triton.cdiv(N, c["BLOCK_N"])),
        (S, lora_B, source, valid, tile_adapter, y,
         N, R, n,
         S.stride(0), S.stride(1),
         lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
         y.stride(0), y.stride(1)),
        meta, ("mixed_expand_kernel", x.device, N, r_pad, y.dtype, lora_B.dtype), lambda: mixed_configs("BLOCK_N"),
        describe, like=x,
    )
    return y
