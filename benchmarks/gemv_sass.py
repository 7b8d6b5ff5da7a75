"""Instructions per code in the product GEMVs' main loop, compiled for sm_90 on any machine (no GPU).

Counts are a proxy, not a timing: they show what a code costs the SM's issue slots, which
matters where the GEMV is not bound by memory alone (BENCHMARKS.md, Kernels). Compares, per
bit width, the half2 GEMV in fp16, its bf16x2 form (default for bf16 since version 8) and the
fp32-math GEMV (bf16 models before version 8, or with QUANTLRM_BF16X2=0).

    python benchmarks/gemv_sass.py
    python benchmarks/gemv_sass.py --x-once   # activations loaded once per thread's rows, against the tile load
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from quantlrm.kernels import triton_kernels as tk  # noqa: E402
from quantlrm.kernels.layout import kernel_constants  # noqa: E402

NVBIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def cuobjdump(cubin: bytes, flag: str, tag: str) -> str:
    """cuobjdump's output (`-sass`, `-res-usage`) for a cubin, written to a scratch file first."""
    path = f"/tmp/gemv_sass_{tag}.cubin"
    Path(path).write_bytes(cubin)
    return subprocess.run([os.path.join(NVBIN, "cuobjdump"), flag, path], capture_output=True, text=True).stdout


