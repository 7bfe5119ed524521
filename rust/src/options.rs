//! The options of a solve and their defaults (SPEC §3).

use faer::Par;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Krylov for `n > DENSE_BELOW`, dense otherwise.
    Auto,
    Krylov,
    Dense,
}

/// Below this input dimension `auto` uses the dense solve: it is cheaper there.
pub const DENSE_BELOW: usize = 192;

impl Method {
    pub fn parse(s: &str) -> Result<Method> {
        match s {
            "auto" => Ok(Method::Auto),
            "krylov" => Ok(Method::Krylov),
            "dense" => Ok(Method::Dense),
            other => Err(Error::InvalidArgument(format!(
                "method must be 'auto', 'krylov' or 'dense', got {other:?}"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::Krylov => "krylov",
            Method::Dense => "dense",
        }
    }
}

/// Hyper-parameters (SPEC §3; defaults are the authors' published ones).
#[derive(Clone, Debug)]
pub struct SolveOptions {
    pub rank: usize,
    /// `N_pop`, the size of the fine-tuning set.
    pub n_pop: f64,
    pub alpha: f64,
    pub beta: f64,
    /// `λ`, added to `Z`.
    pub damping: f64,
    /// `λ_y`, added to `y`; `None` means `λ`.
    pub output_damping: Option<f64>,
    pub gamma: f64,
    pub normalize: bool,
    pub method: Method,
    /// Raise `λ` until `Z + λI` factors, instead of failing.
    pub auto_damping: bool,
    /// Krylov residual target relative to `‖Ω‖₂` (the contract asks 1e-10).
    pub tol: f64,
    /// Krylov budget in single-vector operator applications (`None`: `max(n, 600)`).
    pub max_applications: Option<usize>,
    /// When Krylov misses the contract, solve densely (the default). Off, the
    /// Krylov result is returned as it is, its residual above the contract,
    /// for a caller that has a cheaper dense route of its own (Python's LAPACK one).
    pub dense_fallback: bool,
    pub seed: u64,
    /// Parallelism inside one solve. `Par::Seq` (the default, `deterministic`)
    /// gives bit-identical results whatever the thread count; faer's parallel
    /// kernels split work by thread count, which changes the last bits.
    /// [`solve_shared`] still runs its modules in parallel.
    pub par: Par,
}

/// The defaults of the solve options (SPEC §3; the authors' published
/// configuration), the one place they are written: [`SolveOptions::default`]
/// reads them through [`DEFAULTS`], and the binding (`python/solve.rs`) writes the
/// Python signatures of `solve` and `solve_shared` from this list, so that
/// `inspect.signature` shows the values and `_core.SOLVE_DEFAULTS` (built from
/// `SolveOptions::default()`) gives them to the Python side.
///
/// Call as `solve_defaults!(callback!(tokens...))`: it expands to
/// `callback!(tokens... name = value, ...)`. Each value is a single token, so
/// that a proc macro receiving it sees a literal (pyo3 then shows it).
macro_rules! solve_defaults {
    ($callback:ident ! ( $($prefix:tt)* )) => {
        $callback! { $($prefix)*
            alpha = 1.0,
            beta = 0.03,
            damping = 1e-6,
            output_damping = None,
            gamma = 1024.0,
            normalize = true,
            method = "auto",
            auto_damping = false,
            tol = 1e-12,
            max_applications = None,
            deterministic = true,
            dense_fallback = true
        }
    };
}
#[cfg_attr(not(feature = "python"), allow(unused_imports))] // the binding is its user
pub(crate) use solve_defaults;

/// The option defaults as written in [`solve_defaults`], with their types.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Defaults {
    pub alpha: f64,
    pub beta: f64,
    pub damping: f64,
    pub output_damping: Option<f64>,
    pub gamma: f64,
    pub normalize: bool,
    pub method: &'static str,
    pub auto_damping: bool,
    pub tol: f64,
    pub max_applications: Option<usize>,
    /// `Par::Seq` inside one solve (see [`SolveOptions::par`]).
    pub deterministic: bool,
    pub dense_fallback: bool,
}

macro_rules! defaults_const {
    ($($name:ident = $value:tt),*) => {
        /// The defaults of the solve options (see [`solve_defaults`]).
        pub const DEFAULTS: Defaults = Defaults { $($name: $value),* };
    };
}
solve_defaults!(defaults_const!());

/// The defaults, with `rank = 0` and `n_pop = NaN`: those two have none, and
/// validation rejects them until the caller sets them ([`SolveOptions::new`]).
impl Default for SolveOptions {
    fn default() -> Self {
        let d = DEFAULTS;
        Self {
            rank: 0,
            n_pop: f64::NAN,
            alpha: d.alpha,
            beta: d.beta,
            damping: d.damping,
            output_damping: d.output_damping,
            gamma: d.gamma,
            normalize: d.normalize,
            method: Method::parse(d.method).expect("the default method is a method"),
            auto_damping: d.auto_damping,
            tol: d.tol,
            max_applications: d.max_applications,
            dense_fallback: d.dense_fallback,
            seed: 0x10_2A_DA,
            par: if d.deterministic { Par::Seq } else { crate::parallel::default_par() },
        }
    }
}

impl SolveOptions {
    /// The defaults for `rank` and `n_pop`.
    pub fn new(rank: usize, n_pop: f64) -> Self {
        Self { rank, n_pop, ..Self::default() }
    }

    /// The options' own rules (SPEC §3, "Inputs are validated before any
    /// work"), those that need no array: the rank against `shape = (n, m)`
    /// when it is given (`Z` is `n × n`, `Ḡ` is `m × n`), else only `r ≥ 1`;
    /// then the scalars. The solve checks its options by this very call
    /// (`validate::validate_module`), so a caller that checks them first gets
    /// the solve's errors, word for word.
    pub fn check(&self, shape: Option<(usize, usize)>) -> Result<()> {
        match shape {
            Some((n, m)) if self.rank < 1 || self.rank >= n.min(m) => {
                return Err(Error::InvalidArgument(format!(
                    "rank must satisfy 1 ≤ r < min(n, m) = min({n}, {m}) = {}, got {}",
                    n.min(m),
                    self.rank
                )));
            }
            None if self.rank < 1 => {
                return Err(Error::InvalidArgument(format!("rank must be ≥ 1, got {}", self.rank)));
            }
            _ => {}
        }
        self.check_scalars()
    }

    fn check_scalars(&self) -> Result<()> {
        let bad = |name: &str, v: f64, need: &str| {
            Err(Error::InvalidArgument(format!(
                "{name} must be {need}, got {v:?}"
            )))
        };
        if !(self.n_pop > 0.0 && self.n_pop.is_finite()) {
            return bad("n_pop", self.n_pop, "a finite number > 0");
        }
        if !self.alpha.is_finite() {
            return bad("alpha", self.alpha, "finite");
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return bad("beta", self.beta, "finite and ≥ 0");
        }
        if !(self.damping >= 0.0 && self.damping.is_finite()) {
            return bad("damping", self.damping, "finite and ≥ 0");
        }
        if let Some(d) = self.output_damping {
            if !(d >= 0.0 && d.is_finite()) {
                return bad("output_damping", d, "finite and ≥ 0");
            }
        }
        if !(self.gamma > 0.0 && self.gamma.is_finite()) {
            return bad("gamma", self.gamma, "finite and > 0");
        }
        if !(self.tol > 0.0 && self.tol < 1.0) {
            return bad("tol", self.tol, "in (0, 1)");
        }
        Ok(())
    }
}
