"""The second round of tests that would catch a wrong answer: the
promises the first round left untested, each against an independent
computation (exact float64 sums, the SciPy reference, per-sample autograd).

* `Statistics.merge` (SPEC §2, data-parallel runs): two shards merged are one
  collection over all the data.
* every solve route × every option of `LoraDAConfig` that reaches the solve
  (route_cases.py; the CUDA route runs the same cases in test_gpu.py).
* `preserve_output` under rsLoRA and with `lora_alpha ≠ r` (SPEC §3).
* `sequence_lowrank` on modules that share their input (q/k/v, gate/up).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import batches, brute_force, check_against_reference, data, tiny_gpt2, tiny_llama
from route_cases import (CASE_IDS, CASES, SHARED_CONFIG, SHARED_TARGETS, check_collection_options,
                         check_per_module_ranks, check_preserve_output, check_route, tol_problem_statistics,
                         check_shared_lowrank_solves, check_shared_lowrank_statistics, config_of, group_statistics,
                         labeled_batches, run_case, shared_lowrank_brute_force, with_method)

import lora_da
from lora_da._core import SolveResult
from lora_da.results import DeviceSolveResult
from lora_da.torch_solve import solve_group_device
from lora_da.init import HOST_DENSE_BELOW
from lora_da.pipeline import collect_and_solve
from lora_da.reference import lowrank_output_precision, reference_solve

# -- Statistics.merge: exact sums -----------------------------------------------------------

# Integer-valued activations and gradients: every product and sum below is an
# integer far under 2^53, so float64 computes it exactly in any order and the
# merged statistics must equal the one-shot ones bit for bit.
GROUPS = {"x": 5, "w": 4}  # input group → n
MODULES = {"a": ("x", 4), "b": ("x", 3), "c": ("w", 6)}  # name → (group, m); a and b share x


def integer_samples(seed=0, count=7):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = int(rng.integers(1, 5))
        x = {g: rng.integers(-3, 4, size=(length, n)).astype(np.float64) for g, n in GROUPS.items()}
        g = {name: rng.integers(-3, 4, size=(length, m)).astype(np.float64) for name, (_, m) in MODULES.items()}
        out.append((x, g))
    return out


def statistics_of(samples, per_sample=True) -> lora_da.Statistics:
    """What a collection over ``samples`` holds, built through the core's own accumulators."""
    inputs = {g: lora_da.InputFactor(n) for g, n in GROUPS.items()}
    outputs = {name: lora_da.OutputFactor(m, per_sample=per_sample) for name, (_, m) in MODULES.items()}
    grads = {name: np.zeros((m, GROUPS[g])) for name, (g, m) in MODULES.items()}
    for x, g in samples:
        for grp, rows in x.items():
            inputs[grp].add(rows)
        for name, (grp, _) in MODULES.items():
            outputs[name].add(g[name], [len(g[name])] if per_sample else None)
            if not per_sample:
                outputs[name].count_samples(1)
            grads[name] += g[name].T @ x[grp]
    modules = {name: lora_da.ModuleInfo(name=name, in_features=GROUPS[grp], out_features=m, kind="linear",
                                        input_group=grp) for name, (grp, m) in MODULES.items()}
    return lora_da.Statistics(modules=modules, input_factors=inputs, output_factors=outputs, grad_sums=grads,
                              n_samples=len(samples), config={"token_mask": "attention", "output_fisher":
                                                              "sequence_lowrank" if per_sample else "diagonal"})


