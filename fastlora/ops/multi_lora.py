"""Mixed batches: one adapter per row, the rank-r work of every adapter in one pass per layer.

``multi_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_index)``:
    y[m] = x[m] W^T + b + scaling[i] * drop_i(x[m]) A[i]^T B[i]^T   with i = adapter_index[m],
    and y[m] = x[m] W^T + b where i = -1 (no adapter).
Shapes: x (M, K); lora_A (n, r, K) and lora_B (n, N, r), adapters of smaller rank zero-padded
to r; scaling (n,); adapter_index (M,) integer, on x's device (it never leaves it: no
host-device sync). Rows of adapter i train adapter i only.

The rank-r term is one op per backend, registered with ``torch.library`` (schema and fake
kernels in schema.py) so torch.compile and CUDA graphs take it, run by ``MixedLoRAFunction``:
``fastlora::mixed_lora_fwd_<backend>`` adds it into the base output in place and returns S
(M x r), ``mixed_lora_bwd_<backend>`` gives dx, dA, dB. torch (mixed_torch.py): a segmented
batched matmul on the tile layout (mixed_layout.py); triton (mixed_triton.py,
kernels/mixed_lora.py): a gathered shrink and expand forward, and four launches backward;
cpp (csrc/mixed_lora_cpu.cpp): rows sorted by adapter once, a GEMM pair per adapter with
many rows and dot products for the rows of adapters with few. None loops over adapters in
Python. Dropout draws each row's keep-mask at its adapter's rate in torch, keeps it as bits
(M x K / 8 bytes) and hands the op the dropped rows as a temporary, formed again in the
backward: nothing M x K is saved. float64 and torch.func transforms run the torch path's
math in plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastlora import _backend
from fastlora.ops.host_values import on_device
from fastlora.ops.lora_linear import (
    _check_tensor,
    _describe,
    backend_ops,
    backward_op_for,
    remember_backend,
    run_with_fallback,
)
from fastlora.ops.torch_ops import pack_keep_bits, unpack_keep_bits


def validate_mixed(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
                   adapter_index: object, check_range: bool = True) -> None:
    """ValueError / TypeError naming the argument; the index's range is checked (unless the
    caller built it: ``check_range=False``) in eager mode on a CPU only (on a GPU that would
    wait for the device, and a traced graph cannot branch on it)."""
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        _check_tensor(name, t)
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"lora_A must be (n, r, K) and lora_B (n, N, r); got lora_A {_describe(lora_A)}, "
                         f"lora_B {_describe(lora_B)}")
    n, r, K = lora_A.shape
    if x.shape[-1] != K or lora_B.shape[0] != n or lora_B.shape[2] != r:
        raise ValueError(f"lora_A (n, r, K) and lora_B (n, N, r) must agree with each other and with x (..., K); got "
                         f"x {_describe(x)}, lora_A {_describe(lora_A)}, lora_B {_describe(lora_B)}")
    if tuple(scaling.shape) != (n,):
        raise ValueError(f"scaling must have one value per adapter ({n},), got shape {tuple(scaling.shape)}")
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_index must be an int32 / int64 tensor, got {adapter_index!r:.80}")
    rows = x.numel() // max(K, 1)
    if tuple(adapter_index.shape) != (rows,):
        raise ValueError(f"adapter_index must have one entry per row of x ({rows},), got {_describe(adapter_index)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("adapter_index", adapter_index)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
    eager_cpu = adapter_index.device.type == "cpu" and not torch.compiler.is_compiling()
    if check_range and eager_cpu and rows and (adapter_index.min() < -1 or adapter_index.max() >= n):
        raise ValueError(f"adapter_index values must lie in [-1, {n}) (-1: no adapter), got "
                         f"{adapter_index.min().item()} .. {adapter_index.max().item()}")


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor | list[float],
    adapter_index: torch.Tensor,
    dropout_p: list[float] | float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """A mixed batch: row m of x (..., K) runs adapter ``adapter_index[m]`` (-1: none).

    weight (N, K), or (K, N) with ``fan_in_fan_out``; bias (N,) or None; lora_A (n, r, K),
    lora_B (n, N, r) in x's dtype or float32; scaling and dropout_p one value per adapter (or
    one dropout rate for all); adapter_index (M,) over the rows of x flattened to (M, K).
    Returns (..., N) in x's dtype; gradients for x, bias, lora_A, lora_B (each adapter from
    its own rows only), never for the weight. Dropout (in training) drops x for the rank-r
    term only, with each row's adapter's rate.
    """
    _check_tensor("x", x)
    w = weight.t() if fan_in_fan_out else weight
    return add_mixed_lora(F.linear(x, w, bias), x, lora_A, lora_B, scaling, adapter_index, dropout_p, training)


def dropped_rows(x: torch.Tensor, keep_bits: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) * keep / (1 - p_m): the rows as each one's adapter's dropout sees them (x itself
    without dropout: empty keep_bits)."""
    if keep_bits.numel() == 0:
        return x
    return x * unpack_keep_bits(keep_bits, x.shape[1]) * row_scale[:, None].to(x.dtype)


