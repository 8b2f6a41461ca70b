"""Several named adapters on one base: PEFT's multi-adapter folders both ways, set_adapter /
delete_adapter as PEFT's, state-dict keys, merging the active adapter, bad input."""

import copy
import json
import os

import peft
import pytest
import torch

import fastlora
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
