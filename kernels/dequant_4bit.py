"""Dequantize a bitsandbytes 4-bit weight (NF4 / FP4, nested absmax or not) into a dense one.

Layout (fastlora/ops/weight4bit.py): packed (ceil(n / 2),) uint8, value 2i in the high
nibble of byte i and 2i + 1 in the low one; absmax (blocks,) float32 (a nested absmax is
decoded before the launch, ``weight4bit.absmax_fp32``: a fused multiply-add here would round
differently from bitsandbytes); code (16,) float32. out (n,) in the compute dtype: value j =
code[nibble j] * absmax[j // QUANT_BLOCK], a float32 product rounded once (bitsandbytes'
dequantize_4bit, bit for bit). ``load_4bit_tile`` reads a W^T tile the same way inside a GEMM
(QLoRA's decode forward, kernels/lora_forward.py).

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
    QUANT_BLOCK: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    in_range = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=in_range, other=0)
    high = tl.load(code_ptr + (byte >> 4))
    low = tl.load(code_ptr + (byte & 15))
    block = offs // (QUANT_BLOCK // 2)  # both values of a byte lie in one block (block sizes are even)
    scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    values = tl.interleave(high * scale, low * scale)
    offs_out = pid * 2 * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
    tl.store(out_ptr + offs_out, values.to(out_ptr.dtype.element_ty), mask=offs_out < n_values)


@triton.jit
def load_4bit_tile(packed_ptr, absmax_ptr, code_ptr, k0, offs_n, N, K,
                   QUANT_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_K, len(offs_n)) float32 tile W^T[k0 : k0 + BLOCK_K, offs_n] of a 4-bit W
    (N, K), zero outside (K, N). K and k0 even: row n's values k0, k0 + 1 are the two nibbles
    of byte n K / 2 + k0 / 2, so the tile is BLOCK_K / 2 rows of bytes, unpacked and
    interleaved; value (n, k) is scaled by the absmax of block (n K + k) // QUANT_BLOCK."""
    offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask_n = offs_n < N
    mask_j = offs_j < K // 2
    byte = tl.load(packed_ptr + offs_n[None, :] * (K // 2) + offs_j[:, None],
                   mask=mask_j[:, None] & mask_n[None, :], other=0)
    high = tl.load(code_ptr + (byte >> 4))
    low = tl.load(code_ptr + (byte & 15))
    values = tl.reshape(tl.permute(tl.join(high, low), (0, 2, 1)), (BLOCK_K, offs_n.shape[0]))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    inside = (offs_k < K)[:, None] & mask_n[None, :]
    flat = offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    scale = tl.load(absmax_ptr + flat // QUANT_BLOCK, mask=inside, other=0.0)
    return tl.where(inside, values * scale, 0.0)
