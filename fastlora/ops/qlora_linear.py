"""QLoRA: the fused LoRA op on a bitsandbytes 4-bit base weight (``fastlora.Linear4bit``).

The base weight stays packed (fastlora/ops/weight4bit.py). Right before each base GEMM, in
the forward and again in the backward's dx GEMM, it is dequantized into the device's
workspace (fastlora/ops/dequant.py) by the backend's dequantizer; the backend's own dense LoRA
forward / backward then runs unchanged on that dense view. Nothing of size N x K is saved
for the backward or allocated per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastlora import _backend, reference
from fastlora.ops.dequant import dequantize
from fastlora.ops.lora_linear import (
    _check_tensor,
    _flatten_rows,
    apply_below_autocast,
    autocast_dtype,
    backend_ops,
    backward_op_for,
    dropout_seed,
    input_gradients,
    remember_backend,
    run_with_fallback,
    validate,
)
from fastlora.ops.weight4bit import Weight4bit

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton forwards without dropout of at most this many rows (K even, r <= 64) dequantize W
# inside the forward GEMM's main loop (triton_ops.decode_forward_4bit) rather than into the
# workspace before it. 0, off, until a GPU report shows it faster: the qlora stage of
# benchmarks/gpu_report.py times both (python -m benchmarks.gpu_report --stages qlora).
IN_GEMM_DEQUANT_MAX_ROWS = 0


class QLoRALinearFunction(torch.autograd.Function):
    """y = x Wd^T + b + s * drop(x) A^T B^T with Wd = dequant(Wq), the packed Wq frozen.

    Shapes: x (M, K), Wq packed (N K / 2 bytes), Wd (N, K) in x's dtype, b (N,), A (r, K),
    B (N, r), dy (M, N). Wd is a constant, so the gradients are LoRALinearFunction's with
    W = Wd (S = drop(x) A^T, G = dy B):
      dx = dy Wd + s * (G A) * mask / (1-p),  dA = s * G^T drop(x),  dB = s * dy^T S,
      db = sum over rows of dy;  no gradient for Wq, ever.
    Wd is formed twice (forward, backward) in the shared workspace (at decode sizes on Triton,
    when IN_GEMM_DEQUANT_MAX_ROWS allows, inside the forward GEMM instead), never saved: saved are
    x, A, B, S (M x r) and the keep bits (M x K / 8 bytes) with their seed, as for LoRA.
    Once-differentiable: the workspace is overwritten by the next layer, so no graph may keep Wd.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
        if backend == "triton" and dropout_p == 0.0 and x.shape[0] <= IN_GEMM_DEQUANT_MAX_ROWS:
            from fastlora.ops import triton_ops

            in_gemm = triton_ops.in_gemm_dequant_fits(x.shape[0], x.shape[1], lora_A.shape[0])
        else:
            in_gemm = False
        if in_gemm:
            y, S, keep_bits = triton_ops.decode_forward_4bit(x, weight, bias, lora_A, lora_B, scaling)
        else:
            forward_op, _ = backend_ops(backend, x)
            dense = dequantize(weight, x.dtype, backend)
            y, S, keep_bits = forward_op(x, dense, bias, lora_A, lora_B, scaling, dropout_p, seed, False)
        ctx.save_for_backward(x, lora_A, lora_B, S, keep_bits, seed)
        ctx.weight = weight  # the packed weight's own tensors (parameters, alive anyway): nothing copied
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        remember_backend(ctx, backend, "qlora_linear", x.shape[0], lora_A.shape[0])
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, lora_A, lora_B, S, keep_bits, seed = ctx.saved_tensors
        backward_op = backward_op_for(ctx, dy)
        dense = dequantize(ctx.weight, x.dtype, ctx.backend)
        return input_gradients(ctx, backward_op, dy, x, dense, lora_A, lora_B, S, keep_bits, seed, False, trailing=4)


