"""DoRA's weight norm: n[n] = ||W[n, :] + s * B[n, :] A|| for a block of output rows per program.

Shapes: W (N, K) read through (stride_wn, stride_wk), so a (K, N) fan_in_fan_out weight is
the same kernel with swapped strides; A (r, K); B (N, r); n (N,) float32. Each program owns
BLOCK_N rows: for every K tile it forms W + s * B A (the rank-r product in BLOCK_R-wide
chunks, fp32 accumulation) in registers and adds the squares to a (BLOCK_N,) running sum.
W is read once; nothing of size N x K is written. Memory-bound: N * K * elem bytes of W.
"""

import triton
import triton.language as tl


@triton.jit
def dora_norm_kernel(
    # pointers
    w_ptr, a_ptr, b_ptr, norm_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    # scalars
    scaling,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    sum_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        col_ok = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            rank_ok = offs_r < R
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            delta = tl.dot(b, a, delta, input_precision=INPUT_PRECISION)
        v = w.to(tl.float32) + scaling * delta
        sum_sq += tl.sum(v * v, axis=1)
    tl.store(norm_ptr + offs_n, tl.sqrt(sum_sq), mask=row_ok)
