"""Adapters as users really move them between fastlora and PEFT: loading into injected
models, several inject calls, biases, modules_to_save (classifier heads), from_peft's
settings, tied and dead targets, merge_and_unload of every layer kind, 'all-linear' and
task_type."""

import json

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import fastlora
from tiny_models import TARGETS, batch, init_lora_B, tiny_gpt2, tiny_llama


def ids():
    return batch()["input_ids"]


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def llama_with_biases(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    return LlamaForCausalLM(config).eval()


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def perturb(model, which, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if which(name):
                p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("r,alpha,rslora", [(2, 6, True), (1, 3, False), (8, 32, False)])
def test_load_into_injected_model_takes_the_files_settings(tmp_path, r, alpha, rslora):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, use_rslora=rslora)
    theirs = init_lora_B(peft.get_peft_model(tiny_llama(), config))
    theirs.save_pretrained(tmp_path)
    ours = fastlora.inject(tiny_llama(), TARGETS, r=8, lora_alpha=8)
    fastlora.load_adapter(ours, tmp_path)
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.r == r and layer.lora_alpha == alpha and layer.use_rslora == rslora
    assert tuple(layer.lora_A.shape) == (r, 32) and layer.lora_A.requires_grad
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_failed_load_into_injected_model_changes_nothing(tmp_path):
    theirs = init_lora_B(peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)))
    theirs.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    last = sorted(k for k in tensors if k.endswith("down_proj.lora_B.weight"))[-1]
    tensors[last] = torch.zeros(64, 2)  # down_proj's out_features is 32
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "adapter_model.safetensors")
    ours = fastlora.inject(tiny_llama(), TARGETS, r=8, lora_alpha=8)
    before = state(ours)
    with pytest.raises(ValueError, match="down_proj.lora_B"):
        fastlora.load_adapter(ours, tmp_path)
    assert_same_state(ours, before)
    assert all(m.r == 8 and m.lora_alpha == 8 for m in ours.modules() if isinstance(m, fastlora.Linear))


def test_two_inject_calls_save_every_adapter(tmp_path):
    ours = fastlora.inject(tiny_llama(), ["q_proj"], r=4, lora_alpha=8)
    fastlora.inject(ours, ["v_proj"], r=4, lora_alpha=8)
    fastlora.inject(ours, r"model\.layers\.1\.mlp\.down_proj", r=4, lora_alpha=8)
    perturb(ours, lambda n: "lora_B" in n)
    fastlora.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # down_proj of layer 1 only: the last name parts would select layer 0's too, so full names
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                                        "model.layers.1.self_attn.v_proj"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    reloaded = fastlora.load_adapter(tiny_llama(), tmp_path)
    assert sum(isinstance(m, fastlora.Linear) for m in reloaded.modules()) == 5


def test_saved_targets_are_leaf_names_when_those_are_exact(tmp_path):
    ours = fastlora.inject(tiny_llama(), ["q_proj"], r=2)
    fastlora.inject(ours, ["v_proj"], r=2)
    fastlora.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_biases_use_peft_key_names_both_ways(tmp_path, bias):
    ours = fastlora.inject(llama_with_biases(), ["q_proj"], r=2, lora_alpha=4, bias=bias)
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any(n.endswith("q_proj.bias") for n in trained)
    perturb(ours, lambda n: n in trained)
    fastlora.save_adapter(ours, tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert ("base_model.model.model.layers.0.self_attn.k_proj.bias" in keys) == (bias == "all")
    theirs = peft.PeftModel.from_pretrained(llama_with_biases(), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], bias=bias)
    theirs = init_lora_B(peft.get_peft_model(llama_with_biases(), config))
    perturb(theirs, lambda n: n.endswith("bias") and dict(theirs.named_parameters())[n].requires_grad)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = fastlora.load_adapter(llama_with_biases(), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded), logits(theirs), rtol=1e-5, atol=1e-5)


def test_from_peft_refuses_lora_bias():
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ValueError, match="lora_bias"):
        fastlora.from_peft(theirs)


