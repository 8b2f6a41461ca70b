"""The Triton launcher survives configs that do not compile or fit, picks one config per
shape class, and reports clearly when nothing runs (on CPU through TRITON_INTERPRET=1)."""

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

import fastlora
import fastlora.reference as reference
from lora_cases import available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends("cpu"), reason="triton is not installed")


@pytest.fixture
def launcher():
    from fastlora.ops import launcher

    launcher.forget_choices()
    yield launcher
    launcher.forget_choices()


def gemm(BLOCK_M, BLOCK_N=32, BLOCK_K=32):
    return triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "GROUP_M": 4},
                         num_warps=4, num_stages=1)


def run_and_check(M=37, K=40, N=24, r=4):
    """fwd + bwd on the triton backend; output and gradients against the float64 reference."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((M, K), (N, K), (N,), (r, K), (N, r))]
    x, w, b, A, B = (t.float().requires_grad_(i != 1) for i, t in enumerate(tensors))
    with fastlora.use_backend("triton"):
        y = fastlora.lora_linear(x, w, b, A, B, 0.5)
    y.sum().backward()
    x64, w64, b64, A64, B64 = (t.requires_grad_(i != 1) for i, t in enumerate(tensors))
    y64 = reference.lora_linear(x64, w64, b64, A64, B64, 0.5)
    y64.sum().backward()
    for ours, truth in ((y, y64), (x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(ours.detach().double(), truth.detach(), rtol=1e-4, atol=1e-4)


def chosen(launcher, kernel_name):
    return [c for key, c in launcher.chosen_configs().items() if key[0] == kernel_name]


def test_a_config_that_does_not_compile_is_dropped(monkeypatch, launcher):
    from fastlora.ops import triton_ops

    bad = gemm(BLOCK_M=24)  # tl.arange needs a power of two: fails to compile
    good = gemm(BLOCK_M=16)
    monkeypatch.setattr(triton_ops, "gemm_configs", lambda M, r_pad, *rest, **kw: [bad, good])
    run_and_check()
    assert chosen(launcher, "lora_forward_kernel") == [good]
    assert chosen(launcher, "lora_grad_input_kernel") == [good]


def test_a_config_that_runs_out_of_resources_is_dropped(monkeypatch, launcher):
    from fastlora.ops import triton_ops

    too_big = gemm(BLOCK_M=16, BLOCK_K=64)
    fits = gemm(BLOCK_M=16, BLOCK_K=32)
    monkeypatch.setattr(triton_ops, "gemm_configs", lambda M, r_pad, *rest, **kw: [too_big, fits])
    real_run = launcher._run

    def run(kernel, grid, args, meta, config):
        if config is too_big:  # what an H100 raises for a config above 227 KB of shared memory
            raise OutOfResources(262176, 232448, "shared memory")
        return real_run(kernel, grid, args, meta, config)

    monkeypatch.setattr(launcher, "_run", run)
    run_and_check()
    assert chosen(launcher, "lora_forward_kernel") == [fits]


def test_no_config_fits_raises_naming_kernel_shape_and_dtypes(monkeypatch, launcher):
    from fastlora.ops import triton_ops

    monkeypatch.setattr(triton_ops, "gemm_configs", lambda M, r_pad, *rest, **kw: [gemm(BLOCK_M=24), gemm(BLOCK_M=48)])
    x = torch.randn(5, 8)
    with fastlora.use_backend("triton"), pytest.raises(RuntimeError) as raised:
        fastlora.lora_linear(x, torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    message = str(raised.value)
    assert "lora_forward_kernel" in message and "M=5, N=6, K=8, r=2" in message
    assert "torch.float32" in message and "BLOCK_M=24" in message and "BLOCK_M=48" in message


def test_a_new_M_in_the_same_bucket_reuses_the_choice(monkeypatch, launcher):
    from fastlora.ops import triton_ops

    calls = []
    real = triton_ops.gemm_configs
    monkeypatch.setattr(triton_ops, "gemm_configs", lambda M, r_pad, *rest, **kw: calls.append(M) or real(M, r_pad, *rest, **kw))
    run_and_check(M=40)
    keys = set(launcher.chosen_configs())
    run_and_check(M=61)  # bucket 64 as well
    assert set(launcher.chosen_configs()) == keys
    run_and_check(M=65)  # bucket 128: a new choice
    assert len(launcher.chosen_configs()) > len(keys)


def test_m_bucket():
    from fastlora.ops.launcher import m_bucket

    assert [m_bucket(m) for m in (0, 1, 16, 17, 64, 65, 1000, 8192)] == [16, 16, 16, 32, 64, 128, 1024, 8192]


def test_tuned_choices_are_written_and_read_back(monkeypatch, tmp_path, launcher):
    monkeypatch.setattr(launcher, "tuning_cache_path", lambda: tmp_path / "tuning-gpu-tritonX.json")
    candidates = [gemm(16), gemm(32), gemm(64)]
    key = ("lora_forward_kernel", "cuda:0", 1024, 4096, 4096, 16)
    launcher._remember_on_disk(key, candidates[1])
    launcher.forget_choices()  # a new process: nothing in memory
    assert launcher._from_disk(key, candidates) is candidates[1]
    assert launcher._from_disk(("other",), candidates) is None


def test_every_config_list_ends_with_a_config_that_fits_small_gpus():
    """The last config of every list fits 99 KB of shared memory (consumer GPUs) in fp32."""
    from fastlora.kernels import configs
    from fastlora.kernels.configs import estimated_shared_bytes

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(configs, "interpreting", lambda: False)
        for M in (1, 16, 64, 512, 8192):
            lists = [configs.rank_configs(M)] + [configs.gemm_configs(M, r_pad) for r_pad in (16, 32, 64, 128, 256)]
            for candidates in lists:
                assert 1 <= len(candidates) <= 4
                assert estimated_shared_bytes(candidates[-1], 4) <= 99 * 1024


def test_tracing_with_fake_tensors_puts_one_config_in_the_graph(monkeypatch, launcher):
    """While a tracer runs the launcher on fake tensors nothing can launch: the first candidate
    is recorded once, nothing is tried and dropped, nothing is remembered as chosen."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    recorded = []
    monkeypatch.setattr(launcher, "_run", lambda kernel, grid, args, meta, config: recorded.append(config))
    first, second = gemm(16), gemm(32)
    with FakeTensorMode():
        x = torch.empty(8, 8)
        launcher.launch(object(), lambda c: (1,), (x,), {}, ("kernel", 1), lambda: [first, second], lambda: "")
    assert recorded == [first]
    assert launcher.chosen_configs() == {}


