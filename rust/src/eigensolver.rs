//! Extreme eigenpairs of a symmetric operator known only through products
//! (SPEC §4): a thick-restarted block Krylov method (block Davidson with the
//! identity preconditioner, which spans the same space as block Lanczos) with
//! full re-orthogonalization, Rayleigh–Ritz on the operator itself, and a
//! residual test relative to an estimate of `‖Op‖₂`.
//!
//! Everything is block (BLAS-3) work: one product `Op · X` per block, Gram
//! matrices with GEMM, two passes of classical Gram–Schmidt.

use faer::{Accum, Mat, MatRef, Par};

use crate::error::{Error, Result};

/// A symmetric linear operator on `R^dim`.
pub trait SymmetricOperator: Sync {
    fn dim(&self) -> usize;
    /// `Op · X` for a block `X` (`dim × k`).
    fn apply(&self, x: MatRef<'_, f64>) -> Mat<f64>;
    /// `Op · X` and, for operators that compute them on the way, `Aux · X`
    /// for a second symmetric operator (whose top eigenpair the Krylov run
    /// then also reports, see [`AuxTop`]) and `S · X` for a linear map `S`
    /// (which the run carries along, so `S v` comes with each Ritz vector).
    fn apply_with_aux(&self, x: MatRef<'_, f64>) -> Products {
        Products { image: self.apply(x), aux: None, side: None }
    }
}

/// What [`SymmetricOperator::apply_with_aux`] returns.
pub struct Products {
    pub image: Mat<f64>,
    pub aux: Option<Mat<f64>>,
    pub side: Option<Mat<f64>>,
}

/// The top Ritz pair of the auxiliary operator on the final Krylov basis.
#[derive(Clone, Debug)]
pub struct AuxTop {
    pub value: f64,
    /// `‖Aux u − θ u‖ / |θ|`.
    pub residual: f64,
    pub vector: Mat<f64>,
    resid: Mat<f64>,
    /// `vector` in the coordinates of the basis it was found on.
    coords: Mat<f64>,
}

#[derive(Clone, Debug)]
pub struct KrylovOptions {
    /// Pairs that must reach `tol`.
    pub nev: usize,
    /// Further pairs (after the first `nev`) that must reach `loose_tol`; used to
    /// measure the gap `λ_{nev+1} − λ_nev`.
    pub extra: usize,
    /// Vectors added per step.
    pub block: usize,
    /// Largest basis before a thick restart.
    pub max_basis: usize,
    /// Residual tolerance relative to the `‖Op‖₂` estimate.
    pub tol: f64,
    pub loose_tol: f64,
    /// The extra pairs also count as converged at a residual of `gap_rel`
    /// times their distance to the last wanted Ritz value (relative to
    /// `‖Op‖₂`): the gap is then known to that relative accuracy.
    pub gap_rel: f64,
    /// Budget of single-vector operator applications.
    pub max_applications: usize,
    /// Seed of the (deterministic) random start block.
    pub seed: u64,
    /// Start vectors (`dim × k`) placed before the random ones, e.g. a
    /// subspace already known to be close to the wanted one.
    pub start: Option<Mat<f64>>,
    /// Seek the largest eigenvalues instead of the smallest.
    pub largest: bool,
    /// Residual (relative to its Ritz value) the auxiliary operator's top
    /// pair should reach; its residual joins the expansion until then.
    pub aux_tol: f64,
    pub par: Par,
}

#[derive(Clone, Debug)]
pub struct KrylovResult {
    /// `nev + extra` Ritz values, ascending (descending when `largest`).
    pub values: Vec<f64>,
    /// The matching Ritz vectors, `dim × (nev + extra)`.
    pub vectors: Mat<f64>,
    /// Residuals `‖Op v − θ v‖ / ‖Op‖₂(est)` from the last Rayleigh–Ritz step.
    pub residuals: Vec<f64>,
    /// Largest `|θ|` ever seen: a lower bound on `‖Op‖₂`.
    pub norm_estimate: f64,
    pub applications: usize,
    pub iterations: usize,
    pub converged: bool,
    pub aux: Option<AuxTop>,
    /// `S v` for each returned Ritz vector `v` (operators with a side map).
    pub side: Option<Mat<f64>>,
}

/// SplitMix64-driven standard normal numbers: a fixed, platform-independent
/// start block, so solves are reproducible.
pub fn gaussian_block(n: usize, k: usize, seed: u64) -> Mat<f64> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    Mat::from_fn(n, k, |_, _| {
        let (u1, u2) = (next(), next());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    })
}