def test_merge_of_two_shards_is_the_exact_sum():
    samples = integer_samples()
    merged = statistics_of(samples[:3])
    merged.merge(statistics_of(samples[3:]))
    assert merged.n_samples == len(samples) == 7
    for grp in GROUPS:
        rows = np.concatenate([x[grp] for x, _ in samples])
        f = merged.input_factors[grp]
        assert f.tokens == len(rows)
        exact = rows.T @ rows
        # the packed lower triangle, column by column (= the upper one row by row)
        np.testing.assert_array_equal(f.packed(), exact[np.triu_indices(len(exact))])
        np.testing.assert_allclose(f.mean(), exact / len(rows), rtol=3e-16, atol=0)  # Σ · (1/T): one more rounding
    for name, (grp, m) in MODULES.items():
        g_rows = np.concatenate([g[name] for _, g in samples])
        o = merged.output_factors[name]
        assert o.tokens == len(g_rows) and o.samples == len(samples)
        np.testing.assert_array_equal(o.sum(), (g_rows**2).sum(0))
        # u_s in sample order: the first shard's samples, then the second's
        np.testing.assert_array_equal(o.sample_sums(), np.array([g[name].sum(0) for _, g in samples]))
        grad = sum(g[name].T @ x[grp] for x, g in samples)
        np.testing.assert_array_equal(merged.grad_sums[name], grad)
        # Ḡ divides by the samples of both shards (a merge that kept only its own
        # count would double it here)
        np.testing.assert_allclose(merged.mean_grad(name), grad / 7, rtol=3e-16, atol=0)
        np.testing.assert_allclose(merged.output_factor(name), (g_rows**2).sum(0) / len(g_rows), rtol=3e-16, atol=0)


def test_merge_equals_one_collection_bit_for_bit():
    samples = integer_samples(seed=1, count=9)
    for per_sample in (False, True):
        merged = statistics_of(samples[:4], per_sample)
        merged.merge(statistics_of(samples[4:], per_sample))
        whole = statistics_of(samples, per_sample)
        assert merged.n_samples == whole.n_samples
        for grp in GROUPS:
            a, b = merged.input_factors[grp], whole.input_factors[grp]
            assert a.tokens == b.tokens
            np.testing.assert_array_equal(a.packed(), b.packed())
        for name in MODULES:
            a, b = merged.output_factors[name], whole.output_factors[name]
            assert (a.tokens, a.samples) == (b.tokens, b.samples)
            np.testing.assert_array_equal(a.sum(), b.sum())
            if per_sample:
                np.testing.assert_array_equal(a.sample_sums(), b.sample_sums())
            np.testing.assert_array_equal(merged.mean_grad(name), whole.mean_grad(name))


def test_merged_collections_match_per_sample_autograd():
    """Two real collections (q/k/v share an input) merged, against the brute force over all six samples."""
    model = tiny_llama()
    ids, mask = data()
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    first = lora_da.collect_statistics(model, batches(ids[:2], mask[:2], 2), targets, progress=False)
    second = lora_da.collect_statistics(model, batches(ids[2:], mask[2:], 2), targets, progress=False)
    first.merge(second)
    brute, T = brute_force(model, ids, mask, list(first.modules))
    assert first.n_samples == 6
    for name, (G, Z, y) in brute.items():
        assert first.output_factors[name].tokens == T
        assert first.input_factors[first.modules[name].input_group].tokens == T
        np.testing.assert_allclose(first.mean_grad(name), G, rtol=0, atol=1e-10 * np.abs(G).max())
        np.testing.assert_allclose(first.input_factor(name), Z, rtol=0, atol=1e-10 * np.abs(Z).max())
        np.testing.assert_allclose(first.output_factor(name), y, rtol=0, atol=1e-10 * np.abs(y).max())


def _snapshot(stats):
    return (stats.n_samples,
            {g: (f.tokens, f.packed_raw()[0].copy()) for g, f in stats.input_factors.items()},
            {n: (o.tokens, o.samples, o.sum().copy()) for n, o in stats.output_factors.items()},
            {n: g.copy() for n, g in stats.grad_sums.items()})


def _assert_unchanged(before, stats):
    after = _snapshot(stats)
    assert before[0] == after[0]
    for g, (t, s) in before[1].items():
        assert after[1][g][0] == t
        np.testing.assert_array_equal(after[1][g][1], s)
    for n, (t, k, s) in before[2].items():
        assert after[2][n][:2] == (t, k)
        np.testing.assert_array_equal(after[2][n][2], s)
    for n, g in before[3].items():
        np.testing.assert_array_equal(after[3][n], g)


