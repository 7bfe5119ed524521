"""The device path of a collection (SPEC §7): probe the first batch, plan
what the device holds, then one pass per group of input groups that fits,
with float64 sums on the device. Out of device memory, the plan shrinks and
the work goes on from where it stopped; nothing summed is lost."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from lora_da.collect.checkpoints import dataloader_length
from lora_da.collect.cuts import ChainCheck, Cuts, find_stack, layer_index
from lora_da.collect.device_sums import DeviceSums, DiskStaging
from lora_da.collect.host_sums import PageToucher
from lora_da.collect.hooks import Recorder, check_groups, frozen
from lora_da.collect.losses import per_sample, slice_batch, token_mask_of
from lora_da.distributed import agree, together
from lora_da.errors import InvalidArgumentError, LoraDAError, NonFiniteError
from lora_da.memory import OutOfMemoryError, out_of_memory
from lora_da.memory import release as _release
from lora_da.words import count
from lora_da.plan import DEVICE_SOLVE_WORKERS, CutModel, MemoryPlan, Step, Unit, available_host_bytes, choose_plan
from lora_da.statistics_file import StatisticsWriter, file_header


def free_device_bytes(dev: torch.device) -> int:
    """Bytes the statistics may take on ``dev``: free device memory plus what
    the caching allocator holds unused (the host's available memory on the CPU)."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return available_host_bytes() or (1 << 62)


def probe(run, first) -> Step:
    """Forward + backward of the first batch with nothing accumulated: fixes
    the input groups and measures what a plain step takes on the device
    (SPEC §7). A step that runs out of device memory is tried again on half
    as many samples, down to one: nothing is summed here, so nothing is lost."""
    index, batch, bsz, mask = first
    dev = run.device
    cuda = dev.type == "cuda"
    mb = bsz
    while True:
        sub = batch if mb == bsz else slice_batch(batch, bsz, 0, mb)
        if cuda:
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        failed = False
        stack = find_stack(run.model, run.targets)
        chain = ChainCheck(stack[1] if stack else [])
        try:
            with Recorder(run.targets.values(), lambda *a: None, keep_inputs=False) as rec, chain:
                run.forward_backward(sub, mb, index, rec)
                calls = sum(len(t.keys) for t in run.targets.values())
                order = list(rec.order)
                for t in run.targets.values():
                    t.grad_calls = tuple(rec.pattern.get(t.name, ()))
                run.set_groups(host_factors=False)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            failed = True
        if not failed:
            break
        _release(dev)
        if mb == 1:
            raise LoraDAError(
                f"collect: one sample's forward + backward does not fit on {dev} "
                f"({free_device_bytes(dev) / 2**30:.2f} GiB free beside the model): shorten the sequences "
                "(max_length), turn on gradient checkpointing (model.gradient_checkpointing_enable()), "
                "or collect on a larger device"
            )
        mb = (mb + 1) // 2
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    run.recomputes = rec.recomputes
    run.cuts = (Cuts(stack[0], stack[1], chain.row_bytes) if stack and chain.chained(mb) and not run.recomputes
                else None)
    step = torch.cuda.max_memory_allocated(dev) - before if cuda else 0
    ids = sub.get("input_ids")
    tokens = int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 1
    widest = max(t.n + 2 * t.m for t in run.targets.values())
    shares = graph_shares(order, input_units(run))
    top = probe_top(run, sub, mb, index, shares) if cuda and not run.recomputes and len(shares) > 1 else None
    return Step(samples=mb, bytes=int(step), seconds=seconds, tokens_per_sample=tokens, calls=calls,
                widest=widest, top_bytes=top, shares=tuple(shares.items()))


def graph_shares(order: list[str], units: list[Unit]) -> dict[str, float]:
    """Per input group, the share of a step's hooked calls (``order``: forward order) from
    the group's first call on: what of the step's autograd graph a pass starting there holds."""
    first: dict[str, int] = {}
    for i, name in enumerate(order):
        first.setdefault(name, i)
    out = {}
    for u in units:
        seen = [first[name] for name, _ in u.modules if name in first]
        if seen:
            out[u.group] = (len(order) - min(seen)) / len(order)
    return out


def probe_top(run, batch, bsz: int, index: int, shares: dict[str, float]) -> int | None:
    """The step's device peak when its graph starts at the last input group (SPEC §7):
    the other end of what a pass's step holds. None if it runs out of memory."""
    last = min(shares, key=shares.get)
    names = [n for n, g in run.groups.items() if g == last]
    dev = run.device
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        with Recorder([run.targets[n] for n in names], lambda *a: None, stop_early=True, keep_inputs=False,
                      start_graph=True) as rec:
            run.forward_backward(batch, bsz, index, rec)
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        _release(dev)
        return None
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev) - before)


