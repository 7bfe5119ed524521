//! The PyO3 binding: converts arrays, releases the GIL, defines the exception
//! classes and maps the core's errors to them. No math.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};

use faer::{Mat, MatRef};
use numpy::ndarray::{Array1, Array2, ArrayView2};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyMemoryError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::type_object::PyTypeInfo;
use pyo3::types::{PyDict, PyList, PyTuple, PyType};

use crate::error::{Error, Result as CoreResult};
use crate::factors::{self, RowSource};
use crate::options::{solve_defaults, Method, SolveOptions};
use crate::solve as core_solve;

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
        pub struct $name;

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
fn guarded<T>(what: &str, f: impl FnOnce() -> CoreResult<T>) -> CoreResult<T> {
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

/// The accumulator behind `m`, also after a panic in another call poisoned
/// the lock. That is sound because every update validates (and allocates)
/// before it mutates, so a failed call leaves the accumulator as it was; a
/// poisoned lock would otherwise make the statistics gathered so far
/// unreadable and unsaveable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| {
        m.clear_poison();
        e.into_inner()
    })
}

/// A `(T, n)` array of float32, float64 or bfloat16 bits (uint16), any strides.
enum Rows<'a> {
    F32(ArrayView2<'a, f32>),
    F64(ArrayView2<'a, f64>),
    Bf16(ArrayView2<'a, u16>),
}

impl RowSource for Rows<'_> {
    fn rows(&self) -> usize {
        match self {
            Rows::F32(a) => a.nrows(),
            Rows::F64(a) => a.nrows(),
            Rows::Bf16(a) => a.nrows(),
        }
    }
    fn cols(&self) -> usize {
        match self {
            Rows::F32(a) => a.ncols(),
            Rows::F64(a) => a.ncols(),
            Rows::Bf16(a) => a.ncols(),
        }
    }
    fn fill(&self, t0: usize, t1: usize, out: &mut [f64]) {
        let n = self.cols();
        for (k, t) in (t0..t1).enumerate() {
            let dst = &mut out[k * n..(k + 1) * n];
            match self {
                Rows::F32(a) => dst.iter_mut().zip(a.row(t)).for_each(|(d, s)| *d = *s as f64),
                Rows::F64(a) => dst.iter_mut().zip(a.row(t)).for_each(|(d, s)| *d = *s),
                // A bfloat16 is the upper half of a float32: decoding is exact.
                Rows::Bf16(a) => dst
                    .iter_mut()
                    .zip(a.row(t))
                    .for_each(|(d, s)| *d = f32::from_bits((*s as u32) << 16) as f64),
            }
        }
    }

}

/// `obj` itself, or an aligned copy when it is a misaligned numpy array
/// (a view at an odd byte offset of a buffer, say): reading one in place
/// would be undefined behaviour for the Rust views.
fn aligned<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let is_aligned = obj
        .getattr("flags")
        .and_then(|f| f.getattr("aligned"))
        .and_then(|a| a.extract::<bool>())
        .unwrap_or(true);
    if is_aligned {
        return Ok(obj.clone());
    }
    let np = obj.py().import("numpy")?;
    np.call_method1("require", (obj, obj.py().None(), "A"))
}

/// Read-only views kept alive for the duration of a call.
enum RowsHolder<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
    Bf16(PyReadonlyArray2<'py, u16>),
}

