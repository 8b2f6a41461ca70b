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

from fastlora import reference
from fastlora.ops.dora_norm import weight_norm
from fastlora.ops.lora_linear import (
    _check_tensor,
    _describe,
    backend_ops,
    backward_op_for,
    remember_backend,
    run_fused,
)
from fastlora.ops.torch_ops import unpack_keep_bits


def validate_magnitude(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: object) -> None:
    """ValueError / TypeError naming ``magnitude`` unless it is an (out_features,) tensor in the
    adapters' dtype on x's device (lora_B (out_features, r) is checked already, by ``validate``)."""
    _check_tensor("magnitude", magnitude)
    out_features = lora_B.shape[0]
    if tuple(magnitude.shape) != (out_features,):
        raise ValueError(f"magnitude must have shape (out_features={out_features},), got {_describe(magnitude)}")
    if magnitude.dtype != lora_A.dtype:
        raise TypeError(f"magnitude must have the adapters' dtype ({lora_A.dtype}), got {_describe(magnitude)}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude is on {magnitude.device} but x is on {x.device}; all tensors must share a device")


ROW_BLOCKS = 8  # DoRA's extra M x K / M x N work runs in this many row blocks
MIN_BLOCK_ROWS = 64


def row_blocks(rows: int) -> list[slice]:
    """About ROW_BLOCKS slices of ``rows`` rows (at least MIN_BLOCK_ROWS each): DoRA's extra
    M x K and M x N work runs block by block, so its temporaries stay an eighth of M x K or
    M x N, while the blocks stay large enough to run the GEMMs at full speed."""
    step = max(MIN_BLOCK_ROWS, -(-rows // ROW_BLOCKS))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _column_dots(dy: torch.Tensor, t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """sum over rows of dy * (t - bias) (N,) in float32, block by block."""
    total = torch.zeros(dy.shape[1], dtype=torch.float32, device=dy.device)
    for rows in row_blocks(dy.shape[0]):
        block = t[rows] if bias is None else t[rows] - bias
        total += (dy[rows] * block).sum(0, dtype=torch.float32)
    return total


def _add_scaled(addend: torch.Tensor | None, t: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``addend + t * scale`` (``t * scale`` without an addend; scale (N,) float32 against t
    (M, N)) in out's dtype, rounded once, written into ``out``. While torch.compile traces: a new
    tensor instead, converted only where the dtype differs, since torch 2.11's Dynamo drops every
    gradient of an autograd.Function whose output is a tensor its forward already held under
    another name (written in place, or returned by a ``.to()`` that changed nothing)."""
    if torch.compiler.is_compiling():
        result = t * scale if addend is None else torch.addcmul(addend, t, scale)
        return result if result.dtype == out.dtype else result.to(out.dtype)
    return torch.mul(t, scale, out=out) if addend is None else torch.addcmul(addend, t, scale, out=out)


class DoRALinearFunction(torch.autograd.Function):
    """DoRA: y = x W^T + b + (g - 1) * drop(x) W^T + g * s * drop(x) A^T B^T, W frozen.

    Shapes: x (M, K), W (N, K), b (N,), A (r, K), B (N, r), m (N,), dy (M, N); D = mask / (1-p)
    the dropout scale of each element of x; n = ||W + s B A||_row and g = m / n (N,), n a
    constant (PEFT detaches it). S = drop(x) A^T (M, r), L = s S B^T, z = drop(x) W^T (M, N).
    Write B_g = g * B (rows scaled, N x r): the LoRA op with B_g gives x W^T + b + g * L.

    Without dropout (drop(x) = x): y = g * (x W^T + L) + b, i.e. the LoRA op's output (no
    bias) scaled per column (on Triton inside the GEMM's epilogue, one pass over y). With dy_g = g * dy:
      dx = dy_g W + s (dy_g B) A,  dA = s (dy_g B)^T x,  dB = s dy_g^T S   (the LoRA backward of dy_g)
      dm = sum over rows of dy * (x W^T + L) / n = sum over rows of dy * (y - b) / (g n)
    With dropout: y = [x W^T + b + g * L] + (g - 1) * z, the bracket the LoRA op with B_g.
      The LoRA backward of dy with B_g gives dx_L = dy W + D * s (dy B_g) A,
      dA = s (dy B_g)^T drop(x) and dB_L = s dy^T S, so dB = g * dB_L (the g of B_g moves to
      the output side), and
      dx = dx_L + D * (((g - 1) * dy) W)          (z's path: one more GEMM, the math's minimum)
      dm = sum over rows of dy * (z + L) / n = (sum over rows of dy * z + rowsum(B * dB_L)) / n
    db = sum over rows of dy; dW is never computed.

    The LoRA forward and backward are the backend's ops; dropout draws its mask once, in the
    LoRA forward, and the second base product z reads it back from the keep bits.
    Saved for backward: what the LoRA op saves (x, W, A, B, S, keep bits), g and n (N,) and
    one M x N tensor: without dropout the output y itself (kept alive by the caller, so
    nothing is added while y is), with dropout z.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, fan_in_fan_out, backend):
        forward_op, _ = backend_ops(backend, x)
        norm = weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, backend)
        g = magnitude.detach().float() / norm
        if dropout_p == 0.0 and backend == "triton":  # the column scale in the GEMM's epilogue
            y, S, keep_bits = forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out,
                                         column_scale=g)
            kept = y
        elif dropout_p == 0.0:
            y_lora, S, keep_bits = forward_op(x, weight, None, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out)
            y = _add_scaled(bias, y_lora, g, out=y_lora)
            kept = y
        else:
            scaled_B = lora_B * g[:, None].to(lora_B.dtype)
            y, S, keep_bits = forward_op(x, weight, bias, lora_A, scaled_B, scaling, dropout_p, seed, fan_in_fan_out)
            w_t = weight if fan_in_fan_out else weight.t()
            kept = y.new_empty(y.shape)
            for rows in row_blocks(x.shape[0]):
                keep = unpack_keep_bits(keep_bits[rows], x.shape[1])
                torch.mm(x[rows].mul(1.0 / (1.0 - dropout_p)).masked_fill_(~keep, 0.0), w_t, out=kept[rows])
            y = _add_scaled(y, kept, g - 1.0, out=y)
        ctx.save_for_backward(x, weight, lora_A, lora_B, S, keep_bits, seed, bias, g, norm, kept)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.fan_in_fan_out = fan_in_fan_out
        remember_backend(ctx, backend, "dora_linear", x.shape[0], lora_A.shape[0])
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S, keep_bits, seed, bias, g, norm, kept = ctx.saved_tensors
        needs_dx, _, needs_dbias, needs_dA, needs_dB, needs_dm = ctx.needs_input_grad[:6]
        backward_op = backward_op_for(ctx, dy)
        dy = dy.contiguous()
        p = ctx.dropout_p
        dm = None
        if p == 0.0:
            if needs_dm:  # first, while only y and dy are alive
                dm = _column_dots(dy, kept, bias) / (g * norm)
            dx, dA, dB, _ = backward_op(
                (dy * g).to(dy.dtype), x, weight, lora_A, lora_B, S, keep_bits, ctx.scaling, p, seed,
                ctx.fan_in_fan_out, needs_dx, needs_dA, needs_dB, False,
            )
        else:
            scaled_B = lora_B * g[:, None].to(lora_B.dtype)
            dx, dA, dB, _ = backward_op(
                dy, x, weight, lora_A, scaled_B, S, keep_bits, ctx.scaling, p, seed, ctx.fan_in_fan_out,
                needs_dx, needs_dA, needs_dB or needs_dm, False,
            )
            if needs_dx:
                w = weight.t() if ctx.fan_in_fan_out else weight
                for rows in row_blocks(dy.shape[0]):
                    keep = unpack_keep_bits(keep_bits[rows], x.shape[1])
                    base = (dy[rows] * (g - 1.0)).to(dy.dtype) @ w
                    dx[rows] += base.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - p))
            if needs_dm:
                dm = (_column_dots(dy, kept, None) + (lora_B.float() * dB.float()).sum(1)) / norm
            if needs_dB:
                dB = dB.mul_(g[:, None].to(dB.dtype))
        if dm is not None:
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
    return run_fused(DoRALinearFunction, reference.dora_linear, x, weight, bias, lora_A, lora_B, (magnitude,),
                     scaling, dropout_p, training, fan_in_fan_out, validate_magnitude)