def input_units(run, shares: dict[str, float] | None = None) -> list[Unit]:
    """The input groups, in the order of their first calls when ``shares`` gives it
    (a pass's graph then spans its own layers and those above)."""
    out: dict[str, list] = {}
    for name, leader in run.groups.items():
        out.setdefault(leader, []).append((name, run.targets[name].m))
    units = [Unit(group=g, n=run.targets[g].n, modules=tuple(mods)) for g, mods in out.items()]
    if shares:
        units.sort(key=lambda u: -shares.get(u.group, 1.0))  # stable: ties keep the targets' order
    return units


def cut_model(run, units: list[Unit], step: Step, batch: int) -> CutModel | None:
    """What the planner needs to plan passes that start at a layer's input (collect.cuts):
    None where the model is not a chain of layers, or where the number of samples (whose
    gradients are saved) is not known before the first pass."""
    cuts = run.cuts
    batches = dataloader_length(run.dataloader)
    if cuts is None or run.checkpoint_path is not None or batches is None:
        return None
    samples = batches * batch if run.max_samples is None else min(batches * batch, run.max_samples)
    layer_of = tuple((u.group, max(layer_index(cuts.stack, name) for name, _ in u.modules)) for u in units)
    return CutModel(layer_of=layer_of, layers=len(cuts.layers), row_bytes=cuts.row_bytes, samples=samples)


def plan_device(run, step: Step, batch: int, *, max_device_bytes, max_host_bytes, keep_on_host: bool,
                group=None, to_disk=None, dense_solves: bool = False, first=None) -> MemoryPlan:
    """SPEC §7: everything the device will hold against what is free now, before the first pass."""
    dev = run.device
    units = input_units(run, dict(step.shares))
    device_free = free_device_bytes(dev)
    host_free = available_host_bytes() if keep_on_host else None
    if group is not None:
        # every rank plans from the same figures: the least room, the largest step
        big = float(1 << 62)
        # the top of the graph as a share of the whole step (1 where not measured): the largest
        top_share = step.top_bytes / step.bytes if step.top_bytes is not None and step.bytes > 0 else 1.0
        vals = agree([float(device_free), float(host_free if host_free is not None else big), float(step.samples),
                      -float(step.bytes), -step.seconds, -float(step.tokens_per_sample), -float(batch), -top_share],
                     group, "min")
        device_free, host = int(vals[0]), vals[1]
        host_free = None if host_free is None else int(host)
        step = replace(step, samples=int(vals[2]), bytes=int(-vals[3]), seconds=-vals[4],
                       tokens_per_sample=int(-vals[5]), top_bytes=math.ceil(int(-vals[3]) * -vals[7]))
        batch = int(-vals[6])
    cut = cut_model(run, units, step, batch) if group is None and to_disk is None else None
    kw = dict(batch=batch, device_free=device_free, max_device_bytes=max_device_bytes, host_free=host_free,
              max_host_bytes=max_host_bytes, keep_on_host=keep_on_host, to_disk=to_disk,
              max_solve_workers=DEVICE_SOLVE_WORKERS if dev.type == "cuda" else 1, dense_solves=dense_solves,
              merge=joins_batches(dev) and run.checkpoint_path is None and not run.per_sample)
    plan = choose_plan(units, step, **kw)
    if cut is not None and len(plan.passes) > 1:
        # cuts where they are cheaper than whole passes (their saved gradients take room too)
        try:
            cut_plan = choose_plan(units, step, cut=cut, **kw)
        except InvalidArgumentError:
            cut_plan = None
        if (cut_plan is not None and cut_plan.cuts and cut_plan.estimate < plan.estimate
                and all(run.cuts.validate(run, c, p, first[1], first[2], first[0]) for p in cut_plan.passes
                        if (c := run.cuts.cut_of(p)) is not None)):
            plan = cut_plan  # (else something from below a cut reaches the loss around it: whole passes)
            run.cuts.limit = cut.row_bytes * cut.samples
    if not plan.cuts:
        run.cuts = None
    if step.samples < batch:
        plan.notes.insert(0, f"the first batch ({count(batch, 'sample')}) ran out of device memory in a plain forward + "
                             f"backward; it fit at {step.samples}")
    return plan


