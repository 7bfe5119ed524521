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

/// Dispatch on the CPU once.
unsafe fn dot_block(rows: &[*const f64], cols: &[*const f64], len: usize, out: &mut Acc) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<u8> = OnceLock::new();
        let level = *LEVEL.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                2
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                1
            } else {
                0
            }
        });
        match level {
            2 => return dot_block_avx512(rows, cols, len, out),
            1 => return dot_block_avx2(rows, cols, len, out),
            _ => {}
        }
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

/// A lower-triangular factor `L` kept twice, as `L` and as `Lᵀ` (both
/// column-major), so both triangular solves read contiguous rows.
pub struct Triangular {
    l: BigMat,
    lt: BigMat,
}

/// Diagonal blocks of the blocked substitutions.
const SOLVE_BLOCK: usize = 96;

impl Triangular {
    pub fn new(l: BigMat, parallel: bool) -> Self {
        let lt = transpose(l.as_ref(), parallel);
        Self { l, lt }
    }

    pub fn l(&self) -> MatRef<'_, f64> {
        self.l.as_ref()
    }

    /// `X ← L⁻¹ X` (forward substitution by blocks of rows); in parallel over
    /// halves of the block's columns (each column's arithmetic is the same).
    pub fn solve_lower(&self, x: MatMut<'_, f64>, parallel: bool) {
        split_columns(x, parallel, &|x| self.solve_lower_seq(x));
    }

    /// `X ← L⁻ᵀ X` (back substitution by blocks of rows).
    pub fn solve_upper(&self, x: MatMut<'_, f64>, parallel: bool) {
        split_columns(x, parallel, &|x| self.solve_upper_seq(x));
    }

    fn solve_lower_seq(&self, mut x: MatMut<'_, f64>) {
        let parallel = false;
        let n = self.l.nrows();
        let rows = self.lt.as_ref().transpose(); // row i = row i of L, contiguous
        let mut i0 = 0;
        while i0 < n {
            let nb = SOLVE_BLOCK.min(n - i0);
            let (done, rest) = x.as_mut().split_at_row_mut(i0);
            let mut cur = rest.subrows_mut(0, nb);
            if i0 > 0 {
                row_dot(
                    rows.submatrix(i0, 0, nb, i0),
                    done.as_ref(),
                    cur.as_mut(),
                    -1.0,
                    true,
                    parallel,
                );
            }
            faer::linalg::triangular_solve::solve_lower_triangular_in_place(
                self.l.as_ref().submatrix(i0, i0, nb, nb),
                cur,
                Par::Seq,
            );
            i0 += nb;
        }
    }

    fn solve_upper_seq(&self, mut x: MatMut<'_, f64>) {
        let parallel = false;
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
                    parallel,
                );
            }
            faer::linalg::triangular_solve::solve_upper_triangular_in_place(
                self.l.as_ref().submatrix(i0, i0, nb, nb).transpose(),
                cur,
                Par::Seq,
            );
            i1 = i0;
        }
    }
}

