"""Prototype: an exactly-3-bit W3 layout (a 2-bit plane plus a 1-bit plane) for the half2 GEMV.

Why: the product's W3 layout until version 8 (BENCHMARKS.md, Kernels) packed 10 codes per
32-bit word (3.25 bits per weight, 13 words per 128-channel block); version 9 replaced it
with lanes of three words, exactly 3 bits, read with 16-byte loads. A block of 13 words cannot be read with 16-byte vector loads, and
its activation pairs sit at odd offsets. Its half2 GEMV loop counts 4.6 SASS instructions per
code, against 3.1 for W4 (BENCHMARKS.md, Kernels). On an H100 that makes W3 issue-bound: 3 TB/s
of W3 codes at 4.6 instructions each would need more issue slots than the card has. So W3
decodes slower than W4 although it reads a quarter fewer bytes.

Layout here, per block of 128 channels (a group of 128 or a multiple of it):
- 8 "lo" words: word t holds the low 2 bits of the codes of activation pairs p*8 + t,
  p = 0..7. The pair's first channel sits at bits 2p and its second at 16 + 2p, exactly the
  W2 arrangement of `quantlrm.kernels.layout`.
- 4 "hi" words: hi word h holds the third bit of the 32 codes of lo words h and h + 4. Each
  group of 8 (lo word, pairs 0-3 or 4-7) sits at bits a + {0, 2, 4, 6, 16, 18, 20, 22}, with
  a = 0/1 for lo word h and a = 8/9 for lo word h + 4. One shift per group then puts every hi
  bit right above its 2-bit field.

Decoding a code pair takes 2 LOP3 and 2 HFMA2: (lo & field mask) | 0x6400, then | (hi &
bit mask). W4 takes 1 LOP3 and 2 HFMA2. Words and activations are read with 16-byte loads.

Run here (no GPU): `python benchmarks/w3_planes.py --sass` compiles the prototype for sm_90
and counts its loop's instructions per code; `TRITON_INTERPRET=1 python benchmarks/w3_planes.py
--cpu-check` runs it in Triton's interpreter, with the PTX emulated, against
dequantize-then-matmul. Run on the GPU machine: `python
benchmarks/w3_planes.py --out $OUT/w3_planes.json` checks it against dequantize-then-matmul and
times it against the product's W3 and W4 GEMVs on the 8B shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from quantlrm.kernels.triton_kernels import _WIDEN_ASM, _f16, _store_rows, _u16  # noqa: E402

B = 128  # channels per block


def pack_planes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3-bit codes uint8 [out, in] (in % 128 == 0) -> (lo int32 [out, nb*8], hi int32 [out, nb*4])."""
    out, inp = codes.shape
    if inp % B:
        raise ValueError("the prototype needs in_features % 128 == 0")
    nb = inp // B
    # channel 2*(p*8 + t) + half  ->  [out, nb, p, t, half]
    c = codes.to(torch.int64).view(out, nb, 8, 8, 2)
    p = torch.arange(8).view(1, 1, 8, 1, 1)
    t = torch.arange(8).view(1, 1, 1, 8, 1)
    half = torch.arange(2).view(1, 1, 1, 1, 2)
    lo = ((c & 3) << (2 * p + 16 * half)).sum(dim=(2, 4))  # [out, nb, 8]
    a = torch.where(t < 4, 0, 8) + torch.where(p < 4, 0, 1)
    pos = 2 * (p % 4) + 16 * half + a
    hi_bits = ((c >> 2) & 1) << pos  # [out, nb, 8(p), 8(t), 2]
    hi = hi_bits.view(out, nb, 8, 2, 4, 2).sum(dim=(2, 3, 5))  # t = 4*g + h -> [out, nb, 4(h)]

    def i32(w: torch.Tensor) -> torch.Tensor:
        return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).view(out, -1)

    return i32(lo), i32(hi)


