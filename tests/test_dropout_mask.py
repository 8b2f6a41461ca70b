"""The keep-mask follows its documented definition on every backend that draws it from a seed:
element (m, k) keeps iff uniform(word k % 4 of Philox-4x32-10(seed, m * ceil(K / 4) + k // 4))
>= p (kernels/dropout.py, csrc/philox.h), checked against a plain numpy Philox."""

import numpy as np
import pytest
import torch

import fastlora
from lora_cases import available_backends

SEEDED_BACKENDS = [b for b in ("triton", "cpp") if b in available_backends("cpu")]


def philox_words(seed: int, counters: np.ndarray) -> np.ndarray:
    """(len(counters), 4) uint32 words of Philox-4x32-10 on (counter_lo, counter_hi, 0, 0)."""
    mask32 = np.uint64(0xFFFFFFFF)
    c0 = counters.astype(np.uint64) & mask32
    c1 = counters.astype(np.uint64) >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        product_a = np.uint64(0xD2511F53) * c0
        product_b = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((product_b >> np.uint64(32)) ^ c1 ^ k0, product_b & mask32,
                          (product_a >> np.uint64(32)) ^ c3 ^ k1, product_a & mask32)
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask32
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask32
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def expected_mask(seed: int, M: int, K: int, p: float) -> np.ndarray:
    m, k = np.meshgrid(np.arange(M), np.arange(K), indexing="ij")
    counters = (m * ((K + 3) // 4) + k // 4).ravel()
    words = philox_words(seed, counters)[np.arange(counters.size), (k % 4).ravel()]
    signed = words.view(np.int32)
    uniform = np.where(signed < 0, ~signed, signed).astype(np.float32) * np.float32(4.6566127342e-10)
    return (uniform >= np.float32(p)).reshape(M, K)


@pytest.mark.parametrize("backend", SEEDED_BACKENDS)
@pytest.mark.parametrize("M,K", [(3, 7), (9, 130)])
def test_mask_follows_the_documented_philox_definition(backend, M, K):
    p = 0.3
    ones = torch.ones(M, K)
    eye = torch.eye(K)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())  # what lora_linear draws next
    torch.manual_seed(11)
    with fastlora.use_backend(backend):
        kept = fastlora.lora_linear(ones, torch.zeros(K, K), None, eye, eye, 1.0, p, True) != 0
    assert np.array_equal(kept.numpy(), expected_mask(seed, M, K, p))


@pytest.mark.parametrize("K", [1, 7, 8, 45, 256])
def test_torch_backend_bits_round_trip(K):
    """The torch backend keeps its mask as bits: packing then unpacking gives the mask back."""
    from fastlora.ops.torch_ops import pack_keep_bits, unpack_keep_bits

    keep = torch.rand(5, K, generator=torch.Generator().manual_seed(K)) >= 0.5
    bits = pack_keep_bits(keep)
    assert bits.shape == (5, (K + 7) // 8) and bits.dtype == torch.uint8
    assert torch.equal(unpack_keep_bits(bits, K), keep)
