"""Run the benchmark suite on whatever device is present.

    python -m benchmarks.run --quick        # a few minutes on a CPU; the README's quick start
    python -m benchmarks.run                # the full suite
    python -m benchmarks.run --shapes 8192x4096x4096x16 --modes fwd full

Each mode of a shape times its providers interleaved, round by round (benchmarks/harness.py):
a provider's row has the median (p20 / p80) and the minimum of its rounds, and vs_base /
vs_peft / vs_reference are medians of per-round ratios, so load on a shared machine hits both
sides of every ratio alike. Prints a table, appends one row per (provider, shape, mode) to benchmarks/out/<device>.csv
(an ignored folder, so a clone stays clean; ``--csv benchmarks/results/<device>.csv`` adds to
the committed results) with device, versions, git sha and timestamp, and redraws the PNG
plots from that CSV (benchmarks/plot.py). A provider whose output disagrees with
fastlora.reference (``dora_linear`` for the DoRA providers, ``lora_linear`` on the dequantized
weight for the QLoRA ones) is reported as ``wrong`` and not timed. DoRA and QLoRA rows compare
with PEFT's DoRA / 4-bit layer (``vs_peft``) and their ``vs_reference`` is against fastlora's
own LoRA layer on the dense weight (``fastlora``) when it ran, the ratio their targets use.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import pathlib
import platform
import re
import subprocess
import sys

import torch

from benchmarks import harness
from benchmarks.providers import (
    ALL_PROVIDERS,
    VARIANT_PEERS,
    Shape,
    build,
    make_weights,
    provider_names,
    unavailable_reason,
    variant,
)

RESULTS = pathlib.Path(__file__).parent / "results"  # committed results
LOCAL_RESULTS = pathlib.Path(__file__).parent / "out"  # a local run's default (git-ignored)
COLUMNS = [
    "timestamp", "git_sha", "device", "torch", "triton", "dtype", "provider", "mode",
    "threads", "M", "K", "N", "r", "dropout", "bias", "status", "median_ms", "p20_ms", "p80_ms", "min_ms", "rounds", "timer",
    "tflops", "pct_peak", "vs_base", "vs_peft", "vs_reference", "saved_bytes", "peak_mem_bytes", "kernels",
    "first_call_s",
]

# LLaMA-style (K, N): attention projections, MLP up / down, 13B and 70B-class widths.
GPU_LAYERS = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 5120), (8192, 8192)]
GPU_TOKENS = [1, 16, 512, 2048, 8192, 16384]
CPU_SCALE = 4  # CPU runs the same layers with K, N / 4 and at most 2048 tokens
# rounds of every case at least: two quick runs on a 2-core CPU with one core kept busy disagreed
# on some ratio to PEFT by up to 23% at 5 rounds and 17% at 9; at 13, by at most 12%
MIN_ROUNDS = 13


def suite(device: str, quick: bool) -> list[Shape]:
    """The shapes to measure: r=16 across layers and tokens, then a rank sweep, dropout 0 / 0.1."""
    layers, tokens = GPU_LAYERS, GPU_TOKENS
    if device == "cpu":
        layers = [(k // CPU_SCALE, n // CPU_SCALE) for k, n in layers]
        tokens = [m for m in tokens if m <= 2048]
    if quick:
        layers, tokens = layers[:1], [tokens[1], tokens[-1]] if device == "cpu" else [16, 8192]
    shapes = []
    for K, N in layers:
        for M in tokens:
            for dropout in (0.0, 0.1):
                shapes.append(Shape(M, K, N, 16, dropout, bias=False))
    if not quick:
        K, N = layers[0]
        M = tokens[-2]
        for r in (8, 64, 128):
            shapes.append(Shape(M, K, N, r, 0.1, bias=False))
        shapes.append(Shape(M, K, N, 16, 0.0, bias=True))
    return shapes


def parse_shape(text: str) -> Shape:
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)(?:@([\d.]+))?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--shapes takes MxKxNxr or MxKxNxr@dropout, got {text!r}")
    M, K, N, r = (int(v) for v in match.groups()[:4])
    if min(M, K, N, r) < 1:
        raise argparse.ArgumentTypeError(f"--shapes needs M, K, N and r >= 1, got {text!r}")
    try:
        dropout = float(match.group(5) or 0.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: the dropout of {text!r} is not a number") from None
    if not 0.0 <= dropout < 1.0:
        raise argparse.ArgumentTypeError(f"--shapes needs a dropout in [0, 1), got {text!r}")
    return Shape(M, K, N, r, dropout, bias=False)


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def dropout_rate(text: str) -> float:
    """An argparse type: a dropout rate in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a dropout rate, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a dropout rate must lie in [0, 1), got {text!r}")
    return value


