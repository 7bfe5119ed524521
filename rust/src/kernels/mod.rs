//! Kernels of the matrix-free solve, grouped by what they compute (SPEC §4):
//!
//! * [`simd`] — which vector instructions this CPU offers, asked once;
//! * [`dot`] — `a · x` as dot products with the rows of `a` (SIMD micro-kernels);
//! * [`products`] — the tall products `aᵀ p`, and `Ḡ`'s two products in one pass;
//! * [`transpose`] — copies with contiguous rows;
//! * [`scan`] — one-pass validation summaries (finite, largest entry, asymmetry).
//!
//! Why kernels of their own: the Krylov solve multiplies big `n × n` and
//! `m × n` matrices by blocks of about `r + 1` vectors. General GEMMs pack
//! the big operand first, which for so few columns reads and writes it once
//! more than the product itself needs;
//! here the big operand is read once, in place, as rows that are contiguous in
//! memory, and each output entry is a dot product with a column of the block.
//!
//! Every output entry is computed by the same sequence of operations however
//! the rows are split among threads, so results are bit-identical for any
//! thread count.

mod simd;
pub mod dot;
pub mod products;
pub mod scan;
pub mod transpose;

pub use dot::row_dot;
pub use products::{normal_product, transposed_product};
pub use scan::{lower_copy_checked, scan, Scan};
pub use transpose::{transpose, RowsView};
