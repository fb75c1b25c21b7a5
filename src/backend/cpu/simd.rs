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
