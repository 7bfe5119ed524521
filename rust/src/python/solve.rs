//! The bindings of the solve (SPEC §3): `solve`, `solve_shared`, the check
//! of their options, and the result with its diagnostics (SPEC §5).

use faer::MatRef;
use numpy::{PyArray1, PyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::convert::{count, mat_to_py, vec_to_py, vector_arg, Int, MatrixArg};
use super::errors::{guarded, InvalidArgumentError};
use crate::error::Error;
use crate::options::{solve_defaults, Method, SolveOptions, DEFAULTS};
use crate::parallel::default_par;
use crate::solve as core_solve;

/// One module's initialization (SPEC §3) and its diagnostics (SPEC §5).
#[pyclass(name = "SolveResult", module = "lora_da._core", frozen)]
pub(super) struct PySolveResult {
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

/// The type in which the binding takes each solve option from Python (`$lt`:
/// the lifetime of a borrowed string). Counts come as any integer and are
/// checked by [`count`]: PyO3's own conversion to an unsigned type raises a
/// bare `OverflowError` on a negative one. An option added to
/// [`solve_defaults`] fails to compile until it is given a type here, and its
/// field warns as never read until [`SolveArgs::options`] converts it.
macro_rules! option_type {
    ($lt:lifetime, rank) => { Int };
    ($lt:lifetime, n_pop) => { f64 };
    ($lt:lifetime, alpha) => { f64 };
    ($lt:lifetime, beta) => { f64 };
    ($lt:lifetime, damping) => { f64 };
    ($lt:lifetime, output_damping) => { Option<f64> };
    ($lt:lifetime, gamma) => { f64 };
    ($lt:lifetime, normalize) => { bool };
    ($lt:lifetime, method) => { &$lt str };
    ($lt:lifetime, auto_damping) => { bool };
    ($lt:lifetime, tol) => { f64 };
    ($lt:lifetime, max_applications) => { Option<Int> };
    ($lt:lifetime, deterministic) => { bool };
    ($lt:lifetime, dense_fallback) => { bool };
}

macro_rules! solve_args_struct {
    ($($name:ident = $default:tt),*) => {
        /// The solve options as Python passed them, before any check: the
        /// functions that [`solve_function`] writes gather them here, and
        /// [`SolveArgs::options`] alone checks and converts them.
        struct SolveArgs<'a> {
            rank: option_type!('a, rank),
            n_pop: option_type!('a, n_pop),
            $($name: option_type!('a, $name),)*
        }
    };
}
solve_defaults!(solve_args_struct!());

impl SolveArgs<'_> {
    /// The core's options: the counts and the method checked here, the rest by
    /// the core ([`SolveOptions::check`]), as the solve itself does.
    fn options(self) -> PyResult<SolveOptions> {
        let mut o = SolveOptions::new(count::<usize>(self.rank, "rank")?, self.n_pop);
        o.max_applications = self.max_applications.map(|a| count::<usize>(a, "max_applications")).transpose()?;
        o.alpha = self.alpha;
        o.beta = self.beta;
        o.damping = self.damping;
        o.output_damping = self.output_damping;
        o.gamma = self.gamma;
        o.normalize = self.normalize;
        o.method = Method::parse(self.method)?;
        o.auto_damping = self.auto_damping;
        o.tol = self.tol;
        o.dense_fallback = self.dense_fallback;
        o.par = if self.deterministic { faer::Par::Seq } else { default_par() };
        Ok(o)
    }
}

/// A `#[pyfunction]` taking the solve options as keyword arguments: `rank`,
/// `n_pop` and those of [`solve_defaults`] with their defaults (the core's:
/// `inspect.signature` shows them), between arguments of its own in `[head]`
/// and `[tail]`. Its body sees the options as one [`SolveArgs`].
/// Used as `solve_defaults!(solve_function!(fn name<'py>(py: .., [head], args: SolveArgs, [tail]) -> .. { body }))`.
macro_rules! solve_function {
    (
        $(#[$attr:meta])*
        fn $fn_name:ident<$lt:lifetime>(
            $py:ident: $py_ty:ty,
            [$($head:ident: $head_ty:ty),*],
            $args:ident: SolveArgs,
            [$($tail:ident: $tail_ty:ty = $tail_default:tt),*]
        ) -> $ret:ty $body:block
        $($name:ident = $default:tt),*
    ) => {
        $(#[$attr])*
        #[pyfunction]
        #[pyo3(signature = ($($head,)* *, rank, n_pop, $($name = $default,)* $($tail = $tail_default),*))]
        #[allow(clippy::too_many_arguments)]
        pub(super) fn $fn_name<$lt>(
            $py: $py_ty,
            $($head: $head_ty,)*
            rank: option_type!('_, rank),
            n_pop: option_type!('_, n_pop),
            $($name: option_type!('_, $name),)*
            $($tail: $tail_ty,)*
        ) -> $ret {
            let $args = SolveArgs { rank, n_pop, $($name),* };
            $body
        }
    };
}

solve_defaults!(solve_function!(
    /// Solve one module (SPEC §3). See `lora_da.solve` for the documentation.
    fn solve<'py>(
        py: Python<'py>,
        [z: &Bound<'py, PyAny>, y: &Bound<'py, PyAny>, g: &Bound<'py, PyAny>],
        args: SolveArgs,
        [output_precision: Option<&Bound<'py, PyAny>> = None, name: &str = ""]
    ) -> PyResult<PySolveResult> {
        let opts = args.options()?;
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
));

solve_defaults!(solve_function!(
    /// Solve several modules sharing one `Z` with one Cholesky factorization.
    /// `ys` and `gs` are sequences (one entry per module); `names` label errors.
    fn solve_shared<'py>(
        py: Python<'py>,
        [z: &Bound<'py, PyAny>, ys: Vec<Bound<'py, PyAny>>, gs: Vec<Bound<'py, PyAny>>],
        args: SolveArgs,
        [output_precisions: Option<Vec<Option<Bound<'py, PyAny>>>> = None, names: Option<Vec<String>> = None]
    ) -> PyResult<Bound<'py, PyList>> {
        let opts = args.options()?;
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
));

solve_defaults!(solve_function!(
    /// The options checked as `solve` checks them, without solving (SPEC §3,
    /// "Inputs are validated before any work"): the same exceptions with the
    /// same messages. With `n` and `m` (`Z` is `n × n`, `Ḡ` is `m × n`) the
    /// rank is checked against them, without them only `r ≥ 1`; `name`
    /// prefixes the messages as `solve`'s `name` does.
    fn check_solve_options<'py>(
        _py: Python<'py>,
        [],
        args: SolveArgs,
        [n: Option<Int> = None, m: Option<Int> = None, name: &str = ""]
    ) -> PyResult<()> {
        let opts = args.options()?;
        let shape = match (n, m) {
            (Some(n), Some(m)) => Some((count::<usize>(n, "n")?, count::<usize>(m, "m")?)),
            (None, None) => None,
            _ => {
                return Err(PyErr::new::<InvalidArgumentError, _>(format!(
                    "check_solve_options: n and m are given together or not at all, got n = {:?}, m = {:?}",
                    n.map(|v| v.value),
                    m.map(|v| v.value)
                )))
            }
        };
        opts.check(shape).map_err(|e| PyErr::from(e.context(name)))
    }
));

macro_rules! defaults_dict {
    ($($name:ident = $default:tt),*) => {
        /// The defaults of the solve options as the keyword arguments of
        /// `solve` (SPEC §3): the one source of the defaults for
        /// `LoraDAConfig`, the reference, the device solve and the CLI.
        pub(super) fn solve_defaults_dict(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
            let d = PyDict::new(py);
            $(d.set_item(stringify!($name), DEFAULTS.$name)?;)*
            Ok(d)
        }
    };
}
solve_defaults!(defaults_dict!());
