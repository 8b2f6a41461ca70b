"""One command for whoever has a GPU: everything a short GPU session must answer, in one run.

    python -m benchmarks.gpu_report                 # on a CUDA GPU: about 7-8 minutes from a cold cache
    python -m benchmarks.gpu_report --budget 300    # skip the stages that no longer fit in 300 s
    python -m benchmarks.gpu_report --smoke         # tiny shapes on whatever device (CI runs it on CPU)
    python -m benchmarks.gpu_report --stages parity speed   # only some stages

Stages, in the order of what they decide (each one's predicted seconds on an H100 / H200
from a cold Triton cache are in ``STAGES`` and benchmarks/NOTES.md):
environment (GPU, SMs, versions); parity of the fused path in bf16 (forward and every
gradient, dropout included with the mask read from the op's own keep bits; which kernels and
configs ran; first-call seconds); the speed table of fastlora's targets (base, PEFT, PyTorch
LoRA, the fused path, the torch path, auto's choice); a per-kernel profile of one fwd+bwd at
the two shapes of NOTES.md (GPU time, registers, spills, shared memory); decode and host
cost; LoRAFusion's sweep; saved bytes on the fused path; tests/test_gpu.py under a timeout; DoRA
against PEFT's DoRA and the fused LoRA; QLoRA against PEFT + bitsandbytes and the fused bf16
LoRA, and its decode forwards against the bf16 base; mixed batches of 16 adapters against
one adapter, a loop and PEFT's adapter_names;
end to end if time is left. The report closes with the ``AUTO_ON_CUDA`` table its
measurements support.

After every stage the report ``benchmarks/results/<gpu>-<date>.md`` is rewritten, the
stage's rows are appended to ``<gpu>-<date>.csv`` and one progress line is printed; a stage
that raises is recorded (with its error) and the next one runs; a stage predicted not to fit
in what is left of ``--budget`` is skipped and listed as such. ``<gpu>-<date>.png`` plots
the speed table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import torch

import fastlora
import fastlora.reference as reference
from fastlora._backend import AUTO_ON_CUDA, shape_class
from fastlora.ops import qlora_linear as qlora_module
from fastlora.ops.lora_linear import saved_keep_mask
from benchmarks import end_to_end, harness, overhead
from benchmarks.providers import Shape, build, make_weights
from benchmarks.run import RESULTS, append_csv, device_name, git_sha, positive_float, triton_version

# "fused" is fastlora's Triton path (the targets are about it), "torch" its cuBLAS-composed
# path; `auto` runs one of them per shape class (_backend.AUTO_ON_CUDA), so the report times
# both and reads auto's time off the table.
FUSED = "fastlora-triton"
COMPOSED = "fastlora-torch"
PROVIDERS = ["base", "peft", "reference", FUSED, COMPOSED]
COLUMNS = ["section", "provider", "mode", "M", "K", "N", "r", "dropout", "median_ms", "timer", "first_call_s"]
REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def auto_provider(s: Shape) -> str:
    """The provider whose time is auto's on CUDA for shape ``s``."""
    return FUSED if AUTO_ON_CUDA[shape_class(s.M, s.r)] == "triton" else COMPOSED


@dataclasses.dataclass(frozen=True)
class SpeedCase:
    """A shape and mode of the speed table, with the targets for it (None: none)."""

    shape: Shape
    mode: str
    max_vs_base: float | None = None
    min_vs_peft: float | None = None


@dataclasses.dataclass
class Plan:
    """The shapes of every stage; --smoke shrinks them so that a CPU runs them in seconds."""

    parity: list[Shape]
    speed: list[SpeedCase]
    profile: list[Shape]
    sweep: list[Shape]
    decode: list[Shape]


def shape(M: int, K: int, N: int, r: int, p: float = 0.0) -> Shape:
    return Shape(M, K, N, r, p, bias=False)


def speed_cases(M: int, K: int, N: int, big_M: int, big_KN: int) -> list[SpeedCase]:
    """The performance targets' table, at the given sizes (H100: 8192, 4096, 11008, 16384, 8192)."""
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
        parity=[shape(8192, 4096, 4096, 16, 0.1), shape(2048, 4096, 11008, 64), shape(2048, 4096, 1024, 64, 0.1),
                shape(1, 4096, 4096, 16), shape(16, 4096, 4096, 16, 0.1), shape(777, 1000, 3000, 7, 0.1)],
        speed=speed_cases(8192, 4096, 11008, 16384, 8192),
        profile=[shape(8192, 4096, 4096, 16, 0.1), shape(8192, 4096, 11008, 16)],
        sweep=[shape(M, KN, KN, 16, 0.1) for KN in (4096, 5120, 8192) for M in (2048, 4096, 8192)],
        decode=[shape(1, 4096, 4096, 16), shape(16, 4096, 4096, 16)],
    )