def collect_on_device(run, *, max_device_bytes, max_host_bytes, keep_on_host: bool, on_pass=None,
                      group=None, to_disk=None, dense_solves: bool = False) -> None:
    """Plan, then one pass per group of input groups that fits the device:
    float64 sums on the GPU, flushed to the host (``keep_on_host``; into the
    file ``to_disk`` as each pass ends when given) or handed to
    ``on_pass(sums)`` (which solves them on the device) after the pass.
    Under a process group (``group``) the ranks plan together: the same
    passes everywhere, sized for the rank with the least room.

    Out of device memory during a pass, the plan shrinks and the work goes
    on from where it stopped (SPEC §7): a pass whose sums cannot be
    allocated is split in two; a step that fails is redone at half the
    micro-batch, skipping the module calls whose products it had already
    summed, so nothing is lost and nothing is counted twice."""
    run.n_samples_at_start = run.n_samples
    dev = run.device
    with frozen(run.model):
        stream = run.batches()
        with together(group, "collect: the first batch"):
            first = next(stream, None)
            if first is not None:
                step = probe(run, first)
        if group is not None and agree([float(first is None)], group, "max")[0]:
            raise InvalidArgumentError("collect: a rank's dataloader yielded no sample; every rank needs a shard")
        if first is None:
            return
        run.plan = plan_device(run, step, first[2], max_device_bytes=max_device_bytes,
                                     max_host_bytes=max_host_bytes, keep_on_host=keep_on_host, group=group,
                                     to_disk=to_disk, dense_solves=dense_solves, first=first[:3])
        run.micro = run.plan.micro_batch or first[2]
        if run.progress:
            print(run.plan.describe(), file=sys.stderr)
        passes = run.plan.passes
        if run.cuts is not None:
            passes.reverse()  # from the top down: each pass saves the gradient the next one starts from
            run.plan.reserves.reverse()
        check_multipass(run, len(passes))
        writer = to_file = None
        if to_disk is not None:
            writer = open_writer(run, to_disk, [u for p in passes for u in p])
            to_file = DiskStaging(dev, writer)
        first_prints: list = []  # the first pass's batch fingerprints, when there are or may be several passes
        p = 0
        sums = None
        try:
            while p < len(passes):
                pass_units = passes[p]
                # The probe's steps (or the last pass's solves, on their own streams) left blocks
                # cached: give them back, so that this pass's sums are not laid into their holes
                # and its steps find whole free memory (on the H200 a 7B plan at 24 GiB ran out
                # of memory at one sample without this, 5 GiB "free" in fragments).
                _release(dev)
                try:
                    sums = DeviceSums(pass_units, run.targets, run.groups, dev, run.per_sample)
                except OutOfMemoryError:
                    sums = None
                if sums is None:
                    split_pass(run, passes, p)
                    continue
                use, capture = cuts_of_pass(run, passes, p, first)
                toucher = PageToucher(run.host, pass_units) if keep_on_host and writer is None else None
                source = itertools.chain([first], stream) if p == 0 else run.batches()
                names = [name for u in pass_units for name, _ in u.modules]
                check = lambda: check_groups({n: run.targets[n] for n in names},  # noqa: E731
                                              {n: run.groups[n] for n in names})
                # at one sample out of memory: half the pass to a pass of its own (not across ranks, whose
                # passes must agree, nor with checkpoints, which would record the moved groups as summed)
                run.shrink_pass = (None if group is not None or run.checkpoint_path is not None
                                   else functools.partial(move_half_out, run, passes, p, sums))
                run.where = f"pass {p + 1} of {len(passes)}, " if len(passes) > 1 else ""
                samples = 0
                prints = []
                # small batches joined into the plan's steps (never with checkpoints, which follow
                # batches, nor with per-sample rows, whose order follows the batches' calls)
                joiner = (Joiner(run) if run.micro > first[2] and run.checkpoint_path is None and not run.per_sample
                          else None)
                # an error on one rank is raised on all at the end of the pass (no rank left waiting)
                with together(group, f"collect: pass {p + 1}"):
                    # the graph starts at the pass's own modules (SPEC §7), except under reentrant
                    # checkpointing, whose segments need an input that requires grad
                    with Recorder([run.targets[n] for n in names], sums.add, stop_early=not run.recomputes,
                                   keep_inputs=False, start_graph=not run.recomputes) as rec, \
                            run.bar(f"lora-da: pass {p + 1}/{len(passes)}",
                                      batch_size=first[2]) as bar, \
                            (run.cuts.pass_hooks(rec, use, capture) if run.cuts is not None
                             else contextlib.nullcontext()):
                        for index, batch, bsz, mask in source:
                            # (the first pass's too when it may be split: then it becomes the reference)
                            if len(passes) > 1 or run.shrink_pass is not None:
                                prints.append(run.fingerprint(batch))
                                if p > 0 and (len(prints) > len(first_prints)
                                              or prints[-1] != first_prints[len(prints) - 1]):
                                    raise InvalidArgumentError(
                                        f"pass {p + 1} got other data than pass 1 at batch {index}: the dataloader "
                                        "must yield the same batches on every pass (no shuffling), or "
                                        + ("free device memory: the plan had one pass, and out of device memory "
                                           "some input groups went to passes of their own"
                                           if run.plan.planned_passes == 1 else "raise max_device_bytes for one pass")
                                    )
                            run.ordinal = samples  # this batch's first sample within the pass (collect.cuts)
                            if joiner is not None:
                                joiner.add(index, batch, bsz, rec, sums, check)
                            else:
                                batch_steps(run, batch, bsz, index, rec, sums, check)
                            samples += bsz
                            bar.update(1)
                            if p == 0:
                                run.n_samples += bsz
                                run.batches_done = index + 1
                                if keep_on_host and writer is None and run.checkpoint_due():
                                    toucher.wait()
                                    sums.flush(run.host)
                                    run.snapshot().save(run.checkpoint_path)
                        if joiner is not None:
                            joiner.flush(rec, sums, check)
                    if p == 0:
                        first_prints = prints
                    if p > 0 and samples != run.n_samples - run.n_samples_at_start:
                        raise InvalidArgumentError(
                            f"pass {p + 1} saw {count(samples, 'sample')}, the first {run.n_samples - run.n_samples_at_start}: "
                            "the dataloader must yield the same batches on every pass"
                        )
                if run.cuts is not None:  # the gradient this pass read (no later pass needs it), before its solves
                    run.cuts.drop_unneeded(run.cuts.cut_of(q) for q in passes[p + 1:])
                if writer is not None:
                    sums.write(run.writer, run.written, to_file, run.n_samples)
                elif keep_on_host:
                    toucher.wait()
                    sums.flush(run.host)
                else:
                    # the solves' threads may create their CUDA libraries' handles, which take
                    # device memory outside torch's allocator: the step's cached blocks go back first
                    _release(dev)
                    on_pass(sums, run.n_samples)
                run.shrink_pass = None
                sums = None
                p += 1
                if run.cuts is not None and p == 1 and run.plan.micro_batch:
                    # a micro-batch lowered in the top pass, which holds the loss's end of the
                    # step, says nothing of the cut passes below it: they start at the plan's
                    run.micro = run.plan.micro_batch
            if writer is not None:
                writer.finish(stream_header(run))
                writer = None
        finally:
            if to_file is not None:
                to_file.close()  # its writes end before the file is finished or removed
            if writer is not None:
                writer.abort()
            if sums is not None:
                # an error leaves this pass: its device sums go now, not when the caller drops the
                # traceback that references this frame (a retry would run beside them)
                sums.free()


