//! Skinny products for the matrix-free operator (SPEC §4).
//!
//! The Krylov solve multiplies big `n × n` / `m × n` matrices by blocks of
//! about `r + 1` vectors. General GEMMs pack the big operand first, which for
//! so few columns reads and writes it once more than the product itself needs;
//! here the big operand is read once, in place, as rows that are contiguous in
//! memory, and each output entry is a dot product with a column of the block.
//!
//! Every output entry is computed by the same sequence of operations however
//! the rows are split among threads, so results are bit-identical for any
//! thread count.

use faer::reborrow::IntoConst;
use faer::{MatMut, MatRef, Par};

use crate::buffer::BigMat;
use rayon::prelude::*;

/// Rows of the big operand computed together (register blocking).
const ROWS: usize = 3;
/// Columns of the block computed together.
const COLS: usize = 8;
/// Eight-lane accumulators of a `ROWS × COLS` block.
type Acc = [[[f64; 8]; COLS]; ROWS];
/// Rows per parallel task.
const TASK_ROWS: usize = 48;
/// Stretch of the inner dimension per pass (its slice of `x` stays in L1).
const JB: usize = 256;

/// `out ← out + alpha · a · x` (or `out ← alpha · a · x` when `!accumulate`).
///
/// `a` must have contiguous rows (column stride 1) and `x` contiguous columns
/// (row stride 1); `out` is any `a.nrows() × x.ncols()` view.
pub fn row_dot(
    a: MatRef<'_, f64>,
    x: MatRef<'_, f64>,
    out: MatMut<'_, f64>,
    alpha: f64,
    accumulate: bool,
    parallel: bool,
) {
    assert_eq!(a.ncols(), x.nrows());
    assert_eq!(out.nrows(), a.nrows());
    assert_eq!(out.ncols(), x.ncols());
    assert!(
        a.col_stride() == 1 || a.ncols() <= 1,
        "row_dot: rows of `a` must be contiguous"
    );
    assert!(
        x.row_stride() == 1 || x.nrows() <= 1,
        "row_dot: columns of `x` must be contiguous"
    );
    if a.nrows() == 0 || x.ncols() == 0 {
        return;
    }
    let len = a.ncols();
    let k = x.ncols();
    let run = |a: MatRef<'_, f64>, mut out: MatMut<'_, f64>| {
        let h = a.nrows();
        // Eight-lane partial sums per output entry, reduced once at the end.
        let mut lanes = vec![[0.0f64; 8]; h * k];
        // The slice of `x` for one stretch of JB columns of `a`, packed so
        // that it stays in L1 (columns of `x` 2^k apart alias in the cache).
        let mut pack = vec![0.0f64; JB * k];
        let mut j0 = 0;
        while j0 < len {
            let jb = JB.min(len - j0);
            for q in 0..k {
                let src = x.col(q);
                for t in 0..jb {
                    pack[q * JB + t] = src[j0 + t];
                }
            }
            let seg: Vec<*const f64> = (0..k).map(|q| pack[q * JB..].as_ptr()).collect();
            let mut i = 0;
            while i < h {
                let rr = ROWS.min(h - i);
                let rows: [*const f64; ROWS] =
                    std::array::from_fn(|r| unsafe { a.row(i + r.min(rr - 1)).as_ptr().add(j0) });
                let mut c = 0;
                while c < k {
                    let cc = COLS.min(k - c);
                    let mut acc = [[[0.0f64; 8]; COLS]; ROWS];
                    for r in 0..rr {
                        for q in 0..cc {
                            acc[r][q] = lanes[(i + r) * k + c + q];
                        }
                    }
                    // SAFETY: each row pointer addresses `jb` contiguous values of
                    // `a` and each column pointer `jb` contiguous packed values.
                    unsafe { dot_block(&rows[..rr], &seg[c..c + cc], jb, &mut acc) };
                    for r in 0..rr {
                        for q in 0..cc {
                            lanes[(i + r) * k + c + q] = acc[r][q];
                        }
                    }
                    c += cc;
                }
                i += rr;
            }
            j0 += jb;
        }
        for i in 0..h {
            for q in 0..k {
                let v = lanes[i * k + q];
                let s = ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
                let o = &mut out[(i, q)];
                *o = if accumulate {
                    *o + alpha * s
                } else {
                    alpha * s
                };
            }
        }
    };
    if parallel && crate::parallel_ok() && a.nrows() > TASK_ROWS {
        a.par_row_chunks(TASK_ROWS)
            .zip(out.par_row_chunks_mut(TASK_ROWS))
            .for_each(|(a, o)| run(a, o));
    } else {
        run(a, out);
    }
}

