"""DoRA: fastlora.dora_linear against fastlora.reference.dora_linear and PEFT's DoRA layer, the
weight norm's accuracy, the layer (init, merge, train/eval), what the backward saves, errors."""

import copy
import json

import peft
import pytest
import torch
import torch.nn as nn

import fastlora
import fastlora.reference as reference
from fastlora.ops import dora_norm
from fastlora.ops.lora_linear import saved_keep_mask
from lora_cases import Case, assert_2x_rule, available_backends, cast_inputs, leaf, make_inputs, max_error

BACKENDS = available_backends("cpu")

CASES = [
    Case(M=1, K=16, N=16, r=1),
    Case(M=37, K=19, N=23, r=4),
    Case(M=70, K=33, N=40, r=16, bias=False),
    Case(M=9, K=72, N=18, r=64),
    Case(M=33, K=24, N=17, r=32, fan_in_fan_out=True),
    Case(M=6, K=21, N=30, r=8, batch=3, strided=True),
    Case(M=41, K=29, N=35, r=4, dropout_p=0.1),
    Case(M=7, K=18, N=25, r=16, dropout_p=0.5, batch=3, fan_in_fan_out=True),
    Case(M=23, K=40, N=9, r=1, dropout_p=0.3, strided=True, bias=False),
    Case(M=0, K=17, N=11, r=4, dropout_p=0.2),
    Case(M=130, K=48, N=40, r=16, dropout_p=0.2),
    Case(M=100, K=32, N=24, r=8, fan_in_fan_out=True, bias=False),
]
HALF_CASES = [
    Case(M=37, K=19, N=23, r=4, dtype=torch.float16),
    Case(M=20, K=48, N=33, r=16, dtype=torch.float16, dropout_p=0.1, batch=2),
    Case(M=17, K=24, N=40, r=32, dtype=torch.float16, fan_in_fan_out=True, strided=True),
    Case(M=17, K=24, N=40, r=8, dtype=torch.float16, adapter_dtype=torch.float32, dropout_p=0.2),
    Case(M=11, K=40, N=24, r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32),
    Case(M=48, K=40, N=33, r=16, dtype=torch.bfloat16, dropout_p=0.1, batch=2),
    Case(M=30, K=32, N=24, r=8, dtype=torch.bfloat16, adapter_dtype=torch.float32, dropout_p=0.2),
    Case(M=96, K=40, N=24, r=8, dtype=torch.float16, dropout_p=0.1),
]


def with_magnitude(inputs: dict, case: Case, seed: int = 3) -> dict:
    """The case's inputs plus a magnitude (N,): the weight's row norms times 1 +- 0.3 noise,
    and lora_B scaled so that s B A moves the norms visibly."""
    g = torch.Generator().manual_seed(seed)
    w = inputs["weight"].t() if case.fan_in_fan_out else inputs["weight"]
    noise = 1 + 0.3 * torch.randn(case.N, generator=g, dtype=torch.float64)
    return {**inputs, "magnitude": w.norm(dim=1) * noise}


def cast_dora(inputs: dict, case: Case, dtype: torch.dtype, device: str = "cpu") -> dict:
    t = cast_inputs(inputs, case, dtype, device)
    t["magnitude"] = leaf(inputs["magnitude"], t["lora_A"].dtype, device).requires_grad_(True)
    return t


def run_dora(fn, t: dict, case: Case, **kwargs) -> dict:
    y = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], t["scaling"],
           case.dropout_p, True, case.fan_in_fan_out, **kwargs)
    y.backward(t["dy"])
    out = {"y": y.detach(), "dx": t["x"].grad, "dA": t["lora_A"].grad, "dB": t["lora_B"].grad,
           "dm": t["magnitude"].grad}
    if t["bias"] is not None:
        out["dbias"] = t["bias"].grad
    return out


def fastlora_dora(inputs: dict, case: Case, backend: str, seed: int = 1234,
                  device: str = "cpu") -> tuple[dict, torch.Tensor | None]:
    lead = inputs["x"].shape[:-1]
    masks = []

    def keeping_mask(*args, **kwargs):
        y = fastlora.dora_linear(*args, **kwargs)
        if case.dropout_p:
            masks.append(saved_keep_mask(y).view(*lead, case.K))
        return y

    with fastlora.use_backend(backend):
        t = cast_dora(inputs, case, case.dtype, device)
        torch.manual_seed(seed)
        out = run_dora(keeping_mask, t, case)
    return out, masks[0] if masks else None


