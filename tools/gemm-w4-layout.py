#!/usr/bin/env python3
# Emulation of gemm_w4.cu's operand path for one 128 x 128 tile and one group
# of 64 inputs (numpy), against the integer product of the unpacked weights:
#  - the W4 weight in qc_types.h's packed format (q + 8, k = 2j low nibble of
#    byte j), reordered into the device layout (byte 4j' + i of a row: k = 8j' + i
#    high nibble, 8j' + 4 + i low nibble) independently of the Rust code;
#  - the stage as the kernel's cp.async copies lay it out: a rows 64 bytes
#    apart, w rows 32 bytes apart (one group per k-tile);
#  - every lane's lds128 / lds64 at the kernel's offsets, widen_high /
#    widen_low, the a_step0 / a_step1 register order, and mma.m16n8k32 .s8
#    evaluated from the per-lane fragments as the PTX ISA defines them
#    (A: a0 rows g / k 4t..4t+3, a1 rows g+8, a2 rows g / k 16+4t.., a3 rows g+8;
#    B: b0 k 4t..4t+3 / column g, b1 k 16+4t..; C/D: c0 c1 row g columns 2t, 2t+1,
#    c2 c3 row g+8), starting from MAGIC in every accumulator;
#  - (MAGIC + 16 acc) >> 4 trick and the f32 conversion int_as_float - 786432.
# Also checks the shared-memory bank pattern of the fragment loads.
import numpy as np

rng = np.random.default_rng(7)
BM = BN = 128; GROUP = 64; A_ROW = 64; W_ROW = 32
MAGIC = 0x49400000

a = rng.integers(-127, 128, size=(BM, GROUP), dtype=np.int64)
q = rng.integers(-7, 8, size=(BN, GROUP), dtype=np.int64)
q[0, :] = -7; a[0, :] = -127          # extreme group sums
q[1, :] = 7; a[1, :] = -127
ref = a @ q.T                          # acc[m, n]

# Packed format (qc_types.h): byte j = (q[2j] + 8) | (q[2j + 1] + 8) << 4.
nib = (q + 8).astype(np.uint8)
packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)     # [BN, 32]
# Device layout: byte 4j' + i = (nib[8j' + i] << 4) | nib[8j' + 4 + i].
def nib_of(row, k):
    b = packed[row, k // 2]
    return (b >> 4) if k % 2 else (b & 15)
dev = np.zeros_like(packed)
for r in range(BN):
    for word in range(W_ROW // 4):
        for i in range(4):
            dev[r, 4 * word + i] = (nib_of(r, 8 * word + i) << 4) | nib_of(r, 8 * word + 4 + i)

A_BYTES = BM * A_ROW
smem = np.zeros(A_BYTES + BN * W_ROW, dtype=np.uint8)
smem[:A_BYTES] = a.astype(np.int8).view(np.uint8).reshape(-1)
smem[A_BYTES:] = dev.reshape(-1)

def u32(addr):
    return int.from_bytes(bytes(smem[addr:addr + 4]), "little")

def s8x4(word):
    return [((word >> (8 * i)) & 0xFF) - 256 * (((word >> (8 * i)) & 0xFF) >= 128) for i in range(4)]

def widen_high(w):
    return (w & 0xF0F0F0F0) ^ 0x80808080

def widen_low(w):
    return ((w << 4) & 0xF0F0F0F0) ^ 0x80808080

ok = True
for warp in range(8):
    warp_m, warp_n = warp >> 2, warp & 3
    # Per lane: b[j][0..3] and, per mma tile row i, a_step0 / a_step1.
    B = {}; Afr = {}
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        a_off = (warp_m * 64 + g) * A_ROW + t * 16
        w_off = A_BYTES + (warp_n * 32 + g) * W_ROW + t * 8
        for j in range(4):
            base = w_off + j * 8 * W_ROW
            vx, vy = u32(base), u32(base + 4)
            B[lane, j] = [widen_high(vx), widen_low(vx), widen_high(vy), widen_low(vy)]
        for i in range(4):
            lo = [u32(a_off + i * 16 * A_ROW + 4 * x) for x in range(4)]
            hi = [u32(a_off + (i * 16 + 8) * A_ROW + 4 * x) for x in range(4)]
            Afr[lane, i] = ([lo[0], hi[0], lo[1], hi[1]], [lo[2], hi[2], lo[3], hi[3]])
    for i in range(4):
        for j in range(4):
            # Fragments -> matrices per the PTX layouts, then D = MAGIC + A0 B0 + A1 B1.
            D = np.full((16, 8), MAGIC, dtype=np.int64)
            for step in range(2):
                Am = np.zeros((16, 32), dtype=np.int64)
                Bm = np.zeros((32, 8), dtype=np.int64)
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    regs = Afr[lane, i][step]
                    for reg, (row, kb) in enumerate([(g, 4 * t), (g + 8, 4 * t), (g, 16 + 4 * t), (g + 8, 16 + 4 * t)]):
                        Am[row, kb:kb + 4] = s8x4(regs[reg])
                    b0, b1 = B[lane, j][2 * step], B[lane, j][2 * step + 1]
                    Bm[4 * t:4 * t + 4, g] = s8x4(b0)
                    Bm[16 + 4 * t:16 + 4 * t + 4, g] = s8x4(b1)
                D += Am @ Bm
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for r in range(4):
                    row = warp_m * 64 + i * 16 + g + 8 * (r >> 1)
                    col = warp_n * 32 + j * 8 + 2 * t + (r & 1)
                    d = int(D[g + 8 * (r >> 1), 2 * t + (r & 1)])
                    acc = (d - MAGIC) >> 4
                    as_f = np.array([d], dtype=np.int32).view(np.float32)[0]
                    x = np.float32(as_f) - np.float32(786432.0)
                    if acc != ref[row, col] or x != np.float32(ref[row, col]) or (d - MAGIC) % 16:
                        ok = False
                        print(f"MISMATCH warp {warp} lane {lane} (i, j, r) = ({i}, {j}, {r}): {acc} / {x} vs {ref[row, col]}")
print("max |acc| in this tile:", np.abs(ref).max())

# Bank conflicts: lds128 (quarter-warp phases of 8 lanes) and lds64 (half-warp phases).
def conflicts(addrs, width, lanes_per_phase):
    worst = 1
    for ph in range(0, 32, lanes_per_phase):
        banks = {}
        for ad in addrs[ph:ph + lanes_per_phase]:
            for w in range(width // 4):
                bank = ((ad // 4) + w) % 32
                banks.setdefault(bank, set()).add((ad // 4) + w)
        worst = max(worst, max(len(v) for v in banks.values()))
    return worst
a_addrs = [((lane >> 2)) * A_ROW + (lane & 3) * 16 for lane in range(32)]
w_addrs = [A_BYTES + (lane >> 2) * W_ROW + (lane & 3) * 8 for lane in range(32)]
s_addrs = [A_BYTES + BN * W_ROW + 2 * (lane & 3) * 4 for lane in range(32)]
print("bank-conflict ways: a lds128", conflicts(a_addrs, 16, 8), "w lds64", conflicts(w_addrs, 8, 16),
      "scales lds64 (broadcast)", conflicts(s_addrs, 8, 16))
print("OK" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