def device_name(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=pathlib.Path(__file__).parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def measure_peak_tflops(device: str, dtype: torch.dtype) -> float:
    """The best plain matmul rate on this device, the 100% of the pct_peak column."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device == "cuda":
        median, _, _, _ = harness.time_cuda(lambda: a @ b, use_graph=False)
    else:
        median, _, _ = harness.time_cpu(lambda: a @ b, budget_s=0.5)
    return 2 * n**3 / (median * 1e-3) / 1e12


def progress(items: list):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="benchmarks", unit="case", file=sys.stderr)


def run_case(shape: Shape, providers: list[str], modes: list[str], device: str, dtype: torch.dtype,
             budget_s: float) -> list[dict]:
    """Every provider and mode on one shape. Each mode times its providers interleaved, round by
    round, for about ``budget_s`` per provider; the ratio columns come from the same rounds."""
    weights = make_weights(shape, dtype, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape.M, shape.K, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(shape.M, shape.N, generator=g).to(device=device, dtype=dtype)
    references = {kind: build(VARIANT_PEERS[kind]["check"], weights, shape.dropout)
                  for kind in sorted({variant(name) for name in providers})}
    checked, modules = {}, {}
    for name in providers:
        module = build(name, weights, shape.dropout)
        first_call = harness.first_call_seconds(lambda: module(x).backward(dy), device)
        error = None if name == "base" else harness.check_against_reference(module, references[variant(name)], x, dy)
        checked[name] = {
            "provider": name, "first_call_s": first_call,
            "saved_bytes": harness.saved_bytes(lambda: module(x), [x, *module.parameters()]),
            "peak_mem_bytes": harness.peak_memory_bytes(lambda: module(x).backward(dy), device),
        }
        if error is None:
            modules[name] = module
        else:
            checked[name]["status"] = f"wrong: {error}"
    rows = []
    for mode in modes:
        use_graph = shape.M <= 16 and mode == "fwd"
        samplers = {name: harness.sampler(module, x, dy, mode, device, use_graph) for name, module in modules.items()}
        samples = harness.time_interleaved({name: sample for name, (sample, _) in samplers.items()},
                                           budget_s * max(len(samplers), 1), min_rounds=MIN_ROUNDS)
        for name in providers:
            row = {**checked[name], "mode": mode}
            if name in samples:
                summary = harness.summarize(samples[name])
                row.update(status="ok", timer=samplers[name][1], **summary,
                           kernels=harness.launches(modules[name], x, dy, mode, device),
                           tflops=harness.flops(shape, mode, name != "base") / (summary["median_ms"] * 1e-3) / 1e12)
                peers = VARIANT_PEERS[variant(name)]
                for other, column in (("base", "vs_base"), (peers["peft"], "vs_peft"), (peers["reference"], "vs_reference")):
                    if other in samples:
                        row[column] = harness.paired_ratio(samples[name], samples[other])
            rows.append(row)
    for row in rows:
        row.update(M=shape.M, K=shape.K, N=shape.N, r=shape.r, dropout=shape.dropout, bias=shape.bias)
    return sorted(rows, key=lambda row: (providers.index(row["provider"]), modes.index(row["mode"])))


def format_table(rows: list[dict]) -> str:
    header = f"{'M':>6} {'K':>6} {'N':>6} {'r':>4} {'p':>4} {'mode':>4} {'provider':<21} {'median ms':>10} " \
             f"{'min ms':>9} {'TFLOP/s':>8} {'vs base':>8} {'vs peft':>8} {'saved MB':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['M']:>6} {row['K']:>6} {row['N']:>6} {row['r']:>4} {row['dropout']:>4} "
                         f"{row['mode']:>4} {row['provider']:<21} {row['status']}")
            continue
        lines.append(
            f"{row['M']:>6} {row['K']:>6} {row['N']:>6} {row['r']:>4} {row['dropout']:>4} {row['mode']:>4} "
            f"{row['provider']:<21} {row['median_ms']:>10.3f} {row['min_ms']:>9.3f} {row['tflops']:>8.2f} "
            f"{row.get('vs_base', math.nan):>8.2f} {row.get('vs_peft', math.nan):>8.2f} "
            f"{row['saved_bytes'] / 2**20:>9.2f}"
        )
    return "\n".join(lines)


def append_csv(path: pathlib.Path, rows: list[dict], columns: list[str] = COLUMNS) -> None:
    """Append rows (missing columns left empty), writing the header when the file is new. A file
    written with other columns (an older version of the suite) is rewritten with the old columns
    followed by the new ones, its rows kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows: list[dict] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_columns = reader.fieldnames or []
            if old_columns != columns:
                old_rows = list(reader)
                columns = old_columns + [c for c in columns if c not in old_columns]
    mode = "w" if old_rows or not path.exists() else "a"
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
        for row in old_rows + rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset (minutes on a CPU)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=None, help="default: all available")
    parser.add_argument("--modes", nargs="+", choices=harness.MODES, default=list(harness.MODES))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None, help="MxKxNxr[@dropout] ...")
    parser.add_argument("--budget", type=positive_float, default=None, help="CPU seconds per timing (default 0.3, quick 0.15)")
    parser.add_argument("--csv", type=pathlib.Path, default=None, help="default: benchmarks/out/<device>.csv")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (default: the cores other processes leave idle, at least 1)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    for provider in args.providers or []:
        reason = unavailable_reason(provider, device)
        if reason is not None:
            parser.error(f"--providers: {provider} cannot run on {device} here: {reason}")
    providers = args.providers or provider_names(device)
    shapes = args.shapes or suite(device, args.quick)
    budget = args.budget or (0.15 if args.quick else 0.3)
    name = device_name(device)
    csv_path = args.csv or LOCAL_RESULTS / f"{name}.csv"
    threads = torch.get_num_threads()
    if device == "cpu":  # steady CPU timings: no thread on a busy core, no malloc threshold drifting
        threads = args.threads or harness.idle_cores()
        torch.set_num_threads(threads)
        harness.steady_cpu_allocator()
    meta = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(), "device": name, "torch": torch.__version__, "triton": triton_version(),
        "dtype": str(dtype).removeprefix("torch."), "threads": threads,
    }
    peak = measure_peak_tflops(device, dtype)
    print(f"device {name}, {meta['dtype']}, {threads} CPU threads, torch {meta['torch']}, triton {meta['triton'] or '-'}, "
          f"measured matmul peak {peak:.2f} TFLOP/s; providers: {', '.join(providers)}")
    rows = []
    for shape in progress(shapes):
        for row in run_case(shape, providers, args.modes, device, dtype, budget):
            row.update(meta)
            if "tflops" in row:
                row["pct_peak"] = 100 * row["tflops"] / peak
            rows.append(row)
    print(format_table(rows))
    append_csv(csv_path, rows)
    print(f"appended {len(rows)} rows to {csv_path}")
    if not args.no_plot:
        from benchmarks import plot

        for png in plot.plot_csv(csv_path):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
