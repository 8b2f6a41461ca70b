"""fastlora.lora_linear against fastlora.reference, in forward and every gradient, per backend."""

import pytest
import torch

from lora_cases import (
    Case,
    assert_2x_rule,
    available_backends,
    fastlora_results,
    make_inputs,
    reference_results,
)

BACKENDS = available_backends("cpu")

CASES = [
    Case(M=1, K=16, N=16, r=1),
    Case(M=37, K=19, N=23, r=4),
    Case(M=70, K=33, N=40, r=16, bias=False),
    Case(M=9, K=72, N=18, r=64),
    Case(M=5, K=130, N=12, r=128, bias=False),
    Case(M=33, K=24, N=17, r=32, fan_in_fan_out=True),
    Case(M=6, K=21, N=30, r=8, batch=3),
    Case(M=19, K=27, N=14, r=4, strided=True),
    Case(M=4, K=20, N=22, r=16, batch=2, strided=True, fan_in_fan_out=True, bias=False),
    Case(M=41, K=29, N=35, r=4, dropout_p=0.1),
    Case(M=7, K=18, N=25, r=16, dropout_p=0.5, batch=3, fan_in_fan_out=True),
    Case(M=23, K=40, N=9, r=1, dropout_p=0.3, strided=True, bias=False),
    Case(M=0, K=17, N=11, r=4, dropout_p=0.2),
    # several row blocks and threads on the cpp backend; K = 45: a vector step plus a tail
    Case(M=150, K=45, N=37, r=8, dropout_p=0.2),
    Case(M=97, K=8, N=5, r=2, dropout_p=0.1, strided=True, fan_in_fan_out=True),
    # M > 64 with 16-byte aligned rows: the triton backend's TMA + persistent GEMMs
    Case(M=130, K=48, N=40, r=16, dropout_p=0.2),
    Case(M=100, K=32, N=24, r=8, batch=2, fan_in_fan_out=True, bias=False),
    Case(M=90, K=64, N=36, r=64, dropout_p=0.1, fan_in_fan_out=True),
]
HALF_CASES = [
    Case(M=37, K=19, N=23, r=4, dtype=torch.float16),
    Case(M=20, K=48, N=33, r=16, dtype=torch.float16, dropout_p=0.1, batch=2),
    Case(M=17, K=24, N=40, r=32, dtype=torch.float16, fan_in_fan_out=True, strided=True),
    Case(M=17, K=24, N=40, r=8, dtype=torch.float16, adapter_dtype=torch.float32, dropout_p=0.2),
    Case(M=11, K=40, N=24, r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32, bias=False),
    Case(M=48, K=40, N=33, r=16, dtype=torch.bfloat16, dropout_p=0.1, batch=2),
    Case(M=37, K=19, N=23, r=4, dtype=torch.bfloat16, fan_in_fan_out=True, strided=True),
    Case(M=96, K=40, N=24, r=8, dtype=torch.float16, dropout_p=0.1),
    Case(M=80, K=32, N=48, r=4, dtype=torch.float16, adapter_dtype=torch.float32, dropout_p=0.3),
]


def check_case(case: Case, backend: str) -> None:
    inputs = make_inputs(case)
    ours, mask = fastlora_results(inputs, case, backend)
    truth = reference_results(inputs, case, torch.float64, mask)
    plain = reference_results(inputs, case, case.dtype, mask)
    assert_2x_rule(ours, truth, plain, case.dtype, label=f"{backend} {case}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_parity_fp32(case, backend):
    check_case(case, backend)


def runs_here(case: Case, backend: str) -> bool:
    """The Triton interpreter has no bf16 tl.dot (triton-lang/triton#11584): bf16 Triton runs
    in tests/test_gpu.py on a GPU."""
    return not (backend == "triton" and case.dtype == torch.bfloat16)


@pytest.mark.parametrize(
    "case,backend",
    [(case, backend) for case in HALF_CASES for backend in BACKENDS if runs_here(case, backend)],
    ids=lambda v: str(v),
)
def test_parity_low_precision(case, backend):
    check_case(case, backend)
