"""Collection on a CUDA device agrees with the CPU path (skipped without a GPU).

On a GPU the statistics are summed on the device in float64 (planned by
`lora_da.plan`) and flushed into the host accumulators; `max_device_bytes=0`
sends the rows to the host and the Rust accumulator instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, batches, data, tiny_llama
from route_cases import (CASE_IDS, CASES, SHARED_CONFIG, SHARED_TARGETS, check_per_module_ranks, check_preserve_output,
                         check_shared_lowrank_solves, check_shared_lowrank_statistics, labeled_batches, run_case,
                         shared_lowrank_brute_force, with_method)

import lora_da

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def close(a, b, rel):
    for n in a.modules:
        for f in ("mean_grad", "input_factor", "output_factor"):
            x, y = getattr(a, f)(n), getattr(b, f)(n)
            assert np.abs(x - y).max() <= rel * np.abs(x).max(), (n, f)


def test_device_and_host_accumulation_agree_on_the_gpu():
    """Same activations (float64 model on the GPU): Gram and Ḡ formed on the
    device vs rows sent to the host's Rust accumulator."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ids, mask = data()
    dev = lora_da.collect_statistics(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False)
    host = lora_da.collect_statistics(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False,
                                      max_device_bytes=0)
    assert dev.groups() == host.groups()
    close(dev, host, 1e-13)


def test_cuda_statistics_match_cpu():
    """CPU and GPU run the model with different kernels (RoPE is computed in
    float32 by transformers), so they agree to float32 rounding."""
    ids, mask = data()
    cpu = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False)
    gpu = lora_da.collect_statistics(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False)
    assert gpu.groups() == cpu.groups()
    close(cpu, gpu, 1e-6)


def test_cuda_bf16_model():
    ids, mask = data()
    ref = lora_da.collect_statistics(tiny_llama(torch.float32), batches(ids, mask, 3), ["down_proj"], progress=False)
    got = lora_da.collect_statistics(tiny_llama(torch.bfloat16).cuda(), batches(ids, mask, 3), ["down_proj"], progress=False)
    for n in ref.modules:
        for f in ("mean_grad", "input_factor", "output_factor"):
            a, b = getattr(ref, f)(n), getattr(got, f)(n)
            assert np.all(np.isfinite(b)) and np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(a)


def test_device_solve_on_cuda_matches_the_core():
    """The GPU solve (two streams at once) against the Rust core on the same statistics."""
    from helpers import check_compute_init_on

    check_compute_init_on("cuda")


def test_collect_and_solve_on_cuda_in_passes():
    from lora_da.pipeline import collect_and_solve
    from lora_da.reference import subspace_sin_theta

    torch.backends.cuda.matmul.allow_tf32 = False
    ids, mask = data()
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
    host = lora_da.collect_statistics(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False,
                                      max_device_bytes=0)
    ref = lora_da.compute_init(host, cfg, progress=False)
    got = collect_and_solve(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, cfg, progress=False,
                            max_device_bytes=40_000)
    assert len(got.report.plan.passes) > 1
    for n in ref:
        assert subspace_sin_theta(ref[n].result.V, got[n].result.V) <= 1e-8


# -- the option × route audit on the CUDA route (route_cases.py, tests/COVERAGE.md) ----------


