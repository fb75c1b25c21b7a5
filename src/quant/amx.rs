//! Intel AMX (Advanced Matrix Extensions) for the integer GEMMs and the bf16
//! attention, where the CPU and the kernel allow it: `tdpbsud` multiplies a
//! 16 x 64 tile of signed int8 activations by a 64 x 16 tile of unsigned
//! weight bytes into 16 x 16 int32, 16384 multiply-adds per instruction
//! (`vpdpbusd` does 64); `tdpbssd` takes signed weight bytes; `tdpbf16ps`
//! multiplies 16 x 32 bf16 by 32 x 16 bf16 into 16 x 16 f32.
//!
//! The W8A8 weights need no layout of their own: [`Int8Weight`](super::int8::Int8Weight)'s
//! VNNI packing (`[n / 16][k / 4][16][4]`, `w + 128`) already is AMX's B-tile
//! layout, 16 k-groups of one block being 16 consecutive 64-byte rows. So the
//! shift correction, the dequantization and the results are those of the VNNI
//! kernel, bit for bit. The W4 GEMM widens its nibbles into that layout per
//! task (`int4`).
//!
//! Rust has no stable AMX intrinsics: the instructions are inline assembly,
//! the tile registers named in it (the compiler never allocates them). Linux
//! grants AMX's 8 KiB register state per process on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); without the grant the first tile
//! instruction would fault, so [`available`] asks first and says no if refused.

use std::arch::asm;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The `ldtilecfg` operand (palette 1): every tile used here is 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

static CONFIG: TileConfig = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0], rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0] };

/// Rows of one tile, and k (bytes) per tile product.
pub const TILE_ROWS: usize = 16;
pub const TILE_K: usize = 64;

static OFF: AtomicBool = AtomicBool::new(false);

/// Whether the int8 GEMMs use AMX: the CPU has AMX-TILE and AMX-INT8 (and the
/// AVX-512 VNNI of the epilogues and edge rows), the kernel granted the tile
/// state, `QC_AMX` is not `0`, and no benchmark turned it off ([`set_enabled`]).
pub fn available() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    !OFF.load(Ordering::Relaxed) && *SUPPORTED.get_or_init(|| super::vnni::available() && usable(AMX_INT8))
}

/// Whether the bf16 attention uses AMX: as [`available`], with AMX-BF16 and
/// AVX-512 BF16 (the softmax's conversions) in place of AMX-INT8 and VNNI.
pub fn bf16_available() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    !OFF.load(Ordering::Relaxed) && *SUPPORTED.get_or_init(|| std::arch::is_x86_feature_detected!("avx512bf16") && usable(AMX_BF16))
}

/// CPUID leaf 7 EDX bits: AMX-BF16, AMX-TILE, AMX-INT8.
const AMX_BF16: u32 = 1 << 22;
const AMX_TILE: u32 = 1 << 24;
const AMX_INT8: u32 = 1 << 25;

/// `QC_AMX` is not `0`, the CPU has AMX-TILE and `feature`, and the kernel
/// grants the tile state.
fn usable(feature: u32) -> bool {
    std::env::var("QC_AMX").map_or(true, |v| v != "0") && cpu_has(AMX_TILE | feature) && request_tile_state()
}

/// Turns AMX off (or back on, where [`available`] allows it) for the whole
/// process: `qc-bench` times the VNNI and the AMX kernels in the same run.
pub fn set_enabled(on: bool) {
    OFF.store(!on, Ordering::Relaxed);
}

/// CPUID leaf 7: every bit of `bits` set in EDX.
fn cpu_has(bits: u32) -> bool {
    use std::arch::x86_64::__cpuid_count;
    __cpuid_count(0, 0).eax >= 7 && __cpuid_count(7, 0).edx & bits == bits
}

/// Linux: asks for the tile data state (XFEATURE 18) for this process.
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it fails cleanly on
    // kernels that do not know it.
    cfg!(target_os = "linux") && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
}

/// The macro tiles of rows `r0 .. r1` (whole tiles) x 16-channel blocks
/// `b0 .. b1`, block pairs outermost: `(first row, row tiles, first block,
/// channel tiles)`, 32 rows x 2 blocks, with 16-row and 1-block ones at the edges.
pub fn macro_tiles(r0: usize, r1: usize, b0: usize, b1: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    (b0..b1).step_by(2).flat_map(move |b| (r0..r1).step_by(2 * TILE_ROWS).map(move |r| (r, if r1 - r >= 2 * TILE_ROWS { 2 } else { 1 }, b, 2.min(b1 - b))))
}

