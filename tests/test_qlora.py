"""QLoRA: LoRA on bitsandbytes 4-bit bases. The dequantizers against bitsandbytes, the op
against bitsandbytes' dequantize_4bit + fastlora.reference, the layer against PEFT's QLoRA
layer, PEFT's files both ways, a Trainer run, merging, what is kept and saved, bad input."""

import copy
import sys

import peft
import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402

import fastlora  # noqa: E402
import fastlora.reference as reference  # noqa: E402
from fastlora.ops import dequant  # noqa: E402
from fastlora.ops.lora_linear import saved_keep_mask  # noqa: E402
from fastlora.ops.qlora_linear import qlora_linear  # noqa: E402
from fastlora.ops.weight4bit import from_params4bit  # noqa: E402
from lora_cases import Case, assert_2x_rule, available_backends, cast_inputs, make_inputs  # noqa: E402
from tiny_models import TARGETS, batch, init_lora_B, lora_grads, quantize_linears, tiny_llama  # noqa: E402

BACKENDS = available_backends("cpu")
# the interpreter rounds float32 -> bfloat16 by truncation, not to nearest: bf16 Triton runs on a GPU (test_gpu.py)
DTYPES = {"torch": (torch.float32, torch.float16, torch.bfloat16), "cpp": (torch.float32, torch.float16, torch.bfloat16),
          "triton": (torch.float32, torch.float16)}


def params4bit(weight: torch.Tensor, quant_type="nf4", nested=True, blocksize=64, quant_storage=torch.uint8,
               device="cpu"):
    """``weight`` quantized by bitsandbytes (on ``device``) as a Linear4bit holds it."""
    return bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=blocksize, quant_type=quant_type,
                             compress_statistics=nested, quant_storage=quant_storage).to(device)


def linear4bit(in_features=40, out_features=24, bias=True, seed=0, compute_dtype=torch.float32, **quant):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                              quant_type=quant.get("quant_type", "nf4"),
                              compress_statistics=quant.get("nested", True))
    layer.weight = params4bit(dense.weight.data, **quant)
    if bias:
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer


# layouts where bitsandbytes 0.50.2's CPU dequantizer is right (see the next test for those where it is not)
LAYOUTS = [(96, 100, 64), (33, 65, 32), (40, 130, 128), (17, 4100, 4096), (64, 64, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_is_bitsandbytes_bit_for_bit(backend, quant_type, nested):
    torch.manual_seed(0)
    for rows, cols, blocksize in LAYOUTS:
        for dtype in DTYPES[backend]:
            weight = params4bit(torch.randn(rows, cols, dtype=dtype), quant_type, nested, blocksize)
            expected = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
            got = dequant.dequantize(from_params4bit(weight), dtype, backend, out=torch.empty(rows, cols, dtype=dtype))
            assert torch.equal(got, expected), f"{backend} {quant_type} nested={nested} {rows}x{cols}/{blocksize} {dtype}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_follows_the_layout_where_bitsandbytes_cpu_kernel_does_not(backend):
    """Blocks run over the flattened weight and may straddle rows (bitsandbytes' quantize_4bit
    and CUDA kernel). bitsandbytes 0.50.2's CPU (AVX-512) dequantizer disagrees with that for
    many row lengths that are not a multiple of the block size (K = 32, 96, 688 in blocks of
    64, 64 and 192 in blocks of 128; error 1.9 against the 4-bit grid's 0.39 on randn 48 x 32).
    fastlora's values quantize back to exactly the stored bytes and absmax, as values on the
    grid must."""
    torch.manual_seed(1)
    for rows, cols, blocksize in [(48, 32, 64), (64, 64, 128), (9, 30, 256), (32, 96, 64), (32, 192, 128),
                                  (256, 688, 64)]:
        weight = params4bit(torch.randn(rows, cols), "nf4", False, blocksize)
        got = dequant.dequantize(from_params4bit(weight), torch.float32, backend, out=torch.empty(rows, cols))
        packed, state = bnb_functional.quantize_4bit(got, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
        assert torch.equal(packed.view(-1), weight.data.view(-1))
        assert torch.equal(state.absmax, weight.quant_state.absmax)


def test_dequantize_reads_other_quant_storage_dtypes():
    torch.manual_seed(2)
    weight = params4bit(torch.randn(32, 128), "nf4", True, 64, quant_storage=torch.bfloat16)
    assert weight.dtype == torch.bfloat16
    expected = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    for backend in BACKENDS:
        got = dequant.dequantize(from_params4bit(weight), torch.float32, backend, out=torch.empty(32, 128))
        assert torch.equal(got, expected), backend


QCASES = [
    (Case(M=37, K=64, N=33, r=4), "nf4", True, 64),
    (Case(M=1, K=96, N=24, r=1, bias=False), "fp4", False, 32),
    (Case(M=41, K=100, N=35, r=16, dropout_p=0.1), "nf4", False, 64),  # K not a multiple of the block
    (Case(M=7, K=72, N=40, r=8, dropout_p=0.3, batch=3, strided=True), "fp4", True, 128),
    (Case(M=0, K=64, N=17, r=4, dropout_p=0.2), "nf4", True, 64),
    (Case(M=20, K=64, N=48, r=16, dtype=torch.float16, dropout_p=0.1), "nf4", True, 64),
    (Case(M=17, K=96, N=40, r=8, dtype=torch.float16, adapter_dtype=torch.float32), "fp4", False, 32),
    (Case(M=30, K=128, N=24, r=8, dtype=torch.bfloat16, adapter_dtype=torch.float32, dropout_p=0.2), "nf4", True, 64),
    (Case(M=48, K=64, N=33, r=4, dtype=torch.bfloat16), "fp4", True, 64),
]


def run_qlora(t: dict, weight, case: Case) -> tuple[dict, torch.Tensor | None]:
    """Forward and backward of qlora_linear: y, every gradient, and the keep-mask it drew."""
    y = qlora_linear(t["x"], weight, t["bias"], t["lora_A"], t["lora_B"], t["scaling"], case.dropout_p, True)
    mask = saved_keep_mask(y).view(*t["x"].shape) if case.dropout_p and case.M else None
    y.backward(t["dy"])
    out = {"y": y.detach(), "dx": t["x"].grad, "dA": t["lora_A"].grad, "dB": t["lora_B"].grad}
    if t["bias"] is not None:
        out["dbias"] = t["bias"].grad
    return out, mask


def reference_on(dense: torch.Tensor, inputs: dict, case: Case, dtype: torch.dtype, mask, device: str = "cpu") -> dict:
    t = cast_inputs({**inputs, "weight": dense.double()}, case, dtype, device)
    y = reference.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scaling"],
                              case.dropout_p, True, dropout_mask=mask)
    y.backward(t["dy"])
    out = {"y": y.detach(), "dx": t["x"].grad, "dA": t["lora_A"].grad, "dB": t["lora_B"].grad}
    if t["bias"] is not None:
        out["dbias"] = t["bias"].grad
    return out


def check_qlora_case(case: Case, quant_type: str, nested: bool, blocksize: int, backend: str, device: str = "cpu") -> None:
    """qlora_linear's forward and every gradient under the 2x-error rule against
    fastlora.reference on bitsandbytes' own dequantized weight, dropout with the op's mask."""
    inputs = make_inputs(case)
    weight = params4bit(inputs["weight"].to(case.dtype), quant_type, nested, blocksize, device=device)
    dense = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)  # in case.dtype
    with fastlora.use_backend(backend):
        t = cast_inputs(inputs, case, device=device)
        torch.manual_seed(7)
        ours, mask = run_qlora(t, from_params4bit(weight), case)
    if mask is not None:
        assert 0 < mask.float().mean() < 1
    truth = reference_on(dense, inputs, case, torch.float64, mask, device)
    plain = reference_on(dense, inputs, case, case.dtype, mask, device)
    if case.M:
        assert all(truth[k].abs().max() > 0 for k in ("dx", "dA", "dB")), "a gradient is zero: the case tests nothing"
    assert_2x_rule(ours, truth, plain, case.dtype, label=f"qlora {backend} {case} {quant_type}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,quant_type,nested,blocksize", QCASES, ids=lambda v: str(v))
def test_qlora_op_matches_dequantize_plus_reference(backend, case, quant_type, nested, blocksize):
    """Forward and every gradient, dropout on and off, odd shapes, fp32 adapters on half compute dtypes."""
    if backend == "triton" and case.dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot does not run in the interpreter (tests/test_gpu.py runs it)")
    check_qlora_case(case, quant_type, nested, blocksize, backend)


DECODE_CASES = [
    (Case(M=1, K=64, N=48, r=4), 64),
    (Case(M=16, K=130, N=40, r=16, bias=False), 128),  # K not a multiple of the block: blocks straddle rows
    (Case(M=64, K=128, N=33, r=64, dtype=torch.float16), 64),
    (Case(M=9, K=64, N=24, r=8, dtype=torch.float16, adapter_dtype=torch.float32, batch=2), 32),
]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("case,blocksize", DECODE_CASES, ids=lambda v: str(v))
def test_in_gemm_dequant_decode_forward_matches(case, blocksize, monkeypatch):
    """The decode forward that dequantizes W inside the GEMM's main loop (off by default until
    a GPU report shows it faster), under the 2x rule with its backward."""
    from fastlora.ops import launcher, qlora_linear as qlora_module

    monkeypatch.setattr(qlora_module, "IN_GEMM_DEQUANT_MAX_ROWS", 64)
    launcher._chosen.clear()
    check_qlora_case(case, "nf4", True, blocksize, "triton")
    assert any(("W_4BIT", True) in key for key in launcher._chosen), "the 4-bit decode kernel did not run"


def quantized_llama(**quant):
    return quantize_linears(tiny_llama(), blocksize=32, **quant)  # K >= 32 in every layer: see above


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_layers_match_peft_qlora(backend, quant_type, nested):
    """fastlora's QLoRA layers (from PEFT's) give PEFT + bitsandbytes' loss, logits and LoRA gradients."""
    theirs = init_lora_B(peft.get_peft_model(quantized_llama(quant_type=quant_type, nested=nested),
                                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    ours = fastlora.from_peft(copy.deepcopy(theirs))
    assert isinstance(ours.model.layers[0].self_attn.q_proj, fastlora.Linear4bit)
    theirs.train()
    ours.train()
    out_theirs = theirs(**batch())
    out_theirs.loss.backward()
    with fastlora.use_backend(backend):
        out_ours = ours(**batch())
        out_ours.loss.backward()
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    grads_theirs, grads_ours = lora_grads(theirs), lora_grads(ours)
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) == 2 * 3 * 2
    for key, grad in grads_theirs.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grads_ours[key], grad, rtol=1e-4, atol=1e-6)


def test_peft_qlora_files_both_ways(tmp_path):
    """An adapter saved by fastlora loads in PEFT on the 4-bit model (same logits), and PEFT's loads in fastlora."""
    ids = batch()["input_ids"]
    ours = fastlora.inject(quantized_llama(), TARGETS, r=4, lora_alpha=8)
    init_lora_B(ours)
    fastlora.save_adapter(ours, tmp_path / "ours")
    # train mode: bitsandbytes' eval-mode CPU forward repacks the weight, and fails on these small layers
    theirs = peft.PeftModel.from_pretrained(quantized_llama(), tmp_path / "ours").train()
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)

    theirs = init_lora_B(peft.get_peft_model(quantized_llama(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS)))
    theirs.train()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = fastlora.load_adapter(quantized_llama(), tmp_path / "theirs")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, fastlora.Linear4bit)
    torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_qlora_training_with_the_trainer(tmp_path):
    """Four Trainer steps on the 4-bit tiny Llama: the loss follows PEFT's, only the adapters move."""
    from test_training import train_with_trainer

    theirs = init_lora_B(peft.get_peft_model(quantized_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    ours = fastlora.from_peft(copy.deepcopy(theirs))
    frozen = {n: p.clone() for n, p in ours.named_parameters() if "lora_" not in n}
    packed = {n: m.weight.data.clone() for n, m in ours.named_modules() if isinstance(m, fastlora.Linear4bit)}
    loss_theirs = train_with_trainer(theirs, tmp_path / "peft")
    loss_ours = train_with_trainer(ours, tmp_path / "fastlora")
    assert len(loss_ours) == 4 and loss_ours[-1] < loss_ours[0]
    torch.testing.assert_close(torch.tensor(loss_ours), torch.tensor(loss_theirs), rtol=1e-4, atol=1e-4)
    trained = dict(ours.named_parameters())
    assert all(torch.equal(trained[n], p) for n, p in frozen.items())
    assert all(torch.equal(ours.get_submodule(n).weight.data, p) for n, p in packed.items())


def test_state_dict_keeps_the_4bit_keys_and_loads_back():
    """The base layer's keys stay (bitsandbytes' own, quant state included) and load back with
    strict=True (bitsandbytes' Linear4bit itself refuses its quant-state keys there)."""
    model = quantized_llama()
    base_keys = set(model.state_dict())
    fastlora.inject(model, "all-linear", r=4, lora_alpha=8)
    init_lora_B(model)
    state = model.state_dict()
    assert {k for k in state if "lora_" not in k} == base_keys
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in state
    fresh = fastlora.inject(quantize_linears(tiny_llama(seed=5), blocksize=32), "all-linear", r=4, lora_alpha=8)
    ids = batch()["input_ids"]
    assert not torch.equal(fresh(ids).logits, model(ids).logits)
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_nothing_weight_sized_is_saved_or_kept_per_layer():
    """The backward keeps x, A, B, S and the keep bits (no dense weight); every layer shares
    one workspace, sized to the largest layer."""
    dequant.release_workspaces()
    first = fastlora.Linear4bit(linear4bit(64, 32), r=4, lora_dropout=0.1)  # weights of 2048 and 3072 values
    second = fastlora.Linear4bit(linear4bit(32, 96), r=4, lora_dropout=0.1)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(16, 64, requires_grad=True)  # 1024 values
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = second(first(x))
    assert saved and max(t.numel() for t in saved) <= x.numel()
    y.sum().backward()
    assert x.grad.abs().max() > 0 and first.lora_B.grad.abs().max() > 0  # B = 0 at init: dA is 0
    assert dequant.workspace_bytes() == {torch.device("cpu"): 96 * 32 * 4}


def test_merge_unmerge_and_merge_and_unload_as_peft():
    torch.manual_seed(3)
    base = linear4bit(64, 48)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(r=4, target_modules=["0"]))
    theirs.base_model.model.is_loaded_in_4bit = True
    ours = fastlora.inject(nn.Sequential(copy.deepcopy(base)), ["0"], r=4, lora_alpha=8)
    with torch.no_grad():
        ours[0].lora_B.normal_()
        ours[0].lora_A.normal_()
    x = torch.randn(5, 64)
    unmerged = ours(x)
    dense_expected = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state) + ours[0].delta_weight()
    fastlora.merge(ours)
    merged = ours(x)
    # re-quantized: within the 4-bit grid's rounding of each block, not exact
    step = (bnb_functional.dequantize_4bit(ours[0].weight.data, ours[0].weight.quant_state) - dense_expected).abs().max()
    assert 0 < step < 0.2 * dense_expected.abs().max()
    assert (merged - unmerged).abs().max() < 2 * step * 64
    dense = fastlora.merge_and_unload(copy.deepcopy(nn.Sequential(fastlora.Linear4bit(base, r=4, lora_alpha=8))),
                                      dequantize=True)
    assert type(dense[0]) is nn.Linear
    unloaded = fastlora.merge_and_unload(ours)
    assert type(unloaded[0]) is bnb.nn.Linear4bit and not isinstance(unloaded[0], fastlora.LoRALayer)
    torch.testing.assert_close(unloaded[0](x), merged, rtol=0, atol=0)
    layer = fastlora.Linear4bit(copy.deepcopy(base), r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    dense = fastlora.merge_and_unload(nn.Sequential(layer), dequantize=True)[0]
    expected = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float() + layer.delta_weight()
    torch.testing.assert_close(dense.weight, expected, rtol=0, atol=1e-6)


def test_compute_dtype_follows_bitsandbytes():
    base = linear4bit(64, 32, compute_dtype=torch.bfloat16)
    layer = fastlora.Linear4bit(base, r=4)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    dense = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(torch.bfloat16)
    expected = torch.nn.functional.linear(x.to(torch.bfloat16), dense, base.bias.to(torch.bfloat16)).float()
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)


