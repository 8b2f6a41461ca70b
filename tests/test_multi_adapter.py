"""Several named adapters on one base: PEFT's multi-adapter folders both ways, set_adapter /
delete_adapter as PEFT's, state-dict keys, merging the active adapter, bad input."""

import copy
import json
import os

import peft
import pytest
import torch

import fastlora
from fastlora.ops import launcher
from tiny_models import TARGETS, batch, init_lora_B, lora_grads, tiny_llama


def peft_with_two_adapters():
    """A PEFT tiny Llama with "default" (r 4, alpha 8) and "b" (r 8, alpha 4, rsLoRA) adapters."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=4, target_modules=TARGETS, use_rslora=True))
    return init_lora_B(model)


def ours_from(directory) -> torch.nn.Module:
    model = fastlora.load_adapter(tiny_llama(), directory)
    return fastlora.load_adapter(model, os.path.join(directory, "b"), adapter_name="b")


def test_peft_multi_adapter_folders_load_and_run_as_peft(tmp_path):
    theirs = peft_with_two_adapters()
    theirs.save_pretrained(tmp_path)
    ours = ours_from(tmp_path)
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.adapter_names() == ["default", "b"] and layer.lora_adapters["b"].r == 8
    ids = batch()["input_ids"]
    for name in ("default", "b", "default"):
        theirs.set_adapter(name)
        fastlora.set_adapter(ours, name)
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    fastlora.set_adapter(ours, "b")
    assert not torch.allclose(ours(ids).logits, theirs(ids).logits)  # theirs runs "default": the adapters differ


def test_saved_folders_are_peft_s_layout_and_load_in_peft(tmp_path):
    ours = ours_from(_peft_folder(tmp_path / "peft"))
    fastlora.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "b" / "adapter_config.json").read_text())["r"] == 8
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    theirs.load_adapter(tmp_path / "ours" / "b", adapter_name="b")
    ids = batch()["input_ids"]
    for name in ("default", "b"):
        theirs.set_adapter(name)
        fastlora.set_adapter(ours, name)
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    fastlora.save_adapter(ours, tmp_path / "only-b", adapter_name="b")
    assert sorted(os.listdir(tmp_path / "only-b")) == ["b"]


def _peft_folder(directory):
    peft_with_two_adapters().save_pretrained(directory)
    return directory


def test_default_adapter_keeps_its_keys_and_named_ones_load_back(tmp_path):
    ours = ours_from(_peft_folder(tmp_path))
    keys = [k for k in ours.state_dict() if k.startswith("model.layers.0.self_attn.q_proj.")]
    assert keys == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.lora_A",
                    "model.layers.0.self_attn.q_proj.lora_B", "model.layers.0.self_attn.q_proj.lora_adapters.b.lora_A",
                    "model.layers.0.self_attn.q_proj.lora_adapters.b.lora_B"]
    fresh = ours_from(_peft_folder(tmp_path / "other"))
    fresh.load_state_dict(ours.state_dict(), strict=True)
    fastlora.set_adapter(ours, "b")
    fastlora.set_adapter(fresh, "b")
    ids = batch()["input_ids"]
    torch.testing.assert_close(fresh(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_set_adapter_trains_only_the_active_adapter(tmp_path):
    ours = ours_from(_peft_folder(tmp_path))
    fastlora.set_adapter(ours, "b")
    ours(**batch()).loss.backward()
    grads = lora_grads(ours)
    assert grads and all(".lora_adapters.b." in k for k in grads) and all(g.abs().max() > 0 for g in grads.values())
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".lora_adapters." not in n)


def test_merge_folds_in_the_active_adapter(tmp_path):
    ours = ours_from(_peft_folder(tmp_path))
    fastlora.set_adapter(ours, "b")
    ids = batch()["input_ids"]
    expected = ours(ids).logits
    fastlora.merge(ours)
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        fastlora.set_adapter(ours, "default")
    fastlora.unmerge(ours)
    fastlora.set_adapter(ours, "default")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_several_active_adapters_add_up_as_peft_s_and_merging_them_is_refused(tmp_path):
    theirs = peft_with_two_adapters()
    theirs.save_pretrained(tmp_path)
    ours = ours_from(tmp_path)
    theirs.base_model.set_adapter(["default", "b"])
    fastlora.set_adapter(ours, ["default", "b"])
    ids = batch()["input_ids"]
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    ours(**batch()).loss.backward()
    grads = lora_grads(ours)
    assert any(".lora_adapters.b." in k for k in grads) and any(".lora_adapters." not in k for k in grads)
    before = copy.deepcopy(ours.state_dict())
    for merging in (fastlora.merge, fastlora.merge_and_unload):
        with pytest.raises(ValueError, match="several active adapters"):
            merging(ours)
    ours.eval()  # loralib's merge on eval() leaves several active adapters unmerged
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="distinct"):
        fastlora.set_adapter(ours, ["b", "b"])
    fastlora.delete_adapter(ours, "b")
    assert ours.model.layers[0].self_attn.q_proj.active_adapter == "default"


def test_delete_adapter(tmp_path):
    ours = ours_from(_peft_folder(tmp_path))
    fastlora.set_adapter(ours, "b")
    with pytest.raises(ValueError, match="cannot be deleted"):
        fastlora.delete_adapter(ours, "default")
    fastlora.delete_adapter(ours, "b")
    layer = ours.model.layers[1].mlp.down_proj
    assert layer.adapter_names() == ["default"] and layer.active_adapter == "default"
    assert not any(".lora_adapters." in k for k in ours.state_dict())
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids = batch()["input_ids"]
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_unknown_names_and_bad_named_files_change_nothing(tmp_path):
    ours = ours_from(_peft_folder(tmp_path))
    state = copy.deepcopy(ours.state_dict())
    for call, words in [
        (lambda: fastlora.set_adapter(ours, "c"), "unknown adapter 'c'"),
        (lambda: fastlora.delete_adapter(ours, "c"), "unknown adapter 'c'"),
        (lambda: fastlora.save_adapter(ours, tmp_path / "x", adapter_name="c"), "unknown adapter 'c'"),
        (lambda: fastlora.load_adapter(ours, tmp_path / "b", adapter_name="a.b"), "adapter_name"),
        (lambda: fastlora.load_adapter(ours, tmp_path / "b", adapter_name="__base__"), "adapter_name"),
    ]:
        with pytest.raises(ValueError, match=words):
            call()
    other = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["k_proj"]))
    other.save_pretrained(tmp_path / "k")
    with pytest.raises(ValueError, match="has no default adapter"):
        fastlora.load_adapter(ours, tmp_path / "k", adapter_name="k")
    with_head = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                   modules_to_save=["lm_head"]))
    with_head.save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="biases or modules_to_save"):
        fastlora.load_adapter(ours, tmp_path / "head", adapter_name="c")
    after = ours.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert ours.model.layers[0].self_attn.q_proj.active_adapter == "default"


def test_loading_a_named_adapter_again_replaces_it_with_the_file_s_rank(tmp_path):
    ours = ours_from(_peft_folder(tmp_path))
    smaller = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS))
    init_lora_B(smaller).save_pretrained(tmp_path / "small")
    fastlora.load_adapter(ours, tmp_path / "small", adapter_name="b")
    assert ours.model.layers[0].self_attn.q_proj.lora_adapters["b"].lora_A.shape == (2, 32)
    fastlora.set_adapter(ours, "b")
    ids = batch()["input_ids"]
    torch.testing.assert_close(ours(ids).logits, smaller(ids).logits, rtol=1e-5, atol=1e-5)


def per_row_reference(x, weight, bias, lora_A, lora_B, scaling, index):
    """Each row through its own adapter with fastlora.reference (the base alone for -1), float64."""
    rows = []
    for m, i in enumerate(index.tolist()):
        if i < 0:
            rows.append(torch.nn.functional.linear(x[m:m + 1], weight, bias))
        else:
            rows.append(fastlora.reference.lora_linear(x[m:m + 1], weight, bias, lora_A[i], lora_B[i], float(scaling[i])))
    return torch.cat(rows) if rows else torch.nn.functional.linear(x, weight, bias)


def check_mixed_batch(backend, M, adapters, ranks, dtype, adapter_dtype=None, K=24, N=20, device="cpu"):
    """multi_lora_linear on ``backend`` (on ``device``) against the reference row by row on the
    CPU (adapters of different ranks, zero-padded; rows with -1 the base alone): output and
    every gradient under the 2x-error rule."""
    from lora_cases import assert_2x_rule

    g = torch.Generator().manual_seed(M + adapters)
    r = max(ranks)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    weight = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    bias = torch.randn(N, generator=g, dtype=torch.float64)
    lora_A = torch.zeros(adapters, r, K, dtype=torch.float64)
    lora_B = torch.zeros(adapters, N, r, dtype=torch.float64)
    for i, rank in enumerate(ranks):
        lora_A[i, :rank] = torch.randn(rank, K, generator=g, dtype=torch.float64) / K**0.5
        lora_B[i, :, :rank] = torch.randn(N, rank, generator=g, dtype=torch.float64)
    scaling = torch.rand(adapters, generator=g, dtype=torch.float64) + 0.5
    index = torch.randint(-1, adapters, (M,), generator=g)
    index[:1] = 0  # at least one row with an adapter
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)

    def run(fn, dt, adapter_dt, on="cpu"):
        leaves = [t.detach().to(device=on, dtype=d).clone().requires_grad_()
                  for t, d in ((x, dt), (bias, dt), (lora_A, adapter_dt), (lora_B, adapter_dt))]
        y = fn(leaves[0], weight.to(device=on, dtype=dt), leaves[1], leaves[2], leaves[3], scaling, index.to(on))
        y.backward(dy.to(device=on, dtype=dt))
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]  # M = 0: no gradient at all
        return {k: v.cpu() for k, v in
                {"y": y.detach(), "dx": grads[0], "dbias": grads[1], "dA": grads[2], "dB": grads[3]}.items()}

    launcher._chosen.clear()
    with fastlora.use_backend(backend):
        ours = run(fastlora.multi_lora_linear, dtype, adapter_dtype or dtype, device)
    if backend == "triton" and M:
        assert {key[0] for key in launcher._chosen} == {"mixed_shrink_kernel", "mixed_expand_kernel", "mixed_grad_kernel"}
    truth = run(per_row_reference, torch.float64, torch.float64)
    plain = run(per_row_reference, dtype, dtype)
    if M:
        assert truth["dA"].abs().max() > 0
    truth = {k: v.to(ours[k].dtype) for k, v in truth.items()}  # fp32 adapters on a half x: compare in theirs
    plain = {k: v.to(ours[k].dtype) for k, v in plain.items()}
    assert_2x_rule(ours, truth, plain, dtype, label=f"{backend} mixed M{M} n{adapters}")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("M,adapters,ranks,dtype", [
    (37, 3, (4, 2, 6), torch.float32), (1, 4, (4, 4, 4, 4), torch.float32), (16, 16, tuple(range(1, 17)), torch.float32),
    (200, 5, (8, 8, 3, 1, 8), torch.float16), (0, 2, (2, 2), torch.float32), (64, 64, (4,) * 64, torch.float32),
])
def test_mixed_batch_op_matches_each_row_with_its_own_adapter(M, adapters, ranks, dtype, backend):
    """The torch path (segmented bmm) and the cpp kernels (GEMMs for adapters with many rows, dot
    products for those with few: both occur in these cases)."""
    check_mixed_batch(backend, M, adapters, ranks, dtype)


def mixed_models(tmp_path):
    theirs = peft_with_two_adapters()
    theirs.save_pretrained(tmp_path)
    return theirs.eval(), ours_from(tmp_path).eval()  # PEFT refuses adapter_names in training mode


def test_hugging_face_adapter_names_match_peft_and_each_sample_alone(tmp_path):
    theirs, ours = mixed_models(tmp_path)
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(3))
    names = ["b", "__base__", "default", "b"]
    mixed = ours(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(mixed, theirs(input_ids=ids, adapter_names=names).logits, rtol=1e-5, atol=1e-5)
    for i, name in enumerate(names):
        if name == "__base__":
            expected = tiny_llama()(input_ids=ids[i:i + 1]).logits
        else:
            fastlora.set_adapter(ours, name)
            expected = ours(input_ids=ids[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_takes_adapter_names_as_peft_s(tmp_path, beams):
    """generate(..., adapter_names=[...]) runs every step with each sample's adapter (beams of one
    sample included): the tokens equal PEFT's generate with the same names and each sample
    generated alone with its adapter set; a deep copy's generate runs the copy."""
    theirs, ours = mixed_models(tmp_path)
    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(3))
    names = ["b", "__base__", "default"]
    settings = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
    mixed = ours.generate(ids, adapter_names=names, **settings)
    assert torch.equal(mixed, theirs.generate(input_ids=ids, adapter_names=names, **settings))
    for i, name in enumerate(names):
        if name == "__base__":
            alone = tiny_llama().generate(ids[i:i + 1], **settings)
        else:
            fastlora.set_adapter(ours, name)
            alone = ours.generate(ids[i:i + 1], **settings)
        assert torch.equal(alone, mixed[i:i + 1]), name
    copied = copy.deepcopy(ours)
    assert copied.generate.__self__ is copied


