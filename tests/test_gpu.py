"""GPU-only checks (marker ``gpu``; skipped without CUDA): bf16 Triton kernels, large shapes
under the 2x-error rule, the auto backend, Inductor and CUDA graphs."""

import pytest
import torch
import torch.nn as nn

import fastlora
from lora_cases import Case, assert_2x_rule, fastlora_results, make_inputs, reference_results

pytestmark = pytest.mark.gpu

GPU_CASES = [
    Case(M=4096, K=1024, N=2048, r=16, dtype=torch.bfloat16),
    # the three cases that died of OutOfResources in the shrink kernel on an H100 (shared/gpu, 1)
    Case(M=1000, K=1000, N=1000, r=64, dtype=torch.bfloat16, dropout_p=0.1),
    Case(M=2048, K=1024, N=1024, r=8, dtype=torch.bfloat16, adapter_dtype=torch.float32, dropout_p=0.1),
    Case(M=300, K=200, N=100, r=16, dtype=torch.float32, dropout_p=0.2),
    Case(M=1, K=4096, N=4096, r=16, dtype=torch.bfloat16),
    Case(M=777, K=333, N=555, r=256, dtype=torch.float16, batch=2, fan_in_fan_out=True),
    Case(M=513, K=257, N=129, r=7, dtype=torch.bfloat16, strided=True, bias=False),
    # TMA + persistent GEMMs: M > 64, aligned rows; r = 64 and 128 take the rank-aware tiles
    Case(M=2048, K=4096, N=1024, r=64, dtype=torch.bfloat16, dropout_p=0.1),
    Case(M=1024, K=512, N=2048, r=128, dtype=torch.bfloat16, fan_in_fan_out=True, dropout_p=0.1),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_parity(case, backend):
    inputs = make_inputs(case)
    ours, mask = fastlora_results_on_cuda(inputs, case, backend)
    truth = reference_results_on_cuda(inputs, case, torch.float64, mask)
    plain = reference_results_on_cuda(inputs, case, case.dtype, mask)
    assert_2x_rule(ours, truth, plain, case.dtype, label=f"{backend} {case}")


def fastlora_results_on_cuda(inputs, case, backend):
    return fastlora_results({k: to_cuda(v) for k, v in inputs.items()}, case, backend, device="cuda")


def reference_results_on_cuda(inputs, case, dtype, mask):
    return reference_results({k: to_cuda(v) for k, v in inputs.items()}, case, dtype, mask, device="cuda")


def to_cuda(v):
    return v.cuda() if isinstance(v, torch.Tensor) else v


def test_auto_follows_the_measured_table_on_cuda():
    from fastlora import _backend

    cuda = torch.device("cuda")
    assert _backend.resolve(cuda, M=1, r=16) == _backend.AUTO_ON_CUDA[("decode", "r<=16")]
    assert _backend.resolve(cuda, M=8192, r=64) == _backend.AUTO_ON_CUDA[("large", "r>16")]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replays_draw_new_dropout_masks(backend):
    """A captured forward draws a fresh dropout mask at every replay, on either backend."""
    torch.manual_seed(0)
    layer = fastlora.Linear(256, 256, r=16, lora_dropout=0.5).cuda()
    nn.init.normal_(layer.lora_B)
    x = torch.ones(128, 256, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with fastlora.use_backend(backend), torch.cuda.stream(stream):
        for _ in range(2):
            layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with fastlora.use_backend(backend), torch.cuda.graph(graph):
        y = layer(x)
    outputs = []
    for _ in range(2):
        graph.replay()
        outputs.append(y.clone())
    assert not torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_inductor_compiles_a_training_step(backend):
    torch.manual_seed(0)
    model = nn.Sequential(fastlora.Linear(256, 512, r=16, lora_dropout=0.1), nn.GELU(), fastlora.Linear(512, 256, r=16))
    model = model.cuda().to(torch.bfloat16)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    with fastlora.use_backend(backend):
        compiled = torch.compile(model, fullgraph=True)
        loss = compiled(x).float().square().mean()
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_cuda_graph_captures_a_training_step():
    torch.manual_seed(0)
    layer = fastlora.Linear(512, 512, r=16, lora_dropout=0.1).cuda().to(torch.bfloat16)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (autotuning) outside the capture
            layer(x).float().sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    layer.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        layer(x).float().sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(layer.lora_A.grad).all() and layer.lora_A.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_host_device_sync_per_call(backend):
    """A forward + backward with dropout never waits for the GPU (sync debug mode raises)."""
    layer = fastlora.Linear(256, 384, r=16, lora_dropout=0.1).cuda().to(torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fastlora.use_backend(backend):
        layer(x).sum().backward()  # first call: compiles and picks configs, may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_a_config_too_big_for_the_gpu_is_dropped_at_launch(monkeypatch):
    """A real OutOfResources on the device: the launcher moves on to the next config."""
    import triton

    from fastlora.ops import launcher, triton_ops

    too_big = triton.Config({"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4)
    fits = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2)
    monkeypatch.setattr(triton_ops, "gemm_configs", lambda M, r_pad, *rest, **kw: [too_big, fits])
    launcher.forget_choices()
    case = Case(M=512, K=256, N=384, r=16, dtype=torch.bfloat16, dropout_p=0.1)
    inputs = make_inputs(case)
    ours, mask = fastlora_results_on_cuda(inputs, case, "triton")
    truth = reference_results_on_cuda(inputs, case, torch.float64, mask)
    plain = reference_results_on_cuda(inputs, case, case.dtype, mask)
    assert_2x_rule(ours, truth, plain, case.dtype, label=str(case))
    chosen = [c for key, c in launcher.chosen_configs().items() if "tma" in key[0] or "grad_input" in key[0]]
    assert chosen and all(c is fits for c in chosen)
    launcher.forget_choices()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_deterministic_mode_gives_bitwise_equal_steps(backend):
    """Under torch.use_deterministic_algorithms(True), two identical bf16 steps on the GPU give
    bitwise equal gradients (no atomics in the Triton backward)."""
    case = Case(M=4096, K=1024, N=2048, r=16, dtype=torch.bfloat16, dropout_p=0.1)
    inputs = {k: to_cuda(v) for k, v in make_inputs(case).items()}
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, _ = fastlora_results(inputs, case, backend, device="cuda")
        second, _ = fastlora_results(inputs, case, backend, device="cuda")
    finally:
        torch.use_deterministic_algorithms(before)
    for key in first:
        assert torch.equal(first[key], second[key]), f"{backend} {key}"


DORA_GPU_CASES = [
    Case(M=4096, K=1024, N=2048, r=16, dtype=torch.bfloat16),
    Case(M=2048, K=1024, N=1024, r=8, dtype=torch.bfloat16, adapter_dtype=torch.float32, dropout_p=0.1),
    Case(M=777, K=333, N=555, r=64, dtype=torch.float16, fan_in_fan_out=True, dropout_p=0.2),
    Case(M=16, K=4096, N=4096, r=16, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", DORA_GPU_CASES, ids=str)
def test_gpu_dora_parity(case, backend):
    """DoRA in bf16 / fp16 on the GPU (the Triton norm kernel's bf16 tl.dot included) under the
    2x-error rule against fastlora.reference.dora_linear."""
    from test_dora import check_case

    check_case(case, backend, device="cuda")



@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gpu_dequantize_is_bitsandbytes_bit_for_bit(backend, quant_type):
    """The Triton dequantizer (bf16 included, which the interpreter rounds differently) and the
    torch one against bitsandbytes' CUDA dequantize_4bit."""
    import bitsandbytes.functional as bnb_functional

    from fastlora.ops import dequant
    from fastlora.ops.weight4bit import from_params4bit
    from test_qlora import params4bit

    torch.manual_seed(0)
    for rows, cols, blocksize in [(4096, 4096, 64), (333, 555, 64), (96, 100, 32), (11008, 4096, 128)]:
        for nested in (False, True):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                weight = params4bit(torch.randn(rows, cols, dtype=dtype), quant_type, nested, blocksize, device="cuda")
                expected = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
                got = dequant.dequantize(from_params4bit(weight), dtype, backend,
                                         out=torch.empty(rows, cols, dtype=dtype, device="cuda"))
                assert torch.equal(got, expected), f"{backend} {quant_type} {rows}x{cols}/{blocksize} {nested} {dtype}"


QLORA_GPU_CASES = [
    (Case(M=4096, K=1024, N=2048, r=16, dtype=torch.bfloat16, dropout_p=0.1), "nf4", True, 64),
    (Case(M=2048, K=1024, N=1024, r=8, dtype=torch.bfloat16, adapter_dtype=torch.float32, dropout_p=0.1), "nf4", True, 64),
    (Case(M=777, K=336, N=555, r=64, dtype=torch.float16, dropout_p=0.2), "fp4", False, 128),
    (Case(M=16, K=4096, N=4096, r=16, dtype=torch.bfloat16), "nf4", True, 64),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case,quant_type,nested,blocksize", QLORA_GPU_CASES, ids=lambda v: str(v))
def test_gpu_qlora_parity(case, quant_type, nested, blocksize, backend):
    """QLoRA in bf16 / fp16 on the GPU under the 2x-error rule against dequantize_4bit + reference."""
    from test_qlora import check_qlora_case

    check_qlora_case(case, quant_type, nested, blocksize, backend, device="cuda")


@pytest.mark.parametrize("M", [1, 16, 64])
def test_gpu_in_gemm_dequant_decode_forward(M, monkeypatch):
    """The 4-bit decode forward (W dequantized in the GEMM's main loop) in bf16 on the GPU."""
    from fastlora.ops import qlora_linear as qlora_module
    from test_qlora import check_qlora_case

    monkeypatch.setattr(qlora_module, "IN_GEMM_DEQUANT_MAX_ROWS", 64)
    check_qlora_case(Case(M=M, K=4096, N=4096, r=16, dtype=torch.bfloat16), "nf4", True, 64, "triton", device="cuda")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("M,adapters,adapter_dtype", [(16, 16, torch.bfloat16), (4096, 16, torch.bfloat16),
                                                      (333, 64, torch.bfloat16), (700, 5, torch.float32)])
def test_gpu_mixed_batch_trains(M, adapters, adapter_dtype, backend):
    """A mixed batch in bf16 on the GPU (Triton: gathered shrink / expand forward, four launches
    backward; torch: the segmented bmm) against each row with its own adapter: y, dx, dA, dB, db."""
    from test_multi_adapter import check_mixed_batch

    check_mixed_batch(backend, M, adapters, (16,) * adapters, torch.bfloat16, adapter_dtype, K=1024, N=2048,
                      device="cuda")


def test_gpu_mixed_batch_captures_in_a_cuda_graph_and_compiles():
    """No host-device sync: the Triton mixed op is captured in a CUDA graph (a sync would raise
    there) and replays with a new index; torch.compile(fullgraph=True) calls the registered op."""
    g = torch.Generator().manual_seed(9)
    M, K, N, n, r = 64, 512, 256, 8, 16
    x = torch.randn(M, K, generator=g).cuda().bfloat16()
    weight = (torch.randn(N, K, generator=g) / K**0.5).cuda().bfloat16()
    lora_A = (torch.randn(n, r, K, generator=g) / K**0.5).cuda().bfloat16()
    lora_B = torch.randn(n, N, r, generator=g).cuda().bfloat16()
    scaling = torch.rand(n, generator=g).cuda() + 0.5
    index = torch.randint(-1, n, (M,), generator=g).cuda()
    with torch.no_grad(), fastlora.use_backend("triton"):
        def call():
            return fastlora.multi_lora_linear(x, weight, None, lora_A, lora_B, scaling, index)

        call()  # configs chosen before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call()
        index.copy_(torch.randint(-1, n, (M,), generator=g).cuda())
        graph.replay()
        torch.testing.assert_close(captured, call(), rtol=0, atol=0)
        from test_multi_adapter import traced_code

        assert "fastlora.mixed_lora_fwd_triton" in traced_code(call)
        torch.testing.assert_close(torch.compile(call, fullgraph=True)(), call(), rtol=1e-2, atol=1e-2)