def check_case(case: Case, backend: str, device: str = "cpu") -> None:
    """fastlora.dora_linear on ``backend`` under the 2x-error rule against the reference."""
    inputs = with_magnitude(make_inputs(case), case)
    ours, mask = fastlora_dora(inputs, case, backend, device=device)
    truth = run_dora(reference.dora_linear, cast_dora(inputs, case, torch.float64, device), case, dropout_mask=mask)
    plain = run_dora(reference.dora_linear, cast_dora(inputs, case, case.dtype, device), case, dropout_mask=mask)
    if case.M:
        assert all(truth[k].abs().max() > 0 for k in ("dx", "dA", "dB", "dm")), "a gradient is zero: the case tests nothing"
    assert_2x_rule(ours, truth, plain, case.dtype, label=f"dora {backend} {case}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_dora_parity_fp32(case, backend):
    check_case(case, backend)


@pytest.mark.parametrize(
    "case,backend",
    [(c, b) for c in HALF_CASES for b in BACKENDS if not (b == "triton" and c.dtype == torch.bfloat16)],
    ids=lambda v: str(v),
)
def test_dora_parity_low_precision(case, backend):
    check_case(case, backend)


class FixedMask(nn.Module):
    """PEFT's lora_dropout replaced by a fixed keep-mask, so PEFT's DoRA draws what ours drew."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dora_matches_peft_layer(backend, dropout_p, fan_in_fan_out):
    """fastlora.Linear(use_dora=True) built by from_peft gives PEFT's DoRA output and every
    gradient (x, A, B, magnitude, bias), with dropout on the same mask."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 20))
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = nn.Sequential(Conv1D(20, 24))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=dropout_p, use_dora=True,
                             bias="all", fan_in_fan_out=fan_in_fan_out)
    theirs = peft.get_peft_model(base, config).train()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    ours = fastlora.from_peft(copy.deepcopy(theirs)).train()
    x = torch.randn(3, 7, 24)
    dy = torch.randn(3, 7, 20)
    with fastlora.use_backend(backend):
        x_ours = x.clone().requires_grad_()
        torch.manual_seed(5)
        y_ours = ours(x_ours)
        mask = saved_keep_mask(y_ours).view(3, 7, 24) if dropout_p else None
        y_ours.backward(dy)
    if mask is not None:
        theirs.base_model.model[0].lora_dropout["default"] = FixedMask(mask, dropout_p)
    x_theirs = x.clone().requires_grad_()
    y_theirs = theirs(x_theirs)
    y_theirs.backward(dy)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=1e-5)
    peft_layer = theirs.base_model.model[0]
    layer = ours[0]
    pairs = [(layer.lora_A, peft_layer.lora_A["default"].weight), (layer.lora_B, peft_layer.lora_B["default"].weight),
             (layer.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight),
             (layer.bias, peft_layer.base_layer.bias)]
    for mine, peft_param in pairs:
        assert peft_param.grad.abs().max() > 0
        torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None