def test_from_peft_then_save_keeps_rslora_biases_and_modules_to_save(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                             bias="lora_only", modules_to_save=["lm_head"])
    theirs = init_lora_B(peft.get_peft_model(llama_with_biases(), config))
    trained = {n for n, p in theirs.named_parameters() if p.requires_grad}
    perturb(theirs, lambda n: n in trained and "lora_" not in n)
    expected = logits(theirs)
    ours = fastlora.from_peft(theirs)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    fastlora.save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_rslora"] and saved["bias"] == "lora_only" and saved["modules_to_save"] == ["lm_head"]
    reloaded = peft.PeftModel.from_pretrained(llama_with_biases(), tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_sequence_classification_head_trains_saves_and_loads(tmp_path):
    ours = fastlora.inject(tiny_classifier(), ["q_proj", "v_proj"], r=2, lora_alpha=4)
    assert ours.score.weight.requires_grad
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    head_before = ours.score.weight.detach().clone()
    ours.train()
    nn.functional.cross_entropy(ours(ids()).logits, torch.tensor([0, 2])).backward()
    opt.step()
    ours.eval()
    assert not torch.equal(ours.score.weight, head_before)
    fastlora.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert "base_model.model.score.weight" in load_file(tmp_path / "adapter_model.safetensors")
    expected = logits(ours)
    torch.testing.assert_close(logits(fastlora.load_adapter(tiny_classifier(), tmp_path)), expected)
    theirs = peft.PeftModel.from_pretrained(tiny_classifier(), tmp_path)
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


def test_save_warns_about_trainable_parameters_left_out(tmp_path):
    model = fastlora.inject(tiny_llama(), ["q_proj"], r=2)
    model.lm_head.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="lm_head"):
        fastlora.save_adapter(model, tmp_path)


def test_merging_a_tied_weight_warns():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    fastlora.inject(model, ["lm_head"], r=2)
    with pytest.warns(UserWarning, match="tied"):
        fastlora.merge(model)


def test_multihead_attention_out_proj_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))
    before = state(model)
    with pytest.raises(ValueError, match="out_proj"):
        fastlora.inject(model, ["out_proj"])
    assert_same_state(model, before)
    assert not any(isinstance(m, fastlora.LoRALayer) for m in model.modules())


class LoralibStyle(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = fastlora.Embedding(20, 12, r=2, merge_weights=False)
        self.qkv = fastlora.MergedLinear(12, 24, r=2, enable_lora=[True, False, True], merge_weights=False)
        self.conv = fastlora.Conv2d(1, 2, 3, r=2, merge_weights=False, padding=1)
        self.out = fastlora.Linear(24, 5, r=2, merge_weights=False)
        for name, p in self.named_parameters():
            if "lora_" in name:
                nn.init.normal_(p, std=0.3)

    def forward(self, tokens):
        h = self.qkv(self.embed(tokens))  # (B, T, 24)
        image = h[:, None, :, :]
        h = h + self.conv(image).mean(1)
        return self.out(h)


def test_merge_and_unload_every_layer_kind():
    model = LoralibStyle().eval()
    tokens = torch.randint(0, 20, (2, 6))
    expected = model(tokens)
    fastlora.merge_and_unload(model)
    assert type(model.embed) is nn.Embedding and type(model.qkv) is nn.Linear
    assert type(model.conv) is nn.Conv2d and type(model.out) is nn.Linear
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_keeps_gpt2_conv1d_and_round_trips(tmp_path):
    ours = fastlora.inject(tiny_gpt2(), ["c_attn", "c_fc"], r=2)
    perturb(ours, lambda n: "lora_B" in n)
    expected = logits(ours)
    plain = fastlora.merge_and_unload(ours)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    plain.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_save_adapter_refuses_loralib_style_layers(tmp_path):
    model = LoralibStyle()
    with pytest.raises(ValueError, match="PEFT's format"):
        fastlora.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_all_linear_and_task_type_for_auto_peft(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    ours = fastlora.inject(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), "all-linear", r=2)
    names = {n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, fastlora.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(ours.lm_head, fastlora.LoRALayer)
    perturb(ours, lambda n: "lora_B" in n)
    fastlora.save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tmp_path / "base")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)


def test_injecting_the_same_target_twice_says_so():
    model = fastlora.inject(tiny_llama(), ["q_proj"], r=2)
    before = state(model)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        fastlora.inject(model, ["q_proj", "k_proj"], r=2)
    assert_same_state(model, before)
