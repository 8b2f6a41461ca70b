"""Mixed batches: one LoRA layer holding n adapters, every row of a batch with its own adapter.

    python -m benchmarks.mixed_batch             # CPU: K = N = 1024; CUDA: 4096 (bf16)
    python -m benchmarks.mixed_batch --quick     # n = 1 and 16 at M = 16 only

Providers, each a forward without gradients (inference) over M rows spread round-robin over
n adapters of rank 16 (K = N = 1024 on a CPU, 4096 on a GPU):
  one-adapter  fastlora.Linear running a single adapter on every row (the batch a mixed one is compared with);
  fastlora     the same layer holding n adapters, ``model(x, adapter_names=[...])`` (one pass per layer);
  loop         a loop of single-adapter fastlora calls, one per adapter on its rows (gather, call, scatter);
  peft         PEFT's LoRA layer with n adapters and its ``adapter_names`` (a loop over adapters inside).
and at M = 4096 a training step (forward + backward, every adapter trained; PEFT refuses
adapter_names in training): one-adapter-train against fastlora-train, whose gradients are
checked against a loop of single-adapter steps first.
Before timing, fastlora's and the loop's outputs are checked against PEFT's (a mismatch is
reported ``wrong``). Reports the median (p20 / p80), the ratio to one-adapter (-train) and PEFT /
fastlora, and peak memory; rows are appended to benchmarks/out/<device>-mixed-batch.csv.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import torch
import torch.nn as nn

from benchmarks import harness
from benchmarks.run import LOCAL_RESULTS, append_csv, device_name, git_sha, triton_version

COLUMNS = ["timestamp", "git_sha", "device", "torch", "triton", "dtype", "provider", "M", "K", "N", "r", "adapters",
           "status", "median_ms", "p20_ms", "p80_ms", "vs_one_adapter", "peft_vs_fastlora", "peak_mem_bytes"]
PROVIDERS = ["one-adapter", "fastlora", "loop", "peft"]


class OneLayer(nn.Module):
    """A model of one projection, so that PEFT and fastlora treat it as they treat any model."""

    def __init__(self, K: int, N: int, device: str, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(K, N, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(adapters: int, K: int, N: int, r: int, device: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, list[str]]:
    """(PEFT model, fastlora model, adapter names) with the same n adapters (nonzero B)."""
    import peft

    import fastlora

    names = ["default"] + [f"a{i}" for i in range(1, adapters)]
    theirs = peft.get_peft_model(OneLayer(K, N, device, dtype), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    for name in names[1:]:
        theirs.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    with torch.no_grad():
        for parameter_name, p in theirs.named_parameters():
            if "lora_" in parameter_name:
                p.normal_(0, 0.02)
    layer = theirs.base_model.model.proj
    ours = fastlora.inject(OneLayer(K, N, device, dtype), ["proj"], r=r, lora_alpha=2 * r)
    with torch.no_grad():
        ours.proj.lora_A.copy_(layer.lora_A["default"].weight)
        ours.proj.lora_B.copy_(layer.lora_B["default"].weight)
        for name in names[1:]:
            named = ours.proj.add_adapter(name, r, 2 * r)
            named.lora_A.copy_(layer.lora_A[name].weight)
            named.lora_B.copy_(layer.lora_B[name].weight)
    return theirs.eval(), ours.eval(), names


def loop_forward(model: nn.Module, x: torch.Tensor, index: torch.Tensor, names: list[str]) -> torch.Tensor:
    """A loop of single-adapter calls: for each adapter, its rows gathered, one fused call, scattered back."""
    import fastlora

    layer = model.proj
    y = torch.empty((x.shape[0], layer.out_features), device=x.device, dtype=x.dtype)
    for i, name in enumerate(names):
        rows = (index == i).nonzero().squeeze(1)
        lora_A, lora_B, scaling, _ = layer.adapter(name)
        y[rows] = fastlora.lora_linear(x[rows], layer.weight, layer.bias, lora_A, lora_B, scaling)
    return y


def timed(call, device: str, budget_s: float) -> dict:
    """A row's timing columns for ``call``: status ok, median / p20 / p80 ms and peak memory."""
    if device == "cuda":
        median, p20, p80, _ = harness.time_cuda(call, use_graph=False)
    else:
        median, p20, p80 = harness.time_cpu(call, budget_s=budget_s)
    return {"status": "ok", "median_ms": median, "p20_ms": p20, "p80_ms": p80,
            "peak_mem_bytes": harness.peak_memory_bytes(call, device)}


