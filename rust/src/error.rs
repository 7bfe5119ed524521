//! One error type for the whole core. Each variant maps to one Python exception
//! class (defined in `python/errors.rs`, re-exported by `python/lora_da/errors.py`); messages name the offending value and,
//! where the caller gave one, the module (`Error::context`).

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An array has the wrong shape or length.
    Shape(String),
    /// NaN or ±inf where a finite number is required.
    NonFinite(String),
    /// A scalar argument is out of its domain (rank, n_pop, damping, ...).
    InvalidArgument(String),
    /// `Z + λI` is not numerically positive definite (SPEC §3 step 1);
    /// `pivot` is the column where its (last) Cholesky factorization stopped,
    /// when one did.
    NotPositiveDefinite { message: String, pivot: Option<usize> },
    /// A buffer is larger than the address space or than what the allocator
    /// can give: Python's `MemoryError`, instead of an abort of the process.
    OutOfMemory(String),
    /// A panic caught at the binding boundary: a bug, reported as an error
    /// rather than unwinding into Python as `PanicException`.
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn message(&self) -> &str {
        match self {
            Error::Shape(m)
            | Error::NonFinite(m)
            | Error::InvalidArgument(m)
            | Error::NotPositiveDefinite { message: m, .. }
            | Error::OutOfMemory(m)
            | Error::Internal(m) => m,
        }
    }

    /// Prefix the message with the module (or other object) it concerns.
    pub fn context(self, name: &str) -> Error {
        if name.is_empty() {
            return self;
        }
        let wrap = |m: String| format!("{name}: {m}");
        match self {
            Error::Shape(m) => Error::Shape(wrap(m)),
            Error::NonFinite(m) => Error::NonFinite(wrap(m)),
            Error::InvalidArgument(m) => Error::InvalidArgument(wrap(m)),
            Error::NotPositiveDefinite { message, pivot } => Error::NotPositiveDefinite { message: wrap(message), pivot },
            Error::OutOfMemory(m) => Error::OutOfMemory(wrap(m)),
            Error::Internal(m) => Error::Internal(wrap(m)),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}

/// The first non-finite entry of `values`, as an error naming `what` and the index.
pub fn check_finite(what: &str, values: impl IntoIterator<Item = f64>) -> Result<()> {
    for (i, v) in values.into_iter().enumerate() {
        if !v.is_finite() {
            return Err(Error::NonFinite(format!("{what} has a non-finite value {v} at flat index {i}")));
        }
    }
    Ok(())
}

/// `len` float64 values, zeroed, or `OutOfMemory` naming `what` when the
/// allocator refuses (a plain `vec!` would abort the whole interpreter).
pub fn try_zeros(len: usize, what: &str) -> Result<Vec<f64>> {
    use std::alloc::{alloc_zeroed, Layout};
    let oom = || {
        Error::OutOfMemory(format!(
            "{what}: cannot allocate {len} float64 values ({:.3e} bytes)",
            len as f64 * 8.0
        ))
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    // Zeroed by the allocator (calloc: fresh pages are zero and untouched, as
    // with `vec![0.0; len]`), not by writing: reserving and then filling wrote
    // every page, which put a 7B model's 44 GB of host factors in resident
    // memory and cost 30 s before the first batch.
    let layout = Layout::array::<f64>(len).map_err(|_| oom())?;
    // SAFETY: the layout has a non-zero size; a null pointer is the allocator's refusal.
    let ptr = unsafe { alloc_zeroed(layout) } as *mut f64;
    if ptr.is_null() {
        return Err(oom());
    }
    // SAFETY: `ptr` comes from the global allocator with `Layout::array::<f64>(len)`,
    // which is what a Vec<f64> of capacity `len` frees with; all-zero bytes are 0.0.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}
