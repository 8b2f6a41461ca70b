"""Dequantize a bitsandbytes 4-bit weight (NF4 / FP4, nested absmax or not) into a dense one.

Layout (fastlora/ops/weight4bit.py): packed (ceil(n / 2),) uint8, value 2i in the high
nibble of byte i and 2i + 1 in the low one; absmax (blocks,) float32 (a nested absmax is
decoded before the launch, ``weight4bit.absmax_fp32``: a fused multiply-add here would round
differently from bitsandbytes); code (16,) float32. out (n,) in the compute dtype: value j =
code[nibble j] * absmax[j // BLOCKSIZE], a float32 product rounded once (bitsandbytes'
dequantize_4bit, bit for bit).

Each program turns BLOCK_BYTES bytes into 2 * BLOCK_BYTES values. Memory-bound: n / 2 bytes
read, n * elem bytes written, n / BLOCKSIZE float32 absmax read; the code table stays in L1.
"""

import triton
import triton.language as tl


@triton.jit
def dequant_4bit_kernel(
    # pointers
    packed_ptr, absmax_ptr, code_ptr, out_ptr,
    # sizes
    n_bytes, n_values,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    in_range = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=in_range, other=0)
    high = tl.load(code_ptr + (byte >> 4))
    low = tl.load(code_ptr + (byte & 15))
    block = offs // (BLOCKSIZE // 2)  # both values of a byte lie in one block (block sizes are even)
    scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    values = tl.interleave(high * scale, low * scale)
    offs_out = pid * 2 * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
    tl.store(out_ptr + offs_out, values.to(out_ptr.dtype.element_ty), mask=offs_out < n_values)
