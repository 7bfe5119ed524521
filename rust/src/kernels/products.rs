//! Tall products with `Ḡ`, read once along its contiguous rows (SPEC §4):
//! `aᵀ p`, and `a x` with `aᵀ diag(d) (a x)` in the same pass.

use faer::{MatMut, MatRef, Par};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::dot::row_dot;
use super::simd::{fma, simd, Simd};

/// Rows of `a` handled together by [`normal_product`]: their dot products
/// first, then (still in cache) their rank-`ROW_BLOCK` update of `aᵀ p`.
const ROW_BLOCK: usize = 32;
/// Rows per register pass of the update (one vector of each in flight).
pub(crate) const AXPY_ROWS: usize = 8;
/// Stretch of a row per pass of the update (`AXPY_ROWS` rows of it stay in L1).
const AXPY_SEG: usize = 512;

/// Rows per partial sum of `aᵀ p`. The partition — and so the order of the
/// additions into each entry — depends only on `m`, never on the thread
/// count; at most 16 partial sums are kept.
fn tall_chunk(m: usize) -> usize {
    (m.div_ceil(16)).max(256).div_ceil(ROW_BLOCK) * ROW_BLOCK
}

/// `s ← a x` (`m × k`) and `u ← aᵀ diag(d) s` (`n × k`) in one pass over the
/// rows of `a` (`m × n`, contiguous rows; SPEC §4: the `Ḡ` products of one
/// operator application, `Ḡᵀ D² Ḡ W`). Reading `a` once instead of twice, and
/// not needing `aᵀ` with contiguous rows, is the point: the products are
/// bound by memory traffic.
pub fn normal_product(
    a: MatRef<'_, f64>,
    x: MatRef<'_, f64>,
    d: &[f64],
    s: MatMut<'_, f64>,
    u: MatMut<'_, f64>,
    par: Par,
) {
    assert_eq!(a.ncols(), x.nrows());
    assert_eq!((s.nrows(), s.ncols()), (a.nrows(), x.ncols()));
    assert_eq!(u.ncols(), x.ncols());
    assert_eq!(d.len(), a.nrows());
    tall_update(a, Weights::Dots { x, d, s }, u, par);
}

/// `u ← aᵀ p` (`n × k`) for `a` (`m × n`, contiguous rows) and `p` (`m × k`),
/// reading `a` along its rows.
pub fn transposed_product(a: MatRef<'_, f64>, p: MatRef<'_, f64>, u: MatMut<'_, f64>, par: Par) {
    assert_eq!(p.nrows(), a.nrows());
    assert_eq!(p.ncols(), u.ncols());
    tall_update(a, Weights::Given(p), u, par);
}

