//! Development aid: faer GEMM throughput for Gram panels. `cargo run --release --example profile_gram`.
use faer::{Accum, Mat, Par};
use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
use lora_da::eigensolver::gaussian_block;
use std::time::Instant;

fn main() {
    let n = 2048;
    for t in [512usize, 2048] {
        let xt = gaussian_block(n, t, 1); // n × t = Xᵀ
        for par in [Par::Seq, Par::rayon(0)] {
            let mut out = Mat::<f64>::zeros(n, n);
            let t0 = Instant::now();
            for _ in 0..3 {
                faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, xt.as_ref(), xt.transpose(), 1.0, par);
            }
            let dt = t0.elapsed().as_secs_f64() / 3.0;
            println!("T={t} {par:?} full gemm {:.1} GFLOP/s", 2.0 * (t * n * n) as f64 / dt / 1e9);
            let t0 = Instant::now();
            for _ in 0..3 {
                tri_matmul(out.as_mut(), BlockStructure::TriangularLower, Accum::Replace, xt.as_ref(), BlockStructure::Rectangular, xt.transpose(), BlockStructure::Rectangular, 1.0, par);
            }
            let dt = t0.elapsed().as_secs_f64() / 3.0;
            println!("T={t} {par:?} lower-tri gemm {:.1} GFLOP/s (syrk-equivalent)", (t * n * n) as f64 / dt / 1e9);
        }
        for w in [96usize, 256] {
            let mut out = Mat::<f64>::zeros(n, w);
            let t0 = Instant::now();
            for _ in 0..3 {
                faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, xt.as_ref(), xt.subrows(0, w).transpose(), 1.0, Par::Seq);
            }
            let dt = t0.elapsed().as_secs_f64() / 3.0;
            println!("T={t} seq panel w={w} {:.1} GFLOP/s", 2.0 * (t * n * w) as f64 / dt / 1e9);
        }
    }
}
