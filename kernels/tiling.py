"""Program-id to output-tile mapping shared by the GEMM kernels."""

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
