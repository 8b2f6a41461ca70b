"""``auto`` never crashes where the torch path would run: a Triton piece that cannot run on this
device (every launch configuration fails) moves its op's shape class to the torch path with one
warning, the results are the torch backend's, and the decision is made once; a forced
``triton`` backend still raises. On the CPU through TRITON_INTERPRET=1, with ``auto`` sent to
Triton by a test table and a kernel made to fail."""

import importlib.util
import warnings

import pytest
import torch

import fastlora
import fastlora.reference as reference
from fastlora import _backend
from lora_cases import available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends("cpu"), reason="triton is not installed")


@pytest.fixture
def failing(monkeypatch):
    """Send every shape class to Triton under ``auto`` on this CPU (the interpreter) and make
    the named kernels fail to launch in every config, as a module the driver refuses would;
    returns the launch attempts per kernel name."""
    from fastlora.ops import launcher

    launcher.forget_choices()
    monkeypatch.setattr(_backend, "AUTO_TABLES", {"cpu": {row: "triton" for row in _backend.AUTO_ON_CUDA}})
    monkeypatch.setattr(_backend, "_triton_unusable", {})
    attempts: dict[str, int] = {}
    broken: set[str] = set()
    real_run = launcher._run

    def run(kernel, grid, args, meta, config):
        name = kernel.__name__
        attempts[name] = attempts.get(name, 0) + 1
        if name in broken:
            raise RuntimeError(f"CUDA error: the driver refused the module of {name} (made up by the test)")
        return real_run(kernel, grid, args, meta, config)

    monkeypatch.setattr(launcher, "_run", run)

    def fail(*names: str) -> dict[str, int]:
        broken.update(names)
        return attempts

    yield fail
    launcher.forget_choices()


