//! From statistics to an initialization, per module (SPEC §3), with the
//! diagnostics of the accuracy contract (SPEC §5).

use faer::{Accum, Mat, MatRef};

use crate::cholesky::InputCholesky;
use crate::eigensolver::{block_krylov, small_eigh, AuxTop, KrylovOptions, SymmetricOperator};
use crate::error::{Error, Result};
use crate::guidance::{DeltaGram, Guidance};
use crate::kernels::RowsView;
pub use crate::options::{Defaults, Method, SolveOptions, DEFAULTS, DENSE_BELOW};
use crate::pow2::{exponent, ldexp};
use crate::validate::{check_input_shape, validate_module};

/// Residual the contract requires of any solver (SPEC §5).
pub const CONTRACT_RESIDUAL: f64 = 1e-10;

/// Residual target of the extra Ritz pair `λ_{r+1}`, which only measures the
/// gap. Its Ritz value is an upper bound of `λ_{r+1}`, within `ρ·‖Ω‖₂` of it
/// (and typically within `ρ²‖Ω‖₂²/δ`, δ the distance to the next eigenvalue).
/// The pair counts as converged at `ρ ≤ max(GAP_TOL, GAP_REL · gap/‖Ω‖₂)`:
/// the reported gap is then within 1e-4·‖Ω‖₂ (the scale of SPEC §5's
/// threshold for a well-defined subspace) or 1 % of itself, whichever is
/// larger. The wanted pairs (residual `tol`) do not depend on it.
/// Measured at n = 2048 (gap ≈ 0.5‖Ω‖₂): λ_{r+1} lies in a dense part of the
/// spectrum and its residual falls slowly (1e-3 after 3 steps, 1e-4 after 9),
/// so an absolute 1e-4 alone cost three Krylov steps beyond the wanted pairs.
pub const GAP_TOL: f64 = 1e-4;
/// See [`GAP_TOL`].
pub const GAP_REL: f64 = 1e-2;

/// Residual (relative to `σ²`) at which the top Ritz pair of `Δ Δᵀ` found on
/// the Krylov basis of `Ω′` gives `σ`: its Ritz value is then within
/// `ρ² σ² / gap` of `σ²` and never further than `ρ σ²`.
pub const DELTA_TOP_TOL: f64 = 1e-9;

/// One module's initialization and its diagnostics.
#[derive(Clone, Debug)]
pub struct SolveResult {
    /// `A = Vᵀ / √γ`, `r × n`.
    pub a: Mat<f64>,
    /// `B = Δ̂ᵀ V / √γ`, `m × r`.
    pub b: Mat<f64>,
    /// `V`, `n × r`, orthonormal, ascending eigenvalues, sign-fixed (§3 step 7).
    pub v: Mat<f64>,
    /// The `r` smallest eigenvalues of `Ω`, ascending.
    pub eigenvalues: Vec<f64>,
    /// `λ_{r+1}` of `Ω`.
    pub next_eigenvalue: f64,
    /// `λ_{r+1} − λ_r`.
    pub gap: f64,
    /// `max_i ‖Ω v_i − λ_i v_i‖ / ‖Ω‖₂`.
    pub residual: f64,
    /// `‖Ω‖₂` (exact for `dense`, a lower bound from the Krylov basis otherwise).
    pub omega_norm: f64,
    /// Operator applications (Krylov) or 1 (dense).
    pub iterations: usize,
    pub method: Method,
    /// `σ = ‖Δ‖₂` when normalizing, else 1.
    pub sigma: f64,
    /// `c = Σ ỹ / N_pop / σ²`.
    pub c: f64,
    /// The damping used (differs from the requested one only with `auto_damping`).
    pub damping: f64,
    /// `Ḡ = 0`: the stated default was used (see `notes`).
    pub zero_gradient: bool,
    /// Human-readable remarks: fallbacks, raised damping, zero gradient.
    pub notes: Vec<String>,
}

/// `ỹ = 1 / (y + λ_y)` (SPEC §3 step 2).
pub fn output_precision(y: &[f64], opts: &SolveOptions) -> Vec<f64> {
    let ly = opts.output_damping.unwrap_or(opts.damping);
    y.iter().map(|v| 1.0 / (v + ly)).collect()
}