def unquantized():
    return bnb.nn.Linear4bit(64, 32)  # no .to(device): bitsandbytes has not quantized it yet


def no_state():
    layer = linear4bit(64, 32)
    layer.weight.quant_state = None
    return layer


def repacked():
    """A layer whose eval-mode CPU forward repacked its weight (bitsandbytes does so on CPUs with
    AVX-512 BF16); elsewhere the flag that repacking sets."""
    layer = linear4bit(128, 64).eval()
    with torch.no_grad():
        layer(torch.randn(3, 128))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        layer.weight.quant_state.packing_format_for_cpu = True
    return layer


def unknown_type():
    layer = linear4bit(64, 32)
    layer.weight.quant_state.quant_type = "int4"
    return layer


@pytest.mark.parametrize("build,error,words", [
    (unquantized, ValueError, "quant state"),
    (no_state, ValueError, "quant state"),
    (repacked, ValueError, "packing_format_for_cpu"),
    (unknown_type, ValueError, "quant_type 'int4'"),
    (lambda: bnb.nn.Linear8bitLt(64, 32), TypeError, "4-bit"),
])
def test_bad_4bit_targets_are_refused_and_nothing_changes(build, error, words):
    model = nn.Sequential(build(), nn.ReLU())
    before = [(n, p.data_ptr()) for n, p in model.named_parameters()]
    with pytest.raises(error, match=words):
        fastlora.inject(model, ["0"], r=4)
    assert not isinstance(model[0], fastlora.LoRALayer)
    assert [(n, p.data_ptr()) for n, p in model.named_parameters()] == before