impl<'py> RowsHolder<'py> {
    fn extract(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        let obj = &aligned(obj)?;
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f32>>() {
            return Ok(RowsHolder::F32(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f64>>() {
            return Ok(RowsHolder::F64(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, u16>>() {
            return Ok(RowsHolder::Bf16(a));
        }
        let desc = match obj.getattr("dtype").and_then(|d| d.str()) {
            Ok(d) => format!("dtype {d}, shape {}", obj.getattr("shape").map(|s| s.to_string()).unwrap_or_default()),
            Err(_) => format!("a {}", obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()),
        };
        Err(PyErr::from(Error::Shape(format!(
            "{what} takes a 2-D numpy array of float32, float64 or bfloat16 bits (uint16), got {desc}"
        ))))
    }
    fn view(&self) -> Rows<'_> {
        match self {
            RowsHolder::F32(a) => Rows::F32(a.as_array()),
            RowsHolder::F64(a) => Rows::F64(a.as_array()),
            RowsHolder::Bf16(a) => Rows::Bf16(a.as_array()),
        }
    }
}

/// Copy a 2-D array view into a column-major faer matrix, converting each
/// entry with `f` (float32 → float64 is exact). numpy arrays are usually
/// row-major: the copy walks 64 × 64 tiles so that both sides stay in cache
/// (a plain column-by-column walk over a row-major array misses on every read).
fn tiled_copy<T: Copy>(v: numpy::ndarray::ArrayView2<'_, T>, f: impl Fn(T) -> f64) -> Mat<f64> {
    const TILE: usize = 64;
    let (r, c) = (v.nrows(), v.ncols());
    let mut out = Mat::<f64>::zeros(r, c);
    for i0 in (0..r).step_by(TILE) {
        for j0 in (0..c).step_by(TILE) {
            for j in j0..(j0 + TILE).min(c) {
                let col = out.col_mut(j).try_as_col_major_mut().expect("contiguous column").as_slice_mut();
                for i in i0..(i0 + TILE).min(r) {
                    col[i] = f(v[(i, j)]);
                }
            }
        }
    }
    out
}

/// A 2-D float64 numpy array of any float dtype, converted (float32 → float64 is exact).
fn matrix_arg<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Mat<f64>> {
    let obj = &aligned(obj)?;
    if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f64>>() {
        return Ok(tiled_copy(a.as_array(), |x| x));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f32>>() {
        return Ok(tiled_copy(a.as_array(), |x| x as f64));
    }
    Err(PyErr::from(Error::Shape(format!("{what} must be a 2-D float32 or float64 numpy array"))))
}

/// A float64 matrix argument read in place (no copy) when numpy's strides
/// allow it, else converted: the solve reads `Z` and `Ḡ` once each, and a copy
/// of a 2048-wide matrix costs more than that read.
enum MatrixArg<'py> {
    View(PyReadonlyArray2<'py, f64>),
    Owned(Mat<f64>),
}

impl<'py> MatrixArg<'py> {
    fn extract(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        let obj = &aligned(obj)?;
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f64>>() {
            let v = a.as_array();
            let positive = v.strides().iter().all(|&s| s > 0) || v.is_empty();
            if positive {
                return Ok(MatrixArg::View(a));
            }
        }
        Ok(MatrixArg::Owned(matrix_arg(obj, what)?))
    }

    fn as_ref(&self) -> MatRef<'_, f64> {
        match self {
            MatrixArg::View(a) => {
                let v = a.as_array();
                let (r, c) = v.dim();
                let st = v.strides();
                // SAFETY: the array is aligned (see `aligned`), its strides are
                // positive element strides, and the borrow lives as long as `self`.
                unsafe { MatRef::from_raw_parts(v.as_ptr(), r, c, st[0], st[1]) }
            }
            MatrixArg::Owned(m) => m.as_ref(),
        }
    }
}

fn vector_arg<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Vec<f64>> {
    let obj = &aligned(obj)?;
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, f64>>() {
        return Ok(a.as_array().to_vec());
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, f32>>() {
        return Ok(a.as_array().iter().map(|v| *v as f64).collect());
    }
    Err(PyErr::from(Error::Shape(format!("{what} must be a 1-D float32 or float64 numpy array"))))
}

/// The entries of `m` in row-major order.
fn row_major(m: &Mat<f64>) -> Vec<f64> {
    (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)])).collect()
}

fn mat_to_py<'py>(py: Python<'py>, m: MatRef<'_, f64>) -> Bound<'py, PyArray2<f64>> {
    Array2::from_shape_fn((m.nrows(), m.ncols()), |(i, j)| m[(i, j)]).into_pyarray(py)
}

fn vec_to_py<'py>(py: Python<'py>, v: Vec<f64>) -> Bound<'py, PyArray1<f64>> {
    Array1::from_vec(v).into_pyarray(py)
}

/// Run `f` on the accumulator behind `m` without the GIL, then raise its
/// error, if any, once the lock is released and the GIL is held again.
///
/// Locking without the GIL also means that a thread waiting for a long `add`
/// of another thread does not hold every other Python thread up meanwhile.
fn locked<A: Send, T: Send>(
    py: Python<'_>,
    m: &Mutex<A>,
    what: &str,
    f: impl FnOnce(&mut A) -> CoreResult<T> + Send,
) -> PyResult<T> {
    py.detach(|| guarded(what, || f(&mut lock(m)))).map_err(PyErr::from)
}

/// Both locks in one fixed (address) order, so that `a == b` and `b == a`
/// in two threads cannot each hold one lock and wait for the other.
fn lock_pair<'a, A>(a: &'a Mutex<A>, b: &'a Mutex<A>) -> (MutexGuard<'a, A>, MutexGuard<'a, A>) {
    if (a as *const Mutex<A>) < (b as *const Mutex<A>) {
        let ga = lock(a);
        (ga, lock(b))
    } else {
        let gb = lock(b);
        (lock(a), gb)
    }
}

