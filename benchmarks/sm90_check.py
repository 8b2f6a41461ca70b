"""Compile every fastlora kernel and GPU config for an H100 (sm_90) on a machine without a GPU.

    TRITON_INTERPRET=0 python -m benchmarks.sm90_check          # a table
    TRITON_INTERPRET=0 python -m benchmarks.sm90_check --json   # the same, machine-readable

Each kernel is compiled as an H100 launch would specialise it: pointers 16-byte aligned, sizes
and row strides multiples of 16, unit strides as constants, r = 16, 64 and 128, in the
variants it really launches with (``VARIANTS``: forward and dx layouts, with and without
dropout, fp32 adapters, fp16; bf16 by default; DoRA's norm kernel and QLoRA's dequantizer once,
they have no M or r_pad; the mixed-batch shrink / expand / weight-gradient kernels at r = 16
and 64). Reports per kernel and config the shared memory, whether the dots
lower to Hopper's wgmma (``wgmma.mma_async`` in the PTX), whether tiles arrive by TMA
(``cp.async.bulk.tensor``), and the registers per thread and spill bytes (Triton's bundled
``ptxas -v`` on the PTX). This is a compile check, not a launch guarantee (shared/gpu
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
                  "l_ptr": "fp32", "seed_ptr": "i64", "bits_ptr": "u8", "norm_ptr": "fp32",
                  "scale_ptr": "fp32", "packed_ptr": "u8", "wq_ptr": "u8", "absmax_ptr": "fp32",
                  "code_ptr": "fp32", "source_ptr": "i64", "tile_adapter_ptr": "i64", "valid_ptr": "u8",
                  "lhs_ptr": "fp32", "tile_start_ptr": "i64"}
# strides that are 1 for the contiguous operands of a real call (Triton specialises those to constants)
UNIT_STRIDES = {"stride_xk", "stride_ak", "stride_sr", "stride_br", "stride_dyn", "stride_wk", "stride_gr",
                "stride_dbr", "stride_dxk", "stride_lr", "stride_rr", "stride_pk", "stride_yn", "stride_rd"}
GEMMS = ("lora_gemm_tma_kernel", "lora_forward_kernel", "lora_grad_input_kernel")
# (M, r_pad) of the compiles: large M at r = 16 ... 512 (above 128 the first config only), and decode
RANKS = ((8192, 16), (8192, 32), (8192, 64), (8192, 128), (8192, 256), (8192, 512), (16, 16))
ADAPTER_POINTERS = {"a_ptr", "b_ptr", "r_ptr", "grad_ptr"}  # A, B, the epilogue's right factor, dA / dB: the adapters' dtype
FLAGS = {"HAS_DROPOUT": True, "HAS_BIAS": False, "HAS_COLUMN_SCALE": False, "NEEDS_G": True, "NEEDS_DB": True, "NEEDS_DBIAS": True,
         "INPUT_PRECISION": "tf32", "ADAPTER_PRECISION": "tf32", "B_TRANSPOSED": True, "NUM_SMS": 132,
         "QUANT_BLOCK": 64, "W_4BIT": False, "TILE": 16}
# The variants each kernel really launches with (flags beyond FLAGS; "dtype" the activations',
# "adapters" the adapters' dtype, default bf16; the epilogue multiplies fp32 adapters in TF32
# for a bf16 output and in IEEE fp32 for an fp16 one, as triton_ops.epilogue_precision says).
# The first is compiled for every config of the list, the others for the config a launch
# tries first.
VARIANTS = {
    "lora_gemm_tma_kernel": {
        "forward": dict(B_TRANSPOSED=True, HAS_BIAS=True, HAS_DROPOUT=False),
        "forward-dora": dict(B_TRANSPOSED=True, HAS_BIAS=True, HAS_DROPOUT=False, HAS_COLUMN_SCALE=True),
        "dx": dict(B_TRANSPOSED=False, HAS_DROPOUT=True),
        "dx-no-dropout": dict(B_TRANSPOSED=False, HAS_DROPOUT=False),
        "dx-fifo": dict(B_TRANSPOSED=True, HAS_DROPOUT=True),
        "dx-fp32-adapters": dict(B_TRANSPOSED=False, HAS_DROPOUT=True, adapters="fp32"),
        "forward-fp16": dict(B_TRANSPOSED=True, HAS_BIAS=True, HAS_DROPOUT=False, dtype="fp16", adapters="fp16"),
        "dx-fp16-fp32-adapters": dict(B_TRANSPOSED=False, HAS_DROPOUT=True, dtype="fp16", adapters="fp32",
                                      ADAPTER_PRECISION="ieee"),
    },
    "lora_forward_kernel": {
        "forward": dict(HAS_BIAS=True),
        "forward-dora": dict(HAS_BIAS=True, HAS_COLUMN_SCALE=True),
        "forward-4bit": dict(HAS_BIAS=True, W_4BIT=True, adapters="fp32"),  # QLoRA decode: W dequantized in the loop
        "forward-fp32-adapters": dict(HAS_BIAS=True, adapters="fp32"),
        "forward-fp16-fp32-adapters": dict(HAS_BIAS=True, dtype="fp16", adapters="fp32", ADAPTER_PRECISION="ieee"),
    },
    "lora_grad_input_kernel": {"dx": dict(HAS_DROPOUT=True), "dx-no-dropout": dict(HAS_DROPOUT=False)},
    "lora_shrink_kernel": {"dropout": dict(HAS_DROPOUT=True), "no-dropout": dict(HAS_DROPOUT=False)},
    "lora_grad_output_kernel": {"all": {}},
    "lora_grad_a_kernel": {"dropout": dict(HAS_DROPOUT=True)},
    "dora_norm_kernel": {
        "bf16": {},
        "bf16-fp32-adapters": dict(adapters="fp32", INPUT_PRECISION="ieee"),
        "fp16": dict(dtype="fp16", adapters="fp16"),
    },
    "dequant_4bit_kernel": {  # QLoRA's dequantizer, into the compute dtype; BLOCKSIZE 64 (QLoRA's) and 4096
        "bf16": {},
        "fp16": dict(dtype="fp16"),
        "fp32": dict(dtype="fp32"),
        "bf16-blocks-4096": dict(QUANT_BLOCK=4096),
    },
    "mixed_shrink_kernel": {"bf16": {}, "fp32-adapters": dict(adapters="fp32", INPUT_PRECISION="ieee")},
    "mixed_expand_kernel": {"bf16": {}, "fp32-adapters": dict(adapters="fp32", INPUT_PRECISION="ieee")},
    "mixed_grad_kernel": {"bf16": {}, "fp32-adapters": dict(adapters="fp32", INPUT_PRECISION="ieee")},
}
# variants that launch for decode rows only (M <= 64): QLoRA's in-GEMM dequantization runs up to
# qlora_linear.IN_GEMM_DEQUANT_MAX_ROWS rows (0 until the GPU report times it; the report tries 64)
DECODE_ONLY = {("lora_forward_kernel", "forward-4bit")}
# DoRA's norm kernel and the dequantizer depend on neither M nor the rank's padding
SHAPELESS = {"dora_norm_kernel", "dequant_4bit_kernel"}
MIXED = {"mixed_shrink_kernel": "BLOCK_K", "mixed_expand_kernel": "BLOCK_N", "mixed_grad_kernel": None}  # tiles of 16 rows: no M either


def kernels() -> dict:
    """name -> (JIT function, config factory) for every kernel fastlora launches on a GPU."""
    from fastlora.kernels import configs
    from fastlora.kernels.dequant_4bit import dequant_4bit_kernel
    from fastlora.kernels.dora_norm import dora_norm_kernel
    from fastlora.kernels.lora_backward import lora_grad_a_kernel, lora_grad_input_kernel, lora_grad_output_kernel
    from fastlora.kernels.lora_forward import lora_forward_kernel, lora_shrink_kernel
    from fastlora.kernels.lora_gemm_tma import lora_gemm_tma_kernel
    from fastlora.kernels.mixed_lora import mixed_expand_kernel, mixed_grad_kernel, mixed_shrink_kernel

    return {
        "lora_gemm_tma_kernel": (lora_gemm_tma_kernel, configs.gemm_configs),
        "lora_forward_kernel": (lora_forward_kernel, configs.gemm_configs),
        "lora_grad_input_kernel": (lora_grad_input_kernel, configs.gemm_configs),
        "lora_shrink_kernel": (lora_shrink_kernel, configs.rank_configs),
        "lora_grad_output_kernel": (lora_grad_output_kernel, configs.rank_configs),
        "lora_grad_a_kernel": (lora_grad_a_kernel, configs.rank_configs),
        "dora_norm_kernel": (dora_norm_kernel, configs.norm_configs),
        "dequant_4bit_kernel": (dequant_4bit_kernel, configs.dequant_configs),
        "mixed_shrink_kernel": (mixed_shrink_kernel, configs.mixed_configs),
        "mixed_expand_kernel": (mixed_expand_kernel, configs.mixed_configs),
        "mixed_grad_kernel": (mixed_grad_kernel, configs.mixed_grad_configs),
    }


def config_list(name: str, M: int, r_pad: int, variant: str) -> list:
    """The candidate configs the launcher would try for this kernel, M, rank and variant."""
    factory = kernels()[name][1]
    if name == "dequant_4bit_kernel":
        return factory()
    if name in MIXED:
        return factory(MIXED[name]) if MIXED[name] else factory()
    if name in SHAPELESS:
        return factory(4096)
    if name == "lora_shrink_kernel":
        return factory(M, r_pad, draws_mask=VARIANTS[name][variant]["HAS_DROPOUT"])
    if name not in GEMMS:
        return factory(M, r_pad)
    adapter_bytes = 4 if VARIANTS[name][variant].get("adapters") == "fp32" else 2
    return factory(M, r_pad, adapter_bytes, pointer=name != "lora_gemm_tma_kernel",
                   four_bit=VARIANTS[name][variant].get("W_4BIT", False))


def compile_one(name: str, M: int, index: int, r_pad: int, variant: str | None = None) -> dict:
    """Compile config ``index`` of ``name``'s list for M as ``variant`` (default: the kernel's
    first); shared bytes, wgmma, TMA, registers and spills, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastlora.kernels import configs

    configs.interpreting = lambda: False  # this process compiles for the GPU
    kernel = kernels()[name][0]
    config = config_list(name, M, r_pad, variant or next(iter(VARIANTS[name])))[index]
    names = {param.name for param in kernel.params}
    variant = variant or next(iter(VARIANTS[name]))
    flags = {**FLAGS, "FUSED_SHRINK": M <= 64, **VARIANTS[name][variant]}  # decode fuses the shrink, as the launcher does
    dtype, adapters = flags.pop("dtype", "bf16"), flags.pop("adapters", "bf16")
    from fastlora.ops.triton_ops import rank_chunk

    sizes = {"R_PAD": r_pad, "R_CHUNK": rank_chunk(r_pad)}
    constexprs = {k: v for k, v in {**flags, **sizes, **config.kwargs}.items() if k in names}
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
            b_block = [blocks["BLOCK_N"], blocks["BLOCK_K"]] if flags["B_TRANSPOSED"] else [blocks["BLOCK_K"], blocks["BLOCK_N"]]
            shape = {"a_desc": [blocks["BLOCK_M"], blocks["BLOCK_K"]], "b_desc": b_block,
                     "c_desc": [blocks["BLOCK_M"], blocks["BLOCK_N"]]}[arg]
            signature[arg] = f"tensordesc<{dtype}[{shape[0]}, {shape[1]}]>"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + POINTER_DTYPES.get(arg, adapters if arg in ADAPTER_POINTERS else dtype)
            attrs[(position,)] = [["tt.divisibility", 16]]
        elif arg in ("scaling", "dropout_p"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if not param.do_not_specialize and arg not in ("M", "R", "SPLIT_M", "SPLIT_K", "SPLIT_N", "ADAPTERS"):
                attrs[(position,)] = [["tt.divisibility", 16]]
    row = {"kernel": name, "variant": variant, "M": M, "r_pad": r_pad, "config": str(config.kwargs),
           "num_warps": config.num_warps, "num_stages": config.num_stages}
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
            "tma": "cp.async.bulk.tensor" in ptx, **register_usage(ptx)}


