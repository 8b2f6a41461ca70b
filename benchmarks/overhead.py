"""Host cost per call: microseconds of host time and launches per eager forward + backward.

    python -m benchmarks.overhead            # CUDA when present, else CPU
    python -m benchmarks.overhead --device cpu --repeats 200

On small, launch-bound layers (M=16, K=N=256, r=16, dropout 0 and 0.1) the time of an eager
fwd+bwd is the host's: Python, autograd, dispatch, launches. On CUDA: wall time of ``repeats``
calls queued back to back (synchronised once at the end; the GPU work of one call is a few
microseconds, so the queue never fills), and the number of CUDA kernels one call launches
(profiler). On CPU: wall time per call, and the number of ATen operators one call
dispatches (the C++ backend's kernel counts as one). Providers: ``base`` (frozen nn.Linear),
``peft``, and fastlora on each backend that runs here. Rows are appended to
benchmarks/out/<device>-overhead.csv (git-ignored; --csv picks another file).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import harness
from benchmarks.providers import Shape, build, make_weights, provider_names
from benchmarks.run import LOCAL_RESULTS, append_csv, device_name, git_sha, triton_version

SHAPES = [Shape(16, 256, 256, 16, 0.0, bias=False), Shape(16, 256, 256, 16, 0.1, bias=False)]
COLUMNS = ["timestamp", "git_sha", "device", "torch", "triton", "provider", "M", "K", "N", "r", "dropout",
           "host_us", "host_us_p20", "host_us_p80", "launches", "launch_kind"]


class _OperatorCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_operators(call: Callable[[], object]) -> int:
    """ATen operators (and custom ops) dispatched by one call."""
    with _OperatorCounter() as counter:
        call()
    return counter.count


def host_microseconds(call: Callable[[], object], device: str, repeats: int, rounds: int = 7) -> list[float]:
    """Per-call wall time (us) of ``repeats`` back-to-back calls, ``rounds`` times."""
    for _ in range(10):
        call()
    results = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        results.append((time.perf_counter() - started) / repeats * 1e6)
        if device == "cuda":
            torch.cuda.synchronize()
    return results


def providers_here(device: str) -> list[str]:
    names = [n for n in provider_names(device) if n not in ("reference", "reference-compiled")]
    if device == "cuda" and "fastlora-triton" not in names:
        names.append("fastlora-triton")
    return names


def measure(shape: Shape, name: str, device: str, dtype: torch.dtype, repeats: int) -> dict:
    module = build(name, make_weights(shape, dtype, device), shape.dropout)
    x = torch.randn(shape.M, shape.K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape.M, shape.N, device=device, dtype=dtype)

    def call() -> None:
        module(x).backward(dy)

    median, p20, p80 = harness.quantiles(host_microseconds(call, device, repeats))
    if device == "cuda":
        launches, kind = harness.kernel_count(call, device), "cuda kernels"
    else:
        launches, kind = aten_operators(call), "aten operators"
    return {"provider": name, "M": shape.M, "K": shape.K, "N": shape.N, "r": shape.r, "dropout": shape.dropout,
            "host_us": median, "host_us_p20": p20, "host_us_p80": p80, "launches": launches, "launch_kind": kind}


def format_table(rows: list[dict]) -> str:
    lines = [f"{'p':>4} {'provider':<16} {'host us / fwd+bwd':>18} {'p20':>8} {'p80':>8} {'launches':>9}", "-" * 68]
    for row in rows:
        lines.append(f"{row['dropout']:>4} {row['provider']:<16} {row['host_us']:>18.1f} {row['host_us_p20']:>8.1f} "
                     f"{row['host_us_p80']:>8.1f} {row['launches']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=100, help="calls per timed round")
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--csv", type=pathlib.Path, default=None, help="default: benchmarks/out/<device>-overhead.csv")
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = device_name(device)
    meta = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha(), "device": name, "torch": torch.__version__, "triton": triton_version()}
    print(f"device {name}, {str(dtype).removeprefix('torch.')}: host time per eager forward + backward, "
          f"M=16, K=N=256, r=16 ({'CUDA kernels' if device == 'cuda' else 'ATen operators'} per call)")
    rows = [{**measure(shape, provider, device, dtype, args.repeats), **meta}
            for shape in SHAPES for provider in (args.providers or providers_here(device))]
    print(format_table(rows))
    path = args.csv or LOCAL_RESULTS / f"{name}-overhead.csv"
    append_csv(path, rows, COLUMNS)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
