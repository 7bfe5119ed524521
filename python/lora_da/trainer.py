"""LoRA-DA inside a Hugging Face ``Trainer`` run (SPEC §2–3, through
:func:`lora_da.initialize_lora_da_weights`).

``LoraDACallback`` initializes the adapter when training begins, from the
trainer's own train dataloader: the batches the model will be trained on,
collated as the trainer collates them, on the device it placed them on.
Under ``torchrun`` / Accelerate each process reads its own shard and the
statistics are summed over the processes (lora-da's default under a process
group), so every process writes the same adapter before the first step.
"""

from __future__ import annotations

from transformers import TrainerCallback

from lora_da.adapters import initialize_lora_da_weights
from lora_da.errors import InvalidArgumentError, whole_number
from lora_da.init import LoraDAConfig


class LoraDACallback(TrainerCallback):
    """``Trainer(..., callbacks=[LoraDACallback(LoraDAConfig(n_pop=len(train_set)))])``.

    ``max_samples``: calibration samples per process, taken from the start of
    the train dataloader (a few hundred suffice; ``None`` reads one whole
    epoch). Those batches are kept in memory for the pass, so a shuffling
    sampler is read once. A run resumed from a checkpoint (``global_step`` >
    0) keeps its trained weights. ``results`` holds each module's solve
    diagnostics afterwards; other keywords go to
    :func:`lora_da.collect_statistics` (``max_device_bytes``, ...).
    Under Accelerate the last global batch of an epoch is filled up by
    repeating samples from its start (``even_batches``): when ``max_samples``
    reaches the end of a small set, those samples count twice.
    """

    def __init__(self, lora_da_config: LoraDAConfig, *, max_samples: int | None = 256, adapter_name: str = "default",
                 progress: bool = True, **collect_kwargs):
        _check_config(lora_da_config)
        if max_samples is not None:
            max_samples = whole_number(max_samples, "LoraDACallback: max_samples", what="a positive integer or None")
        self.lora_da_config = lora_da_config
        self.max_samples = max_samples
        self.adapter_name = adapter_name
        self.progress = progress
        self.collect_kwargs = collect_kwargs
        self.results: dict | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if state.global_step > 0 or self.results is not None:
            return  # resumed (the checkpoint holds the trained adapter) or already initialized
        # again here, before any step: the config may have been changed (or swapped) since the callback was
        # built, and preserve_output would otherwise end the run at its first checkpoint save
        _check_config(self.lora_da_config)
        if model is None or train_dataloader is None:
            raise InvalidArgumentError("LoraDACallback: the Trainer passed no model or train dataloader to on_train_begin")
        batches = _first_samples(train_dataloader, self.max_samples)
        self.results = initialize_lora_da_weights(
            model, batches, lora_da_config=self.lora_da_config, adapter_name=self.adapter_name,
            progress=self.progress and state.is_local_process_zero, **self.collect_kwargs,
        )


def _check_config(lora_da_config) -> None:
    """A :class:`LoraDAConfig` without ``preserve_output``, which the Trainer cannot save."""
    if not isinstance(lora_da_config, LoraDAConfig):
        raise InvalidArgumentError(
            f"LoraDACallback needs a lora_da.LoraDAConfig, got {type(lora_da_config).__name__}")
    if lora_da_config.preserve_output:
        # preserve_output rewrites the base weights, and every checkpoint the Trainer saves would then be
        # refused by the save guard (hours into a run) or, saved plainly, be wrong on a fresh base model
        raise InvalidArgumentError(
            "LoraDACallback: preserve_output=True cannot be combined with the Trainer, whose checkpoint saves "
            "would store an adapter for the modified base weights; pass preserve_output=False, or initialize "
            "before training with lora_da.initialize_lora_da_weights(...) and lora_da.save_initial_adapter(model, "
            "path), and save the final model with save_pretrained(out, path_initial_model_for_weight_conversion=path)"
        )


def _first_samples(dataloader, max_samples: int | None) -> list:
    """Batches from the start of ``dataloader`` holding ``max_samples`` samples
    (the last one cut), as a list: the collection may read them more than once."""
    import torch

    out, seen = [], 0
    for batch in dataloader:
        if max_samples is not None and seen >= max_samples:
            break
        n = None
        for v in batch.values() if isinstance(batch, dict) or hasattr(batch, "values") else ():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                n = v.shape[0]
                break
        if n is not None and max_samples is not None and seen + n > max_samples:
            keep = max_samples - seen
            batch = {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
                     for k, v in batch.items()}
            n = keep
        out.append(batch)
        seen += n or 0
    return out
