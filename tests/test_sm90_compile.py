"""Every kernel and GPU config compiles for an H100 (sm_90) on this CPU machine, in the variants
that launch (forward and dx layouts, dropout on and off, fp32 adapters, fp16; r = 16 ... 512):
within 227 KB of shared memory, the big GEMMs on wgmma and without register spills, the TMA
kernel's tiles through TMA. A compile check, not a launch guarantee (the launcher's run-time
fallback covers the rest)."""

import json
import os
import subprocess
import sys

import pytest

from lora_cases import available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends("cpu"), reason="triton is not installed")


@pytest.fixture(scope="module")
def compiled():
    environment = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.sm90_check", "--json"], capture_output=True,
                            text=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_config_compiles_within_h100_shared_memory(compiled):
    from benchmarks.sm90_check import H100_SHARED_BYTES

    assert {row["kernel"] for row in compiled} == {
        "lora_gemm_tma_kernel", "lora_forward_kernel", "lora_grad_input_kernel",
        "lora_shrink_kernel", "lora_grad_output_kernel", "lora_grad_a_kernel", "dora_norm_kernel",
        "dequant_4bit_kernel", "mixed_shrink_kernel", "mixed_expand_kernel", "mixed_grad_kernel"}
    for row in compiled:
        assert "error" not in row, row
        assert row["shared"] <= H100_SHARED_BYTES, row


def test_large_gemm_tiles_lower_to_wgmma_and_the_tma_kernel_to_tma(compiled):
    for row in compiled:
        big_tile = row["M"] > 64 and ("'BLOCK_M': 128" in row["config"] or "'BLOCK_M': 256" in row["config"])
        if row["kernel"] in ("lora_gemm_tma_kernel", "lora_forward_kernel", "lora_grad_input_kernel") and big_tile:
            assert row["wgmma"], row
        if row["kernel"] == "lora_gemm_tma_kernel":
            assert row["tma"], row


def test_no_register_spills_in_the_gemms_nor_in_the_rank_passes_up_to_r256(compiled):
    from benchmarks.sm90_check import GEMMS

    for row in compiled:
        assert row["registers"] > 0, row  # ptxas reported its usage
        if row["kernel"] in GEMMS or row["r_pad"] <= 256:
            assert row["spill_bytes"] == 0, row


def test_every_variant_and_rank_up_to_512_is_compiled(compiled):
    from benchmarks.sm90_check import VARIANTS

    seen = {(row["kernel"], row["variant"]) for row in compiled}
    assert seen == {(kernel, variant) for kernel, variants in VARIANTS.items() for variant in variants}
    assert {row["r_pad"] for row in compiled} == {16, 32, 64, 128, 256, 512}
