"""Backward kernels (W frozen: no dW, ever).

Shapes: dy (M, N); B (N, r); S (M, r) float32; G = dy B (M, r) float32; W (N, K) (strides
swapped for fan_in_fan_out); A (r, K); x (M, K) any strides; dx (M, K); dA (r, K); dB (N, r)
and dbias (N,) accumulated in float32 buffers.
"""

import triton
import triton.language as tl

from fastlora.kernels.dropout import load_keep
from fastlora.kernels.tiling import grouped_tile, load_tile, rank_term, store_tile


@triton.jit(do_not_specialize=["M", "SPLIT_N", "stride_gs"])
def lora_grad_output_kernel(
    # pointers
    dy_ptr, b_ptr, s_ptr, g_ptr, db_ptr, dbias_ptr,
    # sizes
    M, N, R, SPLIT_N,
    # strides
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_gs, stride_gm, stride_gr,
    stride_dbn, stride_dbr,
    # scalars
    scaling,
    # meta-parameters
    NEEDS_G: tl.constexpr,
    NEEDS_DB: tl.constexpr,
    NEEDS_DBIAS: tl.constexpr,
    R_PAD: tl.constexpr,
    ADAPTER_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One read of dy's m-block gives G = dy B (stored) and its share of dB = s dy^T S and of
    dbias = sum_m dy (added into float32 buffers by relaxed atomics: nothing reads them before
    the kernel ends, so no ordering is needed; their order, and so the last bits of dB and
    dbias, vary between runs; deterministic mode computes them without atomics instead).

    Grid: (cdiv(M, BLOCK_M), SPLIT_N): program (m, s) reads the column blocks s, s + SPLIT_N,
    ... of dy and writes its partial G to G[s] (G is (SPLIT_N, M, r); the launcher sums the
    partials in a fixed order when SPLIT_N > 1), so that narrow M still fills every SM.
    BLOCK_K is unused here (shared config list).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    adapter_dtype = b_ptr.dtype.element_ty
    if NEEDS_DB:
        s = load_tile(s_ptr, offs_m, offs_r, stride_sm, stride_sr, mask_m, mask_r).to(adapter_dtype)
    g = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(pid_s * BLOCK_N, N, SPLIT_N * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, mask_m, mask_n)
        if NEEDS_G:
            b = load_tile(b_ptr, offs_n, offs_r, stride_bn, stride_br, mask_n, mask_r)
            g = tl.dot(dy.to(adapter_dtype), b, g, input_precision=ADAPTER_PRECISION)
        if NEEDS_DB:
            db = tl.dot(tl.trans(dy.to(adapter_dtype)), s, input_precision=ADAPTER_PRECISION)
            tl.atomic_add(
                db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                db * scaling, mask=mask_n[:, None] & mask_r[None, :], sem="relaxed",
            )
        if NEEDS_DBIAS:
            tl.atomic_add(dbias_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0), mask=mask_n, sem="relaxed")
    if NEEDS_G:
        store_tile(g_ptr + pid_s * stride_gs, g, offs_m, offs_r, stride_gm, stride_gr, mask_m, mask_r)


@triton.jit(do_not_specialize=["M"])
def lora_grad_input_kernel(
    # pointers
    dy_ptr, w_ptr, g_ptr, a_ptr, dx_ptr, bits_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_gm, stride_gr,
    stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    stride_bitsm,
    # scalars
    scaling, dropout_p,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr,
    R_CHUNK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ADAPTER_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx[m-block, k-block] = dy W + scaling * (G A) * mask / (1 - p), the rank-r term (in rank
    chunks of R_CHUNK) with the forward's keep-mask read from its bits.

    Grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_N),): here the output tile is BLOCK_M x BLOCK_N
    over dx's K columns, and BLOCK_K tiles the reduction over N.
    """
    pid_m, pid_k = grouped_tile(tl.program_id(0).to(tl.int64), M, K, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K

    # the rank-r term starts the accumulator (masked with dropout), so one (BLOCK_M, BLOCK_N)
    # float32 tile is live through the loop, not two
    acc = rank_term(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), g_ptr, a_ptr, offs_m, offs_k, mask_m, mask_k, R,
                    stride_gm, stride_gr, stride_ar, stride_ak, scaling, ADAPTER_PRECISION, R_PAD, R_CHUNK)
    if HAS_DROPOUT:
        keep = load_keep(bits_ptr, offs_m, pid_k * BLOCK_N, M, K, stride_bitsm, BLOCK_N)
        acc = tl.where(keep, acc * (1.0 / (1.0 - dropout_p)), 0.0)
    for n0 in range(0, N, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, mask_m, mask_n)
        w = load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, mask_n, mask_k)
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
    store_tile(dx_ptr, acc.to(dx_ptr.dtype.element_ty), offs_m, offs_k, stride_dxm, stride_dxk, mask_m, mask_k)


@triton.jit(do_not_specialize=["M", "SPLIT_M"])
def lora_grad_a_kernel(
    # pointers
    g_ptr, x_ptr, a_ptr, partial_ptr, bits_ptr,
    # sizes
    M, K, R, SPLIT_M,
    # strides
    stride_gm, stride_gr,
    stride_xm, stride_xk,
    stride_ps, stride_pr, stride_pk,
    stride_bitsm,
    # scalars
    scaling, dropout_p,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr,
    ADAPTER_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """partial[s, :, k-block] = scaling * G^T drop(x)[:, k-block] over the row blocks s,
    s + SPLIT_M, s + 2 SPLIT_M, ... (float32); dA = sum over s, reduced by the launcher in a
    fixed order (deterministic). The keep-mask is read from the forward's bits. a_ptr (A) only
    gives the adapters' dtype. The same reduction gives dB^T = s S^T dy in deterministic mode
    (g_ptr = S, x_ptr = dy, no dropout).

    Grid: (cdiv(K, BLOCK_K), SPLIT_M): the split over M fills every SM when K is narrow.
    BLOCK_N is unused here.
    """
    pid_k = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_k = offs_k < K
    mask_r = offs_r < R
    adapter_dtype = a_ptr.dtype.element_ty  # A itself is not read: the product runs in its dtype
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, SPLIT_M * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        g_t = load_tile(g_ptr, offs_r, offs_m, stride_gr, stride_gm, mask_r, mask_m)
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        if HAS_DROPOUT:
            x = tl.where(load_keep(bits_ptr, offs_m, pid_k * BLOCK_K, M, K, stride_bitsm, BLOCK_K), x, 0.0)
        acc = tl.dot(g_t.to(adapter_dtype), x.to(adapter_dtype), acc, input_precision=ADAPTER_PRECISION)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    store_tile(partial_ptr + pid_s * stride_ps, acc * scaling, offs_r, offs_k, stride_pr, stride_pk, mask_r, mask_k)