def joins_batches(dev: torch.device) -> bool:
    """Small batches are joined into larger steps on a GPU, where one sample's step leaves
    the device mostly idle; on the CPU a step's cost is its samples' (no gain)."""
    return dev.type == "cuda"


def joinable(a: dict, na: int, b: dict, nb: int) -> bool:
    """Two collated batches that can be one (SPEC §2: the sums do not change): the same keys,
    per-sample tensors (first dimension the batch's) of the same trailing shape, dtype and
    device, and every other value the same."""
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            samples = per_sample(x, na)
            if samples != per_sample(y, nb):
                return False
            if samples:
                if x.shape[1:] != y.shape[1:] or x.dtype != y.dtype or x.device != y.device:
                    return False
            elif not (x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y))):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return False
        # other values only where they are plainly the batch's, not its samples' (a collated
        # list of floats or strings is per sample, and a loss_fn may read it so)
        elif not (isinstance(x, _PLAIN) and isinstance(y, _PLAIN) and type(x) is type(y) and x == y):
            return False
    return True


_PLAIN = (type(None), bool, int, float, str)


class Joiner:
    """Consecutive small batches joined into steps of up to ``run.micro`` samples
    (the plan's, lowered on out-of-memory), where :func:`joinable` allows."""

    def __init__(self, run):
        self.run, self.pending, self.n = run, [], 0

    def add(self, index, batch, bsz, rec, sums, check) -> None:
        ordinal = self.run.ordinal  # this batch's first sample (a flush below sets run.ordinal to its own)
        if self.pending and (self.n + bsz > self.run.micro
                             or not joinable(self.pending[-1][1], self.pending[-1][2], batch, bsz)):
            self.flush(rec, sums, check)
        if not self.pending:
            self.ordinal = ordinal  # the joined step's first sample within the pass
        self.pending.append((index, batch, bsz))
        self.n += bsz
        if self.n >= self.run.micro:
            self.flush(rec, sums, check)

    def flush(self, rec, sums, check) -> None:
        if not self.pending:
            return
        pending, n = self.pending, self.n
        self.pending, self.n = [], 0
        index, batch, bsz = pending[0]
        self.run.ordinal = self.ordinal
        if len(pending) == 1:
            batch_steps(self.run, batch, n, index, rec, sums, check)
            return
        batch = {k: (torch.cat([b[k] for _, b, _ in pending]) if per_sample(v, bsz) else v)
                 for k, v in batch.items()}
        try:
            batch_steps(self.run, batch, n, index, rec, sums, check)
        except (NonFiniteError, LoraDAError) as e:
            if "out of device memory" in str(e):  # steps' own error at one sample: nothing to name
                raise
            # The run ends here; its error should name the user's batch and sample, not the
            # joined step's: the joined batches again, one at a time (their sums are void now).
            sums.flags = []
            for i, b, k in pending:
                batch_steps(self.run, b, k, i, rec, sums, check)
                self.run.ordinal += k
            raise


