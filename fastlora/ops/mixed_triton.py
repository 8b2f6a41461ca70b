"""The ``triton`` backend's mixed batches: the launchers of kernels/mixed_lora.py.

``forward`` and ``backward`` (the schema of ``schema.py``'s mixed ops) are registered with
``torch.library.triton_op`` as ``fastlora::mixed_lora_fwd_triton`` / ``mixed_lora_bwd_triton``,
so torch.compile traces into the kernels; eager calls run the same functions directly.
Forward: two launches (shrink, expand into y). Backward: four (shrink of dy with B^T, expand
of G with A^T into dx, one weight-gradient launch each for dA and dB). Apart from the layout
(a few (M,)-sized index tensors, built on the device), nothing is gathered or copied.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op

from fastlora.kernels.configs import mixed_configs, mixed_grad_configs
from fastlora.kernels.mixed_lora import mixed_expand_kernel, mixed_grad_kernel, mixed_shrink_kernel
from fastlora.ops.launcher import launch
from fastlora.ops.mixed_layout import TileLayout, tile_layout
from fastlora.ops.schema import empty_gradient
from fastlora.ops.triton_ops import dot_precision, padded_rank

TILE = 16  # rows per tile: tl.dot's smallest dimension


def _describe(x: torch.Tensor, lora_A: torch.Tensor, N: int):
    n, R, K = lora_A.shape
    return lambda: f"mixed batch M={x.shape[0]}, K={K}, N={N}, r={R}, {n} adapters, x {x.dtype}, adapters {lora_A.dtype}"


def _shrink(rows: torch.Tensor, stacked: torch.Tensor, stacked_strides: tuple[int, int, int], scaling: torch.Tensor,
            layout: TileLayout, out: torch.Tensor, describe) -> None:
    """out[m] = scaling[i] rows[m] P_i^T (M, r) float32, P_i (r, D) read through ``stacked_strides``
    (adapter, rank, column) of ``stacked``."""
    D = rows.shape[1]
    R = out.shape[1]
    meta = dict(TILE=TILE, R_PAD=padded_rank(R), INPUT_PRECISION=dot_precision(stacked.dtype))
    launch(
        mixed_shrink_kernel, lambda c: (layout.tiles,),
        (rows, stacked, scaling, layout.source, layout.valid, layout.tile_adapter, out,
         D, R, scaling.shape[0],
         rows.stride(0), rows.stride(1),
         *stacked_strides,
         out.stride(0), out.stride(1)),
        meta, ("mixed_shrink_kernel", rows.device, D, meta["R_PAD"], rows.dtype, stacked.dtype),
        lambda: mixed_configs("BLOCK_K"), describe, tunable=True, like=rows,
    )


def _expand(S: torch.Tensor, stacked: torch.Tensor, stacked_strides: tuple[int, int, int], layout: TileLayout,
            out: torch.Tensor, describe) -> None:
    """out[m] += S[m] Q_i^T, Q_i (D, r) read through ``stacked_strides`` (adapter, column, rank)."""
    D = out.shape[1]
    R = S.shape[1]
    meta = dict(TILE=TILE, R_PAD=padded_rank(R), INPUT_PRECISION=dot_precision(stacked.dtype))
    launch(
        mixed_expand_kernel, lambda c: (layout.tiles, triton.cdiv(D, c["BLOCK_N"])),
        (S, stacked, layout.source, layout.valid, layout.tile_adapter, out,
         D, R, stacked.shape[0],
         S.stride(0), S.stride(1),
         *stacked_strides,
         out.stride(0), out.stride(1)),
        meta, ("mixed_expand_kernel", out.device, D, meta["R_PAD"], out.dtype, stacked.dtype),
        lambda: mixed_configs("BLOCK_N"), describe, like=out,
    )


def _weight_grad(lhs: torch.Tensor, rhs: torch.Tensor, layout: TileLayout, out: torch.Tensor,
                 out_strides: tuple[int, int, int], describe) -> None:
    """out[i] = lhs_i^T rhs_i over adapter i's rows: lhs (M, r) float32, rhs (M, D), out (n, r, D)
    through ``out_strides`` (adapter, rank, column)."""
    D = rhs.shape[1]
    R = lhs.shape[1]
    meta = dict(TILE=TILE, R_PAD=padded_rank(R), INPUT_PRECISION=dot_precision(out.dtype))
    launch(
        mixed_grad_kernel, lambda c: (out.shape[0], triton.cdiv(D, c["BLOCK_D"])),
        (lhs, rhs, layout.source, layout.valid, layout.tile_start, out,
         D, R,
         lhs.stride(0), lhs.stride(1),
         rhs.stride(0), rhs.stride(1),
         *out_strides),
        meta, ("mixed_grad_kernel", rhs.device, D, meta["R_PAD"], rhs.dtype, out.dtype),
        mixed_grad_configs, describe, tunable=True, like=rhs,
    )


def forward(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
            index: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y (M, N) += scaling[i] x[m] A_i^T B_i^T per row (i = index[m]; nothing for -1), in place;
    returns S (M, r) float32. x (M, K); lora_A (n, r, K); lora_B (n, N, r); scaling (n,) float32."""
    M = x.shape[0]
    n, N, R = lora_B.shape
    S = x.new_zeros((M, R), dtype=torch.float32)
    if M == 0:
        return S
    layout = tile_layout(index, n, TILE)
    describe = _describe(x, lora_A, N)
    _shrink(x, lora_A, tuple(lora_A.stride()), scaling, layout, S, describe)
    _expand(S, lora_B, tuple(lora_B.stride()), layout, y, describe)
    return S


def backward(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
             index: torch.Tensor, S: torch.Tensor, needs_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx or empty, dA, dB): G = s_i dy B_i, dx = G A_i, dA_i = G_i^T x_i, dB_i = dy_i^T S_i."""
    M, K = x.shape
    n, N, R = lora_B.shape
    dA = torch.zeros_like(lora_A)
    dB = torch.zeros_like(lora_B)
    dx = x.new_zeros(x.shape) if needs_dx else empty_gradient(x, False)
    if M == 0:
        return dx, dA, dB
    layout = tile_layout(index, n, TILE)
    describe = _describe(x, lora_A, N)
    G = x.new_zeros((M, R), dtype=torch.float32)
    b_n, b_o, b_r = lora_B.stride()
    _shrink(dy, lora_B, (b_n, b_r, b_o), scaling, layout, G, describe)
    if needs_dx:
        a_n, a_r, a_k = lora_A.stride()
        _expand(G, lora_A, (a_n, a_k, a_r), layout, dx, describe)
    _weight_grad(G, x, layout, dA, tuple(dA.stride()), describe)
    d_n, d_o, d_r = dB.stride()
    _weight_grad(S, dy, layout, dB, (d_n, d_r, d_o), describe)
    return dx, dA, dB


mixed_lora_fwd_triton = triton_op("fastlora::mixed_lora_fwd_triton", mutates_args={"y"})(forward)
mixed_lora_bwd_triton = triton_op("fastlora::mixed_lora_bwd_triton", mutates_args=())(backward)
