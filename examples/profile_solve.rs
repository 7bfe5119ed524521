//! Rough timing of the solve's parts (development aid): `cargo run --release --example profile_solve -- 1024`.
use faer::{Mat, Par};
use lora_da::eigensolver::{gaussian_block, SymmetricOperator};
use lora_da::guidance::{Guidance, InputCholesky};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(1024);
    let m = n;
    let x = gaussian_block(2 * n, n, 1);
    let mut z = Mat::<f64>::zeros(n, n);
    faer::linalg::matmul::matmul(z.as_mut(), faer::Accum::Replace, x.transpose(), x.as_ref(), 1.0 / (2 * n) as f64, Par::rayon(0));
    let g = gaussian_block(m, n, 2);
    let y: Vec<f64> = (0..m).map(|i| 1e-6 * (1.0 + i as f64)).collect();
    let prec: Vec<f64> = y.iter().map(|v| 1.0 / (v + 1e-6)).collect();
    for par in [Par::Seq, Par::rayon(0)] {
        let t = Instant::now();
        let chol = InputCholesky::new(z.as_ref(), 1e-6, false, par).unwrap();
        println!("{par:?} cholesky {:.3}s", t.elapsed().as_secs_f64());
        let op = Guidance { chol: &chol, mean_grad: g.as_ref(), precision: &prec, alpha: 1.0, beta_c: 1.0 };
        for k in [1, 8, 16, 64] {
            let xb = gaussian_block(n, k, 3);
            let t = Instant::now();
            let reps = 5;
            for _ in 0..reps {
                std::hint::black_box(op.apply(xb.as_ref()));
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            let flops = (4 * n * n * k + 4 * n * m * k) as f64;
            println!("  apply k={k}: {:.4}s  {:.1} GFLOP/s", dt, flops / dt / 1e9);
        }
        let xb = gaussian_block(n, 8, 3);
        let mut w = xb.clone();
        let t = Instant::now();
        for _ in 0..5 { chol.solve_in_place(w.as_mut()); }
        println!("  2 trisolves k=8: {:.4}s", t.elapsed().as_secs_f64() / 5.0);
    }
}
