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
    """``model`` with bitsandbytes 4-bit linears (benchmarks.providers.quantize_linears)."""
    from benchmarks.providers import quantize_linears as quantize

    return quantize(model, compute_dtype, quant_type=quant_type, nested=nested, blocksize=blocksize)
