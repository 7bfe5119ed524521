//! Python arguments to the core's arrays and counts, and results back to
//! NumPy: dtypes, strides and alignment are settled here.

use faer::{Mat, MatRef};
use numpy::ndarray::{Array1, Array2, ArrayView2};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyBool;

use super::errors::InvalidArgumentError;
use crate::error::Error;
use crate::factors::RowSource;

/// A `(T, n)` array of float32, float64 or bfloat16 bits (uint16), any strides.
pub(super) enum Rows<'a> {
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
pub(super) fn aligned<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
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
pub(super) enum RowsHolder<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
    Bf16(PyReadonlyArray2<'py, u16>),
}

impl<'py> RowsHolder<'py> {
    pub(super) fn extract(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
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
    pub(super) fn view(&self) -> Rows<'_> {
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
pub(super) fn tiled_copy<T: Copy>(v: numpy::ndarray::ArrayView2<'_, T>, f: impl Fn(T) -> f64) -> Mat<f64> {
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
pub(super) fn matrix_arg<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Mat<f64>> {
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
pub(super) enum MatrixArg<'py> {
    View(PyReadonlyArray2<'py, f64>),
    Owned(Mat<f64>),
}

impl<'py> MatrixArg<'py> {
    pub(super) fn extract(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
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

    pub(super) fn as_ref(&self) -> MatRef<'_, f64> {
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

pub(super) fn vector_arg<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Vec<f64>> {
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
pub(super) fn row_major(m: &Mat<f64>) -> Vec<f64> {
    (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)])).collect()
}

pub(super) fn mat_to_py<'py>(py: Python<'py>, m: MatRef<'_, f64>) -> Bound<'py, PyArray2<f64>> {
    Array2::from_shape_fn((m.nrows(), m.ncols()), |(i, j)| m[(i, j)]).into_pyarray(py)
}

pub(super) fn vec_to_py<'py>(py: Python<'py>, v: Vec<f64>) -> Bound<'py, PyArray1<f64>> {
    Array1::from_vec(v).into_pyarray(py)
}

/// A count or size from Python, taken as any integer and checked here: PyO3's own
/// conversion to an unsigned type raises a bare `OverflowError` on a negative one.
/// An integer argument from Python (numpy's integers too, through `__index__`),
/// remembering whether it was a `bool`: Python counts `True` as 1, but a flag
/// given where a count or size belongs is a mistake that [`count`] names.
#[derive(Clone, Copy)]
pub(super) struct Int {
    pub(super) value: i128,
    boolean: bool,
}

impl<'a, 'py> FromPyObject<'a, 'py> for Int {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let boolean = obj.is_instance_of::<PyBool>();
        Ok(Int { value: obj.extract::<i128>()?, boolean })
    }
}

pub(super) fn count<T: TryFrom<i128>>(v: Int, what: &str) -> PyResult<T> {
    if v.boolean {
        let shown = if v.value != 0 { "True" } else { "False" };
        return Err(PyErr::new::<InvalidArgumentError, _>(format!("{what} must be an integer, got the bool {shown}")));
    }
    let v = v.value;
    if v < 0 {
        return Err(PyErr::new::<InvalidArgumentError, _>(format!("{what} must be ≥ 0, got {v}")));
    }
    T::try_from(v).map_err(|_| PyErr::new::<InvalidArgumentError, _>(format!("{what} = {v} is too large")))
}
