"""Mixed batches on the GPU: the rank-r term of one adapter per row, as a gathered shrink and a
gathered expand (vLLM's lora_shrink / lora_expand, Punica's SGMV, in fastlora's tile layout).

Layout (fastlora/ops/multi_lora.tile_layout): the rows sorted by adapter and each adapter's
segment padded to whole tiles of TILE positions, so that every tile belongs to one adapter;
``source[p]`` is the row of x at position p (padding positions repeat a row and have
``valid[p] = 0``), ``tile_adapter[t]`` the adapter of tile t (n: none). Nothing is copied: the
kernels gather x's rows and scatter into y's through ``source``.

Shapes: x (M, K); A (n, r, K); B (n, N, r); scale (n,) float32; S (positions, r) float32;
y (M, N), holding x W^T + b, to which the term is added. R_PAD is r rounded up to a power of
two >= 16 (tl.dot's minimum), the padding lanes masked loads.
"""

import triton
import triton.language as tl


@triton.jit
def mixed_shrink_kernel(
    # pointers
    x_ptr, a_ptr, scale_ptr, source_ptr, tile_adapter_ptr, s_ptr,
    # sizes
    K, R, ADAPTERS,
    # strides
    stride_xm, stride_xk,
    stride_an, stride_ar, stride_ak,
    stride_sp, stride_sr,
    # meta-parameters
    TILE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """S[tile t] = scale_i * x[source[tile t]] A_i^T, i = tile_adapter[t], float32 over K
    (zeros for tiles without an adapter). Grid: (tiles,)."""
    tile = tl.program_id(0).to(tl.int64)
    offs_p = tile * TILE + tl.arange(0, TILE)
    adapter = tl.load(tile_adapter_ptr + tile + offs_p * 0).to(tl.int64)  # the tile's adapter, once per row
    has_adapter = adapter < ADAPTERS
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
                    mask=has_adapter[:, None] & mask_k[None, :], other=0.0)
        a_t = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                      mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(x.to(a_t.dtype), a_t, acc, input_precision=INPUT_PRECISION)
    scale = tl.load(scale_ptr + first)
    tl.store(s_ptr + offs_p[:, None] * stride_sp + offs_r[None, :] * stride_sr,
             tl.where(has_adapter[:, None], acc * scale[:, None], 0.0), mask=mask_r[None, :])


@triton.jit
def mixed_expand_kernel(
    # pointers
    s_ptr, b_ptr, source_ptr, valid_ptr, tile_adapter_ptr, y_ptr,
    # sizes
    N, R, ADAPTERS,
    # strides
    stride_sp, stride_sr,
    stride_bn, stride_bo, stride_br,
    stride_ym, stride_yn,
    # meta-parameters
    TILE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """y[source[p]] += S[p] B_i^T for the valid positions p of tile t (i = tile_adapter[t]),
    columns pid_n * BLOCK_N ...; each row is one valid position, so no two programs write the
    same element. Grid: (tiles, cdiv(N, BLOCK_N))."""
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
    s = tl.load(s_ptr + offs_p[:, None] * stride_sp + offs_r[None, :] * stride_sr,
                mask=valid[:, None] & mask_r[None, :], other=0.0)
    term = tl.dot(s.to(b_t.dtype), b_t, input_precision=INPUT_PRECISION)
    y_tile = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    store_mask = valid[:, None] & mask_n[None, :]
    y = tl.load(y_tile, mask=store_mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + term).to(y_ptr.dtype.element_ty), mask=store_mask)
