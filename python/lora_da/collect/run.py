"""One collection run (SPEC §2): its targets, its host sums and counts, the
batches it reads, one forward + backward each; the host path; and
:func:`collect_statistics`, which starts a run, plans it and returns its
:class:`~lora_da.statistics.Statistics`."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from lora_da.collect.checkpoints import (batch_digest, check_checkpoint_identity, check_is_checkpoint, dataloader_length,
                                         model_fingerprint, rank_path)
from lora_da.collect.cuts import Cuts, ForwardCut
from lora_da.collect.hooks import BackwardDone, Recorder, check_groups, detect_groups, frozen, make_inputs_require_grad
from lora_da.collect.host_sums import HostSums
from lora_da.collect.losses import LossFn, batch_size, check_losses, default_loss, slice_batch, token_mask_of
from lora_da.collect.passes import collect_on_device, free_device_bytes, note, one_shot
from lora_da.collect.targets import Target, linear_kind, module_shape, resolve_targets
from lora_da.distributed import active_group, agree, all_reduce_statistics, check_same_options, together
from lora_da.errors import (DeviceTooSmallError, InvalidArgumentError, LoraDAError, NonFiniteError, ShapeError,
                             StatisticsFileError, whole_number)
from lora_da.memory import out_of_memory, release
from lora_da.plan import MemoryPlan, available_host_bytes
from lora_da.statistics import Statistics
from lora_da.statistics_file import ModuleInfo, StatisticsWriter
from lora_da.words import count


def collect_statistics(
    model: torch.nn.Module,
    dataloader: Iterable[dict],
    target_modules=None,
    *,
    loss_fn: LossFn | None = None,
    token_mask: str = "attention",
    output_fisher: str = "diagonal",
    max_samples: int | None = None,
    max_device_bytes: int | None = None,
    max_host_bytes: int | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    accumulate_on: str = "auto",
    reduce_across_ranks: bool = True,
    out: str | os.PathLike | None = None,
) -> Statistics:
    """One pass over ``dataloader`` → :class:`Statistics` for every target module (SPEC §2).

    ``loss_fn(model, batch)`` must return the per-sample losses ``(B,)``; the
    default handles causal LMs and sequence classification. ``output_fisher``
    is ``"diagonal"`` (``y`` only) or ``"sequence_lowrank"`` (also keeps the
    per-sample output-gradient sums ``u_s``).

    On a GPU the statistics are formed and summed on the device in float64
    and reach the host's compensated accumulators at the end of the pass (and
    at checkpoints). A planner (:mod:`lora_da.plan`, printed when
    ``progress``) sizes this from the free device memory less what the
    model's forward and backward take on the first batch; ``max_device_bytes``
    and ``max_host_bytes`` bound it. Statistics that do not fit the device at
    once are collected in several passes over the data (the dataloader must
    then yield the same batches each time). ``max_device_bytes=0`` sends every
    batch's rows to the host instead (slow; for a GPU short of memory). On
    the CPU the rows go to the Rust accumulators. ``accumulate_on`` ("auto",
    "device" or "host") overrides that choice (``"device"`` on a CPU model
    runs the planned float64 path on the CPU). With ``"auto"``, a device too
    small for any plan (one input group's sums do not fit beside a step)
    sends the collection to the host path, with a warning (not with ``out``);
    the host path halves a step that runs out of device memory. The model's parameters
    receive no ``.grad`` (they are restored).

    Long passes: with ``checkpoint_path`` and ``checkpoint_every = N`` the
    statistics so far are written (atomically) every N batches; with
    ``resume`` (the default) an existing checkpoint is loaded and its batches
    are skipped, so the dataloader must yield the same batches in the same
    order. A batch that fails (non-finite values, ...) raises; the last
    checkpoint stays valid.

    Data-parallel runs: when ``torch.distributed`` is initialized with more
    than one rank, every rank passes its own shard (a ``DistributedSampler``)
    and receives the statistics of all shards, summed exactly
    (:func:`lora_da.distributed.all_reduce_statistics`); the ranks also agree
    on one memory plan. ``reduce_across_ranks=False`` keeps each rank's own.
    A checkpoint path gets the rank in its name (``ck.rank1.safetensors``).

    Keeping the statistics of a large model (SPEC §7): the host's share is
    counted before the first batch against the available memory (and
    ``max_host_bytes``): the statistics themselves and the transfer staging.
    If they do not fit, the call refuses with the bytes needed and available.
    With ``out=PATH`` each pass's sums are written into the statistics file
    as the pass ends, so the host holds about one group's worth beside the
    model, and the result is memory-mapped from that file
    (:meth:`Statistics.load` with ``mmap=True``); ``compute_init`` then reads
    one group at a time. On the host path (a CPU model) ``out`` is written at
    the end.
    """
    for name, v in (("max_device_bytes", max_device_bytes), ("max_host_bytes", max_host_bytes)):
        if v is not None:  # at entry: a negative bound printed "-0.00 GiB available" in the host check
            whole_number(v, f"collect_statistics: {name}", minimum=0, what="a number of bytes ≥ 0 or None")
    group = active_group(reduce_across_ranks)
    if out is not None and (checkpoint_path is not None or group is not None):
        raise InvalidArgumentError(
            "collect_statistics: out= (statistics written pass by pass) works without checkpoint_path and outside a "
            "process group; collect, then save the result on one rank"
        )
    if group is not None:
        check_same_options(dict(target_modules=target_modules, loss_fn=loss_fn, token_mask=token_mask,
                                output_fisher=output_fisher, accumulate_on=accumulate_on), group, "collect_statistics")
    if group is not None and checkpoint_path is not None:
        checkpoint_path = rank_path(checkpoint_path)
    run = Run.start(model, dataloader, target_modules, loss_fn=loss_fn, token_mask=token_mask,
                     output_fisher=output_fisher, max_samples=max_samples, checkpoint_path=checkpoint_path,
                     checkpoint_every=checkpoint_every, resume=resume, progress=progress)
    on_host = accumulates_on_host(run.device, max_device_bytes, accumulate_on)
    if run.finished is not None:  # a rerun of a finished checkpointed pass: its statistics, once the data match
        with together(group, "collect"):
            run.confirm_finished()
    elif on_host:
        run.check_host_floor(max_host_bytes, streaming=False)
        with together(group, "collect"):
            run.collect_on_host()
    else:
        run.check_host_floor(max_host_bytes, streaming=out is not None)
        try:
            collect_on_device(run, max_device_bytes=max_device_bytes, max_host_bytes=max_host_bytes,
                              keep_on_host=True, group=group, to_disk=out)
        except DeviceTooSmallError as e:
            if not host_fallback(e, accumulate_on, group, dataloader, progress, out):
                raise
            return collect_statistics(model, dataloader, target_modules, loss_fn=loss_fn, token_mask=token_mask,
                                      output_fisher=output_fisher, max_samples=max_samples,
                                      max_device_bytes=max_device_bytes, max_host_bytes=max_host_bytes,
                                      checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                                      resume=resume, progress=progress, accumulate_on="host",
                                      reduce_across_ranks=reduce_across_ranks, out=out)
    if out is not None and not on_host:
        if run.n_samples == 0:
            raise InvalidArgumentError("collect_statistics: the dataloader yielded no sample")
        stats = Statistics.load(out, mmap=True)
        stats.plan = run.plan
        return stats
    if group is None:
        stats = run.finish()
        if out is not None:
            stats.save(out)
        return stats
    # A rank without samples must still join the sum, or the others would wait forever.
    if agree([float(run.n_samples == 0)], group, "max")[0]:
        raise InvalidArgumentError("collect_statistics: a rank's dataloader yielded no sample; every rank needs a shard")
    stats = run.finish()
    total = all_reduce_statistics(stats, group)
    total.plan = stats.plan
    return total


def host_fallback(refusal: DeviceTooSmallError, accumulate_on: str, group, dataloader, progress: bool,
                  out=None) -> bool:
    """Whether a device too small for any plan (SPEC §7) sends the collection to the host
    path instead: with ``accumulate_on="auto"``, outside a process group (whose ranks plan
    together), when the data can be read again (the probe read the first batch; nothing
    was summed), and without ``out`` (the host path holds every statistic in host memory
    until the end, which is what ``out`` is passed to avoid). Says so, with the planner's
    reason."""
    if accumulate_on != "auto" or group is not None or one_shot(dataloader) or out is not None:
        return False
    warnings.warn(f"lora-da: no device plan fits, so the statistics are summed on the host instead (slow): {refusal}",
                  stacklevel=3)
    if progress:
        print("lora-da: no device plan fits; summing on the host instead", file=sys.stderr)
    return True


def accumulates_on_host(device: torch.device, max_device_bytes: int | None, accumulate_on: str) -> bool:
    if accumulate_on not in ("auto", "device", "host"):
        raise InvalidArgumentError(f"accumulate_on must be 'auto', 'device' or 'host', got {accumulate_on!r}")
    if accumulate_on != "auto":
        return accumulate_on == "host"
    return device.type == "cpu" or max_device_bytes == 0


@dataclass
class Run:
    """The state of one collection run: targets, host accumulators, counts."""

    model: torch.nn.Module
    dataloader: Iterable[dict]
    targets: dict[str, Target]
    loss_fn: LossFn
    token_mask: str
    per_sample: bool
    max_samples: int | None
    checkpoint_path: str | os.PathLike | None
    checkpoint_every: int | None
    progress: bool
    config: dict
    host: HostSums
    groups: dict[str, str] | None = None  # module → group leader, fixed on the first batch
    n_samples: int = 0
    skip: int = 0
    batches_done: int = 0
    n_samples_at_start: int = 0
    plan: MemoryPlan | None = None
    recomputes: bool = False  # the model ran forward calls inside its backward (seen on the probe)
    fingerprints: dict = field(default_factory=dict)  # model / data fingerprints written into checkpoints
    expected_data: str | None = None  # the resumed checkpoint's data fingerprint
    micro: int = 1  # samples per forward + backward on the planned device path (plan.micro_batch, lowered on OOM)
    host_micro: int | None = None  # samples per step on the host path (None: each batch whole; lowered on OOM)
    step_start: int = 0  # the running step's first sample within its batch (errors name the batch's samples)
    finished: Statistics | None = None  # a finished checkpoint of this very pass, returned as it is
    writer: StatisticsWriter | None = None  # the statistics file each pass goes to (collect_statistics(out=...))
    written: dict = field(default_factory=dict)  # the counts already in that file, for its header
    shrink_pass: Callable | None = None  # during a device pass: moves half its groups out (passes.move_half_out)
    ordinal: int = 0  # the current batch's first sample within the pass (the saved gradients' rows)
    where: str = ""  # the pass being run, as the notes name it ("pass 2 of 6, ")
    cuts: Cuts | None = None  # the layer stack's saved input gradients, when passes start at a layer (collect.cuts)

    @classmethod
    def start(cls, model, dataloader, target_modules, *, loss_fn, token_mask, output_fisher, max_samples,
              checkpoint_path, checkpoint_every, resume, progress) -> Run:
        if checkpoint_every is not None and (checkpoint_path is None or checkpoint_every < 1):
            raise InvalidArgumentError(f"checkpoint_every={checkpoint_every!r} needs a checkpoint_path and must be ≥ 1")
        if output_fisher not in ("diagonal", "sequence_lowrank"):
            raise InvalidArgumentError(f"output_fisher must be 'diagonal' or 'sequence_lowrank', got {output_fisher!r}")
        if max_samples is not None:  # a bool was taken as 1 sample, 2.5 ended in a raw TypeError
            max_samples = whole_number(max_samples, "max_samples", what="a positive integer or None")
        token_mask_of({"attention_mask": None, "labels": torch.zeros(1, 1, dtype=torch.long)}, token_mask)
        named = dict(model.named_modules())
        targets = {}
        for name in resolve_targets(model, target_modules):
            mod = named[name]
            kind = linear_kind(mod)
            m, n = module_shape(mod, kind)
            targets[name] = Target(name, mod, kind, m, n)
        per_sample = output_fisher == "sequence_lowrank"
        run = cls(
            model=model, dataloader=dataloader, targets=targets, loss_fn=loss_fn or default_loss, token_mask=token_mask,
            per_sample=per_sample, max_samples=max_samples, checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every, progress=progress,
            config={"token_mask": token_mask, "output_fisher": output_fisher},
            host=HostSums.zeros({name: (t.m, t.n) for name, t in targets.items()}, per_sample),
        )
        if checkpoint_path is not None:
            run.fingerprints["model_fingerprint"] = model_fingerprint(targets)
            # a finished pass is reused only for the same sample budget
            run.fingerprints["max_samples"] = None if max_samples is None else int(max_samples)
        if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
            run.resume_from(Statistics.load(checkpoint_path))
        return run

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def resume_from(self, ck: Statistics) -> None:
        check_is_checkpoint(self.checkpoint_path, ck)
        want = {n: (t.n, t.m, t.kind) for n, t in self.targets.items()}
        have = {n: (i.in_features, i.out_features, i.kind) for n, i in ck.modules.items()}
        if want != have or any(ck.config.get(k) != v for k, v in self.config.items()):
            raise StatisticsFileError(
                f"{self.checkpoint_path}: the checkpoint is for other modules or options; delete it or pass resume=False"
            )
        check_checkpoint_identity(self.checkpoint_path, ck, self.fingerprints["model_fingerprint"])
        self.expected_data = ck.config.get("data_fingerprint")
        if ck.config.get("finished"):
            if ck.config.get("max_samples", "unrecorded") != self.fingerprints["max_samples"]:
                raise StatisticsFileError(
                    f"{self.checkpoint_path}: the checkpoint holds a finished pass with max_samples="
                    f"{ck.config.get('max_samples', 'unrecorded')}, not {self.max_samples}; delete it or pass "
                    "resume=False to collect again"
                )
            self.finished, self.n_samples = ck, ck.n_samples
            self.batches_done = int(ck.config["batches_done"])
            return
        self.host = HostSums.resumed(ck)
        self.groups = {n: i.input_group for n, i in ck.modules.items()}
        self.n_samples, self.skip = ck.n_samples, int(ck.config["batches_done"])
        self.batches_done = self.skip
        if self.progress:
            total = dataloader_length(self.dataloader)
            print(f"lora-da: {self.checkpoint_path}: resuming at batch {self.skip + 1}"
                  f"{f' of {total}' if total is not None else ''} ({count(self.n_samples, 'sample')} already summed)",
                  file=sys.stderr)

    def confirm_finished(self) -> None:
        """A finished checkpoint stands for this pass only on the same data: its first
        batch (and its length, when the dataloader has one and no max_samples cut it)."""
        first = next(iter(self.dataloader), None)
        if not isinstance(first, Mapping) or batch_digest(first) != self.expected_data:
            raise StatisticsFileError(
                f"{self.checkpoint_path}: the checkpoint holds a finished pass on other data or another order (its "
                "first batch differs from this dataloader's); delete it or pass resume=False"
            )
        total = dataloader_length(self.dataloader)
        if self.max_samples is None and total is not None and total != self.batches_done:
            raise StatisticsFileError(
                f"{self.checkpoint_path}: the checkpoint holds a finished pass of {self.batches_done} batches, but this "
                f"dataloader has {total}; delete it or pass resume=False"
            )
        if self.progress:
            print(f"lora-da: {self.checkpoint_path}: the pass already finished ({count(self.n_samples, 'sample')}, "
                  f"{count(self.batches_done, 'batch', 'batches')}) on this model, data and options; returning its statistics",
                  file=sys.stderr)

    def snapshot(self) -> Statistics:
        modules = self.module_infos()
        return Statistics(
            modules=modules,
            input_factors=self.host.inputs,
            output_factors=self.host.outputs,
            # not copied: a checkpoint is written at once, and finish() ends the run (a copy
            # would double the host's largest share, Ḡ, at the very end)
            grad_sums=dict(self.host.grad_sums),
            n_samples=self.n_samples,
            config=dict(self.config, batches_done=self.batches_done, **self.fingerprints),
            model=self.model_info(),
        )

    def finish(self) -> Statistics:
        if self.finished is not None:
            return self.finished
        if self.n_samples == 0:
            raise InvalidArgumentError("collect_statistics: the dataloader yielded no sample")
        empty = [g for g, f in self.host.inputs.items() if f.tokens == 0]
        if empty:
            raise InvalidArgumentError(f"collect_statistics: no valid token reached module(s) {empty}; check token_mask")
        stats = self.snapshot()
        stats.plan = self.plan
        if self.checkpoint_path is not None:
            # marked finished: a later run with resume=True refuses it instead of returning it unchanged
            replace(stats, config=dict(stats.config, finished=True)).save(self.checkpoint_path)
        return stats

    def set_groups(self, host_factors: bool = True) -> None:
        """Fix the input groups on the first batch. ``host_factors``: create the
        groups' host accumulators now (the host path adds rows to them); the
        device path creates them when a pass is first flushed, and not at all
        when its passes are solved on the device."""
        if self.groups is None:
            self.groups = detect_groups(self.targets)
            if host_factors:
                for name, leader in self.groups.items():
                    if leader == name:
                        self.host.input_factor(name, self.targets[name].n)
        else:
            check_groups(self.targets, self.groups)

    def batches(self):
        """``(index, batch, bsz, mask)`` on the model's device, truncated at ``max_samples``."""
        skip = self.skip
        seen = self.n_samples_at_start  # a resumed checkpoint's samples count towards max_samples
        for index, batch in enumerate(self.dataloader):
            if index == 0 and self.checkpoint_path is not None and isinstance(batch, Mapping):
                self.check_data_order(batch)
            if index < skip:
                continue
            if self.max_samples is not None and seen >= self.max_samples:
                break
            if not isinstance(batch, Mapping):
                raise InvalidArgumentError(
                    f"batch {index} is a {type(batch).__name__}, not a dict of tensors: each batch must be collated "
                    "(input_ids, attention_mask and, for classification, labels), e.g. by a DataLoader with "
                    "transformers' DataCollatorWithPadding"
                )
            batch = dict(batch)
            device = self.device
            batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            bsz = batch_size(batch)
            if self.max_samples is not None and seen + bsz > self.max_samples:
                keep = self.max_samples - seen
                batch = slice_batch(batch, bsz, 0, keep)
                bsz = keep
            seen += bsz
            yield index, batch, bsz, token_mask_of(batch, self.token_mask)

    def check_data_order(self, first: Mapping) -> None:
        """The first batch stands for the data and its order: a checkpoint resumed on
        other data would skip batches it never saw and add the rest to the wrong sums."""
        digest = batch_digest(first)
        if self.expected_data is not None and digest != self.expected_data:
            raise StatisticsFileError(
                f"{self.checkpoint_path}: the checkpoint was collected on other data or another order (its first batch "
                "differs from this dataloader's); delete it or pass resume=False"
            )
        self.fingerprints["data_fingerprint"] = digest

    @staticmethod
    def fingerprint(batch: dict) -> tuple:
        """Shapes and sums of a batch's tensors: several passes must see the same batches."""
        return tuple((k, tuple(v.shape), float(v.double().sum())) for k, v in sorted(batch.items())
                     if isinstance(v, torch.Tensor))

    def forward_backward(self, batch: dict, bsz: int, index: int, recorder: Recorder) -> None:
        """The back-propagated loss is ``Σ_s ℓ_s`` (SPEC §2); the hooks see the rest."""
        recorder.clear()
        with torch.enable_grad():
            # The hooks need outputs that require grad: make the embedding output do so,
            # unless the recorder starts the graph at its own targets.
            handle = None if recorder.start_graph else make_inputs_require_grad(self.model)
            embeds = batch.get("inputs_embeds")
            if (handle is not None and isinstance(embeds, torch.Tensor) and embeds.is_floating_point()
                    and not embeds.requires_grad):
                # the embedding layer is not called for inputs_embeds: start the graph at them instead
                batch = dict(batch, inputs_embeds=embeds.detach().requires_grad_(True))
            try:
                losses = self.loss_fn(self.model, batch)
            except ForwardCut as cut:  # this pass's forward ends at a layer's input (collect.cuts)
                self.backward_from(cut.h, recorder, index)
                return
            finally:
                if handle is not None:
                    handle.remove()
            if recorder.start_graph and isinstance(losses, torch.Tensor) and not losses.requires_grad:
                # the graph starts at the pass's modules: a loss without one is reached by none of them
                silent = [t.name for t in recorder.targets if not t.keys]
                if silent:
                    raise LoraDAError(f"module {silent[0]}: no output gradient in batch {index} (it was not called)")
                names = [t.name for t in recorder.targets]
                raise LoraDAError(
                    f"module {names[0]}: no output gradient in batch {index}: the loss does not depend on the output "
                    f"of {names[:3]}{' …' if len(names) > 3 else ''} (or loss_fn returned it detached, or computed it "
                    "under torch.no_grad())")
            check_losses(losses, bsz)
            if losses.dim() != 1 or losses.shape[0] != bsz:
                raise ShapeError(f"loss_fn must return per-sample losses of shape ({bsz},), got {tuple(losses.shape)}")
            if not torch.all(torch.isfinite(losses)):
                # numbered within the user's batch, not within the step that split it
                bad = [self.step_start + i for i in torch.nonzero(~torch.isfinite(losses)).flatten().tolist()]
                source = next((t.name for t in recorder.targets if any(not bool(torch.isfinite(f).all()) for f in t.seen)),
                              None)
                where = f"module {source}: non-finite input activation in " if source else ""
                raise NonFiniteError(f"{where}batch {index}: non-finite loss for samples {bad}")
            before = sum(len(t.keys) for t in recorder.targets) + recorder.extra
            if not (recorder.stop_early and before):
                losses.sum().backward()
                # A forward call made during the backward (reentrant activation
                # checkpointing recomputes its segment there) could come after the
                # count the cut awaits: then the backward must always run to its end.
                recorder.recomputes = recorder.recomputes or sum(len(t.keys) for t in recorder.targets) > before
                return
            recorder.expect = before
            try:
                losses.sum().backward()
            except BackwardDone:
                pass  # every hooked output has its gradient: the rest of the graph is not needed
            finally:
                recorder.expect = None

    def backward_from(self, h: torch.Tensor, recorder: Recorder, index: int) -> None:
        """The backward of a pass whose forward ended at a layer's input ``h``, from the
        gradient the pass above saved there (SPEC §7, :mod:`lora_da.collect.cuts`)."""
        if h is None or not h.requires_grad:
            names = [t.name for t in recorder.targets]
            raise LoraDAError(f"module {names[0]}: no output gradient in batch {index}: the layer input above "
                              f"{names[:3]}{' …' if len(names) > 3 else ''} does not depend on them")
        grad = self.cuts.gradient(h)
        recorder.expect = sum(len(t.keys) for t in recorder.targets) + recorder.extra
        try:
            torch.autograd.backward(h, grad)
        except BackwardDone:
            pass
        finally:
            recorder.expect = None

    def checkpoint_due(self) -> bool:
        return self.checkpoint_every is not None and self.batches_done % self.checkpoint_every == 0

    def bar(self, desc: str, batch_size: int | None = None):
        """A progress bar over the batches still to come, with a total (and so an ETA)
        whenever it is known: the dataloader's length, less the batches a resumed run
        skips, and the batches ``max_samples`` leaves at the dataloader's ``batch_size``
        (or ``batch_size``, the first batch's size), whichever is fewer."""
        total = None
        try:
            total = max(0, len(self.dataloader) - self.skip)
        except TypeError:  # an iterable without a length
            pass
        if self.max_samples is not None:
            bs = batch_size or getattr(self.dataloader, "batch_size", None)
            if isinstance(bs, int) and bs > 0:
                left = -(-max(0, self.max_samples - self.n_samples_at_start) // bs)
                total = left if total is None else min(total, left)
        return tqdm(desc=desc, total=total, unit="batch", disable=not self.progress)

    def collect_on_host(self) -> None:
        """Every batch's rows go to the host (the CPU path, or ``max_device_bytes=0``)."""
        self.n_samples_at_start = self.n_samples

        def keep(target, x, g, key):
            target.calls.append((x, g, key))

        with frozen(self.model), Recorder(self.targets.values(), keep) as rec, self.bar("lora-da: collecting statistics") as bar:
            for index, batch, bsz, mask in self.batches():
                self.host_steps(batch, bsz, index, rec)
                if not self.per_sample:
                    self.host.count_samples(bsz)
                self.n_samples += bsz
                self.batches_done = index + 1
                bar.update(1)
                if self.checkpoint_due():
                    self.snapshot().save(self.checkpoint_path)

    def host_steps(self, batch: dict, bsz: int, index: int, rec: Recorder) -> None:
        """One batch of the host path in steps of ``host_micro`` samples (the whole batch until
        a step runs out of device memory, SPEC §7). A step's rows are added only once its
        forward, backward and float64 products have all succeeded (``HostSums.add_batch``
        allocates before it adds), so a step that runs out is redone at half its size, and
        nothing is lost or counted twice (SPEC §2: the sums do not depend on the split)."""
        a = 0
        while a < bsz:
            k = min(self.host_micro or bsz, bsz - a)
            sub = batch if k == bsz else slice_batch(batch, bsz, a, a + k)
            self.step_start, failed = a, None
            try:
                self.forward_backward(sub, k, index, rec)
                self.set_groups()
                self.host.add_batch(self.targets, self.groups, token_mask_of(sub, self.token_mask), index, self.per_sample)
            except RuntimeError as e:
                if not out_of_memory(e):
                    raise
                failed = e
            finally:
                self.step_start = 0
            rec.clear()  # this step's rows: not held beside the next step's
            if failed is not None:
                release(self.device)
                if k == 1:
                    raise LoraDAError(
                        f"collect: out of device memory at batch {index} with one sample per step on the host path "
                        f"(each step's inputs and output gradients are kept on {self.device} until its products are "
                        f"formed; {free_device_bytes(self.device) / 2**30:.2f} GiB free now): shorten the sequences, target "
                        "fewer modules, turn on gradient checkpointing, or free device memory"
                    ) from failed
                self.host_micro = (k + 1) // 2
                note(self, f"batch {index}: out of device memory on the host path; {k} samples per step lowered to "
                           f"{self.host_micro}, the step redone (nothing of it had been added)")
                continue
            a += k

    def module_infos(self) -> dict[str, ModuleInfo]:
        return {name: ModuleInfo(name=name, in_features=t.n, out_features=t.m, kind=t.kind, input_group=self.groups[name])
                for name, t in self.targets.items()}

    def model_info(self) -> dict:
        return {"class": type(self.model).__name__,
                "name_or_path": getattr(getattr(self.model, "config", None), "_name_or_path", "")}

    def check_host_floor(self, max_host_bytes: int | None, *, streaming: bool) -> None:
        """Before the first batch (SPEC §7): the host must hold at least every module's ``Ḡ`` and ``y``
        sums, whatever the input groups turn out to be (the plan counts the rest after the probe)."""
        if streaming:
            return
        need = sum(8 * (t.m * t.n + 2 * t.m) for t in self.targets.values())
        have = available_host_bytes()
        if max_host_bytes is not None:
            have = max_host_bytes if have is None else min(have, max_host_bytes)
        if have is not None and need > have:
            raise InvalidArgumentError(
                f"collect_statistics: the statistics need at least {need / 2**30:.2f} GiB of host memory ({need} bytes: "
                f"the mean gradients alone) but {have / 2**30:.2f} GiB ({have} bytes) are available; target fewer "
                "modules, use collect_and_solve (initialize_lora_da_weights / get_lora_da_state_dict) which keeps no "
                "statistics, or pass out=PATH to write them to disk as they are collected (on a GPU)"
            )
