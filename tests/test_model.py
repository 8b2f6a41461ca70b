"""Whole models: inject vs PEFT on a tiny Llama and GPT-2 (built from configs, no download),
adapters across PEFT and fastlora, from_peft, merging, failed loads."""

import copy
import json

import peft
import pytest
import torch
import torch.nn as nn

import fastlora
from tiny_models import TARGETS, batch, lora_grads, peft_model, tiny_gpt2, tiny_llama

def test_inject_matches_peft_loss_gradients_and_training_curve(tmp_path):
    theirs = peft_model(tiny_llama(), TARGETS)
    theirs.save_pretrained(tmp_path)
    ours = fastlora.load_adapter(tiny_llama(), tmp_path)
    injected = [n for n, m in ours.named_modules() if isinstance(m, fastlora.Linear)]
    assert len(injected) == 6 and all(n.split(".")[-1] in TARGETS for n in injected)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(ours.named_parameters()) if "lora_" in n}

    loss_theirs = theirs(**batch()).loss
    loss_ours = ours(**batch()).loss
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
    loss_theirs.backward()
    loss_ours.backward()
    g_theirs, g_ours = lora_grads(theirs), lora_grads(ours)
    assert g_theirs.keys() == g_ours.keys() and len(g_ours) == 12
    for key in g_theirs:
        torch.testing.assert_close(g_ours[key], g_theirs[key], rtol=1e-4, atol=1e-6)

    curves = []
    for model in (theirs, ours):
        model.train()
        model.zero_grad()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for step in range(20):
            loss = model(**batch(step)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)


def test_fastlora_adapter_loads_in_peft_with_same_logits(tmp_path):
    ours = fastlora.inject(tiny_llama(), TARGETS, r=4, lora_alpha=8)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    fastlora.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids = batch()["input_ids"]
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob("*.tmp"))


def test_gpt2_conv1d_is_injected_with_fan_in_fan_out(tmp_path):
    theirs = peft_model(tiny_gpt2(), ["c_attn", "c_fc"], fan_in_fan_out=True)
    ours = fastlora.from_peft(copy.deepcopy(theirs))
    layer = ours.transformer.h[0].attn.c_attn
    assert isinstance(layer, fastlora.Linear) and layer.fan_in_fan_out
    ids = batch()["input_ids"]
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    fresh = fastlora.inject(tiny_gpt2(), ["c_attn"], r=2)
    assert fresh.transformer.h[1].attn.c_attn.fan_in_fan_out
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        fastlora.inject(tiny_gpt2(), ["c_attn"], fan_in_fan_out=False)


def test_from_peft_and_merge_and_unload_keep_logits():
    theirs = peft_model(tiny_llama(), TARGETS)
    ids = batch()["input_ids"]
    expected = theirs(ids).logits
    ours = fastlora.from_peft(theirs)
    assert any(isinstance(m, fastlora.Linear) for m in ours.modules())
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
    plain = fastlora.merge_and_unload(ours)
    assert not any(isinstance(m, fastlora.LoRALayer) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_inject_shares_weights_and_keeps_state_dict_keys():
    base = tiny_llama()
    keys = set(base.state_dict())
    q_weight = base.model.layers[0].self_attn.q_proj.weight
    model = fastlora.inject(base, TARGETS, r=2, adapter_dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.weight is q_weight
    lora_keys = {k for k in model.state_dict() if "lora_" in k}
    assert set(model.state_dict()) - lora_keys == keys
    assert len(lora_keys) == 12
    model.load_state_dict(tiny_llama(seed=5).state_dict(), strict=False)


def test_merge_unmerge_round_trip():
    model = fastlora.inject(tiny_llama(), TARGETS, r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    ids = batch()["input_ids"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(ids).logits
    fastlora.merge(model)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
    fastlora.unmerge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


def test_regex_targets_and_no_match():
    model = fastlora.inject(tiny_llama(), r"model\.layers\.0\.self_attn\.(q|k)_proj", r=2)
    assert sum(isinstance(m, fastlora.Linear) for m in model.modules()) == 2
    untouched = tiny_llama()
    state = copy.deepcopy(untouched.state_dict())
    with pytest.raises(ValueError, match="qq_proj") as info:
        fastlora.inject(untouched, ["qq_proj"])
    assert "q_proj" in str(info.value)
    assert not any(isinstance(m, fastlora.Linear) for m in untouched.modules())
    assert all(torch.equal(v, state[k]) for k, v in untouched.state_dict().items())


def test_failed_load_leaves_model_unchanged(tmp_path):
    theirs = peft_model(tiny_llama(), TARGETS)
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    bad_key = next(k for k in tensors if k.endswith("v_proj.lora_B.weight"))
    tensors[bad_key] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="v_proj.lora_B"):
        fastlora.load_adapter(model, tmp_path)
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires


def test_missing_and_corrupt_files(tmp_path):
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastlora.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        fastlora.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        fastlora.load_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=str(tmp_path)):
        fastlora.load_adapter(model, tmp_path)
