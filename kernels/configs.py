"""Launch configs for fastlora's kernels: a short ordered list per kernel and shape class.

The launcher (fastlora/ops/launcher.py) tries them in order and keeps the first that runs
(or, with FASTLORA_AUTOTUNE=1, the fastest). Each list starts with the config measured best
on an H100 (../shared/gpu: 128x256x64, 8 warps, 3 stages for large GEMMs) and ends with a
small config that fits the shared memory of any supported GPU. Under TRITON_INTERPRET=1
every factory returns one small config, so nothing is tried twice on the CPU.
"""

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(BLOCK_M: int, BLOCK_N: int, BLOCK_K: int, num_warps: int, num_stages: int,
            GROUP_M: int | None = None) -> triton.Config:
    """A config; GROUP_M (the GEMMs' tile order) only for the GEMM kernels."""
    blocks = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}
    if GROUP_M is not None:
        blocks["GROUP_M"] = GROUP_M
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# fits every GPU fastlora runs on, in any dtype: 2 x (32 + 32) x 32 x 4 bytes + the output tile
_SAFE_GEMM = _config(32, 32, 32, num_warps=4, num_stages=2, GROUP_M=1)
_SAFE_RANK = _config(16, 32, 32, num_warps=4, num_stages=1)


def gemm_configs(M: int, r_pad: int = 16, adapter_bytes: int = 2, pointer: bool = False,
                 four_bit: bool = False) -> list[triton.Config]:
    """Tiles for the (M x N, reduce over K) GEMMs with a rank-r epilogue (forward y, backward dx).

    M <= 64 (decode): one rule, thin row tiles and many column tiles so that every SM streams W.
    Large M: the epilogue runs in rank chunks of 16 (kernels/tiling.rank_term), so its
    tiles do not grow with r. The TMA kernel keeps 128 x 256 x 64 in 3 stages (measured best on
    an H100); the pointer-load kernels (``pointer``), which stage their tiles differently, take
    2; float32 adapters double the epilogue's tiles, so they start at 128 x 128. Each list's
    first config compiles for sm_90 within 227 KB and without register spills in every variant
    that launches, r = 16 ... 512 (benchmarks/sm90_check.py; tests/test_sm90_compile.py).
    ``four_bit``: the decode forward that dequantizes a 4-bit W in its main loop, whose
    unpacking and absmax gathers need registers: 16 x 64 x 32 compiles without spills on
    Triton 3.6 (168 / 128 registers at r = 16 / 64) and 3.9 (128 / 112); 16 x 64 x 64 spills
    152 bytes on Triton 3.6 at r = 16, 16 x 32 x 256 on both.
    """
    if interpreting():
        return [_config(16, 32, 32, num_warps=4, num_stages=1, GROUP_M=4)]
    if four_bit and M <= 64:
        return [_config(16, 64, 32, num_warps=4, num_stages=4, GROUP_M=1), _SAFE_GEMM]
    if M <= 16:
        return [_config(16, 32, 256, num_warps=4, num_stages=4, GROUP_M=1), _SAFE_GEMM]
    if M <= 64:
        return [_config(64, 64, 128, num_warps=4, num_stages=4, GROUP_M=1), _SAFE_GEMM]
    if M <= 512:
        return [
            _config(64, 128, 64, num_warps=4, num_stages=4, GROUP_M=8),
            _config(128, 128, 64, num_warps=8, num_stages=3, GROUP_M=8),
            _config(64, 64, 64, num_warps=4, num_stages=4, GROUP_M=8),
            _SAFE_GEMM,
        ]
    if adapter_bytes > 2:
        return [
            _config(128, 128, 64, num_warps=8, num_stages=3, GROUP_M=8),
            _config(128, 128, 64, num_warps=8, num_stages=2, GROUP_M=8),
            _SAFE_GEMM,
        ]
    if pointer:
        return [
            _config(128, 256, 64, num_warps=8, num_stages=2, GROUP_M=8),
            _config(128, 128, 64, num_warps=8, num_stages=4, GROUP_M=8),
            _SAFE_GEMM,
        ]
    return [
        _config(128, 256, 64, num_warps=8, num_stages=3, GROUP_M=8),
        _config(256, 128, 64, num_warps=8, num_stages=3, GROUP_M=8),
        _config(128, 128, 64, num_warps=8, num_stages=4, GROUP_M=8),
        _SAFE_GEMM,
    ]


