"""From a model and its calibration data to every module's initialization
(SPEC §2–3, §7): the orchestration above the collection (:mod:`lora_da.collect`)
and the solves (:mod:`lora_da.init`). :func:`compute_init` solves kept
statistics, spread over the ranks of a process group when asked;
:func:`collect_and_solve` collects and solves pass by pass without keeping them."""

from __future__ import annotations

import time

from lora_da.collect.passes import collect_on_device
from lora_da.collect.run import Run, accumulates_on_host, collect_statistics, host_fallback
from lora_da.distributed import active_group, check_same_options, owners, share_inits, solve_cost
from lora_da.errors import DeviceTooSmallError, InvalidArgumentError
from lora_da.init import LoraDAConfig, check_rank, on_streams, output_precisions, solve_on_device_or_host, solve_statistics
from lora_da.memory import out_of_memory
from lora_da.memory import release as _release
from lora_da.quality import check_zero_gradients, check_zero_statistics, warn_poor
from lora_da.results import Inits, ModuleInit, RunReport
from lora_da.statistics import Statistics


def compute_init(
    stats: Statistics, config: LoraDAConfig, *, progress: bool = True, modules=None, device=None,
    across_ranks: bool = False,
) -> Inits:
    """Solve every module (SPEC §3); modules sharing ``Z`` share one Cholesky
    (``config.rank`` None means the published 8).

    ``device=None`` solves on the host with the Rust core, groups in parallel
    over the cores; a torch device (``"cuda"``) solves there in float64 with
    :mod:`lora_da.torch_solve`, largest groups first, uploading one group at a time.

    ``across_ranks=True`` (every rank of an initialized ``torch.distributed``
    group must call it, with the same statistics) spreads the input groups
    over the ranks, largest first, and gathers the results: every rank
    returns all modules, each computed once, with the same bits everywhere."""
    check_zero_statistics(stats, modules)  # no gradient at all: refused before any solve, on every rank alike
    group = active_group(across_ranks)
    if group is not None:
        config = config.with_rank()
        all_groups = stats.groups()
        wanted = set(stats.modules) if modules is None else set(modules)
        costs = {g: solve_cost(stats.modules[names[0]].in_features, [stats.modules[n].out_features for n in names],
                               max(config.rank_of(n) for n in names))
                 for g, names in all_groups.items() if any(n in wanted for n in names)}
        import torch.distributed as dist

        me = dist.get_rank(group)
        mine = [n for g, r in owners(costs, group).items() if r == me for n in all_groups[g] if n in wanted]
        try:
            local = solve_statistics(stats, config, progress=progress, modules=mine, device=device) if mine else {}
        except Exception as e:  # raised on every rank by share_inits, not only here
            local = e
        shared = share_inits(local, group)
        inits = Inits({n: shared[n] for n in stats.modules if n in shared})
    else:
        inits = Inits(solve_statistics(stats, config, progress=progress, modules=modules, device=device))
    check_zero_gradients(inits)  # the modules whose Ḡ alone is zero, from the solves' own flags
    return inits