def open_writer(run, path, units: list[Unit]) -> StatisticsWriter:
    """The statistics file that each pass's sums go to as it ends (SPEC §6, §7)."""
    modules = run.module_infos()
    run.written = {"groups": {}, "outputs": {}}
    placeholder = file_header(
        modules=modules, groups={u.group: {"n": u.n, "tokens": 10**18} for u in units},
        outputs={n: {"tokens": 10**18, "samples": 10**18, "per_sample": run.per_sample} for n in modules},
        n_samples=10**18, config=dict(run.config, batches_done=10**18, **run.fingerprints), model=run.model_info())
    run.writer = StatisticsWriter(path, modules, {u.group: u.n for u in units}, run.per_sample, placeholder)
    return run.writer


def stream_header(run) -> dict:
    modules = run.module_infos()
    return file_header(modules=modules, groups=run.written["groups"], outputs=run.written["outputs"],
                       n_samples=run.n_samples, config=dict(run.config, batches_done=run.batches_done,
                                                             **run.fingerprints), model=run.model_info())


def one_shot(dataloader) -> bool:
    """An iterator can be read once. Asked without calling ``iter()``: on a DataLoader with
    persistent workers that call restarts the iterator a pass is reading."""
    return isinstance(dataloader, Iterator)


def check_multipass(run, n_passes: int) -> None:
    if n_passes <= 1:
        return
    if run.checkpoint_path is not None:
        raise InvalidArgumentError(
            f"checkpointing needs a one-pass plan; this one has {n_passes} passes: raise max_device_bytes "
            "or collect fewer modules per run"
        )
    if one_shot(run.dataloader):
        raise InvalidArgumentError(
            f"the plan needs {n_passes} passes over the data but the dataloader is a one-shot iterator; "
            "pass a list or a DataLoader"
        )


