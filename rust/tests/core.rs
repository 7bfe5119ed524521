//! Pure-Rust tests of the core (no Python): accumulators against naive sums,
//! the eigensolver against a known spectrum, Krylov against the dense path.

use faer::{Mat, MatRef, Par};
use lora_da::eigensolver::{block_krylov, gaussian_block, KrylovOptions, SymmetricOperator};
use lora_da::factors::{lowrank_output_precision, DenseRows, InputFactor, OutputFactor};
use lora_da::solve::{solve, Method, SolveOptions};
use lora_da::Error;

fn rows(t: usize, n: usize, seed: u64) -> Vec<f64> {
    let g = gaussian_block(t, n, seed);
    (0..t)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| g[(i, j)] as f32 as f64)
        .collect()
}

#[test]
fn input_factor_matches_naive_sum_and_merges() {
    let (t, n) = (3000, 7);
    let x = rows(t, n, 1);
    let mut f = InputFactor::new(n).unwrap();
    f.add_rows(&DenseRows {
        data: &x[..1000 * n],
        cols: n,
    })
    .unwrap();
    let mut g = InputFactor::new(n).unwrap();
    g.add_rows(&DenseRows {
        data: &x[1000 * n..],
        cols: n,
    })
    .unwrap();
    f.merge(&g).unwrap();
    assert_eq!(f.tokens(), t as u64);
    let z = f.mean().unwrap();
    for i in 0..n {
        for j in 0..n {
            let naive: f64 = (0..t).map(|k| x[k * n + i] * x[k * n + j]).sum::<f64>() / t as f64;
            assert!(
                (z[(i, j)] - naive).abs() <= 1e-12 * naive.abs().max(1.0),
                "({i},{j})"
            );
        }
    }
}

#[test]
fn row_major_mean_is_the_dense_mean_bit_for_bit() {
    // sizes around the transpose's 64-wide tiles: one partial tile, exact tiles, a ragged edge
    for n in [1, 5, 63, 64, 65, 130] {
        let x = rows(40, n, n as u64);
        let mut f = InputFactor::new(n).unwrap();
        f.add_rows(&DenseRows { data: &x, cols: n }).unwrap();
        let dense = f.mean().unwrap();
        let flat = f.mean_row_major().unwrap();
        assert_eq!(flat.len(), n * n);
        for i in 0..n {
            for j in 0..n {
                assert_eq!(flat[i * n + j].to_bits(), dense[(i, j)].to_bits(), "n {n} ({i},{j})");
            }
        }
    }
    assert!(matches!(InputFactor::new(3).unwrap().mean_row_major(), Err(Error::InvalidArgument(_))));
}

#[test]
fn non_finite_rows_leave_the_factor_unchanged() {
    let n = 3;
    let mut f = InputFactor::new(n).unwrap();
    f.add_rows(&DenseRows {
        data: &[1.0, 2.0, 3.0],
        cols: n,
    })
    .unwrap();
    let before = f.clone();
    let err = f
        .add_rows(&DenseRows {
            data: &[1.0, f64::NAN, 3.0],
            cols: n,
        })
        .unwrap_err();
    assert!(matches!(err, Error::NonFinite(_)));
    assert_eq!(f, before);
    assert!(matches!(
        f.add_rows(&DenseRows {
            data: &[1.0, 2.0],
            cols: 2
        }),
        Err(Error::Shape(_))
    ));
}

#[test]
fn output_factor_sums_and_sample_sums() {
    let mut o = OutputFactor::new(2, true).unwrap();
    o.add_rows(
        &DenseRows {
            data: &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            cols: 2,
        },
        Some(&[2, 1]),
    )
    .unwrap();
    assert_eq!(o.sum(), vec![35.0, 56.0]);
    assert_eq!(o.sample_sums().unwrap(), &[4.0, 6.0, 5.0, 6.0]);
    assert_eq!(o.samples(), 2);
    assert!(o
        .add_rows(
            &DenseRows {
                data: &[1.0, 2.0],
                cols: 2
            },
            None
        )
        .is_err());
}

