"""One command for whoever has a GPU: tests, parity, speed against DESIGN.md's targets, report.

    python -m benchmarks.gpu_report            # on a CUDA GPU (meant to finish within 8 minutes on an H100)
    python -m benchmarks.gpu_report --smoke    # tiny shapes on whatever device (CI runs it on CPU)

Runs, in order: tests/test_gpu.py (pytest, marker gpu); bf16 parity at the shapes of
../shared/gpu (fastlora's error against an fp32 reference next to plain bf16 PyTorch's); the
speed table (base = frozen F.linear, PEFT, PyTorch LoRA = fastlora.reference, fastlora;
modes fwd and full = fwd + bwd; CUDA-graph replay where capture works, do_bench otherwise);
LoRAFusion's sweep; decode (M = 1, 16); first-call seconds of each new shape; host time per
eager call (benchmarks.overhead); bytes saved for backward; the end-to-end training step
(benchmarks.end_to_end). Writes benchmarks/results/<gpu>-<date>.md (every DESIGN.md target
with its measured value and met / not met), <gpu>-<date>.csv (every timing) and
<gpu>-<date>.png (time over base per shape), and prints the same tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

import fastlora
import fastlora.reference as reference
from fastlora._backend import AUTO_ON_CUDA, shape_class
from benchmarks import end_to_end, harness, overhead
from benchmarks.providers import Shape, build, make_weights
from benchmarks.run import RESULTS, append_csv, device_name, git_sha, triton_version

# "fused" is fastlora's Triton path (DESIGN.md's targets are about it), "torch" its
# cuBLAS-composed path; `auto` runs one of them per shape class (_backend.AUTO_ON_CUDA), so the
# report times both and reads auto's time off the table. (Timing `auto` itself under CUDA-graph
# capture would time the fused path wherever dropout is on: captures stay on it.)
FUSED = "fastlora-triton"
COMPOSED = "fastlora-torch"
PROVIDERS = ["base", "peft", "reference", FUSED, COMPOSED]


def auto_provider(s: Shape) -> str:
    """The provider whose time is auto's on CUDA for shape ``s``."""
    return FUSED if AUTO_ON_CUDA[shape_class(s.M, s.r)] == "triton" else COMPOSED
COLUMNS = ["section", "provider", "mode", "M", "K", "N", "r", "dropout", "median_ms", "timer", "first_call_s"]


@dataclasses.dataclass(frozen=True)
class SpeedCase:
    """A shape and mode of the speed table, with DESIGN.md's targets for it (None: none)."""

    shape: Shape
    mode: str
    max_vs_base: float | None = None
    min_vs_peft: float | None = None


@dataclasses.dataclass
class Plan:
    """The shapes of every section; --smoke shrinks them so that a CPU runs them in seconds."""

    parity: list[Shape]
    speed: list[SpeedCase]
    sweep: list[Shape]
    decode: list[Shape]


def shape(M: int, K: int, N: int, r: int, p: float = 0.0) -> Shape:
    return Shape(M, K, N, r, p, bias=False)


def speed_cases(M: int, K: int, N: int, big_M: int, big_KN: int) -> list[SpeedCase]:
    """DESIGN.md's performance table, at the given sizes (H100: 8192, 4096, 11008, 16384, 8192)."""
    return [
        SpeedCase(shape(M, K, K, 16), "fwd", max_vs_base=1.08),
        SpeedCase(shape(M, K, K, 16), "full", max_vs_base=1.12),
        SpeedCase(shape(M, K, K, 16, 0.1), "full", min_vs_peft=1.45),
        SpeedCase(shape(M, K, N, 16), "fwd", max_vs_base=1.05),
        SpeedCase(shape(M, K, N, 16), "full", max_vs_base=1.08),
        SpeedCase(shape(M, K, N, 16, 0.1), "full", min_vs_peft=1.35),
        SpeedCase(shape(big_M, big_KN, big_KN, 64), "fwd", max_vs_base=1.07),
        SpeedCase(shape(big_M, big_KN, big_KN, 64), "full", max_vs_base=1.08),
        SpeedCase(shape(big_M, big_KN, big_KN, 64, 0.1), "full", min_vs_peft=1.22),
        SpeedCase(shape(M, K, K, 64, 0.1), "full", max_vs_base=1.15, min_vs_peft=1.3),
        SpeedCase(shape(M, K, K, 128, 0.1), "full", max_vs_base=1.25, min_vs_peft=1.3),
    ]