/// Streaming float64 accumulator of `Σ_t x_t x_tᵀ` (SPEC §2). Thread-safe:
/// calls from several threads are serialized by a lock, and a call that
/// fails leaves the accumulator unchanged.
#[pyclass(name = "InputFactor", module = "lora_da._core", frozen)]
struct PyInputFactor {
    inner: Mutex<factors::InputFactor>,
}

#[pymethods]
impl PyInputFactor {
    #[new]
    fn new(py: Python<'_>, n: i128) -> PyResult<Self> {
        let n = count::<usize>(n, "InputFactor: n")?;
        let f = py.detach(|| guarded("InputFactor", || factors::InputFactor::new(n)))?;
        Ok(Self { inner: Mutex::new(f) })
    }

    #[getter]
    fn n(&self, py: Python<'_>) -> PyResult<usize> {
        locked(py, &self.inner, "InputFactor.n", |f| Ok(f.n()))
    }

    #[getter]
    fn tokens(&self, py: Python<'_>) -> PyResult<u64> {
        locked(py, &self.inner, "InputFactor.tokens", |f| Ok(f.tokens()))
    }

    /// Add token rows `x` of shape `(T, n)`.
    fn add(&self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<()> {
        let holder = RowsHolder::extract(x, "InputFactor.add")?;
        let rows = holder.view();
        locked(py, &self.inner, "InputFactor.add", |f| f.add_rows(&rows))
    }

    /// Add a partial Gram matrix `Σ x xᵀ` (float64, `(n, n)`) over `tokens` rows.
    fn add_gram(&self, py: Python<'_>, gram: &Bound<'_, PyAny>, tokens: i128) -> PyResult<()> {
        let tokens = count::<u64>(tokens, "InputFactor.add_gram: tokens")?;
        let mat = matrix_arg(gram, "InputFactor.add_gram: gram")?;
        locked(py, &self.inner, "InputFactor.add_gram", |f| f.add_gram(mat.as_ref(), tokens))
    }

    fn merge(&self, py: Python<'_>, other: &Bound<'_, PyInputFactor>) -> PyResult<()> {
        let other: &PyInputFactor = other.get();
        // The other accumulator is copied under its own lock, released before
        // this one is taken: no two locks are held at once.
        let o = locked(py, &other.inner, "InputFactor.merge", |f| Ok(f.clone()))?;
        locked(py, &self.inner, "InputFactor.merge", |f| f.merge(&o))
    }

    /// `Z = (1/T) Σ x xᵀ`, dense `(n, n)` float64.
    fn mean<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        // Formed without the GIL and handed to NumPy without a copy: for a wide
        // layer this is hundreds of MB that other threads' solves wait behind otherwise.
        let (n, z) = locked(py, &self.inner, "InputFactor.mean", |f| Ok((f.n(), f.mean_row_major()?)))?;
        let z = Array2::from_shape_vec((n, n), z)
            .map_err(|e| PyErr::from(Error::Shape(format!("InputFactor.mean: {e}"))))?;
        Ok(z.into_pyarray(py))
    }

    /// `Z` written into ``out``, a contiguous float64 `(n, n)` NumPy array (C or
    /// Fortran order alike: Z is symmetric) with the
    /// same values as `mean()`, without the GIL: a reused, page-locked buffer
    /// costs no fresh host pages per group on the way to a GPU.
    fn mean_into(&self, py: Python<'_>, out: &Bound<'_, PyAny>) -> PyResult<()> {
        let bad = |what: &str| PyErr::from(Error::Shape(format!("InputFactor.mean_into: out {what}")));
        let arr = out.cast::<PyArray2<f64>>().map_err(|_| bad("must be a float64 NumPy array of 2 dimensions"))?;
        let mut rw = arr.try_readwrite().map_err(|_| bad("is not writeable (read-only or borrowed)"))?;
        let z = rw.as_slice_mut().map_err(|_| bad("must be contiguous"))?;
        locked(py, &self.inner, "InputFactor.mean_into", |f| {
            if z.len() != f.n() * f.n() {
                return Err(Error::Shape(format!(
                    "InputFactor.mean_into: out has {} entries, Z is {} × {}",
                    z.len(),
                    f.n(),
                    f.n()
                )));
            }
            f.mean_row_major_into(z)
        })
    }

