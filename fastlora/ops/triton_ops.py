"""The ``triton`` backend: launchers for the kernels in ``fastlora.kernels``.

``forward`` and ``backward`` are registered with ``torch.library.triton_op`` as
``fastlora::lora_fwd_triton`` and ``fastlora::lora_bwd_triton`` (the schema of ``schema.py``;
the forward takes one more optional argument, DoRA's ``column_scale``),
so ``torch.compile`` traces into the kernels; eager calls run the same Python functions
directly (no dispatcher round trip). Every kernel goes through ``launcher.launch``: one config
per kernel and shape class (bucketed M), configs that do not fit dropped at run time.
The two big GEMMs (y, dx) run on the TMA + persistent kernel (kernels/lora_gemm_tma.py) for
eager calls with M > 64 whose operands TMA can read (Hopper or newer, or the interpreter;
16-byte aligned rows); decode sizes, other strides, traced graphs and any shape whose TMA
kernel cannot run take the pointer-load kernels.
Saved for backward: S (M x r, float32) and, with dropout, the keep-mask as bits (M x K / 8
bytes, drawn once by the shrink kernel); nothing else of size M x K (x itself is the
caller's) and nothing of size M x N.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side tensor descriptors: pointer kernels only
    TensorDescriptor = None

from fastlora.kernels.configs import gemm_configs, rank_configs
from fastlora.kernels.lora_backward import lora_grad_a_kernel, lora_grad_input_kernel, lora_grad_output_kernel
from fastlora.kernels.lora_forward import lora_forward_kernel, lora_shrink_kernel
from fastlora.kernels.lora_gemm_tma import lora_gemm_tma_kernel
from fastlora.ops.launcher import launch, m_bucket, multiprocessor_count, tracing
from fastlora.ops.schema import keep_bits_for


def padded_rank(r: int) -> int:
    """r rounded up to a power of two, at least 16 (tl.dot's smallest dimension)."""
    return max(16, triton.next_power_of_2(r))


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies operands of ``dtype``: float32 follows torch's own setting
    (``torch.get_float32_matmul_precision()``: TF32 unless it is "highest", as cuBLAS does);
    halves are exact in either mode."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def epilogue_precision(out_dtype: torch.dtype, adapter_dtype: torch.dtype) -> str:
    """The GEMMs' rank-r epilogue product, whose result is rounded into ``out_dtype``: TF32
    (unit roundoff 2^-11) for a bfloat16 output, whose own rounding (2^-8) dwarfs it, even with
    float32 adapters (an IEEE float32 product there spills registers and overflows shared
    memory: benchmarks/sm90_check.py); otherwise as ``dot_precision``."""
    return "tf32" if out_dtype == torch.bfloat16 else dot_precision(adapter_dtype)


def rank_chunk(r_pad: int) -> int:
    """Rank columns per step of the GEMMs' epilogue loop (kernels/tiling.rank_term): 16, one
    MMA deep; a 32-wide single step pushed 128 x 256 x 64 in 3 stages to 232 KB (sm90_check)."""
    return min(r_pad, 16)


def weight_strides(weight: torch.Tensor, fan_in_fan_out: bool) -> tuple[int, int]:
    """(stride over N, stride over K) of W, whether stored (N, K) or (K, N)."""
    if fan_in_fan_out:
        return weight.stride(1), weight.stride(0)
    return weight.stride(0), weight.stride(1)


def bits_row_stride(keep_bits: torch.Tensor) -> int:
    """Row stride of keep_bits (M, ceil(K / 8)); 0 for the empty tensor of a call without dropout."""
    return keep_bits.stride(0) if keep_bits.dim() == 2 else 0


def split_rows(M: int, K: int, device: torch.device) -> int:
    """Row splits of the dA reduction: enough (cdiv(K, 128) x splits) programs for two per SM,
    at most 16 and at most one per 64 rows."""
    return max(1, min(triton.cdiv(M, 64), 16, 2 * multiprocessor_count(device) // triton.cdiv(K, 128)))


def column_splits(M: int, columns: int, block_rows: int, block_columns: int, device: torch.device) -> int:
    """Column splits of a pass over row blocks (the shrink over K, G over N): 1 when the
    cdiv(M, block_rows) row blocks fill every SM, else enough for about one program per SM, at
    most 8 and at most one per column block."""
    row_blocks = triton.cdiv(M, block_rows)
    sms = multiprocessor_count(device)
    if row_blocks >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, row_blocks), triton.cdiv(columns, block_columns), 8))


