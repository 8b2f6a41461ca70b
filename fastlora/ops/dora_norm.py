"""DoRA's weight norm ``||W + s B A||`` per output row, without the N x K matrix.

Every backend computes the same quantity, in float32, detached (PEFT's DoRA treats it as a
constant, DoRA paper section 4.3):

    n_n = sqrt(sum_k (W_nk + s * (B A)_nk)^2)          n = 0 .. N-1

Why tiles of ``W + s B A`` and not the factored form
``||W_n||^2 + 2 s B_n . (W A^T)_n + s^2 B_n (A A^T) B_n^T``: both read W once per call
(``W A^T`` reads all of it, and A changes every step) and both cost N K r multiply-adds, but
the factored form subtracts terms of size ``||W_n||^2`` to get ``n_n^2``, so its error is
about ``eps * ||W_n||^2 / n_n``: where ``s B_n A`` nearly cancels row n (n_n << ||W_n||) it
is ``||W_n|| / n_n`` times worse than the dense sum, whose error is ``eps * ||W_n||``. The
tiled dense sum has the dense form's accuracy (better than PEFT's whenever PEFT works in a
half dtype, since the elements are formed in float32) and the factored form's cost, and
keeps no ``||W||^2`` that a changed W could leave stale.

  torch / cpp: row blocks of ``W.float() + s B A`` (at most ``BLOCK_ELEMENTS`` float32
               elements each, never the whole N x K) reduced by ``torch.linalg.vector_norm``.
  triton:      one kernel (kernels/dora_norm.py): each program owns BLOCK_N rows, forms
               ``W + s B A`` tile by tile in registers and keeps only the running sum of
               squares, so W is read once and nothing of size N x K is written.
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 22  # float32 elements of one row block of the torch path (16 MB)


def weight_norm_torch(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """n (N,) float32 from weight (N, K) (or (K, N) with ``fan_in_fan_out``), lora_A (r, K),
    lora_B (N, r), in row blocks of at most BLOCK_ELEMENTS float32 elements."""
    with torch.no_grad():
        w = weight.t() if fan_in_fan_out else weight
        rows, cols = w.shape
        A = lora_A.detach().float()
        B = lora_B.detach().float()
        step = max(1, BLOCK_ELEMENTS // max(cols, 1))
        parts = [
            torch.linalg.vector_norm(torch.addmm(w[i : i + step].float(), B[i : i + step], A, alpha=scaling), dim=1)
            for i in range(0, rows, step)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    backend: str,
) -> torch.Tensor:
    """DoRA's row norm n (N,) in float32 on ``backend`` (``triton`` runs the fused kernel; ``torch``
    and ``cpp`` the row-block path, which on a CPU is what a C++ loop would do)."""
    if backend == "triton":
        from fastlora.ops import dora_triton

        return dora_triton.weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    return weight_norm_torch(weight, lora_A, lora_B, scaling, fan_in_fan_out)
