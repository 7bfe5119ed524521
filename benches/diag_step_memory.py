"""Each pass's step against what the plan held back for it (issue 20 diagnostics).

    python benches/diag_step_memory.py --shape llama7b --cells 40:8,24:8 [--snapshot]

For each card ``GiB:batch`` (the device filled as in ``bench_e2e.py``) it runs
``collect_and_solve`` with default settings and prints, per pass in the order
the passes run, the device bytes held before its first two steps and each
step's peak above them (forward + backward + lora-da's per-call temporaries),
beside the step the plan budgeted: the pass's reserve less the allocator margin
and the saved gradients. Every out-of-memory the collection recovered from is
printed with the allocator's message. With ``--snapshot`` the live allocations
at the first one after the probe are summed by their Python call site (what the
plan missed; the ninth session found transformers' key/value cache this way).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_e2e import SHAPES, TARGETS, Filler, batched, floor_pass, make_data, make_model, run_cell  # noqa: E402

GiB = 2**30


def live_by_site(limit: int = 20) -> list[str]:
    """The allocator's live blocks summed by their innermost frames outside torch (the filler, one
    block larger than 20 GiB, and blocks allocated before recording began show as ``?``)."""
    snap = torch.cuda.memory._snapshot()
    by = collections.Counter()
    for seg in snap["segments"]:
        for b in seg["blocks"]:
            if b["state"] != "active_allocated" or b["size"] > 20 * GiB:
                continue
            frames = [f for f in b.get("frames", []) if "/torch/" not in f["filename"]]
            by[" < ".join(f"{f['filename'].split('/')[-1]}:{f['line']}" for f in frames[:4]) or "?"] += b["size"]
    return [f"{v / GiB:8.3f} GiB  {k}" for k, v in by.most_common(limit)]


class Watch:
    """Patches the collection's step boundaries and its out-of-memory test to report what they saw."""

    def __init__(self, snapshot: bool):
        import lora_da.collect.device_sums as ds
        import lora_da.collect.passes as passes

        self.snapshot, self.sums = snapshot, None
        self.index, self.steps, self.snapped, self.before = -1, 0, False, 0
        begin, end, oom = ds.DeviceSums.begin_step, ds.DeviceSums.end_step, passes.out_of_memory
        watch = self

        def begin_step(sums, mask, skip=frozenset()):
            if sums is not watch.sums:  # a new pass
                watch.sums, watch.steps = sums, 0
                watch.index += 1
            torch.cuda.synchronize()
            watch.before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return begin(sums, mask, skip)

        def end_step(sums, samples, index, targets):
            out = end(sums, samples, index, targets)
            watch.steps += 1
            if watch.steps <= 2:
                torch.cuda.synchronize()
                print(f"  pass {watch.index + 1} step {watch.steps}: {samples} samples, held {watch.before / GiB:.2f} GiB, "
                      f"step peak {(torch.cuda.max_memory_allocated() - watch.before) / GiB:.2f} GiB", flush=True)
            return out

        def out_of_memory(e):
            hit = oom(e)
            if hit:
                print(f"  out of memory (pass {watch.index + 1}, after {watch.steps} step(s)): "
                      f"{str(e).splitlines()[0][:200]}", flush=True)
                if watch.snapshot and watch.index >= 0 and not watch.snapped:
                    watch.snapped = True
                    print("  live blocks by call site:\n    " + "\n    ".join(live_by_site()), flush=True)
            return hit

        ds.DeviceSums.begin_step, ds.DeviceSums.end_step = begin_step, end_step
        passes.out_of_memory = out_of_memory

    def reset(self):
        self.index, self.steps, self.sums = -1, 0, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama7b")
    ap.add_argument("--cells", default="40:8,24:8", help="GiB:batch,… (GiB 'all' for the whole device)")
    ap.add_argument("--snapshot", action="store_true", help="record allocations; print the live ones at the first out-of-memory")
    args = ap.parse_args()

    import lora_da
    from lora_da.pipeline import collect_and_solve
    from lora_da.plan import margin
    from peft import LoraConfig

    shape = SHAPES[args.shape]
    model = make_model(shape)
    model_bytes = torch.cuda.memory_allocated()
    ids, mask = make_data(shape["samples"])
    cfg = lora_da.LoraDAConfig(n_pop=10000, rank=8, beta=0.03, gamma=1024.0)
    names = lora_da.adapters._peft_targets(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    floor_pass(model, batched(ids, mask, 1)[:1])
    watch, filler = Watch(args.snapshot), Filler()
    if args.snapshot:
        torch.cuda.memory._record_memory_history(max_entries=300000, context="alloc", stacks="python")
    for cell in args.cells.split(","):
        gib, bs = cell.split(":")
        took = filler.set(gib, model_bytes)
        watch.reset()
        print(f"== {args.shape}, card {gib} GiB, batch {bs}", flush=True)
        res, err = run_cell(lambda: collect_and_solve(model, batched(ids, mask, int(bs)), names, cfg, progress=False), took)
        if err:
            print(f"  {err}")
            continue
        inits, dt, peak, _ = res
        plan = inits.report.plan
        held = margin(plan.device_free)
        saved = 2 * shape["samples"] * 512 * shape["hidden"] * 2 if plan.cuts else 0  # bf16 rows, two layers' at once
        print(plan.describe())
        print(f"  the step each pass budgeted (reserve − margin − saved gradients), in the order run: "
              f"{[round((r - held - saved) / GiB, 2) for r in plan.reserves]} GiB at micro-batch {plan.micro_batch}")
        print(f"  {dt:.1f} s, GPU peak {peak:.1f} GiB net", flush=True)


if __name__ == "__main__":
    main()
