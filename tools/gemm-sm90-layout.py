#!/usr/bin/env python3
# Emulation of gemm_sm90.cu's shared-memory addressing (numpy):
#  - TMA with CU_TENSOR_MAP_SWIZZLE_128B writes box element (row, k) of a
#    {64 bf16 x rows} box at byte  lin ^ (((lin >> 7) & 7) << 4),
#    lin = row * 128 + 2 k (box base 1 KiB aligned; CUTLASS Swizzle<3,4,3>);
#  - wgmma reads a K-major SW128 operand through the descriptor: start address
#    (bits 0-13, >>4), SBO (bits 32-45, >>4), layout bits 62-63 = 1; element
#    (r, k) of the 64x16 (A) / 128x16 (B) operand at
#    a = start + (r // 8) * SBO + (r % 8) * 128 + 2 k, then the same XOR on a
#    (PTX ISA "matrix descriptor": swizzle applied to the computed address,
#    base offset 0 when the pattern's 1 KiB repeat is aligned).
import numpy as np

def desc(addr):
    return ((addr & 0x3FFFF) >> 4) | (1 << 16) | ((1024 >> 4) << 32) | (1 << 62)

def decode(d):
    return dict(start=(d & 0x3FFF) << 4, lbo=((d >> 16) & 0x3FFF) << 4,
                sbo=((d >> 32) & 0x3FFF) << 4, base_off=(d >> 49) & 7, layout=d >> 62)

def sw(a):
    return a ^ (((a >> 7) & 7) << 4)

BM = BN = 128; BK = 64; STAGES = 3
A_BYTES = BM * BK * 2; STAGE = 2 * A_BYTES
rng = np.random.default_rng(1)
smem = np.full(1024 + STAGES * STAGE, -1, dtype=np.int64)  # element id per 2 bytes (at even byte)
dyn_base = 0x3a0  # some unaligned dynamic-smem start; the kernel rounds up to 1 KiB
base = (dyn_base + 1023) & ~1023
ok = True
for stage in range(STAGES):
    A = rng.integers(0, 1 << 40, size=(BM, BK)); W = rng.integers(0, 1 << 40, size=(BN, BK))
    for tile, M, off in ((A, BM, 0), (W, BN, A_BYTES)):
        box = base + stage * STAGE + off
        assert box % 1024 == 0
        for r in range(M):
            for k in range(BK):
                lin = r * 128 + 2 * k
                smem[(box + sw(lin) - base) // 2] = tile[r, k]   # swizzle is relative to a 1 KiB aligned box
    for wg in range(2):
        a_tile = base + stage * STAGE + wg * 64 * 128
        b_tile = base + stage * STAGE + A_BYTES
        for ks in range(BK // 16):
            for (t, rows, r0, start) in ((A, 64, 64 * wg, a_tile + 32 * ks), (W, 128, 0, b_tile + 32 * ks)):
                d = decode(desc(start))
                assert d["layout"] == 1 and d["sbo"] == 1024 and d["base_off"] == 0
                assert d["start"] == start  # < 256 KiB: fits the 14-bit field
                for r in range(rows):
                    for k in range(16):
                        a = d["start"] + (r // 8) * d["sbo"] + (r % 8) * 128 + 2 * k
                        # the XOR acts on address bits, and the tile base is 1 KiB aligned
                        got = smem[sw(a - base) // 2]
                        if got != t[r0 + r, 16 * ks + k]:
                            ok = False
print("SW128 TMA placement == wgmma descriptor reads for every stage, warpgroup, k16 step:", ok)

# Accumulator fragment of m64nNk16 (PTX ISA figure "WGMMA .m64nNk16 D"): thread
# t = 32 w + l holds d[i] at row 16 w + l/4 + 8 ((i/2) % 2), col 8 (i/4) + 2 (l%4) + (i%2).
# The epilogue's (h, j) loop must visit each (row, col) of the 64 x 128 tile once.
seen = np.zeros((64, 128), dtype=int)
for w in range(4):
    for l in range(32):
        for h in range(2):
            for j in range(16):
                for c in range(2):
                    i = 4 * j + 2 * h + c
                    row = 16 * w + l // 4 + 8 * ((i // 2) % 2)
                    col = 8 * (i // 4) + 2 * (l % 4) + (i % 2)
                    assert row == 16 * w + l // 4 + 8 * h and col == 8 * j + 2 * (l % 4) + c
                    seen[row, col] += 1
print("epilogue covers the 64x128 accumulator tile exactly once:", bool((seen == 1).all()))
assert ok and (seen == 1).all()