def peft_dense_norm(weight, lora_A, lora_B, scaling):
    """PEFT's own DoRA norm (DoraLinearLayer.get_weight_norm with PEFT's lora_weight)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    return DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(weight, lora_B @ lora_A, scaling)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_norm_stays_accurate_when_the_adapter_cancels_a_row(backend, dtype):
    """Row 0 of W is -s B_0 A (of the rounded A and B) plus a little noise, so that
    ||W_0 + s B_0 A|| is a small fraction of ||W_0|| (1e-4 in float32; in a half dtype W's own
    rounding limits it to about 1e-2). Each backend's norm (float32) is within 2x of PEFT's
    dense norm's error in the same dtype, against the float64 truth, on every row."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 tl.dot; tests/test_gpu.py runs it on a GPU")
    g = torch.Generator().manual_seed(0)
    N, K, r, s = 12, 64, 4, 2.0
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64)
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    Ad, Bd = A.to(dtype), B.to(dtype)
    noise = 1e-4 if dtype == torch.float32 else 1e-2
    W[0] = -s * (Bd[0].double() @ Ad.double()) + noise * torch.randn(K, generator=g, dtype=torch.float64)
    Wd = W.to(dtype)
    truth = reference.dora_weight_norm(Wd.double(), Ad.double(), Bd.double(), s)
    assert truth[0] < 20 * noise * truth[1:].min()
    theirs = peft_dense_norm(Wd, Ad, Bd, s)
    ours = dora_norm.weight_norm(Wd, Ad, Bd, s, False, backend)
    assert ours.dtype == torch.float32
    ours_error = (ours.double() - truth).abs()
    theirs_error = (theirs.double() - truth).abs()
    assert (ours_error <= 2 * theirs_error + 1e-7 * truth).all(), (ours_error, theirs_error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_follows_every_change_of_the_weight(backend):
    """In-place edits, load_state_dict and merge / unmerge change W; every forward uses W's
    current norm (nothing cached goes stale)."""
    torch.manual_seed(0)
    layer = fastlora.Linear(12, 10, r=2, lora_alpha=4, use_dora=True, merge_weights=False)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 12)

    def expected():
        return reference.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                     layer.lora_magnitude_vector, layer.scaling)

    with fastlora.use_backend(backend), torch.no_grad():
        before = layer(x)
        torch.testing.assert_close(before, expected())
        layer.weight.mul_(1.5)
        torch.testing.assert_close(layer(x), expected())
        assert (layer(x) - before).abs().max() > 1e-3
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["weight"].add_(0.1)
        layer.load_state_dict(state)
        torch.testing.assert_close(layer(x), expected())
        fastlora.merge(layer)
        torch.testing.assert_close(layer(x), reference.dora_linear(
            x, state["weight"], layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling))
        fastlora.unmerge(layer)
        torch.testing.assert_close(layer.weight, state["weight"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(x), expected())


def test_layer_init_train_eval_and_merge_and_unload():
    torch.manual_seed(0)
    layer = fastlora.Linear(16, 12, r=4, lora_alpha=8, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), layer.weight.norm(dim=1))
    assert layer.lora_magnitude_vector.requires_grad and not layer.weight.requires_grad
    assert set(fastlora.lora_state_dict(layer)) == {"lora_A", "lora_B", "lora_magnitude_vector"}
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.3)
    x = torch.randn(4, 16)
    train_out = layer.train()(x).detach()
    eval_out = layer.eval()(x)  # merge_weights=True: eval() merges DoRA into W
    assert layer.merged
    torch.testing.assert_close(eval_out, train_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.train()(x), train_out)
    model = nn.Sequential(layer)
    plain = fastlora.merge_and_unload(model)
    assert type(plain[0]) is nn.Linear
    torch.testing.assert_close(plain(x), train_out, rtol=1e-5, atol=1e-5)


def test_inject_use_dora_trains_the_magnitude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fastlora.inject(model, ["0", "2"], r=2, use_dora=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "0.lora_B", "0.lora_magnitude_vector", "2.lora_A", "2.lora_B",
                         "2.lora_magnitude_vector"]
    model(torch.randn(3, 8)).sum().backward()
    assert model[0].lora_magnitude_vector.grad.abs().max() > 0


def test_the_backward_saves_no_extra_output_sized_tensor():
    """Without dropout the one M x N tensor DoRA saves is the output itself (kept alive by the
    caller anyway); with dropout it saves u = drop(x) W^T + L, one M x N tensor."""
    torch.manual_seed(0)
    layer = fastlora.Linear(64, 48, r=4, use_dora=True, lora_dropout=0.1, merge_weights=False)
    x = torch.randn(32, 64)
    for training in (False, True):
        layer.train(training)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
        output_sized = [t for t in saved if t.numel() == y.numel()]
        assert len(output_sized) == 1
        same = output_sized[0].untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
        assert same == (not training)
        y.sum().backward()


def test_gradient_checkpointing_replays_dora_dropout():
    torch.manual_seed(0)
    layer = fastlora.Linear(20, 16, r=4, lora_dropout=0.3, use_dora=True, merge_weights=False)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 20)
    grads = []
    for checkpointed in (False, True):
        layer.zero_grad()
        torch.manual_seed(7)
        if checkpointed:
            y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        else:
            y = layer(x)
        y.square().sum().backward()
        grads.append([p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)])
    for plain, replayed in zip(*grads):
        torch.testing.assert_close(replayed, plain)


def good_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(3, 8, generator=g), weight=torch.randn(5, 8, generator=g), bias=None,
                lora_A=torch.randn(2, 8, generator=g), lora_B=torch.randn(5, 2, generator=g),
                magnitude=torch.rand(5, generator=g) + 0.5, scaling=1.0)


