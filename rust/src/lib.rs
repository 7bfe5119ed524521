//! lora-da core: the numerical heart of the LoRA-DA initialization.
//!
//! Pure Rust, no Python: `cargo test` exercises it directly. The optional
//! `python` feature adds the thin PyO3 binding (`python.rs`) that maturin builds
//! into `lora_da._core`.
//!
//! * [`factors`] — streaming float64 K-FAC factors `Z`, `y` (SPEC §2);
//! * [`guidance`] — the matrix-free operator `Ω` and the step `Δ` (SPEC §3–§4);
//! * [`eigensolver`] — block Krylov for extreme eigenpairs (SPEC §4);
//! * [`solve`] — the per-module initialization and its diagnostics (SPEC §3, §5).

pub mod eigensolver;
pub mod error;
pub mod factors;
pub mod guidance;
pub mod solve;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
pub use factors::{InputFactor, OutputFactor};
pub use solve::{solve, solve_shared, Method, SolveOptions, SolveResult};