fn matmul(
    dst: faer::MatMut<'_, f64>,
    beta: Accum,
    a: MatRef<'_, f64>,
    b: MatRef<'_, f64>,
    alpha: f64,
    par: Par,
) {
    faer::linalg::matmul::matmul(dst, beta, a, b, alpha, par);
}

/// Orthonormalize the columns of `t` against the orthonormal `basis` and among
/// themselves; columns that vanish (already in the span) are dropped, and
/// replaced by fresh random directions when nothing is left.
fn orthonormalize_against(
    basis: MatRef<'_, f64>,
    mut t: Mat<f64>,
    seed: u64,
    par: Par,
) -> Mat<f64> {
    if let Some(q) = cholqr_against(basis, &t, par) {
        return q;
    }
    let n = t.nrows();
    let p = basis.ncols();
    let room = n.saturating_sub(p);
    for attempt in 0..4u64 {
        let norms: Vec<f64> = (0..t.ncols()).map(|j| t.col(j).norm_l2()).collect();
        // Two passes of block classical Gram–Schmidt against the basis.
        for _ in 0..2 {
            if p > 0 {
                let mut c = Mat::<f64>::zeros(p, t.ncols());
                matmul(
                    c.as_mut(),
                    Accum::Replace,
                    basis.transpose(),
                    t.as_ref(),
                    1.0,
                    par,
                );
                matmul(t.as_mut(), Accum::Add, basis, c.as_ref(), -1.0, par);
            }
        }
        // Within the block: column-wise Gram–Schmidt, twice, dropping dependent columns.
        let mut kept: Vec<faer::Col<f64>> = Vec::new();
        for j in 0..t.ncols() {
            if kept.len() >= room {
                break;
            }
            let mut v = t.col(j).to_owned();
            for _ in 0..2 {
                for q in &kept {
                    let d = q.transpose() * &v;
                    v -= q * faer::Scale(d);
                }
                if p > 0 {
                    let mut c = Mat::<f64>::zeros(p, 1);
                    matmul(
                        c.as_mut(),
                        Accum::Replace,
                        basis.transpose(),
                        v.as_mat(),
                        1.0,
                        Par::Seq,
                    );
                    let mut vm = v.as_mat_mut();
                    matmul(vm.as_mut(), Accum::Add, basis, c.as_ref(), -1.0, Par::Seq);
                }
            }
            let nv = v.norm_l2();
            if nv > 1e-10 * norms[j] && nv > 0.0 && nv.is_finite() {
                v *= faer::Scale(1.0 / nv);
                kept.push(v);
            }
        }
        if !kept.is_empty() || room == 0 {
            return Mat::from_fn(n, kept.len(), |i, j| kept[j][i]);
        }
        t = gaussian_block(
            n,
            t.ncols().min(room).max(1),
            seed.wrapping_add(attempt + 1),
        );
    }
    Mat::zeros(n, 0)
}

/// The block path of [`orthonormalize_against`]: twice (block Gram–Schmidt
/// against the basis, then Cholesky QR of the block). BLAS-3 only; `None`
/// when the block is too close to dependent for Cholesky QR (a diagonal of
/// `R` below 1e-6 of its column's norm), where the column-wise path, which
/// drops dependent columns, takes over.
fn cholqr_against(basis: MatRef<'_, f64>, t: &Mat<f64>, par: Par) -> Option<Mat<f64>> {
    let (n, k, p) = (t.nrows(), t.ncols(), basis.ncols());
    if k == 0 || p + k > n {
        return None;
    }
    let norms: Vec<f64> = (0..k).map(|j| t.col(j).norm_l2()).collect();
    if norms.iter().any(|v| !(*v > 0.0 && v.is_finite())) {
        return None;
    }
    let mut q = t.clone();
    for pass in 0..2 {
        if p > 0 {
            let mut c = Mat::<f64>::zeros(p, k);
            matmul(c.as_mut(), Accum::Replace, basis.transpose(), q.as_ref(), 1.0, par);
            matmul(q.as_mut(), Accum::Add, basis, c.as_ref(), -1.0, par);
        }
        let mut g = Mat::<f64>::zeros(k, k);
        matmul(g.as_mut(), Accum::Replace, q.transpose(), q.as_ref(), 1.0, par);
        let l = g.llt(faer::Side::Lower).ok()?.L().to_owned();
        if pass == 0 && (0..k).any(|j| !(l[(j, j)] > 1e-6 * norms[j])) {
            return None;
        }
        // Q ← Q L⁻ᵀ, i.e. L Qᵀ = Qᵀ.
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(l.as_ref(), q.as_mut().transpose_mut(), par);
    }
    Some(q)
}