def test_the_first_gemm_config_is_estimated_to_fit_an_h100_for_each_adapter_dtype():
    """The launcher's pre-compile filter (epilogue tiles counted) keeps each list's first
    config for bf16 activations with bf16 or fp32 adapters, so that config compiles first."""
    from benchmarks.sm90_check import H100_SHARED_BYTES
    from fastlora.kernels import configs
    from fastlora.kernels.configs import estimated_shared_bytes

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(configs, "interpreting", lambda: False)
        for adapter_bytes in (2, 4):
            for pointer in (False, True):
                for r_pad in (16, 64, 128, 512):
                    first = configs.gemm_configs(8192, r_pad, adapter_bytes, pointer)[0]
                    assert estimated_shared_bytes(first, 2, adapter_bytes) <= H100_SHARED_BYTES
        too_big = configs._config(128, 256, 64, num_warps=8, num_stages=3, GROUP_M=8)
        assert estimated_shared_bytes(too_big, 2, 4) > H100_SHARED_BYTES  # fp32 adapters: one stage less


def test_a_first_launch_during_cuda_graph_capture_asks_for_a_warm_up(monkeypatch, launcher):
    """The driver cannot load a kernel module while a stream is captured: a key's first launch
    then raises a message that says to warm the shape up, instead of trying (and dropping)
    every config (issue 36, 2). Capture is simulated: the CPU has no CUDA stream."""
    real_run = launcher._run
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(launcher, "_run", lambda *a: pytest.fail("no config may be tried during capture"))
    with fastlora.use_backend("triton"), pytest.raises(RuntimeError, match="warm-up") as raised:
        fastlora.lora_linear(torch.randn(5, 8), torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    assert not isinstance(raised.value, fastlora._backend.TritonPieceError)  # auto must not move the class for it
    assert launcher.chosen_configs() == {}
    monkeypatch.setattr(launcher, "_run", real_run)


def test_arguments_that_change_with_M_within_a_key_do_not_specialize():
    """Triton specialises integer arguments on divisibility by 16 and on 1: the split counts
    (1 once M is large) and the split buffers' stride (M x r) would make new variants within one
    launcher key, which a CUDA-graph capture could not load (issue 36, 2)."""
    from fastlora.kernels.lora_backward import lora_grad_a_kernel, lora_grad_output_kernel
    from fastlora.kernels.lora_forward import lora_shrink_kernel

    for kernel, names in ((lora_shrink_kernel, {"M", "SPLIT_K", "stride_ss"}),
                          (lora_grad_output_kernel, {"M", "SPLIT_N", "stride_gs"}),
                          (lora_grad_a_kernel, {"M", "SPLIT_M"})):
        if hasattr(kernel, "params"):  # a JITFunction
            unspecialized = {p.name for p in kernel.params if p.do_not_specialize}
        else:  # the interpreter's InterpretedFunction keeps the decorator's arguments
            unspecialized = set(kernel.kwargs["do_not_specialize"])
        assert unspecialized == names, kernel
