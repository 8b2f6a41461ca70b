"""The tile layout of a mixed batch (one adapter per row): every backend but cpp computes on it.

The rows are sorted by adapter (on the device) and laid out in tiles of T positions, each
adapter's segment padded to whole tiles, so every tile belongs to one adapter; the rows
without an adapter (index -1) form a last segment, "adapter n". Padding positions repeat row
0 and are marked invalid. The layout's size is known from M, n and T alone (at most
M + (n + 1)(T - 1) positions), so building it never waits on the device and a traced graph
has static shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MAX_TILE_ROWS = 64


class TileLayout(NamedTuple):
    """position (M,): row m's position; tile_adapter (tiles,): each tile's adapter (n: none);
    source (tiles * T,): the row at each position; valid (tiles * T,) uint8: 1 where not padding;
    tile_start (n + 1,): adapter i's tiles are tile_start[i] .. tile_start[i + 1] - 1."""

    position: torch.Tensor
    tile_adapter: torch.Tensor
    source: torch.Tensor
    valid: torch.Tensor
    tile_start: torch.Tensor
    tile: int
    tiles: int


def tile_rows(rows: int, adapters: int) -> int:
    """T: rows per tile for ``rows`` rows over ``adapters`` adapters (and the no-adapter segment)."""
    return max(1, min(MAX_TILE_ROWS, rows // (adapters + 1)))


def tile_layout(index: torch.Tensor, adapters: int, tile: int) -> TileLayout:
    """The layout of rows whose adapters are ``index`` (M,) (-1: none) over ``adapters`` adapters
    in tiles of ``tile`` positions, all on the index's device."""
    device = index.device
    rows = index.numel()
    segment = torch.where(index < 0, adapters, index).long()
    counts = torch.zeros(adapters + 1, dtype=torch.long, device=device).scatter_add_(
        0, segment, torch.ones_like(segment))  # bincount, with a size known before it runs
    padded = (counts + tile - 1) // tile * tile
    start = torch.cumsum(counts, 0) - counts
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(segment, stable=True)
    sorted_segment = segment[order]
    rank = torch.arange(rows, device=device) - start[sorted_segment]
    position = torch.empty_like(order)
    position[order] = padded_end[sorted_segment] - padded[sorted_segment] + rank
    tiles = -(-(rows + (adapters + 1) * (tile - 1)) // tile)
    first_positions = torch.arange(tiles, device=device) * tile
    tile_adapter = torch.searchsorted(padded_end, first_positions, right=True).clamp_(max=adapters)
    source = torch.zeros(tiles * tile, dtype=torch.long, device=device).index_copy_(
        0, position, torch.arange(rows, device=device))
    valid = torch.zeros(tiles * tile, dtype=torch.uint8, device=device).index_fill_(0, position, 1)
    tile_start = (padded_end - padded) // tile
    return TileLayout(position, tile_adapter, source, valid, tile_start, tile, tiles)