def collect_and_solve(model, dataloader, target_modules, config: LoraDAConfig, *, loss_fn=None, progress: bool = True,
                      max_samples=None, max_device_bytes=None, max_host_bytes=None, accumulate_on: str = "auto",
                      checkpoint_path=None, checkpoint_every=None, resume: bool = True,
                      reduce_across_ranks: bool = True) -> Inits:
    """Statistics and solves in one go, without keeping the statistics (SPEC §2–3).

    On a GPU the planner's passes each end with their modules solved on the
    device and their sums freed, so a model whose statistics exceed the
    device and the host (a 7B model's are ~95 GB) still runs on one GPU.
    With a checkpoint, or on the host path (also where no device plan fits,
    with ``accumulate_on="auto"``: a warning says so), the statistics are
    collected first (:func:`lora_da.collect_statistics`) and then solved.

    Under ``torch.distributed`` (more than one rank, ``reduce_across_ranks``)
    each rank passes its shard; the statistics are summed over the ranks,
    the solves spread over them, and every rank returns the same modules
    with the same bits (see :func:`compute_init`'s ``across_ranks``)."""

    config = config.with_rank()
    device = next(model.parameters()).device
    group = active_group(reduce_across_ranks)
    if group is not None:  # each rank solves its share with its own settings: they must be the same
        check_same_options(dict(target_modules=target_modules, loss_fn=loss_fn, accumulate_on=accumulate_on,
                                checkpoint=checkpoint_path is not None, **config.to_dict()), group,
                           "collect_and_solve")
    def via_statistics(accumulate_on: str) -> Inits:
        """The statistics first (:func:`collect_statistics`), then their solves."""
        t0 = time.perf_counter()
        stats = collect_statistics(model, dataloader, target_modules, loss_fn=loss_fn, token_mask=config.token_mask,
                                   output_fisher=config.output_fisher, max_samples=max_samples,
                                   max_device_bytes=max_device_bytes, max_host_bytes=max_host_bytes,
                                   checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
                                   progress=progress, accumulate_on=accumulate_on,
                                   reduce_across_ranks=reduce_across_ranks)
        t1 = time.perf_counter()
        inits = compute_init(stats, config, progress=progress, device=None if device.type == "cpu" else device,
                             across_ranks=group is not None)
        inits.report = RunReport(plan=stats.plan, collect_seconds=t1 - t0, solve_seconds=time.perf_counter() - t1)
        return inits

    if checkpoint_path is not None or accumulates_on_host(device, max_device_bytes, accumulate_on):
        return via_statistics(accumulate_on)
    run = Run.start(model, dataloader, target_modules, loss_fn=loss_fn, token_mask=config.token_mask,
                     output_fisher=config.output_fisher, max_samples=max_samples, checkpoint_path=None,
                     checkpoint_every=None, resume=False, progress=progress)
    check_rank(config, {name: (t.n, t.m) for name, t in run.targets.items()})
    collection = run
    inits: dict[str, ModuleInit] = {}

    timings = {"reduce": 0.0, "solve": 0.0, "gather": 0.0}
    if group is not None:
        import torch.distributed as dist

        load = [0.0] * dist.get_world_size(group)  # carried over the passes
    failed: list[Exception] = []

    def solve_pass(sums, n_samples: int) -> None:
        t0 = time.perf_counter()
        units = sums.units
        if group is not None:
            costs = {u.group: solve_cost(u.n, [m for _, m in u.modules], max(config.rank_of(n) for n, _ in u.modules))
                     for u in units}
            n_samples = sums.reduce_across(group, n_samples, owners(costs, group, load))
            units = sums.units
            t1 = time.perf_counter()
            timings["reduce"] += t1 - t0
            t0 = t1

        def task(unit):
            def run():
                # Z's n × n is lora-da's own: out of memory forming it, once more after the
                # release, then assembled on the host and solved there (SPEC §7)
                formed, on_host = None, unit.group in collection.plan.host_solves
                for host_side in (False, False, True):
                    try:
                        formed = sums.unit_statistics(unit, n_samples, on_host=host_side)
                        break
                    except RuntimeError as e:
                        if host_side or not out_of_memory(e):
                            raise
                        _release(device)
                Z, per_module = formed
                del formed
                on_host = on_host or Z.device.type != device.type
                names = [p[0] for p in per_module]
                ys, Gs = [p[1] for p in per_module], [p[2] for p in per_module]
                precisions = output_precisions(config, [p[3] for p in per_module])
                inputs = None if on_host else (Z, ys, Gs)
                host = (Z, ys, Gs)
                del Z, ys, Gs
                return solve_on_device_or_host(inputs, lambda: host, names, config, precisions, device)
            return run

        if failed:
            return
        try:
            for init in on_streams([task(u) for u in collection.plan.solve_order(units)], device,
                                    collection.plan.solve_workers):
                inits[init.name] = init
        except Exception as e:
            if group is None:
                raise
            failed.append(e)  # the other ranks' passes go on; share_inits raises it everywhere
        timings["solve"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        collect_on_device(run, max_device_bytes=max_device_bytes, max_host_bytes=max_host_bytes, keep_on_host=False,
                          on_pass=solve_pass, group=group, dense_solves=config.method == "dense")
    except DeviceTooSmallError as e:
        if not host_fallback(e, accumulate_on, group, dataloader, progress):
            raise
        return via_statistics("host")  # the probe summed nothing: the host path starts from the first batch
    if run.n_samples == 0:
        raise InvalidArgumentError("collect_and_solve: the dataloader yielded no sample")
    if group is not None:
        t1 = time.perf_counter()
        inits = share_inits(failed[0] if failed else inits, group)
        timings["gather"] = time.perf_counter() - t1
    total = time.perf_counter() - t0
    spent = sum(timings.values())
    report = RunReport(plan=run.plan, collect_seconds=total - spent, solve_seconds=spent,
                                              reduce_seconds=timings["reduce"], own_solve_seconds=timings["solve"],
                                              gather_seconds=timings["gather"])
    inits = Inits({n: inits[n] for n in run.targets if n in inits}, report)
    warn_poor(inits)
    check_zero_gradients(inits)
    return inits
