//! The PyO3 binding, `lora_da._core`: converts arrays, releases the GIL,
//! defines the exception classes and maps the core's errors to them. No math.
//!
//! In the order of use, each file using only those above it: [`errors`] (the
//! exception classes), [`convert`] (arrays and counts), [`factors`] (the
//! streaming factors), [`solve`] (the solve and its options); this file only
//! builds the module from them.

mod errors;
mod convert;
mod factors;
mod solve;

use pyo3::prelude::*;

use errors::{InvalidArgumentError, LoraDAError, NonFiniteError, NotPositiveDefiniteError, ShapeError, StatisticsFileError};
use factors::{lowrank_output_precision, PyInputFactor, PyOutputFactor};
use solve::{check_solve_options, solve_defaults_dict, solve_shared, PySolveResult};

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
    m.add_function(wrap_pyfunction!(solve::solve, m)?)?;
    m.add_function(wrap_pyfunction!(solve_shared, m)?)?;
    m.add_function(wrap_pyfunction!(check_solve_options, m)?)?;
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
    m.add("TOKEN_CHUNK", crate::factors::TOKEN_CHUNK)?;
    m.add("GAP_TOL", crate::solve::GAP_TOL)?;
    m.add("GAP_REL", crate::solve::GAP_REL)?;
    m.add("CONTRACT_RESIDUAL", crate::solve::CONTRACT_RESIDUAL)?;
    m.add("SYMMETRY_TOL", crate::validate::SYMMETRY_TOL)?;
    Ok(())
}

