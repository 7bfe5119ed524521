"""Passes that start their backward at a layer's input (SPEC §7, "cuts").

A pass over the lower layers of a stacked model needs ``g = ∂(Σ_s ℓ_s)/∂o`` at
its modules' outputs, and all of that gradient reaches them through the hidden
state ``h_c`` at the input of the first layer above the pass (layer ``c``), when
the model is a chain of layers. The pass above computes ``∂(Σ_s ℓ_s)/∂h_c`` on
its way down anyway; saved per sample (``T × H`` in the model's dtype, a small
fraction of the pass's float64 sums), it lets the pass below run its forward only
up to layer ``c`` and its backward only over its own layers, with the same
values (the same operations on the same inputs). Passes then run from the top
of the model down, and each holds only its own layers' autograd graph, so at a
small card it holds more sums and takes larger steps.

Where the chain is not a chain — a layer called twice, a tensor from below
layer ``c`` that reaches the loss around it (checked before the first pass: with
``h_c`` detached, the loss must not depend on the pass's modules) — the passes
run whole, as before."""

from __future__ import annotations

import contextlib

import torch

from lora_da.collect.losses import slice_batch
from lora_da.errors import LoraDAError


class ForwardCut(Exception):
    """Raised at the input of the cut layer: the pass's forward ends there."""

    def __init__(self, h: torch.Tensor):
        super().__init__("forward cut at a layer's input")
        self.h = h


def find_stack(model: torch.nn.Module, target_names) -> tuple[str, list[torch.nn.Module]] | None:
    """The ``ModuleList`` of layers that holds every target (``name.i.…``), or None."""
    names = list(target_names)
    for name, mod in model.named_modules():
        if (isinstance(mod, torch.nn.ModuleList) and len(mod) >= 2 and name and names
                and all((i := layer_index(name, t)) is not None and i < len(mod) for t in names)):
            return name, list(mod)
    return None