def unpack_planes(lo: torch.Tensor, hi: torch.Tensor, inp: int) -> torch.Tensor:
    """Inverse of `pack_planes` (the test of the packer)."""
    out, nb = lo.shape[0], inp // B
    lo = (lo.to(torch.int64) & 0xFFFFFFFF).view(out, nb, 1, 8, 1)
    hi = (hi.to(torch.int64) & 0xFFFFFFFF).view(out, nb, 4)
    p = torch.arange(8).view(1, 1, 8, 1, 1)
    t = torch.arange(8).view(1, 1, 1, 8, 1)
    half = torch.arange(2).view(1, 1, 1, 1, 2)
    low = (lo >> (2 * p + 16 * half)) & 3
    a = torch.where(t < 4, 0, 8) + torch.where(p < 4, 0, 1)
    pos = 2 * (p % 4) + 16 * half + a
    hw = hi[:, :, (torch.arange(8) % 4)].view(out, nb, 1, 8, 1)
    top = (hw >> pos) & 1
    return (low | (top << 2)).view(out, inp).to(torch.uint8)


_PAIR3_ASM = tl.constexpr("""{
.reg .b32 u, v;
lop3.b32 u, $2, $3, 0x64006400, 0xEA;
lop3.b32 v, $4, $5, u, 0xEA;
fma.rn.f16x2 v, v, $6, $7;
fma.rn.f16x2 $0, v, $8, $1;
}""")


@triton.jit
def _pair3(acc, src, mlo, hsrc, mhi, mult, nz, x):
    return tl.inline_asm_elementwise(_PAIR3_ASM, "=r,r,r,r,r,r,r,r,r", [acc, src, mlo, hsrc, mhi, mult, nz, x],
                                     dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _pair3_emulated(acc, src, mlo, hsrc, mhi, mult, nz, x):
    """`_PAIR3_ASM` in plain Triton (fp16 rounding after each step), for the CPU interpreter,
    which cannot run inline PTX."""
    v = (hsrc & mhi) | ((src & mlo) | 0x64006400)
    out_lo = (_f16(v) * _f16(mult) + _f16(nz)).to(tl.float16).to(tl.float32) * _f16(x) + _f16(acc)
    out_hi = (_f16(v >> 16) * _f16(mult >> 16) + _f16(nz >> 16)).to(tl.float16).to(tl.float32) * _f16(x >> 16) \
        + _f16(acc >> 16)
    return _u16(out_lo) | (_u16(out_hi) << 16)


@triton.jit
def _half_block(acc, lo, hin, hsh, x_ptr, kp0, zero2, z, s, EMULATE: tl.constexpr):
    """One half of a block (4 lo words): 8 code pairs per word, fp16 sums widened once per word."""
    h = zero2
    shifted = lo >> 8
    for p in tl.static_range(8):
        R = 2 * (p % 4)
        src = lo if p < 4 else shifted
        hs = hin if p < 4 else hsh
        nz16 = (z * -0.0625 - 64.0 / (1 << R)).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        nz = zero2 + (nz16 | (nz16 << 16))[:, None]
        mult = zero2 + ((11 - R) << 10) * 0x10001
        mlo = zero2 + ((3 << R) * 0x10001)
        mhi = zero2 + ((4 << R) * 0x10001)
        xp = tl.load(x_ptr + (zero2.to(tl.int32) + kp0 + p * 8))
        if EMULATE:
            h = _pair3_emulated(h, src, mlo, hs, mhi, mult, nz, xp.to(tl.uint32, bitcast=True))
        else:
            h = _pair3(h, src, mlo, hs, mhi, mult, nz, xp.to(tl.uint32, bitcast=True))
    if EMULATE:
        part = (_f16(h) + _f16(h >> 16)).to(tl.float16).to(tl.float32)
    else:
        part = tl.inline_asm_elementwise(_WIDEN_ASM, "=r,r", [h], dtype=tl.uint32, is_pure=True,
                                         pack=1).to(tl.float32, bitcast=True)
    return acc + part * (s * 16.0)[:, None]


@triton.jit
def _gemv_planes_kernel(x_ptr, lo_ptr, hi_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, n_blocks, blocks_per_split,
                        stride_lo, stride_hi, stride_s, GB: tl.constexpr, BLOCK_N: tl.constexpr,
                        MODE: tl.constexpr, EMULATE: tl.constexpr):
    # x_ptr: fp16 activations as int32 pairs; rows % BLOCK_N == 0 and whole blocks (prototype).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    jj = tl.arange(0, 4)[None, :]
    zero2 = tl.zeros([BLOCK_N, 4], dtype=tl.uint32)
    acc = tl.zeros([BLOCK_N, 4], dtype=tl.float32)
    b_begin = tl.program_id(1) * blocks_per_split
    b_end = tl.minimum(b_begin + blocks_per_split, n_blocks)
    for blk in range(b_begin, b_end):
        lo_a = tl.load(lo_ptr + rows[:, None] * stride_lo + blk * 8 + jj).to(tl.uint32, bitcast=True)
        lo_b = tl.load(lo_ptr + rows[:, None] * stride_lo + blk * 8 + 4 + jj).to(tl.uint32, bitcast=True)
        hi = tl.load(hi_ptr + rows[:, None] * stride_hi + blk * 4 + jj).to(tl.uint32, bitcast=True)
        grp = blk // GB
        s = tl.load(s_ptr + rows * stride_s + grp).to(tl.float32)
        z = tl.load(z_ptr + rows * stride_s + grp).to(tl.float16)
        acc = _half_block(acc, lo_a, hi << 2, hi << 1, x_ptr, blk * 64 + jj, zero2, z, s, EMULATE)
        acc = _half_block(acc, lo_b, hi >> 6, hi >> 7, x_ptr, blk * 64 + 4 + jj, zero2, z, s, EMULATE)
    out = tl.sum(acc, axis=1)[None, :]
    _store_rows(out, y_ptr, ws_ptr, cnt_ptr, rows, rows < N, tl.arange(0, 1), 1, N, tl.num_programs(1), MODE,
                BLOCK_N, False)


def gemv_planes(x: torch.Tensor, lo, hi, scale, zero, group_size: int, block_n: int = 64, split: int = 8,
                num_warps: int = 4) -> torch.Tensor:
    from quantlrm.kernels import _workspace

    n, k = lo.shape[0], x.shape[-1]
    nb = k // B
    per = triton.cdiv(nb, split)
    split = triton.cdiv(nb, per)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    ws = _workspace(x.device, n, split, triton.cdiv(n, block_n)) if split > 1 else None
    wsp, cnt = ws if ws is not None else (y, y)
    _gemv_planes_kernel[(triton.cdiv(n, block_n), split)](
        x.view(torch.int32), lo, hi, scale, zero, y, wsp, cnt, n, nb, per, lo.stride(0), hi.stride(0), scale.stride(0),
        GB=group_size // B, BLOCK_N=block_n, MODE=0 if split == 1 else 2,
        EMULATE=os.environ.get("TRITON_INTERPRET") == "1", num_warps=num_warps)
    return y


CONFIGS = [(64, 8, 4), (32, 8, 4), (128, 4, 4), (64, 4, 4), (32, 16, 4), (128, 8, 8), (16, 8, 4)]
SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}