def test_merge_refuses_other_statistics_and_changes_nothing():
    samples = integer_samples(seed=2)
    mine = statistics_of(samples[:3])
    before = _snapshot(mine)
    # other modules
    other = statistics_of(samples[3:])
    other.modules["c"] = lora_da.ModuleInfo(name="c", in_features=4, out_features=6, kind="conv1d", input_group="w")
    with pytest.raises(lora_da.ShapeError, match="different modules"):
        mine.merge(other)
    _assert_unchanged(before, mine)
    # a shard collected without the per-sample sums: u_s of its samples would be missing
    with pytest.raises(lora_da.LoraDAError, match="output_fisher"):
        mine.merge(statistics_of(samples[3:], per_sample=False))
    _assert_unchanged(before, mine)
    # another token mask: Z and y of the two shards average different tokens
    other = statistics_of(samples[3:])
    other.config["token_mask"] = "labels"
    with pytest.raises(lora_da.LoraDAError, match="token_mask"):
        mine.merge(other)
    _assert_unchanged(before, mine)


def test_add_gram_reads_the_lower_triangle_only():
    """``InputFactor.add_gram`` takes a Gram whose lower triangle is filled (what
    a device forms block by block, SPEC §2): what lies above the diagonal,
    garbage or NaN, is never read, and the sums are the rows' exact ones."""
    rng = np.random.default_rng(3)
    n, T = 9, 13
    x = rng.integers(-4, 5, size=(T, n)).astype(np.float64)
    S = x.T @ x
    rows = lora_da.InputFactor(n)
    rows.add(x)
    for above in (7.0, np.nan):
        f = lora_da.InputFactor(n)
        f.add_gram(np.tril(S) + np.triu(np.full((n, n), above), 1), T)
        assert f.tokens == T
        np.testing.assert_array_equal(f.packed(), rows.packed())
        np.testing.assert_array_equal(f.packed(), S[np.triu_indices(n)])


# -- every route × every option (route_cases.py) ---------------------------------------------


def _core(method):
    def route(stats, cfg):
        inits = lora_da.compute_init(stats, with_method(cfg, method), progress=False)
        assert all(isinstance(i.result, SolveResult) for i in inits.values())  # the Rust core
        if method == "dense":
            assert all(i.result.method == "dense" for i in inits.values())
        return inits
    return route


def _host_lapack(stats, cfg):
    """``method="auto"`` at n ≤ 512: the torch/LAPACK dense route on the host."""
    assert stats.modules["q"].in_features <= HOST_DENSE_BELOW
    inits = lora_da.compute_init(stats, with_method(cfg, "auto"), progress=False)
    assert all(isinstance(i.result, DeviceSolveResult) and i.result.method == "dense" for i in inits.values())
    return inits


def _torch_cpu(method):
    def route(stats, cfg):
        inits = lora_da.compute_init(stats, with_method(cfg, method), progress=False, device="cpu")
        assert all(isinstance(i.result, DeviceSolveResult) for i in inits.values())
        for i in inits.values():
            # the filtered subspace iteration, or its dense fallback with a note saying so
            fell_back = any("fell back to the dense" in note for note in i.result.notes)
            assert i.result.method == ("dense" if method == "dense" or fell_back else "chebyshev"), i.result.notes
        return inits
    return route


HOST_ROUTES = {
    "core_dense": _core("dense"),
    "core_krylov": _core("krylov"),
    "host_lapack": _host_lapack,
    "torch_cpu": _torch_cpu("auto"),
    "torch_cpu_dense": _torch_cpu("dense"),
}


@pytest.mark.parametrize("route", list(HOST_ROUTES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_option_on_every_host_route_matches_the_reference(case, route):
    run_case(case, HOST_ROUTES[route])


@pytest.mark.parametrize("route", list(HOST_ROUTES))
def test_per_module_ranks_on_every_host_route_match_the_reference(route):
    check_per_module_ranks(HOST_ROUTES[route])


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("auto_damping", "tol")], ids=["auto_damping", "tol"])
def test_routes_agree_on_the_raised_damping_and_meet_the_tolerance(case):
    """auto_damping raises λ by the same rule on every route; a tighter ``tol``
    is met by the iterative routes' own residual (not only the 1e-10 contract)."""
    stats = case[2]()
    cfg = config_of(case, stats)
    results = {route: fn(stats, cfg) for route, fn in HOST_ROUTES.items()}
    damping = {route: {n: i.result.damping for n, i in inits.items()} for route, inits in results.items()}
    assert len({tuple(sorted(d.items())) for d in damping.values()}) == 1, damping
    if case[0] == "tol":
        for route in ("core_krylov", "torch_cpu"):
            for init in results[route].values():
                assert init.result.method in ("krylov", "chebyshev") and init.result.residual <= cfg.tol, route


