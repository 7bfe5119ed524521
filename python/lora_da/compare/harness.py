"""The harness of a comparison: seeds, the training loop, its timing and peak memory, and
the coordinate search over lr and scale on the held-back split.

Every run starts from ``task.base(seed)``, initializes it with an arm
(:mod:`lora_da.compare.arms`), trains it with AdamW on ``task.train(seed)`` and scores
it on the held-back and evaluation splits (:mod:`lora_da.compare.tasks`);
:func:`run_comparison` writes what :mod:`lora_da.compare.report` makes of the runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_da.compare.arms import SENSITIVITY_GAMMAS, Method, available_methods
from lora_da.compare.report import auto_norm_bar, markdown, plot, verdict
from lora_da.compare.tasks import Task


@dataclass
class Run:
    method: str
    seed: int
    lr: float
    scale: float | None
    losses: list  # training loss of every step (before its update)
    select: dict
    eval: dict
    init_s: float
    train_s: float
    peak_mb: float | None
    first_batch: object = field(default=None, repr=False)
    base_fingerprint: float | None = None
    extra: str = ""
    model: object = field(default=None, repr=False)  # the trained model, kept only with run_one(keep_model=True)


def _fingerprint(model):
    """A number that changes if any base weight does (taken before PEFT wraps the model)."""
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_one(task: Task, method: Method, *, seed, lr, scale, steps, device="cpu", keep_model=False) -> Run:
    is_cuda = torch.device(device).type == "cuda"
    base = task.base(seed)
    fp = _fingerprint(base)
    if is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    kw = {} if scale is None else {"scale": scale}
    setup = method.init(base, task.lora_config(), task.calib, task=task, seed=seed, **kw)
    model = setup.model
    _sync(device)
    init_s = time.perf_counter() - t0
    batches = task.train(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    losses = [float(x) for x in losses]  # one sync at the end, not one per step
    _sync(device)
    train_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if is_cuda else None
    init_s += setup.solve_s  # statistics + solve computed once per seed: charged to every run that reuses them
    if peak is not None and setup.solve_peak_mb is not None:
        peak = max(peak, setup.solve_peak_mb)
    sel, ev = task.evaluate(model, task.select), task.evaluate(model, task.eval)
    extra = ""
    if setup.gammas:
        g = sorted(setup.gammas.values())
        extra = f"γ median {g[len(g) // 2]:.3g} (range {g[0]:.3g}…{g[-1]:.3g})"
    return Run(method.name, seed, lr, scale, losses, sel, ev, init_s, train_s, peak,
               first_batch=batches[0]["input_ids"].cpu(), base_fingerprint=fp, extra=extra,
               model=model if keep_model else None)


@dataclass
class TaskResult:
    task: Task
    chosen: dict  # method -> (lr, scale)
    search: dict  # method -> [(lr, scale, select loss)]
    runs: dict  # method -> [Run per seed] at the chosen setting
    sensitivity: dict  # γ -> [Run per seed]
    failed: dict  # method -> why it could not run on this task
    steps: int


def compare_task(task: Task, methods: list[Method], *, seeds, lrs, steps, device="cpu", log=print,
                 sensitivity=SENSITIVITY_GAMMAS) -> TaskResult:
    chosen, search, runs, done = {}, {}, {}, {}

    def get(m, seed, lr, sc):  # a (method, seed, lr, scale) run is deterministic: the γ table reuses the grid's
        key = (m.name, seed, lr, sc)
        if key not in done:
            done[key] = run_one(task, m, seed=seed, lr=lr, scale=sc, steps=steps, device=device)
        return done[key]

    def _search_and_seeds(m):
        t0 = time.perf_counter()
        grid = []

        def pick():  # lowest held-back loss; ties: the larger γ (the smaller first step)
            return min(grid, key=lambda g: (g[0], -(g[2] or 0)))

        # coordinate search, the same for every arm that has a scale: all scales at the middle lr, then the
        # other lrs at the best scale (len(scales) + len(lrs) - 1 runs, not their product: the full H200 run
        # has to fit in 8 minutes)
        mid = lrs[len(lrs) // 2]
        for sc in m.scales:
            r = get(m, seeds[0], mid, sc)
            grid.append((r.select["loss"], mid, sc, r))
        sc_best = pick()[2]
        for lr in lrs:
            if lr != mid:
                r = get(m, seeds[0], lr, sc_best)
                grid.append((r.select["loss"], lr, sc_best, r))
        best = pick()
        chosen[m.name] = (best[1], best[2])
        search[m.name] = [(lr, sc, s) for s, lr, sc, _ in grid]
        runs[m.name] = [best[3]] + [get(m, s, best[1], best[2]) for s in seeds[1:]]
        ev = [r.eval["metric"] for r in runs[m.name]]
        log(f"[{task.name}] {m.name:18s} lr {best[1]:g} scale {best[2]}  eval {task.metric} "
            f"{sum(ev) / len(ev):.4f}  ({time.perf_counter() - t0:.1f} s)")

    failed = {}
    for m in methods:
        try:
            _search_and_seeds(m)
        except Exception as e:  # an arm that cannot initialize this model is a result, not a crash of the bench
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            failed[m.name] = msg
            search.pop(m.name, None)
            chosen.pop(m.name, None)
            log(f"[{task.name}] {m.name}: FAILED ({msg})")

    sens = {}
    da = next((m for m in methods if m.name == "LoRA-DA"), None)
    if da is not None and sensitivity and "LoRA-DA" in chosen:
        lr = chosen["LoRA-DA"][0]
        for g in sensitivity:
            sens[g] = [get(da, s, lr, float(g)) for s in seeds]
        log(f"[{task.name}] γ sensitivity done at lr {lr:g}")
    return TaskResult(task, chosen, search, runs, sens, failed, steps)


def run_comparison(tasks, *, seeds, lrs, steps, out_dir, methods=None, device="cpu", log=print,
                   sensitivity=SENSITIVITY_GAMMAS, only=None, command=None, internal_checks=True) -> list[TaskResult]:
    """Compare on each task; writes ``results.md`` and ``loss_curves.png`` in ``out_dir``.

    ``results.md`` opens with ``command`` (when given), each task's model, data and sizes
    (``Task.about``), and ends each task with :func:`verdict`. ``internal_checks`` adds the
    benchmark's own auto-norm bar (benches/bench_quality.py), which ``lora-da compare`` leaves out."""
    os.makedirs(out_dir, exist_ok=True)
    methods = methods if methods is not None else available_methods(log)
    if only:
        methods = [m for m in methods if m.name in only]
    results = []

    def write():
        md = []
        if command:
            md += ["Command:", "", f"    {command}", ""]
        md += [f"Device: {device}; seeds {list(seeds)}; lrs {list(lrs)}; {steps} steps", ""]
        for res in results:
            if res.task.about:
                md += [f"{res.task.name}:", ""] + [f"- {k}: {v}" for k, v in res.task.about.items()] + [""]
            md += [markdown(res), "", verdict(res), ""]
            if internal_checks:
                _, msg = auto_norm_bar(res)
                md += [f"auto-norm bar (≤ PEFT default at every logged step, every seed): {msg}", ""]
        text = "\n".join(md)
        Path(out_dir, "results.md").write_text(text + "\n", encoding="utf-8")
        return text

    for task in tasks:
        results.append(compare_task(task, methods, seeds=seeds, lrs=lrs, steps=steps, device=device, log=log,
                                    sensitivity=sensitivity))
        write()  # after each task: a run stopped by a time limit keeps the tasks it finished
    text = write()
    log(text)
    try:
        plot(results, Path(out_dir, "loss_curves.png"))
        log(f"[compare] wrote {Path(out_dir, 'results.md')} and {Path(out_dir, 'loss_curves.png')}")
    except ImportError as e:  # the table is the result; a machine without matplotlib still gets it
        log(f"[compare] wrote {Path(out_dir, 'results.md')}; no plot ({e})")
    return results