def sass_counts() -> None:
    """Compile for sm_90 on any machine and count the main loop's instructions per code."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"x_ptr": "*i32", "lo_ptr": "*i32", "hi_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
           "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "n_blocks": "i32",
           "blocks_per_split": "i32", "stride_lo": "i32", "stride_hi": "i32", "stride_s": "i32",
           "GB": "constexpr", "BLOCK_N": "constexpr", "MODE": "constexpr", "EMULATE": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(14)}
    from gemv_sass import loop_body

    for bn, _, warps in CONFIGS:
        src = ASTSource(fn=_gemv_planes_kernel, signature=sig, constexprs=dict(GB=1, BLOCK_N=bn, MODE=2, EMULATE=False), attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        body = loop_body(k.asm["cubin"], f"w3p_{bn}_{warps}")
        codes = bn * 128 / (warps * 32)  # codes per thread per block
        print(f"BLOCK_N {bn:3d} warps {warps}: loop {len(body)} instructions, {codes:.0f} codes per thread, "
              f"{len(body) / codes:.2f} per code; LDG {sum('LDG' in x for x in body)} "
              f"(128-bit {sum('LDG.E.128' in x for x in body)}), LOP3 {sum('LOP3' in x for x in body)}, "
              f"HFMA2 {sum('HFMA2' in x for x in body)}, shared-memory BAR {sum('BAR' in x for x in body)}")


def cpu_check() -> None:
    """Triton's interpreter, PTX replaced by `_pair3_emulated`: groups 128/256, split-K merges."""
    import quantlrm.kernels  # noqa: F401 -- the interpreter's NumPy patch
    from quantlrm.quantizer import quantize

    torch.manual_seed(0)
    for n, k, g, bn, sp in ((64, 256, 128, 32, 1), (128, 512, 256, 64, 2), (32, 384, 128, 32, 3)):
        q = quantize(torch.randn(n, k), 3, g)
        lo, hi = pack_planes(q.codes)
        scale, zero = q.scale.half().contiguous(), q.zero.half().contiguous()
        x = torch.randn(1, k).half()
        w = ((q.codes.float().view(n, -1, g) - zero.float()[..., None]) * scale.float()[..., None]).view(n, k)
        ref = x.float() @ w.t()
        err = float((gemv_planes(x, lo, hi, scale, zero, g, bn, sp, 4).float() - ref).norm() / ref.norm())
        print(f"interpreter {n}x{k} group {g} split {sp}: rel. error {err:.1e}")
        assert err < 2e-3, (n, k, g, sp, err)