#[test]
fn woodbury_precision_matches_direct_inverse_on_a_small_case() {
    // U = [[1, 0], [0, 2]] (two samples, m = 2): diag((λI + UUᵀ/2)⁻¹) = 1/(λ + 1/2), 1/(λ + 2)
    let p = lowrank_output_precision(&[1.0, 0.0, 0.0, 2.0], 2, 0.5).unwrap();
    assert!(
        (p[0] - 1.0).abs() < 1e-14 && (p[1] - 1.0 / 2.5).abs() < 1e-14,
        "{p:?}"
    );
}

struct Diagonal(Vec<f64>);
impl SymmetricOperator for Diagonal {
    fn dim(&self) -> usize {
        self.0.len()
    }
    fn apply(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        Mat::from_fn(x.nrows(), x.ncols(), |i, j| self.0[i] * x[(i, j)])
    }
}

#[test]
fn block_krylov_finds_both_extremes() {
    // eigenvalues −5, −4, ..., then a spread up to 1e3
    let n = 400;
    let d: Vec<f64> = (0..n)
        .map(|i| {
            if i < 5 {
                -5.0 + i as f64
            } else {
                10f64.powf(3.0 * i as f64 / n as f64)
            }
        })
        .collect();
    let op = Diagonal(d.clone());
    let opts = KrylovOptions {
        nev: 3,
        extra: 1,
        block: 8,
        max_basis: 64,
        tol: 1e-12,
        gap_rel: 0.0,
        loose_tol: 1e-8,
        max_applications: 4000,
        seed: 1,
        start: None,
        largest: false,
        aux_tol: 1.0,
        par: faer::Par::Seq,
    };
    let res = block_krylov(&op, &opts).unwrap();
    assert!(res.converged);
    for (k, v) in res.values.iter().enumerate() {
        assert!((v - (-5.0 + k as f64)).abs() < 1e-6, "{:?}", res.values);
    }
    let opts = KrylovOptions {
        largest: true,
        nev: 1,
        extra: 0,
        ..opts
    };
    let top = block_krylov(&op, &opts).unwrap();
    assert!((top.values[0] - d[n - 1]).abs() <= 1e-9 * d[n - 1]);
}

fn problem(n: usize, m: usize) -> (Mat<f64>, Vec<f64>, Mat<f64>) {
    let x = gaussian_block(3 * n, n, 7);
    let z = Mat::from_fn(n, n, |i, j| {
        (0..3 * n).map(|k| x[(k, i)] * x[(k, j)]).sum::<f64>() / (3 * n) as f64
    });
    let y: Vec<f64> = (0..m)
        .map(|i| 1e-5 * (1.0 + (i % 7) as f64).powi(3))
        .collect();
    let g = gaussian_block(m, n, 8);
    (z, y, Mat::from_fn(m, n, |i, j| g[(i, j)] * 1e-3))
}

#[test]
fn krylov_agrees_with_dense() {
    let (z, y, g) = problem(220, 150);
    let mut o = SolveOptions::new(6, 1000.0);
    o.method = Method::Krylov;
    let k = solve(z.as_ref(), &y, g.as_ref(), &o).unwrap();
    o.method = Method::Dense;
    let d = solve(z.as_ref(), &y, g.as_ref(), &o).unwrap();
    assert_eq!(k.method, Method::Krylov, "{:?}", k.notes);
    assert!(k.residual <= 1e-10 && d.residual <= 1e-12);
    let scale = d.omega_norm;
    for (a, b) in k.eigenvalues.iter().zip(&d.eigenvalues) {
        assert!((a - b).abs() <= 1e-9 * scale);
    }
    assert!((k.sigma - d.sigma).abs() <= 1e-10 * d.sigma);
    // same subspace: ‖V_k − V_d (V_dᵀ V_k)‖ small
    let proj = d.v.transpose() * &k.v;
    let diff = &k.v - &d.v * &proj;
    assert!(diff.norm_l2() < 1e-6);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let (z, y, g) = problem(20, 10);
    let o = SolveOptions::new(10, 100.0);
    assert!(matches!(
        solve(z.as_ref(), &y, g.as_ref(), &o),
        Err(Error::InvalidArgument(_))
    ));
    let o = SolveOptions::new(3, 0.0);
    assert!(matches!(
        solve(z.as_ref(), &y, g.as_ref(), &o),
        Err(Error::InvalidArgument(_))
    ));
    let o = SolveOptions::new(3, 10.0);
    assert!(matches!(
        solve(z.as_ref(), &y[..5], g.as_ref(), &o),
        Err(Error::Shape(_))
    ));
    let mut bad = z.clone();
    bad[(1, 1)] = f64::INFINITY;
    assert!(matches!(
        solve(bad.as_ref(), &y, g.as_ref(), &o),
        Err(Error::NonFinite(_))
    ));
    let neg = Mat::from_fn(20, 20, |i, j| if i == j { -1.0 } else { 0.0 });
    assert!(matches!(
        solve(neg.as_ref(), &y, g.as_ref(), &o),
        Err(Error::NotPositiveDefinite { pivot: Some(0), .. })
    ));
}