/// Symmetric eigen-decomposition of a small dense matrix, ascending.
///
/// Fails (rather than panics) when the matrix is not finite: the operator
/// overflowed, which the caller reports as a non-finite error.
pub fn small_eigh(h: MatRef<'_, f64>) -> Result<(Vec<f64>, Mat<f64>)> {
    crate::parallel::init_parallelism();
    let k = h.nrows();
    let hs = Mat::from_fn(k, k, |i, j| 0.5 * (h[(i, j)] + h[(j, i)]));
    if let Some(v) = hs.as_ref().col_iter().flat_map(|c| c.iter().copied()).find(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "the eigensolver met a non-finite value {v}: the guidance operator Ω overflows float64 for these inputs"
        )));
    }
    let evd = hs.self_adjoint_eigen(faer::Side::Lower).map_err(|e| {
        Error::NonFinite(format!("the symmetric eigendecomposition of a {k}×{k} matrix did not converge ({e:?})"))
    })?;
    let s = evd.S();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| s[a].total_cmp(&s[b]));
    let values = order.iter().map(|&i| s[i]).collect();
    let u = evd.U();
    let vectors = Mat::from_fn(k, k, |i, j| u[(i, order[j])]);
    Ok((values, vectors))
}

/// The `nev + extra` extreme eigenpairs of `op` (see the module docs).
pub fn block_krylov(op: &dyn SymmetricOperator, opts: &KrylovOptions) -> Result<KrylovResult> {
    let n = op.dim();
    let sign = if opts.largest { -1.0 } else { 1.0 };
    let apply = |x: MatRef<'_, f64>| {
        let mut p = op.apply_with_aux(x);
        if opts.largest {
            p.image *= faer::Scale(-1.0);
        }
        (p.image, p.aux, p.side)
    };
    let want = (opts.nev + opts.extra).min(n);
    let block = opts.block.max(want).min(n).max(1);
    let max_basis = opts.max_basis.max(2 * block + want).min(n);

    let mut start = gaussian_block(n, block, opts.seed);
    if let Some(s) = &opts.start {
        let k = s.ncols().min(block);
        start.subcols_mut(0, k).copy_from(s.subcols(0, k));
    }
    let mut basis =
        orthonormalize_against(Mat::<f64>::zeros(n, 0).as_ref(), start, opts.seed, opts.par);
    let (mut image, mut aux, mut side) = apply(basis.as_ref());
    let mut applications = basis.ncols();
    let mut h = Mat::<f64>::zeros(basis.ncols(), basis.ncols());
    matmul(
        h.as_mut(),
        Accum::Replace,
        basis.transpose(),
        image.as_ref(),
        1.0,
        opts.par,
    );
    let mut norm_estimate: f64 = 0.0;
    let mut iterations = 0;

    loop {
        iterations += 1;
        let p = basis.ncols();
        let (theta, u) = small_eigh(h.as_ref())?;
        norm_estimate = norm_estimate.max(theta[0].abs()).max(theta[p - 1].abs());
        let scale = if norm_estimate > 0.0 {
            norm_estimate
        } else {
            1.0
        };
        // Ritz pairs with residuals: the wanted ones and a block beyond them.
        let k = (want + block).min(p);
        let uk = u.subcols(0, k);
        let ritz = ritz_subspace(basis.as_ref(), uk, opts.par);
        let mut resid = ritz_subspace(image.as_ref(), uk, opts.par);
        for j in 0..k {
            let th = theta[j];
            let mut rj = resid.col_mut(j);
            rj -= ritz.col(j) * faer::Scale(th);
        }
        let res: Vec<f64> = (0..k).map(|j| resid.col(j).norm_l2() / scale).collect();
        let aux_now = aux
            .as_ref()
            .map(|a| aux_top(basis.as_ref(), a.as_ref(), opts.par))
            .transpose()?;
        let aux_ok = aux_now.as_ref().is_none_or(|t| t.residual <= opts.aux_tol);
        let pair_tol = |j: usize| {
            if j < opts.nev {
                opts.tol
            } else {
                let gap = if opts.nev > 0 { (theta[j] - theta[opts.nev - 1]) / scale } else { 0.0 };
                opts.loose_tol.max(opts.gap_rel * gap)
            }
        };
        let done = p >= n || ((0..want.min(k)).all(|j| res[j] <= pair_tol(j)) && k >= want && aux_ok);
        if done || applications >= opts.max_applications {
            let converged = done;
            return Ok(KrylovResult {
                values: theta[..want.min(p)].iter().map(|t| sign * t).collect(),
                vectors: ritz.subcols(0, want.min(k)).to_owned(),
                residuals: res[..want.min(k)].to_vec(),
                norm_estimate,
                applications,
                iterations,
                converged,
                aux: aux_now,
                side: side.as_ref().map(|sd| ritz_subspace(sd.as_ref(), uk.subcols(0, want.min(k)), opts.par)),
            });
        }
        // Expand with the residuals of the pairs not yet converged.
        // A product with a block costs about as much as with one vector (the
        // operator is memory-bound), so every step adds a full block: the
        // unconverged wanted pairs first, then the next Ritz pairs, which
        // speed up convergence of the wanted ones.
        let mut pending: Vec<usize> = (0..want.min(k)).filter(|&j| res[j] > pair_tol(j)).collect();
        let mut next = want;
        while pending.len() < block && next < k {
            pending.push(next);
            next += 1;
        }

        // The auxiliary operator's top pair rides along: its residual takes
        // the last slot of the block until it reaches `aux_tol`.
        let aux_pending = aux_now.as_ref().is_some_and(|t| t.residual > opts.aux_tol);
        if aux_pending && pending.len() >= block && pending.len() > 1 {
            pending.pop();
        }
        let mut expand = Mat::from_fn(n, pending.len(), |i, j| resid[(i, pending[j])]);
        if let Some(t) = aux_now.as_ref().filter(|_| aux_pending) {
            expand = hcat(expand.as_ref(), t.resid.as_ref());
        }
        // Thick restart: keep the best Ritz vectors when the basis is full,
        // and the auxiliary operator's top Ritz vector (otherwise its
        // residual would start over).
        if p + expand.ncols() > max_basis {
            let keep = (max_basis / 2).max(want + block).min(p);
            let c = restart_coords(u.subcols(0, keep), aux_now.as_ref().map(|t| t.coords.as_ref()));
            basis = ritz_subspace(basis.as_ref(), c.as_ref(), opts.par);
            image = ritz_subspace(image.as_ref(), c.as_ref(), opts.par);
            aux = aux.map(|a| ritz_subspace(a.as_ref(), c.as_ref(), opts.par));
            side = side.map(|sd| ritz_subspace(sd.as_ref(), c.as_ref(), opts.par));
            h = c.transpose() * &h * &c;
        }
        let p = basis.ncols();
        let fresh = orthonormalize_against(
            basis.as_ref(),
            expand,
            opts.seed.wrapping_add(iterations as u64 * 7919),
            opts.par,
        );
        let t = fresh.ncols();
        if t == 0 {
            // The basis spans an invariant subspace of dimension n.
            let (theta, u) = small_eigh(h.as_ref())?;
            let uk = u.subcols(0, want.min(p));
            let ritz = ritz_subspace(basis.as_ref(), uk, opts.par);
            return Ok(KrylovResult {
                values: theta[..uk.ncols()].iter().map(|t| sign * t).collect(),
                vectors: ritz,
                residuals: vec![0.0; uk.ncols()],
                norm_estimate,
                applications,
                iterations,
                converged: true,
                aux: aux
                    .as_ref()
                    .map(|a| aux_top(basis.as_ref(), a.as_ref(), opts.par))
                    .transpose()?,
                side: side.as_ref().map(|sd| ritz_subspace(sd.as_ref(), uk, opts.par)),
            });
        }
        let (fresh_image, fresh_aux, fresh_side) = apply(fresh.as_ref());
        applications += t;
        // H gains the new columns: Vᵀ (Op T) and Tᵀ (Op T).
        let mut hv = Mat::<f64>::zeros(p, t);
        matmul(
            hv.as_mut(),
            Accum::Replace,
            basis.transpose(),
            fresh_image.as_ref(),
            1.0,
            opts.par,
        );
        let mut ht = Mat::<f64>::zeros(t, t);
        matmul(
            ht.as_mut(),
            Accum::Replace,
            fresh.transpose(),
            fresh_image.as_ref(),
            1.0,
            opts.par,
        );
        let mut h2 = Mat::<f64>::zeros(p + t, p + t);
        h2.submatrix_mut(0, 0, p, p).copy_from(h.as_ref());
        h2.submatrix_mut(0, p, p, t).copy_from(hv.as_ref());
        h2.submatrix_mut(p, 0, t, p).copy_from(hv.transpose());
        h2.submatrix_mut(p, p, t, t).copy_from(ht.as_ref());
        h = h2;
        basis = hcat(basis.as_ref(), fresh.as_ref());
        image = hcat(image.as_ref(), fresh_image.as_ref());
        aux = match (aux, fresh_aux) {
            (Some(a), Some(f)) => Some(hcat(a.as_ref(), f.as_ref())),
            _ => None,
        };
        side = match (side, fresh_side) {
            (Some(a), Some(f)) => Some(hcat(a.as_ref(), f.as_ref())),
            _ => None,
        };
    }
}

