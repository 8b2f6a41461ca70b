"""The triton backend really runs the Triton kernels (on CPU through TRITON_INTERPRET=1)."""

import pytest
import torch

import fastlora
from lora_cases import available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends("cpu"), reason="triton is not installed")


def test_every_kernel_launches(monkeypatch):
    from fastlora.ops import triton_ops

    launches = []
    for name in ("lora_shrink_kernel", "lora_forward_kernel", "lora_grad_output_kernel",
                 "lora_grad_input_kernel", "lora_grad_a_kernel"):
        kernel = getattr(triton_ops, name)

        def counted(*args, _run=kernel.run, _name=name, **kwargs):
            launches.append(_name)
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    x = torch.randn(9, 20, requires_grad=True)
    A = torch.randn(4, 20, requires_grad=True)
    B = torch.randn(12, 4, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    with fastlora.use_backend("triton"):
        y = fastlora.lora_linear(x, torch.randn(12, 20), bias, A, B, 0.5, 0.1, True)
        y.sum().backward()
    assert sorted(launches) == sorted(
        ["lora_shrink_kernel", "lora_forward_kernel", "lora_grad_output_kernel",
         "lora_grad_input_kernel", "lora_grad_a_kernel"]
    )


def test_only_needed_gradients_are_computed(monkeypatch):
    from fastlora.ops import triton_ops

    launches = []
    kernel = triton_ops.lora_grad_input_kernel
    monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, **k: launches.append(1) or _run(*a, **k))
    x = torch.randn(9, 20)  # no grad for x: the dx GEMM must not run
    A = torch.randn(4, 20, requires_grad=True)
    B = torch.randn(12, 4, requires_grad=True)
    with fastlora.use_backend("triton"):
        fastlora.lora_linear(x, torch.randn(12, 20), None, A, B, 0.5).sum().backward()
    assert launches == []
    assert A.grad is not None and B.grad is not None