/// One module's inputs to [`solve_shared`].
#[derive(Clone, Copy)]
pub struct ModuleInput<'a> {
    /// Used as the context of this module's errors ("" for none).
    pub name: &'a str,
    pub y: &'a [f64],
    /// `Ḡ`, `m × n`.
    pub g: MatRef<'a, f64>,
    /// Overrides `ỹ` (the `sequence_lowrank` output factor).
    pub precision: Option<&'a [f64]>,
}

/// Solve one module: validate, factor `Z + λI`, solve (SPEC §3).
pub fn solve(
    z: MatRef<'_, f64>,
    y: &[f64],
    g: MatRef<'_, f64>,
    opts: &SolveOptions,
) -> Result<SolveResult> {
    let mut out = solve_shared(
        z,
        &[ModuleInput {
            name: "",
            y,
            g,
            precision: None,
        }],
        opts,
    )?;
    Ok(out.remove(0))
}

/// Solve several modules that share one `Z` with one Cholesky factorization.
/// Every module is validated before any work; errors name their module.
pub fn solve_shared(
    z: MatRef<'_, f64>,
    modules: &[ModuleInput<'_>],
    opts: &SolveOptions,
) -> Result<Vec<SolveResult>> {
    let all = modules
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ");
    // Z's values are validated in the pass that copies it for the Cholesky
    // factorization below, after the modules.
    check_input_shape(z).map_err(|e| e.context(&all))?;
    let gmax: Vec<f64> = modules
        .iter()
        .map(|m| validate_module(z.nrows(), m.y, m.g, opts).map_err(|e| e.context(m.name)))
        .collect::<Result<_>>()?;
    let chol = InputCholesky::new(z, opts.damping, opts.auto_damping, opts.par)
        .map_err(|e| e.context(&all))?;
    for_each_module(modules.len(), |k| {
        let m = &modules[k];
        solve_factored(&chol, m.y, m.g, m.precision, gmax[k], opts).map_err(|e| e.context(m.name))
    })
}

/// `f(0) … f(k−1)` in order; in parallel across modules (each module's own
/// solve is sequential when `opts.par` is), so the results do not depend on
/// the number of threads.
pub fn for_each_module<T: Send>(
    k: usize,
    f: impl Fn(usize) -> Result<T> + Sync + Send,
) -> Result<Vec<T>> {
    use rayon::prelude::*;
    if crate::parallel::parallel_ok() {
        (0..k).into_par_iter().map(f).collect()
    } else {
        (0..k).map(f).collect()
    }
}

/// Quantities within `2^±RANGE` are used as they are (so ordinary inputs
/// keep their bits); beyond, the solve works on a rescaled copy.
const RANGE: i32 = 100;

/// The power of two that brings `x` near 1, or 0 when it is already in range.
fn rescale_exp(x: f64) -> i32 {
    let e = exponent(x);
    if x == 0.0 || (-RANGE..=RANGE).contains(&e) {
        0
    } else {
        -e
    }
}

/// `m · 2^e`: a float64 with an unbounded exponent, for the scalars of the
/// solve (`c′`, `β c′`, `σ`) whose true value may be far outside float64
/// while the rescaled problem is not. Products and quotients round exactly
/// like plain float64 ones wherever those do not under- or overflow.
#[derive(Clone, Copy, Debug)]
struct Sci {
    m: f64,
    e: i32,
}

impl Sci {
    fn new(x: f64) -> Sci {
        let e = exponent(x);
        Sci { m: ldexp(x, -e), e }
    }
    fn mul(self, o: Sci) -> Sci {
        let p = Sci::new(self.m * o.m);
        Sci { m: p.m, e: p.e + self.e + o.e }
    }
    fn div(self, o: Sci) -> Sci {
        let q = Sci::new(self.m / o.m);
        Sci { m: q.m, e: q.e + self.e - o.e }
    }
    fn pow2(self, k: i32) -> Sci {
        Sci { m: self.m, e: self.e + k }
    }
    fn get(self) -> f64 {
        ldexp(self.m, self.e)
    }
}

/// `ỹ` as `q · 2^(−e)` with `max q ≈ 1` and `Σ ỹ` as a [`Sci`]: `1/(y + λ_y)`
/// overflows for `y + λ_y` below 5.6e-309 and `y + λ_y` itself may overflow.
fn scaled_precision(y: &[f64], given: Option<&[f64]>, ly: f64) -> (Vec<(f64, i32)>, Sci) {
    // Each ỹ_j as (mantissa in (0.5, 1], exponent): ỹ_j = mant · 2^(−exp).
    let parts: Vec<(f64, i32)> = match given {
        Some(p) => p
            .iter()
            .map(|&v| {
                let e = exponent(v);
                (ldexp(v, -e), -e)
            })
            .collect(),
        None => y
            .iter()
            .map(|&v| {
                let (w, k) = if (v + ly).is_finite() { (v + ly, 0) } else { (0.5 * v + 0.5 * ly, 1) };
                let f = exponent(w);
                (1.0 / ldexp(w, -f), f + k)
            })
            .collect(),
    };
    let emin = parts.iter().filter(|p| p.0 != 0.0).map(|p| p.1).min().unwrap_or(0);
    let sum: f64 = parts.iter().map(|&(m, e)| ldexp(m, emin - e)).sum();
    (parts, Sci::new(sum).pow2(-emin))
}

/// The solve after the factorization. `precision` overrides `ỹ` (the
/// `sequence_lowrank` output factor); inputs must already be validated, and
/// `grad_max` is the `max |Ḡ|` that [`validate_module`] returned.
///
/// Scale: `Ω` and `Δ̂` do not change when `Ḡ`, `ỹ` or `Z_λ` are multiplied by
/// a positive number (with `normalize`; otherwise the scale is a known power),
/// and the eigenvectors of `Ω′` do not change when `(α, βc′)` are. Where one
/// of them is far from 1 (a gradient of 1e-300, y of 1e308, α of 1e308) the
/// operator works on `H = 2^h D Ḡ` (`D` folded into a copy of `Ḡ`), on
/// `2^z Z_λ` (see [`InputCholesky`]) and on `2^(−t) (α, βc′)`, all powers of
/// two, and `σ`, `c` and the eigenvalues are scaled back at the end in
/// [`Sci`] arithmetic. On ordinary inputs every power is 0 and the bits are
/// those of the plain computation.
pub fn solve_factored(
    chol: &InputCholesky,
    y: &[f64],
    g: MatRef<'_, f64>,
    precision: Option<&[f64]>,
    grad_max: f64,
    opts: &SolveOptions,
) -> Result<SolveResult> {
    let n = chol.dim();
    let r = opts.rank;
    let zero_gradient = grad_max == 0.0;
    if let Some(p) = precision {
        if p.len() != y.len() {
            return Err(Error::Shape(format!(
                "output precision has {} entries, m = {}",
                p.len(),
                y.len()
            )));
        }
        crate::error::check_finite("output precision", p.iter().copied())?;
    }
    let ly = opts.output_damping.unwrap_or(opts.damping);
    let plain: Vec<f64> = match precision {
        Some(p) => p.to_vec(),
        None => output_precision(y, opts),
    };
    let pmax = plain.iter().copied().fold(0.0, f64::max);
    let n_pop = Sci::new(opts.n_pop);
    // `D Ḡ` folded into a rescaled copy only when the plain factors are out
    // of range: the copy costs a pass over Ḡ.
    let ordinary = pmax.is_finite() && rescale_exp(pmax) == 0 && rescale_exp(grad_max) == 0;
    let (h_store, prec, h_exp, c_prime): (Option<Mat<f64>>, Vec<f64>, i32, Sci) = if ordinary || (zero_gradient && pmax.is_finite()) {
        let sum = Sci::new(plain.iter().sum::<f64>());
        (None, plain, 0, sum.div(n_pop))
    } else {
        let (parts, sum) = scaled_precision(y, precision, ly);
        let row_exp: Vec<i32> = (0..g.nrows())
            .map(|i| exponent((0..g.ncols()).map(|j| g[(i, j)].abs()).fold(0.0, f64::max)))
            .collect();
        // log₂ of row i's largest |ỹ_i Ḡ_ij|, up to a factor 2; the copy is
        // scaled so that the largest row's is 0 (h = −max).
        let live = |i: usize| parts[i].0 != 0.0 && (0..g.ncols()).any(|j| g[(i, j)] != 0.0);
        let lrow = |i: usize| row_exp[i] - parts[i].1;
        let lmax = (0..g.nrows()).filter(|&i| live(i)).map(lrow).max().unwrap_or(0);
        let h = Mat::from_fn(g.nrows(), g.ncols(), |i, j| {
            if !live(i) {
                return 0.0;
            }
            ldexp(parts[i].0 * ldexp(g[(i, j)], -row_exp[i]), lrow(i) - lmax)
        });
        (Some(h), vec![1.0; g.nrows()], -lmax, sum.div(n_pop))
    };
    let g_op = h_store.as_ref().map_or(g, |h| h.as_ref());
    let z_exp = chol.scale_exp;
    let mut notes = Vec::new();
    if chol.damping != opts.damping {
        notes.push(format!(
            "damping raised from {:e} to {:e} so that Z + λI factors",
            opts.damping, chol.damping
        ));
    }
    // β c′ in the scale of the operator: c′ k² 2^z with k = 2^(h − z).
    let beta_c = Sci::new(opts.beta).mul(c_prime).pow2(2 * h_exp - z_exp);
    let t_exp = if zero_gradient {
        0
    } else {
        let top = [Sci::new(opts.alpha), beta_c].iter().filter(|v| v.m != 0.0).map(|v| v.e).max().unwrap_or(0);
        if (-RANGE..=RANGE).contains(&top) { 0 } else { top }
    };
    let (alpha, beta_c) = if zero_gradient {
        notes.push(
            "mean gradient is zero (Δ = 0): default used — σ = 1, B = 0, V = the top-r eigenvectors of Z + λI \
             (the bottom of Z_λ⁻¹)"
                .into(),
        );
        (0.0, 1.0)
    } else {
        (ldexp(opts.alpha, -t_exp), beta_c.pow2(-t_exp).get())
    };
    if !beta_c.is_finite() {
        return Err(Error::NonFinite(format!(
            "the variance weight β c′ = β Σỹ / N_pop (β = {:e}, N_pop = {:e}) overflows relative to α = {:e}",
            opts.beta, opts.n_pop, opts.alpha
        )));
    }
    let grad_rows = RowsView::new(g_op, chol.kernel_par);
    let op = Guidance {
        chol,
        mean_grad: g_op,
        grad_rows: grad_rows.get(),
        precision: &prec,
        alpha,
        beta_c,
    };

    let method = match opts.method {
        Method::Auto if n < DENSE_BELOW => Method::Dense,
        Method::Auto => Method::Krylov,
        m => m,
    };
    let eig = match method {
        Method::Krylov => {
            let e = krylov_bottom(&op, r, opts, None)?;
            if e.residual <= CONTRACT_RESIDUAL || !opts.dense_fallback {
                if e.residual > CONTRACT_RESIDUAL {
                    notes.push(format!(
                        "Krylov stopped at residual {:.2e} after {} applications (contract: {:.0e}); no dense fallback asked",
                        e.residual, e.iterations, CONTRACT_RESIDUAL
                    ));
                }
                Some(e)
            } else {
                notes.push(format!(
                    "Krylov stopped at residual {:.2e} after {} applications (contract: {:.0e}); fell back to the dense solve",
                    e.residual, e.iterations, CONTRACT_RESIDUAL
                ));
                None
            }
        }
        _ => None,
    };
    let (mut eig, used) = match eig {
        Some(e) => (e, Method::Krylov),
        None => (dense_bottom(&op, r)?, Method::Dense),
    };
    if eig.residual > CONTRACT_RESIDUAL && opts.dense_fallback {
        // The dense symmetric eigensolver can stop short of the contract on
        // some spectra (seen: 1e-8 at n = 768); Krylov started from its
        // vectors polishes them in a few steps.
        let polished = krylov_bottom(&op, r, opts, Some(eig.vectors.clone()))?;
        notes.push(format!(
            "{} residual {:.1e}; polished by Krylov from its vectors to {:.1e}",
            used.name(),
            eig.residual,
            polished.residual
        ));
        if polished.residual < eig.residual {
            eig = polished;
        }
    }

    // σ only scales Ω (module docs of `guidance`); Ω = Ω′ / σ².
    let sigma = if zero_gradient || !opts.normalize {
        1.0
    } else if used == Method::Dense {
        dense_delta_norm(&op)?
    } else {
        krylov_delta_norm(&op, opts, &eig, &mut notes)?
    };
    let s2 = sigma * sigma;
    // True eigenvalue = ldexp(value / s2, eig_exp); B = Δ_opᵀ V / (σ √γ) · 2^b_exp.
    let k_exp = h_exp - z_exp;
    let (eig_exp, b_exp) = if zero_gradient {
        (z_exp, 0)
    } else if opts.normalize {
        (t_exp, 0)
    } else {
        (t_exp - 2 * k_exp, -k_exp)
    };
    let scale_eig = |v: f64| ldexp(v / s2, eig_exp);
    let mut v = eig.vectors;
    let flipped = fix_signs(&mut v);
    let inv_sqrt_gamma = 1.0 / opts.gamma.sqrt();
    let a = Mat::from_fn(r, n, |i, j| v[(j, i)] * inv_sqrt_gamma);
    let b = if zero_gradient {
        Mat::zeros(g.nrows(), r)
    } else {
        // Δᵀ V is linear in V: flipping a column of V flips the same column of B.
        let mut b = match eig.delta_t.take() {
            Some(mut dt) => {
                for (j, &f) in flipped.iter().enumerate() {
                    if f {
                        let mut c = dt.col_mut(j);
                        c *= faer::Scale(-1.0);
                    }
                }
                dt
            }
            None => op.delta_t(v.as_ref()),
        };
        b *= faer::Scale(inv_sqrt_gamma / sigma);
        if b_exp != 0 {
            b = Mat::from_fn(b.nrows(), b.ncols(), |i, j| ldexp(b[(i, j)], b_exp));
        }
        b
    };
    let (sigma_true, c) = if zero_gradient {
        (1.0, c_prime.get())
    } else if opts.normalize {
        // σ = σ_op / k; c = c′ / σ² = c′ k² / σ_op².
        (ldexp(sigma, -k_exp), c_prime.div(Sci::new(s2)).pow2(2 * k_exp).get())
    } else {
        (1.0, c_prime.get())
    };
    let result = SolveResult {
        a,
        b,
        v,
        eigenvalues: eig.values[..r].iter().map(|&t| scale_eig(t)).collect(),
        next_eigenvalue: scale_eig(eig.values[r]),
        gap: scale_eig(eig.values[r] - eig.values[r - 1]),
        residual: eig.residual,
        omega_norm: scale_eig(eig.norm),
        iterations: eig.iterations,
        method: used,
        sigma: sigma_true,
        c,
        damping: chol.damping,
        zero_gradient,
        notes,
    };
    check_result(&result)?;
    Ok(result)
}

/// SPEC: no NaN or infinity is ever returned as a result. Names the first
/// non-finite quantity; reached only where the exact value is not
/// representable (c = c′/σ² for σ near the underflow threshold, say) or the
/// rescaled problem still overflows (a condition number of Z near 1e308).
pub fn check_result(res: &SolveResult) -> Result<()> {
    let scalars = [
        ("sigma (σ = ‖Δ‖₂)", res.sigma),
        ("c (= Σỹ / N_pop / σ²)", res.c),
        ("next_eigenvalue", res.next_eigenvalue),
        ("gap", res.gap),
        ("residual", res.residual),
        ("omega_norm (‖Ω‖₂)", res.omega_norm),
        ("damping", res.damping),
    ];
    let context = format!("(σ = {:e}, c = {:e}, damping = {:e})", res.sigma, res.c, res.damping);
    for (name, v) in scalars {
        if !v.is_finite() {
            return Err(Error::NonFinite(format!(
                "the result {name} is not representable in float64: {v} {context}"
            )));
        }
    }
    let mats = [("A", res.a.as_ref()), ("B", res.b.as_ref()), ("V", res.v.as_ref())];
    for (name, m) in mats {
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                if !m[(i, j)].is_finite() {
                    return Err(Error::NonFinite(format!(
                        "the result {name} has a non-finite value {} at ({i}, {j}) {context}",
                        m[(i, j)]
                    )));
                }
            }
        }
    }
    if let Some(k) = res.eigenvalues.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "the result eigenvalues has a non-finite value {} at {k} {context}",
            res.eigenvalues[k]
        )));
    }
    Ok(())
}

