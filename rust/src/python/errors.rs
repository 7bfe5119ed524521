//! The exception classes of lora-da and the mapping of the core's errors to
//! them. A leaf of the binding: the other files raise through it.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyMemoryError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::type_object::PyTypeInfo;
use pyo3::types::{PyTuple, PyType};

use crate::error::{Error, Result as CoreResult};

// The exception classes of lora-da, defined here where the core raises them
// and re-exported by `python/lora_da/errors.py`. They report the module
// `lora_da.errors`, so that their repr and pickling name the public path.
create_exception!(lora_da.errors, LoraDAError, PyException, "Base class of every lora-da error.");

/// A `LoraDAError` that is also a `ValueError`, so that generic handlers of bad
/// input still catch it. `create_exception!` takes one base only; this is the
/// same lazily created type object with the two bases of `errors.py`.
macro_rules! value_error {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        pub(super) struct $name;

        // SAFETY: the pointer is that of a type object created once and kept
        // alive by the static for the life of the interpreter.
        unsafe impl PyTypeInfo for $name {
            fn type_object_raw(py: Python<'_>) -> *mut ffi::PyTypeObject {
                static TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
                TYPE.get_or_init(py, || value_error_type(py, concat!("lora_da.errors.", stringify!($name), "\0"), concat!($doc, "\0")))
                    .as_ptr()
                    .cast()
            }
        }
    };
}

value_error!(ShapeError, "An array has the wrong shape, length or dtype.");
value_error!(NonFiniteError, "A NaN or infinity where a finite number is required.");
value_error!(InvalidArgumentError, "A scalar argument is outside its domain (rank, n_pop, damping, ...).");
value_error!(NotPositiveDefiniteError, "``Z + λI`` could not be factored (SPEC §3 step 1); raise the damping.");
value_error!(StatisticsFileError, "A statistics file is truncated, corrupted, or from another model/version.");

/// The class `name(LoraDAError, ValueError)`; `name` and `doc` end in NUL.
fn value_error_type(py: Python<'_>, name: &str, doc: &str) -> Py<PyType> {
    let bases = PyTuple::new(py, [py.get_type::<LoraDAError>(), py.get_type::<PyValueError>()])
        .expect("a tuple of two types");
    // SAFETY: both strings are NUL-terminated (see the macro); `bases` is a
    // tuple of exception classes, as `PyErr_NewExceptionWithDoc` requires.
    let ty = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyErr_NewExceptionWithDoc(name.as_ptr().cast(), doc.as_ptr().cast(), bases.as_ptr(), std::ptr::null_mut()),
        )
    };
    ty.and_then(|t| t.cast_into::<PyType>().map_err(PyErr::from))
        .expect("failed to create a lora_da exception class")
        .unbind()
}

/// Each core error as its exception class. The error is built lazily (no
/// GIL, no import), so it is safe to convert inside a GIL-free section too.
impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Shape(m) => PyErr::new::<ShapeError, _>(m),
            Error::NonFinite(m) => PyErr::new::<NonFiniteError, _>(m),
            Error::InvalidArgument(m) => PyErr::new::<InvalidArgumentError, _>(m),
            Error::NotPositiveDefinite { message, .. } => PyErr::new::<NotPositiveDefiniteError, _>(message),
            Error::OutOfMemory(m) => PyMemoryError::new_err(m),
            Error::Internal(m) => LoraDAError::new_err(m),
        }
    }
}

/// Run `f`, turning a panic into [`Error::Internal`] with its message: the
/// last line of defence, so that no panic reaches Python as
/// `pyo3_runtime.PanicException` (a `BaseException`, not a `LoraDAError`).
/// Plain Rust in, plain Rust out: safe inside a GIL-free section.
pub(super) fn guarded<T>(what: &str, f: impl FnOnce() -> CoreResult<T>) -> CoreResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Internal(format!("{what}: internal error (a bug in lora_da, please report it): {msg}")))
        }
    }
}