/// Where the weights of the rows of `a` in `aᵀ p` come from.
enum Weights<'a> {
    /// `p = diag(d) (a x)`, with `a x` written to `s`.
    Dots { x: MatRef<'a, f64>, d: &'a [f64], s: MatMut<'a, f64> },
    Given(MatRef<'a, f64>),
}

fn tall_update(a: MatRef<'_, f64>, weights: Weights<'_>, mut u: MatMut<'_, f64>, par: Par) {
    let (m, n) = (a.nrows(), a.ncols());
    let k = u.ncols();
    assert_eq!(u.nrows(), n);
    assert!(a.col_stride() == 1 || n <= 1, "tall_update: rows of `a` must be contiguous");
    let chunk = tall_chunk(m);
    let chunks = m.div_ceil(chunk).max(1);
    // Each chunk of rows: its first row, its weights, and its own partial
    // `aᵀ p`; the partials are summed in chunk order below.
    let span = |c: usize| (c * chunk, chunk.min(m - c * chunk));
    let mut jobs: Vec<(usize, Weights<'_>, faer::Mat<f64>)> = Vec::with_capacity(chunks);
    match weights {
        Weights::Dots { x, d, mut s } => {
            for c in 0..chunks {
                let (i0, h) = span(c);
                let (head, rest) = s.split_at_row_mut(h);
                jobs.push((i0, Weights::Dots { x, d: &d[i0..i0 + h], s: head }, faer::Mat::zeros(n, k)));
                s = rest;
            }
        }
        Weights::Given(p) => {
            for c in 0..chunks {
                let (i0, h) = span(c);
                jobs.push((i0, Weights::Given(p.subrows(i0, h)), faer::Mat::zeros(n, k)));
            }
        }
    }
    let work = |(c0, weights, part): &mut (usize, Weights<'_>, faer::Mat<f64>)| {
        let h = match weights {
            Weights::Dots { d, .. } => d.len(),
            Weights::Given(p) => p.nrows(),
        };
        let mut w = vec![0.0f64; ROW_BLOCK * k];
        let mut i0 = 0;
        while i0 < h {
            let rb = ROW_BLOCK.min(h - i0);
            let rows = a.subrows(*c0 + i0, rb);
            match weights {
                Weights::Dots { x, d, s } => {
                    let mut sb = s.as_mut().subrows_mut(i0, rb);
                    row_dot(rows, *x, sb.as_mut(), 1.0, false, Par::Seq);
                    for r in 0..rb {
                        for q in 0..k {
                            w[r * k + q] = d[i0 + r] * sb[(r, q)];
                        }
                    }
                }
                Weights::Given(p) => {
                    for r in 0..rb {
                        for q in 0..k {
                            w[r * k + q] = p[(i0 + r, q)];
                        }
                    }
                }
            }
            let mut r0 = 0;
            while r0 < rb {
                let rr = AXPY_ROWS.min(rb - r0);
                let ptrs: Vec<*const f64> = (0..rr).map(|r| rows.row(r0 + r).as_ptr()).collect();
                // SAFETY: each pointer addresses the n contiguous values of a
                // row of `a`; `part` is n × k, column-major with stride col_stride.
                unsafe {
                    axpy_rows(&ptrs, &w[r0 * k..(r0 + rr) * k], k, n, part.as_ptr_mut(), part.col_stride() as usize)
                };
                r0 += rr;
            }
            i0 += rb;
        }
    };
    if crate::parallel::pooled(par) && chunks > 1 {
        jobs.par_iter_mut().for_each(work);
    } else {
        jobs.iter_mut().for_each(work);
    }
    let partials: Vec<faer::Mat<f64>> = jobs.into_iter().map(|j| j.2).collect();
    let mut it = partials.into_iter();
    let first = it.next().expect("at least one chunk");
    u.copy_from(first.as_ref());
    for part in it {
        u += part.as_ref();
    }
}

/// `u[:, q] += Σ_r w[r, q] · row_r` for `rows.len() ≤ AXPY_ROWS` rows of
/// length `len` and `k` columns of `u` (`len × k`, column stride `ldu`);
/// `w` is `rows.len() × k`, row-major. Each entry adds its rows in order.
pub(crate) unsafe fn axpy_rows(rows: &[*const f64], w: &[f64], k: usize, len: usize, u: *mut f64, ldu: usize) {
    #[cfg(target_arch = "x86_64")]
    match simd() {
        Simd::Avx512 => return axpy_rows_avx512(rows, w, k, len, u, ldu),
        Simd::Avx2Fma => return axpy_rows_fma(rows, w, k, len, u, ldu),
        Simd::Portable => {}
    }
    by_rows!(axpy_portable, false; rows, w, k, len, u, ldu)
}

/// `kernel::<R[, G]>(…)` for `rows.len()` = R in 1..=8.
macro_rules! by_rows {
    ($kernel:ident $(, $g:tt)?; $rows:expr, $($arg:expr),*) => {
        match $rows.len() {
            1 => $kernel::<1 $(, $g)?>($rows, $($arg),*),
            2 => $kernel::<2 $(, $g)?>($rows, $($arg),*),
            3 => $kernel::<3 $(, $g)?>($rows, $($arg),*),
            4 => $kernel::<4 $(, $g)?>($rows, $($arg),*),
            5 => $kernel::<5 $(, $g)?>($rows, $($arg),*),
            6 => $kernel::<6 $(, $g)?>($rows, $($arg),*),
            7 => $kernel::<7 $(, $g)?>($rows, $($arg),*),
            8 => $kernel::<8 $(, $g)?>($rows, $($arg),*),
            _ => unreachable!(),
        }
    };
}
use by_rows;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn axpy_rows_avx512(rows: &[*const f64], w: &[f64], k: usize, len: usize, u: *mut f64, ldu: usize) {
    by_rows!(axpy512; rows, w, k, len, u, ldu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_rows_fma(rows: &[*const f64], w: &[f64], k: usize, len: usize, u: *mut f64, ldu: usize) {
    by_rows!(axpy_portable, true; rows, w, k, len, u, ldu)
}

/// [`axpy_portable`] with AVX-512 registers: two columns of `u` per sweep,
/// their `2R` weights held in registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn axpy512<const R: usize>(rows: &[*const f64], w: &[f64], k: usize, len: usize, u: *mut f64, ldu: usize) {
    use std::arch::x86_64::*;
    let a: [*const f64; R] = std::array::from_fn(|r| rows[r]);
    let mut j0 = 0;
    while j0 < len {
        let j1 = (j0 + AXPY_SEG).min(len);
        let main = j0 + (j1 - j0) / 8 * 8;
        let mut q = 0;
        while q < k {
            let two = q + 1 < k;
            let q1 = if two { q + 1 } else { q };
            let b0: [__m512d; R] = std::array::from_fn(|r| _mm512_set1_pd(w[r * k + q]));
            let b1: [__m512d; R] = std::array::from_fn(|r| _mm512_set1_pd(w[r * k + q1]));
            let (u0, u1) = (u.add(q * ldu), u.add(q1 * ldu));
            let mut j = j0;
            if two {
                while j < main {
                    let mut c0 = _mm512_loadu_pd(u0.add(j));
                    let mut c1 = _mm512_loadu_pd(u1.add(j));
                    for r in 0..R {
                        let g = _mm512_loadu_pd(a[r].add(j));
                        c0 = _mm512_fmadd_pd(g, b0[r], c0);
                        c1 = _mm512_fmadd_pd(g, b1[r], c1);
                    }
                    _mm512_storeu_pd(u0.add(j), c0);
                    _mm512_storeu_pd(u1.add(j), c1);
                    j += 8;
                }
            } else {
                while j < main {
                    let mut c0 = _mm512_loadu_pd(u0.add(j));
                    for r in 0..R {
                        c0 = _mm512_fmadd_pd(_mm512_loadu_pd(a[r].add(j)), b0[r], c0);
                    }
                    _mm512_storeu_pd(u0.add(j), c0);
                    j += 8;
                }
            }
            for t in main..j1 {
                for (qq, uq) in [(q, u0), (q1, u1)].into_iter().take(if two { 2 } else { 1 }) {
                    let mut c = *uq.add(t);
                    for r in 0..R {
                        c = (*a[r].add(t)).mul_add(w[r * k + qq], c);
                    }
                    *uq.add(t) = c;
                }
            }
            q += if two { 2 } else { 1 };
        }
        j0 = j1;
    }
}

/// `u[:, q] += Σ_r w[r, q] · row_r`, portable (vectorized by the compiler
/// where the caller enables vector features).
#[inline(always)]
unsafe fn axpy_portable<const R: usize, const FUSED: bool>(
    rows: &[*const f64],
    w: &[f64],
    k: usize,
    len: usize,
    u: *mut f64,
    ldu: usize,
) {
    let a: [&[f64]; R] = std::array::from_fn(|r| std::slice::from_raw_parts(rows[r], len));
    let mut j0 = 0;
    while j0 < len {
        let j1 = (j0 + AXPY_SEG).min(len);
        for q in 0..k {
            let b: [f64; R] = std::array::from_fn(|r| w[r * k + q]);
            let uq = std::slice::from_raw_parts_mut(u.add(q * ldu + j0), j1 - j0);
            for (t, c) in uq.iter_mut().enumerate() {
                let mut acc = *c;
                for r in 0..R {
                    acc = fma::<FUSED>(a[r][j0 + t], b[r], acc);
                }
                *c = acc;
            }
        }
        j0 = j1;
    }
}
