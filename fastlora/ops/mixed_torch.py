"""The ``torch`` backend's mixed batches: a segmented batched matmul, any device.

Registered as ``fastlora::mixed_lora_fwd_torch`` / ``mixed_lora_bwd_torch`` (schema in
``schema.py``). On the tile layout (``mixed_layout.py``: rows sorted by adapter, each adapter's
segment padded to whole tiles of T rows, T = min(64, M / (n + 1))), the gathered tiles of x
(tiles, T, K) meet each tile's adapter stacked per tile: one ``bmm`` with A gives S, one with
B the rank-r term, read back in the rows' order; rows without an adapter meet a zero adapter.
No loop over adapters; the cost is one adapter's rank-r work on M + (n + 1) T rows plus the
gathers. The products run in the adapters' dtype, S is returned in float32.

Backward, per tile t of adapter i (padding positions zeroed in dy): G_t = dy_t (s_i B_i),
dx_t = G_t A_i, and the per-tile partials G_t^T x_t and dy_t^T S_t summed into dA_i and dB_i
(``index_add_``: on CUDA its float sums are in atomic order unless
``torch.use_deterministic_algorithms`` is on).
"""

from __future__ import annotations

import torch

from fastlora.ops.mixed_layout import tile_layout, tile_rows
from fastlora.ops.schema import define_mixed_ops, empty_gradient

define_mixed_ops("torch")


def per_tile(stacked: torch.Tensor, tile_adapter: torch.Tensor) -> torch.Tensor:
    """(n, ...) adapters -> (tiles, ...), each tile's adapter, zeros for tiles without one."""
    return torch.cat((stacked, stacked.new_zeros((1, *stacked.shape[1:]))))[tile_adapter]


def mixed_term(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
               index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(term (M, N), S (M, r)): term[m] = S[m] B_i^T with S[m] = scaling[i] x[m] A_i^T (i =
    index[m]; zeros where i = -1), in the adapters' dtype; x (M, K) already in that dtype.
    Differentiable torch ops (the fallback under functorch transforms)."""
    M, K = x.shape
    n, N, r = lora_B.shape
    layout = tile_layout(index, n, tile_rows(M, n))
    A = per_tile(lora_A * scaling.to(lora_A.dtype)[:, None, None], layout.tile_adapter)  # (tiles, r, K)
    B = per_tile(lora_B, layout.tile_adapter)  # (tiles, N, r)
    tiled = x.index_select(0, layout.source).view(layout.tiles, layout.tile, K)
    S = torch.bmm(tiled, A.transpose(1, 2))  # (tiles, tile, r)
    term = torch.bmm(S, B.transpose(1, 2)).view(-1, N)
    return term.index_select(0, layout.position), S.view(-1, r).index_select(0, layout.position)


def forward(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
            index: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y += the mixed rank-r term in place; returns S (M, r) float32 (schema.py)."""
    term, S = mixed_term(x.to(lora_A.dtype), lora_A, lora_B, scaling, index)
    y.add_(term.to(y.dtype))
    return S.float()


def backward(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
             index: torch.Tensor, S: torch.Tensor, needs_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx or empty, dA, dB) of the mixed term (schema.py), each adapter's from its own rows."""
    M, K = x.shape
    n, N, r = lora_B.shape
    dtype = lora_A.dtype
    layout = tile_layout(index, n, tile_rows(M, n))
    shape = (layout.tiles, layout.tile)
    dy_tiles = dy.to(dtype).index_select(0, layout.source).mul_(layout.valid[:, None]).view(*shape, N)
    G = torch.bmm(dy_tiles, per_tile(lora_B * scaling.to(dtype)[:, None, None], layout.tile_adapter))  # (tiles, tile, r)
    x_tiles = x.to(dtype).index_select(0, layout.source).view(*shape, K)
    S_tiles = S.to(dtype).index_select(0, layout.source).view(*shape, r)
    dA = lora_A.new_zeros((n + 1, r, K)).index_add_(0, layout.tile_adapter, torch.bmm(G.transpose(1, 2), x_tiles))
    dB = lora_B.new_zeros((n + 1, N, r)).index_add_(0, layout.tile_adapter, torch.bmm(dy_tiles.transpose(1, 2), S_tiles))
    dx = empty_gradient(x, False)
    if needs_dx:
        dx = torch.bmm(G, per_tile(lora_A, layout.tile_adapter)).view(-1, K).index_select(0, layout.position).to(x.dtype)
    return dx, dA[:n], dB[:n]


torch.library.impl("fastlora::mixed_lora_fwd_torch", "CompositeExplicitAutograd")(forward)
torch.library.impl("fastlora::mixed_lora_bwd_torch", "CompositeExplicitAutograd")(backward)
