"""The dropout keep-mask shared by every kernel: drawn once, four Philox words a call, kept as bits.

Element (m, k) of an (M, K) input keeps iff uniform(word k % 4 of randint4x(seed, counter))
>= p with counter = m * ceil(K / 4) + k // 4 (the C++ backend's csrc/philox.h draws the same).
The mask depends only on the seed and (m, k), never on strides or tile sizes. The forward's
shrink kernel draws it and stores it as bits, (M, ceil(K / 8)) uint8, bit k % 8 of byte
[m, k // 8]; the backward kernels read the bits back.
"""

import triton
import triton.language as tl


@triton.jit
def draw_keep(seed, offs_m, k0, K, dropout_p, BLOCK_K: tl.constexpr):
    """Keep-mask (BLOCK_M, BLOCK_K) of elements (offs_m, k0 + arange(BLOCK_K)); k0 % 4 == 0.

    One randint4x call per four elements: the four words are interleaved back into column order.
    """
    counters = offs_m[:, None].to(tl.int64) * tl.cdiv(K, 4) + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    k_0 = tl.random.uint_to_uniform_float(w0) >= dropout_p
    k_1 = tl.random.uint_to_uniform_float(w1) >= dropout_p
    k_2 = tl.random.uint_to_uniform_float(w2) >= dropout_p
    k_3 = tl.random.uint_to_uniform_float(w3) >= dropout_p
    # join(join(a, c), join(b, d))[..., i, j] is (a, b, c, d)[2 i + j]: words 0..3 in order
    interleaved = tl.join(tl.join(k_0, k_2), tl.join(k_1, k_3))
    return tl.reshape(interleaved, (offs_m.shape[0], BLOCK_K))


@triton.jit
def pack_keep(keep, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) booleans -> (BLOCK_M, BLOCK_K // 8) uint8, bit j of byte b = keep[:, 8 b + j]."""
    groups = tl.reshape(keep.to(tl.int32), (keep.shape[0], BLOCK_K // 8, 8))
    weights = (1 << tl.arange(0, 8))[None, None, :]
    return tl.sum(groups * weights, axis=2).to(tl.uint8)


@triton.jit
def unpack_keep(bytes_, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K // 8) uint8 -> (BLOCK_M, BLOCK_K) booleans (the inverse of pack_keep)."""
    bits = (bytes_.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (bytes_.shape[0], BLOCK_K)) != 0


@triton.jit
def load_keep(bits_ptr, offs_m, k0, M, K, stride_bm, BLOCK_K: tl.constexpr):
    """The keep-mask (BLOCK_M, BLOCK_K) of columns k0 + arange(BLOCK_K) (k0 % 8 == 0), from bits."""
    offs_byte = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask = (offs_m < M)[:, None] & (offs_byte < tl.cdiv(K, 8))[None, :]
    bytes_ = tl.load(bits_ptr + offs_m[:, None] * stride_bm + offs_byte[None, :], mask=mask, other=0)
    return unpack_keep(bytes_, BLOCK_K)


@triton.jit
def store_keep(bits_ptr, keep, offs_m, k0, M, K, stride_bm, BLOCK_K: tl.constexpr):
    """Store the keep-mask (BLOCK_M, BLOCK_K) of columns k0 + arange(BLOCK_K) (k0 % 8 == 0) as bits."""
    offs_byte = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask = (offs_m < M)[:, None] & (offs_byte < tl.cdiv(K, 8))[None, :]
    tl.store(bits_ptr + offs_m[:, None] * stride_bm + offs_byte[None, :], pack_keep(keep, BLOCK_K), mask=mask)
