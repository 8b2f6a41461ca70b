"""Tiny Hugging Face models built from configs (no download), PEFT twins and batches for tests."""

import peft
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def peft_model(base: nn.Module, targets, **kw) -> nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **kw)
    return init_lora_B(peft.get_peft_model(base, config))


def init_lora_B(model: nn.Module) -> nn.Module:
    """Nonzero lora_B (zeros at init would hide the adapters' effect), the same on every run."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def batch(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def lora_grads(model: nn.Module) -> dict:
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            key = name.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
            out[key] = p.grad
    return out


def quantize_linears(model: nn.Module, quant_type: str = "nf4", nested: bool = True, blocksize: int = 64,
                     compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """``model`` with every nn.Linear but the output layer replaced by a bitsandbytes 4-bit
    Linear4bit quantized from its weight (what ``from_pretrained(..., load_in_4bit=True)``
    gives), marked ``is_loaded_in_4bit`` as transformers marks such models (PEFT reads it)."""
    import bitsandbytes as bnb

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is output:
            continue
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=nested, quant_type=quant_type)
        quantized.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, blocksize=blocksize,
                                             compress_statistics=nested, quant_type=quant_type)
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized.to("cpu"))
    model.is_loaded_in_4bit = True
    return model