/// Bottom eigenpairs of `Ω′` in its own scale.
struct Bottom {
    /// `r + 1` values, ascending.
    values: Vec<f64>,
    /// `n × r`.
    vectors: Mat<f64>,
    residual: f64,
    norm: f64,
    iterations: usize,
    /// The top pair of `Δ Δᵀ` on the Krylov basis (Krylov path only).
    delta_top: Option<AuxTop>,
    /// `Δᵀ V` (Krylov path only).
    delta_t: Option<Mat<f64>>,
}

fn krylov_bottom(
    op: &Guidance<'_>,
    r: usize,
    opts: &SolveOptions,
    start: Option<Mat<f64>>,
) -> Result<Bottom> {
    let n = op.dim();
    // Measured at n = 2048 (benches/RESULTS.md): blocks of r + 1 ≥ 8 need the
    // fewest operator applications; 16 or 32 cost more in total.
    let block = (r + 1).max(8).min(n);
    let kopts = KrylovOptions {
        nev: r,
        extra: 1,
        block,
        max_basis: (6 * block).max(48),
        tol: opts.tol,
        loose_tol: GAP_TOL.max(opts.tol),
        gap_rel: GAP_REL,
        // A dense solve costs about as much as n to 1.5 n applications (measured
        // at n = 768 and 2048), so Krylov may use up to n before falling back.
        max_applications: opts.max_applications.unwrap_or(n.max(600)),
        seed: opts.seed,
        start,
        largest: false,
        aux_tol: DELTA_TOP_TOL,
        par: opts.par,
    };
    let res = block_krylov(op, &kopts)?;
    let v = res.vectors.subcols(0, r).to_owned();
    // The residuals are those of the Ritz pairs against the basis images:
    // products with Ω′ itself (combined linearly), not a recurrence.
    let norm = res.norm_estimate.max(f64::MIN_POSITIVE);
    let residual = if res.values.len() > r && res.residuals.len() >= r {
        res.residuals[..r].iter().copied().fold(0.0, f64::max)
    } else {
        f64::INFINITY
    };
    let delta_t = res.side.map(|sd| sd.subcols(0, r).to_owned());
    Ok(Bottom {
        values: res.values,
        vectors: v,
        residual,
        norm,
        iterations: res.applications,
        delta_top: res.aux,
        delta_t,
    })
}

