//! Copies of a matrix with contiguous rows (the products read `Ḡ` by rows).

use faer::{MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::buffer::BigMat;

/// A column-major copy of `aᵀ`, by tiles (in parallel over column blocks).
pub fn transpose(a: MatRef<'_, f64>, par: Par) -> BigMat {
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
    if crate::parallel::pooled(par) {
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
    pub fn new(a: MatRef<'a, f64>, par: Par) -> Self {
        if a.col_stride() == 1 || a.ncols() <= 1 {
            RowsView::Borrowed(a)
        } else {
            RowsView::Copied(transpose(a, par))
        }
    }
    pub fn get(&self) -> MatRef<'_, f64> {
        match self {
            RowsView::Borrowed(a) => *a,
            RowsView::Copied(t) => t.as_ref().transpose(),
        }
    }
}
