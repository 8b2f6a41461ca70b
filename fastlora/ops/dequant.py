"""A 4-bit base weight dequantized into the per-device workspace, on each backend.

QLoRA keeps only the packed weight: right before the base GEMM (in the forward, and again in
the backward for dx) it is dequantized into one workspace per device, shared by every layer
and grown to the largest layer seen (N x K elements of the compute dtype, e.g. 90 MB for a
bf16 11008 x 4096 projection), then overwritten by the next layer's. Nothing of size N x K
is allocated per call or per layer, and nothing is saved for the backward. The workspace is
reused in stream order, so one device's layers must run on one CUDA stream (or thread) at a
time; ``release_workspaces`` frees it.

Backends: ``torch`` (on a GPU bitsandbytes' own CUDA dequantizer, the library-composed path
PEFT and Unsloth take; elsewhere plain torch ops, weight4bit.dequantize_torch), ``cpp``
(csrc/dequant_4bit.cpp) and ``triton`` (kernels/dequant_4bit.py); all give bitsandbytes'
dequantize_4bit bit for bit.
"""

from __future__ import annotations

import torch

from fastlora.ops.weight4bit import Weight4bit, absmax_fp32, dequantize_torch

_workspaces: dict[torch.device, torch.Tensor] = {}


def workspace(device: torch.device, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) ``dtype`` view of ``device``'s workspace, regrown when too small."""
    nbytes = rows * cols * torch.empty((), dtype=dtype).element_size()
    buffer = _workspaces.get(device)
    if buffer is None or buffer.numel() < nbytes:
        _workspaces.pop(device, None)  # the old buffer goes before the larger one is allocated
        buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        _workspaces[device] = buffer
    return buffer[:nbytes].view(dtype).view(rows, cols)


def workspace_bytes() -> dict[torch.device, int]:
    """The size of each device's workspace in bytes."""
    return {device: buffer.numel() for device, buffer in _workspaces.items()}


def release_workspaces() -> None:
    """Free every device's workspace (the next 4-bit layer allocates it again)."""
    _workspaces.clear()


def dequantize(weight: Weight4bit, dtype: torch.dtype, backend: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` dense (out_features, in_features) in ``dtype`` (float32 / float16 / bfloat16),
    written into ``out`` or, by default, the device's workspace, by ``backend``'s dequantizer."""
    if out is None:
        out = workspace(weight.device, dtype, weight.out_features, weight.in_features)
    if backend == "triton":
        from fastlora.ops import dequant_triton

        return dequant_triton.dequantize(weight, out)
    if backend == "cpp":
        from fastlora.ops import cpp_ops

        cpp_ops.load()
        torch.ops.fastlora.dequant_4bit_cpp(weight.packed, absmax_fp32(weight), weight.code, weight.blocksize, out)
        return out
    if out.device.type == "cuda":  # the torch path on a GPU: bitsandbytes' own CUDA kernel
        import bitsandbytes.functional as bnb_functional

        bnb_functional.dequantize_4bit(weight.packed.view(-1, 1), absmax=absmax_fp32(weight), out=out,
                                       blocksize=weight.blocksize, quant_type=weight.quant_type)
        return out
    return dequantize_torch(weight, out)
