"""The host's float64 sums (SPEC §2): the Rust core's compensated input and
output factors and each module's ``Σ gᵀx``. Both paths write into them
through one interface: the per-batch host path adds each batch's rows
(:meth:`HostSums.add_batch`), the device path adds each pass's sums when it
flushes them (:meth:`add_gram`, :meth:`add_grad`, :meth:`add_outputs`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from lora_da._core import InputFactor, OutputFactor
from lora_da.collect.losses import as_rows, valid_rows
from lora_da.errors import LoraDAError, NonFiniteError, ShapeError
from lora_da.statistics import Statistics


@dataclass
class HostSums:
    """Per input group an :class:`InputFactor`, per module an :class:`OutputFactor`
    and the float64 ``Σ gᵀx`` (``m × n``)."""

    outputs: dict[str, OutputFactor]
    grad_sums: dict[str, np.ndarray]
    inputs: dict[str, InputFactor] = field(default_factory=dict)
    # modules whose Ḡ holds sums: the others are still the allocator's zero pages,
    # which a device flush fills by a copy rather than an addition
    grads_written: set = field(default_factory=set)

    @classmethod
    def zeros(cls, shapes: dict[str, tuple[int, int]], per_sample: bool) -> HostSums:
        """Empty sums for modules of ``shapes[name] = (m, n)``; the input groups come with the first batch."""
        return cls(outputs={name: OutputFactor(m, per_sample=per_sample) for name, (m, n) in shapes.items()},
                   grad_sums={name: np.zeros((m, n)) for name, (m, n) in shapes.items()})

    @classmethod
    def resumed(cls, ck: Statistics) -> HostSums:
        """The sums of a checkpoint, to go on adding to."""
        grads = {n: g.copy() for n, g in ck.grad_sums.items()}
        return cls(outputs=ck.output_factors, grad_sums=grads, inputs=ck.input_factors, grads_written=set(grads))

    def input_factor(self, group: str, n: int) -> InputFactor:
        """The group's accumulator, created on first use."""
        if group not in self.inputs:
            self.inputs[group] = InputFactor(n)
        return self.inputs[group]

    def count_samples(self, k: int) -> None:
        """``k`` more samples behind the output factors (without per-sample rows)."""
        for o in self.outputs.values():
            o.count_samples(k)

    # -- the per-batch path --------------------------------------------------------------

    def add_batch(self, targets, groups, mask, batch_index, per_sample):
        """One batch's recorded calls (each target's ``calls``), all or nothing."""
        # Validate everything before adding anything: a bad batch leaves the statistics as they were.
        for name, t in targets.items():
            if not t.calls:
                raise LoraDAError(f"module {name}: no output gradient in batch {batch_index}")
            for x, g, _ in t.calls:
                if not torch.all(torch.isfinite(x)):
                    raise NonFiniteError(f"module {name}: non-finite input activation in batch {batch_index}")
                if not torch.all(torch.isfinite(g)):
                    raise NonFiniteError(f"module {name}: non-finite output gradient in batch {batch_index}")
        updates = []
        for name, t in targets.items():
            gsum = None
            sumsq = None
            tokens = 0
            samples = []
            for x, g, _ in t.calls:
                xr, gr = as_rows(x), as_rows(g)
                # Ḡ: exact gradient over all tokens, float64
                part = gr.double().T @ xr.double()
                gsum = part if gsum is None else gsum + part
                gv, lens = valid_rows(g, mask)
                sq = (gv.double() ** 2).sum(0)
                sumsq = sq if sumsq is None else sumsq + sq
                tokens += gv.shape[0]
                if per_sample:
                    if lens is None:
                        raise ShapeError(f"module {name}: sequence_lowrank needs per-token (B, L, m) outputs")
                    starts = torch.cumsum(lens, 0) - lens
                    samples.append(torch.stack([gv[s : s + l].double().sum(0) for s, l in zip(starts.tolist(), lens.tolist())]))
            updates.append((name, gsum, sumsq.cpu().numpy(), tokens, torch.cat(samples).cpu().numpy() if per_sample else None))
        for name, gsum, sumsq, tokens, u in updates:
            if not bool(torch.isfinite(gsum).all()):
                raise NonFiniteError(f"module {name}: the gradient overflowed float64 in batch {batch_index}")
        # every device allocation before the first addition: a step that runs out of device
        # memory adds nothing and is redone smaller (Run.host_steps)
        rows = [(name, input_rows(valid_rows(x, mask)[0])) for name, t in targets.items() if groups[name] == name
                for x, _, _ in t.calls]
        for name, gsum, sumsq, tokens, u in updates:
            acc = self.grad_sums[name]
            if isinstance(acc, torch.Tensor):
                acc.add_(gsum.to(acc.device))
            else:
                acc += gsum.cpu().numpy()
            self.outputs[name].add_sums(sumsq, tokens, u)
            self.grads_written.add(name)
        for name, r in rows:
            if r is not None:
                self.inputs[name].add(r)

    # -- the device path's flush ---------------------------------------------------------

    def add_gram_rows(self, group: str, n: int, blocks, tokens: int) -> None:
        """A pass's ``Σ x xᵀ`` of ``tokens`` valid tokens, given as ``(first row, rows)`` pairs
        whose lower-triangle entries cover it once (each added in place by the core: no
        ``n × n`` host copy)."""
        factor = self.input_factor(group, n)
        for first, rows in blocks:
            factor.add_gram_rows(first, rows, tokens)
            tokens = 0

    def add_grad(self, name: str, blocks) -> None:
        """A pass's ``Σ gᵀx``, given as ``(rows, block)`` pairs that cover it (a float64
        addition per pass); into the allocator's zero pages the blocks are copied."""
        acc = self.grad_sums[name]
        written = name in self.grads_written
        for rows, block in blocks:
            if written:
                np.add(acc[rows], block, out=acc[rows])
            else:
                acc[rows] = block
        self.grads_written.add(name)

    def add_outputs(self, name: str, sumsq: np.ndarray, tokens: int, u: np.ndarray | None) -> None:
        """A pass's ``Σ g²`` over ``tokens`` valid tokens and, per sample, its ``u_s`` rows."""
        self.outputs[name].add_sums(sumsq, tokens, u)