/// Rayleigh–Ritz of the auxiliary operator on the basis: its top pair.
fn aux_top(basis: MatRef<'_, f64>, aux: MatRef<'_, f64>, par: Par) -> Result<AuxTop> {
    let p = basis.ncols();
    let mut h = Mat::<f64>::zeros(p, p);
    matmul(h.as_mut(), Accum::Replace, basis.transpose(), aux, 1.0, par);
    let (theta, u) = small_eigh(h.as_ref())?;
    let top = u.subcols(p - 1, 1);
    let value = theta[p - 1];
    let vector = ritz_subspace(basis, top, par);
    let mut r = ritz_subspace(aux, top, par);
    r -= &vector * faer::Scale(value);
    let residual = if value != 0.0 {
        r.norm_l2() / value.abs()
    } else {
        f64::INFINITY
    };
    Ok(AuxTop {
        value,
        residual,
        vector,
        resid: r,
        coords: top.to_owned(),
    })
}

/// Orthonormal coordinates of the restarted basis: the kept Ritz vectors
/// (orthonormal columns of `u`), then `extra` orthogonalized against them
/// when it adds a direction.
fn restart_coords(u: MatRef<'_, f64>, extra: Option<MatRef<'_, f64>>) -> Mat<f64> {
    let Some(w) = extra else { return u.to_owned() };
    let mut w = w.to_owned();
    for _ in 0..2 {
        let c = u.transpose() * &w;
        w -= u * &c;
    }
    let norm = w.norm_l2();
    if !(norm > 1e-8) {
        return u.to_owned();
    }
    w *= faer::Scale(1.0 / norm);
    hcat(u, w.as_ref())
}

fn ritz_subspace(v: MatRef<'_, f64>, u: MatRef<'_, f64>, par: Par) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(v.nrows(), u.ncols());
    matmul(out.as_mut(), Accum::Replace, v, u, 1.0, par);
    out
}

/// `[a b]`, column-major.
pub fn hcat(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(a.nrows(), a.ncols() + b.ncols());
    out.subcols_mut(0, a.ncols()).copy_from(a);
    out.subcols_mut(a.ncols(), b.ncols()).copy_from(b);
    out
}
