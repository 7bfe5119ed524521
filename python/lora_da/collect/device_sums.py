"""A pass's float64 sums on the device (SPEC §2, §7): formed in the tensor
hook as each gradient arrives, flushed to the host's sums
(:class:`lora_da.collect.host_sums.HostSums`), written into a statistics
file, summed across ranks, or handed to the solves, then freed."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lora_da.collect.host_sums import HostSums
from lora_da.collect.losses import as_rows, row_weights
from lora_da.collect.targets import Target
from lora_da.errors import InvalidArgumentError, LoraDAError, NonFiniteError, ShapeError
from lora_da.memory import PinnedBuffer
from lora_da.packed import packed_columns
from lora_da.plan import FLUSH_THREADS, STAGE_BYTES, Unit, gram_block_rows
from lora_da.statistics_file import StatisticsWriter


class DeviceSums:
    """Float64 running sums of one pass, on the device: per module ``Σ gᵀx``
    (all tokens), ``Σ g²`` and its token count (valid tokens), per input group
    ``Σ x xᵀ`` of the valid tokens as its lower block triangle (row blocks
    ``(b − a) × b``, :func:`lora_da.plan.gram_block_rows`). Products are formed
    in the tensor hook as each gradient arrives, so no call's tensors outlive
    its backward step; invalid tokens are zero-weighted rather than selected
    (no host sync).

    A step's additions are all-or-nothing per module call: the hook allocates
    every temporary first and adds in place last, and records the call as
    done; a step that fails (out of device memory) reports its done calls, so
    that the step can be redone without them (``begin_step``'s ``skip``)."""

    def __init__(self, units: list[Unit], targets: dict[str, Target], groups: dict[str, str], device, per_sample: bool):
        f64 = dict(dtype=torch.float64, device=device)
        self.units = units
        self.grad_device = torch.device(device)
        self.grad = {n: torch.zeros(targets[n].m, targets[n].n, **f64) for u in units for n, _ in u.modules}
        self.sumsq = {n: torch.zeros(targets[n].m, **f64) for n in self.grad}
        self.tokens = {n: torch.zeros((), **f64) for n in self.grad}
        self.samples: dict[str, list] = {n: [] for n in self.grad}
        self.gram = {u.group: [torch.zeros(b - a, b, **f64) for a, b in gram_block_rows(u.n)] for u in units}
        self.gram_tokens = {u.group: torch.zeros((), **f64) for u in units}
        self.n_of = {u.group: u.n for u in units}
        self.groups = groups
        self.per_sample = per_sample
        self.flags: list = []
        self.called: set = set()
        self.batch_samples = 0
        self.mask = None
        self.skip: frozenset = frozenset()
        self.done: set = set()
        self.call_index: dict[str, int] = {}

    def begin_step(self, mask, skip: frozenset = frozenset()) -> None:
        self.mask, self.called, self.skip, self.done, self.call_index = mask, set(), skip, set(), {}

    def abort_step(self) -> frozenset:
        """The module calls of a failed step whose products were summed (its finite flags stay, to be checked)."""
        return frozenset(self.done)

    def free(self) -> None:
        """Every sum's device memory, at once (a pass that ends in an error)."""
        for d in (self.grad, self.sumsq, self.tokens, self.samples, self.gram, self.gram_tokens):
            d.clear()
        self.units = []

    def drop(self, units: list[Unit]) -> None:
        """Free the sums of ``units``, which leave this pass (collect.passes.move_half_out);
        their modules' calls are ignored from now on."""
        gone = {u.group for u in units}
        for u in units:
            del self.gram[u.group], self.gram_tokens[u.group], self.n_of[u.group]
            for name, _ in u.modules:
                for d in (self.grad, self.sumsq, self.tokens, self.samples):
                    del d[name]
        self.units = [u for u in self.units if u.group not in gone]

    def add(self, target: Target, x: torch.Tensor, g: torch.Tensor, key) -> None:
        name = target.name
        if name not in self.grad:
            return  # its group left this pass (drop)
        call = self.call_index.get(name, 0)
        self.call_index[name] = call + 1
        self.called.add(name)
        if (name, call) in self.skip:
            return  # summed by an earlier try of this step
        xr, gr = as_rows(x), as_rows(g)
        # x was checked by the forward hook (the recorder's ``seen``); only g is new here
        finite = torch.isfinite(gr).all()
        # Every temporary first (own float64 copies: a float64 model's tensors are
        # autograd's; zero-weighted in place below), the in-place sums last.
        xr, gr = float64_copy(xr), float64_copy(gr)
        w = row_weights(x, self.mask)
        sq = gr.square()
        if w is not None:
            sq.mul_(w[:, None])  # w is 0/1: (w g)² = w g²
        sq = sq.sum(0)
        if self.per_sample:
            if x.dim() != 3:
                raise ShapeError(f"module {name}: sequence_lowrank needs per-token (B, L, m) outputs")
            rows = (gr if w is None else gr * w[:, None]).view(x.shape[0], x.shape[1], -1).sum(1)
        count = w.sum() if w is not None else None
        leader = self.groups[name] == name
        self.grad[name].addmm_(gr.T, xr)  # Ḡ: every token
        self.sumsq[name].add_(sq)
        self.tokens[name].add_(count if count is not None else gr.shape[0])
        if self.per_sample:
            self.samples[name].append(rows)
        if leader:
            if w is not None:
                xr.mul_(w[:, None])
            add_gram_lower(self.gram[name], xr)
            self.gram_tokens[name].add_(count if count is not None else xr.shape[0])
        self.flags.append((name, "output gradient", finite))
        self.done.add((name, call))

    def end_step(self, samples: int, index: int, targets: Sequence[Target]) -> None:
        """One sync per step: every module had a call with gradient (as on the
        host path), and every call's inputs (the finite flags the recorder's
        forward hooks kept in ``seen``) and gradients were finite."""
        missing = [n for n in self.grad if n not in self.called]
        if missing:
            raise LoraDAError(f"module {missing[0]}: no output gradient in batch {index}")
        flags = [(t.name, "input activation", f) for t in targets for f in t.seen] + self.flags
        if flags:
            ok = torch.stack([f for _, _, f in flags]).cpu()
            if not bool(ok.all()):
                name, what, _ = flags[int((~ok).nonzero()[0])]
                raise NonFiniteError(f"module {name}: non-finite {what} in batch {index}")
        self.flags = []
        self.batch_samples += samples

    def flush(self, host: HostSums) -> None:
        """Into the host's compensated accumulators, then zero. The transfers and the
        host's additions of the groups run on several threads (the core and NumPy release
        the GIL), each with its own host copy: the plan counts ``FLUSH_THREADS`` of them."""
        from concurrent.futures import ThreadPoolExecutor

        tokens = {u.group: int(self.gram_tokens[u.group]) for u in self.units}
        for u in self.units:  # created here, not on the threads below
            host.input_factor(u.group, u.n)

        local = threading.local()

        def staging() -> Staging:
            if getattr(local, "staging", None) is None:
                local.staging = Staging(self.grad_device)
            return local.staging

        def gram(u):
            if tokens[u.group]:
                # the device's row blocks through the staging buffer straight into the packed
                # sums: no n × n temporary on the device or on the host
                host.add_gram_rows(u.group, u.n, ((a + rows.start, part)
                                                  for (a, b), blk in zip(gram_block_rows(u.n), self.gram[u.group])
                                                  for rows, part in staging().blocks(blk)), tokens[u.group])

        def grad(name):
            host.add_grad(name, staging().blocks(self.grad[name]))

        workers = 1 if self.grad_device.type != "cuda" else FLUSH_THREADS
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = [pool.submit(gram, u) for u in self.units] + [pool.submit(grad, n) for n in self.grad]
            for j in jobs:
                j.result()
        for u in self.units:
            for blk in self.gram[u.group]:
                blk.zero_()
            self.gram_tokens[u.group].zero_()
        for name, gsum in self.grad.items():
            u = None
            if self.per_sample:  # a flush after a checkpoint on the pass's last batch has no new sample: (0, m)
                u = (torch.cat(self.samples[name]).cpu().numpy() if self.samples[name]
                     else np.zeros((0, self.sumsq[name].shape[0])))
            host.add_outputs(name, self.sumsq[name].cpu().numpy(), int(self.tokens[name]), u)
            if not self.per_sample:
                host.outputs[name].count_samples(self.batch_samples)
            gsum.zero_()
            self.sumsq[name].zero_()
            self.tokens[name].zero_()
            self.samples[name] = []
        self.batch_samples = 0

    def write(self, writer: StatisticsWriter, written: dict, staging: DiskStaging, n_samples: int) -> None:
        """This pass's sums into the statistics file, group by group (SPEC §6), then free them;
        ``written`` gets each group's and module's counts for the file's header. The blocks go
        through ``staging`` (the file's writes overlap the next blocks' transfers)."""
        writer.set_samples(n_samples)
        for u in self.units:
            t = int(self.gram_tokens.pop(u.group))
            written["groups"][u.group] = {"n": u.n, "tokens": t}
            rows = self.gram.pop(u.group)
            for start, part in packed_columns(rows, u.n):
                staging.put(f"input.{u.group}", start, part)
            del rows
            for name, _ in u.modules:
                staging.put(f"grad.{name}", 0, self.grad.pop(name))
                staging.put(f"output.{name}", 0, self.sumsq.pop(name))
                samples = n_samples
                if self.per_sample:
                    u_s = torch.cat(self.samples.pop(name))
                    staging.put(f"samples.{name}", 0, u_s)
                    samples = u_s.shape[0]
                written["outputs"][name] = {"tokens": int(self.tokens.pop(name)), "samples": samples,
                                                 "per_sample": self.per_sample}
        staging.wait()

    def reduce_across(self, group, n_samples: int, owner: dict[str, int]) -> int:
        """Sum this pass's device sums over the ranks of ``group`` into each
        input group's ``owner`` (the rank that solves it; exact float64 sums),
        and free the sums of the groups other ranks own: each rank sends what
        others solve and receives only what it solves itself, half the traffic
        of an all-reduce on two ranks. Per-sample rows are gathered. Returns
        the samples of all ranks."""
        import torch.distributed as dist

        from lora_da.distributed import collective_device, gather_objects, settle

        where = collective_device(group)
        me = dist.get_rank(group)
        # the token counts and the samples in one small all-reduce (every rank reads its own groups' counts)
        counts = torch.stack([*self.tokens.values(), *self.gram_tokens.values(),
                              torch.tensor(float(n_samples), dtype=torch.float64, device=self.grad_device)]).to(where)
        dist.all_reduce(counts, group=group)
        settle([counts])  # before any view of it holds a reference
        counts = counts.to(self.grad_device)
        for t, c in zip([*self.tokens.values(), *self.gram_tokens.values()], counts.unbind()):
            t.copy_(c)
        sent = []
        for u in self.units:
            dst = dist.get_global_rank(group, owner[u.group]) if group is not dist.group.WORLD else owner[u.group]
            for t in [*self.gram[u.group], *(x for name, _ in u.modules for x in (self.grad[name], self.sumsq[name]))]:
                if t.device == where:
                    dist.reduce(t, dst=dst, group=group)
                    sent.append(t)
                else:
                    moved = t.to(where)
                    dist.reduce(moved, dst=dst, group=group)
                    if owner[u.group] == me:
                        t.copy_(moved)
                    settle([moved])  # now, not at the end: the copies would add up to all the sums
        settle(sent)
        del sent
        if self.per_sample:
            mine = {n: torch.cat(v).cpu().numpy() if v else None for n, v in self.samples.items()}
            parts = gather_objects(mine, group)
            for n, rows in self.samples.items():
                got = [torch.from_numpy(p[n]) for p in parts if p[n] is not None]
                self.samples[n] = [torch.cat(got).to(self.grad[n].device)] if got else []
        # what other ranks solve is no longer needed here
        for u in self.units:
            if owner[u.group] != me:
                del self.gram[u.group]
                for name, _ in u.modules:
                    del self.grad[name], self.sumsq[name]
        self.units = [u for u in self.units if owner[u.group] == me]
        return int(round(float(counts[-1])))

    def unit_statistics(self, u: Unit, n_samples: int, on_host: bool = False):
        """``Z``, and per module ``(y, Ḡ)``, of one input group (SPEC §2), on the device or,
        ``on_host``, with ``Z`` and ``y`` assembled on the host (the device had no room for the
        ``n × n``). The sums leave this object only once all of it is formed: out of memory on
        the way, nothing is lost and the call can be made again."""
        t = float(self.gram_tokens[u.group])
        if t == 0:
            raise InvalidArgumentError(f"collect: no valid token reached module(s) {[n for n, _ in u.modules]}; check token_mask")
        rows = self.gram[u.group]
        Z = symmetric_from_lower([r.cpu() for r in rows] if on_host else list(rows), u.n).div_(t)
        per_module = []
        for name, _ in u.modules:
            sumsq = self.sumsq[name].cpu() if on_host else self.sumsq[name]
            per_module.append((name, sumsq / float(self.tokens[name])))
        del self.gram[u.group]
        out = []
        for name, y in per_module:
            del self.sumsq[name]
            self.tokens.pop(name)
            G = self.grad.pop(name).div_(n_samples)
            u_s = torch.cat(self.samples.pop(name)).cpu().numpy() if self.per_sample else None
            out.append((name, y, G, u_s))
        return Z, out


def add_gram_lower(rows: list[torch.Tensor], x: torch.Tensor) -> None:
    """``Σ xᵀx`` into its lower block triangle (row blocks ``(b − a) × b`` of
    ``GRAM_BLOCK`` rows, :func:`lora_da.plan.gram_block_rows`): ``Z`` is
    symmetric (SPEC §2), and the float64 products are the collection's main
    cost, so about 40 % of them are skipped, and the blocks above the diagonal
    take no memory."""
    for (a, b), blk in zip(gram_block_rows(x.shape[1]), rows):
        blk.addmm_(x[:, a:b].T, x[:, :b])


def symmetric_from_lower(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """The full symmetric ``n × n`` matrix from the row blocks that :func:`add_gram_lower`
    fills (the lower triangle of each diagonal block mirrored too); frees the blocks."""
    blocks = gram_block_rows(n)
    full = torch.empty(n, n, dtype=rows[0].dtype, device=rows[0].device)
    for (a, b), blk in zip(blocks, rows):
        full[a:b, :b].copy_(blk)
    rows.clear()
    for a, b in blocks:
        d = full[a:b, a:b]
        d.copy_(torch.tril(d).add_(torch.tril(d, -1).T))
        if b < n:
            full[a:b, b:].copy_(full[b:, a:b].T)
    return full


def float64_copy(t: torch.Tensor) -> torch.Tensor:
    """lora-da's own per-call float64 copy (the fault-injection tests replace it)."""
    return t.to(torch.float64, copy=True)


class DiskStaging:
    """Device sums into a statistics file (SPEC §6, written as each pass ends): each block of
    at most ``STAGE_BYTES`` is copied into one of two page-locked buffers while a thread writes
    the other's into the file, so the link, the host's copy into the page cache and the disk
    (the writer's early flushes) overlap. Off a GPU, or without page-locked memory, blocks are
    written as they come. The plan counts the two buffers (``MemoryPlan.transfer_bytes``)."""

    BUFFERS = 2

    def __init__(self, device, writer: StatisticsWriter, threaded: bool | None = None):
        self.writer, self.jobs = writer, []
        self.free: queue.Queue = queue.Queue()
        cuda = torch.device(device).type == "cuda"
        if cuda if threaded is None else threaded:
            for _ in range(self.BUFFERS):
                try:
                    self.free.put(torch.empty(STAGE_BYTES // 8, dtype=torch.float64, pin_memory=cuda))
                except RuntimeError:  # no page-locked memory to be had
                    break
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-da-writer") if self.free.qsize() else None

    def put(self, key: str, start: int, t: torch.Tensor) -> None:
        """Tensor ``key``'s elements from ``start`` on: ``t``'s, in row-major order."""
        flat = t.detach().reshape(-1)
        if self.pool is None:
            self.writer.write_at(key, start, flat.cpu().numpy())
            return
        step = STAGE_BYTES // 8
        for a in range(0, flat.numel(), step):
            part = flat[a:a + step]
            self._raise_done()
            buf = self.free.get()
            view = buf[:part.numel()]
            view.copy_(part)
            self.jobs.append(self.pool.submit(self._write, key, start + a, view, buf))

    def _write(self, key: str, start: int, view: torch.Tensor, buf: torch.Tensor) -> None:
        try:
            self.writer.write_at(key, start, view.numpy())
        finally:
            self.free.put(buf)

    def _raise_done(self) -> None:
        done = [j for j in self.jobs if j.done()]
        self.jobs = [j for j in self.jobs if not j.done()]
        for j in done:
            j.result()

    def wait(self) -> None:
        """Every block written (a write's error raised here)."""
        jobs, self.jobs = self.jobs, []
        for j in jobs:
            j.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class Staging:
    """Host side of device-to-host transfers: a page-locked buffer (on CUDA)
    reused for every copy, so sums reach the host at the link's speed without
    fresh pageable pages each (SPEC §7 counts it). :meth:`blocks` streams a
    tensor through at most ``STAGE_BYTES`` of it; :meth:`host` stages a whole
    tensor (the statistics file's writer takes whole arrays)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.pinned = PinnedBuffer()

    def staged(self, k: int) -> torch.Tensor | None:
        """``k`` float64 of the page-locked buffer, grown as needed; None off a GPU or without
        page-locked memory (pageable copies then)."""
        return self.pinned.get(k) if self.device.type == "cuda" else None

    def blocks(self, t: torch.Tensor):
        """A 2-D ``t`` on the host as ``(rows, block)`` pairs of consecutive rows
        (at most ``STAGE_BYTES`` each), each block valid until the next is asked for."""
        t = t.detach()
        step = max(1, STAGE_BYTES // (8 * max(1, t.shape[1])))
        for a in range(0, t.shape[0], step):
            part = t[a:a + step]
            buf = self.staged(part.numel())
            if buf is None:
                yield slice(a, a + step), part.cpu().numpy()
                continue
            view = buf.view(part.shape)
            view.copy_(part)
            yield slice(a, a + step), view.numpy()

    def host(self, t: torch.Tensor) -> np.ndarray:
        """A host copy of ``t`` (float64), valid until the next call."""
        buf = self.staged(t.numel())
        if buf is None:
            return t.detach().cpu().numpy()
        view = buf.view(t.shape)
        view.copy_(t)
        return view.numpy()
