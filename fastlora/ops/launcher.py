"""Launching fastlora's Triton kernels: one config per kernel and shape class, chosen once.

For each launch the caller gives the kernel, its arguments, a key (the kernel's name, a
bucketed M, the other sizes, dtypes and flags) and an ordered list of candidate configs from
``fastlora.kernels.configs`` (the measured best first, a small one that fits any GPU last).

- The first launch of a key tries the candidates in order. A config that fails to compile or
  to fit (``OutOfResources``, ptxas errors, any error raised before the kernel runs) is
  dropped for that key and the next one runs; only when none runs does the caller get a
  ``TritonPieceError`` (a ``RuntimeError``) naming the kernel, the shape, the dtypes and every
  config's error, on which ``auto`` moves the op's shape class to the torch path.
- With ``FASTLORA_AUTOTUNE=1`` on a GPU, kernels marked tunable (pure writes, safe to run
  repeatedly) time every candidate that runs and keep the fastest; the choice is written to
  ``$XDG_CACHE_HOME/fastlora/tuning-<gpu>-triton<version>.json`` and read back by later
  processes. Without it the order of the candidates is the rule: no timing, no tuning.
- Later launches of a key take the chosen config from a dict: no autotuner, no re-tuning for
  a new M in the same bucket (the kernels do not specialise on M).
- While torch.compile traces (no real tensors to launch on), the chosen config is used if
  there is one, else the first candidate whose estimated shared memory fits the device.
- A first launch of a key during CUDA-graph capture raises ``RuntimeError`` asking for a
  warm-up (the driver cannot load a module then). Arguments that change with M within a key
  (split counts, split buffers' strides) are ``do_not_specialize`` in the kernels, so a warmed-up
  key never meets a new variant during capture.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Sequence

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from fastlora._backend import TritonPieceError
from fastlora.kernels.configs import estimated_shared_bytes, interpreting

Grid = Callable[[dict], tuple[int, ...]]

# key -> chosen config (the key starts with the kernel's name)
_chosen: dict[tuple, triton.Config] = {}
_disk: dict[str, dict] = {}


def m_bucket(M: int) -> int:
    """M rounded up to a power of two, at least 16: configs are chosen per bucket, not per M."""
    return max(16, 1 << max(0, M - 1).bit_length())


def config_kwargs(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def describe_config(config: triton.Config) -> str:
    blocks = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks}, num_warps={config.num_warps}, num_stages={config.num_stages}"


Args = Sequence | Callable[[dict], Sequence]


def _run(kernel, grid: Grid, args: Args, meta: dict, config: triton.Config) -> None:
    """One launch; ``args`` may be a function of the config's blocks (TMA descriptors).

    Only a launch that torch.compile traces goes through ``wrap_triton``; an eager one calls the
    kernel itself (torch 2.11's ``wrap_triton`` refuses the interpreter's kernels)."""
    launch_grid = grid(config.kwargs)
    arguments = args(config.kwargs) if callable(args) else args
    launchable = wrap_triton(kernel) if torch.compiler.is_compiling() else kernel
    launchable[launch_grid](*arguments, **meta, **config_kwargs(config))


def tracing(tensor: torch.Tensor) -> bool:
    """torch.compile (or any tracer with fake tensors) is tracing: nothing can run yet."""
    return torch.compiler.is_compiling() or is_fake(tensor)


def tuning_enabled() -> bool:
    return os.environ.get("FASTLORA_AUTOTUNE", "0") == "1" and not interpreting()


def tuning_cache_path() -> pathlib.Path:
    """The per-GPU, per-Triton-version file of tuned choices."""
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "fastlora"
    gpu = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    return cache / f"tuning-{gpu}-triton{triton.__version__}.json"


def _disk_choices() -> dict:
    path = str(tuning_cache_path())
    if path not in _disk:
        try:
            _disk[path] = json.loads(pathlib.Path(path).read_text())
        except (OSError, ValueError):
            _disk[path] = {}
    return _disk[path]


def _remember_on_disk(key: tuple, config: triton.Config) -> None:
    choices = _disk_choices()
    choices[repr(key)] = config_kwargs(config)
    path = tuning_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(choices, indent=1, sort_keys=True))
    temporary.replace(path)


def _from_disk(key: tuple, candidates: Sequence[triton.Config]) -> triton.Config | None:
    saved = _disk_choices().get(repr(key))
    return next((c for c in candidates if saved == config_kwargs(c)), None)


_INTERPRETER_SMS = 4  # the CPU under TRITON_INTERPRET=1: a small count, so that splits are exercised
_multiprocessors: dict[torch.device, int] = {}


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (queried once per device, never at import)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    if device not in _multiprocessors:
        _multiprocessors[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _multiprocessors[device]


def _device_shared_bytes(device: torch.device) -> int:
    properties = torch.cuda.get_device_properties(device)
    return getattr(properties, "shared_memory_per_block_optin", 0) or 48 * 1024


def fitting_first(candidates: Sequence[triton.Config], device: torch.device, element_bytes: int,
                  adapter_bytes: int = 0) -> list[triton.Config]:
    """The candidates whose estimated shared memory (with the GEMMs' epilogue tiles when
    ``adapter_bytes`` is given) fits the device first, in their order, then the others: no
    compile is spent on a config known not to fit."""
    if device.type != "cuda":
        return list(candidates)
    limit = _device_shared_bytes(device)
    fits = [c for c in candidates if estimated_shared_bytes(c, element_bytes, adapter_bytes) <= limit]
    return fits + [c for c in candidates if c not in fits]


def _time(kernel, grid: Grid, args: Args, meta: dict, config: triton.Config) -> float:
    import triton.testing

    return triton.testing.do_bench(lambda: _run(kernel, grid, args, meta, config), warmup=5, rep=20)


def launch(
    kernel,
    grid: Grid,
    args: Args,
    meta: dict,
    key: tuple,
    configs: Callable[[], Sequence[triton.Config]],
    describe: Callable[[], str],
    tunable: bool = False,
    like: torch.Tensor | None = None,
    adapter_bytes: int = 0,
) -> None:
    """Launch ``kernel[grid(config)](*args, **meta, **config)`` with the config chosen for ``key``.

    ``args`` is the kernel's arguments, or a function of the config's blocks giving them;
    ``configs()`` lists the candidates (called only when ``key`` has no choice yet);
    ``describe()`` gives the shape and dtypes for the error raised when no candidate runs;
    ``tunable``: the kernel only writes its outputs, so it may be run repeatedly to time it;
    ``like``: the tensor whose device and element size the configs are sized for (default: the
    first tensor argument); ``adapter_bytes``: the adapters' element size, for a GEMM whose
    rank-r epilogue tiles count in its shared memory.
    """
    config = _chosen.get(key)
    tensor = like if like is not None else next(a for a in args if isinstance(a, torch.Tensor))
    if tracing(tensor):  # nothing runs yet: the chosen config, or the first that should fit, goes in the graph
        _run(kernel, grid, args, meta,
             config or fitting_first(configs(), tensor.device, tensor.element_size(), adapter_bytes)[0])
        return
    if config is not None:
        try:
            _run(kernel, grid, args, meta, config)
            return
        except Exception:  # e.g. a new specialisation of the same key that does not fit
            del _chosen[key]
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"fastlora: the first launch of {key[0]} for {describe()} came during CUDA-graph capture, where the "
            "driver cannot load a new kernel; run the model once on this shape (a warm-up) before capturing"
        )
    candidates = [c for c in configs() if config is None or config_kwargs(c) != config_kwargs(config)]
    candidates = fitting_first(candidates, tensor.device, tensor.element_size(), adapter_bytes)
    errors = []
    runnable = []
    saved = _from_disk(key, candidates) if tunable and tuning_enabled() else None
    for config in ([saved] if saved is not None else []) + [c for c in candidates if c is not saved]:
        try:
            _run(kernel, grid, args, meta, config)
        except Exception as error:  # compile / resource / ptxas failures: drop this config
            errors.append(f"  {describe_config(config)}: {type(error).__name__}: {str(error).strip()[:300]}")
            continue
        runnable.append(config)
        if saved is not None or not (tunable and tuning_enabled()):
            break
    if not runnable:
        raise TritonPieceError(
            f"fastlora: no launch configuration of {key[0]} runs on this device for {describe()}; "
            "tried:\n" + "\n".join(errors)
        )
    choice = runnable[0]
    if len(runnable) > 1:  # tuning: every runnable candidate wrote the same outputs
        choice = min(runnable, key=lambda c: _time(kernel, grid, args, meta, c))
        _remember_on_disk(key, choice)
    _chosen[key] = choice


def chosen_configs() -> dict[tuple, triton.Config]:
    """The configs chosen so far in this process, by key (for reports and tests)."""
    return dict(_chosen)


def forget_choices() -> None:
    """Drop every in-memory choice (tests; the disk cache stays)."""
    _chosen.clear()
    _disk.clear()
