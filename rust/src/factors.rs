//! Streaming K-FAC factors (SPEC §2).
//!
//! * [`InputFactor`]: `Σ_t x_t x_tᵀ` over token rows, one triangle, float64;
//!   `Z = (1/T) Σ_t x_t x_tᵀ`.
//! * [`OutputFactor`]: `Σ_t g_t ⊙ g_t`, float64; `y = (1/T) Σ_t g_t ⊙ g_t`;
//!   optionally the per-sample sums `u_s = Σ_{t∈s} g_t` (`sequence_lowrank`).
//!
//! Precision: a product of two float32 (or bfloat16) numbers is exact in
//! float64, so the only rounding is in the sums. Within one chunk of at most
//! [`TOKEN_CHUNK`] rows a float64 GEMM sums exact products (worst-case relative
//! error `TOKEN_CHUNK · 2⁻⁵³ ≈ 2.3e-13` of `Σ|x_i x_j|`); chunk results are
//! added to the running total with Neumaier compensation, so the error does
//! not grow with the length of the stream.
//!
//! Determinism: the work is split into column panels of the triangle; each
//! panel is computed sequentially in a fixed order by one thread. The result
//! is therefore bit-identical whatever the number of threads.

use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Rows per float64 GEMM along the token axis (see the module docs).
pub const TOKEN_CHUNK: usize = 2048;
/// Width of one column panel of the triangle: the unit of parallel work.
const PANEL: usize = 96;

/// A flat buffer of Neumaier-compensated float64 sums.
#[derive(Clone, Debug, PartialEq)]
pub struct CompensatedSum {
    sum: Vec<f64>,
    comp: Vec<f64>,
}

impl CompensatedSum {
    pub fn zeros(len: usize) -> Self {
        Self { sum: vec![0.0; len], comp: vec![0.0; len] }
    }

    /// [`Self::zeros`], or `OutOfMemory` naming `what` instead of an abort.
    pub fn try_zeros(len: usize, what: &str) -> Result<Self> {
        Ok(Self { sum: crate::error::try_zeros(len, what)?, comp: crate::error::try_zeros(len, what)? })
    }

    pub fn len(&self) -> usize {
        self.sum.len()
    }