class Base4bitFunction(torch.autograd.Function):
    """y = x Wd^T + b, Wd = dequant(Wq) frozen: a merged or adapter-less 4-bit layer.
    dx = dy Wd (Wd dequantized again), db = sum over rows of dy; nothing N x K saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        ctx.weight = weight
        ctx.backend = backend
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize(weight, x.dtype, backend), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        dx = dy @ dequantize(ctx.weight, dy.dtype, ctx.backend) if ctx.needs_input_grad[0] else None
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, dbias, None


def _check_weight(x: torch.Tensor, weight: object) -> torch.Tensor:
    """A zero-stride (N, K) stand-in for the dense weight in x's dtype on x's device, for
    ``validate``'s shape / device checks; TypeError / ValueError naming ``weight`` first."""
    if not isinstance(weight, Weight4bit):
        raise TypeError(f"weight must be a fastlora.ops.weight4bit.Weight4bit (from_params4bit), got {type(weight).__name__}")
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32 on a 4-bit weight, got {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; all tensors must share a device")
    return x.new_empty(()).expand(weight.out_features, weight.in_features)


def qlora_linear(
    x: torch.Tensor,
    weight: Weight4bit,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Fused LoRA on a 4-bit base: ``y = x dequant(W)^T + b + scaling * dropout(x) A^T B^T``.

    Shapes: x (..., K) float16 / bfloat16 / float32 (the compute dtype: W is dequantized into
    it); weight a Weight4bit of shape (N, K); bias (N,) in x's dtype or None; lora_A (r, K)
    and lora_B (N, r) in x's dtype or float32. Returns (..., N) in x's dtype; gradients for x,
    bias, lora_A, lora_B, never for the weight. Under ``torch.autocast`` x, bias and the
    adapters are cast to the autocast dtype (and W dequantized into it). Inside a torch.func
    transform the reference math runs on a freshly dequantized W.
    """
    _check_tensor("x", x)
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, lora_A, lora_B = x.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    validate(x, _check_weight(x, weight), bias, lora_A, lora_B, scaling, dropout_p, False)
    rows = _flatten_rows(x)
    backend = _backend.resolve(x.device, rows.shape[0], lora_A.shape[0], "qlora_linear")
    if torch._C._are_functorch_transforms_active():
        dense = dequantize(weight, x.dtype, backend, out=x.new_empty((weight.out_features, weight.in_features)))
        return reference.lora_linear(x, dense, bias, lora_A, lora_B, float(scaling), float(dropout_p), training)
    dropout_p = float(dropout_p) if training else 0.0
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()

    def run(backend: str) -> torch.Tensor:
        return apply_below_autocast(QLoRALinearFunction, dtype is not None, x.device.type, rows, weight, bias, lora_A,
                                    lora_B, float(scaling), dropout_p, dropout_seed(dropout_p, backend, x.device),
                                    backend)

    y = run_with_fallback(run, backend, "qlora_linear", x.device, rows.shape[0], lora_A.shape[0])
    return y.reshape(*x.shape[:-1], y.shape[-1])


def linear_4bit(x: torch.Tensor, weight: Weight4bit, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = x dequant(W)^T + b`` (a 4-bit layer without an active adapter, or merged), W
    dequantized into the workspace by the current backend; shapes as in ``qlora_linear``."""
    _check_tensor("x", x)
    dtype = autocast_dtype(x)
    if dtype is not None:
        x = x.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    stand_in = _check_weight(x, weight)
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal in_features ({weight.in_features}); "
                         f"x shape {tuple(x.shape)}, 4-bit weight {tuple(stand_in.shape)}")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (weight.out_features,)):
        raise ValueError(f"bias must be ({weight.out_features},) in x's dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    rows = _flatten_rows(x)
    backend = _backend.resolve(x.device, rows.shape[0], 1, "linear_4bit")

    def run(backend: str) -> torch.Tensor:
        return apply_below_autocast(Base4bitFunction, dtype is not None, x.device.type, rows, weight, bias, backend)

    y = run_with_fallback(run, backend, "linear_4bit", x.device, rows.shape[0], 1)
    return y.reshape(*x.shape[:-1], y.shape[-1])
