"""``fastlora.dora_linear``: DoRA (PEFT's ``use_dora=True``) on any backend's fused LoRA op.

DoRA scales each output column n of the LoRA layer by g_n = m_n / ||W_n + s B_n A||, the
magnitude m (N,) trained, the norm detached (fastlora/ops/dora_norm.py computes it without
the N x K matrix). Everything of size M x K or M x N goes through the backend's own LoRA
forward and backward (``lora_fwd_<backend>`` / ``lora_bwd_<backend>``: Triton's fused GEMMs,
the C++ kernels, or cuBLAS); DoRA adds per-column scales, one more base GEMM with dropout
(the math needs W x and W drop(x) both), and column reductions.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastlora import _backend, reference
from fastlora.ops.dora_norm import weight_norm
from fastlora.ops.lora_linear import (
    _SEED_HIGH,
    _check_tensor,
    _describe,
    _flatten_rows,
    _ops,
    frozen_flat_parameter_view,
    plain_autograd_reason,
    validate,
)
from fastlora.ops.torch_ops import unpack_keep_bits


def validate_magnitude(magnitude: object, lora_A: torch.Tensor, out_features: int, device: torch.device) -> None:
    """ValueError / TypeError naming ``magnitude`` unless it is an (out_features,) tensor in the
    adapters' dtype on the inputs' device."""
    _check_tensor("magnitude", magnitude)
    if tuple(magnitude.shape) != (out_features,):
        raise ValueError(f"magnitude must have shape (out_features={out_features},), got {_describe(magnitude)}")
    if magnitude.dtype != lora_A.dtype:
        raise TypeError(f"magnitude must have the adapters' dtype ({lora_A.dtype}), got {_describe(magnitude)}")
    if magnitude.device != device:
        raise ValueError(f"magnitude is on {magnitude.device} but x is on {device}; all tensors must share a device")


def _rows_times_columns(t: torch.Tensor, column_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``t * column_scale + bias`` (t (M, N), column_scale (N,) float32) in t's dtype, rounded
    once, written into t."""
    if bias is None:
        return t.mul_(column_scale)
    return torch.addcmul(bias, t, column_scale, out=t)


