"""The hooks of a pass (SPEC §2): a forward hook on each target pairs the call's
input ``x`` with a tensor hook on its output, which receives
``g = ∂(Σ_s ℓ_s)/∂o``. Pairing per call means a module called twice per
forward (weight tying) counts both calls, and a forward whose output takes no
gradient (the no-grad first pass of reentrant checkpointing) counts nothing.
Modules whose calls receive the very same input tensor share one ``Z``."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from lora_da.collect.targets import Target
from lora_da.errors import LoraDAError


class BackwardDone(Exception):
    """Raised from the last awaited tensor hook to end the backward pass there."""


class Recorder:
    """The hooks of one pass, with their own lifetime: a forward hook on each
    target pairs the call's input with a tensor hook on its output, and
    ``sink(target, x, g, key)`` receives the pair when the gradient arrives.
    Per batch each target keeps its calls' input identities (``keys``, for
    shared-input detection) and, in ``seen``, its inputs (host path) or whether
    each was finite (device path), to name the source of non-finite values."""

    def __init__(self, targets: Sequence[Target], sink, stop_early: bool = False, keep_inputs: bool = True,
                 start_graph: bool = False):
        self.targets, self.sink, self.handles = list(targets), sink, []
        # With ``start_graph`` the autograd graph starts at these targets' outputs (SPEC §7):
        # nothing below them requires grad, so the layers below keep no activations and the
        # backward ends at them. Only the calls that take gradient in a whole step do so
        # (``Target.grad_calls``, from the probe: a module may also be called off the loss's
        # path, as DeBERTa's query_proj on the position embeddings). ``order`` lists the calls'
        # modules in forward order; ``pattern`` whether each call of each target took gradient.
        self.start_graph, self.order, self.pattern, self.counts = start_graph, [], {}, {}
        # ``seen`` holds the inputs themselves (scanned only when a loss is not
        # finite) or, where they should not outlive their call, a finite flag each.
        self.keep_inputs = keep_inputs
        # With ``stop_early`` the backward is cut once every call of this batch
        # had its gradient: a pass over the top layers need not reach the bottom.
        self.stop_early, self.expect, self.received = stop_early, None, 0
        self.extra = 0  # other gradients awaited per step (collect.cuts: a layer input's, saved)
        self.recomputes = False

    def __enter__(self) -> Recorder:
        # the graph is started before the recording hook sees the output (hooks run in order)
        self.handles = [t.module.register_forward_hook(self._start(t)) for t in self.targets] if self.start_graph else []
        self.handles += [t.module.register_forward_hook(self._hook(t)) for t in self.targets]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.clear()

    def clear(self) -> None:
        self.received = 0
        self.order, self.pattern, self.counts = [], {}, {}
        for t in self.targets:
            t.calls.clear()
            t.keys.clear()
            t.seen.clear()

    def _hook(self, target: Target):
        sink = self.sink
        recorder = self

        def hook(module, args, output):
            took = torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad
            recorder.pattern.setdefault(target.name, []).append(took)
            if not took:
                return
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version)
            recorder.order.append(target.name)
            target.keys.append(key)
            target.seen.append(x if recorder.keep_inputs else torch.isfinite(x).all())

            def grad_hook(g):
                sink(target, x, g.detach(), key)
                recorder.arrive()

            output.register_hook(grad_hook)

        return hook

    def arrive(self) -> None:
        """One awaited gradient arrived; the backward ends once all have."""
        self.received += 1
        if self.expect is not None and self.received >= self.expect:
            raise BackwardDone

    def _start(self, target: Target):
        recorder = self

        def start(module, args, output):
            """A call that takes gradient in a whole step, whose output takes none here (nothing
            below it is in this pass's graph): the graph starts at its output (a clone of a
            leaf). No gradient is then formed for its input or its own backward."""
            i = recorder.counts.get(target.name, 0)
            recorder.counts[target.name] = i + 1
            calls = target.grad_calls
            if (calls is None or i >= len(calls) or not calls[i] or not torch.is_grad_enabled()
                    or not isinstance(output, torch.Tensor) or output.requires_grad or not output.is_floating_point()):
                return None
            # a clone of the leaf, not the leaf: the model may change its output in place
            # (``nn.ReLU(inplace=True)``), which autograd refuses on a leaf that requires grad
            return output.detach().requires_grad_(True).clone()

        return start


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Gradients are needed w.r.t. module outputs only: parameters take none
    during collection, and get their flags, ``.grad`` and mode back after; so
    does the model's generation cache (off during collection)."""
    requires = {p: p.requires_grad for p in model.parameters()}
    grads_before = {p: p.grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    # A decoder's forward keeps every layer's keys and values for generation (transformers'
    # ``use_cache``): a pass whose graph starts high up would hold the cache of every layer
    # below it beside its own graph (on the H200, 1.8 GiB at 8 samples of a 7B model), which
    # no plan counts and no statistic needs.
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and not isinstance(c, dict) and getattr(c, "use_cache", None)}
    cache_off: list = []  # (config, its own value) of those turned off, given back last
    model.eval()
    # Gradient checkpointing (what a user short of GPU memory turns on) is active
    # only in training mode in transformers' layers: keep those layers' own flag
    # so the pass fits where training fits; their submodules stay in eval (no dropout).
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: its layers checkpoint by other means
        GradientCheckpointingLayer = ()
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
    try:
        for c in configs.values():
            value = c.use_cache
            try:
                c.use_cache = False
            except (AttributeError, TypeError, ValueError):
                continue  # a config that refuses the change (a read-only property): its cache stays
            cache_off.append((c, value))
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
            p.grad = grads_before[p]
        for m, mode in modes.items():  # each module's own mode: a model may mix them
            m.training = mode
        for c, value in cache_off:  # last: a config that refuses its own value back stops nothing else
            c.use_cache = value


def make_inputs_require_grad(model: torch.nn.Module):
    """Make the input embeddings' output require grad (parameters are frozen
    during collection, so nothing else would start the graph)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        # Fall back to the first module that produces a floating tensor.
        emb = next(m for m in model.modules() if not list(m.children()))

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output.requires_grad_(True) if output.is_leaf else output

    return emb.register_forward_hook(hook)


def detect_groups(targets: dict[str, Target]) -> dict[str, str]:
    """Modules whose calls saw the very same input tensors share one ``Z``."""
    leaders: dict[tuple, str] = {}
    groups = {}
    for name, t in targets.items():
        key = tuple(t.keys)
        if not key:
            raise LoraDAError(f"module {name} was not called with gradient in the first batch; it cannot be targeted")
        groups[name] = leaders.setdefault(key, name)
    return groups


def check_groups(targets: dict[str, Target], groups: dict[str, str]) -> None:
    for name, leader in groups.items():
        if leader != name and targets[name].keys != targets[leader].keys:
            raise LoraDAError(
                f"modules {leader} and {name} shared their input in the first batch but not in a later one; "
                "shared-input detection needs a fixed call pattern"
            )
