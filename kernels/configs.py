"""Autotuning configs for fastlora's kernels.

Under TRITON_INTERPRET=1 every factory returns one small config, so the autotuner never
times the numpy interpreter. On a GPU the lists are sized for the H100 (132 SMs, 228 KB of
shared memory per SM); ``prune_for_rank`` drops tiles whose rank-r epilogue would not fit.
"""

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(num_warps: int = 4, num_stages: int = 3, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def gemm_configs() -> list[triton.Config]:
    """Tiles for the (M x N, reduce over K) GEMMs with a rank-r epilogue (forward y, backward dx)."""
    if interpreting():
        return [_config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_stages=1)]
    return [
        _config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        _config(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        _config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        _config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        _config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        _config(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        _config(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
        _config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=3),
    ]


def rank_configs() -> list[triton.Config]:
    """Tiles for the thin rank-r kernels (S = drop(x) A^T, G = dy B with dB, dA = G^T drop(x))."""
    if interpreting():
        return [_config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_stages=1)]
    return [
        _config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
        _config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
        _config(BLOCK_M=32, BLOCK_N=256, BLOCK_K=256, num_warps=4, num_stages=3),
        _config(BLOCK_M=16, BLOCK_N=256, BLOCK_K=256, num_warps=4, num_stages=2),
    ]


def prune_for_rank(configs, named_args, **kwargs):
    """Keep configs whose fp32 rank-r tiles (BLOCK_M x R_PAD and BLOCK_N x R_PAD) stay small."""
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD", 16))
    limit = 128 * 64
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * r_pad <= limit and c.kwargs.get("BLOCK_N", 0) * r_pad <= 2 * limit]
    return kept or configs[-1:]
