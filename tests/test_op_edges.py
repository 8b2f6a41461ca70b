"""lora_linear at the edges users reach: strided and expanded biases, double backward,
numpy / tensor scalars, meta tensors, torch.func, loralib code that trains W, float64 and
gradcheck, and the backend choice per thread."""

import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastlora
import fastlora.reference as reference
from lora_cases import available_backends, observe_keep_mask, small_inputs

BACKENDS = available_backends("cpu")


def args(t):
    return t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_strided_and_expanded_bias(backend, layout):
    t = small_inputs(N=6)
    if layout == "strided":  # every other element of a longer vector
        bias = torch.randn(12).requires_grad_()
        view = bias[::2]
    else:  # one value broadcast to all N outputs: stride 0
        bias = torch.randn(1).requires_grad_()
        view = bias.expand(6)
    assert not view.is_contiguous()
    with fastlora.use_backend(backend):
        y = fastlora.lora_linear(t["x"], t["weight"], view, t["lora_A"], t["lora_B"], 0.5)
    y.sum().backward()
    expected_bias = bias.detach().clone().requires_grad_()
    expected_view = expected_bias[::2] if layout == "strided" else expected_bias.expand(6)
    expected = reference.lora_linear(t["x"].detach(), t["weight"], expected_view, t["lora_A"].detach(), t["lora_B"].detach(), 0.5)
    expected.sum().backward()
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(bias.grad, expected_bias.grad)


def second_order(fn, t, dropout_p, mask=None):
    """Gradients of a weighted sum of the first-order gradients, taken with create_graph=True."""
    kwargs = {} if mask is None else {"dropout_mask": mask}
    y = fn(*args(t), dropout_p, True, **kwargs)
    dy = torch.linspace(-1, 1, y.numel()).view_as(y).requires_grad_()
    inputs = [t["x"], t["lora_A"], t["lora_B"], t["bias"]]
    first = torch.autograd.grad(y, inputs, dy, create_graph=True)
    weights = [torch.cos(torch.arange(g.numel(), dtype=g.dtype)).view_as(g) for g in first]
    total = sum((g * w).sum() for g, w in zip(first, weights))
    second = torch.autograd.grad(total, [t["x"], t["lora_A"], t["lora_B"], dy], allow_unused=True)
    return [g if g is not None else torch.zeros_like(i) for g, i in zip(second, [t["x"], t["lora_A"], t["lora_B"], dy])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_double_backward_matches_reference(backend, dropout_p):
    with fastlora.use_backend(backend):
        mask = observe_keep_mask((6, 8), dropout_p, seed=7) if dropout_p else None
        torch.manual_seed(7)
        ours = second_order(fastlora.lora_linear, small_inputs(), dropout_p)
    theirs = second_order(reference.lora_linear, small_inputs(), dropout_p, mask)
    for name, a, b in zip(["x", "lora_A", "lora_B", "dy"], ours, theirs):
        assert b.abs().max() > 0, name  # every second-order gradient here is nonzero
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"second-order gradient of {name}")


@pytest.mark.parametrize(
    "kwargs",
    [dict(r=np.int64(4)), dict(r=torch.tensor(4)), dict(r=4, lora_alpha=np.float32(8.0)),
     dict(r=4, lora_alpha=torch.tensor(8.0)), dict(r=4, lora_dropout=np.float32(0.25))],
    ids=["numpy-r", "tensor-r", "numpy-alpha", "tensor-alpha", "numpy-dropout"],
)
def test_numpy_and_tensor_scalars_work_as_python_numbers(kwargs):
    torch.manual_seed(0)
    layer = fastlora.Linear(8, 4, **kwargs)
    nn.init.normal_(layer.lora_B)
    assert type(layer.r) is int and isinstance(layer.scaling, float) and type(layer.lora_alpha) in (int, float)
    plain = {k: (v.item() if isinstance(v, (torch.Tensor, np.generic)) else v) for k, v in kwargs.items()}
    torch.manual_seed(0)
    twin = fastlora.Linear(8, 4, **plain)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    layer.train(), twin.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    torch.testing.assert_close(y, twin(x))
    model = fastlora.inject(nn.Sequential(nn.Linear(8, 4)), ["0"], **{k: v for k, v in kwargs.items()})
    assert type(model[0].r) is int and isinstance(model[0].scaling, float)


