#!/usr/bin/env python3
# Lane-level emulation of kernels/attention_wide.cu (numpy): its shared-memory
# layout and address formulas, ldmatrix .x4 / .x4.trans and mma.sync m16n8k16
# as the PTX ISA defines their fragments (lane l = 4 g + q: A rows g, g + 8 and
# columns 2q, 2q + 1 (+ 8); B rows 2q, 2q + 1 (+ 8) of column g; C rows g, g + 8,
# columns 2q, 2q + 1), the phases of each key tile in barrier order (S = Q K^T
# by row block and key half, row maxima and sums exchanged through shared
# memory, P in bf16, O = O alpha + P V by head-dim columns), masking and padding
# (unwritten shared memory is NaN, so reading it shows), against a float64
# softmax attention. Run: python3 tools/attention-wide-layout.py [seed]
import sys

import numpy as np

def bf16(x):
    x = np.asarray(x, dtype=np.float32)
    b = x.view(np.uint32).astype(np.uint64)
    b = ((b + 0x7fff + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)

LANES = np.arange(32)

def ldmatrix_x4(smem, addr, trans=False):
    """addr[lane]: element offset of the row lane supplies. Returns r[4][32][2] (lo, hi)."""
    r = np.zeros((4, 32, 2), np.float32)
    for i in range(4):
        m = np.stack([smem[addr[8 * i + row]: addr[8 * i + row] + 8] for row in range(8)])  # 8x8
        for l in range(32):
            if not trans:
                r[i, l] = m[l // 4, 2 * (l % 4): 2 * (l % 4) + 2]
            else:
                r[i, l] = m[2 * (l % 4): 2 * (l % 4) + 2, l // 4]
    return r

def mma(c, a, b0, b1):
    """c: [32][4]; a: [4][32][2]; b0, b1: [32][2] -> c + A B (PTX m16n8k16 fragments)."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for l in range(32):
        g, q = l // 4, l % 4
        A[g, 2*q:2*q+2] = a[0][l]; A[g+8, 2*q:2*q+2] = a[1][l]
        A[g, 2*q+8:2*q+10] = a[2][l]; A[g+8, 2*q+8:2*q+10] = a[3][l]
        B[2*q:2*q+2, g] = b0[l]; B[2*q+8:2*q+10, g] = b1[l]
        C[g, 2*q:2*q+2] = c[l, 0:2]; C[g+8, 2*q:2*q+2] = c[l, 2:4]
    D = (A @ B + C).astype(np.float32)
    out = np.zeros((32, 4), np.float32)
    for l in range(32):
        g, q = l // 4, l % 4
        out[l, 0:2] = D[g, 2*q:2*q+2]; out[l, 2:4] = D[g+8, 2*q:2*q+2]
    return out

def run(HDP, hd, q_len, kv_len, q, k, v, scale, q0):
    BM = 64; BN = 32 if HDP == 512 else 64
    SROW = HDP + 8; PROW = BN + 8; OW = HDP // 8; ON = OW // 8; SN = BN // 16; KB = HDP // 16
    # flat bf16 shared memory: Q rows, K rows, V rows, then P
    K_OFF = BM * SROW; V_OFF = K_OFF + BN * SROW; P_OFF = V_OFF + BN * SROW
    smem = np.full(P_OFF + BM * PROW, np.nan, np.float32)
    smem[:P_OFF] = np.nan
    # zero padding columns [hd, HDP) of Q, K, V rows (and the +8 row pad stays NaN: must never be read)
    for r in range(BM + 2 * BN):
        smem[r * SROW + hd: r * SROW + HDP] = 0
    def load(off, rows, src, start, n):
        for r in range(rows):
            i = start + r
            smem[off + r * SROW: off + r * SROW + hd] = src[i, :hd] if i < n else 0
    rows_left = q_len - q0
    load(0, BM, q, q0, q_len)
    stats_max = np.full((2, BM), np.nan, np.float32); stats_sum = np.full((2, BM), np.nan, np.float32)
    alpha_s = np.full(BM, np.nan, np.float32)
    o = np.zeros((8, 4, ON, 32, 4), np.float32)
    m_run = np.full((8, 32, 2), -np.inf, np.float32); l_run = np.zeros((8, 32, 2), np.float32)
    scale_log2 = np.float32(scale * 1.4426950408889634)
    kv_tiles = (kv_len + BN - 1) // BN
    g_, qd = LANES >> 2, LANES & 3
    for t in range(kv_tiles):
        key0 = t * BN
        load(K_OFF, BN, k, key0, kv_len)
        load(V_OFF, BN, v, key0, kv_len)
        S = np.zeros((8, SN, 32, 4), np.float32)
        alpha_w = np.zeros((8, 32, 2), np.float32)
        for warp in range(8):
            rb, kh = warp & 3, warp >> 2
            s = S[warp]
            if rb * 16 < rows_left:
                for kb in range(KB):
                    if kb * 16 >= hd: break
                    qf = ldmatrix_x4(smem, (rb * 16 + (LANES & 15)) * SROW + kb * 16 + (LANES >> 4) * 8)
                    for n2 in range(SN // 2):
                        kr = kh * (BN // 2) + n2 * 16
                        if key0 + kr >= kv_len: continue
                        b = ldmatrix_x4(smem, K_OFF + (kr + (LANES & 7) + ((LANES >> 4) << 3)) * SROW + kb * 16 + ((LANES >> 3) & 1) * 8)
                        s[2*n2] = mma(s[2*n2], qf, b[0], b[1]); s[2*n2+1] = mma(s[2*n2+1], qf, b[2], b[3])
            partial = key0 + BN > kv_len
            mx = np.full((32, 2), -np.inf, np.float32)
            for n in range(SN):
                for e in range(4):
                    x = s[n][:, e] * scale_log2
                    if partial:
                        x = np.where(key0 + kh * (BN // 2) + n * 8 + qd * 2 + (e & 1) >= kv_len, -np.inf, x)
                    s[n][:, e] = x
                    mx[:, e >> 1] = np.maximum(mx[:, e >> 1], x)
            for hr in range(2):
                m = mx[:, hr].reshape(8, 4).max(axis=1).repeat(4)  # shfl xor 1, 2 within quads
                for l in range(32):
                    if qd[l] == 0: stats_max[kh, rb * 16 + g_[l] + hr * 8] = m[l]
        # after sync #1
        for warp in range(8):
            rb, kh = warp & 3, warp >> 2
            s = S[warp]
            for hr in range(2):
                row = rb * 16 + g_ + hr * 8
                m_new = np.maximum(m_run[warp, :, hr], np.maximum(stats_max[0, row], stats_max[1, row]))
                alpha = np.exp2(m_run[warp, :, hr] - m_new).astype(np.float32)
                m_run[warp, :, hr] = m_new
                alpha_w[warp, :, hr] = alpha
                ssum = np.zeros(32, np.float32)
                for n in range(SN):
                    s[n][:, 2*hr] = np.exp2(s[n][:, 2*hr] - m_new); s[n][:, 2*hr+1] = np.exp2(s[n][:, 2*hr+1] - m_new)
                    ssum += s[n][:, 2*hr] + s[n][:, 2*hr+1]
                ssum = ssum.reshape(8, 4).sum(axis=1).repeat(4)
                for l in range(32):
                    if qd[l] == 0:
                        stats_sum[kh, row[l]] = ssum[l]
                        if kh == 0: alpha_s[row[l]] = alpha[l]
            for n in range(SN):
                for l in range(32):
                    pr = P_OFF + (rb * 16 + g_[l]) * PROW + kh * (BN // 2) + n * 8 + qd[l] * 2
                    smem[pr: pr + 2] = bf16(s[n][l, 0:2]); smem[pr + 8 * PROW: pr + 8 * PROW + 2] = bf16(s[n][l, 2:4])
        # after sync #2
        for warp in range(8):
            rb = warp & 3; col0 = warp * OW
            for hr in range(2):
                row = rb * 16 + g_ + hr * 8
                l_run[warp, :, hr] = l_run[warp, :, hr] * alpha_w[warp, :, hr] + (stats_sum[0, row] + stats_sum[1, row])
            if col0 >= hd: continue
            for mb in range(4):
                a0 = alpha_s[mb * 16 + g_]; a1 = alpha_s[mb * 16 + g_ + 8]
                o[warp, mb, :, :, 0:2] *= a0[None, :, None]; o[warp, mb, :, :, 2:4] *= a1[None, :, None]
            for kk in range(BN // 16):
                if key0 + kk * 16 >= kv_len: break
                pa = [ldmatrix_x4(smem, P_OFF + (mb * 16 + (LANES & 15)) * PROW + kk * 16 + (LANES >> 4) * 8) if mb * 16 < rows_left else None for mb in range(4)]
                for d2 in range(OW // 16):
                    if col0 + d2 * 16 >= hd: break
                    b = ldmatrix_x4(smem, V_OFF + (kk * 16 + (LANES & 7) + ((LANES >> 3) & 1) * 8) * SROW + col0 + d2 * 16 + (LANES >> 4) * 8, trans=True)
                    for mb in range(4):
                        if mb * 16 < rows_left:
                            o[warp, mb, 2*d2] = mma(o[warp, mb, 2*d2], pa[mb], b[0], b[1])
                            o[warp, mb, 2*d2+1] = mma(o[warp, mb, 2*d2+1], pa[mb], b[2], b[3])
    inv_l = np.full(BM, np.nan, np.float32)
    for warp in range(4):  # kh == 0
        for l in range(32):
            if qd[l] == 0:
                inv_l[warp * 16 + g_[l]] = 1 / l_run[warp, l, 0]; inv_l[warp * 16 + g_[l] + 8] = 1 / l_run[warp, l, 1]
    out = np.full((BM, HDP), np.nan, np.float32)
    for warp in range(8):
        col0 = warp * OW
        if col0 >= hd: continue
        for mb in range(4):
            for hr in range(2):
                for l in range(32):
                    r = mb * 16 + g_[l] + hr * 8
                    if r >= rows_left: continue
                    for n in range(ON):
                        c = col0 + n * 8 + qd[l] * 2
                        if c < hd:
                            out[r, c:c+2] = bf16(o[warp, mb, n, l, 2*hr:2*hr+2] * inv_l[r])
    return out[:max(0, min(BM, rows_left)), :hd]

def reference(q, k, v, scale):
    s = (q.astype(np.float64) @ k.astype(np.float64).T) * scale
    s -= s.max(axis=1, keepdims=True)
    p = np.exp(s)
    return (p @ v.astype(np.float64)) / p.sum(axis=1, keepdims=True)

rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
for HDP, hd, q_len, kv_len, amp in [(512, 512, 70, 45, 1.0), (512, 264, 64, 33, 2.0), (256, 136, 20, 130, 2.0), (256, 256, 64, 64, 1.0), (512, 504, 9, 100, 3.0)]:
    q = bf16(rng.uniform(-amp, amp, (q_len, hd))); k = bf16(rng.uniform(-amp, amp, (kv_len, hd))); v = bf16(rng.uniform(-1, 1, (kv_len, hd)))
    scale = 1 / np.sqrt(hd)
    want = reference(q, k, v, scale)
    got = np.concatenate([run(HDP, hd, q_len, kv_len, q, k, v, scale, q0) for q0 in range(0, q_len, 64)])
    assert np.isfinite(got).all(), "unwritten output"
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"HDP {HDP} hd {hd} q_len {q_len} kv_len {kv_len}: rel L2 {rel:.2e}")
    assert rel < 1e-2
print("ok")
