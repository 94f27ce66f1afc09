"""Compile the prefill kernel for sm_90 without a GPU and report what the register allocator did.

Usage (any machine with triton's CUDA backend; no GPU needed):
    python bench/inspect_prefill_sass.py [--configs 128,64,8,3 128,128,8,2] [--head-dim 64] [--qsplit 0 1]

Per tile config ("BM,BN,warps,stages"), without and/or with the query split (``--qsplit 0 1``): registers per thread, spill stack bytes, shared memory, and how
the score products read the query operand (``HGMMA`` with a register A operand vs a shared-memory
descriptor). Used to find the register pressure behind the staged-query change (bench/README.md).
The local triton version compiles; timings need the GPU (bench_attention.py).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from chunkllama.attention.triton_prefill import _dca_prefill_kernel

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "QLo": "*bf16", "QPos": "*i64", "KPos": "*i64",
            "Cos": "*fp32", "Sin": "*fp32"}
CONSTEXPRS = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "QSPLIT")


def signature() -> dict:
    sig = {}
    for name in _dca_prefill_kernel.arg_names:
        if name in POINTERS:
            sig[name] = POINTERS[name]
        elif name in ("attn_scaling", "qk_scale"):
            sig[name] = "fp32"
        elif name in CONSTEXPRS:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def inspect(config: str, head_dim: int, qsplit: bool) -> str:
    block_m, block_n, warps, stages = (int(x) for x in config.split(","))
    src = ASTSource(fn=_dca_prefill_kernel, signature=signature(),
                    constexprs={"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "QSPLIT": qsplit})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([f"{tools}/cuobjdump", "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([f"{tools}/cuobjdump", "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    hgmma = re.findall(r"HGMMA\.(\d+x\d+x\d+)\.\S+\s+R\d+,\s*(\w+)", sass)
    a_in_regs = sum(1 for _, a in hgmma if a.startswith("R"))
    return (f"{config}{' qsplit' if qsplit else ''}: {regs} registers/thread, {stack} B spill stack, {compiled.metadata.shared} B shared; "
            f"HGMMA {len(hgmma)} ({a_in_regs} with A from registers, {len(hgmma) - a_in_regs} from shared memory)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["128,64,8,3"])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--qsplit", type=int, nargs="+", default=[0], choices=[0, 1],
                        help="compile without (0) and/or with (1) the query's hi + lo split")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_90, head_dim {args.head_dim}, bf16")
    for config in args.configs:
        for qsplit in args.qsplit:
            print(inspect(config, args.head_dim, bool(qsplit)), flush=True)


if __name__ == "__main__":
    main()