class PageToucher:
    """Faults in, on a thread, the host pages that a flush of ``units`` will write
    first, while the device collects the pass: fresh pages cost about 3 GiB/s to
    touch on the H200 machine, serialized in the kernel, and were most of a flush
    (13.4 of TinyLlama's 24.1 s), against 51 GiB/s for the page-locked copy itself.
    Only pages that hold nothing yet are touched (new input factors' by the core,
    without the GIL; the ``Σ gᵀx`` of modules not yet written, by zeros): the sums
    do not change. :meth:`wait` before the first flush."""

    def __init__(self, host: HostSums, units):
        new = [(u.group, u.n) for u in units if u.group not in host.inputs]
        self.factors = [host.input_factor(g, n) for g, n in new]  # created here, touched on the thread
        self.grads = [host.grad_sums[name] for u in units for name, _ in u.modules if name not in host.grads_written]
        self.thread = threading.Thread(target=self.touch, name="lora-da page toucher", daemon=True)
        self.thread.start()

    def touch(self) -> None:
        try:
            for g in self.grads:
                g.fill(0.0)
            for f in self.factors:
                f.touch()
        except (MemoryError, LoraDAError):  # only a head start: the flush meets the same limit and says so
            pass

    def wait(self) -> None:
        self.thread.join()


def input_rows(rows: torch.Tensor) -> np.ndarray | None:
    """``rows`` on the host as :meth:`InputFactor.add` takes them (bf16 as its bits; float16
    exact in float32), for ``Σ x xᵀ`` in float64 (exact products); None when there are none."""
    if rows.shape[0] == 0:
        return None
    rows = rows.detach()
    if rows.dtype == torch.bfloat16:
        return rows.cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
    if rows.dtype == torch.float64:
        return rows.cpu().numpy()
    return rows.float().cpu().numpy()  # float32, float16