def split_pass(run, passes: list, p: int) -> None:
    """The sums of pass ``p`` could not be allocated (nothing of it is summed
    yet): split it in two, or give up when it holds one input group."""
    _release(run.device)
    units = passes[p]
    if len(units) == 1:
        raise LoraDAError(
            f"collect: out of device memory allocating the float64 sums of input group {units[0].group} "
            f"({units[0].device_bytes / 2**30:.2f} GiB; {free_device_bytes(run.device) / 2**30:.2f} GiB free): "
            "free device memory, or pass max_device_bytes=0 to accumulate on the host CPU (slow)"
        )
    half = len(units) // 2
    # top-down with cuts: the upper half first, from the gradient saved for the whole
    passes[p:p + 1] = [units[half:], units[:half]] if run.cuts is not None else [units[:half], units[half:]]
    note(run, f"out of device memory allocating pass {p + 1}'s sums: split it in two ({len(passes)} passes now)")
    check_multipass(run, len(passes))


def cuts_of_pass(run, passes: list, p: int, first) -> tuple[int | None, int | None]:
    """Where pass ``p`` ends its forward (the layer whose input gradient an earlier pass saved
    for all samples; None: at the loss) and which layer input's gradient it saves for the next
    pass (None: none, or that pass runs whole)."""
    cuts = run.cuts
    if cuts is None:
        return None, None
    mine = cuts.cut_of(passes[p])
    rows = run.n_samples - run.n_samples_at_start  # every sample's gradient saved, or the pass runs whole
    use = mine if mine is not None and mine in cuts.complete and len(cuts.saved[mine]) == rows else None
    capture = None
    if p + 1 < len(passes):
        nxt = cuts.cut_of(passes[p + 1])
        if (nxt is not None and nxt not in cuts.complete and (mine is None or nxt <= mine)
                and cuts.validate(run, nxt, passes[p + 1], *first[1:3], first[0])):
            capture = nxt
    return use, capture


def note(run, text: str) -> None:
    if run.plan is not None:
        run.plan.notes.append(text)
    if run.progress:
        print(f"lora-da: {text}", file=sys.stderr)