def loop_body(cubin: bytes, tag: str) -> list[str]:
    """SASS lines of the longest backward branch's body (the kernel's block loop)."""
    sass = cuobjdump(cubin, "-sass", tag)
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", ln).group(1), 16) for ln in lines]
    best = None
    for ln, a in zip(lines, addr, strict=True):
        m = re.search(r"BRA (0x[0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < a and (best is None or a - int(m.group(1), 16) > best[1] - best[0]):
            best = (int(m.group(1), 16), a)
    return [ln for ln, a in zip(lines, addr, strict=True) if best[0] <= a <= best[1]]


def layout_consts(bits: int) -> dict:
    """The kernels' layout constants for B = 128, plus the lane tile's padded width."""
    c = kernel_constants(bits, 128, 4096)
    return dict(c, L_PAD=1 << (c["L"] - 1).bit_length())


def codes_per_block(bits: int) -> int:
    """Code slots a block's walk decodes (padding included)."""
    c = layout_consts(bits)
    return 2 * c["S"] * c["L_PAD"]


def compile_h2(bits: int, bf16: bool, block_n: int, warps: int, u: int, prefetch: bool, rg: int = 1) -> bytes:
    return compile_h2_kernel(bits, bf16, block_n, warps, u, prefetch, rg).asm["cubin"]


def compile_h2_kernel(bits: int, bf16: bool, block_n: int, warps: int, u: int, prefetch: bool, rg: int = 1,
                      mode: int = 2, x_once: bool = False, pdl: int = 0):
    """The half2 GEMV compiled for sm_90 (Triton's compiled kernel: its TTGIR, PTX and cubin);
    mode: the split's reduction (0: no split, 2: in-kernel split-K); pdl: its PDL constexpr."""
    dt = "*bf16" if bf16 else "*fp16"
    sig = {"x_ptr": "*i32", "p_ptr": "*i32", "s_ptr": dt, "z_ptr": dt, "y_ptr": dt, "ws_ptr": "*fp32",
           "cnt_ptr": "*i32", "N": "i32", "K": "i32", "n_blocks": "i32", "blocks_per_split": "i32",
           "stride_s": "i32"}
    const = dict(GB=1, BLOCK_N=block_n, EVEN_N=True, EVEN_K=True, MODE=mode, PREFETCH=prefetch, U=u, FULL=True,
                 ACT=False, EMULATE=False, BF16=bf16, RG=rg, XONCE=x_once, PDL=pdl,
                 **layout_consts(bits))
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(12) if i not in (9, 10)}
    src = ASTSource(fn=tk._gemv_h2_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def compile_fp32(bits: int, block_n: int, warps: int) -> bytes:
    sig = {"x_ptr": "*i32", "p_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": "*bf16",
           "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "n_blocks": "i32",
           "blocks_per_split": "i32", "stride_s": "i32", "stride_xp": "i32", "code_mask": "i32"}
    const = dict(GB=1, BLOCK_N=block_n, XKIND=1, EVEN_N=True, EVEN_K=True, MODE=2, ACT=False, MR=1,
                 **layout_consts(bits))
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(15) if i not in (7, 8, 9, 10, 14)}
    src = ASTSource(fn=tk._gemv_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["cubin"]


def loads(body: list[str]) -> str:
    """Global loads in the loop by width: a 128-bit one moves 4 words per instruction."""
    widths = {"128": 0, "64": 0, "32": 0, "16": 0}
    for ln in body:
        m = re.search(r"LDG\.E(?:\.(\w+))?", ln)
        if m:
            w = m.group(1) or "32"
            widths["16" if w in ("U16", "S16") else w if w in widths else "32"] += 1
    return ", ".join(f"{n} x {w}-bit" for w, n in widths.items() if n)


def registers(cubin: bytes) -> int:
    return int(re.search(r"REG:(\d+)", cuobjdump(cubin, "-res-usage", "regs")).group(1))


def x_once_table() -> None:
    """The half2 GEMV with the activations loaded once for a thread's rows (`Config.x_once`)
    against the whole-tile load, same tiles: loop length, global loads per code, registers."""
    print("| bits | tile (rows, warps, blocks per step, row groups) | x_once | registers | loop instructions "
          "| per code | global loads per code | global loads in the loop |")
    print("|---|---|---|---|---|---|---|---|")
    tiles = ((3, 64, 4, 4, 1), (3, 8, 2, 4, 2), (3, 8, 1, 32, 1), (3, 4, 1, 32, 1), (3, 8, 2, 16, 1), (3, 8, 1, 8, 1),
             (4, 64, 4, 4, 1), (4, 8, 2, 4, 2), (4, 8, 1, 8, 1), (4, 4, 1, 16, 1), (4, 8, 2, 16, 1))
    for bits, bn, warps, u, rg in tiles:
        for xo in (False, True):
            k = compile_h2_kernel(bits, False, bn, warps, u, False, rg, x_once=xo)
            body = loop_body(k.asm["cubin"], f"xo{bits}")
            codes = bn * rg * codes_per_block(bits) * u / (warps * 32)
            n_ld = sum(1 for ln in body if "LDG" in ln)
            print(f"| W{bits} | {bn}, {warps}, {u}, {rg} | {'yes' if xo else 'no'} | {registers(k.asm['cubin'])} "
                  f"| {len(body)} | {len(body) / codes:.2f} | {n_ld / codes:.3f} | {loads(body)} |", flush=True)


def main() -> None:
    if "--x-once" in sys.argv:
        x_once_table()
        return
    print("| bits | kernel | tile (rows, warps, blocks per step) | loop instructions | codes per thread | per code "
          "| global loads in the loop |")
    print("|---|---|---|---|---|---|---|")
    for bits in (4, 3, 2):
        for name, bn, warps, u, cubin in (
                ("half2, fp16", 64, 4, 4, compile_h2(bits, False, 64, 4, 4, False)),
                ("half2, fp16", 64, 4, 1, compile_h2(bits, False, 64, 4, 1, False)),
                ("bf16x2", 64, 4, 4, compile_h2(bits, True, 64, 4, 4, False)),
                ("fp32 math (bf16 before version 8)", 32, 4, 1, compile_fp32(bits, 32, 4))):
            body = loop_body(cubin, f"{bits}_{u}")
            codes = bn * codes_per_block(bits) * u / (warps * 32)
            print(f"| W{bits} | {name} | {bn}, {warps}, {u} | {len(body)} | {codes:.1f} | {len(body) / codes:.2f} "
                  f"| {loads(body)} |")


if __name__ == "__main__":
    main()