/// `kernel::<R, C[, G]>(rows, cols, len, out)` for the block's shape
/// (1–3 rows × 1–8 columns), each shape its own monomorphized kernel.
macro_rules! by_shape {
    ($kernel:ident $(, $g:ident)?; $rows:expr, $cols:expr, $len:expr, $out:expr) => {
        by_shape!(@rows [1, 2, 3] [1, 2, 3, 4, 5, 6, 7, 8] $kernel [$($g)?] $rows, $cols, $len, $out)
    };
    (@rows [$($r:literal),*] $cs:tt $kernel:ident $g:tt $rows:expr, $cols:expr, $len:expr, $out:expr) => {
        match $rows.len() {
            $( $r => by_shape!(@cols $r $cs $kernel $g $rows, $cols, $len, $out), )*
            _ => unreachable!(),
        }
    };
    (@cols $r:literal [$($c:literal),*] $kernel:ident $g:tt $rows:expr, $cols:expr, $len:expr, $out:expr) => {
        match $cols.len() {
            $( $c => by_shape!(@call $kernel $r $c $g $rows, $cols, $len, $out), )*
            _ => unreachable!(),
        }
    };
    (@call $kernel:ident $r:literal $c:literal [$($g:ident)?] $rows:expr, $cols:expr, $len:expr, $out:expr) => {
        $kernel::<$r, $c $(, $g)?>($rows, $cols, $len, $out)
    };
}

/// The vector instructions the kernels may use on this CPU (asked once).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    /// `avx512f, avx512vl, avx2, fma`: every feature the AVX-512 kernels are
    /// compiled with, or calling them is undefined.
    Avx512,
    Avx2Fma,
    Portable,
}

