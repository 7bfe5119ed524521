"""End to end on one GPU: lora-da against the authors' pipeline, same model, same data, one run.

    python benches/bench_e2e.py --shape tinyllama    # 22 layers, hidden 2048, 256 × 512 tokens
    python benches/bench_e2e.py --shape llama7b      # 32 layers, hidden 4096, 64 × 512 tokens

Random bf16 weights of the named shape (no download), random token ids with
some right padding, all seven projection types, rank 8, β 0.03, γ 1024.
With ``--gpu-gib 12,24,40,80,all --batches 1,4,16`` it runs the memory grid
instead (SPEC §7, every GPU size): for each card size X the device is filled
so that ``mem_get_info`` reports what a card of X GiB would with the model on
it, and lora-da runs with default settings at each batch size; peaks are
reported net of the filler, with the plan lora-da chose. The baseline runs
once per shape at the smallest card it fits (its peak is far below the
others, so the fill does not change it), ``--keep`` also times the route
that keeps the statistics (``collect_statistics`` then
``compute_init(device="cuda")``) at the largest card.

Runs, in this order: a plain forward + backward over the data at lora-da's
batch size (the floor), lora-da with default settings
(:func:`lora_da.get_lora_da_state_dict`), lora-da with its device budget cut
so that its peak stays near the baseline's, the baseline
(``lora_da.compare.authors``: batch 1, gradient pass, Fisher passes of 8 layers,
float32 solves), and the subspace angle of both against a float64 reference
solve of lora-da's own statistics on a few modules. Prints a Markdown table
last; logs go to ``$OUT`` when set.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))

SHAPES = {
    "tinyllama": dict(layers=22, hidden=2048, inter=5632, heads=32, kv=4, samples=256, batch=16),
    "llama7b": dict(layers=32, hidden=4096, inter=11008, heads=32, kv=32, samples=64, batch=8),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class HostPeak:
    """Peak resident memory of this process during a block (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self.stop = self.rss(), False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()
        return self

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()


def make_model(shape: dict, device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv"], max_position_embeddings=1024)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def make_data(samples: int, length: int = 512):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (samples, length), generator=g)
    mask = torch.ones_like(ids)
    keep = torch.randint(length * 3 // 4, length + 1, (samples,), generator=g)
    for i, k in enumerate(keep.tolist()):
        mask[i, k:] = 0
    return ids, mask


def batched(ids, mask, bs):
    return [{"input_ids": ids[i:i + bs], "attention_mask": mask[i:i + bs]} for i in range(0, len(ids), bs)]


def measure(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with HostPeak() as hp:
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    return out, dt, torch.cuda.max_memory_allocated() / 2**30, hp.peak / 2**30


def floor_pass(model, batches):
    """forward + backward of Σ_s ℓ_s, parameters frozen, the embedding output requiring grad: no hooks."""
    from lora_da.collect import default_loss
    from lora_da.collect.hooks import frozen, make_inputs_require_grad

    with frozen(model):
        for b in batches:
            b = {k: v.cuda() for k, v in b.items()}
            with torch.enable_grad():
                h = make_inputs_require_grad(model)
                loss = default_loss(model, b).sum()
                h.remove()
                loss.backward()


def median_run(runs):
    """The run of median wall time (its own outputs and peaks)."""
    return sorted(runs, key=lambda r: r[1])[len(runs) // 2]


def all_times(runs) -> str:
    return "" if len(runs) == 1 else "; runs " + ", ".join(f"{r[1]:.1f}" for r in runs) + " s"


def floor_pass_checkpointed(model, batches):
    """``floor_pass`` with the checkpointed layers in training mode, as the collection runs them."""
    from lora_da.collect.hooks import frozen

    with frozen(model):
        floor_pass(model, batches)


class Filler:
    """Device memory taken so that ``mem_get_info`` reports what a card of ``gib`` GiB would, the model on it."""

    def __init__(self):
        self.t = None

    def set(self, gib, model_bytes: int) -> int:
        self.t = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if gib == "all":
            return 0
        free, _ = torch.cuda.mem_get_info()
        take = free - (int(float(gib) * 2**30) - model_bytes)
        if take <= 0:
            return 0
        self.t = torch.empty(take, dtype=torch.uint8, device="cuda")
        return take


def host_and_link(gib: int = 2) -> str:
    """This machine's host-memory first touch and the GPU link, pageable and page-locked:
    what the routes that keep statistics on the host pay for."""
    k = gib * 2**27  # float64 entries
    t = time.perf_counter()
    a = np.ones(k)
    touch = time.perf_counter() - t
    d = torch.ones(k, dtype=torch.float64, device="cuda")
    torch.cuda.synchronize()
    out = []
    for name, fn in [("D2H pageable", lambda: d.cpu()),
                     ("D2H into touched pageable", lambda: torch.from_numpy(a).copy_(d)),
                     ("D2H page-locked", lambda: pinned.copy_(d)),
                     ("H2D pageable", lambda: torch.from_numpy(a).to("cuda")),
                     ("H2D page-locked", lambda: pinned.to("cuda"))]:
        if name == "D2H page-locked":
            pinned = torch.empty(k, dtype=torch.float64, pin_memory=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(f"{name} {gib / (time.perf_counter() - t):.1f}")
    return f"host first touch {gib / touch:.1f} GiB/s; link GiB/s: " + ", ".join(out)


def run_cell(fn, filler_bytes):
    """(result, seconds, GPU peak net of the filler, host peak) or the error's first line."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        with HostPeak() as hp:
            t = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
    except Exception as e:  # an out-of-memory or a refusal is a cell of the table, not the end of the run
        import traceback

        tb = traceback.extract_tb(e.__traceback__)
        where = f"{tb[-1].filename.split('/')[-1]}:{tb[-1].lineno} {tb[-1].name}" if tb else ""
        failed = f"{type(e).__name__} in {where}: {str(e).splitlines()[0][:160]}"
    else:
        failed = None
    if failed:
        # the error's frames hold the failed run's device tensors in reference cycles: without
        # this the next cells ran beside them (on the H200 the whole-GPU 7B cell after one had
        # 58 GiB free instead of 126)
        gc.collect()
        torch.cuda.empty_cache()
        return None, failed
    return (out, dt, (torch.cuda.max_memory_allocated() - filler_bytes) / 2**30, hp.peak / 2**30), None


def grid(args, shape):
    import lora_da
    from lora_da.pipeline import collect_and_solve
    from peft import LoraConfig

    print("command: python " + " ".join(sys.argv))
    print(f"machine: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; host threads {lora_da.num_threads()}")
    model = make_model(shape)
    model_bytes = torch.cuda.memory_allocated()
    ids, mask = make_data(shape["samples"])
    cfg = lora_da.LoraDAConfig(n_pop=10000, rank=8, beta=0.03, gamma=1024.0)
    names = lora_da.adapters._peft_targets(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    floor_pass(model, batched(ids, mask, 1)[:1])  # warm-up
    filler = Filler()
    sizes = args.gpu_gib.split(",")
    batch_sizes = [int(b) for b in args.batches.split(",")]
    rows, log = [], open(os.path.join(os.environ.get("OUT", "."), f"grid_{args.shape}.log"), "a")

    def say(line):
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    say(host_and_link())
    base_at = None
    # Subspaces against the first card's run at the same batch size (SPEC §5): the same
    # micro-batches give the same bf16 forward, so only the plan differs between the cells.
    L = shape["layers"]
    check = ["model.layers.0.self_attn.q_proj", f"model.layers.{L // 2}.self_attn.o_proj",
             f"model.layers.{L - 1}.mlp.gate_proj", f"model.layers.{L // 2}.mlp.down_proj"]
    first_V: dict = {}
    cas_at: dict = {}

    def against_first(bs, inits, micro):
        from lora_da.reference import subspace_sin_theta

        if bs not in first_V:
            first_V[bs] = ({n: inits[n].result.V for n in check}, micro)
            return "reference for its batch"
        ref, ref_micro = first_V[bs]
        worst = max(subspace_sin_theta(ref[n], inits[n].result.V) for n in check)
        return f"sin θ vs first card {worst:.1e}" + ("" if micro == ref_micro else f" (micro-batch {micro} vs {ref_micro})")

    def baseline():
        from lora_da.compare.authors import authors_pipeline

        for gib in reversed(sizes):  # the smallest card the baseline fits
            took = filler.set(gib, model_bytes)
            res, err = run_cell(lambda: authors_pipeline(model, batched(ids, mask, 1), TARGETS, n_pop=10000), took)
            if err:
                rows.append((gib, 1, "authors' pipeline", None, err, None, None))
                say(f"baseline, card {gib}: {err}")
                continue
            _, dt, g, h = res
            rows.append((gib, 1, "authors' pipeline", dt, "batch 1", g, h))
            say(f"baseline, card {gib} GiB: {dt:.1f} s, GPU {g:.1f} GiB")
            return gib, dt
        return None

    if not args.skip_baseline and args.baseline_first:
        base_at = baseline()
    for gib in sizes:
        for bs in batch_sizes:
            data = batched(ids, mask, bs)
            took = filler.set(gib, model_bytes)
            res, err = run_cell(lambda: (lambda inits: (inits, inits.report))(
                collect_and_solve(model, data, names, cfg, progress=False)), took)
            if err:
                rows.append((gib, bs, "lora-da", None, err, None, None))
                say(f"card {gib} GiB, batch {bs}: {err}")
                continue
            (inits, rep), dt, g, h = res
            plan = rep.plan
            desc = (f"{len(plan.passes)} pass(es){' with cuts' if plan.cuts else ''}, micro-batch {plan.micro_batch}, "
                    f"{plan.solve_workers} solve(s) at once"
                    + (f", {len(plan.host_solves)} host solve(s)" if plan.host_solves else "")
                    + (f"; notes: {len(plan.notes)}" if plan.notes else ""))
            say(plan.describe())
            on_host = sum(any("solved on the host" in n for n in i.result.notes) for i in inits.values())
            events = dict(lora_da.init.SOLVE_EVENTS)
            say(f"  device solves out of memory so far (all cells): {events}; {on_host} module(s) of this cell "
                "solved on the host")
            angle = against_first(bs, inits, plan.micro_batch)
            cas_at[(gib, bs)] = dt
            rows.append((gib, bs, "lora-da", dt, f"collect {dt - rep.solve_seconds:.1f} s, solve {rep.solve_seconds:.1f} s; "
                         + desc + "; " + angle, g, h))
            say(f"card {gib} GiB, batch {bs}: {dt:.1f} s (collect {dt - rep.solve_seconds:.1f}, solve {rep.solve_seconds:.1f}), "
                f"GPU {g:.1f} GiB net, host {h:.1f} GiB; {angle}\n"
                f"{plan.describe()}")
            del inits
        if args.keep and gib == sizes[0]:
            bs = batch_sizes[0]
            data = batched(ids, mask, bs)
            took = filler.set(gib, model_bytes)

            def keep():
                from lora_da.collect.device_sums import DeviceSums

                flush, spent = DeviceSums.flush, [0.0]

                def timed(*a, **k):  # the host's share of the collection: the sums' transfer and additions
                    t = time.perf_counter()
                    try:
                        return flush(*a, **k)
                    finally:
                        spent[0] += time.perf_counter() - t

                DeviceSums.flush = timed
                try:
                    t0 = time.perf_counter()
                    stats = lora_da.collect_statistics(model, data, names, progress=False)
                finally:
                    DeviceSums.flush = flush
                t1 = time.perf_counter()
                out = lora_da.compute_init(stats, cfg, progress=False, device="cuda")
                say(f"keep: flush to the host {spent[0]:.1f} s of collect_statistics' {t1 - t0:.1f} s")
                return stats.plan, t1 - t0, time.perf_counter() - t1, len(out)

            res, err = run_cell(keep, took)
            if err:
                rows.append((gib, bs, "keep statistics", None, err, None, None))
                say(f"keep, card {gib}: {err}")
            else:
                (plan, tc, ts, k), dt, g, h = res
                vs = cas_at.get((gib, bs))
                vs = f"; {dt / vs:.2f}× collect_and_solve's {vs:.1f} s" if vs else ""
                rows.append((gib, bs, "keep statistics", dt, f"collect_statistics {tc:.1f} s, compute_init {ts:.1f} s "
                             f"({plan.statistics_bytes / 2**30:.1f} GiB of statistics){vs}", g, h))
                say(f"keep, card {gib} GiB, batch {bs}: {dt:.1f} s (collect {tc:.1f}, solve {ts:.1f}), host {h:.1f} GiB, "
                    f"statistics {plan.statistics_bytes / 2**30:.1f} GiB{vs}")
    if args.solve_workers:
        # the same whole-GPU cell at other numbers of device solves at once (streams)
        import lora_da.collect.passes as passes

        default = passes.DEVICE_SOLVE_WORKERS
        bs = batch_sizes[0]
        for w in [int(x) for x in args.solve_workers.split(",")]:
            passes.DEVICE_SOLVE_WORKERS = w
            took = filler.set("all", model_bytes)
            try:
                res, err = run_cell(lambda: (lambda inits: (inits, inits.report))(
                    collect_and_solve(model, batched(ids, mask, bs), names, cfg, progress=False)), took)
            finally:
                passes.DEVICE_SOLVE_WORKERS = default
            if err:
                say(f"solve workers {w}: {err}")
                continue
            (inits, rep), dt, g, h = res
            rows.append(("all", bs, f"lora-da, {w} solves at once", dt,
                         f"collect {dt - rep.solve_seconds:.1f} s, solve {rep.solve_seconds:.1f} s; "
                         f"{rep.plan.solve_workers} solve(s) at once", g, h))
            say(f"solve workers {w}: {dt:.1f} s (solve {rep.solve_seconds:.1f} s), plan {rep.plan.solve_workers}")
            del inits
    if not args.skip_baseline and not args.baseline_first:
        base_at = baseline()
    filler.set("all", model_bytes)
    print(f"\nmodel: {args.shape} shape, {model_bytes / 2**30:.1f} GiB of bf16 weights; {shape['samples']} samples × 512 tokens")
    print("| card (GiB) | batch | run | wall (s) | split / plan | GPU peak net (GiB) | host peak (GiB) | ratio to baseline |")
    print("|---|---:|---|---:|---|---:|---:|---:|")
    for gib, bs, who, dt, what, g, h in rows:
        ratio = f"{dt / base_at[1]:.2f}×" if dt is not None and base_at else ""
        print(f"| {gib} | {bs} | {who} | {'' if dt is None else f'{dt:.1f}'} | {what} | "
              f"{'' if g is None else f'{g:.1f}'} | {'' if h is None else f'{h:.1f}'} | {ratio} |")
    if base_at:
        print(f"baseline measured on the {base_at[0]} GiB card: {base_at[1]:.1f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-budget", action="store_true")
    ap.add_argument("--angles", type=int, default=3, help="modules checked against the float64 reference")
    ap.add_argument("--budget-batch", type=int, default=8, help="batch size of the budget-limited run")
    ap.add_argument("--no-budget-checkpointing", dest="budget_checkpointing", action="store_false",
                    help="run the budget-limited run without gradient checkpointing")
    ap.add_argument("--repeats", type=int, default=1, help="runs of lora-da's default and of the baseline (median)")
    ap.add_argument("--gpu-gib", default=None, help="memory grid: card sizes in GiB, e.g. 12,24,40,80,all (largest first)")
    ap.add_argument("--batches", default="1,4,16", help="memory grid: batch sizes")
    ap.add_argument("--solve-workers", default=None, help="memory grid: the whole-GPU cell again at these numbers of device solves at once, e.g. 3,4")
    ap.add_argument("--baseline-first", action="store_true", help="memory grid: the baseline before the cells (a time limit then cuts cells, not it)")
    ap.add_argument("--keep", action="store_true", help="memory grid: also the keep-statistics route at the first card")
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.samples:
        shape["samples"] = args.samples
    if args.gpu_gib:
        return grid(args, shape)

    import lora_da
    from peft import LoraConfig

    print("command: python " + " ".join(sys.argv))
    print(f"machine: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; host threads {lora_da.num_threads()}")
    model = make_model(shape)
    ids, mask = make_data(shape["samples"])
    bs = shape["batch"]
    batches = batched(ids, mask, bs)
    cfg = lora_da.LoraDAConfig(n_pop=10000, rank=8, beta=0.03, gamma=1024.0)
    peft_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    rows = []

    floor_pass(model, batches[:1])  # warm-up
    _, t_floor, g_floor, h_floor = measure(lambda: floor_pass(model, batches))
    rows.append((f"floor: forward + backward, batch {bs}, no hooks", t_floor, "", g_floor, h_floor))

    def run_lora_da(**kw):
        from lora_da.pipeline import collect_and_solve

        names = lora_da.adapters._peft_targets(model, peft_cfg)
        inits = collect_and_solve(model, batches if "batches" not in kw else kw.pop("batches"), names, cfg, **kw)
        return inits, inits.report

    runs = [measure(lambda: run_lora_da(progress=False)) for _ in range(args.repeats)]
    (inits, report), t_da, g_da, h_da = median_run(runs)
    plan, solve_s = report.plan, report.solve_seconds
    methods = {m: sum(i.result.method == m for i in inits.values()) for m in ("chebyshev", "dense")}
    worst = max(i.result.residual for i in inits.values())
    print(plan.describe())
    print(f"lora-da default: {len(inits)} modules, methods {methods}, worst residual {worst:.1e}")
    rows.append((f"lora-da, default settings, batch {bs}", t_da,
                 f"collect {t_da - solve_s:.1f} s, solve {solve_s:.1f} s ({len(plan.passes)} pass){all_times(runs)}",
                 g_da, h_da))

    base = None
    if not args.skip_baseline:
        from lora_da.compare.authors import authors_pipeline

        samples = batched(ids, mask, 1)
        base_runs = [measure(lambda: authors_pipeline(model, samples, TARGETS, n_pop=10000))
                     for _ in range(args.repeats)]
        base, t_b, g_b, h_b = median_run(base_runs)
        sec = base["seconds"]
        rows.append(("authors' pipeline (re-implemented), batch 1", t_b,
                     f"gradient {sec['gradient']:.1f} s, Fisher passes + solves {sec['fisher_and_solve']:.1f} s "
                     f"({base['lobpcg_fallbacks']} lobpcg fallbacks){all_times(base_runs)}", g_b, h_b))

    if not args.skip_budget and base is not None:
        # Cut the device budget so that a pass's sums, the model and one step stay
        # within the baseline's peak: what the planner holds back is the step's peak
        # (measured here like the planner's probe) and the float64 copies of one call.
        # A user short of GPU memory turns on gradient checkpointing and keeps a
        # larger batch; --budget-batch 2 --no-budget-checkpointing is the older row.
        bb = args.budget_batch
        small = batched(ids, mask, bb)
        if args.budget_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            _, _, g_step, _ = measure(lambda: floor_pass_checkpointed(model, small[:1]))
            transient = 2 * 8 * bb * 512 * (shape["inter"] + shape["hidden"]) + (512 << 20)
            budget = max(1 << 28, int((g_b - g_step) * 2**30) - transient)
            (inits_b, report_b), t_s, g_s, h_s = measure(
                lambda: run_lora_da(progress=False, batches=small, max_device_bytes=budget))
        finally:
            if args.budget_checkpointing:
                model.gradient_checkpointing_disable()
        plan_b, solve_b = report_b.plan, report_b.solve_seconds
        print(plan_b.describe())
        how = ", gradient checkpointing" if args.budget_checkpointing else ""
        rows.append((f"lora-da, max_device_bytes {budget / 2**30:.1f} GiB, batch {bb}{how}", t_s,
                     f"collect {t_s - solve_b:.1f} s, solve {solve_b:.1f} s ({len(plan_b.passes)} passes); "
                     f"step {g_step:.1f} GiB", g_s, h_s))

    angle_rows = []
    if args.angles:
        from lora_da.reference import reference_solve, subspace_sin_theta

        L = shape["layers"]
        names = ["model.layers.0.self_attn.q_proj", f"model.layers.{L // 2}.self_attn.o_proj",
                 f"model.layers.{L - 1}.mlp.gate_proj", f"model.layers.{L // 2}.mlp.down_proj"][: args.angles]
        # The same statistics for both solves: a second collection differs in its last bits
        # (the GPU's bf16 backward is not bit-reproducible), which moves ill-separated subspaces.
        stats = lora_da.collect_statistics(model, batches, names, progress=False)
        again = lora_da.compute_init(stats, cfg, progress=False, device="cuda")
        for n in names:
            ref = reference_solve(stats.input_factor(n), stats.output_factor(n), stats.mean_grad(n), rank=8, n_pop=10000)
            line = [n, subspace_sin_theta(ref.V, again[n].result.V), again[n].result.residual, ref.gap / ref.omega_norm,
                    subspace_sin_theta(again[n].result.V, inits[n].result.V)]
            if base is not None:
                A = base["inits"][n][0].double().numpy()
                V_b, _ = np.linalg.qr(A.T)
                line.append(subspace_sin_theta(ref.V, V_b))
            angle_rows.append(line)

    print(f"\nmodel: {args.shape} shape, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, bf16; "
          f"{shape['samples']} samples × 512 tokens; rank 8, β 0.03, γ 1024")
    print("| run | wall (s) | split | GPU peak (GiB) | host peak (GiB) |")
    print("|---|---:|---|---:|---:|")
    for name, t, split, g, h in rows:
        print(f"| {name} | {t:.1f} | {split} | {g:.1f} | {h:.1f} |")
    if base is not None:
        print(f"\nratio lora-da default / baseline: {t_da / t_b:.2f}×; collection / floor: {(t_da - solve_s) / t_floor:.1f}×")
    if angle_rows:
        print("\n| module | sin θ lora-da vs float64 ref (same statistics) | lora-da residual | gap/‖Ω‖ "
              "| sin θ vs the default run's (another collection) | sin θ baseline vs ref |")
        print("|---|---:|---:|---:|---:|---:|")
        for line in angle_rows:
            extra = f" {line[5]:.1e} |" if len(line) > 5 else " |"
            print(f"| {line[0]} | {line[1]:.1e} | {line[2]:.1e} | {line[3]:.1e} | {line[4]:.1e} |{extra}")


if __name__ == "__main__":
    main()
