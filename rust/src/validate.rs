//! Validation of a solve's inputs (SPEC §3, "Inputs are validated before any
//! work"): shapes, finiteness, the symmetry of `Z`, the rank and the scalars.

use faer::MatRef;

use crate::error::{Error, Result};
use crate::options::SolveOptions;

/// Largest `|Z[i,j] − Z[j,i]|` accepted, relative to `max |Z|`.
pub const SYMMETRY_TOL: f64 = 1e-10;

/// `Z` must be square and non-empty.
pub fn check_input_shape(z: MatRef<'_, f64>) -> Result<()> {
    if z.ncols() != z.nrows() || z.nrows() == 0 {
        return Err(Error::Shape(format!(
            "Z must be square and non-empty, got ({}, {})",
            z.nrows(),
            z.ncols()
        )));
    }
    Ok(())
}

/// Validate `Z` (SPEC §3, "Inputs are validated before any work"): finite
/// and symmetric to `SYMMETRY_TOL · max|Z|`. The solve validates the values
/// in the pass that copies `Z` for the Cholesky factorization
/// ([`InputCholesky::new`]) and calls this only to name the offending entry.
pub fn validate_input_factor(z: MatRef<'_, f64>) -> Result<()> {
    check_input_shape(z)?;
    let n = z.nrows();
    // One parallel pass accepts a valid Z; the ordered scan below names the
    // first offending entry of an invalid one.
    let s = crate::kernels::scan(z, true, crate::parallel::kernel_par());
    if s.finite && s.max_asym <= SYMMETRY_TOL * s.max_abs {
        return Ok(());
    }
    if !s.finite {
        first_non_finite("Z", z)?;
    }
    let scale = s.max_abs;
    // Compare Z[i, j] with Z[j, i] tile by tile: the transposed reads stay in cache.
    const TILE: usize = 64;
    for j0 in (0..n).step_by(TILE) {
        for i0 in (j0..n).step_by(TILE) {
            for j in j0..(j0 + TILE).min(n) {
                for i in i0.max(j + 1)..(i0 + TILE).min(n) {
                    let d = (z[(i, j)] - z[(j, i)]).abs();
                    if d > SYMMETRY_TOL * scale {
                        return Err(Error::InvalidArgument(format!(
                            "Z is not symmetric: |Z[{i},{j}] − Z[{j},{i}]| = {d:e} > {SYMMETRY_TOL:e} · max|Z| = {:e}",
                            SYMMETRY_TOL * scale
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The error naming the first non-finite entry of `a` (column by column), if any.
fn first_non_finite(what: &str, a: MatRef<'_, f64>) -> Result<()> {
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            let v = a[(i, j)];
            if !v.is_finite() {
                return Err(Error::NonFinite(format!("{what} has a non-finite value {v} at ({i}, {j})")));
            }
        }
    }
    Ok(())
}

/// Validate `y`, `Ḡ` and the rank against a Z of dimension `n`. Returns
/// `max |Ḡ|`, found in the same pass over `Ḡ`: zero is SPEC §3's special
/// case `Ḡ = 0`, and its magnitude decides whether the solve must rescale.
pub fn validate_module(n: usize, y: &[f64], g: MatRef<'_, f64>, opts: &SolveOptions) -> Result<f64> {
    let m = y.len();
    if g.nrows() != m || g.ncols() != n {
        return Err(Error::Shape(format!(
            "G must have shape (m, n) = ({m}, {n}) to match y ({m}) and Z ({n}×{n}), got ({}, {})",
            g.nrows(),
            g.ncols()
        )));
    }
    for (j, v) in y.iter().enumerate() {
        if !v.is_finite() {
            return Err(Error::NonFinite(format!(
                "y has a non-finite value {v} at {j}"
            )));
        }
        if *v < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "y must be ≥ 0, got {v} at {j}"
            )));
        }
    }
    let summary = crate::kernels::scan(g, false, crate::parallel::kernel_par());
    if !summary.finite {
        first_non_finite("G", g)?;
    }
    opts.check(Some((n, m)))?;
    let ly = opts.output_damping.unwrap_or(opts.damping);
    if let Some(j) = y.iter().position(|v| v + ly <= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "y[{j}] + output_damping = 0: the output precision 1/(y + λ_y) is infinite; use output_damping > 0"
        )));
    }
    Ok(summary.max_abs)
}
