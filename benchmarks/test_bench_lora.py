"""pytest-benchmark entry points for the same cases as ``python -m benchmarks.run``.

    pytest benchmarks/ --benchmark-only --benchmark-autosave
    pytest benchmarks/ --benchmark-only --benchmark-compare

The benchmark fixture times the CPU or GPU call (on CUDA each call ends with a synchronize).
"""

import pytest
import torch

from benchmarks import harness
from benchmarks.providers import build, make_weights, provider_names
from benchmarks.run import suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPES = suite(DEVICE, quick=True)


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", provider_names(DEVICE))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s.M}-K{s.K}-N{s.N}-r{s.r}-p{s.dropout}")
def test_lora_layer(benchmark, shape, provider, mode):
    weights = make_weights(shape, DTYPE, DEVICE)
    module = build(provider, weights, shape.dropout)
    x = torch.randn(shape.M, shape.K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(shape.M, shape.N, device=DEVICE, dtype=DTYPE)
    if provider != "base":
        assert harness.check_against_reference(module, build("reference", weights, shape.dropout), x, dy) is None
    fn = harness.mode_function(module, x, dy, mode)

    def call():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(call)
