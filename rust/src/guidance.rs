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

use faer::{Accum, Mat, MatMut, MatRef, Par};

use crate::eigensolver::SymmetricOperator;
use crate::error::{Error, Result};

/// The Cholesky factor of `Z + λ I` (SPEC §3.1), shared by the modules that
/// share one input factor.
pub struct InputCholesky {
    l: Mat<f64>,
    /// The damping actually used (raised from the requested one when allowed).
    pub damping: f64,
    pub par: Par,
}

impl InputCholesky {
    /// Factor `Z + λ I`. If that fails and `auto_damping` is set, λ is raised
    /// ten-fold (starting from at least `1e-10 · mean(diag Z)`) until it works,
    /// at most 12 times; the value used is in `self.damping`.
    pub fn new(z: MatRef<'_, f64>, damping: f64, auto_damping: bool, par: Par) -> Result<Self> {
        crate::init_parallelism();
        let n = z.nrows();
        let mut lambda = damping;
        let mean_diag = (0..n).map(|i| z[(i, i)]).sum::<f64>() / n.max(1) as f64;
        for attempt in 0..13 {
            let mut zl = z.to_owned();
            for i in 0..n {
                zl[(i, i)] += lambda;
            }
            match zl.llt(faer::Side::Lower) {
                Ok(llt) => {
                    let l = llt.L().to_owned();
                    let min_pivot = (0..n).map(|i| l[(i, i)]).fold(f64::INFINITY, f64::min);
                    if min_pivot.is_finite() && min_pivot > 0.0 {
                        return Ok(Self { l, damping: lambda, par });
                    }
                }
                Err(_) => {}
            }
            if !auto_damping || attempt == 12 {
                break;
            }
            lambda = (lambda * 10.0).max(1e-10 * mean_diag.abs().max(f64::MIN_POSITIVE));
        }
        Err(Error::NotPositiveDefinite(format!(
            "the Cholesky factorization of Z + λI failed with λ = {lambda:e} (mean diagonal of Z = {mean_diag:e}); \
             raise the damping{}",
            if auto_damping { "" } else { " or allow it to be raised automatically (auto_damping=True)" }
        )))
    }

    pub fn dim(&self) -> usize {
        self.l.nrows()
    }

    pub fn factor(&self) -> MatRef<'_, f64> {
        self.l.as_ref()
    }

    /// `X ← Z_λ⁻¹ X` by two triangular solves.
    pub fn solve_in_place(&self, mut x: MatMut<'_, f64>) {
        use faer::linalg::triangular_solve as ts;
        ts::solve_lower_triangular_in_place(self.l.as_ref(), x.as_mut(), self.par);
        ts::solve_upper_triangular_in_place(self.l.transpose(), x.as_mut(), self.par);
    }

    /// `Z_λ⁻¹` as a dense matrix (the dense path only).
    pub fn inverse(&self) -> Mat<f64> {
        let mut inv = Mat::<f64>::identity(self.dim(), self.dim());
        self.solve_in_place(inv.as_mut());
        Mat::from_fn(inv.nrows(), inv.ncols(), |i, j| 0.5 * (inv[(i, j)] + inv[(j, i)]))
    }
}

/// `Ω′ = −α Δ Δᵀ + β c′ Z_λ⁻¹` and the products with `Δ`, `Δᵀ`.
pub struct Guidance<'a> {
    pub chol: &'a InputCholesky,
    /// `Ḡ`, `m × n`.
    pub mean_grad: MatRef<'a, f64>,
    /// `ỹ`, length `m`.
    pub precision: &'a [f64],
    pub alpha: f64,
    /// `β c′ = β Σ ỹ / N_pop`.
    pub beta_c: f64,
}

impl Guidance<'_> {
    fn par(&self) -> Par {
        self.chol.par
    }

    /// `D Ḡ W` (`m × k`) for `W` (`n × k`).
    fn scaled_grad(&self, w: MatRef<'_, f64>, power: i32) -> Mat<f64> {
        let mut p = Mat::<f64>::zeros(self.mean_grad.nrows(), w.ncols());
        faer::linalg::matmul::matmul(p.as_mut(), Accum::Replace, self.mean_grad, w, 1.0, self.par());
        for j in 0..p.ncols() {
            for (i, d) in self.precision.iter().enumerate() {
                p[(i, j)] *= d.powi(power);
            }
        }
        p
    }

    /// `Δᵀ X = −D Ḡ Z_λ⁻¹ X` (`m × k`).
    pub fn delta_t(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        let mut w = x.to_owned();
        self.chol.solve_in_place(w.as_mut());
        let mut p = self.scaled_grad(w.as_ref(), 1);
        p *= faer::Scale(-1.0);
        p
    }

    /// `Δ Y = −Z_λ⁻¹ Ḡᵀ D Y` (`n × k`) for `Y` (`m × k`).
    pub fn delta(&self, y: MatRef<'_, f64>) -> Mat<f64> {
        let mut dy = y.to_owned();
        for j in 0..dy.ncols() {
            for (i, d) in self.precision.iter().enumerate() {
                dy[(i, j)] *= d;
            }
        }
        let mut out = Mat::<f64>::zeros(self.mean_grad.ncols(), y.ncols());
        faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, self.mean_grad.transpose(), dy.as_ref(), -1.0, self.par());
        self.chol.solve_in_place(out.as_mut());
        out
    }
}

impl SymmetricOperator for Guidance<'_> {
    fn dim(&self) -> usize {
        self.chol.dim()
    }

    /// `Ω′ X = Z_λ⁻¹ (β c′ X − α Ḡᵀ D² Ḡ Z_λ⁻¹ X)`.
    fn apply(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        let mut w = x.to_owned();
        self.chol.solve_in_place(w.as_mut());
        let p = self.scaled_grad(w.as_ref(), 2);
        let mut q = x.to_owned();
        q *= faer::Scale(self.beta_c);
        faer::linalg::matmul::matmul(q.as_mut(), Accum::Add, self.mean_grad.transpose(), p.as_ref(), -self.alpha, self.par());
        self.chol.solve_in_place(q.as_mut());
        q
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
        let g = self.0;
        let mut w = x.to_owned();
        g.chol.solve_in_place(w.as_mut());
        let p = g.scaled_grad(w.as_ref(), 2);
        let mut out = Mat::<f64>::zeros(g.mean_grad.ncols(), x.ncols());
        faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, g.mean_grad.transpose(), p.as_ref(), 1.0, g.par());
        g.chol.solve_in_place(out.as_mut());
        out
    }
}

