"""Forward kernels: S = drop(x) A^T, then y = x W^T + b + s * S B^T in one pass over y
(DoRA without dropout: y = g * (x W^T + s * S B^T) + b, the same pass with a column scale).

Shapes: x (M, K) with any strides; A (r, K); W (N, K) (a (K, N) fan_in_fan_out weight is the
same W read with swapped strides); B (N, r); b (N,); S (M, r) float32; y (M, N).
R_PAD is r rounded up to a power of two >= 16 (tl.dot's minimum); the padding lanes are
masked loads, never copies of A or B.
"""

import triton
import triton.language as tl

from fastlora.kernels.dequant_4bit import load_4bit_tile
from fastlora.kernels.dropout import draw_keep, store_keep
from fastlora.kernels.tiling import grouped_tile, load_tile, rank_term, store_tile


@triton.jit(do_not_specialize=["M", "SPLIT_K", "stride_ss"])
def lora_shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, seed_ptr, bits_ptr,
    # sizes
    M, K, R, SPLIT_K,
    # strides
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_ss, stride_sm, stride_sr,
    stride_bitsm,
    # scalars
    dropout_p,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """S[m-block, :] = drop(x)[m-block, :] A^T, accumulated in float32 over K; with dropout the
    keep-mask is drawn here, once, and stored as bits (M, ceil(K / 8)) for the backward.

    Grid: (cdiv(M, BLOCK_M), SPLIT_K): program (m, s) takes the column blocks s, s + SPLIT_K,
    s + 2 SPLIT_K, ... and writes its partial sum to S[s] (S is (SPLIT_K, M, r); the launcher
    sums the partials in a fixed order when SPLIT_K > 1), so that narrow M still fills every
    SM. BLOCK_N is unused here (shared config list).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(pid_s * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        if HAS_DROPOUT:
            keep = draw_keep(seed, offs_m, k0, K, dropout_p, BLOCK_K)
            store_keep(bits_ptr, keep, offs_m, k0, M, K, stride_bitsm, BLOCK_K)
            x = tl.where(keep, x, 0.0)
        a_t = load_tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, mask_k, mask_r)
        acc = tl.dot(x.to(a_t.dtype), a_t, acc, input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    store_tile(s_ptr + pid_s * stride_ss, acc, offs_m, offs_r, stride_sm, stride_sr, mask_m, mask_r)


@triton.jit(do_not_specialize=["M"])
def lora_forward_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, s_ptr, b_ptr, scale_ptr, y_ptr, wq_ptr, absmax_ptr, code_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    # scalars
    scaling,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_COLUMN_SCALE: tl.constexpr,
    FUSED_SHRINK: tl.constexpr,
    W_4BIT: tl.constexpr,
    QUANT_BLOCK: tl.constexpr,
    R_PAD: tl.constexpr,
    R_CHUNK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ADAPTER_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[m-block, n-block] = (x W^T + scaling * S B^T) (* column scale) + b, float32
    accumulation, one store; the column scale (N,) float32 is DoRA's m / ||W + s B A||
    (HAS_COLUMN_SCALE).

    S (M, r) float32 is read from s_ptr (its term, in rank chunks of R_CHUNK, starts the
    accumulator), or, with FUSED_SHRINK (no dropout, r <= 64: the decode path's single
    launch), accumulated here as x A^T from the same x tiles as the main product and stored
    by the programs of the first column block.

    With W_4BIT (QLoRA's decode forward) W is not read from w_ptr but dequantized tile by
    tile from a bitsandbytes 4-bit weight (packed bytes wq_ptr, float32 absmax per QUANT_BLOCK
    values, the 16-entry code; K even; kernels/dequant_4bit.load_4bit_tile): a quarter of the
    bytes of a bf16 W, which is what a decode-sized GEMM is bound by.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), programs grouped GROUP_M rows at a time so
    neighbouring programs share W tiles in L2.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0).to(tl.int64), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if not FUSED_SHRINK:  # S is known: the rank-r term starts the accumulator (one tile live)
        acc = rank_term(acc, s_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, R, stride_sm, stride_sr,
                        stride_br, stride_bn, scaling, ADAPTER_PRECISION, R_PAD, R_CHUNK)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        if W_4BIT:
            w_t = load_4bit_tile(wq_ptr, absmax_ptr, code_ptr, k0, offs_n, N, K, QUANT_BLOCK, BLOCK_K).to(x.dtype)
        else:
            w_t = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, mask_k, mask_n)
        acc = tl.dot(x, w_t, acc, input_precision=INPUT_PRECISION)
        if FUSED_SHRINK:
            a_t = load_tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, mask_k, mask_r)
            s = tl.dot(x.to(a_t.dtype), a_t, s, input_precision=ADAPTER_PRECISION)

    if FUSED_SHRINK:
        if pid_n == 0:
            store_tile(s_ptr, s, offs_m, offs_r, stride_sm, stride_sr, mask_m, mask_r)
        b_t = load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, mask_r, mask_n)
        acc = tl.dot((scaling * s).to(b_t.dtype), b_t, acc, input_precision=ADAPTER_PRECISION)
    if HAS_COLUMN_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    store_tile(y_ptr, acc.to(y_ptr.dtype.element_ty), offs_m, offs_n, stride_ym, stride_yn, mask_m, mask_n)