    /// `Σ x xᵀ` as its packed lower triangle (column-major), float64.
    fn packed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let v = locked(py, &self.inner, "InputFactor.packed", |f| Ok(f.packed_sum()))?;
        Ok(vec_to_py(py, v))
    }

    /// The raw packed sums and their Neumaier compensations: `from_packed(n,
    /// sums, tokens, compensation)` restores the accumulator bit for bit.
    fn packed_raw<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>)> {
        let (s, c) = locked(py, &self.inner, "InputFactor.packed_raw", |f| Ok(f.packed_raw()))?;
        Ok((vec_to_py(py, s), vec_to_py(py, c)))
    }

    #[staticmethod]
    #[pyo3(signature = (n, packed, tokens, compensation=None))]
    fn from_packed(py: Python<'_>, n: i128, packed: &Bound<'_, PyAny>, tokens: i128, compensation: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let n = count::<usize>(n, "InputFactor.from_packed: n")?;
        let tokens = count::<u64>(tokens, "InputFactor.from_packed: tokens")?;
        let v = vector_arg(packed, "InputFactor.from_packed: packed")?;
        let c = compensation.map(|c| vector_arg(c, "InputFactor.from_packed: compensation")).transpose()?;
        let f = py
            .detach(|| guarded("InputFactor.from_packed", || factors::InputFactor::from_packed(n, &v, c.as_deref(), tokens)))
            ?;
        Ok(Self { inner: Mutex::new(f) })
    }

    fn copy(&self, py: Python<'_>) -> PyResult<Self> {
        let f = locked(py, &self.inner, "InputFactor.copy", |f| Ok(f.clone()))?;
        Ok(Self { inner: Mutex::new(f) })
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        match other.cast::<PyInputFactor>() {
            Ok(o) => {
                let o: &PyInputFactor = o.get();
                if std::ptr::eq(self, o) {
                    return Ok(true);
                }
                py.detach(|| {
                    guarded("InputFactor.__eq__", || {
                        let (a, b) = lock_pair(&self.inner, &o.inner);
                        Ok(*a == *b)
                    })
                })
                .map_err(PyErr::from)
            }
            Err(_) => Ok(false),
        }
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        locked(py, &self.inner, "InputFactor.__repr__", |f| {
            Ok(format!("InputFactor(n={}, tokens={})", f.n(), f.tokens()))
        })
    }
}

/// Streaming float64 accumulator of `Σ_t g_t ⊙ g_t` and, optionally, per-sample
/// sums `u_s` (SPEC §2). Thread-safe, like [`PyInputFactor`].
#[pyclass(name = "OutputFactor", module = "lora_da._core", frozen)]
struct PyOutputFactor {
    inner: Mutex<factors::OutputFactor>,
}

#[pymethods]
impl PyOutputFactor {
    #[new]
    #[pyo3(signature = (m, per_sample=false))]
    fn new(py: Python<'_>, m: i128, per_sample: bool) -> PyResult<Self> {
        let m = count::<usize>(m, "OutputFactor: m")?;
        let f = py.detach(|| guarded("OutputFactor", || factors::OutputFactor::new(m, per_sample)))?;
        Ok(Self { inner: Mutex::new(f) })
    }

    #[getter]
    fn m(&self, py: Python<'_>) -> PyResult<usize> {
        locked(py, &self.inner, "OutputFactor.m", |f| Ok(f.m()))
    }
    #[getter]
    fn tokens(&self, py: Python<'_>) -> PyResult<u64> {
        locked(py, &self.inner, "OutputFactor.tokens", |f| Ok(f.tokens()))
    }
    #[getter]
    fn samples(&self, py: Python<'_>) -> PyResult<u64> {
        locked(py, &self.inner, "OutputFactor.samples", |f| Ok(f.samples()))
    }
    #[getter]
    fn per_sample(&self, py: Python<'_>) -> PyResult<bool> {
        locked(py, &self.inner, "OutputFactor.per_sample", |f| Ok(f.keeps_sample_sums()))
    }

    /// Add output-gradient rows `g` of shape `(T, m)`; `sample_lengths` splits
    /// them into consecutive samples (required when per-sample sums are kept).
    #[pyo3(signature = (g, sample_lengths=None))]
    fn add(&self, py: Python<'_>, g: &Bound<'_, PyAny>, sample_lengths: Option<Vec<i128>>) -> PyResult<()> {
        let sample_lengths = sample_lengths
            .map(|v| v.into_iter().map(|l| count::<usize>(l, "OutputFactor.add: sample_lengths")).collect::<PyResult<Vec<_>>>())
            .transpose()?;
        let holder = RowsHolder::extract(g, "OutputFactor.add")?;
        let rows = holder.view();
        locked(py, &self.inner, "OutputFactor.add", |f| f.add_rows(&rows, sample_lengths.as_deref()))
    }

