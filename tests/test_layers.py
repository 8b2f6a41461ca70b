"""The loralib-compatible layers against loralib itself: parameters, state dicts, numbers, merging."""

import copy

import loralib
import pytest
import torch
import torch.nn as nn

import fastlora
import fastlora as lora


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    dst.load_state_dict(src.state_dict(), strict=True)


def randomize_lora(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


LINEAR_CONFIGS = [
    dict(r=4, lora_alpha=8),
    dict(r=8, lora_alpha=16, fan_in_fan_out=True),
    dict(r=2, lora_alpha=1, bias=False),
    dict(r=0),
]


def grads(module: nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", LINEAR_CONFIGS, ids=str)
def test_linear_matches_loralib(config):
    torch.manual_seed(0)
    theirs = loralib.Linear(12, 10, **config)
    ours = lora.Linear(12, 10, **config)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    copy_weights(theirs, ours)
    randomize_lora(theirs)
    copy_weights(theirs, ours)
    x = torch.randn(3, 5, 12)
    for mode in ("train", "eval", "train"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        assert ours.merged == theirs.merged
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-6, atol=1e-6)
    theirs(x).square().sum().backward()
    ours(x).square().sum().backward()
    g_theirs, g_ours = grads(theirs), grads(ours)
    assert g_ours.keys() == g_theirs.keys()
    for name in g_theirs:
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-5, atol=1e-5)


def test_linear_attributes_and_init():
    torch.manual_seed(0)
    layer = lora.Linear(32, 24, r=4, lora_alpha=8, lora_dropout=0.1)
    assert (layer.r, layer.lora_alpha, layer.scaling, layer.merged, layer.merge_weights) == (4, 8, 2.0, False, True)
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.1
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (24, 4)
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    assert fastlora.LoRALinear is fastlora.Linear
    assert isinstance(layer, fastlora.LoRALayer)


def test_rslora_scaling():
    layer = lora.Linear(8, 8, r=16, lora_alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / 4)


@pytest.mark.parametrize("enable_lora", [[True, False, True], [False, True, False], [True, True, True]])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_matches_loralib(enable_lora, fan_in_fan_out):
    torch.manual_seed(0)
    kw = dict(r=2, lora_alpha=4, enable_lora=enable_lora, fan_in_fan_out=fan_in_fan_out)
    theirs = loralib.MergedLinear(10, 12, **kw)
    ours = lora.MergedLinear(10, 12, **kw)
    randomize_lora(theirs)
    copy_weights(theirs, ours)
    x = torch.randn(4, 10)
    for mode in ("train", "eval", "train"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs(x).square().sum().backward()
    ours(x).square().sum().backward()
    for name, g in grads(theirs).items():
        torch.testing.assert_close(grads(ours)[name], g, rtol=1e-5, atol=1e-5)


def test_merged_linear_default_enable_lora_is_a_plain_linear():
    # loralib crashes in forward here (no lora_A with enable_lora=[False])
    layer = lora.MergedLinear(6, 4, r=2)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    with pytest.raises(ValueError, match="enable_lora"):
        lora.MergedLinear(6, 5, r=2, enable_lora=[True, False])


def test_embedding_matches_loralib():
    torch.manual_seed(0)
    theirs = loralib.Embedding(20, 6, r=3, lora_alpha=6, padding_idx=0)
    ours = lora.Embedding(20, 6, r=3, lora_alpha=6, padding_idx=0)
    assert torch.count_nonzero(ours.lora_A) == 0 and torch.count_nonzero(ours.lora_B) > 0
    randomize_lora(theirs)
    copy_weights(theirs, ours)
    idx = torch.randint(0, 20, (4, 7))
    for mode in ("train", "eval", "train"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        torch.testing.assert_close(ours(idx), theirs(idx), rtol=1e-5, atol=1e-5)
    theirs(idx).square().sum().backward()
    ours(idx).square().sum().backward()
    for name, g in grads(theirs).items():
        torch.testing.assert_close(grads(ours)[name], g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kind,kernel_size,shape", [("Conv2d", 3, (2, 4, 9, 9)), ("Conv1d", 1, (2, 4, 11)), ("Conv3d", 1, (2, 4, 5, 5, 5))]
)
def test_conv_matches_loralib(kind, kernel_size, shape):
    torch.manual_seed(0)
    theirs = getattr(loralib, kind)(4, 6, kernel_size, r=2, lora_alpha=4)
    ours = getattr(lora, kind)(4, 6, kernel_size, r=2, lora_alpha=4)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    randomize_lora(theirs)
    copy_weights(theirs, ours)
    x = torch.randn(shape)
    for mode in ("train", "eval", "train"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,shape", [("Conv1d", (2, 4, 11)), ("Conv3d", (2, 4, 6, 6, 6))])
def test_conv_kernel_size_above_one_works_where_loralib_crashes(kind, shape):
    torch.manual_seed(0)
    with pytest.raises(RuntimeError):
        getattr(loralib, kind)(4, 6, 3, r=2)(torch.randn(shape))
    layer = getattr(lora, kind)(4, 6, 3, r=2, lora_alpha=2)
    randomize_lora(layer)
    x = torch.randn(shape)
    expected = layer.conv._conv_forward(x, layer.conv.weight + layer.delta_weight(), layer.conv.bias)
    torch.testing.assert_close(layer(x), expected)
    assert layer.delta_weight().shape == layer.conv.weight.shape
    before = layer(x)
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-5)


def test_conv_rejects_rectangular_kernel():
    with pytest.raises(ValueError, match="kernel_size"):
        lora.Conv2d(4, 6, (3, 1), r=2)


def test_loralib_checkpoint_loads_strict_into_fastlora_model():
    torch.manual_seed(0)

    def build(lib):
        return nn.Sequential(
            lib.Embedding(30, 16, r=2),
            lib.Linear(16, 16, r=4, lora_alpha=8),
            nn.ReLU(),
            lib.MergedLinear(16, 24, r=2, enable_lora=[True, False, True]),
        )

    theirs, ours = build(loralib), build(lora)
    for m in theirs.modules():
        randomize_lora(m)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    idx = torch.randint(0, 30, (3, 5))
    torch.testing.assert_close(ours(idx), theirs(idx), rtol=1e-5, atol=1e-5)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(idx), theirs(idx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_and_state_dict_match_loralib(bias):
    def build(lib):
        torch.manual_seed(0)
        return nn.Sequential(lib.Linear(8, 8, r=2), nn.Linear(8, 8), lib.Linear(8, 4, r=2, bias=True))

    theirs, ours = build(loralib), build(lora)
    loralib.mark_only_lora_as_trainable(theirs, bias=bias)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()
    }
    assert set(lora.lora_state_dict(ours, bias=bias)) == set(loralib.lora_state_dict(theirs, bias=bias))
    with pytest.raises(ValueError, match="bias"):
        lora.lora_state_dict(ours, bias="some")


def test_merge_unmerge_round_trip_is_exact_enough():
    torch.manual_seed(0)
    layer = lora.Linear(16, 8, r=4)
    randomize_lora(layer)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 16)
    y_train = layer(x)
    layer.eval()
    assert layer.merged and not torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), y_train, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    no_merge = lora.Linear(16, 8, r=4, merge_weights=False)
    no_merge.eval()
    assert not no_merge.merged


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = lora.Linear(10, 6, r=3, lora_dropout=0.2)
    randomize_lora(a)
    b = lora.Linear(10, 6, r=3, lora_dropout=0.2)
    b.load_state_dict(copy.deepcopy(a.state_dict()), strict=True)
    a.eval(), b.eval()
    x = torch.randn(4, 10)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("bad", [dict(r=-1), dict(r=2, lora_dropout=1.0), dict(r=2, lora_dropout=-0.1)])
def test_bad_layer_arguments(bad):
    name = "r" if "lora_dropout" not in bad else "lora_dropout"
    with pytest.raises(ValueError, match=name):
        lora.Linear(4, 4, **bad)


def test_loralib_script_runs_with_import_fastlora_as_lora():
    """A typical loralib training script, unchanged but for the import."""

    def script(lib):
        torch.manual_seed(0)
        model = nn.Sequential(lib.Linear(6, 16, r=4, lora_alpha=8), nn.Tanh(), lib.Linear(16, 2, r=4))
        lib.mark_only_lora_as_trainable(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        x, y = torch.randn(32, 6), torch.randn(32, 2)
        losses = []
        for _ in range(5):
            loss = (model(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        return losses, model(x).detach(), lib.lora_state_dict(model)

    l1, out1, sd1 = script(loralib)
    l2, out2, sd2 = script(lora)
    assert l2 == pytest.approx(l1, rel=1e-5)
    torch.testing.assert_close(out2, out1, rtol=1e-5, atol=1e-5)
    assert sd1.keys() == sd2.keys()
