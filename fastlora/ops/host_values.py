"""Small per-call constants (a layer's scalings, dropout rates, a batch's adapter positions) as
device tensors, without a host-device sync.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which makes the host wait
for the device's queue: once per layer and call, that is a sync in every forward (and breaks a
CUDA-graph capture). ``on_device`` keeps each distinct tuple's tensor (they repeat: every step
of a generation, every layer with the same adapters) and makes a new one from pinned memory
without waiting.
"""

from __future__ import annotations

import torch

_CACHE: dict[tuple, torch.Tensor] = {}
CACHE_SIZE = 256


def on_device(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a 1-D ``dtype`` tensor on ``device``, shared by equal requests: read it only."""
    key = (values, dtype, device)
    tensor = _CACHE.get(key)
    if tensor is None:
        tensor = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        else:
            tensor = tensor.to(device)
        if len(_CACHE) >= CACHE_SIZE:
            _CACHE.clear()
        _CACHE[key] = tensor
    return tensor
