//! The LoRA-DA guidance operator, matrix-free (SPEC §3–§4).
//!
//! With `Z_λ = L Lᵀ`, `D = diag(ỹ)` and the mean gradient `Ḡ` (`m × n`):
//!
//! * `Δ = −Z_λ⁻¹ Ḡᵀ D` (`n × m`), the natural-gradient step (§3 step 3);
//! * `Ω = −α Δ̂ Δ̂ᵀ + β c Z_λ⁻¹` (§3 step 6) with `Δ̂ = Δ / σ`, `c = c′ / σ²` and
//!   `c′ = Σ ỹ / N_pop`, so that `Ω = Ω′ / σ²` with
//!   `Ω′ = −α Δ Δᵀ + β c′ Z_λ⁻¹ = Z_λ⁻¹ (β c′ I − α Ḡᵀ D² Ḡ Z_λ⁻¹)`.
//!
//! `σ` only scales `Ω`, so the eigenvectors come from `Ω′` and `σ` is needed
//! only for `B`, `c` and the reported eigenvalues. `Ω′ X` costs four triangular
//! solves and two products with `Ḡ` per block; `Ω` and `Δ` are never formed.

use faer::{Mat, MatRef};

use crate::cholesky::InputCholesky;
use crate::eigensolver::{Products, SymmetricOperator};
use crate::kernels;

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
        kernels::row_dot(self.grad_rows, w.as_ref(), p.as_mut(), 1.0, false, self.chol.kernel_par);
        scale_rows(p.as_mut(), self.precision, -1.0);
        p
    }

    /// `Δ Y = −Z_λ⁻¹ Ḡᵀ D Y` (`n × k`) for `Y` (`m × k`).
    pub fn delta(&self, y: MatRef<'_, f64>) -> Mat<f64> {
        let mut dy = y.to_owned();
        scale_rows(dy.as_mut(), self.precision, -1.0);
        let mut out = Mat::<f64>::zeros(self.mean_grad.ncols(), y.ncols());
        kernels::transposed_product(self.grad_rows, dy.as_ref(), out.as_mut(), self.chol.kernel_par);
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
        kernels::normal_product(self.grad_rows, w.as_ref(), &d2, s.as_mut(), u.as_mut(), self.chol.kernel_par);
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
    /// (the Krylov run for `Ω′` then also yields `σ² = ‖Δ Δᵀ‖₂`, SPEC §3 step 4 —
    /// the bottom of `Ω′` is mostly the top of `Δ Δᵀ`) and `Δᵀ X = −D Ḡ W`
    /// (so `B` comes with the eigenvectors, SPEC §3 step 8), `W = Z_λ⁻¹ X`.
    fn apply_with_aux(&self, x: MatRef<'_, f64>) -> Products {
        let (mut q, mut s, u) = self.delta_gram_parts(x);
        q *= faer::Scale(self.beta_c);
        q -= &u * faer::Scale(self.alpha);
        // Δᵀ X = −D S.
        scale_rows(s.as_mut(), self.precision, -1.0);
        Products { image: q, aux: Some(u), side: Some(s) }
    }
}

/// `Δ Δᵀ` as an operator: its largest eigenvalue is `σ² = ‖Δ‖₂²` (SPEC §3 step 4).
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
