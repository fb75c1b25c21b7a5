#!/usr/bin/env python3
# Emulation of cache.cu's divergence reductions (numpy): which elements each
# (block, thread) of qc_l1_partials_* / qc_abs_sum_partials_* reads, for the
# grids launch_cfg::divergence gives (transcribed below), part lengths with and
# without a scalar tail, vector widths of f32 (4) and bf16 (8), parts aligned or
# not. Checks that every element of every part is summed exactly once and by a
# block of its own part, that qc_sum_partials reads each part's partials
# (2 (p * blocks_per_part + i) + j) where the first pass wrote them
# (2 blockIdx.x + j), and that the two passes' sums equal the direct per-part
# sums (f64 reference; f32 per thread as the kernels).
import numpy as np

THREADS, MAX_BLOCKS = 256, 1024


def divergence_cfg(part_len, parts, elem_bytes):
    # launch_cfg::divergence
    parts = max(parts, 1)
    per_block = THREADS * (16 // elem_bytes) * 4
    cap = max(MAX_BLOCKS // parts, 1)
    per_part = min(max(-(-max(part_len, 1) // per_block), 1), cap)
    return per_part * parts, THREADS, per_part


def first_pass(a, b, part_len, parts, V, aligned, l1):
    grid, block, bpp = divergence_cfg(part_len, parts, 16 // V)
    assert grid == parts * bpp
    seen = np.zeros(parts * part_len, dtype=np.int64)
    partials = np.zeros((grid, 2), dtype=np.float64)
    for blk in range(grid):
        part = blk // bpp
        k = blk - part * bpp
        base = part * part_len
        nvec = part_len // V if aligned(base) else 0
        stride = bpp * block
        s = np.zeros((block, 2), dtype=np.float32)
        for t in range(block):
            first = k * block + t
            idx = [i * V + j for i in range(first, nvec, stride) for j in range(V)]
            idx += list(range(nvec * V + first, part_len, stride))
            idx = np.array(idx, dtype=np.int64) + base
            assert np.all(idx // part_len == part) if len(idx) else True
            seen[idx] += 1
            u = a[idx].astype(np.float32)
            if l1:
                v = b[idx].astype(np.float32)
                s[t] = (np.abs(u - v).sum(dtype=np.float32), np.abs(v).sum(dtype=np.float32))
            else:
                s[t] = (np.abs(u).sum(dtype=np.float32), (u * u).sum(dtype=np.float32))
        partials[blk] = s.sum(axis=0, dtype=np.float32)  # block_sum in f32
    assert np.all(seen == 1), "an element summed %s times" % seen[seen != 1][:4]
    return partials.reshape(-1), bpp


def second_pass(flat, parts, bpp):
    out = np.zeros(2 * parts)
    for p in range(parts):
        for j in range(2):
            out[2 * p + j] = sum(float(flat[2 * (p * bpp + i) + j]) for i in range(bpp))
    return out


rng = np.random.default_rng(3)
cases = [(1, 1), (5, 2), (7 * 33, 2), (8192 * 3 + 5, 1), (8192 * 2, 2), (40_000, 3), (3, 7)]
for part_len, parts in cases:
    n = part_len * parts
    a = rng.standard_normal(n)
    b = 0.9 * a + 0.05
    for V in (4, 8):
        elem = 16 // V
        for offset in (0, elem):  # a buffer 16-byte aligned, or a view one element in
            aligned = lambda base: ((offset + base) * elem) % 16 == 0
            for l1 in (True, False):
                flat, bpp = first_pass(a, b, part_len, parts, V, aligned, l1)
                got = second_pass(flat, parts, bpp)
                for p in range(parts):
                    r = slice(p * part_len, (p + 1) * part_len)
                    want = (np.abs(a[r] - b[r]).sum(), np.abs(b[r]).sum()) if l1 else (np.abs(a[r]).sum(), (a[r] ** 2).sum())
                    for g, w in zip(got[2 * p:2 * p + 2], want):
                        assert abs(g - w) <= 1e-5 * abs(w) + 1e-12, (part_len, parts, V, offset, l1, p, g, w)
print("cache.cu reductions: every element once, partials where the second pass reads them, sums match")