def test_scalars_that_are_not_numbers_are_refused():
    with pytest.raises(ValueError, match="r must be an integer"):
        fastlora.Linear(8, 4, r=torch.tensor(2.5))
    with pytest.raises(TypeError, match="lora_alpha"):
        fastlora.Linear(8, 4, r=2, lora_alpha="8")
    with pytest.raises(ValueError, match="lora_dropout"):
        fastlora.Linear(8, 4, r=2, lora_dropout=np.float32(1.0))


def test_meta_forward_returns_a_meta_tensor():
    with torch.device("meta"):
        layer = fastlora.Linear(8, 4, r=2, lora_dropout=0.1)
        x = torch.randn(3, 5, 8)
    y = layer.train()(x)
    assert y.device.type == "meta" and y.shape == (3, 5, 4)


def layer_with_adapter(**kw):
    torch.manual_seed(0)
    layer = fastlora.Linear(8, 4, r=2, **kw)
    nn.init.normal_(layer.lora_B)
    return layer


def test_vmap_and_func_grad():
    layer = layer_with_adapter()
    xs = torch.randn(5, 3, 8)
    torch.testing.assert_close(torch.vmap(layer)(xs), layer(xs))
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params, xs)
    layer(xs).square().sum().backward()
    for name in ("lora_A", "lora_B", "bias"):
        torch.testing.assert_close(grads[name], dict(layer.named_parameters())[name].grad)
    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    assert per_sample["lora_A"].shape == (5, 2, 8)
    torch.testing.assert_close(per_sample["lora_A"].sum(0), grads["lora_A"], rtol=1e-5, atol=1e-5)


def test_loralib_code_that_trains_the_weight_too():
    ours = layer_with_adapter()
    ours.weight.requires_grad_(True)
    x = torch.randn(3, 8)
    ours(x).square().sum().backward()
    w = ours.weight.detach().clone().requires_grad_()
    A, B = ours.lora_A.detach().clone().requires_grad_(), ours.lora_B.detach().clone().requires_grad_()
    reference.lora_linear(x, w, ours.bias.detach(), A, B, ours.scaling).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, w.grad)
    torch.testing.assert_close(ours.lora_A.grad, A.grad)
    with fastlora.use_backend("torch"):
        ours(x).sum().backward()  # the torch backend runs it too


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_forced_fused_backend_refuses_what_only_plain_autograd_runs(backend):
    t = small_inputs(dtype=torch.float64)
    with fastlora.use_backend(backend), pytest.raises(RuntimeError, match="float64"):
        fastlora.lora_linear(*args(t))
    t = small_inputs()
    t["weight"].requires_grad_(True)
    with fastlora.use_backend(backend), pytest.raises(RuntimeError, match="requires grad"):
        fastlora.lora_linear(*args(t))
    with fastlora.use_backend(backend), torch.no_grad():  # no gradient asked: the fused op runs
        fastlora.lora_linear(*args(t))


def test_model_double_and_gradcheck():
    model = nn.Sequential(layer_with_adapter(), nn.Tanh(), fastlora.Linear(4, 3, r=2)).double()
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert model(x).dtype == torch.float64
    layer = model[0]
    assert torch.autograd.gradcheck(
        lambda x, A, B, b: fastlora.lora_linear(x, layer.weight, b, A, B, layer.scaling),
        (x, layer.lora_A, layer.lora_B, layer.bias),
    )


def test_use_backend_is_per_thread():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        seen["before"] = fastlora.current_backend()
        with fastlora.use_backend("torch"):
            inside.set()
            release.wait(10)
            seen["inside"] = fastlora.current_backend()

    thread = threading.Thread(target=other)
    with fastlora.use_backend("cpp"):
        thread.start()
        inside.wait(10)
        here = fastlora.current_backend()  # the other thread's use_backend does not leak here
        release.set()
        thread.join(10)
    assert here == "cpp" and seen == {"before": "auto", "inside": "torch"}