fn simd() -> Simd {
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

/// Dispatch on the CPU.
unsafe fn dot_block(rows: &[*const f64], cols: &[*const f64], len: usize, out: &mut Acc) {
    #[cfg(target_arch = "x86_64")]
    match simd() {
        Simd::Avx512 => return dot_block_avx512(rows, cols, len, out),
        Simd::Avx2Fma => return dot_block_avx2(rows, cols, len, out),
        Simd::Portable => {}
    }
    dispatch_shape::<false>(rows, cols, len, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn dot_block_avx512(rows: &[*const f64], cols: &[*const f64], len: usize, out: &mut Acc) {
    by_shape!(micro512; rows, cols, len, out)
}

/// [`micro`] with AVX-512 registers spelled out.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn micro512<const R: usize, const C: usize>(
    rows: &[*const f64],
    cols: &[*const f64],
    len: usize,
    out: &mut Acc,
) {
    use std::arch::x86_64::*;
    let a: [*const f64; R] = std::array::from_fn(|r| rows[r]);
    let x: [*const f64; C] = std::array::from_fn(|c| cols[c]);
    let mut acc: [[__m512d; C]; R] =
        std::array::from_fn(|r| std::array::from_fn(|c| _mm512_loadu_pd(out[r][c].as_ptr())));
    let main = len / 8 * 8;
    let mut j = 0;
    while j < main {
        let av: [__m512d; R] = std::array::from_fn(|r| _mm512_loadu_pd(a[r].add(j)));
        for c in 0..C {
            let xv = _mm512_loadu_pd(x[c].add(j));
            for r in 0..R {
                acc[r][c] = _mm512_fmadd_pd(av[r], xv, acc[r][c]);
            }
        }
        j += 8;
    }
    for r in 0..R {
        for c in 0..C {
            _mm512_storeu_pd(out[r][c].as_mut_ptr(), acc[r][c]);
            for t in main..len {
                out[r][c][t - main] = (*a[r].add(t)).mul_add(*x[c].add(t), out[r][c][t - main]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block_avx2(rows: &[*const f64], cols: &[*const f64], len: usize, out: &mut Acc) {
    dispatch_shape::<true>(rows, cols, len, out)
}

#[inline(always)]
unsafe fn dispatch_shape<const FUSED: bool>(
    rows: &[*const f64],
    cols: &[*const f64],
    len: usize,
    out: &mut Acc,
) {
    by_shape!(micro, FUSED; rows, cols, len, out)
}

/// `R × C` dot products of length `len` added to eight-lane accumulators
/// (the tail goes to the first lanes), portable.
#[inline(always)]
unsafe fn micro<const R: usize, const C: usize, const FUSED: bool>(
    rows: &[*const f64],
    cols: &[*const f64],
    len: usize,
    out: &mut Acc,
) {
    let a: [*const f64; R] = std::array::from_fn(|r| rows[r]);
    let x: [*const f64; C] = std::array::from_fn(|c| cols[c]);
    let main = len / 8 * 8;
    let mut j = 0;
    while j < main {
        for c in 0..C {
            for r in 0..R {
                for l in 0..8 {
                    out[r][c][l] = fma::<FUSED>(*a[r].add(j + l), *x[c].add(j + l), out[r][c][l]);
                }
            }
        }
        j += 8;
    }
    for r in 0..R {
        for c in 0..C {
            for t in main..len {
                out[r][c][t - main] = fma::<FUSED>(*a[r].add(t), *x[c].add(t), out[r][c][t - main]);
            }
        }
    }
}

/// Fused on the vector paths (compiled with FMA), plain on the portable one
/// (where `mul_add` would be a library call per element).
#[inline(always)]
fn fma<const FUSED: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Rows of `a` handled together by [`normal_product`]: their dot products
/// first, then (still in cache) their rank-`ROW_BLOCK` update of `aᵀ p`.
const ROW_BLOCK: usize = 32;
/// Rows per register pass of the update (one vector of each in flight).
const AXPY_ROWS: usize = 8;
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
    parallel: bool,
) {
    assert_eq!(a.ncols(), x.nrows());
    assert_eq!((s.nrows(), s.ncols()), (a.nrows(), x.ncols()));
    assert_eq!(u.ncols(), x.ncols());
    assert_eq!(d.len(), a.nrows());
    tall_update(a, Weights::Dots { x, d, s }, u, parallel);
}

/// `u ← aᵀ p` (`n × k`) for `a` (`m × n`, contiguous rows) and `p` (`m × k`),
/// reading `a` along its rows.
pub fn transposed_product(a: MatRef<'_, f64>, p: MatRef<'_, f64>, u: MatMut<'_, f64>, parallel: bool) {
    assert_eq!(p.nrows(), a.nrows());
    assert_eq!(p.ncols(), u.ncols());
    tall_update(a, Weights::Given(p), u, parallel);
}

/// Where the weights of the rows of `a` in `aᵀ p` come from.
enum Weights<'a> {
    /// `p = diag(d) (a x)`, with `a x` written to `s`.
    Dots { x: MatRef<'a, f64>, d: &'a [f64], s: MatMut<'a, f64> },
    Given(MatRef<'a, f64>),
}

fn tall_update(a: MatRef<'_, f64>, weights: Weights<'_>, mut u: MatMut<'_, f64>, parallel: bool) {
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
                    row_dot(rows, *x, sb.as_mut(), 1.0, false, false);
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
    if parallel && crate::parallel_ok() && chunks > 1 {
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
unsafe fn axpy_rows(rows: &[*const f64], w: &[f64], k: usize, len: usize, u: *mut f64, ldu: usize) {
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

/// A lower-triangular factor `L` (column-major): the forward substitution
/// reads its columns below each diagonal block (column-oriented updates), the
/// back substitution its columns as the rows of `Lᵀ` (dot products), so both
/// read contiguous memory and no copy of `Lᵀ` is needed.
pub struct Triangular {
    l: BigMat,
}

/// Diagonal blocks of the blocked substitutions.
const SOLVE_BLOCK: usize = 96;

impl Triangular {
    pub fn new(l: BigMat) -> Self {
        Self { l }
    }

    pub fn l(&self) -> MatRef<'_, f64> {
        self.l.as_ref()
    }

    /// `X ← L⁻¹ X` (forward substitution by blocks of rows); in parallel over
    /// halves of the block's columns (each column's arithmetic is the same).
    pub fn solve_lower(&self, x: MatMut<'_, f64>, parallel: bool) {
        with_contiguous_columns(x, &|x| split_columns(x, parallel, &|x| self.solve_lower_seq(x)));
    }

    /// `X ← L⁻ᵀ X` (back substitution by blocks of rows).
    pub fn solve_upper(&self, x: MatMut<'_, f64>, parallel: bool) {
        with_contiguous_columns(x, &|x| split_columns(x, parallel, &|x| self.solve_upper_seq(x)));
    }

    fn solve_lower_seq(&self, mut x: MatMut<'_, f64>) {
        let n = self.l.nrows();
        let k = x.ncols();
        if k == 0 {
            return;
        }
        let mut xv = x.as_mut();
        let l = self.l.as_ref();
        let mut w = vec![0.0f64; AXPY_ROWS * k];
        let mut i0 = 0;
        while i0 < n {
            let nb = SOLVE_BLOCK.min(n - i0);
            diagonal_solve(l.submatrix(i0, i0, nb, nb), xv.as_mut().subrows_mut(i0, nb), true);
            let below = i0 + nb;
            if below < n {
                // X₂ ← X₂ − L₂₁ X₁, eight columns of L₂₁ per sweep over X₂.
                let h = n - below;
                let mut r0 = 0;
                while r0 < nb {
                    let rr = AXPY_ROWS.min(nb - r0);
                    let cols: Vec<*const f64> = (0..rr).map(|r| l.col(i0 + r0 + r).as_ptr().wrapping_add(below)).collect();
                    for r in 0..rr {
                        for q in 0..k {
                            w[r * k + q] = -xv[(i0 + r0 + r, q)];
                        }
                    }
                    let ldu = xv.col_stride() as usize;
                    // SAFETY: each pointer addresses the h contiguous entries
                    // of a column of L below the block; X₂ is h × k with
                    // contiguous columns, stride `ldu`.
                    unsafe { axpy_rows(&cols, &w[..rr * k], k, h, xv.as_mut().subrows_mut(below, h).as_ptr_mut(), ldu) };
                    r0 += rr;
                }
            }
            i0 += nb;
        }
    }

    fn solve_upper_seq(&self, mut x: MatMut<'_, f64>) {
        let n = self.l.nrows();
        let rows = self.l.as_ref().transpose(); // row i of Lᵀ = column i of L, contiguous
        let mut i1 = n;
        while i1 > 0 {
            let nb = SOLVE_BLOCK.min(i1);
            let i0 = i1 - nb;
            let (head, done) = x.as_mut().split_at_row_mut(i1);
            let mut cur = head.subrows_mut(i0, nb);
            if i1 < n {
                row_dot(
                    rows.submatrix(i0, i1, nb, n - i1),
                    done.as_ref(),
                    cur.as_mut(),
                    -1.0,
                    true,
                    false, // the caller parallelizes over columns
                );
            }
            diagonal_solve(self.l.as_ref().submatrix(i0, i0, nb, nb), cur, false);
            i1 = i0;
        }
    }
}

/// `X ← L⁻¹ X` (`lower`) or `X ← L⁻ᵀ X` for a diagonal block `L`, one column
/// at a time: faer picks its kernel by the shape, so solving each column
/// alone keeps every column's arithmetic the same however the block's columns
/// are grouped among threads.
fn diagonal_solve(l: MatRef<'_, f64>, mut x: MatMut<'_, f64>, lower: bool) {
    for q in 0..x.ncols() {
        let col = x.as_mut().subcols_mut(q, 1);
        if lower {
            faer::linalg::triangular_solve::solve_lower_triangular_in_place(l, col, Par::Seq);
        } else {
            faer::linalg::triangular_solve::solve_upper_triangular_in_place(l.transpose(), col, Par::Seq);
        }
    }
}

/// Run `f` on `x`, or on a column-major copy of it unless its columns are
/// contiguous and laid out forward in memory (the kernels read them as
/// slices, `ldu` apart); blocks from the Krylov run always are.
fn with_contiguous_columns(mut x: MatMut<'_, f64>, f: &dyn Fn(MatMut<'_, f64>)) {
    let forward = x.ncols() <= 1 || x.col_stride() >= x.nrows() as isize;
    if (x.row_stride() == 1 || x.nrows() <= 1) && forward {
        f(x);
    } else {
        let mut copy = x.to_owned();
        f(copy.as_mut());
        x.copy_from(copy.as_ref());
    }
}

/// Run `f` on groups of columns of `x` in parallel: one group per thread, at
/// least two columns each. Each column's arithmetic is the same in any group,
/// so the grouping — chosen by the thread count — never changes the bits;
/// each group reads the whole factor, so more groups than threads would only
/// add memory traffic.
fn split_columns(x: MatMut<'_, f64>, parallel: bool, f: &(dyn Fn(MatMut<'_, f64>) + Sync)) {
    let groups = if parallel && crate::parallel_ok() {
        rayon::current_num_threads().min(x.ncols() / 2).max(1)
    } else {
        1
    };
    split_into(x, groups, f);
}

fn split_into(x: MatMut<'_, f64>, groups: usize, f: &(dyn Fn(MatMut<'_, f64>) + Sync)) {
    if groups <= 1 || x.ncols() < 2 {
        return f(x);
    }
    let ga = groups / 2;
    let at = x.ncols() * ga / groups;
    let (a, b) = x.split_at_col_mut(at);
    rayon::join(|| split_into(a, ga, f), || split_into(b, groups - ga, f));
}

/// A column-major copy of `aᵀ`, by tiles (in parallel over column blocks).
pub fn transpose(a: MatRef<'_, f64>, parallel: bool) -> BigMat {
    const TILE: usize = 64;
    let (rs, cs) = (a.row_stride(), a.col_stride());
    let base = a.as_ptr() as usize;
    // Every entry is written below.
    let mut out = BigMat::for_overwrite(a.ncols(), a.nrows());
    let rows = out.nrows();
    let fill = |j0: usize, mut blk: MatMut<'_, f64>| {
        // blk = out[:, j0 .. j0 + w] = a[j0 .. j0 + w, :]ᵀ
        let w = blk.ncols();
        let ld = blk.col_stride();
        let dst = blk.as_mut().as_ptr_mut();
        let src = base as *const f64;
        for i0 in (0..rows).step_by(TILE) {
            let h = TILE.min(rows - i0);
            // SAFETY: (j0 + j, i) is inside `a`, (i, j) inside `blk`.
            unsafe {
                {
                    for j in 0..w {
                        let s = src.offset((j0 + j) as isize * rs);
                        let d = dst.offset(j as isize * ld);
                        for i in i0..i0 + h {
                            *d.add(i) = *s.offset(i as isize * cs);
                        }
                    }
                }
            }
        }
    };
    if parallel && crate::parallel_ok() {
        out.as_mut()
            .par_col_chunks_mut(TILE)
            .enumerate()
            .for_each(|(k, blk)| fill(k * TILE, blk));
    } else {
        let w = out.ncols();
        for j0 in (0..w).step_by(TILE) {
            fill(j0, out.as_mut().subcols_mut(j0, TILE.min(w - j0)));
        }
    }
    out
}

/// `a` with contiguous rows: the view itself when it has them, else a copy.
pub enum RowsView<'a> {
    Borrowed(MatRef<'a, f64>),
    /// A column-major `aᵀ`, whose transpose is `a` with contiguous rows.
    Copied(BigMat),
}

impl<'a> RowsView<'a> {
    pub fn new(a: MatRef<'a, f64>, parallel: bool) -> Self {
        if a.col_stride() == 1 || a.ncols() <= 1 {
            RowsView::Borrowed(a)
        } else {
            RowsView::Copied(transpose(a, parallel))
        }
    }
    pub fn get(&self) -> MatRef<'_, f64> {
        match self {
            RowsView::Borrowed(a) => *a,
            RowsView::Copied(t) => t.as_ref().transpose(),
        }
    }
}

/// Column blocks of the blocked Cholesky factorization.
const CHOL_BLOCK: usize = 64;

/// The lower Cholesky factor of `Z + λ I` (SPEC §3.1), or `None` when a pivot
/// is not positive. Only the lower triangle of `z` is read.
///
/// Right-looking by column blocks: factor the diagonal block, solve the panel
/// below it, update the trailing lower triangle with GEMMs on fixed column
/// blocks (in parallel). The partition does not depend on the thread count,
/// so neither do the bits of the result.
pub fn cholesky(z: MatRef<'_, f64>, lambda: f64, parallel: bool) -> Option<BigMat> {
    let par = parallel && crate::parallel_ok();
    factor_lower(lower_copy_checked(z, par).0, lambda, par)
}

/// [`cholesky`] of `a + λ I`, given the column-major lower-triangular copy
/// `a` of `Z` (zeros above the diagonal) that [`lower_copy_checked`] made.
pub fn factor_lower(mut a: BigMat, lambda: f64, parallel: bool) -> Option<BigMat> {
    let n = a.nrows();
    let par = parallel && crate::parallel_ok();
    for i in 0..n {
        a.as_mut()[(i, i)] += lambda;
    }
    let mut k0 = 0;
    while k0 < n {
        let kb = CHOL_BLOCK.min(n - k0);
        let k1 = k0 + kb;
        let (left, mut right) = a.as_mut().split_at_col_mut(k1);
        let (top, bottom) = left.split_at_row_mut(k1);
        let mut diag = top.submatrix_mut(k0, k0, kb, kb);
        factor_small(diag.as_mut())?;
        let diag = diag.into_const();
        let mut panel = bottom.subcols_mut(k0, kb);
        // Panel ← Panel · L₁₁⁻ᵀ, i.e. L₁₁ Panelᵀ = Panelᵀ, rows independent.
        let solve_rows = |chunk: MatMut<'_, f64>| {
            faer::linalg::triangular_solve::solve_lower_triangular_in_place(
                diag,
                chunk.transpose_mut(),
                Par::Seq,
            );
        };
        if par {
            panel
                .as_mut()
                .par_row_chunks_mut(CHOL_BLOCK)
                .for_each(solve_rows);
        } else {
            solve_rows(panel.as_mut());
        }
        let panel = panel.into_const();
        // Trailing lower triangle: A₂₂ ← A₂₂ − Panel Panelᵀ, one column block at a time.
        let rest = n - k1;
        let update = |b: usize, blk: MatMut<'_, f64>| {
            let j0 = b * CHOL_BLOCK;
            let w = blk.ncols();
            let h = rest - j0;
            let target = blk.submatrix_mut(k1 + j0, 0, h, w);
            faer::linalg::matmul::matmul(
                target,
                faer::Accum::Add,
                panel.subrows(j0, h),
                panel.subrows(j0, w).transpose(),
                -1.0,
                Par::Seq,
            );
        };
        if par {
            right
                .as_mut()
                .par_col_chunks_mut(CHOL_BLOCK)
                .enumerate()
                .for_each(|(b, blk)| update(b, blk));
        } else {
            for b in 0..rest.div_ceil(CHOL_BLOCK) {
                let w = CHOL_BLOCK.min(rest - b * CHOL_BLOCK);
                update(b, right.as_mut().subcols_mut(b * CHOL_BLOCK, w));
            }
        }
        k0 = k1;
    }
    // The updates' diagonal tiles also wrote above the diagonal (the column
    // blocks of every step are aligned to the same CHOL_BLOCK grid).
    let mut am = a.as_mut();
    for j0 in (0..n).step_by(CHOL_BLOCK) {
        for j in j0..(j0 + CHOL_BLOCK).min(n) {
            for i in j0..j {
                am[(i, j)] = 0.0;
            }
        }
    }
    Some(a)
}