@pytest.mark.parametrize("method", ["auto", "dense"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_option_on_the_cuda_route_matches_the_reference(case, method):
    """The host's cases (test_routes.py) solved on the GPU, float64, against the SciPy reference."""
    from lora_da.results import DeviceSolveResult

    def route(stats, cfg):
        inits = lora_da.compute_init(stats, with_method(cfg, method), progress=False, device="cuda")
        assert all(isinstance(i.result, DeviceSolveResult) for i in inits.values())
        return inits

    run_case(case, route)


@pytest.mark.parametrize("method", ["auto", "dense"])
def test_per_module_ranks_on_the_cuda_route_match_the_reference(method):
    """``LoraDAConfig.ranks`` on the GPU: two modules of one Z at r = 4 and 2 (test_routes' case)."""
    check_per_module_ranks(lambda stats, cfg: lora_da.compute_init(stats, with_method(cfg, method), progress=False,
                                                                   device="cuda"))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_preserve_output_on_cuda_keeps_the_base_logits(use_rslora):
    """The PEFT path with the model on the GPU (statistics and solve there)."""
    check_preserve_output(tiny_llama, ["q_proj", "k_proj", "up_proj"], {}, use_rslora, "cuda")


def test_sequence_lowrank_of_shared_inputs_on_cuda():
    """Collected on the GPU against per-sample autograd on the CPU (to float32 rounding,
    as test_cuda_statistics_match_cpu); solved on the GPU from the CPU's statistics
    against the reference, each module of a shared input with its own u_s."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_model = tiny_llama()
    brute = shared_lowrank_brute_force(cpu_model)
    gpu = lora_da.collect_statistics(tiny_llama().cuda(), labeled_batches("cuda"), SHARED_TARGETS, token_mask="labels",
                                     output_fisher="sequence_lowrank", progress=False)
    check_shared_lowrank_statistics(gpu, brute, rel=1e-6)
    host = lora_da.collect_statistics(cpu_model, labeled_batches(), SHARED_TARGETS, token_mask="labels",
                                      output_fisher="sequence_lowrank", progress=False)
    check_shared_lowrank_solves(lora_da.compute_init(host, SHARED_CONFIG, progress=False, device="cuda"), brute)


def test_every_collection_option_at_once_on_cuda(tmp_path):
    """test_routes' collection options with the model on the GPU (no checkpoint: see
    DEVICE_CHECKPOINT_BUG there), to float32 rounding as test_cuda_statistics_match_cpu."""
    from route_cases import check_collection_options

    torch.backends.cuda.matmul.allow_tf32 = False
    check_collection_options("cuda", "auto", tmp_path, rel=1e-6, checkpoint=False)


@pytest.mark.parametrize("block", [None, 12])
def test_compute_init_on_cuda_reads_a_streamed_file_as_it_reads_memory(tmp_path, monkeypatch, block):
    """From a memory-mapped statistics file the Ḡ go to the GPU through a page-locked
    buffer read from the file, and each packed Gram triangle is unpacked on the GPU (in
    column blocks of ``GRAM_BLOCK``, 12 to have several): the same inits, bit for bit, as
    from the statistics in memory."""
    import lora_da.plan

    if block is not None:
        monkeypatch.setattr(lora_da.plan, "GRAM_BLOCK", block)
    ids, mask = data()
    path = tmp_path / "s.safetensors"
    mapped = lora_da.collect_statistics(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False,
                                        out=str(path))
    loaded = lora_da.Statistics.load(path)
    cfg = lora_da.LoraDAConfig(rank=2, n_pop=100)
    a = lora_da.compute_init(mapped, cfg, progress=False, device="cuda")
    b = lora_da.compute_init(loaded, cfg, progress=False, device="cuda")
    for n in loaded.modules:
        assert np.array_equal(a[n].result.A, b[n].result.A) and np.array_equal(a[n].result.B, b[n].result.B), n


# -- the planner's byte counts against the CUDA allocator's own counters -----


def test_unit_device_bytes_are_what_the_device_sums_allocate():
    """``Unit.device_bytes`` against ``torch.cuda.memory_allocated``'s growth when a pass's
    float64 sums are allocated (the allocator rounds each tensor up to 512 bytes), for n
    below, above and at twice the Gram's block size."""
    from helpers import device_sums_of, sums_units

    units = sums_units()
    dev = torch.device("cuda")
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    sums = device_sums_of(units, dev)
    torch.cuda.synchronize(dev)
    held = torch.cuda.memory_allocated(dev) - before
    count = sum(len(b) for b in sums.gram.values()) + len(sums.grad) + len(sums.sumsq) + len(sums.tokens) + len(
        sums.gram_tokens)
    want = sum(u.device_bytes for u in units)
    assert want <= held <= want + 512 * count, (held, want)
    del sums


@pytest.mark.parametrize("method", ["auto", "dense"])
def test_unit_solve_bytes_bound_the_peak_of_a_cuda_solve(method):
    """``Unit.solve_bytes`` (``dense_solve_bytes`` for the device's full eigensolver) against
    ``torch.cuda.max_memory_allocated`` during one group's solve (after a first solve has made
    cuBLAS's and cuSOLVER's lasting work spaces), counted as the plan counts it: above the
    group's sums (its Gram's block triangle and Ḡ), from the symmetric Z on. At least that
    peak, at most twice it. A problem whose filtered iteration converges (its gap 0.37‖Ω‖)."""
    from lora_da.plan import Unit, gram_bytes
    from lora_da.synthetic import make_problem
    from lora_da.torch_solve import solve_group_device

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    n, m = 2048, 512
    p = make_problem(n, m, cond=1e4, seed=1, signal_rank=8, signal=10.0)
    ys, Gs = [torch.tensor(p.y, device=dev)], [torch.tensor(p.G, device=dev)]
    unit = Unit("g", n, (("g", m),))

    def solve():
        Z = torch.tensor(p.Z, device=dev)  # what unit_statistics builds from the sums' block triangle
        return solve_group_device(Z, ys, Gs, rank=8, n_pop=100.0, method=method)

    solve()
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    (res,) = solve()
    torch.cuda.synchronize(dev)
    # the sums the plan already counts: the block triangle that Z replaces (Ḡ is in ``base``)
    peak = torch.cuda.max_memory_allocated(dev) - base - gram_bytes(n)
    assert res.method == ("chebyshev" if method == "auto" else "dense"), res.notes
    need = unit.solve_bytes if method == "auto" else unit.dense_solve_bytes
    print(f"solve peak {peak / 2**20:.1f} MiB, planned {need / 2**20:.1f} MiB, n² = {8 * n * n / 2**20:.1f} MiB")
    assert peak > 2 * 8 * n * n  # the n × n work space is seen
    assert peak <= need <= 2 * peak, (peak, need)


def test_passes_over_upper_layers_are_planned_with_less_of_the_step():
    """On CUDA the probe measures the step with its graph from the last input group too, and a
    plan of several passes holds back less for the later ones; the statistics equal the host
    path's (every pass's graph starts at its own first module)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ids, mask = data()
    host = lora_da.collect_statistics(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False,
                                      max_device_bytes=0)
    units_bytes = 8 * (32 * 32 + 40 * 32 * 2) * 2  # about two layers' worth of sums a pass
    dev = lora_da.collect_statistics(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False,
                                     max_device_bytes=units_bytes)
    plan = dev.plan
    assert len(plan.passes) > 1 and plan.cuts
    # run from the top down: the top pass holds the loss's end of the step, the cut ones their own layers
    assert plan.reserves[0] > min(plan.reserves[1:]), plan.reserves
    close(host, dev, 1e-12)


# -- collect_statistics(out=...) and LoraDAConfig.token_mask on CUDA (tests/COVERAGE.md) ----------


def test_statistics_streamed_to_disk_on_cuda_equal_the_in_memory_ones(tmp_path, monkeypatch):
    """``out=`` on a GPU, the Gram in several blocks (``GRAM_BLOCK`` patched to 12 rows, as
    test_memory_plan does on the CPU): the file against the in-memory collection and the host rows."""
    import lora_da.plan

    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.setattr(lora_da.plan, "GRAM_BLOCK", 12)
    ids, mask = data()
    path = tmp_path / "stats.safetensors"
    st = lora_da.collect_statistics(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False, out=path)
    mem = lora_da.collect_statistics(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False)
    host = lora_da.collect_statistics(tiny_llama().cuda(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False,
                                      max_device_bytes=0)
    close(mem, st, 1e-13)
    close(host, st, 1e-13)
    close(host, lora_da.Statistics.load(path), 1e-13)


def test_collect_and_solve_on_cuda_takes_the_configs_token_mask():
    """``LoraDAConfig(token_mask="labels")`` through collect_and_solve on a GPU against the
    label-masked statistics solved by the Rust core (test_routes' host-path test, on CUDA)."""
    from lora_da.pipeline import collect_and_solve
    from lora_da.reference import subspace_sin_theta

    torch.backends.cuda.matmul.allow_tf32 = False
    targets = ["q_proj", "down_proj"]
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0, token_mask="labels")
    stats = lora_da.collect_statistics(tiny_llama().cuda(), labeled_batches("cuda"), targets, token_mask="labels",
                                       progress=False, max_device_bytes=0)
    want = lora_da.compute_init(stats, with_method(cfg, "dense"), progress=False)
    got = collect_and_solve(tiny_llama().cuda(), labeled_batches("cuda"), targets, cfg, progress=False)
    other = lora_da.compute_init(lora_da.collect_statistics(tiny_llama().cuda(), labeled_batches("cuda"), targets,
                                                            progress=False, max_device_bytes=0),
                                 with_method(cfg, "dense"), progress=False)
    assert set(got) == set(want)
    for n in want:
        assert subspace_sin_theta(want[n].result.V, got[n].result.V) <= 1e-8
        assert np.abs(want[n].B - got[n].B).max() <= 1e-8 * np.abs(want[n].B).max()
        assert np.abs(other[n].B - want[n].B).max() > 1e-3 * np.abs(want[n].B).max()  # the mask matters here


@pytest.mark.parametrize("tol", [1e-4, 1e-13])
def test_the_cuda_route_meets_the_configs_tol_and_never_less_than_the_contract(tol):
    """test_routes' tol test on the GPU's filtered subspace iteration: a tol of 1e-13 is met by
    its own residual, one of 1e-4 still meets the contract; against the reference either way."""
    from route_cases import check_route, tol_problem_statistics

    from lora_da._core import CONTRACT_RESIDUAL

    stats = tol_problem_statistics()
    cfg = lora_da.LoraDAConfig(n_pop=100.0, rank=4, tol=tol)
    inits = lora_da.compute_init(stats, cfg, progress=False, device="cuda")
    res = inits["q"].result
    assert res.residual <= min(tol, CONTRACT_RESIDUAL), (res.method, res.residual, res.notes)
    if tol < CONTRACT_RESIDUAL:
        assert res.method == "chebyshev", res.notes
    check_route(inits, stats, cfg, cfg.damping)