    /// Faults in every page of the sums and compensations, each page's first
    /// value rewritten with itself: the values do not change, and a later
    /// addition does not pay the first touch of fresh pages.
    pub fn touch(&mut self) {
        const PAGE_VALUES: usize = 4096 / std::mem::size_of::<f64>();
        for v in [&mut self.sum, &mut self.comp] {
            for i in (0..v.len()).step_by(PAGE_VALUES) {
                v[i] = std::hint::black_box(v[i]);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    /// The compensated value of entry `i`.
    #[inline]
    pub fn value(&self, i: usize) -> f64 {
        self.sum[i] + self.comp[i]
    }

    pub fn values(&self) -> Vec<f64> {
        (0..self.len()).map(|i| self.value(i)).collect()
    }

    /// Add `other` entry-wise (sum and compensation), keeping compensation.
    pub fn merge(&mut self, other: &CompensatedSum) {
        assert_eq!(self.len(), other.len());
        for i in 0..self.len() {
            neumaier(&mut self.sum[i], &mut self.comp[i], other.sum[i]);
            neumaier(&mut self.sum[i], &mut self.comp[i], other.comp[i]);
        }
    }

    /// The raw running sums and their compensations (for exact checkpoints).
    pub fn raw(&self) -> (&[f64], &[f64]) {
        (&self.sum, &self.comp)
    }

    fn parts_mut(&mut self) -> (&mut [f64], &mut [f64]) {
        (&mut self.sum, &mut self.comp)
    }
}

/// `s + c ← s + c + v` with the rounding error of `s + v` kept in `c`
/// (Neumaier's compensated sum). The error term is computed by Knuth's
/// branch-free TwoSum, which gives the same exact error as Neumaier's
/// comparison of magnitudes and lets the loops over buffers vectorize.
#[inline(always)]
fn neumaier(s: &mut f64, c: &mut f64, v: f64) {
    let t = *s + v;
    let z = t - *s;
    *c += (*s - (t - z)) + (v - z);
    *s = t;
}

/// Work buffers up to this many values (16 MiB) are kept per thread and slot
/// between calls; larger ones are allocated per call.
const SCRATCH_KEEP: usize = 2 << 20;

/// The kept work buffers: the converted rows of a chunk, and a panel's GEMM
/// block with its right factor.
#[derive(Clone, Copy)]
enum Scratch {
    Rows = 0,
    Panel = 1,
}

/// Run `f` on a work buffer of `len` values (contents unspecified), reusing
/// the one kept for `slot` on this thread: a fresh multi-megabyte buffer per
/// call costs page faults, and its release TLB shootdowns across cores, that
/// measured about a third of `InputFactor.add` at n = 2048.
fn with_scratch<R>(slot: Scratch, len: usize, f: impl FnOnce(&mut [f64]) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        static SCRATCH: [RefCell<Vec<f64>>; 2] = const { [RefCell::new(Vec::new()), RefCell::new(Vec::new())] };
    }
    if len > SCRATCH_KEEP {
        return f(&mut vec![0.0; len]);
    }
    SCRATCH.with(|cells| match cells[slot as usize].try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        // Re-entered on this thread (not expected): a fresh buffer.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Add `Σ_t x_t x_tᵀ` over the rows of `xt` (`n × tc`, column-major: row
/// `t` of X is column `t`) to the packed columns `j0 … j0 + PANEL` of the
/// compensated triangle (`s`, `c`: that panel's slices).
fn add_panel(xt: MatRef<'_, f64>, j0: usize, s: &mut [f64], c: &mut [f64]) {
    let (n, tc) = (xt.nrows(), xt.ncols());
    let w = PANEL.min(n - j0);
    let h = n - j0;
    with_scratch(Scratch::Panel, h * w + tc * w, |scratch| {
        let (block, rhs) = scratch.split_at_mut(h * w);
        let mut block = MatMut::from_column_major_slice_mut(block, h, w);
        // The right factor X[:, j0..j0+w] is a row-major view of the rows;
        // GEMM runs about twice as fast on a column-major copy of it.
        let mut rhs = MatMut::from_column_major_slice_mut(rhs, tc, w);
        rhs.copy_from(xt.submatrix(j0, 0, w, tc).transpose());
        // block = Xᵀ[j0.., :] · X[:, j0..j0+w]
        faer::linalg::matmul::matmul(
            block.as_mut(),
            Accum::Replace,
            xt.submatrix(j0, 0, h, tc),
            rhs.as_ref(),
            1.0,
            Par::Seq,
        );
        let base = packed_col_start(n, j0);
        for jj in 0..w {
            let j = j0 + jj;
            let off = packed_col_start(n, j) - base;
            let col = block.as_ref().col(jj);
            for i in j..n {
                let k = off + (i - j);
                neumaier(&mut s[k], &mut c[k], col[i - j0]);
            }
        }
    });
}

/// Offset of column `j` in the packed lower triangle (column-major, rows `j..n`).
#[inline]
pub fn packed_col_start(n: usize, j: usize) -> usize {
    j * n - (j * (j + 1)) / 2 + j
}

/// Length of a packed `n × n` triangle.
#[inline]
pub fn packed_len(n: usize) -> usize {
    n * (n + 1) / 2
}

/// `Z = (1/T) Σ_t x_t x_tᵀ` (SPEC §2), row-major into `z` (`n²` entries), straight
/// from a packed lower triangle (column-major, as [`InputFactor::packed_raw`] and the
/// statistics file hold it) and its compensation, if any: the values of
/// [`InputFactor::mean_row_major`] on the factor that `from_packed` would build,
/// without building it (no copy of the triangle, no zeroed compensation).
///
/// Packed column `j` (rows `j..n`) is row `j` of the upper triangle, so the upper half
/// is written contiguously; the lower half is its transpose, copied in square tiles so
/// that neither side of the copy strides through memory.
pub fn packed_mean_row_major_into(n: usize, sum: &[f64], comp: Option<&[f64]>, tokens: u64, z: &mut [f64]) -> Result<()> {
    if tokens == 0 {
        return Err(Error::InvalidArgument("InputFactor.mean: no token has been added".into()));
    }
    if sum.len() != packed_len(n) || comp.is_some_and(|c| c.len() != sum.len()) {
        return Err(Error::Shape(format!(
            "InputFactor.mean: a packed triangle for n = {n} has {} entries, got {} (compensation {:?})",
            packed_len(n),
            sum.len(),
            comp.map(|c| c.len())
        )));
    }
    if z.len() != n * n {
        return Err(Error::Shape(format!("InputFactor.mean: the output holds {} entries, Z has {}", z.len(), n * n)));
    }
    crate::error::check_finite("InputFactor packed triangle", sum.iter().copied())?;
    if let Some(c) = comp {
        crate::error::check_finite("InputFactor compensation", c.iter().copied())?;
    }
    let scale = 1.0 / tokens as f64;
    for j in 0..n {
        let off = packed_col_start(n, j);
        let row = &mut z[j * n + j..(j + 1) * n];
        let part = &sum[off..off + row.len()];
        match comp {
            // the same `sum + comp` as a factor's value, with a zero compensation where none is given
            Some(c) => {
                for ((v, s), c) in row.iter_mut().zip(part).zip(&c[off..off + part.len()]) {
                    *v = (s + c) * scale;
                }
            }
            None => {
                for (v, s) in row.iter_mut().zip(part) {
                    *v = (s + 0.0) * scale;
                }
            }
        }
    }
    const TILE: usize = 64;
    for i0 in (0..n).step_by(TILE) {
        for j0 in (0..=i0).step_by(TILE) {
            for i in i0..(i0 + TILE).min(n) {
                for j in j0..(j0 + TILE).min(i) {
                    z[i * n + j] = z[j * n + i];
                }
            }
        }
    }
    Ok(())
}

/// [`packed_len`], or `None` where it does not fit in a `usize`. Past that
/// check every offset of the triangle fits too: an allocation of that many
/// values bounds `n` far below where `j · n` could wrap.
pub fn checked_packed_len(n: usize) -> Option<usize> {
    let (a, b) = if n % 2 == 0 { (n / 2, n.checked_add(1)?) } else { (n, n.checked_add(1)? / 2) };
    a.checked_mul(b)
}

/// `a + b` for the token and sample counters, or an error naming the
/// counter rather than a silent wrap (release builds do not check overflow).
fn add_count(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_add(b).ok_or_else(|| {
        Error::InvalidArgument(format!("{what}: the count {a} + {b} overflows a 64-bit counter"))
    })
}

/// Something that can write rows `t0..t1` of a `(T, n)` matrix into a
/// row-major float64 buffer of `(t1 - t0) · n` entries. The binding layer
/// implements it for float32, float64 and bfloat16-bit arrays of any strides.
pub trait RowSource: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    fn fill(&self, t0: usize, t1: usize, out: &mut [f64]);
}

/// A row-major float64 slice as a [`RowSource`].
pub struct DenseRows<'a> {
    pub data: &'a [f64],
    pub cols: usize,
}

impl RowSource for DenseRows<'_> {
    fn rows(&self) -> usize {
        if self.cols == 0 {
            0
        } else {
            self.data.len() / self.cols
        }
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn fill(&self, t0: usize, t1: usize, out: &mut [f64]) {
        out.copy_from_slice(&self.data[t0 * self.cols..t1 * self.cols]);
    }
}

/// Check every value of `src` is finite before anything is accumulated, so that
/// a bad batch leaves the accumulator exactly as it was.
fn validate_rows(src: &dyn RowSource, what: &str) -> Result<()> {
    let (t, n) = (src.rows(), src.cols());
    with_scratch(Scratch::Rows, TOKEN_CHUNK.min(t.max(1)) * n, |buf| {
        let mut t0 = 0;
        while t0 < t {
            let t1 = (t0 + TOKEN_CHUNK).min(t);
            let chunk = &mut buf[..(t1 - t0) * n];
            src.fill(t0, t1, chunk);
            check_finite_rows(chunk, n, t0, what)?;
            t0 = t1;
        }
        Ok(())
    })
}

/// An error naming the first non-finite value of `chunk` (rows `t0…` of
/// `n` values), found after a vectorizable pass that accepts finite rows.
fn check_finite_rows(chunk: &[f64], n: usize, t0: usize, what: &str) -> Result<()> {
    // 0·v is 0 for every finite v and NaN for ±∞ and NaN.
    let mut poison = [0.0f64; 8];
    let mut it = chunk.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            poison[k] += c[k] * 0.0;
        }
    }
    let tail: f64 = it.remainder().iter().map(|v| v * 0.0).sum();
    if poison.iter().all(|p| *p == 0.0) && tail == 0.0 {
        return Ok(());
    }
    let k = chunk.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Err(Error::NonFinite(format!(
        "{what}: non-finite value {} at row {}, column {}",
        chunk[k],
        t0 + k / n,
        k % n
    )))
}