@pytest.mark.parametrize("tol", [1e-4, 1e-13])
@pytest.mark.parametrize("route", ["core_krylov", "torch_cpu"])
def test_the_iterative_routes_meet_the_configs_tol_and_never_less_than_the_contract(route, tol):
    """``LoraDAConfig.tol`` is the iterative eigensolver's stopping residual (SPEC §5):
    tighter than the contract it is met by the route's own residual; looser, the result
    still meets the contract (1e-10). Either way it agrees with the reference."""
    from lora_da._core import CONTRACT_RESIDUAL, SOLVE_DEFAULTS

    stats = tol_problem_statistics()
    cfg = lora_da.LoraDAConfig(n_pop=100.0, rank=4, tol=tol)
    inits = HOST_ROUTES[route](stats, cfg)
    res = inits["q"].result
    assert res.residual <= min(tol, CONTRACT_RESIDUAL), (res.method, res.residual, res.notes)
    if tol < CONTRACT_RESIDUAL:
        assert res.method in ("krylov", "chebyshev"), res.notes
        # a looser tol stops the same route short of this one: the problem tells them apart
        for loose_tol in (CONTRACT_RESIDUAL, SOLVE_DEFAULTS["tol"])[:2 if route == "torch_cpu" else 1]:
            loose = HOST_ROUTES[route](stats, lora_da.LoraDAConfig(n_pop=100.0, rank=4, tol=loose_tol))
            assert loose["q"].result.residual > tol, (loose_tol, loose["q"].result.residual)
    check_route(inits, stats, cfg, cfg.damping)


def test_the_krylov_route_of_auto_above_the_dense_cut_over_honours_every_option():
    """``method="auto"`` at n > 512: the Rust core's Krylov within its budget, every option at once."""
    p = lora_da.synthetic.make_problem(HOST_DENSE_BELOW + 8, 300, cond=1e2, signal_rank=8, seed=2)
    f, o = lora_da.InputFactor(p.n), lora_da.OutputFactor(p.m, per_sample=True)
    f.add_gram(p.Z, 1)
    o.add_sums(p.y, 1, np.random.default_rng(0).standard_normal((10, p.m)) * np.sqrt(p.y)[None, :])
    info = lora_da.ModuleInfo(name="q", in_features=p.n, out_features=p.m, kind="linear", input_group="x")
    stats = lora_da.Statistics(modules={"q": info}, input_factors={"x": f}, output_factors={"q": o},
                               grad_sums={"q": p.G.copy()}, n_samples=1)
    cfg = lora_da.LoraDAConfig(n_pop=1000.0, rank=4, alpha=0.5, beta=0.05, damping=1e-5,
                               output_damping=float(p.y.max()), gamma=5.0, normalize=False, tol=1e-11,
                               deterministic=False, output_fisher="sequence_lowrank")
    inits = lora_da.compute_init(stats, cfg, progress=False)
    assert isinstance(inits["q"].result, SolveResult) and inits["q"].result.method == "krylov", inits["q"].result.notes
    check_route(inits, stats, cfg, cfg.damping)


def test_per_module_ranks_on_the_krylov_route_of_auto_above_the_dense_cut_over():
    """``LoraDAConfig.ranks`` at n > 512: two modules of one Z at r = 4 and 2, each by the Rust
    core's Krylov (one call per r), against the reference at its own r."""
    n = HOST_DENSE_BELOW + 8
    p = lora_da.synthetic.make_problem(n, 300, cond=1e2, signal_rank=8, seed=2)
    other = lora_da.synthetic.make_problem(n, 200, cond=1e2, signal_rank=8, seed=3)
    f = lora_da.InputFactor(n)
    f.add_gram(p.Z, 1)
    modules, outputs, grads = {}, {}, {}
    for name, (y, G) in {"q": (p.y, p.G), "k": (other.y, other.G)}.items():
        o = lora_da.OutputFactor(len(y))
        o.add_sums(y, 1)
        o.count_samples(1)
        outputs[name], grads[name] = o, G.copy()
        modules[name] = lora_da.ModuleInfo(name=name, in_features=n, out_features=len(y), kind="linear", input_group="x")
    stats = lora_da.Statistics(modules=modules, input_factors={"x": f}, output_factors=outputs, grad_sums=grads,
                               n_samples=1)
    cfg = lora_da.LoraDAConfig(n_pop=1000.0, rank=3, ranks={"q": 4, "k": 2}, gamma=5.0)
    inits = lora_da.compute_init(stats, cfg, progress=False)
    for name, r in (("q", 4), ("k", 2)):
        res = inits[name].result
        assert isinstance(res, SolveResult) and res.method == "krylov", res.notes
        assert res.A.shape == (r, n)
        opts = dict(rank=r, n_pop=1000.0, damping=cfg.damping, gamma=5.0)
        ref = reference_solve(p.Z, stats.output_factor(name), stats.mean_grad(name), **opts)
        check_against_reference(res, ref, p.Z, opts)


