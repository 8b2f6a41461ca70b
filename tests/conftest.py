"""Test setup: Triton kernels run through the interpreter on a machine without CUDA.

TRITON_INTERPRET must be set before any kernel is decorated, so it is set here, before
fastlora is imported by any test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