/// Streaming accumulator of `Σ_t x_t x_tᵀ` (SPEC §2, input factor `Z`).
#[derive(Clone, Debug, PartialEq)]
pub struct InputFactor {
    n: usize,
    tokens: u64,
    /// Packed lower triangle, column-major.
    gram: CompensatedSum,
}

impl InputFactor {
    pub fn new(n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::InvalidArgument("InputFactor: n must be at least 1, got 0".into()));
        }
        let len = checked_packed_len(n).filter(|l| l.checked_mul(16).is_some()).ok_or_else(|| {
            Error::OutOfMemory(format!(
                "InputFactor: n = {n} needs a packed triangle of n(n+1)/2 float64 sums and compensations, \
                 more than the address space"
            ))
        })?;
        Ok(Self { n, tokens: 0, gram: CompensatedSum::try_zeros(len, &format!("InputFactor(n = {n})"))? })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Add the token rows of `src` (`T × n`). Validates everything first.
    pub fn add_rows(&mut self, src: &dyn RowSource) -> Result<()> {
        if src.cols() != self.n {
            return Err(Error::Shape(format!(
                "InputFactor.add: rows have {} columns, the factor has n = {}",
                src.cols(),
                self.n
            )));
        }
        let (t, n) = (src.rows(), self.n);
        let tokens = add_count(self.tokens, t as u64, "InputFactor.add")?;
        // A bad batch must leave the factor as it was: several chunks are all
        // validated before the first is added; a single chunk is validated
        // once converted, so it is converted only once.
        let single = t <= TOKEN_CHUNK;
        if !single {
            validate_rows(src, "InputFactor.add")?;
        }
        with_scratch(Scratch::Rows, TOKEN_CHUNK.min(t.max(1)) * n, |buf| {
            let mut t0 = 0;
            while t0 < t {
                let t1 = (t0 + TOKEN_CHUNK).min(t);
                let chunk = &mut buf[..(t1 - t0) * n];
                src.fill(t0, t1, chunk);
                if single {
                    check_finite_rows(chunk, n, t0, "InputFactor.add")?;
                }
                self.add_chunk(chunk, t1 - t0);
                t0 = t1;
            }
            self.tokens = tokens;
            Ok(())
        })
    }

    /// Add one chunk of `tc` rows (row-major, `tc × n`): `Σ x xᵀ` panel by panel.
    fn add_chunk(&mut self, rows: &[f64], tc: usize) {
        let n = self.n;
        // Rows of X are the columns of the column-major n × tc matrix Xᵀ.
        let xt = MatRef::from_column_major_slice(rows, n, tc);
        let (sum, comp) = self.gram.parts_mut();
        // Split the packed triangle into the disjoint slices of each panel.
        let mut panels: Vec<(usize, &mut [f64], &mut [f64])> = Vec::new();
        let (mut rest_s, mut rest_c) = (sum, comp);
        let mut j0 = 0;
        while j0 < n {
            let j1 = (j0 + PANEL).min(n);
            let len = packed_col_start(n, j1) - packed_col_start(n, j0);
            let (s, rs) = std::mem::take(&mut rest_s).split_at_mut(len);
            let (c, rc) = std::mem::take(&mut rest_c).split_at_mut(len);
            panels.push((j0, s, c));
            rest_s = rs;
            rest_c = rc;
            j0 = j1;
        }
        let panel = |(j0, s, c): (usize, &mut [f64], &mut [f64])| add_panel(xt, j0, s, c);
        if crate::parallel::parallel_ok() {
            panels.into_par_iter().for_each(panel);
        } else {
            panels.into_iter().for_each(panel);
        }
    }

    /// Faults in the accumulator's pages ([`CompensatedSum::touch`]): what is
    /// summed does not change.
    pub fn touch(&mut self) {
        self.gram.touch();
    }

    /// Add a precomputed partial Gram matrix `Σ x xᵀ` over `tokens` rows (its
    /// lower triangle is read), e.g. one formed on a GPU.
    pub fn add_gram(&mut self, gram: MatRef<'_, f64>, tokens: u64) -> Result<()> {
        let n = self.n;
        if gram.nrows() != n || gram.ncols() != n {
            return Err(Error::Shape(format!(
                "InputFactor.add_gram: expected a ({n}, {n}) matrix, got ({}, {})",
                gram.nrows(),
                gram.ncols()
            )));
        }
        let total = add_count(self.tokens, tokens, "InputFactor.add_gram")?;
        for j in 0..n {
            for i in j..n {
                let v = gram[(i, j)];
                if !v.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "InputFactor.add_gram: non-finite value {v} at ({i}, {j})"
                    )));
                }
            }
        }
        let (s, c) = self.gram.parts_mut();
        for j in 0..n {
            let off = packed_col_start(n, j);
            for i in j..n {
                neumaier(&mut s[off + i - j], &mut c[off + i - j], gram[(i, j)]);
            }
        }
        self.tokens = total;
        Ok(())
    }

    /// Add rows `first_row .. first_row + k` of a symmetric `Σ x xᵀ` (row-major `k × width`,
    /// columns `0..width`): each entry on or below the diagonal into its packed place, the
    /// same compensated addition [`Self::add_gram`] makes for it, and `tokens` to the count.
    /// A flush hands a device's row blocks over this way, with no `n × n` host matrix.
    /// Nothing is added unless every entry it reads is finite and the block lies within `Z`.
    pub fn add_gram_rows(&mut self, first_row: usize, rows: &[f64], width: usize, tokens: u64) -> Result<()> {
        let n = self.n;
        let k = if width == 0 { 0 } else { rows.len() / width };
        if width == 0 || rows.len() != k * width || first_row + k > n || width > n || width < first_row + k {
            return Err(Error::Shape(format!(
                "InputFactor.add_gram_rows: rows {first_row}..{} of width {width} (len {}) do not lie within the \
                 ({n}, {n}) lower triangle",
                first_row + k,
                rows.len()
            )));
        }
        let total = add_count(self.tokens, tokens, "InputFactor.add_gram_rows")?;
        for r in 0..k {
            let i = first_row + r;
            for (j, v) in rows[r * width..r * width + i + 1].iter().enumerate() {
                if !v.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "InputFactor.add_gram_rows: non-finite value {v} at ({i}, {j})"
                    )));
                }
            }
        }
        let (s, c) = self.gram.parts_mut();
        for r in 0..k {
            let i = first_row + r;
            for (j, &v) in rows[r * width..r * width + i + 1].iter().enumerate() {
                let at = packed_col_start(n, j) + i - j;
                neumaier(&mut s[at], &mut c[at], v);
            }
        }
        self.tokens = total;
        Ok(())
    }

    pub fn merge(&mut self, other: &InputFactor) -> Result<()> {
        if other.n != self.n {
            return Err(Error::Shape(format!(
                "InputFactor.merge: n = {} cannot merge into n = {}",
                other.n, self.n
            )));
        }
        let tokens = add_count(self.tokens, other.tokens, "InputFactor.merge")?;
        self.gram.merge(&other.gram);
        self.tokens = tokens;
        Ok(())
    }

    /// The packed lower triangle of `Σ x xᵀ` (compensated values).
    pub fn packed_sum(&self) -> Vec<f64> {
        self.gram.values()
    }

    /// The raw packed sums and compensations: `from_packed` with both restores
    /// the accumulator bit for bit.
    pub fn packed_raw(&self) -> (Vec<f64>, Vec<f64>) {
        let (s, c) = self.gram.raw();
        (s.to_vec(), c.to_vec())
    }

    /// Rebuild from a packed triangle (as written by [`Self::packed_sum`], or
    /// the raw sums with their `compensation`).
    pub fn from_packed(n: usize, packed: &[f64], compensation: Option<&[f64]>, tokens: u64) -> Result<Self> {
        let mut f = Self::new(n)?;
        if packed.len() != packed_len(n) {
            return Err(Error::Shape(format!(
                "InputFactor: a packed triangle for n = {n} has {} entries, got {}",
                packed_len(n),
                packed.len()
            )));
        }
        crate::error::check_finite("InputFactor packed triangle", packed.iter().copied())?;
        f.gram.sum.copy_from_slice(packed);
        if let Some(c) = compensation {
            if c.len() != packed.len() {
                return Err(Error::Shape(format!(
                    "InputFactor: compensation has {} entries, the triangle {}",
                    c.len(),
                    packed.len()
                )));
            }
            crate::error::check_finite("InputFactor compensation", c.iter().copied())?;
            f.gram.comp.copy_from_slice(c);
        }
        f.tokens = tokens;
        Ok(f)
    }

    /// Write `(1/T) Σ x xᵀ` (or the plain sum when `mean` is false) into a
    /// dense symmetric `n × n` matrix.
    pub fn write_dense(&self, mut out: MatMut<'_, f64>, mean: bool) {
        let n = self.n;
        let scale = if mean && self.tokens > 0 { 1.0 / self.tokens as f64 } else { 1.0 };
        for j in 0..n {
            let off = packed_col_start(n, j);
            for i in j..n {
                let v = self.gram.value(off + i - j) * scale;
                out[(i, j)] = v;
                out[(j, i)] = v;
            }
        }
    }

    /// `Z = (1/T) Σ_t x_t x_tᵀ` (SPEC §2) as a row-major `n × n` vector: the same
    /// values as [`Self::mean`], laid out for a zero-copy hand-over to NumPy.
    ///
    /// Packed column `j` (rows `j..n`) is row `j` of the upper triangle, so the
    /// upper half is written contiguously; the lower half is its transpose, copied
    /// in square tiles so that neither side of the copy strides through memory.
    pub fn mean_row_major(&self) -> Result<Vec<f64>> {
        let mut z = vec![0.0; self.n * self.n];
        self.mean_row_major_into(&mut z)?;
        Ok(z)
    }

    /// [`Self::mean_row_major`] into a caller's buffer of `n²` entries (reused
    /// memory, e.g. page-locked for transfers to a GPU).
    pub fn mean_row_major_into(&self, z: &mut [f64]) -> Result<()> {
        packed_mean_row_major_into(self.n, &self.gram.sum, Some(&self.gram.comp), self.tokens, z)
    }

    /// `Z = (1/T) Σ_t x_t x_tᵀ` as a dense matrix (SPEC §2).
    pub fn mean(&self) -> Result<faer::Mat<f64>> {
        if self.tokens == 0 {
            return Err(Error::InvalidArgument("InputFactor.mean: no token has been added".into()));
        }
        let mut z = faer::Mat::zeros(self.n, self.n);
        self.write_dense(z.as_mut(), true);
        Ok(z)
    }
}