def batch_steps(run, batch, bsz: int, index: int, rec, sums, check) -> None:
    """One user batch, in micro-batches of ``run.micro`` samples (SPEC §2:
    the sums do not depend on how the samples are split)."""
    steps(run, batch, bsz, index, rec, sums, check, 0, bsz, frozenset())


def steps(run, batch, bsz, index, rec, sums, check, lo: int, hi: int, skip: frozenset, retried: bool = False) -> None:
    """Samples ``lo:hi`` of a batch. A step that runs out of device memory
    halves the micro-batch and is redone on its samples, skipping the
    module calls (``skip``) whose products it had already summed. At one
    sample the step is redone once as it is (the release may have been all
    it needed: fragments), then with half of the pass's input groups moved
    to a pass of their own (:func:`move_half_out`), down to one group."""
    a = lo
    while a < hi:
        k = min(run.micro, hi - a)
        sub = batch if (a == 0 and k == bsz) else slice_batch(batch, bsz, a, a + k)
        sums.begin_step(token_mask_of(sub, run.token_mask), skip)
        if run.cuts is not None:
            run.cuts.rows = (run.ordinal + a, k)
        failed = False
        run.step_start = a
        try:
            run.forward_backward(sub, k, index, rec)
            check()
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            failed = True
        finally:
            run.step_start = 0
        if failed:
            done = sums.abort_step()
            rec.clear()
            _release(run.device)
            if k == 1:
                if retried and not (run.shrink_pass is not None and run.shrink_pass(index)):
                    raise LoraDAError(one_sample_error(run, index, sums))
                if not retried:
                    note(run, f"{run.where}batch {index}: out of device memory at one sample; the step redone after "
                              "releasing the allocator's cached blocks")
            else:
                run.micro = (k + 1) // 2
                note(run, f"{run.where}batch {index}: out of device memory; micro-batch lowered to {run.micro}, the step redone "
                           f"without its {len(done)} module call(s) already summed")
            # only a step that failed at one sample counts as redone once already
            steps(run, batch, bsz, index, rec, sums, check, a, a + k, skip | done, retried=k == 1)
        else:
            sums.end_step(k, index, rec.targets)
        a += k


def move_half_out(run, passes: list, p: int, sums, index: int) -> bool:
    """A step of one sample ran out of device memory in pass ``p`` (SPEC §7):
    the second half of the pass's input groups leaves it for a pass of its own
    right after it. Their sums so far are dropped (that pass sums them again
    from the first batch); the groups that stay lose nothing and go on from
    this step. The order of the groups over the passes is unchanged (a
    statistics file is written in that order). False when the pass holds one
    group, or the data cannot be read again (a one-shot iterator)."""
    units = list(sums.units)
    if len(units) < 2 or one_shot(run.dataloader):
        return False
    half = len(units) // 2
    stay, moved = units[:half], units[half:]
    sums.drop(moved)
    passes[p:p + 1] = [stay, moved]
    _release(run.device)
    note(run, f"{run.where}batch {index}: out of device memory at one sample; {count(len(moved), 'input group')} moved from "
              f"pass {p + 1} to a pass of their own ({len(passes)} passes now), the step redone")
    return True


def one_sample_error(run, index: int, sums) -> str:
    """What did not fit, and what would: the pass's sums beside a one-sample step."""
    held = sum(u.device_bytes for u in sums.units)
    free = free_device_bytes(run.device)
    if len(sums.units) == 1:
        what = (f"even input group {sums.units[0].group}'s sums alone ({held / 2**30:.2f} GiB) beside a one-sample "
                "step do not fit")
    else:
        what = f"the pass's {count(len(sums.units), 'input group')} ({held / 2**30:.2f} GiB of sums) could not be split here"
    return (f"collect: out of device memory at batch {index} with micro-batches of one sample: {what} "
            f"({free / 2**30:.2f} GiB free now); free device memory, pass a smaller max_device_bytes so that the plan "
            "keeps fewer sums on the device, or max_device_bytes=0 to sum on the host CPU")