def test_solve_group_device_takes_every_option_directly():
    """The torch route called as a library function (as ``compute_init``'s host
    route calls it), output_damping and sequence_lowrank precisions per module."""
    stats = group_statistics()
    Z = torch.from_numpy(stats.input_factor("q"))
    names = list(stats.modules)
    lam_y = float(stats.output_factor("q").max())
    precisions = [None, lowrank_output_precision(stats.output_factors["k"].sample_sums(), lam_y)]
    kw = dict(rank=3, n_pop=37.0, alpha=0.5, beta=0.5, damping=1e-4, output_damping=lam_y, gamma=5.0,
              normalize=False, tol=1e-11)
    results = solve_group_device(Z, [torch.from_numpy(stats.output_factor(n)) for n in names],
                                 [torch.from_numpy(stats.mean_grad(n)) for n in names], names=names,
                                 output_precisions=precisions, **kw)

    for name, res, prec in zip(names, results, precisions):
        opts = {k: v for k, v in kw.items() if k != "tol"}
        ref = reference_solve(stats.input_factor(name), stats.output_factor(name), stats.mean_grad(name),
                              output_precision=prec, **opts)
        check_against_reference(res, ref, stats.input_factor(name), opts)
        # and not what the default λ_y gives
        wrong = reference_solve(stats.input_factor(name), stats.output_factor(name), stats.mean_grad(name),
                                **{**opts, "output_damping": None})
        assert abs(res.c - wrong.c) > 1e-3 * wrong.c


# -- preserve_output under rsLoRA and lora_alpha ≠ r --------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("model_fn,targets,kw", [(tiny_llama, ["q_proj", "k_proj", "up_proj"], {}),
                                                 (tiny_gpt2, ["c_attn"], {"fan_in_fan_out": True})])
@pytest.mark.parametrize("method", ["auto", "krylov"])
def test_preserve_output_keeps_the_base_logits_under_every_scaling(use_rslora, model_fn, targets, kw, method):
    check_preserve_output(model_fn, targets, kw, use_rslora, "cpu", method)


# -- sequence_lowrank on modules that share their input --------------------------------------


@pytest.fixture(scope="module", params=["host", "device"])
def shared_lowrank(request):
    """Collected by the host accumulators and by the planned device sums (on the CPU)."""
    model = tiny_llama()
    stats = lora_da.collect_statistics(model, labeled_batches(), SHARED_TARGETS, token_mask="labels",
                                       output_fisher="sequence_lowrank", progress=False, accumulate_on=request.param)
    return stats, shared_lowrank_brute_force(model)


def test_sequence_lowrank_sums_of_shared_inputs_match_per_sample_autograd(shared_lowrank):
    check_shared_lowrank_statistics(*shared_lowrank, rel=1e-10)


@pytest.mark.parametrize("route", ["core_krylov", "core_dense", "host_lapack", "torch_cpu", "collect_and_solve"])
def test_sequence_lowrank_gives_each_module_of_a_shared_input_its_own_precision(shared_lowrank, route):
    stats, brute = shared_lowrank
    cfg = SHARED_CONFIG
    solve = {"core_krylov": lambda: lora_da.compute_init(stats, with_method(cfg, "krylov"), progress=False),
             "core_dense": lambda: lora_da.compute_init(stats, with_method(cfg, "dense"), progress=False),
             "host_lapack": lambda: lora_da.compute_init(stats, cfg, progress=False),
             "torch_cpu": lambda: lora_da.compute_init(stats, cfg, progress=False, device="cpu"),
             "collect_and_solve": lambda: collect_and_solve(tiny_llama(), labeled_batches(), SHARED_TARGETS, cfg,
                                                            progress=False, accumulate_on="device")}[route]
    check_shared_lowrank_solves(solve(), brute)