def split_buffer(out: torch.Tensor, split: int) -> torch.Tensor:
    """Where a split pass writes: ``out`` itself as (1, M, r) without a split, else float32
    partials (split, M, r) that the caller sums (in a fixed order) into ``out``."""
    return out[None] if split == 1 else out.new_empty((split, *out.shape))


class ColumnSplit:
    """A row-block pass split over its columns (``column_splits``), for the config the launcher
    tries: ``count`` gives the grid's second dimension, ``buffer`` where the programs write
    (``out``, or partials when ``out`` has rows to split), ``reduce`` the fixed-order sum of the
    partials into ``out`` after the launch."""

    def __init__(self, out: torch.Tensor, M: int, columns: int, column_block: str) -> None:
        self.out, self.M, self.columns, self.column_block = out, M, columns, column_block
        self.partial: torch.Tensor | None = None  # set by buffer, for the config that ran last

    def count(self, blocks: dict) -> int:
        return column_splits(self.M, self.columns, blocks["BLOCK_M"], blocks[self.column_block], self.out.device)

    def buffer(self, blocks: dict) -> torch.Tensor:
        self.partial = split_buffer(self.out, self.count(blocks) if self.out.shape[0] else 1)
        return self.partial

    def reduce(self) -> None:
        if self.partial is not None and self.partial.shape[0] > 1:
            torch.sum(self.partial, 0, out=self.out)


DECODE_ROWS = 64  # M up to this takes the decode path: pointer kernels, a one-launch forward
_hopper: dict[torch.device, bool] = {}
_tma_failed: set[tuple] = set()


def tma_device(device: torch.device) -> bool:
    """TMA runs on Hopper or newer GPUs, and in the interpreter on the CPU."""
    if device.type != "cuda":
        return device.type == "cpu"
    if device not in _hopper:
        _hopper[device] = torch.cuda.get_device_capability(device) >= (9, 0)
    return _hopper[device]


def tma_aligned(*tensors: torch.Tensor) -> bool:
    """TMA reads 2-D tiles with a unit column stride and 16-byte aligned base and row stride
    (allocations are aligned, so the storage offset decides)."""
    for t in tensors:
        size = t.element_size()
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * size) % 16 or (t.storage_offset() * size) % 16:
            return False
        if t.shape[1] * size < 16:
            return False
    return True


def weight_descriptor(weight: torch.Tensor, block: list[int]):
    """The TMA descriptor of the frozen weight for ``block``. For an ``nn.Parameter`` it is built
    once and kept on the parameter itself, keyed by (pointer, shape, strides, block): a weight
    moved or replaced gets a new one, and the descriptor goes with the weight (no global cache
    keeping tensors alive). Any other tensor (autocast's per-call cast of an fp32 weight, a view)
    gets a fresh one, as activations do (about 3 us each on the host): the descriptor holds its
    tensor, so keeping it on the tensor makes a cycle that only the garbage collector frees, and
    a per-call copy would stay alive past its backward (issue 36: up to 13 GB per step for an 8B
    model in fp32 under bf16 autocast)."""
    if not isinstance(weight, torch.nn.Parameter):
        return TensorDescriptor.from_tensor(weight, block)
    key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), tuple(block))
    cache = weight.__dict__.setdefault("_fastlora_tma_descriptors", {})
    descriptor = cache.get(key)
    if descriptor is None:
        cache.clear()  # an older pointer or layout: its descriptors are stale
        descriptor = cache[key] = TensorDescriptor.from_tensor(weight, block)
    return descriptor


