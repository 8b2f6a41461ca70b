"""Mixed batches: one adapter per row, the rank-r work of every adapter in one pass per layer.

``multi_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_index)``:
    y[m] = x[m] W^T + b + scaling[i] * drop_i(x[m]) A[i]^T B[i]^T   with i = adapter_index[m],
    and y[m] = x[m] W^T + b where i = -1 (no adapter).
Shapes: x (M, K); lora_A (n, r, K) and lora_B (n, N, r), adapters of smaller rank zero-padded
to r; scaling (n,); adapter_index (M,) integer, on x's device (it never leaves it: no
host-device sync). Rows of adapter i train adapter i only.

The torch path is a segmented batched matmul without a loop over adapters: rows are sorted
by adapter (on the device) and laid out in tiles of T rows, each segment padded to whole
tiles, so every tile belongs to one adapter (rows without an adapter get a zero adapter;
padding slots repeat a row and are never read back);
one ``bmm`` against each tile's gathered A gives S, one against its gathered B the rank-r
term, which is read back in the rows' order. The layout's size is known from M, n and T
alone (at most M + (n + 1)(T - 1) rows), so nothing waits on the device. Its cost is a
single adapter's rank-r work on M + n T rows (T = min(64, M / (n + 1)), at least 1), plus the
copies of x into and of the term out of the tiles; autograd differentiates it.

The cpp backend (CPU, eager calls without dropout) runs ``MixedLoRAFunction`` instead: the
rows sorted by adapter once, two GEMMs per adapter on its gathered rows in C++, the term
added into the base output in place (csrc/mixed_lora_cpu.cpp). The Triton backend runs
inference (nothing needs a gradient) on a gathered shrink and expand over the same tile
layout (kernels/mixed_lora.py), reading x's rows and writing y's in place through the
layout's row index, nothing copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastlora import _backend
from fastlora.ops.lora_linear import _check_tensor, _describe

MAX_TILE_ROWS = 64


def tile_rows(rows: int, adapters: int) -> int:
    """T: rows per tile for ``rows`` rows over ``adapters`` adapters (and the no-adapter segment)."""
    return max(1, min(MAX_TILE_ROWS, rows // (adapters + 1)))


def tile_layout(index: torch.Tensor, adapters: int, tile: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each row goes: (position (M,) of row m in the tiled layout, adapter (tiles,) of
    each tile, number of tiles). Segment s (adapter s; s = adapters: no adapter) starts at a
    multiple of ``tile``; all on the index's device."""
    segment = torch.where(index < 0, adapters, index).long()
    counts = torch.zeros(adapters + 1, dtype=torch.long, device=index.device).scatter_add_(
        0, segment, torch.ones_like(segment))  # bincount, with a size known before it runs
    padded = (counts + tile - 1) // tile * tile
    start = torch.cumsum(counts, 0) - counts
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(segment, stable=True)
    sorted_segment = segment[order]
    rank = torch.arange(index.numel(), device=index.device) - start[sorted_segment]
    position = torch.empty_like(order)
    position[order] = padded_end[sorted_segment] - padded[sorted_segment] + rank
    tiles = -(-(index.numel() + (adapters + 1) * (tile - 1)) // tile)
    first_rows = torch.arange(tiles, device=index.device) * tile
    tile_adapter = torch.searchsorted(padded_end, first_rows, right=True).clamp_(max=adapters)
    return position, tile_adapter, tiles


def multi_lora_term(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
                    index: torch.Tensor) -> torch.Tensor:
    """scaling[i] * x[m] A[i]^T B[i]^T for every row m (i = index[m], 0 where i = -1), (M, N)
    in the adapters' dtype; x (M, K) already in that dtype (and dropped, in training)."""
    M, K = x.shape
    n, N, r = lora_B.shape
    tile = tile_rows(M, n)
    position, tile_adapter, tiles = tile_layout(index, n, tile)
    zero_A = lora_A.new_zeros((1, r, K))
    zero_B = lora_B.new_zeros((1, N, r))
    A = torch.cat((lora_A * scaling.to(lora_A.dtype)[:, None, None], zero_A))[tile_adapter]  # (tiles, r, K)
    B = torch.cat((lora_B, zero_B))[tile_adapter]  # (tiles, N, r)
    # the rows in tile order; padding slots repeat row 0, whose results are never read back
    source = torch.zeros(tiles * tile, dtype=torch.long, device=x.device).index_copy_(
        0, position, torch.arange(M, device=x.device))
    tiled = x.index_select(0, source).view(tiles, tile, K)
    S = torch.bmm(tiled, A.transpose(1, 2))  # (tiles, tile, r)
    term = torch.bmm(S, B.transpose(1, 2)).view(tiles * tile, N)
    return term.index_select(0, position)


def validate_mixed(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
                   adapter_index: object) -> None:
    """ValueError / TypeError naming the argument; the index's range is checked in eager mode
    on a CPU only (on a GPU that would wait for the device, and a traced graph cannot branch
    on it)."""
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
    if eager_cpu and rows and (adapter_index.min() < -1 or adapter_index.max() >= n):
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


class MixedLoRAFunction(torch.autograd.Function):
    """y = base + s_i x A_i^T B_i^T per row (i = index[m]; nothing for -1), without dropout,
    on the cpp backend's kernels (csrc/mixed_lora_cpu.cpp), added into ``base`` in place.

    Shapes: base, dy (M, N); x (M, K); A (n, r, K); B (n, N, r); s (n,). With S_i = s_i x_i A_i^T
    for the rows x_i of adapter i and G_i = dy_i B_i:
      d base = dy;  dx_i = s_i G_i A_i;  dA_i = s_i G_i^T x_i;  dB_i = dy_i^T S_i,
    each adapter's gradients from its own rows only. Saved: x, A, B, s, the index and S (M x r).
    """

    @staticmethod
    def forward(ctx, base, x, lora_A, lora_B, scaling, index):
        S = torch.ops.fastlora.mixed_lora_fwd_cpp(x, lora_A, lora_B, scaling, index, base)
        ctx.mark_dirty(base)
        ctx.save_for_backward(x, lora_A, lora_B, scaling, index, S)
        return base

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, lora_A, lora_B, scaling, index, S = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[1]
        dx = torch.zeros_like(x) if needs_dx else x.new_empty((0,))
        dA, dB = torch.ops.fastlora.mixed_lora_bwd_cpp(dy.contiguous(), x, lora_A, lora_B, scaling, index, S, dx,
                                                        needs_dx)
        return (dy, dx if needs_dx else None, dA if ctx.needs_input_grad[2] else None,
                dB if ctx.needs_input_grad[3] else None, None, None)


def add_mixed_lora(
    base: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor | list[float],
    adapter_index: torch.Tensor,
    dropout_p: list[float] | float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``base`` (..., N) plus the rank-r part of ``multi_lora_linear``, scaling[i] *
    drop_i(x[m]) A[i]^T B[i]^T, shapes as there (a layer's base output plus its mixed
    adapters). Eager calls without dropout run the backend's kernels: cpp's (forward and
    backward), Triton's gathered shrink / expand (inference only: nothing needs a gradient);
    every other call runs the torch path's segmented batched matmul."""
    _check_tensor("x", x)
    scaling = torch.as_tensor(scaling, dtype=torch.float32, device=x.device)
    validate_mixed(x, lora_A, lora_B, scaling, adapter_index)
    rows = x.reshape(-1, x.shape[-1]).to(lora_A.dtype)
    out = base.reshape(-1, base.shape[-1])
    index = adapter_index.long()
    rates = [float(dropout_p)] * lora_A.shape[0] if isinstance(dropout_p, (int, float)) else [float(p) for p in dropout_p]
    if len(rates) != lora_A.shape[0] or not all(0.0 <= p < 1.0 for p in rates):
        raise ValueError(f"dropout_p must be one rate in [0, 1) or one per adapter ({lora_A.shape[0]}), got {dropout_p!r}")
    dropout = training and any(rates)
    eager = not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
    backend = _backend.resolve(x.device, rows.shape[0], lora_A.shape[1]) if eager and not dropout else "torch"
    trains = torch.is_grad_enabled() and any(t.requires_grad for t in (base, x, lora_A, lora_B))
    if backend == "triton" and not trains:
        from fastlora.ops.mixed_triton import add_mixed_lora_triton

        return add_mixed_lora_triton(out, rows, lora_A, lora_B, scaling, index).reshape(base.shape)
    if backend == "cpp":
        from fastlora.ops import cpp_ops

        cpp_ops.load()
        out = MixedLoRAFunction.apply(out.contiguous(), rows.contiguous(), lora_A.contiguous(), lora_B.contiguous(),
                                      scaling, index)
        return out.reshape(base.shape)
    if dropout:
        row_rate = torch.tensor(rates + [0.0], device=x.device)[torch.where(index < 0, len(rates), index)]
        keep = torch.rand(rows.shape, device=x.device) >= row_rate[:, None]
        rows = rows * keep / (1.0 - row_rate[:, None]).to(rows.dtype)
    term = multi_lora_term(rows, lora_A, lora_B, scaling, index)
    return (out + term.to(out.dtype)).reshape(base.shape)