/// Streaming accumulator of `Σ_t g_t ⊙ g_t` (SPEC §2, output factor `y`) and,
/// optionally, of the per-sample sums `u_s = Σ_{t∈s} g_t`.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputFactor {
    m: usize,
    tokens: u64,
    samples: u64,
    sumsq: CompensatedSum,
    /// `u_s`, sample-major (`samples × m`), when per-sample sums are kept.
    sample_sums: Option<Vec<f64>>,
}

impl OutputFactor {
    pub fn new(m: usize, per_sample: bool) -> Result<Self> {
        if m == 0 {
            return Err(Error::InvalidArgument("OutputFactor: m must be at least 1, got 0".into()));
        }
        Ok(Self {
            m,
            tokens: 0,
            samples: 0,
            sumsq: CompensatedSum::try_zeros(m, &format!("OutputFactor(m = {m})"))?,
            sample_sums: per_sample.then(Vec::new),
        })
    }

    pub fn m(&self) -> usize {
        self.m
    }
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
    pub fn samples(&self) -> u64 {
        self.samples
    }
    pub fn keeps_sample_sums(&self) -> bool {
        self.sample_sums.is_some()
    }

    /// Add the rows of `src` (`T × m`). `sample_lengths`, when given, splits
    /// the rows into consecutive samples (it must sum to `T`); per-sample sums
    /// are recorded when this factor keeps them.
    pub fn add_rows(&mut self, src: &dyn RowSource, sample_lengths: Option<&[usize]>) -> Result<()> {
        let (t, m) = (src.rows(), self.m);
        if src.cols() != m {
            return Err(Error::Shape(format!(
                "OutputFactor.add: rows have {} columns, the factor has m = {m}",
                src.cols()
            )));
        }
        if let Some(lens) = sample_lengths {
            // Checked: a wrapped sum could match `t` and send the per-sample
            // loop below out of bounds after the sums were already updated.
            let total = lens.iter().try_fold(0usize, |a, &l| a.checked_add(l));
            if total != Some(t) {
                let shown = total.map_or_else(|| "more than 2^64".to_string(), |v| v.to_string());
                return Err(Error::Shape(format!(
                    "OutputFactor.add: sample_lengths sum to {shown}, but there are {t} rows"
                )));
            }
        } else if self.sample_sums.is_some() {
            return Err(Error::InvalidArgument(
                "OutputFactor.add: this factor keeps per-sample sums; pass sample_lengths".into(),
            ));
        }
        validate_rows(src, "OutputFactor.add")?;
        let tokens = add_count(self.tokens, t as u64, "OutputFactor.add")?;
        let samples = add_count(self.samples, sample_lengths.map_or(0, |l| l.len() as u64), "OutputFactor.add")?;
        // Everything that can fail (validation, counters, memory) comes before
        // the first update, so that a failed call leaves the factor unchanged.
        let mut rows = crate::error::try_zeros(t * m, "OutputFactor.add: row copy")?;
        if let (Some(lens), Some(sums)) = (sample_lengths, self.sample_sums.as_mut()) {
            sums.try_reserve(lens.len() * m).map_err(|_| {
                Error::OutOfMemory(format!("OutputFactor.add: cannot store {} more per-sample sums", lens.len()))
            })?;
        }
        src.fill(0, t, &mut rows);
        // Column blocks in parallel; each column summed sequentially over t.
        let (s, c) = self.sumsq.parts_mut();
        let block = |(b, (s, c)): (usize, (&mut [f64], &mut [f64]))| {
            let j0 = b * 256;
            for r in 0..t {
                let row = &rows[r * m + j0..r * m + j0 + s.len()];
                for (k, g) in row.iter().enumerate() {
                    neumaier(&mut s[k], &mut c[k], g * g);
                }
            }
        };
        if crate::parallel::parallel_ok() {
            s.par_chunks_mut(256).zip(c.par_chunks_mut(256)).enumerate().for_each(block);
        } else {
            s.chunks_mut(256).zip(c.chunks_mut(256)).enumerate().for_each(block);
        }
        if let (Some(lens), Some(sums)) = (sample_lengths, self.sample_sums.as_mut()) {
            let mut r = 0;
            for &len in lens {
                let mut u = vec![0.0; m];
                for row in rows[r * m..(r + len) * m].chunks_exact(m) {
                    u.iter_mut().zip(row).for_each(|(u, g)| *u += g);
                }
                sums.extend_from_slice(&u);
                r += len;
            }
        }
        self.tokens = tokens;
        self.samples = samples;
        Ok(())
    }

