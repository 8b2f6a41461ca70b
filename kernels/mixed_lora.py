"""Mixed batches on the GPU: the rank-r term of one adapter per row, as a gathered shrink and a
gathered expand (vLLM's lora_shrink / lora_expand, Punica's SGMV, in fastlora's tile layout),
and for training the per-adapter weight gradients.

Layout (fastlora/ops/mixed_layout.py): the rows sorted by adapter and each adapter's segment
padded to whole tiles of TILE positions, so that every tile belongs to one adapter;
``source[p]`` is the row at position p (padding positions repeat a row and have
``valid[p] = 0``), ``tile_adapter[t]`` the adapter of tile t (n: none), adapter i's tiles are
``tile_start[i] .. tile_start[i + 1] - 1``. Nothing is copied: the kernels gather rows and
scatter results through ``source``, so S and every output stay in the rows' order.

Forward:  S = s_i x A_i^T (shrink), y += S B_i^T (expand).
Backward: G = s_i dy B_i (the shrink with B^T for A), dx = G A_i (the expand with A^T for B,
          into zeros), dA_i = G_i^T x_i and dB_i^T = S_i^T dy_i (``mixed_grad_kernel``).
A stacked operand is read through strides, so "A" may be B^T and "B" may be A^T.

R_PAD is r rounded up to a power of two >= 16 (tl.dot's minimum), the padding lanes masked.
"""

import triton
import triton.language as tl


@triton.jit
def mixed_shrink_kernel(
    # pointers
    x_ptr, a_ptr, scale_ptr, source_ptr, valid_ptr, tile_adapter_ptr, s_ptr,
    # sizes
    K, R, ADAPTERS,
    # strides
    stride_xm, stride_xk,
    stride_an, stride_ar, stride_ak,
    stride_sm, stride_sr,
    # meta-parameters
    TILE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """S[source[p]] = scale_i * x[source[p]] A_i^T for the valid positions p of tile t (i =
    tile_adapter[t]), float32 over K (zeros for rows without an adapter). x (M, K), A (n, r, K)
    through its strides, S (M, r). Grid: (tiles,)."""
    tile = tl.program_id(0).to(tl.int64)
    offs_p = tile * TILE + tl.arange(0, TILE)
    adapter = tl.load(tile_adapter_ptr + tile + offs_p * 0).to(tl.int64)  # the tile's adapter, once per row
    has_adapter = adapter < ADAPTERS
    valid = tl.load(valid_ptr + offs_p) != 0
    first = tl.minimum(adapter, ADAPTERS - 1)  # an adapter index that is safe to read; masked off when none
    rows = tl.load(source_ptr + offs_p).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    a_base = a_ptr + tl.max(first, axis=0) * stride_an
    acc = tl.zeros((TILE, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(has_adapter & valid)[:, None] & mask_k[None, :], other=0.0)
        a_t = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                      mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(x.to(a_t.dtype), a_t, acc, input_precision=INPUT_PRECISION)
    scale = tl.load(scale_ptr + first)
    tl.store(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
             tl.where(has_adapter[:, None], acc * scale[:, None], 0.0), mask=valid[:, None] & mask_r[None, :])


@triton.jit
def mixed_expand_kernel(
    # pointers
    s_ptr, b_ptr, source_ptr, valid_ptr, tile_adapter_ptr, y_ptr,
    # sizes
    N, R, ADAPTERS,
    # strides
    stride_sm, stride_sr,
    stride_bn, stride_bo, stride_br,
    stride_ym, stride_yn,
    # meta-parameters
    TILE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """y[source[p]] += S[source[p]] B_i^T for the valid positions p of tile t (i =
    tile_adapter[t]), columns pid_n * BLOCK_N ...; S (M, r), B (n, N, r) through its strides,
    y (M, N). Each row is one valid position, so no two programs write the same element.
    Grid: (tiles, cdiv(N, BLOCK_N))."""
    tile = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_p = tile * TILE + tl.arange(0, TILE)
    adapter = tl.load(tile_adapter_ptr + tile + offs_p * 0).to(tl.int64)  # the tile's adapter, once per row
    valid = (tl.load(valid_ptr + offs_p) != 0) & (adapter < ADAPTERS)
    first = tl.max(tl.minimum(adapter, ADAPTERS - 1), axis=0)  # safe to read; rows masked off when none
    rows = tl.load(source_ptr + offs_p).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    b_t = tl.load(b_ptr + first * stride_bn + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bo,
                  mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=valid[:, None] & mask_r[None, :], other=0.0)
    term = tl.dot(s.to(b_t.dtype), b_t, input_precision=INPUT_PRECISION)
    y_tile = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    store_mask = valid[:, None] & mask_n[None, :]
    y = tl.load(y_tile, mask=store_mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + term).to(y_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def mixed_grad_kernel(
    # pointers
    lhs_ptr, rhs_ptr, source_ptr, valid_ptr, tile_start_ptr, grad_ptr,
    # sizes
    D, R,
    # strides
    stride_lm, stride_lr,
    stride_rm, stride_rd,
    stride_gn, stride_gr, stride_gd,
    # meta-parameters
    TILE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """grad[i, :, d] = sum over adapter i's rows m of lhs[m, :]^T rhs[m, d], columns pid_d *
    BLOCK_D ...: lhs (M, r) float32 (G or S), rhs (M, D) (x or dy), grad (n, r, D) through its
    strides (dA, or dB transposed), in grad's dtype; the products in grad's dtype, float32 sums.
    One program owns one adapter's block and walks its tiles in order: no atomics, the same
    sums every run. Grid: (n, cdiv(D, BLOCK_D))."""
    adapter = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    first_tile = tl.load(tile_start_ptr + adapter)
    end_tile = tl.load(tile_start_ptr + adapter + 1)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    for tile in range(first_tile, end_tile):
        offs_p = tile * TILE + tl.arange(0, TILE)
        valid = tl.load(valid_ptr + offs_p) != 0
        rows = tl.load(source_ptr + offs_p).to(tl.int64)
        lhs = tl.load(lhs_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                      mask=valid[:, None] & mask_r[None, :], other=0.0)
        rhs = tl.load(rhs_ptr + rows[:, None] * stride_rm + offs_d[None, :] * stride_rd,
                      mask=valid[:, None] & mask_d[None, :], other=0.0)
        operand = grad_ptr.dtype.element_ty
        acc = tl.dot(tl.trans(lhs.to(operand)), rhs.to(operand), acc, input_precision=INPUT_PRECISION)
    tl.store(grad_ptr + adapter * stride_gn + offs_r[:, None] * stride_gr + offs_d[None, :] * stride_gd,
             acc.to(grad_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])