# -- LoraDAConfig.token_mask on the host path of collect_and_solve and initialize_lora_da_weights -----

MASK_TARGETS = ["q_proj", "down_proj"]
MASK_CONFIG = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0, token_mask="labels")


def _labels_statistics():
    """The label-masked statistics (first three tokens and the padding at -100), collected
    directly: test_collect checks them against per-sample autograd with that mask."""
    return lora_da.collect_statistics(tiny_llama(), labeled_batches(), MASK_TARGETS, token_mask="labels",
                                      progress=False)


def _assert_same_inits(got, want):
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_array_equal(got[n].A, want[n].A)
        np.testing.assert_array_equal(got[n].B, want[n].B)


@pytest.mark.parametrize("method", ["auto", "krylov"])  # the host's LAPACK route at n ≤ 512, the Rust core
def test_collect_and_solve_on_the_host_path_takes_the_configs_token_mask(method):
    """On the CPU (host accumulators) collect_and_solve collects, then solves: the config's
    token_mask must reach the collection. Same statistics, same solve: the same bits."""
    cfg = with_method(MASK_CONFIG, method)
    stats = _labels_statistics()
    want = lora_da.compute_init(stats, cfg, progress=False)
    got = collect_and_solve(tiny_llama(), labeled_batches(), MASK_TARGETS, cfg, progress=False)
    assert all(isinstance(i.result, SolveResult if method == "krylov" else DeviceSolveResult) for i in got.values())
    _assert_same_inits(got, want)
    # not vacuous: the attention mask counts other tokens and gives other weights
    other = lora_da.compute_init(lora_da.collect_statistics(tiny_llama(), labeled_batches(), MASK_TARGETS,
                                                            progress=False), cfg, progress=False)
    assert all(np.abs(other[n].B - want[n].B).max() > 1e-3 * np.abs(want[n].B).max() for n in want)


def test_initialize_lora_da_weights_takes_the_configs_token_mask():
    """The PEFT entry point (statistics of the base layers, adapter disabled) on the host path:
    each layer's solve and the weights written are those of the label-masked statistics."""
    from peft import LoraConfig, get_peft_model

    want = lora_da.compute_init(_labels_statistics(), MASK_CONFIG, progress=False)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=MASK_TARGETS))
    results = lora_da.initialize_lora_da_weights(peft_model, labeled_batches(), lora_da_config=MASK_CONFIG,
                                                 progress=False)
    _assert_same_inits(results, want)
    base = peft_model.get_base_model()
    for n in want:
        layer = base.get_submodule(n)
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), want[n].A.astype(np.float32))
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), want[n].B.astype(np.float32))


# ("device", True): the planned device sums flush at every checkpoint and again at the end
# of the pass; a checkpoint on the last batch leaves that final flush no u_s to pass.
@pytest.mark.parametrize("accumulate_on,checkpoint", [("host", True), ("device", False), ("device", True)])
def test_every_collection_option_at_once_matches_per_sample_autograd(accumulate_on, checkpoint, tmp_path):
    check_collection_options("cpu", accumulate_on, tmp_path, rel=1e-10, checkpoint=checkpoint)


def test_an_output_precision_of_the_wrong_length_is_a_shape_error_on_every_route():
    """As the core says it (ShapeError naming the module), not as a failed solve on extreme values."""
    stats = group_statistics()
    Z, names = stats.input_factor("q"), list(stats.modules)
    ys, Gs = [stats.output_factor(n) for n in names], [stats.mean_grad(n) for n in names]
    wrong = [np.ones(len(ys[1])), np.ones(len(ys[1]))]  # q's has k's width
    with pytest.raises(lora_da.ShapeError, match="q: output precision has 24 entries"):
        lora_da.solve_shared(Z, ys, Gs, rank=3, n_pop=37.0, names=names, output_precisions=wrong)
    with pytest.raises(lora_da.ShapeError, match="module q: .*output precision has 24 entries"):
        solve_group_device(torch.from_numpy(Z), [torch.from_numpy(y) for y in ys], [torch.from_numpy(G) for G in Gs],
                           rank=3, n_pop=37.0, names=names, output_precisions=wrong)