def bench_shape(name: str, n: int, k: int) -> list[dict]:
    """One 8B shape on the GPU: every prototype tile (error and time) and the product's tuned W3/W4."""
    from quantlrm.kernels import _time, choose, run_config
    from quantlrm.kernels import layout as L
    from quantlrm.quantizer import quantize

    rows = []
    q = quantize(torch.randn(n, k, device="cuda"), 3, 128)
    lo, hi = (t.cuda() for t in pack_planes(q.codes.cpu()))
    scale, zero = q.scale.half().contiguous(), q.zero.half().contiguous()
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    w = ((q.codes.float().view(n, -1, 128) - zero.float()[..., None]) * scale.float()[..., None]).view(n, k)
    ref = x.float() @ w.t()
    best = float("inf")
    for bn, sp, warps in CONFIGS:
        def run(bn=bn, sp=sp, warps=warps):
            return gemv_planes(x, lo, hi, scale, zero, 128, bn, sp, warps)
        err = float((run().float() - ref).norm() / ref.norm())
        us = _time(run) * 1e3
        rows.append(dict(linear=name, kind="planes", config=[bn, sp, warps], relerr=err, us=us))
        best = min(best, us)
        print(f"{name} planes {bn}/{sp}/{warps}: {us:6.1f} us, rel. error {err:.1e}", flush=True)
    nbytes = lo.numel() * 4 + hi.numel() * 4 + scale.numel() * 4
    rows.append(dict(linear=name, kind="planes best", us=best, gbps=nbytes / best / 1e3))
    print(f"{name} planes best {best:.1f} us = {nbytes / best / 1e3:.0f} GB/s", flush=True)
    for bits in (3, 4):
        qb = q if bits == 3 else quantize(torch.randn(n, k, device="cuda"), 4, 128)
        kw = L.from_codes(qb.codes, qb.scale, qb.zero, bits, 128, torch.float16)
        c = choose(x, kw)
        us = _time(lambda kw=kw, c=c: run_config(x, kw, c)) * 1e3
        rows.append(dict(linear=name, kind=f"product W{bits}", config=str(c), us=us, gbps=kw.nbytes() / us / 1e3))
        print(f"{name} product W{bits} ({c}): {us:6.1f} us = {kw.nbytes() / us / 1e3:.0f} GB/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sass", action="store_true", help="compile for sm_90 here and count SASS instructions")
    ap.add_argument("--cpu-check", action="store_true",
                    help="with TRITON_INTERPRET=1: run the kernel (PTX emulated) against dequantize-then-matmul")
    ap.add_argument("--out", default="w3_planes.json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (48, 512), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_planes(*pack_planes(codes), 512), codes), "packer round trip"
    print("packer round trip ok")
    if args.sass:
        sass_counts()
        return
    if args.cpu_check:
        cpu_check()
        return

    res: dict = {"device": torch.cuda.get_device_name(), "rows": []}
    for name, (n, k) in SHAPES.items():
        res["rows"] += bench_shape(name, n, k)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
