"""End to end: tokens/s and memory of one LoRA training step of a small Llama-style model.

    python -m benchmarks.end_to_end             # CUDA: bf16, a 4-layer 2048-wide slice; CPU: fp32, small
    python -m benchmarks.end_to_end --quick     # a smaller model, fewer repeats

The model is built from a LlamaConfig (random weights, no download). Providers:
  frozen    the model without LoRA, every weight frozen: forward + backward to the input
            embeddings (the floor a LoRA step cannot beat);
  peft      PEFT's LoRA on every attention and MLP projection;
  fastlora  fastlora.load_adapter of the same adapter (same weights, auto backend);
  peft-qlora, fastlora-qlora (with bitsandbytes installed) the same two on the model with its
            linears quantized to NF4 (QLoRA: nested absmax, blocks of 64, adapters in float32;
            vs_peft of fastlora-qlora is against peft-qlora).
A step is forward, loss, backward and an AdamW step on the trainable parameters. Before
timing, each fastlora model's loss is checked against its PEFT twin's with dropout off; a mismatch is reported
as ``wrong`` and not timed. Reports the median step time (p20 / p80), tokens/s, the ratio to
frozen and to PEFT, bytes saved for backward per step and, on CUDA, peak memory. Rows are
appended to benchmarks/out/<device>-end-to-end.csv (git-ignored; --csv picks another file).

Timing: every provider first runs a few warm-up steps (AdamW creates its state at the first
step, the caching allocator grows, kernels compile), then the providers' steps are
interleaved, one timed step each per round, in an order that rotates every round, each step
timed alone (CUDA events, or the wall clock on CPU). Timing each provider in its own block,
as an earlier version did, let whatever drifts during a run (GPU clocks and temperature,
allocator growth, lazy state) fall on whichever provider ran first: on an H100 it reported
PEFT at 35.5 ms per step without dropout and 24.9 ms with it, which cannot both be right.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import pathlib
import sys
import tempfile
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn

from benchmarks import harness
from benchmarks.providers import bitsandbytes_installed, quantize_linears
from benchmarks.run import LOCAL_RESULTS, append_csv, device_name, dropout_rate, git_sha, triton_version

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLUMNS = [
    "timestamp", "git_sha", "device", "torch", "triton", "dtype", "provider", "hidden", "intermediate",
    "layers", "batch", "seq_len", "r", "dropout", "status", "median_ms", "p20_ms", "p80_ms",
    "tokens_per_s", "vs_frozen", "vs_peft", "saved_bytes", "peak_mem_bytes",
]


@dataclasses.dataclass
class Setup:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq_len: int
    r: int = 16


SETUPS = {
    ("cuda", False): Setup(hidden=2048, intermediate=5632, layers=4, heads=16, vocab=32000, batch=4, seq_len=1024),
    ("cuda", True): Setup(hidden=2048, intermediate=5632, layers=2, heads=16, vocab=32000, batch=2, seq_len=512),
    # CPU widths are multiples of 64: bitsandbytes 0.50's CPU dequantizer, which PEFT's QLoRA
    # layers run on, is wrong for other row lengths (tests/test_qlora.py)
    ("cpu", False): Setup(hidden=512, intermediate=1408, layers=2, heads=8, vocab=2000, batch=4, seq_len=128),
    ("cpu", True): Setup(hidden=256, intermediate=704, layers=2, heads=4, vocab=1000, batch=2, seq_len=64),
}


def base_model(setup: Setup, device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=setup.vocab, hidden_size=setup.hidden, intermediate_size=setup.intermediate,
                         num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
                         num_key_value_heads=setup.heads, max_position_embeddings=setup.seq_len)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def build_models(setup: Setup, dropout: float, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """frozen, peft and fastlora models sharing the base weights' values and one adapter; with
    bitsandbytes installed also peft-qlora and fastlora-qlora, the same adapter (in float32, as
    PEFT keeps it on a 4-bit base) on the model with its linears in NF4 (nested, blocks of 64)."""
    import peft

    import fastlora

    frozen = base_model(setup, device, dtype).requires_grad_(False)
    config = peft.LoraConfig(r=setup.r, lora_alpha=2 * setup.r, lora_dropout=dropout, target_modules=TARGETS)
    theirs = peft.get_peft_model(copy.deepcopy(frozen), config, autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    models = {"frozen": frozen, "peft": theirs}
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        models["fastlora"] = fastlora.load_adapter(copy.deepcopy(frozen), directory)
        if bitsandbytes_installed():
            quantized = quantize_linears(copy.deepcopy(frozen), dtype)
            models["peft-qlora"] = peft.PeftModel.from_pretrained(copy.deepcopy(quantized), directory, is_trainable=True)
            models["fastlora-qlora"] = fastlora.load_adapter(quantized, directory)
    return models


def training_step(model: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One step: forward from input embeddings (which require grad, so a frozen model still runs
    its backward), loss, backward, AdamW on the trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

    def step() -> None:
        model(inputs_embeds=embeddings, labels=labels).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        embeddings.grad = None

    return step


# each fastlora model and the PEFT model whose loss it must give
PEERS = {"fastlora": "peft", "fastlora-qlora": "peft-qlora"}


def losses_agree(models: dict[str, nn.Module], embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, bool]:
    """For each fastlora model: whether its loss (dropout off) is its PEFT peer's."""
    with torch.no_grad():
        losses = {name: model.eval()(inputs_embeds=embeddings, labels=labels).loss.float().item()
                  for name, model in models.items() if name in PEERS or name in PEERS.values()}
    for model in models.values():
        model.train()
    tolerance = 1e-4 if embeddings.dtype == torch.float32 else 2e-2
    return {ours: math.isclose(losses[ours], losses[theirs], rel_tol=tolerance)
            for ours, theirs in PEERS.items() if ours in losses}