def training_mixed_model(tmp_path):
    """Our tiny Llama with adapters "default" and "b" (dropout 0.3), both trainable, in training mode."""
    _, ours = mixed_models(tmp_path)
    for layer in ours.modules():
        if isinstance(layer, fastlora.Linear):
            layer.lora_adapters["b"].lora_dropout_p = 0.3
            layer.lora_adapters["b"].requires_grad_(True)
    return ours.train()


def test_mixed_batch_trains_each_adapter_from_its_own_rows_only(tmp_path):
    """Dropout on: the gradients of adapter "b" come from b's samples only (changing the other
    samples changes nothing of them), and each adapter's gradients equal a batch of its own samples."""
    ours = training_mixed_model(tmp_path)
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(4))
    names = ["b", "default", "__base__"]

    def grads(batch_ids, batch_names, seed=0):
        ours.zero_grad()
        torch.manual_seed(seed)
        ours(input_ids=batch_ids, labels=batch_ids, adapter_names=batch_names).loss.backward()
        return {k: v.clone() for k, v in lora_grads(ours).items()}

    first = grads(ids, names)
    other = ids.clone()
    other[1:] = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    second = grads(other, names)
    b_keys = [k for k in first if ".lora_adapters.b." in k]
    default_keys = [k for k in first if ".lora_adapters." not in k]
    assert b_keys and default_keys
    # the mask is drawn for the whole batch from one seed: b's rows see the same mask both times
    for key in b_keys:
        assert first[key].abs().max() > 0
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(second[k], first[k]) for k in default_keys)


