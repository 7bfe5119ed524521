"""Device memory errors and their recovery, shared by collection and solves (SPEC §7)."""

from __future__ import annotations

import gc

import torch

# torch.OutOfMemoryError since torch 2.5; torch.cuda's name before (the same class).
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def release(device) -> None:
    """After an out-of-memory error: drop what the failed work still referenced
    and hand the caching allocator's free blocks back, so that the next try
    (smaller, or another route) sees all the memory there is."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
