"""Tile helpers shared by the kernels: program-id to output-tile order, masked 2-D loads and stores."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """(row tile, column tile) of program ``pid`` over a (rows x cols) output, visiting GROUP row
    tiles per column sweep so that neighbouring programs reuse the same column tiles in L2."""
    num_row_tiles = tl.cdiv(rows, BLOCK_ROWS)
    num_col_tiles = tl.cdiv(cols, BLOCK_COLS)
    group_size = GROUP * num_col_tiles
    first_row = (pid // group_size) * GROUP
    group_rows = tl.minimum(num_row_tiles - first_row, GROUP)
    return first_row + (pid % group_size) % group_rows, (pid % group_size) // group_rows


@triton.jit
def load_tile(ptr, offs_a, offs_b, stride_a, stride_b, mask_a, mask_b):
    """The (len(offs_a), len(offs_b)) tile at ptr[offs_a * stride_a + offs_b * stride_b], zero
    outside mask_a x mask_b (ragged edges and rank padding)."""
    return tl.load(
        ptr + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b,
        mask=mask_a[:, None] & mask_b[None, :], other=0.0,
    )


@triton.jit
def store_tile(ptr, value, offs_a, offs_b, stride_a, stride_b, mask_a, mask_b):
    """Store ``value`` at ptr[offs_a * stride_a + offs_b * stride_b] inside mask_a x mask_b."""
    tl.store(ptr + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b, value, mask=mask_a[:, None] & mask_b[None, :])
