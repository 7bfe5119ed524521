//! One pass over an input for its validation summary (SPEC §3: inputs are
//! validated before any work), and the copy of `Z`'s lower triangle that the
//! Cholesky factorization works in, made in the same pass.

use faer::{MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::buffer::BigMat;

/// A column-major copy of the lower triangle of `z` (zeros above), and the
/// [`Scan`] of all of `z` (finite, largest magnitude, largest asymmetry) made
/// in the same pass: each lower tile is read with its mirror above the
/// diagonal, so `Z` is read once for both the validation and the copy.
pub fn lower_copy_checked(z: MatRef<'_, f64>, par: Par) -> (BigMat, Scan) {
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
    let acc = if crate::parallel::pooled(par) && n > TILE {
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

pub fn scan(a: MatRef<'_, f64>, symmetry: bool, par: Par) -> Scan {
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
    let acc = if crate::parallel::pooled(par) && blocks > 1 {
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