def smoke_plan() -> Plan:
    return Plan(
        parity=[shape(64, 64, 96, 16, 0.1), shape(1, 32, 48, 4), shape(33, 40, 24, 7, 0.1)],
        speed=speed_cases(64, 32, 48, 32, 64),
        profile=[shape(64, 32, 32, 16, 0.1)],
        sweep=[shape(M, KN, KN, 16, 0.1) for KN in (32, 64) for M in (32, 64)],
        decode=[shape(1, 64, 64, 16), shape(16, 64, 64, 16)],
    )


@dataclasses.dataclass
class Report:
    """What the stages have found so far; ``write`` saves it (called after every stage)."""

    device: str
    plan: Plan
    smoke: bool
    budget_s: float
    path: pathlib.Path  # <gpu>-<date>, without suffix
    header: list[str]
    started: float = dataclasses.field(default_factory=time.perf_counter)
    sections: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
    targets: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    outcomes: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # stage, outcome, seconds
    speed: dict = dataclasses.field(default_factory=dict)  # SpeedCase -> {provider: timing}
    decode: dict = dataclasses.field(default_factory=dict)  # Shape -> {provider: timing}

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    @property
    def use_graph(self) -> bool:
        return self.device == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def target(self, label: str, goal: str, value: float, limit: float, at_most: bool, unit: str = "x") -> None:
        met = value <= limit if at_most else value >= limit
        self.targets.append((label, goal, f"{value:.2f}{unit}", "met" if met else "**not met**"))

    def rows(self, section: str, s: Shape, mode: str, timings: dict[str, dict]) -> None:
        """Append one CSV row per provider at once (a later crash keeps them)."""
        append_csv(self.path.with_suffix(".csv"),
                   [{"section": section, "provider": p, "mode": mode, **dataclasses.asdict(s), **v} for p, v in timings.items()],
                   COLUMNS)

    def markdown(self) -> str:
        lines = [*self.header, "## Stages", "", "| stage | outcome | seconds |", "|---|---|---|",
                 *[f"| {stage} | {outcome} | {seconds} |" for stage, outcome, seconds in self.outcomes], ""]
        lines += ["## Targets", "", "| target | goal | measured | |", "|---|---|---|---|",
                  *[f"| {t} | {goal} | {value} | {v} |" for t, goal, value, v in self.targets], ""]
        for title, body in self.sections:
            lines += [f"## {title}", "", *body, ""]
        lines.append(f"Report written after {self.elapsed():.0f} s (budget {self.budget_s:.0f} s).")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".md.tmp")
        temporary.write_text(self.markdown())
        temporary.replace(self.path.with_suffix(".md"))


# ---------------------------------------------------------------------------------------------
# measurements shared by the stages


def case_inputs(report: Report, s: Shape) -> tuple:
    """The weights of shape ``s`` and its x (requiring grad) and dy, on the report's device and dtype."""
    weights = make_weights(s, report.dtype, report.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s.M, s.K, generator=g).to(device=report.device, dtype=report.dtype).requires_grad_(True)
    dy = torch.randn(s.M, s.N, generator=g).to(device=report.device, dtype=report.dtype)
    return weights, x, dy


def timed(report: Report, s: Shape, mode: str, providers: list[str]) -> dict[str, dict]:
    """median ms (and first-call seconds) of each provider on one shape and mode."""
    device = report.device
    weights, x, dy = case_inputs(report, s)
    out = {}
    for name in providers:
        module = build(name, weights, s.dropout)
        fn = harness.mode_function(module, x, dy, mode)
        first = harness.first_call_seconds(fn, device)
        if device == "cuda":
            median, _, _, timer = harness.time_cuda(fn, use_graph=report.use_graph)
        else:
            (median, _, _), timer = harness.time_cpu(fn, budget_s=0.02), "perf_counter"
        out[name] = {"median_ms": median, "timer": timer, "first_call_s": first}
    return out


def ratio(rows: dict, a: str, b: str) -> float:
    return rows[a]["median_ms"] / rows[b]["median_ms"]