@pytest.mark.parametrize("backend", __import__("lora_cases").available_backends("cpu"))
def test_mixed_dropout_saves_no_input_sized_tensor_and_matches_its_mask(backend):
    """With dropout the mixed op keeps the keep-mask as bits (M x K / 8 bytes) and x itself (the
    caller's), nothing else of x's size; output and gradients equal the reference run on the
    rows that mask drops (read back from the bits the op saved)."""
    from fastlora.ops.torch_ops import unpack_keep_bits

    g = torch.Generator().manual_seed(11)
    M, K, N, n, r = 48, 32, 24, 3, 4
    x = torch.randn(M, K, generator=g, requires_grad=True)
    weight = torch.randn(N, K, generator=g) / K**0.5
    lora_A = (torch.randn(n, r, K, generator=g) / K**0.5).requires_grad_()
    lora_B = torch.randn(n, N, r, generator=g).requires_grad_()
    scaling, rates = [1.0, 2.0, 0.5], [0.3, 0.0, 0.6]
    index = torch.randint(-1, n, (M,), generator=g)
    saved = []
    with fastlora.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                                  lambda t: t):
        y = fastlora.multi_lora_linear(x, weight, None, lora_A, lora_B, scaling, index, rates, training=True)
    input_sized = [t for t in saved if t.numel() >= M * K]
    assert input_sized and all(t.data_ptr() == x.data_ptr() for t in input_sized)  # the base GEMM's and ours
    (bits,) = [t for t in saved if t.dtype == torch.uint8 and tuple(t.shape) == (M, K // 8)]
    keep = unpack_keep_bits(bits, K)
    row_rate = torch.tensor(rates + [0.0])[torch.where(index < 0, n, index)]
    assert not keep[row_rate == 0].logical_not().any() and keep[row_rate == 0.6].float().mean() < 0.6
    dy = torch.randn(M, N, generator=g)
    ours = torch.autograd.grad(y, (x, lora_A, lora_B), dy)
    x_ref = x.detach().clone().requires_grad_()
    dropped = x_ref * keep / (1 - row_rate[:, None])
    rows = [torch.nn.functional.linear(x_ref[m:m + 1], weight) if i < 0 else
            torch.nn.functional.linear(x_ref[m:m + 1], weight)
            + scaling[i] * dropped[m:m + 1] @ lora_A[i].t() @ lora_B[i].t() for m, i in enumerate(index.tolist())]
    expected = torch.cat(rows)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(ours, torch.autograd.grad(expected, (x_ref, lora_A, lora_B), dy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_mixed_batch_trains_the_same_under_gradient_checkpointing(tmp_path, use_reentrant):
    """Hugging Face's activation checkpointing recomputes each layer inside the backward, outside
    the model call that carried adapter_names: the recomputation still runs each sample's
    adapter (dropout included), so every gradient equals the run without checkpointing."""
    ours = training_mixed_model(tmp_path)
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(8))

    def grads():
        ours.zero_grad()
        torch.manual_seed(0)
        ours(input_ids=ids, labels=ids, adapter_names=["b", "default", "__base__"]).loss.backward()
        return {k: v.clone() for k, v in lora_grads(ours).items()}

    expected = grads()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ours.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    checkpointed = grads()
    assert sorted(checkpointed) == sorted(expected) and any(".lora_adapters.b." in k for k in expected)
    for key, value in expected.items():
        assert value.abs().max() > 0, key
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-5, atol=1e-7)


def test_mixed_batch_on_4bit_layers_matches_each_sample(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tiny_models import quantize_linears

    theirs = peft_with_two_adapters()
    theirs.save_pretrained(tmp_path)
    ours = fastlora.load_adapter(quantize_linears(tiny_llama(), blocksize=32), tmp_path)
    fastlora.load_adapter(ours, tmp_path / "b", adapter_name="b")
    assert isinstance(ours.model.layers[0].self_attn.q_proj, fastlora.Linear4bit)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    mixed = ours(input_ids=ids, adapter_names=["b", "default"]).logits
    for i, name in enumerate(["b", "default"]):
        fastlora.set_adapter(ours, name)
        torch.testing.assert_close(mixed[i:i + 1], ours(input_ids=ids[i:i + 1]).logits, rtol=1e-5, atol=1e-5)


def test_adapter_names_follow_adapters_added_and_deleted_after_a_call(tmp_path):
    """The model's known adapter names are kept between calls, and renewed when an adapter is
    added or deleted: a new name is taken, a deleted one refused."""
    _, ours = mixed_models(tmp_path)
    ids = torch.randint(0, 97, (2, 12))
    ours(input_ids=ids, adapter_names=["b", "default"])
    with pytest.raises(ValueError, match="unknown adapters \\['c'\\]"):
        ours(input_ids=ids, adapter_names=["c", "default"])
    ours.model.layers[0].self_attn.q_proj.add_adapter("c", 2, 4)
    ours(input_ids=ids, adapter_names=["c", "default"])
    fastlora.delete_adapter(ours, "c")
    with pytest.raises(ValueError, match="unknown adapters \\['c'\\]"):
        ours(input_ids=ids, adapter_names=["c", "default"])


def test_bad_mixed_batches_are_refused(tmp_path):
    _, ours = mixed_models(tmp_path)
    ids = torch.randint(0, 97, (2, 12))
    with pytest.raises(ValueError, match="unknown adapters \\['c'\\]"):
        ours(input_ids=ids, adapter_names=["b", "c"])
    with pytest.raises(ValueError, match="one name per sample"):
        ours(input_ids=ids, adapter_names=["b", "b", "b"][:1] * 3 + ["b"] * 2)
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        ours(input_ids=ids, adapter_names="b")
    ours(input_ids=ids)  # a refused call leaves nothing behind: the next plain call runs the active adapter
    x, weight = torch.randn(5, 8), torch.randn(6, 8)
    lora_A, lora_B, scaling = torch.randn(2, 3, 8), torch.randn(2, 6, 3), [1.0, 2.0]
    for index, error, words in [
        (torch.tensor([0, 1, 2, 0, 0]), ValueError, r"\[-1, 2\)"),
        (torch.tensor([0, 1, -2, 0, 0]), ValueError, r"\[-1, 2\)"),
        (torch.tensor([0, 1, 0]), ValueError, "one entry per row"),
        (torch.tensor([0.0, 1, 0, 0, 0]), TypeError, "int32 / int64"),
        (torch.zeros(5, dtype=torch.long, device="meta"), ValueError, "adapter_index is on meta"),
    ]:
        with pytest.raises(error, match=words):
            fastlora.multi_lora_linear(x, weight, None, lora_A, lora_B, scaling, index)
    with pytest.raises(ValueError, match="must agree"):
        fastlora.multi_lora_linear(x, weight, None, lora_A, torch.randn(2, 6, 4), scaling, torch.zeros(5, dtype=torch.long))


def traced_code(fn, *args) -> str:
    """The code of the graph torch.compile(fullgraph=True) traces for fn(*args), subgraphs included."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append("\n".join(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=recording)(*args)
    return graphs[0]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_mixed_batch_op_compiles_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) takes the backend's registered mixed op (its fake kernel
    gives the shapes; no data-dependent shape, no sync): the traced graph calls
    fastlora::mixed_lora_fwd_<backend>, and Inductor's output and gradients equal eager ones."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(12, 16, generator=g)
    lora_A = torch.randn(3, 4, 16, generator=g, requires_grad=True)
    lora_B = torch.randn(3, 12, 4, generator=g, requires_grad=True)
    index = torch.randint(-1, 3, (40,), generator=g)
    with fastlora.use_backend(backend):
        code = traced_code(fastlora.multi_lora_linear, x, weight, None, lora_A, lora_B, [1.0, 2.0, 0.5], index)
        assert f"fastlora.mixed_lora_fwd_{backend}" in code
        y = torch.compile(fastlora.multi_lora_linear, fullgraph=True)(x, weight, None, lora_A, lora_B, [1.0, 2.0, 0.5], index)
        expected = fastlora.multi_lora_linear(x, weight, None, lora_A, lora_B, [1.0, 2.0, 0.5], index)
    torch.testing.assert_close(y, expected)
    dy = torch.randn(y.shape, generator=g)
    for ours, theirs in zip(torch.autograd.grad(y, (x, lora_A, lora_B), dy),
                            torch.autograd.grad(expected, (x, lora_A, lora_B), dy)):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.skipif("triton" not in __import__("lora_cases").available_backends("cpu"), reason="triton is not installed")
@pytest.mark.parametrize("M,adapters,ranks,dtype,adapter_dtype", [
    (37, 3, (8, 2, 5), torch.float32, torch.float32), (1, 4, (8,) * 4, torch.float32, torch.float32),
    (70, 16, (8,) * 16, torch.float16, torch.float16), (20, 5, (8, 4, 8, 1, 8), torch.float16, torch.float32),
    (3, 64, (8,) * 64, torch.float32, torch.float32), (0, 2, (4, 4), torch.float32, torch.float32),
])
def test_triton_mixed_batch_matches_each_row(M, adapters, ranks, dtype, adapter_dtype):
    """The gathered shrink / expand kernels forward, and backward the same two kernels on dy
    (B^T as "A", A^T as "B") plus the per-adapter weight-gradient kernel (interpreter)."""
    check_mixed_batch("triton", M, adapters, ranks, dtype, adapter_dtype, K=40, N=36)
