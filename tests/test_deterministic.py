"""Deterministic mode: with torch.use_deterministic_algorithms(True) every backend gives
bitwise identical dx, dA, dB and dbias on two identical steps (the Triton backward then
reduces dB and dbias in a fixed order instead of with atomics), and stays within the 2x
rule of the reference."""

import pytest
import torch

import fastlora
from lora_cases import Case, assert_2x_rule, available_backends, fastlora_results, make_inputs, reference_results

BACKENDS = available_backends("cpu")
CASES = [
    Case(M=100, K=48, N=40, r=4, dropout_p=0.2),
    Case(M=130, K=64, N=72, r=16, fan_in_fan_out=True),  # M > 64: the TMA path in the interpreter
    Case(M=40, K=40, N=24, r=8, dtype=torch.float16, adapter_dtype=torch.float32, dropout_p=0.1),
]


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_two_identical_steps_are_bitwise_equal_and_exact(case, backend, deterministic):
    inputs = make_inputs(case)
    first, mask = fastlora_results(inputs, case, backend, seed=11)
    second, mask_again = fastlora_results(inputs, case, backend, seed=11)
    assert (mask is None) == (case.dropout_p == 0) and (mask is None or torch.equal(mask, mask_again))
    assert set(first) == {"y", "dx", "dA", "dB", "dbias"}
    for key in first:
        assert torch.equal(first[key], second[key]), f"{backend} {case} {key} differs between two identical steps"
    truth = reference_results(inputs, case, torch.float64, mask)
    plain = reference_results(inputs, case, case.dtype, mask)
    assert_2x_rule(first, truth, plain, case.dtype, label=f"{backend} {case} deterministic")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
def test_triton_backward_takes_no_atomics_in_deterministic_mode(deterministic, monkeypatch):
    from fastlora.ops import triton_ops

    launched = []
    real_launch = triton_ops.launch

    def recording(kernel, grid, args, meta, key, *rest, **kwargs):
        launched.append((key[0], meta))
        return real_launch(kernel, grid, args, meta, key, *rest, **kwargs)

    monkeypatch.setattr(triton_ops, "launch", recording)
    case = CASES[0]
    fastlora_results(make_inputs(case), case, "triton")
    output = [meta for name, meta in launched if name == "lora_grad_output_kernel"]
    assert output and not any(meta["NEEDS_DB"] or meta["NEEDS_DBIAS"] for meta in output)
    assert sum(name == "lora_grad_a_kernel" for name, _ in launched) == 2  # dA, and dB in a fixed order