/// The dense recipe of SPEC §3 on `Ω′`: form it, full symmetric eigensolve.
fn dense_bottom(op: &Guidance<'_>, r: usize) -> Result<Bottom> {
    let n = op.dim();
    let omega = dense_omega(op);
    let (values, vectors) = small_eigh(omega.as_ref())?;
    let norm = values[0]
        .abs()
        .max(values[n - 1].abs())
        .max(f64::MIN_POSITIVE);
    let v = vectors.subcols(0, r).to_owned();
    let mut ov = Mat::<f64>::zeros(n, r);
    faer::linalg::matmul::matmul(
        ov.as_mut(),
        Accum::Replace,
        omega.as_ref(),
        v.as_ref(),
        1.0,
        op.chol.par,
    );
    let residual = (0..r)
        .map(|j| {
            let mut rj = ov.col(j).to_owned();
            rj -= v.col(j) * faer::Scale(values[j]);
            rj.norm_l2() / norm
        })
        .fold(0.0, f64::max);
    Ok(Bottom {
        values: values[..=r].to_vec(),
        vectors: v,
        residual,
        norm,
        iterations: 1,
        delta_top: None,
        delta_t: None,
    })
}

/// `Ω′ = −α Δ Δᵀ + β c′ Z_λ⁻¹`, dense and exactly symmetric.
fn dense_omega(op: &Guidance<'_>) -> Mat<f64> {
    let n = op.dim();
    let zinv = op.chol.inverse();
    let delta = dense_delta(op);
    let mut omega = zinv;
    omega *= faer::Scale(op.beta_c);
    faer::linalg::matmul::matmul(
        omega.as_mut(),
        Accum::Add,
        delta.as_ref(),
        delta.transpose(),
        -op.alpha,
        op.chol.par,
    );
    Mat::from_fn(n, n, |i, j| 0.5 * (omega[(i, j)] + omega[(j, i)]))
}

