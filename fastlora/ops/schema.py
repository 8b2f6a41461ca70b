"""The op schema every backend implements, and the fake (meta) kernels shared by all of them.

Each backend registers two ops under the ``fastlora`` namespace, ``lora_fwd_<backend>`` and
``lora_bwd_<backend>``, with the signatures below. ``torch.compile`` sees them as opaque ops
(or, for Triton, traces into the kernels) and uses these fake kernels for shapes.

Forward:  (x (M, K), weight (N, K) | (K, N), bias (N,)?, lora_A (r, K), lora_B (N, r),
           scaling, dropout_p, seed (1,) int64?, fan_in_fan_out)
          -> y (M, N) in x's dtype, S = drop(x) A^T (M, r) in float32, keep_bits
Backward: (dy (M, N), x, weight, lora_A, lora_B, S, keep_bits, scaling, dropout_p, seed,
           fan_in_fan_out, needs_dx, needs_dA, needs_dB, needs_dbias)
          -> dx (M, K), dA (r, K), dB (N, r), dbias (N,); a gradient that is not needed is
             returned as an empty tensor.

keep_bits is the dropout keep-mask packed eight elements a byte, (M, ceil(K / 8)) uint8, bit
k % 8 of byte [m, k // 8] for element (m, k), drawn once by the forward and read by the
backward: ``triton`` and ``cpp`` draw it from ``seed`` (kernels/dropout.py and csrc/philox.h
give the same bits), ``torch`` from torch's generator (its seed is None). An empty uint8 tensor
without dropout. Dropout is on iff dropout_p > 0 (lora_linear passes 0 outside training).

Mixed batches (fastlora/ops/multi_lora.py) have their own pair, ``mixed_lora_fwd_<backend>`` /
``mixed_lora_bwd_<backend>``, for one adapter per row (index[m] = -1: none):
Forward:  (x (M, K), lora_A (n, r, K), lora_B (n, N, r), scaling (n,) float32, index (M,)
           int64, y (M, N) holding the base output, written in place)
          -> S = scaling[i] x A_i^T per row (M, r) float32 (zeros for rows without an adapter),
             after y[m] += S[m] B_i^T
Backward: (dy (M, N), x, lora_A, lora_B, scaling, index, S, needs_dx)
          -> dx (M, K) (empty when not needed), dA (n, r, K), dB (n, N, r), each adapter's
             from its own rows only.
"""

from __future__ import annotations

import torch

FORWARD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
    "float dropout_p, Tensor? seed, bool fan_in_fan_out) -> (Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor S, Tensor keep_bits, "
    "float scaling, float dropout_p, Tensor? seed, bool fan_in_fan_out, bool needs_dx, bool needs_dA, "
    "bool needs_dB, bool needs_dbias) -> (Tensor, Tensor, Tensor, Tensor)"
)


def no_keep_bits(x: torch.Tensor) -> torch.Tensor:
    """The keep_bits of a backend that does not keep the mask: an empty uint8 tensor."""
    return x.new_empty((0,), dtype=torch.uint8)


def keep_bits_for(x: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Uninitialised keep_bits (M, ceil(K / 8)) for x (M, K) when dropout is on, else empty."""
    if dropout_p == 0.0:
        return no_keep_bits(x)
    return x.new_empty((x.shape[0], (x.shape[1] + 7) // 8), dtype=torch.uint8)


def fake_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = x.new_empty((x.shape[0], lora_B.shape[0]))
    S = x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)
    return y, S, keep_bits_for(x, dropout_p)


def empty_gradient(like: torch.Tensor, needed: bool, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """An uninitialised gradient shaped like ``like`` (or ``shape``), or an empty tensor."""
    if not needed:
        return like.new_empty((0,))
    return like.new_empty(like.shape if shape is None else shape)


def fake_backward(
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
    return (
        empty_gradient(x, needs_dx),
        empty_gradient(lora_A, needs_dA),
        empty_gradient(lora_B, needs_dB),
        empty_gradient(dy, needs_dbias, (dy.shape[1],)),
    )


MIXED_FORWARD_SCHEMA = "(Tensor x, Tensor lora_A, Tensor lora_B, Tensor scaling, Tensor index, Tensor(a!) y) -> Tensor"
MIXED_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor lora_A, Tensor lora_B, Tensor scaling, Tensor index, Tensor S, bool needs_dx) "
    "-> (Tensor, Tensor, Tensor)"
)


def fake_mixed_forward(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
                       index: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], lora_A.shape[1]), dtype=torch.float32)


def fake_mixed_backward(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scaling: torch.Tensor, index: torch.Tensor, S: torch.Tensor,
                        needs_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return empty_gradient(x, needs_dx), torch.empty_like(lora_A), torch.empty_like(lora_B)


def define_ops(backend: str) -> None:
    """Define ``fastlora::lora_fwd_<backend>`` / ``lora_bwd_<backend>`` with their fake kernels."""
    for kind, schema, fake in (("fwd", FORWARD_SCHEMA, fake_forward), ("bwd", BACKWARD_SCHEMA, fake_backward)):
        name = f"fastlora::lora_{kind}_{backend}"
        torch.library.define(name, schema)
        torch.library.register_fake(name, fake)


def define_mixed_ops(backend: str) -> None:
    """Define ``fastlora::mixed_lora_fwd_<backend>`` / ``mixed_lora_bwd_<backend>`` with their fake kernels."""
    for kind, schema, fake in (("fwd", MIXED_FORWARD_SCHEMA, fake_mixed_forward),
                               ("bwd", MIXED_BACKWARD_SCHEMA, fake_mixed_backward)):
        name = f"fastlora::mixed_lora_{kind}_{backend}"
        torch.library.define(name, schema)
        torch.library.register_fake(name, fake)
