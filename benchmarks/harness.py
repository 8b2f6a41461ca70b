"""Measuring one provider on one shape: correctness gate, timing, memory, kernel count.

Modes: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (backward alone:
each timed backward runs on a fresh graph whose forward ran untimed just before, so no
provider needs ``retain_graph``, which compiled backwards with donated buffers refuse),
``full`` (forward + backward). The providers of one case are timed interleaved
(``time_interleaved``): round after round, one sample of each, so a burst of load on a shared
machine lands on every provider alike; a provider's times are the median (p20 / p80) and the
minimum of its rounds, and a ratio between two providers is the median of their per-round
ratios. A sample is one call on a CPU (``time.perf_counter``), ``triton.testing.do_bench``
over ~20 ms on CUDA (CUDA graphs for M <= 16 forward), or CUDA events around backwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import torch
import torch.nn as nn

from benchmarks.providers import Shape

MODES = ("fwd", "bwd", "full")


def flops(shape: Shape, mode: str, lora: bool) -> float:
    """Useful floating-point operations of one call (frozen W: no dW)."""
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    forward = 2 * M * K * N + (2 * M * K * r + 2 * M * N * r if lora else 0)
    backward = 2 * M * N * K + (4 * M * N * r + 4 * M * K * r if lora else 0)
    return {"fwd": forward, "bwd": backward, "full": forward + backward}[mode]


def quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples_ms)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    cuts = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), cuts[1], cuts[7]


def summarize(samples_ms: list[float]) -> dict:
    """median_ms, p20_ms, p80_ms, min_ms and rounds of one provider's per-round samples."""
    median, p20, p80 = quantiles(samples_ms)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "min_ms": min(samples_ms), "rounds": len(samples_ms)}


def paired_ratio(samples_ms: list[float], peer_samples_ms: list[float]) -> float:
    """The median over rounds of one provider's time over its peer's in the same round: a
    burst of load that slows one round slows both sides of its ratio."""
    return statistics.median(ours / theirs for ours, theirs in zip(samples_ms, peer_samples_ms))


def time_cpu(fn: Callable[[], object], budget_s: float, min_repeats: int = 3, max_repeats: int = 50) -> tuple[float, float, float]:
    fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles(samples)


def time_cuda(fn: Callable[[], object], use_graph: bool, rep_ms: int = 100) -> tuple[float, float, float, str]:
    """Median, p20, p80 (ms) and the timer used: ``do_bench_cudagraph`` where asked and capture
    works, else ``do_bench``; each repeats ``fn`` for about ``rep_ms``."""
    import triton.testing

    if use_graph:
        try:
            median, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return median, p20, p80, "cudagraph"
        except Exception:  # capture can fail (e.g. a provider that syncs); fall back to events
            pass
    median, p20, p80 = triton.testing.do_bench(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80, "do_bench"


def time_call(fn: Callable[[], object], device: str) -> float:
    """Milliseconds of one call, timed alone (CUDA events, the device synchronised around it)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def time_interleaved(samplers: dict[str, Callable[[], float]], budget_s: float, warmup: int = 3,
                     min_rounds: int = 5, max_rounds: int = 50) -> dict[str, list[float]]:
    """Samples (ms) per name, round by round: ``warmup`` untimed samples each, then rounds of one
    sample per name in an order rotated each round, until ``budget_s`` is spent (at least
    ``min_rounds``, at most ``max_rounds`` rounds). Sample ``i`` of every name comes from round
    ``i``, so load on a shared machine lands on all of them alike (see ``paired_ratio``)."""
    for sample in samplers.values():
        for _ in range(warmup):
            sample()
    names = list(samplers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - started < budget_s):
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            samples[name].append(samplers[name]())
        rounds += 1
    return samples


def mode_function(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str) -> Callable[[], object]:
    """The call timed in ``fwd`` or ``full`` mode (``bwd`` is timed by ``backward_sample``)."""
    def forward():
        return module(x)

    def full():
        module(x).backward(dy)

    return {"fwd": forward, "full": full}[mode]


def backward_sample(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, device: str, repeats: int) -> float:
    """Median ms of ``repeats`` timed ``y.backward(dy)`` calls, each on a fresh graph whose
    forward ran untimed just before (no ``retain_graph``, which compiled backwards refuse)."""
    times = []
    for _ in range(repeats):
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x)
        times.append(time_call(partial(y.backward, dy), device))
    return statistics.median(times)


def sampler(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str, device: str,
            use_graph: bool) -> tuple[Callable[[], float], str]:
    """One provider's timing sample in one mode (a function returning ms) and its timer's name.

    CPU: one call (``bwd``: one backward) by ``time.perf_counter``. CUDA: ``fwd`` / ``full`` the
    median of ``triton.testing.do_bench`` over ~20 ms (CUDA graphs where ``use_graph`` and
    capture works), ``bwd`` the median of 10 backwards by CUDA events."""
    if mode == "bwd":
        repeats = 10 if device == "cuda" else 1
        timer = "cuda-events" if device == "cuda" else "perf_counter"
        return partial(backward_sample, module, x, dy, device, repeats), timer
    fn = mode_function(module, x, dy, mode)
    if device != "cuda":
        return partial(time_call, fn, device), "perf_counter"
    timer = time_cuda(fn, use_graph=use_graph, rep_ms=20)[3]
    return (lambda: time_cuda(fn, use_graph=timer == "cudagraph", rep_ms=20)[0]), timer


def launches(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str, device: str) -> float:
    """CUDA kernels one call of ``mode`` launches (``bwd``: full minus forward); NaN on CPU."""
    if mode == "bwd":
        return (kernel_count(mode_function(module, x, dy, "full"), device)
                - kernel_count(mode_function(module, x, dy, "fwd"), device))
    return kernel_count(mode_function(module, x, dy, mode), device)


def steady_cpu_allocator() -> bool:
    """Fix glibc's malloc thresholds for this process: freed blocks below 32 MiB stay in the
    heap to be reused. glibc otherwise moves its mmap threshold as the process frees blocks, so
    a provider's large temporaries are mapped, zeroed by page faults and unmapped on some calls
    and not on others, depending on what ran before: PEFT's DoRA forward at M = 16 measured 9 or
    18 ms from one run to the next. Returns whether it took (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))