def gemm_on_tma(
    name: str, a: torch.Tensor, weight: torch.Tensor, b_transposed: bool, out: torch.Tensor,
    left: torch.Tensor, right: torch.Tensor, stride_rr: int, stride_rc: int, bias: torch.Tensor | None,
    keep_bits: torch.Tensor, scaling: float, dropout_p: float, has_dropout: bool, describe,
    column_scale: torch.Tensor | None = None,
) -> bool:
    """out (M, C) = (a (M, RED) x W + scaling * left right (masked with dropout)) (* column_scale)
    (+ bias) on the TMA kernel; False (nothing launched) when this call cannot take it."""
    M, RED = a.shape
    C = out.shape[1]
    R = left.shape[1]
    if (TensorDescriptor is None or M <= DECODE_ROWS or tracing(a) or not tma_device(a.device)
            or not tma_aligned(a, weight, out)):
        return False
    num_sms = multiprocessor_count(a.device)
    r_pad = padded_rank(R)
    meta = dict(
        B_TRANSPOSED=b_transposed, HAS_COLUMN_SCALE=column_scale is not None, HAS_BIAS=bias is not None,
        HAS_DROPOUT=has_dropout, R_PAD=r_pad,
        R_CHUNK=rank_chunk(r_pad), INPUT_PRECISION=dot_precision(a.dtype),
        ADAPTER_PRECISION=epilogue_precision(out.dtype, right.dtype), NUM_SMS=num_sms,
    )
    key = shape_key(name, M, C, RED, r_pad, a, right, **meta)
    if key in _tma_failed:
        return False

    def args(blocks: dict) -> tuple:
        bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
        return (
            TensorDescriptor.from_tensor(a, [bm, bk]),
            weight_descriptor(weight, [bn, bk] if b_transposed else [bk, bn]),
            TensorDescriptor.from_tensor(out, [bm, bn]),
            left, right, column_scale if column_scale is not None else left, bias if bias is not None else out,
            keep_bits,
            M, C, RED, R,
            left.stride(0), left.stride(1),
            stride_rr, stride_rc,
            bits_row_stride(keep_bits),
            scaling, dropout_p,
        )

    try:
        launch(
            lora_gemm_tma_kernel,
            lambda c: (min(num_sms, triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(C, c["BLOCK_N"])),),
            args, meta, key, lambda: gemm_configs(M, r_pad, right.element_size()), describe, tunable=True, like=a,
            adapter_bytes=right.element_size(),
        )
    except RuntimeError:  # no config of the TMA kernel runs here: the pointer kernels take this shape
        _tma_failed.add(key)
        return False
    return True


def shape_key(name: str, M: int, N: int, K: int, r_pad: int, *tensors: torch.Tensor, **flags) -> tuple:
    """A launch key: the kernel, the device, the M bucket, the other sizes, the dtypes, the flags."""
    return (name, tensors[0].device, m_bucket(M), N, K, r_pad, *(t.dtype for t in tensors), *sorted(flags.items()))


def describer(M: int, N: int, K: int, R: int, **tensors: torch.Tensor):
    """A function describing the call for launcher errors (built only when one is raised)."""
    return lambda: f"M={M}, N={N}, K={K}, r={R}, " + ", ".join(f"{n} {t.dtype}" for n, t in tensors.items())