/// Issue 10: extreme but finite scales give the exact scaled answer or an
/// error naming the quantity float64 cannot hold, never NaN or a panic.
#[test]
fn extreme_scales_are_exact_answers_or_named_errors() {
    use lora_da::pow2::{exponent, ldexp};
    assert_eq!(exponent(5e-324), -1074);
    assert_eq!(exponent(2.2250738585072014e-308), -1022);
    assert_eq!(exponent(3.0), 1);
    assert_eq!(exponent(f64::MAX), 1023);
    assert_eq!(ldexp(1.0, -1074), 5e-324);
    assert_eq!(ldexp(5e-324, 1074), 1.0);
    assert_eq!(ldexp(f64::MAX, -2000), ldexp(ldexp(f64::MAX, -1000), -1000));

    let (z, y, g) = problem(40, 30);
    for method in [Method::Dense, Method::Krylov] {
        // Ḡ·2^k solves like Ḡ with N_pop·2^2k (normalize): same Ω, c, A, B; σ·2^k.
        // Powers of two make every step exact, so the match is to rounding.
        for k in [-700i32, -500, 500] {
            // N_pop·2^-k keeps c (∝ 2^-2k / N_pop) within float64.
            let n_pop = ldexp(1000.0, -k.min(0));
            let mut o = SolveOptions::new(4, n_pop);
            o.method = method;
            let gs = Mat::from_fn(30, 40, |i, j| ldexp(g[(i, j)], k));
            let scaled = solve(z.as_ref(), &y, gs.as_ref(), &o).unwrap();
            o.n_pop = ldexp(n_pop, 2 * k);
            let base = solve(z.as_ref(), &y, g.as_ref(), &o).unwrap();
            assert!((scaled.sigma - ldexp(base.sigma, k)).abs() <= 1e-12 * scaled.sigma);
            assert!((scaled.c - base.c).abs() <= 1e-12 * base.c);
            for (a, b) in scaled.eigenvalues.iter().zip(&base.eigenvalues) {
                assert!((a - b).abs() <= 1e-12 * base.omega_norm);
            }
            let diff = &scaled.b - &base.b;
            assert!(diff.norm_l2() <= 1e-9 * base.b.norm_l2());
        }
        // Ḡ·2^-1000 with N_pop = 1000: c ≈ c₀·2^2000 is beyond float64.
        let mut o = SolveOptions::new(4, 1000.0);
        o.method = method;
        let gs = Mat::from_fn(30, 40, |i, j| ldexp(g[(i, j)], -1000));
        match solve(z.as_ref(), &y, gs.as_ref(), &o) {
            Err(Error::NonFinite(m)) => assert!(m.contains("result c "), "{m}"),
            other => panic!("expected a NonFinite error naming c, got {other:?}"),
        }
        // α of 1e308: Ω = 1e308 (−Δ̂Δ̂ᵀ + …), finite.
        o.alpha = 1e308;
        let r = solve(z.as_ref(), &y, g.as_ref(), &o).unwrap();
        assert!(r.eigenvalues.iter().all(|v| v.is_finite() && *v < -1e300), "{:?}", r.eigenvalues);
    }
}

