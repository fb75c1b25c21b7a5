//! Runtime dispatch of the backend's own loops to the widest vector unit.
//!
//! The crate is compiled for baseline x86-64 (SSE2) so that one binary runs on
//! any x86-64 machine, including a lent GPU host. [`multiversion!`] compiles a
//! function body three times (AVX-512, AVX2 + FMA, baseline) and picks one per
//! call from the CPU's features (a cached atomic read). The body's helpers must
//! be `#[inline(always)]` so that they are compiled inside each version.

/// The instruction set a multiversioned function runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2Fma,
    Baseline,
}

/// What this CPU supports (x86-64-v4 / v3 / baseline), detected once: the
/// five feature checks cost more than a short row's work (measured: 1% of a
/// demo step, called per row and per head).
#[inline]
pub fn level() -> Level {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(0);
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Avx512,
        2 => Level::Avx2Fma,
        3 => Level::Baseline,
        _ => {
            let l = detect();
            LEVEL.store(match l { Level::Avx512 => 1, Level::Avx2Fma => 2, Level::Baseline => 3 }, Ordering::Relaxed);
            l
        }
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") && has!("fma") {
            return Level::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Level::Avx2Fma;
        }
    }
    Level::Baseline
}

/// `fn name(args) -> ret { body }` becomes a function that runs `body`
/// compiled for the best [`Level`] of this CPU. Arguments must be plain
/// identifiers with concrete types.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                match $crate::backend::cpu::simd::level() {
                    // SAFETY: level() checked that the CPU has these features.
                    $crate::backend::cpu::simd::Level::Avx512 => return unsafe { v4($($arg),*) },
                    $crate::backend::cpu::simd::Level::Avx2Fma => return unsafe { v3($($arg),*) },
                    $crate::backend::cpu::simd::Level::Baseline => {}
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// The mask of lanes `i..min(i + 16, len)` of a 16-lane vector loop over `len` values.
#[inline(always)]
pub fn lanes16(len: usize, i: usize) -> u16 {
    if len - i >= 16 {
        0xFFFF
    } else {
        (1u16 << (len - i)) - 1
    }
}

/// One lane per vector of 16: each vector reduced by `op` (add, max) in
/// `_mm512_reduce_add_ps`'s order (halvings of 512 to 256 to 128 bits, then
/// `(x0 + x2) + (x1 + x3)`), so a sum is bit for bit that intrinsic's. The
/// reduction of `acc[i]` lands in lane [`REDUCED_LANE`]`[i]`. Sixteen rows'
/// reductions together take a few shuffles each, where one at a time each
/// waited for its own chain of dependent shuffles.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn reduce_vectors16(acc: &[std::arch::x86_64::__m512; 16], op: impl Fn(std::arch::x86_64::__m512, std::arch::x86_64::__m512) -> std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Two vectors' halves side by side: [a.lo op a.hi, b.lo op b.hi] (256 bits each).
    let halves = |a: __m512, b: __m512| op(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b));
    let r: [__m512; 8] = std::array::from_fn(|j| halves(acc[2 * j], acc[2 * j + 1]));
    // Four vectors' 128-bit reductions, one per lane.
    let quarters = |a: __m512, b: __m512| op(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b));
    let q: [__m512; 4] = std::array::from_fn(|k| quarters(r[2 * k], r[2 * k + 1]));
    // In each 128-bit lane: [x0 op x2, x1 op x3] of two vectors, then their last step.
    let pairs = |a: __m512, b: __m512| op(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b));
    let (w0, w1) = (pairs(q[0], q[1]), pairs(q[2], q[3]));
    op(_mm512_shuffle_ps::<0b10_00_10_00>(w0, w1), _mm512_shuffle_ps::<0b11_01_11_01>(w0, w1))
}

/// Where [`reduce_vectors16`] puts the reduction of vector `i`.
pub const REDUCED_LANE: [usize; 16] = {
    let mut lane = [0; 16];
    let mut i = 0;
    while i < 16 {
        lane[i] = 4 * (i % 4) + i / 4;
        i += 1;
    }
    lane
};
