"""Tile helpers shared by the kernels: program-id to output-tile order, masked 2-D loads and
stores, and the GEMMs' rank-r epilogue term in rank chunks."""

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


@triton.jit
def rank_term(acc, l_ptr, r_ptr, offs_m, offs_c, mask_m, mask_c, R, stride_lm, stride_lr, stride_rr, stride_rc,
              scaling, PRECISION: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr):
    """acc + scaling * L[offs_m, :R] R[:R, offs_c] in float32, over rank chunks of R_CHUNK (a
    loop, so one chunk's tiles are live at a time whatever r is). L is float32 (S or G); the
    product runs in R's dtype (the adapters')."""
    for r0 in range(0, R_PAD, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        mask_r = offs_r < R
        right = load_tile(r_ptr, offs_r, offs_c, stride_rr, stride_rc, mask_r, mask_c)
        left = (scaling * load_tile(l_ptr, offs_m, offs_r, stride_lm, stride_lr, mask_m, mask_r)).to(right.dtype)
        acc = tl.dot(left, right, acc, input_precision=PRECISION)
    return acc