def layer_index(stack: str, module: str) -> int | None:
    if not module.startswith(stack + "."):
        return None
    head = module[len(stack) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def hidden_of(args, kwargs):
    """The hidden state a layer is called with: its first positional tensor, or ``hidden_states``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], True
    h = kwargs.get("hidden_states")
    return (h, False) if isinstance(h, torch.Tensor) else (None, False)


def with_hidden(args, kwargs, h, positional: bool):
    if positional:
        return (h, *args[1:]), kwargs
    return args, dict(kwargs, hidden_states=h)


class ChainCheck:
    """On the probe's forward: is every layer called once, in order, each on the
    previous one's output (or its first element)? And what does a sample's hidden
    state take (bytes per sample of the saved gradient)?"""

    def __init__(self, layers: list[torch.nn.Module]):
        self.layers, self.calls, self.handles = layers, [], []
        self.row_bytes, self.rows = 0, None

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    # Identities only (``id`` of tensors alive at the comparison): holding the hidden states
    # would hold their graphs, and a probe that ran out of memory would keep its step's
    # activations while the next try measures its own.
    def _pre(self, i):
        def pre(module, args, kwargs):
            h, _ = hidden_of(args, kwargs)
            self.calls.append(("in", i, None if h is None else id(h)))
            if h is not None and h.dim() >= 2 and i == 0:
                self.row_bytes, self.rows = h[0].numel() * h.element_size(), h.shape[0]
        return pre

    def _post(self, i):
        def post(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            self.calls.append(("out", i, id(out) if isinstance(out, torch.Tensor) else None))
        return post

    def chained(self, samples: int) -> bool:
        """… and is the hidden state's first dimension the step's ``samples`` (the saved
        gradient is kept per sample: not a sequence-first layer, nor a loss that runs the
        model on more rows than samples)?"""
        n = len(self.layers)
        if len(self.calls) != 2 * n or self.row_bytes == 0 or self.rows != samples:
            return False
        for i in range(n):
            (k1, i1, h), (k2, i2, out) = self.calls[2 * i], self.calls[2 * i + 1]
            if (k1, i1, k2, i2) != ("in", i, "out", i) or h is None or out is None:
                return False
            if i > 0 and h != self.calls[2 * i - 1][2]:
                return False
        return True


class Cuts:
    """The saved input gradients of one run: ``saved[c][ordinal]`` is sample
    ``ordinal``'s ``∂(Σ_s ℓ_s)/∂h_c`` (``T × H``), complete once the pass that
    saved it has ended."""

    def __init__(self, stack: str, layers: list[torch.nn.Module], row_bytes: int):
        self.stack, self.layers, self.row_bytes = stack, layers, row_bytes
        self.saved: dict[int, dict[int, torch.Tensor]] = {}
        self.complete: set[int] = set()
        self.valid: dict[int, bool] = {}
        self.use: int | None = None  # this pass's cut (its forward ends at layer use's input)
        self.capture: int | None = None  # the boundary whose gradient this pass saves
        self.rows: tuple[int, int] = (0, 0)  # the step's samples: (first ordinal, count)
        self.limit = 1 << 62  # bytes a pass may save (the plan's: the first batch's length for every sample)
        self.held = 0

    def cut_of(self, units) -> int | None:
        """The layer at whose input a pass over ``units`` can start its backward: the one
        above its highest module (None when that is the top layer: the pass needs the loss)."""
        top = max(layer_index(self.stack, name) for u in units for name, _ in u.modules)
        return top + 1 if top + 1 < len(self.layers) else None

    def drop_unneeded(self, remaining_cuts) -> None:
        keep = set(remaining_cuts)
        for c in list(self.saved):
            if c not in keep:
                del self.saved[c]
                self.complete.discard(c)

    @contextlib.contextmanager
    def pass_hooks(self, recorder, use: int | None, capture: int | None):
        """The hooks of one pass: its forward ends at layer ``use``'s input (the pass's own
        backward then starts there), and ``∂(Σ_s ℓ_s)/∂h_capture`` is saved on the way down."""
        self.use, self.capture = use, capture
        recorder.extra = 1 if capture is not None else 0
        handles = []
        if use is not None:
            handles.append(self.layers[use].register_forward_pre_hook(self._stop, with_kwargs=True))
        if capture is not None:
            self.saved[capture] = {}
            self.complete.discard(capture)
            self.held = 0
            handles.append(self.layers[capture].register_forward_pre_hook(self._save(recorder), with_kwargs=True))
        try:
            yield
            if capture is not None and capture in self.saved:
                self.complete.add(capture)
        finally:
            for h in handles:
                h.remove()
            recorder.extra = 0
            self.use = self.capture = None

    def _stop(self, module, args, kwargs):
        if torch.is_grad_enabled():
            h, _ = hidden_of(args, kwargs)
            raise ForwardCut(h)

    def _save(self, recorder):
        cuts = self

        def pre(module, args, kwargs):
            h, positional = hidden_of(args, kwargs)
            if h is None or not torch.is_grad_enabled():
                return None
            first, k = cuts.rows
            if h.shape[0] != k:
                raise LoraDAError(f"collect: layer {cuts.capture}'s input has {h.shape[0]} rows for a step of {k} "
                                  "samples; the passes cannot start at a layer's input (pass max_device_bytes for one pass)")
            store = cuts.saved.get(cuts.capture)  # None once more was saved than planned

            def hook(g):
                if store is not None and cuts.capture in cuts.saved:
                    for i in range(k):  # views of the step's gradient: kept until the pass below is done
                        store[first + i] = g[i].detach()
                    cuts.held += g.numel() * g.element_size()
                    if cuts.held > cuts.limit:  # longer samples than planned: the pass below runs whole
                        del cuts.saved[cuts.capture]
                recorder.arrive()

            if h.requires_grad:
                h.register_hook(hook)
                return None
            # nothing below this layer is in the pass's graph: a leaf, so that the gradient reaches it
            leaf = h.detach().requires_grad_(True)
            leaf.register_hook(hook)
            return with_hidden(args, kwargs, leaf, positional)

        return pre

    def gradient(self, like: torch.Tensor) -> torch.Tensor:
        """The saved gradient of this step's samples, shaped as the cut's hidden state."""
        first, k = self.rows
        rows = self.saved[self.use]
        g = torch.stack([rows[first + i] for i in range(k)])
        if g.shape != like.shape:
            raise LoraDAError(f"collect: the saved gradient at layer {self.use} has shape {tuple(g.shape)}, the "
                               f"hidden state {tuple(like.shape)}: the batches differ between passes")
        return g.to(like.dtype)

    def validate(self, run, c: int, units, batch, bsz: int, index: int) -> bool:
        """SPEC §7: may a pass over ``units`` end its forward at layer ``c``? One sample's
        forward with the graph from the pass's modules and ``h_c`` detached: the loss must
        not depend on them (nothing from below reaches it around layer ``c``)."""
        from lora_da.collect.hooks import Recorder

        if c in self.valid:
            return self.valid[c]
        names = [name for u in units for name, _ in u.modules]

        def detach(module, args, kwargs):
            h, positional = hidden_of(args, kwargs)
            return None if h is None else with_hidden(args, kwargs, h.detach(), positional)

        sub = slice_batch(batch, bsz, 0, 1)
        handle = self.layers[c].register_forward_pre_hook(detach, with_kwargs=True)
        try:
            with Recorder([run.targets[n] for n in names], lambda *a: None, keep_inputs=False,
                          start_graph=True) as rec, torch.enable_grad():
                losses = run.loss_fn(run.model, sub)
                reached = any(t.keys for t in rec.targets)
                ok = reached and isinstance(losses, torch.Tensor) and not losses.requires_grad
        except Exception:  # noqa: BLE001 — any failure here only means: run this pass whole
            ok = False
        finally:
            handle.remove()
        self.valid[c] = ok
        return ok