/// One product of [`Tiles::bf16_products`]: its operands, chunks and result.
#[derive(Clone, Copy)]
pub struct Bf16Job {
    pub a: *const u8,
    pub b: *const u8,
    pub chunks: usize,
    pub out: *mut f32,
}

/// The 2 x 2 tiles of int32 results (32 rows x 32 channels) of one macro tile,
/// as [`Tiles::run`] stores them: row `r`, channel `c` at `[r][c]`.
#[repr(C, align(64))]
pub struct Results(pub [[i32; 32]; 32]);

/// Tile products on the calling thread: proof that its tile configuration is
/// loaded. The configuration stays loaded for the thread's life (the kernel
/// saves it with the thread's state): `ldtilecfg` and `tilerelease` cost
/// hundreds of cycles, more than a small attention task's products.
pub struct Tiles(std::marker::PhantomData<*const ()>);

thread_local! {
    static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Tiles {
    /// Loads the tile configuration on this thread, once.
    ///
    /// # Safety
    /// [`available`] or [`bf16_available`] returned true in this process.
    #[inline]
    pub unsafe fn new() -> Self {
        if !CONFIGURED.get() {
            asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
            CONFIGURED.set(true);
        }
        Tiles(std::marker::PhantomData)
    }

    /// `out[i * 16 + r][j * 16 + c] = sum_k a_i[r][k] * b_j[k][c]` for the
    /// `RT` row tiles `i` and `CT` channel tiles `j` (1 or 2 each; the rest of
    /// `out` is left as it was), over `chunks` k-chunks of 64 bytes, the B
    /// bytes unsigned (`tdpbsud`) or, where `SIGNED`, signed (`tdpbssd`):
    /// `a_i` is 16 rows of signed bytes at `a + i * 16 * lda`, `lda` apart;
    /// `b_j` holds 16 k-groups of 4 bytes for 16 channels per chunk, the
    /// chunks `b_step` bytes apart and the tiles at `b + j * b_next`.
    ///
    /// # Safety
    /// Every byte named above is readable.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run<const RT: usize, const CT: usize, const SIGNED: bool>(&self, a: *const i8, lda: usize, b: *const u8, b_next: usize, b_step: usize, chunks: usize, out: &mut Results) {
        // tmm0..3: results (i, j) = tmm(2i + j); tmm4, 5: a_0, a_1; tmm6, 7: b_0, b_1.
        asm!("tilezero tmm0", options(nostack, nomem));
        if CT == 2 {
            asm!("tilezero tmm1", options(nostack, nomem));
        }
        if RT == 2 {
            asm!("tilezero tmm2", options(nostack, nomem));
            if CT == 2 {
                asm!("tilezero tmm3", options(nostack, nomem));
            }
        }
        let (mut ap, mut bp) = (a, b);
        let a1_off = TILE_ROWS * lda;
        for _ in 0..chunks {
            asm!("tileloadd tmm4, [{p} + {s} * 1]", p = in(reg) ap, s = in(reg) lda, options(nostack, readonly));
            asm!("tileloadd tmm6, [{p} + {s} * 1]", p = in(reg) bp, s = in(reg) TILE_K, options(nostack, readonly));
            if SIGNED { asm!("tdpbssd tmm0, tmm4, tmm6", options(nostack, nomem)) } else { asm!("tdpbsud tmm0, tmm4, tmm6", options(nostack, nomem)) }
            if CT == 2 {
                asm!("tileloadd tmm7, [{p} + {s} * 1]", p = in(reg) bp.add(b_next), s = in(reg) TILE_K, options(nostack, readonly));
                if SIGNED { asm!("tdpbssd tmm1, tmm4, tmm7", options(nostack, nomem)) } else { asm!("tdpbsud tmm1, tmm4, tmm7", options(nostack, nomem)) }
            }
            if RT == 2 {
                asm!("tileloadd tmm5, [{p} + {s} * 1]", p = in(reg) ap.add(a1_off), s = in(reg) lda, options(nostack, readonly));
                if SIGNED { asm!("tdpbssd tmm2, tmm5, tmm6", options(nostack, nomem)) } else { asm!("tdpbsud tmm2, tmm5, tmm6", options(nostack, nomem)) }
                if CT == 2 {
                    if SIGNED { asm!("tdpbssd tmm3, tmm5, tmm7", options(nostack, nomem)) } else { asm!("tdpbsud tmm3, tmm5, tmm7", options(nostack, nomem)) }
                }
            }
            ap = ap.add(TILE_K);
            bp = bp.add(b_step);
        }
        const STRIDE: usize = 32 * 4;
        let o = out.0.as_mut_ptr() as *mut u8;
        asm!("tilestored [{p} + {s} * 1], tmm0", p = in(reg) o, s = in(reg) STRIDE, options(nostack));
        if CT == 2 {
            asm!("tilestored [{p} + {s} * 1], tmm1", p = in(reg) o.add(64), s = in(reg) STRIDE, options(nostack));
        }
        if RT == 2 {
            asm!("tilestored [{p} + {s} * 1], tmm2", p = in(reg) o.add(16 * STRIDE), s = in(reg) STRIDE, options(nostack));
            if CT == 2 {
                asm!("tilestored [{p} + {s} * 1], tmm3", p = in(reg) o.add(16 * STRIDE + 64), s = in(reg) STRIDE, options(nostack));
            }
        }
    }

    /// Tiles of f32 products of bf16 pairs (`tdpbf16ps`), four at a time in
    /// separate registers so that their latencies overlap: for each job,
    /// `out[r][c] = sum_i sum_k a_i[r][k] * b_i[k][c]` (16 x 16, stored in
    /// rows of 64 bytes) over its `chunks` chunks `i` of 32 k: `a_i` is 16
    /// rows of 32 bf16 at `a + i * a_step`, `lda` bytes apart; `b_i` is 16
    /// rows of 16 pairs `(b[2p][c], b[2p + 1][c])` (64 bytes each) at `b + i *
    /// b_step`.
    ///
    /// # Safety
    /// [`bf16_available`] returned true; every byte named above is readable,
    /// and every `out` writable.
    #[inline]
    pub unsafe fn bf16_products(&self, jobs: &[Bf16Job], lda: usize, a_step: usize, b_step: usize) {
        // tmm0..3: results; tmm4, 5: a; tmm6, 7: b (alternating between jobs).
        macro_rules! product {
            ($c:literal, $ta:literal, $tb:literal, $job:expr, $i:expr) => {{
                let job: &Bf16Job = $job;
                if $i < job.chunks {
                    asm!(concat!("tileloadd tmm", $ta, ", [{p} + {s} * 1]"), p = in(reg) job.a.add($i * a_step), s = in(reg) lda, options(nostack, readonly));
                    asm!(concat!("tileloadd tmm", $tb, ", [{p} + {s} * 1]"), p = in(reg) job.b.add($i * b_step), s = in(reg) TILE_K, options(nostack, readonly));
                    asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $ta, ", tmm", $tb), options(nostack, nomem));
                }
            }};
        }
        for group in jobs.chunks(4) {
            let n = group.len();
            asm!("tilezero tmm0", options(nostack, nomem));
            asm!("tilezero tmm1", options(nostack, nomem));
            asm!("tilezero tmm2", options(nostack, nomem));
            asm!("tilezero tmm3", options(nostack, nomem));
            let chunks = group.iter().map(|j| j.chunks).max().unwrap_or(0);
            for i in 0..chunks {
                product!("0", "4", "6", &group[0], i);
                if n > 1 {
                    product!("1", "5", "7", &group[1], i);
                }
                if n > 2 {
                    product!("2", "4", "6", &group[2], i);
                }
                if n > 3 {
                    product!("3", "5", "7", &group[3], i);
                }
            }
            asm!("tilestored [{p} + {s} * 1], tmm0", p = in(reg) group[0].out, s = in(reg) TILE_K, options(nostack));
            if n > 1 {
                asm!("tilestored [{p} + {s} * 1], tmm1", p = in(reg) group[1].out, s = in(reg) TILE_K, options(nostack));
            }
            if n > 2 {
                asm!("tilestored [{p} + {s} * 1], tmm2", p = in(reg) group[2].out, s = in(reg) TILE_K, options(nostack));
            }
            if n > 3 {
                asm!("tilestored [{p} + {s} * 1], tmm3", p = in(reg) group[3].out, s = in(reg) TILE_K, options(nostack));
            }
        }
    }

    /// [`Tiles::run`] for `rt` row tiles and `ct` channel tiles (1 or 2)
    /// known at run time, as [`macro_tiles`] gives them.
    ///
    /// # Safety
    /// As for [`Tiles::run`].
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_sized<const SIGNED: bool>(&self, rt: usize, ct: usize, a: *const i8, lda: usize, b: *const u8, b_next: usize, b_step: usize, chunks: usize, out: &mut Results) {
        match (rt, ct) {
            (2, 2) => self.run::<2, 2, SIGNED>(a, lda, b, b_next, b_step, chunks, out),
            (2, _) => self.run::<2, 1, SIGNED>(a, lda, b, b_next, b_step, chunks, out),
            (_, 2) => self.run::<1, 2, SIGNED>(a, lda, b, b_next, b_step, chunks, out),
            _ => self.run::<1, 1, SIGNED>(a, lda, b, b_next, b_step, chunks, out),
        }
    }
}