def tensors(M=12, K=40, N=24, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((M, K), (N, K), (N,), (r, K), (N, r))
    return [torch.randn(*shape, generator=g).requires_grad_(i != 1) for i, shape in enumerate(shapes)]


def step(backend: str, op, M=12, r=4) -> list[torch.Tensor]:
    """Output and every gradient of ``op`` on fresh tensors under ``backend``."""
    x, w, b, A, B = tensors(M=M, r=r)
    with fastlora.use_backend(backend):
        y = op(x, w, b, A, B)
    y.square().sum().backward()
    return [y.detach(), x.grad, b.grad, A.grad, B.grad]


OPS = {
    "lora_linear": (lambda x, w, b, A, B: fastlora.lora_linear(x, w, b, A, B, 0.5), "lora_forward_kernel"),
    "dora_linear": (lambda x, w, b, A, B: fastlora.dora_linear(x, w, b, A, B, w.norm(dim=1).detach() * 1.5, 0.5),
                    "dora_norm_kernel"),
    "multi_lora_linear": (lambda x, w, b, A, B: fastlora.multi_lora_linear(
        x, w, b, torch.stack([A, A * 2]), torch.stack([B, B * 3]), [0.5, 1.0],
        torch.arange(x.shape[0]) % 3 - 1), "mixed_shrink_kernel"),
}



def qlora(x, w, b, A, B):
    """qlora_linear on ``w`` quantized to NF4 by bitsandbytes."""
    import bitsandbytes as bnb

    from fastlora.ops.qlora_linear import qlora_linear
    from fastlora.ops.weight4bit import from_params4bit

    packed = bnb.nn.Params4bit(w.detach().clone(), requires_grad=False, blocksize=64, quant_type="nf4").to("cpu")
    return qlora_linear(x, from_params4bit(packed), b, A, B, 0.5)


if importlib.util.find_spec("bitsandbytes") is not None:
    OPS["qlora_linear"] = (qlora, "dequant_4bit_kernel")


@pytest.mark.parametrize("op_name", list(OPS))
def test_auto_falls_back_once_with_one_warning_and_torch_results(failing, op_name):
    op, kernel = OPS[op_name]
    attempts = failing(kernel)
    with pytest.warns(RuntimeWarning) as warned:
        ours = step("auto", op)
    messages = [str(w.message) for w in warned if "fastlora" in str(w.message)]
    assert len(messages) == 1, messages
    import triton

    for part in (op_name, kernel, "('decode', 'r<=16')", "cpu", f"with Triton {triton.__version__}", "refused the module"):
        assert part in messages[0], (part, messages[0])
    for got, expected in zip(ours, step("torch", op)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert _backend.triton_unusable() == {(op_name, ("decode", "r<=16")): messages[0].split(": ", 2)[-1].split(". The")[0]}

    tried = attempts[kernel]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once: no second warning, no second try
        again = step("auto", op)
    assert attempts[kernel] == tried
    for got, expected in zip(again, step("torch", op)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_forced_triton_still_raises(failing):
    failing("lora_forward_kernel")
    with pytest.raises(_backend.TritonPieceError, match="no launch configuration of lora_forward_kernel"):
        step("triton", OPS["lora_linear"][0])
    assert _backend.triton_unusable() == {}
    assert isinstance(_backend.TritonPieceError("x"), RuntimeError)


def test_a_failing_backward_kernel_falls_back_on_the_saved_tensors(failing):
    """The forward runs on Triton, a backward kernel cannot: the gradients come from the torch
    backward on the Triton forward's saved S and keep bits (dropout on, so the mask must be the
    forward's), and the next call of the class runs torch from the start."""
    from fastlora.ops.lora_linear import saved_keep_mask

    attempts = failing("lora_grad_output_kernel")
    x, w, b, A, B = tensors()
    p, s = 0.25, 0.5
    with fastlora.use_backend("auto"):
        y = fastlora.lora_linear(x, w, b, A, B, s, dropout_p=p, training=True)
    assert attempts["lora_forward_kernel"] > 0 and "lora_grad_output_kernel" not in attempts  # a Triton forward
    keep = saved_keep_mask(y)
    with pytest.warns(RuntimeWarning, match="lora_grad_output_kernel"):
        y.square().sum().backward()
    truth = [t.detach().double().requires_grad_(i != 1) for i, t in enumerate((x, w, b, A, B))]
    x64, w64, b64, A64, B64 = truth
    dropped = x64 * keep / (1 - p)
    y64 = reference.lora_linear(x64, w64, b64, A64, B64, s) + s * (dropped - x64) @ A64.t() @ B64.t()
    y64.square().sum().backward()
    for ours, expected in ((y, y64), (x.grad, x64.grad), (b.grad, b64.grad), (A.grad, A64.grad), (B.grad, B64.grad)):
        torch.testing.assert_close(ours.detach().double(), expected.detach(), rtol=1e-4, atol=1e-4)
    assert _backend.resolve(torch.device("cpu"), 12, 4) == "torch"
    assert _backend.resolve(torch.device("cpu"), 12, 4, "dora_linear") == "triton"  # other ops keep Triton


def test_other_shape_classes_keep_triton(failing):
    attempts = failing("lora_forward_kernel")
    with pytest.warns(RuntimeWarning):
        step("auto", OPS["lora_linear"][0], M=12)
    assert _backend.resolve(torch.device("cpu"), 12, 4) == "torch"
    assert _backend.resolve(torch.device("cpu"), 200, 4) == "triton"
    assert _backend.resolve(torch.device("cpu"), 12, 32) == "triton"
    assert attempts["lora_forward_kernel"] > 0


def test_a_decided_class_traces_in_one_graph(failing):
    """After the fallback, torch.compile(fullgraph=True) traces the op under ``auto`` (the
    decision is a dict lookup, no graph break) and gives the torch backend's numbers."""
    failing("lora_forward_kernel")
    with pytest.warns(RuntimeWarning):
        step("auto", OPS["lora_linear"][0])
    x, w, b, A, B = tensors()
    compiled = torch.compile(lambda *t: fastlora.lora_linear(*t, 0.5), fullgraph=True, backend="eager")
    with fastlora.use_backend("auto"):
        torch.testing.assert_close(compiled(x, w, b, A, B), step("torch", OPS["lora_linear"][0])[0], rtol=0, atol=0)