    /// Add precomputed `Σ g ⊙ g` over `tokens` rows and, for a per-sample
    /// factor, the per-sample sums `(k, m)`.
    #[pyo3(signature = (sumsq, tokens, sample_sums=None))]
    fn add_sums(&self, py: Python<'_>, sumsq: &Bound<'_, PyAny>, tokens: i128, sample_sums: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let tokens = count::<u64>(tokens, "OutputFactor.add_sums: tokens")?;
        let s = vector_arg(sumsq, "OutputFactor.add_sums: sumsq")?;
        let u = sample_sums
            .map(|a| matrix_arg(a, "OutputFactor.add_sums: sample_sums"))
            .transpose()?
            .map(|v| (row_major(&v), v.nrows(), v.ncols()));
        locked(py, &self.inner, "OutputFactor.add_sums", |f| {
            if let Some((_, _, cols)) = &u {
                if *cols != f.m() {
                    return Err(Error::Shape(format!(
                        "OutputFactor.add_sums: sample_sums must have m = {} columns, got {cols}",
                        f.m()
                    )));
                }
            }
            f.add_sums(&s, tokens, u.as_ref().map(|(v, k, _)| (v.as_slice(), *k)))
        })
    }

    /// Count `k` samples (for factors without per-sample sums).
    fn count_samples(&self, py: Python<'_>, k: i128) -> PyResult<()> {
        let k = count::<u64>(k, "OutputFactor.count_samples: k")?;
        locked(py, &self.inner, "OutputFactor.count_samples", |f| f.count_samples(k))
    }

    fn merge(&self, py: Python<'_>, other: &Bound<'_, PyOutputFactor>) -> PyResult<()> {
        let other: &PyOutputFactor = other.get();
        let o = locked(py, &other.inner, "OutputFactor.merge", |f| Ok(f.clone()))?;
        locked(py, &self.inner, "OutputFactor.merge", |f| f.merge(&o))
    }

    /// `y = (1/T) Σ g ⊙ g`, float64.
    fn mean<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let y = locked(py, &self.inner, "OutputFactor.mean", |f| f.mean())?;
        Ok(vec_to_py(py, y))
    }

    /// `Σ g ⊙ g`, float64.
    fn sum<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let s = locked(py, &self.inner, "OutputFactor.sum", |f| Ok(f.sum()))?;
        Ok(vec_to_py(py, s))
    }

    /// Per-sample sums `(samples, m)`, or None.
    fn sample_sums<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArray2<f64>>>> {
        let u = locked(py, &self.inner, "OutputFactor.sample_sums", |f| {
            Ok(f.sample_sums().map(|u| (u.to_vec(), f.m())))
        })?;
        u.map(|(u, m)| {
            Array2::from_shape_vec((u.len() / m, m), u)
                .map(|a| a.into_pyarray(py))
                .map_err(|e| PyErr::from(Error::Internal(format!("OutputFactor.sample_sums: {e}"))))
        })
        .transpose()
    }

    /// The raw sums of squares and their compensations.
    fn sum_raw<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>)> {
        let (s, c) = locked(py, &self.inner, "OutputFactor.sum_raw", |f| Ok(f.sum_raw()))?;
        Ok((vec_to_py(py, s), vec_to_py(py, c)))
    }

    #[staticmethod]
    #[pyo3(signature = (sumsq, tokens, samples, sample_sums=None, compensation=None))]
    fn from_parts(
        py: Python<'_>,
        sumsq: &Bound<'_, PyAny>,
        tokens: i128,
        samples: i128,
        sample_sums: Option<&Bound<'_, PyAny>>,
        compensation: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let tokens = count::<u64>(tokens, "OutputFactor.from_parts: tokens")?;
        let samples = count::<u64>(samples, "OutputFactor.from_parts: samples")?;
        let s = vector_arg(sumsq, "OutputFactor.from_parts: sumsq")?;
        let comp = compensation.map(|c| vector_arg(c, "OutputFactor.from_parts: compensation")).transpose()?;
        let u = sample_sums
            .map(|a| matrix_arg(a, "OutputFactor.from_parts: sample_sums"))
            .transpose()?
            .map(|v| row_major(&v));
        let f = py
            .detach(|| {
                guarded("OutputFactor.from_parts", || {
                    factors::OutputFactor::from_parts(s.len(), &s, comp.as_deref(), tokens, samples, u)
                })
            })
            ?;
        Ok(Self { inner: Mutex::new(f) })
    }

    fn copy(&self, py: Python<'_>) -> PyResult<Self> {
        let f = locked(py, &self.inner, "OutputFactor.copy", |f| Ok(f.clone()))?;
        Ok(Self { inner: Mutex::new(f) })
    }

    /// Equal sums, compensations, counts and per-sample sums (as `InputFactor`'s `==`;
    /// without it Python compared identities, so a copy was never equal).
    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        match other.cast::<PyOutputFactor>() {
            Ok(o) => {
                let o: &PyOutputFactor = o.get();
                if std::ptr::eq(self, o) {
                    return Ok(true);
                }
                py.detach(|| {
                    guarded("OutputFactor.__eq__", || {
                        let (a, b) = lock_pair(&self.inner, &o.inner);
                        Ok(*a == *b)
                    })
                })
                .map_err(PyErr::from)
            }
            Err(_) => Ok(false),
        }
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        locked(py, &self.inner, "OutputFactor.__repr__", |f| {
            Ok(format!(
                "OutputFactor(m={}, tokens={}, samples={}, per_sample={})",
                f.m(),
                f.tokens(),
                f.samples(),
                f.keeps_sample_sums()
            ))
        })
    }
}

