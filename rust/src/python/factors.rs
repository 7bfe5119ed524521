//! The bindings of the streaming factors `InputFactor` and `OutputFactor`
//! (SPEC §2): each accumulator behind a lock, updated without the GIL.

use std::sync::{Mutex, MutexGuard};

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::convert::{count, matrix_arg, row_major, vec_to_py, vector_arg, Int, RowsHolder};
use super::errors::guarded;
use crate::error::{Error, Result as CoreResult};
use crate::factors;

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

/// A float64 NumPy vector borrowed for reading, without a copy (a large packed triangle).
fn readonly_vector<'py>(a: &Bound<'py, PyAny>, what: &str, arg: &str) -> PyResult<numpy::PyReadonlyArray1<'py, f64>> {
    let bad = |why: &str| PyErr::from(Error::Shape(format!("{what}: {arg} {why}")));
    let arr = a.cast::<PyArray1<f64>>().map_err(|_| bad("must be a float64 NumPy array of 1 dimension"))?;
    arr.try_readonly().map_err(|_| bad("is borrowed for writing"))
}

/// Whether the accumulators behind `a` and `b` hold the same contents,
/// compared without the GIL. Both locks are taken in one fixed (address)
/// order, so that `a == b` and `b == a` in two threads cannot each hold one
/// lock and wait for the other; an accumulator equals itself without being
/// locked twice.
fn equal<A: PartialEq + Send>(py: Python<'_>, a: &Mutex<A>, b: &Mutex<A>, what: &str) -> PyResult<bool> {
    if std::ptr::eq(a, b) {
        return Ok(true);
    }
    py.detach(|| {
        guarded(what, || {
            let (ga, gb) = if (a as *const Mutex<A>) < (b as *const Mutex<A>) {
                let ga = lock(a);
                (ga, lock(b))
            } else {
                let gb = lock(b);
                (lock(a), gb)
            };
            Ok(*ga == *gb)
        })
    })
    .map_err(PyErr::from)
}

/// Streaming float64 accumulator of `Σ_t x_t x_tᵀ` (SPEC §2). Thread-safe:
/// calls from several threads are serialized by a lock, and a call that
/// fails leaves the accumulator unchanged.
#[pyclass(name = "InputFactor", module = "lora_da._core", frozen)]
pub(super) struct PyInputFactor {
    inner: Mutex<factors::InputFactor>,
}

