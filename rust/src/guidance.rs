//! The LoRA-DA guidance operator, matrix-free (SPEC §3–§4).
//!
//! With `Z_λ = L Lᵀ`, `D = diag(ỹ)` and the mean gradient `Ḡ` (`m × n`):
//!
//! * `Δ = −Z_λ⁻¹ Ḡᵀ D` (`n × m`), the natural-gradient step (§3.3);
//! * `Ω = −α Δ̂ Δ̂ᵀ + β c Z_λ⁻¹` (§3.6) with `Δ̂ = Δ / σ`, `c = c′ / σ²` and
//!   `c′ = Σ ỹ / N_pop`, so that `Ω = Ω′ / σ²` with
//!   `Ω′ = −α Δ Δᵀ + β c′ Z_λ⁻¹ = Z_λ⁻¹ (β c′ I − α Ḡᵀ D² Ḡ Z_λ⁻¹)`.
//!
//! `σ` only scales `Ω`, so the eigenvectors come from `Ω′` and `σ` is needed
//! only for `B`, `c` and the reported eigenvalues. `Ω′ X` costs four triangular
//! solves and two products with `Ḡ` per block; `Ω` and `Δ` are never formed.

use faer::{Mat, MatMut, MatRef, Par};

use crate::eigensolver::{Products, SymmetricOperator};
use crate::error::{Error, Result};
use crate::kernels::{self, Triangular};

/// The Cholesky factor of `2^scale_exp · (Z + λ I)` (SPEC §3.1), shared by
/// the modules that share one input factor, kept as `L` and `Lᵀ` for the
/// triangular solves of the operator (see [`crate::kernels`]).
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
    /// Whether the core's own kernels may use the thread pool; their results
    /// do not depend on it.
    pub threads: bool,
}

/// The power of two that brings `Z_λ` (of largest entry `zmax`) near 1, or
/// 0 when `zmax` is in `2^±100` (ordinary inputs keep their bits).
fn scale_exp_for(zmax: f64) -> i32 {
    let e = crate::solve::exponent(zmax);
    if zmax == 0.0 || !zmax.is_finite() || (-100..=100).contains(&e) {
        0
    } else {
        -e
    }
}

/// Largest `|Z[i,j] − Z[j,i]|` accepted, relative to `max |Z|`.
pub const SYMMETRY_TOL: f64 = 1e-10;

impl InputCholesky {
    /// Factor `Z + λ I`. If that fails and `auto_damping` is set, λ is raised
    /// ten-fold (starting from at least `1e-10 · mean(diag Z)`, or 1e-10 when
    /// that is 0) until it works,
    /// at most 12 times; the value used is in `self.damping`.
    pub fn new(z: MatRef<'_, f64>, damping: f64, auto_damping: bool, par: Par) -> Result<Self> {
        crate::init_parallelism();
        let threads = crate::parallel_ok();
        let n = z.nrows();
        let mut lambda = damping;
        // The copy that the factorization works in is made in the same pass
        // over Z as its validation (SPEC §3: inputs are validated first).
        let (copy, scan) = kernels::lower_copy_checked(z, threads);
        if !(scan.finite && scan.max_asym <= SYMMETRY_TOL * scan.max_abs) {
            crate::solve::validate_input_factor(z)?;
        }
        let mut copy = Some(copy);
        let mean_diag = (0..n).map(|i| z[(i, i)]).sum::<f64>() / n.max(1) as f64;
        for attempt in 0..13 {
            let mut a = copy.take().unwrap_or_else(|| kernels::lower_copy_checked(z, threads).0);
            let scale_exp = scale_exp_for(scan.max_abs.max(lambda));
            if scale_exp != 0 {
                let mut am = a.as_mut();
                for j in 0..n {
                    for i in j..n {
                        am[(i, j)] = crate::solve::ldexp(am[(i, j)], scale_exp);
                    }
                }
            }
            if let Some(l) = kernels::factor_lower(a, crate::solve::ldexp(lambda, scale_exp), threads) {
                return Ok(Self {
                    tri: Triangular::new(l),
                    damping: lambda,
                    scale_exp,
                    par,
                    threads,
                });
            }
            if !auto_damping || attempt == 12 {
                break;
            }
            // From 1e-10 of the mean diagonal, or of 1 for a zero diagonal (as
            // `device_solve.inverse_input` does): Z = 0 has no scale, and the
            // denormal λ that MIN_POSITIVE gave made σ = ‖Δ‖ overflow.
            let base = if mean_diag != 0.0 { mean_diag.abs() } else { 1.0 };
            lambda = (lambda * 10.0).max(1e-10 * base);
        }
        Err(Error::NotPositiveDefinite(format!(
            "the Cholesky factorization of Z + λI failed with λ = {lambda:e} (mean diagonal of Z = {mean_diag:e}); \
             raise the damping{}",
            if auto_damping { "" } else { " or allow it to be raised automatically (auto_damping=True)" }
        )))
    }

    pub fn dim(&self) -> usize {
        self.tri.l().nrows()
    }