/// Diagonal of `(λ I + U Uᵀ / N)⁻¹` by Woodbury (SPEC §2, `sequence_lowrank`).
#[pyfunction]
fn lowrank_output_precision<'py>(py: Python<'py>, sample_sums: &Bound<'py, PyAny>, damping: f64) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let v = matrix_arg(sample_sums, "lowrank_output_precision: sample_sums")?;
    let m = v.ncols();
    let flat = row_major(&v);
    let p = py
        .detach(|| guarded("lowrank_output_precision", || factors::lowrank_output_precision(&flat, m, damping)))
        ?;
    Ok(vec_to_py(py, p))
}

/// One module's initialization (SPEC §3) and its diagnostics (SPEC §5).
#[pyclass(name = "SolveResult", module = "lora_da._core", frozen)]
struct PySolveResult {
    inner: core_solve::SolveResult,
}

#[pymethods]
impl PySolveResult {
    /// `A = Vᵀ/√γ`, `(r, n)`.
    #[getter(A)]
    fn a<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        mat_to_py(py, self.inner.a.as_ref())
    }
    /// `B = Δ̂ᵀV/√γ`, `(m, r)`.
    #[getter(B)]
    fn b<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        mat_to_py(py, self.inner.b.as_ref())
    }
    /// `V`, `(n, r)`.
    #[getter(V)]
    fn v<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        mat_to_py(py, self.inner.v.as_ref())
    }
    #[getter]
    fn eigenvalues<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        vec_to_py(py, self.inner.eigenvalues.clone())
    }
    #[getter]
    fn next_eigenvalue(&self) -> f64 {
        self.inner.next_eigenvalue
    }
    #[getter]
    fn gap(&self) -> f64 {
        self.inner.gap
    }
    #[getter]
    fn residual(&self) -> f64 {
        self.inner.residual
    }
    #[getter]
    fn omega_norm(&self) -> f64 {
        self.inner.omega_norm
    }
    #[getter]
    fn iterations(&self) -> usize {
        self.inner.iterations
    }
    #[getter]
    fn method(&self) -> &'static str {
        self.inner.method.name()
    }
    #[getter]
    fn sigma(&self) -> f64 {
        self.inner.sigma
    }
    #[getter]
    fn c(&self) -> f64 {
        self.inner.c
    }
    #[getter]
    fn damping(&self) -> f64 {
        self.inner.damping
    }
    #[getter]
    fn zero_gradient(&self) -> bool {
        self.inner.zero_gradient
    }
    #[getter]
    fn notes(&self) -> Vec<String> {
        self.inner.notes.clone()
    }
    #[getter]
    fn rank(&self) -> usize {
        self.inner.v.ncols()
    }
    fn __repr__(&self) -> String {
        let r = &self.inner;
        format!(
            "SolveResult(rank={}, n={}, m={}, method='{}', residual={:.2e}, gap={:.3e}, sigma={:.6e}, c={:.6e}, iterations={})",
            r.v.ncols(),
            r.a.ncols(),
            r.b.nrows(),
            r.method.name(),
            r.residual,
            r.gap,
            r.sigma,
            r.c,
            r.iterations
        )
    }
}