    /// Add precomputed partial sums: `sumsq = Σ g ⊙ g` over `tokens` rows and,
    /// when this factor keeps them, the per-sample sums (`k × m`, row-major).
    pub fn add_sums(&mut self, sumsq: &[f64], tokens: u64, sample_sums: Option<(&[f64], usize)>) -> Result<()> {
        let m = self.m;
        if sumsq.len() != m {
            return Err(Error::Shape(format!("OutputFactor.add_sums: expected {m} sums, got {}", sumsq.len())));
        }
        crate::error::check_finite("OutputFactor.add_sums", sumsq.iter().copied())?;
        if let Some(k) = sumsq.iter().position(|v| *v < 0.0) {
            return Err(Error::InvalidArgument(format!(
                "OutputFactor.add_sums: sums of squares must be ≥ 0, got {} at {k}",
                sumsq[k]
            )));
        }
        let tokens = add_count(self.tokens, tokens, "OutputFactor.add_sums")?;
        let mut samples = self.samples;
        match (sample_sums, self.sample_sums.as_mut()) {
            (Some((u, k)), Some(sums)) => {
                if k.checked_mul(m) != Some(u.len()) {
                    return Err(Error::Shape(format!(
                        "OutputFactor.add_sums: sample sums of {k} samples need {k} × {m} values, got {}",
                        u.len()
                    )));
                }
                crate::error::check_finite("OutputFactor.add_sums sample sums", u.iter().copied())?;
                samples = add_count(samples, k as u64, "OutputFactor.add_sums")?;
                sums.try_reserve(u.len()).map_err(|_| {
                    Error::OutOfMemory(format!("OutputFactor.add_sums: cannot store {k} more per-sample sums"))
                })?;
            }
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "OutputFactor.add_sums: this factor keeps per-sample sums; pass them".into(),
                ))
            }
            _ => {}
        }
        let (s, c) = self.sumsq.parts_mut();
        for j in 0..m {
            neumaier(&mut s[j], &mut c[j], sumsq[j]);
        }
        if let (Some((u, _)), Some(sums)) = (sample_sums, self.sample_sums.as_mut()) {
            sums.extend_from_slice(u);
        }
        self.samples = samples;
        self.tokens = tokens;
        Ok(())
    }

    pub fn count_samples(&mut self, k: u64) -> Result<()> {
        if self.sample_sums.is_none() {
            self.samples = add_count(self.samples, k, "OutputFactor.count_samples")?;
        }
        Ok(())
    }

    pub fn merge(&mut self, other: &OutputFactor) -> Result<()> {
        if other.m != self.m || other.sample_sums.is_some() != self.sample_sums.is_some() {
            return Err(Error::Shape(format!(
                "OutputFactor.merge: (m = {}, per_sample = {}) cannot merge into (m = {}, per_sample = {})",
                other.m,
                other.sample_sums.is_some(),
                self.m,
                self.sample_sums.is_some()
            )));
        }
        let tokens = add_count(self.tokens, other.tokens, "OutputFactor.merge")?;
        let samples = add_count(self.samples, other.samples, "OutputFactor.merge")?;
        if let (Some(a), Some(b)) = (self.sample_sums.as_mut(), other.sample_sums.as_ref()) {
            a.try_reserve(b.len()).map_err(|_| {
                Error::OutOfMemory(format!("OutputFactor.merge: cannot store {} more per-sample sums", b.len() / self.m))
            })?;
        }
        self.sumsq.merge(&other.sumsq);
        if let (Some(a), Some(b)) = (self.sample_sums.as_mut(), other.sample_sums.as_ref()) {
            a.extend_from_slice(b);
        }
        self.tokens = tokens;
        self.samples = samples;
        Ok(())
    }

    /// `Σ_t g_t ⊙ g_t` (compensated values).
    pub fn sum(&self) -> Vec<f64> {
        self.sumsq.values()
    }

    /// `y = (1/T) Σ_t g_t ⊙ g_t` (SPEC §2).
    pub fn mean(&self) -> Result<Vec<f64>> {
        if self.tokens == 0 {
            return Err(Error::InvalidArgument("OutputFactor.mean: no token has been added".into()));
        }
        let t = self.tokens as f64;
        Ok(self.sumsq.values().into_iter().map(|v| v / t).collect())
    }

    /// The per-sample sums `u_s` (`samples × m`, row-major), if kept.
    pub fn sample_sums(&self) -> Option<&[f64]> {
        self.sample_sums.as_deref()
    }

    /// The raw sums of squares and their compensations.
    pub fn sum_raw(&self) -> (Vec<f64>, Vec<f64>) {
        let (s, c) = self.sumsq.raw();
        (s.to_vec(), c.to_vec())
    }

    pub fn from_parts(
        m: usize,
        sumsq: &[f64],
        compensation: Option<&[f64]>,
        tokens: u64,
        samples: u64,
        sample_sums: Option<Vec<f64>>,
    ) -> Result<Self> {
        let mut f = Self::new(m, sample_sums.is_some())?;
        if sumsq.len() != m {
            return Err(Error::Shape(format!("OutputFactor: expected {m} sums, got {}", sumsq.len())));
        }
        crate::error::check_finite("OutputFactor sums", sumsq.iter().copied())?;
        if let Some(u) = &sample_sums {
            let need = usize::try_from(samples).ok().and_then(|k| k.checked_mul(m));
            if need != Some(u.len()) {
                return Err(Error::Shape(format!(
                    "OutputFactor: {samples} samples need {samples} × {m} sample-sum values, got {}",
                    u.len()
                )));
            }
        }
        f.sumsq.sum.copy_from_slice(sumsq);
        if let Some(c) = compensation {
            if c.len() != m {
                return Err(Error::Shape(format!("OutputFactor: compensation has {} entries, m = {m}", c.len())));
            }
            crate::error::check_finite("OutputFactor compensation", c.iter().copied())?;
            f.sumsq.comp.copy_from_slice(c);
        }
        f.tokens = tokens;
        f.samples = samples;
        f.sample_sums = sample_sums;
        Ok(f)
    }
}