/// Unblocked Cholesky of a diagonal block, in place (lower); `None` on a
/// pivot that is not positive and finite.
fn factor_small(mut a: MatMut<'_, f64>) -> Option<()> {
    let n = a.nrows();
    for j in 0..n {
        let mut d = a[(j, j)];
        for k in 0..j {
            d -= a[(j, k)] * a[(j, k)];
        }
        if !(d > 0.0 && d.is_finite()) {
            return None;
        }
        let d = d.sqrt();
        a[(j, j)] = d;
        for i in j + 1..n {
            let mut s = a[(i, j)];
            for k in 0..j {
                s -= a[(i, k)] * a[(j, k)];
            }
            a[(i, j)] = s / d;
        }
    }
    Some(())
}

/// A column-major copy of the lower triangle of `z` (zeros above), and the
/// [`Scan`] of all of `z` (finite, largest magnitude, largest asymmetry) made
/// in the same pass: each lower tile is read with its mirror above the
/// diagonal, so `Z` is read once for both the validation and the copy.
pub fn lower_copy_checked(z: MatRef<'_, f64>, parallel: bool) -> (BigMat, Scan) {
    const TILE: usize = 32;
    let n = z.nrows();
    assert_eq!(z.ncols(), n, "lower_copy_checked: Z must be square");
    let mut out = BigMat::for_overwrite(n, n);
    let (rs, cs) = (z.row_stride(), z.col_stride());
    let base = z.as_ptr() as usize;
    // `len` values from (i, j) on along the contiguous direction.
    // SAFETY (all uses): the run stays inside `z`, whose memory outlives this call.
    let run = |i: usize, j: usize, len: usize| unsafe {
        std::slice::from_raw_parts((base as *const f64).offset(i as isize * rs + j as isize * cs), len)
    };
    // lower[jj][ii] = z[i0+ii, j0+jj] and upper[jj][ii] = z[j0+jj, i0+ii]: the
    // columns of the lower tile and of the mirrored upper tile, read along
    // whichever index is contiguous.
    let load = |i0: usize, j0: usize, h: usize, w: usize, lower: &mut [[f64; TILE]; TILE], upper: &mut [[f64; TILE]; TILE]| {
        if cs == 1 {
            for ii in 0..h {
                for (jj, &v) in run(i0 + ii, j0, w).iter().enumerate() {
                    lower[jj][ii] = v;
                }
            }
            for jj in 0..w {
                upper[jj][..h].copy_from_slice(run(j0 + jj, i0, h));
            }
        } else if rs == 1 {
            for jj in 0..w {
                lower[jj][..h].copy_from_slice(run(i0, j0 + jj, h));
            }
            for ii in 0..h {
                for (jj, &v) in run(j0, i0 + ii, w).iter().enumerate() {
                    upper[jj][ii] = v;
                }
            }
        } else {
            for jj in 0..w {
                for ii in 0..h {
                    lower[jj][ii] = z[(i0 + ii, j0 + jj)];
                    upper[jj][ii] = z[(j0 + jj, i0 + ii)];
                }
            }
        }
    };
    let fill = |j0: usize, mut blk: MatMut<'_, f64>| -> Lanes {
        let mut acc = Lanes::new();
        let w = blk.ncols();
        let mut lower = [[0.0f64; TILE]; TILE];
        let mut upper = [[0.0f64; TILE]; TILE];
        for jj in 0..w {
            // Above the diagonal tile: zeros.
            let col = blk.as_mut().col_mut(jj).try_as_col_major_mut().expect("contiguous").as_slice_mut();
            col[..j0].fill(0.0);
        }
        for i0 in (j0..n).step_by(TILE) {
            let h = TILE.min(n - i0);
            load(i0, j0, h, w, &mut lower, &mut upper);
            for jj in 0..w {
                acc.pairs(&lower[jj][..h], &upper[jj][..h]);
                let col = blk.as_mut().col_mut(jj).try_as_col_major_mut().expect("contiguous").as_slice_mut();
                let dst = &mut col[i0..i0 + h];
                dst.copy_from_slice(&lower[jj][..h]);
                if i0 == j0 {
                    // The diagonal tile: zeros above its diagonal.
                    dst[..jj.min(h)].fill(0.0);
                }
            }
        }
        acc
    };
    let merge = |mut x: Lanes, y: Lanes| {
        x.merge(&y);
        x
    };
    let acc = if parallel && crate::parallel_ok() && n > TILE {
        out.as_mut()
            .par_col_chunks_mut(TILE)
            .enumerate()
            .map(|(b, blk)| fill(b * TILE, blk))
            .reduce(Lanes::new, merge)
    } else {
        let mut acc = Lanes::new();
        for j0 in (0..n).step_by(TILE) {
            let w = TILE.min(n - j0);
            acc.merge(&fill(j0, out.as_mut().subcols_mut(j0, w)));
        }
        acc
    };
    (out, acc.summary())
}