def fused_call(x, weight, A, B, scaling, dropout_p, seed):
    """One fused (backend triton) training call after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    with fastlora.use_backend("triton"):
        return fastlora.lora_linear(x, weight, None, A, B, scaling, dropout_p, True)


def parity_row(s: Shape, device: str) -> dict:
    """Max error of the fused path and of plain PyTorch (bf16 on a GPU, fp32 on a CPU) against
    the fp32 reference on the same rounded inputs, for y, dx, dA, dB; with dropout the mask is
    the one the fused call drew (its keep bits), given to the reference."""
    from fastlora.ops import launcher

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    w = make_weights(s, dtype, device)
    x = torch.randn(s.M, s.K, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    dy = torch.randn(s.M, s.N, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)

    def leaves(dt):
        return [t.to(dt).clone().requires_grad_(i != 1) for i, t in enumerate((x, w.weight, w.lora_A, w.lora_B))]

    before = set(launcher.chosen_configs())
    xi, weight, A, B = leaves(dtype)
    started = time.perf_counter()
    y = fused_call(xi, weight, A, B, w.scaling, s.dropout, seed=5)
    mask = saved_keep_mask(y) if s.dropout else None
    y.backward(dy)
    if device == "cuda":
        torch.cuda.synchronize()
    first_call = time.perf_counter() - started
    results = {"fastlora": {"y": y.detach().float(), "dx": xi.grad.float(), "dA": A.grad.float(), "dB": B.grad.float()}}
    for name, dt in (("truth", torch.float32), ("plain", dtype)):
        xi, weight, A, B = leaves(dt)
        y = reference.lora_linear(xi, weight, None, A, B, w.scaling, s.dropout, True, dropout_mask=mask)
        y.backward(dy.to(dt))
        results[name] = {"y": y.detach().float(), "dx": xi.grad.float(), "dA": A.grad.float(), "dB": B.grad.float()}
    errors = {}
    for key, truth in results["truth"].items():
        scale = 1.0 + truth.abs().max().item()
        ours = (results["fastlora"][key] - truth).abs().max().item()
        plain = (results["plain"][key] - truth).abs().max().item()
        errors[key] = (ours, plain, ours <= 2 * plain + 2e-3 * scale)
    ran = {key: config for key, config in launcher.chosen_configs().items() if key not in before}
    return {"errors": errors, "first_call_s": first_call, "kernels": ran,
            "keep_rate": mask.float().mean().item() if mask is not None else None}


def compiled_kernel_facts() -> dict[str, list[tuple[int, int, int]]]:
    """kernel name -> [(registers, spills, shared bytes)] of every compiled variant in this
    process (empty on a CPU: the interpreter compiles nothing)."""
    from fastlora.kernels import lora_backward, lora_forward, lora_gemm_tma

    facts = {}
    for module in (lora_forward, lora_backward, lora_gemm_tma):
        for name in dir(module):
            jit = getattr(module, name)
            caches = getattr(jit, "device_caches", None)
            if not name.endswith("_kernel") or not isinstance(caches, dict):
                continue
            for cache in caches.values():
                kernels = cache[0] if isinstance(cache, tuple) else cache
                for compiled in getattr(kernels, "values", lambda: [])():
                    shared = getattr(getattr(compiled, "metadata", None), "shared", 0)
                    facts.setdefault(name, []).append(
                        (getattr(compiled, "n_regs", -1), getattr(compiled, "n_spills", -1), shared))
    return facts


# ---------------------------------------------------------------------------------------------
# the stages: each adds its section (and targets, rows) to the report


def stage_environment(report: Report) -> None:
    lines = [f"- device: {device_name(report.device)}; torch {torch.__version__}, triton {triton_version() or '-'}, "
             f"Python {platform.python_version()}, git {git_sha()}"]
    if report.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines += [f"- {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, compute capability "
                  f"{props.major}.{props.minor}, CUDA {torch.version.cuda}, shared memory per block (opt-in) "
                  f"{getattr(props, 'shared_memory_per_block_optin', 0) // 1024} KiB"]
    lines.append(f"- TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
                 f"float32 matmul precision {torch.get_float32_matmul_precision()}")
    report.sections.append(("Environment", lines))


def stage_parity(report: Report) -> None:
    from fastlora.ops.launcher import describe_config

    lines = ["Max error against an fp32 reference, fused / plain PyTorch in the same dtype; with dropout "
             "the reference applies the mask the fused call drew (read from its keep bits).", "",
             "| M, K, N, r | p | y | dx | dA | dB | within 2x | keep rate | first call s |",
             "|---|---|---|---|---|---|---|---|---|"]
    ran = {}
    worst_first = 0.0
    for s in report.plan.parity:
        row = parity_row(s, report.device)
        cells = " | ".join(f"{ours:.2e} / {plain:.2e}" for ours, plain, _ in row["errors"].values())
        ok = all(good for *_, good in row["errors"].values())
        keep = f"{row['keep_rate']:.3f}" if row["keep_rate"] is not None else "-"
        lines.append(f"| {s.M}, {s.K}, {s.N}, {s.r} | {s.dropout} | {cells} | {'yes' if ok else '**no**'} | {keep} "
                     f"| {row['first_call_s']:.1f} |")
        report.target(f"parity ({s.M}, {s.K}, {s.N}, {s.r}) p{s.dropout}: within 2x of plain PyTorch", "all of y, dx, dA, dB",
                      1.0 if ok else 0.0, 1.0, at_most=False, unit="")
        worst_first = max(worst_first, row["first_call_s"])
        for key, config in row["kernels"].items():
            ran[f"{key[0]} (M bucket {key[2]}, {', '.join(str(k) for k in key[3:6])})"] = describe_config(config)
    lines += ["", "Kernels and configs that ran (kernel, M bucket, other sizes: config):", "",
              *[f"- {k}: {v}" for k, v in ran.items()]]
    report.target("first fused fwd+bwd of a new shape (worst parity case)", "<= 5 s", worst_first, 5.0, at_most=True, unit=" s")
    report.sections.append(("Parity", lines))


def stage_speed(report: Report) -> None:
    lines = ["fused: fastlora's Triton kernels; torch: its cuBLAS-composed path; auto: the one "
             "`fastlora._backend.AUTO_ON_CUDA` picks for the shape.", "",
             "| M, K, N, r | p | mode | base | PEFT | PyTorch LoRA | fused | torch | auto | fused / base "
             "| PEFT / fused | PEFT / auto | first call s (fused) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in report.plan.speed:
        s = case.shape
        rows = timed(report, s, case.mode, PROVIDERS)
        report.speed[case] = rows
        report.rows("speed", s, case.mode, rows)
        vs_base, vs_peft = ratio(rows, FUSED, "base"), ratio(rows, "peft", FUSED)
        auto = auto_provider(s)
        lines.append(f"| {s.M}, {s.K}, {s.N}, {s.r} | {s.dropout} | {case.mode} | " + " | ".join(
            f"{rows[p]['median_ms']:.3f}" for p in PROVIDERS) + f" | {'fused' if auto == FUSED else 'torch'} | "
            f"{vs_base:.2f} | {vs_peft:.2f} | {ratio(rows, 'peft', auto):.2f} | {rows[FUSED]['first_call_s']:.1f} |")
        label = f"({s.M}, {s.K}, {s.N}, {s.r}) p{s.dropout} {case.mode}"
        if case.max_vs_base is not None:
            report.target(f"{label}: time vs base", f"<= {case.max_vs_base}x", vs_base, case.max_vs_base, at_most=True)
        if case.min_vs_peft is not None:
            report.target(f"{label}: speed-up vs PEFT", f">= {case.min_vs_peft}x", vs_peft, case.min_vs_peft, at_most=False)
    for label, pick in (("fused", lambda case: FUSED), ("auto", lambda case: auto_provider(case.shape))):
        worst = min(ratio(rows, "peft", pick(case)) for case, rows in report.speed.items())
        report.target(f"every speed shape: {label} speed-up vs PEFT (worst)", ">= 1.0x", worst, 1.0, at_most=False)
    plot(report.speed, report.path.with_suffix(".png"))
    report.sections.append(("Speed (ms)", lines))


def stage_profile(report: Report) -> None:
    lines = []
    if report.device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for s in report.plan.profile:
            w = make_weights(s, report.dtype, "cuda")
            x = torch.randn(s.M, s.K, device="cuda", dtype=report.dtype, requires_grad=True)
            dy = torch.randn(s.M, s.N, device="cuda", dtype=report.dtype)
            A, B = w.lora_A.clone().requires_grad_(), w.lora_B.clone().requires_grad_()
            for _ in range(2):
                fused_call(x, w.weight, A, B, w.scaling, s.dropout, seed=1).backward(dy)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fused_call(x, w.weight, A, B, w.scaling, s.dropout, seed=1).backward(dy)
                torch.cuda.synchronize()
            kernels = sorted(((e.key, e.device_time_total, e.count) for e in prof.key_averages() if e.device_time_total > 0),
                             key=lambda k: -k[1])
            lines += [f"One fused fwd+bwd at ({s.M}, {s.K}, {s.N}, {s.r}) p{s.dropout}, GPU time per kernel:", "",
                      "| kernel | us | launches |", "|---|---|---|",
                      *[f"| {name[:90]} | {us:.1f} | {count} |" for name, us, count in kernels],
                      f"| **total** | {sum(us for _, us, _ in kernels):.1f} | {sum(c for *_, c in kernels)} |", ""]
    else:
        lines += ["GPU time per kernel needs CUDA (this run has none).", ""]
    facts = compiled_kernel_facts()
    lines += ["Compiled variants in this process (registers / spills / shared KiB):", ""]
    lines += [f"- {name}: " + "; ".join(f"{regs} / {spills} / {shared / 1024:.0f}" for regs, spills, shared in variants)
              for name, variants in sorted(facts.items())] or ["- none (the interpreter compiles nothing)"]
    spills = [spill for variants in facts.values() for _, spill, _ in variants]
    if spills:
        report.target("register spills in any compiled kernel", "0", float(max(spills)), 0.0, at_most=True, unit="")
    report.sections.append(("Per-kernel profile", lines))


def stage_decode_and_host(report: Report) -> None:
    decode = []
    for s in report.plan.decode:
        rows = timed(report, s, "fwd", ["base", "peft", FUSED, COMPOSED])
        report.decode[s] = rows
        report.rows("decode", s, "fwd", rows)
        decode.append(f"M={s.M}: base {rows['base']['median_ms'] * 1e3:.1f} us, PEFT {rows['peft']['median_ms'] * 1e3:.1f} us, "
                      f"fused {rows[FUSED]['median_ms'] * 1e3:.1f} us, torch {rows[COMPOSED]['median_ms'] * 1e3:.1f} us")
        report.target(f"decode M={s.M} fwd: time vs base", "<= 1.15x", ratio(rows, FUSED, "base"), 1.15, at_most=True)
    # on a CPU the fused path runs in Triton's interpreter, whose host time means nothing: the cpp backend instead
    fused = FUSED if report.device == "cuda" else "fastlora-cpp"
    host = {p: overhead.measure(overhead.SHAPES[1], p, report.device, report.dtype, 10 if report.smoke else 50)
            for p in ("base", "peft", fused, COMPOSED)}
    lines = [f"Decode forward, K = N = {report.plan.decode[0].K}, r16: " + "; ".join(decode) + ".", "",
             "Host time per eager fwd+bwd (M=16, K=N=256, r16, p0.1), and launches per call:", "",
             "| provider | host us | launches |", "|---|---|---|",
             *[f"| {p} | {v['host_us']:.0f} | {v['launches']:.0f} |" for p, v in host.items()]]
    report.target(f"host time per eager fwd+bwd, {fused} vs PEFT", "<= 1.0x", host[fused]["host_us"] / host["peft"]["host_us"],
                  1.0, at_most=True)
    report.sections.append(("Decode and host cost", lines))


def stage_sweep(report: Report) -> None:
    sweep = []
    for s in report.plan.sweep:
        rows = timed(report, s, "full", ["reference", FUSED, COMPOSED])
        report.rows("sweep", s, "full", rows)
        sweep.append(ratio(rows, "reference", FUSED))
    average = statistics.mean(sweep)
    plan = report.plan.sweep
    report.sections.append(("LoRAFusion sweep", [
        f"K = N in {sorted({s.K for s in plan})}, M in {sorted({s.M for s in plan})}, r16, p0.1, fwd+bwd: fused vs "
        f"PyTorch LoRA {average:.2f}x on average (min {min(sweep):.2f}x, max {max(sweep):.2f}x)."]))
    report.target("LoRAFusion sweep, speed-up vs PyTorch LoRA (average)", ">= 1.35x", average, 1.35, at_most=False)


def stage_saved(report: Report) -> None:
    s = report.plan.speed[2].shape
    weights = make_weights(s, report.dtype, report.device)
    x = torch.randn(s.M, s.K, device=report.device, dtype=report.dtype, requires_grad=True)
    saved = {}
    for p in ("peft", FUSED):
        module = build(p, weights, s.dropout)
        saved[p] = harness.saved_bytes(lambda: module(x), [x, *module.parameters()])
    less = saved["peft"] / max(saved[FUSED], 1)
    report.sections.append(("Saved for backward", [
        f"Beyond x at ({s.M}, {s.K}, {s.N}, {s.r}) p{s.dropout}: PEFT {saved['peft'] / 2**20:.2f} MiB, "
        f"fused path {saved[FUSED] / 2**20:.2f} MiB."]))
    report.target("saved for backward, PEFT / fused (p0.1)", ">= 20x", less, 20.0, at_most=False)


DORA_PROVIDERS = ["fastlora-triton", "peft-dora", "fastlora-dora-triton", "fastlora-dora-torch"]


def checked_memory(report: Report, s: Shape, reference_name: str, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """Check each provider of ``names`` against ``reference_name`` on shape ``s`` (AssertionError
    if one disagrees); their (saved MiB, peak MiB) of a fwd+bwd, the peak on a GPU only (the
    CPU's profiler-based measure would trace the interpreter)."""
    weights, x, dy = case_inputs(report, s)
    truth = build(reference_name, weights, s.dropout)
    memory = {}
    for name in names:
        module = build(name, weights, s.dropout)
        error = harness.check_against_reference(module, truth, x, dy)
        if error is not None:
            raise AssertionError(f"{name} disagrees with {reference_name} at {s}: {error}")
        peak = harness.peak_memory_bytes(lambda: module(x).backward(dy), report.device) if report.device == "cuda" else math.nan
        memory[name] = (harness.saved_bytes(lambda: module(x), [x, *module.parameters()]) / 2**20, peak / 2**20)
    return memory


def stage_dora(report: Report) -> None:
    """DoRA (issue 18's GPU targets): fwd+bwd of fastlora's DoRA (fused and torch paths) against
    PEFT's DoRA layer and fastlora's own fused LoRA, p = 0 and 0.1, after a parity check."""
    base = report.plan.speed[0].shape
    lines = ["| M, K, N, r | p | fastlora LoRA (fused) | PEFT DoRA | DoRA fused | DoRA torch | PEFT / DoRA fused "
             "| DoRA fused / LoRA fused | saved MiB PEFT / fused | peak MiB PEFT / fused |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in (0.0, 0.1):
        s = Shape(base.M, base.K, base.N, base.r, p, bias=False)
        memory = checked_memory(report, s, "dora-reference", ("peft-dora", "fastlora-dora-triton"))
        rows = timed(report, s, "full", DORA_PROVIDERS)
        report.rows("dora", s, "full", rows)
        vs_peft = ratio(rows, "peft-dora", "fastlora-dora-triton")
        vs_lora = ratio(rows, "fastlora-dora-triton", "fastlora-triton")
        lines.append(f"| {s.M}, {s.K}, {s.N}, {s.r} | {p} | " + " | ".join(
            f"{rows[n]['median_ms']:.3f}" for n in DORA_PROVIDERS) + f" | {vs_peft:.2f} | {vs_lora:.2f} | "
            f"{memory['peft-dora'][0]:.1f} / {memory['fastlora-dora-triton'][0]:.1f} | "
            f"{memory['peft-dora'][1]:.1f} / {memory['fastlora-dora-triton'][1]:.1f} |")
        report.target(f"DoRA ({s.M}, {s.K}, {s.N}, {s.r}) p{p} full: speed-up vs PEFT DoRA", ">= 2.0x",
                      vs_peft, 2.0, at_most=False)
        if p == 0.0:
            report.target(f"DoRA ({s.M}, {s.K}, {s.N}, {s.r}) p0 full: time vs fused LoRA", "<= 1.15x",
                          vs_lora, 1.15, at_most=True)
    report.sections.append(("DoRA fwd+bwd (ms)", lines))


QLORA_PROVIDERS = ["fastlora-triton", "peft-qlora", "fastlora-qlora-triton", "fastlora-qlora-torch"]
QLORA_DECODE_PROVIDERS = ["base", "fastlora-triton", "fastlora-qlora-triton", "fastlora-qlora-torch"]
IN_GEMM = "fastlora-qlora-triton-in-gemm"  # the same provider with the in-GEMM decode dequant on


def stage_qlora(report: Report) -> None:
    """QLoRA (issue 19's GPU targets): fwd+bwd on an NF4 base (nested absmax, blocks of 64,
    fp32 adapters, bf16 compute) of fastlora (Triton dequantizer + fused GEMMs; torch path:
    bitsandbytes' CUDA dequantizer + cuBLAS) against PEFT + bitsandbytes and fastlora's fused
    bf16 LoRA, after a parity check; then decode forwards against the bf16 base."""
    base = report.plan.speed[0].shape
    # K a multiple of the block size: bitsandbytes 0.50's CPU dequantizer (the smoke run's
    # reference) is wrong for rows shorter than a block (tests/test_qlora.py)
    s = Shape(base.M, max(base.K, 64), base.N, base.r, 0.1, bias=False)
    memory = checked_memory(report, s, "qlora-reference", ("peft-qlora", "fastlora-qlora-triton"))
    rows = timed(report, s, "full", QLORA_PROVIDERS)
    report.rows("qlora", s, "full", rows)
    vs_lora = ratio(rows, "fastlora-qlora-triton", "fastlora-triton")
    vs_peft = ratio(rows, "peft-qlora", "fastlora-qlora-triton")
    lines = ["| M, K, N, r | p | fastlora bf16 LoRA (fused) | PEFT + bitsandbytes | QLoRA fused | QLoRA torch "
             "| QLoRA fused / LoRA fused | PEFT / QLoRA fused | saved MiB PEFT / fused | peak MiB PEFT / fused |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| {s.M}, {s.K}, {s.N}, {s.r} | {s.dropout} | " + " | ".join(f"{rows[n]['median_ms']:.3f}" for n in QLORA_PROVIDERS)
             + f" | {vs_lora:.2f} | {vs_peft:.2f} | {memory['peft-qlora'][0]:.1f} / {memory['fastlora-qlora-triton'][0]:.1f} | "
             f"{memory['peft-qlora'][1]:.1f} / {memory['fastlora-qlora-triton'][1]:.1f} |", "",
             "Decode forward (ms); QLoRA fused: the Triton dequantizer then the fused GEMM, in-GEMM: W "
             "dequantized in the GEMM's main loop (qlora_linear.IN_GEMM_DEQUANT_MAX_ROWS = 64):", "",
             "| M | base (bf16) | fastlora bf16 LoRA | QLoRA fused | QLoRA torch | QLoRA in-GEMM | in-GEMM / base "
             "| in-GEMM / fused |",
             "|---|---|---|---|---|---|---|---|"]
    report.target(f"QLoRA ({s.M}, {s.K}, {s.N}, {s.r}) p0.1 full: time vs fused bf16 LoRA", "<= 1.1x",
                  vs_lora, 1.1, at_most=True)
    report.target(f"QLoRA ({s.M}, {s.K}, {s.N}, {s.r}) p0.1 full: speed-up vs PEFT + bitsandbytes", ">= 1.3x",
                  vs_peft, 1.3, at_most=False)
    in_gemm_wins = []
    for d in report.plan.decode:
        decode = timed(report, d, "fwd", QLORA_DECODE_PROVIDERS)
        before = qlora_module.IN_GEMM_DEQUANT_MAX_ROWS
        qlora_module.IN_GEMM_DEQUANT_MAX_ROWS = 64
        try:
            decode[IN_GEMM] = timed(report, d, "fwd", ["fastlora-qlora-triton"])["fastlora-qlora-triton"]
        finally:
            qlora_module.IN_GEMM_DEQUANT_MAX_ROWS = before
        report.rows("qlora-decode", d, "fwd", decode)
        vs_base = ratio(decode, IN_GEMM, "base")
        in_gemm_wins.append(ratio(decode, IN_GEMM, "fastlora-qlora-triton") < 1.0)
        lines.append(f"| {d.M} | " + " | ".join(f"{decode[n]['median_ms']:.4f}" for n in [*QLORA_DECODE_PROVIDERS, IN_GEMM])
                     + f" | {vs_base:.2f} | {ratio(decode, IN_GEMM, 'fastlora-qlora-triton'):.2f} |")
        report.target(f"QLoRA decode M={d.M} ({d.K}, {d.N}) fwd, in-GEMM dequant: time vs the bf16 base", "<= 0.7x",
                      vs_base, 0.7, at_most=True)
    rows_setting = 64 if in_gemm_wins and all(in_gemm_wins) else 0
    lines += ["", f"Supported by this run: `IN_GEMM_DEQUANT_MAX_ROWS = {rows_setting}` in fastlora/ops/qlora_linear.py "
              "(64 where the in-GEMM dequant beat dequantize-then-GEMM at every decode M measured, else 0)."]
    report.sections.append(("QLoRA (ms)", lines))


def stage_mixed(report: Report) -> None:
    """Mixed batches (issue 20's targets): 16 adapters, one per row round-robin, forward at
    decode and at M = 4096 (K = N = 4096; smoke: 64), fastlora's adapter_names against one
    adapter, a loop of single-adapter calls and PEFT's adapter_names."""
    from benchmarks import mixed_batch

    width = report.plan.speed[0].shape.K if report.smoke else 4096
    rows = []
    for M in (16, 64 if report.smoke else 4096):
        case = mixed_batch.run_case(M, 16, width, width, 16, report.device, report.dtype, 0.05)
        rows += case
        times = {row["provider"]: row["median_ms"] for row in case if row["status"] == "ok"}
        if {"fastlora", "one-adapter", "peft"} <= set(times):
            report.target(f"mixed batch, 16 adapters, M={M}: time vs one adapter", "<= 1.3x",
                          times["fastlora"] / times["one-adapter"], 1.3, at_most=True)
            report.target(f"mixed batch, 16 adapters, M={M}: speed-up vs PEFT adapter_names",
                          ">= 5x" if M == 16 else ">= 2x", times["peft"] / times["fastlora"], 5.0 if M == 16 else 2.0,
                          at_most=False)
    report.sections.append(("Mixed batches (ms, forward)", ["```", mixed_batch.format_table(rows), "```"]))


def stage_gpu_tests(report: Report) -> None:
    """pytest -m gpu tests/test_gpu.py, stopped when the budget runs out (5 s kept for the rest)."""
    timeout_s = max(10.0, report.budget_s - report.elapsed() - 5)
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, timeout=timeout_s)
        lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
        summary = lines[-1] if lines else f"pytest exited {result.returncode}"
        failures = [line for line in lines if line.startswith("FAILED")]
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        summary = f"timed out after {timeout_s:.0f} s; last output: {output.strip()[-300:]!r}"
        failures = []
    report.sections.append(("GPU tests", [f"`pytest -m gpu tests/test_gpu.py`: {summary}", "", *[f"- {f}" for f in failures]]))


def stage_end_to_end(report: Report) -> None:
    setup = end_to_end.SETUPS[(report.device, report.smoke)]
    rows = [row for p in (0.0, 0.1) for row in end_to_end.run_setup(setup, p, report.device, report.dtype,
                                                                     0.3 if report.smoke else 3.0)]
    report.sections.append(("End to end", ["```", end_to_end.format_table(rows), "```"]))


def supported_auto_table(report: Report) -> list[str]:
    """The AUTO_ON_CUDA table the measurements support: per shape class, fused or torch by
    the geometric mean of torch time / fused time over the cases measured in it."""
    speedups: dict[tuple[str, str], list[float]] = {}
    for case, rows in report.speed.items():
        speedups.setdefault(shape_class(case.shape.M, case.shape.r), []).append(ratio(rows, COMPOSED, FUSED))
    for s, rows in report.decode.items():
        speedups.setdefault(shape_class(s.M, s.r), []).append(ratio(rows, COMPOSED, FUSED))
    lines = ["```python", "AUTO_ON_CUDA = {"]
    for row, current in AUTO_ON_CUDA.items():
        values = speedups.get(row)
        if not values:
            lines.append(f"    {row!r}: {current!r},  # not measured in this run: kept")
            continue
        mean = math.exp(statistics.mean(math.log(v) for v in values))
        pick = "triton" if mean > 1.0 else "torch"
        move = f"; MOVE from {current!r}" if pick != current else ""
        lines.append(f"    {row!r}: {pick!r},  # torch / fused time {mean:.2f}x over {len(values)} cases{move}")
    return lines + ["}", "```"]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Report], None]
    predicted_s: float  # on an H100 / H200 from a cold Triton cache (benchmarks/NOTES.md)
    smoke_s: float  # on a 2-core CPU in smoke mode


