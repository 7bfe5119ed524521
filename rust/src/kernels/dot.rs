//! `out ← alpha · a · x` as dot products of the rows of `a` with the columns
//! of `x`, by register-blocked SIMD micro-kernels (SPEC §4).

use faer::{MatMut, MatRef, Par};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::simd::{fma, simd, Simd};

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
    par: Par,
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
    if crate::parallel::pooled(par) && a.nrows() > TASK_ROWS {
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