def full_plan() -> Plan:
    return Plan(
        parity=[shape(8192, 4096, 4096, 16), shape(2048, 4096, 11008, 64), shape(1, 4096, 4096, 16),
                shape(777, 1000, 3000, 7)],
        speed=speed_cases(8192, 4096, 11008, 16384, 8192),
        sweep=[shape(M, KN, KN, 16, 0.1) for KN in (4096, 5120, 8192) for M in (2048, 4096, 8192)],
        decode=[shape(1, 4096, 4096, 16), shape(16, 4096, 4096, 16)],
    )


def smoke_plan() -> Plan:
    return Plan(
        parity=[shape(64, 64, 96, 16), shape(1, 32, 48, 4), shape(33, 40, 24, 7)],
        speed=speed_cases(64, 32, 48, 32, 64),
        sweep=[shape(M, KN, KN, 16, 0.1) for KN in (32, 64) for M in (32, 64)],
        decode=[shape(1, 64, 64, 16), shape(16, 64, 64, 16)],
    )


def run_gpu_tests(device: str) -> str:
    """pytest tests/test_gpu.py; its summary line."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"],
                            capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[1])
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"pytest exited {result.returncode}"


def parity(s: Shape, device: str) -> dict:
    """Max error of the fused path (backend ``triton``) and of plain PyTorch, both in bf16 on a GPU
    (fp32 on a CPU), against the fp32 reference on the same rounded inputs; y, dx, dA, dB."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    w = make_weights(s, dtype, device)
    x = torch.randn(s.M, s.K, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    dy = torch.randn(s.M, s.N, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    runs = {"truth": (torch.float32, reference.lora_linear), "plain": (dtype, reference.lora_linear),
            "fastlora": (dtype, fastlora.lora_linear)}
    results = {}
    for name, (dt, fn) in runs.items():
        xi, weight, A, B = (t.to(dt).clone().requires_grad_(i != 1) for i, t in enumerate((x, w.weight, w.lora_A, w.lora_B)))
        with fastlora.use_backend("triton"):
            y = fn(xi, weight, None, A, B, w.scaling)
            y.backward(dy.to(dt))
        results[name] = {"y": y.detach().float(), "dx": xi.grad.float(), "dA": A.grad.float(), "dB": B.grad.float()}
    row = {}
    for key, truth in results["truth"].items():
        scale = 1.0 + truth.abs().max().item()
        ours = (results["fastlora"][key] - truth).abs().max().item()
        plain = (results["plain"][key] - truth).abs().max().item()
        row[key] = (ours, plain, ours <= 2 * plain + 2e-3 * scale)
    return row


def timed(s: Shape, mode: str, providers: list[str], device: str, use_graph: bool) -> dict[str, dict]:
    """median ms (and first-call seconds) of each provider on one shape and mode."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    weights = make_weights(s, dtype, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s.M, s.K, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(s.M, s.N, generator=g).to(device=device, dtype=dtype)
    out = {}
    for name in providers:
        module = build(name, weights, s.dropout)
        fn = harness.mode_function(module, x, dy, mode)
        first = harness.first_call_seconds(fn, device)
        if device == "cuda":
            median, _, _, timer = harness.time_cuda(fn, use_graph=use_graph)
        else:
            (median, _, _), timer = harness.time_cpu(fn, budget_s=0.02), "perf_counter"
        out[name] = {"median_ms": median, "timer": timer, "first_call_s": first}
    return out


def ratio(rows: dict, a: str, b: str) -> float:
    return rows[a]["median_ms"] / rows[b]["median_ms"]


def verdict(value: float, target: float, at_most: bool) -> str:
    met = value <= target if at_most else value >= target
    return "met" if met else "**not met**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds on a CPU")
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the fused path runs on a CPU through Triton's interpreter only
        os.environ.setdefault("TRITON_INTERPRET", "1")
    plan = smoke_plan() if args.smoke else full_plan()
    use_graph = device == "cuda"
    name = device_name(device)
    stamp = datetime.date.today().isoformat()
    started = time.perf_counter()
    lines = [f"# fastlora on {name}, {stamp}", "",
             f"torch {torch.__version__}, triton {triton_version() or '-'}, git {git_sha()}"
             f"{', smoke mode (tiny shapes)' if args.smoke else ''}. Times are medians "
             f"({'GPU time: CUDA-graph replay where capture works, else do_bench' if use_graph else 'CPU wall clock'}).", ""]
    targets_at = len(lines)
    csv_rows = []

    lines += ["## Tests", "", f"`pytest -m gpu tests/test_gpu.py`: {run_gpu_tests(device)}", ""]

    lines += ["## Parity (p = 0): max error against an fp32 reference, fused / plain PyTorch", "",
              "| M, K, N, r | y | dx | dA | dB | within 2x |", "|---|---|---|---|---|---|"]
    for s in plan.parity:
        row = parity(s, device)
        cells = " | ".join(f"{ours:.2e} / {plain:.2e}" for ours, plain, _ in row.values())
        lines.append(f"| {s.M}, {s.K}, {s.N}, {s.r} | {cells} | {'yes' if all(ok for *_, ok in row.values()) else '**no**'} |")
    lines.append("")

    targets = []
    lines += ["## Speed (ms)", "", "fused: fastlora's Triton kernels; torch: its cuBLAS-composed path; auto: the one "
              "`fastlora._backend.AUTO_ON_CUDA` picks for the shape.", "",
              "| M, K, N, r | p | mode | base | PEFT | PyTorch LoRA | fused | torch | auto | fused / base "
              "| PEFT / fused | PEFT / auto | first call s (fused) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    speed = {}
    for case in plan.speed:
        s = case.shape
        rows = timed(s, case.mode, PROVIDERS, device, use_graph)
        speed[case] = rows
        csv_rows += [{"section": "speed", "provider": p, "mode": case.mode, **dataclasses.asdict(s), **v} for p, v in rows.items()]
        vs_base, vs_peft = ratio(rows, FUSED, "base"), ratio(rows, "peft", FUSED)
        auto = auto_provider(s)
        lines.append(f"| {s.M}, {s.K}, {s.N}, {s.r} | {s.dropout} | {case.mode} | " + " | ".join(
            f"{rows[p]['median_ms']:.3f}" for p in PROVIDERS) + f" | {'fused' if auto == FUSED else 'torch'} | "
            f"{vs_base:.2f} | {vs_peft:.2f} | {ratio(rows, 'peft', auto):.2f} | {rows[FUSED]['first_call_s']:.1f} |")
        label = f"({s.M}, {s.K}, {s.N}, {s.r}) p{s.dropout} {case.mode}"
        if case.max_vs_base is not None:
            targets.append((f"{label}: time vs base", f"<= {case.max_vs_base}x", f"{vs_base:.2f}x",
                            verdict(vs_base, case.max_vs_base, True)))
        if case.min_vs_peft is not None:
            targets.append((f"{label}: speed-up vs PEFT", f">= {case.min_vs_peft}x", f"{vs_peft:.2f}x",
                            verdict(vs_peft, case.min_vs_peft, False)))
    lines.append("")
    for label, pick in (("fused", lambda case: FUSED), ("auto", lambda case: auto_provider(case.shape))):
        worst = min(ratio(rows, "peft", pick(case)) for case, rows in speed.items())
        targets.append((f"every speed shape: {label} speed-up vs PEFT (worst)", ">= 1.0x", f"{worst:.2f}x",
                        verdict(worst, 1.0, False)))

    sweep = []
    for s in plan.sweep:
        rows = timed(s, "full", ["reference", FUSED], device, use_graph)
        csv_rows += [{"section": "sweep", "provider": p, "mode": "full", **dataclasses.asdict(s), **v} for p, v in rows.items()]
        sweep.append(ratio(rows, "reference", FUSED))
    average = statistics.mean(sweep)
    lines += [f"LoRAFusion sweep (K = N in {sorted({s.K for s in plan.sweep})}, M in {sorted({s.M for s in plan.sweep})}, "
              f"r16, p0.1, full): fused vs PyTorch LoRA {average:.2f}x on average (min {min(sweep):.2f}x, "
              f"max {max(sweep):.2f}x).", ""]
    targets.append(("LoRAFusion sweep, speed-up vs PyTorch LoRA (average)", ">= 1.35x", f"{average:.2f}x",
                    verdict(average, 1.35, False)))

    decode = []
    for s in plan.decode:
        rows = timed(s, "fwd", ["base", "peft", FUSED], device, use_graph)
        csv_rows += [{"section": "decode", "provider": p, "mode": "fwd", **dataclasses.asdict(s), **v} for p, v in rows.items()]
        decode.append(f"M={s.M}: base {rows['base']['median_ms'] * 1e3:.1f} us, PEFT {rows['peft']['median_ms'] * 1e3:.1f} us, "
                      f"fused {rows[FUSED]['median_ms'] * 1e3:.1f} us")
        value = ratio(rows, FUSED, "base")
        targets.append((f"decode M={s.M} fwd: time vs base", "<= 1.15x", f"{value:.2f}x", verdict(value, 1.15, True)))
    lines += ["Decode forward, K = N = " + f"{plan.decode[0].K}, r16: " + "; ".join(decode) + ".", ""]

    firsts = [rows[FUSED]["first_call_s"] for rows in speed.values()]
    targets.append(("first call of a new shape (worst)", "<= 5 s", f"{max(firsts):.1f} s", verdict(max(firsts), 5.0, True)))

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    host = {p: overhead.measure(overhead.SHAPES[1], p, device, dtype, 50) for p in ("base", "peft", "fastlora")}
    host_ratio = host["fastlora"]["host_us"] / host["peft"]["host_us"]
    lines += [f"Host time per eager fwd+bwd (M=16, K=N=256, r16, p0.1): base {host['base']['host_us']:.0f} us, "
              f"PEFT {host['peft']['host_us']:.0f} us, fastlora {host['fastlora']['host_us']:.0f} us; launches "
              f"{host['base']['launches']:.0f} / {host['peft']['launches']:.0f} / {host['fastlora']['launches']:.0f}.", ""]
    targets.append(("host time per eager fwd+bwd vs PEFT", "<= 1.0x", f"{host_ratio:.2f}x", verdict(host_ratio, 1.0, True)))

    s = plan.speed[2].shape
    weights = make_weights(s, dtype, device)
    x = torch.randn(s.M, s.K, device=device, dtype=dtype, requires_grad=True)
    saved = {}
    for p in ("peft", "fastlora"):
        module = build(p, weights, s.dropout)
        saved[p] = harness.saved_bytes(lambda: module(x), [x, *module.parameters()])
    less = saved["peft"] / max(saved["fastlora"], 1)
    lines += [f"Saved for backward beyond x at ({s.M}, {s.K}, {s.N}, {s.r}) p{s.dropout}: PEFT {saved['peft'] / 2**20:.2f} MiB, "
              f"fastlora {saved['fastlora'] / 2**20:.2f} MiB.", ""]
    targets.append(("saved for backward, PEFT / fastlora (p0.1)", ">= 20x", f"{less:.0f}x", verdict(less, 20.0, False)))

    setup = end_to_end.SETUPS[(device, args.smoke)]
    e2e = [row for p in (0.0, 0.1) for row in end_to_end.run_setup(setup, p, device, dtype, 0.3 if args.smoke else 3.0)]
    lines += ["## End to end", "", "```", end_to_end.format_table(e2e), "```", ""]

    lines[targets_at:targets_at] = ["## DESIGN.md targets", "", "| target | goal | measured | |", "|---|---|---|---|",
                  *[f"| {t} | {goal} | {value} | {v} |" for t, goal, value, v in targets], ""]
    lines.append(f"Report written in {time.perf_counter() - started:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = args.out_dir / f"{name}-{stamp}"
    base.with_suffix(".md").write_text(text)
    append_csv(base.with_suffix(".csv"), csv_rows, COLUMNS)
    plot(speed, base.with_suffix(".png"))
    print(f"wrote {base}.md, .csv and .png")
    return 0


def plot(speed: dict, path: pathlib.Path) -> None:
    """Bars: PEFT, PyTorch LoRA and fastlora time over base, per speed shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c.shape.M}x{c.shape.K}x{c.shape.N} r{c.shape.r}\np{c.shape.dropout} {c.mode}" for c in speed]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.27
    for i, provider in enumerate(("peft", "reference", FUSED)):
        values = [ratio(rows, provider, "base") for rows in speed.values()]
        ax.bar([j + (i - 1) * width for j in range(len(labels))], values, width,
               label={"reference": "PyTorch LoRA", FUSED: "fastlora (fused)"}.get(provider, provider))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("time / base (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