STAGES = [
    Stage("environment", stage_environment, 5, 0.1),
    Stage("parity", stage_parity, 45, 10),
    Stage("speed", stage_speed, 110, 15),
    Stage("profile", stage_profile, 15, 1),
    Stage("decode-host", stage_decode_and_host, 20, 5),
    Stage("sweep", stage_sweep, 45, 5),
    Stage("saved", stage_saved, 5, 1),
    Stage("gpu-tests", stage_gpu_tests, 90, 15),
    Stage("dora", stage_dora, 40, 8),
    Stage("qlora", stage_qlora, 35, 8),
    Stage("mixed", stage_mixed, 20, 5),
    Stage("end-to-end", stage_end_to_end, 30, 10),
]


def run_stage(report: Report, stage: Stage) -> str:
    """Run one stage within the budget; its outcome for the stage table."""
    left = report.budget_s - report.elapsed()
    predicted = stage.smoke_s if report.smoke else stage.predicted_s
    if predicted > left:
        return f"skipped: predicted {predicted:.0f} s, {max(left, 0):.0f} s of the budget left"
    try:
        stage.run(report)
    except Exception as error:  # recorded, and the next stage runs
        where = traceback.extract_tb(error.__traceback__)[-1]
        return f"**failed**: {type(error).__name__}: {str(error).strip()[:200]} ({pathlib.Path(where.filename).name}:{where.lineno})"
    return "done"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds on a CPU")
    parser.add_argument("--budget", type=positive_float, default=480.0, help="seconds for the whole report (default 480)")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], default=None, help="default: all")
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the fused path runs on a CPU through Triton's interpreter only
        os.environ.setdefault("TRITON_INTERPRET", "1")
    name = device_name(device)
    stamp = datetime.date.today().isoformat()
    header = [f"# fastlora on {name}, {stamp}", "",
              f"torch {torch.__version__}, triton {triton_version() or '-'}, git {git_sha()}"
              f"{', smoke mode (tiny shapes)' if args.smoke else ''}. Times are medians "
              f"({'GPU time: CUDA-graph replay where capture works, else do_bench' if device == 'cuda' else 'CPU wall clock'}).", ""]
    report = Report(device=device, plan=smoke_plan() if args.smoke else full_plan(), smoke=args.smoke,
                    budget_s=args.budget, path=args.out_dir / f"{name}-{stamp}", header=header)
    chosen = [s for s in STAGES if args.stages is None or s.name in args.stages]
    for number, stage in enumerate(chosen, 1):
        before = report.elapsed()
        outcome = run_stage(report, stage)
        seconds = f"{report.elapsed() - before:.1f}"
        report.outcomes.append((stage.name, outcome, seconds))
        report.write()
        print(f"[{number}/{len(chosen)}] {stage.name}: {outcome} in {seconds} s; {report.elapsed():.0f} of "
              f"{report.budget_s:.0f} s used", flush=True)
    report.sections.append(("AUTO_ON_CUDA supported by this run", [
        "Commit this table (fastlora/_backend.py) together with this report's files:", "", *supported_auto_table(report)]))
    report.write()
    print(report.markdown())
    print(f"wrote {report.path}.md (and .csv, .png where those stages ran)")
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