/// Diagonal of `(λ I + U Uᵀ / N)⁻¹` by Woodbury (SPEC §2, `sequence_lowrank`):
/// `(1/λ) (1 − diag(U (λ N I + Uᵀ U)⁻¹ Uᵀ))`, with `U = [u_1 … u_N]` (`m × N`,
/// given sample-major as `N × m`). Costs `O(m N²)` rather than `O(m³)`.
pub fn lowrank_output_precision(sample_sums: &[f64], m: usize, damping: f64) -> Result<Vec<f64>> {
    if !(damping > 0.0) || !damping.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "sequence_lowrank needs output damping > 0, got {damping}"
        )));
    }
    if m == 0 || sample_sums.len() % m != 0 || sample_sums.is_empty() {
        return Err(Error::Shape(format!(
            "sequence_lowrank: {} sample-sum values do not form rows of length m = {m}",
            sample_sums.len()
        )));
    }
    crate::error::check_finite("sequence_lowrank sample sums", sample_sums.iter().copied())?;
    crate::parallel::init_parallelism();
    let ns = sample_sums.len() / m;
    // Uᵀ is N × m row-major, i.e. U is m × N column-major.
    let u = MatRef::from_column_major_slice(sample_sums, m, ns);
    let mut inner = faer::Mat::<f64>::zeros(ns, ns);
    faer::linalg::matmul::matmul(inner.as_mut(), Accum::Replace, u.transpose(), u, 1.0, Par::Seq);
    for i in 0..ns {
        inner[(i, i)] += damping * ns as f64;
    }
    let llt = inner
        .llt(faer::Side::Lower)
        .map_err(|e| Error::NotPositiveDefinite {
            message: "sequence_lowrank: λ N I + UᵀU is not positive definite".into(),
            pivot: match e {
                faer::linalg::cholesky::llt::factor::LltError::NonPositivePivot { index } => Some(index),
            },
        })?;
    // diag(U M⁻¹ Uᵀ)_j = ‖L⁻¹ U_jᵀ‖² with M = L Lᵀ.
    let mut w = u.transpose().to_owned();
    faer::linalg::triangular_solve::solve_lower_triangular_in_place(llt.L(), w.as_mut(), Par::Seq);
    Ok((0..m)
        .map(|j| {
            let q: f64 = w.col(j).iter().map(|v| v * v).sum();
            (1.0 - q) / damping
        })
        .collect())
}