@pytest.mark.parametrize("magnitude,error,words", [
    (torch.ones(4), ValueError, "magnitude must have shape (out_features=5,)"),
    (torch.ones(5, 1), ValueError, "magnitude must have shape"),
    (torch.ones(5, dtype=torch.float16), TypeError, "magnitude must have the adapters' dtype"),
    (torch.ones(5, dtype=torch.int64), TypeError, "magnitude must be float16"),
    ([1.0] * 5, TypeError, "magnitude must be a torch.Tensor"),
    (torch.ones(5, device="meta"), ValueError, "magnitude is on meta"),
])
def test_bad_magnitude_is_refused(magnitude, error, words):
    inputs = good_inputs()
    inputs["magnitude"] = magnitude
    with pytest.raises(error) as info:
        fastlora.dora_linear(**inputs)
    assert words in str(info.value)


@pytest.mark.parametrize("build", [
    lambda: fastlora.Embedding(10, 4, r=2, use_dora=True),
    lambda: fastlora.MergedLinear(8, 6, r=2, enable_lora=[True, False], use_dora=True),
    lambda: fastlora.Conv2d(3, 4, 3, r=2, use_dora=True),
    lambda: fastlora.Linear(8, 6, r=0, use_dora=True),
])
def test_dora_on_a_layer_without_it_is_refused(build):
    with pytest.raises(ValueError, match="use_dora"):
        build()


def peft_dora_model(build, targets):
    """A PEFT DoRA model with nonzero lora_B and magnitudes moved off their initial norms."""
    from tiny_models import peft_model

    theirs = peft_model(build(), targets, use_dora=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return theirs


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_peft_dora_files_both_ways(tmp_path, model_name):
    """PEFT's DoRA adapter loads into fastlora (same logits and gradients, magnitude included),
    fastlora writes PEFT's DoRA files (same keys; PEFT reloads them with the same logits), and
    from_peft and merge_and_unload keep the numbers. GPT-2's Conv1D is the fan_in_fan_out case."""
    from safetensors.torch import load_file

    from tiny_models import TARGETS, batch, lora_grads, tiny_gpt2, tiny_llama

    build, targets = (tiny_llama, TARGETS) if model_name == "llama" else (tiny_gpt2, ["c_attn", "c_fc"])
    theirs = peft_dora_model(build, targets)
    inputs = batch()
    expected = theirs(**inputs)
    expected.loss.backward()
    expected_grads = lora_grads(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = fastlora.load_adapter(build(), tmp_path / "peft")
    out = ours(**inputs)
    out.loss.backward()
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    grads = lora_grads(ours)
    assert grads.keys() == expected_grads.keys() and any("lora_magnitude_vector" in k for k in grads)
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-6)
    fastlora.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    written = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert written.keys() == load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    reloaded = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    torch.testing.assert_close(reloaded(**inputs).logits, expected.logits, rtol=1e-5, atol=1e-5)
    converted = fastlora.from_peft(copy.deepcopy(theirs))
    torch.testing.assert_close(converted(**inputs).logits, expected.logits, rtol=1e-5, atol=1e-5)
    merged = fastlora.merge_and_unload(converted)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**inputs).logits, expected.logits, rtol=1e-4, atol=1e-4)


def test_load_switches_an_injected_layer_between_lora_and_dora(tmp_path):
    """A DoRA file loaded into LoRA layers makes them DoRA layers, and a LoRA file loaded into
    DoRA layers makes them plain LoRA again; a magnitude in a file without use_dora is refused."""
    from safetensors.torch import load_file, save_file

    from tiny_models import TARGETS, batch, peft_model, tiny_llama

    dora = peft_dora_model(tiny_llama, TARGETS)
    dora.save_pretrained(tmp_path / "dora")
    lora = peft_model(tiny_llama(), TARGETS)
    lora.save_pretrained(tmp_path / "lora")
    inputs = batch()
    model = fastlora.inject(tiny_llama(), TARGETS, r=4, lora_alpha=8)
    fastlora.load_adapter(model, tmp_path / "dora")
    assert model.get_submodule("model.layers.0.self_attn.q_proj").use_dora
    torch.testing.assert_close(model(**inputs).logits, dora(**inputs).logits, rtol=1e-5, atol=1e-5)
    fastlora.load_adapter(model, tmp_path / "lora")
    assert not any("magnitude" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(**inputs).logits, lora(**inputs).logits, rtol=1e-5, atol=1e-5)
    tensors = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    save_file(tensors, tmp_path / "lora" / "adapter_model.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not set use_dora"):
        fastlora.load_adapter(model, tmp_path / "lora")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