/// A count or size from Python, taken as any integer and checked here: PyO3's own
/// conversion to an unsigned type raises a bare `OverflowError` on a negative one.
fn count<T: TryFrom<i128>>(v: i128, what: &str) -> PyResult<T> {
    if v < 0 {
        return Err(PyErr::new::<InvalidArgumentError, _>(format!("{what} must be ≥ 0, got {v}")));
    }
    T::try_from(v).map_err(|_| PyErr::new::<InvalidArgumentError, _>(format!("{what} = {v} is too large")))
}

#[allow(clippy::too_many_arguments)]
fn options(
    rank: i128,
    n_pop: f64,
    alpha: f64,
    beta: f64,
    damping: f64,
    output_damping: Option<f64>,
    gamma: f64,
    normalize: bool,
    method: &str,
    auto_damping: bool,
    tol: f64,
    max_applications: Option<i128>,
    deterministic: bool,
    dense_fallback: bool,
) -> PyResult<SolveOptions> {
    let rank = count::<usize>(rank, "rank")?;
    let max_applications = max_applications.map(|a| count::<usize>(a, "max_applications")).transpose()?;
    let mut o = SolveOptions::new(rank, n_pop);
    o.alpha = alpha;
    o.beta = beta;
    o.damping = damping;
    o.output_damping = output_damping;
    o.gamma = gamma;
    o.normalize = normalize;
    o.method = Method::parse(method)?;
    o.auto_damping = auto_damping;
    o.tol = tol;
    o.max_applications = max_applications;
    o.dense_fallback = dense_fallback;
    o.par = if deterministic { faer::Par::Seq } else { crate::parallel::default_par() };
    Ok(o)
}

/// A `#[pyfunction]` whose signature is `head`, the solve defaults of
/// [`solve_defaults`] and `tail`: the binding's defaults are the core's.
/// Used as `solve_defaults!(solve_signature!([head] [tail] { fn ... }))`.
macro_rules! solve_signature {
    ([$($head:tt)*] [$($tail:tt)*] { $($item:tt)* } $($name:ident = $value:tt),*) => {
        #[pyfunction]
        #[pyo3(signature = ($($head)* $($name = $value,)* $($tail)*))]
        #[allow(clippy::too_many_arguments)]
        $($item)*
    };
}

solve_defaults!(solve_signature!(
    [z, y, g, *, rank, n_pop,]
    [output_precision=None, name=""]
    {
/// Solve one module (SPEC §3). See `lora_da.solve` for the documentation.
fn solve<'py>(
    py: Python<'py>,
    z: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
    g: &Bound<'py, PyAny>,
    rank: i128,
    n_pop: f64,
    alpha: f64,
    beta: f64,
    damping: f64,
    output_damping: Option<f64>,
    gamma: f64,
    normalize: bool,
    method: &str,
    auto_damping: bool,
    tol: f64,
    max_applications: Option<i128>,
    deterministic: bool,
    dense_fallback: bool,
    output_precision: Option<&Bound<'py, PyAny>>,
    name: &str,
) -> PyResult<PySolveResult> {
    let opts = options(rank, n_pop, alpha, beta, damping, output_damping, gamma, normalize, method, auto_damping, tol, max_applications, deterministic, dense_fallback)?;
    let z = MatrixArg::extract(z, "Z")?;
    let y = vector_arg(y, "y")?;
    let g = MatrixArg::extract(g, "G")?;
    let (z, g) = (z.as_ref(), g.as_ref());
    let prec = output_precision.map(|p| vector_arg(p, "output_precision")).transpose()?;
    let res = py.detach(|| {
        guarded(if name.is_empty() { "solve" } else { name }, || {
            let module = core_solve::ModuleInput { name, y: &y, g, precision: prec.as_deref() };
            core_solve::solve_shared(z, &[module], &opts).map(|mut v| v.remove(0))
        })
    });
    Ok(PySolveResult { inner: res? })
}
    }
));