#[pymethods]
impl PyInputFactor {
    #[new]
    fn new(py: Python<'_>, n: Int) -> PyResult<Self> {
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

    /// Fault in the accumulator's host pages without the GIL (the sums do not
    /// change): a new factor's zeros are untouched pages, whose first touch
    /// otherwise falls on the first addition.
    fn touch(&self, py: Python<'_>) -> PyResult<()> {
        locked(py, &self.inner, "InputFactor.touch", |f| {
            f.touch();
            Ok(())
        })
    }

    /// Add a partial Gram matrix `Σ x xᵀ` (float64, `(n, n)`) over `tokens` rows.
    fn add_gram(&self, py: Python<'_>, gram: &Bound<'_, PyAny>, tokens: Int) -> PyResult<()> {
        let tokens = count::<u64>(tokens, "InputFactor.add_gram: tokens")?;
        let mat = matrix_arg(gram, "InputFactor.add_gram: gram")?;
        locked(py, &self.inner, "InputFactor.add_gram", |f| f.add_gram(mat.as_ref(), tokens))
    }

    /// Rows ``first_row ..`` of a symmetric ``Σ x xᵀ`` (a C-contiguous float64 ``(k, width)``
    /// array, read in place): each entry on or below the diagonal added to the sums, and
    /// ``tokens`` to the count (a flush's device row blocks, without an ``n × n`` host copy).
    fn add_gram_rows(&self, py: Python<'_>, first_row: Int, rows: &Bound<'_, PyAny>, tokens: Int) -> PyResult<()> {
        let what = "InputFactor.add_gram_rows";
        let first_row = count::<usize>(first_row, "InputFactor.add_gram_rows: first_row")?;
        let tokens = count::<u64>(tokens, "InputFactor.add_gram_rows: tokens")?;
        let bad = |why: &str| PyErr::from(Error::Shape(format!("{what}: rows {why}")));
        let arr = rows.cast::<PyArray2<f64>>().map_err(|_| bad("must be a float64 NumPy array of 2 dimensions"))?;
        let ro = arr.try_readonly().map_err(|_| bad("is borrowed for writing"))?;
        let width = arr.shape()[1];
        // a Fortran-ordered block is contiguous too, but its slice would be read transposed
        if !arr.is_c_contiguous() {
            return Err(bad("must be C-contiguous"));
        }
        let v = ro.as_slice().map_err(|_| bad("must be C-contiguous"))?;
        locked(py, &self.inner, what, |f| f.add_gram_rows(first_row, v, width, tokens))
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
    fn from_packed(py: Python<'_>, n: Int, packed: &Bound<'_, PyAny>, tokens: Int, compensation: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let n = count::<usize>(n, "InputFactor.from_packed: n")?;
        let tokens = count::<u64>(tokens, "InputFactor.from_packed: tokens")?;
        let v = vector_arg(packed, "InputFactor.from_packed: packed")?;
        let c = compensation.map(|c| vector_arg(c, "InputFactor.from_packed: compensation")).transpose()?;
        let f = py
            .detach(|| guarded("InputFactor.from_packed", || factors::InputFactor::from_packed(n, &v, c.as_deref(), tokens)))
            ?;
        Ok(Self { inner: Mutex::new(f) })
    }

    /// `Z` row-major into `out` (float64, `n × n`, C-contiguous) straight from a packed
    /// triangle (the statistics file's), without building the factor: the values of
    /// `from_packed(n, packed, tokens, compensation).mean_into(out)`.
    #[staticmethod]
    #[pyo3(signature = (n, packed, tokens, out, compensation=None))]
    fn packed_mean_into(
        py: Python<'_>,
        n: Int,
        packed: &Bound<'_, PyAny>,
        tokens: Int,
        out: &Bound<'_, PyAny>,
        compensation: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let what = "InputFactor.packed_mean_into";
        let n = count::<usize>(n, "InputFactor.packed_mean_into: n")?;
        let tokens = count::<u64>(tokens, "InputFactor.packed_mean_into: tokens")?;
        let bad = |arg: &str, why: &str| PyErr::from(Error::Shape(format!("{what}: {arg} {why}")));
        let sum = readonly_vector(packed, what, "packed")?;
        let comp = compensation.map(|c| readonly_vector(c, what, "compensation")).transpose()?;
        let s = sum.as_slice().map_err(|_| bad("packed", "must be contiguous"))?;
        let c = match &comp {
            Some(c) => Some(c.as_slice().map_err(|_| bad("compensation", "must be contiguous"))?),
            None => None,
        };
        let arr = out.cast::<PyArray2<f64>>().map_err(|_| bad("out", "must be a float64 NumPy array of 2 dimensions"))?;
        let mut rw = arr.try_readwrite().map_err(|_| bad("out", "is not writeable (read-only or borrowed)"))?;
        let z = rw.as_slice_mut().map_err(|_| bad("out", "must be contiguous"))?;
        py.detach(|| guarded(what, || factors::packed_mean_row_major_into(n, s, c, tokens, z))).map_err(PyErr::from)
    }

    fn copy(&self, py: Python<'_>) -> PyResult<Self> {
        let f = locked(py, &self.inner, "InputFactor.copy", |f| Ok(f.clone()))?;
        Ok(Self { inner: Mutex::new(f) })
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        match other.cast::<PyInputFactor>() {
            Ok(o) => equal(py, &self.inner, &o.get().inner, "InputFactor.__eq__"),
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
pub(super) struct PyOutputFactor {
    inner: Mutex<factors::OutputFactor>,
}

#[pymethods]
impl PyOutputFactor {
    #[new]
    #[pyo3(signature = (m, per_sample=false))]
    fn new(py: Python<'_>, m: Int, per_sample: bool) -> PyResult<Self> {
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
    fn add(&self, py: Python<'_>, g: &Bound<'_, PyAny>, sample_lengths: Option<Vec<Int>>) -> PyResult<()> {
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
    fn add_sums(&self, py: Python<'_>, sumsq: &Bound<'_, PyAny>, tokens: Int, sample_sums: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
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
    fn count_samples(&self, py: Python<'_>, k: Int) -> PyResult<()> {
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
        tokens: Int,
        samples: Int,
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
            Ok(o) => equal(py, &self.inner, &o.get().inner, "OutputFactor.__eq__"),
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
pub(super) fn lowrank_output_precision<'py>(py: Python<'py>, sample_sums: &Bound<'py, PyAny>, damping: f64) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let v = matrix_arg(sample_sums, "lowrank_output_precision: sample_sums")?;
    let m = v.ncols();
    let flat = row_major(&v);
    let p = py
        .detach(|| guarded("lowrank_output_precision", || factors::lowrank_output_precision(&flat, m, damping)))
        ?;
    Ok(vec_to_py(py, p))
}
