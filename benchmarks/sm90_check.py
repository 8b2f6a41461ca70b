"""Compile every fastlora kernel and GPU config for an H100 (sm_90) on a machine without a GPU.

    TRITON_INTERPRET=0 python -m benchmarks.sm90_check          # a table
    TRITON_INTERPRET=0 python -m benchmarks.sm90_check --json   # the same, machine-readable

Each kernel is compiled as an H100 launch with bf16 activations would specialise it: pointers
16-byte aligned, sizes and row strides multiples of 16, unit strides as constants, dropout and
bias on, r = 16 (and 128). Reports per kernel and config the shared memory, whether the dots
lower to Hopper's wgmma (``wgmma.mma_async`` in the PTX) and whether tiles arrive by TMA
(``cp.async.bulk.tensor``). This is a compile check, not a launch guarantee (shared/gpu
section 1: configs that compiled to 16-131 KB here needed up to 540 KB on the GPU), so the
launcher's run-time fallback stays.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys

H100_SHARED_BYTES = 232448  # 227 KB, the opt-in limit per block
POINTER_DTYPES = {"s_ptr": "fp32", "g_ptr": "fp32", "db_ptr": "fp32", "dbias_ptr": "fp32", "partial_ptr": "fp32",
                  "l_ptr": "fp32", "seed_ptr": "i64", "bits_ptr": "u8"}
# strides that are 1 for the contiguous operands of a real call (Triton specialises those to constants)
UNIT_STRIDES = {"stride_xk", "stride_ak", "stride_sr", "stride_br", "stride_dyn", "stride_wk", "stride_gr",
                "stride_dbr", "stride_dxk", "stride_lr", "stride_rr", "stride_pk", "stride_yn"}
GEMMS = ("lora_gemm_tma_kernel", "lora_forward_kernel", "lora_grad_input_kernel")
FLAGS = {"HAS_DROPOUT": True, "HAS_BIAS": True, "NEEDS_G": True, "NEEDS_DB": True, "NEEDS_DBIAS": True,
         "INPUT_PRECISION": "tf32", "ADAPTER_PRECISION": "tf32", "B_TRANSPOSED": True, "NUM_SMS": 132}


def kernels() -> dict:
    """name -> (JIT function, config factory) for every kernel fastlora launches on a GPU."""
    from fastlora.kernels import configs
    from fastlora.kernels.lora_backward import lora_grad_a_kernel, lora_grad_input_kernel, lora_grad_output_kernel
    from fastlora.kernels.lora_forward import lora_forward_kernel, lora_shrink_kernel
    from fastlora.kernels.lora_gemm_tma import lora_gemm_tma_kernel

    return {
        "lora_gemm_tma_kernel": (lora_gemm_tma_kernel, configs.gemm_configs),
        "lora_forward_kernel": (lora_forward_kernel, configs.gemm_configs),
        "lora_grad_input_kernel": (lora_grad_input_kernel, configs.gemm_configs),
        "lora_shrink_kernel": (lora_shrink_kernel, configs.rank_configs),
        "lora_grad_output_kernel": (lora_grad_output_kernel, configs.rank_configs),
        "lora_grad_a_kernel": (lora_grad_a_kernel, configs.rank_configs),
    }


def config_list(name: str, M: int, r_pad: int) -> list:
    factory = kernels()[name][1]
    return factory(M, r_pad) if name in GEMMS else factory(M)


def compile_one(name: str, M: int, index: int, r_pad: int) -> dict:
    """Compile config ``index`` of ``name``'s list for M; shared bytes, wgmma, TMA, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastlora.kernels import configs

    configs.interpreting = lambda: False  # this process compiles for the GPU
    kernel = kernels()[name][0]
    config = config_list(name, M, r_pad)[index]
    names = {param.name for param in kernel.params}
    flags = {**FLAGS, "FUSED_SHRINK": M <= 64}  # as the launcher sets it: decode fuses the shrink
    constexprs = {k: v for k, v in {**flags, "R_PAD": r_pad, **config.kwargs}.items() if k in names}
    blocks = config.kwargs
    signature, attrs = {}, {}
    for position, param in enumerate(kernel.params):
        arg = param.name
        if param.is_constexpr:
            signature[arg] = "constexpr"
        elif arg in UNIT_STRIDES:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg.endswith("_desc"):
            shape = {"a_desc": [blocks["BLOCK_M"], blocks["BLOCK_K"]], "b_desc": [blocks["BLOCK_N"], blocks["BLOCK_K"]],
                     "c_desc": [blocks["BLOCK_M"], blocks["BLOCK_N"]]}[arg]
            signature[arg] = f"tensordesc<bf16[{shape[0]}, {shape[1]}]>"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + POINTER_DTYPES.get(arg, "bf16")
            attrs[(position,)] = [["tt.divisibility", 16]]
        elif arg in ("scaling", "dropout_p"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg not in ("M", "R", "SPLIT_M"):
                attrs[(position,)] = [["tt.divisibility", 16]]
    row = {"kernel": name, "M": M, "r_pad": r_pad, "config": str(config.kwargs), "num_warps": config.num_warps,
           "num_stages": config.num_stages}
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    except Exception as error:  # report, do not stop the other compiles
        return {**row, "error": f"{type(error).__name__}: {str(error).strip()[:200]}"}
    ptx = compiled.asm["ptx"]
    return {**row, "shared": compiled.metadata.shared, "wgmma": "wgmma.mma_async" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx}


def jobs(quick: bool) -> list[tuple[str, int, int, int]]:
    """(kernel, M, config index, r_pad) for every GPU config of every kernel: large M at r = 16,
    64 and 128, and decode; ``quick``: the first config of each list only."""
    from fastlora.kernels import configs

    configs.interpreting = lambda: False
    out = []
    for name in kernels():
        for M, r_pad in ((8192, 16), (8192, 64), (8192, 128), (16, 16)):
            count = 1 if quick else len(config_list(name, M, r_pad))
            out += [(name, M, index, r_pad) for index in range(count)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the first config of each list only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run with TRITON_INTERPRET=0: the interpreter does not compile kernels")
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        rows = list(pool.map(compile_one, *zip(*jobs(args.quick))))
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'kernel':<24} {'M':>5} {'r':>4} {'config':<58} {'w':>2} {'s':>2} {'shared KB':>9} {'wgmma':>6} {'TMA':>4}")
    for row in rows:
        head = (f"{row['kernel']:<24} {row['M']:>5} {row['r_pad']:>4} {row['config']:<58} {row['num_warps']:>2} "
                f"{row['num_stages']:>2}")
        if "error" in row:
            print(f"{head} error: {row['error']}")
        else:
            print(f"{head} {row['shared'] / 1024:>9.1f} {str(row['wgmma']):>6} {str(row['tma']):>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
