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


@pytest.mark.parametrize("shape,tma", [
    ((130, 48, 40), True),    # M > 64, rows 16-byte aligned: TMA + persistent GEMMs
    ((130, 45, 40), False),   # K * 4 bytes not a multiple of 16: pointer kernels
    ((40, 48, 40), False),    # decode-sized M: pointer kernels
])
def test_the_launcher_picks_tma_only_where_it_can_read(shape, tma):
    from fastlora.ops import launcher

    launcher.forget_choices()
    M, K, N = shape
    x = torch.randn(M, K, requires_grad=True)
    A = torch.randn(4, K, requires_grad=True)
    B = torch.randn(N, 4, requires_grad=True)
    with fastlora.use_backend("triton"):
        fastlora.lora_linear(x, torch.randn(N, K), None, A, B, 0.5, 0.2, True).sum().backward()
    kernels = {key[0] for key in launcher.chosen_configs()}
    assert ({"lora_forward_tma", "lora_grad_input_tma"} <= kernels) == tma
    assert ({"lora_forward_kernel", "lora_grad_input_kernel"} <= kernels) == (not tma)
    launcher.forget_choices()


@pytest.mark.parametrize("dropout_p,launches", [(0.0, ["lora_forward_kernel"]),
                                                (0.2, ["lora_shrink_kernel", "lora_forward_kernel"])])
def test_decode_forward_is_one_launch_without_dropout(monkeypatch, dropout_p, launches):
    from fastlora.ops import triton_ops

    seen = []
    for name in ("lora_shrink_kernel", "lora_forward_kernel"):
        kernel = getattr(triton_ops, name)
        monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, _name=name, **k: seen.append(_name) or _run(*a, **k))
    x = torch.randn(3, 40)
    with fastlora.use_backend("triton"):
        fastlora.lora_linear(x, torch.randn(24, 40), None, torch.randn(4, 40), torch.randn(24, 4), 0.5, dropout_p, True)
    assert seen == launches


def test_narrow_m_splits_the_memory_bound_passes_over_columns():
    """Too few row blocks for every SM (the interpreter counts 4): the shrink splits over K
    and G over N, each program writing float32 partials summed in a fixed order."""
    from fastlora.ops import triton_ops

    cpu = torch.device("cpu")
    assert triton_ops.column_splits(20, 48, 16, 32, cpu) == 2  # 2 row blocks, 2 column blocks
    assert triton_ops.column_splits(20, 4096, 16, 32, cpu) == 2  # about one program per SM
    assert triton_ops.column_splits(200, 4096, 16, 32, cpu) == 1  # 13 row blocks fill 4 SMs
    assert triton_ops.column_splits(1, 4096, 16, 32, cpu) == 4
    S = torch.zeros(20, 4)
    assert triton_ops.split_buffer(S, 1).data_ptr() == S.data_ptr()
    assert triton_ops.split_buffer(S, 3).shape == (3, 20, 4)
