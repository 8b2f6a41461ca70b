"""Shared test helpers: LoRA inputs, running the op with gradients, the 2x-error rule."""

from __future__ import annotations

import dataclasses

import torch

import fastlora
import fastlora.reference as reference
from fastlora import _backend
from fastlora.ops.lora_linear import saved_keep_mask


def available_backends(device: str = "cpu") -> list[str]:
    """The concrete backends that can run on ``device`` here (torch always can)."""
    names = []
    for name in ("torch", "triton", "cpp"):
        with fastlora.use_backend(name):
            try:
                _backend.resolve(torch.device(device))
            except RuntimeError:
                continue
        names.append(name)
    return names


@dataclasses.dataclass
class Case:
    M: int
    K: int
    N: int
    r: int
    bias: bool = True
    dropout_p: float = 0.0
    fan_in_fan_out: bool = False
    batch: int | None = None  # x is (batch, M, K) when set
    strided: bool = False  # x is a non-contiguous view
    dtype: torch.dtype = torch.float32
    adapter_dtype: torch.dtype | None = None  # None: x's dtype

    def __str__(self) -> str:
        parts = [f"M{self.M}K{self.K}N{self.N}r{self.r}", str(self.dtype).removeprefix("torch.")]
        if self.bias:
            parts.append("bias")
        if self.dropout_p:
            parts.append(f"p{self.dropout_p}")
        if self.fan_in_fan_out:
            parts.append("fifo")
        if self.batch:
            parts.append(f"3d{self.batch}")
        if self.strided:
            parts.append("strided")
        if self.adapter_dtype:
            parts.append("adapters-" + str(self.adapter_dtype).removeprefix("torch."))
        return "-".join(parts)


def small_inputs(M=6, K=8, N=5, r=2, dtype=torch.float32, adapter_dtype=None) -> dict:
    """Small leaf tensors for lora_linear's edge tests: x, bias, lora_A, lora_B require grad."""
    g = torch.Generator().manual_seed(0)
    adapter_dtype = adapter_dtype or dtype
    return dict(
        x=torch.randn(M, K, generator=g).to(dtype).requires_grad_(),
        weight=torch.randn(N, K, generator=g).to(dtype),
        bias=torch.randn(N, generator=g).to(dtype).requires_grad_(),
        lora_A=torch.randn(r, K, generator=g).to(adapter_dtype).requires_grad_(),
        lora_B=torch.randn(N, r, generator=g).to(adapter_dtype).requires_grad_(),
    )


def make_inputs(case: Case, seed: int = 0, device: str = "cpu") -> dict:
    """Leaf tensors for a case: x, weight (frozen), bias, lora_A, lora_B, all float64 masters."""
    g = torch.Generator().manual_seed(seed)
    lead = (case.batch, case.M) if case.batch else (case.M,)
    if case.strided:
        x = torch.randn(*lead, 2 * case.K + 3, generator=g, dtype=torch.float64)[..., 1 : 2 * case.K + 1 : 2]
    else:
        x = torch.randn(*lead, case.K, generator=g, dtype=torch.float64)
    w = torch.randn(case.N, case.K, generator=g, dtype=torch.float64) / case.K**0.5
    if case.fan_in_fan_out:
        w = w.t().contiguous()
    return {
        "x": x.to(device),
        "weight": w.to(device),
        "bias": (torch.randn(case.N, generator=g, dtype=torch.float64) if case.bias else None),
        "lora_A": torch.randn(case.r, case.K, generator=g, dtype=torch.float64) / case.K**0.5,
        "lora_B": torch.randn(case.N, case.r, generator=g, dtype=torch.float64) / case.r**0.5,
        "dy": torch.randn(*lead, case.N, generator=g, dtype=torch.float64),
        "scaling": 2.0 / case.r**0.5,
    }


def cast_inputs(inputs: dict, case: Case, dtype: torch.dtype | None = None, device: str = "cpu") -> dict:
    """Inputs in ``dtype`` (default: the case's), adapters in the case's adapter dtype."""
    dtype = dtype or case.dtype
    adapter_dtype = case.adapter_dtype or dtype
    if dtype == torch.float64:
        adapter_dtype = torch.float64
    x = inputs["x"]
    if case.strided:
        x = strided_copy(x, dtype, device)
    else:
        x = leaf(x, dtype, device)

    def adapter(t):
        return leaf(t, adapter_dtype, device).requires_grad_(True)

    return {
        "x": x.requires_grad_(True),
        "weight": leaf(inputs["weight"], dtype, device),
        "bias": None if inputs["bias"] is None else leaf(inputs["bias"], dtype, device).requires_grad_(True),
        "lora_A": adapter(inputs["lora_A"]),
        "lora_B": adapter(inputs["lora_B"]),
        "dy": leaf(inputs["dy"], dtype, device),
        "scaling": inputs["scaling"],
    }