    /// `X ← (2^scale_exp Z_λ)⁻¹ X` by two triangular solves.
    pub fn solve_in_place(&self, mut x: MatMut<'_, f64>) {
        self.tri.solve_lower(x.as_mut(), self.threads);
        self.tri.solve_upper(x.as_mut(), self.threads);
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

/// `Ω′ = −α Δ Δᵀ + β c′ Z_λ⁻¹` and the products with `Δ`, `Δᵀ`.
pub struct Guidance<'a> {
    pub chol: &'a InputCholesky,
    /// `Ḡ`, `m × n`.
    pub mean_grad: MatRef<'a, f64>,
    /// `Ḡ` with contiguous rows, for `Ḡ W` and `Ḡᵀ P` (both read it by rows).
    pub grad_rows: MatRef<'a, f64>,
    /// `ỹ`, length `m`.
    pub precision: &'a [f64],
    pub alpha: f64,
    /// `β c′ = β Σ ỹ / N_pop`.
    pub beta_c: f64,
}

impl Guidance<'_> {
    /// `Δᵀ X = −D Ḡ Z_λ⁻¹ X` (`m × k`).
    pub fn delta_t(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        let mut w = x.to_owned();
        self.chol.solve_in_place(w.as_mut());
        let mut p = Mat::<f64>::zeros(self.mean_grad.nrows(), x.ncols());
        kernels::row_dot(self.grad_rows, w.as_ref(), p.as_mut(), 1.0, false, self.chol.threads);
        scale_rows(p.as_mut(), self.precision, -1.0);
        p
    }

    /// `Δ Y = −Z_λ⁻¹ Ḡᵀ D Y` (`n × k`) for `Y` (`m × k`).
    pub fn delta(&self, y: MatRef<'_, f64>) -> Mat<f64> {
        let mut dy = y.to_owned();
        scale_rows(dy.as_mut(), self.precision, -1.0);
        let mut out = Mat::<f64>::zeros(self.mean_grad.ncols(), y.ncols());
        kernels::transposed_product(self.grad_rows, dy.as_ref(), out.as_mut(), self.chol.threads);
        self.chol.solve_in_place(out.as_mut());
        out
    }

    /// `W = Z_λ⁻¹ X`, `S = Ḡ W` and `Δ Δᵀ X = Z_λ⁻¹ Ḡᵀ D² S`, with one pass over
    /// `Ḡ` for both of its products.
    fn delta_gram_parts(&self, x: MatRef<'_, f64>) -> (Mat<f64>, Mat<f64>, Mat<f64>) {
        let mut w = x.to_owned();
        self.chol.solve_in_place(w.as_mut());
        let (m, n, k) = (self.mean_grad.nrows(), self.mean_grad.ncols(), x.ncols());
        let d2: Vec<f64> = self.precision.iter().map(|d| d * d).collect();
        let mut s = Mat::<f64>::zeros(m, k);
        let mut u = Mat::<f64>::zeros(n, k);
        kernels::normal_product(self.grad_rows, w.as_ref(), &d2, s.as_mut(), u.as_mut(), self.chol.threads);
        self.chol.solve_in_place(u.as_mut());
        (w, s, u)
    }
}

/// `P ← sign · diag(d) P`.
fn scale_rows(mut p: faer::MatMut<'_, f64>, d: &[f64], sign: f64) {
    for j in 0..p.ncols() {
        for (i, di) in d.iter().enumerate() {
            p[(i, j)] *= sign * di;
        }
    }
}

impl SymmetricOperator for Guidance<'_> {
    fn dim(&self) -> usize {
        self.chol.dim()
    }

    /// `Ω′ X = β c′ Z_λ⁻¹ X − α Δ Δᵀ X`.
    fn apply(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        self.apply_with_aux(x).image
    }

    /// `Ω′ X`, and what it contains on the way: `Δ Δᵀ X = Z_λ⁻¹ Ḡᵀ D² Ḡ W`
    /// (the Krylov run for `Ω′` then also yields `σ² = ‖Δ Δᵀ‖₂`, SPEC §3.4 —
    /// the bottom of `Ω′` is mostly the top of `Δ Δᵀ`) and `Δᵀ X = −D Ḡ W`
    /// (so `B` comes with the eigenvectors, SPEC §3.8), `W = Z_λ⁻¹ X`.
    fn apply_with_aux(&self, x: MatRef<'_, f64>) -> Products {
        let (mut q, mut s, u) = self.delta_gram_parts(x);
        q *= faer::Scale(self.beta_c);
        q -= &u * faer::Scale(self.alpha);
        // Δᵀ X = −D S.
        scale_rows(s.as_mut(), self.precision, -1.0);
        Products { image: q, aux: Some(u), side: Some(s) }
    }
}

/// `Δ Δᵀ` as an operator: its largest eigenvalue is `σ² = ‖Δ‖₂²` (SPEC §3.4).
pub struct DeltaGram<'a, 'b>(pub &'a Guidance<'b>);

impl SymmetricOperator for DeltaGram<'_, '_> {
    fn dim(&self) -> usize {
        self.0.chol.dim()
    }
    /// `Δ Δᵀ X = Z_λ⁻¹ Ḡᵀ D² Ḡ Z_λ⁻¹ X`.
    fn apply(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        self.0.delta_gram_parts(x).2
    }
}