class MixedLoRAFunction(torch.autograd.Function):
    """y = base + s_i drop_i(x) A_i^T B_i^T per row (i = index[m]; nothing for -1) on a backend's
    mixed op, added into ``base`` in place (into a copy of it while torch.compile traces, which
    does not take an in-place autograd.Function).

    Shapes: base, dy (M, N); x (M, K); A (n, r, K); B (n, N, r); s (n,). With S_i = s_i x_i A_i^T
    for the rows x_i of adapter i and G_i = s_i dy_i B_i:
      d base = dy;  dx_i = G_i A_i;  dA_i = G_i^T x_i;  dB_i = dy_i^T S_i,
    each adapter's gradients from its own rows only. Dropout: keep_bits (M, ceil(K / 8)) uint8
    and row_scale (M,) = 1 / (1 - p_m) (empty tensors without dropout); x is replaced by
    x * keep * row_scale, formed as a temporary in the forward and again in the backward, and
    dx by dx * keep * row_scale. Saved: x (the caller's), A, B, s, the index, S (M x r) and the
    keep bits (M x K / 8 bytes): no M x K tensor of its own.
    """

    @staticmethod
    def forward(ctx, base, x, lora_A, lora_B, scaling, index, keep_bits, row_scale, backend):
        forward_op, _ = backend_ops(backend, x, "mixed_lora")
        if torch.compiler.is_compiling():
            base = base.clone()
        else:
            ctx.mark_dirty(base)
        S = forward_op(dropped_rows(x, keep_bits, row_scale), lora_A, lora_B, scaling, index, base)
        ctx.save_for_backward(x, lora_A, lora_B, scaling, index, S, keep_bits, row_scale)
        remember_backend(ctx, backend, "multi_lora_linear", x.shape[0], lora_A.shape[1])
        return base

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, lora_A, lora_B, scaling, index, S, keep_bits, row_scale = ctx.saved_tensors
        backward_op = backward_op_for(ctx, dy, "mixed_lora")
        needs_dx = ctx.needs_input_grad[1]
        rows = dropped_rows(x, keep_bits, row_scale)
        dx, dA, dB = backward_op(dy.contiguous(), rows, lora_A, lora_B, scaling, index, S, needs_dx)
        if needs_dx:
            dx = dropped_rows(dx, keep_bits, row_scale)
        return (dy, dx if needs_dx else None, dA if ctx.needs_input_grad[2] else None,
                dB if ctx.needs_input_grad[3] else None, None, None, None, None, None)


def add_mixed_lora(
    base: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor | list[float],
    adapter_index: torch.Tensor,
    dropout_p: list[float] | float = 0.0,
    training: bool = False,
    check_range: bool = True,
) -> torch.Tensor:
    """``base`` (..., N) plus the rank-r part of ``multi_lora_linear``, scaling[i] *
    drop_i(x[m]) A[i]^T B[i]^T, shapes as there (a layer's base output plus its mixed
    adapters), on the backend's registered mixed op; ``check_range=False`` for an index the
    caller built (a layer's, from adapter names). Dropout draws each row's keep-mask at its
    adapter's rate from torch's generator (no sync; replayed by activation checkpointing)."""
    _check_tensor("x", x)
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.to(device=x.device, dtype=torch.float32)
    else:
        scaling = on_device(tuple(float(s) for s in scaling), torch.float32, x.device)
    validate_mixed(x, lora_A, lora_B, scaling, adapter_index, check_range)
    rows = x.reshape(-1, x.shape[-1])
    out = base.reshape(-1, base.shape[-1])
    index = adapter_index.long().contiguous()
    n = lora_A.shape[0]
    rates = [float(dropout_p)] * n if isinstance(dropout_p, (int, float)) else [float(p) for p in dropout_p]
    if len(rates) != n or not all(0.0 <= p < 1.0 for p in rates):
        raise ValueError(f"dropout_p must be one rate in [0, 1) or one per adapter ({n}), got {dropout_p!r}")
    keep_bits, row_scale = rows.new_empty((0,), dtype=torch.uint8), rows.new_empty((0,), dtype=torch.float32)
    if training and any(rates):
        row_rate = on_device(tuple(rates) + (0.0,), torch.float32, x.device)[torch.where(index < 0, n, index)]
        keep_bits = pack_keep_bits(torch.rand(rows.shape, device=x.device) >= row_rate[:, None])
        row_scale = 1.0 / (1.0 - row_rate)
    if x.dtype == torch.float64 or torch._C._are_functorch_transforms_active():
        from fastlora.ops.mixed_torch import mixed_term

        term, _ = mixed_term(dropped_rows(rows, keep_bits, row_scale).to(lora_A.dtype), lora_A, lora_B, scaling, index)
        return (out + term.to(out.dtype)).reshape(base.shape)
    backend = _backend.resolve(x.device, rows.shape[0], lora_A.shape[1], "multi_lora_linear")
    if backend == "cpp":
        rows, out, lora_A, lora_B = rows.contiguous(), out.contiguous(), lora_A.contiguous(), lora_B.contiguous()

    def run(backend: str) -> torch.Tensor:
        return MixedLoRAFunction.apply(out, rows, lora_A, lora_B, scaling, index, keep_bits, row_scale, backend)

    return run_with_fallback(run, backend, "multi_lora_linear", x.device, rows.shape[0],
                             lora_A.shape[1]).reshape(base.shape)
