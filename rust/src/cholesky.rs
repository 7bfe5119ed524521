//! The Cholesky factorization of `Z + λI` (SPEC §3 step 1) and its triangular
//! solves: the factor the guidance operator applies `Z_λ⁻¹` with.

use faer::reborrow::IntoConst;
use faer::{Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::buffer::BigMat;
use crate::error::{Error, Result};
use crate::kernels::products::{axpy_rows, AXPY_ROWS};
use crate::kernels::{lower_copy_checked, row_dot};
use crate::pow2::{exponent, ldexp};
use crate::validate::{validate_input_factor, SYMMETRY_TOL};

/// The Cholesky factor of `2^scale_exp · (Z + λ I)` (SPEC §3 step 1), shared by
/// the modules that share one input factor, kept as `L` and `Lᵀ` for the
/// triangular solves of the operator (see [`Triangular`]).
///
/// `scale_exp` is 0 unless `max(|Z|, λ)` is beyond `2^±100`: then `Z_λ` is
/// brought near 1 by an exact power of two, so that `Z_λ⁻¹` neither
/// overflows (Z = 0 with a denormal damping) nor underflows; the solve undoes
/// the scale where it enters (`solve::solve_factored`).
pub struct InputCholesky {
    tri: Triangular,
    /// The damping actually used (raised from the requested one when allowed).
    pub damping: f64,
    /// The factor is of `2^scale_exp · (Z + λI)`.
    pub scale_exp: i32,
    /// Parallelism of faer's kernels in the dense path and the Krylov
    /// bookkeeping (`Par::Seq` keeps them bit-reproducible).
    pub par: Par,
    /// Parallelism of the core's own kernels (the triangular solves, the
    /// products with `Ḡ`): their results do not depend on it.
    pub kernel_par: Par,
}

/// The power of two that brings `Z_λ` (of largest entry `zmax`) near 1, or
/// 0 when `zmax` is in `2^±100` (ordinary inputs keep their bits).
fn scale_exp_for(zmax: f64) -> i32 {
    let e = exponent(zmax);
    if zmax == 0.0 || !zmax.is_finite() || (-100..=100).contains(&e) {
        0
    } else {
        -e
    }
}

impl InputCholesky {
    /// Factor `Z + λ I`. If that fails and `auto_damping` is set, λ is raised
    /// ten-fold (starting from at least `1e-10 · mean(diag Z)`, or 1e-10 when
    /// that is 0) until it works,
    /// at most 12 times; the value used is in `self.damping`.
    pub fn new(z: MatRef<'_, f64>, damping: f64, auto_damping: bool, par: Par) -> Result<Self> {
        crate::parallel::init_parallelism();
        let kernel_par = crate::parallel::kernel_par();
        let n = z.nrows();
        let mut lambda = damping;
        // The copy that the factorization works in is made in the same pass
        // over Z as its validation (SPEC §3: inputs are validated first).
        let (copy, scan) = lower_copy_checked(z, kernel_par);
        if !(scan.finite && scan.max_asym <= SYMMETRY_TOL * scan.max_abs) {
            validate_input_factor(z)?;
        }
        let mut copy = Some(copy);
        let mut pivot = None;
        let mean_diag = (0..n).map(|i| z[(i, i)]).sum::<f64>() / n.max(1) as f64;
        for attempt in 0..13 {
            let mut a = copy.take().unwrap_or_else(|| lower_copy_checked(z, kernel_par).0);
            let scale_exp = scale_exp_for(scan.max_abs.max(lambda));
            if scale_exp != 0 {
                let mut am = a.as_mut();
                for j in 0..n {
                    for i in j..n {
                        am[(i, j)] = ldexp(am[(i, j)], scale_exp);
                    }
                }
            }
            match factor_lower(a, ldexp(lambda, scale_exp), kernel_par) {
                Ok(l) => {
                    return Ok(Self {
                        tri: Triangular::new(l),
                        damping: lambda,
                        scale_exp,
                        par,
                        kernel_par,
                    })
                }
                Err(NonPositivePivot { index }) => pivot = Some(index),
            }
            if !auto_damping || attempt == 12 {
                break;
            }
            // From 1e-10 of the mean diagonal, or of 1 for a zero diagonal (as
            // `torch_solve.inverse_input` does): Z = 0 has no scale, and the
            // denormal λ that MIN_POSITIVE gave made σ = ‖Δ‖ overflow.
            let base = if mean_diag != 0.0 { mean_diag.abs() } else { 1.0 };
            lambda = (lambda * 10.0).max(1e-10 * base);
        }
        Err(Error::NotPositiveDefinite {
            message: format!(
                "the Cholesky factorization of Z + λI failed with λ = {lambda:e} (mean diagonal of Z = {mean_diag:e}); \
                 raise the damping{}",
                if auto_damping { "" } else { " or allow it to be raised automatically (auto_damping=True)" }
            ),
            pivot,
        })
    }

    pub fn dim(&self) -> usize {
        self.tri.l().nrows()
    }

    /// `X ← (2^scale_exp Z_λ)⁻¹ X` by two triangular solves.
    pub fn solve_in_place(&self, mut x: MatMut<'_, f64>) {
        self.tri.solve_lower(x.as_mut(), self.kernel_par);
        self.tri.solve_upper(x.as_mut(), self.kernel_par);
    }

    /// `Z_λ⁻¹` as a dense matrix (the dense path only).
    pub fn inverse(&self) -> Mat<f64> {
        let mut inv = Mat::<f64>::identity(self.dim(), self.dim());
        self.solve_in_place(inv.as_mut());
        Mat::from_fn(inv.nrows(), inv.ncols(), |i, j| {
            0.5 * (inv[(i, j)] + inv[(j, i)])
        })
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
    pub fn solve_lower(&self, x: MatMut<'_, f64>, par: Par) {
        with_contiguous_columns(x, &|x| split_columns(x, par, &|x| self.solve_lower_seq(x)));
    }

    /// `X ← L⁻ᵀ X` (back substitution by blocks of rows).
    pub fn solve_upper(&self, x: MatMut<'_, f64>, par: Par) {
        with_contiguous_columns(x, &|x| split_columns(x, par, &|x| self.solve_upper_seq(x)));
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
                    Par::Seq, // the caller parallelizes over columns
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
fn split_columns(x: MatMut<'_, f64>, par: Par, f: &(dyn Fn(MatMut<'_, f64>) + Sync)) {
    let groups = if crate::parallel::pooled(par) {
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

/// Column blocks of the blocked Cholesky factorization.
const CHOL_BLOCK: usize = 64;

/// A Cholesky factorization stopped at column `index`: its pivot was not
/// positive and finite (as faer's `LltError::NonPositivePivot { index }`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NonPositivePivot {
    pub index: usize,
}

/// The lower Cholesky factor of `Z + λ I` (SPEC §3 step 1), or the first pivot
/// that is not positive. Only the lower triangle of `z` is read.
///
/// Right-looking by column blocks: factor the diagonal block, solve the panel
/// below it, update the trailing lower triangle with GEMMs on fixed column
/// blocks (in parallel). The partition does not depend on the thread count,
/// so neither do the bits of the result.
pub fn cholesky(z: MatRef<'_, f64>, lambda: f64, par: Par) -> std::result::Result<BigMat, NonPositivePivot> {
    factor_lower(lower_copy_checked(z, par).0, lambda, par)
}

/// [`cholesky`] of `a + λ I`, given the column-major lower-triangular copy
/// `a` of `Z` (zeros above the diagonal) that [`lower_copy_checked`] made.
pub fn factor_lower(mut a: BigMat, lambda: f64, par: Par) -> std::result::Result<BigMat, NonPositivePivot> {
    let n = a.nrows();
    let pooled = crate::parallel::pooled(par);
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
        factor_small(diag.as_mut()).map_err(|j| NonPositivePivot { index: k0 + j })?;
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
        if pooled {
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
        if pooled {
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
    Ok(a)
}

/// Unblocked Cholesky of a diagonal block, in place (lower); the block's
/// column whose pivot is not positive and finite, if one is.
fn factor_small(mut a: MatMut<'_, f64>) -> std::result::Result<(), usize> {
    let n = a.nrows();
    for j in 0..n {
        let mut d = a[(j, j)];
        for k in 0..j {
            d -= a[(j, k)] * a[(j, k)];
        }
        if !(d > 0.0 && d.is_finite()) {
            return Err(j);
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
    Ok(())
}