#[test]
fn huge_sizes_and_wrapping_counts_are_errors() {
    assert!(matches!(InputFactor::new(1 << 40), Err(Error::OutOfMemory(_))));
    assert!(matches!(InputFactor::new((1 << 32) + 1), Err(Error::OutOfMemory(_))));
    assert!(matches!(OutputFactor::new(1 << 62, false), Err(Error::OutOfMemory(_))));
    let mut f = OutputFactor::new(2, true).unwrap();
    let g = [1.0, 2.0, 3.0, 4.0];
    f.add_rows(&DenseRows { data: &g, cols: 2 }, Some(&[1, 1])).unwrap();
    let before = f.clone();
    // Sums to 2 modulo 2^64: must be refused before anything is updated.
    assert!(matches!(
        f.add_rows(&DenseRows { data: &g, cols: 2 }, Some(&[usize::MAX, 3])),
        Err(Error::Shape(_))
    ));
    assert_eq!(f, before);
    f.count_samples(0).unwrap();
    let mut c = OutputFactor::new(2, false).unwrap();
    c.count_samples(u64::MAX).unwrap();
    assert!(matches!(c.count_samples(1), Err(Error::InvalidArgument(_))));
    assert_eq!(c.samples(), u64::MAX);
}

/// `row_dot` against faer's GEMM, for every register-block shape and both
/// operand layouts, sequential and parallel (bit-identical to each other).
#[test]
fn row_dot_matches_gemm_in_every_shape() {
    use lora_da::kernels::{row_dot, transpose};
    for (m, n, k) in [
        (1, 1, 1),
        (7, 5, 3),
        (50, 517, 9),
        (131, 300, 17),
        (200, 1031, 8),
    ] {
        let a = gaussian_block(m, n, 11);
        let at = transpose(a.as_ref(), Par::Seq); // column-major aᵀ: its transpose has contiguous rows
        let x = gaussian_block(n, k, 12);
        let mut want = Mat::<f64>::zeros(m, k);
        faer::linalg::matmul::matmul(
            want.as_mut(),
            faer::Accum::Replace,
            a.as_ref(),
            x.as_ref(),
            1.0,
            faer::Par::Seq,
        );
        let mut seq = Mat::<f64>::from_fn(m, k, |i, j| (i + j) as f64);
        let base = seq.clone();
        row_dot(
            at.as_ref().transpose(),
            x.as_ref(),
            seq.as_mut(),
            -0.5,
            true,
            Par::Seq,
        );
        let mut par = base.clone();
        row_dot(
            at.as_ref().transpose(),
            x.as_ref(),
            par.as_mut(),
            -0.5,
            true,
            lora_da::parallel::kernel_par(),
        );
        assert_eq!(seq, par, "thread count changed bits at ({m},{n},{k})");
        let expect = &base - &want * faer::Scale(0.5);
        let err = (&seq - &expect).norm_max() / expect.norm_max();
        assert!(err < 1e-14, "({m},{n},{k}): {err:e}");
    }
}

