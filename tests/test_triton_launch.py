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


def test_the_weights_tma_descriptor_is_built_once_per_pointer_and_block():
    from fastlora.ops import triton_ops

    if triton_ops.TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors")
    weight = torch.nn.Parameter(torch.randn(64, 48), requires_grad=False)
    first = triton_ops.weight_descriptor(weight, [32, 16])
    assert triton_ops.weight_descriptor(weight, [32, 16]) is first
    other_block = triton_ops.weight_descriptor(weight, [16, 16])
    assert other_block is not first and other_block.block_shape == [16, 16]
    weight.data = torch.randn(64, 48)  # a new storage (e.g. after .to(device)): a new descriptor
    fresh = triton_ops.weight_descriptor(weight, [32, 16])
    assert fresh is not first and fresh.base.data_ptr() == weight.data_ptr()


def test_a_per_call_weight_copy_is_freed_without_the_garbage_collector():
    """Autocast's cast of an fp32 weight is a new tensor each call: its descriptor is not kept
    on it (the descriptor holds the tensor, a cycle only gc frees), so it dies with its last
    reference even with gc disabled (issue 36, 4)."""
    import gc
    import weakref

    from fastlora.ops import triton_ops

    if triton_ops.TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors")
    weight = torch.nn.Parameter(torch.randn(64, 48), requires_grad=False)
    gc.disable()
    try:
        copy = weight.to(torch.float16)
        descriptor = triton_ops.weight_descriptor(copy, [32, 16])
        assert descriptor.base is copy and "_fastlora_tma_descriptors" not in copy.__dict__
        alive = weakref.ref(copy)
        del copy, descriptor
        assert alive() is None
    finally:
        gc.enable()


def test_host_side_torch_ops_per_call(monkeypatch):
    """The torch ops the triton backend issues around its kernels, counted with the kernels
    themselves stubbed out: allocations, the memset of the atomics' buffer, partial sums."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastlora.ops import triton_ops

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def no_kernel(kernel, grid, args, meta, key, configs, *rest, **kwargs):
        if callable(args):  # what a launch does besides running the kernel: build its arguments
            args(configs()[0].kwargs)

    monkeypatch.setattr(triton_ops, "launch", no_kernel)
    monkeypatch.setattr(triton_ops, "gemm_on_tma", lambda *args, **kwargs: False)
    M, K, N, R = 256, 64, 48, 8
    x, weight, A, B = torch.randn(M, K), torch.randn(N, K), torch.randn(R, K), torch.randn(N, R)
    seed = torch.zeros(1, dtype=torch.int64)
    with Count() as forward:
        y, S, bits = triton_ops.forward(x, weight, torch.randn(N), A, B, 0.5, 0.1, seed, False)
    with Count() as backward:
        triton_ops.backward(torch.randn(M, N), x, weight, A, B, S, bits, 0.5, 0.1, seed, False, True, True, True, True)
    allocations = [n for n in forward.names if n != "randn"]
    assert sorted(allocations) == ["new_empty", "new_empty", "new_empty", "unsqueeze"]  # y, S, bits; S as (1, M, r)
    ops = [n for n in backward.names if n != "randn"]
    # G, one memset for dB + dbias (and their views), dx, G as (1, M, r), dA's partials and their sum
    assert ops == ["new_empty", "new_zeros", "slice", "view", "slice", "new_empty", "unsqueeze", "new_empty", "sum"]
