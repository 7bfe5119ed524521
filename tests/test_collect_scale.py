"""The large-model path on the CPU: the memory planner, the planned float64
device sums (run here on the CPU with ``accumulate_on="device"``), several
passes, collect-and-solve, and the device solver against the SciPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import LLAMA_TARGETS, batches, check_compute_init_on, data, tiny_llama

import lora_da
from lora_da.torch_solve import solve_group_device
from lora_da.pipeline import collect_and_solve
from lora_da.plan import FLUSH_THREADS, STAGE_BYTES, Unit, plan_passes
from lora_da.reference import reference_solve, relative_residual, subspace_sin_theta
from lora_da.synthetic import make_problem


def units(k=6):
    return [Unit(group=f"g{i}", n=64 + 8 * i, modules=((f"g{i}", 32), (f"g{i}.b", 16 * (i + 1)))) for i in range(k)]


# -- the planner --------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=4_000_000))
def test_plan_covers_every_unit_in_order_within_the_budget(extra):
    us = units()
    budget = max(u.device_bytes for u in us) + extra
    plan = plan_passes(us, device_free=10**12, reserve=0, max_device_bytes=budget, host_free=None,
                       max_host_bytes=None, keep_on_host=True)
    assert [u for p in plan.passes for u in p] == us
    assert all(sum(u.device_bytes for u in p) <= budget for p in plan.passes)
    # greedy: no pass could have taken the next pass's first unit
    for p, q in zip(plan.passes, plan.passes[1:]):
        assert sum(u.device_bytes for u in p) + q[0].device_bytes > budget
    assert plan.statistics_bytes == sum(u.host_bytes for u in us)
    # what the host holds: the statistics and, per flush thread, its page-locked staging
    assert plan.host_bytes == plan.statistics_bytes + FLUSH_THREADS * STAGE_BYTES


def test_plan_budget_is_free_memory_less_the_step():
    us = units()
    total = sum(u.device_bytes for u in us)
    one = plan_passes(us, device_free=total + 1000, reserve=1000, max_device_bytes=None, host_free=None,
                      max_host_bytes=None, keep_on_host=True)
    assert len(one.passes) == 1 and one.device_budget == total
    two = plan_passes(us, device_free=total + 1000, reserve=1001, max_device_bytes=None, host_free=None,
                      max_host_bytes=None, keep_on_host=True)
    assert len(two.passes) == 2
    assert "2 passes over the data" in two.describe()


def test_plan_refuses_what_cannot_fit():
    us = units()
    with pytest.raises(lora_da.InvalidArgumentError, match="input group g5 needs"):
        plan_passes(us, device_free=10**12, reserve=0, max_device_bytes=us[-1].device_bytes - 1, host_free=None,
                    max_host_bytes=None, keep_on_host=True)
    with pytest.raises(lora_da.InvalidArgumentError, match="of host memory .* are available"):
        plan_passes(us, device_free=10**12, reserve=0, max_device_bytes=None, host_free=10**12,
                    max_host_bytes=1000, keep_on_host=True)
    with pytest.raises(lora_da.InvalidArgumentError, match="max_device_bytes must be"):
        plan_passes(us, device_free=10**12, reserve=0, max_device_bytes=-1, host_free=None, max_host_bytes=None,
                    keep_on_host=True)


# -- the planned device sums, on the CPU ----------------------------------------------


def assert_close_statistics(a, b, rel):
    assert a.groups() == b.groups() and a.n_samples == b.n_samples
    for n in a.modules:
        for f in ("mean_grad", "input_factor", "output_factor"):
            x, y = getattr(a, f)(n), getattr(b, f)(n)
            assert np.abs(x - y).max() <= rel * np.abs(x).max(), (n, f)


@pytest.mark.parametrize("max_device_bytes,gram_block", [(None, 1024), (40_000, 1024), (None, 12)])
def test_device_sums_match_the_host_accumulators(max_device_bytes, gram_block, monkeypatch):
    """Same float64 model: Gram, Ḡ and y summed as float64 tensors (one pass,
    or one pass per input group when the budget is small; the Gram's lower
    block triangle in one block or in several) against the Rust compensated
    accumulators."""
    monkeypatch.setattr(lora_da.plan, "GRAM_BLOCK", gram_block)
    ids, mask = data()
    host = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False)
    dev = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False,
                                     accumulate_on="device", max_device_bytes=max_device_bytes)
    assert (len(dev.plan.passes) > 1) == (max_device_bytes is not None)
    assert_close_statistics(host, dev, 1e-13)
    for g in host.input_factors:
        assert host.input_factors[g].tokens == dev.input_factors[g].tokens


def test_device_sums_with_label_mask_and_sequence_lowrank():
    ids, mask = data()
    bs = batches(ids, mask, 2)
    for b in bs:
        labels = b["input_ids"].clone()
        labels[b["attention_mask"] == 0] = -100
        labels[:, :3] = -100
        b["labels"] = labels
    kw = dict(token_mask="labels", output_fisher="sequence_lowrank", progress=False)
    host = lora_da.collect_statistics(tiny_llama(), bs, ["q_proj", "down_proj"], **kw)
    dev = lora_da.collect_statistics(tiny_llama(), bs, ["q_proj", "down_proj"], accumulate_on="device", **kw)
    assert_close_statistics(host, dev, 1e-13)
    for n in host.modules:
        u, v = host.output_factors[n].sample_sums(), dev.output_factors[n].sample_sums()
        assert u.shape == v.shape and np.abs(u - v).max() <= 1e-13 * np.abs(u).max()


def test_collect_and_solve_in_passes_matches_the_core():
    """Statistics solved pass by pass on the device (here the CPU) and freed,
    against the Rust core on statistics kept on the host."""
    ids, mask = data()
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
    host = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False)
    ref = lora_da.compute_init(host, cfg, progress=False)
    got = collect_and_solve(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, cfg, progress=False,
                            accumulate_on="device", max_device_bytes=40_000)
    report = got.report
    assert len(report.plan.passes) > 1 and report.solve_seconds > 0 and report.collect_seconds > 0
    assert set(got) == set(ref)
    for n in ref:
        assert subspace_sin_theta(ref[n].result.V, got[n].result.V) <= 1e-8
        assert np.abs(ref[n].B - got[n].B).max() <= 1e-8 * np.abs(ref[n].B).max()
        assert np.abs(ref[n].A - got[n].A).max() <= 1e-8


def test_several_passes_need_a_rereadable_dataloader_and_no_checkpoint(tmp_path):
    ids, mask = data()
    with pytest.raises(lora_da.InvalidArgumentError, match="one-shot iterator"):
        lora_da.collect_statistics(tiny_llama(), iter(batches(ids, mask, 3)), LLAMA_TARGETS, progress=False,
                                   accumulate_on="device", max_device_bytes=40_000)
    with pytest.raises(lora_da.InvalidArgumentError, match="one-pass plan"):
        lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False,
                                   accumulate_on="device", max_device_bytes=40_000,
                                   checkpoint_path=tmp_path / "c.safetensors", checkpoint_every=1)


def test_device_sums_name_a_non_finite_gradient():
    model = tiny_llama()
    target = model.model.layers[1].self_attn.o_proj

    def poison(module, args, out):
        out.register_hook(lambda g: torch.full_like(g, float("nan")))

    target.register_forward_hook(poison)
    ids, mask = data()
    with pytest.raises(lora_da.NonFiniteError, match=r"model\.layers\.1\.self_attn\.o_proj: non-finite output gradient in batch 0"):
        lora_da.collect_statistics(model, batches(ids, mask, 3), ["o_proj"], progress=False, accumulate_on="device")


# -- the device solver ------------------------------------------------------------------


def check_against_reference(p, result, **kw):
    ref = reference_solve(p.Z, p.y, p.G, **kw)
    assert relative_residual(ref.omega, result.V, result.eigenvalues) <= 1e-10
    if ref.gap >= 1e-4 * ref.omega_norm:
        assert subspace_sin_theta(ref.V, result.V) <= 1e-6
        assert np.abs(ref.B - result.B).max() <= 1e-6 * np.abs(ref.B).max()
    assert np.abs(ref.eigenvalues - result.eigenvalues).max() <= 1e-9 * ref.omega_norm
    assert abs(result.sigma / ref.sigma - 1) <= 1e-9
    assert abs(result.c / ref.c - 1) <= 1e-9
    assert result.next_eigenvalue >= ref.next_eigenvalue - 1e-9 * ref.omega_norm  # a Ritz value: an upper bound


def as_torch(p):
    return torch.tensor(p.Z), [torch.tensor(p.y)], [torch.tensor(p.G)]


@settings(max_examples=15, deadline=None)
@given(st.integers(30, 90), st.integers(30, 90), st.sampled_from([1e2, 1e4, 1e6]), st.integers(1, 6),
       st.sampled_from([0.0, 0.03, 1.0]), st.booleans(), st.integers(0, 1000))
def test_device_solve_matches_the_reference(n, m, cond, rank, beta, normalize, seed):
    p = make_problem(n, m, cond=cond, seed=seed)
    kw = dict(rank=rank, n_pop=500.0, beta=beta, normalize=normalize, gamma=16.0)
    (res,) = solve_group_device(*as_torch(p), **kw)
    check_against_reference(p, res, **kw)


def test_device_solve_filtered_subspace_path_at_a_size_krylov_would_matter():
    p = make_problem(300, 200, cond=1e5, seed=1)
    kw = dict(rank=8, n_pop=1000.0)
    (res,) = solve_group_device(*as_torch(p), **kw)
    assert res.method == "chebyshev" and res.residual <= 1e-12
    check_against_reference(p, res, **kw)


def test_device_solve_falls_back_to_dense_and_says_so():
    p = make_problem(600, 400, cond=1e8, seed=1)
    kw = dict(rank=8, n_pop=1000.0)
    (res,) = solve_group_device(*as_torch(p), **kw)
    assert res.method == "dense" and any("fell back to the dense solve" in s for s in res.notes)
    check_against_reference(p, res, **kw)


def test_device_solve_zero_gradient_and_bad_input():
    p = make_problem(40, 30, seed=3)
    Z, ys, _ = as_torch(p)
    (res,) = solve_group_device(Z, ys, [torch.zeros(30, 40, dtype=torch.float64)], rank=3, n_pop=10.0)
    assert res.zero_gradient and np.all(res.B == 0)
    top = np.linalg.eigh(p.Z)[1][:, -3:]
    assert subspace_sin_theta(top, res.V) <= 1e-8
    with pytest.raises(lora_da.NotPositiveDefiniteError, match="auto_damping"):
        solve_group_device(-torch.eye(40, dtype=torch.float64), ys, [torch.tensor(p.G)], rank=3, n_pop=10.0)
    with pytest.raises(lora_da.NonFiniteError):
        solve_group_device(Z, [ys[0] * float("nan")], [torch.tensor(p.G)], rank=3, n_pop=10.0)
    with pytest.raises(lora_da.InvalidArgumentError, match="rank"):
        solve_group_device(Z, ys, [torch.tensor(p.G)], rank=30, n_pop=10.0)


def test_compute_init_on_a_torch_device_matches_the_core():
    check_compute_init_on("cpu")


# -- the host's routes (method "auto" on the CPU) ------------------------------------------


def single(p):
    n, m = p.Z.shape[0], p.y.shape[0]
    f, o = lora_da.InputFactor(n), lora_da.OutputFactor(m)
    f.add_gram(p.Z, 1)
    o.add_sums(p.y, 1)
    o.count_samples(1)
    info = lora_da.ModuleInfo(name="x", in_features=n, out_features=m, kind="linear", input_group="x")
    return lora_da.Statistics(modules={"x": info}, input_factors={"x": f}, output_factors={"x": o},
                              grad_sums={"x": p.G.copy()}, n_samples=1)


@pytest.mark.parametrize("n,m,cond,signal_rank,route", [
    (300, 200, 1e4, 4, "dense"),      # small: LAPACK directly
    (700, 700, 1e2, 8, "krylov"),     # an easy spectrum: Krylov within its budget
    (800, 600, 1e2, 2, "dense"),      # Krylov needs 261 applications, over its budget of 105
])
def test_host_auto_route_and_its_accuracy(n, m, cond, signal_rank, route):
    p = make_problem(n, m, cond=cond, signal_rank=signal_rank, seed=2)
    (init,) = lora_da.compute_init(single(p), lora_da.LoraDAConfig(n_pop=1000.0, rank=8), progress=False).values()
    assert init.result.method == route, init.result.notes
    if n > lora_da.init.HOST_DENSE_BELOW and route == "dense":
        assert "solved by the dense LAPACK route" in init.result.notes[0]
    check_against_reference(p, init.result, rank=8, n_pop=1000.0)


def test_core_without_dense_fallback_returns_its_krylov_result():
    p = make_problem(600, 400, cond=1e8, seed=1)
    r = lora_da.solve(p.Z, p.y, p.G, rank=8, n_pop=1000.0, method="krylov", max_applications=50, dense_fallback=False)
    assert r.method == "krylov" and r.residual > 1e-10 and "no dense fallback asked" in r.notes[0]
    ok = lora_da.solve(p.Z, p.y, p.G, rank=8, n_pop=1000.0, method="krylov", max_applications=50)
    assert ok.method == "dense" and ok.residual <= 1e-10


# -- review round: the classes of defect an independent review found ------------------------


class _Out:
    def __init__(self, logits):
        self.logits = logits


class _Checkpointed(torch.nn.Module):
    """A module called twice per forward, once inside reentrant activation checkpointing
    (its forward runs again during the backward) and once outside it."""

    def __init__(self, routed=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.a, self.b = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.head, self.routed = torch.nn.Linear(16, 50), routed

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        from torch.utils.checkpoint import checkpoint

        h = self.emb(input_ids)
        if self.routed:  # data-dependent routing: `a` is skipped by some batches
            return _Out(self.head(h + (self.a(h) if int(input_ids[0, 0]) % 2 == 0 else self.b(h))))
        h = checkpoint(lambda t: torch.tanh(self.a(t)), h, use_reentrant=True)
        return _Out(self.head(torch.tanh(self.a(h))))


def test_device_path_with_reentrant_checkpointing_matches_the_host():
    """The backward is cut early only where no forward call happens inside it."""
    ids, mask = data()
    host = lora_da.collect_statistics(_Checkpointed(), batches(ids, mask, 3), ["a"], progress=False)
    dev = lora_da.collect_statistics(_Checkpointed(), batches(ids, mask, 3), ["a"], progress=False,
                                     accumulate_on="device")
    assert dev.input_factors["a"].tokens == host.input_factors["a"].tokens
    assert_close_statistics(host, dev, 1e-13)


def test_a_target_skipped_by_a_batch_is_an_error_on_both_paths():
    ids, mask = data()
    ids[:, 0] = torch.tensor([2, 2, 2, 3, 3, 3])  # batch 0 calls `a`, batch 1 does not
    for path in ("host", "device"):
        with pytest.raises(lora_da.LoraDAError, match="module a: no output gradient in batch 1"):
            lora_da.collect_statistics(_Checkpointed(routed=True), batches(ids, mask, 3), ["a"], progress=False,
                                       accumulate_on=path)


def test_several_passes_refuse_a_shuffling_dataloader():
    ids, mask = data()
    dataset = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(len(ids))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(lora_da.InvalidArgumentError, match="other data than pass 1"):
        lora_da.collect_statistics(tiny_llama(), loader, LLAMA_TARGETS, progress=False, accumulate_on="device",
                                   max_device_bytes=40_000)


@pytest.mark.parametrize("path", ["host", "device"])
def test_each_module_gets_its_own_mode_back(path):
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()  # a model may mix modes
    before = {n: m.training for n, m in model.named_modules()}
    ids, mask = data()
    lora_da.collect_statistics(model, batches(ids, mask, 3), ["q_proj"], progress=False, accumulate_on=path)
    assert {n: m.training for n, m in model.named_modules()} == before


@pytest.mark.parametrize("bad", [dict(beta=-1.0), dict(beta=float("nan")), dict(alpha=float("inf")),
                                 dict(output_damping=-1e-3), dict(tol=float("nan")), dict(gamma=0.0)])
def test_every_host_route_validates_the_hyper_parameters(bad):
    """Small inputs take the LAPACK route: it must refuse what the core refuses, with a lora-da error."""
    p = make_problem(60, 40, seed=1)
    for method in ("auto", "krylov"):
        with pytest.raises(lora_da.InvalidArgumentError):
            lora_da.compute_init(single(p), lora_da.LoraDAConfig(n_pop=100.0, rank=4, method=method, **bad),
                                 progress=False)


def test_device_solve_extreme_but_finite_inputs_raise_lora_da_errors():
    p = make_problem(60, 40, seed=1)
    Z = torch.tensor(p.Z)
    # σ underflows: Z and λ scaled up by 1e150
    with pytest.raises(lora_da.NonFiniteError, match="underflowed"):
        solve_group_device(Z * 1e150, [torch.tensor(p.y)], [torch.tensor(p.G)], rank=4, n_pop=100.0, damping=1e144)
    # an all-zero Z with damping 0: auto_damping raises λ to a value whose inverse is finite
    (res,) = solve_group_device(torch.zeros(60, 60, dtype=torch.float64), [torch.tensor(p.y)], [torch.tensor(p.G)],
                                rank=4, n_pop=100.0, damping=0.0, auto_damping=True)
    assert res.damping >= 1e-10 and np.all(np.isfinite(res.B)) and np.all(np.isfinite(res.A))
    for args, kw in [((Z, [torch.tensor(p.y)[None]], [torch.tensor(p.G)]), {}),
                     ((torch.zeros(0, 0, dtype=torch.float64), [torch.tensor(p.y)], [torch.tensor(p.G)]), {}),
                     ((Z, [torch.tensor(p.y)], [torch.tensor(p.G)]), {"rank": 2.0})]:
        with pytest.raises(lora_da.LoraDAError):
            solve_group_device(*args, **{"rank": 4, "n_pop": 100.0, **kw})


def test_device_sums_name_a_non_finite_input_even_when_the_loss_is_finite():
    """The forward hooks' finite flags of the inputs are checked at the end of the batch."""
    model = tiny_llama()

    def poison(module, args):
        x = args[0].clone()
        x[0, 1, 2] = float("nan")
        return (x,)

    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(poison)
    ids, mask = data()
    finite_loss = lambda m, b: torch.nan_to_num(lora_da.collect.default_loss(m, b))  # noqa: E731
    with pytest.raises(lora_da.NonFiniteError, match=r"layers\.1\.mlp\.down_proj: non-finite input activation in batch 0"):
        lora_da.collect_statistics(model, batches(ids, mask, 3), ["down_proj"], progress=False, accumulate_on="device",
                                   loss_fn=finite_loss)


def test_sequence_lowrank_solves_agree_on_every_route():
    """The Woodbury output precisions reach the host routes, the device route and collect_and_solve alike."""
    ids, mask = data()
    kw = dict(output_fisher="sequence_lowrank")
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_proj", "down_proj"], progress=False, **kw)
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0, **kw)
    core = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0, method="krylov", **kw),
                                progress=False)
    from lora_da.reference import lowrank_output_precision

    for got in (core, lora_da.compute_init(stats, cfg, progress=False),
                lora_da.compute_init(stats, cfg, progress=False, device="cpu"),
                collect_and_solve(tiny_llama(), batches(ids, mask, 3), ["q_proj", "down_proj"], cfg, progress=False,
                                  accumulate_on="device")):
        for n in core:
            prec = lowrank_output_precision(stats.output_factors[n].sample_sums(), 1e-6)
            ref = reference_solve(stats.input_factor(n), stats.output_factor(n), stats.mean_grad(n), rank=2,
                                  n_pop=100.0, gamma=4.0, output_precision=prec)
            assert subspace_sin_theta(ref.V, got[n].result.V) <= 1e-8
            assert np.abs(ref.B - got[n].B).max() <= 1e-8 * np.abs(ref.B).max()