/// `Δ = −Z_λ⁻¹ Ḡᵀ D` (`n × m`).
fn dense_delta(op: &Guidance<'_>) -> Mat<f64> {
    op.delta(Mat::<f64>::identity(op.mean_grad.nrows(), op.mean_grad.nrows()).as_ref())
}

fn dense_delta_norm(op: &Guidance<'_>) -> Result<f64> {
    let delta = dense_delta(op);
    let sv = delta.singular_values().map_err(|e| {
        Error::NonFinite(format!("σ = ‖Δ‖₂: the SVD of Δ did not converge ({e:?}); Δ is not finite in float64"))
    })?;
    Ok(sv.into_iter().fold(0.0, f64::max))
}

/// `σ = ‖Δ‖₂` from the top eigenvalue of `Δ Δᵀ` by block Krylov. A Ritz
/// value with residual `ρ` is within `ρ²/gap` of the eigenvalue, so a residual
/// of 1e-12 · σ² leaves σ exact to rounding unless the top two singular values
/// are nearly equal, where it still bounds the error by ρ itself.
///
/// The bottom of `Ω′ = βc′Z_λ⁻¹ − αΔΔᵀ` is mostly the top of `ΔΔᵀ`, so the
/// eigenvectors just found start the block: the top pair is then found in a
/// few steps instead of from scratch.
fn krylov_delta_norm(
    op: &Guidance<'_>,
    opts: &SolveOptions,
    eig: &Bottom,
    notes: &mut Vec<String>,
) -> Result<f64> {
    // The Krylov basis of Ω′ usually holds the top pair of ΔΔᵀ already.
    if let Some(top) = &eig.delta_top {
        if top.residual <= DELTA_TOP_TOL && top.value > 0.0 {
            return Ok(top.value.sqrt());
        }
    }
    let warm = match &eig.delta_top {
        Some(top) => crate::eigensolver::hcat(top.vector.as_ref(), eig.vectors.as_ref()),
        None => eig.vectors.clone(),
    };
    let gram = DeltaGram(op);
    let n = op.dim();
    let kopts = KrylovOptions {
        nev: 1,
        extra: 0,
        block: 8.min(n),
        max_basis: 48,
        tol: 1e-12,
        loose_tol: 1e-12,
        gap_rel: 0.0,
        max_applications: (n / 4).max(200),
        seed: opts.seed ^ 0x5157,
        start: Some(warm.subcols(0, warm.ncols().min(4)).to_owned()),
        largest: true,
        aux_tol: 1.0,
        par: opts.par,
    };
    let res = block_krylov(&gram, &kopts)?;
    if res.converged || res.residuals[0] <= 1e-9 {
        Ok(res.values[0].max(0.0).sqrt())
    } else {
        notes.push(format!(
            "σ: Krylov residual {:.1e} after {} applications; computed by a dense SVD instead",
            res.residuals[0], res.applications
        ));
        dense_delta_norm(op)
    }
}

/// SPEC §3 step 7: each column's entry of largest magnitude is positive (the first
/// such entry on ties).
/// Returns which columns were negated.
pub fn fix_signs(v: &mut Mat<f64>) -> Vec<bool> {
    let mut flipped = vec![false; v.ncols()];
    for j in 0..v.ncols() {
        let mut best = 0;
        for i in 0..v.nrows() {
            if v[(i, j)].abs() > v[(best, j)].abs() {
                best = i;
            }
        }
        if v[(best, j)] < 0.0 {
            flipped[j] = true;
            for i in 0..v.nrows() {
                v[(i, j)] = -v[(i, j)];
            }
        }
    }
    flipped
}
