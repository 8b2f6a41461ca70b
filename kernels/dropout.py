"""The dropout keep-mask shared by every kernel: Philox on the element's logical index."""

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, dropout_p):
    """Keep-mask (BLOCK_M, BLOCK_K) for x's elements (offs_m, offs_k) of an (M, K) input.

    Element (m, k) keeps iff tl.rand(seed, m * K + k) >= dropout_p, so the mask depends only
    on the seed and the logical index (not on x's strides or the tile sizes), and the C++
    backend reproduces it bit for bit.
    """
    offsets = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    return tl.rand(seed, offsets) >= dropout_p