/// The blocked Cholesky and the two triangular solves against faer's.
#[test]
fn blocked_cholesky_and_solves_match_faer() {
    use lora_da::cholesky::{cholesky, Triangular};
    for n in [1, 5, 128, 129, 300] {
        let a = gaussian_block(n, n + 3, 21);
        let mut z = Mat::<f64>::zeros(n, n);
        faer::linalg::matmul::matmul(
            z.as_mut(),
            faer::Accum::Replace,
            a.as_ref(),
            a.transpose(),
            1.0,
            faer::Par::Seq,
        );
        let lambda = 1e-3;
        let ours = cholesky(z.as_ref(), lambda, lora_da::parallel::kernel_par()).expect("positive definite");
        let zl = Mat::<f64>::from_fn(n, n, |i, j| z[(i, j)] + if i == j { lambda } else { 0.0 });
        let theirs = zl.llt(faer::Side::Lower).unwrap().L().to_owned();
        let err = (&ours.as_ref().to_owned() - &theirs).norm_max() / theirs.norm_max();
        assert!(err < 1e-12, "n = {n}: {err:e}");
        assert_eq!(
            ours.as_ref().to_owned(),
            cholesky(z.as_ref(), lambda, Par::Seq)
                .unwrap()
                .as_ref()
                .to_owned()
        );
        let tri = Triangular::new(ours);
        let b = gaussian_block(n, 9, 22);
        // Each substitution against faer's, and bit-identical with one thread.
        let l = tri.l().to_owned();
        for lower in [true, false] {
            let mut want = b.clone();
            let mut par = b.clone();
            let mut seq = b.clone();
            // Rows of X apart in memory (a transposed view) and columns laid
            // out backwards (a reversed view) take the copy path.
            let mut strided = b.transpose().to_owned();
            let mut reversed = b.clone();
            if lower {
                faer::linalg::triangular_solve::solve_lower_triangular_in_place(l.as_ref(), want.as_mut(), faer::Par::Seq);
                tri.solve_lower(par.as_mut(), lora_da::parallel::kernel_par());
                tri.solve_lower(seq.as_mut(), Par::Seq);
                tri.solve_lower(strided.as_mut().transpose_mut(), lora_da::parallel::kernel_par());
                tri.solve_lower(reversed.as_mut().reverse_cols_mut(), lora_da::parallel::kernel_par());
            } else {
                faer::linalg::triangular_solve::solve_upper_triangular_in_place(l.transpose(), want.as_mut(), faer::Par::Seq);
                tri.solve_upper(par.as_mut(), lora_da::parallel::kernel_par());
                tri.solve_upper(seq.as_mut(), Par::Seq);
                tri.solve_upper(strided.as_mut().transpose_mut(), lora_da::parallel::kernel_par());
                tri.solve_upper(reversed.as_mut().reverse_cols_mut(), lora_da::parallel::kernel_par());
            }
            let err = (&par - &want).norm_max() / want.norm_max().max(1.0);
            assert!(err < 1e-10, "n = {n}, lower = {lower}: {err:e}");
            assert_eq!(par, seq, "n = {n}, lower = {lower}: thread count changed the bits");
            // More threads split the block into more column groups.
            for threads in [3, 4, 7] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut other = b.clone();
                pool.install(|| {
                    if lower {
                        tri.solve_lower(other.as_mut(), lora_da::parallel::kernel_par())
                    } else {
                        tri.solve_upper(other.as_mut(), lora_da::parallel::kernel_par())
                    }
                });
                assert_eq!(par, other, "n = {n}, lower = {lower}: {threads} threads changed the bits");
            }
            assert_eq!(par, strided.transpose().to_owned(), "n = {n}, lower = {lower}: layout changed the bits");
            assert_eq!(par, reversed, "n = {n}, lower = {lower}: reversed columns changed the bits");
        }
        let mut x = b.clone();
        tri.solve_lower(x.as_mut(), lora_da::parallel::kernel_par());
        tri.solve_upper(x.as_mut(), lora_da::parallel::kernel_par());
        let mut back = Mat::<f64>::zeros(n, 9);
        faer::linalg::matmul::matmul(
            back.as_mut(),
            faer::Accum::Replace,
            zl.as_ref(),
            x.as_ref(),
            1.0,
            faer::Par::Seq,
        );
        let res = (&back - &b).norm_max() / b.norm_max();
        assert!(res < 1e-10, "n = {n}: residual {res:e}");
    }
    // Not positive definite: the failing pivot, not NaN.
    let mut z = Mat::<f64>::identity(200, 200);
    z[(150, 150)] = -1.0;
    assert_eq!(cholesky(z.as_ref(), 0.0, lora_da::parallel::kernel_par()).err().map(|p| p.index), Some(150));
}

/// `scan` finds non-finite values, the largest magnitude and the asymmetry
/// in either memory layout.
#[test]
fn scan_summarises_any_layout() {
    use lora_da::kernels::scan;
    let n = 97;
    let mut z = Mat::<f64>::from_fn(n, n, |i, j| ((i * j) % 7) as f64 - 3.0);
    let s = scan(z.as_ref(), true, lora_da::parallel::kernel_par());
    assert!(s.finite && s.max_abs == 3.0 && s.max_asym == 0.0);
    z[(90, 3)] += 0.25;
    for view in [z.as_ref(), z.transpose()] {
        let s = scan(view, true, lora_da::parallel::kernel_par());
        assert_eq!(s.max_asym, 0.25);
    }
    z[(5, 80)] = f64::NAN;
    assert!(!scan(z.transpose(), false, Par::Seq).finite);
}

