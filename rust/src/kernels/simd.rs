//! The vector instructions the kernels may use, and the one multiply-add
//! they are written with. A leaf of `kernels`: each kernel file asks it.

/// The vector instructions the kernels may use on this CPU (asked once).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simd {
    /// `avx512f, avx512vl, avx2, fma`: every feature the AVX-512 kernels are
    /// compiled with, or calling them is undefined.
    Avx512,
    Avx2Fma,
    Portable,
}

pub(crate) fn simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<Simd> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                Simd::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Simd::Avx2Fma
            } else {
                Simd::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Simd::Portable
}

/// Fused on the vector paths (compiled with FMA), plain on the portable one
/// (where `mul_add` would be a library call per element).
#[inline(always)]
pub(crate) fn fma<const FUSED: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}
