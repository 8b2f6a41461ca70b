"""The C++ CPU backend: its dropout mask equals the Triton kernels' element for element, it is
built in CI, and it steps aside cleanly (one warning, the PyTorch path) when it cannot be built."""

import os
import subprocess
import sys

import pytest
import torch

import fastlora
from fastlora.ops import cpp_ops
from lora_cases import available_backends, observe_keep_mask

BACKENDS = available_backends("cpu")
needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not available here")


def test_cpp_backend_is_built_in_ci():
    if not os.environ.get("CI") or os.environ.get("FASTLORA_DISABLE_EXT") == "1":
        pytest.skip("only CI promises a compiler and ninja")
    assert cpp_ops.unavailable_reason() is None


@needs_cpp
@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("shape", [(70, 77), (3, 5, 40), (1, 1), (33, 256), (5, 301)])
@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_cpp_mask_equals_triton_mask(shape, dropout_p):
    masks = {}
    for backend in ("cpp", "triton"):
        with fastlora.use_backend(backend):
            masks[backend] = observe_keep_mask(shape, dropout_p, seed=2024)
    assert torch.equal(masks["cpp"], masks["triton"])
    if masks["cpp"].numel() > 1:
        assert not masks["cpp"].all() and masks["cpp"].any()


@needs_cpp
def test_auto_picks_cpp_on_cpu():
    from fastlora import _backend

    with fastlora.use_backend("auto"):
        assert _backend.resolve(torch.device("cpu")) == "cpp"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the extension's state is per process)."""
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)


CHECK_FALLBACK = """
import warnings, torch, fastlora
from fastlora import _backend
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with fastlora.use_backend("auto"):
        assert _backend.resolve(torch.device("cpu")) == "torch"
        layer = fastlora.Linear(8, 4, r=2)
        layer(torch.randn(3, 8)).sum().backward()
    with fastlora.use_backend("cpp"):
        try:
            layer(torch.randn(3, 8))
        except RuntimeError as error:
            print("RAISED:", error)
print("WARNINGS:", len([w for w in caught if "fastlora" in str(w.message)]))
"""


def test_disabled_extension_falls_back_to_torch():
    result = run_python(CHECK_FALLBACK, FASTLORA_DISABLE_EXT="1", FASTLORA_BACKEND="auto")
    assert result.returncode == 0, result.stderr
    assert "RAISED: fastlora backend 'cpp' cannot run" in result.stdout
    assert "FASTLORA_DISABLE_EXT=1" in result.stdout


def test_missing_compiler_warns_once_and_falls_back_to_torch(tmp_path):
    result = run_python(CHECK_FALLBACK, CXX=str(tmp_path / "no-such-compiler"), XDG_CACHE_HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "RAISED: fastlora backend 'cpp' cannot run: no C++ compiler" in result.stdout
    assert "WARNINGS: 1" in result.stdout


CHECK_CPP_RUNS = """
import torch, fastlora
from fastlora.ops import cpp_ops
assert cpp_ops.unavailable_reason() is None, cpp_ops.unavailable_reason()
with fastlora.use_backend("cpp"):
    fastlora.Linear(8, 4, r=2)(torch.randn(3, 8)).sum().backward()
print("LIBRARY:", cpp_ops.build_dir())
"""


def tree(root) -> dict:
    """Every file under ``root`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@needs_cpp
def test_killed_build_read_only_cache_and_unwritable_cache(tmp_path):
    """A build killed halfway (its folder and torch's lock left behind) does not hang the next
    process; a finished build is loaded as it is, writing nothing; an unwritable cache warns
    and falls back to the PyTorch path."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    final = run_python("from fastlora.ops import cpp_ops; print(cpp_ops.build_dir())", **env).stdout.strip()
    stale = tmp_path / "cache" / "fastlora" / final.rsplit("/", 1)[-1]
    stale.mkdir(parents=True)
    (stale / "lock").write_text("")  # what torch's FileBaton leaves when its build is killed
    (stale / "build.ninja").write_text("")
    built = run_python(CHECK_CPP_RUNS, **env)
    assert built.returncode == 0, built.stderr
    assert "compiling" in built.stderr and (stale / "fastlora_cpu.so").is_file() and not (stale / "lock").exists()

    before = tree(tmp_path / "cache")
    (tmp_path / "cache").chmod(0o555)
    try:
        again = run_python(CHECK_CPP_RUNS, **env)
    finally:
        (tmp_path / "cache").chmod(0o755)
    assert again.returncode == 0, again.stderr
    assert "compiling" not in again.stderr and tree(tmp_path / "cache") == before

    (tmp_path / "file").write_text("")
    unwritable = run_python(CHECK_FALLBACK, XDG_CACHE_HOME=str(tmp_path / "file" / "cache"))
    assert unwritable.returncode == 0, unwritable.stderr
    assert "RAISED: fastlora backend 'cpp' cannot run: the cache folder" in unwritable.stdout
    assert "not writable" in unwritable.stdout and "WARNINGS: 1" in unwritable.stdout


CHECK_THREADS = """
import torch, fastlora
torch.set_num_threads({threads})
g = torch.Generator().manual_seed(0)
M, K, N, r = 700, 96, 80, 8
x = torch.randn(M, K, generator=g, requires_grad=True)
W = torch.randn(N, K, generator=g)
b = torch.randn(N, generator=g, requires_grad=True)
A = torch.randn(r, K, generator=g, requires_grad=True)
B = torch.randn(N, r, generator=g, requires_grad=True)
with fastlora.use_backend("cpp"):
    torch.manual_seed(3)
    y = fastlora.lora_linear(x, W, b, A, B, 0.5, 0.1, True)
    y.backward(torch.randn(M, N, generator=g))
torch.save([t.detach() for t in (y, x.grad, A.grad, B.grad, b.grad)], {path!r})
"""


@needs_cpp
def test_results_do_not_depend_on_the_thread_count(tmp_path):
    """dx, dA, dB and dbias (and y) are bitwise equal on 1, 2 and 4 threads: the partial sums
    follow fixed row chunks, not the threads."""
    results = []
    for threads in (1, 2, 4):
        path = tmp_path / f"threads{threads}.pt"
        run = run_python(CHECK_THREADS.format(threads=threads, path=str(path)))
        assert run.returncode == 0, run.stderr
        results.append(torch.load(path))
    for other in results[1:]:
        for name, a, b in zip(("y", "dx", "dA", "dB", "dbias"), results[0], other):
            assert torch.equal(a, b), name


CHECK_COMPILE_FIRST = """
import torch, fastlora
layer = fastlora.Linear(16, 8, r=4, lora_dropout=0.1)
def step(x):
    return layer(x).square().mean()
with fastlora.use_backend("cpp"):
    explanation = torch._dynamo.explain(step)(torch.randn(4, 16))
print("BREAKS:", explanation.graph_break_count, [str(b.reason)[:80] for b in explanation.break_reasons])
"""


@needs_cpp
def test_compiling_before_any_eager_call_never_traces_into_the_build():
    """In a fresh process the first use of the cpp backend is inside torch.compile: the
    extension is loaded outside tracing, so the graph has no break (there were 16, on os.stat,
    uname and mkdir, when dynamo traced into the build)."""
    result = run_python(CHECK_COMPILE_FIRST)
    assert result.returncode == 0, result.stderr
    assert "BREAKS: 0 []" in result.stdout, result.stdout