fn split_columns(x: MatMut<'_, f64>, parallel: bool, f: &(dyn Fn(MatMut<'_, f64>) + Sync)) {
    if parallel && crate::parallel_ok() && x.ncols() >= 2 {
        let h = x.ncols() / 2;
        let (a, b) = x.split_at_col_mut(h);
        rayon::join(|| f(a), || f(b));
    } else {
        f(x);
    }
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
    let n = z.nrows();
    let par = parallel && crate::parallel_ok();
    let mut a = lower_copy(z, par);
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
    // The diagonal tiles of the updates also wrote above the diagonal.
    let mut am = a.as_mut();
    for j in 0..n {
        for i in 0..j {
            am[(i, j)] = 0.0;
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

/// A column-major copy of the lower triangle of `z` (zeros above), read by
/// tiles so that row-major inputs are walked along their rows.
fn lower_copy(z: MatRef<'_, f64>, parallel: bool) -> BigMat {
    let n = z.nrows();
    let mut out = BigMat::zeros(n, n);
    let fill = |j0: usize, mut blk: MatMut<'_, f64>| {
        const TILE: usize = 64;
        for i0 in (j0..n).step_by(TILE) {
            for j in 0..blk.ncols() {
                let col = blk
                    .as_mut()
                    .col_mut(j)
                    .try_as_col_major_mut()
                    .expect("contiguous")
                    .as_slice_mut();
                for i in i0.max(j0 + j)..(i0 + TILE).min(n) {
                    col[i] = z[(i, j0 + j)];
                }
            }
        }
    };
    if parallel {
        out.as_mut()
            .par_col_chunks_mut(64)
            .enumerate()
            .for_each(|(b, blk)| fill(b * 64, blk));
    } else {
        for j0 in (0..n).step_by(64) {
            let w = 64.min(n - j0);
            fill(j0, out.as_mut().subcols_mut(j0, w));
        }
    }
    out
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
    let block = |j0: usize| -> Scan {
        let j1 = (j0 + TILE).min(n);
        let mut s = Scan {
            finite: true,
            max_abs: 0.0,
            max_asym: 0.0,
        };
        let (rs, cs) = (a.row_stride(), a.col_stride());
        let p = a.as_ptr();
        // SAFETY: (i, j) stays inside `a`.
        let at = |i: usize, j: usize| unsafe { *p.offset(i as isize * rs + j as isize * cs) };
        // Walk each tile in the direction that is contiguous in memory.
        let along_rows = cs == 1 && rs != 1;
        if symmetry {
            // Each entry once: tile (I, J) with its mirror (J, I), I ≥ J.
            for i0 in (j0..m).step_by(TILE) {
                let i1 = (i0 + TILE).min(m);
                let (mut fin, mut mx, mut asym) = (true, 0.0f64, 0.0f64);
                for i in i0..i1 {
                    let jend = if i0 == j0 { (i + 1).min(j1) } else { j1 };
                    for j in j0..jend {
                        let (v, w) = (at(i, j), at(j, i));
                        fin &= v.is_finite() & w.is_finite();
                        let big = v.abs().max(w.abs());
                        mx = if big > mx { big } else { mx };
                        let d = (v - w).abs();
                        asym = if d > asym { d } else { asym };
                    }
                }
                s.finite &= fin;
                s.max_abs = s.max_abs.max(mx);
                s.max_asym = s.max_asym.max(asym);
            }
            return s;
        }
        for i0 in (0..m).step_by(TILE) {
            let i1 = (i0 + TILE).min(m);
            let (mut fin, mut mx) = (true, 0.0f64);
            if along_rows {
                for i in i0..i1 {
                    for j in j0..j1 {
                        let v = at(i, j).abs();
                        fin &= v.is_finite();
                        mx = if v > mx { v } else { mx };
                    }
                }
            } else {
                for j in j0..j1 {
                    for i in i0..i1 {
                        let v = at(i, j).abs();
                        fin &= v.is_finite();
                        mx = if v > mx { v } else { mx };
                    }
                }
            }
            s.finite &= fin;
            s.max_abs = s.max_abs.max(mx);
        }
        s
    };
    let merge = |x: Scan, y: Scan| Scan {
        finite: x.finite && y.finite,
        max_abs: x.max_abs.max(y.max_abs),
        max_asym: x.max_asym.max(y.max_asym),
    };
    let init = || Scan {
        finite: true,
        max_abs: 0.0,
        max_asym: 0.0,
    };
    if parallel && crate::parallel_ok() && n > TILE {
        (0..n.div_ceil(TILE))
            .into_par_iter()
            .map(|b| block(b * TILE))
            .reduce(init, merge)
    } else {
        (0..n.div_ceil(TILE))
            .map(|b| block(b * TILE))
            .fold(init(), merge)
    }
}