def split_m_product(
    left: torch.Tensor, right: torch.Tensor, adapter: torch.Tensor, keep_bits: torch.Tensor,
    scaling: float, dropout_p: float, has_dropout: bool, describe,
) -> torch.Tensor:
    """scaling * left^T drop(right) (R, C) in float32 for left (M, R) float32 and right (M, C),
    the product taken in ``adapter``'s dtype: dA = s G^T drop(x), and in deterministic mode
    dB^T = s S^T dy. Split over M into float32 partials summed in a fixed order (no atomics:
    deterministic), with enough programs for every SM; keep_bits is read only with dropout."""
    M, C = right.shape
    R = left.shape[1]
    r_pad = padded_rank(R)
    split = split_rows(M, C, right.device)
    partial = right.new_empty((split, R, C), dtype=torch.float32)
    meta = dict(HAS_DROPOUT=has_dropout, R_PAD=r_pad, ADAPTER_PRECISION=dot_precision(adapter.dtype))
    launch(
        lora_grad_a_kernel, lambda c: (triton.cdiv(C, c["BLOCK_K"]), split),
        (left, right, adapter, partial, keep_bits,
         M, C, R, split,
         left.stride(0), left.stride(1),
         right.stride(0), right.stride(1),
         partial.stride(0), partial.stride(1), partial.stride(2),
         bits_row_stride(keep_bits),
         scaling, dropout_p),
        meta, shape_key("lora_grad_a_kernel", M, 0, C, r_pad, right, adapter, **meta),
        lambda: rank_configs(M, r_pad), describe,
    )
    return partial[0] if split == 1 else partial.sum(0)


def pointer_forward(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, S: torch.Tensor, y: torch.Tensor, scaling: float, fan_in_fan_out: bool,
    fused_shrink: bool, describe, column_scale: torch.Tensor | None = None, weight_4bit=None,
) -> None:
    """y = x W^T + b + s S B^T (* column_scale) on the pointer-load forward kernel, S computed
    inside it when ``fused_shrink``; with ``weight_4bit`` (a weight4bit.Weight4bit, K even, for
    QLoRA's decode forward) W is dequantized inside the kernel's main loop instead of read."""
    M, K = x.shape
    N, R = lora_B.shape
    r_pad = padded_rank(R)
    if weight_4bit is None:
        stride_wn, stride_wk = weight_strides(weight, fan_in_fan_out)
        packed = absmax = code = S  # unread placeholders
    else:
        from fastlora.ops.weight4bit import absmax_fp32

        weight, stride_wn, stride_wk = S, 0, 0
        packed, absmax, code = weight_4bit.packed, absmax_fp32(weight_4bit), weight_4bit.code
    forward_meta = dict(
        HAS_BIAS=bias is not None, HAS_COLUMN_SCALE=column_scale is not None, FUSED_SHRINK=fused_shrink,
        W_4BIT=weight_4bit is not None, QUANT_BLOCK=weight_4bit.blocksize if weight_4bit is not None else 1,
        R_PAD=r_pad, R_CHUNK=rank_chunk(r_pad),
        INPUT_PRECISION=dot_precision(x.dtype),
        ADAPTER_PRECISION=dot_precision(lora_B.dtype) if fused_shrink else epilogue_precision(y.dtype, lora_B.dtype),
    )
    launch(
        lora_forward_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),),
        (x, weight, bias if bias is not None else y, lora_A, S, lora_B,
         column_scale if column_scale is not None else S, y, packed, absmax, code,
         M, N, K, R,
         x.stride(0), x.stride(1),
         stride_wn, stride_wk,
         lora_A.stride(0), lora_A.stride(1),
         S.stride(0), S.stride(1),
         lora_B.stride(0), lora_B.stride(1),
         y.stride(0), y.stride(1),
         scaling),
        forward_meta, shape_key("lora_forward_kernel", M, N, K, r_pad, x, lora_B, **forward_meta),
        lambda: gemm_configs(M, r_pad, lora_B.element_size(), pointer=True, four_bit=weight_4bit is not None),
        describe, tunable=True, adapter_bytes=lora_B.element_size(),
    )