class DoRALinearFunction(torch.autograd.Function):
    """DoRA: y = x W^T + b + (g - 1) * drop(x) W^T + g * s * drop(x) A^T B^T, W frozen.

    Shapes: x (M, K), W (N, K), b (N,), A (r, K), B (N, r), m (N,), dy (M, N); D = mask / (1-p)
    the dropout scale of each element of x (D = 1 without dropout); n = ||W + s B A||_row and
    g = m / n (N,), n treated as a constant (PEFT detaches it). With S = drop(x) A^T (M, r),
    L = s S B^T and u = drop(x) W^T + L (M, N), the LoRA op's output y_L = x W^T + b + L gives

      y = y_L + (g - 1) * u                        (p = 0: u = x W^T + L, y = g * u + b)

      dy/dA, dy/dB:  y depends on A and B only through g * L (n is constant)
                     => the LoRA gradients of dy_g = g * dy: dB = s dy_g^T S,
                        dA = s (dy_g B)^T drop(x)
      dy/dx:         dx = dy W + D * ((g - 1) * dy) W + D * s (dy_g B) A
                        = [dy_g W + D * s (dy_g B) A] - (1 - D) * (((g - 1) * dy) W)
                     the bracket is the LoRA backward of dy_g; without dropout D = 1 and it
                     is all of dx
      dy/dm:         y depends on m through g * u: dm = sum over rows of (dy * u) / n
      db   =  sum over rows of dy;  dW is never computed.

    The LoRA forward and backward are the backend's ops; dropout draws its mask once, in the
    LoRA forward, and the second base product drop(x) W^T reads it back from the keep bits.
    Saved for backward: what the LoRA op saves (x, W, A, B, S, keep bits), g and n (N,) and
    one M x N tensor: without dropout the output y itself (u = (y - b) / g, which autograd
    keeps anyway when y is alive, so nothing is added), with dropout u.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, fan_in_fan_out, backend):
        forward_op, _ = _ops(backend, x)
        norm = weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, backend)
        g = magnitude.detach().float() / norm
        if dropout_p == 0.0:
            y_lora, S, keep_bits = forward_op(x, weight, None, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out)
            y = _rows_times_columns(y_lora, g, bias)
            kept = y
        else:
            y, S, keep_bits = forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out)
            kept = _dropped_product(x, weight, lora_B, S, keep_bits, scaling, dropout_p, fan_in_fan_out)
            y.addcmul_(kept, g - 1.0)
        ctx.save_for_backward(x, weight, lora_A, lora_B, S, keep_bits, seed, bias, g, norm, kept)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.backend = backend
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S, keep_bits, seed, bias, g, norm, kept = ctx.saved_tensors
        needs_dx, _, needs_dbias, needs_dA, needs_dB, needs_dm = ctx.needs_input_grad[:6]
        _, backward_op = _ops(ctx.backend, dy)
        dy = dy.contiguous()
        dy_g = (dy * g).to(dy.dtype)
        dx, dA, dB, _ = backward_op(
            dy_g, x, weight, lora_A, lora_B, S, keep_bits, ctx.scaling, ctx.dropout_p, seed, ctx.fan_in_fan_out,
            needs_dx, needs_dA, needs_dB, False,
        )
        if needs_dx and ctx.dropout_p > 0.0:
            w = weight.t() if ctx.fan_in_fan_out else weight
            base = ((dy * (g - 1.0)).to(dy.dtype)) @ w
            keep = unpack_keep_bits(keep_bits, x.shape[1])
            not_kept_scale = torch.where(keep, -ctx.dropout_p / (1.0 - ctx.dropout_p), 1.0)
            dx = dx.sub_(base.mul_(not_kept_scale))
        dm = None
        if needs_dm:
            if ctx.dropout_p == 0.0:  # u = (y - b) / g
                y_less_bias = kept if bias is None else kept - bias
                dm = (dy * y_less_bias).sum(0, dtype=torch.float32) / (g * norm)
            else:
                dm = (dy * kept).sum(0, dtype=torch.float32) / norm
            dm = dm.to(lora_A.dtype)
        dbias = dy.sum(0) if needs_dbias and bias is not None else None
        return (
            dx if needs_dx else None,
            None,
            dbias,
            dA if needs_dA else None,
            dB if needs_dB else None,
            dm,
            None, None, None, None, None,
        )


def _dropped_product(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_B: torch.Tensor,
    S: torch.Tensor,
    keep_bits: torch.Tensor,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """u = drop(x) W^T + s S B^T (M, N) in x's dtype, drop(x) from the LoRA forward's keep bits."""
    keep = unpack_keep_bits(keep_bits, x.shape[1])
    dropped = x * keep * (1.0 / (1.0 - dropout_p))
    base = dropped.to(x.dtype) @ (weight if fan_in_fan_out else weight.t())
    lora = S.to(lora_B.dtype) @ lora_B.t()
    # out of place: Inductor (torch 2.13) miscompiles ``(a @ b).add_(c, alpha=s)``
    return (base + scaling * lora).to(x.dtype)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """DoRA linear, PEFT's numbers: ``y = x W^T + b + (g - 1) drop(x) W^T + g s drop(x) A^T B^T``.

    g = magnitude / ||W + s B A||_row (the norm detached, as in PEFT); without dropout (or
    outside training) this is ``g * (x W^T + s x A^T B^T) + b``. Shapes as ``lora_linear``,
    magnitude (N,) in the adapters' dtype. Gradients flow to x, bias, lora_A, lora_B and
    magnitude; the frozen weight gets none. Dropout as in ``lora_linear``: a mask drawn once
    from torch's generator, applied to the DoRA branch's input. Autocast, float64, a trainable
    weight and torch.func transforms behave as in ``lora_linear`` (the last three run
    ``fastlora.reference.dora_linear``). Second derivatives are not supported (the backward is
    once-differentiable).
    """
    _check_tensor("x", x)
    autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
    if autocast:
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, lora_A, lora_B = x.to(dtype), weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        magnitude = magnitude.to(dtype) if isinstance(magnitude, torch.Tensor) else magnitude
    validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    validate_magnitude(magnitude, lora_A, out_features, x.device)
    if weight.requires_grad and weight._base is not None and frozen_flat_parameter_view(weight):
        weight = weight.detach()
    plain_reason = plain_autograd_reason(x, weight)
    if plain_reason is not None:
        forced = _backend.current_backend()
        if forced in ("triton", "cpp"):
            raise RuntimeError(f"fastlora backend {forced!r} cannot run {plain_reason}; use 'torch' or 'auto'")
        return reference.dora_linear(
            x, weight, bias, lora_A, lora_B, magnitude, float(scaling), float(dropout_p), training, fan_in_fan_out
        )
    dropout_p = float(dropout_p) if training else 0.0
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    backend = _backend.resolve(x.device, x.numel() // max(x.shape[-1], 1), lora_A.shape[0])
    seed = None
    if dropout_p > 0.0 and backend != "torch":
        seed = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=x.device)
    args = (_flatten_rows(x), weight, bias, lora_A, lora_B, magnitude, float(scaling), dropout_p, seed,
            fan_in_fan_out, backend)
    if autocast:
        with torch.autocast(x.device.type, enabled=False):
            y = DoRALinearFunction.apply(*args)
    else:
        y = DoRALinearFunction.apply(*args)
    return y.reshape(*x.shape[:-1], y.shape[-1])