/// The Cholesky's working copy: exactly the lower triangle (zeros above),
/// with the same summary as `scan`, from either layout and thread count.
#[test]
fn checked_lower_copy_is_the_lower_triangle_and_its_scan() {
    use lora_da::kernels::{lower_copy_checked, scan};
    for n in [1, 31, 32, 33, 97] {
        let mut z = Mat::<f64>::from_fn(n, n, |i, j| ((i * j) % 7) as f64 - 3.0 + 0.5 * (i + j) as f64);
        if n > 20 {
            z[(n - 1, 3)] += 0.25;
            z[(2, n - 5)] = -1e3;
        }
        for view in [z.as_ref(), z.transpose()] {
            for par in [lora_da::parallel::kernel_par(), Par::Seq] {
                let (copy, s) = lower_copy_checked(view, par);
                let want = Mat::<f64>::from_fn(n, n, |i, j| if i >= j { view[(i, j)] } else { 0.0 });
                assert_eq!(copy.as_ref().to_owned(), want, "n = {n}");
                let t = scan(view, true, Par::Seq);
                assert_eq!((s.finite, s.max_abs, s.max_asym), (t.finite, t.max_abs, t.max_asym), "n = {n}");
            }
        }
        if n > 1 {
            z[(n - 1, 0)] = f64::INFINITY;
            assert!(!lower_copy_checked(z.as_ref(), lora_da::parallel::kernel_par()).1.finite);
            z[(n - 1, 0)] = 0.0;
            z[(0, n - 1)] = f64::NAN;
            assert!(!lower_copy_checked(z.as_ref(), lora_da::parallel::kernel_par()).1.finite);
        }
    }
}

/// The one-pass `Ḡ` products against plain GEMMs, bit-identical for any
/// thread count (the row partition depends only on `m`).
#[test]
fn normal_and_transposed_products_match_gemm() {
    use lora_da::kernels::{normal_product, transposed_product};
    for (m, n, k) in [(1, 1, 1), (7, 5, 3), (300, 129, 9), (700, 64, 2), (5000, 40, 5)] {
        // Rows of `a` contiguous: the transpose of a column-major matrix.
        let at = gaussian_block(n, m, 31);
        let a = at.transpose();
        let x = gaussian_block(n, k, 32);
        let d: Vec<f64> = (0..m).map(|i| 0.5 + (i % 7) as f64).collect();
        let mut want_s = Mat::<f64>::zeros(m, k);
        faer::linalg::matmul::matmul(want_s.as_mut(), faer::Accum::Replace, a, x.as_ref(), 1.0, faer::Par::Seq);
        let ds = Mat::<f64>::from_fn(m, k, |i, j| d[i] * want_s[(i, j)]);
        let mut want_u = Mat::<f64>::zeros(n, k);
        faer::linalg::matmul::matmul(want_u.as_mut(), faer::Accum::Replace, a.transpose(), ds.as_ref(), 1.0, faer::Par::Seq);
        let mut results = Vec::new();
        for par in [lora_da::parallel::kernel_par(), Par::Seq] {
            let mut s = Mat::<f64>::zeros(m, k);
            let mut u = Mat::<f64>::zeros(n, k);
            normal_product(a, x.as_ref(), &d, s.as_mut(), u.as_mut(), par);
            let es = (&s - &want_s).norm_max() / want_s.norm_max();
            let eu = (&u - &want_u).norm_max() / want_u.norm_max();
            assert!(es < 1e-13 && eu < 1e-13, "({m}, {n}, {k}): {es:e} {eu:e}");
            let mut v = Mat::<f64>::zeros(n, k);
            transposed_product(a, ds.as_ref(), v.as_mut(), par);
            let ev = (&v - &want_u).norm_max() / want_u.norm_max();
            assert!(ev < 1e-13, "({m}, {n}, {k}): {ev:e}");
            results.push((s, u, v));
        }
        assert!(results[0] == results[1], "({m}, {n}, {k}): thread count changed the bits");
    }
}