def rank_configs(M: int, r_pad: int = 16, draws_mask: bool = False) -> list[triton.Config]:
    """Tiles for the thin rank-r passes (S = drop(x) A^T, G = dy B with dB, dA = G^T drop(x)).

    Memory-bound: one rule per M class and rank, no tuning; the small config is the fallback.
    Their (rows, r) accumulators grow with r, so the blocks shrink as r grows; the shrink that
    draws the dropout mask (``draws_mask``: Philox words in registers) takes 64 columns a step.
    Row blocks stay 64 at r <= 32: dB's atomics scale with the number of row blocks. First
    configs compile for sm_90 without spills up to r = 256 (G at r = 512 spills 136 bytes).
    """
    if interpreting():
        return [_config(16, 32, 32, num_warps=4, num_stages=1)]
    if r_pad >= 128:
        return [_config(16, 64, 64, num_warps=8, num_stages=2), _SAFE_RANK]
    if M <= 64:
        return [_config(16, 128, 128, num_warps=4, num_stages=2), _SAFE_RANK]
    if r_pad >= 64:
        return [_config(32, 64, 64, num_warps=4, num_stages=2), _SAFE_RANK]
    return [
        _config(64, 128, 64 if draws_mask else 128, num_warps=4, num_stages=3),
        _config(32, 64, 64, num_warps=4, num_stages=2),
        _SAFE_RANK,
    ]


def norm_configs(N: int) -> list[triton.Config]:
    """Tiles for DoRA's weight norm (kernels/dora_norm.py): BLOCK_N rows per program, K in
    BLOCK_K steps, the rank in 16-wide chunks. Memory-bound on W: 32-row blocks give N / 32
    programs (128 for N = 4096, about one per SM of an H100); a (32, 128) float32 tile of
    W + s B A is 32 registers a thread at 4 warps."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "BLOCK_R": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "BLOCK_R": 16}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "BLOCK_R": 16}, num_warps=4, num_stages=1),
    ]


def estimated_shared_bytes(config: triton.Config, element_bytes: int, adapter_bytes: int = 0, r_chunk: int = 16) -> int:
    """Shared memory a config needs, estimated: its pipelined input tiles plus one output tile,
    and with ``adapter_bytes`` (the GEMMs) the epilogue's rank-chunk tiles and keep bits.

    Checked against the H100 (../shared/gpu): 128x256x64 bf16 at 4 stages needed 262176
    bytes, the tiles alone give 4 x 384 x 64 x 2 + 128 x 256 x 2 = 262144. Against sm_90
    compiles (benchmarks/sm90_check.py) the GEMM estimate is 0-2% above: 128x256x64 in 3 stages,
    bf16, 229 376 bytes estimated against 225 304 compiled; 128x128x64 in 3 stages with fp32
    adapters 149 504 against 147 480.
    """
    if "BLOCK_M" not in config.kwargs:  # the streaming kernels (DoRA's norm, the dequantizer) keep tiles in registers
        return 0
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    tiles = config.num_stages * (m + n) * k * element_bytes + m * n * element_bytes
    epilogue = r_chunk * (m + n) * adapter_bytes + m * n // 8 if adapter_bytes else 0
    return tiles + epilogue


def dequant_configs() -> list[triton.Config]:
    """The 4-bit dequantizer (kernels/dequant_4bit.py): BLOCK_BYTES bytes per program. 4096
    bytes (8192 values) at 8 warps is 16 bytes in and 32 values out per thread, enough bytes
    in flight to stream at memory speed; a 4096 x 4096 weight is 2048 programs."""
    if interpreting():
        return [triton.Config({"BLOCK_BYTES": 256}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_BYTES": 4096}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_BYTES": 1024}, num_warps=4, num_stages=1),
    ]


def mixed_configs(block: str) -> list[triton.Config]:
    """Mixed batches (kernels/mixed_lora.py), per tile of 16 rows of one adapter: the shrink
    steps over K in ``block`` = "BLOCK_K" steps, the expand over N in "BLOCK_N" blocks (one
    (16, r) S tile and one (r, BLOCK_N) B tile live: memory-bound on A and B, which L2 keeps
    for the tiles of one adapter)."""
    if interpreting():
        return [triton.Config({block: 32}, num_warps=4, num_stages=1)]
    return [triton.Config({block: 128}, num_warps=4, num_stages=3), triton.Config({block: 64}, num_warps=4, num_stages=2)]


def mixed_grad_configs() -> list[triton.Config]:
    """The mixed batches' weight-gradient kernel: one (r, BLOCK_D) float32 accumulator per
    program, fed 16 rows at a time. Eight warps at BLOCK_D = 128 keep an IEEE float32 product at
    r = 64 (float32 adapters) in registers (four spill 10 KB: benchmarks/sm90_check.py)."""
    if interpreting():
        return [triton.Config({"BLOCK_D": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_D": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=2)]