def test_dora_on_a_4bit_target_is_refused():
    model = nn.Sequential(linear4bit(64, 32))
    with pytest.raises(ValueError, match="use_dora"):
        fastlora.inject(model, ["0"], r=4, use_dora=True)
    assert not isinstance(model[0], fastlora.LoRALayer)


def test_bad_op_input_names_the_argument():
    weight = from_params4bit(params4bit(torch.randn(32, 64)))
    A, B = torch.randn(4, 64), torch.randn(32, 4)
    with pytest.raises(ValueError, match="in_features"):
        qlora_linear(torch.randn(3, 60), weight, None, A, B, 1.0)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        qlora_linear(torch.randn(3, 64, dtype=torch.float64), weight, None, A, B, 1.0)
    with pytest.raises(TypeError, match="weight must be a fastlora.ops.weight4bit.Weight4bit"):
        qlora_linear(torch.randn(3, 64), torch.randn(32, 64), None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        qlora_linear(torch.randn(3, 64), weight, None, A, torch.randn(30, 4), 1.0)


def test_without_bitsandbytes_a_4bit_feature_says_how_to_install(monkeypatch):
    from fastlora.layers import bitsandbytes_module

    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match=r"fastlora\[qlora\]"):
        bitsandbytes_module("functional")


def test_peft_kbit_preparation_and_gradient_checkpointing_train_the_same():
    """PEFT's prepare_model_for_kbit_training (which QLoRA recipes call) and Hugging Face
    gradient checkpointing: the same loss and LoRA gradients as a plain step, dropout replayed."""
    def step(checkpointing: bool):
        model = quantized_llama()
        if checkpointing:  # before the adapters, as PEFT's recipe does (it freezes every parameter)
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        init_lora_B(fastlora.inject(model, TARGETS, r=4, lora_alpha=8, lora_dropout=0.2))
        model.train()
        torch.manual_seed(11)
        loss = model(**batch()).loss
        loss.backward()
        return loss.detach(), lora_grads(model)

    loss_plain, grads_plain = step(False)
    loss_checkpointed, grads_checkpointed = step(True)
    torch.testing.assert_close(loss_checkpointed, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads_checkpointed.keys() == grads_plain.keys() and grads_plain
    for key, grad in grads_plain.items():
        torch.testing.assert_close(grads_checkpointed[key], grad, rtol=1e-5, atol=1e-7)


def test_import_fastlora_does_not_import_bitsandbytes():
    import subprocess

    code = "import sys, fastlora; assert 'bitsandbytes' not in sys.modules, 'imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
