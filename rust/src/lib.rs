//! lora-da core: the numerical heart of the LoRA-DA initialization.
//!
//! Pure Rust, no Python: `cargo test` exercises it directly. The optional
//! `python` feature adds the thin PyO3 binding (`python/`) that maturin builds
//! into `lora_da._core`.
//!
//! This file is the crate's face: it declares the modules and re-exports the
//! public API, and defines nothing. The modules are declared in the order of
//! the data, and each uses only modules declared above it (checked by
//! `tests/test_rust_layering.py`):
//!
//! * [`parallel`] — where the core may use the thread pool, and with which `Par`;
//! * [`error`], [`pow2`], [`buffer`], [`kernels`] — errors, exact power-of-two
//!   scaling, big buffers, the SIMD/tall-product/scan kernels (SPEC §4);
//! * [`factors`] — streaming float64 K-FAC factors `Z`, `y` (SPEC §2);
//! * [`options`] — the solve options and their defaults (SPEC §3);
//! * [`validate`] — the inputs are validated before any work (SPEC §3);
//! * [`cholesky`] — `Z + λI = L Lᵀ` and its triangular solves (SPEC §3 step 1);
//! * [`eigensolver`] — block Krylov for extreme eigenpairs (SPEC §4);
//! * [`guidance`] — the matrix-free operator `Ω` and the step `Δ` (SPEC §3–§4);
//! * [`solve`] — the per-module initialization and its diagnostics (SPEC §3, §5);
//! * `python` — the binding, above everything it converts.

pub mod parallel;
pub mod error;
pub mod pow2;
pub mod buffer;
pub mod kernels;
pub mod factors;
pub mod options;
pub mod validate;
pub mod cholesky;
pub mod eigensolver;
pub mod guidance;
pub mod solve;
#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
pub use factors::{InputFactor, OutputFactor};
pub use solve::{solve, solve_shared, Method, SolveOptions, SolveResult};