def run_case(M: int, adapters: int, K: int, N: int, r: int, device: str, dtype: torch.dtype, budget_s: float) -> list[dict]:
    theirs, ours, names = build(adapters, K, N, r, device, dtype)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    index = torch.arange(M, device=device) % adapters
    row_names = [names[i] for i in index.tolist()]
    calls = {
        "one-adapter": lambda: ours(x),
        "fastlora": lambda: ours(x, adapter_names=row_names),
        "loop": lambda: loop_forward(ours, x, index, names),
        "peft": lambda: theirs(x, adapter_names=row_names),
    }
    rows = []
    with torch.no_grad():
        expected = calls["peft"]()
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        for name, call in calls.items():
            row = {"provider": name, "M": M, "K": K, "N": N, "r": r, "adapters": adapters}
            if name in ("fastlora", "loop") and not torch.allclose(call(), expected, rtol=tolerance, atol=tolerance):
                rows.append({**row, "status": "wrong"})
                continue
            rows.append({**row, **timed(call, device, budget_s)})
    times = {row["provider"]: row["median_ms"] for row in rows if row["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok":
            row["vs_one_adapter"] = row["median_ms"] / times["one-adapter"]
            if row["provider"] == "fastlora" and "peft" in times:
                row["peft_vs_fastlora"] = times["peft"] / row["median_ms"]
    return rows


def train_step(model: nn.Module, x: torch.Tensor, row_names: list[str] | None) -> list[torch.Tensor]:
    """One forward + backward of ``model`` (with ``adapter_names`` when given); the adapters' gradients."""
    adapters = [p for name, p in model.named_parameters() if "lora_" in name]
    y = model(x) if row_names is None else model(x, adapter_names=row_names)
    return list(torch.autograd.grad(y.square().mean(), adapters, allow_unused=True))


def run_training_case(M: int, adapters: int, K: int, N: int, r: int, device: str, dtype: torch.dtype,
                      budget_s: float) -> list[dict]:
    """one-adapter-train and fastlora-train rows: a training step over all rows with one adapter,
    and with the rows round-robin over ``adapters`` adapters (each adapter's gradients checked
    against a step of that adapter on its own rows)."""
    _, ours, names = build(adapters, K, N, r, device, dtype)
    import fastlora

    ours.train()
    for name in names[1:]:
        ours.proj.lora_adapters[name].requires_grad_(True)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    index = torch.arange(M, device=device) % adapters
    row_names = [names[i] for i in index.tolist()]
    mixed = train_step(ours, x, row_names)
    layer = ours.proj
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for i, name in enumerate(names):
        lora_A, lora_B, scaling, _ = layer.adapter(name)
        rows = (index == i).nonzero().squeeze(1)
        y = fastlora.lora_linear(x[rows], layer.weight, layer.bias, lora_A, lora_B, scaling)
        expected = torch.autograd.grad(y.square().sum() / (M * N), (lora_A, lora_B))
        got = mixed[2 * i:2 * i + 2]  # named_parameters order: default, then the named adapters as added
        if not all(torch.allclose(a, b, rtol=tolerance, atol=tolerance * b.abs().max()) for a, b in zip(got, expected)):
            return [{"provider": "fastlora-train", "M": M, "K": K, "N": N, "r": r, "adapters": adapters, "status": "wrong"}]
    calls = {"one-adapter-train": lambda: train_step(ours, x, None), "fastlora-train": lambda: train_step(ours, x, row_names)}
    rows = []
    for name, call in calls.items():
        rows.append({"provider": name, "M": M, "K": K, "N": N, "r": r, "adapters": adapters, **timed(call, device, budget_s)})
    for row in rows:
        row["vs_one_adapter"] = row["median_ms"] / rows[0]["median_ms"]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'M':>5} {'n':>3} {'provider':<17} {'median ms':>10} {'p20-p80 ms':>16} {'vs one':>7} "
             f"{'peft/ours':>9} {'peak MB':>8}", "-" * 83]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['M']:>5} {row['adapters']:>3} {row['provider']:<17} {row['status']}")
            continue
        ratio = f"{row['peft_vs_fastlora']:.2f}" if "peft_vs_fastlora" in row else ""
        lines.append(f"{row['M']:>5} {row['adapters']:>3} {row['provider']:<17} {row['median_ms']:>10.3f} "
                     f"{row['p20_ms']:>7.3f}-{row['p80_ms']:<8.3f} {row['vs_one_adapter']:>7.2f} {ratio:>9} "
                     f"{row['peak_mem_bytes'] / 2**20:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 1 and 16 at M = 16 only")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", type=pathlib.Path, default=None, help="default: benchmarks/out/<device>-mixed-batch.csv")
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    width = 4096 if device == "cuda" else 1024
    cases = [(16, 1), (16, 16)] if args.quick else [(M, n) for M in (16, 4096) for n in (1, 4, 16, 64)]
    name = device_name(device)
    meta = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha(), "device": name, "torch": torch.__version__, "triton": triton_version(),
            "dtype": str(dtype).removeprefix("torch.")}
    print(f"device {name}, {meta['dtype']}; one layer K = N = {width}, r = 16, rows round-robin over n adapters; "
          "forward (-train: forward + backward)")
    rows = []
    budget = 0.05 if args.quick else 0.5
    for M, adapters in cases:
        rows += [{**row, **meta} for row in run_case(M, adapters, width, width, 16, device, dtype, budget)]
    if not args.quick:
        rows += [{**row, **meta} for row in run_training_case(4096, 16, width, width, 16, device, dtype, budget)]
    print(format_table(rows))
    path = args.csv or LOCAL_RESULTS / f"{name}-mixed-batch.csv"
    append_csv(path, rows, COLUMNS)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
