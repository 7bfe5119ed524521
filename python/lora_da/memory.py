"""Device memory errors and their recovery, shared by collection and solves (SPEC §7)."""

from __future__ import annotations

import gc

import torch

# torch.OutOfMemoryError since torch 2.5; torch.cuda's name before (the same class).
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# A CUDA library that cannot get device memory for a new handle or its work space says so
# in its own words, not as torch's OutOfMemoryError: on the H200 a 7B plan's solve thread
# met "CUSOLVER_STATUS_INTERNAL_ERROR, when calling `cusolverDnCreate(handle)`" with the
# caching allocator holding the rest of the device.
LIBRARY_OUT_OF_MEMORY = ("cusolverDnCreate", "cublasCreate", "cublasLtCreate", "CUSOLVER_STATUS_ALLOC_FAILED",
                         "CUBLAS_STATUS_ALLOC_FAILED")


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` means the device's memory ran out: torch's own error, or a CUDA
    library's (:data:`LIBRARY_OUT_OF_MEMORY`); lora-da handles both alike (SPEC §7). Callers
    catch ``RuntimeError`` (torch's error is one) and ask this."""
    if isinstance(e, OutOfMemoryError):
        return True
    if not (isinstance(e, RuntimeError) and any(s in str(e) for s in LIBRARY_OUT_OF_MEMORY)):
        return False
    # A broken CUDA context (after a device-side assert, say) fails a library's handle creation
    # with the same words; it also fails a synchronization, which memory pressure does not.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            return False
    return True


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
