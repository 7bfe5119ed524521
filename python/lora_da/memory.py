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


class PinnedBuffer:
    """A page-locked float64 host buffer, grown on demand and reused: transfers between host
    and GPU at the link's speed (51 GiB/s on the H200 against 1–8 GiB/s pageable) without
    fresh host pages each time (SPEC §7 counts it). Where no page-locked memory is to be had,
    :meth:`get` returns None from then on and the caller copies pageable memory instead."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.unavailable = False

    def get(self, k: int) -> torch.Tensor | None:
        """``k`` float64 of the buffer (a view, valid until the next call), or None."""
        if self.unavailable:
            return None
        if self.buf is None or self.buf.numel() < k:
            self.buf = None
            try:
                self.buf = torch.empty(k, dtype=torch.float64, pin_memory=True)
            except RuntimeError:
                self.unavailable = True
                return None
        return self.buf[:k]