/// One pass over a matrix, in parallel over column blocks: whether every
/// entry is finite, the largest magnitude, and (for square matrices, when
/// `symmetry`) the largest `|a[i,j] − a[j,i]|`. The callers only need these
/// summaries to accept an input; to explain a rejection they rescan in order.
pub struct Scan {
    pub finite: bool,
    pub max_abs: f64,
    pub max_asym: f64,
}

pub fn scan(a: MatRef<'_, f64>, symmetry: bool, parallel: bool) -> Scan {
    const TILE: usize = 32;
    let (m, n) = (a.nrows(), a.ncols());
    assert!(!symmetry || m == n, "scan: symmetry needs a square matrix");
    let (rs, cs) = (a.row_stride(), a.col_stride());
    // A matrix whose rows (or, transposed, columns) are contiguous is read
    // as slices so that the inner loops vectorize; any other layout is
    // gathered one row at a time into a buffer first.
    let view = if cs == 1 || (rs != 1 && symmetry) { a } else { a.transpose() };
    let (vm, vn) = (view.nrows(), view.ncols());
    let row_of = |i: usize, j0: usize, j1: usize, buf: &mut Vec<f64>| -> *const f64 {
        if view.col_stride() == 1 {
            // SAFETY: row i, columns j0..j1 of `view` are contiguous.
            unsafe { view.as_ptr().offset(i as isize * view.row_stride() + j0 as isize) }
        } else {
            buf.clear();
            buf.extend((j0..j1).map(|j| view[(i, j)]));
            buf.as_ptr()
        }
    };
    let block = |i0: usize| -> Lanes {
        let mut acc = Lanes::new();
        let mut buf = Vec::with_capacity(vn);
        let i1 = (i0 + TILE).min(vm);
        if !symmetry {
            for i in i0..i1 {
                let p = row_of(i, 0, vn, &mut buf);
                // SAFETY: `row_of` points at vn contiguous values.
                acc.values(unsafe { std::slice::from_raw_parts(p, vn) });
            }
            return acc;
        }
        // Tiles (I, J) with J ≤ I against their mirrors (J, I): the mirror
        // is transposed into `mirror` so both are read along rows.
        let mut mirror = [[0.0f64; TILE]; TILE];
        for j0 in (0..=i0).step_by(TILE) {
            let j1 = (j0 + TILE).min(vn);
            for (jj, j) in (j0..j1).enumerate() {
                let p = row_of(j, i0, i1, &mut buf);
                for ii in 0..i1 - i0 {
                    // SAFETY: row j, columns i0..i1.
                    mirror[ii][jj] = unsafe { *p.add(ii) };
                }
            }
            for (ii, i) in (i0..i1).enumerate() {
                let p = row_of(i, j0, j1, &mut buf);
                // SAFETY: row i, columns j0..j1.
                let v = unsafe { std::slice::from_raw_parts(p, j1 - j0) };
                acc.pairs(v, &mirror[ii][..j1 - j0]);
            }
        }
        acc
    };
    let merge = |mut x: Lanes, y: Lanes| {
        x.merge(&y);
        x
    };
    let blocks = vm.div_ceil(TILE);
    let acc = if parallel && crate::parallel_ok() && blocks > 1 {
        (0..blocks).into_par_iter().map(|b| block(b * TILE)).reduce(Lanes::new, merge)
    } else {
        (0..blocks).map(|b| block(b * TILE)).fold(Lanes::new(), merge)
    };
    acc.summary()
}

