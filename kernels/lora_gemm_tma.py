"""The big GEMMs on TMA tensor descriptors with a persistent tile loop (Hopper's fast path).

One kernel serves both GEMMs of the layer:

    forward  y  (M, N) = x  (M, K) W^T + b + (s S) B^T          A_op = x,  B_op = W (N, K)
    backward dx (M, K) = dy (M, N) W   + (s G) A * keep/(1-p)   A_op = dy, B_op = W (N, K)^T

written generically as C (M, C) = A_op (M, red) B_op + epilogue, with B_op read from a
descriptor over W as stored: ``B_TRANSPOSED`` when its tiles are (C-block, red-block) and
enter the MMA transposed (forward with W (N, K); dx with a fan_in_fan_out W (K, N)).
Epilogue: the rank-r term L R with L (M, r) float32 (S or G) scaled by ``scaling`` and R
(r, C) (B^T or A, read with strides), in rank chunks of R_CHUNK (``tiling.rank_term``: the
epilogue's tiles stay the same size for any r): more MMAs into the same float32
accumulator after the main loop, or, with dropout, before it, masked by the forward's keep
bits, so that one accumulator tile is ever live; DoRA's per-column scale (forward only);
bias; one TMA store.

Persistent: grid = min(NUM_SMS, #tiles) programs, each looping over output tiles in GROUP_M
order (``tiling.grouped_tile``). TMA needs 16-byte aligned base pointers and row strides; the
launcher sends other shapes to the pointer-load kernels.
"""

import triton
import triton.language as tl

from fastlora.kernels.dropout import load_keep
from fastlora.kernels.tiling import grouped_tile, rank_term


@triton.jit(do_not_specialize=["M"])
def lora_gemm_tma_kernel(
    # descriptors and pointers
    a_desc, b_desc, c_desc, l_ptr, r_ptr, scale_ptr, bias_ptr, bits_ptr,
    # sizes
    M, C, RED, R,
    # strides
    stride_lm, stride_lr,
    stride_rr, stride_rc,
    stride_bitsm,
    # scalars
    scaling, dropout_p,
    # meta-parameters
    B_TRANSPOSED: tl.constexpr,
    HAS_COLUMN_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr,
    R_CHUNK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ADAPTER_PRECISION: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[m-block, c-block] = (A_op B_op + scaling * L R (* keep / (1 - p))) (* column scale)
    (+ bias), fp32 accumulation.

    Descriptor blocks: a_desc (BLOCK_M, BLOCK_K); b_desc (BLOCK_N, BLOCK_K) if B_TRANSPOSED else
    (BLOCK_K, BLOCK_N); c_desc (BLOCK_M, BLOCK_N). L (M, R) float32, R (R, C), column scale (C,)
    float32 (DoRA's m / ||W + s B A||, HAS_COLUMN_SCALE), bias (C,),
    bits (M, ceil(C / 8)) uint8. Grid: (min(NUM_SMS, #tiles),).
    """
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(C, BLOCK_N)
    reduction_steps = tl.cdiv(RED, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_c = grouped_tile(tile, M, C, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_c = pid_c * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_c = off_c + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_c = offs_c < C
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_DROPOUT:
            # the masked rank-r term starts the accumulator, so one (BLOCK_M, BLOCK_N) float32
            # tile is live, not two (a second one spilled registers at 128 x 256: sm90_check)
            acc = rank_term(acc, l_ptr, r_ptr, offs_m, offs_c, mask_m, mask_c, R, stride_lm, stride_lr,
                            stride_rr, stride_rc, scaling, ADAPTER_PRECISION, R_PAD, R_CHUNK)
            keep = load_keep(bits_ptr, offs_m, off_c, M, C, stride_bitsm, BLOCK_N)
            acc = tl.where(keep, acc * (1.0 / (1.0 - dropout_p)), 0.0)
        for step in range(reduction_steps):
            a = a_desc.load([off_m, step * BLOCK_K])
            if B_TRANSPOSED:
                acc = tl.dot(a, b_desc.load([off_c, step * BLOCK_K]).T, acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(a, b_desc.load([step * BLOCK_K, off_c]), acc, input_precision=INPUT_PRECISION)
        if not HAS_DROPOUT:  # no mask: the rank-r term is more MMAs into the accumulator
            acc = rank_term(acc, l_ptr, r_ptr, offs_m, offs_c, mask_m, mask_c, R, stride_lm, stride_lr,
                            stride_rr, stride_rc, scaling, ADAPTER_PRECISION, R_PAD, R_CHUNK)
        if HAS_COLUMN_SCALE:
            acc = acc * tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        c_desc.store([off_m, off_c], acc.to(c_desc.dtype))
