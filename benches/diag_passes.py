"""Where a 7B pass's time and memory go on one GPU (issue 20 diagnostics).

    python benches/diag_passes.py [--gib 24]

* the step's device peak and time at micro-batch 2 when the autograd graph
  starts at layer k (the layers below run without a graph): what a pass over
  the upper layers needs;
* page-locked host memory: allocation time in 1 GiB pieces, D2H / H2D of 8 GiB;
* the device solves' stages on the whole GPU (``torch_solve.PROFILE``);
* ``collect_and_solve`` on a card of ``--gib`` GiB with its plan and solve stages.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_e2e import SHAPES, TARGETS, Filler, batched, make_data, make_model  # noqa: E402


def graph_from(model, k: int):
    """Forward pre-hooks: layer ``k``'s input starts the graph; nothing below keeps activations."""
    layer = model.model.layers[k]

    def pre(module, args, kwargs):
        if args:
            h = args[0]
            return (h.detach().requires_grad_(True),) + tuple(args[1:]), kwargs
        h = kwargs["hidden_states"]
        kwargs = dict(kwargs, hidden_states=h.detach().requires_grad_(True))
        return args, kwargs

    return layer.register_forward_pre_hook(pre, with_kwargs=True)


def step_probe(model, data, k: int, steps: int = 4):
    from lora_da.collect import default_loss
    from lora_da.collect.hooks import frozen

    with frozen(model):
        h = graph_from(model, k)
        try:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for b in data[:steps]:
                b = {kk: v.cuda() for kk, v in b.items()}
                with torch.enable_grad():
                    loss = default_loss(model, b).sum()
                loss.backward()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / steps
        finally:
            h.remove()
    return (torch.cuda.max_memory_allocated() - base) / 2**30, dt


def pinned_probe(model, data):
    lines = []
    t = time.perf_counter()
    pieces = [torch.empty(1 << 27, dtype=torch.float64, pin_memory=True) for _ in range(8)]
    lines.append(f"pin 8 × 1 GiB: {time.perf_counter() - t:.2f} s")
    d = torch.ones(8 << 27, dtype=torch.float64, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i, p in enumerate(pieces):
        p.copy_(d[i << 27:(i + 1) << 27], non_blocking=True)
    torch.cuda.synchronize()
    lines.append(f"D2H 8 GiB pinned: {8 / (time.perf_counter() - t):.1f} GiB/s")
    t = time.perf_counter()
    for i, p in enumerate(pieces):
        d[i << 27:(i + 1) << 27].copy_(p, non_blocking=True)
    torch.cuda.synchronize()
    lines.append(f"H2D 8 GiB pinned: {8 / (time.perf_counter() - t):.1f} GiB/s")
    del d, pieces
    # pinning on a thread while the GPU runs steps: does it slow them?
    _, alone = step_probe(model, data, 0, 3)
    got = []
    th = threading.Thread(target=lambda: got.extend(torch.empty(1 << 27, dtype=torch.float64, pin_memory=True)
                                                     for _ in range(8)))
    t = time.perf_counter()
    th.start()
    _, beside = step_probe(model, data, 0, 3)
    th.join()
    lines.append(f"step alone {alone * 1e3:.0f} ms, beside pinning 8 GiB on a thread {beside * 1e3:.0f} ms "
                 f"(thread done after {time.perf_counter() - t:.2f} s)")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", default="24")
    ap.add_argument("--skip-whole", action="store_true")
    ap.add_argument("--skip-probes", action="store_true")
    ap.add_argument("--margins", default=None, help="plan.MARGIN_FRACTION values to run each card at, e.g. 0.04,0.08")
    ap.add_argument("--instrument", action="store_true", help="per pass: the step's peak against the planned reserve")
    args = ap.parse_args()
    import lora_da
    import lora_da.torch_solve as ts
    from lora_da.pipeline import collect_and_solve
    from peft import LoraConfig

    shape = SHAPES["llama7b"]
    model = make_model(shape)
    model_bytes = torch.cuda.memory_allocated()
    ids, mask = make_data(shape["samples"])
    out = []
    data2 = batched(ids, mask, 2)
    step_probe(model, data2, 0, 1)
    for k in (() if args.skip_probes else (0, 8, 16, 24, 31)):
        g, dt = step_probe(model, data2, k)
        out.append(f"micro-batch 2, graph from layer {k}: peak {g:.2f} GiB, {dt * 1e3:.0f} ms a step")
    print("\n".join(out), flush=True)
    if not args.skip_probes:
        out += pinned_probe(model, data2)
        print("\n".join(out[-3:]), flush=True)
    cfg = lora_da.LoraDAConfig(n_pop=10000, rank=8, beta=0.03, gamma=1024.0)
    names = lora_da.adapters._peft_targets(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    data8 = batched(ids, mask, 8)
    filler = Filler()
    import lora_da.collect.passes as passes
    from lora_da.collect.device_sums import DeviceSums

    seen = {}
    real_init, real_steps = DeviceSums.__init__, passes.batch_steps

    def init(self, units, *a, **k):
        real_init(self, units, *a, **k)
        torch.cuda.synchronize()
        seen[id(self)] = dict(first=units[0].group, at=torch.cuda.memory_allocated(), peak=0, n=len(seen),
                              sums=sum(u.device_bytes for u in units))
        torch.cuda.reset_peak_memory_stats()

    def steps(run, batch, bsz, index, rec, sums, check):
        try:
            real_steps(run, batch, bsz, index, rec, sums, check)
        finally:
            s = seen[id(sums)]
            s["peak"] = max(s["peak"], torch.cuda.max_memory_allocated() - s["at"])
            s["reserve"] = run.plan.reserves[s["n"]] if s["n"] < len(run.plan.reserves) else None

    if args.instrument:
        DeviceSums.__init__, passes.batch_steps = init, steps
    import lora_da.plan as plan

    margins = [float(m) for m in args.margins.split(",")] if args.margins else [plan.MARGIN_FRACTION]
    cells = [(g, m) for g in (["all"] if not args.skip_whole else []) + args.gib.split(",") for m in margins]
    for gib, margin in cells:
        plan.MARGIN_FRACTION = margin
        seen.clear()
        filler.set(gib, model_bytes)
        ts.PROFILE = {}
        torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            inits = collect_and_solve(model, data8, names, cfg, progress=args.instrument)
        finally:
            for v in seen.values():
                r = v.get("reserve")
                print(f"pass {v['n'] + 1}: first {v['first']}, sums {v['sums'] / 2**30:.2f} GiB, step peak above the "
                      f"sums {v['peak'] / 2**30:.2f} GiB, planned reserve {r / 2**30 if r else float('nan'):.2f} GiB",
                      flush=True)
        dt = time.perf_counter() - t
        rep = inits.report
        prof = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(ts.PROFILE.items()))
        methods = {}
        for i in inits.values():
            methods[i.result.method] = methods.get(i.result.method, 0) + 1
        out.append(f"card {gib}, margin {margin:.0%}: {dt:.1f} s (collect {dt - rep.solve_seconds:.1f}, solve {rep.solve_seconds:.1f}); "
                   f"solve stages (synchronized) {prof}; methods {methods}")
        out.append(rep.plan.describe())
        print("\n".join(out[-2:]), flush=True)
        ts.PROFILE = None
        del inits
    filler.set("all", model_bytes)
    print("\n# summary")
    print("\n".join(out))


if __name__ == "__main__":
    main()