/// Lane-wise running maxima of [`scan`]: eight independent lanes, so the
/// loops over contiguous slices compile to vector max/add instructions.
struct Lanes {
    max_abs: [f64; 8],
    max_asym: [f64; 8],
    /// `Σ 0·v`: stays 0 unless some `v` is infinite or NaN.
    poison: [f64; 8],
}

impl Lanes {
    fn new() -> Self {
        Lanes { max_abs: [0.0; 8], max_asym: [0.0; 8], poison: [0.0; 8] }
    }

    #[inline(always)]
    fn one(&mut self, k: usize, v: f64) {
        let a = v.abs();
        self.max_abs[k] = if a > self.max_abs[k] { a } else { self.max_abs[k] };
        self.poison[k] += v * 0.0;
    }

    fn values(&mut self, xs: &[f64]) {
        let mut it = xs.chunks_exact(8);
        for c in &mut it {
            for k in 0..8 {
                self.one(k, c[k]);
            }
        }
        for (k, &v) in it.remainder().iter().enumerate() {
            self.one(k, v);
        }
    }

    /// Both of each pair count as values; `|v − w|` is their asymmetry.
    fn pairs(&mut self, vs: &[f64], ws: &[f64]) {
        let step = |s: &mut Self, k: usize, v: f64, w: f64| {
            s.one(k, v);
            s.one(k, w);
            let d = (v - w).abs();
            s.max_asym[k] = if d > s.max_asym[k] { d } else { s.max_asym[k] };
        };
        let (mut iv, mut iw) = (vs.chunks_exact(8), ws.chunks_exact(8));
        for (c, d) in (&mut iv).zip(&mut iw) {
            for k in 0..8 {
                step(self, k, c[k], d[k]);
            }
        }
        for (k, (&v, &w)) in iv.remainder().iter().zip(iw.remainder()).enumerate() {
            step(self, k, v, w);
        }
    }

    fn merge(&mut self, o: &Self) {
        for k in 0..8 {
            self.max_abs[k] = self.max_abs[k].max(o.max_abs[k]);
            self.max_asym[k] = self.max_asym[k].max(o.max_asym[k]);
            self.poison[k] += o.poison[k];
        }
    }

    fn summary(&self) -> Scan {
        // A NaN falls through every comparison and is caught by the poison
        // sum (0·∞ is NaN too).
        let finite = self.poison.iter().all(|p| *p == 0.0) && self.max_abs.iter().all(|v| v.is_finite());
        Scan {
            finite,
            max_abs: self.max_abs.iter().fold(0.0, |a, &b| a.max(b)),
            max_asym: self.max_asym.iter().fold(0.0, |a, &b| a.max(b)),
        }
    }
}
