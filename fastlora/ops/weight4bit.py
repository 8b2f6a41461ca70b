"""A bitsandbytes 4-bit weight (NF4 / FP4) as the tensors fastlora's dequantizers read.

bitsandbytes' layout (``bitsandbytes.nn.Params4bit`` + ``functional.QuantState``): the
(N, K) weight, flattened row-major into n = N K values, is packed two 4-bit codes a byte
(value 2i in the high nibble of byte i, value 2i + 1 in the low one; (n + 1) // 2 bytes,
any ``quant_storage`` dtype being a view of those bytes), with one float32 absmax per block
of ``blocksize`` consecutive values (blocks may straddle rows) and a 16-entry code table
(NF4 or FP4). With nested ("double") quantization the absmax itself is stored as uint8
codes into a 256-entry table, with a float32 absmax per ``nested_blocksize`` blocks and a
float32 ``offset``:  absmax[b] = nested_code[q[b]] * nested_absmax[b // nested_blocksize] + offset.
Value j dequantizes to  code[nibble j] * absmax[j // blocksize]  in float32, then rounds once
to the compute dtype: what ``bitsandbytes.functional.dequantize_4bit`` computes, bit for bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
_CHUNK_BYTES = 1 << 20  # the torch dequantizer's temporaries stay a few times this size


class Weight4bit(NamedTuple):
    """The tensors and sizes of one 4-bit weight of shape (out_features, in_features).

    packed (ceil(n / 2),) uint8; absmax (blocks,) float32, or uint8 codes when nested;
    code (16,) float32; nested_absmax (ceil(blocks / nested_blocksize),) float32 and
    nested_code (256,) float32 when nested, else None; n = out_features * in_features.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: float
    blocksize: int
    nested_blocksize: int
    out_features: int
    in_features: int
    quant_type: str

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def device(self) -> torch.device:
        return self.packed.device


def from_params4bit(weight: object, name: str = "weight") -> Weight4bit:
    """The Weight4bit of a quantized ``bitsandbytes.nn.Params4bit`` (what a ``Linear4bit``
    holds), reading bitsandbytes' own quant state. ValueError / TypeError naming ``name`` for
    what fastlora cannot read: no quant state, a weight not quantized yet, the CPU repacked
    layout (``packing_format_for_cpu``), an unknown quant type or block size, sizes that
    disagree."""
    state = getattr(weight, "quant_state", None)
    if not isinstance(weight, torch.Tensor) or state is None:
        raise ValueError(f"{name} has no bitsandbytes quant state (quant_state is None): a 4-bit layer must be "
                         "quantized first (bitsandbytes quantizes a Linear4bit on .to(device) / .cuda())")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(f"{name} is in bitsandbytes' repacked CPU layout (quant_state.packing_format_for_cpu, "
                         "made by Linear4bit's eval-mode CPU forward), which fastlora does not read; run the "
                         "model's state_dict() once (bitsandbytes converts it back) before injecting")
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}: quant_type {state.quant_type!r} is not one fastlora knows {QUANT_TYPES}")
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: blocksize {state.blocksize} is not one fastlora knows {BLOCKSIZES}")
    shape = tuple(state.shape)
    if len(shape) != 2:
        raise ValueError(f"{name}: a 4-bit linear weight has a 2-D quant_state.shape, got {shape}")
    packed = weight.data.view(torch.uint8).reshape(-1) if weight.dtype != torch.uint8 else weight.data.reshape(-1)
    numel = shape[0] * shape[1]
    blocks = math.ceil(numel / state.blocksize)
    if packed.numel() != (numel + 1) // 2 or state.absmax.numel() != blocks:
        raise ValueError(f"{name}: {packed.numel()} packed bytes and {state.absmax.numel()} absmax values do not "
                         f"fit a {shape} weight in blocks of {state.blocksize}")
    code = state.code.to(device=packed.device, dtype=torch.float32)
    if code.numel() != 16:
        raise ValueError(f"{name}: a 4-bit code table has 16 entries, got {code.numel()}")
    if state.nested:
        inner = state.state2
        return Weight4bit(packed, state.absmax, code, inner.absmax, inner.code.to(packed.device, torch.float32),
                          float(state.offset), state.blocksize, inner.blocksize, shape[0], shape[1], state.quant_type)
    if state.absmax.dtype != torch.float32:
        raise ValueError(f"{name}: absmax must be float32 without nested quantization, got {state.absmax.dtype}")
    return Weight4bit(packed, state.absmax, code, None, None, 0.0, state.blocksize, 0, shape[0], shape[1],
                      state.quant_type)


def absmax_fp32(weight: Weight4bit) -> torch.Tensor:
    """The float32 absmax of every block (blocks,), decoding the nested form as bitsandbytes does."""
    if not weight.nested:
        return weight.absmax
    blocks = weight.absmax.numel()
    outer = weight.nested_absmax.repeat_interleave(weight.nested_blocksize)[:blocks]
    return weight.nested_code[weight.absmax.long()] * outer + weight.offset


def dequantize_torch(weight: Weight4bit, out: torch.Tensor) -> torch.Tensor:
    """Dequantize into ``out`` (out_features, in_features), contiguous, float32 / float16 /
    bfloat16, in plain torch ops, a chunk of whole blocks (about a MiB of packed bytes) at a
    time, so the temporaries (the byte indices, the float32 values) stay small. Returns ``out``."""
    flat = out.view(-1)
    pair_table = torch.stack((weight.code.repeat_interleave(16), weight.code.repeat(16)), dim=1)  # byte -> (hi, lo)
    absmax = absmax_fp32(weight)
    half = weight.blocksize // 2  # bytes per block (block sizes are even)
    blocks = absmax.numel()
    step = max(1, _CHUNK_BYTES // half)
    for first in range(0, blocks, step):
        last = min(first + step, blocks)
        chunk = weight.packed[first * half: last * half]
        pairs = pair_table[chunk.long()].view(-1)
        if pairs.numel() < (last - first) * 2 * half:  # the last block is partial
            pairs = torch.nn.functional.pad(pairs, (0, (last - first) * 2 * half - pairs.numel()))
        values = (pairs.view(last - first, 2 * half) * absmax[first:last, None]).view(-1)
        start = 2 * first * half
        stop = min(weight.numel, 2 * last * half)
        flat[start:stop].copy_(values[: stop - start])
    return out