solve_defaults!(solve_signature!(
    [z, ys, gs, *, rank, n_pop,]
    [output_precisions=None, names=None]
    {
/// Solve several modules sharing one `Z` with one Cholesky factorization.
/// `ys` and `gs` are sequences (one entry per module); `names` label errors.
fn solve_shared<'py>(
    py: Python<'py>,
    z: &Bound<'py, PyAny>,
    ys: Vec<Bound<'py, PyAny>>,
    gs: Vec<Bound<'py, PyAny>>,
    rank: i128,
    n_pop: f64,
    alpha: f64,
    beta: f64,
    damping: f64,
    output_damping: Option<f64>,
    gamma: f64,
    normalize: bool,
    method: &str,
    auto_damping: bool,
    tol: f64,
    max_applications: Option<i128>,
    deterministic: bool,
    dense_fallback: bool,
    output_precisions: Option<Vec<Option<Bound<'py, PyAny>>>>,
    names: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyList>> {
    let opts = options(rank, n_pop, alpha, beta, damping, output_damping, gamma, normalize, method, auto_damping, tol, max_applications, deterministic, dense_fallback)?;
    if ys.len() != gs.len() {
        return Err(PyErr::from(Error::Shape(format!("solve_shared: {} y vectors but {} gradients", ys.len(), gs.len()))));
    }
    let k = ys.len();
    let names: Vec<String> = names.unwrap_or_else(|| (0..k).map(|i| format!("module {i}")).collect());
    if names.len() != k {
        return Err(PyErr::from(Error::Shape(format!("solve_shared: {} names for {k} modules", names.len()))));
    }
    let precs: Vec<Option<Vec<f64>>> = match output_precisions {
        None => vec![None; k],
        Some(v) if v.len() == k => v.iter().map(|p| p.as_ref().map(|p| vector_arg(p, "output_precision")).transpose()).collect::<PyResult<_>>()?,
        Some(v) => return Err(PyErr::from(Error::Shape(format!("solve_shared: {} output precisions for {k} modules", v.len())))),
    };
    let z = MatrixArg::extract(z, "Z")?;
    let ys: Vec<Vec<f64>> = ys.iter().map(|y| vector_arg(y, "y")).collect::<PyResult<_>>()?;
    let gs: Vec<MatrixArg<'py>> = gs.iter().map(|g| MatrixArg::extract(g, "G")).collect::<PyResult<_>>()?;
    let z = z.as_ref();
    let gs: Vec<MatRef<'_, f64>> = gs.iter().map(|g| g.as_ref()).collect();
    let results = py.detach(|| {
        guarded("solve_shared", || {
        let modules: Vec<core_solve::ModuleInput<'_>> = (0..k)
            .map(|i| core_solve::ModuleInput { name: &names[i], y: &ys[i], g: gs[i], precision: precs[i].as_deref() })
            .collect();
        core_solve::solve_shared(z, &modules, &opts)
        })
    });
    let out = PyList::empty(py);
    for r in results? {
        out.append(PySolveResult { inner: r })?;
    }
    Ok(out)
}
    }
));

/// `SolveOptions::default()` as the keyword arguments of `solve` (SPEC §3):
/// the one source of the defaults for `LoraDAConfig`, the reference, the
/// device solve and the CLI.
fn solve_defaults_dict(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let o = SolveOptions::default();
    let d = PyDict::new(py);
    d.set_item("alpha", o.alpha)?;
    d.set_item("beta", o.beta)?;
    d.set_item("damping", o.damping)?;
    d.set_item("output_damping", o.output_damping)?;
    d.set_item("gamma", o.gamma)?;
    d.set_item("normalize", o.normalize)?;
    d.set_item("method", o.method.name())?;
    d.set_item("auto_damping", o.auto_damping)?;
    d.set_item("tol", o.tol)?;
    d.set_item("max_applications", o.max_applications)?;
    d.set_item("deterministic", matches!(o.par, faer::Par::Seq))?;
    d.set_item("dense_fallback", o.dense_fallback)?;
    Ok(d)
}

/// Number of threads of the core's pool.
#[pyfunction]
fn num_threads() -> usize {
    rayon::current_num_threads()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    crate::parallel::init_parallelism();
    m.add_class::<PyInputFactor>()?;
    m.add_class::<PyOutputFactor>()?;
    m.add_class::<PySolveResult>()?;
    m.add_function(wrap_pyfunction!(solve, m)?)?;
    m.add_function(wrap_pyfunction!(solve_shared, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_output_precision, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    let py = m.py();
    m.add("LoraDAError", py.get_type::<LoraDAError>())?;
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("NotPositiveDefiniteError", py.get_type::<NotPositiveDefiniteError>())?;
    m.add("StatisticsFileError", py.get_type::<StatisticsFileError>())?;
    m.add("SOLVE_DEFAULTS", solve_defaults_dict(py)?)?;
    m.add("TOKEN_CHUNK", factors::TOKEN_CHUNK)?;
    m.add("GAP_TOL", core_solve::GAP_TOL)?;
    m.add("GAP_REL", core_solve::GAP_REL)?;
    Ok(())
}
