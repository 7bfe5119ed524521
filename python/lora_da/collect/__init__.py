"""One pass over the calibration data gives every statistic (SPEC §2), in the
order of the data:

* :mod:`~lora_da.collect.targets` — which modules, their shapes;
* :mod:`~lora_da.collect.losses` — per-sample losses and the tokens that count;
* :mod:`~lora_da.collect.hooks` — the forward/tensor hooks that pair each call's
  input with its output gradient, frozen parameters, shared inputs;
* :mod:`~lora_da.collect.host_sums` and :mod:`~lora_da.collect.device_sums` —
  the float64 sums on the host (Rust accumulators) and on the device;
* :mod:`~lora_da.collect.checkpoints` — fingerprints and resume checks;
* :mod:`~lora_da.collect.passes` — the planned device path (SPEC §7);
* :mod:`~lora_da.collect.run` — a run and :func:`collect_statistics`.
"""

from lora_da.collect.losses import LossFn, causal_lm_per_sample_loss, default_loss, token_mask_of
from lora_da.collect.run import collect_statistics
from lora_da.collect.targets import linear_kind, module_shape, resolve_targets

__all__ = ["LossFn", "causal_lm_per_sample_loss", "collect_statistics", "default_loss", "linear_kind", "module_shape",
           "resolve_targets", "token_mask_of"]