def leaf(t: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A fresh leaf copy of ``t`` (never the master tensor itself)."""
    return t.detach().to(device=device, dtype=dtype).clone()


def strided_copy(x: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A non-contiguous tensor equal to x: every other column of a wider buffer."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=dtype, device=device)
    wide[..., 1::2] = x.to(device=device, dtype=dtype)
    view = wide[..., 1::2]
    assert not view.is_contiguous()
    return view.detach()


def run(fn, t: dict, case: Case, **kwargs) -> dict:
    """Forward and backward of ``fn`` (lora_linear's signature); returns y and every gradient."""
    y = fn(
        t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scaling"],
        case.dropout_p, True, case.fan_in_fan_out, **kwargs,
    )
    y.backward(t["dy"])
    out = {"y": y.detach(), "dx": t["x"].grad, "dA": t["lora_A"].grad, "dB": t["lora_B"].grad}
    if t["bias"] is not None:
        out["dbias"] = t["bias"].grad
    return out


def observe_keep_mask(shape: tuple[int, ...], dropout_p: float, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The keep-mask lora_linear draws for x of ``shape`` after ``torch.manual_seed(seed)``.

    A real call at a small rank (r = 4, N = 16: the configs real calls launch, never rank K)
    whose keep bits are read back; tests/test_op_behaviour.py checks them against what the
    output and dx show.
    """
    K = shape[-1]
    x = torch.ones(shape, dtype=dtype, device=device)
    lora_A = torch.ones(4, K, dtype=dtype, device=device, requires_grad=True)
    weight = torch.zeros(16, K, dtype=dtype, device=device)
    lora_B = torch.zeros(16, 4, dtype=dtype, device=device)
    torch.manual_seed(seed)
    y = fastlora.lora_linear(x, weight, None, lora_A, lora_B, 1.0, dropout_p, True)
    return saved_keep_mask(y).view(shape)


def reference_results(
    inputs: dict, case: Case, dtype: torch.dtype, mask: torch.Tensor | None, device: str = "cpu"
) -> dict:
    t = cast_inputs(inputs, case, dtype, device)
    return run(reference.lora_linear, t, case, dropout_mask=mask)


def fastlora_results(
    inputs: dict, case: Case, backend: str, seed: int = 1234, device: str = "cpu"
) -> tuple[dict, torch.Tensor | None]:
    """Run fastlora.lora_linear on ``backend``; return its results and the mask it used."""
    lead = inputs["x"].shape[:-1]
    masks = []

    def keeping_mask(*args, **kwargs):
        y = fastlora.lora_linear(*args, **kwargs)
        if case.dropout_p:
            masks.append(saved_keep_mask(y).view(*lead, case.K))
        return y

    with fastlora.use_backend(backend):
        t = cast_inputs(inputs, case, device=device)
        torch.manual_seed(seed)
        out = run(keeping_mask, t, case)
    return out, masks[0] if masks else None


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def assert_2x_rule(ours: dict, truth: dict, plain: dict, dtype: torch.dtype, label: str = "") -> None:
    """Each output's error against the float64 truth is at most 2x plain PyTorch's, plus a floor.

    The floor is relative to the output's magnitude: FLOOR[dtype] * (1 + max |truth|).
    """
    for key, true in truth.items():
        scale = 1.0 + (true.double().abs().max().item() if true.numel() else 0.0)
        ours_err = max_error(ours[key], true)
        plain_err = max_error(plain[key], true)
        bound = 2 * plain_err + FLOOR[dtype] * scale
        assert ours[key].dtype == plain[key].dtype, f"{label} {key}: dtype {ours[key].dtype} != {plain[key].dtype}"
        assert ours[key].shape == true.shape, f"{label} {key}: shape {ours[key].shape} != {true.shape}"
        assert ours_err <= bound, (
            f"{label} {key}: error {ours_err:.3e} > 2 x plain PyTorch's {plain_err:.3e} + floor "
            f"(bound {bound:.3e})"
        )
