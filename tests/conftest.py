"""Test setup: Triton kernels run through the interpreter on a machine without CUDA.

TRITON_INTERPRET must be set before any kernel is decorated, and CUBLAS_WORKSPACE_CONFIG before
cuBLAS's first call, so both are set here, before any test module imports fastlora.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# cuBLAS under torch.use_deterministic_algorithms(True) raises unless this is set before its
# first call (tests/test_gpu.py's deterministic test; the README says what a user sets)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