def run_setup(setup: Setup, dropout: float, device: str, dtype: torch.dtype, budget_s: float) -> list[dict]:
    models = build_models(setup, dropout, device, dtype)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, setup.vocab, (setup.batch, setup.seq_len), generator=generator).to(device)
    embeddings = models["frozen"].get_input_embeddings()(ids).detach().requires_grad_()
    agree = losses_agree(models, embeddings, ids)
    tokens = setup.batch * setup.seq_len
    timed = {name: model for name, model in models.items() if agree.get(name, True)}
    steps = {name: training_step(model, embeddings, ids) for name, model in timed.items()}
    samples = harness.time_interleaved({name: partial(harness.time_call, step, device) for name, step in steps.items()},
                                       budget_s)
    rows = []
    for name, model in models.items():
        row = {"provider": name, **dataclasses.asdict(setup), "dropout": dropout}
        if name not in timed:
            rows.append({**row, "status": "wrong"})
            continue
        median, p20, p80 = harness.quantiles(samples[name])
        alive = [embeddings, *model.parameters()]
        row.update(
            status="ok", median_ms=median, p20_ms=p20, p80_ms=p80, tokens_per_s=tokens / (median * 1e-3),
            saved_bytes=harness.saved_bytes(lambda: model(inputs_embeds=embeddings, labels=ids), alive),
            peak_mem_bytes=harness.peak_memory_bytes(steps[name], device),
        )
        rows.append(row)
    for row in rows:
        if row["status"] == "ok":
            row["vs_frozen"] = harness.paired_ratio(samples[row["provider"]], samples["frozen"])
            peer = "peft-qlora" if "qlora" in row["provider"] else "peft"
            row["vs_peft"] = harness.paired_ratio(samples[row["provider"]], samples[peer]) if peer in samples else math.nan
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'p':>4} {'provider':<14} {'median ms':>10} {'p20-p80 ms':>14} {'tokens/s':>10} {'vs frozen':>9} "
             f"{'vs peft':>8} {'saved MB':>9} {'peak MB':>8}", "-" * 94]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['dropout']:>4} {row['provider']:<14} {row['status']:>10}")
            continue
        lines.append(
            f"{row['dropout']:>4} {row['provider']:<14} {row['median_ms']:>10.2f} "
            f"{row['p20_ms']:>6.2f}-{row['p80_ms']:<7.2f} {row['tokens_per_s']:>10.0f} "
            f"{row['vs_frozen']:>9.2f} {row['vs_peft']:>8.2f} {row['saved_bytes'] / 2**20:>9.1f} "
            f"{row['peak_mem_bytes'] / 2**20:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer repeats")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dropout", type=dropout_rate, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--csv", type=pathlib.Path, default=None,
                        help="default: benchmarks/out/<device>-end-to-end.csv")
    args = parser.parse_args(argv)

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    setup = SETUPS[(device, args.quick)]
    name = device_name(device)
    meta = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(), "device": name, "torch": torch.__version__, "triton": triton_version(),
        "dtype": str(dtype).removeprefix("torch."),
    }
    print(f"device {name}, {meta['dtype']}; Llama-style model: {setup.layers} layers, hidden {setup.hidden}, "
          f"MLP {setup.intermediate}, batch {setup.batch} x {setup.seq_len} tokens, LoRA r={setup.r} on {', '.join(TARGETS)}")
    rows = []
    for dropout in args.dropout:
        rows += [{**row, **meta} for row in run_setup(setup, dropout, device, dtype, 1.0 if args.quick else 6.0)]
    print(format_table(rows))
    csv_path = args.csv or LOCAL_RESULTS / f"{name}-end-to-end.csv"
    append_csv(csv_path, rows, COLUMNS)
    print(f"appended {len(rows)} rows to {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
