//! Kernels of the matrix-free solve, grouped by what they compute (SPEC §4):
//!
//! * [`dot`] — `a · x` as dot products with the rows of `a` (SIMD micro-kernels);
//! * [`products`] — the tall products `aᵀ p`, and `Ḡ`'s two products in one pass;
//! * [`transpose`] — copies with contiguous rows;
//! * [`scan`] — one-pass validation summaries (finite, largest entry, asymmetry).
//!
//! Why kernels of their own: the Krylov solve multiplies big `n × n` and
//! `m × n` matrices by blocks of about `r + 1` vectors. General GEMMs pack
//! the big operand first, which for so few columns reads and writes it once
//! more than the product itself needs;
//! here the big operand is read once, in place, as rows that are contiguous in
//! memory, and each output entry is a dot product with a column of the block.
//!
//! Every output entry is computed by the same sequence of operations however
//! the rows are split among threads, so results are bit-identical for any
//! thread count.

pub mod dot;
pub mod products;
pub mod scan;
pub mod transpose;

pub use dot::row_dot;
pub use products::{normal_product, transposed_product};
pub use scan::{lower_copy_checked, scan, Scan};
pub use transpose::{transpose, RowsView};

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
