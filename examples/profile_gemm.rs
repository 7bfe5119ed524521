//! Development aid: faer f64 GEMM throughput by layout. `cargo run --release --example profile_gemm`.
use faer::{Accum, Mat, Par};
use lora_da::eigensolver::gaussian_block;
use std::time::Instant;

fn main() {
    let n = 2048;
    let a = gaussian_block(n, n, 1);
    let b = gaussian_block(n, n, 2);
    let bt = b.transpose().to_owned();
    for par in [Par::Seq, Par::rayon(0)] {
        for (name, rhs) in [("col-major rhs", b.as_ref()), ("row-major rhs", bt.transpose())] {
            let mut c = Mat::<f64>::zeros(n, n);
            faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, a.as_ref(), rhs, 1.0, par);
            let t = Instant::now();
            for _ in 0..3 {
                faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, a.as_ref(), rhs, 1.0, par);
            }
            let dt = t.elapsed().as_secs_f64() / 3.0;
            println!("{par:?} {name}: {:.1} GFLOP/s", 2.0 * (n * n * n) as f64 / dt / 1e9);
        }
    }
}