def decode_forward_4bit(
    x: torch.Tensor, weight_4bit, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The schema's forward without dropout for a 4-bit weight (weight4bit.Weight4bit, K even)
    at decode sizes (M <= DECODE_ROWS, r <= 64): one launch that dequantizes W tile by tile in
    the GEMM's main loop and accumulates S = x A^T beside it."""
    M, K = x.shape
    N, R = lora_B.shape
    y = x.new_empty((M, N))
    S = x.new_empty((M, R), dtype=torch.float32)
    if M:
        pointer_forward(x, None, bias, lora_A, lora_B, S, y, scaling, False, True,
                        describer(M, N, K, R, x=x, lora_A=lora_A), weight_4bit=weight_4bit)
    return y, S, keep_bits_for(x, 0.0)


def in_gemm_dequant_fits(M: int, K: int, r: int) -> bool:
    """Whether ``decode_forward_4bit`` takes this call: decode rows, K even, r <= 64."""
    return 0 < M <= DECODE_ROWS and K % 2 == 0 and padded_rank(r) <= 64


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    fan_in_fan_out: bool,
    column_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The schema's forward; ``column_scale`` (N,) float32, Triton only (DoRA without dropout):
    y = (x W^T + s S B^T) * column_scale + b in the GEMM's epilogue."""
    M, K = x.shape
    N, R = lora_B.shape
    y = x.new_empty((M, N))
    S = x.new_empty((M, R), dtype=torch.float32)
    keep_bits = keep_bits_for(x, dropout_p)
    if M == 0:
        return y, S, keep_bits
    r_pad = padded_rank(R)
    has_dropout = seed is not None and dropout_p > 0.0
    describe = describer(M, N, K, R, x=x, lora_A=lora_A)
    # decode without dropout: one launch, S accumulated inside the forward GEMM (its (rows, r)
    # accumulator and A tiles stay small up to r = 64)
    fused_shrink = M <= DECODE_ROWS and not has_dropout and r_pad <= 64
    if not fused_shrink:
        shrink_meta = dict(HAS_DROPOUT=has_dropout, R_PAD=r_pad, INPUT_PRECISION=dot_precision(lora_A.dtype))
        split = ColumnSplit(S, M, K, "BLOCK_K")

        def shrink_args(blocks: dict) -> tuple:
            partial = split.buffer(blocks)
            return (x, lora_A, partial, seed if has_dropout else S, keep_bits,
                    M, K, R, partial.shape[0],
                    x.stride(0), x.stride(1),
                    lora_A.stride(0), lora_A.stride(1),
                    partial.stride(0), partial.stride(1), partial.stride(2),
                    bits_row_stride(keep_bits),
                    dropout_p)

        launch(
            lora_shrink_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]), split.count(c)), shrink_args,
            shrink_meta, shape_key("lora_shrink_kernel", M, 0, K, r_pad, x, lora_A, **shrink_meta),
            lambda: rank_configs(M, r_pad, draws_mask=has_dropout), describe, like=x,
        )
        split.reduce()
        if gemm_on_tma("lora_forward_tma", x, weight, not fan_in_fan_out, y, S, lora_B, lora_B.stride(1),
                       lora_B.stride(0), bias, keep_bits, scaling, 0.0, False, describe, column_scale):
            return y, S, keep_bits
    pointer_forward(x, weight, bias, lora_A, lora_B, S, y, scaling, fan_in_fan_out, fused_shrink, describe,
                    column_scale)
    return y, S, keep_bits


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    S: torch.Tensor,
    keep_bits: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    fan_in_fan_out: bool,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    needs_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, K = x.shape
    N, R = lora_B.shape
    r_pad = padded_rank(R)
    has_dropout = seed is not None and dropout_p > 0.0
    needs_g = needs_dx or needs_dA
    G = x.new_empty((M, R) if needs_g else (0, R), dtype=torch.float32)
    # deterministic mode: no atomics; dB = s S^T dy as split-M partials summed in a fixed order
    # (the dA kernel's reduction with S for G and dy for x: one more read of dy), dbias by torch
    fixed_order = torch.are_deterministic_algorithms_enabled() and M > 0
    atomic_dB, atomic_dbias = needs_dB and not fixed_order, needs_dbias and not fixed_order
    # dB and dbias are accumulated atomically in float32: one zeroed buffer (one memset) holds both
    sums = x.new_zeros((N * R if atomic_dB else 0) + (N if atomic_dbias else 0), dtype=torch.float32)
    dB = sums[: N * R].view(N, R) if atomic_dB else sums.new_empty((0, R))
    dbias = sums[N * R if atomic_dB else 0:] if atomic_dbias else sums.new_empty((0,))
    dx = x.new_empty((M, K) if needs_dx else (0, K))
    dy = dy if dy.stride(-1) == 1 or dy.stride(0) == 1 else dy.contiguous()
    describe = describer(M, N, K, R, dy=dy, lora_A=lora_A)
    if M > 0 and (needs_g or atomic_dB or atomic_dbias):
        output_meta = dict(
            NEEDS_G=needs_g, NEEDS_DB=atomic_dB, NEEDS_DBIAS=atomic_dbias,
            R_PAD=r_pad, ADAPTER_PRECISION=dot_precision(lora_B.dtype),
        )
        split = ColumnSplit(G, M, N, "BLOCK_N")  # G is (0, r) when not needed: nothing to split

        def output_args(blocks: dict) -> tuple:
            partial = split.buffer(blocks)
            return (dy, lora_B, S, partial, dB, dbias,
                    M, N, R, split.count(blocks),
                    dy.stride(0), dy.stride(1),
                    lora_B.stride(0), lora_B.stride(1),
                    S.stride(0), S.stride(1),
                    partial.stride(0), partial.stride(1), partial.stride(2),
                    dB.stride(0), dB.stride(1),
                    scaling)

        launch(
            lora_grad_output_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]), split.count(c)), output_args,
            output_meta, shape_key("lora_grad_output_kernel", M, N, 0, r_pad, dy, lora_B, **output_meta),
            lambda: rank_configs(M, r_pad), describe, like=dy,
        )
        split.reduce()
    if fixed_order and needs_dB:
        dB = split_m_product(S, dy, lora_B, keep_bits, scaling, 0.0, False, describe).t().contiguous()
    if fixed_order and needs_dbias:
        dbias = dy.sum(0, dtype=torch.float32)
    if M > 0 and needs_dx and not gemm_on_tma(
        "lora_grad_input_tma", dy, weight, fan_in_fan_out, dx, G, lora_A, lora_A.stride(0), lora_A.stride(1),
        None, keep_bits, scaling, dropout_p, has_dropout, describe,
    ):
        stride_wn, stride_wk = weight_strides(weight, fan_in_fan_out)
        input_meta = dict(
            HAS_DROPOUT=has_dropout, R_PAD=r_pad, R_CHUNK=rank_chunk(r_pad),
            INPUT_PRECISION=dot_precision(x.dtype), ADAPTER_PRECISION=epilogue_precision(dx.dtype, lora_A.dtype),
        )
        launch(
            lora_grad_input_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_N"]),),
            (dy, weight, G, lora_A, dx, keep_bits,
             M, N, K, R,
             dy.stride(0), dy.stride(1),
             stride_wn, stride_wk,
             G.stride(0), G.stride(1),
             lora_A.stride(0), lora_A.stride(1),
             dx.stride(0), dx.stride(1),
             bits_row_stride(keep_bits),
             scaling, dropout_p),
            input_meta, shape_key("lora_grad_input_kernel", M, N, K, r_pad, dy, lora_A, **input_meta),
            lambda: gemm_configs(M, r_pad, lora_A.element_size(), pointer=True), describe, tunable=True,
            adapter_bytes=lora_A.element_size(),
        )
    if not needs_dA:
        dA = lora_A.new_empty((0, K))
    elif M == 0:
        dA = lora_A.new_zeros(lora_A.shape)
    else:
        dA = split_m_product(G, x, lora_A, keep_bits, scaling, dropout_p, has_dropout, describe).to(lora_A.dtype)
    return dx, dA, dB.to(lora_B.dtype), dbias.to(dy.dtype)


lora_fwd_triton = triton_op("fastlora::lora_fwd_triton", mutates_args=())(forward)
lora_bwd_triton = triton_op("fastlora::lora_bwd_triton", mutates_args=())(backward)