def register_usage(ptx: str) -> dict:
    """Registers per thread and spill bytes of a kernel's PTX, from Triton's bundled ptxas -v."""
    import re
    import subprocess
    import tempfile

    import triton

    # Triton 3.9 emits PTX 9.x, which only its newer bundled ptxas reads
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next(p for p in (os.path.join(folder, name) for name in ("ptxas-blackwell", "ptxas")) if os.path.exists(p))
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, f"-arch={arch}", "-v", source, "-o", os.path.join(folder, "kernel.cubin")],
                                capture_output=True, text=True)
    info = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", info)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
    return {"registers": int(registers.group(1)) if registers else -1, "spill_bytes": sum(spills)}


def jobs(quick: bool) -> list[tuple[str, int, int, int, str]]:
    """(kernel, M, config index, r_pad, variant): every GPU config of every kernel in its first
    variant, and the first config in the others, at large M with r = 16, 64 and 128 and at
    decode (a ``DECODE_ONLY`` variant at decode only); ``quick``: the first config of each list
    only."""
    from fastlora.kernels import configs

    configs.interpreting = lambda: False
    out = []
    for name in kernels():
        first, *others = VARIANTS[name]
        for M, r_pad in RANKS[:1] if name in SHAPELESS else ((16, 16), (16, 64)) if name in MIXED else RANKS:
            count = 1 if quick or r_pad > 128 else len(config_list(name, M, r_pad, first))
            out += [(name, M, index, r_pad, first) for index in range(count)]
            out += [(name, M, 0, r_pad, variant) for variant in others if M <= 64 or (name, variant) not in DECODE_ONLY]
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
    print(f"{'kernel':<24} {'variant':<18} {'M':>5} {'r':>4} {'config':<58} {'w':>2} {'s':>2} {'shared KB':>9} "
          f"{'wgmma':>6} {'TMA':>4} {'regs':>5} {'spill B':>7}")
    for row in rows:
        head = (f"{row['kernel']:<24} {row['variant']:<18} {row['M']:>5} {row['r_pad']:>4} {row['config']:<58} "
                f"{row['num_warps']:>2} {row['num_stages']:>2}")
        if "error" in row:
            print(f"{head} error: {row['error']}")
        else:
            print(f"{head} {row['shared'] / 1024:>9.1f} {str(row['wgmma']):>6} {str(row['tma']):>4} "
                  f"{row['registers']:>5} {row['spill_bytes']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