def idle_cores(window_s: float = 0.5) -> int:
    """Cores left idle by the rest of the machine over ``window_s`` (Linux's /proc/stat), at
    least 1; every core where that cannot be read. The CPU suite runs this many threads: an
    OpenMP GEMM with a thread on a core another process keeps busy waits for that thread at every
    barrier, which moves CPU timings by 2-5x from one call to the next."""
    cores = os.cpu_count() or 1

    def idle_and_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    try:
        idle_before, total_before = idle_and_total()
        time.sleep(window_s)
        idle_after, total_after = idle_and_total()
    except (OSError, ValueError, IndexError):
        return cores
    idle_share = (idle_after - idle_before) / max(total_after - total_before, 1)
    return max(1, min(cores, int(idle_share * cores + 0.25)))


def first_call_seconds(call: Callable[[], object], device: str) -> float:
    """Wall seconds of ``call()`` (the first forward + backward of a new shape: compiles,
    config choices), the device synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def saved_bytes(forward: Callable[[], object], alive: Iterable[torch.Tensor]) -> int:
    """Bytes autograd saves for backward while ``forward()`` runs, beyond the tensors ``alive``
    anyway (the input, the parameters), counting each storage once."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    for t in alive:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a block: torch 2.13's profiler (kineto) writes two
    log lines there per profile, which would litter every benchmark table. Python exceptions
    still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_memory_bytes(run: Callable[[], object]) -> float:
    """Peak bytes of the tensors ``run()`` creates (alive at once), from the profiler's memory
    timeline (``torch.profiler`` with ``profile_memory``); NaN where this torch has none."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action
    except ImportError:
        return float("nan")
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                 with_stack=True) as prof:
        run()
    created: dict = {}
    alive = peak = 0
    for _, action, key, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            created[key] = size
            alive += size
        elif action == Action.DESTROY and key in created:
            alive -= created.pop(key)
        peak = max(peak, alive)
    return float(peak)


def peak_memory_bytes(run: Callable[[], object], device: str) -> float:
    """Peak bytes allocated while ``run()`` executes above what was allocated before: the
    CUDA allocator's peak on a GPU, the profiler's memory timeline on a CPU."""
    if device != "cuda":
        return cpu_peak_memory_bytes(run)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before)


def kernel_count(fn: Callable[[], object], device: str) -> float:
    """CUDA kernels one call launches (from the profiler); NaN on CPU."""
    if device != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return float(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))


def check_against_reference(module: nn.Module, reference: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> str | None:
    """Compare output and input gradient with dropout off (eval mode); None when they agree."""
    tolerance = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}[x.dtype]
    results = []
    for m in (module, reference):
        m.eval()
        xi = x.detach().clone().requires_grad_(True)
        y = m(xi)
        y.backward(dy)
        results.append((y.detach().float(), xi.grad.float()))
        m.train()
    for name, ours, ref in zip(("y", "dx"), results[0], results[1]):
        err = (ours - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
        if not err <= tolerance:
            return f"{name} relative error {err:.2e} > {tolerance:.0e}"
    return None
